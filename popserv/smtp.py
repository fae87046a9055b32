"""The ESMTP receiver: commands, replies, the session and the envelope, and its factory.

Built on ``twisted.mail.smtp.ESMTP`` for the greeting, the formatting of replies, the
listing of EHLO keywords, idle timeouts and address parsing.  Everything else is
popserv's own, and reads none of Twisted's private state:

* Input flows through a ``lineflow.ConnectionFlow``.  A command's handler returns a
  Deferred when its reply must wait (a sender or recipient check, the delivery at the
  end of DATA), and no further input is handled until it fires, so replies stay in
  order however the client pipelines (twisted/twisted#8126).
* The protocol owns one ``Session`` (the connection) and one ``Envelope`` (the message
  under way); the recipient policy (``IRecipientPolicy``) and the delivery
  (``IDeliverer``) only receive them.  DATA is read by ``smtpdata.MessageReader``.
* EHLO advertises SIZE, 8BITMIME, PIPELINING and ENHANCEDSTATUSCODES (and STARTTLS
  where it can), and each is honoured; every reply after the greeting carries an
  RFC 3463 status code.
* Each message is written once, in binary, however many recipients it has, and only a
  delivery that is on disk in every recipient's ``new/`` gets 250.
* A session that keeps erring (``[smtp] max_bad_commands`` unknown, malformed or
  out-of-order commands, or ``max_rejected_recipients`` refused recipients) is told 421
  and closed, with one event, so one connection cannot flood the log.

popserv never relays, and nothing here sends mail anywhere.
"""

from __future__ import annotations

import re
import secrets

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener, ITLSTransport
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from popserv.config import Config
from popserv.interfaces import (
    NO_METRICS,
    Delivered,
    Envelope,
    IDeliverer,
    IRecipientPolicy,
    IUserDB,
    Session,
)
from popserv.limits import PER_PEER, ConnectionLimiter, transport_descriptor
from popserv.lineflow import ConnectionFlow, ILineReceiver
from popserv.logsafe import untrusted
from popserv.peers import peer_host
from popserv.recipients import LocalRecipients, address_literal, local_domains
from popserv.smtpdata import MessageReader, abort
from popserv.smtpreplies import (
    BAD_COMMAND_CHARS,
    BAD_PARAMETER,
    BAD_RECIPIENT,
    BAD_SENDER,
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
    RECIPIENT_OK,
    RESET_OK,
    SENDER_OK,
    SERVER_BUSY,
    START_DATA,
    START_TLS,
    SYNTAX_ERROR,
    TIMEOUT,
    TLS_ALREADY,
    TLS_UNAVAILABLE,
    TOO_BIG,
    TOO_MANY_BAD_COMMANDS,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_RECIPIENTS,
    TOO_MANY_REJECTED,
    UNKNOWN_COMMAND,
    Reply,
    partly_delivered,
    reply_for,
    with_enhanced_code,
)

log = Logger()

# RFC 5321 section 4.1.2 paths, as Twisted's SMTP server has long accepted them: a run of
# quoted strings, escaped characters, atom characters and "@.,:" (source routes).
_PATH = rb"""(?:"[^"]*"|\\.|[-A-Za-z0-9!#$%&'*+/=?^_`{|}~]|[@.,:])+"""
MAIL_RE = re.compile(
    rb"\s*FROM:\s*(?P<path><>|<%b>|%b)\s*(\s(?P<opts>.*))?$" % (_PATH, _PATH), re.I
)
RCPT_RE = re.compile(rb"\s*TO:\s*(?P<path><%b>|%b)\s*(\s(?P<opts>.*))?$" % (_PATH, _PATH), re.I)


def new_message_id() -> str:
    """An id for logs and the Received header, unguessable like a Postfix queue id."""
    return secrets.token_hex(6).upper()


def declared_size(text: bytes | None) -> int | None:
    """The SIZE of the MAIL FROM parameters (RFC 1870), None when not given (or bad)."""
    for param in (text or b"").split():
        key, _, value = param.partition(b"=")
        if key.upper() == b"SIZE" and value.isdigit() and len(value) <= 20:
            return int(value)
    return None


