"""Failed logins, connection counts and verified passwords shared by the worker processes
of one host, in SQLite.

With ``[server] workers`` above 1 each worker opens ``<state_dir>/popserv-shared.sqlite3``
and keeps there what must hold across them: failures per address and user name with the
time of the last one, the login attempts being verified, each user's last login
(LOGIN-DELAY), the connections per address and in all, and the digests of passwords
that passed a slow hash (``SharedDigests``, for ``popserv.credcache``).  The rows one
process owns (attempts, connections) carry its pid, so the supervisor drops those of a
worker that died (``forget_process``) before it starts another.

The digests are HMAC-SHA-256 under a key the supervisor made at start and handed to
each worker through its standard input; it is never written anywhere.  Without it a
digest in the file (or in a copy of it, a backup, a disk) tests no guess at all: it is
safe there only because the key stays in the processes' memory.  A new supervisor makes
a new key, so it empties the table at start (``forget_verified``).

The state is ephemeral: WAL mode with ``synchronous = OFF``, so nothing waits for the
disk; a crash of the host may lose recent changes, which forgets failures as a restart of
a single process does.  Each call is one short ``BEGIN IMMEDIATE`` transaction, run in
the reactor thread (some 10-30 microseconds each).  A process that finds the database
locked by another waits up to ``BUSY_TIMEOUT``; past that the call raises
``sqlite3.Error``: the throttle's caller answers ``-ERR [SYS/TEMP]``, and the limiter
refuses the connection as over ``max_connections``.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import sqlite3
from collections.abc import Callable, Iterator

from twisted.logger import Logger
from zope.interface import implementer

from popserv.interfaces import IConnectionLimiter, ILoginThrottle, IVerifiedDigests
from popserv.limits import DESCRIPTORS, IN_ALL, PER_PEER, ConnectionLimiter, accounting_key
from popserv.throttle import FAILURE_MEMORY, MAX_USERS_PER_PEER, ThrottleSettings, admission

log = Logger()

#: The database's file name inside ``[server] state_dir``.
SHARED_STATE_FILE = "popserv-shared.sqlite3"
#: Seconds a call waits for another process's transaction before it fails.
BUSY_TIMEOUT = 1.0
#: Addresses with failures kept at most; ``prune`` forgets the longest quiet first.
MAX_SHARED_PEERS = 100000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS login_peers (
    peer TEXT PRIMARY KEY, total INTEGER NOT NULL, last REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS login_peers_last ON login_peers (last);
CREATE TABLE IF NOT EXISTS login_failures (
    peer TEXT NOT NULL, user TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (peer, user)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS login_attempts (
    peer TEXT NOT NULL, pid INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (peer, pid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS last_logins (user TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS connections (
    service TEXT NOT NULL, key TEXT NOT NULL, pid INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (service, key, pid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS verified_passwords (
    user TEXT PRIMARY KEY, digest BLOB NOT NULL, expires REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS verified_passwords_expires ON verified_passwords (expires);
"""


#: The ``connections`` key of a process's connections in all (no address is ``*``).
_TOTAL = "*"
#: RETURNING and FILTER need SQLite 3.35 (2021; Debian 12 has 3.40).
_SQLITE_NEEDED = (3, 35, 0)


def _user_key(user: str | None) -> str:
    """A user name as the failures table keys it; None (unknown) apart from every name."""
    return "-" if user is None else f"u:{user}"


def open_database(path: str) -> sqlite3.Connection:
    """The shared database at ``path`` (made, mode 0600, with its tables if missing).

    Autocommit mode: each call below opens its own ``BEGIN IMMEDIATE`` transaction.
    """
    if sqlite3.sqlite_version_info < _SQLITE_NEEDED:
        raise sqlite3.NotSupportedError(
            f"several workers need SQLite {'.'.join(map(str, _SQLITE_NEEDED))} or later "
            f"(this Python has {sqlite3.sqlite_version}); set [server] workers = 1"
        )
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = OFF")
    db.executescript(_SCHEMA)
    return db


@contextlib.contextmanager
def _immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction, the lock taken at once, rolled back on any error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.rollback()
        raise
    db.execute("COMMIT")


