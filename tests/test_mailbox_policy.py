"""Mailbox policy: seen flags at QUIT, RFC 2449 EXPIRE, and per-user settings from the userdb."""

from __future__ import annotations

import os
import time

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from popserv import retention
from popserv.auth import Entry, PasswdFile
from popserv.config import Config
from popserv.interfaces import NEVER, MailboxPolicy, QuotaLimits
from popserv.maildir import MaildirStore, seen_name, uidl_for
from popserv.policy import MailboxPolicies, parse_expire
from popserv.pop3 import POP3Factory
from popserv.realm import MaildropRealm
from popserv.testing import FakeMaildropStore, run_at_once


class SeenNameTests(unittest.SynchronousTestCase):
    """The Maildir name of a message once read: ``:2,`` info with ``S``, flags in order."""

    def test_new_message(self):
        """A name from ``new/`` gains ``:2,S``; its size fields stay."""
        self.assertEqual(seen_name("1.M2P3.h,S=10,W=12"), "1.M2P3.h,S=10,W=12:2,S")

    def test_flags_kept_in_order(self):
        """Other flags stay, and S takes its ASCII place among them."""
        self.assertEqual(seen_name("1.M2P3.h:2,FR"), "1.M2P3.h:2,FRS")
        self.assertEqual(seen_name("1.M2P3.h:2,Ta"), "1.M2P3.h:2,STa")

    def test_already_seen(self):
        self.assertEqual(seen_name("1.M2P3.h:2,RS"), "1.M2P3.h:2,RS")

    def test_foreign_info_left_alone(self):
        """An info part that is not Maildir's ``2,`` kind is not ours to rewrite."""
        self.assertIsNone(seen_name("1.M2P3.h:1,x"))

    def test_uidl_unchanged(self):
        """The UIDL is the unique part, which the flags do not touch."""
        self.assertEqual(uidl_for(seen_name("1.M2P3.h,S=10")), uidl_for("1.M2P3.h,S=10"))


class ExtraFieldTests(unittest.SynchronousTestCase):
    """The passwd-file's extra fields, as Dovecot writes them."""

    def test_fields(self):
        """``userdb_`` is taken off; fields without a value are empty."""
        entry = Entry.parse("a:{PLAIN}x:::::: userdb_quota_rule=*:storage=1G nopassword")
        self.assertEqual(entry.fields, {"quota_rule": "*:storage=1G", "nopassword": ""})

    def test_no_extra_fields(self):
        self.assertEqual(Entry.parse("a:{PLAIN}x").fields, {})
        self.assertEqual(Entry.parse("a:{PLAIN}x:1000:1000::/home/a:/bin/sh").fields, {})

    def test_set_and_remove_a_field(self):
        """Setting keeps the other fields; removing the last leaves a plain line."""
        entry = Entry.parse("a:{PLAIN}x:1000:1000:gecos:/home/a::other=1")
        changed = entry.with_field("quota_rule", "*:storage=100M")
        self.assertEqual(
            changed.format(),
            "a:{PLAIN}x:1000:1000:gecos:/home/a::other=1 userdb_quota_rule=*:storage=100M",
        )
        plain = Entry.parse("a:{PLAIN}x").with_field("quota_rule", "*:storage=1M")
        self.assertEqual(plain.format(), "a:{PLAIN}x::::::userdb_quota_rule=*:storage=1M")
        self.assertEqual(plain.with_field("quota_rule", None).format(), "a:{PLAIN}x")


