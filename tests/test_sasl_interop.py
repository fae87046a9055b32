"""Real clients logging in with SASL (RFC 5034) and APOP (RFC 1939) to a live popserv.

curl, Perl's Net::POP3 and Mail::POP3Client, fetchmail and mpop on 127.0.0.1, each user
stored in a scheme that can verify the mechanism; then malformed exchanges on a raw socket.
"""

from __future__ import annotations

import base64
import os
import socket

import argon2
from twisted.internet import defer, threads
from twisted.trial import unittest

from popserv import auth
from tests import live
from tests.live import received_form, wire
from tests.test_interop import lf_form, read_dir, without_first_header

MESSAGE = (
    b"From: Bob <bob@example.org>\n"
    b"To: you@example.org\n"
    b"Subject: signed in with SASL\n"
    b"\n"
    b"Hello,\n"
    b".a dot-led line\n"
    b"bye\n"
)

#: user -> (password, scheme of the users-file entry).
USERS = {
    "alice": ("open sesame", "PLAIN"),
    "carol": ("cram me", "CRAM-MD5"),
    "sam": ("salted s3cret", "SCRAM-SHA-256"),
    "argo": ("hashed pw", "ARGON2ID"),
}

#: A cheap Argon2id, so the ARGON2ID entry costs milliseconds; its hash says so when verified.
CHEAP_ARGON2 = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def plain_response(user: str, password: str) -> bytes:
    """RFC 4616's message, base64: no authzid, authcid, password."""
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())


class SASLTestCase(unittest.TestCase):
    """A live server with MESSAGE for every user of USERS; subclasses pick what it offers."""

    timeout = 30
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256")
    apop = False

    @defer.inlineCallbacks
    def setUp(self):
        self.patch(auth, "HASHER", CHEAP_ARGON2)
        self.server = yield live.start_server(
            self,
            {user: password for user, (password, _) in USERS.items()},
            schemes={user: scheme for user, (_, scheme) in USERS.items()},
            auth_mechanisms=self.mechanisms,
            auth_apop=self.apop,
        )
        for user in USERS:
            self.server.deliver(user, MESSAGE)
        self.work = os.path.abspath(self.mktemp())
        self.home = os.path.join(self.work, "home")
        os.makedirs(self.home)

    def env(self) -> dict[str, str]:
        """A clean environment: no proxy settings, a private HOME."""
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.home, "LANG": "C"}

    def sent(self) -> list[bytes]:
        """The command lines of every connection so far, each connection's joined."""
        return self.server.client_bytes

    def assert_logged_in_with(self, command: bytes, data: bytes) -> None:
        """The client authenticated with ``command`` (e.g. b"AUTH PLAIN") and never USER/PASS."""
        lines = [line.split(b" ")[:2] for line in data.split(b"\r\n")]
        self.assertIn(command.split(b" "), [line[: len(command.split(b" "))] for line in lines])
        self.assertNotIn(b"\r\nUSER ", b"\r\n" + data)
        self.assertNotIn(b"\r\nPASS ", b"\r\n" + data)


class CurlSASLTests(SASLTestCase):
    """curl's pop3:// with ``--login-options AUTH=<mechanism>``, and APOP."""

    def curl(self, user: str, path: str = "", *options: str):
        curl = live.require_client("curl")
        password = USERS[user][0]
        url = f"pop3://127.0.0.1:{self.server.port}/{path}"
        argv = [
            curl, "-s", "-S", "-v", "--noproxy", "*", "--max-time", "15",
            "-u", f"{user}:{password}", *options, url,
        ]  # fmt: skip
        return live.run_program(argv, env=self.env(), timeout=20)

    @defer.inlineCallbacks
    def list_and_retrieve(self, user: str, mechanism: str):
        """Run curl twice (list, then RETR 1) with one mechanism; check both and the wire."""
        login = f"AUTH={mechanism}"
        ran = yield self.curl(user, "", "--login-options", login)
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(ran.out, b"1 %d\r\n" % len(wire(MESSAGE)))
        ran = yield self.curl(user, "1", "--login-options", login)
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(ran.out, received_form(MESSAGE))
        for data in self.sent():
            self.assert_logged_in_with(b"AUTH " + mechanism.encode(), data)

    def test_plain(self):
        """AUTH=PLAIN lists and retrieves, logging in with AUTH PLAIN."""
        return self.list_and_retrieve("alice", "PLAIN")

    def test_login(self):
        """AUTH=LOGIN lists and retrieves, logging in with AUTH LOGIN."""
        return self.list_and_retrieve("alice", "LOGIN")

    def test_cram_md5_plain_entry(self):
        """AUTH=CRAM-MD5 logs in a user whose entry is {PLAIN}."""
        return self.list_and_retrieve("alice", "CRAM-MD5")

    def test_cram_md5_entry(self):
        """AUTH=CRAM-MD5 logs in a user whose entry is a {CRAM-MD5} HMAC context."""
        return self.list_and_retrieve("carol", "CRAM-MD5")

    @defer.inlineCallbacks
    def test_cram_md5_hashed_refused(self):
        """CRAM-MD5 for a user stored {ARGON2ID} fails with -ERR [AUTH]; PLAIN then works."""
        ran = yield self.curl("argo", "", "--login-options", "AUTH=CRAM-MD5")
        self.assertEqual(ran.code, 67, ran.err)  # CURLE_LOGIN_DENIED
        self.assertIn(b"< -ERR [AUTH] Authentication failed.", ran.err)
        self.assert_logged_in_with(b"AUTH CRAM-MD5", self.sent()[0])

        ran = yield self.curl("argo", "1", "--login-options", "AUTH=PLAIN")
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(ran.out, received_form(MESSAGE))
        self.assert_logged_in_with(b"AUTH PLAIN", self.sent()[1])


