"""The client's address as every part of popserv names it.

popserv's default listeners are dual-stack ``[::]`` sockets, on which an IPv4 client
arrives as an IPv4-mapped IPv6 address (``::ffff:192.0.2.7``).  Protocols take the
peer's host from ``peer_host`` only, so trusted networks, connection limits, the
failed-login throttle, log lines (and so fail2ban), ``Received:`` headers and
``popserv who`` all see the plain IPv4 address, whichever listener the client used.
Behind ``haproxy:`` listeners the address is the one the PROXY header names: the
transport's ``getPeer`` gives it (``popserv.proxyproto``).
"""

from __future__ import annotations

import ipaddress


def unmapped(host: str) -> str:
    """``host`` with an IPv4-mapped IPv6 address written as its IPv4 address.

    Anything else (IPv4, other IPv6, a name) comes back unchanged.
    """
    if ":" not in host:
        return host
    try:
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
    except ValueError:
        return host
    return host if mapped is None else str(mapped)


def peer_host(address) -> str:
    """The host of a transport's ``getPeer()``, IPv4-mapped made IPv4; ``str`` of a non-IP peer."""
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    return unmapped(host)
