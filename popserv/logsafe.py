"""Client-supplied text made safe to put in a one-line log event.

twistd writes each event as one line, and fail2ban reads the address from a fixed place
in it.  A user name, HELO name or mail address that holds a line end, an escape sequence
or a space could end the line, forge another event or move the address the filter
reads.  ``quoted`` turns such text into one token that can do none of that.
"""

from __future__ import annotations

import json
import re

#: Text that stays as it is: common user, host and address characters, no space or quote.
_BARE = re.compile(r"[A-Za-z0-9._@+\-]+")


def quoted(value: str | bytes | None) -> str:
    """``value`` as one log token: bare when it is plainly safe, else JSON-quoted ASCII.

    In the quoted form every character outside printable ASCII (CR, LF, ESC, DEL,
    non-ASCII) and every ``"`` and ``\\`` is escaped, so the token never ends before its
    closing quote.  Bytes that are not UTF-8 show as ``\\udcXX``.  ``None`` is ``-``.
    """
    if value is None:
        return "-"
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    if _BARE.fullmatch(value):
        return value
    return json.dumps(value).replace("\x7f", "\\u007f")


class Untrusted(str):
    """Text a client chose: the event's field holds it as it is, the log line shows it quoted.

    Structured observers (JSON, tests) see the real value; twistd's text log, which
    formats the event, sees ``quoted(value)``.
    """

    __slots__ = ()

    def __format__(self, spec: str) -> str:
        return format(quoted(str(self)), spec)


def untrusted(value: str | bytes | None) -> Untrusted | None:
    """Mark a client-supplied value for a log event's fields (``None`` stays ``None``)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    return Untrusted(value)
