"""haproxy: listeners: nothing is served before a whole PROXY header; then the client is the peer.

Unit tests over StringTransport and Clock; integration tests with a real HAProxy in
front of ``twistd popserv`` on loopback, using the shipped etc/haproxy/popserv.cfg.
"""

from __future__ import annotations

import ipaddress
import json
import os
import poplib
import smtplib
import socket
import ssl
import struct
import time

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactor, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest
from zope.interface import implementer

from popserv.config import Config
from popserv.listeners import DualStackEndpoint, listener_endpoint
from popserv.pop3 import Reply
from popserv.proxyproto import (
    PROXY_TIMEOUT,
    V2_SIGNATURE,
    InvalidHeader,
    ProxyEndpoint,
    ProxyFactory,
    ProxyHeader,
    parse_header,
)
from popserv.service import Listener
from popserv.worker import InheritedSocketEndpoint, adopting
from tests.live_haproxy import (
    CLIENT_7,
    CLIENT_8,
    HAProxy,
    ProxiedTwistd,
    SourcedPOP3,
    SourcedPOP3_SSL,
)
from tests.live_twistd import HOST
from tests.test_pop3 import POP3TestCase
from tests.test_smtp import SMTPTestCase
from tests.test_who import run_who

#: The balancer, as the connection itself shows it.
BALANCER = IPv4Address("TCP", "203.0.113.1", 51000)
#: The address the balancer reached on this node.
NODE = IPv4Address("TCP", "203.0.113.20", 110)


def v1(protocol: str, source: str = "", destination: str = "", ports=(40000, 110)) -> bytes:
    """A v1 header line: ``PROXY TCP4 192.0.2.7 203.0.113.20 40000 110``, say."""
    if protocol == "UNKNOWN":
        return b"PROXY UNKNOWN\r\n"
    return f"PROXY {protocol} {source} {destination} {ports[0]} {ports[1]}\r\n".encode()


def v2(source: str = "", destination: str = "", ports=(40000, 110), *, local=False, tlv=b""):
    """A v2 header: PROXY over TCP for IPv4 or IPv6 addresses, or LOCAL (no addresses)."""
    if local:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", len(tlv)) + tlv
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    family = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", *ports) + tlv
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(block)) + block


class RecordingProtocol(Protocol):
    """Records what it is told, and what its transport says of the peer at connection."""

    def __init__(self):
        self.received = b""
        self.peer = self.host = None
        self.lost = False

    def connectionMade(self):
        self.peer = self.transport.getPeer()
        self.host = self.transport.getHost()
        self.transport.write(b"hello\r\n")

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost = True


class RecordingFactory(Factory):
    """Builds ``RecordingProtocol``s and keeps the addresses it was asked to build them for."""

    protocol = RecordingProtocol

    def __init__(self):
        self.built = []
        self.addresses = []

    def buildProtocol(self, addr):
        self.addresses.append(addr)
        protocol = super().buildProtocol(addr)
        self.built.append(protocol)
        return protocol


class WrapperTests(unittest.TestCase):
    """The wrapper by itself, around a protocol that speaks first."""

    def setUp(self):
        self.clock = Clock()
        self.wrapped = RecordingFactory()
        self.factory = ProxyFactory(self.wrapped, self.clock, PROXY_TIMEOUT)
        self.proto = self.factory.buildProtocol(BALANCER)
        self.transport = StringTransport(hostAddress=NODE, peerAddress=BALANCER)
        self.proto.makeConnection(self.transport)

    def test_nothing_before_the_header(self):
        """Before the header nothing is built, nothing connected and nothing written."""
        self.proto.dataReceived(v1("TCP4", "192.0.2.7", "203.0.113.20")[:-1])
        self.assertEqual(self.wrapped.built, [])
        self.assertEqual(self.transport.value(), b"")
        self.assertFalse(self.transport.disconnecting)

    def test_v1_tcp4(self):
        """A v1 TCP4 header: the protocol is built for, and sees, the header's addresses."""
        self.proto.dataReceived(v1("TCP4", "192.0.2.7", "198.51.100.20", (40001, 1110)))
        client = IPv4Address("TCP", "192.0.2.7", 40001)
        self.assertEqual(self.wrapped.addresses, [client])
        [protocol] = self.wrapped.built
        self.assertEqual(protocol.peer, client)
        self.assertEqual(protocol.host, IPv4Address("TCP", "198.51.100.20", 1110))
        self.assertEqual(self.proto.getPeer(), client)
        self.assertEqual(self.transport.value(), b"hello\r\n")

    def test_v1_tcp6(self):
        """A v1 TCP6 header gives IPv6 addresses."""
        self.proto.dataReceived(v1("TCP6", "2001:db8::7", "2001:db8::20"))
        [protocol] = self.wrapped.built
        self.assertEqual(protocol.peer, IPv6Address("TCP", "2001:db8::7", 40000))
        self.assertEqual(protocol.host, IPv6Address("TCP", "2001:db8::20", 110))

    def test_v1_unknown(self):
        """v1 UNKNOWN is served, with the connection's own addresses."""
        self.proto.dataReceived(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")
        [protocol] = self.wrapped.built
        self.assertEqual((protocol.peer, protocol.host), (BALANCER, NODE))
        self.assertEqual(self.transport.value(), b"hello\r\n")

    def test_v2_tcp4(self):
        """A v2 PROXY header over TCP/IPv4 gives its addresses."""
        self.proto.dataReceived(v2("192.0.2.7", "198.51.100.20", (40002, 995)))
        [protocol] = self.wrapped.built
        self.assertEqual(protocol.peer, IPv4Address("TCP", "192.0.2.7", 40002))
        self.assertEqual(protocol.host, IPv4Address("TCP", "198.51.100.20", 995))

    def test_v2_tcp6(self):
        """A v2 PROXY header over TCP/IPv6 gives its addresses, written compressed."""
        self.proto.dataReceived(v2("2001:db8:0:0::7", "2001:db8::20"))
        [protocol] = self.wrapped.built
        self.assertEqual(protocol.peer, IPv6Address("TCP", "2001:db8::7", 40000))
        self.assertEqual(protocol.host, IPv6Address("TCP", "2001:db8::20", 110))

    def test_v2_tlvs_are_skipped(self):
        """TLVs after the addresses (HAProxy's unique id, say) are not input for the protocol."""
        tlv = b"\x05\x00\x04abcd"
        self.proto.dataReceived(v2("192.0.2.7", "198.51.100.20", tlv=tlv) + b"first")
        [protocol] = self.wrapped.built
        self.assertEqual(protocol.received, b"first")

    def test_v2_local(self):
        """A v2 LOCAL header (the balancer's own health check) keeps the balancer's address."""
        self.proto.dataReceived(v2(local=True))
        [protocol] = self.wrapped.built
        self.assertEqual((protocol.peer, protocol.host), (BALANCER, NODE))
        self.assertEqual(self.wrapped.addresses, [BALANCER])

    def test_header_in_pieces(self):
        """A header arriving octet by octet is waited for, then served as a whole one."""
        for header, client in (
            (v1("TCP4", "192.0.2.7", "203.0.113.20"), "192.0.2.7"),
            (v2("192.0.2.8", "203.0.113.20"), "192.0.2.8"),
        ):
            wrapped = RecordingFactory()
            proto = ProxyFactory(wrapped, self.clock).buildProtocol(BALANCER)
            transport = StringTransport(hostAddress=NODE, peerAddress=BALANCER)
            proto.makeConnection(transport)
            for i in range(len(header) - 1):
                proto.dataReceived(header[i : i + 1])
            self.assertEqual((wrapped.built, transport.value()), ([], b""))
            proto.dataReceived(header[-1:] + b"USER")
            [protocol] = wrapped.built
            self.assertEqual(protocol.peer.host, client)
            self.assertEqual((protocol.received, transport.value()), (b"USER", b"hello\r\n"))

    def test_garbage_is_closed_unanswered(self):
        """Whatever is not a valid header is closed at once, with no byte written."""
        for data in (
            b"USER alice\r\n",
            b"GET / HTTP/1.1\r\n",
            b"\x16\x03\x01\x02\x00",  # a TLS ClientHello: POP3S without the balancer
            b"PROXY TCP4 192.0.2.7 203.0.113.20 40000\r\n",
            b"PROXY TCP4 192.0.2.777 203.0.113.20 40000 110\r\n",
            b"PROXY TCP4 2001:db8::7 203.0.113.20 40000 110\r\n",
            b"PROXY TCP4 192.0.2.7 203.0.113.20 40000 65536\r\n",
            b"PROXY TCP4 192.0.2.7 203.0.113.20 -1 110\r\n",
            b"PROXY TCP5 192.0.2.7 203.0.113.20 40000 110\r\n",
            b"PROXY TCP4 192.0.2.7 203.0.113.20 40000 110\n",
            b"PROXY " + b"A" * 101,
            V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # command 2: none such
            V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in v2 form
            V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),  # UDP
            V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12),  # no such family
            V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),  # too short for IPv6
        ):
            wrapped = RecordingFactory()
            proto = ProxyFactory(wrapped, self.clock).buildProtocol(BALANCER)
            transport = StringTransport(hostAddress=NODE, peerAddress=BALANCER)
            proto.makeConnection(transport)
            proto.dataReceived(data)
            self.assertTrue(transport.disconnecting, data)
            self.assertEqual((transport.value(), wrapped.built), (b"", []), data)
            proto.dataReceived(v1("TCP4", "192.0.2.7", "203.0.113.20"))
            self.assertEqual(wrapped.built, [], data)

    def test_refusal_is_logged_with_the_balancer(self):
        """A refused connection is logged as proxy.refused, naming the connection's peer."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.proto.dataReceived(b"CAPA\r\n")
        [event] = [e for e in events if e["log_format"].startswith("proxy.refused")]
        self.assertEqual((event["peer"], event["reason"]), ("203.0.113.1", "invalid-header"))

    def test_timeout(self):
        """No complete header within the timeout: closed unanswered, and logged."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.proto.dataReceived(b"PROXY TCP4 192.0.2.7")
        self.clock.advance(PROXY_TIMEOUT - 0.1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual((self.transport.value(), self.wrapped.built), (b"", []))
        self.assertEqual([e["reason"] for e in events if "reason" in e], ["timeout"])
        self.proto.dataReceived(b" 203.0.113.20 40000 110\r\n")
        self.assertEqual(self.wrapped.built, [])

    def test_timer_ends_with_the_header(self):
        """Once the header is in, the header timeout no longer runs."""
        self.proto.dataReceived(v2(local=True))
        self.clock.advance(PROXY_TIMEOUT * 10)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timer_ends_with_the_connection(self):
        """A connection lost before its header leaves no timer, and builds nothing."""
        self.proto.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.wrapped.built, [])
        self.assertEqual(self.factory.protocols, {})

    def test_connection_lost_reaches_the_protocol(self):
        """After the header, the protocol hears of the end of the connection."""
        self.proto.dataReceived(v2(local=True))
        self.proto.connectionLost(None)
        self.assertTrue(self.wrapped.built[0].lost)

    def test_factory_may_refuse(self):
        """A factory that builds no protocol for the client gets the connection closed."""
        self.wrapped.buildProtocol = lambda addr: None
        self.proto.dataReceived(v2(local=True))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.transport.value(), b"")

    def test_handshake_is_passed_on(self):
        """STLS/STARTTLS on the connection: the protocol hears that its handshake completed."""

        @implementer(IHandshakeListener)
        class Listening(RecordingProtocol):
            shaken = False

            def handshakeCompleted(self):
                self.shaken = True

        self.wrapped.protocol = Listening
        self.proto.dataReceived(v2(local=True))
        self.assertTrue(IHandshakeListener.providedBy(self.proto))
        self.proto.handshakeCompleted()
        self.assertTrue(self.wrapped.built[0].shaken)


