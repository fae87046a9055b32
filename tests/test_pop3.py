"""The POP3 protocol, command by command and state by state (RFC 1939, RFC 2449)."""

import base64
import hashlib
import os
import re

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernameHashedPassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

import popserv
from popserv import pop3, throttle
from popserv.config import Config
from popserv.interfaces import CommitFailed, SharedStateUnavailable, UserDBUnavailable
from popserv.pop3 import POP3Factory, Reply, TopLimiter, WireEncoder
from popserv.pop3 import wire as wire_form
from popserv.realm import MaildropRealm
from popserv.testing import FakeMaildropStore, run_at_once

MSG1 = b"From: a@example.org\nSubject: one\n\nHello\n.\n..two dots\n"
MSG2 = b"Subject: two\r\n\r\nline 1\r\nline 2\r\nline 3\r\n"
MSG3 = b"Subject: three\n\nno final newline"


def wire(message: bytes) -> bytes:
    """The CRLF form of a message, before dot-stuffing: what LIST sizes count."""
    return message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class PausingTransport(StringTransport):
    """A transport whose buffer fills after ``limit`` bytes, like a slow reader's."""

    limit = 100

    def write(self, data):
        super().write(data)
        if self.producer is not None and self.streaming and len(self.value()) > self.limit:
            self.producer.pauseProducing()

    def writeSequence(self, data):
        self.write(b"".join(data))


class ControlledChecker:
    """A checker whose answers the test fires itself, to hold a login in progress."""

    credentialInterfaces = InMemoryUsernamePasswordDatabaseDontUse.credentialInterfaces

    def __init__(self):
        self.pending = []

    def requestAvatarId(self, credentials):
        d = defer.Deferred()
        self.pending.append((credentials, d))
        return d


class APOPChecker:
    """Checks hashed-password credentials (APOP) against the in-memory passwords."""

    credentialInterfaces = (IUsernameHashedPassword,)

    def __init__(self, passwords):
        self.passwords = passwords

    def requestAvatarId(self, credentials):
        secret = self.passwords.users.get(credentials.username)
        if secret is not None and credentials.checkPassword(secret):
            return defer.succeed(credentials.username)
        return defer.fail(UnauthorizedLogin())


class POP3TestCase(unittest.TestCase):
    """A POP3 session over a StringTransport, with a fake maildrop store."""

    peer = IPv4Address("TCP", "192.0.2.7", 40000)
    config = Config(
        hostname="pop.example.org", pop3_failure_delay=1.0, auth_trusted_networks=("192.0.2.0/24",)
    )

    def setUp(self):
        self.clock = task.Clock()
        self.store = FakeMaildropStore({"alice": [MSG1, MSG2, MSG3], "bob": []})
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret", bob=b"hunter2")
        self.portal = Portal(MaildropRealm(self.store), [checker, APOPChecker(checker)])
        self.factory = POP3Factory(
            self.portal, self.config, clock=self.clock, run_in_thread=run_at_once
        )
        self.proto, self.transport = self.connect()
        self.greeting = self.received()

    def connect(self, transport_class=StringTransport):
        proto = self.factory.buildProtocol(self.peer)
        transport = transport_class(peerAddress=self.peer)
        proto.makeConnection(transport)
        return proto, transport

    def send(self, data: bytes, proto=None) -> None:
        (proto or self.proto).dataReceived(data)

    def received(self, transport=None) -> bytes:
        transport = transport or self.transport
        data = transport.value()
        transport.clear()
        return data

    def lines(self, transport=None) -> list:
        return self.received(transport).split(b"\r\n")[:-1]

    def login(self, user=b"alice", password=b"secret", proto=None, transport=None):
        self.received(transport)
        self.send(b"USER " + user + b"\r\nPASS " + password + b"\r\n", proto)
        reply = self.lines(transport)
        self.assertEqual(reply[-1][:3], b"+OK", reply)

    def assert_reply(self, sent: bytes, expected: list) -> None:
        self.received()
        self.send(sent)
        self.assertEqual(self.lines(), expected)


class GreetingTests(POP3TestCase):
    def test_greeting_is_ok_without_apop_timestamp(self):
        """The greeting is +OK and carries no <timestamp>, since APOP is off."""
        greeting = self.greeting
        self.assertTrue(greeting.startswith(b"+OK "))
        self.assertTrue(greeting.endswith(b"\r\n"))
        self.assertNotIn(b"<", greeting)

    def test_no_delay_is_asked_of_tcp(self):
        """Replies go out without waiting for Nagle's algorithm."""
        transport = StringTransport()
        transport.setTcpNoDelay = lambda value: setattr(transport, "nodelay", value)
        proto = self.factory.buildProtocol(self.peer)
        proto.makeConnection(transport)
        self.assertTrue(transport.nodelay)


class CapaTests(POP3TestCase):
    def test_capa_in_authorization(self):
        """CAPA lists exactly the capabilities on offer before login."""
        self.assert_reply(
            b"CAPA\r\n",
            [
                Reply.CAPA,
                b"TOP",
                b"UIDL",
                b"USER",
                b"SASL PLAIN LOGIN",
                b"RESP-CODES",
                b"PIPELINING",
                b"AUTH-RESP-CODE",
                b"EXPIRE NEVER",
                b"UTF8 USER",
                b"LANG",
                b"IMPLEMENTATION popserv-" + popserv.__version__.encode(),
                b".",
            ],
        )

    def test_capa_in_transaction_drops_user(self):
        """After login, CAPA no longer offers USER."""
        self.login()
        self.send(b"CAPA\r\n")
        caps = self.lines()
        self.assertEqual(caps[0], Reply.CAPA)
        self.assertNotIn(b"USER", caps)
        self.assertIn(b"UIDL", caps)

    def test_login_delay_listed_when_configured(self):
        """LOGIN-DELAY appears in CAPA only when a delay is configured."""
        self.factory.config = self.config.replace(pop3_login_delay=300)
        self.send(b"CAPA\r\n")
        self.assertIn(b"LOGIN-DELAY 300", self.lines())

    def test_capa_rejects_arguments(self):
        """CAPA takes no argument."""
        self.assert_reply(b"CAPA x\r\n", [Reply.BAD_ARGUMENTS])


class FakeTLSTransport(StringTransport):
    """A StringTransport that records STLS's startTLS and what was buffered at that moment."""

    tls = None

    def startTLS(self, context):
        self.tls = context
        self.written_before_tls = self.value()


