"""``popserv check``: every problem of a configuration at once, or its effective settings."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from twisted.trial import unittest

import popserv
from popserv import admin, tls
from popserv.config import Config, config_from_string, config_to_string
from tests.test_config import EVERY_KEY
from tests.test_preflight import Files, let_in, require_root

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CheckTests(unittest.TestCase):
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.config_path = os.path.join(self.root, "popserv.ini")
        self.base = (
            "[server]\n"
            f"mailroot = {self.root}/mail\n"
            f"users = {self.root}/users\n"
            f"state_dir = {self.root}/state\n"
            "[tls]\n"
            f"self_signed_dir = {self.root}/tls\n"
        )
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)

    def check(self, extra: str = "", *argv: str) -> int:
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(self.base + extra)
        return admin.main(["check", "--config", self.config_path, *argv])

    def problems(self) -> list[str]:
        return self.stderr.getvalue().splitlines()

    def test_three_typos_are_all_named(self):
        """An unknown key, a bad boolean and an unknown section: three lines, exit 1."""
        status = self.check("[pop3]\ntimout = 5\n[auth]\napop = maybe\n[smptd]\nlisten = tcp:25\n")
        self.assertEqual(status, 1)
        path = self.config_path
        self.assertEqual(
            self.problems(),
            [
                f"popserv: {path}: unknown key 'timout' in section [pop3]",
                f"popserv: {path}: [auth] apop = 'maybe': must be yes or no",
                f"popserv: {path}: unknown section [smptd]",
            ],
        )
        self.assertEqual(self.stdout.getvalue(), "")

    def test_good_file_prints_its_settings(self):
        """A file without problems prints every effective setting as INI, and exits 0."""
        self.assertEqual(self.check("[pop3]\ntimeout = 900\n"), 0)
        self.assertEqual(self.stderr.getvalue(), "")
        out = self.stdout.getvalue()
        self.assertTrue(
            out.startswith(
                f"# popserv {popserv.__version__}: {self.config_path}, no problems found\n"
            )
        )
        printed = config_from_string(out)
        expected = Config(
            mailroot=f"{self.root}/mail",
            users=f"{self.root}/users",
            state_dir=f"{self.root}/state",
            tls_self_signed_dir=f"{self.root}/tls",
            pop3_timeout=900.0,
        )
        self.assertEqual(printed, expected)
        self.assertIn("\n[smtp]\nlisten =\n    tcp6:25\n", out)

    def test_printed_settings_read_back_the_same(self):
        """The INI text of any settings, every key set or all at defaults, parses to them."""
        every = config_from_string(EVERY_KEY)
        for config in (Config(), every):
            self.assertEqual(config_from_string(config_to_string(config)), config)
        self.assertEqual(config_from_string(config_to_string(every, only_changed=True)), every)
        self.assertEqual(config_to_string(Config(), only_changed=True), "")

    def test_n_prints_only_what_differs(self):
        """-n prints only the settings that differ from the defaults, as doveconf -n."""
        self.assertEqual(self.check("[pop3]\ntimeout = 900\n[smtp]\nlisten =\n", "-n"), 0)
        body = self.stdout.getvalue().split("\n", 1)[1]
        self.assertEqual(
            body,
            "[server]\n"
            f"mailroot = {self.root}/mail\n"
            f"users = {self.root}/users\n"
            f"state_dir = {self.root}/state\n"
            "\n[pop3]\ntimeout = 900\n"
            f"\n[tls]\nself_signed_dir = {self.root}/tls\n"
            "\n[smtp]\nlisten =\n",
        )

    def test_unreadable_certificate_is_named(self):
        """A certificate that cannot be read is named, with the reason and the key to fix."""
        key = tls.generate_self_signed("localhost", os.path.join(self.root, "pair"))[1]
        missing = os.path.join(self.root, "nope.pem")
        self.assertEqual(self.check(f"cert = {missing}\nkey = {key}\n"), 1)
        self.assertEqual(
            self.problems(),
            [
                f"popserv: {missing}: cannot read the TLS certificate: No such file or "
                "directory; fix: set [tls] cert (or --tls-cert) to a PEM certificate chain "
                "the server can read, server certificate first"
            ],
        )

    def test_mismatched_pair_is_named(self):
        """A key that is not the certificate's is named with both files."""
        cert = tls.generate_self_signed("localhost", os.path.join(self.root, "one"))[0]
        key = tls.generate_self_signed("localhost", os.path.join(self.root, "two"))[1]
        self.assertEqual(self.check(f"cert = {cert}\nkey = {key}\n"), 1)
        (problem,) = self.problems()
        self.assertIn(key, problem)
        self.assertIn("does not match", problem)

    def test_made_self_signed_pair_is_checked(self):
        """A self-signed pair yet to be made is fine; a broken one already there is named."""
        self.assertEqual(self.check(), 0)
        os.makedirs(os.path.join(self.root, "tls"))
        for name in ("cert.pem", "key.pem"):
            with open(os.path.join(self.root, "tls", name), "w") as f:
                f.write("junk\n")
        self.assertEqual(self.check(), 1)
        self.assertIn("cert.pem", self.stderr.getvalue())

    def test_bad_listeners_are_named(self):
        """Listener strings that make no endpoint are named with their section; none binds."""
        extra = "[pop3]\nlisten = tcp:frog\n[pop3s]\nlisten = ssl:995\n[smtp]\nlisten = bogus:25\n"
        self.assertEqual(self.check(extra), 1)
        problems = self.problems()
        self.assertEqual(len(problems), 3, problems)
        named = ["[pop3] listen = tcp:frog", "[pop3s] listen = ssl:995", "[smtp] listen = bogus:25"]
        for problem, listener in zip(problems, named, strict=True):
            self.assertIn(listener, problem)

    def test_users_file_mode_and_contents(self):
        """A users file others can read, a line without a password field and a clash are named."""
        users = os.path.join(self.root, "users")
        with open(users, "w") as f:
            f.write("alice:{PLAIN}a\njunk\nAlice:{PLAIN}b\n")
        os.chmod(users, 0o644)
        self.assertEqual(self.check(), 1)
        problems = self.problems()
        self.assertEqual(len(problems), 3, problems)
        self.assertIn(f"{users}: the users file has mode 0644", problems[0])
        self.assertIn(f"{users}:2: a line without 'user:password'", problems[1])
        self.assertIn("'alice'", problems[2])
        self.assertIn("'Alice'", problems[2])

    def test_mail_root_the_server_user_cannot_use(self):
        """As root with [server] user = nobody, a mail root of root's 0700 is named with the fix."""
        require_root()
        files = Files(self)
        os.mkdir(files.mailroot, 0o700)
        status = admin.main(["check", "--config", files.config_path])
        self.assertEqual(status, 1)
        self.assertEqual(
            self.problems(),
            [
                f"popserv: {files.mailroot}: user nobody cannot read/write/enter the mail root "
                f"(owner root, mode 0700); fix: chown -R nobody: {files.mailroot}"
            ],
        )

    def test_user_option_checks_as_that_user(self):
        """--user checks access as a unit's User= would run the server."""
        require_root()
        let_in(self.root)
        os.mkdir(os.path.join(self.root, "mail"), 0o700)
        self.assertEqual(self.check(), 0)
        self.assertEqual(admin.main(["check", "--config", self.config_path, "--user", "nobody"]), 1)
        self.assertIn("user nobody cannot read/write/enter the mail root", self.stderr.getvalue())
        self.assertEqual(admin.main(["check", "--user", "no-such-popserv-user"]), 1)
        self.assertIn("--user no-such-popserv-user: no such user", self.stderr.getvalue())

    def test_real_command(self):
        """The installed form, ``python3 -m popserv check``, exits 1 and names the problem."""
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(self.base + "[pop3]\ntimeout = soon\n")
        ran = subprocess.run(
            [sys.executable, "-m", "popserv", "check", "--config", self.config_path],
            capture_output=True,
            env=dict(os.environ, PYTHONPATH=REPO),
            timeout=60,
        )
        self.assertEqual(ran.returncode, 1)
        self.assertEqual(
            ran.stderr.decode(),
            f"popserv: {self.config_path}: [pop3] timeout = 'soon': could not convert string "
            "to float: 'soon'\n",
        )
