"""One POP3 connection: lines to the current phase's commands, replies, languages, timers, STLS.

What a session does before login lives in ``authorization`` and after it in
``transaction``; this class hands each line to the phase's command table, answers bad
commands, and keeps what a connection has whatever its phase: the reply language, the
TLS state, the timers and the byte counts.  A handler may return a Deferred; the
connection's ``ConnectionFlow`` holds the following lines until it fires.
"""

from __future__ import annotations

from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from popserv import __version__
from popserv.limits import accounting_key, transport_descriptor
from popserv.lineflow import ConnectionFlow, ILineReceiver
from popserv.logsafe import untrusted
from popserv.peers import peer_host
from popserv.pop3.authorization import AUTHORIZATION, Authorization
from popserv.pop3.replies import LANGUAGES, LOG_NAMESPACE, CommandError, Reply, no_arguments
from popserv.pop3.transaction import TRANSACTION, Transaction

#: RFC 1939's last state: QUIT's commit, or the session is over.  The other two are
#: the names of their phases.
UPDATE = "UPDATE"

#: RFC 2449 section 4: a command line is at most 255 octets, CRLF included.
MAX_COMMAND_LINE = 255
#: RFC 5034: SASL client responses (and AUTH with an initial response) may be longer.
MAX_SASL_LINE = 16 * 1024 + 2
#: How much pipelined input is buffered while a command is in progress before
#: the server stops reading from the socket.
PIPELINE_BUFFER = 64 * 1024
#: Arguments shown in the per-command event; the rest stays out of the log.
_MASKED = {b"PASS": 0, b"APOP": 1, b"AUTH": 1}

log = Logger(namespace=LOG_NAMESPACE)


