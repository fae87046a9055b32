"""Tests for popserv.smtp: the ESMTP receiver over a StringTransport, with a Clock."""

import errno
import os
import re

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.mail import smtp as twisted_smtp
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from popserv import smtp, smtpreplies
from popserv.auth import PasswdFile
from popserv.config import Config
from popserv.delivery import MaildirDeliverer
from popserv.interfaces import IRecipientPolicy, Session
from popserv.lineflow import ConnectionFlow, ILineReceiver
from popserv.maildir import MaildirStore
from popserv.testing import run_at_once

HOST = "mx.example.org"
PEER = IPv4Address("TCP", "192.0.2.7", 40000)


@implementer(ITLSTransport)
class FakeTLSTransport(StringTransport):
    """A transport that can start TLS, and records the context it was given."""

    tls_context = None

    def startTLS(self, context, normal=True):
        self.tls_context = context


class SMTPTestCase(unittest.TestCase):
    config_changes: dict = {}

    def setUp(self):
        root = os.path.abspath(self.mktemp())
        self.mailroot = os.path.join(root, "mail")
        os.makedirs(self.mailroot)
        users = os.path.join(root, "users")
        with open(users, "w") as f:
            f.write("alice:{PLAIN}x\nbob:{PLAIN}x\ncarol@example.org:{PLAIN}x\n")
        self.config = Config(
            hostname=HOST, mailroot=self.mailroot, users=users, **self.config_changes
        )
        self.clock = Clock()
        self.store = MaildirStore(self.mailroot)
        self.deliverer = MaildirDeliverer(self.store, HOST, run_at_once)
        self.factory = smtp.SMTPFactory(
            self.deliverer, PasswdFile(users), self.config, clock=self.clock
        )
        self.proto, self.transport = self.connect()

    def connect(self, peer=PEER, transport_class=StringTransport):
        proto = self.factory.buildProtocol(peer)
        transport = transport_class(peerAddress=peer)
        proto.makeConnection(transport)
        return proto, transport

    def send(self, data: bytes, proto=None) -> None:
        (proto or self.proto).dataReceived(data)
        self.clock.advance(0)

    def replies(self, transport=None) -> list[bytes]:
        """The reply lines sent since the last call."""
        transport = transport or self.transport
        lines = transport.value().split(b"\r\n")
        transport.clear()
        self.assertEqual(lines[-1], b"")
        return lines[:-1]

    def assert_replies(self, sent: bytes, expected: list[bytes]) -> None:
        self.send(sent)
        self.assertEqual(self.replies(), expected)

    def ehlo(self):
        self.replies()
        self.send(b"EHLO client.example\r\n")
        self.replies()

    def envelope(self, *recipients, sender=b"<sender@remote.example>"):
        self.ehlo()
        self.send(b"MAIL FROM:" + sender + b"\r\n")
        for rcpt in recipients:
            self.send(b"RCPT TO:<" + rcpt + b">\r\n")
        self.send(b"DATA\r\n")
        return self.replies()

    def new(self, user) -> list[bytes]:
        """The messages in the user's new/."""
        path = os.path.join(self.store.path_for(user), "new")
        if not os.path.isdir(path):
            return []
        found = []
        for name in sorted(os.listdir(path)):
            with open(os.path.join(path, name), "rb") as f:
                found.append(f.read())
        return found

    def tmp(self, user) -> list[str]:
        path = os.path.join(self.store.path_for(user), "tmp")
        return os.listdir(path) if os.path.isdir(path) else []


