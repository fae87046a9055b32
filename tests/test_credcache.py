"""The verified-password cache: a password that passed a slow hash skips it at the next login.

Unit tests run a ``PasswdFile`` over real (cheap) Argon2id and bcrypt hashes, with a
``task.Clock`` for the cache's time and a runner that counts the slow verifications.
The same tests run over the store the workers of a host share (SQLite), and "two
workers" are two caches over one database file; live tests log in through a real
``twistd popserv``, of one process and of two workers, and read the counts from /metrics.
"""

from __future__ import annotations

import base64
import hashlib
import os
import poplib
import sqlite3

from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, task
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from popserv import auth
from popserv.credcache import MemoryDigests, VerifiedPasswords
from popserv.interfaces import IVerifiedDigests
from popserv.metrics import Metrics
from popserv.sharedstate import (
    SHARED_STATE_FILE,
    SharedDigests,
    forget_verified,
    open_database,
    prune,
)
from popserv.testing import run_at_once
from tests.live_smtp import free_port
from tests.live_twistd import TwistdServer
from tests.test_auth import CHEAP, write_file
from tests.test_metrics import sample, scrape
from tests.test_multiproc import Client, WorkersServer

TTL = 3600.0


def ssha256(password: bytes) -> str:
    """A Dovecot ``{SSHA256}`` value of ``password``."""
    salt = os.urandom(8)
    return base64.b64encode(hashlib.sha256(password + salt).digest() + salt).decode()


class CountingRun:
    """A fake ``Workers.run``: runs the real verifier at once, counting each call."""

    def __init__(self):
        self.calls = 0

    def __call__(self, f, *args):
        self.calls += 1
        return run_at_once(f, *args)


class CacheTestCase(SynchronousTestCase):
    """A users file of Argon2id (cheap parameters) users, checked through a cache."""

    ttl = TTL
    size = 10000

    def setUp(self):
        self.patch(auth, "HASHER", CHEAP)
        auth.BCRYPT_ROUNDS, old_rounds = 4, auth.BCRYPT_ROUNDS
        self.addCleanup(setattr, auth, "BCRYPT_ROUNDS", old_rounds)
        self.path = self.mktemp()
        self.set_users(alice="pw-alice", bob="pw-bob", carol="pw-carol")
        self.clock = task.Clock()
        self.metrics = Metrics()
        self.cache = self.make_cache(self.metrics)
        self.run = CountingRun()
        self.db = auth.PasswdFile(self.path, self.run, cache=self.cache)

    def make_cache(self, metrics: Metrics) -> VerifiedPasswords:
        """The cache tested: one process's, in memory."""
        return VerifiedPasswords(self.clock, self.ttl, self.size, metrics=metrics)

    def set_users(self, scheme: str = "ARGON2ID", **passwords: str) -> None:
        """Replace the users file as ``popserv passwd`` does (a new file, renamed over)."""
        with auth.UsersFile.locked(self.path) as users:
            users.lines = [
                auth.Entry(u, auth.hash_password(p, scheme)) for u, p in passwords.items()
            ]
            users.write()

    def check(self, user: str, password: bytes) -> bool:
        return self.successResultOf(self.db.check(user, password))

    def counted(self, name: str) -> float:
        return self.metrics.registry.get_sample_value(name) or 0.0


class HitTests(CacheTestCase):
    def test_same_password_twice_is_verified_once(self):
        """The second login with the same password is accepted without the slow verifier."""
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertEqual(self.run.calls, 1)
        self.assertEqual(self.counted("popserv_auth_cache_misses_total"), 1.0)
        self.assertEqual(self.counted("popserv_auth_cache_hits_total"), 1.0)

    def test_hit_fires_at_once_without_a_thread(self):
        """A cached password is accepted in the calling thread: no run, no waiting."""
        pending: list[defer.Deferred] = []

        def run(f, *args):
            pending.append(defer.Deferred())
            return pending[-1]

        db = auth.PasswdFile(self.path, run, cache=self.cache)
        first = db.check("alice", b"pw-alice")
        self.assertNoResult(first)
        pending[0].callback(True)
        self.assertTrue(self.successResultOf(first))
        self.assertTrue(self.successResultOf(db.check("alice", b"pw-alice")))
        self.assertEqual(len(pending), 1)

    def test_bcrypt_is_cached(self):
        """BLF-CRYPT, another slow scheme, is cached the same way."""
        self.set_users("BLF-CRYPT", alice="pw-alice")
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertEqual(self.run.calls, 1)

    def test_fast_schemes_are_not_cached(self):
        """{PLAIN} and {SSHA256} passwords are checked each time: a cache would gain nothing."""
        with open(self.path, "w", encoding="utf-8") as f:
            f.write("alice:{PLAIN}pw-alice\n")
            f.write("bob:{SSHA256}" + ssha256(b"pw-bob") + "\n")
        for user, password in [("alice", b"pw-alice"), ("bob", b"pw-bob")] * 2:
            self.assertTrue(self.check(user, password))
        self.assertEqual(self.run.calls, 4)
        self.assertEqual(len(self.cache), 0)
        self.assertEqual(self.counted("popserv_auth_cache_misses_total"), 0.0)

    def test_checker_logins_share_the_cache(self):
        """USER/PASS, SASL PLAIN and LOGIN all reach it as ``UsernamePassword``: one verify."""
        checker = auth.UserDBChecker(self.db)
        for _ in range(3):
            avatar = checker.requestAvatarId(UsernamePassword(b"alice", b"pw-alice"))
            self.assertEqual(self.successResultOf(avatar), "alice")
        self.assertEqual(self.run.calls, 1)


