"""Tests for popserv.auth: the passwd-file user database, its hashes and the cred checker."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading

import argon2
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from popserv import auth
from popserv.interfaces import IUserDB, UserDBUnavailable

CHEAP = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


class SpyHasher(argon2.PasswordHasher):
    """A cheap hasher that records each hash it verifies and the thread it ran on."""

    def __init__(self):
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.verified: list[tuple[str, bytes, threading.Thread]] = []

    def verify(self, hash, password):
        self.verified.append((hash, password, threading.current_thread()))
        return super().verify(hash, password)


class FakeThreadPool:
    """Runs each call at once, the way ``deferToThreadPool`` expects a pool to report back."""

    def __init__(self):
        self.calls = []

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        self.calls.append(f)
        defer.maybeDeferred(f, *args, **kwargs).addCallbacks(
            lambda result: on_result(True, result), lambda failure: on_result(False, failure)
        )


class FakeReactor:
    """Just what ``deferToThreadPool`` uses: a thread pool and ``callFromThread``."""

    def __init__(self):
        self.pool = FakeThreadPool()

    def getThreadPool(self):
        return self.pool

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


def write_file(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


class EntryTests(unittest.TestCase):
    def test_fields(self):
        """A line splits into user, password field and the remaining fields, verbatim."""
        entry = auth.Entry.parse("alice:{PLAIN}pw:1000:1000::/home/alice::userdb_quota=1G")
        self.assertEqual(entry.user, "alice")
        self.assertEqual(entry.password, "{PLAIN}pw")
        self.assertEqual(entry.rest, "1000:1000::/home/alice::userdb_quota=1G")
        self.assertEqual(entry.format(), "alice:{PLAIN}pw:1000:1000::/home/alice::userdb_quota=1G")

    def test_two_fields(self):
        """A line with only user and password has no further fields."""
        entry = auth.Entry.parse("bob:{PLAIN}x")
        self.assertEqual((entry.user, entry.password, entry.rest), ("bob", "{PLAIN}x", None))
        self.assertEqual(entry.format(), "bob:{PLAIN}x")

    def test_not_entries(self):
        """Blank lines, comments and lines without a user are not entries."""
        for line in ["", "   ", "# alice:{PLAIN}x", "  #x", ":{PLAIN}x", "nocolon"]:
            self.assertIsNone(auth.Entry.parse(line), line)

    def test_split_scheme(self):
        """The scheme name is upper-cased; a field without one is Dovecot's default, CRYPT."""
        self.assertEqual(auth.split_scheme("{argon2id}$argon2id$x"), ("ARGON2ID", "$argon2id$x"))
        self.assertEqual(auth.split_scheme("$1$salt$hash"), ("CRYPT", "$1$salt$hash"))


class HashPasswordTests(unittest.TestCase):
    def test_default_format(self):
        """A new hash has Dovecot's layout with argon2-cffi's default (RFC 9106) parameters."""
        hashed = auth.hash_password("secret")
        self.assertTrue(hashed.startswith("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$"), hashed)
        self.assertTrue(argon2.PasswordHasher().verify(hashed[len("{ARGON2ID}") :], "secret"))

    def test_plain(self):
        """PLAIN stores the password itself."""
        self.assertEqual(auth.hash_password(b"secret", "plain"), "{PLAIN}secret")

    def test_plain_refuses_separators(self):
        """PLAIN refuses a password that would break the line: ':' or a control character."""
        self.assertRaises(ValueError, auth.hash_password, "a:b", "PLAIN")
        self.assertRaises(ValueError, auth.hash_password, "a\nb", "PLAIN")

    def test_unknown_scheme(self):
        """A scheme popserv cannot make is a ValueError."""
        self.assertRaises(ValueError, auth.hash_password, "x", "MD5")
        self.assertRaises(ValueError, auth.hash_password, "x", "ARGON2I")


