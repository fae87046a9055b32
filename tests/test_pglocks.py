"""Maildrop locks across nodes (popserv.pglocks), against a real PostgreSQL, and what a
POP3 session does when its lock goes."""

from __future__ import annotations

import os
import time

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from popserv import pop3
from popserv.interfaces import (
    IMaildropLease,
    IMaildropLocks,
    LockLost,
    LockUnavailable,
    MaildropLocked,
)
from popserv.maildir import FileLocks, MaildirStore
from popserv.pglocks import NAMESPACE, AdvisoryLocks, cluster_locks, lock_key
from popserv.pop3 import Reply
from popserv.realm import MaildropRealm
from popserv.workers import Workers
from tests.live_pg import shared_server
from tests.live_smtp import free_port
from tests.test_pop3 import MSG1, POP3TestCase

#: Short, so that a silent connection is ended within the test (beats every 0.375 s),
#: yet long enough that a loaded machine never starves a live heartbeat that long.
TIMEOUT = 1.5


@defer.inlineCallbacks
def wait_until(predicate, timeout: float = 10.0, step: float = 0.05):
    """Poll ``predicate`` on the reactor until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {predicate}")
        yield task.deferLater(reactor, step, lambda: None)


class LockKeyTests(TestCase):
    """Each maildrop has one key in popserv's own key space."""

    def test_spellings_of_one_maildir_share_a_key(self):
        """Names that may be one directory (case, the domain's case) are one lock."""
        self.assertEqual(lock_key("Alice"), lock_key("alice"))
        self.assertEqual(lock_key("bob@Example.ORG"), lock_key("bob@example.org"))

    def test_keys_are_signed_32_bit_and_spread(self):
        """Keys fit PostgreSQL's int4 form, and distinct users get distinct keys."""
        keys = {lock_key(f"user{n}") for n in range(1000)}
        self.assertEqual(len(keys), 1000)
        self.assertTrue(all(-(2**31) <= key < 2**31 for key in keys))

    def test_namespace_is_int4(self):
        self.assertLess(NAMESPACE, 2**31)


class DatabaseTestCase(TestCase):
    """A database of the test's own, a mail root, and processes' locks over them."""

    def setUp(self):
        self.server = shared_server()
        self.url = self.server.new_database()
        self.dbname = self.url.rsplit("/", 1)[1]
        self.maildir = os.path.abspath(self.mktemp())
        os.makedirs(self.maildir)

    def locks(self, node: str, start: bool = True, timeout: float = TIMEOUT) -> AdvisoryLocks:
        locks = AdvisoryLocks(
            self.url, reactor, FileLocks(f"popserv.lock.{node}"), timeout=timeout, name=node
        )
        if start:
            locks.start()
        self.addCleanup(locks.stop)
        return locks

    def advisory_holders(self, user: str = "alice") -> list[int]:
        """The backends holding ``user``'s lock, as pg_locks shows them."""
        key = lock_key(user) & 0xFFFFFFFF
        rows = self.server.psql(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            f" AND classid = {NAMESPACE} AND objid = {key} AND objsubid = 2",
            self.dbname,
        )
        return [int(pid) for pid in rows.split()]


