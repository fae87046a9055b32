"""Login throttling: failure accounting per address and user, fair and bounded verification,
replies at a fixed time, SCRAM exchanges counted, addresses counted by their network.
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from popserv.interfaces import ILoginThrottle
from popserv.scheduler import QueueFull, VerificationScheduler
from popserv.throttle import MemoryLoginThrottle, ThrottleSettings, accounting_key


class AccountingKeyTests(unittest.TestCase):
    def test_keys(self):
        """IPv4-mapped addresses count as IPv4, IPv6 ones by /64; anything else as it is."""
        for host, key in [
            ("192.0.2.7", "192.0.2.7"),
            ("::ffff:127.0.7.1", "127.0.7.1"),
            ("::ffff:7f00:701", "127.0.7.1"),
            ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
            ("2001:DB8:1:2::9", "2001:db8:1:2::/64"),
            ("fe80::1%eth0", "fe80::/64"),
            ("/run/popserv.sock", "/run/popserv.sock"),
            ("?", "?"),
        ]:
            self.assertEqual(accounting_key(host), key, host)


class MemoryThrottleTests(unittest.TestCase):
    """The in-memory ILoginThrottle on its own."""

    def setUp(self):
        self.clock = task.Clock()
        self.throttle = MemoryLoginThrottle(
            self.clock, ThrottleSettings(failure_delay=1, failure_delay_max=15, max_failures=3)
        )

    def fail(self, user="alice", peer="192.0.2.7") -> float:
        self.assertTrue(self.throttle.begin(peer, user))
        return self.throttle.failed(peer, user)

    def test_interface(self):
        """The in-memory throttle provides ILoginThrottle."""
        verifyObject(ILoginThrottle, self.throttle)

    def test_attempts_in_flight_count(self):
        """Attempts not yet ended count against the limit, so parallel ones cannot pass it."""
        begun = [self.throttle.begin("192.0.2.7", "alice") for _ in range(5)]
        self.assertEqual(begun, [True, True, True, False, False])
        for _ in range(5):
            self.throttle.abandoned("192.0.2.7", "alice")
        self.assertTrue(self.throttle.begin("192.0.2.7", "alice"))

    def test_success_forgives_only_its_user(self):
        """A login forgives its own user's failures from the address, not another's."""
        self.fail("alice")
        self.fail("bob")
        self.assertTrue(self.throttle.begin("192.0.2.7", "bob"))
        self.throttle.succeeded("192.0.2.7", "bob")
        self.fail("alice")
        self.assertTrue(self.throttle.begin("192.0.2.7", "alice"))
        self.assertEqual(self.throttle.failed("192.0.2.7", "alice"), 4)
        self.assertFalse(self.throttle.begin("192.0.2.7", "bob"))

    def test_delay_doubles_up_to_cap(self):
        """Each failure from an address doubles the delay, up to the cap."""
        self.throttle.settings = ThrottleSettings(failure_delay=1, failure_delay_max=15)
        self.assertEqual([self.fail() for _ in range(6)], [1, 2, 4, 8, 15, 15])

    def test_quiet_spell_forgets(self):
        """After FAILURE_MEMORY quiet seconds an address starts afresh."""
        for _ in range(3):
            self.fail()
        self.clock.advance(self.throttle.memory + 1)
        self.assertEqual(self.fail(), 1)

    def test_memory_is_bounded(self):
        """At most max_peers addresses, and MAX_USERS_PER_PEER names per address, are kept."""
        self.throttle.max_peers = 5
        for i in range(20):
            self.fail(peer=f"192.0.2.{i}")
        self.assertEqual(len(self.throttle), 5)
        self.throttle.settings = ThrottleSettings(max_failures=1000)
        for i in range(100):
            self.fail(user=f"user{i}")
        self.assertLessEqual(len(self.throttle._peers["192.0.2.7"].failures), 16)

    def test_ended_attempts_leave_nothing(self):
        """An address whose attempts all ended well is not remembered."""
        self.throttle.begin("192.0.2.7", "alice")
        self.throttle.succeeded("192.0.2.7", "alice")
        self.throttle.begin("192.0.2.8", "alice")
        self.throttle.abandoned("192.0.2.8", "alice")
        self.assertEqual(len(self.throttle), 0)

    def test_login_delay(self):
        """With a LOGIN-DELAY a user's next login waits it out; old logins are forgotten."""
        self.throttle.settings = ThrottleSettings(login_delay=60)
        self.assertTrue(self.throttle.login_allowed("alice"))
        self.clock.advance(59)
        self.assertFalse(self.throttle.login_allowed("alice"))
        self.assertTrue(self.throttle.login_allowed("bob"))
        self.clock.advance(1)
        self.assertTrue(self.throttle.login_allowed("alice"))
        self.clock.advance(60)
        self.throttle.login_allowed("carol")
        self.assertEqual(list(self.throttle._logins), ["carol"])


class SchedulerTests(unittest.TestCase):
    """VerificationScheduler on its own: jobs are Deferreds the test fires."""

    def setUp(self):
        self.scheduler = VerificationScheduler(limit=2, queued_per_peer=3)
        self.started: list[tuple[str, int]] = []
        self.jobs: list[defer.Deferred] = []

    def submit(self, peer: str, n: int) -> defer.Deferred:
        def run():
            self.started.append((peer, n))
            d = defer.Deferred()
            self.jobs.append(d)
            return d

        return self.scheduler.submit(peer, run)

    def test_bounded(self):
        """No more than ``limit`` jobs run at once; a finished one lets the next start."""
        results = [self.submit("a", n) for n in range(3)]
        self.assertEqual((len(self.started), self.scheduler.running), (2, 2))
        self.jobs[0].callback("done")
        self.assertEqual(self.successResultOf(results[0]), "done")
        self.assertEqual(self.started, [("a", 0), ("a", 1), ("a", 2)])

    def test_round_robin(self):
        """Waiting jobs start in turn from each address, not in order of arrival."""
        for n in range(3):
            self.submit("flood", n)
        self.submit("flood2", 0)
        self.submit("flood2", 1)
        self.submit("quiet", 0)
        while self.jobs:
            self.jobs.pop(0).callback(None)
        self.assertEqual(
            self.started,
            [("flood", 0), ("flood", 1), ("flood", 2), ("flood2", 0), ("quiet", 0), ("flood2", 1)],
        )

    def test_queue_per_peer_is_bounded(self):
        """Past ``queued_per_peer`` waiting jobs, an address's next one fails with QueueFull."""
        for n in range(5):
            self.submit("a", n)
        self.failureResultOf(self.submit("a", 5), QueueFull)
        self.submit("b", 0)
        self.assertEqual(self.scheduler.waiting, 4)

    def test_cancelled_while_waiting_never_runs(self):
        """A waiting job that is cancelled is dropped and never started."""
        self.submit("a", 0)
        self.submit("a", 1)
        waiting = self.submit("b", 0)
        waiting.cancel()
        self.failureResultOf(waiting, defer.CancelledError)
        self.jobs[0].callback(None)
        self.jobs[1].callback(None)
        self.assertNotIn(("b", 0), self.started)
        self.assertEqual((self.scheduler.running, self.scheduler.waiting), (0, 0))

    def test_cancelled_while_running_keeps_its_slot(self):
        """A running job that is cancelled holds its slot until it really ends."""
        first = self.submit("a", 0)
        self.submit("a", 1)
        self.submit("b", 0)
        first.cancel()
        self.assertEqual(len(self.started), 2)
        self.jobs[0].callback("late")
        self.failureResultOf(first, defer.CancelledError)
        self.assertEqual(self.started[-1], ("b", 0))
