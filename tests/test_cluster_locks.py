"""The maildrop lock across real nodes: two ``twistd popserv`` processes, one mail root,
one PostgreSQL (issue 16).  Clients are poplib on 127.0.0.1."""

from __future__ import annotations

import os
import poplib
import signal
import time

from twisted.trial.unittest import TestCase

from popserv.pglocks import NAMESPACE
from popserv.pop3 import Reply
from tests.live_cluster import LiveCluster

USERS = {"alice": "secret", "bob": "hunter2"}
MESSAGES = [b"Subject: %d\n\nmessage %d\n" % (n, n) for n in range(1, 4)]
#: [cluster] lock_timeout of these nodes: a stopped node keeps its locks this long.
LOCK_TIMEOUT = 3.0


def login(node, user: str = "alice") -> poplib.POP3:
    """A poplib session logged in on ``node``; poplib.error_proto when refused."""
    client = poplib.POP3("127.0.0.1", node.pop3_port, timeout=20)
    try:
        client.user(user)
        client.pass_(USERS[user])
    except BaseException:
        client.close()
        raise
    return client


def refusal(node, user: str = "alice") -> bytes:
    """The reply to a login that must fail."""
    try:
        client = login(node, user)
    except poplib.error_proto as e:
        return e.args[0]
    client.quit()
    raise AssertionError(f"{user} logged in on {node.name}")


class ClusterTestCase(TestCase):
    """Two nodes started over a new database, alice with three messages."""

    #: [server] workers of each node.
    workers = 1
    database_stopped = False

    def setUp(self):
        settings = {
            "cluster": {"lock_timeout": str(LOCK_TIMEOUT)},
            "server": {"workers": str(self.workers)},
        }
        self.cluster = LiveCluster(self, USERS, count=2, settings=settings)
        self.node1, self.node2 = self.cluster.nodes
        self.cluster.start()
        new = self.cluster.maildir("alice", "new")
        os.makedirs(new)
        os.makedirs(self.cluster.maildir("alice", "tmp"))
        os.makedirs(self.cluster.maildir("alice", "cur"))
        for n, message in enumerate(MESSAGES, 1):
            with open(os.path.join(new, f"170000000{n}.M{n}P1Q1.test"), "wb") as f:
                f.write(message)

    def stored(self) -> int:
        """How many of alice's messages are on disk."""
        return sum(len(os.listdir(self.cluster.maildir("alice", sub))) for sub in ("new", "cur"))

    def lock_holders(self) -> list[str]:
        """The application names of the backends holding popserv maildrop locks."""
        return self.cluster.psql(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            f" WHERE l.locktype = 'advisory' AND l.classid = {NAMESPACE} AND l.objsubid = 2"
            " AND l.granted"
        ).split("\n")[:-1]


