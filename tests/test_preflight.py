"""Ownership follows the server's user: what adduser makes as root, and what the start checks.

These run as root (here and in CI), with ``nobody`` as the server's user.
"""

from __future__ import annotations

import os
import poplib
import pwd
import smtplib
import subprocess
import sys

from twisted.trial import unittest
from twisted.trial.unittest import SkipTest

import popserv
import twisted
from popserv import preflight
from popserv.config import Config, ConfigError
from popserv.tap import Options, StartupError
from tests.live_twistd import HOST, REPO, TwistdServer


def require_root() -> None:
    """Changing owners needs root: skip without it, but fail in CI, which runs as root."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            raise AssertionError("these tests need root (CI=true)")
        raise SkipTest("changing owners needs root")


def let_in(path: str) -> None:
    """Let everyone enter the private directory trial's ``mktemp`` puts ``path`` in."""
    os.chmod(os.path.dirname(path), 0o755)


def owner(path: str) -> str:
    return pwd.getpwuid(os.stat(path).st_uid).pw_name


def admin(*argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """The real ``popserv`` command of this checkout."""
    return subprocess.run(
        [sys.executable, "-m", "popserv", *argv],
        input=stdin,
        capture_output=True,
        env=dict(os.environ, PYTHONPATH=REPO),
        timeout=60,
    )


class Files:
    """A config file, mail root and users file under a fresh directory, for user nobody.

    One process ([server] workers = 1): these tests are about the files, and workers
    also need a Python nobody can run (see WorkerCheckTests).
    """

    def __init__(self, testcase, settings: str = "user = nobody\n"):
        self.root = os.path.abspath(testcase.mktemp())
        os.makedirs(self.root)
        let_in(self.root)
        self.mailroot = os.path.join(self.root, "mail")
        self.users = os.path.join(self.root, "users")
        self.config_path = os.path.join(self.root, "popserv.ini")
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(
                f"[server]\nmailroot = {self.mailroot}\nusers = {self.users}\n"
                f"state_dir = {self.root}/state\nworkers = 1\n{settings}"
                f"[tls]\nself_signed_dir = {self.root}/tls\n"
            )

    def config(self, **changes) -> Config:
        config = Config(hostname=HOST, mailroot=self.mailroot, users=self.users, workers=1)
        return config.replace(**changes)

    def adduser(self, user: str) -> subprocess.CompletedProcess:
        return admin(
            "adduser", user, "--config", self.config_path, "--password-stdin",
            "--scheme", "PLAIN", stdin=b"pw\n",
        )  # fmt: skip


class AdduserOwnershipTests(unittest.TestCase):
    def setUp(self):
        require_root()

    def test_maildir_and_new_users_file_go_to_the_server_user(self):
        """With [server] user = nobody, root's adduser gives nobody the Maildir and users file."""
        files = Files(self)
        ran = files.adduser("bob@example.org")
        self.assertEqual(ran.returncode, 0, ran.stderr)
        maildir = os.path.join(files.mailroot, "example.org", "bob")
        self.assertEqual(
            ran.stdout.decode(),
            f"added user bob@example.org (Maildir {maildir}, owned by nobody)\n",
        )
        for path in [files.mailroot, os.path.dirname(maildir), maildir]:
            self.assertEqual(owner(path), "nobody", path)
        for sub in ("cur", "new", "tmp"):
            st = os.stat(os.path.join(maildir, sub))
            nobody = pwd.getpwnam("nobody")
            self.assertEqual((st.st_uid, st.st_gid), (nobody.pw_uid, nobody.pw_gid), sub)
        self.assertEqual(owner(files.users), "nobody")
        self.assertEqual(owner(files.users + ".lock"), "nobody")
        self.assertEqual(preflight.access_problems(files.config(user="nobody"), self.start()), [])

    def start(self) -> preflight.Start:
        return preflight.start_of(Config(hostname=HOST, user="nobody", workers=1))

    def test_mail_root_owner_without_server_user(self):
        """Without [server] user, a mail root owned by nobody makes nobody the Maildir's owner."""
        files = Files(self, settings="")
        os.makedirs(files.mailroot)
        nobody = pwd.getpwnam("nobody")
        os.chown(files.mailroot, nobody.pw_uid, nobody.pw_gid)
        self.assertEqual(files.adduser("alice").returncode, 0)
        self.assertEqual(owner(os.path.join(files.mailroot, "alice", "new")), "nobody")

    def test_root_owned_mail_root_keeps_root(self):
        """Without [server] user and with root's mail root, what adduser makes stays root's."""
        files = Files(self, settings="")
        self.assertEqual(files.adduser("alice").returncode, 0)
        self.assertEqual(owner(os.path.join(files.mailroot, "alice", "new")), "root")
        self.assertEqual(owner(files.users), "root")

    def test_unknown_server_user(self):
        """An unknown [server] user is one error line, and no user is added."""
        files = Files(self, settings="user = no-such-popserv-user\n")
        ran = files.adduser("alice")
        self.assertEqual(ran.returncode, 1)
        self.assertEqual(
            ran.stderr.decode(),
            "popserv: [server] user = no-such-popserv-user: no such user on this machine "
            "(create it, e.g. useradd --system popserv, or leave the key empty)\n",
        )
        self.assertFalse(os.path.exists(files.users))


class StartCheckTests(unittest.TestCase):
    """Before it starts, a server that will run as nobody checks that nobody can use its files."""

    def setUp(self):
        require_root()
        self.files = Files(self)
        self.config = self.files.config(user="nobody")

    def problems(self, twistd_uid=None) -> list[str]:
        return preflight.access_problems(self.config, preflight.start_of(self.config, twistd_uid))

    def test_missing_paths_are_made_for_the_user(self):
        """Paths the start creates and hands to [server] user are no problem."""
        self.assertEqual(self.problems(), [])

    def test_root_owned_mail_root(self):
        """A mail root nobody cannot use is one line naming it, with the chown that fixes it."""
        os.mkdir(self.files.mailroot, 0o700)
        self.assertEqual(
            self.problems(),
            [
                f"{self.files.mailroot}: user nobody cannot read/write/enter the mail root "
                f"(owner root, mode 0700); fix: chown -R nobody: {self.files.mailroot}"
            ],
        )

    def test_directory_above_that_nobody_cannot_enter(self):
        """A directory above the mail root that nobody cannot enter is named."""
        os.chmod(self.files.root, 0o700)
        problems = self.problems()
        self.assertEqual(len(problems), 2)  # the mail root and the users file, both under it
        self.assertTrue(
            problems[0].startswith(
                f"{self.files.mailroot}: user nobody cannot enter {self.files.root} "
                "(owner root, mode 0700), so it cannot reach the mail root; fix: chmod o+x"
            ),
            problems[0],
        )

    def test_root_owned_users_file(self):
        """A users file nobody cannot read is named, with its fix."""
        with open(self.files.users, "w"):
            pass
        os.chmod(self.files.users, 0o600)
        self.assertEqual(
            self.problems(),
            [
                f"{self.files.users}: user nobody cannot read the users file "
                f"(owner root, mode 0600); fix: chown nobody: {self.files.users}"
            ],
        )

    def test_log_directory_the_user_cannot_write(self):
        """A rotated [log] file needs a directory nobody can write: rotation renames in it."""
        logs = os.path.join(self.files.root, "logs")
        os.mkdir(logs, 0o755)
        config = self.config.replace(log_file=os.path.join(logs, "popserv.log"))
        self.assertEqual(
            preflight.access_problems(config, preflight.start_of(config)),
            [
                f"{logs}: user nobody cannot write/enter the [log] file's directory "
                f"(owner root, mode 0755); fix: chown nobody: {logs}, or set [log] "
                "max_size = 0 and rotate with logrotate"
            ],
        )
        unrotated = config.replace(log_max_size=0)
        self.assertEqual(preflight.access_problems(unrotated, preflight.start_of(unrotated)), [])

    def test_a_maildir_of_root(self):
        """A user's Maildir that root made (adduser without [server] user) is named."""
        nobody = pwd.getpwnam("nobody")
        os.mkdir(self.files.mailroot, 0o700)
        os.chown(self.files.mailroot, nobody.pw_uid, nobody.pw_gid)
        with open(self.files.users, "w") as f:
            f.write("alice:{PLAIN}a\nbob:{PLAIN}b\ncarol:{PLAIN}c\n")
        os.chown(self.files.users, nobody.pw_uid, nobody.pw_gid)
        for user in ("alice", "bob"):
            os.mkdir(os.path.join(self.files.mailroot, user), 0o700)
        maildir = os.path.join(self.files.mailroot, "alice")
        self.assertEqual(
            self.problems(),
            [
                f"{self.files.mailroot}: user nobody cannot use the Maildir {maildir} "
                f"(owner root, mode 0700), and 1 more; fix: chown -R nobody: "
                f"{self.files.mailroot}"
            ],
        )

    def test_twistd_uid_does_not_hand_over_what_root_makes(self):
        """With twistd --uid, a missing mail root would be root's: that is a problem."""
        problems = self.problems(twistd_uid=pwd.getpwnam("nobody").pw_uid)
        self.assertEqual(len(problems), 2)
        self.assertIn(f"{self.files.mailroot}: the mail root does not exist", problems[0])

    def test_root_server_has_no_problem(self):
        """A server that stays root can use anything."""
        os.mkdir(self.files.mailroot, 0o700)
        self.assertEqual(preflight.access_problems(Config(), preflight.start_of(Config())), [])

    def test_twistd_popserv_refuses_to_start(self):
        """``twistd popserv`` options with such a mail root stop the start with a line naming it."""
        os.mkdir(self.files.mailroot, 0o700)
        options = Options()
        with self.assertRaises(StartupError) as cm:
            options.parseOptions(["--config", self.files.config_path, "--pop3", "tcp:0"])
        self.assertEqual(
            str(cm.exception),
            f"popserv: {self.files.mailroot}: user nobody cannot read/write/enter the mail root "
            f"(owner root, mode 0700); fix: chown -R nobody: {self.files.mailroot}",
        )

    def test_check_start_raises_config_error(self):
        """check_start raises one ConfigError with a line per problem."""
        os.mkdir(self.files.mailroot, 0o700)
        self.assertRaises(ConfigError, preflight.check_start, self.config)


class WorkerCheckTests(unittest.TestCase):
    """With several workers, nobody must also run this Python, and read popserv and Twisted:
    each worker is a new process of them, started as nobody."""

    def setUp(self):
        require_root()
        self.files = Files(self)
        self.tree = os.path.abspath(self.mktemp())
        os.makedirs(self.tree, 0o755)
        let_in(self.tree)
        self.python = self.place("bin/python3", 0o755)
        self.patch(sys, "executable", self.python)
        self.patch(popserv, "__file__", self.place("lib/popserv/__init__.py", 0o644))
        self.patch(twisted, "__file__", self.place("lib/twisted/__init__.py", 0o644))

    def place(self, name: str, mode: int) -> str:
        """A file of ``mode`` at ``name`` under the tree, whose directories anyone may enter."""
        path = os.path.join(self.tree, name)
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
        with open(path, "w"):
            pass
        os.chmod(path, mode)
        return path

    def problems(self, workers: int) -> list[str]:
        config = self.files.config(user="nobody", workers=workers)
        return preflight.access_problems(config, preflight.start_of(config))

    def test_usable_python_is_no_problem(self):
        """A Python, popserv and Twisted that nobody may run and read are no problem."""
        self.assertEqual(self.problems(2), [])

    def test_python_in_a_directory_nobody_cannot_enter(self):
        """A Python under a directory of mode 0700 (a pyenv under /root, say) is one line
        naming the directory, with the fix; for one worker it is no problem."""
        os.chmod(os.path.join(self.tree, "bin"), 0o700)
        self.assertEqual(
            self.problems(2),
            [
                f"{self.python}: user nobody cannot run the 2 workers ([server] workers): it "
                f"cannot enter {self.tree}/bin (owner root, mode 0700); fix: install Python, "
                "Twisted and popserv where that user can run them, or set [server] workers = 1"
            ],
        )
        self.assertEqual(self.problems(1), [])

    def test_python_nobody_cannot_execute(self):
        """A Python only root may execute is named."""
        os.chmod(self.python, 0o700)
        (problem,) = self.problems(3)
        self.assertIn(f"it cannot execute {self.python} (owner root, mode 0700)", problem)
        self.assertIn("cannot run the 3 workers", problem)

    def test_twisted_nobody_cannot_read(self):
        """A Twisted package nobody cannot read is named."""
        os.chmod(os.path.join(self.tree, "lib", "twisted"), 0o711)
        (problem,) = self.problems(2)
        self.assertIn(f"it cannot read {self.tree}/lib/twisted (owner root, mode 0711)", problem)

    def test_twistd_popserv_refuses_to_start(self):
        """``twistd popserv`` with such a Python stops before it starts, with that line."""
        os.chmod(os.path.join(self.tree, "bin"), 0o700)
        with self.assertRaises(StartupError) as cm:
            Options().parseOptions(
                ["--config", self.files.config_path, "--pop3", "tcp:0", "--workers", "2"]
            )
        self.assertIn("user nobody cannot run the 2 workers", str(cm.exception))


class ServesAsServerUserTests(unittest.TestCase):
    def test_root_start_with_server_user_serves_adduser_maildir(self):
        """Started as root with [server] user = nobody, twistd serves what adduser made."""
        require_root()
        server = TwistdServer(self, {}, smtp=True, settings={"server": {"user": "nobody"}})
        server.require_workers_can_run_as("nobody")
        let_in(server.root)
        os.unlink(server.users_path)  # adduser makes it, for nobody
        ran = admin(
            "adduser", "alice", "--config", server.config_path, "--password-stdin",
            stdin=b"secret\n",
        )  # fmt: skip
        self.assertEqual(ran.returncode, 0, ran.stderr)
        server.start()
        self.assertIn("running as nobody", server.log())

        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as client:
            refused = client.sendmail(
                "carol@example.org",
                [f"alice@{HOST}"],
                b"Subject: to nobody's Maildir\r\n\r\nhello\r\n",
            )
        self.assertEqual(refused, {})

        client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=30)
        client.user("alice")
        client.pass_("secret")
        count, _ = client.stat()
        self.assertEqual(count, 1)
        self.assertIn(b"hello", client.retr(1)[1])
        client.quit()