class TLSPolicyTests(POP3TestCase):
    """STLS (RFC 2595) and the plaintext policy (RFC 3206 [AUTH] hints)."""

    peer = IPv4Address("TCP", "198.51.100.9", 40000)

    def setUp(self):
        super().setUp()
        self.factory.tls = object()
        self.proto, self.transport = self.connect(FakeTLSTransport)
        self.received()

    def test_capa_offers_stls_and_hides_user_in_clear(self):
        """Without TLS from an untrusted network, CAPA lists STLS and not USER."""
        self.send(b"CAPA\r\n")
        caps = self.lines()
        self.assertIn(b"STLS", caps)
        self.assertNotIn(b"USER", caps)

    def test_user_refused_in_clear(self):
        """USER and PASS are refused with [AUTH] and a hint to use STLS."""
        self.assert_reply(
            b"USER alice\r\nPASS secret\r\n", [Reply.PLAINTEXT_REFUSED, Reply.PLAINTEXT_REFUSED]
        )
        self.assertIn(b"STLS", Reply.PLAINTEXT_REFUSED)

    def test_trusted_network_may_use_user(self):
        """A client from a trusted network may log in without TLS."""
        self.factory.config = self.config.replace(auth_trusted_networks=("198.51.100.0/24",))
        proto, transport = self.connect()
        self.login(proto=proto, transport=transport)

    def test_allow_plaintext_config(self):
        """The allow_plaintext setting lets legacy clients log in without TLS."""
        self.factory.config = self.config.replace(
            auth_trusted_networks=(), auth_allow_plaintext=True
        )
        proto, transport = self.connect()
        self.login(proto=proto, transport=transport)

    def test_ipv4_mapped_loopback_is_trusted(self):
        """An IPv4-mapped IPv6 address counts as its IPv4 address."""
        factory = POP3Factory(self.portal, Config(), clock=self.clock)
        self.assertTrue(factory.is_trusted(IPv6Address("TCP", "::ffff:127.0.0.1", 1)))
        self.assertTrue(factory.is_trusted(IPv6Address("TCP", "::1", 1)))
        self.assertFalse(factory.is_trusted(IPv4Address("TCP", "203.0.113.1", 1)))

    def test_stls_starts_tls_and_drops_pipelined_input(self):
        """STLS answers +OK, starts TLS, and never runs commands sent behind it."""
        self.send(b"STLS\r\nCAPA\r\nUSER alice\r\n")
        self.assertIs(self.transport.tls, self.factory.tls)
        self.assertEqual(self.transport.written_before_tls, Reply.BEGIN_TLS + b"\r\n")
        self.assertEqual(self.lines(), [Reply.BEGIN_TLS])

    def test_stls_forgets_settings_made_in_clear(self):
        """LANG and UTF8 chosen before STLS do not carry over into TLS."""
        self.send(b"LANG es\r\nUTF8\r\nSTLS\r\n")
        self.assertFalse(self.proto.utf8)
        self.assertEqual(self.proto.language, b"en")
        self.assert_reply(b"XYZZY\r\n", [Reply.UNKNOWN])

    def test_after_stls_capa_shows_user_not_stls(self):
        """Once TLS is on, CAPA lists USER and no longer STLS."""
        self.send(b"STLS\r\n")
        self.received()
        self.send(b"CAPA\r\n")
        caps = self.lines()
        self.assertIn(b"USER", caps)
        self.assertNotIn(b"STLS", caps)
        self.login()

    def test_stls_twice(self):
        """STLS once TLS is on gets -ERR."""
        self.send(b"STLS\r\n")
        self.assert_reply(b"STLS\r\n", [Reply.ALREADY_TLS])

    def test_stls_in_transaction(self):
        """STLS after login gets -ERR."""
        self.send(b"STLS\r\n")
        self.login()
        self.assert_reply(b"STLS\r\n", [Reply.WRONG_STATE])

    def test_stls_without_certificate(self):
        """Without a TLS configuration, STLS is neither offered nor accepted."""
        self.factory.tls = None
        self.send(b"CAPA\r\n")
        self.assertNotIn(b"STLS", self.lines())
        self.assert_reply(b"STLS\r\n", [Reply.NO_TLS])


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class SASLTests(POP3TestCase):
    """AUTH (RFC 5034) with the PLAIN and LOGIN mechanisms."""

    config = POP3TestCase.config.replace(auth_mechanisms=("PLAIN", "LOGIN"))

    def test_capa_lists_sasl(self):
        """CAPA lists SASL with the enabled mechanisms."""
        self.send(b"CAPA\r\n")
        self.assertIn(b"SASL PLAIN LOGIN", self.lines())

    def test_bare_auth_lists_mechanisms(self):
        """AUTH without arguments lists the mechanisms, one per line."""
        self.assert_reply(b"AUTH\r\n", [Reply.MECHANISMS, b"PLAIN", b"LOGIN", b"."])

    def test_plain_with_initial_response(self):
        """AUTH PLAIN with an initial response logs in at once."""
        self.send(b"AUTH PLAIN " + b64(b"\0alice\0secret") + b"\r\n")
        self.assertTrue(self.lines()[0].startswith(b"+OK Logged in"))
        self.assertEqual(self.proto.user, "alice")

    def test_plain_with_continuation(self):
        """AUTH PLAIN without initial response gets an empty "+ " challenge first."""
        self.assert_reply(b"AUTH PLAIN\r\n", [b"+ "])
        self.send(b64(b"\0alice\0secret") + b"\r\n")
        self.assertTrue(self.lines()[0].startswith(b"+OK Logged in"))

    def test_plain_wrong_password(self):
        """A wrong password over AUTH PLAIN gets -ERR [AUTH] after the delay."""
        self.send(b"AUTH PLAIN " + b64(b"\0alice\0nope") + b"\r\n")
        self.clock.advance(1)
        self.assertEqual(self.lines(), [Reply.AUTH_FAILED])

    def test_login_mechanism(self):
        """AUTH LOGIN asks for the user name, then the password."""
        self.received()
        self.send(b"AUTH LOGIN\r\n")
        self.assertEqual(self.lines(), [b"+ " + b64(b"Username:")])
        self.send(b64(b"alice") + b"\r\n")
        self.assertEqual(self.lines(), [b"+ " + b64(b"Password:")])
        self.send(b64(b"secret") + b"\r\n")
        self.assertTrue(self.lines()[0].startswith(b"+OK Logged in"))

    def test_cancel(self):
        """A "*" response cancels the exchange; the session stays in AUTHORIZATION."""
        self.send(b"AUTH LOGIN\r\n")
        self.assert_reply(b"*\r\n", [Reply.AUTH_CANCELLED])
        self.login()

    def test_bad_base64_initial_response(self):
        """An initial response that is not base64 gets -ERR."""
        self.assert_reply(b"AUTH PLAIN !!!\r\n", [Reply.BAD_BASE64])
        self.login()

    def test_bad_base64_continuation(self):
        """A continuation that is not base64 ends the exchange with -ERR."""
        self.send(b"AUTH PLAIN\r\n")
        self.assert_reply(b"not base64!\r\n", [Reply.BAD_BASE64])
        self.assertEqual(self.proto.state, pop3.AUTHORIZATION)
        self.login()

    def test_malformed_plain(self):
        """A PLAIN message without its NUL separators gets -ERR and the session goes on."""
        self.assert_reply(b"AUTH PLAIN " + b64(b"alice secret") + b"\r\n", [Reply.BAD_SASL])
        self.login()

    def test_malformed_continuation(self):
        """A malformed answer to a challenge gets -ERR, and the session can log in."""
        self.send(b"AUTH PLAIN\r\n")
        self.assert_reply(b64(b"\0alice") + b"\r\n", [Reply.BAD_SASL])
        self.assertTrue(self.transport.connected)
        self.login()

    def test_empty_initial_response(self):
        """ "=" is an empty initial response: PLAIN then finds no credentials in it."""
        self.assert_reply(b"AUTH PLAIN =\r\n", [Reply.BAD_SASL])

    def test_unknown_mechanism(self):
        """An unknown or disabled mechanism gets -ERR."""
        self.assert_reply(b"AUTH GSSAPI\r\n", [Reply.NO_MECHANISM])
        self.assert_reply(b"AUTH CRAM-MD5\r\n", [Reply.NO_MECHANISM])

    def test_long_response_accepted(self):
        """Client responses up to 16 KiB are accepted."""
        password = b"p" * 12000
        self.portal.checkers[
            InMemoryUsernamePasswordDatabaseDontUse.credentialInterfaces[0]
        ].addUser(b"dave", password)
        self.store.mailboxes["dave"] = []
        self.send(b"AUTH PLAIN\r\n")
        self.received()
        self.send(b64(b"\0dave\0" + password) + b"\r\n")
        self.assertTrue(self.lines()[0].startswith(b"+OK Logged in"))

    def test_overlong_response(self):
        """A client response over 16 KiB ends the exchange with -ERR; the session goes on."""
        self.send(b"AUTH PLAIN\r\n")
        self.received()
        self.send(b"A" * 20000 + b"\r\n")
        self.assertEqual(self.lines(), [Reply.BAD_SASL])
        self.login()

    def test_plain_refused_in_clear(self):
        """PLAIN and LOGIN are neither offered nor accepted in clear from untrusted peers."""
        self.factory.config = self.config.replace(auth_trusted_networks=())
        proto, transport = self.connect()
        self.received(transport)
        proto.dataReceived(b"CAPA\r\nAUTH PLAIN " + b64(b"\0alice\0secret") + b"\r\n")
        replies = self.lines(transport)
        self.assertFalse([r for r in replies if r.startswith(b"SASL")])
        self.assertEqual(replies[-1], Reply.PLAINTEXT_REFUSED)


