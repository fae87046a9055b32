"""Credential checkers and the user database: Dovecot's passwd-file, hashes checked off-thread.

The users file has Dovecot's passwd-file layout,
``user:{SCHEME}hash:uid:gid:gecos:home:shell:extra``; popserv reads the first two
fields and keeps the rest verbatim, so one file can serve popserv and Dovecot.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import math
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import argon2
import bcrypt
import scramp
from passlib.hash import sha256_crypt, sha512_crypt
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import (
    CramMD5Credentials,
    IUsernameHashedPassword,
    IUsernamePassword,
)
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail.pop3 import APOPCredentials
from zope.interface import implementer

from popserv.credcache import VerifiedPasswords
from popserv.interfaces import ISASLVerified, IUserDB, ScramKeys, UserDBUnavailable
from popserv.logsafe import untrusted
from popserv.state import scram_salt
from popserv.usernames import Collision, find_collisions, user_text

# New hashes and the unknown-user dummy use this hasher: argon2-cffi's defaults,
# RFC 9106's low-memory profile.  Verification reads the parameters from each hash,
# so tests swap in a cheap hasher here without changing what the file may hold.
HASHER = argon2.PasswordHasher()

# What Dovecot assumes for a password field without a {SCHEME} prefix.
DEFAULT_SCHEME = "CRYPT"

# Cost of new BLF-CRYPT and SHA*-CRYPT hashes (None: libpass's default rounds); tests lower them.
BCRYPT_ROUNDS = 12
SHA_CRYPT_ROUNDS: int | None = None

# Iterations of new SCRAM entries and of keys derived from clear passwords (Dovecot's default).
SCRAM_ITERATIONS = 4096


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


def _verify_bcrypt(hashed: str, password: bytes) -> bool:
    # Blowfish reads at most 72 bytes, as Dovecot's crypt_blowfish does; the library
    # refuses longer passwords instead of truncating them.
    try:
        return bcrypt.checkpw(password[:72], hashed.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return False  # a malformed hash, or a NUL in the password


def _make_bcrypt(password: bytes) -> str:
    if len(password) > 72:
        raise ValueError("BLF-CRYPT uses only the first 72 bytes of a password")
    return bcrypt.hashpw(password, bcrypt.gensalt(BCRYPT_ROUNDS)).decode("ascii")


def _sha_crypt_scheme(handler) -> tuple[Callable[[str, bytes], bool], Callable[[bytes], str]]:
    """Verify and make ``$6$`` / ``$5$`` hashes (crypt(3) SHA-crypt) with libpass."""

    def verify(hashed: str, password: bytes) -> bool:
        try:
            return handler.verify(password, hashed)
        except (ValueError, TypeError):
            return False  # a malformed hash, or a password the scheme refuses (NUL)

    def make(password: bytes) -> str:
        return handler.using(rounds=SHA_CRYPT_ROUNDS).hash(password)

    return verify, make


def _ssha_verifier(algorithm: str) -> Callable[[str, bytes], bool]:
    """``{SSHA512}``: base64 of the digest of password + salt, then the salt."""
    size = hashlib.new(algorithm).digest_size

    def verify(stored: str, password: bytes) -> bool:
        try:
            raw = base64.b64decode(stored, validate=True)
        except (binascii.Error, ValueError):
            return False
        digest, salt = raw[:size], raw[size:]
        if len(digest) != size:
            return False
        return hmac.compare_digest(hashlib.new(algorithm, password + salt).digest(), digest)

    return verify


# CRAM-MD5 entries hold HMAC-MD5's two MD5 states after the key block, not the password.
# Finishing an HMAC from them means continuing MD5 from a saved state, which neither
# hashlib nor any maintained library offers; so here is MD5's block function (RFC 1321,
# section 3.4), used only to read and write this format.  hashlib checks it in the tests.
_MD5_SHIFTS = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4
_MD5_SINES = [int(abs(math.sin(i + 1)) * 2**32) & 0xFFFFFFFF for i in range(64)]
_MD5_START = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)


def _md5_block(state: tuple[int, ...], block: bytes) -> tuple[int, ...]:
    """MD5's state after one more 64-byte block."""
    x = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        part = i >> 4
        if part == 0:
            f, k = (b & c) | (~b & d), i
        elif part == 1:
            f, k = (d & b) | (~d & c), (5 * i + 1) & 15
        elif part == 2:
            f, k = b ^ c ^ d, (3 * i + 5) & 15
        else:
            f, k = c ^ (b | (~d & 0xFFFFFFFF)), (7 * i) & 15
        t = (a + f + _MD5_SINES[i] + x[k]) & 0xFFFFFFFF
        s = _MD5_SHIFTS[i]
        a, d, c = d, c, b
        b = (b + ((t << s) | (t >> (32 - s)))) & 0xFFFFFFFF
    return tuple((old + new) & 0xFFFFFFFF for old, new in zip(state, (a, b, c, d), strict=True))


