"""Maildir storage: per-session snapshots, the maildrop lock, UIDLs, sizes, committed deletions.

Reads Maildirs as Dovecot, Courier and Postfix write them.  Knows nothing of sockets or
protocols; opening and committing a maildrop block, so they run through the ``run``
(a ``popserv.workers.Workers.run``) the store is given.

Message order (RFC 1939 message numbers): messages listed in ``dovecot-uidlist`` first,
by their Dovecot UID, as Dovecot numbered them; then the others by delivery time, that is
the leading integer seconds of the file name, then the ``M<usecs>`` of its second part
when present (a name without leading seconds uses the file's mtime); ties are broken by
the unique part of the name, so the order survives flag changes and the ``new/`` ->
``cur/`` move.

UIDLs: a message listed in ``dovecot-uidlist`` or ``courierpop3dsizelist`` keeps the
UIDL that server gave it (``popserv.uidlist``); any other gets popserv's own, the unique
part of its name.  Neither file is ever written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from popserv import quota, retention
from popserv.cluster import create_temp
from popserv.interfaces import (
    CommitFailed,
    IMaildrop,
    IMaildropLease,
    IMaildropLocks,
    IMaildropStore,
    MailboxPolicy,
    MaildropLocked,
)
from popserv.logsafe import untrusted
from popserv.uidlist import (
    COURIER_SIZELIST,
    DEFAULT_DOVECOT_FORMAT,
    DOVECOT_UIDLIST,
    UidlInheritance,
    base_name,
    read_xuidl,
)
from popserv.usernames import user_parts

log = Logger()

LOCK_NAME = "popserv.lock"
SIZE_CACHE_NAME = "popserv-sizes"
CHUNK_SIZE = 64 * 1024
MAX_UIDL_LENGTH = 70

_SUBDIRS = ("tmp", "new", "cur")
_MESSAGE_DIRS = ("new", "cur")
_DIR_MODE = 0o700
_FILE_MODE = 0o600
#: A listing is reused only while new/ and cur/ are unchanged, and only if they were
#: already this many seconds old when it was taken: a change within the same tick of
#: the file system's clock could otherwise leave their mtimes as they were.
STABLE_AGE = 1.0
#: Maildirs whose last listing is kept in memory, at most (least recently used go).
MAX_CACHED_LISTINGS = 1024
#: Threads that lock, list and commit maildrops: logins and QUITs of different users
#: overlap on the disk.
MAILDROP_THREADS = 10


# Sizes on the wire


def crlf_size_of_chunks(chunks: Iterable[bytes]) -> int:
    """Octets of a message with every bare LF counted as CRLF, as POP3 sends it.

    A CR ending one chunk and an LF starting the next make one CRLF.
    """
    total = 0
    after_cr = False
    for chunk in chunks:
        if not chunk:
            continue
        total += len(chunk) + chunk.count(b"\n")
        if b"\r" in chunk:  # counting CRLF is slow: only when there is a CR at all
            total -= chunk.count(b"\r\n")
        if after_cr and chunk[:1] == b"\n":
            total -= 1
        after_cr = chunk[-1:] == b"\r"
    return total


def crlf_size(data: bytes) -> int:
    """The CRLF size of an in-memory message (see ``crlf_size_of_chunks``)."""
    return crlf_size_of_chunks([data])


def crlf_size_of_file(f: BinaryIO) -> int:
    """The CRLF size of a binary file, streamed in 64 KiB chunks."""
    return crlf_size_of_chunks(iter(lambda: f.read(CHUNK_SIZE), b""))


# Names

#: How names in ``new/`` and ``cur/`` that are never messages begin: a dot (Maildir
#: message names never do), and the files that popserv, Dovecot, Courier and Maildir++
#: keep in a Maildir's root (``popserv.lock``, ``popserv-sizes``, ``dovecot-uidlist``,
#: ``courierpop3dsizelist``, ``maildirsize``, ``maildirfolder``, ``subscriptions``...).
#: Such a file below ``new/`` would be another Maildir's, which no user may reach.
_NOT_MESSAGES = (".", "popserv", "dovecot", "courier", "maildir", "subscriptions")


def is_message_name(name: str) -> bool:
    """Whether a file in ``new/`` or ``cur/`` may be listed as a message, by its name."""
    return not name.startswith(_NOT_MESSAGES)


def unique_part(name: str) -> str:
    """The unique part of a Maildir file name: everything before the first ``,`` or ``:``."""
    end = len(name)
    for sep in (",", ":"):
        at = name.find(sep, 0, end)
        if at >= 0:
            end = at
    return name[:end]


def _valid_uidl(text: str) -> bool:
    """RFC 1939: 1 to 70 characters from 0x21 to 0x7E."""
    return (
        0 < len(text) <= MAX_UIDL_LENGTH
        and text.isascii()
        and text.isprintable()
        and " " not in text
    )


def uidl_for(name: str) -> str:
    """The UIDL of a Maildir file name: its unique part, or a stable hash of it.

    The hash stands in when the unique part is not RFC 1939 material (printable
    ASCII, 1 to 70 characters); it depends on the same part of the name, so it too
    survives flag changes and the ``new/`` -> ``cur/`` move.
    """
    unique = unique_part(name)
    if _valid_uidl(unique):
        return unique
    basis = unique or name.split(":", 1)[0]
    return hashlib.sha256(os.fsencode(basis)).hexdigest()


def seen_name(name: str) -> str | None:
    """The name with the Maildir ``S`` (seen) flag: ``<unique>:2,<flags>``, flags in order.

    Other flags and the ``,S=``/``,W=`` fields are kept; None for a name whose info part
    is not Maildir's ``2,`` kind, which is left as it is.
    """
    at = name.find(":2,")
    if at < 0:
        return None if ":" in name else name + ":2,S"
    flags = name[at + 3 :]
    if "S" in flags:
        return name
    return name[: at + 3] + "".join(sorted(flags + "S"))


def wire_size_from_name(name: str) -> int | None:
    """The ``W=`` size a delivery agent stored in the name, if any."""
    at = name.find(",W=")
    if at < 0:
        return None
    colon = name.find(":")
    if 0 <= colon < at:
        return None
    end = at + 3
    while end < len(name) and name[end].isdigit():
        end += 1
    if end == at + 3 or (end < len(name) and name[end] not in ",:"):
        return None
    return int(name[at + 3 : end])


_DELIVERY_RE = re.compile(r"(\d+)\.(?:M(\d+))?")


def _delivery_key(name: str, mtime_ns: int | None) -> tuple[int, int] | None:
    """(seconds, microseconds) of delivery from the name; None if the name has none.

    ``1700000000.M123456P789Q1.host`` -> ``(1700000000, 123456)``; a name without
    leading seconds uses ``mtime_ns`` when given.
    """
    match = _DELIVERY_RE.match(name)
    if match is None or not name[: match.end(1)].isascii():
        return None if mtime_ns is None else (mtime_ns // 1_000_000_000, 0)
    usecs = match.group(2)
    return (int(match.group(1)), int(usecs) if usecs and usecs.isascii() else 0)


def _crlf_size_of_path(path: str, expected: int = CHUNK_SIZE) -> int:
    """The CRLF size of a stored message, read with plain system calls (no file object)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return crlf_size_of_chunks(_chunks_of(fd, expected))
    finally:
        os.close(fd)