class PasswdFileTests(unittest.TestCase):
    def setUp(self):
        self.hasher = SpyHasher()
        self.patch(auth, "HASHER", self.hasher)
        self.reactor = FakeReactor()
        self.path = self.mktemp()
        self.alice = auth.hash_password("wonderland")
        write_file(
            self.path,
            "# users\n"
            "\n"
            f"alice:{self.alice}:1000:1000::/home/alice::\n"
            "bob:{PLAIN}builder\n"
            "carol:{CLEARTEXT}c4rol:::\n"
            "dave:{MD5-CRYPT}$1$salt$hash\n"
            "erin:$6$salt$hash\n"
            "frank:\n",
        )
        self.db = auth.PasswdFile(self.path, reactor=self.reactor)

    def check(self, user: str, password: bytes) -> bool:
        return self.successResultOf(self.db.check(user, password))

    def test_interface(self):
        """PasswdFile provides IUserDB."""
        verifyObject(IUserDB, self.db)

    def test_exists(self):
        """Users are the first fields of entry lines; comments and blank lines add none."""
        self.assertTrue(self.db.exists("alice"))
        self.assertTrue(self.db.exists("bob"))
        self.assertFalse(self.db.exists("# users"))
        self.assertFalse(self.db.exists(""))
        self.assertFalse(self.db.exists("nobody"))

    def test_case_sensitive(self):
        """User names match exactly."""
        self.assertFalse(self.db.exists("Alice"))
        self.assertFalse(self.check("Alice", b"wonderland"))

    def test_argon2id(self):
        """An ARGON2ID entry accepts its password and refuses another."""
        self.assertTrue(self.check("alice", b"wonderland"))
        self.assertFalse(self.check("alice", b"Wonderland"))

    def test_argon2i(self):
        """An ARGON2I entry verifies; a hash of the wrong variant for its label does not."""
        hashed = argon2.PasswordHasher(
            time_cost=1, memory_cost=8, parallelism=1, type=argon2.Type.I
        ).hash("pw")
        write_file(self.path, f"ivan:{{ARGON2I}}{hashed}\nmallory:{{ARGON2ID}}{hashed}\n")
        self.assertTrue(self.check("ivan", b"pw"))
        self.assertFalse(self.check("mallory", b"pw"))

    def test_plain(self):
        """PLAIN and CLEARTEXT entries compare the password."""
        self.assertTrue(self.check("bob", b"builder"))
        self.assertFalse(self.check("bob", b"builde"))
        self.assertTrue(self.check("carol", b"c4rol"))
        self.assertFalse(self.check("carol", b""))

    def test_unknown_scheme(self):
        """An unsupported scheme fails verification and is logged once, without the password."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertFalse(self.check("dave", b"pw1"))
        self.assertFalse(self.check("dave", b"pw2"))
        warnings = [e for e in events if e.get("scheme") == "MD5-CRYPT"]
        self.assertEqual(len(warnings), 1)
        for event in events:
            self.assertNotIn(b"pw1", repr(event).encode())

    def test_no_scheme_prefix(self):
        """A field without a scheme is CRYPT, which popserv does not verify yet."""
        self.assertFalse(self.check("erin", b"$6$salt$hash"))

    def test_empty_password_field(self):
        """An empty password field never verifies, not even an empty password."""
        self.assertFalse(self.check("frank", b""))

    def test_unknown_user_verifies_dummy(self):
        """An unknown user is refused after a real Argon2 verify against a dummy hash."""
        self.assertFalse(self.check("nobody", b"guess"))
        self.assertEqual(len(self.hasher.verified), 1)
        hashed, password, _ = self.hasher.verified[0]
        self.assertTrue(hashed.startswith("$argon2id$v=19$m=8,t=1,p=1$"))
        self.assertEqual(password, b"guess")

    def test_dummy_made_once(self):
        """The dummy hash is made once and reused."""
        self.check("nobody", b"a")
        self.check("somebody", b"b")
        self.assertEqual(self.hasher.verified[0][0], self.hasher.verified[1][0])

    def test_runs_in_thread_pool(self):
        """Verification is handed to the injected reactor's thread pool."""
        self.check("alice", b"wonderland")
        self.check("nobody", b"x")
        self.assertEqual(len(self.reactor.pool.calls), 2)

    def test_reload(self):
        """A changed file is re-read at the next lookup, without a restart."""
        self.assertTrue(self.check("bob", b"builder"))
        write_file(self.path, "bob:{PLAIN}newer\nzoe:{PLAIN}z\n")
        st = os.stat(self.path)
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        self.assertFalse(self.check("bob", b"builder"))
        self.assertTrue(self.check("bob", b"newer"))
        self.assertTrue(self.db.exists("zoe"))
        self.assertFalse(self.db.exists("alice"))

    def test_reload_replaced_file(self):
        """A file replaced by rename (a new inode) is re-read."""
        self.assertTrue(self.db.exists("alice"))
        users = auth.UsersFile.read(self.path)
        users.remove("alice")
        users.write()
        self.assertFalse(self.db.exists("alice"))

    def test_missing_file(self):
        """A missing file makes check fail and exists raise with UserDBUnavailable."""
        os.unlink(self.path)
        self.failureResultOf(self.db.check("alice", b"wonderland"), UserDBUnavailable)
        self.assertRaises(UserDBUnavailable, self.db.exists, "alice")

    def test_unreadable_file(self):
        """A file that cannot be read makes the database unavailable until it can be again."""
        self.assertTrue(self.db.exists("alice"))
        os.unlink(self.path)
        os.mkdir(self.path)
        self.failureResultOf(self.db.check("bob", b"builder"), UserDBUnavailable)
        os.rmdir(self.path)
        write_file(self.path, "bob:{PLAIN}builder\n")
        self.assertTrue(self.check("bob", b"builder"))

    def test_secret(self):
        """secret gives the password of PLAIN users only."""
        self.assertEqual(self.db.secret("bob"), b"builder")
        self.assertEqual(self.db.secret("carol"), b"c4rol")
        self.assertIsNone(self.db.secret("alice"))
        self.assertIsNone(self.db.secret("nobody"))
        self.assertIsNone(self.db.scram("alice"))

    def test_first_entry_wins(self):
        """Of two lines for one user, the first counts."""
        write_file(self.path, "bob:{PLAIN}first\nbob:{PLAIN}second\n")
        self.assertTrue(self.check("bob", b"first"))
        self.assertFalse(self.check("bob", b"second"))


