"""The shared database's plumbing, against a real PostgreSQL: schema, queries, outages."""

from __future__ import annotations

import os

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


class DaemonTests(TestCase):
    """twistd forks into the background after building the server: the pool must start
    after the fork, or its threads stay behind in the parent that exits."""

    def test_daemonized_node_serves(self):
        import poplib
        import subprocess
        import sys
        import time

        from tests.live_cluster import LiveCluster
        from tests.live_twistd import REPO, TWISTD

        cluster = LiveCluster(self, {"alice": "wonderland"}, count=1)
        node = cluster.nodes[0]
        pidfile = os.path.join(node.root, "twistd.pid")
        started = subprocess.run(
            [sys.executable, "-c", TWISTD, f"--pidfile={pidfile}", f"--logfile={node.log_path}"]
            + ["popserv", "--config", node.config_path],
            cwd=REPO,
            timeout=60,
        )
        self.assertEqual(started.returncode, 0)
        self.addCleanup(_kill_pidfile, pidfile)
        deadline = time.monotonic() + 20
        while True:
            try:
                client = poplib.POP3("127.0.0.1", node.pop3_port, timeout=10)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(node.log()) from None
                time.sleep(0.1)
        client.user("alice")
        self.assertTrue(client.pass_("wonderland").startswith(b"+OK"))
        # The open-session list is written in the background, after the fork too.
        _wait_for(lambda: cluster.psql("SELECT count(*) FROM popserv_sessions").strip() == "1")
        client.quit()
        _wait_for(lambda: cluster.psql("SELECT count(*) FROM popserv_sessions").strip() == "0")


def _wait_for(condition, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def _kill_pidfile(path: str) -> None:
    import signal
    import time

    try:
        with open(path) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        return
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


class StartChecksTests(TestCase):
    """A database out of reach stops ``twistd popserv`` with one line, and ``popserv check``
    names it; a reachable one passes both."""

    def _config(self, url: str) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        config = os.path.join(path, "popserv.ini")
        with open(config, "w") as f:
            f.write(
                f"[server]\nmailroot = {path}/mail\nusers = {path}/users\n"
                f"state_dir = {path}/state\nworkers = 1\n"
                f"[pop3]\nlisten = tcp:{free_port()}:interface=127.0.0.1\n"
                f"[pop3s]\nlisten =\n[smtp]\nlisten =\n[tls]\nself_signed_dir = {path}/tls\n"
                f"[cluster]\ndatabase = {url}\n"
            )
        return config

    def _program(self, *argv: str):
        import subprocess
        import sys

        from tests.live_twistd import REPO

        return subprocess.run(
            [sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=60
        )

    def test_unreachable_database(self):
        from tests.live_twistd import TWISTD

        config = self._config(f"postgresql://popserv:s3cret@127.0.0.1:{free_port()}/popserv")
        started = self._program("-c", TWISTD, "-n", "--pidfile=", "popserv", "--config", config)
        self.assertEqual(started.returncode, 1)
        lines = started.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, started.stderr)
        self.assertRegex(lines[0], r"^popserv: \[cluster\] database: connection failed: ")
        self.assertNotIn("s3cret", started.stderr)
        checked = self._program("-m", "popserv", "check", "--config", config)
        self.assertEqual(checked.returncode, 1)
        self.assertIn("popserv: [cluster] database: connection failed: ", checked.stderr)

    def test_reachable_database(self):
        url = shared_server().new_database()
        checked = self._program("-m", "popserv", "check", "--config", self._config(url))
        self.assertEqual(checked.returncode, 0, checked.stderr)
        # check reads, it writes nothing: the database is still empty.
        name = url.rsplit("/", 1)[1]
        self.assertEqual(shared_server().psql("SELECT to_regclass('popserv_schema')", name), "\n")