class InternationalTests(POP3TestCase):
    """RFC 6856: the UTF8 and LANG commands."""

    def test_capa_lists_utf8_and_lang(self):
        """CAPA lists "UTF8 USER" before login and LANG in both states."""
        self.send(b"CAPA\r\n")
        caps = self.lines()
        self.assertIn(b"UTF8 USER", caps)
        self.assertIn(b"LANG", caps)
        self.login()
        self.send(b"CAPA\r\n")
        caps = self.lines()
        self.assertNotIn(b"UTF8 USER", caps)
        self.assertIn(b"LANG", caps)

    def test_lang_lists_languages(self):
        """LANG alone lists the languages, English and Spanish."""
        self.assert_reply(
            b"LANG\r\n", [Reply.LANGUAGES, b"en English", "es Español".encode(), b"."]
        )

    def test_lang_es_switches_replies(self):
        """After LANG es, replies come in Spanish, with their response codes unchanged."""
        self.assert_reply(b"LANG es\r\n", [b"+OK es Idioma cambiado."])
        self.assert_reply(b"XYZZY\r\n", [b"-ERR Orden desconocida."])
        self.send(b"USER alice\r\nPASS wrong\r\n")
        self.clock.advance(1)
        self.assertEqual(self.lines()[-1], "-ERR [AUTH] Autenticación fallida.".encode())

    def test_lang_range_and_default(self):
        """A language range picks its primary language; "*" picks the default."""
        self.assert_reply(b"LANG es-MX\r\n", [b"+OK es Idioma cambiado."])
        self.assert_reply(b"LANG *\r\n", [b"+OK en Language changed."])

    def test_unknown_language(self):
        """A language the server lacks gets -ERR and the language stays."""
        self.assert_reply(b"LANG tlh\r\n", [Reply.NO_LANGUAGE])
        self.assertEqual(self.proto.language, b"en")

    def test_every_reply_has_a_spanish_text(self):
        """Every reply text has a Spanish version keeping its status and response code."""
        for name, english in vars(Reply).items():
            if name.startswith("_"):
                continue
            spanish = pop3.SPANISH[english]
            self.assertEqual(spanish.split(b" ")[0], english.split(b" ")[0], name)
            code = re.match(rb"[+-]\w+ (\[[^]]+\])", english)
            if code:
                self.assertIn(code.group(1), spanish, name)
            self.assertEqual(spanish.count(b"%"), english.count(b"%"), name)

    def test_utf8_user_name_is_normalized(self):
        """In UTF8 mode a UTF-8 user name logs in, compared after SASLprep."""
        self.portal.checkers[
            InMemoryUsernamePasswordDatabaseDontUse.credentialInterfaces[0]
        ].addUser("josé".encode(), "contraseña".encode())
        self.store.mailboxes["josé"] = []
        # "e" + combining acute accent: the same name once normalized.
        self.send(
            b"UTF8\r\nUSER "
            + "jose\u0301".encode()
            + b"\r\nPASS "
            + "contraseña".encode()
            + b"\r\n"
        )
        replies = self.lines()
        self.assertTrue(replies[-1].startswith(b"+OK Logged in"), replies)
        self.assertEqual(self.proto.user, "josé")

    def test_utf8_prohibited_characters_fail(self):
        """A UTF8-mode password with a control character fails like a wrong one."""
        self.send(b"UTF8\r\nUSER alice\r\nPASS sec\x07ret\r\n")
        self.clock.advance(1)
        self.assertEqual(self.lines()[-1], Reply.AUTH_FAILED)

    def test_utf8_command(self):
        """UTF8 answers +OK in AUTHORIZATION and is refused after login."""
        self.assert_reply(b"UTF8\r\n", [Reply.UTF8])
        self.assertTrue(self.proto.utf8)
        self.login()
        self.assert_reply(b"UTF8\r\n", [Reply.WRONG_STATE])


class SlowMechanism:
    """A mechanism whose steps are costly, like SCRAM's key derivation."""

    name = b"X-SLOW"
    plaintext = False
    costly = True

    def __init__(self, hostname, userdb, nonce=None, secret=None):
        pass

    def start(self, initial):
        from popserv.sasl import Challenge

        return Challenge(b"step")

    def respond(self, data):
        from popserv.sasl import SASLError, Success

        if data != b"alice":
            raise SASLError("who?")
        return Success(UsernamePassword(b"alice", b"secret"))


class CostlySASLTests(POP3TestCase):
    """Costly SASL steps run off the reactor thread, and replies keep their order."""

    def setUp(self):
        super().setUp()
        self.jobs = []

        def run_in_thread(f):
            d = defer.Deferred()
            self.jobs.append((f, d))
            return d

        self.factory.run_in_thread = run_in_thread
        self.factory.mechanisms = {b"X-SLOW": SlowMechanism}

    def run_job(self):
        f, d = self.jobs.pop(0)
        try:
            d.callback(f())
        except Exception:
            d.errback()

    def test_steps_run_in_a_thread_and_answers_wait(self):
        """Each step goes to the thread runner; a pipelined answer waits for its challenge."""
        self.send(b"AUTH X-SLOW\r\n" + b64(b"alice") + b"\r\n")
        self.assertEqual((self.lines(), len(self.jobs)), ([], 1))
        self.run_job()
        self.assertEqual(self.lines(), [b"+ " + b64(b"step")])
        self.assertEqual(len(self.jobs), 1)
        self.run_job()
        self.assertTrue(self.lines()[0].startswith(b"+OK Logged in"))

    def test_costly_mechanism_needs_a_runner(self):
        """A factory offering SCRAM-SHA-256 without run_in_thread is refused, naming it."""
        config = self.config.replace(auth_mechanisms=("PLAIN", "SCRAM-SHA-256"))
        with self.assertRaises(TypeError) as cm:
            POP3Factory(self.portal, config, clock=self.clock)
        self.assertIn("SCRAM-SHA-256", str(cm.exception))
        self.assertIn("run_in_thread", str(cm.exception))
        POP3Factory(self.portal, config, clock=self.clock, run_in_thread=run_at_once)
        POP3Factory(self.portal, self.config, clock=self.clock)

    def test_a_refused_step_gets_err(self):
        """A step that refuses the exchange in the thread gets -ERR, after the failure delay."""
        self.send(b"AUTH X-SLOW\r\n")
        self.run_job()
        self.send(b64(b"mallory") + b"\r\n")
        self.run_job()
        self.assertEqual(self.lines(), [b"+ " + b64(b"step")])
        self.clock.advance(1)
        self.assertEqual(self.lines(), [Reply.BAD_SASL])
        self.login()


