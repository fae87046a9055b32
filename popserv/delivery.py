"""Atomic delivery into Maildirs: write to ``tmp/``, fsync, then rename or link into ``new/``.

A message is streamed into one temporary file in the first recipient's ``tmp/``.  At the
end it is fsynced, then renamed into ``new/`` when it has one recipient, or hard-linked
(copied, when a Maildir is on another file system) into every recipient's ``new/``, and
each ``new/`` is fsynced.  Its name there is
``<secs>.M<usecs>P<pid>Q<n>.<host>,S=<size>,W=<crlf-size>``, which ``popserv.maildir``
reads sizes from.  A failure removes what was linked.

Links into several ``new/`` cannot appear at once, so before the first one a journal in
``<mailroot>/.popserv-deliveries/`` (``.popserv-deliveries-<node>/`` for each node of a
cluster, ``journal_dir``) lists them (fsynced), and once all are made and
fsynced it is marked committed (fsynced); only then does the delivery succeed (and SMTP
answer 250).  At the next start ``roll_back_unfinished`` removes the links of every
journal not committed: after a crash, a message whose sender got no 250 (and so sends it
again) is in no ``new/``.  A rename is atomic by itself, so one recipient needs no
journal.  A crash leaves a ``tmp/`` file, which ``remove_stale_temp_files`` deletes at a
start 36 hours later (as Dovecot does).  Knows nothing of SMTP.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from typing import BinaryIO

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from popserv import quota
from popserv.interfaces import (
    Delivered,
    DeliveryFailed,
    IDeliverer,
    IDelivery,
    IMaildropStore,
    MailboxFull,
    QuotaLimits,
)
from popserv.maildir import fsync_dir

log = Logger()

#: Age after which a ``tmp/`` file is a dead delivery (Maildir convention, as in Dovecot).
STALE_AGE = 36 * 3600

#: Directory below the mail root holding one journal per multi-recipient delivery.
JOURNAL_DIR = ".popserv-deliveries"
#: A journal's first byte: the delivery is under way, or done (never to be undone).
_PENDING, _COMMITTED = b"P", b"C"

#: Threads that fsync and rename; more than the disk can overlap only add switching.
DELIVERY_THREADS = 8
_FILE_MODE = 0o600
_BUFFER_SIZE = 64 * 1024
_counter = itertools.count(1)


def journal_dir(mailroot: str, node: str = "") -> str:
    """Where the journals of a node's deliveries go: one directory per node of a cluster.

    At its start a node undoes only its own unfinished deliveries, so it never takes
    another node's delivery under way for one a crash cut off, whatever the shared file
    system makes of locks.  ``node`` empty: one node alone, ``.popserv-deliveries``.
    """
    return os.path.join(mailroot, f"{JOURNAL_DIR}-{node}" if node else JOURNAL_DIR)


def host_for_name(hostname: str) -> str:
    """The host part of a Maildir name: ``/``, ``:`` and ``,`` escaped as octal, as Dovecot does."""
    return hostname.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")


def unique_name(hostname: str, now_ns: int | None = None) -> str:
    """A new ``<secs>.M<usecs>P<pid>Q<n>.<host>``, unique to this process and moment."""
    if now_ns is None:
        now_ns = time.time_ns()
    secs, rest = divmod(now_ns, 1_000_000_000)
    return f"{secs}.M{rest // 1000:06d}P{os.getpid()}Q{next(_counter)}.{host_for_name(hostname)}"


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _create_exclusive(path: str) -> BinaryIO:
    fd = os.open(
        path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, _FILE_MODE
    )
    return os.fdopen(fd, "wb", buffering=_BUFFER_SIZE)


@implementer(IDelivery)
class MaildirDelivery:
    """One message on its way into some Maildirs; see ``IDelivery``."""

    def __init__(self, deliverer: MaildirDeliverer, users: Sequence[str]):
        self._deliverer = deliverer
        self.users = tuple(dict.fromkeys(users))
        if not self.users:
            raise ValueError("a delivery needs at least one recipient")
        self._maildirs = [deliverer.maildir(user) for user in self.users]
        remade = False
        for _ in range(100):
            self.id = unique_name(deliverer.hostname)
            self._temp = os.path.join(self._maildirs[0], "tmp", self.id)
            try:
                self._file: BinaryIO | None = _create_exclusive(self._temp)
                break
            except FileExistsError:
                continue
            except FileNotFoundError:
                if remade:
                    raise
                # Removed since this process last delivered to it: make the Maildir again.
                deliverer.maildir(self.users[0], known=False)
                remade = True
        else:
            raise DeliveryFailed(f"no free temporary name in {self._maildirs[0]}/tmp")
        self.size = 0
        self.crlf_size = 0
        self._after_cr = False
        self._done = False

    def write(self, data: bytes) -> None:
        """Append bytes (buffered); raises ``DeliveryFailed`` and removes the file on error."""
        if self._file is None:
            raise DeliveryFailed("delivery already finished or aborted")
        try:
            self._file.write(data)
        except OSError as e:
            self.abort()
            raise DeliveryFailed(f"cannot write {self._temp}: {e.strerror}", e) from None
        if data:
            self.size += len(data)
            self.crlf_size += len(data) + data.count(b"\n") - data.count(b"\r\n")
            if self._after_cr and data[:1] == b"\n":
                self.crlf_size -= 1
            self._after_cr = data[-1:] == b"\r"

    def finish(self) -> Deferred:
        """Fsync and link into every ``new/`` in a thread; fires with ``Delivered``."""
        if self._file is None:
            raise DeliveryFailed("delivery already finished or aborted")
        f, self._file = self._file, None
        limits = [self._deliverer.limits(user) for user in self.users]
        return self._deliverer.run(self._finish_blocking, f, limits)

    def _finish_blocking(self, f: BinaryIO, limits: list[QuotaLimits] | None = None) -> Delivered:
        name = f"{self.id},S={self.size},W={self.crlf_size}"
        if limits is None:
            limits = [QuotaLimits()] * len(self.users)
        try:
            try:
                f.flush()
                os.fsync(f.fileno())
            finally:
                f.close()
        except OSError as e:
            _unlink_quietly(self._temp)
            raise DeliveryFailed(f"cannot deliver {self.id}: {e.strerror}", e) from None
        counted = [
            maildir
            for maildir, limit in zip(self._maildirs, limits, strict=True)
            if limit or quota.keeps_usage(maildir)
        ]
        if not counted:
            return Delivered(self._place_all(name, self.users, self._maildirs))
        with contextlib.ExitStack() as locks:
            # Room is checked and taken under each mailbox's quota lock, in one order.
            node = self._deliverer.store.node
            try:
                for maildir in sorted(counted):
                    locks.enter_context(quota.locked(maildir))
                full = [
                    user
                    for user, maildir, limit in zip(self.users, self._maildirs, limits, strict=True)
                    if maildir in counted
                    and not quota.usage(maildir, limit, node=node).room_for(self.size)
                ]
            except OSError as e:
                _unlink_quietly(self._temp)
                raise DeliveryFailed(f"cannot read quota of {self.id}: {e.strerror}", e) from None
            chosen = [
                (user, maildir)
                for user, maildir in zip(self.users, self._maildirs, strict=True)
                if user not in full
            ]
            if not chosen:
                _unlink_quietly(self._temp)
                raise MailboxFull(full)
            users, maildirs = [u for u, _ in chosen], [m for _, m in chosen]
            stored = self._place_all(name, users, maildirs)
            for maildir in maildirs:
                if maildir in counted:
                    try:
                        quota.add(maildir, self.size, 1)
                    except OSError as e:  # delivered all the same: recalculated later
                        log.warn(  # noqa: G010 (twisted.logger has no warning())
                            "Cannot update quota file in {path}: {reason}",
                            path=maildir,
                            reason=str(e),
                        )
        return Delivered(stored, tuple(full))

    def _place_all(self, name: str, users: Sequence[str], maildirs: Sequence[str]) -> str:
        """Rename or link the fsynced temporary file into each ``new/``; all or none."""
        placed: list[str] = []
        temp_left = True
        journal: Journal | None = None
        try:
            if len(maildirs) == 1:
                target = os.path.join(maildirs[0], "new", name)
                temp_left = not self._remaking(users[0], self._move, maildirs[0], target)
                placed.append(target)
            else:
                targets = [os.path.join(maildir, "new", name) for maildir in maildirs]
                journal = self._deliverer.open_journal(self.id, self._temp, targets)
                for user, maildir, target in zip(users, maildirs, targets, strict=True):
                    self._remaking(user, self._place, maildir, target)
                    placed.append(target)
            # The new names must survive a crash; the temporary name leaving tmp/ need not.
            for directory in sorted({os.path.dirname(path) for path in placed}):
                fsync_dir(directory)
            if journal is not None:
                journal.commit()
        except OSError as e:
            for path in placed:
                _unlink_quietly(path)
            _unlink_quietly(self._temp)
            if journal is not None:
                # The links must be gone for good before their journal is.
                _fsync_dirs_quietly(placed)
                journal.close()
            raise DeliveryFailed(f"cannot deliver {self.id}: {e.strerror}", e) from None
        if temp_left:
            _unlink_quietly(self._temp)
        if journal is not None:
            journal.close()
        self._done = True
        return name

    def _remaking(self, user: str, place, maildir: str, target: str):
        """``place(maildir, target)``, again after making the Maildir if it was removed."""
        try:
            return place(maildir, target)
        except FileNotFoundError:
            self._deliverer.store.create(user)
            return place(maildir, target)

    def _move(self, maildir: str, target: str) -> bool:
        """Rename the temporary file to ``target`` (one recipient); False if it was copied."""
        try:
            os.rename(self._temp, target)
            return True
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
        self._place(maildir, target)
        return False

    def _place(self, maildir: str, target: str) -> None:
        """Hard-link the temporary file to ``target``; across devices, copy via ``tmp/``."""
        try:
            os.link(self._temp, target)
            return
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
        copy = os.path.join(maildir, "tmp", os.path.basename(target))
        try:
            with open(self._temp, "rb") as src, _create_exclusive(copy) as dst:
                shutil.copyfileobj(src, dst, _BUFFER_SIZE)
                dst.flush()
                os.fsync(dst.fileno())
            os.link(copy, target)
        finally:
            _unlink_quietly(copy)

    def abort(self) -> None:
        """Drop the message: close and remove the temporary file; safe to call twice."""
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
        if not self._done:
            _unlink_quietly(self._temp)


def _fsync_dirs_quietly(paths: Iterable[str]) -> None:
    for directory in sorted({os.path.dirname(path) for path in paths}):
        with contextlib.suppress(OSError):
            fsync_dir(directory)


class Journal:
    """The record of one delivery into several Maildirs, open (and locked) while it lasts.

    Its file is named after the delivery's id and holds ``P`` or ``C`` (pending or
    committed) and then, as JSON, the temporary file and the paths it is linked to.  The
    lock tells ``roll_back_unfinished`` in another process that the delivery is alive.
    """

    def __init__(self, path: str, fd: int):
        self.path = path
        self._fd = fd

    @classmethod
    def create(cls, directory: str, id: str, temp: str, targets: Sequence[str]) -> Journal:
        """Write a pending journal and make it durable, entry in its directory included."""
        path = os.path.join(directory, id)
        fd = os.open(
            path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, _FILE_MODE
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            record = memoryview(_PENDING + json.dumps({"temp": temp, "targets": targets}).encode())
            while record:
                record = record[os.write(fd, record) :]
            os.fsync(fd)
            fsync_dir(directory)
        except BaseException:
            os.close(fd)
            _unlink_quietly(path)
            raise
        return cls(path, fd)

    def commit(self) -> None:
        """Mark the delivery done, durably: from here on no start undoes it."""
        os.pwrite(self._fd, _COMMITTED, 0)
        os.fdatasync(self._fd)

    def close(self) -> None:
        """Remove the journal, whose delivery is committed or undone; safe to call twice."""
        if self._fd >= 0:
            _unlink_quietly(self.path)
            os.close(self._fd)
            self._fd = -1


@implementer(IDeliverer)
class MaildirDeliverer:
    """Starts deliveries into the Maildirs of an ``IMaildropStore``."""

    def __init__(
        self,
        store: IMaildropStore,
        hostname: str,
        run: Callable[..., Deferred],
        journal_dir: str | None = None,
        policies=None,
    ):
        """``run``: a ``Workers.run`` of ``DELIVERY_THREADS`` of the deliveries' own, so
        deliveries never wait behind logins.  ``journal_dir``: where multi-recipient
        deliveries keep their journals (``<mailroot>/.popserv-deliveries`` by default;
        ``DeliveryRecovery`` reads it).  ``policies``: a ``popserv.policy.MailboxPolicies``
        with each user's quota (no quotas without it, beyond what ``maildirsize`` says)."""
        self.store = store
        self.policies = policies
        self.hostname = hostname
        #: Runs each delivery's fsync-and-link step off the reactor thread.
        self.run = run
        self._known: dict[str, str] = {}
        self._journal_dir = journal_dir

    @property
    def journal_dir(self) -> str:
        if self._journal_dir is None:
            self._journal_dir = os.path.join(self.store.mailroot, JOURNAL_DIR)
        return self._journal_dir

    def open_journal(self, id: str, temp: str, targets: Sequence[str]) -> Journal:
        """A durable journal of a delivery's links, written before the first of them."""
        directory = self.journal_dir
        try:
            return Journal.create(directory, id, temp, targets)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, 0o700)
            fsync_dir(os.path.dirname(directory))
            return Journal.create(directory, id, temp, targets)

    def limits(self, user: str) -> QuotaLimits:
        """The user's quota limits (none without policies)."""
        if self.policies is None:
            return QuotaLimits()
        return self.policies.for_user(user).quota

    def maildir(self, user: str, known: bool = True) -> str:
        """The user's Maildir, made (if missing) on the first delivery, or when not ``known``."""
        path = self._known.get(user) if known else None
        if path is None:
            path = self._known[user] = self.store.create(user)
        return path

    def begin(self, users: Sequence[str]) -> MaildirDelivery:
        """A new delivery to ``users``; creates missing Maildirs and the temporary file."""
        try:
            return MaildirDelivery(self, users)
        except OSError as e:
            raise DeliveryFailed(f"cannot start a delivery: {e.strerror}", e) from None