def mail_parameters_error(text: bytes | None, max_size: int) -> Reply | None:
    """The error reply for the MAIL FROM parameters, or None when they are fine."""
    for param in (text or b"").split():
        key, _, value = param.partition(b"=")
        key = key.upper()
        if key == b"SIZE":
            if not value.isdigit() or len(value) > 20:
                return SYNTAX_ERROR
            if int(value) > max_size:
                return TOO_BIG
        elif key == b"BODY":
            if value.upper() not in (b"7BIT", b"8BITMIME"):
                return SYNTAX_ERROR
        else:
            return BAD_PARAMETER
    return None


@implementer(ILineReceiver, IHandshakeListener)
class ESMTPReceiver(smtp.ESMTP):
    """One SMTP connection: its commands, its ``Session`` and its ``Envelope``."""

    def __init__(self, factory: SMTPFactory):
        super().__init__()
        self.factory = factory
        self.config = factory.config
        self.clock = factory.clock
        self.policy: IRecipientPolicy = factory.policy
        self.deliverer: IDeliverer = factory.deliverer
        self.host = factory.config.hostname
        self.timeout = factory.config.smtp_timeout
        self.callLater = factory.clock.callLater
        self.session: Session | None = None
        self.envelope: Envelope | None = None
        self.flow: ConnectionFlow | None = None
        self._tls_context = factory.context_factory
        self._reader: MessageReader | None = None
        self._max_line = factory.config.smtp_max_line_length
        self._connected = False
        self._counted = False
        self._bad_commands = 0
        self._rejected_recipients = 0
        self._handshake_done = False

    # Connection

    def connectionMade(self) -> None:
        self._connected = True
        self.session = Session(peer=peer_host(self.transport.getPeer()))
        self.flow = ConnectionFlow(self.transport, self.clock, self, input_bound=0)
        if not self._count_connection():
            return
        super().connectionMade()

    def greeting(self) -> bytes:
        return self.host + b" ESMTP popserv"

    def timeoutConnection(self) -> None:
        # Aborted instead when the client is not reading or never finished TLS.
        self.sendCode(TIMEOUT[0], TIMEOUT[1] % self.host)
        self.flow.close()

    def connectionLost(self, reason) -> None:
        self._connected = False
        if self.flow is not None:
            self.flow.lost()
        if self.envelope is not None:
            abort(self.envelope)
        if self._counted:
            self._counted = False
            self.factory.limiter.closed(self.session.peer)
        if self.session.tls and not self._handshake_done and _is_tls_error(reason):
            self.factory.metrics.tls_handshake(False)
        super().connectionLost(reason)

    def handshakeCompleted(self) -> None:
        """STARTTLS: the TLS handshake is done."""
        self._handshake_done = True
        self.factory.metrics.tls_handshake(True)

    def dataReceived(self, data: bytes) -> None:
        self.flow.data_received(data)

    # Connection limits, counted by the factory

    def _count_connection(self) -> bool:
        """Count this connection, or refuse it (421 and close) when it is over a limit.

        Refused before anything is built: over a limit, a connection costs little.
        """
        limit = self.factory.limiter.opened(self.session.peer, transport_descriptor(self.transport))
        if limit is None:
            self._counted = True
            return True
        if limit == PER_PEER:
            reply, fields = TOO_MANY_CONNECTIONS, {}
        else:
            reply, fields = SERVER_BUSY, {"limit": limit}
        self._reject("connect", reply, host=True, **fields)
        self.sendCode(reply[0], reply[1] % self.host)
        self.flow.close()
        return False

    # Input (ILineReceiver): lines end at CRLF only; DATA is taken a packet at a time

    def line_received(self, line: bytes) -> defer.Deferred | None:
        """Handle one line; a Deferred returned holds further input until its reply is sent."""
        self.resetTimeout()
        if self._reader is not None:
            if line == b".":
                return self._end_of_data()
            self._reader.line(line)
            return None
        if b"\r" in line or b"\n" in line or b"\0" in line:
            self._reject("command", BAD_COMMAND_CHARS)
            return self._bad_command(BAD_COMMAND_CHARS)
        parts = line.strip().split(None, 1)
        if not parts:
            return self._bad_command(EMPTY_COMMAND)
        handler = self.lookupMethod(parts[0]) or self.do_UNKNOWN
        return handler(parts[1] if len(parts) == 2 else b"")

    def line_too_long(self) -> None:
        self.resetTimeout()
        if self._reader is not None:
            self._reader.fail(LINE_TOO_LONG)
        else:
            self._reject("command", LINE_TOO_LONG)
            self._bad_command(LINE_TOO_LONG)

    def line_limit(self, line: bytes) -> int:
        return self._max_line

    def longest_line(self) -> int:
        # A line of the limit may be waiting for the LF of its CRLF.
        return self._max_line - 1

    def _take_data(self, buf: bytes, pos: int) -> int:
        end = self._reader.take(buf, pos)
        if end != pos:
            self.resetTimeout()
        return end

    def lookupMethod(self, command):
        """The handler of a command word; None for anything but ASCII letters."""
        if isinstance(command, bytes):
            try:
                command = command.decode("ascii")
            except UnicodeDecodeError:
                return None
        if not command.isalpha():
            return None
        return super().lookupMethod(command)

    def _then(self, call, args: tuple, ok, refused) -> defer.Deferred | None:
        """``call(*args)``, then ``ok(result, *args)`` or ``refused(failure, *args)``.

        At once when it answers at once; when it returns a Deferred, once that fires,
        and that Deferred is returned, so that input waits for the reply.
        """
        try:
            result = call(*args)
        except Exception:
            return refused(Failure(), *args)
        if isinstance(result, defer.Deferred):
            return result.addCallbacks(ok, refused, callbackArgs=args, errbackArgs=args)
        return ok(result, *args)

    # Output: every reply carries an enhanced status code

    def sendCode(self, code: int, message: bytes = b"") -> None:
        super().sendCode(code, with_enhanced_code(code, message))

    # Commands

    def extensions(self) -> dict:
        ext = {}
        if self._can_start_tls():
            ext[b"STARTTLS"] = None
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
        self.envelope = None
        self.session.helo = rest
        self.session.esmtp = esmtp
        reply = self.host + b" Hello " + address_literal(self.session.peer)
        if esmtp:
            reply += b"\n" + self.listExtensions()
        # The EHLO keywords carry no enhanced code (RFC 2034 section 3).
        super().sendCode(250, reply)

    def do_MAIL(self, rest: bytes) -> defer.Deferred | None:
        if self.session.helo is None:
            return self._bad_command(NEED_HELO)
        if self.envelope is not None:
            return self._bad_command(NESTED_MAIL)
        m = MAIL_RE.match(rest)
        if not m:
            return self._bad_command(SYNTAX_ERROR)
        path = m.group("path")
        error = mail_parameters_error(m.group("opts"), self.config.smtp_max_message_size)
        if error is not None:
            self._reject("MAIL", error, sender=path)
            if error == TOO_BIG:
                self.sendCode(*error)
                return None
            return self._bad_command(error)
        try:
            sender = smtp.Address(path, self.host)
        except smtp.AddressError:
            self._reject("MAIL", BAD_SENDER, sender=path)
            return self._bad_command(BAD_SENDER)
        envelope = Envelope(
            id=new_message_id(), sender=sender, declared_size=declared_size(m.group("opts"))
        )
        check = self.policy.check_sender
        return self._then(check, (self.session, envelope), self._sender_ok, self._sender_refused)

    def _sender_ok(self, result, session: Session, envelope: Envelope) -> None:
        self.envelope = envelope
        self.sendCode(*SENDER_OK)

    def _sender_refused(self, failure, session: Session, envelope: Envelope) -> None:
        reply = reply_for(failure, "sender validation failed")
        self._reject("MAIL", reply, sender=bytes(envelope.sender))
        self.sendCode(*reply)

    def do_RCPT(self, rest: bytes) -> defer.Deferred | None:
        envelope = self.envelope
        if envelope is None:
            return self._bad_command(NEED_MAIL)
        m = RCPT_RE.match(rest)
        if not m:
            return self._bad_command(SYNTAX_ERROR)
        path = m.group("path")
        if m.group("opts"):
            self._reject("RCPT", BAD_PARAMETER, recipient=path)
            return self._recipient_rejected(BAD_PARAMETER)
        if len(envelope.recipients) >= self.config.smtp_max_recipients:
            # No error of the client's (it sends the rest later): not counted, logged once.
            if not envelope.over_recipient_limit:
                envelope.over_recipient_limit = True
                self._reject("RCPT", TOO_MANY_RECIPIENTS, recipient=path)
            self.sendCode(*TOO_MANY_RECIPIENTS)
            return None
        try:
            address = smtp.Address(path, self.host)
        except smtp.AddressError:
            self._reject("RCPT", BAD_RECIPIENT, recipient=path)
            return self._recipient_rejected(BAD_RECIPIENT)
        check, args = self.policy.check_recipient, (self.session, envelope, address)
        return self._then(check, args, self._recipient_ok, self._recipient_refused)

    def _recipient_ok(self, user: str, session, envelope: Envelope, address) -> None:
        if user not in envelope.users:
            envelope.users.append(user)
        envelope.recipients.append(bytes(address))
        self.sendCode(*RECIPIENT_OK)

    def _recipient_refused(self, failure, session, envelope: Envelope, address) -> None:
        reply = reply_for(failure, "recipient validation failed")
        self._reject("RCPT", reply, recipient=bytes(address))
        self._recipient_rejected(reply)

    def do_DATA(self, rest: bytes) -> None:
        envelope = self.envelope
        if envelope is None or not envelope.recipients:
            self._bad_command(NEED_RCPT)
            return
        try:
            envelope.delivery = self.deliverer.begin(envelope.users)
            envelope.delivery.write(self.policy.trace_headers(self.session, envelope))
        except Exception:
            reply = reply_for(Failure(), "cannot start a delivery")
            abort(envelope)
            self.envelope = None
            self._reject("DATA", reply)
            self._count_message(reply, envelope)
            self.sendCode(*reply)
            return
        self._reader = MessageReader(
            envelope, self._max_line - 2, self.config.smtp_max_message_size
        )
        self.flow.take = self._take_data
        self.sendCode(*START_DATA)

    def _end_of_data(self) -> defer.Deferred | None:
        envelope, self.envelope = self.envelope, None
        self._reader = self.flow.take = None
        if envelope.failure is not None:
            self._reject("DATA", envelope.failure, envelope=envelope)
            self._count_message(envelope.failure, envelope)
            self.sendCode(*envelope.failure)
            return None
        return self._then(_finish, (envelope,), self._delivered, self._not_delivered)

    def _delivered(self, result: Delivered, envelope: Envelope) -> None:
        log.info(
            "smtp.accepted: peer={peer} id={id} from={sender} to={recipients} size={size} "
            "stored={stored}",
            peer=self.session.peer,
            id=envelope.id,
            sender=untrusted(bytes(envelope.sender)),
            recipients=untrusted(b",".join(envelope.recipients)),
            size=envelope.size,
            stored=result.name,
        )
        # Stored for at least one recipient: accepted, even when some mailboxes were full.
        self.factory.metrics.smtp_message("accepted", envelope.size)
        if result.full:
            reply = partly_delivered(result.full, self.config.quota_full_tempfail)
            self._reject("DATA", reply, envelope=envelope, full=",".join(result.full))
            self.sendCode(*reply)
            return
        self.sendCode(250, b"2.0.0 Ok: queued as " + envelope.id.encode("ascii"))

    def _not_delivered(self, failure, envelope: Envelope) -> None:
        reply = reply_for(failure, "delivery failed", self.config.quota_full_tempfail)
        self._reject("DATA", reply, envelope=envelope)
        self._count_message(reply, envelope)
        self.sendCode(*reply)

    def _count_message(self, reply: Reply, envelope: Envelope) -> None:
        """A message not stored: refused for good (5xx), or failed for now (4xx)."""
        result = "rejected" if reply[0] >= 500 else "failed"
        self.factory.metrics.smtp_message(result, envelope.size)

    def do_RSET(self, rest: bytes) -> None:
        self.envelope = None
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

    def _can_start_tls(self) -> bool:
        return (
            not self.session.tls
            and self._tls_context is not None
            and ITLSTransport.providedBy(self.transport)
        )

    def ext_STARTTLS(self, rest: bytes) -> None:
        """After TLS starts, forget what was said before it and any input sent behind it."""
        if self.session.tls:
            self.sendCode(*TLS_ALREADY)
            return
        if not self._can_start_tls():
            self.sendCode(*TLS_UNAVAILABLE)
            return
        self.sendCode(*START_TLS)
        self.transport.startTLS(self._tls_context)
        self.flow.drop_buffered()
        self.envelope = None
        self.session = Session(peer=self.session.peer, tls=True)

    # Error limits: a client that keeps erring is told 421 and the session ends

    def _bad_command(self, reply: Reply) -> None:
        """Answer a command that is unknown, malformed or out of order, and count it."""
        self.sendCode(*reply)
        self._bad_commands += 1
        if self._bad_commands >= self.config.smtp_max_bad_commands:
            self._hang_up(TOO_MANY_BAD_COMMANDS, self._bad_commands)

    def _recipient_rejected(self, reply: Reply) -> None:
        """Answer a refused RCPT; permanent refusals count (a 4xx is no fault of the client's)."""
        self.sendCode(*reply)
        if reply[0] >= 500:
            self._rejected_recipients += 1
            if self._rejected_recipients >= self.config.smtp_max_rejected_recipients:
                self._hang_up(TOO_MANY_REJECTED, self._rejected_recipients)

    def _hang_up(self, reply: Reply, count: int) -> None:
        """End the session with one event and a 421; input after the last command is dropped."""
        if not self._connected or self.transport.disconnecting:
            return
        self._reject("session", reply, host=True, count=str(count))
        self.sendCode(reply[0], reply[1] % self.host)
        self.flow.close()

    def _reject(self, stage: str, reply, *, host=False, envelope=None, **fields) -> None:
        """Log one event per refusal: the address, the stage and the reply first.

        What fail2ban reads comes before any client text, and each client value (sender,
        recipient, ...) is quoted, so no address or reply can be forged into the line.
        """
        text = reply[1] % self.host if host else reply[1]
        if envelope is not None:
            fields["sender"] = bytes(envelope.sender)
            fields["recipients"] = b",".join(envelope.recipients)
            fields["id"] = envelope.id
        details = "".join(f" {key}={{{key}}}" for key in sorted(fields))
        log.info(
            "smtp.rejected: peer={peer} stage={stage} code={code} reason={reason}" + details,
            peer=self.session.peer,
            stage=stage,
            code=reply[0],
            reason=untrusted(text),
            **{key: untrusted(value) for key, value in fields.items()},
        )