def _chunks_of(fd: int, expected: int):
    """Read a file's chunks; ``expected`` (its ``stat`` size) lets a small one take one
    call, since a read that returns less than was asked for has reached the end."""
    want = min(expected + 1, CHUNK_SIZE)
    while True:
        chunk = os.read(fd, want)
        if chunk:
            yield chunk
        if len(chunk) < want:
            return
        want = CHUNK_SIZE


def _open_nofollow(path: str) -> BinaryIO:
    """Open a message for reading, refusing symlinks a user might plant in their Maildir."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    return os.fdopen(fd, "rb")


def _mkdir(path: str) -> None:
    try:
        os.mkdir(path, _DIR_MODE)
    except FileExistsError:
        pass


def fsync_dir(path: str) -> None:
    """Make a directory's entries (new, renamed or removed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The snapshot


def _signature(maildir: str) -> tuple[tuple, bool]:
    """What a listing depends on, and whether it is old enough to be trusted."""
    now = time.time()
    parts: list = []
    stable = True
    for sub in _MESSAGE_DIRS:
        st = os.stat(os.path.join(maildir, sub))
        parts.append((st.st_ino, st.st_mtime_ns, st.st_size))
        if now - st.st_mtime < STABLE_AGE:
            stable = False
    for name in (DOVECOT_UIDLIST, COURIER_SIZELIST):
        try:
            st = os.stat(os.path.join(maildir, name))
        except FileNotFoundError:
            parts.append(None)
        else:
            parts.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(parts), stable


