"""Property tests: random client input never crashes the POP3 or SMTP protocol, never
breaks reply framing, and leaves no maildrop locked and no partial delivery behind.

Sessions run over ``StringTransport`` with a ``task.Clock`` advanced at random between
input chunks.  Hypothesis settings come from the profile named by ``HYPOTHESIS_PROFILE``:
``popserv`` (the default) or ``popserv-ci`` (the default under ``CI=true``: derandomized,
so a CI run never fails on an example a previous run did not try).
"""

from __future__ import annotations

import base64
import os
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from popserv import smtp
from popserv.auth import PasswdFile
from popserv.config import Config
from popserv.delivery import MaildirDeliverer
from popserv.maildir import MaildirStore
from popserv.pop3 import POP3Factory, POP3Server
from popserv.realm import MaildropRealm
from popserv.testing import FakeMaildropStore, run_at_once

settings.register_profile("popserv", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "popserv-ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(
    os.environ.get(
        "HYPOTHESIS_PROFILE", "popserv-ci" if os.environ.get("CI") == "true" else "popserv"
    )
)

#: Examples per property: enough to reach every state, few enough for the suite's time.
POP3_EXAMPLES = 200
SMTP_EXAMPLES = 100

PEERS = (IPv4Address("TCP", "192.0.2.7", 40000), IPv4Address("TCP", "192.0.2.7", 40001))

