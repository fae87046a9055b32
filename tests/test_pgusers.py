"""Users in a real PostgreSQL: popserv.pgusers serves popserv_users and follows its changes."""

from __future__ import annotations

import time

import argon2
from twisted.internet import defer, reactor, task
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from popserv import auth, pgusers
from popserv.credcache import VerifiedPasswords
from popserv.interfaces import IUserDB, UserDBUnavailable
from popserv.pgdb import open_database
from popserv.testing import run_at_once
from tests.live_pg import shared_server

CHEAP = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)

#: How soon every node must see a change (issue 16).
WITHIN = 1.0


@defer.inlineCallbacks
def eventually(predicate, within: float):
    """Fire the seconds it took until ``predicate()`` held; fail if it still does not after
    ``within`` seconds."""
    start = time.monotonic()
    while True:
        value = predicate()
        if value:
            return time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"not within {within} s")
        yield task.deferLater(reactor, 0.02, lambda: None)


def sql_text(text: str | None) -> str:
    return "NULL" if text is None else "'" + text.replace("'", "''") + "'"


class TableMixin:
    """A fresh database with popserv's schema, and SQL run as an admin would run it."""

    def setUp(self):
        self.patch(auth, "HASHER", CHEAP)
        self.server = shared_server()
        self.url = self.server.new_database()
        self.name = self.url.rsplit("/", 1)[1]
        self.database = open_database(self.url, reactor)
        self.addCleanup(self.database.stop)

    def psql(self, sql: str) -> str:
        return self.server.psql(sql, self.name)

    def insert(self, user: str, password: str, rest: str | None = None) -> None:
        self.psql(
            "INSERT INTO popserv_users (name, password, rest) VALUES"
            f" ({sql_text(user)}, {sql_text(password)}, {sql_text(rest)})"
        )

    def userdb(self, cache=None) -> pgusers.DatabaseUsers:
        db = pgusers.DatabaseUsers(self.database, reactor, run_at_once, cache=cache)
        db.load()
        return db

    def follow(self, db: pgusers.DatabaseUsers, retry: float = pgusers.RETRY):
        """Start following the table's changes, until the test ends."""
        changes = db.changes()
        changes.retry = retry
        changes.start()
        self.addCleanup(changes.stop)
        return changes

    def check(self, db, user: str, password: bytes) -> bool:
        return self.successResultOf(db.check(user, password))