@dataclass(slots=True)
class _Entry:
    uidl: str  # what POP3 serves: inherited, or the same as ``key``
    size: int
    path: str
    order: tuple
    key: str  # popserv's own UIDL of the file (``uidl_for``), stable across moves


def _find_by_key(maildir: str, key: str) -> str | None:
    """Where the message with this own UIDL lives now (it may have moved or changed flags)."""
    for sub in _MESSAGE_DIRS:
        try:
            with os.scandir(os.path.join(maildir, sub)) as it:
                for entry in it:
                    if is_message_name(entry.name) and uidl_for(entry.name) == key:
                        return entry.path
        except FileNotFoundError:
            continue
    return None


def _read_size_cache(path: str) -> dict[str, tuple[int, int]]:
    try:
        with _open_nofollow(path) as f:
            text = f.read().decode("ascii")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        log.warn(  # noqa: G010 (twisted.logger has no warning())
            "Ignoring unreadable size cache {path}: {reason}", path=path, reason=str(e)
        )
        return {}
    cache = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if len(fields) != 3 or not fields[1].isdigit() or not fields[2].isdigit():
            log.warn(  # noqa: G010 (twisted.logger has no warning())
                "Ignoring corrupt size cache {path} (line {line})", path=path, line=number
            )
            return {}
        cache[fields[0]] = (int(fields[1]), int(fields[2]))
    return cache


def _write_size_cache(path: str, cache: dict[str, tuple[int, int]], node: str = "") -> None:
    """Replace the cache atomically, so a reader sees the old or the new one, never half.

    The new one is written in the Maildir's ``tmp/`` under a name of this node's and
    process's own (``popserv.cluster.create_temp``), so no two writers share it.
    """
    text = "".join(f"{uidl} {size} {mtime}\n" for uidl, (size, mtime) in sorted(cache.items()))
    tmp = None
    try:
        fd, tmp = create_temp(
            os.path.join(os.path.dirname(path), "tmp"), os.path.basename(path), node
        )
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("ascii"))
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        log.warn(  # noqa: G010 (twisted.logger has no warning())
            "Cannot write size cache {path}: {reason}", path=path, reason=str(e)
        )


#: What a file name tells once parsed: (own UIDL, CRLF size, order key, and for a size
#: read from the file, the ``(size, mtime_ns)`` the size cache keeps; else None).
_Parsed = tuple[str, int, tuple, "tuple[int, int] | None"]


