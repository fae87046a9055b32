"""popserv over real TCP on 127.0.0.1: Python's poplib, raw sockets and Twisted's POP3 client."""

from __future__ import annotations

import os
import poplib
import socket
import struct
import time

from twisted.internet import defer, endpoints, reactor, threads
from twisted.mail.pop3 import AdvancedPOP3Client
from twisted.trial import unittest

from tests import live
from tests.live import CRLF, DOTS, NO_EOL, received_form, wire


def stuffed(message: bytes) -> bytes:
    """The exact multi-line body on the wire: CRLF, dot-stuffed, ``.`` terminator."""
    data = received_form(message)
    data = data.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data + b".\r\n"


def crossing_message(size: int = 3 * 1024 * 1024, chunk: int = 64 * 1024) -> bytes:
    """A message of about ``size`` octets whose dot-led lines and CRLFs straddle every
    ``chunk`` boundary of the file, in a different way at each boundary."""
    # (pattern, index in the pattern that lands on the boundary)
    patterns = [
        (b"\n.starts a chunk\n", 1),
        (b"\n.\n", 2),  # a lone dot ending a chunk
        (b"\r\n..crlf split\r\n", 1),
        (b"\r\n.\r\n", 2),
        (b"\n..\n", 2),  # two dots split between chunks
        (b"\n...three\n", 1),
    ]
    out = bytearray(b"From: big@example.org\nSubject: dot-led lines across chunks\n\n")
    line = 0
    for boundary in range(chunk, size, chunk):
        pattern, anchor = patterns[(boundary // chunk) % len(patterns)]
        target = boundary - anchor
        while target - len(out) > 100:
            line += 1
            text = (b"." * (line % 3) + b"line %d " % line).ljust(70, b"x")
            out += text + b"\n"
        rest = target - len(out)
        out += b"\n" if rest == 1 else b"y" * (rest - 1) + b"\n"
        out += pattern
        assert out[boundary - anchor : boundary - anchor + len(pattern)] == pattern
    out += b"the last line\n"
    return bytes(out)


def split_replies(data: bytes, multiline: list[bool]) -> list[bytes]:
    """Cut a server's output into replies: one per entry, multi-line where the entry says
    so and the reply is +OK.  Whatever follows the last reply is returned as well."""
    replies = []
    pos = 0
    for is_multi in multiline:
        end = data.index(b"\r\n", pos) + 2
        if is_multi and data.startswith(b"+OK", pos):
            end = data.index(b"\r\n.\r\n", end - 2) + 5
        replies.append(data[pos:end])
        pos = end
    replies.append(data[pos:])
    return replies


def converse(port: int, commands: bytes) -> bytes:
    """Send every command in one write, then read until the server closes (blocking)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(commands)
        parts = []
        while True:
            data = sock.recv(65536)
            if not data:
                return b"".join(parts)
            parts.append(data)


class LiveTestCase(unittest.TestCase):
    """A live popserv with alice's three messages: DOTS, CRLF (Postfix name) and NO_EOL (seen)."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.server = yield live.start_server(self, {"alice": "secret", "bob": "hunter2"})
        self.uidls = [
            self.server.deliver("alice", DOTS),
            self.server.deliver("alice", CRLF, sizes=False),
            self.server.deliver("alice", NO_EOL, seen=True),
        ]
        self.messages = [DOTS, CRLF, NO_EOL]

    def connect(self, user: str = "alice", password: str = "secret") -> poplib.POP3:
        """A poplib session in TRANSACTION state (blocking: call it in a thread)."""
        client = poplib.POP3("127.0.0.1", self.server.port, timeout=20)
        client.user(user)
        client.pass_(password)
        return client

    def in_thread(self, f, *args):
        return threads.deferToThread(f, *args)


class PoplibTests(LiveTestCase):
    """Python's poplib against a live server."""

    @defer.inlineCallbacks
    def test_stat(self):
        """STAT counts the messages and their octets with CRLF line ends."""

        def session():
            client = self.connect()
            try:
                return client.stat()
            finally:
                client.quit()

        count, octets = yield self.in_thread(session)
        self.assertEqual((count, octets), (3, sum(len(wire(m)) for m in self.messages)))

    @defer.inlineCallbacks
    def test_list(self):
        """LIST gives each message's CRLF size, whether or not the file name holds it."""

        def session():
            client = self.connect()
            try:
                return client.list(), client.list(2)
            finally:
                client.quit()

        (_, lines, _), single = yield self.in_thread(session)
        expected = [b"%d %d" % (n, len(wire(m))) for n, m in enumerate(self.messages, 1)]
        self.assertEqual(lines, expected)
        self.assertEqual(single, b"+OK 2 %d" % len(wire(CRLF)))

    @defer.inlineCallbacks
    def test_uidl(self):
        """UIDL gives the unique part of each Maildir file name, in delivery order."""

        def session():
            client = self.connect()
            try:
                return client.uidl(), client.uidl(3)
            finally:
                client.quit()

        (_, lines, _), single = yield self.in_thread(session)
        expected = [b"%d %s" % (n, u.encode()) for n, u in enumerate(self.uidls, 1)]
        self.assertEqual(lines, expected)
        self.assertEqual(single, b"+OK " + expected[2])

    @defer.inlineCallbacks
    def test_capa(self):
        """CAPA after login advertises TOP, UIDL, PIPELINING and RESP-CODES."""

        def session():
            client = self.connect()
            try:
                return client.capa()
            finally:
                client.quit()

        caps = yield self.in_thread(session)
        for name in ("TOP", "UIDL", "PIPELINING", "RESP-CODES"):
            self.assertIn(name, caps)

    @defer.inlineCallbacks
    def test_retr(self):
        """RETR returns every stored message byte-exact, with CRLF line ends."""

        def session():
            client = self.connect()
            try:
                return [client.retr(n) for n in (1, 2, 3)]
            finally:
                client.quit()

        results = yield self.in_thread(session)
        for message, (response, lines, _) in zip(self.messages, results, strict=True):
            self.assertEqual(response, b"+OK %d octets" % len(wire(message)))
            self.assertEqual(b"".join(line + b"\r\n" for line in lines), received_form(message))

    @defer.inlineCallbacks
    def test_top_headers(self):
        """TOP n 0 returns the header and the blank line that ends it."""

        def session():
            client = self.connect()
            try:
                return client.top(1, 0), client.top(2, 0)
            finally:
                client.quit()

        (_, first, _), (_, second, _) = yield self.in_thread(session)
        self.assertEqual(first, DOTS.split(b"\n\n")[0].split(b"\n") + [b""])
        self.assertEqual(second, CRLF.split(b"\r\n\r\n")[0].split(b"\r\n") + [b""])

    @defer.inlineCallbacks
    def test_top_lines(self):
        """TOP n k returns the header and k body lines, dot-led lines intact."""

        def session():
            client = self.connect()
            try:
                return client.top(1, 4)
            finally:
                client.quit()

        _, lines, _ = yield self.in_thread(session)
        header, body = DOTS.split(b"\n\n")
        self.assertEqual(lines, header.split(b"\n") + [b""] + body.split(b"\n")[:4])

    @defer.inlineCallbacks
    def test_top_whole(self):
        """TOP n 99999999, as fetchmail sends in keep mode, returns the whole message."""

        def session():
            client = self.connect()
            try:
                return [client.top(n, 99999999) for n in (1, 2, 3)]
            finally:
                client.quit()

        results = yield self.in_thread(session)
        for message, (_, lines, _) in zip(self.messages, results, strict=True):
            self.assertEqual(b"".join(line + b"\r\n" for line in lines), received_form(message))

    @defer.inlineCallbacks
    def test_dele_quit(self):
        """DELE then QUIT removes the file; the next session lists the rest, renumbered."""

        def first():
            client = self.connect()
            client.dele(2)
            return client.quit()

        def second():
            client = self.connect()
            try:
                return client.uidl()
            finally:
                client.quit()

        bye = yield self.in_thread(first)
        self.assertTrue(bye.startswith(b"+OK"))
        self.assertEqual(set(self.server.stored("alice")), {self.uidls[0], self.uidls[2]})
        _, lines, _ = yield self.in_thread(second)
        self.assertEqual(lines, [b"1 " + self.uidls[0].encode(), b"2 " + self.uidls[2].encode()])

    @defer.inlineCallbacks
    def test_dele_hides(self):
        """A message marked deleted is gone from LIST and refused by RETR in the same session."""

        def session():
            client = self.connect()
            try:
                client.dele(1)
                listing = client.list()[1]
                with self.assertRaises(poplib.error_proto) as refused:
                    client.retr(1)
                return listing, refused.exception.args[0]
            finally:
                client.rset()
                client.quit()

        listing, refusal = yield self.in_thread(session)
        self.assertEqual([line.split()[0] for line in listing], [b"2", b"3"])
        self.assertTrue(refusal.startswith(b"-ERR"))

    @defer.inlineCallbacks
    def test_rset(self):
        """RSET unmarks every deletion, so QUIT removes nothing."""

        def session():
            client = self.connect()
            client.dele(1)
            client.dele(3)
            client.rset()
            return client.quit()

        yield self.in_thread(session)
        self.assertEqual(set(self.server.stored("alice")), set(self.uidls))

    @defer.inlineCallbacks
    def test_dropped_connection(self):
        """A connection closed without QUIT after DELE deletes nothing and frees the maildrop."""

        def session():
            client = self.connect()
            client.dele(1)
            client.dele(2)
            client.sock.close()
            client.file.close()

        def again():
            client = self.connect()
            try:
                return client.stat()
            finally:
                client.quit()

        yield self.in_thread(session)
        yield self.server.wait_idle()
        self.assertEqual(set(self.server.stored("alice")), set(self.uidls))
        count, _ = yield self.in_thread(again)
        self.assertEqual(count, 3)

    @defer.inlineCallbacks
    def test_in_use(self):
        """A second session for a user with one open gets [IN-USE], and gets in once it quits."""
        holder = yield self.in_thread(self.connect)

        def second():
            client = poplib.POP3("127.0.0.1", self.server.port, timeout=20)
            client.user("alice")
            try:
                client.pass_("secret")
            except poplib.error_proto as e:
                return e.args[0]
            finally:
                client.close()

        refusal = yield self.in_thread(second)
        self.assertTrue(refusal.startswith(b"-ERR [IN-USE]"), refusal)
        yield self.in_thread(holder.quit)
        again = yield self.in_thread(self.connect)
        yield self.in_thread(again.quit)

    @defer.inlineCallbacks
    def test_wrong_password(self):
        """A wrong password and an unknown user both get the same -ERR [AUTH] reply."""

        def attempt(user, password):
            client = poplib.POP3("127.0.0.1", self.server.port, timeout=20)
            client.user(user)
            try:
                client.pass_(password)
            except poplib.error_proto as e:
                return e.args[0]
            finally:
                client.close()

        wrong = yield self.in_thread(attempt, "alice", "Secret")
        unknown = yield self.in_thread(attempt, "mallory", "secret")
        self.assertTrue(wrong.startswith(b"-ERR [AUTH]"), wrong)
        self.assertEqual(unknown, wrong)

    @defer.inlineCallbacks
    def test_snapshot(self):
        """Mail delivered during a session shows up at the next login, not in the session."""

        def listing(client):
            return client.uidl()[1]

        client = yield self.in_thread(self.connect)
        late = self.server.deliver("alice", b"Subject: late\n\nlate\n")
        during = yield self.in_thread(listing, client)
        yield self.in_thread(client.quit)
        client = yield self.in_thread(self.connect)
        after = yield self.in_thread(listing, client)
        yield self.in_thread(client.quit)
        self.assertEqual(len(during), 3)
        self.assertEqual(after[-1], b"4 " + late.encode())

    @defer.inlineCallbacks
    def test_other_user(self):
        """Each user sees only their own Maildir."""
        self.server.deliver("bob", DOTS)

        def session():
            client = self.connect("bob", "hunter2")
            try:
                return client.stat()
            finally:
                client.quit()

        stat = yield self.in_thread(session)
        self.assertEqual(stat, (1, len(wire(DOTS))))


class Argon2Tests(unittest.TestCase):
    """Logins against the Argon2id hashes popserv's admin tool writes."""

    timeout = 60

    @defer.inlineCallbacks
    def test_argon2_login(self):
        """USER/PASS succeeds with the right password against an Argon2id hash, and only then."""
        server = yield live.start_server(self, {"alice": "correct horse"}, argon2=True)
        server.deliver("alice", DOTS)

        def attempt(password):
            client = poplib.POP3("127.0.0.1", server.port, timeout=20)
            client.user("alice")
            try:
                client.pass_(password)
            except poplib.error_proto as e:
                client.close()
                return e.args[0]
            return client.quit()

        good = yield threads.deferToThread(attempt, "correct horse")
        bad = yield threads.deferToThread(attempt, "correct")
        self.assertTrue(good.startswith(b"+OK"), good)
        self.assertTrue(bad.startswith(b"-ERR [AUTH]"), bad)


class RawSocketTests(LiveTestCase):
    """Bytes on the wire, checked without a client library in between."""

    @defer.inlineCallbacks
    def test_pipelining(self):
        """Commands sent in one write are answered in order, each exactly once."""
        commands = [
            (b"CAPA", True),
            (b"USER alice", False),
            (b"PASS secret", False),
            (b"STAT", False),
            (b"LIST", True),
            (b"UIDL 2", False),
            (b"RETR 1", True),
            (b"X" * 300, False),  # over-long: an -ERR, and the session goes on
            (b"TOP 2 0", True),
            (b"DELE 3", False),
            (b"RETR 3", True),  # deleted: -ERR
            (b"NOOP", False),
            (b"RETR 2", True),
            (b"RSET", False),
            (b"QUIT", False),
        ]
        data = yield self.in_thread(
            converse, self.server.port, b"".join(c + b"\r\n" for c, _ in commands)
        )
        replies = split_replies(data, [False] + [multi for _, multi in commands])
        self.assertTrue(replies[0].startswith(b"+OK"))
        answers = dict(zip((c for c, _ in commands), replies[1:], strict=False))
        self.assertEqual(replies[-1], b"", "nothing follows the QUIT reply")
        octets = sum(len(wire(m)) for m in self.messages)
        self.assertEqual(answers[b"STAT"], b"+OK 3 %d\r\n" % octets)
        listing = b"".join(b"%d %d\r\n" % (n, len(wire(m))) for n, m in enumerate(self.messages, 1))
        self.assertTrue(answers[b"LIST"].startswith(b"+OK"))
        self.assertTrue(answers[b"LIST"].endswith(b"\r\n" + listing + b".\r\n"))
        self.assertEqual(answers[b"UIDL 2"], b"+OK 2 %s\r\n" % self.uidls[1].encode())
        self.assertEqual(answers[b"RETR 1"].split(b"\r\n", 1)[1], stuffed(DOTS))
        self.assertTrue(answers[b"X" * 300].startswith(b"-ERR"))
        top = CRLF.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
        self.assertEqual(answers[b"TOP 2 0"].split(b"\r\n", 1)[1], top + b".\r\n")
        self.assertTrue(answers[b"DELE 3"].startswith(b"+OK"))
        self.assertTrue(answers[b"RETR 3"].startswith(b"-ERR"))
        self.assertEqual(answers[b"NOOP"][:3], b"+OK")
        self.assertEqual(answers[b"RETR 2"].split(b"\r\n", 1)[1], stuffed(CRLF))
        self.assertTrue(answers[b"RSET"].startswith(b"+OK"))
        self.assertTrue(answers[b"QUIT"].startswith(b"+OK"))
        self.assertEqual(len(self.server.stored("alice")), 3)

    @defer.inlineCallbacks
    def test_many_pipelined_retrievals(self):
        """Two hundred pipelined RETRs each come back whole and in order."""
        commands = b"USER alice\r\nPASS secret\r\n" + b"RETR 1\r\nRETR 2\r\n" * 100 + b"QUIT\r\n"
        data = yield self.in_thread(converse, self.server.port, commands)
        replies = split_replies(data, [False, False, False] + [True] * 200 + [False])
        for n, reply in enumerate(replies[3:203]):
            message = DOTS if n % 2 == 0 else CRLF
            self.assertEqual(reply, b"+OK %d octets\r\n" % len(wire(message)) + stuffed(message))
        self.assertTrue(replies[203].startswith(b"+OK"))

    @defer.inlineCallbacks
    def test_large_message(self):
        """A 3 MB message whose dot-led lines straddle every 64 KiB boundary arrives byte-exact."""
        big = crossing_message()
        self.server.deliver("alice", big, sizes=False)
        data = yield self.in_thread(
            converse, self.server.port, b"USER alice\r\nPASS secret\r\nLIST 4\r\nRETR 4\r\nQUIT\r\n"
        )
        replies = split_replies(data, [False, False, False, False, True, False])
        self.assertEqual(replies[3], b"+OK 4 %d\r\n" % len(wire(big)))
        status, body = replies[4].split(b"\r\n", 1)
        self.assertEqual(status, b"+OK %d octets" % len(wire(big)))
        self.assertEqual(len(body), len(stuffed(big)))
        self.assertEqual(body, stuffed(big))

    @defer.inlineCallbacks
    def test_large_message_poplib(self):
        """poplib reads the 3 MB dot-heavy message back as stored, and TOP cuts it in place."""
        big = crossing_message()
        self.server.deliver("alice", big)

        def session():
            client = self.connect()
            try:
                return client.retr(4), client.top(4, 1000)
            finally:
                client.quit()

        (_, lines, _), (_, top, _) = yield self.in_thread(session)
        self.assertEqual(b"".join(line + b"\r\n" for line in lines), wire(big))
        self.assertEqual(top, lines[: len(top)])
        self.assertEqual(len(top), 3 + 1000)

    @defer.inlineCallbacks
    def test_disconnect_during_retr(self):
        """A client that leaves in the middle of a large RETR deletes nothing and frees the lock."""
        self.server.deliver("alice", crossing_message())

        def leave_early():
            with socket.create_connection(("127.0.0.1", self.server.port), timeout=20) as sock:
                sock.sendall(b"USER alice\r\nPASS secret\r\nDELE 1\r\nRETR 4\r\n")
                received = b""
                while len(received) < 200_000:
                    received += sock.recv(65536)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return received

        received = yield self.in_thread(leave_early)
        self.assertIn(b"+OK Message 1 deleted.", received)
        yield self.server.wait_idle()
        self.assertEqual(len(self.server.stored("alice")), 4)

        def again():
            client = self.connect()
            try:
                return client.stat()[0]
            finally:
                client.quit()

        count = yield self.in_thread(again)
        self.assertEqual(count, 4)

    @defer.inlineCallbacks
    def test_login_timeout(self):
        """A client idle before login is told so and disconnected after the login timeout."""
        server = yield live.start_server(self, pop3_login_timeout=0.3)

        def idle():
            with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
                parts = []
                while data := sock.recv(1024):
                    parts.append(data)
                return b"".join(parts)

        data = yield self.in_thread(idle)
        greeting, rest = data.split(b"\r\n", 1)
        self.assertTrue(greeting.startswith(b"+OK"))
        self.assertTrue(rest.startswith(b"-ERR"), rest)
        self.assertTrue(rest.endswith(b"\r\n"))


class SlowReaderTests(LiveTestCase):
    """Streaming to a client that reads slowly."""

    @defer.inlineCallbacks
    def test_slow_reader(self):
        """A reader that lets its buffers fill gets the large message whole, then the
        reply to the command pipelined after it."""
        big = crossing_message()
        self.server.deliver("alice", big)

        def slow():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(20)
            with sock:
                sock.connect(("127.0.0.1", self.server.port))
                sock.sendall(b"USER alice\r\nPASS secret\r\nRETR 4\r\nNOOP\r\nQUIT\r\n")
                parts = []
                for _ in range(20):
                    time.sleep(0.02)
                    parts.append(sock.recv(4096))
                while data := sock.recv(65536):
                    parts.append(data)
            return b"".join(parts)

        data = yield self.in_thread(slow)
        replies = split_replies(data, [False, False, False, True, False, False])
        self.assertEqual(replies[3], b"+OK %d octets\r\n" % len(wire(big)) + stuffed(big))
        self.assertTrue(replies[4].startswith(b"+OK"))
        self.assertTrue(replies[5].startswith(b"+OK"))


class SharedMaildirTests(LiveTestCase):
    """Another agent (an IMAP server, a cleanup job) changing the Maildir during a session."""

    @defer.inlineCallbacks
    def test_moved_to_cur(self):
        """A message moved from new/ to cur/ mid-session is still retrieved, and DELE removes it."""
        client = yield self.in_thread(self.connect)
        maildir = self.server.maildir("alice")
        (name,) = [
            n for n in os.listdir(os.path.join(maildir, "new")) if n.startswith(self.uidls[0])
        ]
        os.rename(os.path.join(maildir, "new", name), os.path.join(maildir, "cur", name + ":2,S"))

        def session():
            try:
                lines = client.retr(1)[1]
                client.dele(1)
                return lines
            finally:
                client.quit()

        lines = yield self.in_thread(session)
        self.assertEqual(b"".join(line + b"\r\n" for line in lines), received_form(DOTS))
        self.assertEqual(set(self.server.stored("alice")), set(self.uidls[1:]))

    @defer.inlineCallbacks
    def test_removed_elsewhere(self):
        """A message removed by another agent mid-session gets -ERR from RETR; the session
        goes on and QUIT still commits the other deletions."""
        client = yield self.in_thread(self.connect)
        maildir = self.server.maildir("alice")
        for sub in ("new", "cur"):
            for name in os.listdir(os.path.join(maildir, sub)):
                if name.startswith(self.uidls[0]):
                    os.unlink(os.path.join(maildir, sub, name))

        def session():
            try:
                with self.assertRaises(poplib.error_proto) as refused:
                    client.retr(1)
                client.dele(1)
                client.dele(2)
                return refused.exception.args[0], client.retr(3)[1]
            finally:
                client.quit()

        refusal, lines = yield self.in_thread(session)
        self.assertTrue(refusal.startswith(b"-ERR"), refusal)
        self.assertEqual(b"".join(line + b"\r\n" for line in lines), received_form(NO_EOL))
        self.assertEqual(set(self.server.stored("alice")), {self.uidls[2]})


class DomainUserTests(unittest.TestCase):
    """Users named user@domain, whose Maildirs live under <mailroot>/<domain>/<user>."""

    timeout = 60

    @defer.inlineCallbacks
    def test_domain_user(self):
        """carol@example.org logs in and sees the mail in example.org/carol."""
        server = yield live.start_server(self, {"carol@example.org": "pw carol"})
        uidl = server.deliver("carol@example.org", DOTS)
        self.assertTrue(
            server.maildir("carol@example.org").endswith(os.path.join("example.org", "carol"))
        )

        def session():
            client = poplib.POP3("127.0.0.1", server.port, timeout=20)
            client.user("carol@example.org")
            client.pass_("pw carol")
            try:
                return client.uidl()[1]
            finally:
                client.quit()

        lines = yield threads.deferToThread(session)
        self.assertEqual(lines, [b"1 " + uidl.encode()])


class CollidingUsersTests(unittest.TestCase):
    """A hand-edited users file whose names share or nest Maildirs, served by the real store."""

    timeout = 60

    USERS = {
        "example.org": "pw outer",
        "new@example.org": "pw inner",
        "alice@EXAMPLE.NET": "pw upper",
        "alice@example.net": "pw lower",
        "bob": "hunter2",
    }

    def login(self, port: int, user: str) -> bytes:
        """The reply to PASS with the user's right password, then QUIT (blocking)."""
        client = poplib.POP3("127.0.0.1", port, timeout=20)
        try:
            client.user(user)
            try:
                reply = client.pass_(self.USERS[user])
            except poplib.error_proto as e:
                return e.args[0]
            client.stat()
            return reply
        finally:
            client.quit()

    @defer.inlineCallbacks
    def test_colliding_names_are_not_served(self):
        """Each name of a colliding pair gets -ERR [SYS/TEMP] with its right password; bob
        logs in."""
        server = yield live.start_server(self, self.USERS)
        replies = {}
        for user in self.USERS:
            replies[user] = yield threads.deferToThread(self.login, server.port, user)
        for user in ["example.org", "new@example.org", "alice@EXAMPLE.NET", "alice@example.net"]:
            self.assertTrue(replies[user].startswith(b"-ERR [SYS/TEMP]"), (user, replies[user]))
        self.assertTrue(replies["bob"].startswith(b"+OK"), replies["bob"])

    @defer.inlineCallbacks
    def test_nested_user_cannot_steal_the_lock(self):
        """Holding new@example.org, then logging in as example.org and deleting every listed
        message, never lets a second session of new@example.org in."""
        server = yield live.start_server(self, self.USERS)

        def attack():
            holder = poplib.POP3("127.0.0.1", server.port, timeout=20)
            try:
                holder.user("new@example.org")
                holder.pass_(self.USERS["new@example.org"])
            except poplib.error_proto:
                holder.quit()
                holder = None
            outer = poplib.POP3("127.0.0.1", server.port, timeout=20)
            try:
                outer.user("example.org")
                outer.pass_(self.USERS["example.org"])
                for number in range(1, outer.stat()[0] + 1):
                    outer.dele(number)
            except poplib.error_proto:
                pass
            outer.quit()
            try:
                return self.login(server.port, "new@example.org")
            finally:
                if holder is not None:
                    holder.quit()

        second = yield threads.deferToThread(attack)
        self.assertTrue(second.startswith(b"-ERR"), second)


class EmptyMessageTests(LiveTestCase):
    """Degenerate files in a Maildir."""

    @defer.inlineCallbacks
    def test_empty_file(self):
        """An empty message file lists as 0 octets and RETR/TOP send just the terminator."""
        self.server.deliver("alice", b"")
        data = yield self.in_thread(
            converse,
            self.server.port,
            b"USER alice\r\nPASS secret\r\nLIST 4\r\nRETR 4\r\nTOP 4 0\r\nQUIT\r\n",
        )
        replies = split_replies(data, [False, False, False, False, True, True, False])
        self.assertEqual(replies[3], b"+OK 4 0\r\n")
        self.assertEqual(replies[4], b"+OK 0 octets\r\n.\r\n")
        self.assertEqual(replies[5].split(b"\r\n", 1)[1], b".\r\n")

    @defer.inlineCallbacks
    def test_header_only(self):
        """TOP n 0 of a message without a blank line sends the whole message."""
        message = b"Subject: header only\nX-Note: no body\n"
        self.server.deliver("alice", message)

        def session():
            client = self.connect()
            try:
                return client.top(4, 0)[1]
            finally:
                client.quit()

        lines = yield self.in_thread(session)
        self.assertEqual(lines, message.rstrip(b"\n").split(b"\n"))


class TwistedClientTests(LiveTestCase):
    """Twisted's own POP3 client against a live server."""

    @defer.inlineCallbacks
    def connect_twisted(self):
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.server.port)
        client = AdvancedPOP3Client()
        client.allowInsecureLogin = True
        yield endpoints.connectProtocol(endpoint, client)
        self.addCleanup(lambda: client.transport.loseConnection() if client.transport else None)
        yield client.login(b"alice", b"secret")
        return client

    @defer.inlineCallbacks
    def test_session(self):
        """login, listSize, listUID and retrieve see the stored messages; delete and quit
        remove one."""
        client = yield self.connect_twisted()
        sizes = yield client.listSize()
        uids = yield client.listUID()
        bodies = []
        for index in range(3):
            lines = yield client.retrieve(index)
            bodies.append(b"".join(line + b"\r\n" for line in lines))
        yield client.delete(0)
        yield client.quit()
        self.assertEqual(sizes, [len(wire(m)) for m in self.messages])
        self.assertEqual(uids, [u.encode() for u in self.uidls])
        self.assertEqual(bodies, [received_form(m) for m in self.messages])
        yield self.server.wait_idle()
        self.assertEqual(set(self.server.stored("alice")), set(self.uidls[1:]))

    @defer.inlineCallbacks
    def test_top(self):
        """retrieve with lines= sends TOP and gets the header plus that many body lines."""
        client = yield self.connect_twisted()
        lines = yield client.retrieve(0, lines=2)
        yield client.quit()
        header, body = DOTS.split(b"\n\n")
        self.assertEqual(lines, header.split(b"\n") + [b""] + body.split(b"\n")[:2])