class PoliciesTests(unittest.SynchronousTestCase):
    """Each user's policy: the config's defaults, the users file's fields over them."""

    def policies(self, lines: str, **config) -> MailboxPolicies:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(lines)
        return MailboxPolicies(PasswdFile(path), Config(hostname="h", **config))

    def test_defaults(self):
        policies = self.policies("a:{PLAIN}x\n", quota_storage=5000, pop3_expire=7)
        self.assertEqual(policies.for_user("a"), MailboxPolicy(True, 7, QuotaLimits(5000, 0)))

    def test_user_fields_override(self):
        """``userdb_quota_rule`` and ``userdb_pop3_expire`` are the user's own."""
        policies = self.policies(
            "a:{PLAIN}x::::::userdb_quota_rule=*:storage=100K userdb_pop3_expire=0\n",
            quota_messages=9,
        )
        self.assertEqual(policies.for_user("a").quota, QuotaLimits(100 * 1024, 9))
        self.assertEqual(policies.for_user("a").expire_days, 0)

    def test_bad_field_is_ignored(self):
        policies = self.policies("a:{PLAIN}x::::::userdb_pop3_expire=soon\n", pop3_expire=3)
        self.assertEqual(policies.for_user("a").expire_days, 3)

    def test_capability_same_for_all(self):
        """CAPA before login: the server's value, without USER when no one differs."""
        self.assertEqual(self.policies("a:{PLAIN}x\n").capability(), b"EXPIRE NEVER")
        self.assertEqual(self.policies("a:x\n", pop3_expire=30).capability(), b"EXPIRE 30")

    def test_capability_per_user(self):
        """When users differ, the shortest value, tagged USER (RFC 2449 section 6.7)."""
        policies = self.policies(
            "a:{PLAIN}x::::::userdb_pop3_expire=5\nb:{PLAIN}y\n", pop3_expire=30
        )
        self.assertEqual(policies.capability(), b"EXPIRE 5 USER")

    def test_expire_values(self):
        self.assertIs(parse_expire("never"), NEVER)
        self.assertEqual(parse_expire("0"), 0)
        self.assertRaises(ValueError, parse_expire, "-1")


MSG = b"Subject: %d\r\n\r\nbody\r\n"


def mock_stdin(stream):
    from unittest import mock

    return mock.patch("sys.stdin", stream)


