"""Attacks on the SMTP listener of a real ``twistd popserv``: floods of bad commands and
refused recipients on one connection, and of connections that would take every file
descriptor from POP3.

Everything runs on 127.0.0.1, bounded in count and time.
"""

import poplib
import socket
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.live_twistd import HOST, TWISTD, TwistdServer

#: The descriptor limit of the server child in the connection flood.
FILE_LIMIT = 256


def flood(port: int, data: bytes, timeout: float = 5.0) -> list[bytes]:
    """Send ``data`` at once (from a thread); the reply lines until the server closes.

    Raises ``TimeoutError`` when the server is still connected ``timeout`` seconds after
    its last reply.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send():
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server hung up while the flood was still being sent

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = b""
    try:
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    finally:
        sock.close()
        sender.join(timeout)
    return received.split(b"\r\n")[:-1]


class ErrorFloodTests(SynchronousTestCase):
    """One connection pipelines thousands of errors (the test found 100,000 in 6.4 s)."""

    def setUp(self):
        self.server = TwistdServer(self, {"alice": "pw"}, smtp=True)
        self.server.start()

    def rejected_events(self) -> list[str]:
        self.server.stop()
        return [line for line in self.server.log().splitlines() if "smtp.rejected:" in line]

    def test_unknown_recipient_flood_is_cut_off(self):
        """2,000 RCPT to unknown users: 20 are answered 550, then 421 and the server hangs up."""
        rcpts = b"".join(b"RCPT TO:<nobody%d@%s>\r\n" % (n, HOST.encode()) for n in range(2000))
        replies = flood(
            self.server.smtp_port, b"EHLO attacker.test\r\nMAIL FROM:<x@attacker.test>\r\n" + rcpts
        )
        finals = [reply for reply in replies if reply[3:4] == b" "]
        self.assertEqual(
            [reply[:9] for reply in finals[2:-1]], [b"250 2.1.0"] + [b"550 5.1.1"] * 20
        )
        self.assertEqual(
            finals[-1], b"421 4.7.0 twistd.test Too many rejected recipients, closing connection"
        )
        events = self.rejected_events()
        self.assertEqual(len(events), 21)
        self.assertIn(
            'smtp.rejected: peer=127.0.0.1 stage=session code=421 reason="4.7.0 twistd.test '
            'Too many rejected recipients, closing connection" count=20',
            events[-1],
        )

    def test_unknown_command_flood_is_cut_off(self):
        """2,000 unknown commands: 20 are answered 500, then 421 and the server hangs up."""
        replies = flood(self.server.smtp_port, b"XYZZY\r\n" * 2000)
        self.assertEqual(replies[1:-1], [b"500 5.5.1 Command unrecognized"] * 20)
        self.assertEqual(
            replies[-1], b"421 4.7.0 twistd.test Too many bad commands, closing connection"
        )
        [event] = self.rejected_events()
        self.assertIn("smtp.rejected: peer=127.0.0.1 stage=session code=421 ", event)


class DescriptorFloodTests(SynchronousTestCase):
    """SMTP connections held open against a server whose descriptor limit is low (the test
    found 1,085 of them, under a limit of 1,100, made POP3 logins fail)."""

    def setUp(self):
        self.server = TwistdServer(
            self,
            {"alice": "pw"},
            smtp=True,
            settings={"smtp": {"max_connections_per_peer": "1000"}},
        )
        self.server.program = (
            "import resource; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({FILE_LIMIT}, {FILE_LIMIT})); " + TWISTD
        )
        self.server.start()

    def test_pop3_login_while_smtp_connections_pile_up(self):
        """300 SMTP connections: those past the reserve get 421 4.7.0, and POP3 still logs in."""
        held, refused = [], 0
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", self.server.smtp_port), timeout=2)
            self.addCleanup(sock.close)
            try:
                greeting = sock.recv(200)
            except TimeoutError:
                greeting = b""
            if greeting.startswith(b"220 "):
                held.append(sock)
            elif greeting.startswith(b"421 "):
                self.assertEqual(
                    greeting, b"421 4.7.0 twistd.test Too many connections, try again later\r\n"
                )
                refused += 1
            else:
                break  # no greeting: the server is out of descriptors
        started = time.monotonic()
        client = poplib.POP3("127.0.0.1", self.server.pop3_port, timeout=5)
        self.addCleanup(client.close)
        client.user("alice")
        client.pass_("pw")
        self.assertEqual(client.stat(), (0, 0))
        client.quit()
        self.assertLess(time.monotonic() - started, 5)
        self.assertGreater(refused, 0, f"{len(held)} SMTP connections held, none refused")
        self.assertGreater(len(held), 50)
        # The connections held are still served.
        held[0].sendall(b"NOOP\r\n")
        self.assertEqual(held[0].recv(200), b"250 2.0.0 Ok\r\n")
        self.server.stop()
        self.assertIn(
            'smtp.rejected: peer=127.0.0.1 stage=connect code=421 reason="4.7.0 twistd.test '
            'Too many connections, try again later" limit=descriptors',
            self.server.log(),
        )
