"""Maildrop locks across nodes: a PostgreSQL advisory lock per maildrop, kept by one
connection per process with a heartbeat.

Each process keeps one connection of its own (not from ``popserv.pgdb``'s pool: the
locks live exactly as long as it does).  A maildrop's lock is a session-level
``pg_try_advisory_lock(NAMESPACE, key)``, taken after the local ``flock`` (which
serializes the sessions of one host, since PostgreSQL lets one session take its own
lock again) and released before it.

The server ends the connection of a node that stops talking: ``idle_session_timeout``
is set to ``[cluster] lock_timeout``, and a heartbeat (``SELECT 1`` four times as
often) keeps a live node's connection busy.  So a node that dies, hangs or is cut off
loses its locks within ``lock_timeout`` seconds, and the other nodes serve its
maildrops.  A node that finds its connection gone (the heartbeat, or any statement,
fails) knows every lock it held is gone: it tells each session (``when_lost``),
whose commit then refuses (``verify``), and takes a new connection for the next login.

The key of a maildrop is 32 bits of a hash of its folded name
(``popserv.usernames.collision_key``), in popserv's own key space (``NAMESPACE``, as
the first of the two-integer form), so other applications' advisory locks never meet
popserv's.  Two maildrops whose keys collide cannot be opened at once on different
processes (one gets ``[IN-USE]``); two sessions never share a maildrop.

One window remains, as with any lock without fencing: a node stopped between a commit's
``verify`` and its unlinks for longer than ``lock_timeout`` still removes what that
session deleted, after another node has taken the maildrop.
"""

from __future__ import annotations

import hashlib
import threading
import time

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from popserv.interfaces import (
    IMaildropLease,
    IMaildropLocks,
    LockLost,
    LockUnavailable,
    MaildropLocked,
)
from popserv.logsafe import untrusted
from popserv.usernames import collision_key
from popserv.workers import Workers

log = Logger()

#: The first key of popserv's maildrop locks (``pop3`` in ASCII): its own key space.
NAMESPACE = 0x706F7033
#: Heartbeats per ``lock_timeout``.
BEATS = 4
#: Seconds to wait for the server when connecting.
CONNECT_TIMEOUT = 2
#: Seconds after a failed connection during which logins fail at once instead of each
#: waiting for a server that does not answer.
RETRY_AFTER = 1.0


def lock_key(user: str) -> int:
    """The second key (a signed 32-bit integer) of ``user``'s maildrop lock.

    From the folded name, so two spellings of one Maildir (``Alice``, ``alice``) are one lock.
    """
    text = "/".join(collision_key(user)).encode("utf-8")
    digest = hashlib.blake2b(text, digest_size=4, person=b"popserv-lock").digest()
    return int.from_bytes(digest, "big", signed=True)


def _connection_error(error: Exception, connection) -> bool:
    """Whether a psycopg error means the connection (and every lock on it) is gone."""
    import psycopg

    return isinstance(error, psycopg.OperationalError | psycopg.InterfaceError) or bool(
        connection is not None and connection.broken
    )


@implementer(IMaildropLease)
class AdvisoryLease:
    """One session's advisory lock, and the local guard taken before it."""

    def __init__(self, locks: AdvisoryLocks, user: str, key: int, local):
        self.user = user
        self.key = key
        self._locks = locks
        self._local = local
        self._released = False
        #: Fires once both locks are given up.
        self._done = defer.Deferred()
        #: Set in the reactor thread: the lock was lost, and the callbacks told.
        self.lost = False
        self._callbacks: list = []

    def verify(self) -> None:
        self._locks.verify(self)

    def when_lost(self, callback) -> None:
        if self.lost:
            self._locks.reactor.callLater(0, callback)
        else:
            self._callbacks.append(callback)

    def release(self) -> defer.Deferred:
        if not self._released:
            self._released = True
            self._locks.reactor.callFromThread(self._locks.unlock, self)
        return self._done

    def _lose(self) -> None:
        """In the reactor thread: tell the session its lock is gone."""
        if self.lost or self._released:
            return
        self.lost = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.failure("pglocks.lost_callback_failed: user={user}", user=untrusted(self.user))

    def _finish(self) -> None:
        """In the reactor thread: the advisory lock is given up; now the local guard."""
        self._local.release()
        self._done.callback(None)