class ClusterLockTests(ClusterTestCase):
    """One session per maildrop across nodes, and what happens when the holder dies or stops."""

    def test_one_session_per_maildrop_across_nodes(self):
        """A maildrop open on one node is [IN-USE] on the other, with the lock in
        pg_locks; after QUIT the other node serves it at once."""
        client = login(self.node1)
        self.assertEqual(refusal(self.node2), Reply.IN_USE)
        self.assertEqual(self.lock_holders(), ["popserv node1 locks"])
        other = login(self.node2, "bob")
        other.quit()
        client.quit()
        again = login(self.node2)
        self.assertEqual(again.stat()[0], 3)
        self.assertEqual(self.lock_holders(), ["popserv node2 locks"])
        again.quit()
        self.assertEqual(self.lock_holders(), [])

    def test_killed_holder_frees_the_maildrop(self):
        """SIGKILL of the node holding a session after DELE: the other node serves the
        maildrop within seconds, with every message still there."""
        client = login(self.node1)
        client.dele(1)
        client.dele(2)
        self.node1.process.send_signal(signal.SIGKILL)
        self.node1.process.wait(10)
        client.close()
        started = time.monotonic()
        other = self.login_when_free(self.node2, within=5)
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(other.stat()[0], 3)
        other.quit()
        self.assertEqual(self.stored(), 3)

    def test_stopped_holder_times_out_and_commits_nothing(self):
        """SIGSTOP of a lock holder: [IN-USE] until its lock times out; after SIGCONT its
        session ends with -ERR and the messages it deleted are still there."""
        client = login(self.node1)
        client.dele(1)
        client.dele(2)
        self.node1.process.send_signal(signal.SIGSTOP)
        self.addCleanup(self.node1.process.send_signal, signal.SIGCONT)
        stopped = time.monotonic()
        self.assertEqual(refusal(self.node2), Reply.IN_USE)
        other = self.login_when_free(self.node2, within=LOCK_TIMEOUT + 10)
        self.assertGreater(time.monotonic() - stopped, LOCK_TIMEOUT * 0.75)
        self.assertEqual(other.stat()[0], 3)
        other.quit()

        self.node1.process.send_signal(signal.SIGCONT)
        # Its heartbeat finds the connection gone: the session ends unasked.
        self.assertEqual(client.file.readline().rstrip(b"\r\n"), Reply.LOCK_LOST)
        self.assertEqual(client.file.readline(), b"")
        client.close()
        self.assertEqual(self.stored(), 3)
        self.assertIn("pop3.lock_lost", self.node1.log())
        # The node takes a new lock connection for the next login.
        again = self.login_when_free(self.node1, within=5)
        self.assertEqual(again.stat()[0], 3)
        again.quit()

    def test_database_down_then_back(self):
        """PostgreSQL gone: a session holding its lock ends with -ERR and commits
        nothing, new logins get [SYS/TEMP]; once it is back, logins work, no restart."""
        client = login(self.node1)
        client.dele(1)
        self.cluster.server.stop("immediate")
        self.database_stopped = True
        self.addCleanup(self.start_database)
        self.assertEqual(client.file.readline().rstrip(b"\r\n"), Reply.LOCK_LOST)
        client.close()
        # (Refused by whichever shared part asks the database first: the lock, or the
        # lockout counters.)
        self.assertEqual(refusal(self.node2), Reply.TEMP_FAILURE)
        self.start_database()
        again = self.login_when_free(self.node2, within=5, retry=b"-ERR [SYS/TEMP]")
        self.assertEqual(again.stat()[0], 3)
        again.quit()
        self.assertEqual(self.stored(), 3)

    def start_database(self) -> None:
        """Start the process's PostgreSQL again if this test stopped it."""
        if self.database_stopped:
            self.cluster.server.start()
            self.database_stopped = False

    def login_when_free(self, node, within: float, retry=b"-ERR [IN-USE]") -> poplib.POP3:
        """Log in on ``node``, trying again while the reply starts with ``retry``."""
        deadline = time.monotonic() + within
        while True:
            try:
                return login(node)
            except poplib.error_proto as e:
                if not e.args[0].startswith(retry) or time.monotonic() > deadline:
                    raise
            time.sleep(0.1)


class SeveralWorkersTests(ClusterTestCase):
    """[server] workers = 2: each worker keeps a lock connection of its own."""

    workers = 2

    def test_one_session_per_maildrop(self):
        """Still one session per maildrop, whichever worker or node a login reaches."""
        client = login(self.node1)
        for _ in range(4):  # both workers in turn, as the kernel hands out connections
            self.assertEqual(refusal(self.node1), Reply.IN_USE)
        self.assertEqual(refusal(self.node2), Reply.IN_USE)
        self.assertEqual(len(self.lock_holders()), 1)
        client.quit()
        login(self.node2).quit()
        again = login(self.node1)
        self.assertEqual(again.stat()[0], 3)
        again.quit()
        self.assertEqual(self.lock_holders(), [])
