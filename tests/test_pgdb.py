"""The shared database's plumbing, against a real PostgreSQL: schema, queries, outages."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from popserv.pgdb import MIGRATIONS, Database, DatabaseUnavailable, ensure_schema, open_database
from tests.live_pg import shared_server
from tests.live_smtp import free_port


class SchemaTests(TestCase):
    """popserv makes its own tables, once, whoever starts first."""

    def setUp(self):
        self.server = shared_server()
        self.url = self.server.new_database()

    def test_made_then_left_alone(self):
        """A new database gets every table; a second start changes nothing."""
        database = open_database(self.url, reactor)
        self.addCleanup(database.stop)
        latest = MIGRATIONS[-1][0]
        self.assertEqual(database.call(ensure_schema), latest)
        tables = self.server.psql(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE 'popserv_%' ORDER BY 1",
            self.url.rsplit("/", 1)[1],
        ).split()
        self.assertIn("popserv_users", tables)
        self.assertIn("popserv_sessions", tables)
        name = self.url.rsplit("/", 1)[1]
        versions = self.server.psql("SELECT version FROM popserv_schema", name)
        self.assertEqual(versions.split(), [str(v) for v, _ in MIGRATIONS])

    @defer.inlineCallbacks
    def test_query_runs_off_the_reactor(self):
        """``query`` answers through a Deferred, from a database thread."""
        database = open_database(self.url, reactor)
        self.addCleanup(database.stop)
        rows = yield database.query("SELECT %s::int + 1, pg_backend_pid() > 0", (41,))
        self.assertEqual(rows, [(42, True)])


class OutageTests(TestCase):
    """No server: calls fail with DatabaseUnavailable within the timeout, not hang."""

    @defer.inlineCallbacks
    def test_unreachable(self):
        database = Database(f"postgresql://nobody@127.0.0.1:{free_port()}/none", reactor, timeout=1)
        database.start()
        self.addCleanup(database.stop)
        yield self.assertFailure(database.query("SELECT 1"), DatabaseUnavailable)
