"""Login throttling: failure accounting per address and user, fair and bounded verification,
replies at a fixed time, SCRAM exchanges counted, addresses counted by their network.

Unit tests drive POP3 sessions over StringTransports with a ``task.Clock``; the attacks
that depend on real concurrency run against popserv on loopback (``LiveTests``) or a
real ``twistd popserv`` (``TwistdTests``), bounded in count and time.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
import stat
import threading
import time

import argon2
import scramp
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer, endpoints, reactor, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from popserv import auth, service
from popserv.config import Config
from popserv.limits import accounting_key
from popserv.pop3 import Reply
from popserv.realm import MaildropRealm
from popserv.scheduler import QueueFull, VerificationScheduler
from popserv.testing import run_at_once
from popserv.throttle import MemoryLoginThrottle, ThrottleSettings
from tests import live
from tests.live_twistd import TwistdServer
from tests.test_auth import CHEAP, write_file
from tests.test_pop3 import ControlledChecker, POP3TestCase, b64


class RecordingChecker:
    """The in-memory checker, noting each user name it is asked to check."""

    credentialInterfaces = InMemoryUsernamePasswordDatabaseDontUse.credentialInterfaces

    def __init__(self, **users):
        self._inner = InMemoryUsernamePasswordDatabaseDontUse(**users)
        self.checked: list[bytes] = []

    def requestAvatarId(self, credentials):
        self.checked.append(credentials.username)
        return self._inner.requestAvatarId(credentials)


class SlowChecker:
    """Refuses every password, after as many seconds of ``clock`` as its user's hash takes."""

    credentialInterfaces = InMemoryUsernamePasswordDatabaseDontUse.credentialInterfaces

    def __init__(self, clock, seconds: dict[bytes, float], unknown: float):
        self.clock = clock
        self.seconds = seconds
        self.unknown = unknown

    def requestAvatarId(self, credentials):
        def refuse():
            raise UnauthorizedLogin()

        took = self.seconds.get(credentials.username, self.unknown)
        return task.deferLater(self.clock, took, refuse)


class ThrottleCase(POP3TestCase):
    """A POP3 factory over a checker that records what it checks."""

    def setUp(self):
        super().setUp()
        self.checker = RecordingChecker(alice=b"secret", bob=b"hunter2")
        self.use_checker(self.checker)

    def use_checker(self, checker) -> None:
        self.factory.portal = Portal(MaildropRealm(self.store), [checker])

    def session_from(self, host: str):
        """A new session from ``host`` (an IPv4 or IPv6 address), greeting read."""
        kind = IPv6Address if ":" in host else IPv4Address
        self.peer = kind("TCP", host, 40000)
        proto, transport = self.connect()
        self.received(transport)
        return proto, transport

    def fail_from(self, host: str, password: bytes = b"wrong") -> bytes:
        """A wrong password (or the one given) for alice from ``host``; the final reply."""
        proto, transport = self.session_from(host)
        proto.dataReceived(b"USER alice\r\nPASS " + password + b"\r\n")
        self.clock.advance(30)
        reply = self.lines(transport)[-1]
        proto.connectionLost(None)
        return reply


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


class ServiceWiringTests(SynchronousTestCase):
    """make_service bounds hashing by ``[auth] max_verifications`` in the pool and the queue."""

    def test_verification_pool_and_queue_share_the_bound(self):
        """Hashes get max_verifications threads, SCRAM's derivation the same; the factory
        queues to as many."""
        root = os.path.abspath(self.mktemp())
        config = Config(
            mailroot=os.path.join(root, "mail"),
            users=os.path.join(root, "users"),
            state_dir=os.path.join(root, "state"),
            tls_self_signed_dir=os.path.join(root, "tls"),
            pop3_listen=("tcp:0:interface=127.0.0.1",),
            pop3s_listen=(),
            smtp_listen=(),
            auth_max_verifications=3,
        )
        top = service.make_service(config, reactor=MemoryReactorClock())
        verify = top.getServiceNamed("verify-threads").workers
        factory = top.getServiceNamed("pop3-0").factory
        self.assertEqual((verify.size, factory.verifications.limit), (3, 3))
        self.assertEqual(factory.userdb._run, verify.run)
        self.assertEqual(factory.run_in_thread, verify.run)
        with open(os.path.join(root, "state", "secret"), "rb") as f:
            self.assertEqual(factory.secret, f.read())