class MaildropPolicyTests(unittest.TestCase):
    """The Maildir store carries out the policy at QUIT and at login."""

    def setUp(self):
        self.store = MaildirStore(self.mktemp(), run_at_once)
        self.maildir = self.store.create("alice")
        self.names = []
        for n in range(1, 4):
            name = f"{1700000000 + n}.M{n}P1.host,S={len(MSG % n)},W={len(MSG % n)}"
            with open(os.path.join(self.maildir, "new", name), "wb") as f:
                f.write(MSG % n)
            self.names.append(name)

    def files(self, sub: str) -> list[str]:
        return sorted(os.listdir(os.path.join(self.maildir, sub)))

    @defer.inlineCallbacks
    def session(self, deleted=(), retrieved=(), policy=None):
        maildrop = yield self.store.open_maildrop("alice", policy)
        try:
            uidls = [uidl for uidl, _ in maildrop.messages()]
            yield maildrop.commit(deleted, retrieved)
        finally:
            maildrop.close()
        return uidls

    @defer.inlineCallbacks
    def test_retrieved_are_marked_seen(self):
        """A retrieved message moves to ``cur/`` with S; the others stay; UIDLs do not change."""
        before = yield self.session(retrieved=[0])
        self.assertEqual(self.files("cur"), [self.names[0] + ":2,S"])
        self.assertEqual(self.files("new"), self.names[1:])
        after = yield self.session()
        self.assertEqual(after, before)

    @defer.inlineCallbacks
    def test_mark_seen_off(self):
        """``[pop3] mark_seen = no`` leaves messages where they are."""
        yield self.session(retrieved=[0], policy=MailboxPolicy(mark_seen=False))
        self.assertEqual(self.files("new"), self.names)

    @defer.inlineCallbacks
    def test_retrieval_time_recorded(self):
        """The first retrieval's time is kept in the Maildir; a second one does not move it."""
        start = int(time.time())
        yield self.session(retrieved=[0])
        times = retention.read(self.maildir)
        key = uidl_for(self.names[0])
        self.assertEqual(list(times), [key])
        self.assertGreaterEqual(times[key], start)
        retention.write(self.maildir, {key: 1000})
        yield self.session(retrieved=[0])
        self.assertEqual(retention.read(self.maildir), {key: 1000})

    @defer.inlineCallbacks
    def test_expire_zero_removes_what_was_retrieved(self):
        """EXPIRE 0: the retrieved message goes at QUIT without DELE; the others stay."""
        yield self.session(retrieved=[1], policy=MailboxPolicy(expire_days=0))
        self.assertEqual(self.files("new"), [self.names[0], self.names[2]])
        self.assertEqual(self.files("cur"), [])
        self.assertEqual(retention.read(self.maildir), {})

    @defer.inlineCallbacks
    def test_expire_days_at_login(self):
        """EXPIRE 30: a message retrieved 31 days ago is gone at the next login; newer stay."""
        yield self.session(retrieved=[0, 1])
        old = int(time.time()) - 31 * 86400
        times = retention.read(self.maildir)
        times[uidl_for(self.names[0])] = old
        retention.write(self.maildir, times)
        maildrop = yield self.store.open_maildrop("alice", MailboxPolicy(expire_days=30))
        self.addCleanup(maildrop.close)
        self.assertEqual(len(maildrop.messages()), 2)
        self.assertEqual(self.files("cur"), [self.names[1] + ":2,S"])
        self.assertEqual(list(retention.read(self.maildir)), [uidl_for(self.names[1])])

    @defer.inlineCallbacks
    def test_expire_never_keeps_old(self):
        """EXPIRE NEVER: however old the retrieval, nothing is removed."""
        yield self.session(retrieved=[0])
        retention.write(self.maildir, {uidl_for(self.names[0]): 1})
        uidls = yield self.session()
        self.assertEqual(len(uidls), 3)

    @defer.inlineCallbacks
    def test_deleted_frees_quota(self):
        """Over quota, the user still logs in and deletes; that frees the space at once."""
        with open(os.path.join(self.maildir, "maildirsize"), "w") as f:
            f.write(f"10S\n{3 * len(MSG % 1)} 3\n")
        policy = MailboxPolicy(quota=QuotaLimits(10, 0))
        yield self.session(deleted=[0], policy=policy)
        with open(os.path.join(self.maildir, "maildirsize")) as f:
            self.assertEqual(f.read().splitlines()[-1], f"-{len(MSG % 1)} -1")


MSG1 = b"Subject: one\r\n\r\nfirst\r\n"
MSG2 = b"Subject: two\r\n\r\nsecond\r\n"


class ProtocolTests(unittest.TestCase):
    """What the POP3 session tells storage, and what CAPA says of EXPIRE."""

    peer = IPv4Address("TCP", "192.0.2.7", 40000)

    def setUp(self):
        self.store = FakeMaildropStore({"alice": [MSG1, MSG2]})
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("alice:{PLAIN}secret::::::userdb_pop3_expire=0\nbob:{PLAIN}pw\n")
        config = Config(hostname="h", pop3_expire=30, auth_trusted_networks=("192.0.2.0/24",))
        self.policies = MailboxPolicies(PasswdFile(path), config)
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        portal = Portal(MaildropRealm(self.store, self.policies), [checker])
        factory = POP3Factory(
            portal, config, clock=task.Clock(), run_in_thread=run_at_once, policies=self.policies
        )
        self.proto = factory.buildProtocol(self.peer)
        self.transport = StringTransport(peerAddress=self.peer)
        self.proto.makeConnection(self.transport)

    def exchange(self, data: bytes) -> bytes:
        self.transport.clear()
        self.proto.dataReceived(data)
        return self.transport.value()

    def test_retr_counts_top_does_not(self):
        """RETR 1 and TOP 2 then QUIT: storage hears that message 1 (index 0) was read."""
        self.exchange(b"USER alice\r\nPASS secret\r\n")
        self.exchange(b"RETR 1\r\nTOP 2 0\r\n")
        self.exchange(b"QUIT\r\n")
        (maildrop,) = self.store.opened
        self.assertEqual(maildrop.retrieved, {0})
        self.assertEqual(maildrop.policy.expire_days, 0)

    def test_drop_tells_nothing(self):
        """A session that drops after RETR commits nothing at all."""
        self.exchange(b"USER alice\r\nPASS secret\r\nRETR 1\r\n")
        self.proto.connectionLost(None)
        (maildrop,) = self.store.opened
        self.assertFalse(maildrop.committed)
        self.assertEqual(len(self.store.mailboxes["alice"]), 2)

    def test_capa_expire(self):
        """Before login the shortest value tagged USER; after login the user's own."""
        self.assertIn(b"\r\nEXPIRE 0 USER\r\n", self.exchange(b"CAPA\r\n"))
        self.exchange(b"USER alice\r\nPASS secret\r\n")
        capa = self.exchange(b"CAPA\r\n")
        self.assertIn(b"\r\nEXPIRE 0\r\n", capa)
        self.assertNotIn(b"USER\r\n", capa)


