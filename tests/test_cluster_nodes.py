"""Several nodes behind one HAProxy, over one mail root and one PostgreSQL, on loopback.

Three ``twistd popserv`` nodes (node1..node3) with ``haproxy:`` listeners share a
``LiveCluster``'s database and mail root; a real ``haproxy -db`` runs the shipped
etc/haproxy/popserv.cfg in front of them.  Clients connect from 127.0.0.7 and 127.0.0.8,
so only the PROXY header tells a node who they are.
"""

from __future__ import annotations

import os
import poplib
import re
import smtplib
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from twisted.trial import unittest

from popserv.tls import generate_self_signed
from tests.live_cluster import LiveCluster
from tests.live_haproxy import (
    CLIENT_7,
    CLIENT_8,
    HAProxy,
    ProxiedClusterNode,
    SourcedPOP3,
    SourcedPOP3_SSL,
)
from tests.live_twistd import HOST

USERS = {"alice": "secret", "bob": "hunter2"}
NODES = ("node1", "node2", "node3")
#: A delivered name: <secs>.M<usecs>P<pid>Q<n>.<node>,S=<size>,W=<crlf-size>[:2,flags].
DELIVERED = re.compile(r"^\d+\.M\d{6}P\d+Q\d+\.(?P<node>[^,:]+),S=\d+,W=\d+(:2,.*)?$")
#: A UIDL popserv gives a file it delivered: the unique part of its name.
UIDL = re.compile(r"^\d+\.M\d{6}P\d+Q\d+\.(?P<node>[^,:]+)$")


def wait_until(predicate, what: str, timeout: float = 10.0):
    """``predicate()``'s first true value within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


class BehindOneHAProxyTests(unittest.TestCase):
    """Three nodes in each backend of one HAProxy: all checked, all serving, clients known."""

    def setUp(self):
        tls_dir = os.path.abspath(self.mktemp())
        os.makedirs(tls_dir)
        # One certificate for every node, as a cluster behind one name has.
        cert, key = generate_self_signed(HOST, tls_dir)
        self.cluster = LiveCluster(
            self,
            USERS,
            count=len(NODES),
            smtp=True,
            settings={
                "server": {"proxy_timeout": "1"},
                "tls": {"cert": cert, "key": key},
            },
            node_class=ProxiedClusterNode,
        )
        self.tls = ssl.create_default_context(cafile=cert)
        self.tls.check_hostname = False
        self.cluster.start()
        self.nodes = self.cluster.nodes
        self.haproxy = HAProxy(self, [node.backends() for node in self.nodes])
        self.checked = self.haproxy.wait_checked()

    def logins(self, node, peer: str) -> int:
        return node.log().count(f"pop3.login: peer={peer} user=")

    def test_every_node_checked_and_no_header_no_greeting(self):
        """Each node of each backend passes HAProxy's check; without a header, no greeting."""
        self.assertEqual(
            self.checked,
            {
                backend: {name: ("UP", "L7OK") for name in NODES}
                for backend in ("pop3_nodes", "pop3s_nodes", "smtp_nodes")
            },
        )
        for node in self.nodes:
            with socket.create_connection(("127.0.0.1", node.pop3_port), 5) as direct:
                self.assertEqual(direct.recv(100), b"")
            wait_until(
                lambda node=node: "proxy.refused: peer=127.0.0.1 reason=timeout" in node.log(),
                f"{node.name} to log the refusal",
            )

    def test_connections_spread_and_each_client_is_itself(self):
        """Logins from 127.0.0.7 (POP3) and 127.0.0.8 (POP3S) reach every node, each logged
        under the client's own address by whichever node served it."""
        for _ in range(9):
            client = SourcedPOP3(CLIENT_7, self.haproxy.ports[110])
            client.user("alice")
            self.assertTrue(client.pass_("secret").startswith(b"+OK"))
            client.quit()
        for _ in range(6):
            client = SourcedPOP3_SSL(CLIENT_8, self.haproxy.ports[995], self.tls)
            client.user("bob")
            self.assertTrue(client.pass_("hunter2").startswith(b"+OK"))
            client.quit()
        wait_until(
            lambda: (
                sum(self.logins(node, CLIENT_7) for node in self.nodes) == 9
                and sum(self.logins(node, CLIENT_8) for node in self.nodes) == 6
            ),
            "15 logins in the nodes' logs",
        )
        for node in self.nodes:
            self.assertGreater(self.logins(node, CLIENT_7), 0, node.name)
            self.assertEqual(self.logins(node, "127.0.0.1"), 0, node.log())
        self.assertGreater(sum(self.logins(node, CLIENT_8) > 0 for node in self.nodes), 1)
        for backend in ("pop3_nodes", "pop3s_nodes"):
            passed = self.haproxy.sessions(backend)
            self.assertEqual(set(passed), set(NODES))
            self.assertTrue(all(count > 0 for count in passed.values()), passed)

    def test_delivered_on_one_node_read_on_another(self):
        """Mail that node1 accepts over SMTP is read and deleted over POP3 on node2."""
        node1, node2 = self.nodes[0], self.nodes[1]
        with smtplib.SMTP("127.0.0.1", node1.direct_smtp_port, timeout=10) as smtp:
            smtp.sendmail(
                "carol@example.org",
                [f"alice@{HOST}"],
                b"Subject: across nodes\r\n\r\nfrom node1 to node2\r\n",
            )
        [name] = os.listdir(self.cluster.maildir("alice", "new"))
        self.assertEqual(DELIVERED.match(name)["node"], "node1")
        client = poplib.POP3("127.0.0.1", node2.direct_pop3_port, timeout=10)
        client.user("alice")
        client.pass_("secret")
        self.assertEqual(client.stat()[0], 1)
        lines = client.retr(1)[1]
        self.assertIn(b"from node1 to node2", lines)
        self.assertIn(b"Subject: across nodes", lines)
        client.dele(1)
        client.quit()
        self.assertEqual(os.listdir(self.cluster.maildir("alice", "new")), [])
        self.assertEqual(os.listdir(self.cluster.maildir("alice", "cur")), [])
        self.assertIn("pop3.login: peer=127.0.0.1 user=alice", node2.log())