class OtherUsersLoginTests(ThrottleCase):
    """Item 4: a login forgives only its own user's failures from the address."""

    config = POP3TestCase.config.replace(pop3_max_failures=3, pop3_login_timeout=1000)

    def test_interleaved_logins_do_not_reset_guesses(self):
        """30 wrong passwords for alice, a login as bob after every second one: 3 are checked."""
        replies = []
        for guess in range(30):
            self.send(b"USER alice\r\nPASS guess%d\r\n" % guess)
            self.clock.advance(15)
            replies.append(self.lines()[-1])
            if guess % 2:
                proto, transport = self.connect()
                proto.dataReceived(b"USER bob\r\nPASS hunter2\r\nQUIT\r\n")
                proto.connectionLost(None)
        self.assertEqual(self.checker.checked.count(b"alice"), 3)
        self.assertEqual(replies[:3], [Reply.AUTH_FAILED] * 3)
        self.assertEqual(set(replies[3:]), {Reply.TOO_MANY_FAILURES})

    def test_own_login_forgives(self):
        """A user who logs in after two mistakes starts afresh: their next failure waits 1 s."""
        for _ in range(2):
            self.assertEqual(self.fail_from("192.0.2.7"), Reply.AUTH_FAILED)
        self.assertTrue(self.fail_from("192.0.2.7", b"secret").startswith(b"+OK Logged in"))
        proto, transport = self.session_from("192.0.2.7")
        proto.dataReceived(b"USER alice\r\nPASS wrong\r\n")
        self.clock.advance(1)
        self.assertEqual(self.lines(transport), [b"+OK", Reply.AUTH_FAILED])


class ParallelGuessTests(ThrottleCase):
    """Item 5: attempts count when they start, so parallel guesses cannot pass the limit."""

    config = POP3TestCase.config.replace(pop3_max_connections_per_peer=60)

    def test_parallel_guesses_stop_at_the_limit(self):
        """49 wrong PASS at once from one address: 10 are checked; a 50th, right, is refused."""
        checker = ControlledChecker()
        self.use_checker(checker)
        sessions = [self.session_from("192.0.2.7") for _ in range(50)]
        for proto, _ in sessions[:49]:
            proto.dataReceived(b"USER alice\r\nPASS wrong\r\n")
        sessions[49][0].dataReceived(b"USER alice\r\nPASS secret\r\n")
        checked = 0
        while checker.pending:
            credentials, d = checker.pending.pop(0)
            checked += 1
            if credentials.password == b"secret":
                d.callback(credentials.username.decode())
            else:
                d.errback(UnauthorizedLogin())
        self.clock.advance(60)
        self.assertEqual(checked, self.config.pop3_max_failures)
        last = self.lines(sessions[49][1])
        self.assertFalse(any(line.startswith(b"+OK Logged in") for line in last), last)
        self.assertFalse(self.store.is_locked("alice"))

    def test_a_burst_of_right_logins_is_not_counted_as_failures(self):
        """25 right PASS at once from one address (users behind one NAT): those past the
        limit wait their turn with a temporary reply, and count as no failure, so the
        address is not locked out afterwards.  (More verifications run at once than the
        limit, as across several workers or nodes, whose attempts all count.)"""
        self.config = self.config.replace(auth_max_verifications=30)
        self.factory.config = self.config
        checker = ControlledChecker()
        self.use_checker(checker)
        users = [f"user{n}" for n in range(25)]
        sessions = [self.session_from("192.0.2.7") for _ in users]
        for (proto, _), user in zip(sessions, users, strict=True):
            proto.dataReceived(b"USER %s\r\nPASS secret\r\n" % user.encode())
        refused = [t for _, t in sessions if Reply.TOO_MANY_LOGINS in t.value()]
        self.assertEqual(len(refused), 25 - self.config.pop3_max_failures)
        while checker.pending:
            credentials, d = checker.pending.pop(0)
            d.callback(credentials.username.decode())
        proto, transport = self.session_from("192.0.2.7")
        proto.dataReceived(b"USER late\r\nPASS secret\r\n")
        checker.pending.pop(0)[1].callback("late")
        self.assertTrue(self.lines(transport)[-1].startswith(b"+OK Logged in"))

    def test_waiting_logins_per_address_are_bounded(self):
        """Beyond the verifications running and max_waiting_per_peer, logins are refused."""
        self.config = self.config.replace(auth_max_waiting_per_peer=8)
        self.factory.config = self.config
        checker = ControlledChecker()
        self.use_checker(checker)
        sessions = [self.session_from("192.0.2.7") for _ in range(20)]
        for proto, _ in sessions:
            proto.dataReceived(b"USER alice\r\nPASS wrong\r\n")
        self.assertEqual(len(checker.pending), self.config.auth_max_verifications)
        refused = [t for _, t in sessions if Reply.TOO_MANY_LOGINS in t.value()]
        waiting = self.config.auth_max_waiting_per_peer
        self.assertEqual(len(refused), 20 - self.config.auth_max_verifications - waiting)