class LookupTests(TableMixin, TestCase):
    """The table's rows answer as the users file's lines do."""

    def test_interface(self):
        """DatabaseUsers provides IUserDB."""
        verifyObject(IUserDB, self.userdb())

    def test_answers_as_the_users_file(self):
        """The same entries give the same answers from a table and from a users file."""
        entries = [
            auth.Entry("alice", auth.hash_password("wonderland"), ":::::userdb_quota_rule=*:1G"),
            auth.Entry("bob", "{PLAIN}builder"),
            auth.Entry("carol", auth.hash_password("c4rol", "CRAM-MD5"), ""),
            auth.Entry("dave@example.org", auth.hash_password("d", "SCRAM-SHA-256")),
        ]
        for entry in entries:
            self.insert(entry.user, entry.password, entry.rest)
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(entry.format() + "\n" for entry in entries)
        secret = b"s" * 32
        table = pgusers.DatabaseUsers(self.database, reactor, run_at_once, secret=secret)
        table.load()
        users_file = auth.PasswdFile(path, run_at_once, secret=secret)
        for user in ["alice", "bob", "carol", "dave@example.org", "nobody"]:
            for db in (table, users_file):
                self.assertEqual(db.exists(user), users_file.exists(user), user)
                self.assertEqual(db.fields(user), users_file.fields(user), user)
                self.assertEqual(db.secret(user), users_file.secret(user), user)
                self.assertEqual(db.cram_md5(user), users_file.cram_md5(user), user)
                self.assertEqual(db.scram(user), users_file.scram(user), user)
                self.assertEqual(db.mechanisms(user), users_file.mechanisms(user), user)
        self.assertEqual(table.fields("alice"), {"quota_rule": "*:1G"})
        self.assertEqual(table.field_values("quota_rule"), {"*:1G"})
        self.assertTrue(self.check(table, "alice", b"wonderland"))
        self.assertFalse(self.check(table, "alice", b"Wonderland"))
        self.assertTrue(self.check(table, "bob", b"builder"))
        self.assertFalse(self.check(table, "nobody", b"builder"))

    def test_not_loaded(self):
        """Before a first read of the table, lookups fail with UserDBUnavailable."""
        db = pgusers.DatabaseUsers(self.database, reactor, run_at_once)
        self.assertRaises(UserDBUnavailable, db.exists, "alice")
        self.failureResultOf(db.check("alice", b"pw"), UserDBUnavailable)

    def test_colliding_names_refused(self):
        """Alice and alice both fail with UserDBUnavailable, with one warning naming both."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for user in ["Alice", "alice", "bob"]:
            self.insert(user, "{PLAIN}pw")
        db = self.userdb()
        self.assertRaises(UserDBUnavailable, db.exists, "Alice")
        self.assertRaises(UserDBUnavailable, db.exists, "alice")
        self.assertTrue(db.exists("bob"))
        db.load()
        warnings = [e for e in events if e.get("log_namespace", "").startswith("popserv.")]
        warnings = [e for e in warnings if "refusing both" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertEqual({warnings[0]["user"], warnings[0]["other"]}, {"Alice", "alice"})


class FollowTests(TableMixin, TestCase):
    """Changes made to the table, by any means, reach a following copy within a second."""

    @defer.inlineCallbacks
    def test_insert_update_delete_by_hand(self):
        """Plain SQL INSERT, UPDATE and DELETE are seen within a second (the trigger)."""
        db = self.userdb()
        self.follow(db)
        yield task.deferLater(reactor, 0.2, lambda: None)  # the thread is listening
        self.insert("erin", "{PLAIN}first")
        yield eventually(lambda: db.exists("erin"), WITHIN)
        self.psql("UPDATE popserv_users SET password = '{PLAIN}second' WHERE name = 'erin'")
        yield eventually(lambda: db.secret("erin") == b"second", WITHIN)
        self.psql("DELETE FROM popserv_users WHERE name = 'erin'")
        yield eventually(lambda: not db.exists("erin"), WITHIN)

    @defer.inlineCallbacks
    def test_changed_hash_refuses_the_old_password(self):
        """A password remembered by the credcache is refused once the stored hash changes."""
        self.insert("alice", auth.hash_password("old"))
        db = self.userdb(cache=VerifiedPasswords(reactor))
        self.follow(db)
        self.assertTrue(self.check(db, "alice", b"old"))
        self.assertTrue(self.check(db, "alice", b"old"))  # now from the cache
        yield task.deferLater(reactor, 0.2, lambda: None)
        new = auth.hash_password("new").replace("'", "''")
        self.psql(f"UPDATE popserv_users SET password = '{new}' WHERE name = 'alice'")
        yield eventually(lambda: not self.check(db, "alice", b"old"), WITHIN)
        self.assertTrue(self.check(db, "alice", b"new"))

    @defer.inlineCallbacks
    def test_truncate(self):
        """TRUNCATE empties every copy."""
        self.insert("alice", "{PLAIN}a")
        db = self.userdb()
        self.follow(db)
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.psql("TRUNCATE popserv_users")
        yield eventually(lambda: not db.exists("alice"), WITHIN)

    @defer.inlineCallbacks
    def test_import_of_many(self):
        """More rows than one batch, changed at once, are all seen."""
        db = self.userdb()
        self.follow(db)
        yield task.deferLater(reactor, 0.2, lambda: None)
        entries = [auth.Entry(f"user{n}", f"{{PLAIN}}pw{n}") for n in range(pgusers.BATCH + 5)]
        counts = self.database.call(pgusers.import_entries, entries)
        self.assertEqual(counts, (len(entries), 0, 0))
        yield eventually(lambda: all(db.exists(e.user) for e in entries), WITHIN)

    @defer.inlineCallbacks
    def test_reconnect_reloads(self):
        """After the server stops and starts again, the copy is read whole once more.

        The last copy serves while the server is down; a row written with triggers off
        (no notification at all) shows that the reconnection reads everything again.
        """
        self.insert("alice", "{PLAIN}a")
        db = self.userdb()
        self.follow(db, retry=0.2)
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.psql(
            "SET session_replication_role = replica;"
            " INSERT INTO popserv_users (name, password) VALUES ('silent', '{PLAIN}s')"
        )
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(db.exists("silent"))  # no notification was sent
        self.server.stop("fast")
        try:
            yield task.deferLater(reactor, 0.5, lambda: None)
            self.assertTrue(db.exists("alice"))  # the last copy, while the server is down
        finally:
            self.server.start()
        yield eventually(lambda: db.exists("silent"), 5.0)
        # And it follows notifications again.
        self.insert("bob", "{PLAIN}b")
        yield eventually(lambda: db.exists("bob"), WITHIN)

    @defer.inlineCallbacks
    def test_service_stops_the_thread(self):
        """The service's stop fires once the listening thread has ended."""
        db = self.userdb()
        service = db.service()
        service.startService()
        yield task.deferLater(reactor, 0.1, lambda: None)
        thread = service.changes._thread
        self.assertTrue(thread.is_alive())
        yield service.stopService()
        thread.join(1)
        self.assertFalse(thread.is_alive())