class APOPTests(POP3TestCase):
    """APOP (RFC 1939 section 7), off unless configured."""

    def test_off_by_default(self):
        """Without configuration, the greeting has no timestamp and APOP is refused."""
        self.assertNotIn(b"<", self.greeting)
        self.assert_reply(b"APOP alice 0123456789abcdef0123456789abcdef\r\n", [Reply.NO_APOP])

    def test_apop_login(self):
        """With APOP on, MD5(timestamp + secret) logs the user in."""
        self.factory.config = self.config.replace(auth_apop=True)
        proto, transport = self.connect()
        greeting = self.received(transport)
        stamp = re.search(rb"<[^>]+>", greeting).group(0)
        self.assertTrue(stamp.endswith(b"@pop.example.org>"))
        digest = hashlib.md5(stamp + b"secret").hexdigest().encode()
        proto.dataReceived(b"APOP alice " + digest + b"\r\n")
        self.assertTrue(self.lines(transport)[0].startswith(b"+OK Logged in"))

    def test_apop_timestamp_is_random(self):
        """The APOP timestamp shows neither the process id nor a clock: a random token."""
        self.factory.config = self.config.replace(auth_apop=True)
        stamps = set()
        for _ in range(2):
            proto, transport = self.connect()
            stamp = re.search(rb"<([^>@]+)@", self.received(transport)).group(1)
            # Not RFC 1939's example form <process-id.clock@host>: 32 random hex digits.
            self.assertFalse(stamp.startswith(b"%d." % os.getpid()), stamp)
            self.assertRegex(stamp, rb"^[0-9a-f]{32}$")
            stamps.add(stamp)
        self.assertEqual(len(stamps), 2)

    def test_apop_wrong_digest(self):
        """A wrong APOP digest fails like a wrong password."""
        self.factory.config = self.config.replace(auth_apop=True)
        proto, transport = self.connect()
        self.received(transport)
        proto.dataReceived(b"APOP alice " + b"0" * 32 + b"\r\n")
        self.clock.advance(1)
        self.assertEqual(self.lines(transport), [Reply.AUTH_FAILED])


class FailureDelayTests(POP3TestCase):
    """Failed logins slow down per address, without holding up other sessions."""

    config = POP3TestCase.config.replace(pop3_failure_delay=1.0, pop3_failure_delay_max=15.0)

    def fail_once(self, proto, transport):
        proto.dataReceived(b"USER alice\r\nPASS wrong\r\n")
        waited = 0
        while Reply.AUTH_FAILED not in self.received(transport):
            self.clock.advance(0.5)
            waited += 0.5
        return waited

    def test_delay_doubles_up_to_cap(self):
        """Each failure from one address doubles the delay: 1, 2, 4, 8, then 15 s at most."""
        delays = [self.fail_once(self.proto, self.transport) for _ in range(6)]
        self.assertEqual(delays, [1, 2, 4, 8, 15, 15])

    def test_other_sessions_not_held_up(self):
        """While one address waits out its delay, a session from another logs in at once."""
        for _ in range(4):
            self.fail_once(self.proto, self.transport)
        self.proto.dataReceived(b"USER alice\r\nPASS wrong\r\n")
        self.peer = IPv4Address("TCP", "192.0.2.99", 1)
        proto2, transport2 = self.connect()
        self.login(proto=proto2, transport=transport2)

    def test_success_resets_the_count(self):
        """A successful login from an address resets its delay."""
        self.fail_once(self.proto, self.transport)
        self.fail_once(self.proto, self.transport)
        self.login()
        self.send(b"QUIT\r\n")
        proto, transport = self.connect()
        self.received(transport)
        self.assertEqual(self.fail_once(proto, transport), 1)

    def test_memory_is_bounded(self):
        """The table of failing addresses never grows past its limit."""
        self.factory.throttle.max_peers = 5
        for i in range(20):
            self.peer = IPv4Address("TCP", f"192.0.2.{100 + i}", 1)
            proto, transport = self.connect()
            self.fail_once(proto, transport)
        self.assertEqual(len(self.factory.throttle), 5)


class LimitTests(POP3TestCase):
    """Limits on connections, bad commands, failed logins and slow clients."""

    config = POP3TestCase.config.replace(
        pop3_max_connections=4,
        pop3_max_connections_per_peer=2,
        pop3_max_bad_commands=3,
        pop3_max_failures=3,
        pop3_login_timeout=1000,
    )

    def test_over_long_lines_count_as_bad_commands(self):
        """Over-long lines in a row close the session like other bad commands."""
        self.received()
        self.send((b"X" * 300 + b"\r\n") * 10)
        self.assertEqual(self.lines(), [Reply.LINE_TOO_LONG] * 3 + [Reply.TOO_MANY_BAD_COMMANDS])
        self.assertTrue(self.transport.disconnecting)

    def test_unread_replies_stop_the_reading(self):
        """A client that sends commands but reads no replies is no longer read from.

        The transport's buffer filling up (it pauses the producer) holds the
        commands; they run again once the client reads.
        """
        proto, transport = self.connect(PausingTransport)
        transport.clear()
        proto.dataReceived(b"CAPA\r\n" * 20000)
        self.assertEqual(transport.value().count(b"\r\n.\r\n"), 1)
        self.assertEqual(transport.producerState, "paused")
        transport.clear()
        transport.producer.resumeProducing()
        self.assertEqual(transport.value().count(b"\r\n.\r\n"), 1)

    def test_timeout_aborts_a_client_that_does_not_read(self):
        """At the timeout, a session whose replies back up is aborted, not closed politely."""
        proto, transport = self.connect(PausingTransport)
        proto.dataReceived(b"CAPA\r\n" * 20000)
        before = transport.value()
        self.clock.advance(self.config.pop3_login_timeout)
        self.assertTrue(transport.disconnected)
        self.assertEqual(transport.value(), before)

    def test_refused_connection_is_closed_without_waiting(self):
        """Over the limit, a connection whose first write cannot leave (TLS not yet
        negotiated) is aborted at once instead of waiting for the handshake."""
        self.connect()

        class Unwritable(PausingTransport):
            limit = 0

        self.connect(Unwritable)
        proto, transport = self.connect(Unwritable)
        self.assertTrue(transport.disconnected)

    def test_connections_per_peer(self):
        """A peer over its connection limit gets -ERR [SYS/TEMP] and is closed."""
        proto2, transport2 = self.connect()
        proto3, transport3 = self.connect()
        self.assertEqual(self.lines(transport3), [Reply.TOO_MANY_CONNECTIONS])
        self.assertTrue(transport3.disconnecting)
        proto3.connectionLost(None)
        proto2.connectionLost(None)
        proto4, transport4 = self.connect()
        self.assertFalse(transport4.disconnecting)

    def test_connections_in_all(self):
        """Past the total limit, any peer is refused; a closed session frees its place."""
        sessions = []
        for i in range(3):
            self.peer = IPv4Address("TCP", f"192.0.2.{10 + i}", 1)
            sessions.append(self.connect())
        self.peer = IPv4Address("TCP", "192.0.2.50", 1)
        proto, transport = self.connect()
        self.assertEqual(self.lines(transport), [Reply.TOO_MANY_CONNECTIONS])
        proto.connectionLost(None)
        sessions[0][0].connectionLost(None)
        proto, transport = self.connect()
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.factory.limiter.open, 4)

    def test_descriptors_kept_in_reserve(self):
        """A connection that would leave POP3 short of free descriptors is refused."""

        class Numbered(StringTransport):
            def fileno(self):
                return 95

        self.factory.limiter.file_limit = lambda: 100
        proto, transport = self.connect(Numbered)
        self.assertEqual(self.lines(transport), [Reply.TOO_MANY_CONNECTIONS])
        self.assertTrue(transport.disconnecting)

    def test_bad_commands_in_a_row_close(self):
        """After too many bad commands in a row, the server says so and hangs up."""
        self.send(b"FOO\r\nBAR\r\nNOOP\r\n")
        self.assertEqual(
            self.lines(),
            [Reply.UNKNOWN, Reply.UNKNOWN, Reply.WRONG_STATE, Reply.TOO_MANY_BAD_COMMANDS],
        )
        self.assertTrue(self.transport.disconnecting)

    def test_a_good_command_resets_the_count(self):
        """A successful command in between starts the count of bad ones afresh."""
        self.send(b"FOO\r\nBAR\r\nUSER alice\r\nFOO\r\nBAR\r\n")
        self.assertEqual(
            self.lines(), [Reply.UNKNOWN, Reply.UNKNOWN, b"+OK", Reply.UNKNOWN, Reply.UNKNOWN]
        )
        self.assertFalse(self.transport.disconnecting)
        self.send(b"BAZ\r\nCAPA\r\n")
        self.assertEqual(self.lines(), [Reply.UNKNOWN, Reply.TOO_MANY_BAD_COMMANDS])
        self.assertTrue(self.transport.disconnecting)

    def test_failed_logins_then_refusal(self):
        """After too many failures an address is refused even with the right password."""
        for _ in range(3):
            self.send(b"USER alice\r\nPASS wrong\r\n")
            self.clock.advance(15)
        self.received()
        self.send(b"USER alice\r\nPASS secret\r\n")
        self.clock.advance(15)
        self.assertEqual(self.lines(), [b"+OK", Reply.TOO_MANY_FAILURES])
        self.assertFalse(self.store.is_locked("alice"))
        self.clock.advance(throttle.FAILURE_MEMORY + 1)
        self.login()

    def test_slowloris_dropped_by_login_timer(self):
        """Commands before login do not restart the login timer."""
        for _ in range(9):
            self.clock.advance(self.config.pop3_login_timeout / 10)
            self.send(b"CAPA\r\n")
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(self.config.pop3_login_timeout / 10 + 0.001)
        self.assertTrue(self.transport.disconnecting)

    def test_sasl_answers_do_not_restart_the_login_timer(self):
        """Answers to SASL challenges before login leave the login timer running."""
        self.send(b"AUTH LOGIN\r\n")
        self.clock.advance(self.config.pop3_login_timeout - 1)
        self.send(b64(b"alice") + b"\r\n")
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)

    def test_dribbled_bytes_do_not_keep_a_session(self):
        """A client sending one byte at a time never resets the timers."""
        self.login()
        for _ in range(10):
            self.send(b"N")
            self.clock.advance(60)
        self.assertTrue(self.transport.disconnecting)


