"""Tests for popserv.ticketkeys: contexts that share a ``TicketKeyRing`` resume each
other's TLS sessions, across rotations and reloads, as the workers of one server do.

Each handshake runs in memory: Python's ``ssl`` module is the client (it says whether
the session was resumed), a pyOpenSSL connection of popserv's context the server.
"""

from __future__ import annotations

import os
import ssl

from OpenSSL import SSL
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from popserv import ticketkeys, tls
from popserv.ticketkeys import KEY_SIZE, TicketKeyRing, TicketKeys

VERSIONS = (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2)


def require_shared_ticket_keys() -> None:
    """Skip where this Python's cryptography keeps its OpenSSL out of reach; in CI fail."""
    reason = ticketkeys.unavailable()
    if reason is None:
        return
    message = (
        f"TLS ticket keys cannot be shared here: {reason}. Install cryptography as PyPI "
        "publishes it, or built against the system's OpenSSL: "
        "python3 -m pip install --no-binary cryptography 'cryptography>=42'"
    )
    if os.environ.get("CI") == "true":
        raise AssertionError(message)
    raise SkipTest(message)


def client_context(version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = version
    return context


def connect(server: SSL.Context, client: ssl.SSLContext, session=None):
    """One TLS connection in memory, through to the first reply (which carries a TLS 1.3
    server's tickets): whether it resumed ``session``, and the session to offer next."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    ours = client.wrap_bio(incoming, outgoing, server_hostname="localhost", session=session)
    theirs = SSL.Connection(server, None)
    theirs.set_accept_state()

    def carry() -> None:
        data = outgoing.read()
        if data:
            theirs.bio_write(data)
        try:
            incoming.write(theirs.bio_read(65536))
        except SSL.WantReadError:
            pass

    done = {"client": False, "server": False}
    for _ in range(10):
        for side, handshake, want in (
            ("client", ours.do_handshake, ssl.SSLWantReadError),
            ("server", theirs.do_handshake, SSL.WantReadError),
        ):
            if not done[side]:
                try:
                    handshake()
                    done[side] = True
                except want:
                    pass
            carry()
        if all(done.values()):
            break
    theirs.send(b"+OK\r\n")
    carry()
    if ours.read(5) != b"+OK\r\n":
        raise AssertionError("no reply over TLS")
    return ours.session_reused, ours.session


class TicketKeysTests(SynchronousTestCase):
    """The keys as the supervisor makes, rotates and sends them."""

    def test_rotation_keeps_the_current_key_as_the_previous(self):
        """A rotation makes a new current key; the old current one still opens tickets,
        the one before it no longer."""
        first = TicketKeys.make()
        second = first.rotated()
        third = second.rotated()
        self.assertEqual(len(first.current), KEY_SIZE)
        self.assertEqual(second.previous, first.current)
        self.assertEqual(third.previous, second.current)
        self.assertNotIn(first.current, (third.current, third.previous))

    def test_bytes_round_trip(self):
        """Keys travel as bytes, with or without a previous key; a torn frame is refused."""
        for keys in (TicketKeys.make(), TicketKeys.make().rotated()):
            self.assertEqual(TicketKeys.from_bytes(keys.to_bytes()), keys)
        self.assertRaises(ValueError, TicketKeys.from_bytes, b"x" * (KEY_SIZE + 1))


class SharingTests(SynchronousTestCase):
    """Two contexts of the same ring stand for two workers of one server."""

    def setUp(self):
        require_shared_ticket_keys()
        directory = os.path.abspath(self.mktemp())
        self.cert, self.key = tls.generate_self_signed("localhost", directory)
        self.ring = TicketKeyRing(TicketKeys.make())

    def context(self, ring=None) -> SSL.Context:
        return tls.load_options(self.cert, self.key, ticket_keys=ring).getContext()

    def test_a_ticket_resumes_on_another_context_of_the_ring(self):
        """A session begun on one context resumes on another that shares the keys, in
        TLS 1.3 and TLS 1.2."""
        for version in VERSIONS:
            client = client_context(version)
            first, second = self.context(self.ring), self.context(self.ring)
            reused, session = connect(first, client)
            self.assertFalse(reused)
            self.assertEqual(connect(second, client, session)[0], True, version)

    def test_contexts_with_their_own_keys_do_not(self):
        """Without the ring each context has OpenSSL's keys: another one does a full
        handshake (what two workers did before the keys were shared)."""
        for version in VERSIONS:
            client = client_context(version)
            first, second = self.context(), self.context()
            _, session = connect(first, client)
            self.assertEqual(connect(first, client, session)[0], True, version)
            self.assertEqual(connect(second, client, session)[0], False, version)

    def test_the_previous_key_opens_tickets_until_the_next_rotation(self):
        """After one rotation a ticket of the old key still resumes, and the client gets a
        ticket of the new key; after a second rotation the old ticket no longer resumes."""
        for version in VERSIONS:
            client = client_context(version)
            context = self.context(self.ring)
            _, old_session = connect(context, client)
            self.ring.update(self.ring.keys.rotated())
            reused, renewed = connect(context, client, old_session)
            self.assertTrue(reused, version)
            self.ring.update(self.ring.keys.rotated())
            self.assertEqual(connect(context, client, old_session)[0], False, version)
            self.assertEqual(connect(context, client, renewed)[0], True, version)

    def test_tickets_of_another_ring_are_not_opened(self):
        """A ticket whose key this ring has never had means a full handshake, not an error."""
        client = client_context(ssl.TLSVersion.TLSv1_3)
        _, session = connect(self.context(TicketKeyRing(TicketKeys.make())), client)
        self.assertEqual(connect(self.context(self.ring), client, session)[0], False)

    def test_a_reload_keeps_the_keys(self):
        """A certificate reload makes a new context with the same keys: sessions begun
        before it resume after it."""
        reloadable = tls.ReloadableTLS(self.cert, self.key, ticket_keys=self.ring)
        client = client_context(ssl.TLSVersion.TLSv1_3)
        _, session = connect(reloadable.getContext(), client)
        old = reloadable.getContext()
        self.assertTrue(reloadable.reload())
        self.assertIsNot(reloadable.getContext(), old)
        self.assertEqual(connect(reloadable.getContext(), client, session)[0], True)


class UnreachableOpenSSLTests(SynchronousTestCase):
    """Where the OpenSSL functions cannot be proved, the server serves as before."""

    def setUp(self):
        def cannot():
            raise LookupError("no symbol table (a stripped build)")

        self.patch(ticketkeys, "_OpenSSL", cannot)
        self.patch(ticketkeys, "_openssl", None)
        self.patch(ticketkeys, "_unavailable", None)
        directory = os.path.abspath(self.mktemp())
        self.cert, self.key = tls.generate_self_signed("localhost", directory)

    def test_one_warning_and_the_context_keeps_its_own_keys(self):
        """``tls.ticket_keys_local`` is logged once, saying why and how to fix it; every
        context still serves, resuming its own sessions."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        ring = TicketKeyRing(TicketKeys.make())
        contexts = [
            tls.load_options(self.cert, self.key, ticket_keys=ring).getContext() for _ in "ab"
        ]
        warnings = [e for e in logged if e["log_format"].startswith("tls.ticket_keys_local")]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["log_level"], LogLevel.warn)
        self.assertEqual(warnings[0]["reason"], "no symbol table (a stripped build)")
        self.assertIn("--no-binary cryptography", warnings[0]["log_format"])
        self.assertEqual(ticketkeys.unavailable(), "no symbol table (a stripped build)")
        client = client_context(ssl.TLSVersion.TLSv1_3)
        _, session = connect(contexts[0], client)
        self.assertEqual(connect(contexts[0], client, session)[0], True)