def _md5_finish(state: tuple[int, ...], data: bytes) -> bytes:
    """The MD5 digest of a message whose first 64 bytes left MD5 in ``state``."""
    length = 64 + len(data)
    data += b"\x80" + b"\0" * ((55 - length) % 64) + struct.pack("<Q", length * 8)
    for i in range(0, len(data), 64):
        state = _md5_block(state, data[i : i + 64])
    return struct.pack("<4I", *state)


def cram_md5_context(password: bytes) -> bytes:
    """Dovecot's ``{CRAM-MD5}`` value: HMAC-MD5's outer, then inner MD5 state, keyed by it."""
    key = hashlib.md5(password).digest() if len(password) > 64 else password
    key = key.ljust(64, b"\0")
    outer = _md5_block(_MD5_START, bytes(byte ^ 0x5C for byte in key))
    inner = _md5_block(_MD5_START, bytes(byte ^ 0x36 for byte in key))
    return struct.pack("<8I", *outer, *inner)


def cram_md5_digest(context: bytes, challenge: bytes) -> bytes:
    """HMAC-MD5 of ``challenge`` under the key that ``context`` was made from."""
    states = struct.unpack("<8I", context)
    inner = _md5_finish(states[4:], challenge)
    return _md5_finish(states[:4], inner)


def _parse_cram_md5(stored: str) -> bytes | None:
    try:
        context = bytes.fromhex(stored)
    except ValueError:
        return None
    return context if len(context) == 32 else None


def _verify_cram_md5(stored: str, password: bytes) -> bool:
    context = _parse_cram_md5(stored)
    return context is not None and hmac.compare_digest(cram_md5_context(password), context)


def _make_cram_md5(password: bytes) -> str:
    return cram_md5_context(password).hex()


def scram_keys(mechanism: str, password: bytes, salt: bytes, iterations: int) -> ScramKeys | None:
    """The SCRAM keys of ``password`` (scramp: SASLprep, then PBKDF2), or None if it cannot.

    None for a password that is not UTF-8 or that SASLprep refuses, and for a salt or
    iteration count scramp finds too weak.
    """
    try:
        salt, stored_key, server_key, iterations = scramp.ScramMechanism(mechanism).make_auth_info(
            password.decode("utf-8"), iteration_count=iterations, salt=salt
        )
    except (UnicodeDecodeError, scramp.ScramException):
        return None
    return ScramKeys(salt, iterations, stored_key, server_key)


def parse_scram(stored: str) -> ScramKeys | None:
    """Dovecot's ``{SCRAM-SHA-256}`` value, ``iterations,salt,StoredKey,ServerKey`` (base64)."""
    try:
        iterations, salt, stored_key, server_key = stored.split(",")
        return ScramKeys(
            base64.b64decode(salt, validate=True),
            int(iterations),
            base64.b64decode(stored_key, validate=True),
            base64.b64decode(server_key, validate=True),
        )
    except (ValueError, binascii.Error):
        return None