def _scan(
    maildir: str,
    inheritance: UidlInheritance | None = None,
    known: dict[str, _Parsed] | None = None,
    node: str = "",
) -> tuple[list[_Entry], dict[str, _Parsed]]:
    """List ``new/`` and ``cur/`` into snapshot entries in message-number order.

    A name carrying ``W=`` and delivery seconds needs no ``stat``: a Maildir written by
    popserv, Dovecot or Postfix's virtual(8) lists with one ``scandir`` per directory.
    ``known`` holds what earlier listings parsed, by file name (a flag change renames
    a file), so a listing after new mail parses only the new names; a size that was
    read from a file is checked against its mtime.  ``node`` names the size cache's
    temporary file.  Returns the entries and the parsed names.
    """
    known = known or {}
    parsed_now: dict[str, _Parsed] = {}
    cache_path = os.path.join(maildir, SIZE_CACHE_NAME)
    old_cache: dict[str, tuple[int, int]] | None = None
    new_cache: dict[str, tuple[int, int]] = {}
    by_uidl: dict[str, _Entry] = {}
    # new/ before cur/: a message moved between the two listings is seen twice, never missed.
    for sub in _MESSAGE_DIRS:
        with os.scandir(os.path.join(maildir, sub)) as it:
            entries = list(it)
        for dirent in entries:
            name = dirent.name
            try:
                # d_type from the directory itself: no system call per name.
                if not is_message_name(name) or not dirent.is_file(follow_symlinks=False):
                    continue
            except OSError:
                continue
            parsed = known.get(name)
            if parsed is not None and parsed[3] is not None:
                # A size read from the file holds only while the file is unchanged.
                try:
                    if dirent.stat(follow_symlinks=False).st_mtime_ns != parsed[3][1]:
                        parsed = None
                except FileNotFoundError:
                    continue
            if parsed is None:
                try:
                    if old_cache is None:
                        old_cache = _read_size_cache(cache_path)
                    parsed = _parse(dirent, old_cache)
                except FileNotFoundError:
                    continue  # removed by another agent while we listed
                except OSError as e:
                    parsed = _unreadable(dirent)
                    if parsed is None:
                        continue
                    log.warn(  # noqa: G010 (twisted.logger has no warning())
                        "Listing unreadable message {path} with its size on disk: {reason}",
                        path=dirent.path,
                        reason=str(e),
                    )
                else:
                    parsed_now[name] = parsed
            else:
                parsed_now[name] = parsed
            uidl, size, when, cached = parsed
            if cached is not None:
                new_cache[uidl] = cached
            earlier = by_uidl.get(uidl)
            if earlier is not None and os.path.lexists(earlier.path):
                # Not a move between our two listings: two files share a unique part.
                log.warn(  # noqa: G010 (twisted.logger has no warning())
                    "Duplicate UIDL {uidl}: keeping {path}, ignoring {other}",
                    uidl=uidl,
                    path=dirent.path,
                    other=earlier.path,
                )
            by_uidl[uidl] = _Entry(uidl, size, dirent.path, when, uidl)
    if old_cache is None and new_cache.keys() != {p[0] for p in known.values() if p[3] is not None}:
        old_cache = _read_size_cache(cache_path)  # names with computed sizes went away
    if (
        old_cache is not None
        and new_cache != old_cache
        and (new_cache or os.path.exists(cache_path))
    ):
        _write_size_cache(cache_path, new_cache, node)
    entries = list(by_uidl.values())
    _assign_uidls(maildir, entries, inheritance or _DEFAULT_INHERITANCE)
    entries.sort(key=lambda e: e.order)
    return entries, parsed_now


def _unreadable(dirent: os.DirEntry) -> _Parsed | None:
    """A message whose size cannot be read: listed with its size on disk, so the client
    sees it and gets ``-ERR [SYS/PERM]`` for it alone (not remembered: tried again at
    the next listing).  None when even ``stat`` fails."""
    try:
        st = dirent.stat(follow_symlinks=False)
    except OSError:
        return None
    name = dirent.name
    when = _delivery_key(name, st.st_mtime_ns)
    return (uidl_for(name), st.st_size, (1, *when, unique_part(name)), None)


def _parse(dirent: os.DirEntry, size_cache: dict[str, tuple[int, int]]):
    """Parse one file name, reading the file only when the name carries no size.

    Sizes known from the file or the size cache carry the ``(size, mtime_ns)`` to keep.
    """
    name = dirent.name
    uidl = uidl_for(name)
    size = wire_size_from_name(name)
    when = _delivery_key(name, None)
    cached = None
    if size is None or when is None:
        st = dirent.stat(follow_symlinks=False)
        if when is None:
            when = _delivery_key(name, st.st_mtime_ns)
        if size is None:
            hit = size_cache.get(uidl)
            if hit is not None and hit[1] == st.st_mtime_ns:
                size = hit[0]
            else:
                size = _crlf_size_of_path(dirent.path, st.st_size)
            cached = (size, st.st_mtime_ns)
    return (uidl, size, (1, *when, unique_part(name)), cached)


_DEFAULT_INHERITANCE = UidlInheritance()