def _maildirs_below(mailroot: str) -> Iterable[str]:
    """The Maildirs at ``<mailroot>/<user>`` and ``<mailroot>/<domain>/<user>``."""

    def is_maildir(path: str) -> bool:
        return all(os.path.isdir(os.path.join(path, sub)) for sub in ("tmp", "new", "cur"))

    try:
        top = sorted(os.scandir(mailroot), key=lambda e: e.name)
    except FileNotFoundError:
        return
    for entry in top:
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        if is_maildir(entry.path):
            yield entry.path
            continue
        try:
            with os.scandir(entry.path) as it:
                subs = list(it)
        except OSError:
            continue  # removed (or unreadable) since the listing above
        for sub in subs:
            if sub.is_dir(follow_symlinks=False) and is_maildir(sub.path):
                yield sub.path


def remove_stale_temp_files(mailroot: str, now: float | None = None, age: float = STALE_AGE) -> int:
    """Remove ``tmp/`` files of dead deliveries older than ``age`` seconds; returns how many."""
    if now is None:
        now = time.time()
    removed = 0
    for maildir in _maildirs_below(mailroot):
        tmp = os.path.join(maildir, "tmp")
        try:
            with os.scandir(tmp) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
                if entry.is_file(follow_symlinks=False) and now - st.st_mtime > age:
                    os.unlink(entry.path)
                    removed += 1
                    log.info("removed stale temporary file {path}", path=entry.path)
            except FileNotFoundError:
                continue
            except OSError as e:
                log.warn(  # noqa: G010 (twisted.logger has no warning())
                    "cannot remove stale temporary file {path}: {reason}",
                    path=entry.path,
                    reason=e.strerror,
                )
    return removed


