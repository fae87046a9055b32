"""A stored message in POP3 wire form, streamed: CRLF line ends, dot-stuffing, TOP's cut.

``send_message`` writes one message to a connection in chunks, pausing while the
client's side is full, so memory per session stays at about one chunk whatever the
message size.  It knows the connection only as a transport and its ``ConnectionFlow``.
"""

from __future__ import annotations

import io
import re

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

#: How many octets of a message are read from storage at a time.
CHUNK_SIZE = 64 * 1024

_DOT_LED = re.compile(rb"\n\.")


class WireEncoder:
    """Turns stored message bytes into POP3 wire form, chunk by chunk.

    Line ends become CRLF (LF and CRLF files alike), lines starting with "." are
    dot-stuffed, and ``finish`` adds the terminating ".", on a line of its own even
    when the message does not end in a newline.  State carries across chunks, so a
    CR/LF pair or a dot-led line split between two reads is still handled.
    """

    def __init__(self):
        self._at_line_start = True
        self._pending_cr = False

    def encode(self, chunk: bytes) -> bytes:
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._pending_cr = True
        if not chunk:
            return b""
        if b"\n" in chunk:
            # Each pass copies the chunk: skip those that would change nothing.
            if b"\r" not in chunk:
                chunk = chunk.replace(b"\n", b"\r\n")
            elif chunk.count(b"\n") != chunk.count(b"\r\n"):
                chunk = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            if b"\n." in chunk:
                # A compiled pattern stuffs dots several times faster than
                # bytes.replace, whose two-byte search is slow.
                chunk = _DOT_LED.sub(b"\n..", chunk)
        if self._at_line_start and chunk[:1] == b".":
            chunk = b"." + chunk
        self._at_line_start = chunk[-1:] == b"\n"
        return chunk

    def finish(self) -> bytes:
        tail = b"\r" if self._pending_cr else b""
        self._pending_cr = False
        if tail or not self._at_line_start:
            tail += b"\r\n"
        return tail + b".\r\n"


class TopLimiter:
    """Cuts raw message bytes after the header and ``lines`` body lines (TOP n k).

    ``feed`` returns the part of a chunk to send and whether the limit is reached.
    A message with fewer body lines, or no blank line at all, passes whole.
    """

    def __init__(self, lines: int):
        self._remaining = lines
        self._in_headers = True
        self._line_len = 0
        self._line_head = b""

    def feed(self, chunk: bytes) -> tuple[bytes, bool]:
        pos = 0
        if self._in_headers:
            while True:
                nl = chunk.find(b"\n", pos)
                if nl < 0:
                    self._note_partial(chunk[pos:])
                    return chunk, False
                self._note_partial(chunk[pos:nl])
                empty = self._line_len == 0 or (self._line_len == 1 and self._line_head == b"\r")
                self._line_len = 0
                self._line_head = b""
                pos = nl + 1
                if empty:
                    self._in_headers = False
                    break
            if self._remaining == 0:
                return chunk[:pos], True
        found = chunk.count(b"\n", pos)
        if found < self._remaining:
            self._remaining -= found
            return chunk, False
        for _ in range(self._remaining):
            pos = chunk.index(b"\n", pos) + 1
        self._remaining = 0
        return chunk[:pos], True

    def _note_partial(self, segment: bytes) -> None:
        if self._line_len < 2:
            self._line_head = (self._line_head + segment[:2])[:2]
        self._line_len += len(segment)


class UnreadableMessage(Exception):
    """Reading the message failed after ``sent`` octets were written (0: none yet)."""

    def __init__(self, sent: int, error: OSError):
        super().__init__(str(error))
        self.sent = sent
        self.error = error


def send_message(flow, source, header: bytes, limiter: TopLimiter | None = None, progress=None):
    """Stream ``source`` (a binary file) after ``header`` to ``flow``'s transport.

    Returns the octets written when the whole message went out at once (it fit in one
    chunk: most mail does), else a Deferred that fires with them once the terminating
    "." is written, or fails with ``UnreadableMessage``; a read that fails before any
    octet is written raises it at once.  ``progress``, if given, is called as chunks go
    out (to keep an idle timer from firing on a slow but steady reader).  The file is
    closed in every case, also when the connection goes away midway.
    """
    return _MessageSender(flow, source, header, limiter, progress).start()


@implementer(IPushProducer)
class _MessageSender:
    """One message on its way: a push producer riding on the connection's flow."""

    def __init__(self, flow, source, header: bytes, limiter, progress):
        self._flow = flow
        self._write = flow.transport.writeSequence
        self._source = source
        # Buffered files return a short read only at the end: no extra read to find it.
        self._short_read_is_end = isinstance(source, io.BufferedIOBase)
        self._header = header
        self._limiter = limiter
        self._progress = progress
        self._encoder = WireEncoder()
        self._paused = False
        self._producing = False
        self._done = False
        self.sent = 0
        self.finished: defer.Deferred | None = None

    def start(self) -> int | defer.Deferred:
        # A message that fits in one chunk goes out in one write, with nothing to wait
        # for: no Deferred, no producer (a third of the cost of a small RETR otherwise).
        self._write_chunk()
        if self._done:
            return self.sent
        self.finished = defer.Deferred()
        self._flow.stream = self
        if not self._flow.blocked:
            self.resumeProducing()
        return self.finished

    def resumeProducing(self) -> None:
        self._paused = False
        if self._producing or self._done:
            return
        self._producing = True
        try:
            if self._progress is not None:
                self._progress()
            while not self._paused and not self._done:
                self._write_chunk()
        finally:
            self._producing = False

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        """The connection is gone: drop the file and write nothing more."""
        if not self._done:
            self._complete()

    def _complete(self) -> None:
        """The last octet is written (or the connection is gone): tell whoever waits."""
        self._end()
        if self.finished is not None:
            self.finished.callback(self.sent)

    def _end(self) -> None:
        self._done = True
        self._source.close()
        if self._flow.stream is self:
            self._flow.stream = None

    def _write_chunk(self) -> None:
        try:
            raw = self._source.read(CHUNK_SIZE)
        except OSError as e:
            self._end()
            if self.finished is None:
                raise UnreadableMessage(self.sent, e) from None
            self.finished.errback(UnreadableMessage(self.sent, e))
            return
        finished = not raw or (self._short_read_is_end and len(raw) < CHUNK_SIZE)
        if raw and self._limiter is not None:
            raw, limited = self._limiter.feed(raw)
            finished = finished or limited
        parts = [self._encoder.encode(raw)]
        if self._header:
            parts.insert(0, self._header)
            self._header = b""
        if finished:
            parts.append(self._encoder.finish())
        self.sent += sum(map(len, parts))
        self._write(parts)
        if finished:
            self._complete()
