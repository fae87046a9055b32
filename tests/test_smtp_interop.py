"""Interop of the SMTP receiver with real senders (swaks, msmtp, smtplib), a swaks -> curl
round trip through POP3, and SIGKILLs of a real ``twistd popserv`` in the middle of DATA
and at many points of a delivery to 100 users.

Everything runs on 127.0.0.1.  A missing client skips its test, except in CI (CI=true).
"""

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time

from twisted.internet import threads
from twisted.trial.unittest import SynchronousTestCase, TestCase

from popserv.auth import hash_password
from tests.live import HOST, require_client, run_program, start_server
from tests.live_smtp import free_port, maildir_files, start_smtp
from tests.live_twistd import HOST as TWISTD_HOST
from tests.live_twistd import TWISTD, TwistdServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"

#: LF line ends, no final newline (swaks would add an empty line after one).
MESSAGE = (
    b"From: Sender <sender@remote.example>\n"
    b"To: Alice <alice@live.test>\n"
    b"Subject: interop\n"
    b"MIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=utf-8\n"
    b"Content-Transfer-Encoding: 8bit\n"
    b"\n"
    b"Hello Alice,\n"
    b".one dot\n"
    b"..two dots\n"
    b".\n"
    b"caf\xc3\xa9 \xe2\x82\xac\n"
    b"\n"
    b"the end"
)


def crlf(message: bytes) -> bytes:
    """The message as sent on the wire: CRLF line ends, the last line terminated."""
    data = message.replace(b"\n", b"\r\n")
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def split_trace(stored: bytes, eol: bytes = b"\n") -> tuple[list[bytes], bytes]:
    """The Return-Path and Received header lines popserv added, and what follows them."""
    lines = stored.split(eol)
    assert lines[0].startswith(b"Return-Path: <"), lines[0]
    assert lines[1].startswith(b"Received: from "), lines[1]
    n = 2
    while lines[n].startswith(b"\t"):
        n += 1
    return lines[:n], eol.join(lines[n:])


def big_message(size: int = 1024 * 1024) -> bytes:
    """About ``size`` octets of 76-octet lines, some of them dot-led, without a final newline."""
    lines = [b"Subject: big", b""]
    total, n = 0, 0
    while total < size:
        line = (b"." if n % 7 == 0 else b"") + b"%06d " % n + b"x" * 68
        lines.append(line[:76])
        total += 77
        n += 1
    return b"\n".join(lines)