def forget_process(db: sqlite3.Connection, pid: int) -> None:
    """Drop what process ``pid`` counted: its connections and its attempts under way."""
    with _immediate(db):
        db.execute("DELETE FROM connections WHERE pid = ?", (pid,))
        db.execute("DELETE FROM login_attempts WHERE pid = ?", (pid,))


def forget_verified(db: sqlite3.Connection) -> None:
    """Drop every verified password: made under another supervisor's key, none can match."""
    db.execute("DELETE FROM verified_passwords")


def forget_processes_except(db: sqlite3.Connection, alive: Callable[[int], bool]) -> list[int]:
    """Drop the rows of every process for which ``alive(pid)`` is false; their pids."""
    pids = {
        pid
        for (pid,) in db.execute("SELECT pid FROM connections UNION SELECT pid FROM login_attempts")
    }
    gone = sorted(pid for pid in pids if not alive(pid))
    for pid in gone:
        forget_process(db, pid)
    return gone


def prune(
    db: sqlite3.Connection,
    now: float,
    memory: float = FAILURE_MEMORY,
    login_delay: float = 0,
    max_peers: int = MAX_SHARED_PEERS,
) -> None:
    """Forget failures quiet for ``memory`` seconds, logins older than ``login_delay``,
    the longest quiet addresses beyond ``max_peers`` and expired verified passwords: the
    file stays small."""
    with _immediate(db):
        stale = "SELECT peer FROM login_peers WHERE last < ?"
        db.execute(f"DELETE FROM login_failures WHERE peer IN ({stale})", (now - memory,))
        db.execute(f"DELETE FROM login_peers WHERE peer IN ({stale})", (now - memory,))
        excess = "SELECT peer FROM login_peers ORDER BY last DESC LIMIT -1 OFFSET ?"
        db.execute(f"DELETE FROM login_failures WHERE peer IN ({excess})", (max_peers,))
        db.execute(f"DELETE FROM login_peers WHERE peer IN ({excess})", (max_peers,))
        db.execute("DELETE FROM last_logins WHERE at <= ?", (now - login_delay,))
        db.execute("DELETE FROM login_attempts WHERE count <= 0")
        db.execute("DELETE FROM connections WHERE count <= 0")
        db.execute("DELETE FROM verified_passwords WHERE expires <= ?", (now,))