class FixedReplyTimeTests(ThrottleCase):
    """Item 6: a failed login's reply time does not depend on the user or the hash."""

    def test_reply_time_is_the_same_for_every_scheme(self):
        """Checks taking 0, 0.125 and 0.25 s (PLAIN, dummy Argon2id, bcrypt) all fail at 1 s."""
        self.use_checker(SlowChecker(self.clock, {b"alice": 0, b"carol": 0.25}, unknown=0.125))
        times = []
        for n, user in enumerate([b"alice", b"mallory", b"carol"]):
            proto, transport = self.session_from(f"192.0.2.{20 + n}")
            proto.dataReceived(b"USER " + user + b"\r\nPASS wrong\r\n")
            start = self.clock.seconds()
            while Reply.AUTH_FAILED not in transport.value():
                self.clock.advance(1 / 64)  # a binary fraction: the sums are exact
            times.append(self.clock.seconds() - start)
        self.assertEqual(times, [1.0, 1.0, 1.0])

    def test_slow_check_is_answered_when_done(self):
        """A check slower than the delay is answered as soon as it ends."""
        self.use_checker(SlowChecker(self.clock, {}, unknown=2.5))
        self.send(b"USER alice\r\nPASS wrong\r\n")
        self.clock.advance(2.25)
        self.assertEqual(self.lines(), [b"+OK"])
        self.clock.advance(0.25)
        self.assertEqual(self.lines(), [Reply.AUTH_FAILED])


class FairVerificationTests(ThrottleCase):
    """Item 7: few verifications at once, in turn per address; a leaver costs nothing."""

    config = POP3TestCase.config.replace(
        auth_max_verifications=1, auth_trusted_networks=("192.0.2.0/24", "198.51.100.0/24")
    )

    def setUp(self):
        super().setUp()
        self.checker = ControlledChecker()
        self.use_checker(self.checker)

    def test_a_client_that_leaves_while_waiting_costs_nothing(self):
        """A login whose client leaves while it waits its turn is never checked."""
        first, _ = self.session_from("192.0.2.7")
        first.dataReceived(b"USER alice\r\nPASS wrong\r\n")
        second, _ = self.session_from("192.0.2.8")
        second.dataReceived(b"USER bob\r\nPASS wrong\r\n")
        second.connectionLost(None)
        self.assertEqual(len(self.checker.pending), 1)
        self.checker.pending.pop(0)[1].errback(UnauthorizedLogin())
        self.assertEqual(self.checker.pending, [])
        self.assertEqual(self.factory.verifications.waiting, 0)

    def test_another_address_waits_one_turn(self):
        """Behind 8 logins from each of 3 addresses, one from a 4th is checked 4th, not 25th."""
        for host in ("192.0.2.7", "192.0.2.8", "192.0.2.9"):
            for _ in range(8):
                proto, _ = self.session_from(host)
                proto.dataReceived(b"USER mallory\r\nPASS x\r\n")
        proto, transport = self.session_from("198.51.100.1")
        proto.dataReceived(b"USER alice\r\nPASS secret\r\n")
        order = []
        while self.checker.pending:
            credentials, d = self.checker.pending.pop(0)
            order.append(credentials.username)
            if credentials.username == b"alice":
                d.callback("alice")
            else:
                d.errback(UnauthorizedLogin())
        self.assertEqual(order.index(b"alice"), 4)
        self.assertTrue(self.lines(transport)[-1].startswith(b"+OK Logged in"))


