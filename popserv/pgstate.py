"""What the nodes of a cluster count together in PostgreSQL: failed logins and open sessions.

``PostgresLoginThrottle`` is ``popserv.throttle.MemoryLoginThrottle``'s accounting kept
in the ``popserv_login_*`` tables, so N failures spread over the nodes lock an address
out as N failures on one node do.  Each call is one round trip (a function of the
schema, see ``popserv.pgdb.MIGRATIONS``), made off the reactor; while the database is
known to be down (``Database.available``) calls fail at once with
``DatabaseUnavailable``, which POP3 answers with ``-ERR [SYS/TEMP]``.

An attempt under way is a row keyed by (address, node, pid).  Rows of processes that
died stop counting after ``ATTEMPT_LIFETIME`` seconds, and each process removes those
of its node's dead processes when it starts.

``PostgresSessionRegistry`` lists this process's logged-in sessions in
``popserv_sessions`` for ``popserv who``.  Its rows name the backend of a connection
the process holds for its whole life: when the process dies, the server ends that
backend, and ``cluster_sessions`` no longer shows them.  After an outage the process
writes its list again.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from popserv.interfaces import ILoginThrottle, ISessionRegistry, OpenSession
from popserv.pgdb import CONNECT_TIMEOUT, Database, DatabaseUnavailable
from popserv.process import process_alive
from popserv.sessions import MemorySessionRegistry
from popserv.throttle import FAILURE_MEMORY, MAX_USERS_PER_PEER, ThrottleSettings, admission
from popserv.workers import Workers

log = Logger()

#: Seconds an attempt under way counts at most: a row its process never ended (it
#: died) stops counting then.
ATTEMPT_LIFETIME = 300.0
#: Seconds between the removals of what no longer counts (quiet addresses, old logins).
PRUNE_INTERVAL = 60.0
#: Seconds between the checks of the session list's connection (rewritten if it changed).
SESSION_CHECK_INTERVAL = 2.0
#: The failures key of failures without a user name, or beyond ``MAX_USERS_PER_PEER``.
_NO_USER = "-"


def _user_key(user: str | None) -> str:
    """A user name as the failures table keys it; None (unknown) apart from every name."""
    return _NO_USER if user is None else f"u:{user}"


def _one(connection, sql: str, params) -> object:
    """The first column of the first row of one statement."""
    return connection.execute(sql, params).fetchone()[0]


def _rowcount(connection, sql: str, params) -> int:
    return connection.execute(sql, params).rowcount


@implementer(ILoginThrottle)
class PostgresLoginThrottle:
    """``ILoginThrottle`` over the shared database: ``MemoryLoginThrottle``'s accounting,
    counted for every process of every node.  Each method returns a Deferred.

    ``node`` and ``pid`` (the current process's when None) name this process's attempts.
    """

    def __init__(
        self,
        database: Database,
        clock,
        settings: ThrottleSettings | None = None,
        *,
        node: str,
        pid: int | None = None,
        memory: float = FAILURE_MEMORY,
        lifetime: float = ATTEMPT_LIFETIME,
    ):
        self.database = database
        self.clock = clock
        self.settings = settings if settings is not None else ThrottleSettings()
        self.node = node
        self._pid = pid
        self.memory = memory
        self.lifetime = lifetime

    @property
    def pid(self) -> int:
        # Asked at each call: twistd forks to daemonize after the service is built.
        return os.getpid() if self._pid is None else self._pid

    def _run(self, f: Callable, sql: str, params: tuple) -> defer.Deferred:
        if not self.database.available:
            return defer.fail(DatabaseUnavailable("the shared database is unavailable"))
        return self.database.run(f, sql, params)

    def begin(self, peer: str, user: str | None) -> defer.Deferred:
        d = self._run(
            _one,
            "SELECT popserv_login_admit(%s, %s, %s, %s, %s, %s)",
            (peer, self.node, self.pid, self.clock.seconds(), self.memory, self.lifetime),
        )
        # (failures, attempts under way): one array, so one round trip still.
        limit = self.settings.max_failures
        return d.addCallback(lambda counts: admission(counts[0], sum(counts), limit))

    def succeeded(self, peer: str, user: str | None) -> defer.Deferred:
        d = self._run(
            _one,
            "SELECT popserv_login_succeeded(%s, %s, %s, %s)",
            (peer, _user_key(user), self.node, self.pid),
        )
        return d.addCallback(lambda _: None)

    def failed(self, peer: str, user: str | None) -> defer.Deferred:
        d = self._run(
            _one,
            "SELECT popserv_login_failed(%s, %s, %s, %s, %s, %s, %s, %s)",
            (
                peer,
                _user_key(user),
                self.node,
                self.pid,
                self.clock.seconds(),
                self.memory,
                MAX_USERS_PER_PEER,
                _NO_USER,
            ),
        )
        return d.addCallback(self._delay)

    def _delay(self, total: int) -> float:
        base = self.settings.failure_delay
        cap = max(self.settings.failure_delay_max, base)
        return min(base * 2 ** min(total - 1, 32), cap)

    def abandoned(self, peer: str, user: str | None) -> defer.Deferred:
        d = self._run(_one, "SELECT popserv_login_end(%s, %s, %s)", (peer, self.node, self.pid))
        return d.addCallback(lambda _: None)

    def login_allowed(self, user: str):
        delay = self.settings.login_delay
        if not delay:
            return True
        # One statement: the login is recorded only when the last one is old enough.
        d = self._run(
            _rowcount,
            "INSERT INTO popserv_last_logins AS l (name, at) VALUES (%s, %s) "
            "ON CONFLICT (name) DO UPDATE SET at = excluded.at WHERE excluded.at - l.at >= %s",
            (user, self.clock.seconds(), delay),
        )
        return d.addCallback(lambda count: count == 1)


def prune(
    connection,
    now: float,
    memory: float = FAILURE_MEMORY,
    login_delay: float = 0,
    lifetime: float = ATTEMPT_LIFETIME,
) -> None:
    """Forget failures quiet for ``memory`` seconds, logins older than ``login_delay``
    and attempts ended or older than ``lifetime``: the tables stay small."""
    with connection.transaction():
        connection.execute(
            "DELETE FROM popserv_login_failures f USING popserv_login_peers p "
            "WHERE f.peer = p.peer AND %s - p.last > %s",
            (now, memory),
        )
        connection.execute("DELETE FROM popserv_login_peers WHERE %s - last > %s", (now, memory))
        connection.execute(
            "DELETE FROM popserv_last_logins WHERE %s - at >= %s", (now, login_delay)
        )
        connection.execute(
            "DELETE FROM popserv_login_attempts WHERE count <= 0 OR %s - at > %s", (now, lifetime)
        )


def forget_dead_processes(connection, node: str, alive: Callable[[int], bool]) -> list[int]:
    """Remove the rows of ``node``'s processes for which ``alive(pid)`` is false; their pids.

    Only a process of ``node`` can tell which of its pids are alive, so each does this
    for its own node when it starts.
    """
    rows = connection.execute(
        "SELECT pid FROM popserv_login_attempts WHERE node = %s "
        "UNION SELECT pid FROM popserv_sessions WHERE node = %s",
        (node, node),
    ).fetchall()
    gone = sorted(pid for (pid,) in rows if not alive(pid))
    if gone:
        with connection.transaction():
            for table in ("popserv_login_attempts", "popserv_sessions"):
                connection.execute(
                    f"DELETE FROM {table} WHERE node = %s AND pid = ANY(%s)", (node, gone)
                )
    return gone


def cluster_sessions(connection) -> list[OpenSession]:
    """Every node's logged-in sessions whose process still holds its connection."""
    rows = connection.execute(
        "SELECT s.name, s.peer, s.since, s.pid, s.node FROM popserv_sessions s "
        "JOIN pg_stat_activity a ON a.pid = s.backend AND a.backend_start = s.backend_start "
        "ORDER BY s.since, s.name"
    ).fetchall()
    return [OpenSession(*row) for row in rows]


class _Presence:
    """A connection of this process's own, held for its life, in a thread of its own.

    Its backend (pid and start time) marks this process's rows in ``popserv_sessions``.
    """

    def __init__(self, conninfo: str, timeout: float):
        self.conninfo = conninfo
        self.timeout = timeout
        self.connection = None

    def backend(self) -> tuple[int, object]:
        """The backend of a connection that answers now, connecting again if it must."""
        import psycopg

        try:
            if self.connection is not None and not self.connection.closed:
                return self._ask()
        except psycopg.Error:
            self.close()
        try:
            self.connection = psycopg.connect(
                self.conninfo, autocommit=True, connect_timeout=max(1, int(self.timeout))
            )
            return self._ask()
        except psycopg.Error as e:
            self.close()
            raise DatabaseUnavailable(str(e).strip() or type(e).__name__) from e

    def _ask(self) -> tuple[int, object]:
        return self.connection.execute(
            "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        ).fetchone()

    def rewrite(self, node: str, pid: int, backend, rows: list[tuple]) -> None:
        """Make this process's rows ``rows`` (key, name, peer, since), marked with ``backend``."""
        with self.connection.transaction():
            self.connection.execute(
                "DELETE FROM popserv_sessions WHERE node = %s AND pid = %s", (node, pid)
            )
            with self.connection.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO popserv_sessions "
                    "(node, pid, key, name, peer, since, backend, backend_start) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    [(node, pid, *row, *backend) for row in rows],
                )

    def close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.close()


@implementer(ISessionRegistry)
class PostgresSessionRegistry(MemorySessionRegistry):
    """The sessions of this process, in memory (``snapshot``) and in ``popserv_sessions``.

    A login or logout is written in the background; when a write fails, or the
    process's own connection was replaced, the next ``check`` writes the whole list.
    """

    def __init__(self, database: Database, clock, node: str):
        super().__init__(clock, node)
        self.database = database
        self.threads = Workers(clock, 1, "popserv-sessions")
        self._presence = _Presence(database.conninfo, database.timeout)
        self._backend = None
        #: Whether the table holds this process's list (no write failed since).
        self._synced = False
        self._rewriting = False

    def opened(self, user: str, peer: str) -> int:
        key = super().opened(user, peer)
        if self._writing():
            since = self._open[key][2]
            self._write(
                "INSERT INTO popserv_sessions "
                "(node, pid, key, name, peer, since, backend, backend_start) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (self.node, os.getpid(), str(key), user, peer, since, *self._backend),
            )
        return key

    def closed(self, key: int) -> None:
        if key not in self._open:
            return
        super().closed(key)
        if self._writing():
            self._write(
                "DELETE FROM popserv_sessions WHERE node = %s AND pid = %s AND key = %s",
                (self.node, os.getpid(), str(key)),
            )

    def _writing(self) -> bool:
        """Whether to write a change now; if not, the next ``check`` writes them all."""
        if self._synced and not self._rewriting and self.database.available:
            return True
        self._synced = False
        return False

    def _write(self, sql: str, params: tuple) -> None:
        d = self.database.run(_rowcount, sql, params)
        d.addErrback(self._write_failed)

    def _write_failed(self, failure: Failure) -> None:
        self._synced = False
        if not failure.check(DatabaseUnavailable):
            log.failure("popserv.sessions_error", failure)

    def start(self) -> None:
        self.threads.start()

    def check(self) -> defer.Deferred:
        """Keep the process's connection, and write the whole list if it is not there."""
        d = self.threads.run(self._presence.backend)
        d.addCallback(self._checked)
        d.addErrback(self._check_failed)
        return d

    def _checked(self, backend):
        if backend == self._backend and self._synced:
            return None
        self._backend = backend
        self._rewriting = True
        self._synced = True
        rows = [(str(key), *entry) for key, entry in self._open.items()]
        d = self.threads.run(self._presence.rewrite, self.node, os.getpid(), backend, rows)

        def done(result):
            self._rewriting = False
            return result

        return d.addBoth(done)

    def _check_failed(self, failure: Failure) -> None:
        # Written again at the next check that reaches the database.
        self._synced = False
        if not failure.check(DatabaseUnavailable):
            log.failure("popserv.sessions_error", failure)

    def stop(self) -> defer.Deferred:
        """Remove this process's rows (if the database answers) and close its connection."""

        def leave():
            try:
                if self._presence.connection is not None:
                    self._presence.connection.execute(
                        "DELETE FROM popserv_sessions WHERE node = %s AND pid = %s",
                        (self.node, os.getpid()),
                    )
            except Exception:
                pass  # the backend's end hides the rows all the same
            finally:
                self._presence.close()

        d = self.threads.run(leave)
        d.addBoth(lambda _: self.threads.stop())
        return d


class ClusterState(Service):
    """The throttle and session list a node shares, and their upkeep while it runs.

    At start: the rows of this node's dead processes go; then every
    ``PRUNE_INTERVAL`` seconds what no longer counts, and every
    ``SESSION_CHECK_INTERVAL`` the session list's connection is checked.
    """

    name = "cluster-state"

    def __init__(self, database: Database, clock, node: str, settings: ThrottleSettings):
        self.database = database
        self.clock = clock
        self.node = node
        self.throttle = PostgresLoginThrottle(database, clock, settings, node=node)
        self.sessions = PostgresSessionRegistry(database, clock, node)
        self._loops: list[task.LoopingCall] = []

    def startService(self) -> None:
        super().startService()
        self.sessions.start()
        d = self.database.run(forget_dead_processes, self.node, process_alive)
        d.addCallback(self._forgotten)
        d.addErrback(self._upkeep_failed)
        for f, interval in (
            (self.prune, PRUNE_INTERVAL),
            (self.sessions.check, SESSION_CHECK_INTERVAL),
        ):
            loop = task.LoopingCall(f)
            loop.clock = self.clock
            loop.start(interval, now=True)
            self._loops.append(loop)

    def _forgotten(self, pids: list[int]) -> None:
        if pids:
            log.info(
                "popserv.cluster_state: forgot the attempts and sessions of ended "
                "processes {pids} of node {node}",
                pids=" ".join(map(str, pids)),
                node=self.node,
            )

    def prune(self) -> defer.Deferred:
        throttle = self.throttle
        d = self.database.run(
            prune,
            self.clock.seconds(),
            throttle.memory,
            throttle.settings.login_delay,
            throttle.lifetime,
        )
        return d.addErrback(self._upkeep_failed)

    def _upkeep_failed(self, failure: Failure) -> None:
        if not failure.check(DatabaseUnavailable):
            log.failure("popserv.cluster_state_error", failure)

    def stopService(self):
        super().stopService()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        return self.sessions.stop()


def read_cluster_sessions(conninfo: str) -> list[OpenSession]:
    """``cluster_sessions`` of the database at ``conninfo``, for ``popserv who`` (blocking)."""
    from popserv.pgdb import open_database

    database = open_database(conninfo, timeout=CONNECT_TIMEOUT)
    try:
        return database.call(cluster_sessions)
    finally:
        database.stop()