class MissTests(CacheTestCase):
    def test_wrong_password_after_success_is_verified_and_refused(self):
        """After a cached success, another password takes the slow way and is refused."""
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertFalse(self.check("alice", b"pw-bob"))
        self.assertEqual(self.run.calls, 2)
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertEqual(self.run.calls, 2)

    def test_failures_are_never_cached(self):
        """Each wrong password costs a full verification, the same one as often as sent."""
        self.assertFalse(self.check("alice", b"guess"))
        self.assertFalse(self.check("alice", b"guess"))
        self.assertEqual(self.run.calls, 2)
        self.assertEqual(len(self.cache), 0)

    def test_entry_expires_after_the_ttl(self):
        """An entry lasts ``ttl`` seconds from its verification; hits do not extend it."""
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.clock.advance(TTL - 1)
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertEqual(self.run.calls, 1)
        self.clock.advance(1)
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertEqual(self.run.calls, 2)
        self.clock.advance(TTL - 1)
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertEqual(self.run.calls, 2)

    def test_new_hash_of_the_same_password_is_verified(self):
        """``popserv passwd`` with the same password (a new salt) means one slow check again."""
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.set_users(alice="pw-alice", bob="pw-bob")
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertEqual(self.run.calls, 2)

    def test_changed_password_refuses_the_old_one(self):
        """After ``popserv passwd``, the cached old password is verified against the new hash."""
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.set_users(alice="new-alice")
        self.assertFalse(self.check("alice", b"pw-alice"))
        self.assertTrue(self.check("alice", b"new-alice"))
        self.assertEqual(self.run.calls, 3)

    def test_deleted_user_is_refused_and_forgotten(self):
        """After ``popserv deluser``, the user's cached password is refused and dropped."""
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertTrue(self.check("bob", b"pw-bob"))
        with auth.UsersFile.locked(self.path) as users:
            users.remove("alice")
            users.write()
        self.assertFalse(self.check("alice", b"pw-alice"))
        self.assertEqual(len(self.cache), 1)
        self.assertTrue(self.check("bob", b"pw-bob"))
        self.assertEqual(self.run.calls, 3)

    def test_same_hash_for_another_user_is_verified(self):
        """An entry is one user's: another user with a copy of the hash logs in the slow way."""
        shared = auth.hash_password("shared")
        write_file(self.path, f"x:{shared}\ny:{shared}\n")
        self.assertTrue(self.check("x", b"shared"))
        self.assertTrue(self.check("y", b"shared"))
        self.assertEqual(self.run.calls, 2)


class SizeTests(CacheTestCase):
    size = 2

    def test_least_recently_used_is_evicted(self):
        """With room for two, a third user's entry pushes out the one used longest ago."""
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertTrue(self.check("bob", b"pw-bob"))
        self.assertTrue(self.check("alice", b"pw-alice"))  # bob is now the oldest
        self.assertTrue(self.check("carol", b"pw-carol"))
        self.assertEqual((len(self.cache), self.run.calls), (2, 3))
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertEqual(self.run.calls, 3)
        self.assertTrue(self.check("bob", b"pw-bob"))
        self.assertEqual(self.run.calls, 4)

    def test_a_wrong_password_is_no_use(self):
        """Only a hit counts as a use: a wrong password for alice leaves her the oldest."""
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertTrue(self.check("bob", b"pw-bob"))
        self.assertFalse(self.check("alice", b"wrong"))
        self.assertTrue(self.check("carol", b"pw-carol"))  # pushes out alice, not bob
        calls = self.run.calls
        self.assertTrue(self.check("bob", b"pw-bob"))
        self.assertEqual(self.run.calls, calls)
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertEqual(self.run.calls, calls + 1)


