"""Each startup mistake of ``twistd popserv`` ends in one line naming the file or port.

A real ``twistd -n popserv`` child per mistake: exit status not 0, one ``popserv: ...``
line on stderr, nothing on stdout, no traceback and no usage text.  Every listener is
on 127.0.0.1; a busy port is a socket the test itself listens on.
"""

from __future__ import annotations

import contextlib
import io
import os
import pwd
import socket
import subprocess
import sys

from cryptography.hazmat.primitives import serialization
from twisted.internet.error import CannotListenError
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from popserv import admin, startup, tls
from popserv.config import Config
from popserv.service import Listener
from popserv.startup import StartupError, check_ports
from tests.live_twistd import REPO, TWISTD, write_private

#: How long a child may take to fail; one that is still running has started instead.
TIMEOUT = 60


def unused_uid() -> int:
    """A uid without a passwd entry on this machine."""
    uid = 54321
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


def listening_socket(testcase) -> int:
    """The port of a socket the test listens on, on 127.0.0.1, until it ends."""
    sock = socket.socket()
    testcase.addCleanup(sock.close)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock.getsockname()[1]


class Setup:
    """A directory with a config file (no POP3S, no SMTP, POP3 on 127.0.0.1 port 0) and
    a certificate pair, for a child that would start if not for the mistake added."""

    def __init__(self, testcase, **sections: dict[str, str]):
        self.root = os.path.abspath(testcase.mktemp())
        os.makedirs(self.root)
        self.cert, self.key = tls.generate_self_signed("localhost", self.path("pair"))
        self.other_cert, self.other_key = tls.generate_self_signed("other", self.path("other"))
        self.settings = {
            "server": {
                "hostname": "startup.test",
                "mailroot": self.path("mail"),
                "users": write_private(self.path("users"), ""),
                "state_dir": self.path("state"),
            },
            "pop3": {"listen": "tcp:0:interface=127.0.0.1"},
            "pop3s": {"listen": ""},
            "smtp": {"listen": ""},
            "tls": {"self_signed_dir": self.path("tls")},
        }
        self.config = self.path("popserv.ini")
        self.write(**sections)

    def write(self, **sections: dict[str, str]) -> None:
        """Add or replace keys of the config file."""
        for section, keys in sections.items():
            self.settings.setdefault(section, {}).update(keys)
        with open(self.config, "w", encoding="utf-8") as f:
            for section, keys in self.settings.items():
                f.write(f"[{section}]\n")
                f.writelines(f"{key} = {value}\n" for key, value in keys.items())

    def path(self, *names: str) -> str:
        return os.path.join(self.root, *names)


def twistd(*argv: str, daemon: bool = False, pidfile: str = "") -> tuple[int, str, str]:
    """Run ``twistd [-n] ARGV`` in the repository; its exit status, stdout and stderr."""
    foreground = [] if daemon else ["-n"]
    try:
        ran = subprocess.run(
            [sys.executable, "-c", TWISTD, *foreground, f"--pidfile={pidfile}", *argv],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"twistd {' '.join(argv)} started instead of failing") from e
    return ran.returncode, ran.stdout, ran.stderr


