"""Users in the shared PostgreSQL: ``popserv_users`` served as an ``IUserDB``, kept in step.

The table holds what a passwd-file line holds (``popserv.auth.Entry``): the name, the
``{SCHEME}`` password string and the fields after it, verbatim.  ``IUserDB``'s lookups
are synchronous, so each process serves from a copy of the table in memory, answered
by the same code as the users file (``popserv.auth.EntryUserDB``).  The copy follows
the table through LISTEN/NOTIFY: a trigger (schema version 2) notifies the changed
name on channel ``popserv_users`` whoever changes a row, and a thread of this module
holds a connection of its own listening there, re-reading those rows as they change.
When that connection is lost the last copy serves on; the thread reconnects, and reads
the whole table again, since notifications sent meanwhile were missed.

The admin tools edit the table through ``UsersTable``, which also notifies, in the
transaction of the change.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from popserv.auth import Entry, EntryUserDB, refuse_collisions
from popserv.interfaces import IUserDB, UserDBUnavailable
from popserv.logsafe import untrusted
from popserv.usernames import Collision

#: The channel the trigger and the admin tools notify; the payload is the changed name.
CHANNEL = "popserv_users"
#: A payload that stands for every name: read the whole table.
EVERYONE = ""
#: More changed names than this at once: read the whole table rather than each row.
BATCH = 200
#: Seconds the listening thread waits for a notification before it looks whether to stop.
POLL = 0.25
#: Seconds between attempts to reconnect the listening connection.
RETRY = 1.0
#: TCP keepalives on the listening connection, so a silent network loss is noticed in
#: about idle + interval * count seconds.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 2,
}

# Insert a user, or replace the row of one by that name.
_UPSERT = (
    "INSERT INTO popserv_users (name, password, rest) VALUES (%s, %s, %s)"
    " ON CONFLICT (name) DO UPDATE SET password = excluded.password,"
    " rest = excluded.rest, changed = now()"
)


def fetch_users(connection, names: Iterable[str] | None = None) -> dict[str, Entry]:
    """The entries of ``names`` (those that exist), or of every user, by name."""
    sql = "SELECT name, password, rest FROM popserv_users"
    if names is None:
        rows = connection.execute(sql + " ORDER BY name").fetchall()
    else:
        rows = connection.execute(sql + " WHERE name = ANY(%s)", (list(names),)).fetchall()
    return {name: Entry(name, password, rest) for name, password, rest in rows}


def notify(connection, names: Iterable[str]) -> None:
    """Tell every node that these users changed (sent when the transaction commits)."""
    for name in names:
        connection.execute("SELECT pg_notify(%s, %s)", (CHANNEL, name))


class UsersTable:
    """``popserv_users`` as the admin tool edits it, in the shape of ``auth.UsersFile``.

    The table is read whole; the edits are kept here and ``write`` applies them.
    ``locked`` holds a lock on the table for one read-modify-write, so parallel
    ``popserv adduser`` runs (on any host) wait for each other, as with the file.
    """

    path = CHANNEL  # what messages name, as a users file's path

    def __init__(self, connection, entries: dict[str, Entry]):
        self.connection = connection
        self._entries = entries
        self._changed: set[str] = set()

    @classmethod
    def read(cls, database) -> UsersTable:
        """The table as it is now (for looking, not for writing)."""
        return cls(None, database.call(fetch_users))

    @classmethod
    @contextlib.contextmanager
    def locked(cls, database) -> Iterator[UsersTable]:
        """The table, read in a transaction that holds off other writers until the block ends.

        Nothing is written unless the block calls ``write``; an exception rolls it back.
        """
        import psycopg
        from psycopg_pool import PoolTimeout

        from popserv.pgdb import DatabaseUnavailable

        try:
            with database.connection() as connection, connection.transaction():
                connection.execute("LOCK TABLE popserv_users IN SHARE ROW EXCLUSIVE MODE")
                yield cls(connection, fetch_users(connection))
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as e:
            raise DatabaseUnavailable(str(e).strip() or type(e).__name__) from e

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def users(self) -> list[str]:
        return list(self._entries)

    def get(self, user: str) -> Entry | None:
        return self._entries.get(user)

    def add(self, user: str, password: str) -> None:
        """A new user; ``password`` is the whole field, as ``hash_password`` makes it."""
        if user in self._entries:
            raise ValueError(f"user {user!r} already exists")
        self._put(Entry(user, password))

    def set_password(self, user: str, password: str) -> None:
        """Replace ``user``'s password field, keeping the other fields."""
        entry = self._entries.get(user)
        if entry is None:
            raise KeyError(user)
        self._put(Entry(user, password, entry.rest))

    def set_field(self, user: str, key: str, value: str | None) -> None:
        """Set (None: remove) ``user``'s extra field ``userdb_<key>``."""
        self._put(self._entries[user].with_field(key, value))

    def remove(self, user: str) -> None:
        if user not in self._entries:
            raise KeyError(user)
        del self._entries[user]
        self._changed.add(user)

    def _put(self, entry: Entry) -> None:
        self._entries[entry.user] = entry
        self._changed.add(entry.user)

    def write(self, owner=None) -> None:
        """Apply the edits, and notify the nodes of each changed name when they commit.

        ``owner`` (the users file's) means nothing for a table.
        """
        for user in sorted(self._changed):
            entry = self._entries.get(user)
            if entry is None:
                self.connection.execute("DELETE FROM popserv_users WHERE name = %s", (user,))
            else:
                upsert(self.connection, entry)
        notify(self.connection, sorted(self._changed))
        self._changed.clear()