class OffTests(CacheTestCase):
    ttl = 0

    def test_ttl_zero_verifies_every_login(self):
        """``[auth] cache_ttl = 0``: each login runs the slow verifier, and nothing is kept."""
        for _ in range(3):
            self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertEqual(self.run.calls, 3)
        self.assertEqual(len(self.cache), 0)


class SharedStore:
    """A ``CacheTestCase`` whose cache keeps its digests in the workers' shared database."""

    key = b"k" * 32

    def make_cache(self, metrics: Metrics) -> VerifiedPasswords:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.shared_path = os.path.join(directory, SHARED_STATE_FILE)
        return self.worker_cache(metrics)

    def worker_cache(self, metrics: Metrics, key: bytes | None = None) -> VerifiedPasswords:
        """The cache of one more worker: its own connection to the file, the same key."""
        db = open_database(self.shared_path)
        self.addCleanup(db.close)
        store = SharedDigests(db)
        return VerifiedPasswords(
            self.clock, self.ttl, self.size, metrics=metrics, key=key or self.key, store=store
        )


class SharedHitTests(SharedStore, HitTests):
    """Hits over the shared store, as in memory."""


class SharedMissTests(SharedStore, MissTests):
    """Misses over the shared store, as in memory."""


class SharedOffTests(SharedStore, OffTests):
    """``cache_ttl = 0`` over the shared store, as in memory."""