@implementer(IMaildropLocks)
class AdvisoryLocks:
    """One process's maildrop locks in PostgreSQL, kept on a connection of its own.

    ``local`` (a ``popserv.maildir.FileLocks``) is taken first; ``timeout`` is
    ``[cluster] lock_timeout``.  ``start`` begins the heartbeat, ``stop`` closes the
    connection, which frees every lock still held.  ``lock`` and ``verify`` block (the
    store's threads call them); the heartbeat and releases run in a thread of their own.
    """

    def __init__(
        self,
        conninfo: str,
        reactor,
        local,
        *,
        timeout: float = 10.0,
        name: str = "popserv",
    ):
        self.conninfo = conninfo
        self.reactor = reactor
        self.local = local
        self.timeout = timeout
        self.name = name
        self._thread = Workers(reactor, 1, "popserv-locks")
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = reactor
        self._beating = False
        self._stopped = False
        #: Guards the connection (one statement at a time) and ``_held``.
        self._mutex = threading.Lock()
        self._connection = None
        #: The leases taken on the current connection and not yet released.
        self._held: set[AdvisoryLease] = set()
        #: The server's pid for the current connection (``pg_stat_activity.pid``).
        self.backend: int | None = None
        self._failed_at: float | None = None

    # -- life ---------------------------------------------------------------------

    def start(self) -> None:
        self._stopped = False
        self._thread.start()
        if not self._heartbeat.running:
            self._heartbeat.start(self.timeout / BEATS, now=False)

    def stop(self) -> None:
        """Stop the heartbeat and close the connection; the server frees its locks."""
        self._stopped = True
        if self._heartbeat.running:
            self._heartbeat.stop()
        self._thread.stop()
        with self._mutex:
            self._held.clear()
            self._close()

    # -- the connection (with the mutex held) ----------------------------------------

    def _connect(self):
        import psycopg

        if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_AFTER:
            raise LockUnavailable("the database did not answer a moment ago")
        try:
            connection = psycopg.connect(
                self.conninfo,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT,
                application_name=f"{self.name} locks",
                # A server that stops acknowledging (a cut network) fails the next
                # statement within the lock timeout instead of hanging it.
                tcp_user_timeout=int(self.timeout * 1000),
                keepalives=1,
                keepalives_idle=max(1, int(self.timeout / 2)),
                keepalives_interval=1,
                keepalives_count=3,
            )
        except psycopg.Error as e:
            self._failed_at = time.monotonic()
            raise LockUnavailable(str(e).strip() or type(e).__name__) from e
        self._failed_at = None
        try:
            connection.execute(
                "SELECT set_config('idle_session_timeout', %s, false)",
                (f"{int(self.timeout * 1000)}ms",),
            )
        except psycopg.errors.UndefinedObject:
            log.warn(  # noqa: G010 (twisted.logger has no warning())
                "pglocks: PostgreSQL before 14 has no idle_session_timeout; a hung node "
                "keeps its maildrop locks until its connection breaks"
            )
        except psycopg.Error as e:
            connection.close()
            raise LockUnavailable(str(e).strip() or type(e).__name__) from e
        self.backend = connection.info.backend_pid
        self._connection = connection
        log.info("pglocks.connected: backend={backend}", backend=self.backend)
        return connection

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        self.backend = None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # noqa: S110 (already broken: nothing left to close)
                pass

    def _lost(self, reason: str) -> None:
        """The connection is gone, and with it every lock: tell their sessions."""
        backend = self.backend
        self._close()
        lost, self._held = self._held, set()
        log.warn(  # noqa: G010 (twisted.logger has no warning())
            "pglocks.connection_lost: backend={backend} locks={count} reason={reason}",
            backend=backend,
            count=len(lost),
            reason=reason,
        )
        for lease in lost:
            self.reactor.callFromThread(lease._lose)

    def _execute(self, sql: str, params=()):
        """One statement on the connection (made if needed); its first row.

        A broken connection loses every lock (``_lost``) and raises ``LockLost``.
        """
        connection = self._connection
        if connection is None:
            connection = self._connect()
        try:
            return connection.execute(sql, params).fetchone()
        except Exception as e:
            if _connection_error(e, connection):
                self._lost(str(e).strip() or type(e).__name__)
                raise LockLost(str(e).strip()) from e
            raise

    # -- IMaildropLocks ---------------------------------------------------------------

    def lock(self, user: str, path: str) -> AdvisoryLease:
        """The local guard, then the advisory lock; MaildropLocked if either is taken."""
        local = self.local.lock(user, path)
        try:
            key = lock_key(user)
            with self._mutex:
                row = self._try_lock(key)
                if not row[0]:
                    raise MaildropLocked(user)
                lease = AdvisoryLease(self, user, key, local)
                self._held.add(lease)
        except BaseException:
            local.release()
            raise
        return lease

    def _try_lock(self, key: int):
        sql = "SELECT pg_try_advisory_lock(%s, %s)"
        had_connection = self._connection is not None
        try:
            return self._execute(sql, (NAMESPACE, key))
        except LockLost as e:
            if not had_connection:
                raise LockUnavailable(str(e)) from e
        # The old connection had died unseen (the server restarted, say): once more, anew.
        try:
            return self._execute(sql, (NAMESPACE, key))
        except LockLost as e:
            raise LockUnavailable(str(e)) from e

    def verify(self, lease: AdvisoryLease) -> None:
        """LockLost unless ``lease`` is held now: the server shows it in ``pg_locks``."""
        with self._mutex:
            if lease not in self._held:
                raise LockLost(lease.user)
            (held,) = self._execute(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
                " AND pid = pg_backend_pid() AND granted AND classid = %s AND objid = %s"
                " AND objsubid = 2)",
                (NAMESPACE, lease.key & 0xFFFFFFFF),
            )
            if not held:
                self._held.discard(lease)
                log.error("pglocks.not_held: user={user}", user=untrusted(lease.user))
                raise LockLost(lease.user)

    def unlock(self, lease: AdvisoryLease) -> None:
        """In the reactor thread: unlock in the locks' thread, then the local guard."""
        if self._stopped:
            lease._finish()  # the connection is closed: nothing is held any more
            return
        d = self._thread.run(self._unlock_blocking, lease)
        user = untrusted(lease.user)
        d.addErrback(lambda f: log.failure("pglocks.unlock_failed: user={user}", f, user=user))
        d.addBoth(lambda _: lease._finish())

    def _unlock_blocking(self, lease: AdvisoryLease) -> None:
        with self._mutex:
            if lease not in self._held:
                return  # lost with its connection: the server has freed it
            self._held.discard(lease)
            try:
                self._execute("SELECT pg_advisory_unlock(%s, %s)", (NAMESPACE, lease.key))
            except LockLost:
                pass  # gone with the connection: freed as well

    # -- the heartbeat ------------------------------------------------------------------

    def _beat(self) -> None:
        if self._beating:
            return
        self._beating = True
        d = self._thread.run(self._beat_blocking)
        d.addErrback(lambda f: log.failure("pglocks.heartbeat_failed", f))
        d.addBoth(self._beaten)

    def _beaten(self, _) -> None:
        self._beating = False

    def _beat_blocking(self) -> None:
        """``SELECT 1``: keeps the connection from the server's idle timeout, and finds
        out when it is gone."""
        with self._mutex:
            if self._connection is None:
                return
            try:
                self._execute("SELECT 1")
            except LockLost:
                pass  # _lost told the sessions; the next login connects anew


class AdvisoryLocksService(Service):
    """Keeps the lock connection's heartbeat going while the server runs."""

    name = "maildrop-locks"

    def __init__(self, locks: AdvisoryLocks):
        self.locks = locks

    def startService(self) -> None:
        super().startService()
        self.locks.start()

    def stopService(self):
        super().stopService()
        self.locks.stop()


def cluster_locks(conninfo: str, node: str, reactor, timeout: float) -> AdvisoryLocks:
    """The maildrop locks of a node: ``flock`` on a file of the node's own, then PostgreSQL.

    The lock file is ``popserv.lock.<node>``: nodes on one host (or a file system whose
    ``flock`` reaches across hosts) never wait on each other's file, only on the
    database, so a stopped node's sessions block nobody once its locks time out.
    """
    from popserv.maildir import LOCK_NAME, FileLocks

    return AdvisoryLocks(
        conninfo,
        reactor,
        FileLocks(f"{LOCK_NAME}.{node}"),
        timeout=timeout,
        name=f"popserv {node}",
    )
