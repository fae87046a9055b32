"""The verified-password cache: a password that passed a slow hash skips it at the next login.

Unit tests run a ``PasswdFile`` over real (cheap) Argon2id and bcrypt hashes, with a
``task.Clock`` for the cache's time and a runner that counts the slow verifications;
one test logs in through a real ``twistd popserv`` and reads the count from /metrics.
"""

from __future__ import annotations

import base64
import hashlib
import os
import poplib

from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from popserv import auth
from popserv.credcache import VerifiedPasswords
from popserv.metrics import Metrics
from popserv.testing import run_at_once
from tests.live_smtp import free_port
from tests.live_twistd import TwistdServer
from tests.test_auth import CHEAP, write_file
from tests.test_metrics import sample, scrape

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
        self.cache = VerifiedPasswords(self.clock, self.ttl, self.size, metrics=self.metrics)
        self.run = CountingRun()
        self.db = auth.PasswdFile(self.path, self.run, cache=self.cache)

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


class OffTests(CacheTestCase):
    ttl = 0

    def test_ttl_zero_verifies_every_login(self):
        """``[auth] cache_ttl = 0``: each login runs the slow verifier, and nothing is kept."""
        for _ in range(3):
            self.assertTrue(self.check("alice", b"pw-alice"))
        self.assertEqual(self.run.calls, 3)
        self.assertEqual(len(self.cache), 0)


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
        """An Argon2id user logs in 5 times (USER/PASS and AUTH PLAIN): one slow verification
        (per worker: each process has its own cache)."""
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
        misses = sample(page, "popserv_auth_cache_misses_total")
        self.assertIn(misses, [float(n) for n in range(1, server.worker_count + 1)])
        self.assertEqual(sample(page, "popserv_auth_cache_hits_total"), 5.0 - misses)
        self.assertEqual(sample(page, "popserv_pop3_logins_total", 'result="ok"'), 5.0)