@implementer(ILoginThrottle)
class SharedLoginThrottle:
    """``ILoginThrottle`` over the shared database: what ``MemoryLoginThrottle`` does,
    counted for every process that opens the same file.

    ``pid`` names this process's attempts under way.  Every call answers at once (no
    Deferred): each is a statement or a short transaction.
    """

    def __init__(
        self,
        db: sqlite3.Connection,
        clock,
        settings: ThrottleSettings | None = None,
        *,
        pid: int | None = None,
        memory: float = FAILURE_MEMORY,
    ):
        self.db = db
        self.clock = clock
        self.settings = settings if settings is not None else ThrottleSettings()
        self.pid = os.getpid() if pid is None else pid
        self.memory = memory

    def _end_attempt(self, peer: str) -> None:
        # A row left at 0 is harmless; the supervisor's prune removes it.
        self.db.execute(
            "UPDATE login_attempts SET count = count - 1 WHERE peer = ? AND pid = ? AND count > 0",
            (peer, self.pid),
        )

    def begin(self, peer: str, user: str | None) -> bool:
        with _immediate(self.db) as db:
            # Failures of an address quiet for ``memory`` seconds no longer count.
            failures, attempts = db.execute(
                "SELECT coalesce((SELECT total FROM login_peers WHERE peer = ?1 AND ?2 - last "
                "<= ?3), 0), (SELECT coalesce(sum(count), 0) FROM login_attempts "
                "WHERE peer = ?1)",
                (peer, self.clock.seconds(), self.memory),
            ).fetchone()
            db.execute(
                "INSERT INTO login_attempts (peer, pid, count) VALUES (?, ?, 1) "
                "ON CONFLICT (peer, pid) DO UPDATE SET count = count + 1",
                (peer, self.pid),
            )
        return admission(failures, failures + attempts, self.settings.max_failures)

    def succeeded(self, peer: str, user: str | None) -> None:
        self._end_attempt(peer)
        key = _user_key(user)
        forgiven = self.db.execute(
            "SELECT 1 FROM login_failures WHERE peer = ? AND user = ?", (peer, key)
        ).fetchone()
        if forgiven is None:
            return
        with _immediate(self.db) as db:
            row = db.execute(
                "DELETE FROM login_failures WHERE peer = ? AND user = ? RETURNING count",
                (peer, key),
            ).fetchone()
            if row is not None:
                db.execute(
                    "UPDATE login_peers SET total = total - ? WHERE peer = ?", (row[0], peer)
                )

    def failed(self, peer: str, user: str | None) -> float:
        now = self.clock.seconds()
        self._end_attempt(peer)
        key = _user_key(user)
        with _immediate(self.db) as db:
            row = db.execute("SELECT last FROM login_peers WHERE peer = ?", (peer,)).fetchone()
            if row is not None and now - row[0] > self.memory:
                db.execute("DELETE FROM login_failures WHERE peer = ?", (peer,))
                db.execute("DELETE FROM login_peers WHERE peer = ?", (peer,))
            known, users = db.execute(
                "SELECT count(*) FILTER (WHERE user = ?2), count(*) FROM login_failures "
                "WHERE peer = ?1",
                (peer, key),
            ).fetchone()
            if not known and users >= MAX_USERS_PER_PEER:
                key = _user_key(None)
            db.execute(
                "INSERT INTO login_failures (peer, user, count) VALUES (?, ?, 1) "
                "ON CONFLICT (peer, user) DO UPDATE SET count = count + 1",
                (peer, key),
            )
            (total,) = db.execute(
                "INSERT INTO login_peers (peer, total, last) VALUES (?, 1, ?) "
                "ON CONFLICT (peer) DO UPDATE SET total = total + 1, last = excluded.last "
                "RETURNING total",
                (peer, now),
            ).fetchone()
        base = self.settings.failure_delay
        cap = max(self.settings.failure_delay_max, base)
        return min(base * 2 ** min(total - 1, 32), cap)

    def abandoned(self, peer: str, user: str | None) -> None:
        self._end_attempt(peer)

    def login_allowed(self, user: str) -> bool:
        delay = self.settings.login_delay
        if not delay:
            return True
        # One statement: the login is recorded only when the last one is old enough.
        cursor = self.db.execute(
            "INSERT INTO last_logins (user, at) VALUES (?1, ?2) ON CONFLICT (user) "
            "DO UPDATE SET at = excluded.at WHERE ?2 - at >= ?3",
            (user, self.clock.seconds(), delay),
        )
        return cursor.rowcount == 1


