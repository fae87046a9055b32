"""The ESMTP receiver: local recipients only, size limits, DATA streamed into an IDeliverer.

Built on ``twisted.mail.smtp.ESMTP``; the subclass fixes what popserv cannot ship as it is:

* Replies stay in order when a validator answers with a Deferred (twisted/twisted#8126):
  after a command whose reply is pending, no further input is processed until that
  reply is sent, and once input waits behind it the transport stops reading.
* EHLO advertises SIZE, 8BITMIME, PIPELINING and ENHANCEDSTATUSCODES, and each is honoured;
  every reply after the greeting carries an RFC 3463 status code.
* Lines end only at CRLF.  A bare CR or LF, or a NUL, in DATA fails the whole message, so
  ``\\n.\\n`` cannot end a message and smuggle another (CVE-2023-51765); over-long lines fail
  the message instead of dropping back to command mode in the middle of DATA.
* A session that keeps erring (``[smtp] max_bad_commands`` unknown, malformed or
  out-of-order commands, or ``max_rejected_recipients`` refused recipients) is told 421
  and closed, with one event, so one connection cannot flood the log.
* Messages are written in binary, one temporary file per message however many recipients,
  and only a delivery that is on disk in every ``new/`` gets 250.

popserv never relays: RCPT to a domain that is not local is refused, and nothing here
sends mail anywhere.  Recipients map to users of the ``IUserDB``: ``alice@<local domain>``
is the user ``alice@<domain>`` when the users file has that entry, else the user ``alice``
(each tried as given, then in lower case).  A quoted local part that needs no quotes
is the same address (``"bob"`` is ``bob``), and a domain with an empty label is refused.
"""

from __future__ import annotations

import collections
import functools
import re
import resource
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import smtp
from zope.interface import implementer

from popserv.config import Config
from popserv.flow import ConnectionFlow
from popserv.interfaces import IDeliverer, IDelivery, IUserDB, UserDBUnavailable
from popserv.logsafe import untrusted
from popserv.smtpreplies import (
    BAD_COMMAND_CHARS,
    BAD_PARAMETER,
    BAD_RECIPIENT,
    BAD_SENDER,
    BARE_LINE_END,
    BYE,
    EMPTY_COMMAND,
    HELO_NEEDS_DOMAIN,
    HELP,
    LINE_TOO_LONG,
    NEED_HELO,
    NEED_MAIL,
    NEED_RCPT,
    NESTED_MAIL,
    NOOP_OK,
    NOT_IMPLEMENTED,
    NUL_IN_DATA,
    RECIPIENT_OK,
    RELAY_DENIED,
    RESET_OK,
    SENDER_OK,
    SERVER_BUSY,
    START_DATA,
    SYNTAX_ERROR,
    TIMEOUT,
    TOO_BIG,
    TOO_MANY_BAD_COMMANDS,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_RECIPIENTS,
    TOO_MANY_REJECTED,
    UNKNOWN_COMMAND,
    UNKNOWN_USER,
    USERDB_DOWN,
    error_args,
    reply_for,
    with_enhanced_code,
)

log = Logger()

COMMAND, DATA = smtp.COMMAND, smtp.DATA

# A first DATA line that starts a header field (RFC 5322 section 2.2: name ":").
_HEADER_RE = re.compile(rb"[!-9;-~]+:")
_UNSAFE_IN_HEADER = re.compile(rb"[^!-'*-[\]-~]")  # printable, minus "(", ")", "\"
# RFC 5321 section 4.1.2: a Dot-string local part, and a quoted-pair inside a Quoted-string.
_DOT_STRING = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_QUOTED_PAIR = re.compile(r"\\([ -~])")


#: SMTP refuses connections while fewer than this share of the process's file descriptors
#: would stay free, so that POP3 (and SMTP's own deliveries) always have some left.
DESCRIPTOR_RESERVE = 0.25


def soft_file_limit() -> int:
    """The process's limit on open file descriptors (RLIMIT_NOFILE, soft)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 2**31 if soft == resource.RLIM_INFINITY else soft


def _descriptor(transport) -> int:
    """The transport's socket descriptor, or -1 when it has none of its own."""
    try:
        return transport.fileno()
    except Exception:
        return -1


