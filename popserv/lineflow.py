"""The flow of one connection, for POP3 and SMTP alike: lines in, replies out, and closing.

Input is cut into lines and handed to the protocol one at a time.  A handler may return
a Deferred (a login, a message being streamed, a delivery): no further line is handled
until it fires, so replies stay in command order however much the client pipelines.
Input that waits is buffered up to a bound, then the transport stops reading.

Output is watched through the transport's producer interface: once the client stops
reading and the transport's buffer fills, no further line is handled either, so a
client that never reads cannot make the server hold its replies without bound.  A close
that could wait forever (the client not reading, a TLS handshake never finished) is
aborted, and every polite close has a deadline.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import Interface, implementer

#: Seconds a polite close may take (the client reading the last reply) before it is aborted.
CLOSE_GRACE = 10.0

log = Logger()


class ILineReceiver(Interface):
    """What a protocol gives its ``ConnectionFlow``: the handling of each line."""

    def line_received(line):
        """Handle one line (``bytes``, without its end); may return a Deferred to wait on."""

    def line_too_long():
        """Answer a line longer than ``line_limit`` allows; may return a Deferred."""

    def line_limit(line):
        """The longest this line (its start is given) may be, line end included."""

    def longest_line():
        """The longest line that may still be arriving now, line end included."""


@implementer(IPushProducer)
class ConnectionFlow:
    """Registered on the transport as a push producer for the connection's whole life.

    The transport pauses it once its write buffer is full and resumes it once that
    drains (``blocked`` says the client is not reading meanwhile).  A message being
    streamed (``stream``, an ``IPushProducer``) rides on the same registration, since a
    transport holds one producer at a time.

    ``delimiter`` ends a line (SMTP: CRLF only); with ``strip_cr`` an LF ends it and a
    CR before it is dropped (POP3).  ``input_bound`` is how much input may wait, behind
    a pending handler or unread replies, before the transport stops reading.  ``take``,
    when set, is offered the buffer before each line and returns how far it consumed
    (SMTP's DATA takes many lines in one go).
    """

    def __init__(
        self,
        transport,
        clock,
        receiver: ILineReceiver,
        *,
        delimiter: bytes = b"\r\n",
        strip_cr: bool = False,
        input_bound: int = 64 * 1024,
    ):
        self.transport = transport
        self._clock = clock
        self._receiver = receiver
        self._delimiter = delimiter
        self._strip_cr = strip_cr
        self._input_bound = input_bound
        self.take = None
        #: The client is not reading: the transport's write buffer is full.
        self.blocked = False
        self.stream = None
        self._buffer = b""
        self._pending: defer.Deferred | None = None
        self._handling = False
        self._discarding = False
        self._drop = False
        self._reading_paused = False
        self._closing = False
        self._deadline = None
        self._registered = True
        transport.registerProducer(self, True)

    # -- input ----------------------------------------------------------------------

    @property
    def waiting(self) -> bool:
        """Whether a handler's Deferred has not fired yet."""
        return self._pending is not None

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if self._discarding:
            data = self._buffer + data
            end = data.find(self._delimiter)
            if end < 0:
                self._buffer = self._line_end_start(data)
                return
            data = data[end + len(self._delimiter) :]
            self._discarding = False
            self._buffer = b""
            self._hold(self._receiver.line_too_long())
        self._buffer += data
        self.handle_input()

    def handle_input(self) -> None:
        """Handle buffered lines until one must be waited on, or the client stops reading.

        Lines are cut from one buffer by offset, so a packet of many small commands costs
        linear time, not a copy of the rest of the buffer per command.
        """
        if self._handling:
            return
        self._handling = True
        receiver, delimiter = self._receiver, self._delimiter
        step = len(delimiter)
        buf, pos = self._buffer, 0
        try:
            while self._pending is None and not self.blocked and not self._closing:
                if self.take is not None:
                    pos = self.take(buf, pos)
                    if self._pending is not None or self._closing:
                        break
                end = buf.find(delimiter, pos)
                if end < 0:
                    if len(buf) - pos > receiver.longest_line():
                        # Forget the rest of this line, but keep what may start its end.
                        self._discarding = True
                        buf, pos = self._line_end_start(buf), 0
                    break
                line, pos = buf[pos:end], end + step
                if self._strip_cr and line[-1:] == b"\r":
                    line = line[:-1]
                if len(line) + 2 > receiver.line_limit(line):
                    self._hold(receiver.line_too_long())
                else:
                    self._hold(receiver.line_received(line))
                if self._drop:
                    self._drop = False
                    buf, pos = b"", 0
        finally:
            self._buffer = buf[pos:] if pos else buf
            self._handling = False
        self._update_reading()

    def _line_end_start(self, data: bytes) -> bytes:
        """What to keep of a line being forgotten: a byte that may start a split CRLF."""
        keep = len(self._delimiter) - 1
        return data[-keep:] if keep and data[-keep:] == self._delimiter[:keep] else b""

    def drop_buffered(self) -> None:
        """Forget the input after the current line (STLS, STARTTLS: it came in clear)."""
        self._drop = True
        self._discarding = False

    def _hold(self, result) -> None:
        if isinstance(result, defer.Deferred):
            self._pending = result
            result.addBoth(self._handled, result)

    def _handled(self, result, pending: defer.Deferred):
        if isinstance(result, defer.Failure):
            log.failure("unhandled error in a command", result)
        if self._pending is pending:
            self._pending = None
            self.handle_input()
        return None

    def _update_reading(self) -> None:
        held = self._pending is not None or self.blocked
        pause = held and len(self._buffer) > self._input_bound and not self._closing
        if pause and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()
        elif not pause and self._reading_paused and not self._closing:
            self._reading_paused = False
            self.transport.resumeProducing()

    # -- IPushProducer, called by the transport ----------------------------------

    def pauseProducing(self) -> None:
        self.blocked = True
        if self.stream is not None:
            self.stream.pauseProducing()

    def resumeProducing(self) -> None:
        self.blocked = False
        if self.stream is not None:
            self.stream.resumeProducing()
        self.handle_input()

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
        the close gets ``CLOSE_GRACE`` seconds before it is aborted.  No input is
        handled after a close.
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
        """The connection is gone: stop any stream, any wait and the close deadline."""
        self._closing = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._pending = None
        self._buffer = b""
        self.stopProducing()

    def _unregister(self) -> None:
        # A transport does not close while a producer is registered.
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()