class CurlAPOPTests(SASLTestCase):
    """curl against a greeting with a timestamp and no SASL capability."""

    mechanisms = ()
    apop = True

    @defer.inlineCallbacks
    def test_apop(self):
        """curl logs in with APOP, unasked, and retrieves the message."""
        curl = live.require_client("curl")
        url = f"pop3://alice:open%20sesame@127.0.0.1:{self.server.port}/1"
        argv = [curl, "-s", "-S", "--noproxy", "*", "--max-time", "15", url]
        ran = yield live.run_program(argv, env=self.env(), timeout=20)
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(ran.out, received_form(MESSAGE))
        self.assert_logged_in_with(b"APOP alice", self.sent()[0])


#: Net::POP3 session: log in as the method says, print which, then message 1.
NET_POP3 = r"""
use strict;
use Net::POP3;
my ($port, $method, $user, $password) = @ARGV;
my $pop = Net::POP3->new("127.0.0.1", Port => $port, Timeout => 15)
    or die "connect: $@\n";
if ($method eq "apop") {
    defined $pop->apop($user, $password) or die "apop: " . $pop->message;
} else {
    $pop->auth($user, $password) or die "auth: " . $pop->message;
}
my $lines = $pop->get(1) or die "get: " . $pop->message;
print @$lines;
$pop->quit;
"""

#: Mail::POP3Client session: the constructor logs in (AUTH_MODE from argv); print message 1.
MAIL_POP3CLIENT = r"""
use strict;
use Mail::POP3Client;
my ($port, $mode, $user, $password) = @ARGV;
my $pop = Mail::POP3Client->new(
    USER => $user, PASSWORD => $password, HOST => "127.0.0.1", PORT => $port,
    AUTH_MODE => $mode, TIMEOUT => 15,
);
$pop->Count() >= 0 or die "login: " . $pop->Message() . "\n";
my $text = $pop->HeadAndBody(1);
defined $text or die "retr: " . $pop->Message() . "\n";
print $text;
$pop->Close();
"""


class PerlTests(SASLTestCase):
    """Perl's Net::POP3 (with Authen::SASL) and Mail::POP3Client, APOP enabled."""

    apop = True

    def perl(self, script: str, *args: str):
        perl = live.require_client("perl")
        argv = [perl, "-e", script, str(self.server.port), *args]
        return live.run_program(argv, env=self.env(), timeout=20)

    @defer.inlineCallbacks
    def test_net_pop3_apop(self):
        """Net::POP3's apop() logs in with APOP and gets the message."""
        ran = yield self.perl(NET_POP3, "apop", "alice", USERS["alice"][0])
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(ran.out, lf_form(MESSAGE))
        self.assert_logged_in_with(b"APOP alice", self.sent()[0])

    @defer.inlineCallbacks
    def test_net_pop3_auth_picks_cram_md5(self):
        """Net::POP3's auth() asks CAPA and, of the SASL list, picks CRAM-MD5 over PLAIN/LOGIN."""
        ran = yield self.perl(NET_POP3, "auth", "carol", USERS["carol"][0])
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(ran.out, lf_form(MESSAGE))
        data = self.sent()[0]
        self.assertTrue(data.startswith(b"CAPA\r\n"), data)
        self.assert_logged_in_with(b"AUTH CRAM-MD5", data)

    @defer.inlineCallbacks
    def test_mail_pop3client_apop(self):
        """Mail::POP3Client with AUTH_MODE APOP logs in with APOP and gets the message."""
        ran = yield self.perl(MAIL_POP3CLIENT, "APOP", "alice", USERS["alice"][0])
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(ran.out, received_form(MESSAGE))
        self.assert_logged_in_with(b"APOP alice", self.sent()[0])

    @defer.inlineCallbacks
    def test_mail_pop3client_best(self):
        """Mail::POP3Client with AUTH_MODE BEST chooses APOP when the greeting has a timestamp."""
        ran = yield self.perl(MAIL_POP3CLIENT, "BEST", "alice", USERS["alice"][0])
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(ran.out, received_form(MESSAGE))
        self.assert_logged_in_with(b"APOP alice", self.sent()[0])