class ConcurrentNodesTests(unittest.TestCase):
    """Three nodes deliver to the same recipients while POP3 sessions on them delete."""

    #: Messages each node is sent, each to both users or (every third) to one.
    MESSAGES = 40
    #: Every node's extra settings.
    settings = None

    def setUp(self):
        self.cluster = LiveCluster(self, USERS, count=len(NODES), smtp=True, settings=self.settings)
        self.cluster.start()
        self.accepted = {user: [] for user in USERS}
        self.deleted = {user: [] for user in USERS}
        self.lock = threading.Lock()

    def send(self, node) -> None:
        """Deliver MESSAGES to ``node``, noting each message accepted (250) per user."""
        with smtplib.SMTP("127.0.0.1", node.smtp_port, timeout=30) as smtp:
            for n in range(self.MESSAGES):
                users = ["alice", "bob"] if n % 3 else [("alice", "bob")[n % 2]]
                token = f"{node.name}-{n}"
                message = f"Subject: {token}\r\nMessage-ID: <{token}@test>\r\n\r\nbody {token}\r\n"
                refused = smtp.sendmail(
                    "sender@example.org", [f"{u}@{HOST}" for u in users], message.encode()
                )
                with self.lock:
                    for user in users:
                        if f"{user}@{HOST}" not in refused:
                            self.accepted[user].append(token)

    def delete(self, node, user: str, sending: threading.Event) -> int:
        """While ``sending``, log in to ``node`` again and again, take each message's
        UIDL and Subject (TOP), DELE them all and QUIT; the sessions that committed."""
        committed = 0
        while sending.is_set() or committed == 0:
            client = poplib.POP3("127.0.0.1", node.pop3_port, timeout=30)
            try:
                client.user(user)
                client.pass_(USERS[user])
            except poplib.error_proto as e:
                self.assertIn(b"[IN-USE]", e.args[0])
                client.quit()
                time.sleep(0.01)
                continue
            uidls = dict(line.decode().split() for line in client.uidl()[1])
            seen = []
            for n in range(1, len(uidls) + 1):
                headers = client.top(n, 0)[1]
                [subject] = [h for h in headers if h.startswith(b"Subject: ")]
                seen.append((subject[len(b"Subject: ") :].decode(), uidls[str(n)]))
                client.dele(n)
            client.quit()
            committed += 1
            with self.lock:
                self.deleted[user].extend(seen)
        return committed

    def remaining(self, user: str) -> dict[str, str]:
        """File name -> Subject of every message left in ``user``'s Maildir."""
        left = {}
        for sub in ("new", "cur"):
            directory = self.cluster.maildir(user, sub)
            for name in os.listdir(directory):
                with open(os.path.join(directory, name), "rb") as f:
                    subject = re.search(rb"^Subject: (\S+)\r?$", f.read(), re.M)
                self.assertIsNotNone(subject, name)
                self.assertNotIn(name, left)
                left[name] = subject[1].decode()
        return left

    def test_every_message_in_exactly_one_place(self):
        """Every accepted message is deleted once or left in exactly one file, its name
        carries the node that delivered it, and nothing is left in tmp/."""
        sending = threading.Event()
        sending.set()
        with ThreadPoolExecutor(len(NODES) * 3) as pool:
            deleters = [
                pool.submit(self.delete, node, user, sending)
                for node, user in zip(self.cluster.nodes, ["alice", "bob", "alice"], strict=True)
            ]
            senders = [pool.submit(self.send, node) for node in self.cluster.nodes]
            for sender in senders:
                sender.result()
            sending.clear()
            sessions = [deleter.result() for deleter in deleters]
        self.assertTrue(all(sessions), sessions)
        for user in USERS:
            left = self.remaining(user)
            # A file's name (and so its UIDL) names the node that delivered it.
            for name, token in left.items():
                self.assertEqual(DELIVERED.match(name)["node"], token.split("-")[0], name)
            for token, uidl in self.deleted[user]:
                self.assertEqual(UIDL.match(uidl)["node"], token.split("-")[0], uidl)
            found = sorted([t for t, _ in self.deleted[user]] + list(left.values()))
            self.assertEqual(found, sorted(self.accepted[user]), user)
            self.assertEqual(len(set(found)), len(found), user)
            self.assertGreater(len(self.deleted[user]), 0, user)
            self.assertEqual(os.listdir(self.cluster.maildir(user, "tmp")), [], user)
        expected = 2 * len(NODES) * self.MESSAGES - len(NODES) * len(range(0, self.MESSAGES, 3))
        self.assertEqual(sum(len(tokens) for tokens in self.accepted.values()), expected)
        for name in NODES:
            journals = os.path.join(self.cluster.mailroot, f".popserv-deliveries-{name}")
            self.assertEqual(os.listdir(journals), [], name)
        self.assertFalse(os.path.exists(os.path.join(self.cluster.mailroot, ".popserv-deliveries")))


class ConcurrentNodesWorkersTests(ConcurrentNodesTests):
    """The same with two worker processes per node (``[server] workers = 2``)."""

    settings = {"server": {"workers": "2"}}
