"""What the nodes count together in PostgreSQL (popserv.pgstate): lockout, sessions, outages.

The throttle's contract (the same as in memory and in SQLite) is in
tests.test_sharedstate; here what only a database shared by nodes has: nodes and
processes counted together, rows of dead processes, the session list of ``popserv
who``, and real ``twistd popserv`` nodes (tests.live_cluster) through a lockout and a
``pg_ctl stop -m immediate``.
"""

from __future__ import annotations

import json
import os
import poplib
import smtplib
import socket
import threading
import time
import uuid

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from popserv.interfaces import ISessionRegistry
from popserv.pgdb import Database, DatabaseUnavailable, open_database
from popserv.pgstate import (
    ATTEMPT_LIFETIME,
    PostgresLoginThrottle,
    PostgresSessionRegistry,
    cluster_sessions,
    forget_dead_processes,
    prune,
)
from popserv.throttle import FAILURE_MEMORY, ThrottleSettings
from tests.live_cluster import LiveCluster
from tests.live_pg import shared_server
from tests.test_sharedstate import Resolved, blocking_database
from tests.test_who import run_who

SETTINGS = ThrottleSettings(failure_delay=1, failure_delay_max=15, max_failures=3)
USERS = {"alice": "alice-pw", "bob": "bob-pw"}