class TwistdStartTests(SynchronousTestCase):
    """``twistd -n popserv`` with one mistake each."""

    def setUp(self):
        self.setup = Setup(self)

    def popserv(self, *options: str, setup: Setup | None = None) -> tuple[int, str, str]:
        return twistd("popserv", "--config", (setup or self.setup).config, *options)

    def assert_one_line(self, ran: tuple[int, str, str], *fragments: str) -> str:
        """The child failed with one line on stderr holding ``fragments``, and nothing else."""
        status, out, err = ran
        self.assertNotEqual(status, 0, out + err)
        self.assertEqual(out, "")
        self.assertNotIn("Traceback", err)
        self.assertNotIn("Usage:", err)
        self.assertNotIn("--config=", err)  # how the usage text lists the options
        lines = err.splitlines()
        self.assertEqual(len(lines), 1, err)
        (line,) = lines
        self.assertTrue(line.startswith("popserv: "), line)
        for fragment in fragments:
            self.assertIn(fragment, line)
        return line

    def test_missing_certificate(self):
        """A missing certificate file is named as unreadable, with [tls] cert to fix."""
        missing = self.setup.path("nope", "cert.pem")
        ran = self.popserv("--tls-cert", missing, "--tls-key", self.setup.key)
        line = self.assert_one_line(
            ran, missing, "cannot read the TLS certificate: No such file or directory", "[tls] cert"
        )
        self.assertNotIn("no PEM", line)

    def test_unreadable_certificate(self):
        """A certificate path that cannot be read (a directory) is named with the reason."""
        ran = self.popserv("--tls-cert", self.setup.root, "--tls-key", self.setup.key)
        self.assert_one_line(
            ran, self.setup.root, "cannot read the TLS certificate: Is a directory", "[tls] cert"
        )

    def test_missing_key(self):
        """A missing key file is named as unreadable, with [tls] key to fix."""
        missing = self.setup.path("nope", "key.pem")
        ran = self.popserv("--tls-cert", self.setup.cert, "--tls-key", missing)
        self.assert_one_line(
            ran, missing, "cannot read the TLS key: No such file or directory", "[tls] key"
        )

    def test_unreadable_key(self):
        """A key path that cannot be read (a directory) is named with the reason."""
        ran = self.popserv("--tls-cert", self.setup.cert, "--tls-key", self.setup.root)
        self.assert_one_line(ran, self.setup.root, "cannot read the TLS key: Is a directory")

    def test_key_of_another_certificate(self):
        """A key that is not the certificate's is named with both files."""
        ran = self.popserv("--tls-cert", self.setup.cert, "--tls-key", self.setup.other_key)
        self.assert_one_line(
            ran,
            f"{self.setup.other_key}: the private key does not match the first certificate "
            f"of {self.setup.cert}",
            "fix: set [tls] cert and key",
        )

    def test_no_certificate_in_file(self):
        """A certificate file without a PEM certificate (a key, here) is named."""
        ran = self.popserv("--tls-cert", self.setup.key, "--tls-key", self.setup.key)
        self.assert_one_line(ran, f"{self.setup.key}: no PEM certificate in the file")

    def test_no_key_in_file(self):
        """A key file without a PEM key (the certificate, here) is named."""
        ran = self.popserv("--tls-cert", self.setup.cert, "--tls-key", self.setup.cert)
        self.assert_one_line(ran, f"{self.setup.cert}: no PEM private key in the file")

    def test_encrypted_key(self):
        """A passphrase-protected key is named as such."""
        with open(self.setup.key, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        encrypted = write_private(
            self.setup.path("encrypted.pem"),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            ).decode("ascii"),
        )
        ran = self.popserv("--tls-cert", self.setup.cert, "--tls-key", encrypted)
        self.assert_one_line(ran, f"{encrypted}: the private key is encrypted", "unencrypted")

    def test_broken_self_signed_pair(self):
        """A self-signed pair that holds no certificate is named, with how to get a new one."""
        os.makedirs(self.setup.path("tls"))
        for name in ("cert.pem", "key.pem"):
            write_private(self.setup.path("tls", name), "junk\n")
        ran = self.popserv()
        self.assert_one_line(
            ran, self.setup.path("tls", "cert.pem"), "no PEM certificate", "gencert --force"
        )

    def test_busy_port(self):
        """A port another socket listens on is named with its listener and option."""
        busy = f"tcp:{listening_socket(self)}:interface=127.0.0.1"
        line = self.assert_one_line(self.popserv("--pop3", busy))
        self.assertEqual(
            line,
            f"popserv: cannot listen on {busy} (POP3): address already in use; stop the "
            "other server or choose another port with --pop3 or [pop3] listen",
        )

    def test_busy_smtp_port_from_the_file(self):
        """A busy SMTP port of the config file is named as the SMTP listener."""
        busy = f"tcp:{listening_socket(self)}:interface=127.0.0.1"
        setup = Setup(self, smtp={"listen": busy})
        self.assert_one_line(self.popserv(setup=setup), f"{busy} (SMTP)", "[smtp] listen")

    def test_two_listeners_on_one_port(self):
        """Two listeners of one configuration on the same port are named together."""
        port = socket.socket()
        port.bind(("127.0.0.1", 0))
        free = f"tcp:{port.getsockname()[1]}:interface=127.0.0.1"
        port.close()
        ran = self.popserv("--pop3", free, "--pop3s", free)
        self.assert_one_line(ran, f"{free} (POP3S): the same port as {free} (POP3)")

    def test_socket_file_in_the_way(self):
        """A file where a unix: listener's socket goes is named, with the fix."""
        path = write_private(self.setup.path("pop3.sock"), "")
        ran = self.popserv("--pop3", f"unix:{path}")
        self.assert_one_line(ran, f"unix:{path} (POP3): the file already exists", "remove it")

    def test_bad_listener(self):
        """A listener string that makes no endpoint is quoted, with an example."""
        ran = self.popserv("--pop3", "tcp:notaport")
        self.assert_one_line(ran, "invalid POP3 listener 'tcp:notaport'", "tcp:110")

    def test_ssl_pop3s_listener(self):
        """A POP3S listener that is TLS already is refused: popserv adds TLS itself."""
        ran = self.popserv("--pop3s", "ssl:0:interface=127.0.0.1")
        self.assert_one_line(ran, "'ssl:0:interface=127.0.0.1' already has TLS", "tcp:995")

    def test_no_pop3_listener(self):
        """--pop3 '' leaves no POP3 listener: the line says how to give one."""
        self.assert_one_line(self.popserv("--pop3", ""), "no POP3 listener", "--pop3")

    def test_unknown_server_user(self):
        """An unknown [server] user is named, with how to create it."""
        setup = Setup(self, server={"user": "nosuchuser"})
        self.assert_one_line(
            self.popserv(setup=setup), "[server] user = nosuchuser: no such user", "useradd"
        )

    def test_unknown_uid(self):
        """twistd --uid of a uid no account has (and no --gid) is named before binding."""
        uid = unused_uid()
        ran = twistd(f"--uid={uid}", "popserv", "--config", self.setup.config)
        self.assert_one_line(ran, f"twistd --uid {uid}: no such user on this machine", "--gid")

    def test_unknown_uid_name(self):
        """twistd --uid of a name no account has is one line too."""
        ran = twistd("--uid=nosuchuser", "popserv", "--config", self.setup.config)
        self.assert_one_line(ran, "nosuchuser")

    test_unknown_uid_name.todo = (  # type: ignore[attr-defined]
        "twistd converts --uid with pwd.getpwnam while parsing its own options, before any "
        "plugin is loaded, and Twisted lets the KeyError out as a traceback"
    )

    def test_bad_config_file(self):
        """An unknown key in the config file is named with file, section and key."""
        setup = Setup(self, pop3={"lisen": "tcp:110"})
        self.assert_one_line(
            self.popserv(setup=setup),
            f"{setup.config}: unknown key 'lisen' in section [pop3]",
            "etc/popserv.ini",
        )

    def test_config_file_with_two_mistakes(self):
        """Two mistakes in the config file are two lines, one each."""
        setup = Setup(self, pop3={"lisen": "tcp:110"}, auth={"apop": "maybe"})
        status, out, err = self.popserv(setup=setup)
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(len(err.splitlines()), 2, err)
        self.assertNotIn("Traceback", err)
        self.assertIn("'lisen'", err.splitlines()[0])
        self.assertIn("[auth] apop = 'maybe'", err.splitlines()[1])

    def test_unparsable_config_file(self):
        """A config file that is not INI at all is named in one line."""
        with open(self.setup.config, "w", encoding="utf-8") as f:
            f.write("garbage\n[pop3\n")
        self.assert_one_line(self.popserv(), self.setup.config, "no section headers")

    def test_missing_config_file(self):
        """A config file that is not there is named, with --config."""
        missing = self.setup.path("nope.ini")
        ran = twistd("popserv", "--config", missing)
        self.assert_one_line(ran, f"{missing}: cannot read configuration", "--config")

    def test_unknown_option(self):
        """An unknown option is one line pointing at --help, not the usage text."""
        self.assert_one_line(self.popserv("--frob"), "option --frob not recognized")

    def test_help_prints_usage(self):
        """The usage text is printed when asked for, with --help, and the exit status is 0."""
        status, out, err = self.popserv("--help")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("--pop3s=", out)
        self.assertIn("--tls-cert=", out)

    def test_daemon_busy_port(self):
        """Without -n, a busy port is the same one line, before twistd forks."""
        busy = f"tcp:{listening_socket(self)}:interface=127.0.0.1"
        pidfile = self.setup.path("twistd.pid")
        ran = twistd(
            f"--logfile={self.setup.path('twistd.log')}",
            "popserv",
            "--config",
            self.setup.config,
            "--pop3",
            busy,
            daemon=True,
            pidfile=pidfile,
        )
        self.assert_one_line(ran, f"cannot listen on {busy} (POP3): address already in use")
        self.assertFalse(os.path.exists(pidfile))

    def test_check_names_the_same_problem(self):
        """popserv check reports a certificate problem in the words twistd popserv stops with."""
        self.setup.write(tls={"cert": self.setup.cert, "key": self.setup.other_key})
        started = self.assert_one_line(self.popserv(), "does not match")
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = admin.main(["check", "--config", self.setup.config])
        self.assertEqual(status, 1)
        self.assertEqual(err.getvalue().splitlines(), [started])