@implementer(IConnectionLimiter)
class SharedConnectionLimiter(ConnectionLimiter):
    """``IConnectionLimiter`` over the shared database: per address and in all, counted
    for every process of ``service`` ("pop3", "smtp") that opens the same file.

    The descriptor reserve is this process's own, as in ``ConnectionLimiter``, so
    ``open`` counts this process's connections.  A database error refuses the connection
    as over ``max_connections``, with the error logged.
    """

    def __init__(self, db: sqlite3.Connection, service: str, *args, pid: int | None = None, **kw):
        """``args`` and ``kw`` are those of ``ConnectionLimiter``; ``pid`` names this process."""
        super().__init__(*args, **kw)
        self.db = db
        self.service = service
        self.pid = os.getpid() if pid is None else pid

    def opened(self, peer: str, descriptor: int = -1) -> str | None:
        key = accounting_key(peer)
        try:
            over = self._opened(key, descriptor)
        except sqlite3.Error as e:
            log.error(
                "popserv.shared_state_error: peer={peer} error={error}; connection refused",
                peer=peer,
                error=str(e),
            )
            return IN_ALL
        if over is None:
            self.open += 1
        return over

    def _opened(self, key: str, descriptor: int) -> str | None:
        if descriptor >= 0 and self.reserve and self._descriptors_short(descriptor):
            # Rare: which limit to name, as ConnectionLimiter names it.
            return self._limit_reached(key) or DESCRIPTORS
        # One statement, so one write transaction: counted only when within both limits.
        cursor = self.db.execute(
            "INSERT INTO connections (service, key, pid, count) "
            "SELECT ?1, k, ?3, 1 FROM (SELECT ?2 AS k UNION ALL SELECT ?4) "
            "WHERE (SELECT coalesce(sum(count), 0) FROM connections "
            "WHERE service = ?1 AND key = ?2) < ?5 "
            "AND (SELECT coalesce(sum(count), 0) FROM connections "
            "WHERE service = ?1 AND key = ?4) < ?6 "
            "ON CONFLICT (service, key, pid) DO UPDATE SET count = count + 1",
            (self.service, key, self.pid, _TOTAL, self.per_peer, self.in_all),
        )
        if cursor.rowcount > 0:
            return None
        return self._limit_reached(key) or IN_ALL

    def _limit_reached(self, key: str) -> str | None:
        from_peer, in_all = self.db.execute(
            "SELECT (SELECT coalesce(sum(count), 0) FROM connections "
            "WHERE service = ?1 AND key = ?2), (SELECT coalesce(sum(count), 0) "
            "FROM connections WHERE service = ?1 AND key = ?3)",
            (self.service, key, _TOTAL),
        ).fetchone()
        if from_peer >= self.per_peer:
            return PER_PEER
        if in_all >= self.in_all:
            return IN_ALL
        return None

    def closed(self, peer: str) -> None:
        self.open -= 1
        try:
            # A row left at 0 is harmless; the supervisor's prune removes it.
            self.db.execute(
                "UPDATE connections SET count = count - 1 "
                "WHERE service = ? AND key IN (?, ?) AND pid = ? AND count > 0",
                (self.service, accounting_key(peer), _TOTAL, self.pid),
            )
        except sqlite3.Error as e:
            log.error(
                "popserv.shared_state_error: peer={peer} error={error}; "
                "the connection stays counted until this worker ends",
                peer=peer,
                error=str(e),
            )


@implementer(IVerifiedDigests)
class SharedDigests:
    """``IVerifiedDigests`` over the shared database: a user verified by one worker is a
    hit in every other that has the same key.

    A lookup is one SELECT by primary key in the reactor thread.  A database error is a
    miss (the slow way, logged); one while remembering or forgetting is logged and
    passes: an entry left behind still holds the stored hash it matched, so a changed
    password never meets it.
    """

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __len__(self) -> int:
        (count,) = self.db.execute("SELECT count(*) FROM verified_passwords").fetchone()
        return count

    def matches(self, user: str, digest: bytes, now: float) -> bool:
        try:
            row = self.db.execute(
                "SELECT digest FROM verified_passwords WHERE user = ? AND expires > ?",
                (user, now),
            ).fetchone()
        except sqlite3.Error as e:
            log.error(
                "popserv.shared_state_error: verified password of {user}: {error}; "
                "verifying the slow way",
                user=user,
                error=str(e),
            )
            return False
        return row is not None and hmac.compare_digest(row[0], digest)

    def remember(self, user: str, digest: bytes, expires: float, size: int) -> None:
        try:
            with _immediate(self.db) as db:
                db.execute(
                    "INSERT INTO verified_passwords (user, digest, expires) VALUES (?, ?, ?) "
                    "ON CONFLICT (user) DO UPDATE SET digest = excluded.digest, "
                    "expires = excluded.expires",
                    (user, digest, expires),
                )
                (count,) = db.execute("SELECT count(*) FROM verified_passwords").fetchone()
                if count > size:
                    db.execute(
                        "DELETE FROM verified_passwords WHERE user IN (SELECT user FROM "
                        "verified_passwords ORDER BY expires LIMIT ?)",
                        (count - size,),
                    )
        except sqlite3.Error as e:
            log.error(
                "popserv.shared_state_error: remembering the verified password of {user}: {error}",
                user=user,
                error=str(e),
            )

    def forget(self, user: str) -> None:
        try:
            self.db.execute("DELETE FROM verified_passwords WHERE user = ?", (user,))
        except sqlite3.Error as e:
            log.error(
                "popserv.shared_state_error: forgetting the verified password of {user}: {error}",
                user=user,
                error=str(e),
            )