def _is_tls_error(reason: Failure) -> bool:
    from OpenSSL.SSL import Error

    return reason is not None and reason.check(Error) is not None


def _finish(envelope: Envelope) -> defer.Deferred:
    """Make the envelope's message durable in every recipient's mailbox."""
    return envelope.delivery.finish()


#: SMTP refuses connections while fewer than this share of the process's file descriptors
#: would stay free, so that POP3 (and SMTP's own deliveries) always have some left.
DESCRIPTOR_RESERVE = 0.25


class SMTPFactory(ServerFactory):
    """Builds ``ESMTPReceiver`` connections; ``limiter`` counts them (``IConnectionLimiter``).

    The connections share one ``policy``: it keeps no state of its own, so one serves all.
    """

    protocol = ESMTPReceiver
    noisy = False

    def __init__(
        self,
        deliverer: IDeliverer,
        userdb: IUserDB,
        config: Config,
        *,
        clock,
        context_factory=None,
        limiter=None,
        quota=None,
        metrics=None,
        available=None,
    ):
        """``clock``: the reactor (or a ``task.Clock``) that times sessions and headers.

        ``quota``: the ``IQuota`` that refuses mail for full mailboxes at RCPT (without
        it, only the delivery itself checks).  ``metrics``: the ``IMetrics`` connections
        report to (default: none kept).  ``available``: a callable saying whether the
        database the nodes share answers (default: none is needed).
        """
        self.metrics = NO_METRICS if metrics is None else metrics
        self.deliverer = deliverer
        self.config = config
        self.clock = clock
        self.context_factory = context_factory
        self.policy = LocalRecipients(
            userdb,
            local_domains(config),
            config.hostname,
            clock,
            config.smtp_postmaster,
            quota=quota,
            full_tempfail=config.quota_full_tempfail,
            available=available,
        )
        if limiter is None:
            # Besides its socket, a connection may open its message's temporary file.
            limiter = ConnectionLimiter(
                config.smtp_max_connections,
                config.smtp_max_connections_per_peer,
                reserve=DESCRIPTOR_RESERVE,
                files_per_connection=1,
            )
        self.limiter = limiter

    def buildProtocol(self, addr) -> ESMTPReceiver:
        return self.protocol(self)
