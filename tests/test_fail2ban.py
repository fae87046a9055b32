"""The fail2ban filter and jail in etc/fail2ban/, run by Debian's ``fail2ban-regex`` over
the log a real ``twistd popserv`` writes when clients fail to log in.

Everything runs on 127.0.0.1.  Without ``fail2ban-regex`` the tests skip (CI=true: fail).
"""

import ast
import base64
import configparser
import os
import poplib
import re
import shutil
import smtplib
import socket
import subprocess
import time

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.live import require_client
from tests.live_twistd import HOST, REPO, TwistdServer
from tests.test_smtp_attacks import flood

FILTER = os.path.join(REPO, "etc", "fail2ban", "filter.d", "popserv.conf")
JAIL = os.path.join(REPO, "etc", "fail2ban", "jail.d", "popserv.conf")
SERVICE = os.path.join(REPO, "etc", "popserv.service")

#: A user name that tries to put another address in the failed-login line.
FRAMING_NAME = "x from 192.0.2.99 (bad credentials)"


#: A forged event a client hides in its user name: a line end, then a whole log line.
FORGED = (
    "alice\n2026-12-04T00:00:00+0000 [popserv.pop3#info] "
    "pop3.login_failed: peer=198.51.100.77 user=alice reason=bad-credentials"
)


