"""The throttle and connection limits that several worker processes share (popserv.sharedstate).

Each contract runs against the in-memory implementation and the SQLite one (the
throttle's also against PostgreSQL's, popserv.pgstate), so the shared versions cannot
drift from the one a single process uses.  "Two workers" are two
connections to one database file with different pids, as two processes have.
"""

import os
import sqlite3
import stat

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from popserv.interfaces import BUSY, IConnectionLimiter, ILoginThrottle
from popserv.limits import DESCRIPTORS, IN_ALL, PER_PEER, ConnectionLimiter
from popserv.pgdb import Database, ensure_schema
from popserv.pgstate import PostgresLoginThrottle
from popserv.sharedstate import (
    SHARED_STATE_FILE,
    SharedConnectionLimiter,
    SharedLoginThrottle,
    forget_process,
    forget_processes_except,
    open_database,
    prune,
)
from popserv.throttle import FAILURE_MEMORY, MemoryLoginThrottle, ThrottleSettings
from tests.live_pg import shared_server

SETTINGS = ThrottleSettings(failure_delay=1, failure_delay_max=15, max_failures=3)


class SharedFile:
    """A fresh shared-state file for a test, opened by as many "workers" as asked."""

    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.path = os.path.join(directory, SHARED_STATE_FILE)

    def open(self) -> sqlite3.Connection:
        db = open_database(self.path)
        self.addCleanup(db.close)
        return db


class ThrottleContract:
    """What every ILoginThrottle does; ``make(clock, settings)`` builds the one tested."""

    def setUp(self):
        super().setUp()
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.throttle = self.make(self.clock, SETTINGS)

    def fail(self, user="alice", peer="192.0.2.7", throttle=None) -> float:
        throttle = throttle or self.throttle
        self.assertTrue(throttle.begin(peer, user))
        return throttle.failed(peer, user)

    def test_interface(self):
        """It provides ILoginThrottle."""
        verifyObject(ILoginThrottle, self.throttle)

    def test_attempts_in_flight_count(self):
        """Attempts not yet ended count against the limit, so parallel ones cannot pass it."""
        begun = [self.throttle.begin("192.0.2.7", "alice") for _ in range(5)]
        # Refused for now (BUSY: false), not locked out: no failure is recorded yet.
        self.assertEqual(begun, [True, True, True, BUSY, BUSY])
        for _ in range(5):
            self.throttle.abandoned("192.0.2.7", "alice")
        self.assertTrue(self.throttle.begin("192.0.2.7", "alice"))

    def test_lockout_and_other_addresses(self):
        """Past max_failures an address is refused; another address is not."""
        for _ in range(3):
            self.fail()
        self.assertIs(self.throttle.begin("192.0.2.7", "alice"), False)
        self.throttle.failed("192.0.2.7", "alice")
        self.assertTrue(self.throttle.begin("192.0.2.8", "alice"))

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

    def test_unknown_user_is_its_own_count(self):
        """Failures without a user name are never forgiven by a user's login."""
        self.fail(None)
        self.fail(None)
        self.assertTrue(self.throttle.begin("192.0.2.7", "alice"))
        self.throttle.succeeded("192.0.2.7", "alice")
        self.assertEqual(self.fail(None), 4)

    def test_delay_doubles_up_to_cap(self):
        """Each failure from an address doubles the delay, up to the cap."""
        self.throttle.settings = ThrottleSettings(failure_delay=1, failure_delay_max=15)
        self.assertEqual([self.fail() for _ in range(6)], [1, 2, 4, 8, 15, 15])

    def test_quiet_spell_forgets(self):
        """After FAILURE_MEMORY quiet seconds an address starts afresh."""
        for _ in range(3):
            self.fail()
        self.clock.advance(FAILURE_MEMORY + 1)
        self.assertEqual(self.fail(), 1)

    def test_many_user_names_share_one_count(self):
        """Beyond MAX_USERS_PER_PEER names, further names' failures are never forgiven."""
        self.throttle.settings = ThrottleSettings(max_failures=1000)
        for i in range(20):
            self.fail(f"user{i}")
        self.assertTrue(self.throttle.begin("192.0.2.7", "user19"))
        self.throttle.succeeded("192.0.2.7", "user19")
        self.assertEqual(self.fail("user0"), 15)

    def test_login_delay(self):
        """With a LOGIN-DELAY a user's next login waits it out."""
        self.throttle.settings = ThrottleSettings(login_delay=60)
        self.assertTrue(self.throttle.login_allowed("alice"))
        self.clock.advance(59)
        self.assertFalse(self.throttle.login_allowed("alice"))
        self.assertTrue(self.throttle.login_allowed("bob"))
        self.clock.advance(1)
        self.assertTrue(self.throttle.login_allowed("alice"))
        self.assertFalse(self.throttle.login_allowed("alice"))