class SenderTests(TestCase):
    """Real SMTP clients against the receiver, and POP3 to read back what they sent."""

    timeout = 60

    def setUp(self):
        d = start_server(self, {"alice": "secret", "bob": "pw", "carol": "pw"})

        def smtp(server):
            self.server = server
            return start_smtp(self, server)

        def port(port):
            self.port = port

        return d.addCallback(smtp).addCallback(port)

    def write(self, data: bytes) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(data)
        return path

    def stored(self, user: str) -> list[bytes]:
        found = []
        for name in maildir_files(self.server, user, "new"):
            with open(os.path.join(self.server.maildir(user), "new", name), "rb") as f:
                found.append(f.read())
        return found

    def swaks(self, *args: str):
        return run_program(
            [
                require_client("swaks"),
                "--server",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--helo",
                "client.test",
                "--from",
                "sender@remote.example",
                *args,
            ]
        )

    async def test_swaks_plain(self):
        """swaks delivers a message; the body is stored exactly, after the trace headers."""
        ran = await self.swaks("--to", f"alice@{HOST}", "--data", "@" + self.write(MESSAGE))
        self.assertEqual(ran.code, 0, ran.out + ran.err)
        [stored] = self.stored("alice")
        trace, body = split_trace(stored)
        self.assertEqual(body, MESSAGE + b"\n")
        self.assertIn(b"\tby live.test (popserv) with ESMTP id ", b"\n".join(trace))
        self.assertIn(b"\tfor <alice@live.test>; ", b"\n".join(trace))
        self.assertEqual(maildir_files(self.server, "alice", "tmp"), [])

    async def test_swaks_one_megabyte(self):
        """swaks delivers a 1 MiB message with dot-led lines intact; S= and W= are right."""
        message = big_message()
        ran = await self.swaks(
            "--to", f"alice@{HOST}", "--suppress-data", "--data", "@" + self.write(message)
        )
        self.assertEqual(ran.code, 0, ran.out + ran.err)
        [stored] = self.stored("alice")
        self.assertEqual(split_trace(stored)[1], message + b"\n")
        [name] = maildir_files(self.server, "alice", "new")
        crlf_size = len(stored) + stored.count(b"\n")
        self.assertTrue(name.endswith(f",S={len(stored)},W={crlf_size}"), name)

    async def test_swaks_three_recipients(self):
        """One message to three users is in each one's new/, once."""
        ran = await self.swaks(
            "--to",
            f"alice@{HOST},bob@{HOST},carol@localhost",
            "--data",
            "@" + self.write(MESSAGE),
        )
        self.assertEqual(ran.code, 0, ran.out + ran.err)
        copies = [self.stored(user) for user in ("alice", "bob", "carol")]
        self.assertEqual([len(c) for c in copies], [1, 1, 1])
        self.assertEqual(copies[0], copies[1])
        self.assertEqual(copies[0], copies[2])
        self.assertNotIn(b"\tfor <", copies[0][0])

    async def test_swaks_unknown_user(self):
        """swaks to an unknown local user sees 550 5.1.1 and fails; nothing is stored."""
        ran = await self.swaks("--to", f"nobody@{HOST}", "--data", "@" + self.write(MESSAGE))
        self.assertNotEqual(ran.code, 0)
        self.assertIn(b"<** 550 5.1.1 ", ran.out)
        self.assertEqual(self.stored("alice"), [])

    async def test_swaks_foreign_domain(self):
        """swaks to another domain sees 550 5.7.1 relaying denied; nothing is stored."""
        ran = await self.swaks(
            "--to", "alice@elsewhere.example", "--data", "@" + self.write(MESSAGE)
        )
        self.assertNotEqual(ran.code, 0)
        self.assertIn(b"<** 550 5.7.1 Relaying denied", ran.out)
        self.assertEqual(self.stored("alice"), [])

    async def test_swaks_pipelining(self):
        """swaks --pipeline gets its replies in order and delivers."""
        ran = await self.swaks(
            "--pipeline", "--to", f"alice@{HOST}", "--data", "@" + self.write(MESSAGE)
        )
        self.assertEqual(ran.code, 0, ran.out + ran.err)
        self.assertEqual(len(self.stored("alice")), 1)

    async def test_msmtp(self):
        """msmtp, reading the message on stdin, delivers it with the body intact."""
        msmtp = require_client("msmtp")
        path = self.write(MESSAGE.replace(b"the end", b"the end\n"))
        ran = await run_program(
            [
                "/bin/sh",
                "-c",
                'f=$1; shift; exec "$@" < "$f"',
                "sh",
                path,
                msmtp,
                "--file=/dev/null",
                "--host=127.0.0.1",
                f"--port={self.port}",
                "--domain=client.test",
                "--auth=off",
                "--tls=off",
                "--from=sender@remote.example",
                "--",
                f"alice@{HOST}",
            ]
        )
        self.assertEqual(ran.code, 0, ran.out + ran.err)
        [stored] = self.stored("alice")
        # msmtp adds the Date and Message-ID headers the message lacks, before its own.
        self.assertTrue(split_trace(stored)[1].endswith(b"\n" + MESSAGE + b"\n"))
        self.assertIn(b"\nMessage-ID: <", stored)

    async def test_smtplib(self):
        """Python's smtplib delivers, and gets 550 for a relay attempt in the same session."""

        def send():
            with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test") as client:
                client.ehlo()
                self.assertTrue(client.has_extn("pipelining"))
                self.assertEqual(client.esmtp_features["size"], "26214400")
                refused = client.sendmail(
                    "sender@remote.example",
                    [f"alice@{HOST}", "bob@elsewhere.example"],
                    crlf(MESSAGE),
                )
                return refused

        refused = await threads.deferToThread(send)
        self.assertEqual(refused["bob@elsewhere.example"][0], 550)
        [stored] = self.stored("alice")
        self.assertEqual(split_trace(stored)[1], MESSAGE + b"\n")

    async def test_smtplib_quoted_local_part_and_empty_label(self):
        """smtplib to <"bob"@host> reaches bob; <bob@host..> is refused with 553 5.1.3."""

        def send():
            with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test") as client:
                return client.sendmail(
                    "sender@remote.example",
                    [f'"bob"@{HOST}', f"carol@{HOST}..", "carol@localhost.."],
                    crlf(MESSAGE),
                )

        refused = await threads.deferToThread(send)
        self.assertEqual(
            {address: reply[0] for address, reply in refused.items()},
            {f"carol@{HOST}..": 553, "carol@localhost..": 553},
        )
        self.assertTrue(refused["carol@localhost.."][1].startswith(b"5.1.3 "))
        self.assertEqual(len(self.stored("bob")), 1)
        self.assertEqual(self.stored("carol"), [])

    async def test_swaks_then_curl(self):
        """A message sent with swaks comes back over POP3 (curl) byte for byte, after the trace."""
        curl = require_client("curl")
        ran = await self.swaks("--to", f"alice@{HOST}", "--data", "@" + self.write(MESSAGE))
        self.assertEqual(ran.code, 0, ran.out + ran.err)
        fetched = await run_program(
            [curl, "-sS", f"pop3://alice:secret@127.0.0.1:{self.server.port}/1"]
        )
        self.assertEqual(fetched.code, 0, fetched.err)
        trace, body = split_trace(fetched.out, b"\r\n")
        self.assertEqual(body, crlf(MESSAGE))