def upsert(connection, entry: Entry) -> None:
    """Insert or replace ``entry``'s row."""
    connection.execute(_UPSERT, (entry.user, entry.password, entry.rest))


def import_entries(connection, entries: Iterable[Entry]) -> tuple[int, int, int]:
    """Upsert ``entries`` in one transaction: (added, updated, unchanged) counts."""
    added = updated = unchanged = 0
    with connection.transaction():
        connection.execute("LOCK TABLE popserv_users IN SHARE ROW EXCLUSIVE MODE")
        entries = list(entries)
        existing = fetch_users(connection, [entry.user for entry in entries])
        changed = []
        for entry in entries:
            old = existing.get(entry.user)
            if old == entry:
                unchanged += 1
                continue
            if old is None:
                added += 1
            else:
                updated += 1
            changed.append(entry)
        if changed:
            with connection.cursor() as cursor:
                cursor.executemany(
                    _UPSERT, [(entry.user, entry.password, entry.rest) for entry in changed]
                )
        # The trigger names each row too; past a batch, EVERYONE has each node read the
        # table whole at once rather than the names in turn.
        names = [entry.user for entry in changed]
        notify(connection, names if len(names) <= BATCH else [EVERYONE])
    return added, updated, unchanged


@implementer(IUserDB)
class DatabaseUsers(EntryUserDB):
    """``IUserDB`` over ``popserv_users``: a copy in memory, kept in step by ``UserChanges``.

    ``load`` reads the table once (blocking: at start, and for the admin tools); the
    ``service`` keeps the copy in step while the server runs.  Until a first copy is
    had, every lookup fails with ``UserDBUnavailable``.
    """

    source = CHANNEL

    def __init__(
        self,
        database,
        reactor,
        run: Callable[..., defer.Deferred] | None = None,
        secret: bytes | None = None,
        cache=None,
        name: str = "popserv users",
    ):
        """``database``: a ``popserv.pgdb.Database``; ``name`` the listening connection's
        application name; the rest as ``EntryUserDB``."""
        super().__init__(run, secret, cache)
        self.database = database
        self.reactor = reactor
        self.name = name
        self._loaded = False
        self._reported: set[frozenset[str]] = set()

    def load(self) -> None:
        """Read the whole table now, blocking; ``DatabaseUnavailable`` if it cannot."""
        self.replace(self.database.call(fetch_users))

    def replace(self, rows: dict[str, Entry]) -> None:
        """Serve ``rows`` (the whole table) from now on, its colliding names refused."""
        users = dict(rows)
        refused, collisions = refuse_collisions(users)
        self._install(users, refused, collisions)

    def _install(
        self, users: dict[str, Entry], refused: dict[str, str], collisions: list[Collision]
    ) -> None:
        """In the reactor thread: the new copy, and one warning for each new colliding pair."""
        pairs = set()
        for user, other, nested in collisions:
            pair = frozenset((user, other))
            pairs.add(pair)
            if pair not in self._reported:
                self.log.warn(  # noqa: G010 (twisted.logger has no warning())
                    "popserv_users: the Maildir of user {user} {relation} that of user"
                    " {other}; refusing both",
                    relation="lies inside" if nested else "is",
                    user=untrusted(user),
                    other=untrusted(other),
                )
        self._reported = pairs
        self._serve(users, refused)
        self._loaded = True

    def _entries(self) -> dict[str, Entry]:
        if not self._loaded:
            raise UserDBUnavailable("popserv_users: not read from the database yet")
        return self._users

    def changes(self) -> UserChanges:
        """The thread that keeps this copy in step (not started)."""
        return UserChanges(self.database.conninfo, self.reactor, self._install, name=self.name)

    def service(self) -> Service:
        """A service that keeps this copy in step with the table while it runs."""
        return UserChangesService(self.changes())