class PortCheckTests(SynchronousTestCase):
    """``check_ports``, in this process: every listener's port is tried, none is kept."""

    def config(self, **listeners) -> Config:
        return Config(pop3s_listen=(), smtp_listen=(), **listeners)

    def test_free_ports_pass_and_are_released(self):
        """Free ports pass, and are free again afterwards."""
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
        probe.close()
        listener = f"tcp:{free}:interface=127.0.0.1"
        check_ports(self.config(pop3_listen=(listener,), metrics_listen="tcp:0"))
        again = socket.socket()
        self.addCleanup(again.close)
        again.bind(("127.0.0.1", free))

    def test_every_busy_port_named(self):
        """Each busy listener is its own line: POP3S and metrics here."""
        one = f"tcp:{listening_socket(self)}:interface=127.0.0.1"
        two = f"tcp:{listening_socket(self)}:interface=127.0.0.1"
        config = self.config(pop3_listen=("tcp:0:interface=127.0.0.1",), metrics_listen=two)
        with self.assertRaises(StartupError) as cm:
            check_ports(config.replace(pop3s_listen=(one,)))
        self.assertEqual(
            [line.split(": address already in use")[0] for line in cm.exception.problems],
            [f"cannot listen on {one} (POP3S)", f"cannot listen on {two} (metrics)"],
        )

    def test_haproxy_listener(self):
        """A haproxy: listener's TCP port is tried like any other."""
        busy = listening_socket(self)
        with self.assertRaises(StartupError) as cm:
            check_ports(self.config(pop3_listen=(f"haproxy:tcp:{busy}:interface=127.0.0.1",)))
        self.assertIn("address already in use", str(cm.exception))

    def test_exit_status_and_text(self):
        """A StartupError exits with status 1 and its lines, each with the popserv prefix."""
        error = StartupError(["one", "two\nthree"])
        self.assertEqual(error.problems, ["one", "two", "three"])
        self.assertEqual(str(error), "popserv: one\npopserv: two\npopserv: three")
        self.assertNotIsInstance(error, usage.UsageError)
        self.assertIsInstance(error, SystemExit)

    def test_permission_denied_advice(self):
        """A port the user may not bind is told with the ports-below-1024 advice."""
        line = startup.cannot_listen("SMTP", "tcp:25", PermissionError(13, "Permission denied"))
        self.assertEqual(
            line,
            "cannot listen on tcp:25 (SMTP): permission denied; ports below 1024 need root "
            "(start twistd as root; --uid or [server] user then drops it), or choose a port "
            "above 1023 with --smtp or [smtp] listen",
        )