def _scram_scheme(mechanism: str) -> tuple[Callable[[str, bytes], bool], Callable[[bytes], str]]:
    """Verify a password against stored SCRAM keys (its StoredKey must match), and make them."""

    def verify(stored: str, password: bytes) -> bool:
        keys = parse_scram(stored)
        if keys is None:
            return False
        derived = scram_keys(mechanism, password, keys.salt, keys.iterations)
        return derived is not None and hmac.compare_digest(derived.stored_key, keys.stored_key)

    def make(password: bytes) -> str:
        keys = scram_keys(mechanism, password, os.urandom(16), SCRAM_ITERATIONS)
        if keys is None:
            raise ValueError(f"{mechanism} needs a UTF-8 password that SASLprep accepts")
        fields = [keys.salt, keys.stored_key, keys.server_key]
        return ",".join([str(keys.iterations)] + [base64.b64encode(f).decode() for f in fields])

    return verify, make


# What each scheme can verify: every one the password itself (PLAIN, LOGIN, USER/PASS).
_PASSWORD = frozenset({b"PLAIN", b"LOGIN"})
_CLEAR = _PASSWORD | {b"APOP", b"CRAM-MD5", b"SCRAM-SHA-256", b"SCRAM-SHA-1"}


@dataclass(frozen=True)
class _Scheme:
    """How one ``{SCHEME}`` is verified, and made (None: popserv only reads it)."""

    verify: Callable[[str, bytes], bool]
    make: Callable[[bytes], str] | None = None
    plaintext: bool = False  # the stored text is the password itself (APOP, CRAM-MD5, SCRAM)
    mechanisms: frozenset[bytes] = _PASSWORD  # the SASL mechanisms (and APOP) it can verify
    slow: bool = False  # costly to verify: a success is worth remembering (popserv.credcache)


_PLAIN = _Scheme(_verify_plain, _make_plain, plaintext=True, mechanisms=_CLEAR)


def _verify_crypt(hashed: str, password: bytes) -> bool:
    """Dovecot's CRYPT (no prefix): crypt(3), so the hash's own ``$id$`` says which."""
    for prefix, name in _CRYPT_IDS.items():
        if hashed.startswith(prefix):
            return _SCHEMES[name].verify(hashed, password)
    return False


_CRYPT_IDS = {
    "$6$": "SHA512-CRYPT",
    "$5$": "SHA256-CRYPT",
    "$2a$": "BLF-CRYPT",
    "$2b$": "BLF-CRYPT",
    "$2y$": "BLF-CRYPT",
}

# Adding a scheme is one entry here.
_SCHEMES: dict[str, _Scheme] = {
    "ARGON2ID": _Scheme(_argon2_verifier("$argon2id$"), _make_argon2id, slow=True),
    "ARGON2I": _Scheme(_argon2_verifier("$argon2i$"), slow=True),
    "BLF-CRYPT": _Scheme(_verify_bcrypt, _make_bcrypt, slow=True),
    "SHA512-CRYPT": _Scheme(*_sha_crypt_scheme(sha512_crypt), slow=True),
    "SHA256-CRYPT": _Scheme(*_sha_crypt_scheme(sha256_crypt), slow=True),
    "CRYPT": _Scheme(_verify_crypt, slow=True),  # what it accepts is one of the four above
    "SSHA512": _Scheme(_ssha_verifier("sha512")),
    "SSHA256": _Scheme(_ssha_verifier("sha256")),
    "CRAM-MD5": _Scheme(_verify_cram_md5, _make_cram_md5, mechanisms=_PASSWORD | {b"CRAM-MD5"}),
    "SCRAM-SHA-256": _Scheme(
        *_scram_scheme("SCRAM-SHA-256"), mechanisms=_PASSWORD | {b"SCRAM-SHA-256"}, slow=True
    ),
    "SCRAM-SHA-1": _Scheme(
        *_scram_scheme("SCRAM-SHA-1"), mechanisms=_PASSWORD | {b"SCRAM-SHA-1"}, slow=True
    ),
    "PLAIN": _PLAIN,
    "CLEARTEXT": _PLAIN,
}