class ThreadTests(unittest.TestCase):
    def test_verify_off_reactor_thread(self):
        """With the global reactor, the hash is verified in a thread other than the reactor's."""
        hasher = SpyHasher()
        self.patch(auth, "HASHER", hasher)
        path = self.mktemp()
        write_file(path, f"alice:{auth.hash_password('pw')}\n")
        db = auth.PasswdFile(path)

        def verified(ok):
            self.assertTrue(ok)
            self.assertIsNot(hasher.verified[0][2], threading.current_thread())

        return db.check("alice", b"pw").addCallback(verified)


class DovecotHashTests(unittest.TestCase):
    def doveadm(self, scheme: str, password: str) -> str:
        if shutil.which("doveadm") is None:
            if os.environ.get("CI") == "true":
                self.fail("doveadm is not installed (install dovecot-core)")
            raise unittest.SkipTest("doveadm is not installed")
        out = subprocess.run(
            ["doveadm", "pw", "-s", scheme, "-p", password],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    def check(self, hashed: str, password: bytes) -> bool:
        path = self.mktemp()
        write_file(path, f"alice:{hashed}\n")
        db = auth.PasswdFile(path, reactor=FakeReactor())
        return self.successResultOf(db.check("alice", password))

    def test_argon2_cffi_layout(self):
        """A hash made by argon2-cffi under a {ARGON2ID} prefix verifies, as Dovecot writes it."""
        hashed = "{ARGON2ID}" + argon2.PasswordHasher().hash("secret")
        self.assertTrue(self.check(hashed, b"secret"))
        self.assertFalse(self.check(hashed, b"Secret"))

    def test_doveadm_argon2id(self):
        """A hash from ``doveadm pw -s ARGON2ID`` verifies."""
        hashed = self.doveadm("ARGON2ID", "secret")
        self.assertTrue(hashed.startswith("{ARGON2ID}$argon2id$"), hashed)
        self.assertTrue(self.check(hashed, b"secret"))
        self.assertFalse(self.check(hashed, b"wrong"))

    def test_doveadm_verifies_ours(self):
        """Dovecot accepts a hash popserv makes (``doveadm pw -t``)."""
        self.doveadm("ARGON2ID", "probe")
        hashed = auth.hash_password("secret")
        out = subprocess.run(
            ["doveadm", "pw", "-t", hashed, "-p", "secret"], capture_output=True, text=True
        )
        self.assertEqual(out.returncode, 0, out.stderr)

    def test_doveadm_argon2i(self):
        """A hash from ``doveadm pw -s ARGON2I`` verifies."""
        hashed = self.doveadm("ARGON2I", "secret")
        self.assertTrue(self.check(hashed, b"secret"))


class CheckerTests(unittest.TestCase):
    def setUp(self):
        self.patch(auth, "HASHER", CHEAP)
        self.path = self.mktemp()
        write_file(self.path, "bob:{PLAIN}builder\nzoë:{PLAIN}z\n")
        self.checker = auth.UserDBChecker(auth.PasswdFile(self.path, reactor=FakeReactor()))

    def login(self, user, password):
        return self.checker.requestAvatarId(UsernamePassword(user, password))

    def test_interface(self):
        """UserDBChecker is a cred checker for usernames and passwords."""
        verifyObject(ICredentialsChecker, self.checker)

    def test_avatar_id(self):
        """A good password gives the user name as a str avatar id."""
        self.assertEqual(self.successResultOf(self.login(b"bob", b"builder")), "bob")
        self.assertEqual(self.successResultOf(self.login("zoë".encode(), b"z")), "zoë")

    def test_bad_password_and_unknown_user(self):
        """A bad password and an unknown user fail alike, with UnauthorizedLogin."""
        self.failureResultOf(self.login(b"bob", b"wrong"), UnauthorizedLogin)
        self.failureResultOf(self.login(b"nobody", b"builder"), UnauthorizedLogin)

    def test_undecodable_user(self):
        """A user name that is not UTF-8 is UnauthorizedLogin."""
        self.failureResultOf(self.login(b"\xff\xfe", b"builder"), UnauthorizedLogin)

    def test_unavailable_passes_through(self):
        """An unreadable user database is UserDBUnavailable, not UnauthorizedLogin."""
        os.unlink(self.path)
        self.failureResultOf(self.login(b"bob", b"builder"), UserDBUnavailable)


class UsersFileTests(unittest.TestCase):
    def setUp(self):
        self.path = self.mktemp()
        self.original = "# header\n\nalice:{PLAIN}a:1000:1000::/home/alice::x=1\nbob:{PLAIN}b\n"
        write_file(self.path, self.original)

    def read(self) -> str:
        with open(self.path, encoding="utf-8") as f:
            return f.read()

    def test_round_trip(self):
        """Reading and writing back changes nothing, comments and extra fields included."""
        users = auth.UsersFile.read(self.path)
        self.assertEqual(users.users(), ["alice", "bob"])
        users.write()
        self.assertEqual(self.read(), self.original)

    def test_set_password_keeps_fields(self):
        """A new password replaces only the password field."""
        users = auth.UsersFile.read(self.path)
        users.set_password("alice", "{PLAIN}new")
        users.write()
        self.assertIn("alice:{PLAIN}new:1000:1000::/home/alice::x=1\n", self.read())
        self.assertRaises(KeyError, users.set_password, "nobody", "{PLAIN}x")

    def test_add_and_remove(self):
        """Users are appended and removed; adding an existing one is refused."""
        users = auth.UsersFile.read(self.path)
        users.add("carol", "{PLAIN}c")
        self.assertRaises(ValueError, users.add, "bob", "{PLAIN}x")
        users.remove("alice")
        self.assertRaises(KeyError, users.remove, "alice")
        users.write()
        self.assertEqual(self.read(), "# header\n\nbob:{PLAIN}b\ncarol:{PLAIN}c\n")

    def test_missing_file_is_empty(self):
        """A missing file reads as empty, and writing creates it and its directory, mode 0600."""
        path = os.path.join(self.mktemp(), "sub", "users")
        users = auth.UsersFile.read(path)
        self.assertEqual(users.users(), [])
        users.add("alice", "{PLAIN}a")
        users.write()
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(os.listdir(os.path.dirname(path)), ["users"])

    def test_keeps_mode(self):
        """Rewriting keeps the mode an administrator gave the file."""
        os.chmod(self.path, 0o640)
        auth.UsersFile.read(self.path).write()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)

    def test_non_utf8_survives(self):
        """Bytes that are not UTF-8 survive a rewrite unchanged."""
        with open(self.path, "ab") as f:
            f.write(b"\xffx:{PLAIN}y\n")
        auth.UsersFile.read(self.path).write()
        with open(self.path, "rb") as f:
            self.assertTrue(f.read().endswith(b"\xffx:{PLAIN}y\n"))