class GreetingAndEhloTests(SMTPTestCase):
    def test_line_receiver(self):
        """The receiver takes its lines from a lineflow.ConnectionFlow."""
        verifyObject(ILineReceiver, self.proto)
        self.assertIsInstance(self.proto.flow, ConnectionFlow)

    def test_greeting(self):
        """The greeting is 220 with the host name, without an enhanced code."""
        self.assertEqual(self.replies(), [b"220 mx.example.org ESMTP popserv"])

    def test_ehlo_keywords(self):
        """EHLO advertises SIZE with the limit, 8BITMIME, PIPELINING and ENHANCEDSTATUSCODES."""
        self.replies()
        self.send(b"EHLO client.example\r\n")
        lines = self.replies()
        self.assertEqual(lines[0], b"250-mx.example.org Hello [192.0.2.7]")
        keywords = [line[4:] for line in lines[1:]]
        self.assertEqual(
            sorted(keywords), [b"8BITMIME", b"ENHANCEDSTATUSCODES", b"PIPELINING", b"SIZE 26214400"]
        )
        self.assertTrue(lines[-1].startswith(b"250 "))

    def test_no_auth_no_starttls_on_plain_transport(self):
        """Without TLS support, neither STARTTLS nor AUTH is offered, and AUTH is refused."""
        self.ehlo()
        self.assert_replies(b"AUTH PLAIN\r\n", [b"502 5.5.1 Command not implemented"])
        self.assert_replies(b"AUTH\r\n", [b"502 5.5.1 Command not implemented"])

    def test_ehlo_needs_domain(self):
        """EHLO without an argument is a syntax error."""
        self.replies()
        self.assert_replies(b"EHLO\r\n", [b"501 " + smtpreplies.HELO_NEEDS_DOMAIN[1]])

    def test_mail_needs_ehlo(self):
        """MAIL before HELO or EHLO is refused with 503 5.5.1."""
        self.replies()
        self.assert_replies(b"MAIL FROM:<a@b.example>\r\n", [b"503 5.5.1 Send EHLO or HELO first"])

    def test_other_commands(self):
        """NOOP, RSET and QUIT answer with enhanced codes; VRFY, EXPN and junk are refused."""
        self.ehlo()
        self.assert_replies(b"NOOP\r\n", [b"250 2.0.0 Ok"])
        self.assert_replies(b"RSET\r\n", [b"250 2.0.0 Ok"])
        self.assert_replies(b"VRFY alice\r\n", [b"502 5.5.1 Command not implemented"])
        self.assert_replies(b"EXPN staff\r\n", [b"502 5.5.1 Command not implemented"])
        self.assert_replies(b"\xffBAD\r\n", [b"500 5.5.1 Command unrecognized"])
        self.assert_replies(b"\r\n", [b"500 5.5.2 Empty command"])
        self.assert_replies(b"QUIT\r\n", [b"221 2.0.0 Bye"])
        self.assertTrue(self.transport.disconnecting)

    def test_bare_lf_in_command(self):
        """A command holding a bare LF is refused as a whole, not split into two commands."""
        self.ehlo()
        self.assert_replies(
            b"NOOP\nMAIL FROM:<a@b.example>\r\n", [b"500 5.5.2 Bare CR, LF or NUL in command"]
        )

    def test_starttls_drops_pipelined_input(self):
        """After STARTTLS, commands sent behind it in clear are dropped and EHLO is needed again."""
        self.factory.context_factory = object()
        proto, transport = self.connect(transport_class=FakeTLSTransport)
        self.send(b"EHLO client.example\r\n", proto)
        self.assertIn(b"250-STARTTLS", self.replies(transport))
        self.send(b"STARTTLS\r\nMAIL FROM:<a@b.example>\r\n", proto)
        self.assertEqual(self.replies(transport), [b"220 Begin TLS negotiation now"])
        self.assertIs(transport.tls_context, self.factory.context_factory)
        self.send(b"MAIL FROM:<a@b.example>\r\n", proto)
        self.assertEqual(self.replies(transport), [b"503 5.5.1 Send EHLO or HELO first"])
        self.send(b"EHLO client.example\r\n", proto)
        self.assertNotIn(b"250-STARTTLS", self.replies(transport))

    def test_starttls_refusals(self):
        """STARTTLS without TLS support gets 454 4.7.0; once TLS is on, 503 5.5.1."""
        self.ehlo()
        self.assert_replies(b"STARTTLS\r\n", [b"454 4.7.0 TLS not available"])
        self.factory.context_factory = object()
        proto, transport = self.connect(transport_class=FakeTLSTransport)
        self.send(b"STARTTLS\r\n", proto)
        self.send(b"STARTTLS\r\n", proto)
        self.assertEqual(
            self.replies(transport),
            [
                b"220 mx.example.org ESMTP popserv",
                b"220 Begin TLS negotiation now",
                b"503 5.5.1 TLS already negotiated",
            ],
        )

    def test_starttls_starts_a_new_session(self):
        """After STARTTLS the session knows only the peer and TLS; Received says ESMTPS."""
        self.factory.context_factory = object()
        proto, transport = self.connect(transport_class=FakeTLSTransport)
        self.send(b"EHLO before.example\r\nSTARTTLS\r\n", proto)
        self.assertEqual(proto.session, Session(peer=PEER.host, tls=True))
        self.send(b"EHLO after.example\r\nMAIL FROM:<a@b.example>\r\n", proto)
        self.send(b"RCPT TO:<alice@localhost>\r\nDATA\r\nSubject: x\r\n\r\nx\r\n.\r\n", proto)
        [stored] = self.new("alice")
        self.assertIn(b"Received: from after.example (", stored)
        self.assertIn(b" with ESMTPS id ", stored)


