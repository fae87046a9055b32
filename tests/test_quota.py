"""Maildir++ quotas (the ``maildirsize`` file as Courier's specification and Dovecot keep it)."""

from __future__ import annotations

import os
import threading
import time

from twisted.internet import defer
from twisted.trial import unittest

from popserv import quota
from popserv.delivery import MaildirDeliverer
from popserv.interfaces import MailboxFull, QuotaLimits
from popserv.maildir import MaildirStore
from popserv.testing import run_at_once

K = 1024


class RuleTests(unittest.SynchronousTestCase):
    """Dovecot's ``quota_rule`` syntax, for the whole mailbox."""

    def test_storage_with_suffix(self):
        """``*:storage=100M`` is 100 MiB."""
        self.assertEqual(quota.parse_rule("*:storage=100M"), QuotaLimits(100 * K * K, 0))

    def test_bare_storage_counts_kilobytes(self):
        """As in Dovecot, a bare ``storage=`` number is kilobytes; ``bytes=`` is octets."""
        self.assertEqual(quota.parse_rule("*:storage=100"), QuotaLimits(100 * K, 0))
        self.assertEqual(quota.parse_rule("*:bytes=100"), QuotaLimits(100, 0))

    def test_messages_and_both(self):
        """Limits joined by ``:`` all apply; a later rule overrides only what it names."""
        both = quota.parse_rule("*:storage=1G:messages=500")
        self.assertEqual(both, QuotaLimits(1 << 30, 500))
        self.assertEqual(quota.parse_rule("*:messages=20", both), QuotaLimits(1 << 30, 20))

    def test_rules_for_one_mailbox_change_nothing(self):
        """``Trash:storage=+100M`` and ``*:ignore`` leave the limits as they were."""
        base = QuotaLimits(5, 6)
        self.assertEqual(quota.parse_rule("Trash:storage=+100M", base), base)
        self.assertEqual(quota.parse_rule("*:ignore", base), base)

    def test_bad_rules(self):
        """Nonsense is a ValueError naming the rule."""
        for text in ("storage=1G", "*:storage=lots", "*:weight=3", "*:messages=x"):
            self.assertRaises(ValueError, quota.parse_rule, text)

    def test_format_round_trips(self):
        """The rule ``--quota`` writes reads back as the same limits."""
        for limits in (QuotaLimits(100 * K * K, 0), QuotaLimits(1000, 7), QuotaLimits(0, 3)):
            self.assertEqual(quota.parse_rule(quota.format_rule(limits)), limits)
        self.assertEqual(quota.format_rule(QuotaLimits(100 * K, 0)), "*:storage=100K")

    def test_sizes(self):
        """Sizes take b, k, M, G, T in either case, as powers of 1024."""
        self.assertEqual(quota.parse_size("100k"), 100 * K)
        self.assertEqual(quota.parse_size("2G"), 2 << 30)
        self.assertEqual(quota.parse_size("17"), 17)
        self.assertRaises(ValueError, quota.parse_size, "-5")