def _warn_unusable(path: str, reason: str) -> None:
    log.warn(  # noqa: G010 (twisted.logger has no warning())
        "Ignoring unusable UIDL file {path}: {reason}", path=path, reason=reason
    )


def _assign_uidls(maildir: str, entries: list[_Entry], inheritance: UidlInheritance) -> None:
    """Give each entry the UIDL it had under Dovecot or Courier, else popserv's own.

    One pass over the parsed files (dict lookups by base name): O(n).  Inherited UIDLs
    are settled first, in UID order, so that of two messages claiming one UIDL the
    older keeps it; a UIDL that is not RFC 1939 material, or is taken, falls through
    to the next candidate (Dovecot: saved ``P``, then X-UIDL if reused, then the format)
    and finally to popserv's own.  Own UIDLs never equal an inherited one of the
    snapshot, and in a Maildir with inherited files never have an inherited shape
    (``UidlInheritance.own_is_ambiguous``); elsewhere they stay as they always were.
    """
    inherited = inheritance.read(maildir, _warn_unusable)
    dovecot, courier = inherited.dovecot, inherited.courier
    inheriting = dovecot is not None or bool(courier)
    if not inheriting:
        return  # every entry keeps its own UIDL
    taken: set[str] = set()
    pending: list[tuple[tuple, _Entry, list]] = []
    for entry in entries:
        base = base_name(os.path.basename(entry.path))
        record = dovecot.records.get(base) if dovecot is not None else None
        if record is not None:
            candidates = [record.pop3_uidl]
            if inheritance.reuse_xuidl:
                candidates.append(_xuidl_of(entry.path, entry.key, maildir))
            candidates.append(inheritance.format.expand(record.uid, dovecot.uidvalidity, base))
            entry.order = (0, record.uid)
            pending.append(((0, record.uid), entry, candidates))
        elif base in courier:
            pending.append(((1, *entry.order[1:]), entry, [courier[base]]))
    settled: set[int] = set()
    for _, entry, candidates in sorted(pending, key=lambda p: p[0]):
        for candidate in candidates:
            if candidate and _valid_uidl(candidate) and candidate not in taken:
                entry.uidl = candidate
                taken.add(candidate)
                settled.add(id(entry))
                break
        else:
            log.warn(  # noqa: G010 (twisted.logger has no warning())
                "No usable inherited UIDL for {path}; serving popserv's own",
                path=entry.path,
            )
    for entry in entries:
        if id(entry) in settled:
            continue
        own = entry.key
        if own in taken or (inheriting and inheritance.own_is_ambiguous(own)):
            own = inheritance.unambiguous(own)
        entry.uidl = own


def _xuidl_of(path: str, key: str, maildir: str) -> str | None:
    try:
        return read_xuidl(path)
    except FileNotFoundError:
        moved = _find_by_key(maildir, key)
        return read_xuidl(moved) if moved is not None else None
    except OSError:
        return None