class MemoryThrottleContractTests(ThrottleContract, SynchronousTestCase):
    def make(self, clock, settings):
        return MemoryLoginThrottle(clock, settings)


class SharedThrottleContractTests(ThrottleContract, SharedFile, SynchronousTestCase):
    def make(self, clock, settings):
        return SharedLoginThrottle(self.open(), clock, settings, pid=1001)


class BlockingDatabase(Database):
    """The shared PostgreSQL with each call made at once in the test's thread."""

    def run(self, f, *args):
        return defer.maybeDeferred(self.call, f, *args)


class Resolved:
    """A throttle whose Deferreds (fired at once) are replaced by their results."""

    def __init__(self, throttle, testcase):
        self.__dict__.update(wrapped=throttle, testcase=testcase)

    def __getattr__(self, name):
        value = getattr(self.wrapped, name)
        if not callable(value):
            return value

        def resolved(*args):
            result = value(*args)
            if isinstance(result, defer.Deferred):
                return self.testcase.successResultOf(result)
            return result

        return resolved

    def __setattr__(self, name, value):
        setattr(self.wrapped, name, value)


def blocking_database(testcase) -> BlockingDatabase:
    """A fresh database with popserv's schema on the process's PostgreSQL."""
    database = BlockingDatabase(shared_server().new_database(), None)
    testcase.addCleanup(database.stop)
    database.call(ensure_schema)
    return database


class PostgresThrottleContractTests(ThrottleContract, SynchronousTestCase):
    def make(self, clock, settings):
        throttle = PostgresLoginThrottle(
            blocking_database(self), clock, settings, node="node1", pid=1001
        )
        return Resolved(throttle, self)

    def test_interface(self):
        """It provides ILoginThrottle."""
        verifyObject(ILoginThrottle, self.throttle.wrapped)