class KillTests(SynchronousTestCase):
    """A real ``twistd -n popserv`` killed with SIGKILL in the middle of DATA."""

    def start(self, root: str) -> tuple[subprocess.Popen, int]:
        smtp_port, pop3_port = free_port(), free_port()
        config = os.path.join(root, "popserv.ini")
        with open(config, "w") as f:
            f.write(
                f"[server]\nhostname = {HOST}\nmailroot = {root}/mail\nusers = {root}/users\n"
                f"state_dir = {root}/state\n"
                # One process, greeting as soon as it listens (the read waits 1 s).
                "workers = 1\n"
                f"[pop3]\nlisten = tcp:{pop3_port}:interface=127.0.0.1\n"
                f"[pop3s]\nlisten =\n[tls]\nself_signed_dir = {root}/tls\n"
                f"[smtp]\nlisten = tcp:{smtp_port}:interface=127.0.0.1\n"
            )
        argv = [sys.executable, "-c", _TWISTD, "-n", "--pidfile=", f"--logfile={root}/log"]
        process = subprocess.Popen([*argv, "popserv", "--config", config], cwd=REPO)
        self.addCleanup(self.stop, process)
        deadline = time.monotonic() + 20
        while True:
            try:
                return process, socket.create_connection(("127.0.0.1", smtp_port), 1)
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    with open(f"{root}/log") as f:
                        self.fail(f"twistd did not start:\n{f.read()}")
                time.sleep(0.05)

    def stop(self, process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.kill()
        process.wait(10)

    def test_sigkill_mid_data(self):
        """SIGKILL mid-DATA leaves new/ empty; the dead tmp/ file goes at a start 36 h later."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        with open(os.path.join(root, "users"), "w") as f:
            f.write(f"alice:{hash_password('pw', 'PLAIN')}\n")
        os.chmod(os.path.join(root, "users"), 0o600)
        process, conn = self.start(root)
        with conn, conn.makefile("rb") as replies:

            def command(line: bytes) -> bytes:
                conn.sendall(line + b"\r\n")
                reply = replies.readline()
                while reply[3:4] == b"-":
                    reply = replies.readline()
                return reply

            self.assertTrue(replies.readline().startswith(b"220 "))
            self.assertTrue(command(b"EHLO client.test").startswith(b"250 "))
            self.assertTrue(command(b"MAIL FROM:<s@remote.example>").startswith(b"250 "))
            self.assertTrue(command(b"RCPT TO:<alice@live.test>").startswith(b"250 "))
            self.assertTrue(command(b"DATA").startswith(b"354 "))
            conn.sendall(b"Subject: half\r\n\r\n" + b"line\r\n" * 20000)
            tmp = os.path.join(root, "mail", "alice", "tmp")
            deadline = time.monotonic() + 10
            while not (os.listdir(tmp) and os.path.getsize(os.path.join(tmp, os.listdir(tmp)[0]))):
                self.assertLess(time.monotonic(), deadline, "nothing reached tmp/")
                time.sleep(0.02)
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
        new = os.path.join(root, "mail", "alice", "new")
        self.assertEqual(os.listdir(new), [])
        [dead] = os.listdir(tmp)
        # A restart keeps a young temporary file (it could be a live delivery) ...
        process, conn = self.start(root)
        with conn:
            self.assertTrue(conn.recv(100).startswith(b"220 "))
        self.assertEqual(os.listdir(tmp), [dead])
        self.stop(process)
        # ... and removes it once it is older than 36 hours.
        old = time.time() - 37 * 3600
        os.utime(os.path.join(tmp, dead), (old, old))
        process, conn = self.start(root)
        with conn:
            self.assertTrue(conn.recv(100).startswith(b"220 "))
        self.assertEqual(os.listdir(tmp), [])
        self.assertEqual(os.listdir(new), [])


#: twistd with each link(2) and the journal's commit slowed down, so that a SIGKILL can
#: land between any two links of a delivery, or after the last one and before the commit.
SLOW_LINKS_TWISTD = (
    "import os, time\n"
    "real_link, real_pwrite = os.link, os.pwrite\n"
    "def link(*args, **kwargs):\n"
    "    time.sleep(0.002)\n"
    "    return real_link(*args, **kwargs)\n"
    "def pwrite(*args, **kwargs):\n"
    "    time.sleep(0.3)\n"
    "    return real_pwrite(*args, **kwargs)\n"
    "os.link, os.pwrite = link, pwrite\n" + TWISTD
)


DOMAIN = TWISTD_HOST.encode("ascii")


class MultiRecipientKillTests(SynchronousTestCase):
    """A real ``twistd popserv`` killed with SIGKILL at many points of a delivery to 100
    users (the test found the message in 32 to 100 of them after a kill 2.5-10 ms after
    the final dot, with no 250 sent)."""

    USERS = [f"u{n:02d}" for n in range(100)]

    def setUp(self):
        self.server = TwistdServer(self, {user: "pw" for user in self.USERS}, smtp=True)
        self.server.program = SLOW_LINKS_TWISTD
        self.server.start()

    def copies(self) -> list[int]:
        return [len(os.listdir(self.server.maildir(user, "new"))) for user in self.USERS]

    def send(self, kill_after: int | None = None) -> bytes:
        """Send one message to all USERS; the reply to its end (empty if there was none).

        With ``kill_after``, SIGKILL the server as soon as that many users have it (at
        once for 0); with -1, once the reply has come.
        """
        rcpts = b"".join(b"RCPT TO:<%s@%s>\r\n" % (user.encode(), DOMAIN) for user in self.USERS)
        conn = socket.create_connection(("127.0.0.1", self.server.smtp_port), timeout=10)
        with conn, conn.makefile("rb") as replies:
            conn.sendall(b"EHLO client.test\r\nMAIL FROM:<s@remote.example>\r\n" + rcpts)
            finals = []
            while len(finals) < 103:
                line = replies.readline()
                if line[3:4] == b" ":
                    finals.append(line[:3])
            self.assertEqual(finals, [b"220", b"250", b"250"] + [b"250"] * 100)
            conn.sendall(b"DATA\r\n")
            self.assertEqual(replies.readline()[:3], b"354")
            conn.sendall(b"Subject: to a hundred\r\n\r\n" + b"line\r\n" * 1000 + b".\r\n")
            if kill_after is None or kill_after < 0:
                reply = replies.readline()
            else:
                reply = b""
                deadline = time.monotonic() + 10
                while sum(map(bool, self.copies())) < kill_after:
                    self.assertLess(time.monotonic(), deadline, "the delivery did not progress")
            if kill_after is not None:
                self.server.kill()
                try:
                    reply += replies.read()
                except ConnectionResetError:
                    # The kernel resets a killed server's socket that held unread input.
                    pass
            return reply

    def test_sigkill_at_each_point_of_a_delivery(self):
        """Killed before its 250, every recipient has the message or none has, and a retry
        leaves exactly one copy each; killed after the 250, every recipient keeps it."""
        for kill_after in (0, 1, 50, 99, 100, -1):
            reply = self.send(kill_after)
            self.server.start()
            if kill_after < 0:
                self.assertTrue(reply.startswith(b"250 2.0.0 Ok: queued as "), reply)
                self.assertEqual(self.copies(), [1] * 100)
                continue
            self.assertEqual(reply, b"", kill_after)
            self.assertEqual(self.copies(), [0] * 100, kill_after)
            # The sender got no 250, so it sends the message again.
            self.assertTrue(self.send().startswith(b"250 "))
            self.assertEqual(self.copies(), [1] * 100, kill_after)
            for user in self.USERS:
                for name in os.listdir(self.server.maildir(user, "new")):
                    os.unlink(os.path.join(self.server.maildir(user, "new"), name))
        self.assertEqual(os.listdir(os.path.join(self.server.mailroot, ".popserv-deliveries")), [])
