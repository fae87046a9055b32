"""IPv6 by default (item 14): the default listeners serve IPv6 and IPv4 on one socket each,
and a client that comes over IPv4 is its plain IPv4 address everywhere.

The live tests start twistd with the default listener strings, only the port numbers
replaced by free ones, so those listeners bind ``[::]``; every client connects to ``::1``
or ``127.0.0.1`` only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import poplib
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import time

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import EventLoggingObserver, MemoryReactor
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from popserv.config import Config
from popserv.listeners import DualStackEndpoint, dual_stack
from popserv.peers import peer_host, unmapped
from popserv.service import Listener
from popserv.startup import ListenFailed
from tests.live import require_client
from tests.live_smtp import free_port
from tests.live_twistd import HOST, REPO, TWISTD, TwistdServer, write_private
from tests.netns import LoopbackNamespace
from tests.test_fail2ban import fail2ban_regex
from tests.test_pop3 import POP3TestCase
from tests.test_smtp import SMTPTestCase

#: What the defaults listen on, by service, and the port each default names.
DEFAULTS = {
    "pop3": (Config().pop3_listen, 110),
    "pop3s": (Config().pop3s_listen, 995),
    "smtp": (Config().smtp_listen, 25),
}

#: Runs twistd as on a host whose kernel has no IPv6: every AF_INET6 socket() fails.
WITHOUT_IPV6 = (
    "import errno, socket\n"
    "class _NoIPv6(socket.socket):\n"
    "    def __init__(self, family=-1, *args, **kwargs):\n"
    "        if family == socket.AF_INET6:\n"
    "            raise OSError(errno.EAFNOSUPPORT, 'Address family not supported by protocol')\n"
    "        super().__init__(family, *args, **kwargs)\n"
    "socket.socket = _NoIPv6\n" + TWISTD
)


def require_ipv6_loopback() -> None:
    """Skip (CI=true: fail) unless this host has ``::1``."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as e:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"no IPv6 loopback (::1) here: {e}") from None
        raise SkipTest(f"no IPv6 loopback (::1) here: {e}") from None


def free_wildcard_port() -> int:
    """A port that every address of both families had free a moment ago.

    ``free_port`` checks 127.0.0.1 only; a wildcard listener also collides with clients
    of other addresses (127.0.6.1, say) that hold the port, even in TIME_WAIT.
    """
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        address = ("::", 0)
    except OSError:
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = ("0.0.0.0", 0)
    with probe:
        probe.bind(address)
        return probe.getsockname()[1]


def default_on_port(service: str, port: int) -> str:
    """The default listener of ``service`` with only its port number changed to ``port``."""
    listeners, number = DEFAULTS[service]
    [description] = listeners
    assert description.count(str(number)) == 1, description
    return description.replace(str(number), str(port))


def greeting(host: str, port: int, tls: bool = False) -> bytes:
    """The first line a listener sends to a client connecting to ``host``."""
    with socket.create_connection((host, port), 10) as raw:
        if not tls:
            return raw.makefile("rb").readline()
        # Only that TLS works on both families matters here, not whose certificate it is.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with context.wrap_socket(raw) as conn:
            return conn.makefile("rb").readline()


class RecordingSocket:
    """A socket that records what is done to it; ``fail`` names a method that raises."""

    def __init__(self, family, kind, calls: list, fail: tuple[str, int] | None = None):
        self.calls = calls
        self.fail = fail
        calls.append(("socket", family, kind))

    def _record(self, name, *args):
        self.calls.append((name, *args))
        if self.fail is not None and self.fail[0] == name:
            raise OSError(self.fail[1], os.strerror(self.fail[1]))

    def setsockopt(self, *args):
        self._record("setsockopt", *args)

    def bind(self, address):
        self._record("bind", address)

    def listen(self, backlog):
        self._record("listen", backlog)

    def setblocking(self, flag):
        self._record("setblocking", flag)

    def fileno(self):
        return 42

    def close(self):
        self.calls.append(("close",))