@implementer(IMaildrop)
class MaildirMaildrop:
    """One locked Maildir as one POP3 session sees it; see ``IMaildrop``."""

    def __init__(
        self,
        user: str,
        path: str,
        lease: IMaildropLease,
        entries: list[_Entry],
        run: Callable[..., Deferred],
        snapshot: tuple | None = None,
        policy: MailboxPolicy | None = None,
        node: str = "",
    ):
        """``lease``: the maildrop lock (``IMaildropLocks.lock``); ``run``: runs the commit
        off the reactor thread (the store's); ``policy``: what the commit does with
        retrieved messages (the defaults without it); ``node``: the store's, for the
        names of temporary files."""
        self.user = user
        self.path = path
        self.policy = policy or MailboxPolicy()
        self.expire_days = self.policy.expire_days
        self._lease: IMaildropLease | None = lease
        self._verify = lease.verify
        self._entries = entries
        if snapshot is None:
            snapshot = tuple((e.uidl, e.size) for e in entries)
        self._snapshot = snapshot
        self._run = run
        self._node = node

    def _entry(self, index: int) -> _Entry:
        if not 0 <= index < len(self._entries):
            raise IndexError(f"no message at index {index}")
        return self._entries[index]

    def messages(self) -> tuple[tuple[str, int], ...]:
        """The snapshot taken at login, ``(uidl, size)`` in message-number order."""
        return self._snapshot

    def open(self, index: int) -> BinaryIO:
        """The stored message, found again if it moved to ``cur/`` or changed flags."""
        entry = self._entry(index)
        try:
            return _open_nofollow(entry.path)
        except FileNotFoundError:
            moved = _find_by_key(self.path, entry.key)
            if moved is None:
                raise
            entry.path = moved
            return _open_nofollow(moved)

    def commit(self, deleted: Iterable[int], retrieved: Iterable[int] = ()) -> Deferred:
        """In a thread: unlink the deleted messages, then mark and record the retrieved.

        With EXPIRE 0 the retrieved go too.  Fails with CommitFailed(n) if n messages
        that should be gone remain; a seen flag that cannot be set is only logged.
        """
        deleted = set(deleted)
        retrieved = set(retrieved)
        if self.policy.expire_days == 0:
            deleted |= retrieved
        doomed = [self._entry(i) for i in sorted(deleted)]
        kept = [self._entry(i) for i in sorted(retrieved - deleted)]
        return self._run(self._commit_blocking, doomed, kept)

    def _commit_blocking(self, doomed: list[_Entry], retrieved: list[_Entry]) -> None:
        # A session whose lock went (another node may serve the maildrop now) changes nothing.
        self._verify()
        try:
            remove_messages(self.path, doomed)
        finally:
            if retrieved or doomed:
                self._record_retrieved(doomed, retrieved)

    def _record_retrieved(self, doomed: list[_Entry], retrieved: list[_Entry]) -> None:
        """Seen flags (unless ``mark_seen`` is off) and first retrieval times."""
        if retrieved and self.policy.mark_seen:
            for entry in retrieved:
                _mark_seen(self.path, entry)
        try:
            times = retention.read(self.path)
        except OSError as e:
            _warn_retention(self.path, e)
            return
        now = int(time.time())
        live = {e.key for e in self._entries}
        updated = {key: when for key, when in times.items() if key in live}
        for entry in doomed:
            updated.pop(entry.key, None)
        for entry in retrieved:
            updated.setdefault(entry.key, now)
        if updated != times:
            try:
                retention.write(self.path, updated, self._node)
            except OSError as e:
                _warn_retention(self.path, e)

    def when_lost(self, callback: Callable[[], object]) -> None:
        """``callback()`` if the lock is lost while held (see ``IMaildrop.when_lost``)."""
        if self._lease is not None:
            self._lease.when_lost(callback)

    def close(self) -> Deferred | None:
        """Release the lock; safe to call twice.  A Deferred when the release waits for a
        database (see ``IMaildropLease.release``)."""
        lease, self._lease = self._lease, None
        if lease is not None:
            return lease.release()
        return None


def _warn_retention(path: str, error: OSError) -> None:
    log.warn(  # noqa: G010 (twisted.logger has no warning())
        "Cannot keep retrieval times in {path}: {reason}", path=path, reason=str(error)
    )


def _mark_seen(maildir: str, entry: _Entry) -> None:
    """Give the message the seen flag, moving it from ``new/`` to ``cur/``."""
    for _ in range(2):
        flagged = seen_name(os.path.basename(entry.path))
        if flagged is None:
            return
        target = os.path.join(maildir, "cur", flagged)
        if target == entry.path:
            return
        try:
            os.rename(entry.path, target)
        except FileNotFoundError:
            moved = _find_by_key(maildir, entry.key)
            if moved is None:
                return  # removed by another agent: nothing to mark
            entry.path = moved
            continue
        except OSError as e:
            log.warn(  # noqa: G010 (twisted.logger has no warning())
                "Cannot mark {path} seen: {reason}", path=entry.path, reason=str(e)
            )
            return
        entry.path = target
        return


