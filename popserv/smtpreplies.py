"""Every reply the SMTP receiver sends, and the failure each refusal turns into.

Kept in one place so the protocol, the recipient policy and the DATA reader answer alike,
and tests compare with names.  Every reply after the greeting carries an RFC 3463 code.
"""

from __future__ import annotations

import re

from twisted.logger import Logger
from twisted.mail import smtp

from popserv.interfaces import DeliveryFailed, MailboxFull

log = Logger()

Reply = tuple[int, bytes]

SENDER_OK = (250, b"2.1.0 Sender OK")
RECIPIENT_OK = (250, b"2.1.5 Recipient OK")
RESET_OK = (250, b"2.0.0 Ok")
NOOP_OK = (250, b"2.0.0 Ok")
BYE = (221, b"2.0.0 Bye")
HELP = (214, b"2.0.0 See RFC 5321")
START_DATA = (354, b"End data with <CR><LF>.<CR><LF>")
START_TLS = (220, b"Begin TLS negotiation now")
TLS_ALREADY = (503, b"5.5.1 TLS already negotiated")
TLS_UNAVAILABLE = (454, b"4.7.0 TLS not available")
UNKNOWN_USER = (550, b"5.1.1 No such user here")
RELAY_DENIED = (550, b"5.7.1 Relaying denied")
BAD_RECIPIENT = (553, b"5.1.3 Bad recipient address syntax")
BAD_SENDER = (553, b"5.1.7 Bad sender address syntax")
TOO_MANY_RECIPIENTS = (452, b"4.5.3 Too many recipients")
TOO_BIG = (552, b"5.3.4 Message size exceeds fixed limit")
DISK_FULL = (452, b"4.3.1 Insufficient system storage")
MAILBOX_FULL = (552, b"5.2.2 Mailbox full")
MAILBOX_FULL_TEMPORARY = (452, b"4.2.2 Mailbox full, try again later")
LOCAL_ERROR = (451, b"4.3.0 Local error in processing")
USERDB_DOWN = (451, b"4.3.0 User database unavailable, try again later")
SHARED_STATE_DOWN = (451, b"4.3.0 Shared database unavailable, try again later")
BARE_LINE_END = (550, b"5.6.0 Bare CR or LF in message; lines must end with CRLF")
NUL_IN_DATA = (550, b"5.6.0 NUL character in message")
LINE_TOO_LONG = (500, b"5.5.2 Line too long")
BAD_COMMAND_CHARS = (500, b"5.5.2 Bare CR, LF or NUL in command")
UNKNOWN_COMMAND = (500, b"5.5.1 Command unrecognized")
EMPTY_COMMAND = (500, b"5.5.2 Empty command")
SYNTAX_ERROR = (501, b"5.5.4 Syntax error in parameters or arguments")
HELO_NEEDS_DOMAIN = (501, b"5.5.4 HELO and EHLO need a domain or address literal")
BAD_PARAMETER = (555, b"5.5.4 Unsupported MAIL or RCPT parameter")
NOT_IMPLEMENTED = (502, b"5.5.1 Command not implemented")
NEED_HELO = (503, b"5.5.1 Send EHLO or HELO first")
NESTED_MAIL = (503, b"5.5.1 Sender already given")
NEED_MAIL = (503, b"5.5.1 Need MAIL before RCPT")
NEED_RCPT = (503, b"5.5.1 Need RCPT before DATA")
# Formatted with the host name.
TIMEOUT = (421, b"4.4.2 %s Idle for too long, closing connection")
TOO_MANY_CONNECTIONS = (421, b"4.7.0 %s Too many connections from your address")
SERVER_BUSY = (421, b"4.7.0 %s Too many connections, try again later")
TOO_MANY_BAD_COMMANDS = (421, b"4.7.0 %s Too many bad commands, closing connection")
TOO_MANY_REJECTED = (421, b"4.7.0 %s Too many rejected recipients, closing connection")

# The RFC 3463 code put on a reply whose text has none (a refusal of Twisted's own).
_DEFAULT_ENHANCED = {
    2: b"2.0.0",
    4: b"4.0.0",
    5: b"5.0.0",
    421: b"4.3.2",
    451: b"4.3.0",
    452: b"4.3.1",
    454: b"4.7.0",
    500: b"5.5.2",
    501: b"5.5.4",
    502: b"5.5.1",
    503: b"5.5.1",
    504: b"5.5.4",
    535: b"5.7.8",
    552: b"5.3.4",
    553: b"5.1.3",
}
_ENHANCED_RE = re.compile(rb"[245]\.\d{1,3}\.\d{1,3}( |$)")
# Replies that carry no enhanced code: the greeting, SASL challenges, the go-ahead for DATA.
_PLAIN_CODES = frozenset((220, 334, 354))


def with_enhanced_code(code: int, text: bytes) -> bytes:
    """``text``, led by an RFC 3463 code fitting ``code`` unless it has one."""
    if code in _PLAIN_CODES or _ENHANCED_RE.match(text):
        return text
    default = _DEFAULT_ENHANCED.get(code, _DEFAULT_ENHANCED[code // 100])
    return default + (b" " + text if text else b"")


def error_args(reply: Reply) -> tuple[int, str]:
    """A reply as (code, str), to raise as one of Twisted's ``SMTPServerError`` family."""
    return reply[0], reply[1].decode("ascii")


def mailbox_full(tempfail: bool) -> Reply:
    """552 5.2.2, or 452 4.2.2 with ``[quota] full_tempfail`` for senders that should retry."""
    return MAILBOX_FULL_TEMPORARY if tempfail else MAILBOX_FULL


def partly_delivered(full: tuple[str, ...], tempfail: bool) -> Reply:
    """The end of DATA when some recipients got the message and these (full) did not.

    SMTP has one reply for all recipients and popserv sends no bounces: the sender hears
    of the failure (and whom it hit), the others keep their copy.
    """
    code, text = mailbox_full(tempfail)
    names = b", ".join(user.encode("utf-8", "replace") for user in full)
    return code, text + b" for " + names + b"; delivered to the other recipients"


def reply_for(failure, what: str, tempfail: bool = False) -> Reply:
    """The reply for a refusal or a failed delivery; unexpected errors are logged as ``what``."""
    if failure.check(MailboxFull):
        return mailbox_full(tempfail)
    if failure.check(DeliveryFailed):
        return DISK_FULL if failure.value.disk_full else LOCAL_ERROR
    if failure.check(smtp.SMTPServerError):
        text = failure.value.resp
        if isinstance(text, str):
            text = text.encode("ascii", "replace")
        return failure.value.code, text
    log.failure(what, failure)
    return LOCAL_ERROR
