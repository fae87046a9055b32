"""Listener strings to services; ``tcp6:PORT`` is one socket for IPv6 and IPv4 alike.

popserv's default listeners (``tcp6:110``, ``tcp6:995``, ``tcp6:25``) mean what
Dovecot's ``listen = *, ::`` means: every address of both families.  They are served by
one ``[::]`` socket with ``IPV6_V6ONLY`` switched off, on which IPv4 clients arrive as
IPv4-mapped addresses (``popserv.peers`` turns those back into IPv4).  Two sockets,
``0.0.0.0`` and ``[::]``, would collide on Linux: Twisted cannot set ``IPV6_V6ONLY``, so
its ``[::]`` socket already takes IPv4.  A host without IPv6 gets ``0.0.0.0`` instead,
with a warning, rather than a server that does not start.  ``haproxy:`` before any
listener string puts ``popserv.proxyproto`` in front of it, so that nothing is served
before the PROXY header has named the client.  Every other endpoint string is
Twisted's own, unchanged.
"""

from __future__ import annotations

import errno
import re
import socket

from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from popserv.proxyproto import PROXY_TIMEOUT, ProxyEndpoint

log = Logger()

#: What ``socket()`` or ``bind()`` of ``[::]`` fails with on a host without IPv6.
NO_IPV6 = frozenset({errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.EADDRNOTAVAIL})

#: The dual-stack form: ``tcp6:PORT``, optionally with ``:backlog=N``, and nothing else.
_DUAL_STACK = re.compile(r"tcp6:(?P<port>\d+)(?::backlog=(?P<backlog>\d+))?")

#: Twisted's default queue of connections not yet accepted.
DEFAULT_BACKLOG = 50


def dual_stack(description: str) -> tuple[int, int] | None:
    """(port, backlog) when ``description`` is the dual-stack form, else None."""
    match = _DUAL_STACK.fullmatch(description)
    if match is None:
        return None
    return int(match["port"]), int(match["backlog"] or DEFAULT_BACKLOG)


def listener_endpoint(
    reactor, description: str, *, proxy_timeout: float = PROXY_TIMEOUT
) -> IStreamServerEndpoint:
    """The endpoint ``description`` names: the dual-stack form is ours, the rest Twisted's.

    ``haproxy:LISTENER`` is ours too: LISTENER's endpoint, its connections behind a
    PROXY header that must arrive within ``proxy_timeout`` seconds.  As with
    ``strports.service``, a bad string raises here, and a port that cannot be bound
    fails the endpoint's ``listen``.
    """
    prefix, colon, inner = description.partition(":")
    if colon and prefix.strip().lower() == "haproxy":
        inner_endpoint = listener_endpoint(reactor, inner, proxy_timeout=proxy_timeout)
        return ProxyEndpoint(inner_endpoint, reactor, proxy_timeout)
    form = dual_stack(description)
    if form is not None:
        return DualStackEndpoint(reactor, *form)
    return endpoints.serverFromString(reactor, description)


@implementer(IStreamServerEndpoint)
class DualStackEndpoint:
    """Every address of both families on ``port``, or IPv4 alone where there is no IPv6.

    ``IPV6_V6ONLY`` is set off rather than left to the host's ``net.ipv6.bindv6only``,
    so IPv4 is served on every host, as systemd's ``BindIPv6Only=both`` does.
    ``make_socket`` is ``socket.socket``; tests hand in one that fails.
    """

    def __init__(
        self, reactor, port: int, backlog: int = DEFAULT_BACKLOG, *, make_socket=socket.socket
    ):
        self._reactor = reactor
        self._port = port
        self._backlog = backlog
        self._make_socket = make_socket

    def listen(self, factory) -> defer.Deferred:
        """Fires with the listening port, or fails with ``CannotListenError``."""
        return defer.execute(self._listen, factory)

    def _listen(self, factory):
        try:
            sock = self._bound_socket()
        except OSError as e:
            if e.errno not in NO_IPV6:
                raise CannotListenError("::", self._port, e) from None
            log.warn(
                "popserv.ipv4_only: no IPv6 on this host ({error}): port {port} listens on "
                "0.0.0.0 only",
                error=e.strerror or str(e),
                port=self._port,
            )
            return self._reactor.listenTCP(self._port, factory, self._backlog, interface="0.0.0.0")
        try:
            return self._reactor.adoptStreamPort(sock.fileno(), socket.AF_INET6, factory)
        finally:
            # The reactor listens on its own duplicate of the descriptor.
            sock.close()

    def _bound_socket(self):
        """A non-blocking ``[::]`` socket listening on the port, IPv4 included."""
        sock = self._make_socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", self._port))
            sock.listen(self._backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock
