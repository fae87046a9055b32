"""Attacks on the SMTP listener of a real ``twistd popserv``: floods of bad commands and
refused recipients on one connection.

Everything runs on 127.0.0.1, bounded in count and time.
"""

import socket
import threading

from twisted.trial.unittest import SynchronousTestCase

from tests.live_twistd import HOST, TwistdServer


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
