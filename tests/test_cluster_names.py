"""Names on a shared mail root: delivered files, journals and temporary files name the node.

Several nodes write the same Maildirs; each uses ``[cluster] node`` (the short host name
by default) in what it names there, and a node alone keeps the names it always had.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from unittest import mock

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from popserv import cluster, delivery, maildir, quota, retention, service
from popserv.config import Config
from popserv.interfaces import QuotaLimits
from popserv.maildir import MaildirStore
from popserv.testing import run_at_once

DATABASE = "postgresql://popserv@127.0.0.1:1/popserv"


def created_temps(module):
    """A spy on ``module``'s ``os.replace``: the temporary paths it renames, in order."""
    renamed = []
    real = os.replace

    def replace(source, target):
        renamed.append(source)
        return real(source, target)

    return renamed, mock.patch.object(module.os, "replace", replace)


class NamingNodeTests(SynchronousTestCase):
    """Which name a node puts in the names of shared files."""

    def test_alone_keeps_the_hostname(self):
        """Without [cluster], delivered names carry [server] hostname, journals their old place."""
        config = Config(hostname="pop.example.org")
        self.assertEqual(cluster.naming_node(config), "")
        self.assertEqual(cluster.mail_host(config), "pop.example.org")
        self.assertEqual(delivery.journal_dir("/m", ""), "/m/.popserv-deliveries")

    def test_cluster_uses_the_node(self):
        """[cluster] node names delivered files, not the hostname the nodes share."""
        for config in (
            Config(hostname="pop.example.org", cluster_node="node7"),
            Config(hostname="pop.example.org", cluster_node="node7", cluster_database=DATABASE),
        ):
            self.assertEqual(cluster.naming_node(config), "node7")
            self.assertEqual(cluster.mail_host(config), "node7")
        self.assertEqual(delivery.journal_dir("/m", "node7"), "/m/.popserv-deliveries-node7")

    def test_database_without_node_uses_the_short_host_name(self):
        """With a database and no [cluster] node, the short host name names the node."""
        config = Config(hostname="pop.example.org", cluster_database=DATABASE)
        self.assertEqual(cluster.mail_host(config), socket.gethostname().split(".")[0])


class ServiceNamingTests(SynchronousTestCase):
    """make_service hands the node's name to the store, the deliverer and the recovery."""

    def setUp(self):
        root = os.path.abspath(self.mktemp())
        self.config = Config(
            hostname="pop.example.org",
            mailroot=os.path.join(root, "mail"),
            users=os.path.join(root, "users"),
            state_dir=os.path.join(root, "state"),
            pop3_listen=("tcp:0:interface=127.0.0.1",),
            pop3s_listen=(),
            smtp_listen=("tcp:0:interface=127.0.0.1",),
            tls_self_signed_dir=os.path.join(root, "tls"),
        )

    def parts(self, config):
        top = service.make_service(config, reactor=MemoryReactorClock())
        [recovery] = [c for c in top if isinstance(c, delivery.DeliveryRecovery)]
        deliverer = top.getServiceNamed("smtp-0").factory.deliverer
        return recovery, deliverer

    def test_node_alone(self):
        """A node alone delivers as [server] hostname, journals in .popserv-deliveries."""
        recovery, deliverer = self.parts(self.config)
        journals = os.path.join(self.config.mailroot, ".popserv-deliveries")
        self.assertEqual(deliverer.hostname, "pop.example.org")
        self.assertEqual((recovery.journal_dir, deliverer.journal_dir), (journals, journals))

    def test_node_of_a_cluster(self):
        """A cluster's node delivers as itself and recovers only its own journals."""
        recovery, deliverer = self.parts(self.config.replace(cluster_node="node2"))
        journals = os.path.join(self.config.mailroot, ".popserv-deliveries-node2")
        self.assertEqual(deliverer.hostname, "node2")
        self.assertEqual(deliverer.store.node, "node2")
        self.assertEqual((recovery.journal_dir, deliverer.journal_dir), (journals, journals))