class FetchmailCramMD5Tests(SASLTestCase):
    """fetchmail --auth cram-md5 on the plain port."""

    @defer.inlineCallbacks
    def test_cram_md5(self):
        """fetchmail logs in with AUTH CRAM-MD5 for a {CRAM-MD5} user and fetches the message."""
        fetchmail = live.require_client("fetchmail")
        out = os.path.join(self.work, "out")
        os.makedirs(out)
        rc = os.path.join(self.work, "fetchmailrc")
        # fetchmail 6.4 tries STLS even when CAPA lacks it, unless sslproto is empty.
        with open(rc, "w") as f:
            f.write(
                f"poll 127.0.0.1 protocol pop3 port {self.server.port}\n"
                f'  user "carol" password "{USERS["carol"][0]}" sslproto \'\'\n'
            )
        os.chmod(rc, 0o600)
        mda = os.path.join(self.work, "mda")
        with open(mda, "w") as f:
            f.write(f'#!/bin/sh\nexec cat > "$(mktemp {out}/msg.XXXXXX)"\n')
        os.chmod(mda, 0o755)
        argv = [
            fetchmail, "-N", "--pidfile", os.path.join(self.work, "fetchmail.pid"),
            "-f", rc, "--idfile", os.path.join(self.work, "ids"),
            "--mda", mda, "--norewrite", "--auth", "cram-md5", "--keep",
        ]  # fmt: skip
        ran = yield live.run_program(argv, env=self.env(), timeout=20)
        self.assertEqual(ran.code, 0, ran.err)
        fetched = [without_first_header(m, b"Received") for m in read_dir(out)]
        self.assertEqual(fetched, [lf_form(MESSAGE)])
        self.assert_logged_in_with(b"AUTH CRAM-MD5", self.sent()[0])


class MpopScramTests(SASLTestCase):
    """mpop --auth=scram-sha-256 (mpop built with GNU SASL, which has SCRAM-SHA-256)."""

    @defer.inlineCallbacks
    def mpop_scram(self, user: str):
        mpop = live.require_client("mpop")
        maildir = os.path.join(self.work, "Maildir")
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(maildir, sub))
        rc = os.path.join(self.work, "mpoprc")
        with open(rc, "w") as f:
            f.write(
                f"account default\nhost 127.0.0.1\nport {self.server.port}\n"
                f'user {user}\npassword "{USERS[user][0]}"\ntls off\n'
            )
        os.chmod(rc, 0o600)
        argv = [
            mpop, "-C", rc, "--auth=scram-sha-256", f"--delivery=maildir,{maildir}",
            f"--uidls-file={self.work}/uidls", "--keep=on",
        ]  # fmt: skip
        ran = yield live.run_program(argv, env=self.env(), timeout=20)
        self.assertEqual(ran.code, 0, ran.err)
        fetched = [without_first_header(m, b"Received") for m in read_dir(f"{maildir}/new")]
        self.assertEqual(fetched, [lf_form(MESSAGE)])
        self.assert_logged_in_with(b"AUTH SCRAM-SHA-256", self.sent()[0])

    def test_scram_entry(self):
        """SCRAM-SHA-256 logs in a user stored with {SCRAM-SHA-256} keys."""
        return self.mpop_scram("sam")

    def test_plain_entry(self):
        """SCRAM-SHA-256 logs in a user stored {PLAIN}, with keys derived from the password."""
        return self.mpop_scram("alice")


