"""Tests for the ``popserv`` admin command, run in-process with temporary directories."""

from __future__ import annotations

import fcntl
import getpass
import io
import os
import stat
import subprocess
import sys

import argon2
from twisted.trial import unittest

import popserv
from popserv import admin, auth
from popserv.interfaces import UserDBUnavailable
from popserv.testing import run_at_once

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHEAP = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


class AdminTests(unittest.TestCase):
    def setUp(self):
        self.patch(auth, "HASHER", CHEAP)
        self.root = os.path.abspath(self.mktemp())
        os.mkdir(self.root)
        self.users = os.path.join(self.root, "etc", "users")
        self.mailroot = os.path.join(self.root, "mail")
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)

    def run_admin(self, *argv: str, stdin: str = "") -> int:
        self.patch(sys, "stdin", io.StringIO(stdin))
        return admin.main(list(argv))

    def paths(self) -> list[str]:
        return ["--users", self.users, "--mailroot", self.mailroot]

    def add(self, user: str, password: str = "secret", *extra: str) -> int:
        return self.run_admin(
            "adduser", user, "--password-stdin", *self.paths(), *extra, stdin=password + "\n"
        )

    def users_text(self) -> str:
        with open(self.users, encoding="utf-8") as f:
            return f.read()

    def check(self, user: str, password: bytes) -> bool:
        db = auth.PasswdFile(self.users, run_at_once)
        return self.successResultOf(db.check(user, password))

    def assert_error(self, status: int, message: str) -> None:
        self.assertEqual(status, 1)
        self.assertEqual(self.stderr.getvalue(), f"popserv: {message}\n")

    def test_adduser_writes_hash(self):
        """adduser appends an Argon2id line, never the clear password, to a new 0600 file."""
        self.assertEqual(self.add("alice", "s3cret-pass"), 0)
        text = self.users_text()
        self.assertTrue(text.startswith("alice:{ARGON2ID}$argon2id$v=19$"), text)
        self.assertNotIn("s3cret-pass", text)
        self.assertEqual(stat.S_IMODE(os.stat(self.users).st_mode), 0o600)
        self.assertTrue(self.check("alice", b"s3cret-pass"))
        self.assertEqual(self.stderr.getvalue(), "")

    def test_adduser_creates_maildir(self):
        """adduser creates the Maildir: <mailroot>/<user>, or <mailroot>/<domain>/<user>."""
        self.add("alice")
        self.add("bob@example.org")
        for path in [("alice",), ("example.org", "bob")]:
            for sub in ("tmp", "new", "cur"):
                self.assertTrue(os.path.isdir(os.path.join(self.mailroot, *path, sub)), path)

    def test_adduser_plain(self):
        """--scheme PLAIN stores the password as it is."""
        self.add("alice", "pw", "--scheme", "plain")
        self.assertEqual(self.users_text(), "alice:{PLAIN}pw\n")

    def test_adduser_schemes(self):
        """--scheme writes any scheme popserv can make, and the password verifies."""
        self.patch(auth, "BCRYPT_ROUNDS", 4)
        self.patch(auth, "SHA_CRYPT_ROUNDS", 5000)
        for scheme in ["BLF-CRYPT", "SHA512-CRYPT", "SCRAM-SHA-256", "CRAM-MD5"]:
            user = scheme.lower()
            self.assertEqual(self.add(user, "pw", "--scheme", scheme.lower()), 0, scheme)
            self.assertIn(f"\n{user}:{{{scheme}}}", "\n" + self.users_text())
            self.assertTrue(self.check(user, b"pw"), scheme)
            self.assertFalse(self.check(user, b"pW"), scheme)

    def test_passwd_scheme(self):
        """passwd --scheme changes the scheme along with the password."""
        self.add("alice", "old")
        status = self.run_admin(
            "passwd",
            "alice",
            "--password-stdin",
            "--scheme",
            "SCRAM-SHA-256",
            *self.paths(),
            stdin="new\n",
        )
        self.assertEqual(status, 0)
        self.assertTrue(self.users_text().startswith("alice:{SCRAM-SHA-256}4096,"))
        self.assertTrue(self.check("alice", b"new"))

    def test_adduser_keeps_password_spaces(self):
        """Only the line end is stripped from a password read on stdin."""
        self.add("alice", " pass word ")
        self.assertTrue(self.check("alice", b" pass word "))

    def test_adduser_prompt(self):
        """Without --password-stdin the password is asked twice."""
        answers = iter(["typed", "typed"])
        self.patch(getpass, "getpass", lambda prompt="": next(answers))
        self.assertEqual(self.run_admin("adduser", "alice", *self.paths()), 0)
        self.assertTrue(self.check("alice", b"typed"))

    def test_adduser_prompt_mismatch(self):
        """Two different answers at the prompt add nobody."""
        answers = iter(["one", "two"])
        self.patch(getpass, "getpass", lambda prompt="": next(answers))
        status = self.run_admin("adduser", "alice", *self.paths())
        self.assert_error(status, "the passwords do not match")
        self.assertFalse(os.path.exists(self.users))

    def test_adduser_refuses_duplicate(self):
        """An existing user is refused and the file is left alone."""
        self.add("alice", "first")
        before = self.users_text()
        self.assert_error(
            self.add("alice", "second"), f"user 'alice' already exists in {self.users}"
        )
        self.assertEqual(self.users_text(), before)

    def test_adduser_refuses_empty_password(self):
        """An empty password is refused."""
        self.assert_error(self.add("alice", ""), "the password is empty")
        self.assertFalse(os.path.exists(self.users))

    def test_adduser_refuses_bad_names(self):
        """Names with ':', whitespace, control characters, a leading '#' or a path are refused."""
        for name in ["a:b", "a b", "a\tb", "a\x01b", "#a", "", "../x", ".hidden", "a@b@c", "x/y"]:
            self.stderr.truncate(0)
            self.stderr.seek(0)
            self.assertEqual(self.add(name), 1, name)
            self.assertTrue(self.stderr.getvalue().startswith("popserv: "), name)
        self.assertFalse(os.path.exists(self.users))
        self.assertFalse(os.path.exists(self.mailroot))

    def write_users(self, *names: str) -> None:
        """A users file as an admin might edit it by hand, every password ``secret``."""
        os.makedirs(os.path.dirname(self.users), exist_ok=True)
        with open(self.users, "w", encoding="utf-8") as f:
            f.writelines(f"{name}:{{PLAIN}}secret\n" for name in names)

    def test_adduser_refuses_case_variant_of_a_domain(self):
        """adduser refuses alice@EXAMPLE.ORG beside alice@example.org, naming the other user."""
        self.assertEqual(self.add("alice@example.org"), 0)
        before = self.users_text()
        self.assert_error(
            self.add("alice@EXAMPLE.ORG"),
            "user 'alice@EXAMPLE.ORG' collides with user 'alice@example.org':"
            " both would use one Maildir (names are compared ignoring case)",
        )
        self.assertEqual(self.users_text(), before)

    def test_adduser_refuses_lower_case_twin_of_an_edited_name(self):
        """adduser refuses alice@example.org when the file already holds alice@EXAMPLE.ORG."""
        self.write_users("alice@EXAMPLE.ORG")
        status = self.add("alice@example.org")
        self.assertEqual(status, 1)
        self.assertIn("collides with user 'alice@EXAMPLE.ORG'", self.stderr.getvalue())
        self.assertEqual(auth.UsersFile.read(self.users).users(), ["alice@EXAMPLE.ORG"])

    def test_adduser_refuses_case_variant_of_a_local_part(self):
        """adduser refuses Alice beside alice: local parts are compared without case too."""
        self.add("alice")
        self.add("bob@example.org")
        self.assertEqual(self.add("Alice"), 1)
        self.assertIn("collides with user 'alice'", self.stderr.getvalue())
        self.assertEqual(self.add("BOB@example.org"), 1)
        self.assertIn("collides with user 'bob@example.org'", self.stderr.getvalue())
        self.assertEqual(auth.UsersFile.read(self.users).users(), ["alice", "bob@example.org"])

    def test_adduser_refuses_user_inside_another_maildir(self):
        """adduser refuses new@example.org beside the user example.org, whose new/ it would be."""
        self.add("example.org")
        self.assert_error(
            self.add("new@example.org"),
            "user 'new@example.org' collides with user 'example.org':"
            " its Maildir would lie inside the other's",
        )
        self.assertEqual(auth.UsersFile.read(self.users).users(), ["example.org"])
        self.assertFalse(os.path.exists(os.path.join(self.mailroot, "example.org", "new", "new")))

    def test_adduser_refuses_user_around_another_maildir(self):
        """adduser refuses the user example.org beside carol@example.org, in either case."""
        self.add("carol@example.org")
        self.assert_error(
            self.add("Example.Org"),
            "user 'Example.Org' collides with user 'carol@example.org':"
            " the other's Maildir would lie inside its own (names are compared ignoring case)",
        )
        self.assertEqual(auth.UsersFile.read(self.users).users(), ["carol@example.org"])

    def test_adduser_refuses_upper_case_domain(self):
        """adduser asks for a lower-case domain: SMTP would never find alice@Example.ORG."""
        self.assert_error(
            self.add("alice@Example.ORG"),
            "user 'alice@Example.ORG': write the domain in lower case, alice@example.org"
            " (domains are case-insensitive)",
        )
        self.assertFalse(os.path.exists(self.users))

    def test_adduser_accepts_names_that_do_not_collide(self):
        """alice, alice@example.org, new@example.org and a user named new live side by side."""
        for user in ["alice", "alice@example.org", "new@example.org", "new", "example.com"]:
            self.assertEqual(self.add(user), 0, user)
        self.assertEqual(self.stderr.getvalue(), "")

    def test_deluser_keeps_a_shared_maildir(self):
        """deluser --remove-mail refuses when a user of a hand-edited file shares the Maildir."""
        self.write_users("alice@EXAMPLE.ORG", "alice@example.org")
        maildir = os.path.join(self.mailroot, "example.org", "alice")
        os.makedirs(os.path.join(maildir, "new"))
        status = self.run_admin("deluser", "alice@EXAMPLE.ORG", "--remove-mail", *self.paths())
        self.assert_error(
            status,
            "not removing the Maildir of 'alice@EXAMPLE.ORG': user 'alice@example.org'"
            " reaches the same files; remove the user without --remove-mail",
        )
        self.assertTrue(os.path.isdir(os.path.join(maildir, "new")))
        self.assertEqual(len(auth.UsersFile.read(self.users).users()), 2)

    def test_passwd(self):
        """passwd replaces the hash: the old password fails, the new one works."""
        self.add("alice", "old")
        self.add("bob", "bobs")
        status = self.run_admin("passwd", "alice", "--password-stdin", *self.paths(), stdin="new\n")
        self.assertEqual(status, 0)
        self.assertFalse(self.check("alice", b"old"))
        self.assertTrue(self.check("alice", b"new"))
        self.assertTrue(self.check("bob", b"bobs"))

    def test_passwd_keeps_other_fields(self):
        """passwd keeps the uid/gid/home fields and comments of the file."""
        os.makedirs(os.path.dirname(self.users))
        with open(self.users, "w", encoding="utf-8") as f:
            f.write("# staff\nalice:{PLAIN}old:1000:1000::/home/alice::\n")
        self.run_admin("passwd", "alice", "--password-stdin", *self.paths(), stdin="new\n")
        lines = self.users_text().splitlines()
        self.assertEqual(lines[0], "# staff")
        self.assertTrue(lines[1].startswith("alice:{ARGON2ID}$argon2id$"))
        self.assertTrue(lines[1].endswith(":1000:1000::/home/alice::"))

    def test_passwd_unknown_user(self):
        """passwd for an unknown user is an error."""
        self.add("alice")
        status = self.run_admin("passwd", "bob", "--password-stdin", *self.paths(), stdin="x\n")
        self.assert_error(status, f"no such user: 'bob' in {self.users}")

    def test_deluser_keeps_mail(self):
        """deluser removes the line and keeps the Maildir."""
        self.add("alice")
        self.add("bob")
        self.assertEqual(self.run_admin("deluser", "alice", *self.paths()), 0)
        self.assertEqual(auth.UsersFile.read(self.users).users(), ["bob"])
        self.assertTrue(os.path.isdir(os.path.join(self.mailroot, "alice", "new")))

    def test_deluser_remove_mail(self):
        """deluser --remove-mail also deletes the Maildir."""
        self.add("bob@example.org")
        status = self.run_admin("deluser", "bob@example.org", "--remove-mail", *self.paths())
        self.assertEqual(status, 0)
        self.assertFalse(os.path.exists(os.path.join(self.mailroot, "example.org", "bob")))
        self.assertFalse(self.check("bob@example.org", b"secret"))

    def test_deluser_unknown_user(self):
        """deluser for an unknown user is an error."""
        self.add("alice")
        status = self.run_admin("deluser", "bob", *self.paths())
        self.assert_error(status, f"no such user: 'bob' in {self.users}")

    def output(self) -> str:
        """What the command printed on stdout since the last call."""
        text = self.stdout.getvalue()
        self.stdout.seek(0)
        self.stdout.truncate()
        return text

    def test_list(self):
        """list prints the users in file order, each with usage and limits (none here)."""
        for user in ["carol", "alice", "bob@example.org"]:
            self.add(user)
        self.output()
        self.assertEqual(self.run_admin("list", *self.paths()), 0)
        self.assertEqual(
            self.output(),
            "carol\t0\t0\t-\t-\nalice\t0\t0\t-\t-\nbob@example.org\t0\t0\t-\t-\n",
        )

    def test_list_no_file(self):
        """list on a missing users file is an error naming it, not an empty list."""
        status = self.run_admin("list", *self.paths())
        self.assert_error(status, f"{self.users}: no such users file (popserv adduser creates it)")
        self.assertEqual(self.output(), "")

    def test_list_empty_file(self):
        """list on an empty users file prints nothing and succeeds."""
        os.makedirs(os.path.dirname(self.users))
        open(self.users, "w").close()
        self.assertEqual(self.run_admin("list", *self.paths()), 0)
        self.assertEqual(self.output(), "")

    def test_commands_say_what_they_did(self):
        """adduser, passwd and deluser each print one line saying what changed."""
        self.add("alice")
        maildir = os.path.join(self.mailroot, "alice")
        self.assertEqual(self.output(), f"added user alice (Maildir {maildir})\n")
        self.run_admin("passwd", "alice", "--password-stdin", *self.paths(), stdin="new\n")
        self.assertEqual(self.output(), "password changed for alice\n")
        self.run_admin("deluser", "alice", *self.paths())
        self.assertEqual(self.output(), f"removed user alice (Maildir {maildir} kept)\n")
        self.add("alice")
        self.output()
        self.run_admin("deluser", "alice", "--remove-mail", *self.paths())
        self.assertEqual(self.output(), f"removed user alice and the Maildir {maildir}\n")
        self.assertEqual(self.stderr.getvalue(), "")

    def test_writers_make_a_readable_users_file_private(self):
        """A users file others may read loses those bits at the next edit, which says so."""
        self.add("alice")
        for argv, stdin in [
            (("adduser", "bob", "--password-stdin"), "pw\n"),
            (("passwd", "alice", "--password-stdin"), "pw\n"),
            (("deluser", "bob"), ""),
        ]:
            os.chmod(self.users, 0o644)
            self.output()
            self.assertEqual(self.run_admin(*argv, *self.paths(), stdin=stdin), 0, argv)
            self.assertEqual(stat.S_IMODE(os.stat(self.users).st_mode), 0o640, argv)
            self.assertEqual(
                self.output().splitlines()[0],
                f"{self.users}: the users file had mode 0644, open to every user of this"
                " machine; changed it to 0640",
            )
        self.assertEqual(self.stderr.getvalue(), "")

    def test_version(self):
        """--version prints the version and exits 0."""
        self.assertEqual(self.run_admin("--version"), 0)
        self.assertEqual(self.output(), f"popserv {popserv.__version__}\n")

    def test_config_file(self):
        """--config supplies the users file and mail root; --users overrides it."""
        config = os.path.join(self.root, "popserv.ini")
        with open(config, "w", encoding="utf-8") as f:
            f.write(f"[server]\nusers = {self.users}\nmailroot = {self.mailroot}\n")
        status = self.run_admin(
            "adduser", "alice", "--password-stdin", "--config", config, stdin="p\n"
        )
        self.assertEqual(status, 0)
        self.assertTrue(self.check("alice", b"p"))
        self.assertTrue(os.path.isdir(os.path.join(self.mailroot, "alice", "cur")))

        self.output()
        other = os.path.join(self.root, "other-users")
        open(other, "w").close()
        self.run_admin("list", "--config", config, "--users", other)
        self.assertEqual(self.output(), "")
        self.run_admin("list", "--config", config)
        self.assertEqual(self.output().split("\t")[0], "alice")

    def test_defaults(self):
        """Without --config or paths, the Config defaults under the current directory are used."""
        cwd = os.getcwd()
        self.addCleanup(os.chdir, cwd)
        os.chdir(self.root)
        status = self.run_admin("adduser", "alice", "--password-stdin", stdin="p\n")
        self.assertEqual(status, 0)
        self.assertTrue(os.path.isfile(os.path.join(self.root, "popserv-data", "users")))
        self.assertTrue(os.path.isdir(os.path.join(self.root, "popserv-data", "mail", "alice")))

    def test_missing_config(self):
        """A missing configuration file is an error naming it, without a traceback."""
        missing = os.path.join(self.root, "nope.ini")
        status = self.run_admin("list", "--config", missing)
        self.assert_error(
            status, f"{missing}: cannot read configuration: No such file or directory"
        )

    def test_unwritable_users_file(self):
        """An OS error writing the users file is reported with the path."""
        os.makedirs(self.users)  # a directory where the file should be
        status = self.add("alice")
        self.assertEqual(status, 1)
        self.assertTrue(self.stderr.getvalue().startswith(f"popserv: {self.users}: "))

    def test_usage_errors(self):
        """Bad usage exits with status 2: no command, unknown command, missing user."""
        self.assertEqual(self.run_admin(), 2)
        self.assertEqual(self.run_admin("frobnicate"), 2)
        self.assertEqual(self.run_admin("adduser"), 2)
        self.assertEqual(self.run_admin("adduser", "a", "--scheme", "MD5"), 2)
        self.assertIn("usage: popserv", self.stderr.getvalue())

    def test_help(self):
        """--help exits with status 0."""
        self.assertEqual(self.run_admin("--help"), 0)
        self.assertIn("adduser", self.stdout.getvalue())


