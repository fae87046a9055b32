"""The PostgreSQL database nodes share: a pool of connections used off the reactor, and the schema.

``[cluster] database`` names it (a libpq URI, ``postgresql://user:pass@host/db``).
Queries run in a set of threads of their own (``popserv.workers.Workers``), one
connection each from psycopg's pool, so the reactor never waits for the network.
When the server cannot be reached, calls fail with ``DatabaseUnavailable`` (after at
most ``timeout`` seconds) and the pool keeps trying to reconnect in the background, so
service resumes by itself once the database is back.

popserv makes and upgrades its own tables (``ensure_schema``): each entry of
``MIGRATIONS`` runs once, in order, under an advisory lock so that nodes starting
together do not race, and ``popserv_schema`` records the version reached.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from popserv.workers import Workers

log = Logger()

#: Seconds a call waits for a connection before it fails with ``DatabaseUnavailable``.
CONNECT_TIMEOUT = 2.0
#: Connections (and threads) per process for ordinary queries.
POOL_SIZE = 4
#: The advisory lock key (in the first key space) that serializes schema upgrades.
_SCHEMA_LOCK = 0x706F70  # "pop"

#: (version, statements): each upgrade runs once, in order, in one transaction.
MIGRATIONS: list[tuple[int, tuple[str, ...]]] = [
    (
        1,
        (
            # The passwd-file's entries: the {SCHEME} string and the fields after it, verbatim.
            "CREATE TABLE popserv_users ("
            " name text PRIMARY KEY, password text NOT NULL, rest text,"
            " changed timestamptz NOT NULL DEFAULT now())",
            # Failed logins per client address (lockout and the failure delay).
            "CREATE TABLE popserv_login_peers ("
            " peer text PRIMARY KEY, total integer NOT NULL, last double precision NOT NULL)",
            "CREATE INDEX popserv_login_peers_last ON popserv_login_peers (last)",
            "CREATE TABLE popserv_login_failures ("
            " peer text NOT NULL, name text NOT NULL, count integer NOT NULL,"
            " PRIMARY KEY (peer, name))",
            # Attempts being verified, per process (node and pid).
            "CREATE TABLE popserv_login_attempts ("
            " peer text NOT NULL, node text NOT NULL, pid integer NOT NULL,"
            " count integer NOT NULL, PRIMARY KEY (peer, node, pid))",
            "CREATE TABLE popserv_last_logins ("
            " name text PRIMARY KEY, at double precision NOT NULL)",
            # Logged-in POP3 sessions (popserv who); backend is the pid of the process's
            # lock connection, so rows of a node that died are known stale.
            "CREATE TABLE popserv_sessions ("
            " node text NOT NULL, pid integer NOT NULL, key text NOT NULL,"
            " name text NOT NULL, peer text NOT NULL, since double precision NOT NULL,"
            " backend integer, PRIMARY KEY (node, pid, key))",
        ),
    ),
    (
        2,
        (
            # Every change to popserv_users, by popserv's tools or by hand in SQL, tells the
            # nodes (popserv.pgusers) which name changed; an empty payload (TRUNCATE, or a
            # name too long for one) means all of them.
            "CREATE FUNCTION popserv_users_notify() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN"
            "  IF TG_OP = 'TRUNCATE' THEN"
            "   PERFORM pg_notify('popserv_users', ''); RETURN NULL;"
            "  END IF;"
            "  IF TG_OP <> 'INSERT' THEN"
            "   PERFORM pg_notify('popserv_users',"
            "    CASE WHEN octet_length(OLD.name) < 4000 THEN OLD.name ELSE '' END);"
            "  END IF;"
            "  IF TG_OP <> 'DELETE' THEN"
            "   PERFORM pg_notify('popserv_users',"
            "    CASE WHEN octet_length(NEW.name) < 4000 THEN NEW.name ELSE '' END);"
            "  END IF;"
            "  RETURN NULL;"
            " END $$",
            "CREATE TRIGGER popserv_users_notify AFTER INSERT OR UPDATE OR DELETE"
            " ON popserv_users FOR EACH ROW EXECUTE FUNCTION popserv_users_notify()",
            "CREATE TRIGGER popserv_users_truncate AFTER TRUNCATE"
            " ON popserv_users FOR EACH STATEMENT EXECUTE FUNCTION popserv_users_notify()",
        ),
    ),
]


class DatabaseUnavailable(Exception):
    """The shared database could not be reached, or failed a query: try again later."""


class Database:
    """The shared PostgreSQL: ``run(f, *args)`` calls ``f(connection, *args)`` off the reactor.

    Connections are in autocommit mode; ``f`` opens ``connection.transaction()`` when it
    needs one.  ``start`` opens the pool without waiting for the server, ``stop`` closes it.
    """

    def __init__(
        self,
        conninfo: str,
        reactor,
        *,
        size: int = POOL_SIZE,
        timeout: float = CONNECT_TIMEOUT,
        name: str = "popserv",
    ):
        from psycopg_pool import ConnectionPool

        self.conninfo = conninfo
        self.timeout = timeout
        self.threads = Workers(reactor, size, "popserv-db")
        self.pool = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=size,
            open=False,
            timeout=timeout,
            # Short: past it the pool drops the attempt and the next call starts a new one,
            # so a database back after a long outage is used at once, not after a backoff.
            reconnect_timeout=max(timeout, 5.0),
            kwargs={
                "autocommit": True,
                "connect_timeout": max(1, int(timeout)),
                "application_name": name,
            },
            name=name,
        )
        self._open = False

    def start(self) -> None:
        """Open the pool; connections come as the server answers."""
        if not self._open:
            self.threads.start()
            self.pool.open(wait=False)
            self._open = True

    def stop(self) -> None:
        """Close the pool and end the threads; safe to call twice."""
        if self._open:
            self._open = False
            self.threads.stop()
            self.pool.close(timeout=self.timeout)

    def call(self, f: Callable, *args):
        """``f(connection, *args)`` here, blocking: for threads and command-line tools."""
        import psycopg
        from psycopg_pool import PoolTimeout

        if not self._open:
            self.start()
        # No check before each use (a round trip, doubling a short query's time): a
        # connection the server dropped fails its first statement, the pool discards
        # it, and the call runs once more on another.
        for attempt in (1, 2):
            connection = None
            try:
                with self.pool.connection() as connection:
                    return f(connection, *args)
            except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as e:
                if attempt == 1 and connection is not None and connection.broken:
                    continue
                raise DatabaseUnavailable(str(e).strip() or type(e).__name__) from e

    def run(self, f: Callable, *args) -> defer.Deferred:
        """``f(connection, *args)`` in a database thread; fails with ``DatabaseUnavailable``."""
        return self.threads.run(self.call, f, *args)

    def query(self, sql: str, params=()) -> defer.Deferred:
        """The rows (a list of tuples) of one statement; an empty list for one without rows."""
        return self.run(fetch_all, sql, params)


class DatabaseService(Service):
    """Keeps the pool open while the server runs; closes it when the server stops."""

    name = "database"

    def __init__(self, database: Database):
        self.database = database

    def startService(self) -> None:
        super().startService()
        self.database.start()

    def stopService(self):
        super().stopService()
        self.database.stop()


def fetch_all(connection, sql: str, params=()) -> list[tuple]:
    """The rows of one statement on ``connection`` (none for a statement returning none)."""
    cursor = connection.execute(sql, params)
    return cursor.fetchall() if cursor.description is not None else []


def schema_version(connection) -> int:
    """The version ``ensure_schema`` last reached, 0 for an empty database."""
    exists = connection.execute("SELECT to_regclass('popserv_schema')").fetchone()[0]
    if exists is None:
        return 0
    row = connection.execute("SELECT max(version) FROM popserv_schema").fetchone()
    return row[0] or 0


def ensure_schema(connection) -> int:
    """Make or upgrade popserv's tables on ``connection``; returns the version reached."""
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        connection.execute(
            "CREATE TABLE IF NOT EXISTS popserv_schema ("
            " version integer PRIMARY KEY, applied timestamptz NOT NULL DEFAULT now())"
        )
        current = schema_version(connection)
        for version, statements in MIGRATIONS:
            if version <= current:
                continue
            for statement in statements:
                connection.execute(statement)
            connection.execute("INSERT INTO popserv_schema (version) VALUES (%s)", (version,))
            log.info("database schema upgraded to version {version}", version=version)
            current = version
    return current


def open_database(conninfo: str, reactor=None, **kw) -> Database:
    """A started ``Database`` for ``conninfo``, its schema made or upgraded (blocking).

    Used at start and by the command-line tools; a server that cannot reach the database
    at start fails with ``DatabaseUnavailable``, as one whose users file is unreadable.
    """
    if reactor is None:
        from twisted.internet import reactor
    database = Database(conninfo, reactor, **kw)
    database.start()
    try:
        database.call(ensure_schema)
    except BaseException:
        database.stop()
        raise
    return database