# The schemes popserv verifies, and those ``hash_password`` can make (``adduser --scheme``).
VERIFIABLE = frozenset(_SCHEMES)
MAKEABLE = tuple(name for name, scheme in _SCHEMES.items() if scheme.make is not None)


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

    @property
    def fields(self) -> dict[str, str]:
        """The extra fields (the eighth field on), Dovecot's ``userdb_`` prefix taken off.

        ``user:pass:uid:gid:gecos:home:shell:userdb_quota_rule=*:storage=1G nopassword``
        -> ``{"quota_rule": "*:storage=1G", "nopassword": ""}``.
        """
        parts = (self.rest or "").split(":", 5)
        if len(parts) < 6:
            return {}
        fields = {}
        for word in parts[5].split():
            key, _, value = word.partition("=")
            fields[key.removeprefix("userdb_")] = value
        return fields

    def with_field(self, key: str, value: str | None) -> Entry:
        """The entry with extra field ``userdb_<key>`` set to ``value`` (None: removed)."""
        parts = (self.rest or "").split(":", 5)
        parts += [""] * (6 - len(parts))
        words = [w for w in parts[5].split() if w.partition("=")[0].removeprefix("userdb_") != key]
        if value is not None:
            words.append(f"userdb_{key}={value}")
        parts[5] = " ".join(words)
        rest = ":".join(parts)
        return Entry(self.user, self.password, rest if rest.strip(":") else None)

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


def lock_path(path: str) -> str:
    """The lock file of a users file: the file itself is replaced by rename, so not it."""
    return path + ".lock"


def _same_owner(path: str, model: os.stat_result) -> None:
    """Give ``path`` the owner of ``model`` where allowed, so the server can open both."""
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if (st.st_uid, st.st_gid) != (model.st_uid, model.st_gid):
            os.chown(path, model.st_uid, model.st_gid)


class _Busy(Exception):
    """A writer holds the users file's lock."""