class AdvisoryLockTests(DatabaseTestCase):
    """Two processes' locks over one database: one session per maildrop among them."""

    def test_interfaces(self):
        locks = self.locks("a")
        verifyObject(IMaildropLocks, locks)
        lease = locks.lock("alice", self.maildir)
        self.addCleanup(lease.release)
        verifyObject(IMaildropLease, lease)

    @defer.inlineCallbacks
    def test_one_holder_across_processes(self):
        """The second process gets MaildropLocked; once released, it gets the lock."""
        first, second = self.locks("a"), self.locks("b")
        lease = first.lock("alice", self.maildir)
        self.assertEqual(self.advisory_holders(), [first.backend])
        self.assertRaises(MaildropLocked, second.lock, "alice", self.maildir)
        other = second.lock("bob", self.maildir)
        yield other.release()
        yield lease.release()
        self.assertEqual(self.advisory_holders(), [])
        again = second.lock("alice", self.maildir)
        self.assertEqual(self.advisory_holders(), [second.backend])
        yield again.release()

    @defer.inlineCallbacks
    def test_local_guard_within_a_process(self):
        """PostgreSQL would let one connection lock twice; the local flock does not."""
        locks = self.locks("a")
        lease = locks.lock("alice", self.maildir)
        self.assertRaises(MaildropLocked, locks.lock, "alice", self.maildir)
        # The refusal took nothing: one release frees the maildrop for everyone.
        yield lease.release()
        self.assertEqual(self.advisory_holders(), [])
        yield self.locks("b").lock("alice", self.maildir).release()

    @defer.inlineCallbacks
    def test_refused_by_database_releases_local_guard(self):
        """A lock another process holds leaves this process's flock free."""
        first, second = self.locks("a"), self.locks("b")
        lease = first.lock("alice", self.maildir)
        self.assertRaises(MaildropLocked, second.lock, "alice", self.maildir)
        yield lease.release()
        FileLocks("popserv.lock.b").lock("alice", self.maildir).release()

    @defer.inlineCallbacks
    def test_terminated_backend_loses_locks(self):
        """A lock connection the server ends: its sessions are told, their verify fails,
        the others get the maildrop, and the next lock reconnects."""
        first, second = self.locks("a"), self.locks("b")
        lease = first.lock("alice", self.maildir)
        lost = []
        lease.when_lost(lambda: lost.append(True))
        lease.verify()
        old_backend = first.backend
        self.server.psql(f"SELECT pg_terminate_backend({old_backend})", self.dbname)
        yield wait_until(lambda: lost)
        self.assertEqual(lost, [True])
        self.assertRaises(LockLost, lease.verify)
        taken = second.lock("alice", self.maildir)
        yield lease.release()
        self.assertRaises(MaildropLocked, first.lock, "alice", self.maildir)
        self.assertNotIn(first.backend, (None, old_backend))
        yield taken.release()
        yield first.lock("alice", self.maildir).release()

    @defer.inlineCallbacks
    def test_silent_process_loses_locks_after_timeout(self):
        """A process whose heartbeat stops (stopped, hung) loses its locks within the
        timeout: the server ends its idle connection."""
        silent = self.locks("a", start=False)
        second = self.locks("b")
        lease = silent.lock("alice", self.maildir)
        self.assertRaises(MaildropLocked, second.lock, "alice", self.maildir)
        yield wait_until(lambda: self.advisory_holders() == [], timeout=TIMEOUT + 5)
        taken = second.lock("alice", self.maildir)
        self.assertRaises(LockLost, lease.verify)
        yield taken.release()

    @defer.inlineCallbacks
    def test_heartbeat_keeps_locks(self):
        """A live process keeps its locks well past the idle timeout."""
        locks = self.locks("a")
        lease = locks.lock("alice", self.maildir)
        yield task.deferLater(reactor, TIMEOUT * 2, lambda: None)
        lease.verify()
        self.assertEqual(self.advisory_holders(), [locks.backend])
        yield lease.release()

    def test_unreachable_database(self):
        """No server: LockUnavailable, and the local guard is free again."""
        locks = AdvisoryLocks(
            f"postgresql://nobody@127.0.0.1:{free_port()}/none",
            reactor,
            FileLocks("popserv.lock.a"),
            timeout=TIMEOUT,
        )
        self.addCleanup(locks.stop)
        self.assertRaises(LockUnavailable, locks.lock, "alice", self.maildir)
        FileLocks("popserv.lock.a").lock("alice", self.maildir).release()
        # Right after a failure, the next login is told at once, without another try.
        import psycopg

        self.patch(psycopg, "connect", lambda *args, **kwargs: self.fail("connected again"))
        self.assertRaises(LockUnavailable, locks.lock, "alice", self.maildir)

    def test_cluster_locks_use_a_lock_file_per_node(self):
        """Nodes on one host never wait on each other's flock, only on the database."""
        locks = cluster_locks(self.url, "node7", reactor, TIMEOUT)
        self.assertEqual(locks.local.name, "popserv.lock.node7")
        self.assertEqual(locks.timeout, TIMEOUT)


