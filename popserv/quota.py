"""Maildir++ quotas: limits from quota rules, usage kept in the Maildir's ``maildirsize``.

``maildirsize`` is the file Dovecot, Courier, maildrop and Exim keep (the Maildir++
quota specification): its first line is the limit, ``<bytes>S,<messages>C`` (either may
be left out); every further line is ``<bytes> <messages>``, a change to add, written with
one ``O_APPEND`` write by whoever delivered or removed mail.  The usage is the sum of
those lines.  It is recalculated (the Maildir and its ``.Folder`` subdirectories summed,
written to ``tmp/`` and renamed over the file) when it is missing, names other limits,
has grown past 5120 bytes, adds up to less than nothing, or says the mailbox is over
quota and is more than 15 minutes old, as Courier and Dovecot do.  Sizes are the
physical ones: the ``S=`` of a file name, else its size on disk.

popserv's own writers serialize on ``popserv-quota.lock`` (``flock``) in the Maildir, so
that checking for room and adding the message are one step: deliveries in parallel
never take a mailbox past its limit.  Everything here blocks; callers run it in threads.
Knows nothing of SMTP or POP3.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from popserv.cluster import create_temp
from popserv.interfaces import IQuota, QuotaLimits

log = Logger()

MAILDIRSIZE = "maildirsize"
LOCK_NAME = "popserv-quota.lock"
#: A ``maildirsize`` this big has collected enough lines to be summed afresh.
RECALCULATE_SIZE = 5120
#: An over-quota ``maildirsize`` older than this is checked against the files.
RECALCULATE_AGE = 15 * 60

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"(\d+)\s*([bkmgt]?)", re.IGNORECASE)


# Limits


def parse_size(text: str, default_unit: str = "") -> int:
    """``100M`` -> 104857600: a number with an optional b, k, M, G or T (powers of 1024).

    ``default_unit`` applies to a bare number (Dovecot's ``storage=`` counts kilobytes).
    """
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a size: {text!r} (a number with an optional k, M, G or T)")
    unit = (match.group(2) or default_unit).upper()
    return int(match.group(1)) * _UNITS[unit]


def format_size(octets: int) -> str:
    """The shortest exact way to write a size: ``104857600`` -> ``100M``."""
    for unit in ("T", "G", "M", "K"):
        if octets and octets % _UNITS[unit] == 0:
            return f"{octets // _UNITS[unit]}{unit}"
    return str(octets)


def parse_rule(text: str, limits: QuotaLimits | None = None) -> QuotaLimits:
    """The limits of a Dovecot ``quota_rule`` for the whole mailbox (``*``).

    ``*:storage=100M`` (a bare number of ``storage`` is kilobytes, as in Dovecot),
    ``*:bytes=102400``, ``*:messages=1000``, several joined by ``:``; 0 is no limit.
    ``*:ignore`` and rules for single mailboxes (``Trash:storage=+100M``) change nothing
    here: POP3 sees only the INBOX and quotas count the whole Maildir.  ``limits``:
    those an earlier rule set, which this one overrides field by field.
    """
    storage, messages = (limits.storage, limits.messages) if limits else (0, 0)
    name, colon, settings = text.strip().partition(":")
    if not colon:
        raise ValueError(f"not a quota rule: {text!r} (for example *:storage=100M)")
    if name != "*":
        return QuotaLimits(storage, messages)
    for setting in settings.split(":"):
        key, equals, value = setting.strip().partition("=")
        key = key.strip().lower()
        if key == "ignore" and not equals:
            continue
        if not equals:
            raise ValueError(f"quota rule {text!r}: {setting!r} is not key=value")
        if value.startswith(("+", "-")) or value.endswith("%"):
            continue  # relative to another rule: meaningful only per mailbox
        if key == "storage":
            storage = parse_size(value, default_unit="K")
        elif key == "bytes":
            storage = parse_size(value)
        elif key == "messages":
            if not value.strip().isdigit():
                raise ValueError(f"quota rule {text!r}: messages={value!r} is not a number")
            messages = int(value)
        else:
            raise ValueError(f"quota rule {text!r}: unknown limit {key!r}")
    return QuotaLimits(storage, messages)


def format_rule(limits: QuotaLimits) -> str:
    """The ``quota_rule`` that gives these limits (``*:storage=100M``; 0s: no limit)."""
    parts = ["*"]
    if limits.storage:
        size = format_size(limits.storage)
        parts.append(f"storage={size}" if size[-1].isalpha() else f"bytes={size}")
    if limits.messages:
        parts.append(f"messages={limits.messages}")
    if len(parts) == 1:
        parts.append("storage=0")
    return ":".join(parts)


def _definition(limits: QuotaLimits) -> str:
    """The first line of ``maildirsize`` for these limits."""
    parts = []
    if limits.storage:
        parts.append(f"{limits.storage}S")
    if limits.messages:
        parts.append(f"{limits.messages}C")
    return ",".join(parts) or "0S"


def _parse_definition(line: str) -> QuotaLimits | None:
    storage = messages = 0
    for part in line.strip().split(","):
        part = part.strip()
        if len(part) < 2 or not part[:-1].isdigit() or part[-1] not in "SC":
            return None
        if part[-1] == "S":
            storage = int(part[:-1])
        else:
            messages = int(part[:-1])
    return QuotaLimits(storage, messages)


# Usage


@dataclass(frozen=True)
class Usage:
    """What a mailbox holds, against its limits (0: none)."""

    bytes: int
    messages: int
    limits: QuotaLimits

    def room_for(self, size: int, messages: int = 1) -> bool:
        """Whether ``messages`` more messages of ``size`` octets in all stay within the limits."""
        storage, count = self.limits
        if storage and self.bytes + size > storage:
            return False
        return not (count and self.messages + messages > count)

    @property
    def full(self) -> bool:
        """At or over a limit: not even an empty message fits."""
        storage, count = self.limits
        return bool((storage and self.bytes >= storage) or (count and self.messages >= count))


@dataclass(frozen=True)
class _Read:
    limits: QuotaLimits | None
    bytes: int
    messages: int
    file_size: int
    mtime: float
    valid: bool


def _read(path: str) -> _Read | None:
    """``maildirsize`` as written, or None when missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        data = os.read(fd, max(st.st_size, RECALCULATE_SIZE) + 1)
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return _Read(None, 0, 0, len(data), st.st_mtime, False)
    lines = text.split("\n")
    limits = _parse_definition(lines[0]) if lines else None
    total = count = 0
    valid = limits is not None
    # A last line without its newline may be a write still under way: not counted.
    for line in lines[1:-1]:
        fields = line.split()
        if len(fields) != 2:
            valid = False
            continue
        try:
            total += int(fields[0])
            count += int(fields[1])
        except ValueError:
            valid = False
    return _Read(limits, total, count, len(data), st.st_mtime, valid)


def physical_size(name: str, path: str) -> int | None:
    """The ``S=`` of a Maildir name, else the file's size; None if it is gone or not a file."""
    at = name.find(",S=")
    colon = name.find(":")
    if at >= 0 and not (0 <= colon < at):
        end = at + 3
        while end < len(name) and name[end].isdigit():
            end += 1
        if end > at + 3 and (end == len(name) or name[end] in ",:"):
            return int(name[at + 3 : end])
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_size if os.path.stat.S_ISREG(st.st_mode) else None


def _folders(maildir: str) -> Iterator[str]:
    """The Maildir itself and its Maildir++ folders (``.Sent``, ``.Trash``, ...)."""
    yield maildir
    try:
        with os.scandir(maildir) as it:
            names = [e.name for e in it if e.name.startswith(".") and e.is_dir()]
    except FileNotFoundError:
        return
    for name in sorted(names):
        if name not in (".", "..") and os.path.isdir(os.path.join(maildir, name, "cur")):
            yield os.path.join(maildir, name)


def count_usage(maildir: str) -> tuple[int, int]:
    """(bytes, messages) of every message in the Maildir and its folders, from the files."""
    total = count = 0
    for folder in _folders(maildir):
        for sub in ("new", "cur"):
            try:
                with os.scandir(os.path.join(folder, sub)) as it:
                    entries = [(e.name, e.path) for e in it if not e.name.startswith(".")]
            except FileNotFoundError:
                continue
            for name, path in entries:
                size = physical_size(name, path)
                if size is not None:
                    total += size
                    count += 1
    return total, count


def _stale(read: _Read | None, limits: QuotaLimits, now: float) -> bool:
    if read is None or not read.valid or read.limits != limits:
        return True
    if read.file_size >= RECALCULATE_SIZE or read.bytes < 0 or read.messages < 0:
        return True
    storage, count = limits
    over = (storage and read.bytes > storage) or (count and read.messages > count)
    return bool(over) and now - read.mtime > RECALCULATE_AGE


def _write_recalculated(
    maildir: str, limits: QuotaLimits, total: int, count: int, node: str = ""
) -> None:
    """Replace ``maildirsize`` through ``tmp/`` (a name of this node's and process's own),
    so no reader sees half a file."""
    text = f"{_definition(limits)}\n{total} {count}\n".encode("ascii")
    fd, temp = create_temp(os.path.join(maildir, "tmp"), MAILDIRSIZE, node)
    target = os.path.join(maildir, MAILDIRSIZE)
    try:
        try:
            os.write(fd, text)
            with contextlib.suppress(PermissionError):
                st = os.stat(maildir)
                os.fchown(fd, st.st_uid, st.st_gid)
        finally:
            os.close(fd)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


@contextlib.contextmanager
def locked(maildir: str) -> Iterator[None]:
    """Hold the Maildir's quota lock: popserv's writers of ``maildirsize`` take turns."""
    fd = os.open(
        os.path.join(maildir, LOCK_NAME),
        os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def effective_limits(maildir: str, limits: QuotaLimits) -> QuotaLimits:
    """``limits``, or when they are none, those the ``maildirsize`` header names (as Dovecot)."""
    if limits:
        return limits
    read = _read(os.path.join(maildir, MAILDIRSIZE))
    if read is None or read.limits is None:
        return limits
    return read.limits


def usage(maildir: str, limits: QuotaLimits, *, write: bool = True, node: str = "") -> Usage:
    """The mailbox's usage, recalculated when ``maildirsize`` is missing or stale.

    Without limits (from the rules or the file's header) nothing is kept and the files
    are counted.  ``write=False`` counts without writing (for a look from outside the
    server, as another user).  ``node`` names the temporary file of a recalculation.
    Call with ``locked`` held when about to add to it.
    """
    limits = effective_limits(maildir, limits)
    path = os.path.join(maildir, MAILDIRSIZE)
    read = _read(path)
    if limits and not _stale(read, limits, time.time()):
        return Usage(read.bytes, read.messages, limits)
    if read is not None and not limits and read.valid:
        return Usage(read.bytes, read.messages, limits)
    total, count = count_usage(maildir)
    if limits and write:
        try:
            _write_recalculated(maildir, limits, total, count, node)
        except OSError as e:
            log.warn(  # noqa: G010 (twisted.logger has no warning())
                "Cannot recalculate quota file {path}: {reason}", path=path, reason=str(e)
            )
    return Usage(total, count, limits)


def add(maildir: str, octets: int, messages: int) -> None:
    """Record a change of usage in ``maildirsize``, if the Maildir keeps one.

    One ``O_APPEND`` write, as every Maildir++ writer does, so concurrent writers'
    lines never mix.  A missing file stays missing (it is recalculated when needed).
    """
    if not octets and not messages:
        return
    try:
        fd = os.open(
            os.path.join(maildir, MAILDIRSIZE),
            os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
        )
    except FileNotFoundError:
        return
    try:
        os.write(fd, f"{octets} {messages}\n".encode("ascii"))
    finally:
        os.close(fd)


def keeps_usage(maildir: str) -> bool:
    """Whether the Maildir has a ``maildirsize`` to keep up to date."""
    return os.path.exists(os.path.join(maildir, MAILDIRSIZE))


def record_removed(maildir: str, sizes: Iterable[int]) -> None:
    """Subtract removed messages (their physical sizes) from the usage, under the lock."""
    sizes = list(sizes)
    if not sizes or not keeps_usage(maildir):
        return
    try:
        with locked(maildir):
            add(maildir, -sum(sizes), -len(sizes))
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.warn(  # noqa: G010 (twisted.logger has no warning())
                "Cannot update quota file in {path}: {reason}", path=maildir, reason=str(e)
            )


@implementer(IQuota)
class MaildirQuota:
    """``IQuota`` over the Maildirs of an ``IMaildropStore``, with each user's limits."""

    def __init__(self, store, policies, run: Callable[..., Deferred]):
        """``policies``: a ``popserv.policy.MailboxPolicies``; ``run``: a ``Workers.run``."""
        self.store = store
        self.policies = policies
        self._run = run

    def usage(self, user: str) -> Deferred:
        limits = self.policies.for_user(user).quota
        return self._run(self._usage, self.store.path_for(user), limits)

    def admits(self, user: str, size: int) -> Deferred:
        limits = self.policies.for_user(user).quota
        if not limits:
            return succeed(True)  # a limit only maildirsize names is checked at delivery
        return self._run(self._admits, self.store.path_for(user), limits, max(size, 1))

    def _usage(self, maildir: str, limits: QuotaLimits) -> Usage:
        if not os.path.isdir(maildir):
            return Usage(0, 0, limits)
        with locked(maildir):
            return usage(maildir, limits, node=self.store.node)

    def _admits(self, maildir: str, limits: QuotaLimits, size: int) -> bool:
        return self._usage(maildir, limits).room_for(size)