class NodesThrottleTests(unittest.SynchronousTestCase):
    """Throttles of two nodes (and two processes) over one database count as one."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.database = blocking_database(self)
        self.one = self.throttle("node1", 1001)
        self.two = self.throttle("node2", 1001)

    def throttle(self, node: str, pid: int) -> Resolved:
        made = PostgresLoginThrottle(self.database, self.clock, SETTINGS, node=node, pid=pid)
        return Resolved(made, self)

    def rows(self, sql: str) -> list[tuple]:
        return self.database.call(lambda c: c.execute(sql).fetchall())

    def test_failures_on_both_nodes_add_up(self):
        """Failures counted on one node lock the address out on the other; not another address."""
        for throttle in (self.one, self.two, self.one):
            self.assertTrue(throttle.begin("192.0.2.7", "alice"))
            throttle.failed("192.0.2.7", "alice")
        self.assertFalse(self.two.begin("192.0.2.7", "alice"))
        self.assertFalse(self.one.begin("192.0.2.7", "alice"))
        self.assertTrue(self.two.begin("192.0.2.8", "alice"))

    def test_attempts_in_flight_on_both_nodes_count(self):
        """Attempts being verified on either node count against the limit."""
        self.assertTrue(self.one.begin("192.0.2.7", "alice"))
        self.assertTrue(self.two.begin("192.0.2.7", "alice"))
        self.assertTrue(self.one.begin("192.0.2.7", "alice"))
        self.assertFalse(self.two.begin("192.0.2.7", "alice"))
        self.assertEqual(
            self.rows("SELECT node, pid, count FROM popserv_login_attempts ORDER BY node"),
            [("node1", 1001, 2), ("node2", 1001, 2)],
        )

    def test_login_delay_holds_across_nodes(self):
        """A login on one node makes the user wait out LOGIN-DELAY on the other."""
        self.one.settings = self.two.settings = ThrottleSettings(login_delay=60)
        self.assertTrue(self.one.login_allowed("alice"))
        self.assertFalse(self.two.login_allowed("alice"))

    def test_attempts_of_a_dead_process_stop_counting(self):
        """An attempt never ended (its process died) counts for ATTEMPT_LIFETIME, no longer."""
        for _ in range(3):
            self.assertTrue(self.one.begin("192.0.2.7", "alice"))
        self.assertFalse(self.two.begin("192.0.2.7", "alice"))
        self.two.abandoned("192.0.2.7", "alice")
        self.clock.advance(ATTEMPT_LIFETIME + 1)
        self.assertTrue(self.two.begin("192.0.2.7", "alice"))

    def test_dead_processes_of_the_node_are_forgotten(self):
        """forget_dead_processes drops its node's rows of pids not alive, no other node's."""
        self.assertTrue(self.throttle("node1", 1002).begin("192.0.2.7", "alice"))
        self.assertTrue(self.one.begin("192.0.2.7", "alice"))
        self.assertTrue(self.two.begin("192.0.2.7", "alice"))
        gone = self.database.call(forget_dead_processes, "node1", lambda pid: pid == 1001)
        self.assertEqual(gone, [1002])
        self.assertEqual(
            self.rows("SELECT node, pid FROM popserv_login_attempts ORDER BY node"),
            [("node1", 1001), ("node2", 1001)],
        )

    def test_prune_forgets_quiet_addresses_and_old_logins(self):
        """prune removes addresses quiet for FAILURE_MEMORY, old logins and ended attempts."""
        self.one.settings = ThrottleSettings(login_delay=60)
        self.one.login_allowed("alice")
        self.assertTrue(self.one.begin("192.0.2.7", "alice"))
        self.one.failed("192.0.2.7", "alice")
        self.clock.advance(FAILURE_MEMORY + 1)
        self.assertTrue(self.one.begin("192.0.2.8", "alice"))
        self.one.failed("192.0.2.8", "alice")
        self.database.call(prune, self.clock.seconds(), FAILURE_MEMORY, 60)
        self.assertEqual(self.rows("SELECT peer FROM popserv_login_peers"), [("192.0.2.8",)])
        self.assertEqual(self.rows("SELECT peer FROM popserv_login_failures"), [("192.0.2.8",)])
        self.assertEqual(self.rows("SELECT * FROM popserv_last_logins"), [])
        self.assertEqual(self.rows("SELECT * FROM popserv_login_attempts"), [])

    def test_known_outage_fails_at_once(self):
        """While the database is known to be down, a call fails at once, asking nothing."""
        self.database.available = False
        self.failureResultOf(self.one.wrapped.begin("192.0.2.7", "alice"), DatabaseUnavailable)
        self.assertEqual(self.rows("SELECT * FROM popserv_login_attempts"), [])


class SessionRegistryTests(unittest.TestCase):
    """The session list in popserv_sessions, with a real reactor and database threads."""

    def setUp(self):
        self.url = shared_server().new_database()
        self.database = open_database(self.url, reactor)
        self.addCleanup(self.database.stop)
        self.registry = PostgresSessionRegistry(self.database, reactor, "node1")
        self.registry.start()
        self.addCleanup(self.registry.stop)

    def listed(self) -> defer.Deferred:
        return self.database.run(cluster_sessions)

    def test_provides_the_interface(self):
        """It provides ISessionRegistry."""
        verifyObject(ISessionRegistry, self.registry)

    @defer.inlineCallbacks
    def test_listed_until_closed(self):
        """Sessions opened before the first check and after it are listed until closed."""
        early = self.registry.opened("alice", "192.0.2.7")
        yield self.registry.check()
        self.registry.opened("bob", "192.0.2.8")
        yield self.database.query("SELECT 1")
        listed = yield self.listed()
        self.assertEqual(
            sorted((s.user, s.peer, s.node, s.pid) for s in listed),
            [
                ("alice", "192.0.2.7", "node1", os.getpid()),
                ("bob", "192.0.2.8", "node1", os.getpid()),
            ],
        )
        self.registry.closed(early)
        yield self.registry.check()
        listed = yield self.listed()
        self.assertEqual([s.user for s in listed], ["bob"])

    @defer.inlineCallbacks
    def test_rows_of_an_ended_connection_are_hidden(self):
        """A row whose process's connection has ended is not listed (its node died)."""
        gone = Database(self.url, reactor, size=1)
        gone.start()
        backend = gone.call(
            lambda c: c.execute(
                "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            ).fetchone()
        )
        gone.call(
            lambda c: c.execute(
                "INSERT INTO popserv_sessions (node, pid, key, name, peer, since, backend,"
                " backend_start) VALUES ('node2', 4242, '0', 'carol', '192.0.2.9', 1, %s, %s)",
                backend,
            )
        )
        listed = yield self.listed()
        self.assertEqual([s.user for s in listed], ["carol"])
        gone.stop()
        yield self.wait_until_listed([])

    @defer.inlineCallbacks
    def wait_until_listed(self, users: list[str], timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            listed = yield self.listed()
            if [s.user for s in listed] == users or time.monotonic() > deadline:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual([s.user for s in listed], users)


def sourced_pop3(source: str, port: int) -> poplib.POP3:
    """poplib from ``source`` (127.0.0.7, say): nodes see the real loopback source."""

    class Sourced(poplib.POP3):
        def _create_socket(self, timeout):
            return socket.create_connection(
                (self.host, self.port), timeout, source_address=(source, 0)
            )

    return Sourced("127.0.0.1", port, timeout=10)


def login_reply(node, user: str, password: str, source: str = "127.0.0.1") -> bytes:
    """The server's answer to USER/PASS on ``node``, then QUIT (or the connection's end)."""
    client = sourced_pop3(source, node.pop3_port)
    try:
        client.user(user)
        return client.pass_(password)
    except poplib.error_proto as e:
        return e.args[0]
    finally:
        try:
            client.quit()
        except (poplib.error_proto, OSError):
            client.close()


class ClusterLockoutTests(unittest.TestCase):
    """Two nodes lock an address out after max_failures failures spread over both."""

    #: ``[server] workers`` of each node.
    workers = "1"

    def test_failures_over_both_nodes_lock_out_on_both(self):
        """Three wrong passwords from 127.0.0.7, alternating nodes: the right one is then
        refused on both nodes; 127.0.0.8 logs in on both."""
        settings = {"pop3": {"max_failures": "3"}, "server": {"workers": self.workers}}
        cluster = LiveCluster(self, USERS, settings=settings)
        cluster.start()
        one, two = cluster.nodes
        for node in (one, two, one):
            reply = login_reply(node, "alice", "wrong", "127.0.0.7")
            self.assertTrue(reply.startswith(b"-ERR [AUTH]"), reply)
        for node in (two, one):
            reply = login_reply(node, "alice", "alice-pw", "127.0.0.7")
            self.assertTrue(reply.startswith(b"-ERR [SYS/TEMP] Too many failed"), reply)
        for node in (one, two):
            self.assertTrue(login_reply(node, "alice", "alice-pw", "127.0.0.8").startswith(b"+OK"))
        self.assertIn("127.0.0.7", cluster.psql("SELECT peer, total FROM popserv_login_peers"))


class ClusterWorkersLockoutTests(ClusterLockoutTests):
    """The same with two worker processes per node: the database's count wins over theirs."""

    workers = "2"


class ClusterWhoTests(unittest.TestCase):
    """``popserv who --config`` with [cluster] database lists every node's sessions."""

    def test_sessions_of_both_nodes_and_not_of_a_killed_one(self):
        """Sessions open on two nodes are listed with node and pid; a killed node's vanish."""
        cluster = LiveCluster(self, USERS)
        cluster.start()
        one, two = cluster.nodes
        clients = []
        for node, user in ((one, "alice"), (two, "bob")):
            client = poplib.POP3("127.0.0.1", node.pop3_port, timeout=10)
            client.user(user)
            client.pass_(USERS[user])
            clients.append(client)
        self.addCleanup(lambda: [c.close() for c in clients])
        rows = self.who_until(one, lambda rows: len(rows) == 2)
        self.assertEqual(
            sorted((r["user"], r["node"]) for r in rows), [("alice", "node1"), ("bob", "node2")]
        )
        pids = {r["node"]: r["pid"] for r in rows}
        self.assertIn(pids["node1"], one.serving_pids())
        self.assertIn(pids["node2"], two.serving_pids())
        two.kill()
        rows = self.who_until(one, lambda rows: len(rows) == 1)
        self.assertEqual([(r["user"], r["node"]) for r in rows], [("alice", "node1")])

    def who_until(self, node, done, timeout: float = 10.0) -> list[dict]:
        """``popserv who --json`` until ``done(rows)`` (the list is written in the background)."""
        deadline = time.monotonic() + timeout
        while True:
            result = run_who("--config", node.config_path, "--json")
            self.assertEqual(result.returncode, 0, result.stderr)
            rows = json.loads(result.stdout)
            if done(rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)


def ensure_running(server) -> None:
    """Start the shared PostgreSQL unless it runs: other tests of the process need it."""
    try:
        server.psql("SELECT 1")
    except Exception:
        server.start()


class Load(threading.Thread):
    """POP3 logins and SMTP deliveries, alternating nodes, until stopped; what each got."""

    def __init__(self, nodes):
        super().__init__(daemon=True)
        self.nodes = nodes
        self.stopping = threading.Event()
        self.accepted: list[str] = []
        #: (kind, node name, time, outcome) of every attempt: "ok", "451", "SYS/TEMP", ...
        self.outcomes: list[tuple[str, str, float, str]] = []

    def run(self) -> None:
        turn = 0
        while not self.stopping.is_set():
            node = self.nodes[turn % len(self.nodes)]
            turn += 1
            self.outcomes.append(("smtp", node.name, time.monotonic(), self.deliver(node)))
            self.outcomes.append(("pop3", node.name, time.monotonic(), self.login(node)))
            time.sleep(0.02)

    def deliver(self, node) -> str:
        token = uuid.uuid4().hex
        message = f"From: load@example.org\r\nSubject: {token}\r\n\r\n{token}\r\n"
        try:
            with smtplib.SMTP("127.0.0.1", node.smtp_port, timeout=10) as client:
                client.sendmail("load@example.org", ["alice@localhost"], message)
        except smtplib.SMTPRecipientsRefused as e:
            ((code, _),) = e.recipients.values()
            return str(code)
        except (smtplib.SMTPException, OSError) as e:
            return f"error {e}"
        self.accepted.append(token)
        return "ok"

    def login(self, node) -> str:
        reply = login_reply(node, "bob", "bob-pw")
        if reply.startswith(b"+OK"):
            return "ok"
        if reply.startswith(b"-ERR [SYS/TEMP]"):
            return "SYS/TEMP"
        return reply.decode("ascii", "replace")

    def seen(self, kind: str, outcome: str, since: float, node: str | None = None) -> bool:
        return any(
            k == kind and o == outcome and at >= since and (node is None or n == node)
            for k, n, at, o in list(self.outcomes)
        )


class DatabaseOutageTests(unittest.TestCase):
    """``pg_ctl stop -m immediate`` under load: [SYS/TEMP] and 451, nothing lost, recovery."""

    def test_outage_and_recovery_without_restarting_nodes(self):
        """While PostgreSQL is down logins get -ERR [SYS/TEMP] and RCPT 451; every message
        accepted is delivered once; both nodes serve again once it is back."""
        cluster = LiveCluster(self, USERS, smtp=True)
        cluster.start()
        server = cluster.server
        self.addCleanup(ensure_running, server)
        load = Load(cluster.nodes)
        load.start()
        self.addCleanup(load.join, 30)
        self.addCleanup(load.stopping.set)
        self.wait_for(lambda: load.seen("smtp", "ok", 0) and load.seen("pop3", "ok", 0), "load")

        stopped = time.monotonic()
        server.stop("immediate")
        try:
            self.wait_for(
                lambda: (
                    load.seen("pop3", "SYS/TEMP", stopped) and load.seen("smtp", "451", stopped)
                ),
                "[SYS/TEMP] and 451 during the outage",
            )
        finally:
            server.start()
        started = time.monotonic()
        self.wait_for(
            lambda: all(
                load.seen(kind, "ok", started, node.name)
                for node in cluster.nodes
                for kind in ("smtp", "pop3")
            ),
            "logins and deliveries on both nodes after the outage",
        )
        load.stopping.set()
        load.join(30)

        odd = {o for _, _, at, o in load.outcomes if o not in ("ok", "451", "SYS/TEMP")}
        self.assertEqual(odd, set())
        delivered = []
        for sub in ("new", "cur"):
            directory = cluster.maildir("alice", sub)
            for name in os.listdir(directory):
                with open(os.path.join(directory, name), encoding="ascii") as f:
                    delivered.append(f.read().rsplit("\n", 2)[-2].strip())
        self.assertEqual(sorted(delivered), sorted(load.accepted))
        for node in cluster.nodes:
            self.assertIn("popserv.database_available", node.log())

    def wait_for(self, condition, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"no {what} within {timeout} s")
            time.sleep(0.1)
