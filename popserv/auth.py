"""Credential checkers and the user database: Dovecot's passwd-file, hashes checked off-thread.

The users file has Dovecot's passwd-file layout,
``user:{SCHEME}hash:uid:gid:gecos:home:shell:extra``; popserv reads the first two
fields and keeps the rest verbatim, so one file can serve popserv and Dovecot.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import argon2
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from popserv.interfaces import IUserDB, UserDBUnavailable

# New hashes and the unknown-user dummy use this hasher: argon2-cffi's defaults,
# RFC 9106's low-memory profile.  Verification reads the parameters from each hash,
# so tests swap in a cheap hasher here without changing what the file may hold.
HASHER = argon2.PasswordHasher()

# What Dovecot assumes for a password field without a {SCHEME} prefix.
DEFAULT_SCHEME = "CRYPT"


def _argon2_verifier(header: str) -> Callable[[str, bytes], bool]:
    """A verifier for one Argon2 variant; the hash must be of that variant."""

    def verify(hashed: str, password: bytes) -> bool:
        if not hashed.startswith(header):
            return False
        try:
            return HASHER.verify(hashed, password)
        except (argon2.exceptions.VerificationError, ValueError):
            return False  # a mismatch, or a hash Argon2 cannot parse (InvalidHashError)

    return verify


def _make_argon2id(password: bytes) -> str:
    return HASHER.hash(password)


def _verify_plain(stored: str, password: bytes) -> bool:
    return hmac.compare_digest(stored.encode("utf-8", "surrogateescape"), password)


def _make_plain(password: bytes) -> str:
    text = password.decode("utf-8", "surrogateescape")
    if ":" in text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError("a PLAIN password cannot hold ':' or control characters")
    return text


@dataclass(frozen=True)
class _Scheme:
    """How one ``{SCHEME}`` is verified, and made (None: popserv only reads it)."""

    verify: Callable[[str, bytes], bool]
    make: Callable[[bytes], str] | None = None
    plaintext: bool = False  # the stored text is the password itself (APOP, CRAM-MD5)


_PLAIN = _Scheme(_verify_plain, _make_plain, plaintext=True)

# Adding a scheme is one entry here.
_SCHEMES: dict[str, _Scheme] = {
    "ARGON2ID": _Scheme(_argon2_verifier("$argon2id$"), _make_argon2id),
    "ARGON2I": _Scheme(_argon2_verifier("$argon2i$")),
    "PLAIN": _PLAIN,
    "CLEARTEXT": _PLAIN,
}


def split_scheme(password: str) -> tuple[str, str]:
    """``"{ARGON2ID}$argon2id$..."`` -> ``("ARGON2ID", "$argon2id$...")``; names are upper-cased."""
    if password.startswith("{"):
        end = password.find("}")
        if end > 0:
            return password[1:end].upper(), password[end + 1 :]
    return DEFAULT_SCHEME, password


def hash_password(password: str | bytes, scheme: str = "ARGON2ID") -> str:
    """The password field for a new password: ``{ARGON2ID}$argon2id$v=19$m=...``.

    Raises ``ValueError`` for a scheme popserv cannot make, or a password the
    scheme cannot store.
    """
    if isinstance(password, str):
        password = password.encode("utf-8")
    entry = _SCHEMES.get(scheme.upper())
    if entry is None or entry.make is None:
        raise ValueError(f"cannot make {scheme} passwords")
    return "{" + scheme.upper() + "}" + entry.make(password)


@dataclass(frozen=True)
class Entry:
    """One user's line: the name, the password field, and the fields after it, verbatim."""

    user: str
    password: str
    rest: str | None = None

    @classmethod
    def parse(cls, line: str) -> Entry | None:
        """The entry on a line, or None for a blank line, a comment or a line without a user."""
        if not line.strip() or line.lstrip().startswith("#"):
            return None
        user, colon, tail = line.partition(":")
        if not user or not colon:
            return None
        password, colon, rest = tail.partition(":")
        return cls(user, password, rest if colon else None)

    def format(self) -> str:
        """The line for the file, without its newline."""
        fields = [self.user, self.password]
        if self.rest is not None:
            fields.append(self.rest)
        return ":".join(fields)


def _read_lines(path: str) -> list[str]:
    # surrogateescape: bytes that are not UTF-8 survive a rewrite and match no user.
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        text = f.read()
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