class PeerHostTests(SynchronousTestCase):
    """popserv.peers: the one place a peer's address is named."""

    def test_mapped_ipv4_is_its_ipv4_address(self):
        """::ffff:10.0.0.1 is 10.0.0.1, in either spelling of the mapped form."""
        self.assertEqual(unmapped("::ffff:10.0.0.1"), "10.0.0.1")
        self.assertEqual(unmapped("::ffff:a00:1"), "10.0.0.1")

    def test_other_hosts_stay(self):
        """IPv6 addresses (::1, 2001:db8::1, a zoned one), IPv4 and names are left as they are."""
        for host in ("::1", "2001:db8::1", "fe80::1%eth0", "10.0.0.1", "localhost", ""):
            self.assertEqual(unmapped(host), host)

    def test_peer_of_a_transport(self):
        """getPeer() results name their host, unmapped; a UNIX peer is its str."""
        self.assertEqual(peer_host(IPv6Address("TCP", "::ffff:127.0.0.1", 4000)), "127.0.0.1")
        self.assertEqual(peer_host(IPv6Address("TCP", "::1", 4000)), "::1")
        self.assertEqual(peer_host(IPv4Address("TCP", "192.0.2.7", 4000)), "192.0.2.7")
        unix = UNIXAddress(b"/run/popserv/pop3.sock")
        self.assertEqual(peer_host(unix), str(unix))


class MappedPOP3PeerTests(POP3TestCase):
    """A POP3 session from ::ffff:127.0.0.1 is one from 127.0.0.1."""

    peer = IPv6Address("TCP", "::ffff:127.0.0.1", 40000)
    config = POP3TestCase.config.replace(auth_trusted_networks=("127.0.0.0/8",))

    def test_seen_as_ipv4(self):
        """Trusted by 127.0.0.0/8, logged, counted and listed as 127.0.0.1."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertEqual((self.proto.peer, self.proto.peer_key), ("127.0.0.1", "127.0.0.1"))
        self.login()
        [login] = [e for e in events if e["log_format"].startswith("pop3.login:")]
        self.assertEqual(login["peer"], "127.0.0.1")
        self.assertEqual([s.peer for s in self.factory.sessions.snapshot()], ["127.0.0.1"])


class MappedSMTPPeerTests(SMTPTestCase):
    """An SMTP session from ::ffff:192.0.2.7 is one from 192.0.2.7."""

    def test_received_header_names_ipv4(self):
        """The EHLO reply and the Received header of the delivered message say [192.0.2.7]."""
        self.proto, self.transport = self.connect(IPv6Address("TCP", "::ffff:192.0.2.7", 25000))
        self.assertEqual(self.proto.session.peer, "192.0.2.7")
        self.replies()
        self.send(b"EHLO client.example\r\n")
        self.assertEqual(self.replies()[0], b"250-mx.example.org Hello [192.0.2.7]")
        self.send(b"MAIL FROM:<bob@remote.example>\r\nRCPT TO:<alice@mx.example.org>\r\n")
        self.send(b"DATA\r\nSubject: hi\r\n\r\nhello\r\n.\r\n")
        [message] = self.new("alice")
        self.assertIn(b"\nReceived: from client.example ([192.0.2.7])\n", message)


class ListenerFormTests(SynchronousTestCase):
    """Which listener strings are popserv's dual-stack form, and what the others stay."""

    def test_defaults_are_dual_stack(self):
        """POP3, POP3S and SMTP each default to one dual-stack listener on their port."""
        for service, (listeners, port) in DEFAULTS.items():
            self.assertEqual([dual_stack(d) for d in listeners], [(port, 50)], service)

    def test_the_form(self):
        """tcp6:PORT, with or without a backlog, is the form; other strings are not."""
        self.assertEqual(dual_stack("tcp6:1110:backlog=7"), (1110, 7))
        for description in (
            "tcp:110",
            "tcp6:110:interface=\\:\\:",
            "tcp6:110:interface=\\:\\:1",
            "haproxy:tcp6:110",
            "systemd:domain=INET6:index=0",
        ):
            self.assertIsNone(dual_stack(description), description)

    def test_other_strings_are_twisteds(self):
        """An admin's tcp:1110:interface=127.0.0.1 listens exactly there, through Twisted."""
        reactor = MemoryReactor()
        factory = Factory()
        service = Listener("POP3", "tcp:1110:interface=127.0.0.1", factory, reactor)
        self.assertIsInstance(service, StreamServerEndpointService)
        self.assertIsInstance(service.endpoint, TCP4ServerEndpoint)
        explicit = Listener("POP3", "tcp6:1110:interface=\\:\\:1", factory, reactor)
        self.assertIsInstance(explicit.endpoint, TCP6ServerEndpoint)
        service.privilegedStartService()
        explicit.privilegedStartService()
        self.assertEqual(
            reactor.tcpServers, [(1110, factory, 50, "127.0.0.1"), (1110, factory, 50, "::1")]
        )
        self.assertEqual(reactor.adoptedPorts, [])

    def test_bad_string_is_refused_at_once(self):
        """A string Twisted cannot parse raises when the service is made, as strports does."""
        with self.assertRaises((ValueError, TypeError)):
            Listener("POP3", "tcp6:110:colour=blue", Factory(), MemoryReactor())


