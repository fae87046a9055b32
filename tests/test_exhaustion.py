"""Resource exhaustion from outside, against a real ``twistd popserv`` on 127.0.0.1.

The attacks of the outside security test, bounded in count and time: TLS connections
that never finish the handshake, connections refused over the limit, STLS or STARTTLS
followed by silence, and commands sent by a client that never reads the replies.
"""

from __future__ import annotations

import os
import socket
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.live_smtp import free_port
from tests.live_twistd import TwistdServer

#: How long the server may take beyond a timeout to close what it must close.
MARGIN = 5.0


def open_fds(server: TwistdServer) -> int:
    return len(os.listdir(f"/proc/{server.process.pid}/fd"))


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes (or resets) ``sock`` within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if sock.recv(65536) == b"":
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


def wait_until(predicate, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def flood(sock: socket.socket, data: bytes, seconds: float) -> int:
    """Send as much of ``data`` as the server takes in ``seconds``, never reading; bytes sent."""
    sock.setblocking(False)
    sent, deadline = 0, time.monotonic() + seconds
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += sock.send(data[sent : sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
    sock.setblocking(True)
    return sent


class ExhaustionTestCase(SynchronousTestCase):
    settings: dict = {}

    def setUp(self):
        self.pop3s_port = free_port()
        settings = {
            "pop3": {"login_timeout": "1"},
            "pop3s": {"listen": f"tcp:{self.pop3s_port}:interface=127.0.0.1"},
            "smtp": {"timeout": "1"},
        }
        for section, keys in self.settings.items():
            settings.setdefault(section, {}).update(keys)
        self.server = TwistdServer(self, {"alice": "secret"}, smtp=True, settings=settings)
        self.server.start()
        self.baseline = open_fds(self.server)

    def connect(self, port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(sock.close)
        return sock

    def assert_back_to_baseline(self, extra: int = 0) -> None:
        ok = wait_until(lambda: open_fds(self.server) <= self.baseline + extra, MARGIN)
        self.assertTrue(ok, f"{open_fds(self.server)} descriptors, baseline {self.baseline}")


class HalfOpenTLSTests(ExhaustionTestCase):
    def test_silent_tls_connections_are_closed_at_the_login_timeout(self):
        """POP3S connections that never start the handshake are closed at login_timeout."""
        socks = [self.connect(self.pop3s_port) for _ in range(40)]
        time.sleep(1.0)
        for sock in socks:
            self.assertTrue(closed_by_server(sock, MARGIN))
        self.assert_back_to_baseline()

    def test_stls_then_silence_is_closed(self):
        """A client that sends STLS and then nothing is closed at login_timeout."""
        sock = self.connect(self.server.pop3_port)
        replies = sock.makefile("rb")
        replies.readline()
        sock.sendall(b"STLS\r\n")
        self.assertTrue(replies.readline().startswith(b"+OK"))
        self.assertTrue(closed_by_server(sock, 1.0 + MARGIN))
        self.assert_back_to_baseline()

    def test_smtp_starttls_then_silence_is_closed(self):
        """An SMTP client that sends STARTTLS and then nothing is closed at the timeout."""
        sock = self.connect(self.server.smtp_port)
        replies = sock.makefile("rb")
        replies.readline()
        sock.sendall(b"EHLO client.test\r\n")
        while not replies.readline().startswith(b"250 "):
            pass
        sock.sendall(b"STARTTLS\r\n")
        self.assertTrue(replies.readline().startswith(b"220"))
        self.assertTrue(closed_by_server(sock, 1.0 + MARGIN))
        self.assert_back_to_baseline()


class RefusedTLSTests(ExhaustionTestCase):
    settings = {"pop3": {"max_connections": "5", "login_timeout": "30"}}

    def test_refused_tls_connections_are_closed_at_once(self):
        """Over max_connections, POP3S connections are closed at once and hold nothing."""
        held = [self.connect(self.pop3s_port) for _ in range(5)]
        time.sleep(0.3)
        for _ in range(100):
            try:
                sock = self.connect(self.pop3s_port)
            except ConnectionResetError:
                continue  # aborted before the connect call even returned: closed at once
            self.assertTrue(closed_by_server(sock, MARGIN))
        self.assert_back_to_baseline(extra=len(held))
        # Plain POP3 is refused too while the five are held, and served once they go.
        plain = self.connect(self.server.pop3_port)
        self.assertIn(b"Too many connections", plain.makefile("rb").readline())
        for sock in held:
            sock.close()
        time.sleep(0.5)
        self.assertTrue(self.connect(self.server.pop3_port).recv(100).startswith(b"+OK"))


class UnreadRepliesTests(ExhaustionTestCase):
    settings = {"pop3": {"login_timeout": "2"}, "smtp": {"timeout": "2"}}

    def assert_flood_bounded(self, port: int, command: bytes) -> None:
        sock = self.connect(port)
        before = self.server.rss_kib()
        sent = flood(sock, command * 500_000, 1.5)
        peak = before
        for _ in range(10):
            peak = max(peak, self.server.rss_kib())
            time.sleep(0.1)
        grown = peak - before
        # The server stops reading after some 64 KiB of unread replies: the rest of
        # the flood waits in the kernel's socket buffers, not in the server.
        self.assertLess(grown, 4 * 1024, f"grew {grown} KiB after {sent} bytes")
        self.assertTrue(closed_by_server_unread(sock, 2.0 + MARGIN))
        self.assert_back_to_baseline()

    def test_pop3_capa_flood_without_reading(self):
        """CAPA sent 500,000 times by a client that never reads: memory stays flat."""
        self.assert_flood_bounded(self.server.pop3_port, b"CAPA\r\n")

    def test_smtp_ehlo_flood_without_reading(self):
        """EHLO sent 500,000 times by a client that never reads: memory stays flat."""
        self.assert_flood_bounded(self.server.smtp_port, b"EHLO x\r\n")


def closed_by_server_unread(sock: socket.socket, within: float) -> bool:
    """Whether the server drops ``sock`` within ``within`` s, reading only to see the end."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            while sock.recv(1 << 20):
                pass
            return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False