class TwoWorkersTests(SharedStore, CacheTestCase):
    """Two workers' caches over one database file: ``self.db`` is one worker's users,
    ``self.other`` the other's, each re-reading the same users file."""

    def setUp(self):
        super().setUp()
        self.other_metrics = Metrics()
        self.other_cache = self.worker_cache(self.other_metrics)
        self.other = auth.PasswdFile(self.path, self.run, cache=self.other_cache)

    def check_other(self, user: str, password: bytes) -> bool:
        return self.successResultOf(self.other.check(user, password))

    def test_stores_provide_the_interface(self):
        """Both stores, one process's and the workers', provide ``IVerifiedDigests``."""
        verifyObject(IVerifiedDigests, MemoryDigests())
        verifyObject(IVerifiedDigests, SharedDigests(open_database(self.shared_path)))

    def test_verified_on_one_worker_hits_on_the_other(self):
        """A password verified by one worker is accepted by the other without a hash."""
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertTrue(self.check_other("alice", b"pw-alice"))
        self.assertTrue(self.check_other("alice", b"pw-alice"))
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertEqual(self.run.calls, 1)
        self.assertEqual(self.counted("popserv_auth_cache_misses_total"), 1.0)
        other = self.other_metrics.registry.get_sample_value
        self.assertEqual(other("popserv_auth_cache_hits_total"), 2.0)
        self.assertEqual(other("popserv_auth_cache_misses_total") or 0.0, 0.0)

    def test_another_key_misses(self):
        """A cache with another key (another supervisor's) finds no match, and its own
        verification replaces the entry."""
        self.assertTrue(self.check("alice", b"pw-alice"))
        stranger = auth.PasswdFile(
            self.path, self.run, cache=self.worker_cache(Metrics(), key=b"x" * 32)
        )
        self.assertTrue(self.successResultOf(stranger.check("alice", b"pw-alice")))
        self.assertEqual(self.run.calls, 2)
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertEqual(self.run.calls, 3)

    def test_wrong_password_on_the_other_is_verified(self):
        """After one worker's success, a wrong password on the other is verified and
        refused, and is not remembered."""
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertFalse(self.check_other("alice", b"guess"))
        self.assertFalse(self.check_other("alice", b"guess"))
        self.assertEqual(self.run.calls, 3)
        self.assertTrue(self.check_other("alice", b"pw-alice"))
        self.assertEqual(self.run.calls, 3)

    def test_entry_expires_for_every_worker(self):
        """An entry made by one worker lasts ``ttl`` seconds from its verification on the
        other too; hits there do not extend it."""
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.clock.advance(TTL - 1)
        self.assertTrue(self.check_other("alice", b"pw-alice"))
        self.assertEqual(self.run.calls, 1)
        self.clock.advance(1)
        self.assertTrue(self.check_other("alice", b"pw-alice"))
        self.assertEqual(self.run.calls, 2)

    def test_changed_hash_misses_on_the_other(self):
        """A new hash of alice's password, seen by the other worker: the entry the first
        made no longer matches, and the old password is refused."""
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.set_users(alice="new-alice", bob="pw-bob")
        self.assertFalse(self.check_other("alice", b"pw-alice"))
        self.assertTrue(self.check_other("alice", b"new-alice"))
        self.assertEqual(self.run.calls, 3)
        self.assertTrue(self.check_other("alice", b"new-alice"))
        self.assertEqual(self.run.calls, 3)

    def test_worker_reading_the_change_later_costs_one_verification(self):
        """The first worker, re-reading the file after the other verified the new hash,
        drops that entry with the old one's: one verification more, then hits again."""
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.set_users(alice="new-alice", bob="pw-bob")
        self.assertTrue(self.check_other("alice", b"new-alice"))
        self.assertTrue(self.check("alice", b"new-alice"))
        self.assertEqual(self.run.calls, 3)
        self.assertTrue(self.check("alice", b"new-alice"))
        self.assertTrue(self.check_other("alice", b"new-alice"))
        self.assertEqual(self.run.calls, 3)

    def test_forget_on_one_worker_is_seen_by_the_other(self):
        """One worker that sees alice's entry change drops her digest for all."""
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertTrue(self.check("bob", b"pw-bob"))
        self.assertTrue(self.check_other("bob", b"pw-bob"))  # the other has read the file
        with auth.UsersFile.locked(self.path) as users:
            users.remove("alice")
            users.write()
        self.assertFalse(self.check_other("alice", b"pw-alice"))
        self.assertEqual(len(self.cache), 1)
        self.assertEqual(self.run.calls, 3)

    def test_full_store_drops_the_oldest(self):
        """Beyond ``size`` users the entry verified first goes, whoever used it since."""
        self.size = self.cache.size = self.other_cache.size = 2
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.clock.advance(1)
        self.assertTrue(self.check_other("bob", b"pw-bob"))
        self.assertTrue(self.check_other("alice", b"pw-alice"))
        self.clock.advance(1)
        self.assertTrue(self.check("carol", b"pw-carol"))
        self.assertEqual((len(self.cache), self.run.calls), (2, 3))
        self.assertTrue(self.check_other("bob", b"pw-bob"))
        self.assertTrue(self.check_other("carol", b"pw-carol"))
        self.assertEqual(self.run.calls, 3)
        self.assertTrue(self.check_other("alice", b"pw-alice"))
        self.assertEqual(self.run.calls, 4)

    def test_digests_only_on_disk(self):
        """The file holds a 32-byte HMAC per user, neither the password nor the key."""
        self.assertTrue(self.check("alice", b"pw-alice"))
        db = open_database(self.shared_path)
        self.addCleanup(db.close)
        ((user, digest),) = db.execute("SELECT user, digest FROM verified_passwords")
        self.assertEqual((user, len(digest)), ("alice", 32))
        for name in (self.shared_path, self.shared_path + "-wal"):
            if os.path.exists(name):
                with open(name, "rb") as f:
                    content = f.read()
                self.assertNotIn(b"pw-alice", content)
                self.assertNotIn(self.key, content)

    def test_prune_drops_expired_entries(self):
        """The supervisor's clean-up removes entries past their time, and only those."""
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.clock.advance(10)
        self.assertTrue(self.check("bob", b"pw-bob"))
        db = open_database(self.shared_path)
        self.addCleanup(db.close)
        prune(db, self.clock.seconds() + TTL - 5)
        self.assertEqual([u for (u,) in db.execute("SELECT user FROM verified_passwords")], ["bob"])

    def test_new_supervisor_empties_the_store(self):
        """``forget_verified``, at a supervisor's start, drops every entry: an old key's
        digests could never match."""
        self.assertTrue(self.check("alice", b"pw-alice"))
        db = open_database(self.shared_path)
        self.addCleanup(db.close)
        forget_verified(db)
        self.assertEqual(len(self.other_cache), 0)
        self.assertTrue(self.check_other("alice", b"pw-alice"))
        self.assertEqual(self.run.calls, 2)

    def test_database_error_is_a_miss(self):
        """With the database unusable a login is verified the slow way, and still works."""
        self.assertTrue(self.check("alice", b"pw-alice"))
        broken = sqlite3.connect(":memory:")
        broken.close()
        self.cache._store.db = broken
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertEqual(self.run.calls, 3)
        errors = [formatEvent(e) for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 4)
        self.assertTrue(all(e.startswith("popserv.shared_state_error: ") for e in errors))