class SharedThrottleTests(SharedFile, SynchronousTestCase):
    """Two workers' throttles over one file count as one."""

    def setUp(self):
        super().setUp()
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.one = SharedLoginThrottle(self.open(), self.clock, SETTINGS, pid=1001)
        self.two = SharedLoginThrottle(self.open(), self.clock, SETTINGS, pid=1002)

    def test_failures_on_both_workers_add_up(self):
        """Failures counted by one worker lock the address out on the other."""
        self.assertTrue(self.one.begin("192.0.2.7", "alice"))
        self.assertEqual(self.one.failed("192.0.2.7", "alice"), 1)
        self.assertTrue(self.two.begin("192.0.2.7", "alice"))
        self.assertEqual(self.two.failed("192.0.2.7", "alice"), 2)
        self.assertTrue(self.one.begin("192.0.2.7", "alice"))
        self.assertEqual(self.one.failed("192.0.2.7", "alice"), 4)
        self.assertFalse(self.two.begin("192.0.2.7", "alice"))
        self.assertTrue(self.two.begin("192.0.2.8", "alice"))

    def test_attempts_in_flight_on_both_workers_count(self):
        """Attempts being verified by either worker count against the limit."""
        self.assertTrue(self.one.begin("192.0.2.7", "alice"))
        self.assertTrue(self.two.begin("192.0.2.7", "alice"))
        self.assertTrue(self.one.begin("192.0.2.7", "alice"))
        self.assertFalse(self.two.begin("192.0.2.7", "alice"))

    def test_a_dead_workers_attempts_are_dropped(self):
        """forget_process drops the attempts a worker had under way, no one else's."""
        db = self.open()
        for _ in range(2):
            self.assertTrue(self.one.begin("192.0.2.7", "alice"))
        self.assertTrue(self.two.begin("192.0.2.7", "alice"))
        self.assertFalse(self.two.begin("192.0.2.7", "alice"))
        forget_process(db, 1001)
        self.assertTrue(self.two.begin("192.0.2.7", "alice"))
        self.assertFalse(self.two.begin("192.0.2.7", "alice"))

    def test_login_delay_holds_across_workers(self):
        """A login on one worker makes the user wait out LOGIN-DELAY on the other."""
        self.one.settings = self.two.settings = ThrottleSettings(login_delay=60)
        self.assertTrue(self.one.login_allowed("alice"))
        self.assertFalse(self.two.login_allowed("alice"))

    def test_prune_forgets_quiet_addresses_and_old_logins(self):
        """prune removes the failures of addresses quiet for FAILURE_MEMORY and old logins."""
        db = self.open()
        self.one.settings = ThrottleSettings(login_delay=60)
        self.one.login_allowed("alice")
        self.fail_on(self.one, "192.0.2.7")
        self.clock.advance(FAILURE_MEMORY + 1)
        self.fail_on(self.one, "192.0.2.8")
        prune(db, self.clock.seconds(), login_delay=60)
        self.assertEqual(list(db.execute("SELECT peer FROM login_peers")), [("192.0.2.8",)])
        self.assertEqual(list(db.execute("SELECT * FROM last_logins")), [])
        self.assertEqual(list(db.execute("SELECT * FROM login_attempts")), [])

    def test_prune_bounds_the_addresses(self):
        """Beyond max_peers addresses, prune forgets the longest quiet first."""
        db = self.open()
        for i in range(10):
            self.fail_on(self.one, f"192.0.2.{i}")
            self.clock.advance(1)
        prune(db, self.clock.seconds(), max_peers=3)
        kept = sorted(db.execute("SELECT peer FROM login_peers"))
        self.assertEqual(kept, [("192.0.2.7",), ("192.0.2.8",), ("192.0.2.9",)])

    def fail_on(self, throttle, peer):
        self.assertTrue(throttle.begin(peer, "alice"))
        throttle.failed(peer, "alice")


class LimiterContract:
    """What every IConnectionLimiter does; ``make(in_all, per_peer, **kw)`` builds one."""

    def test_interface(self):
        """It provides IConnectionLimiter."""
        verifyObject(IConnectionLimiter, self.make(10, 10))

    def test_per_client_by_accounting_key(self):
        """An IPv4 address and its IPv4-mapped form, or two addresses of one IPv6 /64,
        are one client."""
        limiter = self.make(100, 2)
        self.assertIsNone(limiter.opened("192.0.2.7"))
        self.assertIsNone(limiter.opened("::ffff:192.0.2.7"))
        self.assertEqual(limiter.opened("192.0.2.7"), PER_PEER)
        self.assertIsNone(limiter.opened("2001:db8::1"))
        self.assertIsNone(limiter.opened("2001:db8::ffff:2"))
        self.assertEqual(limiter.opened("2001:db8:0:0:1::3"), PER_PEER)
        self.assertIsNone(limiter.opened("2001:db8:0:1::1"))
        limiter.closed("::ffff:192.0.2.7")
        self.assertIsNone(limiter.opened("192.0.2.7"))
        self.assertEqual(limiter.open, 5)

    def test_in_all(self):
        """Past the total, any client is refused; a closed connection frees its place."""
        limiter = self.make(2, 10)
        self.assertIsNone(limiter.opened("192.0.2.1"))
        self.assertIsNone(limiter.opened("192.0.2.2"))
        self.assertEqual(limiter.opened("192.0.2.3"), IN_ALL)
        limiter.closed("192.0.2.1")
        self.assertIsNone(limiter.opened("192.0.2.3"))

    def test_per_peer_is_named_before_in_all(self):
        """A client over both limits is told it is over its own."""
        limiter = self.make(1, 1)
        self.assertIsNone(limiter.opened("192.0.2.1"))
        self.assertEqual(limiter.opened("192.0.2.1"), PER_PEER)

    def test_descriptor_reserve(self):
        """A connection that would leave less than the reserve of descriptors free is refused."""
        limiter = self.make(
            1000, 1000, reserve=0.25, files_per_connection=2, file_limit=lambda: 100
        )
        # Socket 60 and below in use, plus two files for this connection: 37 free.
        self.assertIsNone(limiter.opened("192.0.2.1", 60))
        # Socket 72, plus two files for each of two connections: 23 free, under 25.
        self.assertEqual(limiter.opened("192.0.2.2", 72), DESCRIPTORS)
        self.assertIsNone(limiter.opened("192.0.2.2", -1))