def local_domains(config: Config) -> tuple[str, ...]:
    """The configured local domains, or the host name and ``localhost``."""
    if config.smtp_domains:
        return config.smtp_domains
    return tuple(dict.fromkeys((config.hostname.lower().rstrip("."), "localhost")))


def _unquoted(local: str) -> str:
    """A quoted local part that needs no quotes, without them: ``"bob"`` is ``bob``.

    RFC 5321 section 4.1.2 makes the two the same address.  A part that needs its quotes
    (a space, an ``@``, a leading dot) stays as it is, and so matches no user.
    """
    if len(local) >= 2 and local[0] == local[-1] == '"':
        inner = _QUOTED_PAIR.sub(r"\1", local[1:-1])
        if _DOT_STRING.fullmatch(inner):
            return inner
    return local


def _domain_name(domain: str) -> str | None:
    """The domain in lower case without one final dot; None when a label is empty."""
    domain = domain.lower()
    if domain.endswith("."):
        domain = domain[:-1]
    if "" in domain.split("."):
        return None
    return domain


def _header_safe(text: bytes, limit: int = 255) -> bytes:
    """Client-supplied text made safe for a trace header: printable ASCII, no comments."""
    return _UNSAFE_IN_HEADER.sub(b"?", text[:limit])


@functools.lru_cache(maxsize=4)
def _date(seconds: int) -> bytes:
    """An RFC 5322 date in local time; the same for every message of that second."""
    return formatdate(seconds, localtime=True).encode("ascii")


def _address_literal(host: str) -> bytes:
    if ":" in host:
        return b"[IPv6:" + host.encode("ascii", "replace") + b"]"
    return b"[" + host.encode("ascii", "replace") + b"]"


@dataclass
class Session:
    """Per-connection state: who the peer is and what it called itself."""

    peer: str
    helo: bytes | None = None
    esmtp: bool = False
    tls: bool = False

    @property
    def with_protocol(self) -> bytes:
        """The ``with`` keyword of the Received header (RFC 3848)."""
        if not self.esmtp:
            return b"SMTP"
        return b"ESMTPS" if self.tls else b"ESMTP"


@dataclass
class Transaction:
    """Per-message state, from MAIL FROM to the end of DATA."""

    id: str
    sender: smtp.Address
    recipients: list[bytes] = field(default_factory=list)
    size: int = 0
    failure: tuple[int, bytes] | None = None
    first_line: bool = True
    messages: list = field(default_factory=list)
    over_recipient_limit: bool = False


def new_transaction_id() -> str:
    """An id for logs and the Received header, unguessable like a Postfix queue id."""
    return secrets.token_hex(6).upper()


@implementer(smtp.IMessage)
class LocalMessage:
    """An ``IMessage`` that streams lines, with LF line ends, into one ``IDelivery``."""

    def __init__(self, delivery: IDelivery):
        self.delivery = delivery

    def lineReceived(self, line: bytes) -> None:
        self.delivery.write(line + b"\n")

    def write(self, data: bytes) -> None:
        """Store lines that already end with LF, in one piece."""
        self.delivery.write(data)

    def eomReceived(self) -> defer.Deferred:
        """Fires with the stored file name once the message is in every recipient's Maildir."""
        return defer.maybeDeferred(self.delivery.finish)

    def connectionLost(self) -> None:
        self.delivery.abort()