def _shared_lock(path: str) -> int | None:
    """A descriptor holding a shared lock on ``path``'s lock file, taken without waiting.

    None when there is no lock file (no admin command ever wrote the file) or it cannot
    be opened; ``_Busy`` while a writer holds it.
    """
    try:
        fd = os.open(lock_path(path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _Busy() from None
    return fd


class UsersFile:
    """The users file as the admin tool edits it: entries in order, other lines kept."""

    @classmethod
    @contextlib.contextmanager
    def locked(cls, path: str) -> Iterator[UsersFile]:
        """The file read under an exclusive lock held until the block ends: one edit at a time.

        Every read-modify-write goes through here, so parallel ``popserv adduser`` runs
        wait for each other instead of each writing back what it read and losing the rest.
        The lock file (mode 0600) has the users file's owner, so the server can take it.
        """
        lock = lock_path(path)
        os.makedirs(os.path.dirname(os.path.abspath(lock)), exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                _same_owner(lock, os.stat(path))
            yield cls.read(path)
        finally:
            os.close(fd)

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

    def set_field(self, user: str, key: str, value: str | None) -> None:
        """Set (None: remove) the extra field ``userdb_<key>`` on every line for ``user``."""
        for i, line in enumerate(self.lines):
            if isinstance(line, Entry) and line.user == user:
                self.lines[i] = line.with_field(key, value)

    def remove(self, user: str) -> None:
        """Drop every line for ``user``."""
        kept = [line for line in self.lines if not (isinstance(line, Entry) and line.user == user)]
        if len(kept) == len(self.lines):
            raise KeyError(user)
        self.lines = kept

    def write(self, owner: tuple[int, int] | None = None) -> None:
        """Replace the file atomically: a temporary file in the same directory, fsync, rename.

        A new file is mode 0600, owned by ``owner`` (uid, gid) if given; a rewritten one
        keeps its mode and, where allowed, its owner, so a file root edits stays
        readable by the server's user.  The lock file follows the file's owner.
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
                    if owner is not None:
                        os.fchown(f.fileno(), *owner)
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.path)
            if os.path.exists(lock_path(self.path)):
                _same_owner(lock_path(self.path), os.stat(self.path))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class EntryUserDB:
    """The answers of an ``IUserDB`` from users' entries, wherever the entries come from.

    A subclass says where they are: ``_entries()`` returns the users served now (raising
    ``UserDBUnavailable`` when it cannot), and ``_serve`` installs a new set, so that
    passwords remembered for entries that changed are forgotten.  ``source`` names the
    place in messages (the users file's path, the database's table).

    Names whose Maildirs collide (``popserv.usernames``) are refused, both of each pair:
    every lookup of one fails with ``UserDBUnavailable`` (POP3 ``-ERR [SYS/TEMP]``, SMTP
    ``451 4.3.0``), so no two of them ever reach the same files, and the mail waits at
    the sender until the entries are fixed.
    """

    log = Logger()
    source = "the user database"

    def __init__(
        self,
        run: Callable[..., defer.Deferred] | None = None,
        secret: bytes | None = None,
        cache: VerifiedPasswords | None = None,
    ):
        """``run`` verifies hashes off the reactor thread (a ``Workers.run`` of no more
        threads than may verify at once: each Argon2id verification holds 64 MiB);
        without it only the lookups work, as SMTP needs, and ``check`` raises TypeError.

        ``secret``: the server secret (``popserv.state``) that keys the salts of SCRAM
        keys derived from clear passwords, so they stay the same across restarts;
        without it they are keyed by a random value of this object.

        ``cache``: where passwords that passed a slow scheme are remembered, so the
        next login with the same one skips the hash; None: every check hashes.
        """
        self._run = run
        self._cache = cache
        self._users: dict[str, Entry] = {}
        self._refused: dict[str, str] = {}  # a colliding name -> a name it collides with
        self._dummy: tuple[argon2.PasswordHasher, str] | None = None
        self._warned_schemes: set[str] = set()
        self._field_values: dict[str, tuple[dict, set[str]]] = {}
        # Keys the salts of SCRAM keys derived from clear passwords: stable per user.
        self._secret = secret if secret is not None else os.urandom(32)

    def _entries(self) -> dict[str, Entry]:
        """The users served now; raises ``UserDBUnavailable`` when they cannot be had."""
        raise NotImplementedError

    def _serve(self, users: dict[str, Entry], refused: dict[str, str]) -> None:
        """Answer from ``users`` from now on, refusing the ``refused`` names.

        A changed or removed password would never match again: its remembered
        verification is forgotten now.
        """
        old, self._users, self._refused = self._users, users, refused
        if self._cache is not None:
            for user, entry in old.items():
                new = users.get(user)
                if new is None or new.password != entry.password:
                    self._cache.forget(user)

    def _entry(self, user: str) -> Entry | None:
        """``user``'s entry, None if unknown; ``UserDBUnavailable`` for a refused name."""
        entry = self._entries().get(user)
        if entry is None and user in self._refused:
            raise UserDBUnavailable(
                f"{self.source}: the Maildir of {user!r} collides with that of "
                f"{self._refused[user]!r}"
            )
        return entry

    def exists(self, user: str) -> bool:
        """Whether ``user`` has an entry; raises ``UserDBUnavailable``."""
        return self._entry(user) is not None

    def fields(self, user: str) -> dict[str, str]:
        """``user``'s extra fields (``Entry.fields``); empty for an unknown user."""
        entry = self._entry(user)
        return entry.fields if entry is not None else {}

    def field_values(self, name: str) -> set[str]:
        """The distinct values of one extra field over all users, kept until the entries change."""
        users = self._entries()
        cached = self._field_values.get(name)
        if cached is None or cached[0] is not users:
            values = {e.fields[name] for e in users.values() if name in e.fields}
            cached = self._field_values[name] = (users, values)
        return cached[1]

    def check(self, user: str, password: bytes) -> defer.Deferred[bool]:
        """Verify through ``run`` (or the cache, for slow schemes); an unknown user costs a
        dummy Argon2 verify."""
        if self._run is None:
            raise TypeError(
                f"{type(self).__name__} needs run= (a popserv.workers.Workers.run) to check"
                " passwords"
            )
        try:
            entry = self._entry(user)
        except UserDBUnavailable:
            return defer.fail()
        verify = self._against_dummy
        stored = ""
        slow = False
        if entry is not None:
            name, stored = split_scheme(entry.password)
            scheme = _SCHEMES.get(name)
            if scheme is not None and stored:
                verify, slow = scheme.verify, scheme.slow
            elif scheme is None and name not in self._warned_schemes:
                self._warned_schemes.add(name)
                self.log.warn(  # noqa: G010 (twisted.logger has no warning())
                    "password scheme {scheme} is not supported; {user} cannot log in",
                    scheme=name,
                    user=user,
                )
        if slow and self._cache is not None:
            return self._cache.check(
                user, entry.password, password, lambda: self._run(verify, stored, password)
            )
        return self._run(verify, stored, password)

    def _against_dummy(self, stored: str, password: bytes) -> bool:
        """Spend what a wrong password costs, then fail."""
        hasher = HASHER
        if self._dummy is None or self._dummy[0] is not hasher:
            self._dummy = (hasher, hasher.hash(os.urandom(16)))
        _SCHEMES["ARGON2ID"].verify(self._dummy[1], password)
        return False

    def _stored(self, user: str) -> tuple[str, str, _Scheme | None]:
        """``(scheme name, stored value, scheme)`` of ``user``; ``("", "", None)`` if unknown."""
        entry = self._entry(user)
        if entry is None:
            return "", "", None
        name, stored = split_scheme(entry.password)
        return name, stored, _SCHEMES.get(name) if stored else None

    def secret(self, user: str) -> bytes | None:
        """The password itself for ``{PLAIN}`` users; None for hashed or unknown ones."""
        _, stored, scheme = self._stored(user)
        if scheme is None or not scheme.plaintext:
            return None
        return stored.encode("utf-8", "surrogateescape")

    def cram_md5(self, user: str) -> bytes | None:
        """The HMAC-MD5 context of ``{CRAM-MD5}`` users, or made from a ``{PLAIN}`` password."""
        name, stored, scheme = self._stored(user)
        if scheme is not None and scheme.plaintext:
            return cram_md5_context(stored.encode("utf-8", "surrogateescape"))
        if name == "CRAM-MD5":
            return _parse_cram_md5(stored)
        return None

    def scram(self, user: str, mechanism: str = "SCRAM-SHA-256") -> ScramKeys | None:
        """Stored ``{SCRAM-*}`` keys, or keys derived from a ``{PLAIN}`` password.

        Each call costs one key derivation, whatever the user: the time it takes tells
        nothing of whether the user exists or how the password is stored.  A derived
        salt is keyed by the server secret and the user, so it stays the same between
        attempts and across restarts, like a stored one.
        """
        name, stored, scheme = self._stored(user)
        salt = scram_salt(self._secret, mechanism, user)
        if scheme is not None and scheme.plaintext:
            return scram_keys(
                mechanism, stored.encode("utf-8", "surrogateescape"), salt, SCRAM_ITERATIONS
            )
        scram_keys(mechanism, os.urandom(16).hex().encode(), salt, SCRAM_ITERATIONS)
        if scheme is not None and name == mechanism:
            return parse_scram(stored)
        return None

    def mechanisms(self, user: str | None = None) -> set[bytes]:
        """What ``user``'s stored scheme can verify; without a user, what any user's can."""
        entries = self._entries()
        chosen = entries.values() if user is None else [entries[user]] if user in entries else []
        found: set[bytes] = set()
        for entry in chosen:
            name, stored = split_scheme(entry.password)
            if stored and name in _SCHEMES:
                found |= _SCHEMES[name].mechanisms
        return found


def refuse_collisions(users: dict[str, Entry]) -> tuple[dict[str, str], list[Collision]]:
    """Take every name whose Maildir meets another's out of ``users``.

    Returns the names taken out (each -> a name it collides with) and the colliding
    pairs, which the caller reports where it can say where each name came from.
    """
    collisions = find_collisions(users)
    refused: dict[str, str] = {}
    for user, other, _ in collisions:
        refused.setdefault(user, other)
        refused.setdefault(other, user)
    for user in refused:
        del users[user]
    return refused, collisions


@implementer(IUserDB)
class PasswdFile(EntryUserDB):
    """``IUserDB`` over a passwd-file, re-read whenever it changes on disk."""

    def __init__(
        self,
        path: str,
        run: Callable[..., defer.Deferred] | None = None,
        secret: bytes | None = None,
        cache: VerifiedPasswords | None = None,
    ):
        """``path``: the users file; the rest as ``EntryUserDB``."""
        super().__init__(run, secret, cache)
        self.path = self.source = path
        self._stamp: tuple[int, int, int] | None = None
        self._unavailable_logged = False

    def _entries(self) -> dict[str, Entry]:
        """The users, re-read if the file's mtime, size or inode changed since the last look.

        Never while an admin command holds the lock (``UsersFile.locked``): the last copy
        serves meanwhile, and the next lookup tries again; there is no waiting.
        """
        try:
            st = os.stat(self.path)
            if (st.st_mtime_ns, st.st_size, st.st_ino) != self._stamp:
                self._reload()
        except OSError as e:
            self._stamp = None
            self._users = {}
            self._refused = {}
            if not self._unavailable_logged:
                self._unavailable_logged = True
                self.log.error(
                    "cannot read users file {path}: {error}", path=self.path, error=e.strerror
                )
            raise UserDBUnavailable(f"{self.path}: {e.strerror}") from None
        return self._users

    def _reload(self) -> None:
        """Read the file under a shared lock; if a writer holds it, keep the last copy."""
        try:
            fd = _shared_lock(self.path)
        except _Busy:
            if self._stamp is None:  # no copy to serve yet: a temporary failure
                raise UserDBUnavailable(f"{self.path}: being edited") from None
            return
        try:
            st = os.stat(self.path)
            lines = _read_lines(self.path)
        finally:
            if fd is not None:
                os.close(fd)
        self._serve(*self._parse(lines))
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        self._unavailable_logged = False
        self.log.info("read {count} users from {path}", count=len(self._users), path=self.path)

    def _parse(self, lines: list[str]) -> tuple[dict[str, Entry], dict[str, str]]:
        """The users to serve, and the refused names whose Maildirs collide (one warning a pair)."""
        users: dict[str, Entry] = {}
        numbers: dict[str, int] = {}
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
                numbers[entry.user] = number
        refused, collisions = refuse_collisions(users)
        for user, other, nested in collisions:
            self.log.warn(  # noqa: G010 (twisted.logger has no warning())
                "{path}:{line}: the Maildir of user {user} {relation} that of user {other}"
                " (line {other_line}); refusing both",
                path=self.path,
                relation="lies inside" if nested else "is",
                line=numbers[user],
                user=untrusted(user),
                other=untrusted(other),
                other_line=numbers[other],
            )
        return users, refused


class _UserDBChecker:
    """A checker over an ``IUserDB``; the avatar id is the user name, as text."""

    def __init__(self, userdb: IUserDB):
        self.userdb = userdb

    def requestAvatarId(self, credentials) -> defer.Deferred[str]:
        """Fire the user name, or fail with ``UnauthorizedLogin`` (``UserDBUnavailable``)."""
        user = user_text(credentials.username)
        if user is None:
            return defer.fail(UnauthorizedLogin())
        return self._check(user, credentials)


@implementer(ICredentialsChecker)
class UserDBChecker(_UserDBChecker):
    """Checks ``IUsernamePassword``: the same refusal for a bad user and a bad password."""

    credentialInterfaces = (IUsernamePassword,)

    def _check(self, user: str, credentials) -> defer.Deferred[str]:
        password = credentials.password
        if isinstance(password, str):
            password = password.encode("utf-8")

        def verdict(ok: bool) -> str:
            if not ok:
                raise UnauthorizedLogin()
            return user

        return self.userdb.check(user, password).addCallback(verdict)


def _hex_digest(digest: str | bytes) -> bytes:
    """A client's hex digest as lower-case ASCII bytes (non-ASCII becomes a mismatch)."""
    if isinstance(digest, str):
        digest = digest.encode("utf-8", "replace")
    return digest.lower()


# Verified against when the user is unknown or has no usable secret, so that
# a refusal costs the same either way.
_DUMMY_SECRET = os.urandom(16).hex().encode()
_DUMMY_CONTEXT = cram_md5_context(_DUMMY_SECRET)


@implementer(ICredentialsChecker)
class SecretChecker(_UserDBChecker):
    """Checks APOP and CRAM-MD5 answers against a user's clear password or CRAM-MD5 context.

    Users whose stored scheme cannot verify them (hashed passwords) fail with
    ``UnauthorizedLogin``, exactly like a wrong answer.  The check is one or two MD5
    computations, done in place: too cheap to be worth a thread.
    """

    credentialInterfaces = (IUsernameHashedPassword,)

    def _check(self, user: str, credentials) -> defer.Deferred[str]:
        try:
            ok = self._verify(user, credentials)
        except UserDBUnavailable:
            return defer.fail()
        return defer.succeed(user) if ok else defer.fail(UnauthorizedLogin())

    def _verify(self, user: str, credentials) -> bool:
        if isinstance(credentials, CramMD5Credentials):
            context = self.userdb.cram_md5(user)
            digest = cram_md5_digest(context or _DUMMY_CONTEXT, credentials.challenge).hex()
            matches = hmac.compare_digest(digest.encode(), _hex_digest(credentials.response))
            return matches and context is not None
        secret = self.userdb.secret(user)
        if isinstance(credentials, APOPCredentials):
            # Twisted's own checkPassword compares a str with bytes, so it never matches.
            digest = hashlib.md5(credentials.magic + (secret or _DUMMY_SECRET)).hexdigest()
            matches = hmac.compare_digest(digest.encode(), _hex_digest(credentials.digest))
        else:
            matches = credentials.checkPassword(secret or _DUMMY_SECRET)
        return bool(matches) and secret is not None


@implementer(ICredentialsChecker)
class VerifiedChecker:
    """Accepts the outcome of a SASL exchange that verified the client itself (SCRAM).

    It trusts the credential: register it only on a portal fed by ``popserv.sasl``.
    """

    credentialInterfaces = (ISASLVerified,)

    def requestAvatarId(self, credentials) -> defer.Deferred[str]:
        """Fire the user name if verified; else its failure, or ``UnauthorizedLogin``."""
        if credentials.failure is not None:
            return defer.fail(credentials.failure)
        if not credentials.verified:
            return defer.fail(UnauthorizedLogin())
        return defer.succeed(credentials.username)


def checkers(userdb: IUserDB) -> list[ICredentialsChecker]:
    """Every checker a POP3 portal needs: USER/PASS, PLAIN and LOGIN; APOP and CRAM-MD5; SCRAM."""
    return [UserDBChecker(userdb), SecretChecker(userdb), VerifiedChecker()]