class AuthorizationTests(POP3TestCase):
    def test_user_pass_logs_in(self):
        """USER then PASS with the right password enters TRANSACTION."""
        self.assert_reply(b"USER alice\r\n", [b"+OK"])
        self.send(b"PASS secret\r\n")
        self.assertEqual(
            self.lines(),
            [
                b"+OK Logged in, 3 messages (%d octets)."
                % (len(wire(MSG1)) + len(wire(MSG2)) + len(wire(MSG3)))
            ],
        )
        self.assertEqual(self.proto.state, pop3.TRANSACTION)

    def test_commands_are_case_insensitive(self):
        """Command keywords match in any case (RFC 1939 section 3)."""
        self.send(b"user alice\r\npAsS secret\r\nstat\r\n")
        self.assertEqual(
            self.lines()[-1], b"+OK 3 %d" % (len(wire(MSG1)) + len(wire(MSG2)) + len(wire(MSG3)))
        )

    def test_wrong_password_fails_after_delay(self):
        """A wrong password gets -ERR [AUTH], only after the failure delay."""
        self.send(b"USER alice\r\nPASS wrong\r\n")
        self.assertEqual(self.lines(), [b"+OK"])
        self.clock.advance(0.9)
        self.assertEqual(self.lines(), [])
        self.clock.advance(0.1)
        self.assertEqual(self.lines(), [Reply.AUTH_FAILED])
        self.assertEqual(self.proto.state, pop3.AUTHORIZATION)

    def test_unknown_user_looks_like_wrong_password(self):
        """An unknown user gets the same +OK to USER and the same reply and delay to PASS."""
        self.send(b"USER mallory\r\nPASS secret\r\n")
        self.assertEqual(self.lines(), [b"+OK"])
        self.clock.advance(0.9)
        self.assertEqual(self.lines(), [])
        self.clock.advance(0.1)
        self.assertEqual(self.lines(), [Reply.AUTH_FAILED])

    def test_client_may_retry_after_failure(self):
        """After a failed login the session stays in AUTHORIZATION and may try again."""
        self.send(b"USER alice\r\nPASS wrong\r\n")
        self.clock.advance(1)
        self.login()
        self.assertEqual(self.proto.state, pop3.TRANSACTION)

    def test_pass_needs_user(self):
        """PASS without a preceding USER is refused."""
        self.assert_reply(b"PASS secret\r\n", [Reply.USER_FIRST])

    def test_user_needs_a_name(self):
        """USER without a name is refused."""
        self.assert_reply(b"USER\r\n", [Reply.BAD_USER])

    def test_password_keeps_spaces(self):
        """Everything after "PASS " is the password, spaces included."""
        self.portal.checkers[
            InMemoryUsernamePasswordDatabaseDontUse.credentialInterfaces[0]
        ].addUser(b"carol", b" pass word ")
        self.store.mailboxes["carol"] = []
        self.login(b"carol", b" pass word ")

    def test_undecodable_user_name_fails_like_a_bad_password(self):
        """A user name that is not UTF-8 fails like any bad credentials."""
        self.send(b"USER \xff\xfe\r\nPASS x\r\n")
        self.clock.advance(1)
        self.assertEqual(self.lines(), [b"+OK", Reply.AUTH_FAILED])

    def test_locked_maildrop_is_in_use(self):
        """A second session for a maildrop in use gets -ERR [IN-USE]."""
        self.login()
        proto2, transport2 = self.connect()
        self.received(transport2)
        proto2.dataReceived(b"USER alice\r\nPASS secret\r\n")
        self.assertEqual(self.lines(transport2), [b"+OK", Reply.IN_USE])
        self.assertEqual(proto2.state, pop3.AUTHORIZATION)

    def test_user_database_down_is_temporary_failure(self):
        """When the user database cannot be read, the reply is -ERR [SYS/TEMP]."""
        checker = ControlledChecker()
        self.factory.portal = Portal(MaildropRealm(self.store), [checker])
        self.send(b"USER alice\r\nPASS secret\r\n")
        checker.pending[0][1].errback(UserDBUnavailable())
        self.assertEqual(self.lines(), [b"+OK", Reply.TEMP_FAILURE])

    def test_shared_counters_down_is_temporary_failure(self):
        """When the throttle's shared store cannot be reached, the login gets -ERR
        [SYS/TEMP] unverified, logged as state-unavailable, and the next login goes on."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        memory = self.factory.throttle

        class Unreachable(throttle.MemoryLoginThrottle):
            def begin(self, peer, user):
                return defer.fail(SharedStateUnavailable("the database is down"))

        self.factory.throttle = Unreachable(self.clock)
        self.send(b"USER alice\r\nPASS secret\r\n")
        self.assertEqual(self.lines(), [b"+OK", Reply.TEMP_FAILURE])
        failed = [e for e in events if e["log_format"].startswith("pop3.login_failed")]
        self.assertEqual([e["reason"] for e in failed], ["state-unavailable"])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.factory.throttle = memory
        self.send(b"USER alice\r\nPASS secret\r\n")
        self.assertEqual(self.lines()[-1][:3], b"+OK")

    def test_login_delay_enforced(self):
        """With LOGIN-DELAY, a second login within the delay is refused with its code."""
        # The second session waits 61 s before logging in: longer than a login may take.
        self.factory.config = self.config.replace(pop3_login_delay=60, pop3_login_timeout=100)
        self.login()
        self.send(b"QUIT\r\n")
        proto2, transport2 = self.connect()
        self.received(transport2)
        self.clock.advance(30)
        proto2.dataReceived(b"USER alice\r\nPASS secret\r\n")
        self.assertEqual(self.lines(transport2), [b"+OK", Reply.LOGIN_DELAY])
        self.assertFalse(self.store.is_locked("alice"))
        self.clock.advance(31)
        self.login(proto=proto2, transport=transport2)


class WrongInputTests(POP3TestCase):
    def test_unknown_command(self):
        """An unknown command gets -ERR and the session goes on."""
        self.assert_reply(b"XYZZY\r\nNOOP\r\n", [Reply.UNKNOWN, Reply.WRONG_STATE])

    def test_transaction_command_before_login(self):
        """STAT, RETR and friends are refused in AUTHORIZATION."""
        for command in (b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"UIDL", b"TOP 1 1", b"RSET"):
            self.assert_reply(command + b"\r\n", [Reply.WRONG_STATE])

    def test_authorization_command_after_login(self):
        """USER and PASS are refused in TRANSACTION."""
        self.login()
        self.assert_reply(b"USER bob\r\nPASS x\r\n", [Reply.WRONG_STATE, Reply.WRONG_STATE])

    def test_overlong_line(self):
        """A line over 255 octets gets -ERR and the next command still works."""
        self.assert_reply(
            b"NOOP " + b"x" * 300 + b"\r\nUSER alice\r\n", [Reply.LINE_TOO_LONG, b"+OK"]
        )

    def test_overlong_line_in_pieces(self):
        """An over-long line arriving in pieces is answered once, when it ends."""
        self.received()
        for _ in range(10):
            self.send(b"y" * 100)
        self.assertEqual(self.lines(), [])
        self.send(b"yyy\r\nUSER x\r\n")
        self.assertEqual(self.lines(), [Reply.LINE_TOO_LONG, b"+OK"])

    def test_line_of_255_octets_is_accepted(self):
        """A command line of exactly 255 octets with its CRLF is within the limit."""
        self.assert_reply(b"USER " + b"u" * 248 + b"\r\n", [b"+OK"])

    def test_bare_lf_ends_a_line(self):
        """A client sending bare LF line ends is understood."""
        self.assert_reply(b"USER alice\n", [b"+OK"])

    def test_empty_line(self):
        """An empty line is an unknown command."""
        self.assert_reply(b"\r\n", [Reply.UNKNOWN])


class TransactionTests(POP3TestCase):
    def setUp(self):
        super().setUp()
        self.login()

    def test_stat(self):
        """STAT answers the count and total size of messages not deleted."""
        total = len(wire(MSG1)) + len(wire(MSG2)) + len(wire(MSG3))
        self.assert_reply(b"STAT\r\n", [b"+OK 3 %d" % total])

    def test_list_all(self):
        """LIST answers one "number size" line per message, sizes with CRLF line ends."""
        total = len(wire(MSG1)) + len(wire(MSG2)) + len(wire(MSG3))
        self.assert_reply(
            b"LIST\r\n",
            [
                b"+OK 3 messages (%d octets)" % total,
                b"1 %d" % len(wire(MSG1)),
                b"2 %d" % len(wire(MSG2)),
                b"3 %d" % len(wire(MSG3)),
                b".",
            ],
        )

    def test_list_one(self):
        """LIST n answers that message's size on one line."""
        self.assert_reply(b"LIST 2\r\n", [b"+OK 2 %d" % len(wire(MSG2))])

    def test_bad_message_numbers(self):
        """Missing, non-numeric, signed, zero, huge and out-of-range numbers get -ERR."""
        cases = {
            b"RETR": Reply.NO_MESSAGE_NUMBER,
            b"RETR x": Reply.BAD_MESSAGE_NUMBER,
            b"RETR -1": Reply.BAD_MESSAGE_NUMBER,
            b"RETR +1": Reply.BAD_MESSAGE_NUMBER,
            b"RETR 1x": Reply.BAD_MESSAGE_NUMBER,
            b"RETR 0": Reply.NO_SUCH_MESSAGE,
            b"RETR 4": Reply.NO_SUCH_MESSAGE,
            b"RETR 99999999999999999999": Reply.BAD_MESSAGE_NUMBER,
            b"LIST 4": Reply.NO_SUCH_MESSAGE,
            b"LIST 1 2": Reply.BAD_ARGUMENTS,
            b"DELE": Reply.NO_MESSAGE_NUMBER,
            b"UIDL 0": Reply.NO_SUCH_MESSAGE,
            b"TOP 1": Reply.BAD_ARGUMENTS,
            b"TOP 1 x": Reply.BAD_LINE_COUNT,
            b"TOP 1 -1": Reply.BAD_LINE_COUNT,
            b"STAT 1": Reply.BAD_ARGUMENTS,
        }
        for command, reply in cases.items():
            self.assert_reply(command + b"\r\n", [reply])
        self.assert_reply(b"NOOP\r\n", [b"+OK"])

    def test_uidl(self):
        """UIDL lists the unique ids; UIDL n gives one."""
        uidls = [uidl.encode() for uidl, _ in self.proto.maildrop.messages()]
        self.assert_reply(
            b"UIDL\r\n", [b"+OK", b"1 " + uidls[0], b"2 " + uidls[1], b"3 " + uidls[2], b"."]
        )
        self.assert_reply(b"UIDL 3\r\n", [b"+OK 3 " + uidls[2]])

    def test_retr_crlf_and_dot_stuffing(self):
        """RETR sends CRLF line ends, stuffs dot-led lines, and ends with a lone dot."""
        self.received()
        self.send(b"RETR 1\r\n")
        self.assertEqual(
            self.received(),
            b"+OK %d octets\r\n"
            % len(wire(MSG1))
            + b"From: a@example.org\r\nSubject: one\r\n\r\nHello\r\n"
            b"..\r\n...two dots\r\n.\r\n",
        )

    def test_retr_size_matches_list(self):
        """What RETR sends before the terminator, un-stuffed, is exactly LIST's size."""
        for number, message in ((1, MSG1), (2, MSG2), (3, MSG3)):
            self.received()
            self.send(b"RETR %d\r\n" % number)
            first, _, body = self.received().partition(b"\r\n")
            self.assertEqual(first, b"+OK %d octets" % len(wire(message)))
            body = body.replace(b"\r\n..", b"\r\n.")
            self.assertTrue(body.endswith(b"\r\n.\r\n"))
            body = body[:-3]
            if not message.endswith(b"\n"):
                # The line end added before the terminator is not part of the message.
                body = body[:-2]
            self.assertEqual(body, wire(message))

    def test_retr_without_final_newline(self):
        """A message not ending in a newline still gets the terminator on its own line."""
        self.received()
        self.send(b"RETR 3\r\n")
        self.assertTrue(self.received().endswith(b"no final newline\r\n.\r\n"))

    def test_top_headers_only(self):
        """TOP n 0 sends the header and the blank line."""
        self.received()
        self.send(b"TOP 2 0\r\n")
        self.assertEqual(self.received(), b"+OK\r\nSubject: two\r\n\r\n.\r\n")

    def test_top_some_lines(self):
        """TOP n k sends the header and k body lines."""
        self.received()
        self.send(b"TOP 2 2\r\n")
        self.assertEqual(self.received(), b"+OK\r\nSubject: two\r\n\r\nline 1\r\nline 2\r\n.\r\n")

    def test_top_beyond_the_body_sends_it_all(self):
        """TOP n k with k past the end sends the whole message, as fetchmail needs."""
        self.received()
        self.send(b"TOP 1 99999999\r\n")
        self.assertEqual(
            self.received(),
            b"+OK\r\nFrom: a@example.org\r\nSubject: one\r\n\r\n"
            b"Hello\r\n..\r\n...two dots\r\n.\r\n",
        )

    def test_dele_marks_only(self):
        """DELE marks a message: it leaves LIST, STAT and UIDL and refuses RETR, LIST n, TOP."""
        self.assert_reply(b"DELE 2\r\n", [b"+OK Message 2 deleted."])
        for command in (b"RETR 2", b"LIST 2", b"TOP 2 0", b"DELE 2", b"UIDL 2"):
            self.assert_reply(command + b"\r\n", [Reply.DELETED])
        self.received()
        self.send(b"LIST\r\n")
        listing = self.lines()
        self.assertEqual(listing[1:], [b"1 %d" % len(wire(MSG1)), b"3 %d" % len(wire(MSG3)), b"."])
        self.assertEqual(len(self.store.mailboxes["alice"]), 3)

    def test_rset_undeletes(self):
        """RSET unmarks every deleted message."""
        self.send(b"DELE 1\r\nDELE 3\r\n")
        self.assert_reply(
            b"RSET\r\n",
            [
                b"+OK 3 messages (%d octets)."
                % (len(wire(MSG1)) + len(wire(MSG2)) + len(wire(MSG3)))
            ],
        )
        self.assert_reply(b"LIST 1\r\n", [b"+OK 1 %d" % len(wire(MSG1))])

    def test_noop(self):
        """NOOP answers +OK."""
        self.assert_reply(b"NOOP\r\n", [b"+OK"])

    def test_quit_commits_deletions(self):
        """QUIT from TRANSACTION removes the marked messages, then answers +OK and closes."""
        self.send(b"DELE 1\r\nDELE 3\r\n")
        self.assert_reply(b"QUIT\r\n", [b"+OK Logging out, 2 messages deleted."])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.store.mailboxes["alice"], [MSG2])
        self.assertFalse(self.store.is_locked("alice"))

    def test_drop_deletes_nothing(self):
        """A dropped connection deletes nothing and releases the lock."""
        self.send(b"DELE 1\r\nDELE 2\r\n")
        self.proto.connectionLost(None)
        self.assertEqual(len(self.store.mailboxes["alice"]), 3)
        self.assertFalse(self.store.is_locked("alice"))

    def test_timeout_deletes_nothing(self):
        """The autologout timer closes the session without deleting anything."""
        self.send(b"DELE 1\r\n")
        self.clock.advance(599)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.lines()[-1], Reply.TIMEOUT)
        self.proto.connectionLost(None)
        self.assertEqual(len(self.store.mailboxes["alice"]), 3)

    def test_commit_failure(self):
        """When deleted messages cannot be removed, QUIT answers -ERR (RFC 1939 section 6)."""
        self.proto.maildrop.commit = lambda deleted, _retrieved: defer.fail(
            CommitFailed(len(deleted))
        )
        self.send(b"DELE 1\r\n")
        self.assert_reply(b"QUIT\r\n", [Reply.COMMIT_FAILED])
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.store.is_locked("alice"))

    def test_unreadable_message(self):
        """A message that cannot be read gets -ERR [SYS/PERM]; the others still come."""
        opened = self.proto.maildrop.open

        def open_but_one(index):
            if index == 1:
                raise PermissionError("unreadable")
            return opened(index)

        self.proto.maildrop.open = open_but_one
        self.assert_reply(b"RETR 2\r\n", [Reply.UNREADABLE])
        self.received()
        self.send(b"RETR 1\r\n")
        self.assertTrue(self.received().endswith(b"\r\n.\r\n"))

    def test_snapshot_is_fixed(self):
        """Mail arriving during a session is not in its snapshot (numbers stay stable)."""
        self.store.mailboxes["alice"].append(b"Subject: late\n\nhi\n")
        self.assert_reply(b"LIST 4\r\n", [Reply.NO_SUCH_MESSAGE])


