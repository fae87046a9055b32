"""Users in PostgreSQL across nodes: what ``popserv adduser --config`` does is seen everywhere.

Real ``twistd popserv`` nodes (tests.live_cluster) share one database; the users are
added, changed and removed with the real ``popserv`` command in a process of its own,
and each node's users file holds none of them, so every login proves the table is read.
"""

from __future__ import annotations

import poplib
import smtplib
import time

from twisted.trial.unittest import TestCase

from tests.live_cluster import LiveCluster
from tests.live_twistd import HOST
from tests.test_admin import admin_command

#: How soon every node must see a change (issue 16).
WITHIN = 1.0
#: Many logins fail while a test waits for a change: no lockout for that.
SETTINGS = {"pop3": {"max_failures": "100000"}}


def login(port: int, user: str, password: str) -> bool:
    """Whether USER/PASS on 127.0.0.1:``port`` logs in (then QUIT)."""
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        client.user(user)
        client.pass_(password)
    except poplib.error_proto:
        return False
    finally:
        try:
            client.quit()
        except (poplib.error_proto, OSError):
            client.close()
    return True


def accepts(port: int, user: str) -> bool:
    """Whether SMTP on 127.0.0.1:``port`` takes ``user`` as a recipient (RCPT TO)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("s@remote.example")
        code, _ = smtp.rcpt(f"{user}@{HOST}")
        smtp.rset()
    return code == 250


def within(seconds: float, predicate) -> float:
    """Seconds from now until ``predicate()`` held (tried at least once after the time);
    AssertionError if it never did within ``seconds``."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > seconds:
            raise AssertionError(f"not within {seconds} s")
        time.sleep(0.02)


class ClusterUsersTests(TestCase):
    """Two nodes; changes made with the admin command reach both within a second."""

    def setUp(self):
        self.cluster = LiveCluster(self, {}, count=2, smtp=True, settings=SETTINGS)
        self.cluster.start()

    def admin(self, *argv: str, password: str | None = None) -> None:
        """Run the real ``popserv`` command against the cluster's configuration."""
        config = self.cluster.nodes[0].config_path
        stdin = ["--password-stdin"] if password is not None else []
        process = admin_command(*argv, *stdin, "--config", config)
        out, err = process.communicate((password or "").encode() + b"\n", timeout=60)
        self.assertEqual(process.returncode, 0, err.decode())

    def every_node(self, predicate) -> None:
        """``predicate(node)`` holds on each node within a second of now."""
        start = time.monotonic()
        for node in self.cluster.nodes:
            within(WITHIN - (time.monotonic() - start), lambda node=node: predicate(node))

    def test_add_change_remove(self):
        """adduser logs in (and receives mail) on both nodes; after passwd the old password
        is refused and the new one works; after deluser neither logs in nor receives."""
        for node in self.cluster.nodes:
            self.assertFalse(login(node.pop3_port, "carol", "first"))
            self.assertFalse(accepts(node.smtp_port, "carol"))
        self.admin("adduser", "carol", password="first")
        self.assertIn(
            "carol:{ARGON2ID}",
            self.cluster.psql("SELECT name || ':' || password FROM popserv_users"),
        )
        self.every_node(lambda node: login(node.pop3_port, "carol", "first"))
        # Once more each: the password is now remembered (popserv.credcache) on both.
        for node in self.cluster.nodes:
            self.assertTrue(login(node.pop3_port, "carol", "first"))
            self.assertTrue(accepts(node.smtp_port, "carol"))

        self.admin("passwd", "carol", password="second")
        self.every_node(lambda node: not login(node.pop3_port, "carol", "first"))
        for node in self.cluster.nodes:
            self.assertTrue(login(node.pop3_port, "carol", "second"))

        self.admin("deluser", "carol")
        self.every_node(lambda node: not login(node.pop3_port, "carol", "second"))
        for node in self.cluster.nodes:
            self.assertFalse(accepts(node.smtp_port, "carol"))
        for node in self.cluster.nodes:
            with open(node.users_path, encoding="utf-8") as f:
                self.assertNotIn("carol", f.read())


class WorkersUsersTests(TestCase):
    """With [server] workers = 2, each worker follows the table."""

    def test_every_worker_sees_a_new_user(self):
        """Logins spread over both workers all succeed soon after adduser."""
        settings = {**SETTINGS, "server": {"workers": "2"}}
        cluster = LiveCluster(self, {}, count=1, settings=settings)
        cluster.start()
        node = cluster.nodes[0]
        process = admin_command(
            "adduser", "dave", "--password-stdin", "--scheme", "PLAIN", "--config", node.config_path
        )
        _, err = process.communicate(b"pw\n", timeout=60)
        added = time.monotonic()
        self.assertEqual(process.returncode, 0, err.decode())
        self.assertEqual(node.log().count("popserv_users: following changes"), 2, node.log())
        within(WITHIN, lambda: login(node.pop3_port, "dave", "pw"))
        time.sleep(max(0.0, added + WITHIN - time.monotonic()))
        self.assertEqual([login(node.pop3_port, "dave", "pw") for _ in range(8)], [True] * 8)