class ScramCancelTests(POP3TestCase):
    """Item 12: a SCRAM exchange cancelled after its client-first message is a failed login."""

    config = POP3TestCase.config.replace(
        auth_mechanisms=("SCRAM-SHA-256",), pop3_max_connections_per_peer=20
    )

    def setUp(self):
        super().setUp()
        self.patch(auth, "HASHER", CHEAP)
        path = self.mktemp()
        write_file(path, "alice:{PLAIN}secret\n")
        self.derivations = []
        userdb = auth.PasswdFile(path, run_at_once)
        scram = userdb.scram

        def counting_scram(user, mechanism="SCRAM-SHA-256"):
            self.derivations.append(user)
            return scram(user, mechanism)

        userdb.scram = counting_scram
        self.factory.userdb = userdb
        self.factory.portal = Portal(MaildropRealm(self.store), auth.checkers(userdb))
        self.factory.run_in_thread = lambda f, *args: defer.maybeDeferred(f, *args)

    def client_first(self, user="alice") -> bytes:
        return b"AUTH SCRAM-SHA-256 " + b64(b"n,,n=" + user.encode() + b",r=abcdefghijklmnop")

    def test_cancels_are_counted_and_logged(self):
        """Cancels after client-first are logged as sasl-cancelled and count to the lockout."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        replies = []
        for n in range(8 * 5):
            proto, transport = self.connect()
            self.received(transport)
            proto.dataReceived(self.client_first(["alice", "nobody"][n % 2]) + b"\r\n")
            if transport.value().startswith(b"+ "):
                proto.dataReceived(b"*\r\n")
            self.clock.advance(15)
            replies.append(self.lines(transport)[-1])
            proto.connectionLost(None)
        limit = self.config.pop3_max_failures
        self.assertEqual(len(self.derivations), limit)
        self.assertEqual(replies[:limit], [Reply.AUTH_CANCELLED] * limit)
        self.assertEqual(set(replies[limit:]), {Reply.TOO_MANY_FAILURES})
        reasons = [e["reason"] for e in events if e["log_format"].startswith("pop3.login_failed")]
        self.assertEqual(reasons[:limit], ["sasl-cancelled"] * limit)

    def test_leaving_mid_exchange_is_counted(self):
        """A client that hangs up after client-first has failed a login too."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.send(self.client_first() + b"\r\n")
        self.proto.connectionLost(None)
        [event] = [e for e in events if e["log_format"].startswith("pop3.login_failed")]
        self.assertEqual(
            (event["reason"], event["detail"]), ("sasl-cancelled", "connection closed")
        )
        self.assertEqual(self.factory.throttle._peers["192.0.2.7"].total, 1)

    def test_login_after_exchange_forgives(self):
        """A SCRAM login still works, and a cancel before client-first costs and counts nothing."""
        self.send(b"AUTH SCRAM-SHA-256\r\n")
        self.assert_reply(b"*\r\n", [Reply.AUTH_CANCELLED])
        client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "secret")
        self.send(b"AUTH SCRAM-SHA-256 " + b64(client.get_client_first().encode()) + b"\r\n")
        client.set_server_first(base64.b64decode(self.lines()[0][2:]).decode())
        self.send(b64(client.get_client_final().encode()) + b"\r\n")
        client.set_server_final(base64.b64decode(self.lines()[0][2:]).decode())
        self.send(b"\r\n")
        self.assertTrue(self.lines()[0].startswith(b"+OK Logged in"))
        self.assertEqual(len(self.factory.throttle), 0)