class PipeliningTests(POP3TestCase):
    def test_commands_in_one_packet_answered_in_order(self):
        """Many commands in one packet are answered in order (RFC 2449 PIPELINING)."""
        checker = ControlledChecker()
        self.factory.portal = Portal(MaildropRealm(self.store), [checker])
        self.received()
        self.send(b"USER alice\r\nPASS secret\r\nSTAT\r\nLIST 1\r\nNOOP\r\n")
        self.assertEqual(self.lines(), [b"+OK"])
        checker.pending[0][1].callback("alice")
        replies = self.lines()
        self.assertTrue(replies[0].startswith(b"+OK Logged in"))
        self.assertEqual(replies[1][:6], b"+OK 3 ")
        self.assertEqual(replies[2:], [b"+OK 1 %d" % len(wire(MSG1)), b"+OK"])

    def test_commands_wait_for_a_streaming_retr(self):
        """Commands sent during a RETR are answered after its terminator."""
        big = b"Subject: big\n\n" + b"x" * 70 + b"\n" + b".line\n" * 5000
        self.patch(wire_form, "CHUNK_SIZE", 4096)
        self.store.mailboxes["bob"] = [big]
        proto, transport = self.connect(PausingTransport)
        self.login(b"bob", b"hunter2", proto=proto, transport=transport)
        proto.dataReceived(b"RETR 1\r\nNOOP\r\nSTAT\r\n")
        out = transport.value()
        self.assertNotIn(b"\r\n.\r\n", out)
        while proto.flow.stream is not None:
            transport.clear()
            transport.producer.resumeProducing()
            out += transport.value()
        # The client reads the end of the message; only then do the next replies go out.
        transport.clear()
        transport.producer.resumeProducing()
        out += transport.value()
        transport.clear()
        body, _, rest = out.partition(b"\r\n.\r\n")
        self.assertEqual(rest, b"+OK\r\n+OK 1 %d\r\n" % len(wire(big)))
        self.assertEqual(
            body.split(b"\r\n", 1)[1].replace(b"\r\n..", b"\r\n.") + b"\r\n", wire(big)
        )

    def test_thousands_of_commands_in_one_packet(self):
        """Every one of thousands of commands in one packet gets its reply, in order."""
        self.login()
        self.send(b"".join(b"LIST %d\r\n" % (i % 3 + 1) for i in range(6000)))
        replies = self.lines()
        self.assertEqual(len(replies), 6000)
        self.assertEqual(
            replies[3:6],
            [
                b"+OK 1 %d" % len(wire(MSG1)),
                b"+OK 2 %d" % len(wire(MSG2)),
                b"+OK 3 %d" % len(wire(MSG3)),
            ],
        )

    def test_login_failure_holds_pipelined_commands(self):
        """Commands pipelined after a bad PASS wait for its delayed reply."""
        self.received()
        self.send(b"USER alice\r\nPASS bad\r\nUSER alice\r\nPASS secret\r\nSTAT\r\n")
        self.assertEqual(self.lines(), [b"+OK"])
        self.clock.advance(1)
        replies = self.lines()
        self.assertEqual(replies[0], Reply.AUTH_FAILED)
        self.assertEqual(replies[1], b"+OK")
        self.assertTrue(replies[2].startswith(b"+OK Logged in"))
        self.assertTrue(replies[3].startswith(b"+OK 3 "))