def remove_messages(maildir: str, entries: list[_Entry]) -> None:
    """Unlink the messages, make that durable, and take them off the quota usage."""
    failed = 0
    touched = set()
    freed = []
    for entry in entries:
        path = entry.path
        size = None
        try:
            try:
                size = quota.physical_size(os.path.basename(path), path)
                os.unlink(path)
            except FileNotFoundError:
                path = _find_by_key(maildir, entry.key)
                if path is not None:
                    size = quota.physical_size(os.path.basename(path), path)
                    os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            failed += 1
            log.warn(  # noqa: G010 (twisted.logger has no warning())
                "Cannot remove deleted message {path}: {reason}", path=path, reason=str(e)
            )
            continue
        if path is not None:
            touched.add(os.path.dirname(path))
            if size is not None:
                freed.append(size)
    for directory in sorted(touched):
        try:
            fsync_dir(directory)
        except OSError as e:
            log.warn(  # noqa: G010 (twisted.logger has no warning())
                "Cannot fsync {path}: {reason}", path=directory, reason=str(e)
            )
    quota.record_removed(maildir, freed)
    if failed:
        raise CommitFailed(failed)


@implementer(IMaildropLease)
class FileLease:
    """A maildrop ``flock``: held while its file is open, so even a maildrop dropped
    without ``close`` releases it."""

    def __init__(self, lock_file: BinaryIO):
        self._file: BinaryIO | None = lock_file

    def verify(self) -> None:
        """A lock held by an open file is never lost."""

    def when_lost(self, callback) -> None:
        """Never called: the lock lasts as long as the file is open."""

    def release(self) -> None:
        lock_file, self._file = self._file, None
        if lock_file is not None:
            lock_file.close()


@implementer(IMaildropLocks)
class FileLocks:
    """``flock`` on ``<maildir>/<name>``: one session per maildrop among the processes of
    a host (and of hosts whose shared file system honours ``flock``)."""

    def __init__(self, name: str = LOCK_NAME):
        self.name = name

    def lock(self, user: str, path: str) -> FileLease:
        fd = os.open(
            os.path.join(path, self.name),
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            _FILE_MODE,
        )
        lock_file = os.fdopen(fd, "r+b", buffering=0)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            lock_file.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise MaildropLocked(user) from None
            raise
        except BaseException:
            lock_file.close()
            raise
        return FileLease(lock_file)