class RecipientRuleTests(SMTPTestCase):
    config_changes = {"smtp_domains": (HOST, "localhost", "example.org")}

    def rcpt(self, address: bytes) -> bytes:
        self.send(b"RCPT TO:<" + address + b">\r\n")
        return self.replies()[0]

    def setUp(self):
        super().setUp()
        self.ehlo()
        self.send(b"MAIL FROM:<sender@remote.example>\r\n")
        self.assertEqual(self.replies(), [b"250 2.1.0 Sender OK"])

    def test_local_user(self):
        """RCPT to an existing user at a local domain is accepted with 250 2.1.5."""
        self.assertEqual(self.rcpt(b"alice@mx.example.org"), b"250 2.1.5 Recipient OK")
        self.assertEqual(self.rcpt(b"bob@LOCALHOST"), b"250 2.1.5 Recipient OK")

    def test_unknown_local_user(self):
        """RCPT to an unknown user at a local domain gets 550 5.1.1."""
        self.assertEqual(self.rcpt(b"mallory@mx.example.org"), b"550 5.1.1 No such user here")

    def test_foreign_domain_denied(self):
        """RCPT to any other domain gets 550 5.7.1 relaying denied, even for a known user name."""
        self.assertEqual(self.rcpt(b"alice@elsewhere.example"), b"550 5.7.1 Relaying denied")

    def test_relay_tricks_denied(self):
        """Source routes, %-hacks, bang paths, quoted @ and address literals never relay."""
        for address, code in [
            (b"@mx.example.org:victim@elsewhere.example", b"550 5.7.1"),
            (b"victim%elsewhere.example@mx.example.org", b"550 5.1.1"),
            (b"elsewhere.example!victim@mx.example.org", b"550 5.1.1"),
            (b'"victim@elsewhere.example"@mx.example.org', b"550 5.1.1"),
            (b"alice@[192.0.2.1]", b"501 5.5.4"),
            (b"alice@mx.example.org.elsewhere.example", b"550 5.7.1"),
        ]:
            self.assertTrue(self.rcpt(address).startswith(code), address)
        self.send(b"DATA\r\n")
        self.assertEqual(self.replies(), [b"503 5.5.1 Need RCPT before DATA"])

    def test_needless_quotes_are_the_same_address(self):
        """A quoted local part that needs no quoting is the same mailbox (RFC 5321 4.1.2)."""
        for address in (b'"bob"@localhost', b'"b\\ob"@mx.example.org', b'"Alice"@example.org'):
            self.assertEqual(self.rcpt(address), b"250 2.1.5 Recipient OK", address)
        self.assertEqual(self.rcpt(b'"postmaster"@localhost'), b"250 2.1.5 Recipient OK")
        resolve = self.proto.policy.resolve
        self.assertEqual(resolve(twisted_smtp.Address(b'"bob"@localhost')), "bob")
        # Quotes that are needed keep the local part as it is: no such user.
        for address in (b'"bob smith"@localhost', b'"bob@x"@localhost', b'"bob."@localhost'):
            self.assertEqual(self.rcpt(address), b"550 5.1.1 No such user here", address)

    def test_empty_domain_labels_refused(self):
        """A domain with an empty label gets 553 5.1.3; one final dot (the DNS root) is fine."""
        for address in (
            b"bob@localhost..",
            b"bob@local..host",
            b"bob@.localhost",
            b"postmaster@localhost..",
            b"bob@mx.example.org...",
        ):
            self.assertEqual(self.rcpt(address), b"553 5.1.3 Bad recipient address syntax", address)
        self.assertEqual(self.rcpt(b"bob@localhost."), b"250 2.1.5 Recipient OK")

    def test_full_address_user(self):
        """carol@example.org is the user of that name when example.org is a local domain."""
        self.assertEqual(self.rcpt(b"carol@example.org"), b"250 2.1.5 Recipient OK")
        self.assertEqual(self.rcpt(b"carol@mx.example.org"), b"550 5.1.1 No such user here")

    def test_case_insensitive(self):
        """Local parts match users as given or in lower case; domains ignore case."""
        self.assertEqual(self.rcpt(b"Alice@MX.Example.ORG"), b"250 2.1.5 Recipient OK")

    def test_colliding_users_get_no_mail(self):
        """Names of a hand-edited file whose Maildirs meet get 451 4.3.0 (the mail waits at
        the sender); the other users get theirs."""
        with open(self.config.users, "w") as f:
            f.write("alice:{PLAIN}x\nbob:{PLAIN}x\ndan@example.org:{PLAIN}x\n")
            f.write("dan@EXAMPLE.ORG:{PLAIN}x\nexample.org:{PLAIN}x\n")
        down = b"451 4.3.0 User database unavailable, try again later"
        for address in [b"dan@example.org", b"Dan@Example.org", b"example.org@localhost"]:
            self.assertEqual(self.rcpt(address), down, address)
        self.assertEqual(self.rcpt(b"bob@localhost"), b"250 2.1.5 Recipient OK")

    def test_shared_database_down(self):
        """While the database the nodes share is down, every recipient gets 451 4.3.0;
        once it is back, the same recipient is accepted."""
        up = [False]
        self.proto.policy.available = lambda: up[0]
        down = b"451 4.3.0 Shared database unavailable, try again later"
        for address in (b"alice@localhost", b"mallory@localhost", b"postmaster"):
            self.assertEqual(self.rcpt(address), down, address)
        up[0] = True
        self.assertEqual(self.rcpt(b"alice@localhost"), b"250 2.1.5 Recipient OK")

    def test_postmaster_without_domain_is_local(self):
        """An address without a domain is taken to be at this host."""
        self.assertEqual(self.rcpt(b"alice"), b"250 2.1.5 Recipient OK")

    def test_postmaster_always_accepted(self):
        """postmaster at any local domain, or bare, is accepted though no such user exists."""
        for address in (b"postmaster@mx.example.org", b"PostMaster@example.org", b"postmaster"):
            self.assertEqual(self.rcpt(address), b"250 2.1.5 Recipient OK", address)
        self.assertEqual(
            self.proto.policy.resolve(twisted_smtp.Address(b"Postmaster@example.org")),
            "postmaster",
        )

    def test_postmaster_elsewhere_is_not_relayed(self):
        """postmaster at a foreign domain is relaying, and denied."""
        self.assertEqual(self.rcpt(b"postmaster@elsewhere.example"), b"550 5.7.1 Relaying denied")

    def test_rcpt_parameters_refused(self):
        """RCPT parameters (no DSN here) get 555 5.5.4."""
        self.send(b"RCPT TO:<alice@mx.example.org> NOTIFY=NEVER\r\n")
        self.assertEqual(self.replies(), [b"555 5.5.4 Unsupported MAIL or RCPT parameter"])

    def test_validate_to_directly(self):
        """The recipient policy refuses a foreign address with SMTPBadRcpt code 550."""
        policy = self.proto.policy
        verifyObject(IRecipientPolicy, policy)
        with self.assertRaises(twisted_smtp.SMTPBadRcpt) as cm:
            policy.resolve(twisted_smtp.Address(b"x@elsewhere.example"))
        self.assertEqual(cm.exception.code, 550)
        self.assertEqual(
            policy.resolve(twisted_smtp.Address(b"carol@Example.org")), "carol@example.org"
        )


