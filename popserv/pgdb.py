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

import contextlib
from collections.abc import Callable, Iterator

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from popserv.interfaces import SharedStateUnavailable
from popserv.workers import Workers

log = Logger()

#: Seconds a call waits for a connection before it fails with ``DatabaseUnavailable``.
CONNECT_TIMEOUT = 2.0
#: Seconds between the probes that tell whether the server answers (``Database.available``).
PROBE_INTERVAL = 1.0
#: Connections (and threads) per process for ordinary queries.
POOL_SIZE = 4
#: The advisory lock key (in the first key space) that serializes schema upgrades.
_SCHEMA_LOCK = 0x706F70  # "pop"


def _login_admission(name: str, returns: str, result: str) -> str:
    """A throttle's ``begin`` as a function: the address's recent failures and attempts
    under way, counted while its row is locked, then this attempt recorded; it returns
    ``result`` of the two (migration 4 their sum, migration 5 both)."""
    return (
        f"CREATE FUNCTION {name}(p_peer text, p_node text, p_pid integer,"
        " p_now double precision, p_memory double precision, p_lifetime double precision)"
        f" RETURNS {returns} LANGUAGE plpgsql AS $$"
        " DECLARE failures integer; attempts integer;"
        " BEGIN"
        "  SELECT CASE WHEN p_now - last <= p_memory THEN total ELSE 0 END INTO failures"
        "   FROM popserv_login_peers WHERE peer = p_peer FOR UPDATE;"
        "  SELECT coalesce(sum(count), 0) INTO attempts FROM popserv_login_attempts"
        "   WHERE peer = p_peer AND p_now - at <= p_lifetime;"
        "  INSERT INTO popserv_login_attempts AS a (peer, node, pid, count, at)"
        "   VALUES (p_peer, p_node, p_pid, 1, p_now) ON CONFLICT (peer, node, pid) DO UPDATE"
        "   SET count = CASE WHEN p_now - a.at <= p_lifetime THEN a.count + 1 ELSE 1 END,"
        "   at = p_now;"
        f"  RETURN {result};"
        " END $$"
    )


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
    (
        4,
        (
            # Login throttle (popserv.pgstate): when an attempt began, so that a row of a
            # process that died counts no longer than ``ATTEMPT_LIFETIME``.
            "ALTER TABLE popserv_login_attempts ADD COLUMN at double precision NOT NULL DEFAULT 0",
            # With the backend's start, a reused backend pid does not bring a row back.
            "ALTER TABLE popserv_sessions ADD COLUMN backend_start timestamptz",
            # popserv.pgstate's throttle calls, one round trip each.  Every one that
            # writes locks the address's popserv_login_peers row first (when it exists),
            # so calls for one address take their turns and never deadlock.
            _login_admission("popserv_login_begin", "integer", "coalesce(failures, 0) + attempts"),
            "CREATE FUNCTION popserv_login_end(p_peer text, p_node text, p_pid integer)"
            " RETURNS void LANGUAGE sql AS $$"
            " UPDATE popserv_login_attempts SET count = count - 1"
            "  WHERE peer = p_peer AND node = p_node AND pid = p_pid AND count > 0 $$",
            "CREATE FUNCTION popserv_login_succeeded(p_peer text, p_name text, p_node text,"
            " p_pid integer) RETURNS void LANGUAGE plpgsql AS $$"
            " DECLARE forgiven integer;"
            " BEGIN"
            "  PERFORM 1 FROM popserv_login_peers WHERE peer = p_peer FOR UPDATE;"
            "  PERFORM popserv_login_end(p_peer, p_node, p_pid);"
            "  DELETE FROM popserv_login_failures WHERE peer = p_peer AND name = p_name"
            "   RETURNING count INTO forgiven;"
            "  IF forgiven IS NOT NULL THEN"
            "   UPDATE popserv_login_peers SET total = total - forgiven WHERE peer = p_peer;"
            "  END IF;"
            " END $$",
            "CREATE FUNCTION popserv_login_failed(p_peer text, p_name text, p_node text,"
            " p_pid integer, p_now double precision, p_memory double precision,"
            " p_max_names integer, p_other_name text) RETURNS integer LANGUAGE plpgsql AS $$"
            " DECLARE previous double precision; known integer; names integer;"
            "  key text := p_name; reached integer;"
            " BEGIN"
            "  SELECT last INTO previous FROM popserv_login_peers WHERE peer = p_peer FOR UPDATE;"
            "  PERFORM popserv_login_end(p_peer, p_node, p_pid);"
            "  IF previous IS NOT NULL AND p_now - previous > p_memory THEN"
            "   DELETE FROM popserv_login_failures WHERE peer = p_peer;"
            "   DELETE FROM popserv_login_peers WHERE peer = p_peer;"
            "  END IF;"
            "  SELECT count(*) FILTER (WHERE name = p_name), count(*) INTO known, names"
            "   FROM popserv_login_failures WHERE peer = p_peer;"
            "  IF known = 0 AND names >= p_max_names THEN key := p_other_name; END IF;"
            "  INSERT INTO popserv_login_failures AS f (peer, name, count) VALUES (p_peer, key, 1)"
            "   ON CONFLICT (peer, name) DO UPDATE SET count = f.count + 1;"
            "  INSERT INTO popserv_login_peers AS p (peer, total, last) VALUES (p_peer, 1, p_now)"
            "   ON CONFLICT (peer) DO UPDATE SET total = p.total + 1, last = p_now"
            "   RETURNING p.total INTO reached;"
            "  RETURN reached;"
            " END $$",
        ),
    ),
    (
        5,
        (
            # popserv_login_begin's two counts apart, {failures, attempts under way}: a
            # burst of logins from one address is refused for now, not counted as failed.
            _login_admission(
                "popserv_login_admit", "integer[]", "ARRAY[coalesce(failures, 0), attempts]"
            ),
            "DROP FUNCTION popserv_login_begin(text, text, integer, double precision,"
            " double precision, double precision)",
        ),
    ),
]