class ModuleEntryTests(unittest.TestCase):
    def test_python_m_popserv_runs_the_admin_command(self):
        """``python3 -m popserv`` runs the admin command, for machines without the script."""
        root = self.mktemp()
        os.makedirs(root)
        users = os.path.join(root, "users")
        mail = os.path.join(root, "mail")
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "popserv",
                "adduser",
                "--users",
                users,
                "--mailroot",
                mail,
                "--password-stdin",
                "--scheme",
                "PLAIN",
                "carol",
            ],
            input=b"pw\n",
            env=env,
            check=True,
            timeout=60,
        )
        listed = subprocess.run(
            [sys.executable, "-m", "popserv", "list", "--users", users, "--mailroot", mail],
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.assertEqual(listed.stdout.split(b"\t")[0], b"carol")


def admin_command(*argv: str, **kwargs) -> subprocess.Popen:
    """The real ``popserv`` command of this checkout, in a process of its own."""
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen(
        [sys.executable, "-m", "popserv", *argv],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


class ParallelEditTests(unittest.TestCase):
    def test_twenty_parallel_addusers_keep_twenty_users(self):
        """Twenty adduser processes at once all succeed, and all twenty users can log in."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        users = os.path.join(root, "users")
        paths = ["--users", users, "--mailroot", os.path.join(root, "mail")]
        names = [f"user{n:02}" for n in range(20)]
        processes = [admin_command("adduser", name, "--password-stdin", *paths) for name in names]
        for name, process in zip(names, processes, strict=True):
            process.stdin.write(f"pw-{name}\n".encode())
            process.stdin.close()
        for name, process in zip(names, processes, strict=True):
            out, err = process.stdout.read(), process.stderr.read()
            self.assertEqual((process.wait(120), err), (0, b""), name)
            self.assertTrue(out.startswith(f"added user {name} ".encode()), out)
        self.assertEqual(sorted(auth.UsersFile.read(users).users()), names)
        db = auth.PasswdFile(users, run_at_once)
        for name in names:
            self.assertTrue(self.successResultOf(db.check(name, f"pw-{name}".encode())), name)


class UsersFileLockTests(unittest.TestCase):
    """The server's re-read honours the lock the admin commands hold while they edit."""

    def setUp(self):
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        self.users = os.path.join(root, "users")
        with auth.UsersFile.locked(self.users) as users:
            users.add("alice", "{PLAIN}a")
            users.write()

    def hold_lock(self) -> int:
        """Take the writers' exclusive lock from another open file, as a second process would."""
        fd = os.open(auth.lock_path(self.users), os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.addCleanup(os.close, fd)
        return fd

    def rewrite(self, *names: str) -> None:
        users = auth.UsersFile(self.users)
        for name in names:
            users.add(name, "{PLAIN}x")
        users.write()

    def test_lock_file_beside_the_users_file(self):
        """The lock is users.lock, mode 0600: the users file itself is replaced by rename."""
        lock = self.users + ".lock"
        self.assertEqual(auth.lock_path(self.users), lock)
        self.assertEqual(stat.S_IMODE(os.stat(lock).st_mode), 0o600)

    def test_keeps_its_copy_while_a_writer_holds_the_lock(self):
        """A change seen while the lock is held is read at the first lookup after it is free."""
        db = auth.PasswdFile(self.users)
        self.assertTrue(db.exists("alice"))
        fd = self.hold_lock()
        self.rewrite("bob")
        self.assertTrue(db.exists("alice"))
        self.assertFalse(db.exists("bob"))
        fcntl.flock(fd, fcntl.LOCK_UN)
        self.assertFalse(db.exists("alice"))
        self.assertTrue(db.exists("bob"))

    def test_first_read_while_locked_is_a_temporary_failure(self):
        """With no copy yet, a lookup during an edit is UserDBUnavailable, never "no such user"."""
        db = auth.PasswdFile(self.users)
        fd = self.hold_lock()
        self.assertRaises(UserDBUnavailable, db.exists, "alice")
        fcntl.flock(fd, fcntl.LOCK_UN)
        self.assertTrue(db.exists("alice"))

    def test_no_lock_file(self):
        """A users file written by hand, with no lock file beside it, is read as it is."""
        os.unlink(auth.lock_path(self.users))
        self.assertTrue(auth.PasswdFile(self.users).exists("alice"))

    def test_readers_do_not_block_each_other(self):
        """Another reader's shared lock does not keep the server from re-reading."""
        fd = os.open(auth.lock_path(self.users), os.O_RDONLY)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        self.assertTrue(auth.PasswdFile(self.users).exists("alice"))