class MaxRecipientsTests(SMTPTestCase):
    config_changes = {"smtp_max_recipients": 2}

    def test_third_recipient_refused(self):
        """More recipients than the limit get 452 4.5.3; the accepted ones still get the mail."""
        self.ehlo()
        self.send(b"MAIL FROM:<a@remote.example>\r\n")
        for _ in range(2):
            self.send(b"RCPT TO:<alice@mx.example.org>\r\n")
        self.send(b"RCPT TO:<bob@mx.example.org>\r\n")
        self.assertEqual(self.replies()[-1], b"452 4.5.3 Too many recipients")
        self.send(b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
        self.assertEqual(len(self.new("alice")), 1)
        self.assertEqual(self.new("bob"), [])


class DataTests(SMTPTestCase):
    def test_delivery(self):
        """A message is stored with LF line ends, dots unstuffed, after Return-Path and Received."""
        self.assertEqual(
            self.envelope(b"alice@mx.example.org"),
            [
                b"250 2.1.0 Sender OK",
                b"250 2.1.5 Recipient OK",
                b"354 End data with <CR><LF>.<CR><LF>",
            ],
        )
        self.send(b"Subject: hello\r\n\r\nbody\r\n..leading dot\r\n\xe9t\xe9\r\n.\r\n")
        [reply] = self.replies()
        self.assertRegex(reply, rb"^250 2\.0\.0 Ok: queued as [0-9A-F]{12}$")
        [stored] = self.new("alice")
        headers, _, rest = stored.partition(b"\nSubject:")
        self.assertEqual(rest, b" hello\n\nbody\n.leading dot\n\xe9t\xe9\n")
        self.assertTrue(headers.startswith(b"Return-Path: <sender@remote.example>\nReceived: "))
        self.assertEqual(self.tmp("alice"), [])

    def test_received_header(self):
        """Received names the HELO, the peer, this host, ESMTP, the id, the recipient and a date."""
        self.envelope(b"alice@mx.example.org")
        self.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        queue_id = self.replies()[0].rsplit(b" ", 1)[1]
        [stored] = self.new("alice")
        received = stored.split(b"\nSubject:")[0].split(b"\n", 1)[1]
        self.assertRegex(
            received,
            rb"^Received: from client\.example \(\[192\.0\.2\.7\]\)\n"
            rb"\tby mx\.example\.org \(popserv\) with ESMTP id " + queue_id + rb"\n"
            rb"\tfor <alice@mx\.example\.org>; "
            rb"\w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}$",
        )

    def test_received_several_recipients_and_helo(self):
        """After HELO the protocol is SMTP; with two recipients no 'for' clause names them."""
        self.replies()
        self.send(b"HELO old.example\r\nMAIL FROM:<>\r\nRCPT TO:<alice@mx.example.org>\r\n")
        self.send(b"RCPT TO:<bob@mx.example.org>\r\nDATA\r\nSubject: x\r\n\r\nx\r\n.\r\n")
        [stored] = self.new("bob")
        self.assertEqual(self.new("alice"), [stored])
        self.assertTrue(stored.startswith(b"Return-Path: <>\nReceived: from old.example ("))
        self.assertIn(b" with SMTP id ", stored)
        self.assertNotIn(b"for <", stored)

    def test_ipv6_peer_literal(self):
        """An IPv6 peer appears as an IPv6 address literal."""
        proto, transport = self.connect(peer=IPv6Address("TCP", "2001:db8::1", 40000))
        self.send(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<alice@localhost>\r\nDATA\r\n", proto)
        self.send(b"Subject: x\r\n\r\nx\r\n.\r\n", proto)
        self.assertIn(b"from c ([IPv6:2001:db8::1])", self.new("alice")[0])

    def test_helo_name_sanitised(self):
        """Odd characters of a HELO name cannot break out of the Received header."""
        self.replies()
        self.send(b"EHLO a(b)\\c\tx\r\nMAIL FROM:<a@b>\r\nRCPT TO:<alice@localhost>\r\nDATA\r\n")
        self.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        self.assertIn(b"Received: from a?b??c?x ([192.0.2.7])\n", self.new("alice")[0])

    def test_headerless_message(self):
        """A message without headers gets an empty line after the trace headers."""
        self.envelope(b"alice@localhost")
        self.send(b"just text\r\n.\r\n")
        self.assertTrue(self.new("alice")[0].endswith(b"\n\njust text\n"))

    def test_size_declared_too_big(self):
        """MAIL FROM with a SIZE over the limit gets 552 5.3.4; a bad SIZE 501; unknown 555."""
        self.ehlo()
        self.assert_replies(
            b"MAIL FROM:<a@b.example> SIZE=26214401\r\n",
            [b"552 5.3.4 Message size exceeds fixed limit"],
        )
        self.assert_replies(
            b"MAIL FROM:<a@b.example> SIZE=big\r\n",
            [b"501 5.5.4 Syntax error in parameters or arguments"],
        )
        self.assert_replies(
            b"MAIL FROM:<a@b.example> RET=HDRS\r\n",
            [b"555 5.5.4 Unsupported MAIL or RCPT parameter"],
        )
        self.assert_replies(
            b"MAIL FROM:<a@b.example> SIZE=26214400 BODY=8BITMIME\r\n", [b"250 2.1.0 Sender OK"]
        )

    def test_nested_mail(self):
        """A second MAIL in one transaction is refused; RSET starts over."""
        self.ehlo()
        self.assert_replies(b"MAIL FROM:<a@b.example>\r\n", [b"250 2.1.0 Sender OK"])
        self.assert_replies(b"MAIL FROM:<a@b.example>\r\n", [b"503 5.5.1 Sender already given"])
        self.assert_replies(
            b"RSET\r\nMAIL FROM:<a@b.example>\r\n", [b"250 2.0.0 Ok", b"250 2.1.0 Sender OK"]
        )

    def test_next_message_on_same_connection(self):
        """After one message, another can follow on the same connection."""
        for n in range(2):
            self.envelope(b"alice@localhost")
            self.send(b"Subject: %d\r\n\r\nx\r\n.\r\n" % n)
            self.assertTrue(self.replies()[0].startswith(b"250 2.0.0"))
        self.assertEqual(len(self.new("alice")), 2)


class SizeLimitTests(SMTPTestCase):
    config_changes = {"smtp_max_message_size": 100}

    def test_too_big_at_end_of_data(self):
        """A message over the limit is refused at its end with 552 5.3.4, and nothing is kept."""
        self.envelope(b"alice@localhost")
        self.send(b"Subject: x\r\n\r\n" + b"y" * 60 + b"\r\n")
        self.assertEqual(self.tmp("alice"), [self.tmp("alice")[0]])
        self.send(b"z" * 60 + b"\r\n")
        self.assertEqual(self.tmp("alice"), [])
        self.send(b"more\r\n.\r\n")
        self.assertEqual(self.replies(), [b"552 5.3.4 Message size exceeds fixed limit"])
        self.assertEqual(self.new("alice"), [])
        self.assert_replies(b"NOOP\r\n", [b"250 2.0.0 Ok"])


class SmugglingTests(SMTPTestCase):
    SMUGGLED = (
        b"MAIL FROM:<spoof@mx.example.org>\r\nRCPT TO:<bob@mx.example.org>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nsmuggled\r\n"
    )

    def smuggle(self, end: bytes) -> None:
        self.envelope(b"alice@mx.example.org")
        self.send(b"Subject: real\r\n\r\nreal" + end + self.SMUGGLED + b".\r\n")

    def assert_nothing_smuggled(self):
        self.assertEqual(self.replies(), [b"550 " + smtpreplies.BARE_LINE_END[1]])
        self.assertEqual(self.new("alice"), [])
        self.assertEqual(self.new("bob"), [])
        self.assertEqual(self.tmp("alice"), [])

    def test_lf_dot_lf(self):
        """'\\n.\\n' does not end the message; the bare LF fails it and nothing is delivered."""
        self.smuggle(b"\n.\n")
        self.assert_nothing_smuggled()

    def test_cr_dot_cr(self):
        """'\\r.\\r' does not end the message either."""
        self.smuggle(b"\r.\r")
        self.assert_nothing_smuggled()

    def test_lf_dot_crlf(self):
        """'\\n.\\r\\n' does not end the message either."""
        self.smuggle(b"\n.\r\n")
        self.assert_nothing_smuggled()

    def test_nul(self):
        """A NUL byte in the data fails the message with 550 5.6.0."""
        self.envelope(b"alice@localhost")
        self.send(b"Subject: x\r\n\r\na\0b\r\n.\r\n")
        self.assertEqual(self.replies(), [b"550 5.6.0 NUL character in message"])
        self.assertEqual(self.new("alice"), [])

    def test_long_data_line_stays_in_data(self):
        """An over-long DATA line fails the message but the lines after it remain data."""
        self.envelope(b"alice@localhost")
        self.send(b"Subject: x\r\n\r\n" + b"x" * 1200 + b"\r\nRSET\r\nQUIT\r\n")
        self.send(b"y" * 5000)
        self.send(b"\r\n.\r\n")
        self.assertEqual(self.replies(), [b"500 5.5.2 Line too long"])
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.new("alice"), [])

    def test_long_command_line(self):
        """An over-long command line is refused with 500 5.5.2, in one piece or in many."""
        self.ehlo()
        self.assert_replies(b"NOOP " + b"x" * 1000 + b"\r\n", [b"500 5.5.2 Line too long"])
        self.send(b"NOOP " + b"x" * 3000)
        self.send(b"x" * 3000 + b"\r")
        self.assert_replies(b"\nNOOP\r\n", [b"500 5.5.2 Line too long", b"250 2.0.0 Ok"])

    def test_longest_line_accepted(self):
        """A line of exactly 998 octets plus CRLF is accepted, even split before its LF."""
        self.envelope(b"alice@localhost")
        self.send(b"Subject: x\r\n\r\n" + b"x" * 998 + b"\r")
        self.send(b"\n.\r\n")
        self.assertTrue(self.replies()[0].startswith(b"250 2.0.0"))


def expected_outcome(stream: bytes, line_limit: int, max_size: int) -> tuple[bytes, bytes]:
    """What DATA ``stream`` (up to its final ".") earns, worked out one line at a time.

    Returns the reply line and the stored body after the trace headers (empty if refused).
    """
    lines, failure, size = [], None, 0
    for line in stream.split(b"\r\n")[:-2]:
        if len(line) > line_limit:
            failure = failure or b"500 " + smtpreplies.LINE_TOO_LONG[1]
            continue
        if failure:
            continue
        line = line[1:] if line[:1] == b"." else line
        size += len(line) + 2
        if b"\r" in line or b"\n" in line:
            failure = b"550 " + smtpreplies.BARE_LINE_END[1]
        elif b"\0" in line:
            failure = b"550 " + smtpreplies.NUL_IN_DATA[1]
        elif size > max_size:
            failure = b"552 " + smtpreplies.TOO_BIG[1]
        lines.append(line)
    if failure:
        return failure, b""
    if lines and lines[0] and not re.match(rb"[!-9;-~]+:", lines[0]):
        lines.insert(0, b"")
    return b"250", b"".join(line + b"\n" for line in lines)


DATA_PIECES = st.sampled_from(
    [b"Subject: x", b"text", b" ", b".", b"..", b"\r", b"\n", b"\0", b"y" * 45, b"\xe9"]
)


class BulkDataTests(SMTPTestCase):
    config_changes = {"smtp_max_line_length": 100, "smtp_max_message_size": 600}

    def deliver_stream(self, stream: bytes, cuts=()) -> tuple[bytes, bytes]:
        """Send ``stream`` after DATA, cut at ``cuts``; the reply and the stored body."""
        self.envelope(b"alice@localhost")
        for user in ("alice",):
            for name in os.listdir(os.path.join(self.store.path_for(user), "new")):
                os.unlink(os.path.join(self.store.path_for(user), "new", name))
        bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
        for start, end in zip(bounds, bounds[1:], strict=False):
            self.send(stream[start:end])
        self.send(b"NOOP\r\n")
        reply, noop = self.replies()
        self.assertEqual(noop, b"250 2.0.0 Ok")
        self.assertEqual(self.tmp("alice"), [])
        stored = self.new("alice")
        if not reply.startswith(b"250 "):
            self.assertEqual(stored, [])
            return reply, b""
        [message] = stored
        return reply[:3], message.split(b"\n", 4)[4]

    @settings(max_examples=150, deadline=None)
    @given(
        st.lists(st.lists(DATA_PIECES, max_size=4).map(b"".join), max_size=14),
        st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
    )
    def test_same_outcome_as_line_by_line(self, lines, cuts):
        """However DATA is cut into packets, reply and stored bytes are those line by line."""
        stream = b"".join(line + b"\r\n" for line in lines) + b".\r\n"
        assume(stream.find(b"\r\n.\r\n") in (-1, len(stream) - 5))
        assume(not stream.startswith(b".\r\n") or stream == b".\r\n")
        expected = expected_outcome(stream, 98, 600)
        self.assertEqual(self.deliver_stream(stream, cuts), expected)
        self.assertEqual(self.deliver_stream(stream, range(len(stream))), expected)

    def test_one_write_per_packet(self):
        """The lines of one packet reach the delivery in one write, dots unstuffed, LF ends."""
        self.envelope(b"alice@localhost")
        delivery = self.proto.envelope.delivery
        writes = []
        real_write = delivery.write
        delivery.write = lambda data: writes.append(data) or real_write(data)
        self.send(b"Subject: x\r\n\r\n..a\r\nb\r\n.c\r\n")
        self.send(b".\r\n")
        self.assertEqual(writes, [b"Subject: x\n\n.a\nb\nc\n"])
        self.assertTrue(self.replies()[0].startswith(b"250 2.0.0"))

    def test_longest_stuffed_line(self):
        """A dot-stuffed line of exactly the limit is accepted; one octet more is too long."""
        self.assertEqual(
            self.deliver_stream(b"Subject: x\r\n\r\n." + b"z" * 97 + b"\r\n.\r\n"),
            (b"250", b"Subject: x\n\n" + b"z" * 97 + b"\n"),
        )
        self.assertEqual(
            self.deliver_stream(b"Subject: x\r\n\r\n." + b"z" * 98 + b"\r\n.\r\n"),
            (b"500 5.5.2 Line too long", b""),
        )

    def test_empty_message(self):
        """DATA ended at once stores the trace headers alone."""
        self.assertEqual(self.deliver_stream(b".\r\n"), (b"250", b""))


@implementer(IRecipientPolicy)
class DeferredValidator:
    """A recipient policy whose checks answer with Deferreds the test fires."""

    def __init__(self):
        self.pending = []

    def check_sender(self, session, envelope):
        d = defer.Deferred()
        self.pending.append(("from", d))
        return d

    def check_recipient(self, session, envelope, address):
        d = defer.Deferred()
        self.pending.append((bytes(address), d))
        return d

    def trace_headers(self, session, envelope):
        return b""


class PipeliningOrderTests(SMTPTestCase):
    def test_replies_in_order_with_deferred_validators(self):
        """Pipelined commands wait for a pending reply, so replies keep order (twisted#8126)."""
        self.ehlo()
        validator = DeferredValidator()
        self.proto.policy = validator
        self.send(
            b"MAIL FROM:<a@b.example>\r\nRCPT TO:<one@x.example>\r\n"
            b"RCPT TO:<two@x.example>\r\nNOOP\r\n"
        )
        self.assertEqual([name for name, _ in validator.pending], ["from"])
        self.assertEqual(self.transport.producerState, "paused")
        validator.pending[0][1].callback(twisted_smtp.Address(b"a@b.example"))
        self.clock.advance(0)
        self.assertEqual(len(validator.pending), 2)
        # Fire the second recipient's check first: its reply must still come second.
        self.assertEqual(self.replies(), [b"250 2.1.0 Sender OK"])
        validator.pending[1][1].errback(twisted_smtp.SMTPBadRcpt(b"one@x.example"))
        self.clock.advance(0)
        validator.pending[2][1].callback("two")
        self.clock.advance(0)
        self.assertEqual(
            self.replies(),
            [
                b"550 5.0.0 Cannot receive for specified address",
                b"250 2.1.5 Recipient OK",
                b"250 2.0.0 Ok",
            ],
        )
        self.assertEqual(self.transport.producerState, "producing")

    def test_pause_only_when_input_waits(self):
        """A pending reply with nothing behind it keeps reading; input arriving meanwhile pauses."""
        self.ehlo()
        validator = DeferredValidator()
        self.proto.policy = validator
        self.send(b"MAIL FROM:<a@b.example>\r\n")
        self.assertEqual(self.transport.producerState, "producing")
        self.send(b"NO")
        self.assertEqual(self.transport.producerState, "paused")
        validator.pending[0][1].callback(twisted_smtp.Address(b"a@b.example"))
        self.clock.advance(0)
        self.assertEqual(self.transport.producerState, "producing")
        self.send(b"OP\r\n")
        self.assertEqual(self.replies(), [b"250 2.1.0 Sender OK", b"250 2.0.0 Ok"])

    def test_end_of_data_waits_for_the_delivery(self):
        """Commands pipelined behind DATA wait until the message is stored and answered."""
        finishing = []
        waiting = defer.Deferred()
        self.deliverer.run = lambda f, *args: finishing.append((f, args)) or waiting
        self.envelope(b"alice@localhost")
        self.send(b"Subject: x\r\n\r\nx\r\n.\r\nNOOP\r\nQUIT\r\n")
        self.assertEqual(self.replies(), [])
        [(finish, args)] = finishing
        waiting.callback(finish(*args))
        self.clock.advance(0)
        replies = self.replies()
        self.assertTrue(replies[0].startswith(b"250 2.0.0 Ok: queued as "), replies)
        self.assertEqual(replies[1:], [b"250 2.0.0 Ok", b"221 2.0.0 Bye"])
        self.assertEqual(len(self.new("alice")), 1)

    def test_policy_receives_session_and_envelope(self):
        """The recipient policy is handed the session and the envelope as they stand."""
        seen = []
        policy = self.proto.policy
        check = policy.check_recipient

        def recording(session, envelope, address):
            seen.append((session.helo, bytes(envelope.sender), list(envelope.recipients)))
            return check(session, envelope, address)

        policy.check_recipient = recording
        self.envelope(b"alice@localhost", b"nobody@localhost", b"bob@localhost")
        self.assertEqual(
            seen,
            [
                (b"client.example", b"sender@remote.example", []),
                (b"client.example", b"sender@remote.example", [b"alice@localhost"]),
                (b"client.example", b"sender@remote.example", [b"alice@localhost"]),
            ],
        )
        self.assertEqual(self.proto.envelope.users, ["alice", "bob"])

    def test_pipelined_transaction(self):
        """A whole pipelined transaction gets its replies in order and delivers."""
        self.ehlo()
        self.send(
            b"MAIL FROM:<a@b.example>\r\nRCPT TO:<alice@localhost>\r\n"
            b"RCPT TO:<nobody@localhost>\r\nRCPT TO:<bob@localhost>\r\nDATA\r\n"
        )
        self.send(b"Subject: x\r\n\r\nx\r\n.\r\nQUIT\r\n")
        replies = [line[:9] for line in self.replies()]
        self.assertEqual(
            replies,
            [
                b"250 2.1.0",
                b"250 2.1.5",
                b"550 5.1.1",
                b"250 2.1.5",
                b"354 End d",
                b"250 2.0.0",
                b"221 2.0.0",
            ],
        )
        self.assertEqual(len(self.new("bob")), 1)


class FaultTests(SMTPTestCase):
    def test_disconnect_mid_data(self):
        """A client that disconnects in the middle of DATA leaves nothing in new/ or tmp/."""
        self.envelope(b"alice@localhost", b"bob@localhost")
        self.send(b"Subject: x\r\n\r\nhalf a mess")
        self.assertEqual(len(self.tmp("alice")), 1)
        self.proto.connectionLost(defer.Failure(ConnectionError("gone")))
        for user in ("alice", "bob"):
            self.assertEqual(self.new(user), [])
            self.assertEqual(self.tmp(user), [])

    def test_disk_full_mid_data(self):
        """ENOSPC while writing DATA answers 452 4.3.1 at its end; new/ stays empty."""
        self.envelope(b"alice@localhost")
        self.send(b"Subject: x\r\n\r\n")
        delivery = self.proto.envelope.delivery

        def full(data):
            raise OSError(errno.ENOSPC, "No space left on device")

        delivery._file.write = full
        self.send(b"line\r\n" * 3 + b".\r\n")
        self.assertEqual(self.replies(), [b"452 4.3.1 Insufficient system storage"])
        self.assertEqual(self.new("alice"), [])
        self.assertEqual(self.tmp("alice"), [])
        self.assertFalse(self.transport.disconnecting)

    def test_disk_full_at_start(self):
        """ENOSPC when the temporary file cannot even be created answers DATA with 452 4.3.1."""

        def full(users):
            from popserv.interfaces import DeliveryFailed

            raise DeliveryFailed("full", OSError(errno.ENOSPC, "No space left on device"))

        self.deliverer.begin = full
        self.assertEqual(
            self.envelope(b"alice@localhost")[-1], b"452 4.3.1 Insufficient system storage"
        )

    def test_timeout(self):
        """An idle client is told 421 4.4.2 and disconnected after the configured timeout."""
        self.replies()
        self.clock.advance(self.config.smtp_timeout - 1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertEqual(
            self.replies(), [b"421 4.4.2 mx.example.org Idle for too long, closing connection"]
        )
        self.assertTrue(self.transport.disconnecting)


class PerPeerLimitTests(SMTPTestCase):
    config_changes = {"smtp_max_connections_per_peer": 2}

    def test_limit(self):
        """A peer over its connection limit gets 421 4.7.0; others and later ones get in."""
        second, second_transport = self.connect()
        third, third_transport = self.connect()
        self.assertEqual(
            self.replies(third_transport),
            [b"421 4.7.0 mx.example.org Too many connections from your address"],
        )
        self.assertTrue(third_transport.disconnecting)
        third.connectionLost(defer.Failure(ConnectionError()))
        other, other_transport = self.connect(peer=IPv4Address("TCP", "192.0.2.8", 1))
        self.assertTrue(self.replies(other_transport)[0].startswith(b"220 "))
        second.connectionLost(defer.Failure(ConnectionError()))
        fourth, fourth_transport = self.connect()
        self.assertTrue(self.replies(fourth_transport)[0].startswith(b"220 "))


class TotalLimitTests(SMTPTestCase):
    config_changes = {"smtp_max_connections": 3}

    def test_limit_in_all(self):
        """Over [smtp] max_connections, from any address, 421 4.7.0; a closed one frees a place."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        others = [self.connect(peer=IPv4Address("TCP", f"192.0.2.{n}", 1)) for n in (8, 9)]
        refused, refused_transport = self.connect(peer=IPv4Address("TCP", "192.0.2.10", 1))
        self.assertEqual(
            self.replies(refused_transport),
            [b"421 4.7.0 mx.example.org Too many connections, try again later"],
        )
        self.assertTrue(refused_transport.disconnecting)
        refused.connectionLost(defer.Failure(ConnectionError()))
        [event] = [e for e in events if e.get("log_namespace") == "popserv.smtp"]
        self.assertEqual(
            (event["peer"], event["stage"], event["limit"]),
            ("192.0.2.10", "connect", "max_connections"),
        )
        others[0][0].connectionLost(defer.Failure(ConnectionError()))
        later, later_transport = self.connect(peer=IPv4Address("TCP", "192.0.2.10", 1))
        self.assertTrue(self.replies(later_transport)[0].startswith(b"220 "))
        self.assertEqual(self.factory.limiter.open, 3)


class SocketTransport(StringTransport):
    """A transport whose socket has a given descriptor number."""

    descriptor = -1

    def fileno(self):
        return self.descriptor


class DescriptorReserveTests(SMTPTestCase):
    def connect_at(self, descriptor: int):
        SocketTransport.descriptor = descriptor
        self.addCleanup(setattr, SocketTransport, "descriptor", -1)
        return self.connect(transport_class=SocketTransport)

    def test_refused_when_descriptors_run_short(self):
        """A connection that would leave less than a quarter of the descriptors free gets 421."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.factory.limiter.file_limit = lambda: 100
        # Descriptors 0-70 in use, and one temporary file each for two SMTP connections.
        proto, transport = self.connect_at(70)
        self.assertTrue(self.replies(transport)[0].startswith(b"220 "))
        proto, transport = self.connect_at(72)
        self.assertEqual(
            self.replies(transport),
            [b"421 4.7.0 mx.example.org Too many connections, try again later"],
        )
        self.assertEqual(events[-1]["limit"], "descriptors")
        self.assertEqual(self.factory.limiter.open, 2)


class ErrorLimitTests(SMTPTestCase):
    """One connection that keeps erring is closed, with one event, before it floods the log."""

    def smtp_events(self, events):
        return [e for e in events if e.get("log_namespace") == "popserv.smtp"]

    def test_rejected_recipient_flood_ends_session(self):
        """1,000 pipelined RCPT to unknown users: 20 get 550, then 421 4.7.0 and the close."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.ehlo()
        self.send(
            b"MAIL FROM:<s@remote.example>\r\n"
            + b"".join(b"RCPT TO:<u%d@mx.example.org>\r\n" % n for n in range(1000))
        )
        replies = self.replies()
        self.assertEqual(replies[0], b"250 2.1.0 Sender OK")
        self.assertEqual(replies[1:-1], [b"550 5.1.1 No such user here"] * 20)
        self.assertEqual(
            replies[-1],
            b"421 4.7.0 mx.example.org Too many rejected recipients, closing connection",
        )
        self.assertTrue(self.transport.disconnecting)
        mine = self.smtp_events(events)
        self.assertEqual([e["stage"] for e in mine], ["RCPT"] * 20 + ["session"])
        self.assertEqual(
            (mine[-1]["peer"], mine[-1]["code"], mine[-1]["count"]), (PEER.host, 421, "20")
        )

    def test_bad_command_flood_ends_session(self):
        """1,000 unknown commands: 20 get 500 5.5.1, then 421 4.7.0 and the close."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.replies()
        self.send(b"XYZZY\r\n" * 1000)
        replies = self.replies()
        self.assertEqual(replies[:-1], [b"500 5.5.1 Command unrecognized"] * 20)
        self.assertEqual(
            replies[-1], b"421 4.7.0 mx.example.org Too many bad commands, closing connection"
        )
        self.assertTrue(self.transport.disconnecting)
        [event] = self.smtp_events(events)
        self.assertEqual((event["stage"], event["code"], event["count"]), ("session", 421, "20"))
        self.assertIn(
            'smtp.rejected: peer=192.0.2.7 stage=session code=421 reason="4.7.0 '
            'mx.example.org Too many bad commands, closing connection" count=20',
            formatEvent(event),
        )

    def test_temporary_refusals_are_not_counted(self):
        """452 for recipients over max_recipients counts as no error, and is logged once."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.ehlo()
        self.send(b"MAIL FROM:<s@remote.example>\r\n" + b"RCPT TO:<alice@localhost>\r\n" * 130)
        replies = self.replies()
        self.assertEqual(replies.count(b"452 4.5.3 Too many recipients"), 30)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(len(self.smtp_events(events)), 1)
        self.send(b"DATA\r\nSubject: x\r\n\r\nx\r\n.\r\n")
        self.assertTrue(self.replies()[-1].startswith(b"250 2.0.0 Ok"))
        self.assertEqual(len(self.new("alice")), 1)

    def test_errors_below_the_limits_keep_the_session(self):
        """19 bad commands and 19 refused recipients still leave a working session."""
        self.replies()
        self.send(b"XYZZY\r\n" * 19 + b"EHLO client.example\r\nMAIL FROM:<s@remote.example>\r\n")
        self.send(b"".join(b"RCPT TO:<u%d@localhost>\r\n" % n for n in range(19)))
        self.send(b"RCPT TO:<bob@localhost>\r\nDATA\r\nSubject: x\r\n\r\nx\r\n.\r\n")
        self.assertTrue(self.replies()[-1].startswith(b"250 2.0.0 Ok"))
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(len(self.new("bob")), 1)


class ErrorLimitSettingTests(SMTPTestCase):
    config_changes = {"smtp_max_bad_commands": 2, "smtp_max_rejected_recipients": 3}

    def test_every_kind_of_error_counts(self):
        """Unknown, empty, malformed, out-of-order, over-long and bare-LF commands all count."""
        self.config = self.factory.config = self.config.replace(smtp_max_bad_commands=12)
        proto, transport = self.connect()
        bad = [
            b"XYZZY",
            b"",
            b"EHLO",
            b"MAIL FROM:<a@b.example>",
            b"RCPT TO:<alice@localhost>",
            b"DATA",
            b"NOOP " + b"x" * 1000,
            b"NOOP\nNOOP",
            b"EHLO client.example",
            b"MAIL FROM:<a@b.example> RET=HDRS",
            b"MAIL TO:<a@b.example>",
            b"MAIL FROM:<a@b.example>",
            b"MAIL FROM:<c@d.example>",
            b"NOOP",
            b"VRFY alice",
        ]
        self.send(b"".join(line + b"\r\n" for line in bad), proto)
        self.assertFalse(transport.disconnecting)
        self.send(b"RCPT FROM:<alice@localhost>\r\nNOOP\r\n", proto)
        self.assertEqual(
            [reply[:3] for reply in self.replies(transport) if reply[3:4] == b" "],
            [b"220", b"500", b"500", b"501", b"503", b"503", b"503", b"500", b"500", b"250"]
            + [b"555", b"501", b"250", b"503", b"250", b"502", b"501", b"421"],
        )
        self.assertTrue(transport.disconnecting)

    def test_limits_from_config(self):
        """[smtp] max_rejected_recipients (and max_bad_commands) set where the session ends."""
        self.ehlo()
        self.send(b"MAIL FROM:<s@remote.example>\r\nRCPT TO:<x@elsewhere.example>\r\n")
        self.send(b"RCPT TO:<nobody@localhost>\r\nRCPT TO:<bob@localhost..>\r\n")
        self.assertEqual([r[:3] for r in self.replies()], [b"250", b"550", b"550", b"553", b"421"])
        proto, transport = self.connect()
        self.send(b"XYZZY\r\nXYZZY\r\nNOOP\r\n", proto)
        self.assertEqual([r[:3] for r in self.replies(transport)], [b"220", b"500", b"500", b"421"])


class LogTests(SMTPTestCase):
    def test_accepted_and_rejected_lines(self):
        """One log event per accepted message and one per refusal, with the fields named."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.ehlo()
        self.send(b"MAIL FROM:<s@remote.example>\r\nRCPT TO:<x@elsewhere.example>\r\n")
        self.send(b"RCPT TO:<alice@localhost>\r\nDATA\r\nSubject: x\r\n\r\nx\r\n.\r\n")
        mine = [e for e in events if e.get("log_namespace") == "popserv.smtp"]
        self.assertEqual(len(mine), 2)
        rejected, accepted = mine
        self.assertEqual(rejected["stage"], "RCPT")
        self.assertEqual(rejected["code"], 550)
        self.assertIn("relaying denied", rejected["reason"].lower())
        self.assertEqual(rejected["recipient"], "x@elsewhere.example")
        self.assertEqual(accepted["sender"], "s@remote.example")
        self.assertEqual(accepted["recipients"], "alice@localhost")
        self.assertEqual(accepted["peer"], "192.0.2.7")
        self.assertEqual(accepted["size"], len(b"Subject: x\r\n\r\nx\r\n"))
        self.assertTrue(re.fullmatch(r"[0-9A-F]{12}", accepted["id"]))