@implementer(IMaildropStore)
class MaildirStore:
    """Users' Maildirs under one mail root, ``<root>/<user>`` or ``<root>/<domain>/<user>``."""

    def __init__(
        self,
        mailroot: str,
        run: Callable[..., Deferred] | None = None,
        *,
        dovecot_uidl_format: str = DEFAULT_DOVECOT_FORMAT,
        dovecot_reuse_xuidl: bool = False,
        locks: IMaildropLocks | None = None,
        node: str = "",
    ):
        """``run`` opens and commits maildrops off the reactor thread (a ``Workers.run``
        of ``MAILDROP_THREADS``); without it the store only names and makes Maildirs,
        as the admin command does, and ``open_maildrop`` raises TypeError.

        ``dovecot_uidl_format`` and ``dovecot_reuse_xuidl`` are the ``pop3_uidl_format``
        and ``pop3_reuse_xuidl`` Dovecot served these Maildirs with (see
        ``popserv.uidlist.UidlFormat``); ValueError for a format Dovecot could not have had.
        ``locks`` keeps one session per maildrop: ``FileLocks()`` (``popserv.lock``) by
        default, ``popserv.pglocks.AdvisoryLocks`` for nodes sharing a database.
        ``node``: this node's name (``[cluster] node``; empty: the host's) in the names of
        the temporary files written in the Maildirs.
        """
        self.mailroot = mailroot
        self.locks = locks if locks is not None else FileLocks()
        self.node = node
        self._run = run
        self._inheritance = UidlInheritance(dovecot_uidl_format, dovecot_reuse_xuidl)
        #: Maildir path -> (signature, entries, snapshot) of its last trustworthy listing.
        self._listings: OrderedDict[str, tuple[tuple, list[_Entry], tuple]] = OrderedDict()
        #: Maildir path -> its parsed file names, so a new listing parses only new names.
        self._parsed: OrderedDict[str, dict[str, _Parsed]] = OrderedDict()
        self._listings_lock = threading.Lock()  # sessions of different users list in parallel

    def path_for(self, user: str) -> str:
        """The Maildir of ``user`` (``popserv.usernames``); ValueError for names without one."""
        return os.path.join(self.mailroot, *user_parts(user))

    def create(self, user: str) -> str:
        """Create the Maildir (and missing parents) with mode 0700; returns its path."""
        path = self.path_for(user)
        missing = []
        parent = path
        while not os.path.isdir(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
            if not parent or parent == os.path.dirname(parent):
                break
        for directory in reversed(missing):
            _mkdir(directory)
        for sub in _SUBDIRS:
            _mkdir(os.path.join(path, sub))
        return path

    def open_maildrop(self, user: str, policy: MailboxPolicy | None = None) -> Deferred:
        """Lock and snapshot ``user``'s Maildir in a thread; fails with MaildropLocked.

        With EXPIRE of some days in ``policy``, messages retrieved longer ago than that
        are removed first (RFC 2449: at login, never during a session).
        """
        if self._run is None:
            raise TypeError(
                "MaildirStore needs run= (a popserv.workers.Workers.run) to open maildrops"
            )
        return self._run(self._open_blocking, user, policy or MailboxPolicy())

    def _listing(self, path: str) -> tuple[list[_Entry], tuple]:
        """The snapshot entries of a Maildir: the last listing while nothing changed.

        Deliveries and removals by any process change the mtime of ``new/`` or
        ``cur/``, and the inherited UIDL files are compared by inode, size and mtime;
        a listing is kept only if its directories were already ``STABLE_AGE`` seconds
        old when it was taken, so a change within one clock tick is never missed.
        Called with the maildrop lock held, from one thread per Maildir at a time.
        """
        signature, stable = _signature(path)
        with self._listings_lock:
            cached = self._listings.get(path)
            if cached is not None and cached[0] == signature:
                self._listings.move_to_end(path)
                return cached[1], cached[2]
        with self._listings_lock:
            known = self._parsed.get(path)
        entries, parsed = _scan(path, self._inheritance, known, self.node)
        snapshot = tuple((e.uidl, e.size) for e in entries)
        with self._listings_lock:
            self._parsed[path] = parsed
            self._parsed.move_to_end(path)
            while len(self._parsed) > MAX_CACHED_LISTINGS:
                self._parsed.popitem(last=False)
            if stable:
                self._listings[path] = (signature, entries, snapshot)
                self._listings.move_to_end(path)
                while len(self._listings) > MAX_CACHED_LISTINGS:
                    self._listings.popitem(last=False)
            else:
                self._listings.pop(path, None)
        return entries, snapshot

    def _open_blocking(self, user: str, policy: MailboxPolicy) -> MaildirMaildrop:
        path = self.create(user)
        lease = self.locks.lock(user, path)
        try:
            entries, snapshot = self._listing(path)
            if policy.expire_days:
                entries, snapshot = _expire(
                    user, path, entries, snapshot, policy.expire_days, self.node
                )
        except BaseException:
            lease.release()
            raise
        return MaildirMaildrop(user, path, lease, entries, self._run, snapshot, policy, self.node)


def _expire(
    user: str, path: str, entries: list[_Entry], snapshot: tuple, days: int, node: str = ""
) -> tuple[list[_Entry], tuple]:
    """Remove the messages retrieved more than ``days`` ago; the listing without them."""
    times = retention.read(path)
    if not times:
        return entries, snapshot
    old = retention.expired(times, days, time.time())
    doomed = [e for e in entries if e.key in old]
    if not doomed:
        return entries, snapshot
    try:
        remove_messages(path, doomed)
    except CommitFailed as e:
        log.warn(  # noqa: G010 (twisted.logger has no warning())
            "Cannot expire {failed} messages of {user}", failed=e.failed, user=untrusted(user)
        )
    gone = {e.key for e in doomed if not os.path.lexists(e.path)}
    for key in gone:
        times.pop(key, None)
    retention.write(path, times, node)
    log.info(
        "maildir.expired: user={user} messages={count} days={days}",
        user=untrusted(user),
        count=len(gone),
        days=days,
    )
    entries = [e for e in entries if e.key not in gone]
    return entries, tuple((e.uidl, e.size) for e in entries)