@implementer(ILineReceiver, IHandshakeListener)
class POP3Server(Protocol, TimeoutMixin):
    """One POP3 session: the connection, and the phase that owns its commands now."""

    def __init__(self):
        #: The phase whose commands run now: ``Authorization``, ``Transaction``, or None
        #: once the session is over (UPDATE).
        self.phase = None
        self.user: str | None = None
        self.peer = "?"
        #: What the peer is counted by (its IPv4 address, or IPv6 /64); logs show ``peer``.
        self.peer_key = "?"
        self.secure = False
        self.trusted = False
        self.utf8 = False
        self.language = b"en"
        self._translations: dict[bytes, bytes] = {}
        self._bad_commands = 0
        self._counted = False
        self.connected = False
        self.bytes_sent = 0
        #: Of ``bytes_sent``, those already given to the metrics.
        self._sent_counted = 0
        self._handshake_done = False
        #: The status ("+" or "-") of the first reply to the command being answered.
        self.reply_status: bytes | None = None
        self.apop_stamp: bytes | None = None

    @property
    def maildrop(self):
        """The logged-in user's ``IMaildrop`` (None before login)."""
        return getattr(self.phase, "maildrop", None)

    @property
    def state(self) -> str:
        """The RFC 1939 state: AUTHORIZATION, TRANSACTION or UPDATE."""
        return self.phase.state if self.phase is not None else UPDATE

    # -- connection life ---------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        factory = self.factory
        self.callLater = factory.clock.callLater
        address = self.transport.getPeer()
        self.peer = peer_host(address)
        self.peer_key = accounting_key(self.peer)
        self.trusted = factory.is_trusted(address)
        # Implicit TLS (POP3S, port 995): the transport is already encrypted.
        self.secure = ISSLTransport.providedBy(self.transport)
        self.flow = ConnectionFlow(
            self.transport,
            factory.clock,
            self,
            delimiter=b"\n",
            strip_cr=True,
            input_bound=PIPELINE_BUFFER,
        )
        over = factory.limiter.opened(self.peer, transport_descriptor(self.transport))
        if over is not None:
            log.info(
                "pop3.refused: peer={peer} reason=too-many-connections limit={limit}",
                peer=self.peer,
                limit=over,
            )
            self.close(Reply.TOO_MANY_CONNECTIONS)
            return
        self._counted = True
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            # Replies are written whole; Nagle would hold them for a delayed ACK.
            set_no_delay(True)
        self.setTimeout(factory.config.pop3_login_timeout)
        self.phase = Authorization(self)
        if factory.config.auth_apop:
            self.apop_stamp = self.phase.apop_stamp()
            self.say(Reply.GREETING + b" " + self.apop_stamp)
        else:
            self.say(Reply.GREETING)

    def dataReceived(self, data: bytes) -> None:
        self.flow.data_received(data)

    def connectionLost(self, reason=None) -> None:
        self.connected = False
        if hasattr(self, "flow"):
            self.flow.lost()
        if self._counted:
            self._counted = False
            self.factory.limiter.closed(self.peer)
        self._count_sent()
        if reason is not None and self.secure and _is_tls_error(reason):
            if not self._handshake_done:
                self.factory.metrics.tls_handshake(False)
            log.info(
                "pop3.tls_failed: peer={peer} error={error}",
                peer=self.peer,
                error=untrusted(reason.getErrorMessage()),
            )
        self.setTimeout(None)
        phase, self.phase = self.phase, None
        if phase is not None:
            # A dropped session deletes nothing (a QUIT already in UPDATE finishes).
            phase.connection_lost()

    def handshakeCompleted(self) -> None:
        """POP3S or STLS: the TLS handshake is done."""
        self._handshake_done = True
        self.factory.metrics.tls_handshake(True)

    def timeoutConnection(self) -> None:
        log.info("pop3.timeout: peer={peer} user={user}", peer=self.peer, user=untrusted(self.user))
        if self.flow.stream is not None:
            # A client that stopped reading mid-message: a polite close would wait for
            # the buffered data forever, holding the maildrop lock.
            self.flow.abort()
            return
        # Aborted instead when the client is not reading or never finished TLS.
        self.close(Reply.TIMEOUT)

    def close(self, template: bytes | None = None, *args) -> None:
        """Send a last reply and hang up, never waiting on a client that will not read."""
        last = b""
        if template is not None:
            last = self.text(template, *args) + b"\r\n"
            self._count(last)
        self.flow.close(last)

    # -- phases ------------------------------------------------------------------

    def enter(self, phase) -> None:
        """Hand the session to its next phase (login done) or end it (``None``: UPDATE)."""
        self.phase = phase
        if phase is not None and phase.state == TRANSACTION:
            self.setTimeout(self.factory.config.pop3_timeout)

    # -- input (ILineReceiver) ---------------------------------------------------

    def line_received(self, line: bytes):
        phase = self.phase
        if phase is None:
            return None
        logging = self.factory.log_commands
        if logging:
            started, sent = self.factory.clock.seconds(), self.bytes_sent
        self.reply_status = None
        if phase.continuation is not None:
            # A SASL client response: data for the exchange, not a command.
            name, rest = b"AUTH-RESPONSE", b""
            result = phase.continuation(line)
        else:
            if phase.state == TRANSACTION:
                # Before login the timer is not restarted: a client dribbling commands
                # (slowloris) is still dropped when the login timeout runs out.
                self.resetTimeout()
            name, _, rest = line.partition(b" ")
            name = name.upper()
            result = self._run(phase, name, rest)
        self.factory.metrics.pop3_command(name)
        self._count_sent()
        if logging:
            if result is None:
                self._command_done(None, name, rest, len(line), started, sent)
            else:
                result.addBoth(self._command_done, name, rest, len(line), started, sent)
        return result

    def _run(self, phase, name: bytes, rest: bytes):
        handler = phase.commands.get(name) or COMMON.get(name)
        if handler is None:
            known = name in KNOWN_COMMANDS
            self.bad_command(Reply.WRONG_STATE if known else Reply.UNKNOWN)
            return None
        owner = self if name in COMMON else phase
        try:
            result = getattr(owner, handler)(rest)
        except CommandError as e:
            self.bad_command(e.reply)
            return None
        self._bad_commands = 0
        return result

    def line_too_long(self):
        """An over-long line is a bad command: it counts towards the limit in a row."""
        log.info("pop3.line_too_long: peer={peer}", peer=self.peer)
        if self.phase is not None and self.phase.continuation is not None:
            return self.phase.response_too_long()
        self.bad_command(Reply.LINE_TOO_LONG)
        return None

    def line_limit(self, line: bytes) -> int:
        phase = self.phase
        if phase is not None and phase.state == AUTHORIZATION:
            if phase.continuation is not None or line[:5].upper() == b"AUTH ":
                return MAX_SASL_LINE
        return MAX_COMMAND_LINE

    def longest_line(self) -> int:
        """SASL data may still be arriving only before login."""
        if self.phase is not None and self.phase.state == AUTHORIZATION:
            return MAX_SASL_LINE
        return MAX_COMMAND_LINE

    def bad_command(self, reply: bytes) -> None:
        """Answer a bad command; too many in a row and the server hangs up."""
        self._bad_commands += 1
        self.say(reply)
        if self._bad_commands >= self.factory.config.pop3_max_bad_commands:
            log.info(
                "pop3.bad_commands: peer={peer} user={user} count={count}",
                peer=self.peer,
                user=untrusted(self.user),
                count=self._bad_commands,
            )
            self.close(Reply.TOO_MANY_BAD_COMMANDS)

    def _command_done(self, result, name, rest, octets_in, started, sent):
        """One event per command, as Dovecot's pop3_command_finished: what admins grep."""
        arguments = rest
        if name in _MASKED:
            # Passwords, digests and SASL data never reach the log.
            words = rest.split()
            shown = words[: _MASKED[name]]
            arguments = b" ".join(shown + [b"***"] * (len(words) > len(shown)))
        log.debug(
            "pop3.command: peer={peer} user={user} command={command} args={args} "
            "result={result} in={octets_in} out={octets_out} ms={ms:.2f}",
            peer=self.peer,
            user=untrusted(self.user),
            command=untrusted(name),
            args=untrusted(arguments.strip()),
            result={b"+": "OK", b"-": "ERR"}.get(self.reply_status, "none"),
            octets_in=octets_in + 2,
            octets_out=self.bytes_sent - sent,
            ms=(self.factory.clock.seconds() - started) * 1000,
        )
        return result if isinstance(result, Failure) else None

    # -- output ------------------------------------------------------------------

    def _count_sent(self) -> None:
        """Give the metrics what was sent since last time (a command's reply may stream on)."""
        sent = self.bytes_sent - self._sent_counted
        if sent:
            self._sent_counted = self.bytes_sent
            self.factory.metrics.pop3_sent(sent)

    def _count(self, data: bytes) -> None:
        self.bytes_sent += len(data)
        if self.reply_status is None:
            self.reply_status = data[:1]

    def write(self, data: bytes) -> None:
        """Write reply bytes as they are (already CRLF-ended)."""
        self._count(data)
        self.transport.write(data)

    def send_line(self, line: bytes) -> None:
        self.write(line + b"\r\n")

    def text(self, template: bytes, *args) -> bytes:
        """A reply text in the session's language (RFC 6856 LANG), filled in."""
        template = self._translations.get(template, template)
        return template % args if args else template

    def say(self, template: bytes, *args) -> None:
        self.send_line(self.text(template, *args))

    def send_multiline(self, first: bytes, lines) -> None:
        """A multi-line reply (RFC 1939 section 3) written as one buffer."""
        parts = [first]
        for line in lines:
            parts.append(b"." + line if line[:1] == b"." else line)
        parts.append(b".")
        parts.append(b"")
        self.write(b"\r\n".join(parts))

    # -- commands of every phase ---------------------------------------------------

    def plaintext_allowed(self) -> bool:
        """Whether passwords may be sent here: over TLS, from a trusted network, or by config.

        As Dovecot's ``disable_plaintext_auth``: elsewhere USER/PASS are refused.
        """
        return self.secure or self.trusted or self.factory.config.auth_allow_plaintext

    def do_CAPA(self, rest: bytes) -> None:
        """What this connection offers now (RFC 2449): the phase's, then every phase's."""
        no_arguments(rest)
        config = self.factory.config
        caps = [b"TOP", b"UIDL", *self.phase.capabilities()]
        caps += [b"RESP-CODES", b"PIPELINING", b"AUTH-RESP-CODE", self.phase.expire()]
        if self.phase.state == AUTHORIZATION:
            # RFC 6856: UTF8 mode, with UTF-8 user names accepted by USER.
            caps.append(b"UTF8 USER")
        caps.append(b"LANG")
        if config.pop3_login_delay:
            caps.append(b"LOGIN-DELAY %d" % config.pop3_login_delay)
        caps.append(b"IMPLEMENTATION popserv-" + __version__.encode("ascii"))
        self.send_multiline(self.text(Reply.CAPA), caps)

    def do_LANG(self, rest: bytes) -> None:
        """List the response languages, or choose one (a language range; "*": the default)."""
        args = rest.split()
        if not args:
            self.send_multiline(
                self.text(Reply.LANGUAGES),
                [tag + b" " + name for tag, (name, _) in LANGUAGES.items()],
            )
            return
        if len(args) > 1:
            raise CommandError(Reply.BAD_ARGUMENTS)
        wanted = args[0].lower()
        tag = b"en" if wanted == b"*" else wanted.split(b"-")[0]
        if tag not in LANGUAGES:
            raise CommandError(Reply.NO_LANGUAGE)
        self.set_language(tag)
        self.say(Reply.LANGUAGE_SET, tag)

    def set_language(self, tag: bytes) -> None:
        self.language = tag
        self._translations = LANGUAGES[tag][1]

    def do_QUIT(self, rest: bytes):
        return self.phase.quit()

    def start_tls(self) -> None:
        """Start TLS (RFC 2595); input pipelined behind STLS is thrown away, never run."""
        self.say(Reply.BEGIN_TLS)
        # Bytes sent before the handshake could be injected by anyone on the path
        # (CVE-2011-0411): they are dropped, and the login starts afresh.
        self.flow.drop_buffered()
        # RFC 2595 section 4: forget what was negotiated in clear, where it could be forged.
        self.utf8 = False
        self.set_language(b"en")
        self.secure = True
        self.transport.startTLS(self.factory.tls)
        log.info("pop3.stls: peer={peer}", peer=self.peer)


#: Commands of every phase, answered by the connection itself.
COMMON = {b"CAPA": "do_CAPA", b"LANG": "do_LANG", b"QUIT": "do_QUIT"}


def _is_tls_error(reason: Failure) -> bool:
    from OpenSSL.SSL import Error

    return reason.check(Error) is not None


KNOWN_COMMANDS = frozenset([*COMMON, *Authorization.commands, *Transaction.commands])