class DigestTests(SynchronousTestCase):
    """The cache on its own, with a verifier that only says yes and counts."""

    def setUp(self):
        self.cache = VerifiedPasswords(task.Clock())
        self.calls = 0

    def verify(self) -> defer.Deferred:
        self.calls += 1
        return defer.succeed(True)

    def test_bound_to_the_stored_hash(self):
        """The same user and password against another stored hash is no hit."""
        self.cache.check("alice", "{ARGON2ID}one", b"pw", self.verify)
        self.cache.check("alice", "{ARGON2ID}two", b"pw", self.verify)
        self.assertEqual(self.calls, 2)

    def test_parts_cannot_shift(self):
        """Moving bytes between the stored hash and the password makes another digest."""
        self.cache.check("alice", "{X}ab", b"c", self.verify)
        self.cache.check("alice", "{X}a", b"bc", self.verify)
        self.assertEqual(self.calls, 2)

    def test_keyed_by_a_random_key(self):
        """Two caches (two server starts) make different digests of the same login."""
        other = VerifiedPasswords(task.Clock())
        self.assertNotEqual(
            self.cache._digest("alice", "{X}h", b"pw"), other._digest("alice", "{X}h", b"pw")
        )
        self.assertEqual(len(self.cache._key), 32)

    def test_failed_verification_is_not_remembered(self):
        """A verifier that fails (an error, not a refusal) leaves nothing behind."""
        failed = self.cache.check("alice", "{X}h", b"pw", lambda: defer.fail(OSError("boom")))
        self.failureResultOf(failed, OSError)
        self.assertEqual(len(self.cache), 0)


class TwistdCacheTests(SynchronousTestCase):
    """A real ``twistd popserv`` at its default [auth] settings, with /metrics on."""

    def test_five_logins_one_verification(self):
        """An Argon2id user logs in 5 times (USER/PASS and AUTH PLAIN): one slow verification,
        however many workers serve (they share the cache)."""
        metrics_port = free_port()
        server = TwistdServer(
            self,
            {},
            settings={"metrics": {"listen": f"tcp:{metrics_port}:interface=127.0.0.1"}},
        )
        write_file(server.users_path, "alice:" + auth.hash_password("correct horse") + "\n")
        server.start()
        plain = base64.b64encode(b"\0alice\0correct horse").decode()
        for n in range(5):
            client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=30)
            if n % 2:
                reply = client._shortcmd("AUTH PLAIN " + plain)
            else:
                client.user("alice")
                reply = client.pass_("correct horse")
            self.assertTrue(reply.startswith(b"+OK"), reply)
            client.quit()
        page = scrape(metrics_port)
        self.assertEqual(sample(page, "popserv_auth_cache_misses_total"), 1.0)
        self.assertEqual(sample(page, "popserv_auth_cache_hits_total"), 4.0)
        self.assertEqual(sample(page, "popserv_pop3_logins_total", 'result="ok"'), 5.0)


class TwistdWorkersCacheTests(SynchronousTestCase):
    """A real ``twistd popserv`` with ``[server] workers = 2`` and /metrics on."""

    def test_five_logins_on_two_workers_one_verification(self):
        """An Argon2id user logs in 5 times, by turns on each worker (the other stopped):
        one slow verification in all, on the first; the other worker's logins all hit."""
        metrics_port = free_port()
        server = WorkersServer(
            self,
            {},
            settings={"metrics": {"listen": f"tcp:{metrics_port}:interface=127.0.0.1"}},
        )
        write_file(server.users_path, "alice:" + auth.hash_password("correct horse") + "\n")
        server.start()
        one, two = server.workers()
        for pid in (one, two, one, two, one):
            server.only(pid)
            with Client(server.pop3_port) as client:
                client.login("alice", "correct horse")
                client.quit()
        server.resume_all()
        for pid, count in ((one, 3), (two, 2)):
            login = rf"\[popserv.pop3#info,worker={pid}\] pop3.login: peer=127.0.0.1 user=alice"
            server.wait_log(login, count)
        page = scrape(metrics_port)
        self.assertEqual(sample(page, "popserv_auth_cache_misses_total"), 1.0)
        self.assertEqual(sample(page, "popserv_auth_cache_hits_total"), 4.0)
        self.assertEqual(sample(page, "popserv_pop3_logins_total", 'result="ok"'), 5.0)
