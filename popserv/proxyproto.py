"""The PROXY protocol (v1 and v2) before a listener's own: no greeting until the header is in.

Behind a load balancer every connection comes from the balancer; its PROXY header names
the client.  Twisted's wrapper connects the wrapped protocol before the header has
arrived (Twisted issue 12501), so a server-speaks-first protocol would greet, log,
count and trust the balancer's address.  Here the wrapped protocol is not even built
until a complete, valid header has arrived (in one piece or in many): it is built for
the header's source address, its transport's ``getPeer``/``getHost`` are the header's
addresses, and the bytes after the header are its first input.  A connection whose
first bytes are no valid header, or that sends none within the timeout, is closed
without a byte written.  A v2 ``LOCAL`` header (the balancer's own health check),
v1 ``UNKNOWN`` and v2 headers for other families keep the connection's own addresses,
as the specification says.  For implicit TLS the header comes before the handshake:
the wrapper sits outside ``TLSMemoryBIOFactory``.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IHandshakeListener, IStreamServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, implementer, providedBy

from popserv.peers import peer_host

log = Logger()

#: Seconds a connection may take to send its PROXY header ([server] proxy_timeout).
PROXY_TIMEOUT = 5.0

#: How a v1 header starts, and the most octets it may have, CRLF included.
V1_SIGNATURE = b"PROXY "
V1_MAX_LENGTH = 107
#: How a v2 header starts; the fixed part (signature, version and command, family,
#: length) is 16 octets.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16

#: v1 protocol names -> how their addresses are parsed, and the address class.
_V1_FAMILIES = {
    b"TCP4": (ipaddress.IPv4Address, IPv4Address),
    b"TCP6": (ipaddress.IPv6Address, IPv6Address),
}

_V2_LOCAL = 0x20
_V2_PROXY = 0x21
#: v2 family and transport octets that may follow PROXY -> octets of their addresses
#: and the address class, or None where the connection's own addresses are kept.
_V2_FAMILIES = {
    0x00: (0, None),  # UNSPEC
    0x11: (12, IPv4Address),  # TCP over IPv4
    0x21: (36, IPv6Address),  # TCP over IPv6
    0x31: (216, None),  # a stream Unix socket: no IP address to name
}


class InvalidHeader(ValueError):
    """The first bytes of a connection are not a valid PROXY header."""


@dataclass(frozen=True)
class ProxyHeader:
    """What a header says: the client (``source``) and the address it reached, or None
    for both where the connection's own addresses stand (LOCAL, UNKNOWN)."""

    source: IAddress | None
    destination: IAddress | None


def parse_header(data: bytes) -> tuple[ProxyHeader, int] | None:
    """The header at the start of ``data`` and its length; None while it is incomplete.

    Raises ``InvalidHeader`` as soon as ``data`` cannot be the start of a valid header.
    """
    if data[: len(V2_SIGNATURE)] == V2_SIGNATURE[: len(data)]:
        return _parse_v2(data)
    if data[: len(V1_SIGNATURE)] == V1_SIGNATURE[: len(data)]:
        return _parse_v1(data)
    raise InvalidHeader("neither a v1 nor a v2 PROXY header")


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    end = data.find(b"\n", 0, V1_MAX_LENGTH)
    if end == -1:
        if len(data) >= V1_MAX_LENGTH:
            raise InvalidHeader("v1 header longer than 107 octets")
        return None
    if data[end - 1 : end] != b"\r":
        raise InvalidHeader("v1 header not ended by CRLF")
    fields = data[: end - 1].split(b" ")
    if fields[1:2] == [b"UNKNOWN"]:
        return ProxyHeader(None, None), end + 1
    if len(fields) != 6 or fields[1] not in _V1_FAMILIES:
        raise InvalidHeader("v1 header is not TCP4, TCP6 or UNKNOWN with two addresses and ports")
    parse, address = _V1_FAMILIES[fields[1]]
    try:
        source, destination = (str(parse(field.decode("ascii"))) for field in fields[2:4])
    except ValueError:
        raise InvalidHeader("v1 header with a bad address") from None
    source_port, destination_port = (_v1_port(field) for field in fields[4:6])
    return (
        ProxyHeader(
            address("TCP", source, source_port), address("TCP", destination, destination_port)
        ),
        end + 1,
    )