class AddressKeyTests(ThrottleCase):
    """Item 14: an address is counted by one key, for failures and connections alike."""

    config = POP3TestCase.config.replace(
        pop3_max_failures=3,
        pop3_max_connections_per_peer=2,
        auth_trusted_networks=("192.0.2.0/24", "2001:db8::/32"),
    )

    def test_mapped_and_plain_ipv4_share_a_count(self):
        """Failures from ::ffff:192.0.2.7 and 192.0.2.7 add up; logs show 192.0.2.7 for both."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertEqual(self.fail_from("::ffff:192.0.2.7"), Reply.AUTH_FAILED)
        self.assertEqual(self.fail_from("192.0.2.7"), Reply.AUTH_FAILED)
        self.assertEqual(self.fail_from("::ffff:192.0.2.7"), Reply.AUTH_FAILED)
        self.assertEqual(self.fail_from("192.0.2.7", b"secret"), Reply.TOO_MANY_FAILURES)
        peers = [e["peer"] for e in events if e["log_format"].startswith("pop3.login_failed")]
        self.assertEqual(peers, ["192.0.2.7"] * 4)

    def test_ipv6_counted_per_64(self):
        """Addresses of one IPv6 /64 share a count; another /64 does not."""
        for host in ("2001:db8:1:2::a", "2001:db8:1:2::b", "2001:db8:1:2:ffff::1"):
            self.assertEqual(self.fail_from(host), Reply.AUTH_FAILED)
        self.assertEqual(self.fail_from("2001:db8:1:2::c", b"secret"), Reply.TOO_MANY_FAILURES)
        self.assertTrue(self.fail_from("2001:db8:1:3::a", b"secret").startswith(b"+OK Logged in"))

    def test_connections_counted_by_the_same_key(self):
        """Per-address connection limits count a mapped address as its IPv4 address."""
        self.session_from("::ffff:192.0.2.7")
        _, transport = self.session_from("::ffff:192.0.2.7")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.factory.limiter.open, 2)


# -- real sockets --------------------------------------------------------------------------


class SleepyHasher(argon2.PasswordHasher):
    """Cheap Argon2 that also holds its thread a while, as a costly hash does.

    It counts the verifications and the most that ran at once.
    """

    def __init__(self, seconds: float):
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.seconds = seconds
        self.count = 0
        self.running = 0
        self.peak = 0
        self._lock = threading.Lock()

    def verify(self, hash, password):
        with self._lock:
            self.count += 1
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(self.seconds)
            return super().verify(hash, password)
        finally:
            with self._lock:
                self.running -= 1


def in_own_thread(f, *args) -> defer.Deferred:
    """Run blocking client code in a thread of its own, never waiting for one of a pool."""
    d = defer.Deferred()

    def run():
        try:
            result = f(*args)
        except BaseException:
            failure = Failure()
            reactor.callFromThread(d.errback, failure)
        else:
            reactor.callFromThread(d.callback, result)

    threading.Thread(target=run, daemon=True).start()
    return d


async def _pop3_login(port: int, source: str, user: bytes, password: bytes, sent=None) -> bytes:
    """One login from ``source``: the reply to PASS (``sent`` is set once PASS is out)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        await asyncio.wait_for(reader.readline(), 20)
        writer.write(b"USER " + user + b"\r\nPASS " + password + b"\r\n")
        await writer.drain()
        if sent is not None:
            sent.set()
        await asyncio.wait_for(reader.readline(), 20)
        return (await asyncio.wait_for(reader.readline(), 30)).rstrip(b"\r\n")
    finally:
        writer.close()