class UsersFile:
    """The users file as the admin tool edits it: entries in order, other lines kept."""

    def __init__(self, path: str, lines: list[str | Entry] | None = None):
        self.path = path
        self.lines: list[str | Entry] = lines if lines is not None else []

    @classmethod
    def read(cls, path: str) -> UsersFile:
        """Load the file; a missing file is an empty one (the first ``adduser`` creates it)."""
        try:
            raw = _read_lines(path)
        except FileNotFoundError:
            raw = []
        return cls(path, [Entry.parse(line) or line for line in raw])

    def entries(self) -> list[Entry]:
        return [line for line in self.lines if isinstance(line, Entry)]

    def users(self) -> list[str]:
        return [entry.user for entry in self.entries()]

    def get(self, user: str) -> Entry | None:
        for entry in self.entries():
            if entry.user == user:
                return entry
        return None

    def add(self, user: str, password: str) -> None:
        """Append a user; ``password`` is the whole field, as ``hash_password`` makes it."""
        if self.get(user) is not None:
            raise ValueError(f"user {user!r} already exists")
        self.lines.append(Entry(user, password))

    def set_password(self, user: str, password: str) -> None:
        """Replace the password field of every line for ``user``, keeping the other fields."""
        found = False
        for i, line in enumerate(self.lines):
            if isinstance(line, Entry) and line.user == user:
                self.lines[i] = Entry(user, password, line.rest)
                found = True
        if not found:
            raise KeyError(user)

    def remove(self, user: str) -> None:
        """Drop every line for ``user``."""
        kept = [line for line in self.lines if not (isinstance(line, Entry) and line.user == user)]
        if len(kept) == len(self.lines):
            raise KeyError(user)
        self.lines = kept

    def write(self) -> None:
        """Replace the file atomically: a temporary file in the same directory, fsync, rename.

        A new file is mode 0600; a rewritten one keeps its mode and, where allowed,
        its owner, so a file root edits stays readable by the server's user.
        """
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        try:
            old = os.stat(self.path)
        except FileNotFoundError:
            old = None
        text = "".join(
            (line.format() if isinstance(line, Entry) else line) + "\n" for line in self.lines
        )
        fd, temp = tempfile.mkstemp(dir=directory, prefix=".users-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
                if old is not None:
                    os.fchmod(f.fileno(), old.st_mode & 0o7777)
                    with contextlib.suppress(PermissionError):
                        os.fchown(f.fileno(), old.st_uid, old.st_gid)
                else:
                    os.fchmod(f.fileno(), 0o600)
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@implementer(IUserDB)
class PasswdFile:
    """``IUserDB`` over a passwd-file, re-read whenever it changes on disk."""

    log = Logger()

    def __init__(self, path: str, reactor=None):
        self.path = path
        self._reactor = reactor
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, Entry] = {}
        self._dummy: tuple[argon2.PasswordHasher, str] | None = None
        self._warned_schemes: set[str] = set()
        self._unavailable_logged = False

    def _entries(self) -> dict[str, Entry]:
        """The users, re-read if the file's mtime, size or inode changed since the last look."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp != self._stamp:
                self._users = self._parse(_read_lines(self.path))
                self._stamp = stamp
                self._unavailable_logged = False
                self.log.info(
                    "read {count} users from {path}", count=len(self._users), path=self.path
                )
        except OSError as e:
            self._stamp = None
            self._users = {}
            if not self._unavailable_logged:
                self._unavailable_logged = True
                self.log.error(
                    "cannot read users file {path}: {error}", path=self.path, error=e.strerror
                )
            raise UserDBUnavailable(f"{self.path}: {e.strerror}") from None
        return self._users

    def _parse(self, lines: list[str]) -> dict[str, Entry]:
        users: dict[str, Entry] = {}
        for number, line in enumerate(lines, 1):
            entry = Entry.parse(line)
            if entry is None:
                if line.strip() and not line.lstrip().startswith("#"):
                    self.log.warn(  # noqa: G010 (twisted.logger has no warning())
                        "{path}:{line}: ignoring a line without 'user:password'",
                        path=self.path,
                        line=number,
                    )
            elif entry.user in users:
                self.log.warn(  # noqa: G010 (twisted.logger has no warning())
                    "{path}:{line}: ignoring a second entry for {user}",
                    path=self.path,
                    line=number,
                    user=entry.user,
                )
            else:
                users[entry.user] = entry
        return users

    def exists(self, user: str) -> bool:
        """Whether ``user`` has a line in the file; raises ``UserDBUnavailable``."""
        return user in self._entries()

    def check(self, user: str, password: bytes) -> defer.Deferred[bool]:
        """Verify in the reactor's thread pool; an unknown user costs a dummy Argon2 verify."""
        try:
            entry = self._entries().get(user)
        except UserDBUnavailable:
            return defer.fail()
        verify = self._against_dummy
        stored = ""
        if entry is not None:
            name, stored = split_scheme(entry.password)
            scheme = _SCHEMES.get(name)
            if scheme is not None and stored:
                verify = scheme.verify
            elif scheme is None and name not in self._warned_schemes:
                self._warned_schemes.add(name)
                self.log.warn(  # noqa: G010 (twisted.logger has no warning())
                    "password scheme {scheme} is not supported; {user} cannot log in",
                    scheme=name,
                    user=user,
                )
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), verify, stored, password)

    def _against_dummy(self, stored: str, password: bytes) -> bool:
        """Spend what a wrong password costs, then fail."""
        hasher = HASHER
        if self._dummy is None or self._dummy[0] is not hasher:
            self._dummy = (hasher, hasher.hash(os.urandom(16)))
        _SCHEMES["ARGON2ID"].verify(self._dummy[1], password)
        return False

    def secret(self, user: str) -> bytes | None:
        """The password itself for ``{PLAIN}`` users; None for hashed or unknown ones."""
        entry = self._entries().get(user)
        if entry is None:
            return None
        name, stored = split_scheme(entry.password)
        scheme = _SCHEMES.get(name)
        if scheme is None or not scheme.plaintext:
            return None
        return stored.encode("utf-8", "surrogateescape")

    def scram(self, user: str) -> None:
        """A passwd-file stores no SCRAM keys yet."""


@implementer(ICredentialsChecker)
class UserDBChecker:
    """Checks ``IUsernamePassword`` against an ``IUserDB``; the avatar id is the user name."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, userdb: IUserDB):
        self.userdb = userdb

    def requestAvatarId(self, credentials) -> defer.Deferred[str]:
        """Fire the user name, or fail with ``UnauthorizedLogin`` alike for bad user or password."""
        user = credentials.username
        if isinstance(user, bytes):
            try:
                user = user.decode("utf-8")
            except UnicodeDecodeError:
                return defer.fail(UnauthorizedLogin())
        password = credentials.password
        if isinstance(password, str):
            password = password.encode("utf-8")

        def verdict(ok: bool) -> str:
            if not ok:
                raise UnauthorizedLogin()
            return user

        return self.userdb.check(user, password).addCallback(verdict)
