"""Output flow of one connection, for POP3 and SMTP alike: replies that back up, and closing.

A client may send commands without reading the replies, or never finish a TLS handshake.
Both would make the server hold memory and descriptors without bound: replies pile up in
the transport, and a polite close waits for them (or for a handshake) forever.  The
protocols use one ``ConnectionFlow`` per connection to know when to stop taking commands
and how to close without waiting on such a client.
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

#: Seconds a polite close may take (the client reading the last reply) before it is aborted.
CLOSE_GRACE = 10.0


@implementer(IPushProducer)
class ConnectionFlow:
    """Registered on the transport as a push producer for the connection's whole life.

    The transport pauses it once its write buffer is full and resumes it once that
    drains: ``blocked`` says the client is not reading, and ``on_unblocked`` is called
    when it reads again.  A message being streamed (``stream``, an ``IPushProducer``)
    rides on the same registration, since a transport holds one producer at a time.
    """

    def __init__(self, transport, clock, on_unblocked):
        self.transport = transport
        self._clock = clock
        self._on_unblocked = on_unblocked
        #: The client is not reading: the transport's write buffer is full.
        self.blocked = False
        self.stream = None
        self._registered = False
        self._closing = False
        self._deadline = None
        transport.registerProducer(self, True)
        self._registered = True

    # -- IPushProducer, called by the transport ----------------------------------

    def pauseProducing(self) -> None:
        self.blocked = True
        if self.stream is not None:
            self.stream.pauseProducing()

    def resumeProducing(self) -> None:
        self.blocked = False
        if self.stream is not None:
            self.stream.resumeProducing()
        self._on_unblocked()

    def stopProducing(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.stopProducing()

    # -- closing --------------------------------------------------------------------

    def close(self, last: bytes = b"") -> None:
        """Send ``last`` and close; abort where a polite close could wait forever.

        A client that does not read, or a TLS handshake that never completed, would
        keep a polite close (and the descriptor, and the buffered replies) open
        indefinitely; those are aborted at once.  Both show as the transport pausing
        this producer, also through wrappers such as ``haproxy:`` listeners.  Otherwise
        the close gets ``CLOSE_GRACE`` seconds before it is aborted.
        """
        if self._closing:
            return
        self._closing = True
        if not self.blocked:
            if last:
                self.transport.write(last)
            # Asked while still registered, so that TLS, flushing what it holds, can
            # still tell this producer that the client will not take it.
            self.transport.loseConnection()
        if self.blocked:
            # The client is not reading, or TLS has not finished its handshake (TLS
            # holds what is written until then, and pauses this producer).
            self.abort()
            return
        self._unregister()
        self._deadline = self._clock.callLater(CLOSE_GRACE, self.abort)

    def abort(self) -> None:
        """Drop the connection now, with whatever is still unsent."""
        self._closing = True
        self._unregister()
        self.transport.abortConnection()

    def lost(self) -> None:
        """The connection is gone: stop any stream and the close deadline."""
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self.stopProducing()

    def _unregister(self) -> None:
        # A transport does not close while a producer is registered.
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()
