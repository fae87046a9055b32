"""The README's library example runs as written, in a process of its own."""

from __future__ import annotations

import os
import poplib
import re
import signal
import socket
import subprocess
import sys
import time

from twisted.trial import unittest

from popserv.auth import hash_password
from tests.live_smtp import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGE = b"Subject: hello\r\n\r\nfrom the README\r\n"


def library_example() -> str:
    """The code block of the README's "Using popserv as a library" section."""
    with open(os.path.join(ROOT, "README.rst"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("Using popserv as a library\n", 1)[1]
    block = re.search(r"::\n\n((?:    .*\n|\n)+)", section).group(1)
    return "\n".join(line[4:] for line in block.splitlines()) + "\n"


def wait_for_listener(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the example exited: {process.communicate()[1].decode()}")
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"the example did not listen on port {port}")


class LibraryExampleTests(unittest.SynchronousTestCase):
    def test_serves_and_shuts_down(self):
        """The example logs alice in, serves and deletes her message, and ends cleanly."""
        root = os.path.abspath(self.mktemp())
        mailroot, users = os.path.join(root, "mail"), os.path.join(root, "users")
        os.makedirs(os.path.join(mailroot, "alice", "new"))
        for sub in ("cur", "tmp"):
            os.mkdir(os.path.join(mailroot, "alice", sub))
        message = os.path.join(mailroot, "alice", "new", "1700000000.M1P1Q1.readme")
        with open(message, "wb") as f:
            f.write(MESSAGE)
        with open(users, "w", encoding="utf-8") as f:
            f.write(f"alice:{hash_password('secret')}\n")
        port = free_port()
        code = library_example()
        # Only the paths and the port change: the rest runs exactly as the README shows it.
        for written, here in [
            ('"/var/mail/popserv"', repr(mailroot)),
            ('"/etc/popserv/users"', repr(users)),
            ('"tcp:1110:', f'"tcp:{port}:'),
        ]:
            self.assertIn(written, code)
            code = code.replace(written, here)
        process = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())
        wait_for_listener(port, process)

        client = poplib.POP3("127.0.0.1", port, timeout=30)
        client.user("alice")
        client.pass_("secret")
        self.assertEqual(client.stat(), (1, len(MESSAGE)))
        self.assertEqual(client.retr(1)[1], MESSAGE.rstrip(b"\r\n").split(b"\r\n"))
        client.dele(1)
        client.quit()
        self.assertFalse(os.path.exists(message))

        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
        self.assertEqual((process.returncode, err), (0, b""))