class MaildirsizeTests(unittest.SynchronousTestCase):
    """The usage: the sum of the file's lines, recalculated from the files when stale."""

    def setUp(self):
        self.store = MaildirStore(self.mktemp())
        self.maildir = self.store.create("alice")
        self.path = os.path.join(self.maildir, quota.MAILDIRSIZE)

    def put(self, name: str, data: bytes, sub: str = "new", folder: str = "") -> None:
        directory = os.path.join(self.maildir, folder, sub)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)

    def read(self) -> str:
        with open(self.path) as f:
            return f.read()

    def test_missing_file_is_recalculated(self):
        """Without ``maildirsize`` the Maildir and its folders are summed and the file made."""
        self.put("1.M1P1.h,S=100,W=103", b"x" * 50)  # S= is believed, as by Dovecot
        self.put("2.M2P1.h", b"y" * 30, sub="cur")
        self.put("3.M3P1.h", b"z" * 7, folder=".Sent")
        os.makedirs(os.path.join(self.maildir, ".Sent", "cur"))
        usage = quota.usage(self.maildir, QuotaLimits(1000, 10))
        self.assertEqual((usage.bytes, usage.messages), (137, 3))
        self.assertEqual(self.read(), "1000S,10C\n137 3\n")

    def test_lines_add_up(self):
        """Every line after the first is a change; the usage is their sum."""
        with open(self.path, "w") as f:
            f.write("1000S\n100 1\n50 1\n-100 -1\n")
        usage = quota.usage(self.maildir, QuotaLimits(1000, 0))
        self.assertEqual((usage.bytes, usage.messages), (50, 1))

    def test_other_limits_recalculate(self):
        """A file naming other limits (changed by the admin) is made anew with ours."""
        self.put("1.M1P1.h,S=40", b"a")
        with open(self.path, "w") as f:
            f.write("5000S\n999 9\n")
        usage = quota.usage(self.maildir, QuotaLimits(1000, 0))
        self.assertEqual((usage.bytes, usage.messages), (40, 1))
        self.assertEqual(self.read(), "1000S\n40 1\n")

    def test_large_or_negative_file_recalculates(self):
        """Past 5120 bytes of lines, or adding up below zero, the file is rebuilt."""
        self.put("1.M1P1.h,S=40", b"a")
        with open(self.path, "w") as f:
            f.write("1000S\n" + "1 0\n-1 0\n" * 700)
        self.assertEqual(quota.usage(self.maildir, QuotaLimits(1000, 0)).bytes, 40)
        with open(self.path, "w") as f:
            f.write("1000S\n-500 -3\n")
        self.assertEqual(quota.usage(self.maildir, QuotaLimits(1000, 0)).messages, 1)

    def test_old_over_quota_file_recalculates(self):
        """Over quota and older than 15 minutes: counted again, in case it is wrong."""
        self.put("1.M1P1.h,S=40", b"a")
        with open(self.path, "w") as f:
            f.write("1000S\n5000 1\n")
        self.assertEqual(quota.usage(self.maildir, QuotaLimits(1000, 0)).bytes, 5000)
        old = time.time() - quota.RECALCULATE_AGE - 60
        os.utime(self.path, (old, old))
        self.assertEqual(quota.usage(self.maildir, QuotaLimits(1000, 0)).bytes, 40)

    def test_header_gives_limits_when_none_configured(self):
        """As in Dovecot: without a configured limit, the file's first line is the limit."""
        with open(self.path, "w") as f:
            f.write("200S,3C\n150 2\n")
        usage = quota.usage(self.maildir, QuotaLimits())
        self.assertEqual(usage.limits, QuotaLimits(200, 3))
        self.assertFalse(usage.room_for(51))
        self.assertTrue(usage.room_for(50))

    def test_half_written_last_line_is_not_counted(self):
        """A line without its newline may be a write under way: not counted yet."""
        with open(self.path, "w") as f:
            f.write("1000S\n100 1\n20")
        self.assertEqual(quota.usage(self.maildir, QuotaLimits(1000, 0)).bytes, 100)

    def test_removed_messages_are_subtracted(self):
        """``record_removed`` appends one negative line, which Dovecot reads the same way."""
        with open(self.path, "w") as f:
            f.write("1000S\n300 3\n")
        quota.record_removed(self.maildir, [100, 50])
        self.assertEqual(self.read(), "1000S\n300 3\n-150 -2\n")

    def test_no_file_is_made_without_limits(self):
        """A user without quota gets no ``maildirsize``."""
        self.put("1.M1P1.h,S=40", b"a")
        self.assertEqual(quota.usage(self.maildir, QuotaLimits()).bytes, 40)
        self.assertFalse(os.path.exists(self.path))
        quota.record_removed(self.maildir, [40])
        self.assertFalse(os.path.exists(self.path))

    def test_room(self):
        """A message fits while usage plus its size stays within each limit."""
        usage = quota.Usage(60 * K, 1, QuotaLimits(100 * K, 2))
        self.assertTrue(usage.room_for(40 * K))
        self.assertFalse(usage.room_for(40 * K + 1))
        self.assertFalse(quota.Usage(10, 2, QuotaLimits(100 * K, 2)).room_for(1))
        self.assertTrue(quota.Usage(10**9, 10**6, QuotaLimits()).room_for(10**9))


class _Policies:
    """Every user has the same limits."""

    def __init__(self, limits: QuotaLimits):
        from popserv.interfaces import MailboxPolicy

        self.policy = MailboxPolicy(quota=limits)

    def for_user(self, user):
        return self.policy