class AdminQuotaTests(unittest.SynchronousTestCase):
    """``popserv adduser/passwd --quota``, ``popserv quota`` and the usage in ``popserv list``."""

    def setUp(self):
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        self.paths = ["--users", os.path.join(root, "users"), "--mailroot", os.path.join(root, "m")]
        self.mailroot = os.path.join(root, "m")

    def run_admin(self, *argv: str, password: bytes = b"pw\n") -> str:
        import contextlib
        import io

        from popserv import admin

        out = io.StringIO()
        stdin = io.TextIOWrapper(io.BytesIO(password))
        with contextlib.redirect_stdout(out), mock_stdin(stdin):
            status = admin.main(list(argv))
        self.assertEqual(status, 0, out.getvalue())
        return out.getvalue()

    def users_line(self) -> str:
        with open(self.paths[1]) as f:
            return f.read()

    def test_adduser_sets_the_rule(self):
        """``--quota 100M`` writes Dovecot's ``userdb_quota_rule`` extra field."""
        self.run_admin(
            "adduser",
            "alice",
            "--password-stdin",
            "--scheme",
            "PLAIN",
            "--quota",
            "100M",
            *self.paths,
        )
        self.assertTrue(self.users_line().endswith("::::::userdb_quota_rule=*:storage=100M\n"))

    def test_quota_shows_usage(self):
        """``popserv quota`` counts the Maildir against the user's limits."""
        self.run_admin("adduser", "alice", "--password-stdin", "--quota", "100K", *self.paths)
        with open(os.path.join(self.mailroot, "alice", "new", "1.M1P1.h,S=61440"), "wb") as f:
            f.write(b"x")
        out = self.run_admin("quota", "alice", *self.paths)
        self.assertIn("storage: 61440 bytes of 102400 (60%)", out)
        self.assertIn("messages: 1 of no limit", out)
        self.assertEqual(self.run_admin("list", *self.paths), "alice\t61440\t1\t102400\t-\n")

    def test_passwd_keeps_or_changes_the_rule(self):
        """passwd keeps the rule unless told; ``--quota-messages`` joins the storage limit."""
        self.run_admin("adduser", "alice", "--password-stdin", "--quota", "1M", *self.paths)
        self.run_admin("passwd", "alice", "--password-stdin", *self.paths)
        self.assertIn("userdb_quota_rule=*:storage=1M\n", self.users_line())
        self.run_admin("quota", "alice", "--quota-messages", "10", *self.paths)
        self.assertIn("userdb_quota_rule=*:storage=1M:messages=10\n", self.users_line())
        self.run_admin("quota", "alice", "--quota", "default", *self.paths)
        self.assertNotIn("quota_rule", self.users_line())