class DatabaseUnavailable(SharedStateUnavailable):
    """The shared database could not be reached, or failed a query: try again later."""


class Database:
    """The shared PostgreSQL: ``run(f, *args)`` calls ``f(connection, *args)`` off the reactor.

    Connections are in autocommit mode; ``f`` opens ``connection.transaction()`` when it
    needs one.  ``start`` opens the pool without waiting for the server, ``stop`` closes it.
    Without a ``reactor`` (a command-line tool) it serves the blocking ``call`` only.
    """

    def __init__(
        self,
        conninfo: str,
        reactor=None,
        *,
        size: int = POOL_SIZE,
        timeout: float = CONNECT_TIMEOUT,
        name: str = "popserv",
    ):
        from psycopg_pool import ConnectionPool

        self.conninfo = conninfo
        self.timeout = timeout
        self.threads = None if reactor is None else Workers(reactor, size, "popserv-db")
        self._connect_options = {
            "autocommit": True,
            "connect_timeout": max(1, int(timeout)),
            "application_name": name,
        }
        self.pool = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=size,
            open=False,
            timeout=timeout,
            # Short: past it the pool drops the attempt and the next call starts a new one,
            # so a database back after a long outage is used at once, not after a backoff.
            reconnect_timeout=max(timeout, 5.0),
            kwargs=self._connect_options,
            name=name,
        )
        self._open = False
        #: Whether the last call reached the server; ``DatabaseService`` probes it each
        #: ``PROBE_INTERVAL`` seconds, so it turns back to True soon after an outage.
        self.available = True

    def start(self) -> None:
        """Open the pool; connections come as the server answers."""
        if not self._open:
            self._threads().start()
            self.pool.open(wait=False)
            self._open = True

    def _threads(self) -> Workers:
        if self.threads is None:
            raise RuntimeError("a Database made without a reactor serves blocking calls only")
        return self.threads

    def stop(self) -> None:
        """Close the pool and end the threads; safe to call twice."""
        if self.threads is not None:
            self.threads.stop()
        if self._open:
            self._open = False
            self.pool.close(timeout=self.timeout)

    @contextlib.contextmanager
    def connection(self) -> Iterator:
        """A connection for one block: the pool's once started, else one of its own.

        Before ``start`` (a server being built, before twistd forks into the background,
        or a command-line tool) no pool and no thread exists, so none is lost in the
        fork; the block's connection is opened for it and closed after.
        """
        import psycopg

        if self._open:
            with self.pool.connection() as connection:
                yield connection
        else:
            with psycopg.connect(self.conninfo, **self._connect_options) as connection:
                yield connection

    def call(self, f: Callable, *args):
        """``f(connection, *args)`` here, blocking: for threads and command-line tools."""
        import psycopg
        from psycopg_pool import PoolTimeout

        # No check before each use (a round trip, doubling a short query's time): a
        # connection the server dropped fails its first statement, the pool discards
        # it, and the call runs once more on another.
        for attempt in (1, 2):
            connection = None
            try:
                with self.connection() as connection:
                    return f(connection, *args)
            except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as e:
                if attempt == 1 and connection is not None and connection.broken:
                    continue
                raise DatabaseUnavailable(str(e).strip() or type(e).__name__) from e

    def run(self, f: Callable, *args) -> defer.Deferred:
        """``f(connection, *args)`` in a database thread; fails with ``DatabaseUnavailable``."""
        d = self._threads().run(self.call, f, *args)
        d.addBoth(self._note_outcome)
        return d

    def _note_outcome(self, result):
        """Keep ``available`` up to date, logging each change once."""
        failed = isinstance(result, Failure)
        if failed and not result.check(DatabaseUnavailable):
            return result
        if self.available == failed:
            self.available = not failed
            if failed:
                log.error("popserv.database_unavailable: {error}", error=str(result.value))
            else:
                log.info("popserv.database_available: the shared database answers again")
        return result

    def probe(self) -> defer.Deferred:
        """One cheap query, for ``available``'s sake; never fails."""
        return self.run(fetch_all, "SELECT 1").addErrback(_outage_noted)

    def query(self, sql: str, params=()) -> defer.Deferred:
        """The rows (a list of tuples) of one statement; an empty list for one without rows."""
        return self.run(fetch_all, sql, params)