def _named_for(id: str, path: object, sub: str, exact: bool = False) -> bool:
    """Whether ``path`` is a file of delivery ``id`` in a Maildir's ``sub`` directory.

    A damaged journal could name any file; only the delivery's own are removed.
    """
    if not isinstance(path, str):
        return False
    name = os.path.basename(path)
    if os.path.basename(os.path.dirname(path)) != sub:
        return False
    return name == id or (not exact and name.startswith(id + ","))


def _undo(id: str, record: dict, pending: bool) -> bool:
    """Remove what a delivery left: its temporary files, and its links when ``pending``.

    True when nothing is left of it (its journal can go); the removed links are made
    durable first, so a crash cannot bring them back once the journal is gone.
    """
    targets = record.get("targets")
    targets = targets if isinstance(targets, list) else []
    removed, touched, ok = 0, set(), True
    for target in targets:
        if not _named_for(id, target, "new"):
            continue
        maildir = os.path.dirname(os.path.dirname(target))
        # A copy on its way to a Maildir on another file system.
        _unlink_quietly(os.path.join(maildir, "tmp", os.path.basename(target)))
        if not pending:
            continue
        try:
            os.unlink(target)
        except FileNotFoundError:
            continue
        except OSError as e:
            ok = False
            log.warn(  # noqa: G010 (twisted.logger has no warning())
                "delivery.rollback_failed: cannot remove {path}: {reason}",
                path=target,
                reason=e.strerror,
            )
            continue
        removed += 1
        touched.add(os.path.dirname(target))
    temp = record.get("temp")
    if _named_for(id, temp, "tmp", exact=True):
        _unlink_quietly(temp)
    for directory in sorted(touched):
        try:
            fsync_dir(directory)
        except OSError:
            ok = False
    if pending:
        log.info(
            "delivery.rolled_back: id={id} removed={removed} of {targets} links",
            id=id,
            removed=removed,
            targets=len(targets),
        )
    return ok