async def _flood_then_login(port, hosts, per_host, legit) -> tuple[list[bytes], bytes, int]:
    """Wrong logins from ``hosts`` all at once; then alice's from ``legit``, with how many
    of the flood's logins were answered before hers."""
    sent = [asyncio.Event() for _ in range(len(hosts) * per_host)]
    flood = [
        asyncio.create_task(_pop3_login(port, host, b"nobody%d" % n, b"wrong", sent[i]))
        for i, (host, n) in enumerate((h, n) for h in hosts for n in range(per_host))
    ]
    # A listen queue of 50 drops some of 256 connection attempts at once; the kernel's
    # retries (1 s, 3 s, 7 s, ...) can take a while on a busy machine.
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in sent)), 120)
    await asyncio.sleep(0.2)  # the server reads them all and queues their checks
    answered = sum(task.done() for task in flood)
    assert answered < len(flood) // 2, f"the flood was over ({answered} answered) before alice"
    reply = await _pop3_login(port, legit, b"alice", b"secret")
    ahead = sum(task.done() for task in flood) - answered
    return await asyncio.gather(*flood), reply, ahead


class LiveTests(unittest.TestCase):
    """Attacks that need real concurrency, against popserv on 127.x.y.z loopback addresses."""

    timeout = 180

    def start(self, seconds: float, **config) -> defer.Deferred:
        self.hasher = SleepyHasher(seconds)
        self.patch(auth, "HASHER", self.hasher)
        config.setdefault("pop3_failure_delay_max", 0.2)
        return live.start_server(self, {"alice": "secret"}, argon2=True, **config)

    @defer.inlineCallbacks
    def test_parallel_guesses_stop_at_the_limit(self):
        """49 wrong PASS at once from 127.0.5.1: 10 are checked; a 50th, right, is refused."""
        server = yield self.start(0.1, pop3_max_connections_per_peer=60)

        async def attack():
            sent = [asyncio.Event() for _ in range(49)]
            wrong = [
                asyncio.create_task(_pop3_login(server.port, "127.0.5.1", b"alice", b"x", e))
                for e in sent
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in sent)), 20)
            right = await _pop3_login(server.port, "127.0.5.1", b"alice", b"secret")
            return await asyncio.gather(*wrong), right

        wrong, right = yield in_own_thread(asyncio.run, attack())
        self.assertEqual(self.hasher.count, 10)
        self.assertFalse(right.startswith(b"+OK"), right)
        self.assertEqual(
            set(wrong) - {Reply.TOO_MANY_LOGINS, Reply.TOO_MANY_FAILURES}, {Reply.AUTH_FAILED}
        )

    @defer.inlineCallbacks
    def test_flood_from_some_addresses_does_not_hold_up_others(self):
        """256 wrong logins from 16 addresses: 4 checks at most at once; alice, from a 17th
        address, waits her turn among the addresses (16 checks), not the flood's 256."""
        server = yield self.start(0.1, pop3_max_connections_per_peer=20)
        hosts = [f"127.0.6.{n}" for n in range(1, 17)]
        flood, reply, ahead = yield in_own_thread(
            asyncio.run, _flood_then_login(server.port, hosts, 16, "127.0.9.1")
        )
        self.assertTrue(reply.startswith(b"+OK Logged in"), reply)
        # The turn under way when her PASS arrives and her own turn of the 16 addresses,
        # plus the checks already running (the 1.5 s this replaced allowed about 60);
        # first come, first served would put the flood's 200-odd ahead of her.
        self.assertLessEqual(ahead, 2 * 16 + 4)
        self.assertEqual(self.hasher.peak, 4)
        self.assertIn(Reply.AUTH_FAILED, flood)

    @defer.inlineCallbacks
    def test_mapped_and_plain_ipv4_share_a_count(self):
        """From 127.0.7.1, failures over IPv6 and IPv4 sockets add up, all logged as 127.0.7.1."""
        server = yield self.start(0, pop3_max_failures=3)
        endpoint = endpoints.serverFromString(reactor, r"tcp6:0:interface=\:\:ffff\:127.0.0.1")
        mapped = yield endpoint.listen(server.factory)
        self.addCleanup(mapped.stopListening)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

        def attempts():
            replies = []
            for port, password in [
                (mapped.getHost().port, b"x"),
                (server.port, b"x"),
                (mapped.getHost().port, b"x"),
                (server.port, b"secret"),
            ]:
                with socket.create_connection(("127.0.0.1", port), 10, ("127.0.7.1", 0)) as s:
                    f = s.makefile("rb")
                    f.readline()
                    s.sendall(b"USER alice\r\nPASS " + password + b"\r\nQUIT\r\n")
                    f.readline()
                    replies.append(f.readline().rstrip(b"\r\n"))
                    f.readline()
            return replies

        replies = yield in_own_thread(attempts)
        self.assertEqual(replies, [Reply.AUTH_FAILED] * 3 + [Reply.TOO_MANY_FAILURES])
        peers = [e["peer"] for e in events if e["log_format"].startswith("pop3.login_failed")]
        self.assertEqual(peers, ["127.0.7.1"] * 4)


