"""Who a client counts as, and how many connections each client and the whole service get.

The same accounting key serves the connection limits and the failed-login throttle: an
IPv4-mapped IPv6 address is its IPv4 address, and IPv6 clients count per /64, since one
subscriber usually holds a whole /64.
"""

from __future__ import annotations

import ipaddress
import resource
from collections.abc import Callable

from zope.interface import implementer

from popserv.interfaces import IConnectionLimiter
from popserv.peers import unmapped

#: IPv6 clients are counted by network: one subscriber usually holds a whole /64.
IPV6_PREFIX = 64

PER_PEER = "per-peer"
IN_ALL = "max_connections"
DESCRIPTORS = "descriptors"


def accounting_key(host: str) -> str:
    """The key a client is counted by: its IPv4 address, or its IPv6 /64.

    An IPv4-mapped IPv6 address (``::ffff:192.0.2.7``) counts as the IPv4 address, and
    a zone (``%eth0``) is dropped.  Anything that is not an IP address is its own key.
    """
    try:
        ip = ipaddress.ip_address(unmapped(host).split("%", 1)[0])
    except ValueError:
        return host
    if ip.version == 6:
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


def soft_file_limit() -> int:
    """The process's descriptor limit, read afresh (start-up may have raised it)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 2**31 if soft == resource.RLIM_INFINITY else soft


@implementer(IConnectionLimiter)
class ConnectionLimiter:
    """Connections in one process's memory: per accounting key, in all, and descriptors.

    ``reserve`` is the share of the descriptor limit that must stay free once this
    service takes a connection, so that a flood of one service cannot starve another
    (SMTP keeps more free than POP3).  Descriptors in use are counted without a system
    call: the kernel gives a new socket the lowest free number, so every one below it
    is taken (the other connections' sockets too), and each open connection, this one
    included, may still open ``files_per_connection`` more.
    """

    def __init__(
        self,
        in_all: int,
        per_peer: int,
        *,
        reserve: float = 0.0,
        files_per_connection: int = 1,
        file_limit: Callable[[], int] = soft_file_limit,
    ):
        self.in_all = in_all
        self.per_peer = per_peer
        self.reserve = reserve
        self.files_per_connection = files_per_connection
        self.file_limit = file_limit
        self.open = 0
        self._per_key: dict[str, int] = {}

    def opened(self, peer: str, descriptor: int = -1) -> str | None:
        key = accounting_key(peer)
        if self._per_key.get(key, 0) >= self.per_peer:
            return PER_PEER
        if self.open >= self.in_all:
            return IN_ALL
        if descriptor >= 0 and self.reserve and self._descriptors_short(descriptor):
            return DESCRIPTORS
        self.open += 1
        self._per_key[key] = self._per_key.get(key, 0) + 1
        return None

    def closed(self, peer: str) -> None:
        key = accounting_key(peer)
        self.open -= 1
        left = self._per_key.pop(key) - 1
        if left:
            self._per_key[key] = left

    def _descriptors_short(self, newest: int) -> bool:
        limit = self.file_limit()
        in_use = newest + 1 + (self.open + 1) * self.files_per_connection
        return limit - in_use < limit * self.reserve


def transport_descriptor(transport) -> int:
    """The transport's socket descriptor, or -1 when it has none of its own."""
    try:
        return transport.fileno()
    except Exception:
        return -1
