"""Tests for popserv.auth: the passwd-file user database, its hashes and the cred checker."""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import stat
import subprocess
import threading

import argon2
import scramp
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import CramMD5Credentials, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.mail.pop3 import APOPCredentials
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from popserv import auth, sasl
from popserv.interfaces import IUserDB, ScramKeys, UserDBUnavailable
from popserv.testing import run_at_once
from tests import live

CHEAP = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


class SpyHasher(argon2.PasswordHasher):
    """A cheap hasher that records each hash it verifies and the thread it ran on."""

    def __init__(self):
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.verified: list[tuple[str, bytes, threading.Thread]] = []

    def verify(self, hash, password):
        self.verified.append((hash, password, threading.current_thread()))
        return super().verify(hash, password)


class RecordingRunner:
    """A fake ``Workers.run`` that runs each call at once and records the callable."""

    def __init__(self):
        self.calls = []

    def __call__(self, f, *args):
        self.calls.append(f)
        return run_at_once(f, *args)


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
        self.assertRaises(ValueError, auth.hash_password, "x", "SSHA512")

    def test_every_scheme_verifies(self):
        """Each scheme popserv makes verifies its password and refuses another."""
        self.patch(auth, "HASHER", CHEAP)
        self.patch(auth, "BCRYPT_ROUNDS", 4)
        self.patch(auth, "SHA_CRYPT_ROUNDS", 5000)
        self.assertEqual(
            set(auth.MAKEABLE),
            {"ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "CRAM-MD5"}
            | {"SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN", "CLEARTEXT"},
        )
        path = self.mktemp()
        for scheme in auth.MAKEABLE:
            field = auth.hash_password("pässword", scheme.lower())
            self.assertTrue(field.startswith("{" + scheme + "}"), field)
            write_file(path, f"alice:{field}\n")
            db = auth.PasswdFile(path, run_at_once)
            self.assertTrue(self.successResultOf(db.check("alice", "pässword".encode())), scheme)
            self.assertFalse(self.successResultOf(db.check("alice", b"password")), scheme)

    def test_layouts(self):
        """New hashes have the layouts Dovecot writes."""
        self.patch(auth, "BCRYPT_ROUNDS", 4)
        self.patch(auth, "SHA_CRYPT_ROUNDS", 5000)
        self.assertRegex(auth.hash_password("pw", "BLF-CRYPT"), r"^\{BLF-CRYPT\}\$2b\$04\$.{53}$")
        self.assertRegex(auth.hash_password("pw", "SHA512-CRYPT"), r"^\{SHA512-CRYPT\}\$6\$[^$]+\$")
        self.assertRegex(auth.hash_password("pw", "SHA256-CRYPT"), r"^\{SHA256-CRYPT\}\$5\$[^$]+\$")
        self.assertRegex(auth.hash_password("pw", "CRAM-MD5"), r"^\{CRAM-MD5\}[0-9a-f]{64}$")
        scram = auth.hash_password("pw", "SCRAM-SHA-256")
        self.assertRegex(scram, r"^\{SCRAM-SHA-256\}4096,[A-Za-z0-9+/=]{24},[^,]{44},[^,]{44}$")

    def test_bcrypt_length(self):
        """BLF-CRYPT refuses to make a hash of more than 72 bytes, and verifies the first 72."""
        self.patch(auth, "BCRYPT_ROUNDS", 4)
        self.assertRaises(ValueError, auth.hash_password, "x" * 73, "BLF-CRYPT")
        hashed = auth.hash_password("x" * 72, "BLF-CRYPT").removeprefix("{BLF-CRYPT}")
        self.assertTrue(auth._SCHEMES["BLF-CRYPT"].verify(hashed, b"x" * 80))

    def test_scram_needs_utf8(self):
        """SCRAM schemes refuse a password that is not UTF-8."""
        self.assertRaises(ValueError, auth.hash_password, b"\xff", "SCRAM-SHA-256")


class CramMD5ContextTests(unittest.TestCase):
    def test_md5_continuation(self):
        """MD5 continued from a saved state gives hashlib's digest, for every padding case."""
        block = b"k" * 64
        state = auth._md5_block(auth._MD5_START, block)
        for size in [0, 1, 55, 56, 63, 64, 65, 119, 120, 200]:
            data = os.urandom(size)
            self.assertEqual(
                auth._md5_finish(state, data), hashlib.md5(block + data).digest(), size
            )

    def test_rfc2195(self):
        """The context of RFC 2195's secret gives its example digest, as HMAC-MD5 does."""
        context = auth.cram_md5_context(b"tanstaaftanstaaf")
        challenge = b"<1896.697170952@postoffice.reston.mci.net>"
        digest = auth.cram_md5_digest(context, challenge)
        self.assertEqual(digest.hex(), "b913a602c7eda7a495b4e6e7334d3890")

    def test_matches_hmac(self):
        """For short and long keys, the context finishes to the stdlib's HMAC-MD5."""
        for key in [b"", b"k", b"k" * 64, b"k" * 65, os.urandom(100)]:
            expected = hmac.digest(key, b"challenge", "md5")
            self.assertEqual(
                auth.cram_md5_digest(auth.cram_md5_context(key), b"challenge"), expected
            )


class PasswdFileTests(unittest.TestCase):
    def setUp(self):
        self.hasher = SpyHasher()
        self.patch(auth, "HASHER", self.hasher)
        self.run = RecordingRunner()
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
        self.db = auth.PasswdFile(self.path, self.run)

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
        """A field without a scheme is CRYPT: the hash's ``$id$`` picks the algorithm."""
        self.assertFalse(self.check("erin", b"$6$salt$hash"))
        sha512 = "$6$aE94L0pgw9D37IyS$z4wfYAgEiqVg0oPLpb5kTcbj1a0xORRoBoQ.9IBT0BxIESKQWi7lwWu2hS"
        sha512 += "tkMSD/5Hb7dgG2Pw9TPsRmjKzXs."
        bcrypt = "$2y$05$o2I22US/.Jtjt9d5AwfQHeaexp2e4h.55q7rf9dfzXR/po8eBnqZO"
        write_file(self.path, f"six:{sha512}\ntwo:{bcrypt}\nmd5:$1$salt$hash\n")
        for user in ["six", "two"]:
            self.assertTrue(self.check(user, b"pencil"), user)
            self.assertFalse(self.check(user, b"pencil2"), user)
        self.assertFalse(self.check("md5", b"pencil"))

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
        """Verification is handed to the injected runner."""
        self.check("alice", b"wonderland")
        self.check("nobody", b"x")
        self.assertEqual(len(self.run.calls), 2)

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

    def test_ssha_malformed(self):
        """SSHA512 values that are not base64, or too short for a digest, never verify."""
        write_file(self.path, "a:{SSHA512}not*base64\nb:{SSHA512}YWJj\n")
        self.assertFalse(self.check("a", b"x"))
        self.assertFalse(self.check("b", b"x"))

    def test_mechanisms(self):
        """What each stored scheme can verify; no user: the union; unknown: nothing."""
        write_file(
            self.path,
            f"alice:{self.alice}\n"
            "bob:{PLAIN}builder\n"
            f"carl:{auth.hash_password('c', 'CRAM-MD5')}\n"
            f"sam:{auth.hash_password('s', 'SCRAM-SHA-256')}\n"
            "dave:{MD5-CRYPT}$1$salt$hash\n"
            "frank:{PLAIN}\n",
        )
        self.assertEqual(self.db.mechanisms("alice"), {b"PLAIN", b"LOGIN"})
        self.assertEqual(
            self.db.mechanisms("bob"),
            {b"PLAIN", b"LOGIN", b"APOP", b"CRAM-MD5", b"SCRAM-SHA-256", b"SCRAM-SHA-1"},
        )
        self.assertEqual(self.db.mechanisms("carl"), {b"PLAIN", b"LOGIN", b"CRAM-MD5"})
        self.assertEqual(self.db.mechanisms("sam"), {b"PLAIN", b"LOGIN", b"SCRAM-SHA-256"})
        for user in ["dave", "frank", "nobody"]:
            self.assertEqual(self.db.mechanisms(user), set(), user)
        self.assertEqual(self.db.mechanisms(), self.db.mechanisms("bob"))

    def test_cram_md5(self):
        """cram_md5 gives the stored context, or one made from a PLAIN password; else None."""
        stored = auth.hash_password("c", "CRAM-MD5")
        write_file(self.path, f"carl:{stored}\nbob:{{PLAIN}}builder\nalice:{self.alice}\n")
        self.assertEqual(self.db.cram_md5("carl"), bytes.fromhex(stored.removeprefix("{CRAM-MD5}")))
        self.assertEqual(self.db.cram_md5("bob"), auth.cram_md5_context(b"builder"))
        self.assertIsNone(self.db.cram_md5("alice"))
        self.assertIsNone(self.db.cram_md5("nobody"))
        self.assertIsNone(self.db.secret("carl"))

    def test_scram(self):
        """scram gives stored keys for its own mechanism, or keys derived from PLAIN; else None."""
        stored = auth.hash_password("s", "SCRAM-SHA-256")
        write_file(self.path, f"sam:{stored}\nbob:{{PLAIN}}builder\nalice:{self.alice}\n")
        keys = self.db.scram("sam")
        self.assertIsInstance(keys, ScramKeys)
        self.assertEqual(auth.parse_scram(stored.removeprefix("{SCRAM-SHA-256}")), keys)
        self.assertIsNone(self.db.scram("sam", "SCRAM-SHA-1"))
        derived = self.db.scram("bob", "SCRAM-SHA-1")
        self.assertEqual(derived, auth.scram_keys("SCRAM-SHA-1", b"builder", derived.salt, 4096))
        self.assertEqual(self.db.scram("bob", "SCRAM-SHA-1"), derived)
        self.assertNotEqual(self.db.scram("bob").salt, derived.salt)
        self.assertIsNone(self.db.scram("alice"))
        self.assertIsNone(self.db.scram("nobody"))

    def test_scram_same_cost(self):
        """Every scram lookup costs one key derivation, known, unknown, stored or derived."""
        write_file(
            self.path,
            f"sam:{auth.hash_password('s', 'SCRAM-SHA-256')}\nbob:{{PLAIN}}b\nalice:{self.alice}\n",
        )
        calls = []
        real = auth.scram_keys
        self.patch(auth, "scram_keys", lambda *args: calls.append(args[3]) or real(*args))
        for user in ["sam", "bob", "alice", "nobody"]:
            del calls[:]
            self.db.scram(user)
            self.assertEqual(calls, [4096], user)

    def test_lookups_unavailable(self):
        """secret, cram_md5, scram and mechanisms raise UserDBUnavailable without the file."""
        os.unlink(self.path)
        for lookup in [self.db.secret, self.db.cram_md5, self.db.scram, self.db.mechanisms]:
            self.assertRaises(UserDBUnavailable, lookup, "bob")


class CollidingUsersTests(unittest.TestCase):
    """A hand-edited users file whose names map to the same or nested Maildirs."""

    def setUp(self):
        self.patch(auth, "HASHER", CHEAP)
        self.path = self.mktemp()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.db = auth.PasswdFile(self.path, run_at_once)

    def write(self, *names: str) -> None:
        write_file(self.path, "".join(f"{name}:{{PLAIN}}pw-{name}\n" for name in names))

    def assert_refused(self, user: str) -> None:
        """Every lookup of ``user`` fails with UserDBUnavailable, the right password too."""
        self.assertRaises(UserDBUnavailable, self.db.exists, user)
        self.failureResultOf(self.db.check(user, f"pw-{user}".encode()), UserDBUnavailable)
        for lookup in [self.db.secret, self.db.cram_md5, self.db.scram]:
            self.assertRaises(UserDBUnavailable, lookup, user)
        self.assertEqual(self.db.mechanisms(user), set())

    def assert_served(self, user: str) -> None:
        self.assertTrue(self.db.exists(user))
        self.assertTrue(self.successResultOf(self.db.check(user, f"pw-{user}".encode())))
        self.assertEqual(self.db.secret(user), f"pw-{user}".encode())

    def warnings(self) -> list[dict]:
        return [event for event in self.events if "other_line" in event]

    def test_case_variants_of_a_domain_are_refused(self):
        """alice@EXAMPLE.ORG and alice@example.org are both refused; bob is served."""
        self.write("alice@EXAMPLE.ORG", "alice@example.org", "bob")
        self.assert_refused("alice@EXAMPLE.ORG")
        self.assert_refused("alice@example.org")
        self.assert_served("bob")

    def test_nested_maildirs_are_refused(self):
        """example.org and new@example.org are both refused; carol@example.com is served."""
        self.write("example.org", "new@example.org", "carol@example.com")
        self.assert_refused("example.org")
        self.assert_refused("new@example.org")
        self.assert_served("carol@example.com")

    def test_case_variants_of_a_local_part_are_refused(self):
        """Alice and alice are both refused, as SMTP and case-insensitive disks join them."""
        self.write("Alice", "alice", "alice@example.org")
        self.assert_refused("Alice")
        self.assert_refused("alice")
        self.assert_served("alice@example.org")

    def test_one_warning_names_both(self):
        """Each colliding pair is logged once, with both names and lines, however many lookups."""
        self.write("bob", "example.org", "new@example.org")
        for _ in range(3):
            self.assertRaises(UserDBUnavailable, self.db.exists, "new@example.org")
            self.assertTrue(self.db.exists("bob"))
        [warning] = self.warnings()
        self.assertEqual(warning["log_level"].name, "warn")
        self.assertEqual((warning["user"], warning["line"]), ("new@example.org", 3))
        self.assertEqual((warning["other"], warning["other_line"]), ("example.org", 2))
        text = formatEvent(warning)
        self.assertIn("new@example.org", text)
        self.assertIn("example.org (line 2)", text)
        self.assertIn("lies inside", text)

    def test_fixed_file_serves_again(self):
        """Once the file no longer holds both names, the one left is served."""
        self.write("alice@EXAMPLE.ORG", "alice@example.org")
        self.assertRaises(UserDBUnavailable, self.db.exists, "alice@example.org")
        self.write("alice@example.org")
        self.assert_served("alice@example.org")
        self.assertFalse(self.db.exists("alice@EXAMPLE.ORG"))

    def test_checkers_fail_closed(self):
        """USER/PASS and APOP logins of a refused name fail with UserDBUnavailable."""
        self.write("alice@EXAMPLE.ORG", "alice@example.org")
        right = UsernamePassword(b"alice@example.org", b"pw-alice@example.org")
        self.failureResultOf(auth.UserDBChecker(self.db).requestAvatarId(right), UserDBUnavailable)
        apop = APOPCredentials(b"<1.2@host>", b"alice@example.org", b"0" * 32)
        self.failureResultOf(auth.SecretChecker(self.db).requestAvatarId(apop), UserDBUnavailable)


class ThreadTests(unittest.TestCase):
    def test_verify_off_reactor_thread(self):
        """With popserv's workers, the hash is verified in a thread other than the reactor's."""
        hasher = SpyHasher()
        self.patch(auth, "HASHER", hasher)
        path = self.mktemp()
        write_file(path, f"alice:{auth.hash_password('pw')}\n")
        db = auth.PasswdFile(path, live.workers(self, 1).run)

        def verified(ok):
            self.assertTrue(ok)
            self.assertIsNot(hasher.verified[0][2], threading.current_thread())

        return db.check("alice", b"pw").addCallback(verified)


def require_doveadm(case: unittest.TestCase) -> None:
    """Skip without Dovecot's doveadm, except in CI, where its absence is a failure."""
    if shutil.which("doveadm") is None:
        if os.environ.get("CI") == "true":
            case.fail("doveadm is not installed (install dovecot-core)")
        raise unittest.SkipTest("doveadm is not installed")


def doveadm_pw(scheme: str, password: str) -> str:
    """The password field ``doveadm pw`` makes."""
    out = subprocess.run(
        ["doveadm", "pw", "-s", scheme, "-p", password], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


class DovecotHashTests(unittest.TestCase):
    def doveadm(self, scheme: str, password: str) -> str:
        require_doveadm(self)
        return doveadm_pw(scheme, password)

    def check(self, hashed: str, password: bytes) -> bool:
        path = self.mktemp()
        write_file(path, f"alice:{hashed}\n")
        db = auth.PasswdFile(path, run_at_once)
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


# One user per scheme, named after it, each with its own password.
DOVECOT_SCHEMES = [
    "ARGON2ID",
    "BLF-CRYPT",
    "SHA512-CRYPT",
    "SHA256-CRYPT",
    "SSHA512",
    "PLAIN",
    "CLEARTEXT",
    "CRAM-MD5",
    "SCRAM-SHA-256",
    "SCRAM-SHA-1",
]
_dovecot_file: list[str] = []


class DovecotUsersFileTests(unittest.TestCase):
    """A users file made with ``doveadm pw``, with Dovecot's extra fields, works unchanged."""

    def setUp(self):
        require_doveadm(self)
        if not _dovecot_file:  # made once: Dovecot's Argon2 parameters are not cheap
            _dovecot_file.extend(
                f"{scheme.lower()}:{doveadm_pw(scheme, self.password(scheme))}:1000:1000::"
                f"/home/{scheme.lower()}::userdb_quota_rule=*:storage=1G"
                for scheme in DOVECOT_SCHEMES
            )
        self.path = self.mktemp()
        write_file(self.path, "# made by doveadm pw\n" + "\n".join(_dovecot_file) + "\n")
        self.userdb = auth.PasswdFile(self.path, run_at_once)

    @staticmethod
    def password(scheme: str) -> str:
        return f"{scheme.lower()} pässwörd"

    def credentials(self, mechanism: bytes, user: str, password: str):
        """What a whole exchange of ``mechanism`` (or APOP) ends in."""
        if mechanism == b"APOP":
            digest = hashlib.md5(b"<1.2@host>" + password.encode()).hexdigest().encode()
            return APOPCredentials(b"<1.2@host>", user.encode(), digest)
        exchange = sasl.MECHANISMS[mechanism]("host", self.userdb)
        if mechanism == b"PLAIN":
            return exchange.start(b"\0" + user.encode() + b"\0" + password.encode()).credentials
        if mechanism == b"LOGIN":
            exchange.start(user.encode())
            return exchange.respond(password.encode()).credentials
        if mechanism == b"CRAM-MD5":
            challenge = exchange.start(None).data
            digest = hmac.digest(password.encode(), challenge, "md5").hex().encode()
            return exchange.respond(user.encode() + b" " + digest).credentials
        client = scramp.ScramClient([mechanism.decode()], user, password)
        first = exchange.start(client.get_client_first().encode())
        client.set_server_first(first.data.decode())
        result = exchange.respond(client.get_client_final().encode())
        if isinstance(result, sasl.Challenge):
            client.set_server_final(result.data.decode())
            result = exchange.respond(b"")
        return result.credentials

    def logs_in(self, mechanism: bytes, user: str, password: str) -> bool:
        """Whether the checkers accept what the exchange ended in."""
        credentials = self.credentials(mechanism, user, password)
        for checker in auth.checkers(self.userdb):
            if any(i.providedBy(credentials) for i in checker.credentialInterfaces):
                d = checker.requestAvatarId(credentials)
                d.addErrback(lambda failure: failure.trap(UnauthorizedLogin) and None)
                return self.successResultOf(d) == user
        raise AssertionError(f"no checker for {credentials!r}")

    def test_check(self):
        """Every scheme verifies its user's password and refuses another user's."""
        for scheme in DOVECOT_SCHEMES:
            user = scheme.lower()
            for password, expected in [(self.password(scheme), True), ("pässwörd", False)]:
                ok = self.successResultOf(self.userdb.check(user, password.encode()))
                self.assertEqual(ok, expected, (scheme, password))

    def test_mechanisms(self):
        """Each user logs in with exactly the mechanisms its scheme can verify, no others."""
        mechanisms = [*sasl.MECHANISMS, b"APOP"]
        expected = {
            "PLAIN": set(mechanisms),
            "CLEARTEXT": set(mechanisms),
            "CRAM-MD5": {b"PLAIN", b"LOGIN", b"CRAM-MD5"},
            "SCRAM-SHA-256": {b"PLAIN", b"LOGIN", b"SCRAM-SHA-256"},
            "SCRAM-SHA-1": {b"PLAIN", b"LOGIN", b"SCRAM-SHA-1"},
        }
        for scheme in DOVECOT_SCHEMES:
            user, password = scheme.lower(), self.password(scheme)
            works = {name for name in mechanisms if self.logs_in(name, user, password)}
            self.assertEqual(works, expected.get(scheme, {b"PLAIN", b"LOGIN"}), scheme)
            self.assertEqual(self.userdb.mechanisms(user), works, scheme)
            for name in works:
                self.assertFalse(self.logs_in(name, user, "wrong"), (scheme, name))

    def test_dovecot_verifies_ours(self):
        """``doveadm pw -t`` accepts a hash of every scheme popserv makes."""
        self.patch(auth, "HASHER", CHEAP)
        self.patch(auth, "BCRYPT_ROUNDS", 4)
        self.patch(auth, "SHA_CRYPT_ROUNDS", 5000)
        for scheme in auth.MAKEABLE:
            hashed = auth.hash_password("pässwörd", scheme)
            out = subprocess.run(
                ["doveadm", "pw", "-t", hashed, "-p", "pässwörd"], capture_output=True, text=True
            )
            self.assertEqual(out.returncode, 0, (scheme, out.stderr))


class CheckerTests(unittest.TestCase):
    def setUp(self):
        self.patch(auth, "HASHER", CHEAP)
        self.path = self.mktemp()
        write_file(self.path, "bob:{PLAIN}builder\nzoë:{PLAIN}z\n")
        self.checker = auth.UserDBChecker(auth.PasswdFile(self.path, run_at_once))

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


class SecretCheckerTests(unittest.TestCase):
    # RFC 1939's APOP example: mrose, tanstaaf.
    magic = b"<1896.697170952@dbc.mtview.ca.us>"
    apop_digest = b"c4c9334bac560ecc979e58001b3e22fb"

    def setUp(self):
        self.patch(auth, "HASHER", CHEAP)
        self.path = self.mktemp()
        write_file(
            self.path,
            "mrose:{PLAIN}tanstaaf\n"
            f"carl:{auth.hash_password('tanstaaf', 'CRAM-MD5')}\n"
            f"alice:{auth.hash_password('tanstaaf')}\n",
        )
        self.checker = auth.SecretChecker(auth.PasswdFile(self.path, run_at_once))

    def apop(self, user: bytes, digest: bytes = apop_digest):
        return self.checker.requestAvatarId(APOPCredentials(self.magic, user, digest))

    def cram(self, user: bytes, password: bytes):
        credentials = CramMD5Credentials()
        credentials.challenge = b"<1.2@host>"
        credentials.username = user
        credentials.response = hmac.digest(password, credentials.challenge, "md5").hex().encode()
        return self.checker.requestAvatarId(credentials)

    def test_interface(self):
        """SecretChecker is a cred checker for hashed-password credentials."""
        verifyObject(ICredentialsChecker, self.checker)

    def test_apop_rfc1939(self):
        """RFC 1939's APOP example logs in a PLAIN user; upper-case hex too."""
        self.assertEqual(self.successResultOf(self.apop(b"mrose")), "mrose")
        self.assertEqual(
            self.successResultOf(self.apop(b"mrose", self.apop_digest.upper())), "mrose"
        )

    def test_apop_refused(self):
        """APOP fails for a wrong digest, an unknown user, and users without a PLAIN password."""
        self.failureResultOf(self.apop(b"mrose", b"0" * 32), UnauthorizedLogin)
        for user in [b"carl", b"alice", b"nobody", b"\xff"]:
            self.failureResultOf(self.apop(user), UnauthorizedLogin)

    def test_cram_md5(self):
        """CRAM-MD5 verifies against PLAIN and CRAM-MD5 entries, not hashed ones."""
        self.assertEqual(self.successResultOf(self.cram(b"mrose", b"tanstaaf")), "mrose")
        self.assertEqual(self.successResultOf(self.cram(b"carl", b"tanstaaf")), "carl")
        for user, password in [(b"carl", b"tanstaa"), (b"alice", b"tanstaaf"), (b"x", b"y")]:
            self.failureResultOf(self.cram(user, password), UnauthorizedLogin)

    def test_unavailable(self):
        """An unreadable user database fails with UserDBUnavailable."""
        os.unlink(self.path)
        self.failureResultOf(self.apop(b"mrose"), UserDBUnavailable)
        self.failureResultOf(self.cram(b"mrose", b"tanstaaf"), UserDBUnavailable)


class VerifiedCheckerTests(unittest.TestCase):
    def test_outcomes(self):
        """A verified exchange gives the user; a failed one UnauthorizedLogin; else its failure."""
        checker = auth.VerifiedChecker()
        verifyObject(ICredentialsChecker, checker)
        self.assertEqual(
            self.successResultOf(checker.requestAvatarId(sasl.SASLVerified("u", True))), "u"
        )
        refused = checker.requestAvatarId(sasl.SASLVerified("u", False))
        self.failureResultOf(refused, UnauthorizedLogin)
        broken = checker.requestAvatarId(sasl.SASLVerified("u", False, UserDBUnavailable("x")))
        self.failureResultOf(broken, UserDBUnavailable)

    def test_checkers(self):
        """checkers() covers passwords, hashed passwords and SASL outcomes."""
        kinds = [type(c) for c in auth.checkers(auth.PasswdFile("users"))]
        self.assertEqual(kinds, [auth.UserDBChecker, auth.SecretChecker, auth.VerifiedChecker])


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