# -- a real twistd ---------------------------------------------------------------------------


def scram_salt_of(port: int, user: str) -> bytes:
    """The salt popserv shows ``user`` in SCRAM-SHA-256's server-first message."""
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        f = s.makefile("rb")
        f.readline()
        first = b"n,,n=" + user.encode() + b",r=clientnonce0123"
        s.sendall(b"AUTH SCRAM-SHA-256 " + base64.b64encode(first) + b"\r\n")
        reply = f.readline()
        s.sendall(b"*\r\nQUIT\r\n")
        f.readline()
    assert reply.startswith(b"+ "), reply
    server_first = base64.b64decode(reply[2:]).decode()
    return base64.b64decode(re.search(r",s=([^,]+),", server_first).group(1))


class RSSSampler:
    """Reads a process's resident memory every few milliseconds, in a thread, keeping the peak."""

    def __init__(self, server: TwistdServer):
        self.server = server
        self.peak = server.rss_kib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.server.rss_kib())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


class TwistdTests(SynchronousTestCase):
    """Against a real ``twistd popserv`` with its own verification threads and state."""

    def test_flood_of_unknown_users_keeps_memory_bounded(self):
        """16 logins of unknown users at once (64 MiB Argon2id each): +5 checks' memory at most."""
        server = TwistdServer(
            self, {"alice": "secret"}, settings={"pop3": {"max_connections_per_peer": "20"}}
        )
        server.start()
        # The dummy hash is made at the first unknown user; lazy imports happen too.
        warm = asyncio.run(_pop3_login(server.pop3_port, "127.0.0.1", b"nobody", b"x"))
        self.assertEqual(warm, Reply.AUTH_FAILED)
        time.sleep(0.2)
        baseline = server.rss_kib()
        sampler = RSSSampler(server)
        hosts = [f"127.0.8.{n}" for n in range(1, 5)]
        flood, reply, _ = asyncio.run(_flood_then_login(server.pop3_port, hosts, 4, "127.0.9.1"))
        peak = sampler.stop()
        self.assertTrue(reply.startswith(b"+OK Logged in"), reply)
        self.assertEqual(set(flood), {Reply.AUTH_FAILED})
        growth_mib = (peak - baseline) / 1024
        self.assertLess(growth_mib, 5 * 64, f"grew by {growth_mib:.0f} MiB")

    def test_made_up_salts_survive_a_restart(self):
        """After a restart, unknown users keep their SCRAM salts, as users with keys do."""
        server = TwistdServer(
            self, {"alice": "secret"}, settings={"auth": {"mechanisms": "SCRAM-SHA-256"}}
        )
        with open(server.users_path, "a", encoding="utf-8") as f:
            f.write("sam:" + auth.hash_password("pencil", "SCRAM-SHA-256") + "\n")
        users = ["alice", "sam", "nobody"]
        server.start()
        before = [scram_salt_of(server.pop3_port, user) for user in users]
        server.stop()
        server.start()
        after = [scram_salt_of(server.pop3_port, user) for user in users]
        self.assertEqual(before, after)
        self.assertEqual(len(set(before)), 3)
        state = os.path.join(server.root, "state")
        secret = os.path.join(state, "secret")
        self.assertEqual(stat.S_IMODE(os.stat(state).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(secret).st_mode), 0o600)
        self.assertEqual(os.path.getsize(secret), 32)