class ParseHeaderTests(unittest.SynchronousTestCase):
    """``parse_header``: the header's length, or None while it may still become one."""

    def test_lengths(self):
        """The length returned is the header's, whatever follows it."""
        for header in (v1("TCP4", "192.0.2.7", "203.0.113.20"), v2("2001:db8::7", "::1")):
            _, length = parse_header(header + b"CAPA\r\n")
            self.assertEqual(length, len(header))

    def test_prefixes_are_incomplete(self):
        """Every proper prefix of a valid header (the empty one too) is incomplete, not invalid."""
        for header in (b"PROXY UNKNOWN\r\n", v2("192.0.2.7", "203.0.113.20")):
            for end in range(len(header)):
                self.assertIsNone(parse_header(header[:end]))

    def test_v2_unspec_and_unix_keep_the_connections_addresses(self):
        """v2 PROXY with no address family, or Unix sockets, names no client address."""
        unspec = V2_SIGNATURE + b"\x21\x00\x00\x00"
        unix = V2_SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216)
        for header in (unspec, unix):
            self.assertEqual(parse_header(header), (ProxyHeader(None, None), len(header)))

    def test_v1_longest(self):
        """A v1 header of 107 octets (the most there may be) is valid; one octet more is not."""
        address = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        header = v1("TCP6", address, address, (65535, 65535))
        self.assertEqual(len(header), 104)
        unknown = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
        self.assertEqual(parse_header(unknown), (ProxyHeader(None, None), 107))
        with self.assertRaises(InvalidHeader):
            parse_header(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n")


class POP3BehindProxyTests(POP3TestCase):
    """A POP3 session behind the wrapper: the header's client is the peer for every rule.

    The balancer is outside ``trusted_networks`` (192.0.2.0/24); the clients differ.
    """

    client = "192.0.2.7"

    node = "203.0.113.20"

    def connect(self, transport_class=StringTransport, first=b""):
        factory = ProxyFactory(self.factory, self.clock)
        proto = factory.buildProtocol(BALANCER)
        transport = transport_class(hostAddress=NODE, peerAddress=BALANCER)
        proto.makeConnection(transport)
        self.assertEqual(transport.value(), b"")
        proto.dataReceived(v2(self.client, self.node) + first)
        return proto, transport

    def test_greets_after_the_header(self):
        """The greeting comes once the header is in, and the session's peer is the client."""
        self.assertTrue(self.greeting.startswith(Reply.GREETING))
        self.assertEqual(self.proto.wrappedProtocol.peer, "192.0.2.7")

    def test_bytes_after_the_header_are_the_first_command(self):
        """Bytes in the header's packet are the first command, answered after the greeting."""
        proto, transport = self.connect(first=b"USER alice\r\n")
        greeting, reply = transport.value().split(b"\r\n")[:2]
        self.assertTrue(greeting.startswith(Reply.GREETING))
        self.assertTrue(reply.startswith(b"+OK"), reply)

    def test_trust_follows_the_header(self):
        """A trusted client logs in with USER/PASS; an untrusted one, same balancer, may not."""
        self.login()
        self.client = "198.51.100.9"
        proto, transport = self.connect()
        self.received(transport)
        self.send(b"USER alice\r\nPASS secret\r\n", proto)
        self.assertIn(Reply.PLAINTEXT_REFUSED, transport.value())

    def test_ipv4_mapped_client_is_its_ipv4_address(self):
        """A client the header gives as ::ffff:192.0.2.9 is 192.0.2.9."""
        self.client, self.node = "::ffff:192.0.2.9", "::ffff:203.0.113.20"
        proto, _ = self.connect()
        self.assertEqual(proto.wrappedProtocol.peer, "192.0.2.9")


class SMTPBehindProxyTests(SMTPTestCase):
    """The SMTP receiver behind the wrapper: no greeting before the header, then the client."""

    def connect(self, peer=BALANCER, transport_class=StringTransport):
        factory = ProxyFactory(self.factory, self.clock)
        proto = factory.buildProtocol(peer)
        transport = transport_class(hostAddress=NODE, peerAddress=peer)
        proto.makeConnection(transport)
        return proto, transport

    def test_greeting_and_received_name_the_client(self):
        """220 waits for the header; the Received header names the header's client."""
        self.assertEqual(self.transport.value(), b"")
        self.send(v1("TCP4", "192.0.2.99", "203.0.113.20", (40000, 25)))
        [greeting] = self.replies()
        self.assertTrue(greeting.startswith(b"220 "), greeting)
        self.envelope(b"alice@" + b"mx.example.org")
        self.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
        [message] = self.new("alice")
        self.assertIn(b"([192.0.2.99])", message)
        self.assertNotIn(b"203.0.113.1", message)


class ListenerTests(unittest.SynchronousTestCase):
    """``haproxy:`` listener strings get this wrapper, outside whatever factory they serve."""

    def test_haproxy_string(self):
        """haproxy:tcp:... is the TCP endpoint behind ProxyEndpoint, with the timeout given."""
        reactor = MemoryReactor()
        endpoint = listener_endpoint(
            reactor, "haproxy:tcp:1110:interface=127.0.0.1", proxy_timeout=2.5
        )
        self.assertIsInstance(endpoint, ProxyEndpoint)
        self.assertIsInstance(endpoint.endpoint, TCP4ServerEndpoint)
        inner = Factory()
        endpoint.listen(inner)
        [(port, factory, _, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (1110, "127.0.0.1"))
        self.assertIsInstance(factory, ProxyFactory)
        self.assertEqual((factory.wrappedFactory, factory.timeout), (inner, 2.5))

    def test_haproxy_dual_stack(self):
        """haproxy:tcp6:PORT is popserv's dual-stack listener behind the wrapper."""
        endpoint = listener_endpoint(MemoryReactor(), "haproxy:tcp6:110")
        self.assertIsInstance(endpoint.endpoint, DualStackEndpoint)

    def test_pop3s_header_comes_before_tls(self):
        """POP3S behind HAProxy: the wrapper is outermost, so the header precedes TLS."""
        reactor = MemoryReactor()
        tls = TLSMemoryBIOFactory(CertificateOptions(), False, Factory())
        listener = Listener("POP3S", "haproxy:tcp:995", tls, reactor, proxy_timeout=1.0)
        listener.privilegedStartService()
        [(_, factory, _, _)] = reactor.tcpServers
        self.assertIsInstance(factory, ProxyFactory)
        self.assertIs(factory.wrappedFactory, tls)
        self.assertEqual(factory.timeout, 1.0)

    def test_worker_wraps_its_adopted_socket(self):
        """A worker of several (--workers) puts the same wrapper, timeout included, in front
        of the haproxy: socket it adopts; other sockets it adopts as they are."""
        specs = [
            {"name": name, "description": d, "fd": fd, "family": 2, "haproxy": proxied}
            for name, d, fd, proxied in (
                ("pop3-0", "haproxy:tcp:110", 7, True),
                ("pop3-1", "tcp:1110", 8, False),
            )
        ]
        listen = adopting(specs, MemoryReactor(), 2.5)
        proxied = listen("POP3", "pop3-0", "haproxy:tcp:110", Factory())
        self.assertIsInstance(proxied.endpoint, ProxyEndpoint)
        self.assertIsInstance(proxied.endpoint.endpoint, InheritedSocketEndpoint)
        self.assertEqual(proxied.endpoint.endpoint.fd, 7)
        self.assertEqual(proxied.endpoint.timeout, 2.5)
        plain = listen("POP3", "pop3-1", "tcp:1110", Factory())
        self.assertIsInstance(plain.endpoint, InheritedSocketEndpoint)

    def test_default_timeout(self):
        """[server] proxy_timeout defaults to the module's PROXY_TIMEOUT."""
        self.assertEqual(Config(hostname="x").proxy_timeout, PROXY_TIMEOUT)


# -- a real HAProxy in front of twistd popserv ------------------------------------------


class BehindHAProxyTests(unittest.TestCase):
    """popserv behind a real HAProxy (send-proxy-v2): each client is known by its own address.

    Every client reaches HAProxy from 127.0.0.7 or 127.0.0.8, and popserv only ever
    sees HAProxy's 127.0.0.1; only the PROXY header can tell the two clients apart.
    """

    def setUp(self):
        self.server = ProxiedTwistd(
            self,
            {"alice": "secret", "bob": "hunter2"},
            settings={
                "server": {"proxy_timeout": "1"},
                "pop3": {"max_failures": "3"},
                "auth": {"trusted_networks": f"{CLIENT_8}/32"},
            },
        )
        self.server.start()
        self.haproxy = HAProxy(self, [self.server.backends()])
        self.checked = self.haproxy.wait_checked()

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.server.cert)

    def wait_logged(self, text: str, timeout: float = 10.0) -> str:
        """The server's log, once it holds ``text``."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.server.log()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged:\n{log}")
            time.sleep(0.05)
        return log

    def test_client_address_in_log_who_and_trust(self):
        """127.0.0.8 (trusted) logs in with USER/PASS and is logged and listed as itself;
        127.0.0.7, through the same HAProxy, is refused a plaintext password."""
        bob = SourcedPOP3(CLIENT_8, self.haproxy.ports[110])
        bob.user("bob")
        bob.pass_("hunter2")
        log = self.wait_logged("pop3.login: peer=127.0.0.8 user=bob")
        self.assertNotIn("peer=127.0.0.1", log)
        ran = run_who("--config", self.server.config_path, "--json")
        self.assertEqual(ran.returncode, 0, ran.stderr)
        self.assertEqual(
            [(e["user"], e["address"]) for e in json.loads(ran.stdout)], [("bob", CLIENT_8)]
        )
        bob.quit()
        alice = SourcedPOP3(CLIENT_7, self.haproxy.ports[110])
        with self.assertRaises(poplib.error_proto) as refused:
            alice.user("alice")
            alice.pass_("secret")
        self.assertIn(b"Plaintext login is not allowed", refused.exception.args[0])
        alice.quit()

    def test_lockout_is_the_clients_own(self):
        """Wrong passwords from 127.0.0.7 (over STLS) lock 127.0.0.7 out, not 127.0.0.8."""
        for _ in range(3):
            client = SourcedPOP3(CLIENT_7, self.haproxy.ports[110])
            client.stls(self.tls())
            with self.assertRaises(poplib.error_proto):
                client.user("alice")
                client.pass_("wrong")
            client.quit()
        self.wait_logged("pop3.login_failed: peer=127.0.0.7")
        client = SourcedPOP3(CLIENT_7, self.haproxy.ports[110])
        client.stls(self.tls())
        with self.assertRaises(poplib.error_proto) as locked:
            client.user("alice")
            client.pass_("secret")
        self.assertIn(b"[SYS/TEMP]", locked.exception.args[0])
        client.quit()
        other = SourcedPOP3(CLIENT_8, self.haproxy.ports[110])
        other.user("alice")
        self.assertTrue(other.pass_("secret").startswith(b"+OK"))
        other.quit()
        self.assertNotIn("peer=127.0.0.1", self.server.log())

    def test_pop3s_and_smtp(self):
        """POP3S passed through (the header before TLS) and SMTP both name 127.0.0.7."""
        client = SourcedPOP3_SSL(CLIENT_7, self.haproxy.ports[995], self.tls())
        client.user("alice")
        self.assertTrue(client.pass_("secret").startswith(b"+OK"))
        client.quit()
        self.wait_logged("pop3.login: peer=127.0.0.7 user=alice")
        with smtplib.SMTP(
            "127.0.0.1",
            self.haproxy.ports[25],
            local_hostname="client.example",
            timeout=10,
            source_address=(CLIENT_7, 0),
        ) as smtp:
            smtp.sendmail(
                "bob@example.org", [f"alice@{HOST}"], b"Subject: through HAProxy\r\n\r\nhello\r\n"
            )
        [name] = os.listdir(self.server.maildir("alice", "new"))
        with open(os.path.join(self.server.maildir("alice", "new"), name), "rb") as f:
            headers = f.read().split(b"\n\n")[0]
        self.assertIn(b"\nReceived: from client.example ([127.0.0.7])", headers)
        self.assertNotIn(b"127.0.0.1", headers)

    def test_health_checks_and_a_client_without_header(self):
        """HAProxy's checks (LOCAL headers) pass on all three; a direct client gets nothing."""
        self.assertEqual(
            self.checked,
            {
                name: {"node1": ("UP", "L7OK")}
                for name in ("pop3_nodes", "pop3s_nodes", "smtp_nodes")
            },
        )
        self.assertNotIn("proxy.refused", self.server.log())
        for port in (self.server.pop3_port, self.server.pop3s_port, self.server.smtp_port):
            with socket.create_connection(("127.0.0.1", port), 5) as direct:
                started = time.monotonic()
                self.assertEqual(direct.recv(100), b"")
                self.assertGreaterEqual(time.monotonic() - started, 0.9)
        self.wait_logged("proxy.refused: peer=127.0.0.1 reason=timeout")
        with socket.create_connection(("127.0.0.1", self.server.pop3_port), 5) as plain:
            plain.sendall(b"CAPA\r\n")
            self.assertEqual(plain.recv(100), b"")
        self.wait_logged("proxy.refused: peer=127.0.0.1 reason=invalid-header")


class BehindHAProxyWorkersTests(unittest.TestCase):
    """With --workers 2 each worker puts the same wrapper before the socket it adopts."""

    def test_workers_know_the_client(self):
        """Logins through HAProxy are logged by the workers as 127.0.0.7; a connection
        without a header gets nothing from any worker."""
        server = ProxiedTwistd(
            self,
            {"alice": "secret"},
            settings={"server": {"workers": "2", "proxy_timeout": "1"}},
        )
        server.start()
        haproxy = HAProxy(self, [server.backends()])
        haproxy.wait_checked()
        for _ in range(4):
            client = SourcedPOP3(CLIENT_7, haproxy.ports[110])
            client.user("alice")
            self.assertTrue(client.pass_("secret").startswith(b"+OK"))
            client.quit()
        deadline = time.monotonic() + 10
        while server.log().count("pop3.login: peer=127.0.0.7 user=alice") < 4:
            self.assertLess(time.monotonic(), deadline, server.log())
            time.sleep(0.05)
        logins = [line for line in server.log().splitlines() if "pop3.login: " in line]
        self.assertTrue(all(",worker=" in line for line in logins), logins)
        self.assertNotIn("pop3.login: peer=127.0.0.1", server.log())
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", server.pop3_port), 5) as direct:
                direct.sendall(b"CAPA\r\n")
                self.assertEqual(direct.recv(100), b"")