def _v1_port(field: bytes) -> int:
    if not (1 <= len(field) <= 5 and field.isdigit() and int(field) <= 65535):
        raise InvalidHeader("v1 header with a bad port")
    return int(field)


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    if len(data) < V2_FIXED_LENGTH:
        return None
    command, family, length = struct.unpack("!BBH", data[12:V2_FIXED_LENGTH])
    total = V2_FIXED_LENGTH + length
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise InvalidHeader(f"v2 header with version and command {command:#04x}")
    if command == _V2_PROXY and family not in _V2_FAMILIES:
        raise InvalidHeader(f"v2 header with family and transport {family:#04x}")
    if command == _V2_PROXY and length < _V2_FAMILIES[family][0]:
        raise InvalidHeader("v2 header too short for its addresses")
    if len(data) < total:
        return None
    if command == _V2_LOCAL:
        return ProxyHeader(None, None), total
    size, address = _V2_FAMILIES[family]
    if address is None:
        return ProxyHeader(None, None), total
    half = (size - 4) // 2
    block = data[V2_FIXED_LENGTH : V2_FIXED_LENGTH + size]
    parse = ipaddress.IPv4Address if address is IPv4Address else ipaddress.IPv6Address
    source, destination = str(parse(block[:half])), str(parse(block[half : 2 * half]))
    source_port, destination_port = struct.unpack("!HH", block[2 * half :])
    return (
        ProxyHeader(
            address("TCP", source, source_port), address("TCP", destination, destination_port)
        ),
        total,
    )


@implementer(IHandshakeListener)
class ProxyProtocolWrapper(ProtocolWrapper):
    """One connection: its PROXY header first, then the wrapped protocol, built for the client."""

    def __init__(self, factory: ProxyFactory):
        super().__init__(factory, None)
        self._buffer = b""
        self._header: ProxyHeader | None = None
        self._refused = False
        self._timer = None

    def logPrefix(self) -> str:
        return self.factory.logPrefix()

    def makeConnection(self, transport) -> None:
        # ProtocolWrapper's, except that the wrapped protocol waits for the header.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def connectionMade(self) -> None:
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._refused:
            return
        self._buffer += data
        try:
            parsed = parse_header(self._buffer)
        except InvalidHeader as e:
            self._refuse("invalid-header", str(e))
            return
        if parsed is not None:
            header, length = parsed
            rest, self._buffer = self._buffer[length:], b""
            self._start(header, rest)

    def _start(self, header: ProxyHeader, rest: bytes) -> None:
        """The header is in: connect the protocol the wrapped factory builds for the client."""
        self._cancel_timer()
        self._header = header
        protocol = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if protocol is None:
            self._refused = True
            self.transport.loseConnection()
            return
        self.wrappedProtocol = protocol
        protocol.makeConnection(self)
        if rest and self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(rest)

    def _refuse(self, reason: str, detail: str) -> None:
        """Close without a byte written: nothing is served to a connection with no header."""
        self._cancel_timer()
        self._refused = True
        log.info(
            "proxy.refused: peer={peer} reason={reason} detail={detail}",
            peer=peer_host(self.transport.getPeer()),
            reason=reason,
            detail=detail,
        )
        self.transport.loseConnection()

    def _timed_out(self) -> None:
        self._timer = None
        self._refuse("timeout", f"no complete PROXY header within {self.factory.timeout:g}s")

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def connectionLost(self, reason) -> None:
        self._cancel_timer()
        self.factory.unregisterProtocol(self)
        protocol, self.wrappedProtocol = self.wrappedProtocol, None
        if protocol is not None:
            protocol.connectionLost(reason)

    def handshakeCompleted(self) -> None:
        """STLS or STARTTLS (TLS started on this connection) finished its handshake."""
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def getPeer(self) -> IAddress:
        """The client the header names, or the connection's own peer where it names none."""
        if self._header is not None and self._header.source is not None:
            return self._header.source
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        """The address the client reached, as the header says, else the connection's own."""
        if self._header is not None and self._header.destination is not None:
            return self._header.destination
        return self.transport.getHost()


class ProxyFactory(WrappingFactory):
    """Wraps a factory's connections so that each begins with a PROXY header."""

    protocol = ProxyProtocolWrapper

    def __init__(self, wrapped_factory, clock, timeout: float = PROXY_TIMEOUT):
        super().__init__(wrapped_factory)
        self.clock = clock
        self.timeout = timeout

    def logPrefix(self) -> str:
        wrapped = getattr(self.wrappedFactory, "logPrefix", None)
        prefix = wrapped() if wrapped is not None else type(self.wrappedFactory).__name__
        return f"{prefix} (PROXY)"

    def buildProtocol(self, addr) -> ProxyProtocolWrapper:
        # The wrapped factory is asked only once the header names the client.
        return self.protocol(self)


@implementer(IStreamServerEndpoint)
class ProxyEndpoint:
    """``endpoint`` with every connection it accepts behind a PROXY header."""

    def __init__(self, endpoint: IStreamServerEndpoint, clock, timeout: float = PROXY_TIMEOUT):
        self.endpoint = endpoint
        self.clock = clock
        self.timeout = timeout

    def listen(self, factory):
        return self.endpoint.listen(ProxyFactory(factory, self.clock, self.timeout))
