"""Faults against a real ``twistd popserv``: SIGKILL in the middle of UPDATE, a full disk
under the SMTP receiver, and a message that can no longer be read.

Everything listens on 127.0.0.1.  The full-disk test mounts a small tmpfs, so it needs
root (CAP_SYS_ADMIN); elsewhere it skips, saying so.
"""

import os
import random
import shutil
import smtplib
import socket
import subprocess
import time

from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from popserv.maildir import crlf_size, unique_part
from tests.live_twistd import HOST, TwistdServer

log = Logger()
_sequence = iter(range(1, 1 << 30))


def deliver(server: TwistdServer, user: str, body: bytes) -> str:
    """Put one message into ``new/`` as a delivery agent would; returns its UIDL."""
    maildir = server.maildir(user)
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, sub), mode=0o700, exist_ok=True)
    n = next(_sequence)
    unique = f"{int(time.time())}.M{n:06d}P{os.getpid()}Q{n}.faults.test"
    name = f"{unique},S={len(body)},W={crlf_size(body)}"
    temp = os.path.join(maildir, "tmp", name)
    with open(temp, "wb") as f:
        f.write(body)
    os.rename(temp, os.path.join(maildir, "new", name))
    return unique


def on_disk(server: TwistdServer, user: str) -> dict[str, str]:
    """UIDL -> path of every message file in the user's new/ and cur/."""
    found = {}
    for sub in ("new", "cur"):
        directory = server.maildir(user, sub)
        for name in os.listdir(directory) if os.path.isdir(directory) else ():
            found[unique_part(name)] = os.path.join(directory, name)
    return found