class DualStackEndpointTests(SynchronousTestCase):
    """One [::] socket with IPV6_V6ONLY off; IPv4 alone where the host has no IPv6."""

    def setUp(self):
        self.reactor = MemoryReactor()
        self.factory = Factory()
        self.calls: list = []
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def listen(self, fail=None, port=110, backlog=50):
        """Listen with sockets that record their calls (``fail``: (method, errno) raised)."""

        def make_socket(family, kind):
            return RecordingSocket(family, kind, self.calls, fail)

        endpoint = DualStackEndpoint(self.reactor, port, backlog, make_socket=make_socket)
        return endpoint.listen(self.factory)

    def warnings(self) -> list:
        return [e for e in self.events if e["log_level"] == LogLevel.warn]

    def test_one_socket_takes_both_families(self):
        """The [::] socket has IPV6_V6ONLY set to 0, whatever the host's default, and the
        reactor listens on it; nothing listens on 0.0.0.0 besides."""
        port = self.successResultOf(self.listen(port=110, backlog=7))
        self.assertEqual(
            self.calls,
            [
                ("socket", socket.AF_INET6, socket.SOCK_STREAM),
                ("setsockopt", socket.SOL_SOCKET, socket.SO_REUSEADDR, 1),
                ("setsockopt", socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0),
                ("bind", ("::", 110)),
                ("listen", 7),
                ("setblocking", False),
                ("close",),
            ],
        )
        self.assertEqual(self.reactor.adoptedPorts, [(42, socket.AF_INET6, self.factory)])
        self.assertEqual(self.reactor.tcpServers, [])
        self.assertIsInstance(port.getHost(), IPv6Address)
        self.assertEqual(self.warnings(), [])

    def test_no_ipv6_listens_on_ipv4(self):
        """Where socket(AF_INET6) fails (no IPv6 in the kernel), 0.0.0.0 listens instead,
        with one warning that says so."""

        def no_ipv6(family, kind):
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

        endpoint = DualStackEndpoint(self.reactor, 110, make_socket=no_ipv6)
        port = self.successResultOf(endpoint.listen(self.factory))
        self.assertEqual(self.reactor.tcpServers, [(110, self.factory, 50, "0.0.0.0")])
        self.assertEqual(self.reactor.adoptedPorts, [])
        self.assertIsInstance(port.getHost(), IPv4Address)
        [warning] = self.warnings()
        self.assertTrue(warning["log_format"].startswith("popserv.ipv4_only:"))
        self.assertEqual(
            (warning["port"], warning["error"]), (110, "Address family not supported by protocol")
        )

    def test_no_ipv6_address_listens_on_ipv4(self):
        """Where [::] cannot be bound (EADDRNOTAVAIL), the socket is closed and 0.0.0.0 listens."""
        self.successResultOf(self.listen(fail=("bind", errno.EADDRNOTAVAIL)))
        self.assertEqual(self.calls[-1], ("close",))
        self.assertEqual(self.reactor.tcpServers, [(110, self.factory, 50, "0.0.0.0")])
        self.assertEqual(len(self.warnings()), 1)

    def test_port_in_use_is_an_error(self):
        """A port already taken is CannotListenError, with no IPv4 fallback: nothing listens."""
        failure = self.failureResultOf(self.listen(fail=("bind", errno.EADDRINUSE)))
        failure.trap(CannotListenError)
        self.assertEqual(failure.value.socketError.errno, errno.EADDRINUSE)
        self.assertEqual(self.calls[-1], ("close",))
        self.assertEqual((self.reactor.tcpServers, self.reactor.adoptedPorts), ([], []))
        self.assertEqual(self.warnings(), [])

    def test_service_stops_twistd_on_an_error(self):
        """Through the listener service, that error is raised at privilegedStartService."""
        service = Listener("POP3", "tcp6:110", self.factory, self.reactor, foreground=False)
        self.assertIsInstance(service.endpoint, DualStackEndpoint)

        def taken(family, kind):
            return RecordingSocket(family, kind, self.calls, ("bind", errno.EADDRINUSE))

        service.endpoint = DualStackEndpoint(self.reactor, 110, make_socket=taken)
        failure = self.assertRaises(ListenFailed, service.privilegedStartService)
        self.assertIn("cannot listen on tcp6:110 (POP3): address already in use", str(failure))