@implementer(smtp.IMessageDelivery)
class LocalDelivery:
    """Recipient rules and trace headers for one connection; one ``LocalMessage`` per message."""

    def __init__(
        self,
        session: Session,
        userdb: IUserDB,
        deliverer: IDeliverer,
        domains: tuple[str, ...],
        hostname: str,
        clock,
        postmaster: str = "postmaster",
    ):
        self.session = session
        self.postmaster = postmaster
        self.userdb = userdb
        self.deliverer = deliverer
        self.domains = frozenset(d.lower() for d in domains)
        self.hostname = hostname.encode("ascii", "replace")
        self.clock = clock
        self.transaction: Transaction | None = None
        self._users: list[str] = []
        self._message: LocalMessage | None = None

    def validateFrom(self, helo, origin: smtp.Address) -> smtp.Address:
        """Any sender is accepted (the null sender too); a new message begins."""
        self._users = []
        self._message = None
        return origin

    def validateTo(self, user: smtp.User):
        """Local domain and known user, else SMTPBadRcpt: 550 5.7.1 or 550 5.1.1."""
        local_user = self.resolve(user.dest)
        if local_user not in self._users:
            self._users.append(local_user)
        return self._current_message

    def resolve(self, address: smtp.Address) -> str:
        """The user an address delivers to; raises ``SMTPServerError`` with the reply."""
        try:
            domain = _domain_name(address.domain.decode("ascii"))
            local = _unquoted(address.local.decode("ascii"))
        except UnicodeDecodeError:
            domain = None
        if domain is None:
            raise smtp.SMTPBadRcpt(address, *error_args(BAD_RECIPIENT))
        if local.lower() == "postmaster" and (domain in self.domains or domain == "localhost"):
            # RFC 5321 section 4.5.1: postmaster is always accepted (a bare <postmaster>
            # arrives with Twisted's default domain, localhost).
            return self.postmaster
        if domain not in self.domains:
            raise smtp.SMTPBadRcpt(address, *error_args(RELAY_DENIED))
        candidates = dict.fromkeys(
            [f"{local}@{domain}", local, f"{local.lower()}@{domain}", local.lower()]
        )
        try:
            for candidate in candidates:
                if local and self.userdb.exists(candidate):
                    return candidate
        except UserDBUnavailable:
            raise smtp.SMTPServerError(*error_args(USERDB_DOWN)) from None
        raise smtp.SMTPBadRcpt(address, *error_args(UNKNOWN_USER))

    def _current_message(self) -> LocalMessage:
        if self._message is None:
            self._message = LocalMessage(self.deliverer.begin(self._users))
        return self._message

    def receivedHeader(self, helo, origin: smtp.Address, recipients) -> bytes:
        """``Return-Path`` and ``Received`` (RFC 5321 section 4.4), as LF-separated lines.

        ``for <address>`` appears only with one recipient, so Bcc recipients stay hidden
        from each other while one file serves them all.
        """
        session = self.session
        transaction_id = self.transaction.id if self.transaction else new_transaction_id()
        helo_name = _header_safe(session.helo or b"") or b"unknown"
        lines = [
            b"Return-Path: <" + _header_safe(bytes(origin), 512) + b">",
            b"Received: from " + helo_name + b" (" + _address_literal(session.peer) + b")",
            b"\tby "
            + self.hostname
            + b" (popserv) with "
            + session.with_protocol
            + b" id "
            + transaction_id.encode("ascii"),
        ]
        date = _date(int(self.clock.seconds()))
        if len(recipients) == 1:
            rcpt = _header_safe(bytes(recipients[0].dest), 512)
            lines.append(b"\tfor <" + rcpt + b">; " + date)
        else:
            lines[-1] += b";"
            lines.append(b"\t" + date)
        return b"\n".join(lines)