class StreamingTests(POP3TestCase):
    def test_retr_reads_in_chunks_with_backpressure(self):
        """RETR of a large message reads a chunk at a time and stops when the buffer is full."""
        big = b"Subject: big\n\n" + (b"y" * 999 + b"\n") * 1000
        self.store.mailboxes["bob"] = [big]
        proto, transport = self.connect(PausingTransport)
        self.login(b"bob", b"hunter2", proto=proto, transport=transport)
        reads = []
        opened = proto.maildrop.open

        def spy_open(index):
            source = opened(index)
            real_read = source.read

            def read(n=-1):
                reads.append(n)
                return real_read(n)

            source.read = read
            return source

        proto.maildrop.open = spy_open
        self.patch(wire_form, "CHUNK_SIZE", 4096)
        proto.dataReceived(b"RETR 1\r\n")
        # One chunk fills the buffer: the next waits until the client reads.
        self.assertEqual(reads, [4096])
        self.assertIsNotNone(proto.flow.stream)
        got = transport.value()
        while proto.flow.stream is not None:
            transport.clear()
            transport.producer.resumeProducing()
            got += transport.value()
        self.assertTrue(all(n == 4096 for n in reads))
        self.assertGreater(len(reads), len(big) // 4096)
        self.assertTrue(got.endswith(b"\r\n.\r\n"))

    def test_reader_that_stops_is_aborted(self):
        """A client that stops reading mid-RETR is cut off at the timeout, nothing appended."""
        self.store.mailboxes["bob"] = [b"x" * 300000]
        proto, transport = self.connect(PausingTransport)
        self.login(b"bob", b"hunter2", proto=proto, transport=transport)
        aborted = []
        transport.abortConnection = lambda: aborted.append(True)
        proto.dataReceived(b"RETR 1\r\n")
        sent = transport.value()
        self.clock.advance(self.config.pop3_timeout)
        self.assertEqual(aborted, [True])
        self.assertEqual(transport.value(), sent)

    def test_disconnect_during_retr_closes_the_file(self):
        """A client that goes away mid-RETR leaves no open file and no lock."""
        self.store.mailboxes["bob"] = [b"x" * 300000]
        proto, transport = self.connect(PausingTransport)
        self.login(b"bob", b"hunter2", proto=proto, transport=transport)
        proto.dataReceived(b"RETR 1\r\n")
        streamer = proto.flow.stream
        proto.connectionLost(None)
        self.assertTrue(streamer._source.closed)
        self.assertFalse(self.store.is_locked("bob"))


class TimeoutTests(POP3TestCase):
    def test_login_timer_is_shorter(self):
        """Before login, the session is dropped after the shorter login timeout."""
        self.clock.advance(self.config.pop3_login_timeout - 1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)

    def test_activity_resets_timer(self):
        """Each command restarts the autologout timer."""
        self.login()
        self.clock.advance(500)
        self.send(b"NOOP\r\n")
        self.clock.advance(500)
        self.assertFalse(self.transport.disconnecting)


class LoggingTests(POP3TestCase):
    def test_login_and_logout_are_logged(self):
        """A login and a logout each log one event with the user, the peer and counts."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.login()
        self.send(b"RETR 1\r\nDELE 1\r\nQUIT\r\n")
        formats = [e["log_format"].split(":")[0] for e in events]
        self.assertIn("pop3.login", formats)
        logout = [e for e in events if e["log_format"].startswith("pop3.logout")][0]
        self.assertEqual(
            (logout["user"], logout["peer"], logout["retrieved"], logout["deleted"]),
            ("alice", "192.0.2.7", 1, 1),
        )

    def test_one_event_per_command_at_debug(self):
        """With log_level = debug, each command is one event: name, masked arguments,
        OK/ERR and octets; the password never appears."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.factory.config = self.config.replace(log_level="debug")
        self.send(b"USER alice\r\nPASS secret\r\nSTAT\r\nRETR 9\r\nRETR 1\r\n")
        commands = [e for e in events if e["log_format"].startswith("pop3.command")]
        self.assertEqual(
            [(e["command"], e["args"], e["result"]) for e in commands],
            [
                ("USER", "alice", "OK"),
                ("PASS", "***", "OK"),
                ("STAT", "", "OK"),
                ("RETR", "9", "ERR"),
                ("RETR", "1", "OK"),
            ],
        )
        self.assertEqual(commands[0]["octets_in"], len(b"USER alice\r\n"))
        retr = b"+OK %d octets\r\n" % len(wire(MSG1)) + wire(MSG1).replace(b"\n.", b"\n..")
        self.assertEqual(commands[-1]["octets_out"], len(retr + b".\r\n"))
        self.assertNotIn("secret", repr(commands))
        self.assertTrue(all(e["log_level"].name == "debug" for e in commands))

    def test_no_command_events_by_default(self):
        """At the default log level, commands log nothing: the log stays quiet."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.login()
        self.send(b"STAT\r\nNOOP\r\n")
        self.assertEqual([e for e in events if e["log_format"].startswith("pop3.command")], [])

    def test_failed_login_logged_without_password(self):
        """A failed login logs the peer, the user and the reason, never the password."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.send(b"USER alice\r\nPASS topsecret\r\n")
        failed = [e for e in events if e["log_format"].startswith("pop3.login_failed")]
        self.assertEqual(len(failed), 1)
        self.assertEqual(
            (failed[0]["user"], failed[0]["peer"], failed[0]["reason"]),
            ("alice", "192.0.2.7", "bad-credentials"),
        )
        self.assertNotIn("topsecret", repr(failed[0]))


class WireEncoderTests(unittest.TestCase):
    def encode(self, chunks):
        encoder = WireEncoder()
        return b"".join(encoder.encode(c) for c in chunks) + encoder.finish()

    def test_crlf_split_across_chunks(self):
        """A CRLF split between two reads stays one line end."""
        self.assertEqual(self.encode([b"a\r", b"\nb\n"]), b"a\r\nb\r\n.\r\n")

    def test_dot_at_chunk_start(self):
        """A dot-led line starting a new chunk is stuffed."""
        self.assertEqual(self.encode([b"a\n", b".b\n"]), b"a\r\n..b\r\n.\r\n")

    def test_dot_first_in_message(self):
        """A message whose first line starts with a dot is stuffed."""
        self.assertEqual(self.encode([b".x"]), b"..x\r\n.\r\n")

    def test_lone_dot_line(self):
        """A line holding only a dot becomes two dots."""
        self.assertEqual(self.encode([b"a\n.\nb\n"]), b"a\r\n..\r\nb\r\n.\r\n")

    def test_empty_message(self):
        """An empty message is just the terminator."""
        self.assertEqual(self.encode([]), b".\r\n")


class TopLimiterTests(unittest.TestCase):
    def run_top(self, message, lines, size):
        limiter = TopLimiter(lines)
        out = b""
        for i in range(0, len(message), size):
            part, done = limiter.feed(message[i : i + size])
            out += part
            if done:
                break
        return out

    def test_header_end_split_across_chunks(self):
        """The blank line ending the header is found whatever the chunking."""
        message = b"A: 1\r\nB: 2\r\n\r\nbody 1\r\nbody 2\r\n"
        for size in range(1, len(message) + 1):
            self.assertEqual(self.run_top(message, 1, size), b"A: 1\r\nB: 2\r\n\r\nbody 1\r\n")

    def test_no_body(self):
        """A message with no blank line passes whole."""
        self.assertEqual(self.run_top(b"A: 1\nB: 2\n", 0, 3), b"A: 1\nB: 2\n")