class Session:
    """A raw POP3 connection, reading replies as a client would."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), 10)
        self.file = self.sock.makefile("rb")
        assert self.file.readline().startswith(b"+OK")

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.file.readline().rstrip(b"\r\n")

    def multi(self, line: bytes) -> tuple[bytes, list[bytes]]:
        first = self.command(line)
        lines = []
        if first.startswith(b"+OK"):
            while (item := self.file.readline().rstrip(b"\r\n")) != b".":
                lines.append(item[1:] if item.startswith(b"..") else item)
        return first, lines

    def login(self, user: bytes = b"alice", password: bytes = b"secret") -> bytes:
        assert self.command(b"USER " + user) == b"+OK"
        return self.command(b"PASS " + password)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class KillDuringUpdateTests(SynchronousTestCase):
    """SIGKILL right after QUIT, at random moments of the commit, again and again."""

    ROUNDS = 6
    MESSAGES = 120

    def test_sigkill_after_quit_loses_no_kept_message(self):
        """Kept messages survive, and the next login sees exactly the files left on disk."""
        rng = random.Random(1939)
        server = TwistdServer(self, {"alice": "secret"})
        server.start()
        outcomes = []
        for round_ in range(self.ROUNDS):
            while len(on_disk(server, "alice")) < self.MESSAGES:
                deliver(server, "alice", b"Subject: %d\n\nbody\n" % round_)
            session = Session(server.pop3_port)
            self.assertTrue(session.login().startswith(b"+OK Logged in"))
            _, listing = session.multi(b"UIDL")
            uidls = [line.split()[1].decode() for line in listing]
            doomed = set(rng.sample(range(len(uidls)), k=len(uidls) * 3 // 4))
            for index in sorted(doomed):
                self.assertTrue(session.command(b"DELE %d" % (index + 1)).startswith(b"+OK"))
            session.sock.sendall(b"QUIT\r\n")
            time.sleep(rng.choice([0, 0, 0.0005, 0.001, 0.002, 0.005, 0.02]))
            server.kill()
            session.close()

            left = on_disk(server, "alice")
            kept = {uidls[i] for i in range(len(uidls)) if i not in doomed}
            self.assertEqual(kept - set(left), set(), f"round {round_}: kept messages lost")
            outcomes.append(len(set(uidls) - set(left)))

            # The lock went with the process; the next session sees what is on disk.
            server.start()
            session = Session(server.pop3_port)
            self.assertTrue(session.login().startswith(b"+OK Logged in"))
            stat = session.command(b"STAT").split()
            _, listing = session.multi(b"UIDL")
            self.assertEqual(int(stat[1]), len(left))
            self.assertEqual({line.split()[1].decode() for line in listing}, set(left))
            self.assertTrue(session.command(b"QUIT").startswith(b"+OK"))
            session.close()
        # Every round lost nothing it kept; how much of the deletion was done varies.
        self.assertEqual(len(outcomes), self.ROUNDS)
        log.info(
            "faults.sigkill_update: removed before SIGKILL, per round (of {doomed}): {removed}",
            doomed=self.MESSAGES * 3 // 4,
            removed=outcomes,
        )


class UnreadableMessageTests(SynchronousTestCase):
    """A message that cannot be opened or read any more: [SYS/PERM] for it, the rest served."""

    def setUp(self):
        self.server = TwistdServer(self, {"alice": "secret"})
        self.uidls = [
            deliver(self.server, "alice", b"Subject: %d\n\nmessage %d\n" % (n, n))
            for n in (1, 2, 3)
        ]
        self.server.start()
        self.session = Session(self.server.pop3_port)
        self.addCleanup(self.session.close)
        self.assertTrue(self.session.login().startswith(b"+OK Logged in, 3 messages"))

    def break_message(self, how) -> None:
        path = on_disk(self.server, "alice")[self.uidls[1]]
        os.unlink(path)
        how(path)

    def assert_rest_served(self) -> None:
        first, body = self.session.multi(b"RETR 2")
        self.assertEqual(first, b"-ERR [SYS/PERM] Message cannot be read.")
        for number in (1, 3):
            first, body = self.session.multi(b"RETR %d" % number)
            self.assertTrue(first.startswith(b"+OK"), first)
            self.assertEqual(body[-1], b"message %d" % number)
        self.assertEqual(self.session.command(b"NOOP"), b"+OK")
        self.assertTrue(self.session.command(b"QUIT").startswith(b"+OK"))

    def test_replaced_by_a_symlink(self):
        """A message turned into a symlink after login is refused (O_NOFOLLOW), not followed."""
        self.break_message(lambda path: os.symlink("/etc/passwd", path))
        self.assert_rest_served()

    def test_replaced_by_a_directory(self):
        """A message whose file cannot be read (EISDIR) gets [SYS/PERM] before any data."""
        self.break_message(os.mkdir)
        self.assert_rest_served()

    def test_symlink_at_login_is_left_out(self):
        """A symlink already in new/ at login is not listed; the other messages are."""
        self.break_message(lambda path: os.symlink("/etc/passwd", path))
        self.assertTrue(self.session.command(b"QUIT").startswith(b"+OK"))
        session = Session(self.server.pop3_port)
        self.addCleanup(session.close)
        self.assertTrue(session.login().startswith(b"+OK Logged in, 2 messages"))
        _, listing = session.multi(b"UIDL")
        self.assertEqual([line.split()[1].decode() for line in listing], self.uidls[::2])


class FullDiskTests(SynchronousTestCase):
    """The mail root on a 256 KiB tmpfs: a bigger message meets a really full disk."""

    def mount_small_tmpfs(self, path: str) -> None:
        os.makedirs(path)
        mount = shutil.which("mount")
        if mount is None or os.geteuid() != 0:
            raise SkipTest("mounting a tmpfs needs root and mount(8)")
        ran = subprocess.run(
            [mount, "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", path],
            capture_output=True,
            text=True,
        )
        if ran.returncode != 0:
            raise SkipTest(f"cannot mount a tmpfs here: {ran.stderr.strip()}")
        self.addCleanup(subprocess.run, ["umount", "-l", path], check=False)

    def test_full_disk_gets_452_and_leaves_nothing(self):
        """452 4.3.1 for a message the disk cannot hold; nothing in new/ or tmp/; the next fits."""
        server = TwistdServer(self, {"alice": "secret"}, smtp=True)
        self.mount_small_tmpfs(server.mailroot)
        server.start()
        big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1024
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as smtp:
            with self.assertRaises(smtplib.SMTPDataError) as cm:
                smtp.sendmail("s@remote.example", [f"alice@{HOST}"], big)
            self.assertEqual(cm.exception.smtp_code, 452)
            self.assertIn(b"4.3.1", cm.exception.smtp_error)
            for sub in ("new", "tmp", "cur"):
                self.assertEqual(os.listdir(server.maildir("alice", sub)), [], sub)
            smtp.sendmail("s@remote.example", [f"alice@{HOST}"], b"Subject: small\r\n\r\nfits\r\n")
        self.assertEqual(len(os.listdir(server.maildir("alice", "new"))), 1)
        self.assertEqual(os.listdir(server.maildir("alice", "tmp")), [])