class DeliveryQuotaTests(unittest.TestCase):
    """Deliveries check and take room under the quota lock."""

    def setUp(self):
        self.store = MaildirStore(self.mktemp())
        for user in ("alice", "bob"):
            self.store.create(user)
        self.policies = _Policies(QuotaLimits(100 * K, 0))
        self.deliverer = MaildirDeliverer(self.store, "h", run_at_once, policies=self.policies)

    def deliver(self, users, size: int):
        started = self.deliverer.begin(users)
        started.write(b"x" * size)
        return started.finish()

    def new(self, user: str) -> list[str]:
        return os.listdir(os.path.join(self.store.path_for(user), "new"))

    @defer.inlineCallbacks
    def test_second_message_over_quota_is_refused(self):
        """100K quota: 60K goes in, a second 60K fails with MailboxFull and leaves nothing."""
        yield self.deliver(["alice"], 60 * K)
        failure = yield self.assertFailure(self.deliver(["alice"], 60 * K), MailboxFull)
        self.assertEqual(failure.users, ("alice",))
        self.assertEqual(len(self.new("alice")), 1)
        self.assertEqual(os.listdir(os.path.join(self.store.path_for("alice"), "tmp")), [])
        usage = quota.usage(self.store.path_for("alice"), QuotaLimits(100 * K, 0))
        self.assertEqual((usage.bytes, usage.messages), (60 * K, 1))

    @defer.inlineCallbacks
    def test_other_recipient_still_gets_it(self):
        """Only the full mailbox misses the message; the result names it."""
        yield self.deliver(["alice"], 60 * K)
        result = yield self.deliver(["alice", "bob"], 60 * K)
        self.assertEqual(result.full, ("alice",))
        self.assertEqual((len(self.new("alice")), len(self.new("bob"))), (1, 1))

    def test_parallel_deliveries_stay_within_the_limit(self):
        """Twenty threads delivering 10K each into 100K: exactly ten get in."""
        results = []

        def one():
            started = self.deliverer.begin(["alice"])
            started.write(b"y" * (10 * K))
            f, started._file = started._file, None
            try:
                started._finish_blocking(f, [QuotaLimits(100 * K, 0)])
                results.append(True)
            except MailboxFull:
                results.append(False)

        threads = [threading.Thread(target=one) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(results.count(True), 10)
        self.assertEqual(len(self.new("alice")), 10)
        usage = quota.usage(self.store.path_for("alice"), QuotaLimits(100 * K, 0))
        self.assertEqual((usage.bytes, usage.messages), (100 * K, 10))
        self.assertEqual(usage.bytes, quota.count_usage(self.store.path_for("alice"))[0])


class MaildirQuotaTests(unittest.TestCase):
    """``IQuota``: the early answer at RCPT."""

    def setUp(self):
        self.store = MaildirStore(self.mktemp())
        self.maildir = self.store.create("alice")
        with open(os.path.join(self.maildir, "new", "1.M1P1.h,S=61440"), "wb") as f:
            f.write(b"x")
        self.quota = quota.MaildirQuota(self.store, _Policies(QuotaLimits(100 * K, 0)), run_at_once)

    def test_declared_size(self):
        """A SIZE that would overfill the mailbox is refused; one that fits is admitted."""
        self.assertFalse(self.successResultOf(self.quota.admits("alice", 60 * K)))
        self.assertTrue(self.successResultOf(self.quota.admits("alice", 30 * K)))

    def test_unknown_size_admitted_until_full(self):
        """Without SIZE, only a mailbox already full is refused."""
        self.assertTrue(self.successResultOf(self.quota.admits("alice", 0)))
        with open(os.path.join(self.maildir, "new", "2.M2P1.h,S=40960"), "wb") as f:
            f.write(b"x")
        os.unlink(os.path.join(self.maildir, quota.MAILDIRSIZE))
        self.assertFalse(self.successResultOf(self.quota.admits("alice", 0)))

    def test_usage(self):
        """The usage as ``popserv quota`` shows it."""
        usage = self.successResultOf(self.quota.usage("alice"))
        self.assertEqual((usage.bytes, usage.messages, usage.limits.storage), (61440, 1, 100 * K))