class StoreTests(DatabaseTestCase):
    """A MaildirStore with advisory locks: a maildrop whose lock is lost commits nothing."""

    def store(self, node: str) -> MaildirStore:
        workers = Workers(reactor, 2, "test-maildrop")
        self.addCleanup(workers.stop)
        return MaildirStore(self.maildir, workers.run, locks=self.locks(node))

    def deliver(self, name: str) -> str:
        store = MaildirStore(self.maildir)
        path = os.path.join(store.create("alice"), "new", name)
        with open(path, "wb") as f:
            f.write(MSG1)
        return path

    @defer.inlineCallbacks
    def test_lost_lock_commits_nothing(self):
        path = self.deliver("1700000000.M1P1Q1.test")
        first, second = self.store("a"), self.store("b")
        maildrop = yield first.open_maildrop("alice")
        lost = []
        maildrop.when_lost(lambda: lost.append(True))
        yield self.assertFailure(second.open_maildrop("alice"), MaildropLocked)
        self.server.psql(f"SELECT pg_terminate_backend({first.locks.backend})", self.dbname)
        yield wait_until(lambda: lost)
        yield self.assertFailure(maildrop.commit([0]), LockLost)
        self.assertTrue(os.path.exists(path))
        yield maildrop.close()
        other = yield second.open_maildrop("alice")
        self.assertEqual(len(other.messages()), 1)
        yield other.close()

    @defer.inlineCallbacks
    def test_close_fires_once_released(self):
        """``close`` fires when the other process can have the maildrop."""
        first, second = self.store("a"), self.store("b")
        maildrop = yield first.open_maildrop("alice")
        yield maildrop.close()
        other = yield second.open_maildrop("alice")
        yield other.close()


class LostLockSessionTests(POP3TestCase):
    """A POP3 session whose maildrop lock is lost ends at once and deletes nothing."""

    def test_lost_lock_ends_session(self):
        """-ERR [SYS/TEMP], the connection closed, and the DELE marks never committed."""
        self.login()
        self.send(b"DELE 1\r\n")
        self.received()
        maildrop = self.store.opened[-1]
        maildrop.lose_lock()
        self.assertEqual(self.lines(), [Reply.LOCK_LOST])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.proto.state, pop3.UPDATE)
        self.assertTrue(maildrop.closed)
        self.assertFalse(maildrop.committed)
        self.assertEqual(len(self.store.mailboxes["alice"]), 3)

    def test_quit_after_lost_lock_commits_nothing(self):
        """A QUIT whose commit finds the lock gone answers -ERR [SYS/TEMP]."""
        self.login()
        self.send(b"DELE 1\r\n")
        maildrop = self.store.opened[-1]
        maildrop.lock_lost = True  # lost, and the session not told yet
        self.received()
        self.send(b"QUIT\r\n")
        self.assertEqual(self.lines(), [Reply.LOCK_LOST])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(len(self.store.mailboxes["alice"]), 3)
        self.assertEqual(maildrop.removed, [])

    def test_lock_unavailable_at_login(self):
        """A lock that cannot be taken now (the database is down) is -ERR [SYS/TEMP]."""
        self.store.open_maildrop = lambda user, policy=None: defer.fail(LockUnavailable())
        self.received()
        self.send(b"USER alice\r\nPASS secret\r\n")
        self.assertEqual(self.lines(), [b"+OK", Reply.TEMP_FAILURE])
        self.assertEqual(self.proto.state, pop3.AUTHORIZATION)

    def test_quit_waits_for_the_release(self):
        """QUIT's +OK goes out once the lock is released, not before."""
        released = defer.Deferred()
        store = self.store

        class SlowRelease(MaildropRealm):
            def requestAvatar(self, avatarId, mind, *interfaces):
                d = super().requestAvatar(avatarId, mind, *interfaces)
                return d.addCallback(lambda avatar: (*avatar[:2], lambda: released))

        self.portal.realm = SlowRelease(store)
        self.login()
        self.send(b"QUIT\r\n")
        self.assertEqual(self.received(), b"")
        released.callback(None)
        self.assertEqual(self.lines(), [Reply.LOGGING_OUT % 0])