#: Seconds the clock may jump between two chunks: none, short, past the failure delays,
#: past the login timeout, past the session timeout.
CLOCK_STEPS = st.sampled_from([0, 0, 0, 0, 0.5, 3, 20, 61, 301, 601])
LINE_ENDS = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _split(draw, data: bytes) -> list[bytes]:
    """``data`` cut at random points: what separate ``dataReceived`` calls would get."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return [piece for piece in pieces if piece]


# -- POP3 ------------------------------------------------------------------------------

MESSAGES = [
    b"From: a@example.org\nSubject: one\n\nHello\n.\n..two dots\n",
    b"Subject: two\r\n\r\nline 1\r\n.line 2\r\n",
    b"Subject: three\n\nno final newline",
    b"",
]

POP3_WORDS = [
    b"USER",
    b"PASS",
    b"QUIT",
    b"CAPA",
    b"STLS",
    b"AUTH",
    b"APOP",
    b"UTF8",
    b"LANG",
    b"STAT",
    b"LIST",
    b"RETR",
    b"DELE",
    b"NOOP",
    b"RSET",
    b"TOP",
    b"UIDL",
    b"user",
    b"Retr",
    b"XYZZY",
    b"",
    b"LAST",
]
POP3_ARGS = st.one_of(
    st.integers(-2, 6).map(lambda n: str(n).encode()),
    st.sampled_from(
        [
            b"alice",
            b"bob",
            b"secret",
            b"wrong",
            b"PLAIN",
            b"LOGIN",
            b"CRAM-MD5",
            b"es",
            b"*",
            b"=",
            b"1 0",
            b"1 1 1",
            b"99999999999",
            b"0x1",
            b"+1",
        ]
    ),
    st.binary(max_size=12),
)
POP3_FIXED = st.sampled_from(
    [
        b"USER alice",
        b"PASS secret",
        b"PASS wrong",
        b"USER bob",
        b"PASS hunter2",
        b"CAPA",
        b"STAT",
        b"LIST",
        b"UIDL",
        b"NOOP",
        b"RSET",
        b"QUIT",
        b"UTF8",
        b"LANG",
        b"LANG es",
        b"AUTH",
        b"AUTH PLAIN",
        b"AUTH PLAIN " + _b64(b"\0alice\0secret"),
        b"AUTH PLAIN " + _b64(b"\0alice\0wrong"),
        b"AUTH LOGIN",
        _b64(b"alice"),
        _b64(b"secret"),
        b"AUTH CRAM-MD5",
        b"*",
        b"STLS",
        b"APOP alice 0123456789abcdef0123456789abcdef",
        b"RETR 1",
        b"RETR 2",
        b"TOP 1 0",
        b"TOP 2 1",
        b"DELE 1",
        b"LIST 2",
        b"UIDL 3",
        b"RETR 4",
    ]
)
POP3_LINES = st.one_of(
    POP3_FIXED,
    st.tuples(st.sampled_from(POP3_WORDS), st.lists(POP3_ARGS, max_size=3)).map(
        lambda t: b" ".join([t[0], *t[1]])
    ),
    st.binary(max_size=40),
    st.sampled_from([254, 255, 256, 300, 16385, 16386, 20000]).map(lambda n: b"N" * n),
    st.sampled_from([b"AUTH PLAIN ", b"USER "]).map(lambda p: p + b"A" * 16380),
)
#: A login to prepend, so that most examples reach TRANSACTION and UPDATE.
LOGIN = [b"USER alice", b"PASS secret"]


@st.composite
def pop3_scripts(draw):
    """Events for two sessions: (session, bytes | "drop", seconds to advance after)."""
    events = []
    for session in (0, 1):
        lines = draw(st.lists(POP3_LINES, max_size=25))
        if draw(st.booleans()):
            lines = LOGIN + lines
        data = b"".join(line + draw(LINE_ENDS) for line in lines)
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data)))]  # cut off mid-line
        events += [(session, piece) for piece in _split(draw, data)]
        if draw(st.integers(0, 4)) == 0:
            events.append((session, "drop"))
    order = draw(st.permutations(range(len(events))))
    # Interleave the two sessions but keep each session's own events in order.
    mine = {0: [e for e in events if e[0] == 0], 1: [e for e in events if e[0] == 1]}
    merged = []
    for i in order:
        session = events[i][0]
        if mine[session]:
            merged.append(mine[session].pop(0))
    return [(session, what, draw(CLOCK_STEPS)) for session, what in merged]


class TaggingTransport(StringTransport):
    """A StringTransport that notes, for each write, the command the server was handling.

    Pausing after ``loseConnection`` is allowed, as on a real TCP transport (where it
    only stops reading); ``StringTransport`` alone raises there.
    """

    def __init__(self, peer):
        super().__init__(peerAddress=peer)
        self.current = None
        self.writes: list[tuple[bytes | None, bytes]] = []

    def write(self, data: bytes) -> None:
        super().write(data)
        self.writes.append((self.current, data))

    def pauseProducing(self) -> None:
        if not self.disconnecting:
            super().pauseProducing()


class RecordingPOP3Server(POP3Server):
    """The real session; each command line it handles is noted on the transport first."""

    def line_received(self, line: bytes):
        self.transport.current = line
        return super().line_received(line)


#: Commands whose +OK reply is multi-line (RFC 1939, RFC 2449, RFC 5034, RFC 6856).
_ALWAYS_MULTI = {b"CAPA", b"RETR", b"TOP"}
_MULTI_WITHOUT_ARGUMENT = {b"LIST", b"UIDL", b"LANG", b"AUTH"}


def _multi_line(command: bytes | None) -> bool:
    """Whether a +OK answer to this command line goes on past its first line."""
    if command is None:
        return False
    name, _, rest = command.partition(b" ")
    name = name.upper()
    return name in _ALWAYS_MULTI or (name in _MULTI_WITHOUT_ARGUMENT and not rest.split())


def check_pop3_framing(writes: list[tuple[bytes | None, bytes]]) -> list[bytes]:
    """Parse the server's output into replies; AssertionError where framing breaks.

    Each reply is one status line (``+OK``, ``-ERR``, or a ``+ `` SASL challenge) ending
    in CRLF; a +OK to a multi-line command is followed by dot-stuffed lines and ``.``.
    Returns the status lines.
    """
    lines: list[tuple[bytes | None, bytes]] = []
    partial, partial_tag = b"", None
    for tag, data in writes:
        if not partial:
            partial_tag = tag
        partial += data
        while b"\r\n" in partial:
            line, partial = partial.split(b"\r\n", 1)
            lines.append((partial_tag, line))
            partial_tag = tag
    assert partial == b"", f"output ends inside a line: {partial[:80]!r}"
    status = []
    in_body = False
    for tag, line in lines:
        if in_body:
            if line == b".":
                in_body = False
            else:
                assert line[:1] != b"." or line[:2] == b"..", f"unstuffed dot line {line!r}"
            continue
        assert b"\r" not in line and b"\n" not in line, f"bare CR or LF in reply {line!r}"
        assert re.match(rb"\+OK( |$)|-ERR( |$)|\+ ", line), f"not a reply: {line!r}"
        status.append(line)
        if line.startswith(b"+OK") and _multi_line(tag):
            in_body = True
    assert not in_body, "the connection ended inside a multi-line reply"
    return status


class POP3FuzzTests(unittest.TestCase):
    """Random byte streams against real POP3 sessions over a fake maildrop store."""

    config = Config(
        hostname="pop.example.org",
        auth_trusted_networks=("192.0.2.0/24",),
        auth_mechanisms=("PLAIN", "LOGIN", "CRAM-MD5"),
        auth_apop=True,
        pop3_failure_delay=1.0,
        pop3_failure_delay_max=4.0,
        pop3_max_failures=4,
        pop3_max_bad_commands=6,
    )

    def run_script(self, script):
        clock = task.Clock()
        store = FakeMaildropStore({"alice": list(MESSAGES), "bob": []})
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret", bob=b"hunter2")
        factory = POP3Factory(Portal(MaildropRealm(store), [checker]), self.config, clock=clock)
        factory.protocol = RecordingPOP3Server
        sessions = []
        for peer in PEERS:
            proto = factory.buildProtocol(peer)
            transport = TaggingTransport(peer)
            proto.makeConnection(transport)
            sessions.append([proto, transport, False])

        def lose(session):
            proto, transport, lost = session
            if not lost:
                session[2] = True
                proto.connectionLost(Failure(ConnectionDone()))

        for index, what, seconds in script:
            session = sessions[index]
            proto, transport, lost = session
            if transport.disconnecting:
                lose(session)  # the reactor would soon call connectionLost
            elif not lost:
                if what == "drop":
                    lose(session)
                elif transport.producerState != "paused":
                    proto.dataReceived(what)
            clock.advance(seconds)
        for session in sessions:
            lose(session)
        written = [len(transport.value()) for _, transport, _ in sessions]
        clock.advance(1000)
        return store, sessions, written

    @settings(max_examples=POP3_EXAMPLES)
    @given(pop3_scripts())
    def test_random_input(self, script):
        """No exception escapes, every reply is framed, and no maildrop stays locked."""
        store, sessions, written = self.run_script(script)
        self.assertEqual(self.flushLoggedErrors(), [])
        for (_, transport, _), before in zip(sessions, written, strict=True):
            status = check_pop3_framing(transport.writes)
            self.assertTrue(status[0].startswith(b"+OK"), status[0])
            self.assertEqual(len(transport.value()), before, "written after connectionLost")
        self.assertFalse(store.is_locked("alice"))
        self.assertFalse(store.is_locked("bob"))
        self.assertTrue(all(maildrop.closed for maildrop in store.opened))
        self.assertEqual(store.mailboxes["bob"], [])

    def test_framing_checker_catches_a_broken_reply(self):
        """The framing checker itself rejects an unterminated or unstuffed multi-line reply."""
        with self.assertRaises(AssertionError):
            check_pop3_framing([(b"RETR 1", b"+OK 5 octets\r\nhello\r\n")])
        with self.assertRaises(AssertionError):
            check_pop3_framing([(b"CAPA", b"+OK\r\n.TOP\r\n.\r\n")])
        with self.assertRaises(AssertionError):
            check_pop3_framing([(b"NOOP", b"OK\r\n")])
        self.assertEqual(
            check_pop3_framing([(None, b"+OK hi\r\n"), (b"LIST", b"+OK\r\n1 5\r\n.\r\n")]),
            [b"+OK hi", b"+OK"],
        )


# -- SMTP ------------------------------------------------------------------------------


SMTP_FIXED = st.sampled_from(
    [
        b"EHLO client.example",
        b"HELO client.example",
        b"EHLO",
        b"MAIL FROM:<s@remote.example>",
        b"MAIL FROM:<>",
        b"MAIL FROM:<s@remote.example> SIZE=100",
        b"MAIL FROM:<x> SIZE=99999999999",
        b"MAIL FROM:<s@remote.example> BODY=8BITMIME",
        b"MAIL FROM:<s@r.example> AUTH=<>",
        b"RCPT TO:<alice@localhost>",
        b"RCPT TO:<bob@mx.example.org>",
        b"RCPT TO:<Alice@LOCALHOST>",
        b"RCPT TO:<nobody@localhost>",
        b"RCPT TO:<x@elsewhere.example>",
        b"RCPT TO:<@a,@b:c@d>",
        b"RCPT TO:<alice@localhost> NOTIFY=NEVER",
        b"DATA",
        b"RSET",
        b"NOOP",
        b"HELP",
        b"VRFY alice",
        b"EXPN list",
        b"QUIT",
        b"STARTTLS",
        b"AUTH PLAIN",
        b"BDAT 10",
        b".",
        b"..",
        b"Subject: x",
        b"",
        b"\x00",
        b"mail from:<s@remote.example>",
    ]
)
SMTP_LINES = st.one_of(
    SMTP_FIXED,
    st.binary(max_size=40),
    st.text(max_size=30).map(lambda t: t.encode("utf-8")),
    st.sampled_from([997, 998, 999, 1000, 5000]).map(lambda n: b"D" * n),
)
ENVELOPE = [
    b"EHLO client.example",
    b"MAIL FROM:<s@remote.example>",
    b"RCPT TO:<alice@localhost>",
    b"RCPT TO:<bob@localhost>",
    b"DATA",
]


@st.composite
def smtp_scripts(draw):
    """(bytes | "drop", seconds to advance after) events for one SMTP session."""
    lines = draw(st.lists(SMTP_LINES, max_size=25))
    if draw(st.booleans()):
        lines = ENVELOPE[: draw(st.integers(3, 5))] + lines
        if draw(st.booleans()):
            lines.append(b".")
    data = b"".join(line + draw(LINE_ENDS) for line in lines)
    events = _split(draw, data)
    if draw(st.integers(0, 4)) == 0:
        events.insert(draw(st.integers(0, len(events))), "drop")
    return [(what, draw(CLOCK_STEPS)) for what in events]


_SMTP_REPLY = re.compile(rb"([2-5]\d\d)([ -])[^\r\n]*")


def check_smtp_replies(output: bytes) -> list[bytes]:
    """Split SMTP output into replies; AssertionError unless every line is ``ddd[ -]text``
    with CRLF and each multi-line reply keeps one code and ends in a ``ddd `` line."""
    assert output.endswith(b"\r\n") or not output, f"output ends inside a line: {output[-80:]!r}"
    replies = []
    code = None
    for line in output.split(b"\r\n")[:-1]:
        m = _SMTP_REPLY.fullmatch(line)
        assert m, f"not an SMTP reply line: {line!r}"
        assert code is None or m.group(1) == code, f"code changes inside a reply: {line!r}"
        code = m.group(1) if m.group(2) == b"-" else None
        if code is None:
            replies.append(line)
    assert code is None, "the output ends inside a multi-line reply"
    return replies


class SMTPFuzzTests(unittest.TestCase):
    """Random SMTP sessions against the real receiver delivering into real Maildirs."""

    def setUp(self):
        self.users = os.path.abspath(self.mktemp())
        with open(self.users, "w") as f:
            f.write("alice:{PLAIN}x\nbob:{PLAIN}x\n")
        self.userdb = PasswdFile(self.users)

    def maildir_names(self, mailroot: str, sub: str) -> list[str]:
        found = []
        for user in os.listdir(mailroot):
            path = os.path.join(mailroot, user, sub)
            if os.path.isdir(path):
                found += os.listdir(path)
        return found

    @settings(max_examples=SMTP_EXAMPLES)
    @given(smtp_scripts())
    def test_random_input(self, script):
        """No crash, well-formed replies, one file in new/ per 250 after DATA, none in tmp/."""
        mailroot = os.path.abspath(self.mktemp())
        os.makedirs(mailroot)
        config = Config(
            hostname="mx.example.org",
            mailroot=mailroot,
            users=self.users,
            smtp_max_message_size=4000,
            smtp_max_recipients=3,
        )
        clock = task.Clock()
        deliverer = MaildirDeliverer(MaildirStore(mailroot), config.hostname, run_at_once)
        factory = smtp.SMTPFactory(deliverer, self.userdb, config, clock=clock)
        proto = factory.buildProtocol(PEERS[0])
        transport = StringTransport(peerAddress=PEERS[0])
        proto.makeConnection(transport)
        for what, seconds in script:
            if transport.disconnecting:
                break
            if what == "drop":
                break
            proto.dataReceived(what)
            clock.advance(0)
            clock.advance(seconds)
        proto.connectionLost(Failure(ConnectionDone()))
        written = len(transport.value())
        clock.advance(1000)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(len(transport.value()), written, "written after connectionLost")
        replies = check_smtp_replies(transport.value())
        self.assertTrue(replies[0].startswith(b"220 "), replies[0])
        queued = [r for r in replies if r.startswith(b"250 2.0.0 Ok: queued as ")]
        delivered = set(self.maildir_names(mailroot, "new"))
        self.assertEqual(len(delivered), len(queued), (delivered, queued))
        self.assertEqual(self.maildir_names(mailroot, "tmp"), [])
        self.assertEqual(self.maildir_names(mailroot, "cur"), [])

    def test_reply_checker_catches_broken_replies(self):
        """The SMTP reply checker itself rejects unterminated, mixed-code or code-less lines."""
        for bad in (b"250-a\r\n", b"250-a\r\n251 b\r\n", b"hello\r\n", b"250 ok"):
            with self.assertRaises(AssertionError):
                check_smtp_replies(bad)
        self.assertEqual(check_smtp_replies(b"220 hi\r\n250-a\r\n250 b\r\n"), [b"220 hi", b"250 b"])