class DatabaseService(Service):
    """Keeps the pool open while the server runs; closes it when the server stops."""

    name = "database"

    def __init__(self, database: Database, clock=None):
        """``clock`` (the reactor) times the probes of ``Database.available``."""
        self.database = database
        self._probe = None
        if clock is not None:
            from twisted.internet import task

            self._probe = task.LoopingCall(database.probe)
            self._probe.clock = clock

    def startService(self) -> None:
        super().startService()
        self.database.start()
        if self._probe is not None:
            self._probe.start(PROBE_INTERVAL, now=False)

    def stopService(self):
        super().stopService()
        if self._probe is not None and self._probe.running:
            self._probe.stop()
        self.database.stop()


def _outage_noted(failure: Failure) -> None:
    """An outage ``available`` has noted: nothing more to do."""
    failure.trap(DatabaseUnavailable)


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
        # Each version not yet recorded runs, in order: one that arrived late (a
        # lower number after a higher one ran) still runs once.
        applied = {row[0] for row in connection.execute("SELECT version FROM popserv_schema")}
        for version, statements in sorted(MIGRATIONS):
            if version in applied:
                continue
            for statement in statements:
                connection.execute(statement)
            connection.execute("INSERT INTO popserv_schema (version) VALUES (%s)", (version,))
            log.info("database schema upgraded to version {version}", version=version)
    return schema_version(connection)


def reach_database(conninfo: str, upgrade: bool = True) -> int:
    """Connect once to ``conninfo`` and (``upgrade``) make or upgrade the schema; the
    schema's version (blocking).  ``popserv check`` only reads it: it changes nothing.

    What ``twistd popserv`` and ``popserv check`` ask before anything else starts:
    raises ``ConfigError`` when psycopg is not installed, ``DatabaseUnavailable`` when
    the server cannot be reached or refuses (libpq's reason, which names no password).
    """
    from popserv.config import ConfigError

    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        raise ConfigError(
            "[cluster] database needs psycopg 3 and its pool: pip install 'popserv[cluster]'"
        ) from None
    return Database(conninfo).call(ensure_schema if upgrade else schema_version)


def open_database(conninfo: str, reactor=None, **kw) -> Database:
    """A ``Database`` for ``conninfo``, its schema made or upgraded (blocking).

    Used at start and by the command-line tools; a server that cannot reach the database
    at start fails with ``DatabaseUnavailable``, as one whose users file is unreadable.
    Its pool opens with ``start`` (``DatabaseService``, once the server runs), which
    needs the ``reactor``; the command-line tools, giving none, make blocking calls only.
    """
    database = Database(conninfo, reactor, **kw)
    database.call(ensure_schema)
    return database
