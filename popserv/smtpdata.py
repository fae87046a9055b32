"""Reading one message's DATA into its delivery: unstuffing, line checks, size, the stored form.

Lines end only at CRLF.  A bare CR or LF, or a NUL, fails the whole message, so
``\\n.\\n`` cannot end a message and smuggle another (CVE-2023-51765); an over-long line
fails the message too, and the lines after it stay data up to the final ".".  Lines are
stored with LF ends.  A message that fails is dropped at once and answered at its end.

Whole packets are taken at a time (``take``): the checks run over the block in C and it
is stored with one write; only a block that fails a check goes line by line, so that
the reply is the one its first bad line earns.
"""

from __future__ import annotations

import re

from twisted.logger import Logger
from twisted.python.failure import Failure

from popserv.interfaces import Envelope
from popserv.smtpreplies import (
    BARE_LINE_END,
    LINE_TOO_LONG,
    NUL_IN_DATA,
    TOO_BIG,
    Reply,
    reply_for,
)

log = Logger()

# A first DATA line that starts a header field (RFC 5322 section 2.2: name ":").
_HEADER_RE = re.compile(rb"[!-9;-~]+:")


class MessageReader:
    """The DATA of one ``Envelope``, written to its ``delivery`` until the final "."."""

    def __init__(self, envelope: Envelope, line_limit: int, max_size: int):
        self.envelope = envelope
        #: The longest line, without its CRLF (a dot-stuffed line counts its dot).
        self._line_limit = line_limit
        self._max_size = max_size
        self._first_line = True

    def take(self, buf: bytes, pos: int) -> int:
        """Take the complete lines from ``pos`` up to the final ".", all at once.

        Returns where the rest begins: the "." line, or a line not complete yet, is left
        to be cut line by line.
        """
        if buf.startswith(b".\r\n", pos):
            return pos
        stop = buf.find(b"\r\n.\r\n", pos)
        if stop >= 0:
            end = stop + 2
        else:
            last = buf.rfind(b"\r\n", pos)
            if last < 0:
                return pos
            end = last + 2
        if self.envelope.failure is None:
            self._block(buf[pos:end])
        return end

    def _block(self, block: bytes) -> None:
        """Store CRLF-ended lines (none of them the final ".") with one write."""
        envelope = self.envelope
        data = block[1:] if block[:1] == b"." else block
        data = data.replace(b"\r\n.", b"\r\n")
        lines = data.split(b"\r\n")
        ends = len(lines) - 1
        if (
            b"\0" in data
            or data.count(b"\n") != ends
            or data.count(b"\r") != ends
            # Shorter than the limit, as a line may have lost a leading dot.
            or max(map(len, lines)) >= self._line_limit
            or envelope.size + len(data) > self._max_size
        ):
            self._lines(block)
            return
        envelope.size += len(data)
        if self._first_line:
            self._first_line = False
            if lines[0] and not _HEADER_RE.match(lines[0]):
                lines.insert(0, b"")
        self._write(b"\n".join(lines))

    def _lines(self, block: bytes) -> None:
        """CRLF-ended lines (none of them the final "."), one at a time."""
        for line in block[:-2].split(b"\r\n"):
            if len(line) > self._line_limit:
                self.fail(LINE_TOO_LONG)
            else:
                self.line(line)

    def line(self, line: bytes) -> None:
        """One line of DATA, without its CRLF, other than the final "."."""
        envelope = self.envelope
        if envelope.failure is not None:
            return
        if line[:1] == b".":
            line = line[1:]
        envelope.size += len(line) + 2
        if b"\r" in line or b"\n" in line:
            self.fail(BARE_LINE_END)
        elif b"\0" in line:
            self.fail(NUL_IN_DATA)
        elif envelope.size > self._max_size:
            self.fail(TOO_BIG)
        else:
            data = line + b"\n"
            if self._first_line:
                self._first_line = False
                if line and not _HEADER_RE.match(line):
                    # No header section: keep the trace headers apart from the body.
                    data = b"\n" + data
            self._write(data)

    def _write(self, data: bytes) -> None:
        try:
            self.envelope.delivery.write(data)
        except Exception:
            self.fail(reply_for(Failure(), "cannot store the message"))

    def fail(self, reply: Reply) -> None:
        """Fail the message: drop what is stored; ``reply`` answers its end."""
        envelope = self.envelope
        if envelope.failure is None:
            envelope.failure = reply
            abort(envelope)


def abort(envelope: Envelope) -> None:
    """Drop the envelope's delivery, if it has begun."""
    delivery, envelope.delivery = envelope.delivery, None
    if delivery is not None:
        try:
            delivery.abort()
        except Exception:
            log.failure("aborting a delivery failed")