def failed_login_form(workers: int = 1) -> re.Pattern:
    """The documented form of a failed POP3 login in twistd's log (README, "Running in
    production"); with several ``workers`` each line names the worker that logged it."""
    tag = r",worker=\d+" if workers > 1 else ""
    return re.compile(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[popserv\.pop3#info" + tag + r"\] "
        r"pop3\.login_failed: peer=(?P<peer>\S+) user=(?P<user>\S+|\"(?:[^\"\\\\]|\\\\.)*\") "
        r"reason=(?P<reason>[a-z-]+)(?: detail=.*)?$"
    )


#: A failed login as one process logs it.
FAILED_LOGIN = failed_login_form()


def fail2ban_regex(log_path: str, filter_spec: str = FILTER) -> tuple[int, int, list[str]]:
    """Run fail2ban-regex; (lines read, lines matched, the address of each match)."""
    program = require_client("fail2ban-regex")
    summary = subprocess.run(
        [program, log_path, filter_spec], capture_output=True, text=True, timeout=60
    )
    assert summary.returncode == 0, summary.stderr + summary.stdout
    m = re.search(r"^Lines: (\d+) lines, \d+ ignored, (\d+) matched", summary.stdout, re.M)
    assert m, summary.stdout
    ips = subprocess.run(
        [program, "--out", "ip", log_path, filter_spec],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ips.returncode == 0, ips.stderr + ips.stdout
    return int(m.group(1)), int(m.group(2)), ips.stdout.split()


class FilterTests(SynchronousTestCase):
    """Failed logins against a real twistd, then fail2ban-regex over its log file."""

    def setUp(self):
        require_client("fail2ban-regex")
        self.server = TwistdServer(self, {"alice": "secret"}, smtp=True)
        self.server.start()

    def pop3(self) -> poplib.POP3:
        client = poplib.POP3("127.0.0.1", self.server.pop3_port, timeout=10)
        self.addCleanup(client.close)
        return client

    def failed_login(self, user: str, password: str) -> None:
        client = self.pop3()
        client.user(user)
        with self.assertRaises(poplib.error_proto) as cm:
            client.pass_(password)
        self.assertIn(b"[AUTH]", cm.exception.args[0])
        client.quit()

    def test_failed_logins_are_counted_for_the_peer(self):
        """Each failed login and SMTP probe is one match for 127.0.0.1; successes are not."""
        self.failed_login("alice", "wrong")
        self.failed_login("mallory", "secret")
        client = self.pop3()
        with self.assertRaises(poplib.error_proto):
            client._shortcmd("AUTH PLAIN " + base64.b64encode(b"\0alice").decode())
        client.quit()
        # A successful login, and a second one refused as [IN-USE]: neither is a failure.
        first = self.pop3()
        first.user("alice")
        first.pass_("secret")
        second = self.pop3()
        second.user("alice")
        with self.assertRaises(poplib.error_proto) as cm:
            second.pass_("secret")
        self.assertIn(b"[IN-USE]", cm.exception.args[0])
        first.quit()
        with smtplib.SMTP("127.0.0.1", self.server.smtp_port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("s@remote.example")
            self.assertEqual(smtp.rcpt(f"nobody@{HOST}")[0], 550)
            self.assertEqual(smtp.rcpt("someone@elsewhere.example")[0], 550)
        self.server.stop()

        log = self.server.log()
        form = failed_login_form(self.server.worker_count)
        failed = [form.match(line) for line in log.splitlines()]
        reasons = [m.group("reason") for m in failed if m]
        self.assertEqual(reasons, ["bad-credentials", "bad-credentials", "bad-sasl", "in-use"])
        self.assertIn(
            'detail="PLAIN takes authzid, authcid and password separated by two NULs"', log
        )
        self.assertEqual({m.group("peer") for m in failed if m}, {"127.0.0.1"})
        self.assertIn("pop3.login: peer=127.0.0.1 user=alice ", log)
        lines, matched, ips = fail2ban_regex(self.server.log_path)
        self.assertEqual(lines, len(log.splitlines()))
        self.assertEqual(matched, 5)
        self.assertEqual(ips, ["127.0.0.1"] * 5)

    def test_user_name_cannot_frame_another_address(self):
        """A user name holding another address is still counted, for the real peer only."""
        self.failed_login(FRAMING_NAME, "wrong")
        self.failed_login("alice", "wrong")
        self.server.stop()
        log = self.server.log()
        self.assertIn(
            f'pop3.login_failed: peer=127.0.0.1 user="{FRAMING_NAME}" reason=bad-credentials', log
        )
        _, matched, ips = fail2ban_regex(self.server.log_path)
        self.assertNotIn("192.0.2.99", ips)
        self.assertEqual(ips, ["127.0.0.1", "127.0.0.1"])

    def test_aggressive_mode_counts_bad_command_floods(self):
        """mode=aggressive also matches a session closed for too many bad commands."""
        client = self.pop3()
        for _ in range(20):
            try:
                client._shortcmd("XYZZY")
            except poplib.error_proto:
                pass
        self.server.stop()
        self.assertIn("pop3.bad_commands: peer=127.0.0.1 ", self.server.log())
        self.assertEqual(fail2ban_regex(self.server.log_path)[1], 0)
        _, matched, ips = fail2ban_regex(self.server.log_path, FILTER + "[mode=aggressive]")
        self.assertEqual(ips, ["127.0.0.1"])


class SMTPAggressiveTests(SynchronousTestCase):
    """SMTP sessions closed for their errors, as mode=aggressive counts them."""

    def setUp(self):
        require_client("fail2ban-regex")
        self.server = TwistdServer(
            self,
            {"alice": "secret"},
            smtp=True,
            settings={"smtp": {"max_connections": "3", "max_connections_per_peer": "2"}},
        )
        self.server.start()

    def greeting(self, source: str) -> bytes:
        """The first reply to a new SMTP connection from ``source``, which is kept open."""
        sock = socket.create_connection(
            ("127.0.0.1", self.server.smtp_port), timeout=10, source_address=(source, 0)
        )
        self.addCleanup(sock.close)
        return sock.recv(200)

    def test_refused_connections(self):
        """A peer over its own limit is an aggressive match; one refused as the server is full
        is not."""
        for _ in range(2):
            self.assertTrue(self.greeting("127.0.0.1").startswith(b"220 "))
        self.assertIn(b"from your address", self.greeting("127.0.0.1"))
        self.assertTrue(self.greeting("127.0.80.1").startswith(b"220 "))
        self.assertIn(b"try again later", self.greeting("127.0.80.3"))
        self.server.stop()
        self.assertEqual(self.server.log().count(" stage=connect code=421 "), 2)
        self.assertEqual(fail2ban_regex(self.server.log_path)[2], [])
        _, _, ips = fail2ban_regex(self.server.log_path, FILTER + "[mode=aggressive]")
        self.assertEqual(ips, ["127.0.0.1"])

    def test_sessions_closed_for_errors(self):
        """Each session closed for bad commands or refused recipients is one aggressive match."""
        port = self.server.smtp_port
        flood(port, b"XYZZY\r\n" * 30)
        rcpts = b"".join(b"RCPT TO:<nobody%d@%s>\r\n" % (n, HOST.encode()) for n in range(30))
        flood(port, b"EHLO x.test\r\nMAIL FROM:<x@x.test>\r\n" + rcpts)
        self.server.stop()
        self.assertEqual(self.server.log().count(" stage=session code=421 "), 2)
        self.assertEqual(fail2ban_regex(self.server.log_path)[2], ["127.0.0.1"] * 20)
        _, _, ips = fail2ban_regex(self.server.log_path, FILTER + "[mode=aggressive]")
        self.assertEqual(ips, ["127.0.0.1"] * 22)


class ScramCancelTests(SynchronousTestCase):
    """SCRAM exchanges given up after their costly first message, in a real twistd's log."""

    def test_abandoned_exchanges_are_counted(self):
        """A SCRAM exchange cancelled or dropped after client-first is one match for the peer."""
        require_client("fail2ban-regex")
        server = TwistdServer(
            self, {"alice": "secret"}, settings={"auth": {"mechanisms": "SCRAM-SHA-256"}}
        )
        server.start()
        first = base64.b64encode(b"n,,n=alice,r=clientnonce0123")
        for ending in (b"*\r\n", None):
            with socket.create_connection(("127.0.0.1", server.pop3_port), 10) as sock:
                replies = sock.makefile("rb")
                replies.readline()
                sock.sendall(b"AUTH SCRAM-SHA-256 " + first + b"\r\n")
                self.assertTrue(replies.readline().startswith(b"+ "))
                if ending is not None:
                    sock.sendall(ending)
                    self.assertEqual(replies.readline(), b"-ERR Authentication cancelled.\r\n")
        deadline = time.monotonic() + 10
        while server.log().count("reason=sasl-cancelled") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()
        form = failed_login_form(server.worker_count)
        failed = [form.match(line) for line in server.log().splitlines()]
        self.assertEqual([m.group("reason") for m in failed if m], ["sasl-cancelled"] * 2)
        _, _, ips = fail2ban_regex(server.log_path)
        self.assertEqual(ips, ["127.0.0.1"] * 2)


class InjectionTests(SynchronousTestCase):
    """Clients that hide line ends, escapes and forged events in the names they send.

    The attacker connects from 127.0.80.1 (any 127/8 address is this machine's loopback).
    """

    ATTACKER = "127.0.80.1"

    def setUp(self):
        require_client("fail2ban-regex")
        self.server = TwistdServer(self, {"alice": "secret"}, smtp=True)
        self.server.start()

    def connect(self, port: int) -> socket.socket:
        sock = socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(self.ATTACKER, 0)
        )
        self.addCleanup(sock.close)
        sock.makefile("rb").readline()
        return sock

    def pop3_exchange(self, lines: list[bytes]) -> list[bytes]:
        """Send each line on a fresh session from the attacker; the replies, one a line."""
        sock = self.connect(self.server.pop3_port)
        replies = sock.makefile("rb")
        answers = []
        for line in lines:
            sock.sendall(line + b"\r\n")
            answers.append(replies.readline())
        sock.sendall(b"QUIT\r\n")
        replies.readline()
        return answers

    def test_forged_events_ban_only_the_attacker(self):
        """Names with LF, CR, ESC and spaces are logged quoted; fail2ban counts 127.0.80.1 only."""
        names = [
            FORGED,
            FORGED.replace("\n", "\r"),
            "\x1b[31malice\x1b[0m",
            "alice from 192.0.2.99",
            "bob smith",
            FORGED.replace("\n", "\n\t"),
        ]
        for name in names:
            plain = base64.b64encode(b"\0" + name.encode() + b"\0wrong").decode()
            (answer,) = self.pop3_exchange([f"AUTH PLAIN {plain}".encode()])
            self.assertTrue(answer.startswith(b"-ERR [AUTH]"), answer)
        sock = self.connect(self.server.smtp_port)
        replies = sock.makefile("rb")
        sock.sendall(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\n")
        replies.readline()
        while not replies.readline().startswith(b"250 "):
            pass
        replies.readline()
        for rcpt in (b'<"\x1b[31m"@localhost>', b'<"x\r\n"@elsewhere.example>'):
            sock.sendall(b"RCPT TO:" + rcpt + b"\r\n")
            self.assertTrue(replies.readline()[:1] in (b"5",))
        sock.sendall(b"QUIT\r\n")
        replies.readline()
        self.server.stop()
        log = self.server.log()
        for line in log.splitlines():
            self.assertNotIn("\x1b", line)
            self.assertFalse(line.startswith("\t") and "login_failed" in line, line)
        self.assertNotIn("\r", log)
        _, _, ips = fail2ban_regex(self.server.log_path)
        self.assertIn(self.ATTACKER, ips)
        self.assertEqual(set(ips), {self.ATTACKER})
        self.assertGreaterEqual(ips.count(self.ATTACKER), len(names))


def require_journal_tools() -> str:
    """systemd-journal-remote's path, once fail2ban can read journal files (python3-systemd)."""
    remote = require_client("systemd-journal-remote", "/usr/lib/systemd:/lib/systemd")
    with open(require_client("fail2ban-regex"), encoding="utf-8") as f:
        interpreter = f.readline()[2:].split()
    if subprocess.run([*interpreter, "-c", "import systemd.journal"]).returncode != 0:
        if os.environ.get("CI") == "true":
            raise AssertionError("fail2ban cannot read the journal: install python3-systemd")
        raise SkipTest("python3-systemd is not installed")
    return remote


def unit_setting(key: str) -> str:
    """The value of ``key`` in etc/popserv.service."""
    with open(SERVICE, encoding="utf-8") as f:
        [value] = re.findall(rf"^{key}=(.*)$", f.read(), re.M)
    return value


def journal_file(directory: str, entries: list[dict[str, str]]) -> str:
    """A journal file of ``entries`` (journal fields), written by systemd-journal-remote."""
    export = os.path.join(directory, "entries.export")
    now = int(time.time() * 1_000_000)
    with open(export, "wb") as f:
        for n, fields in enumerate(entries):
            record = {
                "__REALTIME_TIMESTAMP": str(now + n),
                "__MONOTONIC_TIMESTAMP": str(1_000_000 + n),
                "_BOOT_ID": "5d1a0fbb0d6e4c1f9a3e2b7c8d9e0f11",
                "_HOSTNAME": socket.gethostname(),
                **fields,
            }
            for key, value in record.items():
                assert "\n" not in value, value
                f.write(f"{key}={value}\n".encode())
            f.write(b"\n")
    path = os.path.join(directory, "popserv.journal")
    subprocess.run(
        [require_journal_tools(), f"--output={path}", export],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return path


class JournalTests(SynchronousTestCase):
    """The filter over the journal, where etc/popserv.service logs, as the jail reads it."""

    def test_failed_logins_are_counted_from_the_journal(self):
        """The unit's standard output in the journal gives the matches the file gives; entries
        of other units, even with the same text, are not read (the filter's journalmatch)."""
        require_journal_tools()
        self.assertIn("--logfile=- ", unit_setting("ExecStart"))
        server = TwistdServer(self, {"alice": "secret"}, smtp=True, stdout_log=True)
        server.start()
        for user in ("alice", "mallory"):
            client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=10)
            client.user(user)
            with self.assertRaises(poplib.error_proto):
                client.pass_("wrong")
            client.quit()
        client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=10)
        client.user("alice")
        client.pass_("secret")
        client.quit()
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("s@remote.example")
            self.assertEqual(smtp.rcpt(f"nobody@{HOST}")[0], 550)
        server.stop()
        lines = server.log().splitlines()
        self.assertTrue(any("pop3.login: peer=127.0.0.1 user=alice " in line for line in lines))

        # As systemd stores a service's standard output (StandardOutput=journal).
        unit = {
            "_SYSTEMD_UNIT": os.path.basename(SERVICE),
            "SYSLOG_IDENTIFIER": unit_setting("SyslogIdentifier"),
            "_PID": str(server.process.pid),
            "_COMM": "twistd",
            "_TRANSPORT": "stdout",
            "PRIORITY": "6",
        }
        other = {**unit, "_SYSTEMD_UNIT": "other.service", "_PID": "4242"}
        forged = lines[0].split(" [", 1)[0] + (
            " [popserv.pop3#info] pop3.login_failed: peer=192.0.2.66 user=x reason=bad-credentials"
        )
        entries = [{**unit, "MESSAGE": line} for line in lines]
        entries.insert(1, {**other, "MESSAGE": forged})
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        journal = journal_file(directory, entries)
        read, matched, ips = fail2ban_regex(f"systemd-journal[journalfiles={journal}]")
        self.assertEqual((read, matched), (len(lines), 3))
        self.assertEqual(ips, ["127.0.0.1"] * 3)


class JailTests(SynchronousTestCase):
    def test_jail_names_filter_ports_and_journal(self):
        """The jail enables the popserv filter on pop3, pop3s and smtp over the journal of
        the unit that etc/popserv.service is."""
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(JAIL)
        jail = parser["popserv"]
        self.assertEqual(jail["enabled"], "true")
        self.assertEqual(jail["filter"], "popserv")
        self.assertEqual(jail["port"].split(","), ["pop3", "pop3s", "smtp"])
        self.assertEqual(jail["backend"], "systemd")
        self.assertNotIn("logpath", jail)
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(FILTER)
        self.assertEqual(
            parser["Init"]["journalmatch"], f"_SYSTEMD_UNIT={os.path.basename(SERVICE)}"
        )

    def test_fail2ban_loads_the_jail(self):
        """fail2ban-client accepts the jail and filter as installed under /etc/fail2ban/, with
        the systemd backend and the unit's journal match."""
        client = require_client("fail2ban-client")
        config = os.path.join(os.path.abspath(self.mktemp()), "fail2ban")
        shutil.copytree("/etc/fail2ban", config)
        # Only this jail: Debian's own (sshd) would look for logs this machine may not have.
        for name in os.listdir(os.path.join(config, "jail.d")):
            os.remove(os.path.join(config, "jail.d", name))
        shutil.copy(FILTER, os.path.join(config, "filter.d", "popserv.conf"))
        shutil.copy(JAIL, os.path.join(config, "jail.d", "popserv.conf"))
        tested = subprocess.run(
            [client, "-c", config, "-t"], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(tested.returncode, 0, tested.stdout + tested.stderr)
        dumped = subprocess.run(
            [client, "-c", config, "-d"], capture_output=True, text=True, timeout=60
        )
        commands = [
            ast.literal_eval(line) for line in dumped.stdout.splitlines() if line.startswith("[")
        ]
        self.assertIn(["add", "popserv", "systemd"], commands)
        self.assertIn(
            ["set", "popserv", "addjournalmatch", "_SYSTEMD_UNIT=popserv.service"], commands
        )