class ESMTPReceiver(smtp.ESMTP):
    """Twisted's ESMTP server with popserv's fixes; see the module docstring."""

    def __init__(self, factory: SMTPFactory):
        super().__init__(contextFactory=factory.context_factory)
        self.factory = factory
        self.config = factory.config
        self.clock = factory.clock
        self.host = factory.config.hostname
        self.timeout = factory.config.smtp_timeout
        self.callLater = factory.clock.callLater
        self.session: Session | None = None
        self.transaction: Transaction | None = None
        self._line_limit = factory.config.smtp_max_line_length - 2
        self._buffer = b""
        self._discarding = False
        self._drop_buffered = False
        self._awaiting_reply = False
        self._paused = False
        self._replies = 0
        self._connected = False
        self._counted = False
        self._bad_commands = 0
        self._rejected_recipients = 0

    # Connection

    def connectionMade(self) -> None:
        self._connected = True
        peer = self.transport.getPeer()
        self.session = Session(peer=str(getattr(peer, "host", peer)))
        self.flow = ConnectionFlow(self.transport, self.clock, self._output_drained)
        limit = self.factory.connection_opened(self.session.peer, _descriptor(self.transport))
        if limit is not None:
            self._refuse_connection(limit)
            return
        self._counted = True
        self.delivery = LocalDelivery(
            self.session,
            self.factory.userdb,
            self.factory.deliverer,
            self.factory.domains,
            self.factory.config.hostname,
            self.clock,
            self.factory.config.smtp_postmaster,
        )
        super().connectionMade()

    def _refuse_connection(self, limit: str) -> None:
        """421 and close, before anything is built: over a limit, a connection costs little."""
        if limit == "per-peer":
            reply, fields = TOO_MANY_CONNECTIONS, {}
        else:
            reply, fields = SERVER_BUSY, {"limit": limit}
        self._reject("connect", reply, host=True, **fields)
        self._send(reply[0], reply[1] % self.host)
        self.flow.close()

    def greeting(self) -> bytes:
        return self.host + b" ESMTP popserv"

    def timeoutConnection(self) -> None:
        # Aborted instead when the client is not reading or never finished TLS.
        self._send(TIMEOUT[0], TIMEOUT[1] % self.host)
        self.flow.close()

    def connectionLost(self, reason) -> None:
        self._connected = False
        if hasattr(self, "flow"):
            self.flow.lost()
        self._abort_messages()
        if self._counted:
            self._counted = False
            self.factory.connection_closed(self.session.peer)
        super().connectionLost(reason)

    # Input: lines end at CRLF only; nothing is read while a reply is pending

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        self._process()

    def _process(self) -> None:
        buf, pos = self._buffer, 0
        while (
            self._connected
            and not self._awaiting_reply
            and not self.flow.blocked
            and not self.transport.disconnecting
        ):
            if self.mode == DATA and not self._discarding:
                pos = self._take_data(buf, pos)
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            line, pos = buf[pos:end], end + 2
            if self._discarding or len(line) > self._line_limit:
                self._discarding = False
                self._line_too_long()
            else:
                self._line(line)
            if self._drop_buffered:
                self._drop_buffered = False
                pos = len(buf)
        rest = buf[pos:]
        if not self._awaiting_reply and not self.flow.blocked and len(rest) > self._line_limit + 1:
            # Forget the rest of this line, but keep a CR that may start its CRLF.
            self._discarding = True
            rest = rest[-1:] if rest.endswith(b"\r") else b""
        self._buffer = rest
        if rest and self._awaiting_reply:
            # Input waits behind a pending reply: read no more until the reply is sent.
            self._pause()
        elif self.flow.blocked and len(rest) > self._line_limit:
            # Replies wait unread by the client: stop reading until it reads them.
            self._pause()

    def _take_data(self, buf: bytes, pos: int) -> int:
        """Take the complete DATA lines from ``pos`` up to the final ".", all at once.

        Returns where the rest begins: the "." line, or a line not complete yet, is left
        to the line-by-line loop.
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
        self.resetTimeout()
        if self.transaction is not None and self.transaction.failure is None:
            self._data_block(buf[pos:end])
        return end

    def _data_block(self, block: bytes) -> None:
        """Store CRLF-ended DATA lines (none of them the final ".") with one write each.

        The checks run over the whole block in C; a block that fails any of them goes
        line by line instead, so the reply is the one the first bad line earns.
        """
        transaction = self.transaction
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
            or transaction.size + len(data) > self.config.smtp_max_message_size
            or not all(type(message) is LocalMessage for message in transaction.messages)
        ):
            self._data_lines(block)
            return
        transaction.size += len(data)
        if transaction.first_line:
            transaction.first_line = False
            if lines[0] and not _HEADER_RE.match(lines[0]):
                lines.insert(0, b"")
        data = b"\n".join(lines)
        try:
            for message in transaction.messages:
                message.write(data)
        except Exception:
            self._fail_data(reply_for(defer.Failure(), "cannot store the message"))

    def _data_lines(self, block: bytes) -> None:
        """CRLF-ended DATA lines (none of them the final "."), one at a time."""
        for line in block[:-2].split(b"\r\n"):
            if len(line) > self._line_limit:
                self._line_too_long()
            else:
                self.dataLineReceived(line)

    def _line(self, line: bytes) -> None:
        mode, replies = self.mode, self._replies
        self.lineReceived(line)
        expects_reply = mode != DATA or self.mode != DATA
        if expects_reply and self._replies == replies and self._connected:
            if not self.transport.disconnecting:
                self._awaiting_reply = True

    def _line_too_long(self) -> None:
        self.resetTimeout()
        if self.mode == DATA:
            self._fail_data(LINE_TOO_LONG)
        else:
            self._reject("command", LINE_TOO_LONG)
            self._bad_command(LINE_TOO_LONG)

    def state_COMMAND(self, line: bytes) -> None:
        if b"\r" in line or b"\n" in line or b"\0" in line:
            self._reject("command", BAD_COMMAND_CHARS)
            self._bad_command(BAD_COMMAND_CHARS)
            return
        super().state_COMMAND(line)

    def lookupMethod(self, command):
        if isinstance(command, bytes):
            try:
                command = command.decode("ascii")
            except UnicodeDecodeError:
                return None
        if not command.isalpha():
            return None
        return super().lookupMethod(command)

    # Output: every reply is counted, and carries an enhanced status code

    def sendCode(self, code: int, message: bytes = b"") -> None:
        self._send(code, with_enhanced_code(code, message))

    def _send(self, code: int, message: bytes) -> None:
        """Send a reply as it is, and let input that waited for it be processed."""
        self._replies += 1
        super().sendCode(code, message)
        if self._awaiting_reply:
            self._awaiting_reply = False
            if self._connected and not self.transport.disconnecting:
                if self._paused:
                    self._paused = False
                    self.transport.resumeProducing()
                if self._buffer:
                    self.clock.callLater(0, self._process)

    def _output_drained(self) -> None:
        """The client read its replies: read and process again, unless a reply is pending."""
        if self._awaiting_reply or not self._connected or self.transport.disconnecting:
            return
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        if self._buffer:
            self._process()

    def _pause(self) -> None:
        if not self._paused and self._connected and not self.transport.disconnecting:
            self._paused = True
            self.transport.pauseProducing()

    def sendSyntaxError(self) -> None:
        self._bad_command(EMPTY_COMMAND)

    # Commands

    def extensions(self) -> dict:
        ext = super().extensions()
        ext[b"SIZE"] = [str(self.config.smtp_max_message_size).encode("ascii")]
        ext[b"8BITMIME"] = None
        ext[b"PIPELINING"] = None
        ext[b"ENHANCEDSTATUSCODES"] = None
        return ext

    def do_HELO(self, rest: bytes) -> None:
        self._greet(rest, esmtp=False)

    def do_EHLO(self, rest: bytes) -> None:
        self._greet(rest, esmtp=True)

    def _greet(self, rest: bytes, esmtp: bool) -> None:
        rest = rest.strip()
        if not rest:
            self._bad_command(HELO_NEEDS_DOMAIN)
            return
        peer = self.session.peer.encode("ascii", "replace")
        self._helo = (rest, peer)
        self._reset_transaction()
        self.session.helo = rest
        self.session.esmtp = esmtp
        reply = self.host + b" Hello " + _address_literal(self.session.peer)
        if esmtp:
            reply += b"\n" + self.listExtensions()
        self._send(250, reply)

    def do_MAIL(self, rest: bytes) -> None:
        if self.session.helo is None:
            self._bad_command(NEED_HELO)
            return
        if self._from is not None or self.transaction is not None:
            self._bad_command(NESTED_MAIL)
            return
        m = self.mail_re.match(rest)
        if not m:
            self._bad_command(SYNTAX_ERROR)
            return
        error = self._mail_parameters(m.group("opts"))
        if error is not None:
            self._reject("MAIL", error, sender=m.group("path"))
            if error == TOO_BIG:
                self.sendCode(*error)
            else:
                self._bad_command(error)
            return
        try:
            sender = smtp.Address(m.group("path"), self.host)
        except smtp.AddressError:
            self._reject("MAIL", BAD_SENDER, sender=m.group("path"))
            self._bad_command(BAD_SENDER)
            return
        self.transaction = Transaction(id=new_transaction_id(), sender=sender)
        self.delivery.transaction = self.transaction
        d = defer.maybeDeferred(self.validateFrom, self._helo, sender)
        d.addCallbacks(self._sender_ok, self._sender_refused, errbackArgs=(sender,))

    def _mail_parameters(self, text: bytes | None) -> tuple[int, bytes] | None:
        """The error reply for the MAIL FROM parameters, or None when they are fine."""
        for param in (text or b"").split():
            key, _, value = param.partition(b"=")
            key = key.upper()
            if key == b"SIZE":
                if not value.isdigit() or len(value) > 20:
                    return SYNTAX_ERROR
                if int(value) > self.config.smtp_max_message_size:
                    return TOO_BIG
            elif key == b"BODY":
                if value.upper() not in (b"7BIT", b"8BITMIME"):
                    return SYNTAX_ERROR
            else:
                return BAD_PARAMETER
        return None

    def _sender_ok(self, sender: smtp.Address) -> None:
        self._from = sender
        self.sendCode(*SENDER_OK)

    def _sender_refused(self, failure, sender) -> None:
        self.transaction = None
        reply = reply_for(failure, "sender validation failed")
        self._reject("MAIL", reply, sender=bytes(sender))
        self.sendCode(*reply)

    def do_RCPT(self, rest: bytes) -> None:
        if self._from is None:
            self._bad_command(NEED_MAIL)
            return
        m = self.rcpt_re.match(rest)
        if not m:
            self._bad_command(SYNTAX_ERROR)
            return
        if m.group("opts"):
            self._reject("RCPT", BAD_PARAMETER, recipient=m.group("path"))
            self._recipient_rejected(BAD_PARAMETER)
            return
        if len(self._to) >= self.config.smtp_max_recipients:
            # No error of the client's (it sends the rest later): not counted, logged once.
            if not self.transaction.over_recipient_limit:
                self.transaction.over_recipient_limit = True
                self._reject("RCPT", TOO_MANY_RECIPIENTS, recipient=m.group("path"))
            self.sendCode(*TOO_MANY_RECIPIENTS)
            return
        try:
            user = smtp.User(m.group("path"), self._helo, self, self._from)
        except smtp.AddressError:
            self._reject("RCPT", BAD_RECIPIENT, recipient=m.group("path"))
            self._recipient_rejected(BAD_RECIPIENT)
            return
        d = defer.maybeDeferred(self.validateTo, user)
        d.addCallbacks(
            self._recipient_ok, self._recipient_refused, callbackArgs=(user,), errbackArgs=(user,)
        )

    def _recipient_ok(self, message_factory, user: smtp.User) -> None:
        self._to.append((user, message_factory))
        self.transaction.recipients.append(bytes(user.dest))
        self.sendCode(*RECIPIENT_OK)

    def _recipient_refused(self, failure, user: smtp.User) -> None:
        reply = reply_for(failure, "recipient validation failed")
        self._reject("RCPT", reply, recipient=bytes(user.dest))
        self._recipient_rejected(reply)

    def do_DATA(self, rest: bytes) -> None:
        if self._from is None or not self._to:
            self._bad_command(NEED_RCPT)
            return
        helo, origin, recipients = self._helo, self._from, self._to
        self._from, self._to = None, []
        transaction = self.transaction
        # One message object may serve several recipients (LocalDelivery's always does).
        groups: dict[int, tuple[object, list]] = {}
        try:
            for user, message_factory in recipients:
                message = message_factory()
                groups.setdefault(id(message), (message, []))[1].append(user)
                if len(groups[id(message)][1]) == 1:
                    transaction.messages.append(message)
            for message, users in groups.values():
                header = self.receivedHeader(helo, origin, users)
                if header:
                    message.lineReceived(header)
        except Exception:
            reply = reply_for(defer.Failure(), "cannot start a delivery")
            self._abort_messages()
            self.transaction = None
            self._reject("DATA", reply)
            self.sendCode(*reply)
            return
        self.mode = DATA
        self.sendCode(*START_DATA)

    def dataLineReceived(self, line: bytes) -> None:
        transaction = self.transaction
        if line == b".":
            self.mode = COMMAND
            self._end_of_data(transaction)
            return
        if transaction.failure is not None:
            return
        if line[:1] == b".":
            line = line[1:]
        transaction.size += len(line) + 2
        if b"\r" in line or b"\n" in line:
            self._fail_data(BARE_LINE_END)
            return
        if b"\0" in line:
            self._fail_data(NUL_IN_DATA)
            return
        if transaction.size > self.config.smtp_max_message_size:
            self._fail_data(TOO_BIG)
            return
        try:
            if transaction.first_line:
                transaction.first_line = False
                if line and not _HEADER_RE.match(line):
                    # No header section: keep our trace headers apart from the body.
                    for message in transaction.messages:
                        message.lineReceived(b"")
            for message in transaction.messages:
                message.lineReceived(line)
        except Exception:
            self._fail_data(reply_for(defer.Failure(), "cannot store the message"))

    state_DATA = dataLineReceived

    def _fail_data(self, reply: tuple[int, bytes]) -> None:
        """Fail the message being received: drop what is stored, answer at its end."""
        transaction = self.transaction
        if transaction.failure is None:
            transaction.failure = reply
            self._abort_messages()

    def _end_of_data(self, transaction: Transaction) -> None:
        self.transaction = None
        if transaction.failure is not None:
            self._reject("DATA", transaction.failure, transaction=transaction)
            self.sendCode(*transaction.failure)
            return
        messages, transaction.messages = transaction.messages, []
        d = defer.DeferredList([m.eomReceived() for m in messages], consumeErrors=True)
        d.addCallback(self._message_handled, transaction)

    def _message_handled(self, results, transaction: Transaction) -> None:
        failures = [result for ok, result in results if not ok]
        if failures:
            reply = reply_for(failures[0], "delivery failed")
            self._reject("DATA", reply, transaction=transaction)
            self.sendCode(*reply)
            return
        stored = [result for ok, result in results]
        log.info(
            "smtp.accepted: peer={peer} id={id} from={sender} to={recipients} size={size} "
            "stored={stored}",
            peer=self.session.peer,
            id=transaction.id,
            sender=untrusted(bytes(transaction.sender)),
            recipients=untrusted(b",".join(transaction.recipients)),
            size=transaction.size,
            stored=",".join(stored),
        )
        self.sendCode(250, b"2.0.0 Ok: queued as " + transaction.id.encode("ascii"))

    def do_RSET(self, rest: bytes) -> None:
        self._reset_transaction()
        self.sendCode(*RESET_OK)

    def do_NOOP(self, rest: bytes) -> None:
        self.sendCode(*NOOP_OK)

    def do_HELP(self, rest: bytes) -> None:
        self.sendCode(*HELP)

    def do_VRFY(self, rest: bytes) -> None:
        self.sendCode(*NOT_IMPLEMENTED)

    do_EXPN = do_VRFY

    def do_QUIT(self, rest: bytes) -> None:
        self.sendCode(*BYE)
        self.flow.close()

    def do_UNKNOWN(self, rest: bytes) -> None:
        self._bad_command(UNKNOWN_COMMAND)

    def ext_AUTH(self, rest: bytes) -> None:
        """popserv receives mail for its users; it takes no submissions, so no AUTH."""
        self.sendCode(*NOT_IMPLEMENTED)

    def ext_STARTTLS(self, rest: bytes) -> None:
        """After TLS starts, forget what was said before it and any input sent behind it."""
        was_tls = self.startedTLS
        super().ext_STARTTLS(rest)
        if self.startedTLS and not was_tls:
            self._drop_buffered = True
            self._reset_transaction()
            self.session.helo = None
            self.session.esmtp = False
            self.session.tls = True

    # Error limits: a client that keeps erring is told 421 and the session ends

    def _bad_command(self, reply: tuple[int, bytes]) -> None:
        """Answer a command that is unknown, malformed or out of order, and count it."""
        self.sendCode(*reply)
        self._bad_commands += 1
        if self._bad_commands >= self.config.smtp_max_bad_commands:
            self._hang_up(TOO_MANY_BAD_COMMANDS, self._bad_commands)

    def _recipient_rejected(self, reply: tuple[int, bytes]) -> None:
        """Answer a refused RCPT; permanent refusals count (a 4xx is no fault of the client's)."""
        self.sendCode(*reply)
        if reply[0] >= 500:
            self._rejected_recipients += 1
            if self._rejected_recipients >= self.config.smtp_max_rejected_recipients:
                self._hang_up(TOO_MANY_REJECTED, self._rejected_recipients)

    def _hang_up(self, reply: tuple[int, bytes], count: int) -> None:
        """End the session with one event and a 421; input after the last command is dropped."""
        if not self._connected or self.transport.disconnecting:
            return
        self._reject("session", reply, host=True, count=str(count))
        self._send(reply[0], reply[1] % self.host)
        self.flow.close()

    # Helpers

    def _reset_transaction(self) -> None:
        self._from, self._to = None, []
        self.transaction = None

    def _abort_messages(self) -> None:
        transaction = self.transaction
        if transaction is None:
            return
        messages, transaction.messages = transaction.messages, []
        for message in messages:
            try:
                message.connectionLost()
            except Exception:
                log.failure("aborting a message failed")

    def _reject(self, stage: str, reply, *, host=False, transaction=None, **fields) -> None:
        """Log one event per refusal: the address, the stage and the reply first.

        What fail2ban reads comes before any client text, and each client value (sender,
        recipient, ...) is quoted, so no address or reply can be forged into the line.
        """
        text = reply[1] % self.host if host else reply[1]
        if transaction is not None:
            fields["sender"] = bytes(transaction.sender)
            fields["recipients"] = b",".join(transaction.recipients)
            fields["id"] = transaction.id
        details = "".join(f" {key}={{{key}}}" for key in sorted(fields))
        log.info(
            "smtp.rejected: peer={peer} stage={stage} code={code} reason={reason}" + details,
            peer=self.session.peer,
            stage=stage,
            code=reply[0],
            reason=untrusted(text),
            **{key: untrusted(value) for key, value in fields.items()},
        )


class SMTPFactory(smtp.SMTPFactory):
    """Builds ``ESMTPReceiver`` connections and counts them, in all and per peer address.

    ``file_limit`` returns the process's descriptor limit (read at each connection, as
    ``popserv.process`` raises it only when the service starts).
    """

    protocol = ESMTPReceiver
    noisy = False

    def __init__(
        self,
        deliverer: IDeliverer,
        userdb: IUserDB,
        config: Config,
        clock=None,
        context_factory=None,
        file_limit: Callable[[], int] = soft_file_limit,
    ):
        super().__init__(portal=None)
        if clock is None:
            from twisted.internet import reactor as clock
        self.deliverer = deliverer
        self.userdb = userdb
        self.config = config
        self.clock = clock
        self.context_factory = context_factory
        self.domains = local_domains(config)
        self.file_limit = file_limit
        self.connections: collections.Counter[str] = collections.Counter()
        self.open_connections = 0

    def buildProtocol(self, addr) -> ESMTPReceiver:
        return self.protocol(self)

    def connection_opened(self, peer: str, descriptor: int = -1) -> str | None:
        """Count a new connection from ``peer``, whose socket is ``descriptor`` (-1: unknown).

        Returns None, or (not counting it) the limit it is over: ``per-peer``,
        ``max_connections`` or ``descriptors``.
        """
        if self.connections[peer] >= self.config.smtp_max_connections_per_peer:
            return "per-peer"
        if self.open_connections >= self.config.smtp_max_connections:
            return "max_connections"
        if self.descriptors_short(descriptor):
            return "descriptors"
        self.connections[peer] += 1
        self.open_connections += 1
        return None

    def descriptors_short(self, newest: int) -> bool:
        """Whether one more connection would leave less than the reserve of descriptors free.

        Counted without a system call, as this runs for every connection: the kernel gives
        a new socket the lowest free number, so all those below ``newest`` are in use, and
        each SMTP connection may still open one more (the temporary file of its message).
        """
        limit = self.file_limit()
        in_use = newest + 1 + self.open_connections + 1
        return limit - in_use < limit * DESCRIPTOR_RESERVE

    def connection_closed(self, peer: str) -> None:
        self.open_connections -= 1
        self.connections[peer] -= 1
        if self.connections[peer] <= 0:
            del self.connections[peer]