class DeliveredNameTests(SynchronousTestCase):
    """Two nodes delivering at the same moment, from the same PID, still differ by name."""

    def test_same_moment_same_pid(self):
        """unique_name differs only by the node's part, which is escaped as Dovecot does."""
        a = delivery.unique_name("node1", 1_700_000_000_123_456_000)
        b = delivery.unique_name("node2", 1_700_000_000_123_456_000)
        pattern = rf"1700000000\.M123456P{os.getpid()}Q\d+\.node[12]"
        self.assertRegex(a, pattern)
        self.assertRegex(b, pattern)
        self.assertNotEqual(a.rsplit(".", 1)[1], b.rsplit(".", 1)[1])

    def test_delivered_file_carries_the_node(self):
        """A message delivered by node3 is named <secs>.M<usecs>P<pid>Q<n>.node3,S=..,W=.."""
        mailroot = os.path.abspath(self.mktemp())
        store = MaildirStore(mailroot, node="node3")
        deliverer = delivery.MaildirDeliverer(store, "node3", run_at_once)
        started = deliverer.begin(["alice", "bob"])
        started.write(b"Subject: hi\n\nhello\n")
        self.successResultOf(started.finish())
        for user in ("alice", "bob"):
            [name] = os.listdir(os.path.join(mailroot, user, "new"))
            self.assertRegex(name, rf"^\d+\.M\d{{6}}P{os.getpid()}Q\d+\.node3,S=19,W=22$")
            self.assertEqual(os.listdir(os.path.join(mailroot, user, "tmp")), [])
        self.assertEqual(os.listdir(os.path.join(mailroot, ".popserv-deliveries")), [])


class TempFileTests(SynchronousTestCase):
    """Every file replaced in a Maildir is written first under a name of its own."""

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.store = MaildirStore(self.root, node="node5")
        self.maildir = self.store.create("alice")
        self.tmp = os.path.join(self.maildir, "tmp")
        self.own = re.compile(rf"^(?P<name>[a-z-]+)\.node5\.P{os.getpid()}\.[^./]+\.tmp$")

    def assert_own(self, temps, name):
        self.assertEqual(len(temps), 1, temps)
        self.assertEqual(os.path.dirname(temps[0]), self.tmp)
        match = self.own.match(os.path.basename(temps[0]))
        self.assertIsNotNone(match, temps[0])
        self.assertEqual(match["name"], name)
        self.assertEqual(os.listdir(self.tmp), [])

    def test_create_temp(self):
        """Each call makes a new private file whose name holds the node and the PID."""
        made = [cluster.create_temp(self.tmp, "popserv-sizes", "node5") for _ in range(3)]
        for fd, _ in made:
            os.close(fd)
        paths = [path for _, path in made]
        self.assertEqual(len(set(paths)), 3)
        for path in paths:
            self.assertRegex(os.path.basename(path), self.own)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_default_node_is_the_short_host_name(self):
        """Without a node name, the short host name is in the temporary file's name."""
        fd, path = cluster.create_temp(self.tmp, "maildirsize")
        os.close(fd)
        host = socket.gethostname().split(".")[0]
        self.assertTrue(os.path.basename(path).startswith(f"maildirsize.{host}.P"), path)

    def test_size_cache(self):
        """The size cache (popserv-sizes) is written in tmp/ under the node's own name."""
        with open(os.path.join(self.maildir, "new", "1700000000.M1P1Q1.h"), "wb") as f:
            f.write(b"no sizes in this name\n")
        temps, spy = created_temps(maildir)
        with spy:
            entries, _ = maildir._scan(self.maildir, node=self.store.node)
        self.assertEqual([e.size for e in entries], [23])
        self.assert_own(temps, "popserv-sizes")
        with open(os.path.join(self.maildir, "popserv-sizes"), encoding="ascii") as f:
            self.assertTrue(f.read().startswith("1700000000.M1P1Q1.h 23 "))

    def test_size_cache_that_cannot_be_placed(self):
        """A size cache that cannot replace the old one leaves no temporary file behind."""
        os.mkdir(os.path.join(self.maildir, "popserv-sizes"))
        maildir._write_size_cache(os.path.join(self.maildir, "popserv-sizes"), {"a": (1, 2)})
        self.assertEqual(os.listdir(self.tmp), [])

    def test_retrieval_times(self):
        """popserv-retrieved is written in tmp/ under the node's own name."""
        temps, spy = created_temps(retention)
        with spy:
            retention.write(self.maildir, {"1700000000.M1P1Q1.h": 1700000100}, "node5")
        self.assert_own(temps, "popserv-retrieved")
        self.assertEqual(retention.read(self.maildir), {"1700000000.M1P1Q1.h": 1700000100})

    def test_quota_recalculation(self):
        """A recalculated maildirsize is written in tmp/ under the node's own name."""
        temps, spy = created_temps(quota)
        with spy:
            used = quota.usage(self.maildir, QuotaLimits(1000, 0), node="node5")
        self.assertEqual((used.bytes, used.messages), (0, 0))
        self.assert_own(temps, "maildirsize")
        self.assertTrue(os.path.exists(os.path.join(self.maildir, "maildirsize")))