class MemoryLimiterContractTests(LimiterContract, SynchronousTestCase):
    def make(self, in_all, per_peer, **kw):
        return ConnectionLimiter(in_all, per_peer, **kw)


class SharedLimiterContractTests(LimiterContract, SharedFile, SynchronousTestCase):
    def make(self, in_all, per_peer, **kw):
        return SharedConnectionLimiter(self.open(), "pop3", in_all, per_peer, pid=1001, **kw)


class SharedLimiterTests(SharedFile, SynchronousTestCase):
    """Two workers' limiters over one file count as one, per service."""

    def limiter(self, pid, service="pop3", in_all=3, per_peer=2):
        return SharedConnectionLimiter(self.open(), service, in_all, per_peer, pid=pid)

    def test_limits_hold_across_workers(self):
        """Connections on either worker count toward the same per-client and total limits."""
        one, two = self.limiter(1001), self.limiter(1002)
        self.assertIsNone(one.opened("192.0.2.7"))
        self.assertIsNone(two.opened("192.0.2.7"))
        self.assertEqual(one.opened("192.0.2.7"), PER_PEER)
        self.assertIsNone(one.opened("192.0.2.8"))
        self.assertEqual(two.opened("192.0.2.9"), IN_ALL)
        two.closed("192.0.2.7")
        self.assertIsNone(one.opened("192.0.2.7"))
        self.assertEqual((one.open, two.open), (3, 0))

    def test_services_count_apart(self):
        """POP3 and SMTP connections are limited separately."""
        pop3, smtp = self.limiter(1001, "pop3"), self.limiter(1001, "smtp")
        self.assertIsNone(pop3.opened("192.0.2.7"))
        self.assertIsNone(pop3.opened("192.0.2.7"))
        self.assertIsNone(smtp.opened("192.0.2.7"))

    def test_a_dead_workers_connections_are_dropped(self):
        """forget_process frees the places a killed worker's connections held."""
        one, two = self.limiter(1001), self.limiter(1002)
        one.opened("192.0.2.7")
        one.opened("192.0.2.7")
        self.assertEqual(two.opened("192.0.2.7"), PER_PEER)
        forget_process(self.open(), 1001)
        self.assertIsNone(two.opened("192.0.2.7"))

    def test_processes_gone_are_forgotten(self):
        """forget_processes_except drops the rows of every pid that is not alive."""
        db = self.open()
        self.limiter(1001).opened("192.0.2.7")
        self.limiter(1002).opened("192.0.2.8")
        SharedLoginThrottle(db, task.Clock(), pid=1003).begin("192.0.2.9", "alice")
        self.assertEqual(forget_processes_except(db, lambda pid: pid == 1002), [1001, 1003])
        self.assertEqual(sorted(db.execute("SELECT DISTINCT pid FROM connections")), [(1002,)])
        self.assertEqual(list(db.execute("SELECT * FROM login_attempts")), [])

    def test_database_error_refuses(self):
        """When the database cannot be used, the connection is refused as over the total."""
        db = self.open()
        limiter = SharedConnectionLimiter(db, "pop3", 10, 10, pid=1001)
        db.close()
        self.assertEqual(limiter.opened("192.0.2.7"), IN_ALL)
        self.assertEqual(limiter.open, 0)

    def test_file_is_private_and_in_wal_mode(self):
        """The database file is mode 0600 and journals in WAL mode."""
        db = self.open()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone(), ("wal",))