class _RefusingReactor(MemoryReactorClock):
    """Every TCP listen fails as a port taken meanwhile would."""

    def listenTCP(self, port, factory, backlog=50, interface=""):
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))


class ListenerTests(SynchronousTestCase):
    """A listener that cannot bind at start, though the check before found it free."""

    def setUp(self):
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.stderr = io.StringIO()
        self.patch(sys, "__stderr__", self.stderr)

    def listener(self, foreground: bool) -> Listener:
        return Listener("POP3", "tcp:1110", None, _RefusingReactor(), foreground=foreground)

    def test_foreground_exits_with_one_line(self):
        """In the foreground: the line on the terminal and in the log, exit status 1."""
        with self.assertRaises(SystemExit) as cm:
            self.listener(True).privilegedStartService()
        self.assertEqual(cm.exception.code, 1)
        line = (
            "cannot listen on tcp:1110 (POP3): address already in use; stop the other "
            "server or choose another port with --pop3 or [pop3] listen"
        )
        self.assertEqual(self.stderr.getvalue(), f"popserv: {line}\n")
        (event,) = [e for e in self.observer if e.get("problem")]
        self.assertEqual((event["log_level"], event["problem"]), (LogLevel.critical, line))

    def test_daemon_raises_for_twistd(self):
        """A daemon raises an Exception, which twistd hands to its waiting parent."""
        with self.assertRaises(startup.ListenFailed) as cm:
            self.listener(False).privilegedStartService()
        self.assertIn("cannot listen on tcp:1110 (POP3)", str(cm.exception))
        self.assertEqual(self.stderr.getvalue(), "")