class DefaultListenersLiveTests(SynchronousTestCase):
    """twistd with the default listeners (on free ports): IPv6 and IPv4 clients alike.

    The defaults listen on every address; each test runs in a network namespace of its
    own whose only addresses are loopback ones, server and clients alike.
    """

    def setUp(self):
        namespace = LoopbackNamespace(self)
        inside = contextlib.ExitStack()
        inside.enter_context(namespace.entered())
        self.addCleanup(inside.close)

    def start(self, program: str = TWISTD, **settings) -> TwistdServer:
        ports: dict[str, int] = {}
        while len(set(ports.values())) < len(DEFAULTS):
            ports = {name: free_wildcard_port() for name in DEFAULTS}
        listen = {name: {"listen": default_on_port(name, port)} for name, port in ports.items()}
        for section, keys in settings.items():
            listen.setdefault(section, {}).update(keys)
        server = TwistdServer(self, {"alice": "secret"}, smtp=True, settings=listen)
        server.program = program
        server.pop3_port, server.smtp_port = ports["pop3"], ports["smtp"]
        server.pop3s_port = ports["pop3s"]
        server.start()
        return server

    def test_every_service_answers_on_both_families(self):
        """POP3, POP3S and SMTP greet a client on ::1 and one on 127.0.0.1, on the same port."""
        require_ipv6_loopback()
        server = self.start()
        for host in ("::1", "127.0.0.1"):
            self.assertTrue(greeting(host, server.pop3_port).startswith(b"+OK "), host)
            self.assertTrue(greeting(host, server.pop3s_port, tls=True).startswith(b"+OK "))
            self.assertTrue(greeting(host, server.smtp_port).startswith(b"220 " + HOST.encode()))

    def test_ipv4_client_is_its_ipv4_address(self):
        """Over the dual-stack socket, 127.0.0.1 is trusted for USER/PASS (poplib), listed by
        popserv who, logged, and named in the Received header as 127.0.0.1; curl logs in
        over ::1 as ::1."""
        require_ipv6_loopback()
        curl = require_client("curl")
        server = self.start()
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=20) as smtp:
            smtp.sendmail("bob@example.org", [f"alice@{HOST}"], b"Subject: hi\r\n\r\nhello\r\n")

        client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=20)
        client.user("alice")
        client.pass_("secret")
        who = subprocess.run(
            [sys.executable, "-m", "popserv", "who", "--config", server.config_path, "--json"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(who.returncode, 0, who.stderr)
        self.assertEqual([s["address"] for s in json.loads(who.stdout)], ["127.0.0.1"])
        message = b"\r\n".join(client.retr(1)[1])
        client.quit()
        self.assertIn(b"([127.0.0.1])", message)

        listed = subprocess.run(
            [curl, "-sS", "--max-time", "20", f"pop3://alice:secret@[::1]:{server.pop3_port}/"],
            capture_output=True,
            timeout=60,
        )
        self.assertEqual((listed.returncode, listed.stdout.split()[:1]), (0, [b"1"]))

        server.stop()
        log = server.log()
        self.assertIn("pop3.login: peer=127.0.0.1 user=alice", log)
        self.assertIn("pop3.login: peer=::1 user=alice", log)
        self.assertIn("smtp.accepted: peer=127.0.0.1 ", log)
        self.assertNotIn("::ffff:", log)

    def test_fail2ban_sees_the_ipv4_address(self):
        """Failed logins over the dual-stack socket are banned by their own family's address."""
        require_ipv6_loopback()
        require_client("fail2ban-regex")
        server = self.start(pop3={"failure_delay": "0"})
        for host in ("127.0.0.1", "127.0.0.1", "::1"):
            client = poplib.POP3(host, server.pop3_port, timeout=20)
            client.user("alice")
            with self.assertRaises(poplib.error_proto):
                client.pass_("wrong")
            client.quit()
        server.stop()
        self.assertEqual(fail2ban_regex(server.log_path)[2], ["127.0.0.1", "127.0.0.1", "::1"])

    def test_host_without_ipv6_still_starts(self):
        """Without IPv6 in the kernel the defaults listen on IPv4 and each logs why."""
        server = self.start(WITHOUT_IPV6)
        self.assertTrue(greeting("127.0.0.1", server.pop3_port).startswith(b"+OK "))
        self.assertTrue(greeting("127.0.0.1", server.pop3s_port, tls=True).startswith(b"+OK "))
        self.assertTrue(greeting("127.0.0.1", server.smtp_port).startswith(b"220 "))
        client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=20)
        client.user("alice")
        client.pass_("secret")
        client.quit()
        server.stop()
        log = server.log()
        warned = re.findall(r"popserv\.ipv4_only: .* port (\d+) listens on 0\.0\.0\.0", log)
        self.assertEqual(
            sorted(map(int, warned)),
            sorted([server.pop3_port, server.pop3s_port, server.smtp_port]),
        )
        self.assertIn("pop3.login: peer=127.0.0.1 user=alice", log)


class SocketActivationTests(SynchronousTestCase):
    """etc/popserv.socket's sockets are IPv6 ones that take IPv4: domain=INET6 in the config."""

    def test_unit_and_readme_agree(self):
        """The unit binds bare ports with BindIPv6Only=both; the README names them INET6."""
        with open(os.path.join(REPO, "etc", "popserv.socket")) as f:
            unit = f.read()
        self.assertEqual(re.findall(r"^ListenStream=(.*)$", unit, re.M), ["110", "995", "25"])
        self.assertEqual(re.findall(r"^BindIPv6Only=(.*)$", unit, re.M), ["both"])
        with open(os.path.join(REPO, "README.rst"), encoding="utf-8") as f:
            readme = f.read().split("Socket activation\n-----------------\n", 1)[1]
        self.assertEqual(
            re.findall(r"listen = (systemd:\S+)", readme.split("\n\n\n", 1)[0])[:3],
            [f"systemd:domain=INET6:index={n}" for n in range(3)],
        )

    def test_ipv4_client_on_an_activated_ipv6_socket(self):
        """An IPv4 client on a socket systemd made as IPv6 is served and logged as 127.0.0.1."""
        activate = require_client("systemd-socket-activate")
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        port = free_port()
        users = write_private(os.path.join(root, "users"), "alice:{PLAIN}secret\n")
        config = os.path.join(root, "popserv.ini")
        with open(config, "w") as f:
            f.write(
                f"[server]\nhostname = activated.test\nmailroot = {root}/mail\nusers = {users}\n"
                f"state_dir = {root}/state\n"
                "[pop3]\nlisten = systemd:domain=INET6:index=0\nfailure_delay = 0\n"
                f"[pop3s]\nlisten =\n[smtp]\nlisten =\n[tls]\nself_signed_dir = {root}/tls\n"
            )
        log_path = os.path.join(root, "twistd.log")
        child = subprocess.Popen(
            [
                activate,
                # An IPv6 socket for IPv4's loopback only: its clients arrive IPv4-mapped.
                f"--listen=[::ffff:127.0.0.1]:{port}",
                "--fdname=popserv.socket",
                sys.executable,
                "-c",
                TWISTD,
                "--nodaemon",
                "--pidfile=",
                f"--logfile={log_path}",
                "popserv",
                f"--config={config}",
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(lambda: (child.kill(), child.wait(10)))
        deadline = time.monotonic() + 20
        while True:
            try:
                client = poplib.POP3("127.0.0.1", port, timeout=20)
                break
            except OSError:
                self.assertLess(time.monotonic(), deadline, "no socket-activated server")
                time.sleep(0.05)
        client.user("alice")
        client.pass_("secret")
        client.quit()
        child.terminate()
        child.wait(20)
        with open(log_path, encoding="utf-8") as f:
            self.assertIn("pop3.login: peer=127.0.0.1 user=alice", f.read())