def roll_back_unfinished(journal_dir: str) -> int:
    """Undo the deliveries a crash cut off before they were committed; returns how many.

    Run at start, before any listener accepts: a pending journal's links come out of
    every ``new/`` (its sender got no 250, and sends it again), and its temporary file
    goes.  A committed delivery stays as it is; only its journal (and temporary file) go.
    A journal still locked belongs to a delivery under way in another process: it stays.
    """
    try:
        names = sorted(os.listdir(journal_dir))
    except FileNotFoundError:
        return 0
    undone = 0
    for id in names:
        path = os.path.join(journal_dir, id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
            state = data[:1]
            try:
                record = json.loads(data[1:])
            except ValueError:
                # Cut off while being written, so before any link was made.
                record = {}
            if not isinstance(record, dict):
                record = {}
            if state == _PENDING:
                undone += 1
            if _undo(id, record, pending=state == _PENDING):
                _unlink_quietly(path)
        finally:
            os.close(fd)
    return undone


class DeliveryRecovery(Service):
    """At start, before any listener accepts, undoes the deliveries a crash cut off."""

    def __init__(self, journal_dir: str):
        self.journal_dir = journal_dir

    def startService(self) -> None:
        super().startService()
        undone = roll_back_unfinished(self.journal_dir)
        if undone:
            log.info("rolled back {count} unfinished deliveries", count=undone)


class StaleTempCleaner(Service):
    """Removes dead deliveries' ``tmp/`` files once, when the server starts."""

    def __init__(self, mailroot: str, age: float = STALE_AGE):
        self.mailroot = mailroot
        self.age = age

    def startService(self) -> None:
        super().startService()
        removed = remove_stale_temp_files(self.mailroot, age=self.age)
        if removed:
            log.info("removed {count} stale temporary files", count=removed)