class Conversation:
    """A blocking POP3 connection on one socket, a reply line per command (run in a thread)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.reader = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self) -> bytes:
        """The next reply line; b"" once the server has closed the connection."""
        return self.reader.readline().removesuffix(b"\r\n")

    def send(self, line: bytes) -> bytes:
        try:
            self.sock.sendall(line + b"\r\n")
        except OSError:
            return b""  # closed by the server: the assertions show where
        return self.reply()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class MalformedExchangeTests(SASLTestCase):
    """Broken SASL exchanges on a raw socket: each ends in -ERR and the session goes on."""

    def converse(self, steps: list[bytes]) -> defer.Deferred:
        """Send ``steps``, then log in with PLAIN and QUIT; fires with every reply."""

        def session():
            conversation = Conversation(self.server.port)
            try:
                replies = [conversation.send(step) for step in steps]
                replies.append(
                    conversation.send(b"AUTH PLAIN " + plain_response("alice", "open sesame"))
                )
                replies.append(conversation.send(b"QUIT"))
                return replies
            finally:
                conversation.close()

        return threads.deferToThread(session)

    def assert_recovers(self, replies: list[bytes]) -> None:
        self.assertEqual(
            replies[-2], b"+OK Logged in, 1 messages (%d octets)." % len(wire(MESSAGE))
        )
        self.assertEqual(replies[-1], b"+OK Logging out, 0 messages deleted.")

    @defer.inlineCallbacks
    def test_bad_base64(self):
        """A response that is not base64 gets -ERR Invalid base64 data."""
        replies = yield self.converse([b"AUTH PLAIN", b"not base64!"])
        self.assertEqual(replies[:2], [b"+ ", b"-ERR Invalid base64 data."])
        self.assert_recovers(replies)

    @defer.inlineCallbacks
    def test_cancel(self):
        """A "*" response cancels the exchange with -ERR."""
        replies = yield self.converse([b"AUTH LOGIN", b"*"])
        self.assertEqual(
            replies[:2],
            [b"+ " + base64.b64encode(b"Username:"), b"-ERR Authentication cancelled."],
        )
        self.assert_recovers(replies)

    @defer.inlineCallbacks
    def test_overlong_response(self):
        """A 20 KiB response, over RFC 5034's limit, ends the exchange with -ERR."""
        replies = yield self.converse([b"AUTH PLAIN", b"QUFB" * (20 * 1024 // 4)])
        self.assertEqual(replies[:2], [b"+ ", b"-ERR Invalid authentication exchange."])
        self.assert_recovers(replies)

    @defer.inlineCallbacks
    def test_initial_response_to_cram_md5(self):
        """An initial response to CRAM-MD5, which has none, gets -ERR."""
        replies = yield self.converse([b"AUTH CRAM-MD5 " + base64.b64encode(b"alice 00")])
        self.assertEqual(replies[0], b"-ERR Invalid authentication exchange.")
        self.assert_recovers(replies)

    @defer.inlineCallbacks
    def test_plain_without_password(self):
        """A PLAIN initial response with one NUL (no password field) gets -ERR."""
        replies = yield self.converse([b"AUTH PLAIN " + base64.b64encode(b"\0alice")])
        self.assertEqual(replies[0], b"-ERR Invalid authentication exchange.")
        self.assert_recovers(replies)

    @defer.inlineCallbacks
    def test_scram_final_first(self):
        """A SCRAM client-final message sent where the client-first belongs gets -ERR."""
        final = base64.b64encode(b"c=biws,r=abcdefghijkl,p=" + base64.b64encode(b"x" * 32))
        replies = yield self.converse([b"AUTH SCRAM-SHA-256", final])
        self.assertEqual(replies[:2], [b"+ ", b"-ERR Invalid authentication exchange."])
        self.assert_recovers(replies)

    @defer.inlineCallbacks
    def test_plain_response_without_password(self):
        """A PLAIN message with one NUL, sent after the empty challenge, gets -ERR."""
        replies = yield self.converse([b"AUTH PLAIN", base64.b64encode(b"\0alice")])
        self.assertEqual(replies[:2], [b"+ ", b"-ERR Invalid authentication exchange."])
        self.assert_recovers(replies)

    @defer.inlineCallbacks
    def test_cram_md5_answer_without_digest(self):
        """A CRAM-MD5 answer that is not "user hexdigest" gets -ERR."""
        replies = yield self.converse([b"AUTH CRAM-MD5", base64.b64encode(b"alice")])
        self.assertTrue(replies[0].startswith(b"+ "), replies[0])
        self.assertEqual(replies[1], b"-ERR Invalid authentication exchange.")
        self.assert_recovers(replies)