class UserChanges:
    """A thread listening on ``CHANNEL``, which hands each new state of the table to ``serve``.

    ``serve(users, refused, collisions)`` is called in the reactor thread, with what
    ``popserv.auth.refuse_collisions`` makes of the whole table: after every connect
    (the table read whole, after LISTEN, so no change falls between) and after each
    batch of notifications (only the named rows read again).
    """

    log = Logger()

    def __init__(self, conninfo: str, reactor, serve, *, name: str = "popserv users"):
        self.conninfo = conninfo
        self.reactor = reactor
        self.serve = serve
        self.name = name
        self.retry = RETRY
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._done: defer.Deferred | None = None
        self._rows: dict[str, Entry] = {}

    def start(self) -> None:
        self._stopping.clear()
        self._done = defer.Deferred()
        self._thread = threading.Thread(target=self._run, name="popserv-users", daemon=True)
        self._thread.start()

    def stop(self) -> defer.Deferred:
        """Ask the thread to end; the Deferred fires once it has (within ``POLL`` seconds)."""
        self._stopping.set()
        if self._done is None or self._done.called:
            return defer.succeed(None)
        ended: defer.Deferred = defer.Deferred()
        self._done.addCallback(lambda _: ended.callback(None))
        return ended

    def _run(self) -> None:
        import psycopg

        lost = False
        while not self._stopping.is_set():
            try:
                with psycopg.connect(
                    self.conninfo,
                    autocommit=True,
                    connect_timeout=max(1, int(self.retry) + 1),
                    application_name=self.name,
                    **KEEPALIVES,
                ) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    self._rows = fetch_users(connection)
                    self._hand()
                    self._tell(self._connected, lost, len(self._rows))
                    lost = False
                    self._follow(connection)
            except Exception as e:  # noqa: BLE001 (whatever it was, try again later)
                if not lost:
                    lost = True
                    self._tell(self._lost, str(e).strip() or type(e).__name__)
                self._stopping.wait(self.retry)
        self.reactor.callFromThread(self._finished)

    def _follow(self, connection) -> None:
        """Read again the rows notifications name, until asked to stop."""
        while not self._stopping.is_set():
            names = {note.payload for note in connection.notifies(timeout=POLL, stop_after=1)}
            if not names:
                continue
            # What else has come meanwhile comes in the same batch.
            names |= {note.payload for note in connection.notifies(timeout=0.01)}
            if EVERYONE in names or len(names) > BATCH:
                self._rows = fetch_users(connection)
            else:
                fresh = fetch_users(connection, names)
                for user in names:
                    if user in fresh:
                        self._rows[user] = fresh[user]
                    else:
                        self._rows.pop(user, None)
            self._hand()

    def _hand(self) -> None:
        users = dict(self._rows)
        refused, collisions = refuse_collisions(users)
        self.reactor.callFromThread(self.serve, users, refused, collisions)

    def _tell(self, f, *args) -> None:
        self.reactor.callFromThread(f, *args)

    def _connected(self, again: bool, count: int) -> None:
        if again:
            self.log.info("popserv_users: listening again; read {count} users", count=count)
        else:
            self.log.info("popserv_users: following changes; {count} users", count=count)

    def _lost(self, error: str) -> None:
        self.log.error(
            "popserv_users: cannot follow changes ({error}); serving the last copy"
            " and reconnecting",
            error=error,
        )

    def _finished(self) -> None:
        if self._done is not None and not self._done.called:
            self._done.callback(None)


class UserChangesService(Service):
    """Runs a ``UserChanges`` thread while the server runs."""

    name = "user-changes"

    def __init__(self, changes: UserChanges):
        self.changes = changes

    def startService(self) -> None:
        super().startService()
        self.changes.start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self.changes.stop()
