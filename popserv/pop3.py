"""The POP3 protocol (RFC 1939, RFC 2449): states, commands, replies and message streaming.

It talks to storage only through ``IMaildrop`` avatars handed out by a ``twisted.cred``
portal, and knows nothing of files or directories.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import re
import secrets
from collections.abc import Sequence
from typing import ClassVar

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from popserv import __version__
from popserv.config import Config
from popserv.flow import ConnectionFlow
from popserv.interfaces import CommitFailed, IMaildrop, MaildropLocked, UserDBUnavailable
from popserv.limits import ConnectionLimiter, accounting_key, transport_descriptor
from popserv.logsafe import untrusted
from popserv.scheduler import QueueFull, VerificationScheduler
from popserv.throttle import MemoryLoginThrottle, ThrottleSettings

AUTHORIZATION = "AUTHORIZATION"
TRANSACTION = "TRANSACTION"
UPDATE = "UPDATE"

#: RFC 2449 section 4: a command line is at most 255 octets, CRLF included.
MAX_COMMAND_LINE = 255
#: RFC 5034: SASL client responses (and AUTH with an initial response) may be longer.
MAX_SASL_LINE = 16 * 1024 + 2
#: How much pipelined input is buffered while a command is in progress before
#: the server stops reading from the socket.
PIPELINE_BUFFER = 64 * 1024
#: Share of the descriptor limit POP3 leaves free (SMTP leaves more, so an SMTP flood
#: cannot take the descriptors POP3 needs).  Each session may hold its lock file and
#: one message open besides its socket.
DESCRIPTOR_RESERVE = 0.1
#: How many octets of a message are read from storage at a time.
CHUNK_SIZE = 64 * 1024


_DOT_LED = re.compile(rb"\n\.")


class Reply:
    """Reply texts in one place, so tests compare with named constants."""

    GREETING = b"+OK POP3 server ready."
    UNKNOWN = b"-ERR Unknown command."
    WRONG_STATE = b"-ERR Command not valid in this state."
    LINE_TOO_LONG = b"-ERR Command line too long."
    BAD_ARGUMENTS = b"-ERR Invalid arguments."
    NO_MESSAGE_NUMBER = b"-ERR Missing message number."
    BAD_MESSAGE_NUMBER = b"-ERR Invalid message number."
    NO_SUCH_MESSAGE = b"-ERR No such message."
    DELETED = b"-ERR Message is deleted."
    BAD_LINE_COUNT = b"-ERR Invalid line count."
    USER_FIRST = b"-ERR Send USER first."
    BAD_USER = b"-ERR Invalid user name."
    AUTH_FAILED = b"-ERR [AUTH] Authentication failed."
    IN_USE = b"-ERR [IN-USE] Mailbox is locked by another session."
    LOGIN_DELAY = b"-ERR [LOGIN-DELAY] Minimum time between logins has not elapsed."
    TEMP_FAILURE = b"-ERR [SYS/TEMP] Temporary server failure, try again later."
    UNREADABLE = b"-ERR [SYS/PERM] Message cannot be read."
    COMMIT_FAILED = b"-ERR [SYS/TEMP] Some deleted messages could not be removed."
    TIMEOUT = b"-ERR Disconnected for inactivity."
    PLAINTEXT_REFUSED = b"-ERR [AUTH] Plaintext login is not allowed without TLS; use STLS first."
    ALREADY_TLS = b"-ERR TLS is already active."
    NO_TLS = b"-ERR TLS is not available."
    BEGIN_TLS = b"+OK Begin TLS negotiation."
    NO_MECHANISM = b"-ERR Unsupported authentication mechanism."
    BAD_BASE64 = b"-ERR Invalid base64 data."
    AUTH_CANCELLED = b"-ERR Authentication cancelled."
    BAD_SASL = b"-ERR Invalid authentication exchange."
    NO_APOP = b"-ERR APOP is not enabled."
    MECHANISMS = b"+OK Supported mechanisms follow."
    CAPA = b"+OK Capability list follows."
    BYE = b"+OK Bye."
    LOGGED_IN = b"+OK Logged in, %d messages (%d octets)."
    LOGGING_OUT = b"+OK Logging out, %d messages deleted."
    LISTING = b"+OK %d messages (%d octets)"
    RETR = b"+OK %d octets"
    MESSAGE_DELETED = b"+OK Message %d deleted."
    RESET = b"+OK %d messages (%d octets)."
    TOO_MANY_CONNECTIONS = b"-ERR [SYS/TEMP] Too many connections; try again later."
    TOO_MANY_FAILURES = b"-ERR [SYS/TEMP] Too many failed logins; try again later."
    TOO_MANY_LOGINS = b"-ERR [SYS/TEMP] Too many logins at once; try again later."
    TOO_MANY_BAD_COMMANDS = b"-ERR Too many bad commands; closing the connection."
    UTF8 = b"+OK UTF-8 mode on."
    LANGUAGES = b"+OK Language listing follows."
    LANGUAGE_SET = b"+OK %s Language changed."
    NO_LANGUAGE = b"-ERR Language not available."


#: RFC 6856 LANG: response texts in Spanish, keyed by the English template.
SPANISH = {
    english: spanish.encode("utf-8")
    for english, spanish in {
        Reply.GREETING: "+OK Servidor POP3 listo.",
        Reply.UNKNOWN: "-ERR Orden desconocida.",
        Reply.WRONG_STATE: "-ERR Orden no válida en este estado.",
        Reply.LINE_TOO_LONG: "-ERR Línea de orden demasiado larga.",
        Reply.BAD_ARGUMENTS: "-ERR Argumentos no válidos.",
        Reply.NO_MESSAGE_NUMBER: "-ERR Falta el número de mensaje.",
        Reply.BAD_MESSAGE_NUMBER: "-ERR Número de mensaje no válido.",
        Reply.NO_SUCH_MESSAGE: "-ERR No existe ese mensaje.",
        Reply.DELETED: "-ERR El mensaje está borrado.",
        Reply.BAD_LINE_COUNT: "-ERR Número de líneas no válido.",
        Reply.USER_FIRST: "-ERR Envíe USER primero.",
        Reply.BAD_USER: "-ERR Nombre de usuario no válido.",
        Reply.AUTH_FAILED: "-ERR [AUTH] Autenticación fallida.",
        Reply.IN_USE: "-ERR [IN-USE] El buzón está bloqueado por otra sesión.",
        Reply.LOGIN_DELAY: "-ERR [LOGIN-DELAY] Aún no ha pasado el tiempo mínimo entre accesos.",
        Reply.TEMP_FAILURE: "-ERR [SYS/TEMP] Fallo temporal del servidor; inténtelo más tarde.",
        Reply.UNREADABLE: "-ERR [SYS/PERM] No se puede leer el mensaje.",
        Reply.COMMIT_FAILED: "-ERR [SYS/TEMP] No se pudieron eliminar algunos mensajes borrados.",
        Reply.TIMEOUT: "-ERR Desconectado por inactividad.",
        Reply.PLAINTEXT_REFUSED: (
            "-ERR [AUTH] No se admiten contraseñas en claro sin TLS; use STLS primero."
        ),
        Reply.ALREADY_TLS: "-ERR TLS ya está activo.",
        Reply.NO_TLS: "-ERR TLS no está disponible.",
        Reply.BEGIN_TLS: "+OK Comience la negociación TLS.",
        Reply.NO_MECHANISM: "-ERR Mecanismo de autenticación no admitido.",
        Reply.BAD_BASE64: "-ERR Datos base64 no válidos.",
        Reply.AUTH_CANCELLED: "-ERR Autenticación cancelada.",
        Reply.BAD_SASL: "-ERR Intercambio de autenticación no válido.",
        Reply.NO_APOP: "-ERR APOP no está activado.",
        Reply.MECHANISMS: "+OK Mecanismos admitidos:",
        Reply.CAPA: "+OK Lista de capacidades:",
        Reply.BYE: "+OK Adiós.",
        Reply.LOGGED_IN: "+OK Sesión iniciada, %d mensajes (%d octetos).",
        Reply.LOGGING_OUT: "+OK Cerrando la sesión, %d mensajes borrados.",
        Reply.LISTING: "+OK %d mensajes (%d octetos)",
        Reply.RETR: "+OK %d octetos",
        Reply.MESSAGE_DELETED: "+OK Mensaje %d borrado.",
        Reply.RESET: "+OK %d mensajes (%d octetos).",
        Reply.TOO_MANY_CONNECTIONS: "-ERR [SYS/TEMP] Demasiadas conexiones; inténtelo más tarde.",
        Reply.TOO_MANY_FAILURES: (
            "-ERR [SYS/TEMP] Demasiados accesos fallidos; inténtelo más tarde."
        ),
        Reply.TOO_MANY_LOGINS: "-ERR [SYS/TEMP] Demasiados accesos a la vez; inténtelo más tarde.",
        Reply.TOO_MANY_BAD_COMMANDS: "-ERR Demasiadas órdenes erróneas; se cierra la conexión.",
        Reply.UTF8: "+OK Modo UTF-8 activado.",
        Reply.LANGUAGES: "+OK Lista de idiomas:",
        Reply.LANGUAGE_SET: "+OK %s Idioma cambiado.",
        Reply.NO_LANGUAGE: "-ERR Idioma no disponible.",
    }.items()
}

#: Response languages (RFC 6856 LANG): tag -> (description, translations).
LANGUAGES = {
    b"en": (b"English", {}),
    b"es": ("Español".encode(), SPANISH),
}


class _CommandError(Exception):
    """A command cannot run; ``reply`` is the -ERR line to send."""

    def __init__(self, reply: bytes):
        super().__init__(reply)
        self.reply = reply


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


@implementer(IPushProducer)
class MessageStreamer:
    """Streams one message to the transport, pausing when its buffer is full.

    Memory per session stays at about one chunk, whatever the message size.
    """

    def __init__(self, protocol: POP3Server, source, header: bytes, limiter=None):
        self._protocol = protocol
        self._source = source
        # Buffered files return a short read only at the end: no extra read to find it.
        self._short_read_is_end = isinstance(source, io.BufferedIOBase)
        self._header = header
        self._limiter = limiter
        self._encoder = WireEncoder()
        self._paused = False
        self._producing = False
        self._attached = False
        self._done = False
        self.sent = 0

    def start(self) -> None:
        # A message that fits in one chunk goes out in one write, without a producer.
        self._write_chunk()
        if not self._done:
            # The connection's flow pauses and resumes it with the transport's buffer.
            flow = self._protocol.flow
            self._attached = True
            flow.stream = self
            if not flow.blocked:
                self.resumeProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._producing or self._done:
            return
        self._producing = True
        try:
            self._protocol.resetTimeout()
            while not self._paused and not self._done:
                self._write_chunk()
        finally:
            self._producing = False

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        """The connection is gone: drop the file and write nothing more."""
        if not self._done:
            self._done = True
            self._source.close()

    def _stop(self) -> None:
        self._done = True
        self._source.close()
        if self._attached:
            self._attached = False
            self._protocol.flow.stream = None

    def _write_chunk(self) -> None:
        try:
            raw = self._source.read(CHUNK_SIZE)
        except OSError as e:
            self._protocol.log.error(
                "pop3.unreadable: peer={peer} user={user} error={error}",
                peer=self._protocol.peer,
                user=untrusted(self._protocol.user),
                error=untrusted(str(e)),
            )
            self._stop()
            if self._header:
                # Nothing sent yet: the client can be told and the session goes on.
                self._protocol.say(Reply.UNREADABLE)
                self._protocol.streaming_done(self)
            else:
                # The reply has started; a broken multi-line answer must not look complete.
                self._protocol.flow.abort()
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
        self._protocol.transport.writeSequence(parts)
        if finished:
            self._stop()
            self._protocol.streaming_done(self)


class POP3Server(LineOnlyReceiver, TimeoutMixin):
    """One POP3 session: a command table per state, replies in command order."""

    log = Logger()
    delimiter = b"\r\n"
    MAX_LENGTH = MAX_COMMAND_LINE

    #: Commands each state accepts, mapped to their handler method.
    commands: ClassVar[dict[str, dict[bytes, str]]] = {
        AUTHORIZATION: {
            b"USER": "do_USER",
            b"PASS": "do_PASS",
            b"QUIT": "do_QUIT",
            b"CAPA": "do_CAPA",
            b"STLS": "do_STLS",
            b"AUTH": "do_AUTH",
            b"APOP": "do_APOP",
            b"UTF8": "do_UTF8",
            b"LANG": "do_LANG",
        },
        TRANSACTION: {
            b"STAT": "do_STAT",
            b"LIST": "do_LIST",
            b"RETR": "do_RETR",
            b"DELE": "do_DELE",
            b"NOOP": "do_NOOP",
            b"RSET": "do_RSET",
            b"TOP": "do_TOP",
            b"UIDL": "do_UIDL",
            b"QUIT": "do_QUIT",
            b"CAPA": "do_CAPA",
            b"LANG": "do_LANG",
        },
        UPDATE: {},
    }
    _all_commands = frozenset(name for table in commands.values() for name in table)

    def __init__(self):
        self.state = AUTHORIZATION
        self.user: str | None = None
        self.maildrop = None
        self._logout = None
        self._pending_user: bytes | None = None
        self._buffer = b""
        self._discarding = False
        self._input_dropped = False
        self._busy = False
        self._processing = False
        self._reading_paused = False
        self._connected = False
        self._streamer: MessageStreamer | None = None
        self._messages: Sequence[tuple[str, int]] = ()
        self._octets = 0
        #: Indexes marked by DELE: the session's own, handed to storage only at QUIT.
        self._deleted: set[int] = set()
        self._committing = False
        self._delayed = None
        #: The login waiting for (or in) its turn to be verified: cancelled if the client leaves.
        self._waiting: defer.Deferred | None = None
        #: When the command being answered arrived: a failure is answered at a fixed
        #: time after it.
        self._arrived = 0.0
        self._sasl = None
        #: Whether the SASL exchange has had client data yet, and whether it began a
        #: login attempt (a costly mechanism's first message): it then ends as a failure
        #: unless it ends in a login.
        self._sasl_data_seen = False
        self._sasl_attempt = False
        self._translations: dict[bytes, bytes] = {}
        self.language = b"en"
        self.utf8 = False
        self._bad_commands = 0
        self._counted = False
        self.peer = "?"
        #: What the peer is counted by (its IPv4 address, or IPv6 /64); logs show ``peer``.
        self.peer_key = "?"
        self.secure = False
        self._trusted = False
        self.retrieved = 0
        self.deleted = 0
        self.bytes_sent = 0

    # -- connection life ---------------------------------------------------

    def connectionMade(self) -> None:
        self._connected = True
        self.callLater = self.factory.clock.callLater
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", str(peer))
        self.peer_key = accounting_key(self.peer)
        self._trusted = self.factory.is_trusted(peer)
        # Implicit TLS (POP3S, port 995): the transport is already encrypted.
        self.secure = ISSLTransport.providedBy(self.transport)
        self.flow = ConnectionFlow(self.transport, self.factory.clock, self._output_drained)
        over = self.factory.limiter.opened(self.peer, transport_descriptor(self.transport))
        if over is not None:
            self.log.info(
                "pop3.refused: peer={peer} reason=too-many-connections limit={limit}",
                peer=self.peer,
                limit=over,
            )
            self.state = UPDATE
            self.close(Reply.TOO_MANY_CONNECTIONS)
            return
        self._counted = True
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            # Replies are written whole; Nagle would hold them for a delayed ACK.
            set_no_delay(True)
        self.setTimeout(self.factory.config.pop3_login_timeout)
        if self.factory.config.auth_apop:
            # RFC 1939 section 7: a token unique to this greeting.  Random, so it
            # tells nothing of the process or its clock.
            self._apop_stamp = b"<%s@%s>" % (
                secrets.token_hex(16).encode("ascii"),
                self.factory.config.hostname.encode("idna"),
            )
            self.say(Reply.GREETING + b" " + self._apop_stamp)
        else:
            self.say(Reply.GREETING)

    def close(self, template: bytes | None = None) -> None:
        """Send a last reply and hang up, never waiting on a client that will not read."""
        last = b""
        if template is not None:
            last = self.text(template) + b"\r\n"
            self.bytes_sent += len(last)
        self.flow.close(last)

    def connectionLost(self, reason=None) -> None:
        self._connected = False
        if hasattr(self, "flow"):
            self.flow.lost()
        if self._counted:
            self._counted = False
            self.factory.limiter.closed(self.peer)
        if reason is not None and self.secure and _is_tls_error(reason):
            self.log.info(
                "pop3.tls_failed: peer={peer} error={error}",
                peer=self.peer,
                error=untrusted(reason.getErrorMessage()),
            )
        self.setTimeout(None)
        if self._delayed is not None and self._delayed.active():
            self._delayed.cancel()
        if self._waiting is not None:
            # Still queued: dropped, never verified.  Already running: it ends as it may.
            self._waiting.cancel()
        if self._sasl_attempt:
            # It cost a verification, like a cancelled exchange: counted the same way.
            self._sasl_attempt = False
            self.log_login_failed(None, "sasl-cancelled", detail="connection closed")
            self._end_attempt(self.factory.throttle.failed, None)
        if self._streamer is not None:
            self._streamer.stopProducing()
            self._streamer = None
        if self.state != AUTHORIZATION and not self._committing:
            # A dropped session deletes nothing; a QUIT already in UPDATE finishes its commit.
            self._end_session("disconnected")

    def timeoutConnection(self) -> None:
        self.log.info(
            "pop3.timeout: peer={peer} user={user}", peer=self.peer, user=untrusted(self.user)
        )
        if self._streamer is not None:
            # A client that stopped reading mid-message: a polite close would wait for
            # the buffered data forever, holding the maildrop lock.
            self.flow.abort()
            return
        # Aborted instead when the client is not reading or never finished TLS.
        self.close(Reply.TIMEOUT)

    # -- input: lines, pipelining and over-long lines ------------------------

    def dataReceived(self, data: bytes) -> None:
        """Split input into command lines, queueing them while a command is in progress.

        Unlike ``LineOnlyReceiver``, an over-long line gets an -ERR and the session goes
        on, and lines that follow a slow command (login, RETR) wait their turn.
        """
        if self.state == UPDATE:
            return
        if self._discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return
            data = data[nl + 1 :]
            self._discarding = False
            self._reply_too_long()
        self._buffer += data
        self._process()

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        # Lines are cut from one buffer by offset, so a packet of many small commands
        # costs linear time, not a copy of the rest of the buffer per command.
        buffer, pos = self._buffer, 0
        try:
            while (
                not self._busy
                and not self.flow.blocked
                and self._connected
                and self.state != UPDATE
            ):
                nl = buffer.find(b"\n", pos)
                if nl < 0:
                    if len(buffer) - pos > self._longest_line():
                        buffer, pos = b"", 0
                        self._discarding = True
                    break
                line = buffer[pos:nl]
                pos = nl + 1
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) + 2 > self._line_limit(line):
                    self._reply_too_long()
                    continue
                if self._sasl is not None:
                    self._sasl_response(line)
                else:
                    self.lineReceived(line)
                if self._input_dropped:
                    self._input_dropped = False
                    buffer, pos = b"", 0
        finally:
            self._buffer = buffer[pos:] if pos else buffer
            self._processing = False
        waiting = self._busy or self.flow.blocked
        if waiting and len(self._buffer) > PIPELINE_BUFFER and not self._reading_paused:
            # Input waits behind a slow command or behind replies the client does not
            # read: stop reading, so neither buffer grows without bound.
            self._reading_paused = True
            self.transport.pauseProducing()

    def _longest_line(self) -> int:
        """The longest line that may still be arriving: SASL data only before login."""
        return MAX_SASL_LINE if self.state == AUTHORIZATION else self.MAX_LENGTH

    def _line_limit(self, line: bytes) -> int:
        if self._sasl is not None or line[:5].upper() == b"AUTH ":
            return MAX_SASL_LINE
        return self.MAX_LENGTH

    def _reply_too_long(self) -> None:
        """An over-long line is a bad command: it counts towards the limit in a row."""
        self.log.info("pop3.line_too_long: peer={peer}", peer=self.peer)
        if self._sasl_attempt:
            self._arrived = self.factory.clock.seconds()
            self._sasl_attempt_failed("bad-sasl", Reply.BAD_SASL, "response too long")
        elif self._sasl is not None:
            self._sasl = None
            self._bad_command(Reply.BAD_SASL)
        else:
            self._bad_command(Reply.LINE_TOO_LONG)

    def lineReceived(self, line: bytes) -> None:
        if self.state == TRANSACTION:
            # Before login the timer is not restarted: a client dribbling commands
            # (slowloris) is still dropped when the login timeout runs out.
            self.resetTimeout()
        name, _, rest = line.partition(b" ")
        name = name.upper()
        handler = self.commands[self.state].get(name)
        if handler is None:
            self._bad_command(Reply.WRONG_STATE if name in self._all_commands else Reply.UNKNOWN)
            return
        try:
            getattr(self, handler)(rest)
        except _CommandError as e:
            self._bad_command(e.reply)
        else:
            self._bad_commands = 0

    def _bad_command(self, reply: bytes) -> None:
        """Answer a bad command; too many in a row and the server hangs up."""
        self._bad_commands += 1
        self.say(reply)
        if self._bad_commands >= self.factory.config.pop3_max_bad_commands:
            self.log.info(
                "pop3.bad_commands: peer={peer} user={user} count={count}",
                peer=self.peer,
                user=untrusted(self.user),
                count=self._bad_commands,
            )
            self.close(Reply.TOO_MANY_BAD_COMMANDS)
            self._connected = False

    def _begin_async(self) -> None:
        """A command whose reply comes later: hold the following commands until it does."""
        self._busy = True

    def _end_async(self) -> None:
        self._busy = False
        self._output_drained()

    def _output_drained(self) -> None:
        """Nothing holds input back any more: read again and run what is waiting."""
        if self._busy or self.flow.blocked or not self._connected:
            return
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        self._process()

    # -- output ------------------------------------------------------------

    def send_line(self, line: bytes) -> None:
        self.bytes_sent += len(line) + 2
        self.transport.write(line + b"\r\n")

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
        data = b"\r\n".join(parts)
        self.bytes_sent += len(data)
        self.transport.write(data)

    def streaming_done(self, streamer: MessageStreamer) -> None:
        self.bytes_sent += streamer.sent
        self._streamer = None
        self._end_async()

    # -- argument parsing shared by the commands --------------------------------

    @staticmethod
    def _no_arguments(rest: bytes) -> None:
        if rest.strip():
            raise _CommandError(Reply.BAD_ARGUMENTS)

    @staticmethod
    def _number(text: bytes, error: bytes) -> int:
        """A decimal number: digits only, no sign, no overflow."""
        if not text.isdigit() or len(text) > 10:
            raise _CommandError(error)
        return int(text)

    def _message_index(self, text: bytes | None) -> int:
        """One parser for message numbers (RFC 1939): in range and not deleted."""
        if not text:
            raise _CommandError(Reply.NO_MESSAGE_NUMBER)
        number = self._number(text, Reply.BAD_MESSAGE_NUMBER)
        if not 1 <= number <= len(self._messages):
            raise _CommandError(Reply.NO_SUCH_MESSAGE)
        index = number - 1
        if index in self._deleted:
            raise _CommandError(Reply.DELETED)
        return index

    def _arguments(self, rest: bytes, least: int, most: int) -> list[bytes]:
        args = rest.split()
        if not least <= len(args) <= most:
            if least and not args:
                raise _CommandError(Reply.NO_MESSAGE_NUMBER)
            raise _CommandError(Reply.BAD_ARGUMENTS)
        return args

    # -- capabilities --------------------------------------------------------

    def plaintext_allowed(self) -> bool:
        """Whether passwords may be sent here: over TLS, from a trusted network, or by config.

        As Dovecot's ``disable_plaintext_auth``: elsewhere USER/PASS are refused.
        """
        return self.secure or self._trusted or self.factory.config.auth_allow_plaintext

    def capabilities(self) -> list[bytes]:
        """What CAPA lists: exactly what this connection offers now (RFC 2449)."""
        caps = [b"TOP", b"UIDL"]
        if self.state == AUTHORIZATION and self.plaintext_allowed():
            caps.append(b"USER")
        if self.state == AUTHORIZATION:
            mechanisms = self.offered_mechanisms()
            if mechanisms:
                caps.append(b"SASL " + b" ".join(mechanisms))
        if self.state == AUTHORIZATION and self.factory.tls is not None and not self.secure:
            caps.append(b"STLS")
        caps += [b"RESP-CODES", b"PIPELINING", b"AUTH-RESP-CODE", b"EXPIRE NEVER"]
        if self.state == AUTHORIZATION:
            # RFC 6856: UTF8 mode, with UTF-8 user names accepted by USER.
            caps.append(b"UTF8 USER")
        caps.append(b"LANG")
        if self.factory.config.pop3_login_delay:
            caps.append(b"LOGIN-DELAY %d" % self.factory.config.pop3_login_delay)
        caps.append(b"IMPLEMENTATION popserv-" + __version__.encode("ascii"))
        return caps

    def do_CAPA(self, rest: bytes) -> None:
        self._no_arguments(rest)
        self.send_multiline(self.text(Reply.CAPA), self.capabilities())

    # -- internationalization (RFC 6856) ---------------------------------------

    def do_UTF8(self, rest: bytes) -> None:
        """Switch to UTF-8 mode: UTF-8 user names and passwords, normalized with SASLprep."""
        self._no_arguments(rest)
        self.utf8 = True
        self.say(Reply.UTF8)

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
            raise _CommandError(Reply.BAD_ARGUMENTS)
        wanted = args[0].lower()
        tag = b"en" if wanted == b"*" else wanted.split(b"-")[0]
        if tag not in LANGUAGES:
            raise _CommandError(Reply.NO_LANGUAGE)
        self.language = tag
        self._translations = LANGUAGES[tag][1]
        self.say(Reply.LANGUAGE_SET, tag)

    # -- AUTHORIZATION -------------------------------------------------------

    def do_STLS(self, rest: bytes) -> None:
        """Start TLS (RFC 2595); input pipelined behind STLS is thrown away, never run."""
        self._no_arguments(rest)
        if self.secure:
            raise _CommandError(Reply.ALREADY_TLS)
        if self.factory.tls is None:
            raise _CommandError(Reply.NO_TLS)
        self.say(Reply.BEGIN_TLS)
        # Bytes sent before the handshake could be injected by anyone on the path
        # (CVE-2011-0411): they are dropped, and the login starts afresh.
        self._input_dropped = True
        self._discarding = False
        # RFC 2595 section 4: forget what was negotiated in clear, where it could be forged.
        self._pending_user = None
        self.utf8 = False
        self.language = b"en"
        self._translations = {}
        self.secure = True
        self.transport.startTLS(self.factory.tls)
        self.log.info("pop3.stls: peer={peer}", peer=self.peer)

    def offered_mechanisms(self) -> list[bytes]:
        """SASL mechanisms enabled and allowed on this connection (no plaintext ones in clear)."""
        plaintext_ok = self.plaintext_allowed()
        return [
            name
            for name, mechanism in self.factory.mechanisms.items()
            if plaintext_ok or not mechanism.plaintext
        ]

    def do_AUTH(self, rest: bytes) -> None:
        """SASL authentication (RFC 5034); bare AUTH lists the mechanisms (RFC 1734 form)."""
        args = rest.split()
        if not args:
            self.send_multiline(self.text(Reply.MECHANISMS), self.offered_mechanisms())
            return
        if len(args) > 2:
            raise _CommandError(Reply.BAD_ARGUMENTS)
        name = args[0].upper()
        mechanism = self.factory.mechanisms.get(name)
        if mechanism is None:
            raise _CommandError(Reply.NO_MECHANISM)
        if mechanism.plaintext and not self.plaintext_allowed():
            raise _CommandError(Reply.PLAINTEXT_REFUSED)
        initial = None
        if len(args) == 2:
            initial = b"" if args[1] == b"=" else self._decode_base64(args[1])
        self._sasl = mechanism(
            self.factory.config.hostname, self.factory.userdb, secret=self.factory.secret
        )
        self._arrived = self.factory.clock.seconds()
        self._sasl_data_seen = initial is not None
        self._sasl_step(lambda: self._sasl.start(initial), initial is not None)

    @staticmethod
    def _decode_base64(data: bytes) -> bytes:
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise _CommandError(Reply.BAD_BASE64) from None

    def _sasl_response(self, line: bytes) -> None:
        """A client's answer to a "+ " challenge: base64 data, or "*" to cancel.

        Like commands before login, answers do not restart the (absolute) login timer.
        """
        self._arrived = self.factory.clock.seconds()
        if line.strip() == b"*":
            if self._sasl_attempt:
                self._sasl_attempt_failed("sasl-cancelled", Reply.AUTH_CANCELLED)
                return
            self._sasl = None
            self.say(Reply.AUTH_CANCELLED)
            return
        try:
            data = self._decode_base64(line.strip())
        except _CommandError as e:
            if self._sasl_attempt:
                self._sasl_attempt_failed("bad-sasl", e.reply, "response not base64")
                return
            self._sasl = None
            self.say(e.reply)
            return
        first_data = not self._sasl_data_seen
        self._sasl_data_seen = True
        try:
            self._sasl_step(lambda: self._sasl.respond(data), first_data)
        except _CommandError as e:
            self.say(e.reply)

    def _sasl_step(self, step, first_data: bool = False) -> None:
        """Run one step of the exchange; a costly one (SCRAM's key derivation) in a thread.

        A costly mechanism's first client message begins a login attempt: it waits its
        turn among the verifications and counts against the address's failures.
        """
        from popserv.sasl import SASLError

        if getattr(self._sasl, "costly", False):
            # Later commands wait, as for a login; the reactor serves everyone else.
            self._begin_async()
            if first_data:
                d = self.factory.verifications.submit(
                    self.peer_key, lambda: self._sasl_attempt_started(step)
                )
                self._wait_for(d, None)
                return
            self._sasl_in_thread(step)
            return
        try:
            result = step()
        except SASLError as e:
            self._sasl_refused(e)
            raise _CommandError(Reply.BAD_SASL) from None
        self._sasl_result(result)

    def _sasl_in_thread(self, step) -> defer.Deferred:
        d = self.factory.run_in_thread(step)
        d.addCallbacks(self._sasl_async_result, self._sasl_async_error)
        d.addErrback(lambda f: self.log.failure("pop3.sasl_error: peer={peer}", f, peer=self.peer))
        return d

    def _sasl_attempt_started(self, step) -> defer.Deferred:
        """The verification slot is ours: count the attempt, then derive the keys."""
        d = defer.maybeDeferred(self.factory.throttle.begin, self.peer_key, None)

        def started(allowed: bool):
            if not self._connected:
                self._end_attempt(self.factory.throttle.abandoned, None)
                return None
            if not allowed:
                self._sasl = None
                return self._refuse_attempt(None)
            self._sasl_attempt = True
            return self._sasl_in_thread(step)

        d.addCallback(started)
        d.addErrback(self._attempt_error, None)
        return d

    def _sasl_result(self, result) -> None:
        from popserv.sasl import Challenge

        if isinstance(result, Challenge):
            self.send_line(b"+ " + base64.b64encode(result.data))
            return
        self._sasl = None
        credentials = result.credentials
        if self._sasl_attempt:
            # The attempt began with the exchange; the portal now gives its verdict.
            self._sasl_attempt = False
            self._begin_async()
            self._verify(credentials, _username_of(credentials)).addErrback(
                self._attempt_error, None
            )
            return
        self.login(credentials, _username_of(credentials))

    def _sasl_refused(self, error: Exception) -> None:
        self._sasl = None
        self.log_login_failed(None, "bad-sasl", detail=str(error))

    def _sasl_attempt_failed(self, reason: str, reply: bytes, detail: str | None = None) -> None:
        """An exchange that began a login attempt ends without a login: a failed attempt.

        Its reply waits for the failure delay, counted from the client's last message.
        """
        self._sasl = None
        self._sasl_attempt = False
        self._begin_async()
        self.log_login_failed(None, reason, detail)
        self._count_failure(None, reply).addErrback(self._attempt_error, None)

    def _sasl_async_result(self, result) -> None:
        if not self._connected:
            return
        self._busy = False
        self._sasl_result(result)
        if not self._busy:  # a challenge: the client's answer may already be waiting
            self._end_async()

    def _sasl_async_error(self, failure: Failure) -> None:
        from popserv.sasl import SASLError

        if not self._connected:
            return
        if failure.check(SASLError) and self._sasl_attempt:
            self._sasl_attempt_failed("bad-sasl", Reply.BAD_SASL, str(failure.value))
            return
        if failure.check(SASLError):
            self._sasl_refused(failure.value)
            self.say(Reply.BAD_SASL)
        else:
            self.log.failure("pop3.sasl_error: peer={peer}", failure, peer=self.peer)
            self._sasl = None
            if self._sasl_attempt:
                self._sasl_attempt = False
                self._end_attempt(self.factory.throttle.abandoned, None)
            self.say(Reply.TEMP_FAILURE)
        self._end_async()

    def do_APOP(self, rest: bytes) -> None:
        """APOP name digest (RFC 1939 section 7), only when enabled."""
        from twisted.mail.pop3 import APOPCredentials

        if not self.factory.config.auth_apop:
            raise _CommandError(Reply.NO_APOP)
        args = rest.split()
        if len(args) != 2:
            raise _CommandError(Reply.BAD_ARGUMENTS)
        name, digest = args
        # Twisted's APOPCredentials compares with a hex *str* digest.
        credentials = APOPCredentials(
            self._apop_stamp, name, digest.decode("ascii", "replace").lower()
        )
        self.login(credentials, _username_of(credentials))

    def do_USER(self, rest: bytes) -> None:
        if not self.plaintext_allowed():
            raise _CommandError(Reply.PLAINTEXT_REFUSED)
        name = rest.strip()
        if not name:
            raise _CommandError(Reply.BAD_USER)
        # Any name gets +OK: whether the user exists is not told before PASS.
        self._pending_user = name
        self.send_line(b"+OK")

    def do_PASS(self, rest: bytes) -> None:
        if not self.plaintext_allowed():
            raise _CommandError(Reply.PLAINTEXT_REFUSED)
        if self._pending_user is None:
            raise _CommandError(Reply.USER_FIRST)
        name, self._pending_user = self._pending_user, None
        # The password is everything after "PASS ", spaces included (RFC 1939 section 7).
        password = rest
        if self.utf8:
            # RFC 6856: UTF-8 names and passwords compare after SASLprep (RFC 4013).
            name, password = _saslprep(name), _saslprep(password)
            if name is None or password is None:
                self.login(None, None)
                return
        credentials = UsernamePassword(name, password)
        self.login(credentials, _username_of(credentials))

    def login(self, credentials, user: str | None) -> None:
        """Log in through the portal in this address's turn; replies and pipelined input wait."""
        self._begin_async()
        self._arrived = self.factory.clock.seconds()
        d = self.factory.verifications.submit(
            self.peer_key, lambda: self._attempt(credentials, user)
        )
        self._wait_for(d, user)

    def _wait_for(self, d: defer.Deferred, user: str | None) -> None:
        d.addErrback(self._not_verified, user)
        if not d.called:
            # (One that ran at once may have led to the next command's login already.)
            self._waiting = d

    def _not_verified(self, failure: Failure, user: str | None) -> None:
        """The attempt never ran: its client left, or its address had too many waiting."""
        if failure.check(defer.CancelledError):
            return
        self._sasl = None
        if failure.check(QueueFull):
            self.log_login_failed(user, "too-many-logins")
        else:
            self.log.failure("pop3.login_error: peer={peer}", failure, peer=self.peer)
        if self._connected:
            self._reply_and_continue(
                Reply.TOO_MANY_LOGINS if failure.check(QueueFull) else Reply.TEMP_FAILURE
            )

    def _attempt(self, credentials, user: str | None) -> defer.Deferred:
        """One login attempt, counted by the throttle whether or not the client stays."""
        d = defer.maybeDeferred(self.factory.throttle.begin, self.peer_key, user)

        def started(allowed: bool):
            if not self._connected:
                # Gone while the throttle answered: nothing to verify for.
                self._end_attempt(self.factory.throttle.abandoned, user)
                return None
            if not allowed:
                return self._refuse_attempt(user)
            return self._verify(credentials, user)

        d.addCallback(started)
        d.addErrback(self._attempt_error, user)
        return d

    def _verify(self, credentials, user: str | None) -> defer.Deferred:
        if user is None or not user:
            d = defer.fail(UnauthorizedLogin("undecodable user name"))
        else:
            d = defer.maybeDeferred(self.factory.portal.login, credentials, None, IMaildrop)
        d.addCallbacks(
            self._logged_in, self._login_failed, callbackArgs=(user,), errbackArgs=(user,)
        )
        return d

    def _attempt_error(self, failure: Failure, user: str | None) -> None:
        self.log.failure(
            "pop3.login_error: peer={peer} user={user}",
            failure,
            peer=self.peer,
            user=untrusted(user),
        )
        if self._connected:
            self._reply_and_continue(Reply.TEMP_FAILURE)

    def _end_attempt(self, outcome, user: str | None) -> None:
        """Tell the throttle how an attempt ended; nothing waits for it."""
        d = defer.maybeDeferred(outcome, self.peer_key, user)
        d.addErrback(
            lambda f: self.log.failure("pop3.throttle_error: peer={peer}", f, peer=self.peer)
        )

    def _refuse_attempt(self, user: str | None) -> defer.Deferred:
        """This address failed too often: refused without verifying, and counted."""
        self.log_login_failed(user, "too-many-failures")
        return self._count_failure(user, Reply.TOO_MANY_FAILURES)

    def _count_failure(self, user: str | None, reply: bytes) -> defer.Deferred:
        """Count a failed attempt; its reply goes out once the address's delay has passed."""
        d = defer.maybeDeferred(self.factory.throttle.failed, self.peer_key, user)
        d.addCallback(self._reply_at, reply)
        return d

    def _reply_at(self, delay: float, reply: bytes) -> None:
        """Reply ``delay`` seconds after the command arrived, however long the check took.

        Then the time a failure's reply takes tells nothing of whether the user exists
        or of how their password is stored: a dummy Argon2id, a bcrypt and a clear
        password all take their time inside the same delay.
        """
        if not self._connected:
            return
        wait = self._arrived + delay - self.factory.clock.seconds()
        if wait > 0:
            # Other sessions go on meanwhile.
            self._delayed = self.callLater(wait, self._reply_and_continue, reply)
        else:
            self._reply_and_continue(reply)

    def _logged_in(self, result, user: str) -> defer.Deferred | None:
        _, maildrop, logout = result
        self._end_attempt(self.factory.throttle.succeeded, user)
        if not self._connected:
            logout()
            return None
        d = defer.maybeDeferred(self.factory.throttle.login_allowed, user)
        d.addCallback(self._enter_transaction, user, maildrop, logout)
        d.addErrback(self._login_allowed_error, logout)
        return d

    def _login_allowed_error(self, failure: Failure, logout) -> Failure:
        logout()
        return failure

    def _enter_transaction(self, allowed: bool, user: str, maildrop, logout) -> None:
        if not self._connected:
            logout()
            return
        if not allowed:
            logout()
            self.log_login_failed(user, "login-delay")
            self.say(Reply.LOGIN_DELAY)
            self._end_async()
            return
        self.user = user
        self.maildrop = maildrop
        self._logout = logout
        # The snapshot, as the maildrop gives it (a sequence; not copied).
        self._messages = maildrop.messages()
        self._octets = octets = sum(size for _, size in self._messages)
        self.state = TRANSACTION
        self.setTimeout(self.factory.config.pop3_timeout)
        count = len(self._messages)
        self.log.info(
            "pop3.login: peer={peer} user={user} messages={count} octets={octets}",
            peer=self.peer,
            user=untrusted(user),
            count=count,
            octets=octets,
        )
        self.say(Reply.LOGGED_IN, count, octets)
        self._end_async()

    def _login_failed(self, failure: Failure, user: str | None) -> defer.Deferred | None:
        throttle = self.factory.throttle
        if failure.check(UnauthorizedLogin, UnhandledCredentials):
            # The same reply, at the same time, for a bad user and a bad password; the
            # delay grows with each failure from this address.
            self.log_login_failed(user, "bad-credentials")
            return self._count_failure(user, Reply.AUTH_FAILED)
        if failure.check(MaildropLocked):
            # The password was right: the user's failures are forgiven, as by a login.
            reason, reply, outcome = "in-use", Reply.IN_USE, throttle.succeeded
        elif failure.check(UserDBUnavailable):
            reason, reply, outcome = "userdb-unavailable", Reply.TEMP_FAILURE, throttle.abandoned
        else:
            self.log.failure(
                "pop3.login_error: peer={peer} user={user}",
                failure,
                peer=self.peer,
                user=untrusted(user),
            )
            reason, reply, outcome = "server-error", Reply.TEMP_FAILURE, throttle.abandoned
        self._end_attempt(outcome, user)
        self.log_login_failed(user, reason)
        if self._connected:
            self._reply_and_continue(reply)
        return None

    def log_login_failed(self, user: str | None, reason: str, detail: str | None = None) -> None:
        """One event per failed login, the address first: what fail2ban counts.

        ``reason`` is one of a fixed set of words; the user name and any detail are the
        client's text, quoted so they cannot end the line or move the address.
        """
        if detail is None:
            self.log.info(
                "pop3.login_failed: peer={peer} user={user} reason={reason}",
                peer=self.peer,
                user=untrusted(user),
                reason=reason,
            )
        else:
            self.log.info(
                "pop3.login_failed: peer={peer} user={user} reason={reason} detail={detail}",
                peer=self.peer,
                user=untrusted(user),
                reason=reason,
                detail=untrusted(detail),
            )

    def _reply_and_continue(self, reply: bytes) -> None:
        self._delayed = None
        self.say(reply)
        self._end_async()

    def do_QUIT(self, rest: bytes) -> None:
        if self.state == AUTHORIZATION:
            self.state = UPDATE
            self.close(Reply.BYE)
            return
        # TRANSACTION -> UPDATE: only here are deletions carried out (RFC 1939 section 6).
        self.state = UPDATE
        self._begin_async()
        self._committing = True
        d = defer.maybeDeferred(self.maildrop.commit, frozenset(self._deleted))
        d.addCallbacks(self._committed, self._commit_failed)
        d.addErrback(
            lambda f: self.log.failure("pop3.commit_error: peer={peer}", f, peer=self.peer)
        )

    def _committed(self, _) -> None:
        self._committing = False
        self._end_session("quit")
        self.close(self.text(Reply.LOGGING_OUT, self.deleted))

    def _commit_failed(self, failure: Failure) -> None:
        self._committing = False
        if failure.check(CommitFailed):
            self.log.error(
                "pop3.commit_failed: peer={peer} user={user} failed={failed}",
                peer=self.peer,
                user=untrusted(self.user),
                failed=failure.value.failed,
            )
        else:
            self.log.failure(
                "pop3.commit_failed: peer={peer} user={user}",
                failure,
                peer=self.peer,
                user=untrusted(self.user),
            )
        self._end_session("commit-failed")
        self.close(Reply.COMMIT_FAILED)

    def _end_session(self, how: str) -> None:
        logout, self._logout = self._logout, None
        if logout is None:
            return
        logout()
        self.log.info(
            "pop3.logout: peer={peer} user={user} how={how} retrieved={retrieved} "
            "deleted={deleted} bytes_sent={bytes_sent}",
            peer=self.peer,
            user=untrusted(self.user),
            how=how,
            retrieved=self.retrieved,
            deleted=self.deleted if how != "disconnected" else 0,
            bytes_sent=self.bytes_sent,
        )

    # -- TRANSACTION ---------------------------------------------------------

    def _live(self) -> list[tuple[int, str, int]]:
        """(number, uidl, size) of each message not marked deleted."""
        deleted = self._deleted
        return [
            (number, uidl, size)
            for number, (uidl, size) in enumerate(self._messages, 1)
            if number - 1 not in deleted
        ]

    def _totals(self) -> tuple[int, int]:
        """Count and octets of the messages not marked deleted (STAT)."""
        if not self._deleted:
            return len(self._messages), self._octets
        live = self._live()
        return len(live), sum(size for _, _, size in live)

    def do_STAT(self, rest: bytes) -> None:
        self._no_arguments(rest)
        self.send_line(b"+OK %d %d" % self._totals())

    def do_LIST(self, rest: bytes) -> None:
        args = self._arguments(rest, 0, 1)
        if args:
            index = self._message_index(args[0])
            self.send_line(b"+OK %d %d" % (index + 1, self._messages[index][1]))
            return
        live = self._live()
        # Lines start with a digit: no dot-stuffing to check (10,000 lines in a few ms).
        self._send_listing(
            self.text(Reply.LISTING, *self._totals()),
            "".join([f"{number} {size}\r\n" for number, _, size in live]),
        )

    def do_UIDL(self, rest: bytes) -> None:
        args = self._arguments(rest, 0, 1)
        if args:
            index = self._message_index(args[0])
            self.send_line(b"+OK %d %s" % (index + 1, self._messages[index][0].encode("ascii")))
            return
        self._send_listing(
            b"+OK", "".join([f"{number} {uidl}\r\n" for number, uidl, _ in self._live()])
        )

    def _send_listing(self, first: bytes, body: str) -> None:
        data = first + b"\r\n" + body.encode("ascii") + b".\r\n"
        self.bytes_sent += len(data)
        self.transport.write(data)

    def do_RETR(self, rest: bytes) -> None:
        (arg,) = self._arguments(rest, 1, 1)
        index = self._message_index(arg)
        header = self.text(Reply.RETR, self._messages[index][1]) + b"\r\n"
        self._stream(index, header, None)
        self.retrieved += 1

    def do_TOP(self, rest: bytes) -> None:
        number, lines = self._arguments(rest, 2, 2)
        index = self._message_index(number)
        count = self._number(lines, Reply.BAD_LINE_COUNT)
        self._stream(index, b"+OK\r\n", TopLimiter(count))

    def _stream(self, index: int, header: bytes, limiter) -> None:
        try:
            source = self.maildrop.open(index)
        except OSError as e:
            self.log.error(
                "pop3.unreadable: peer={peer} user={user} message={number} error={error}",
                peer=self.peer,
                user=untrusted(self.user),
                number=index + 1,
                error=untrusted(str(e)),
            )
            raise _CommandError(Reply.UNREADABLE) from None
        self._begin_async()
        self._streamer = MessageStreamer(self, source, header, limiter)
        self._streamer.start()

    def do_DELE(self, rest: bytes) -> None:
        (arg,) = self._arguments(rest, 1, 1)
        index = self._message_index(arg)
        self._deleted.add(index)
        self.deleted += 1
        self.say(Reply.MESSAGE_DELETED, index + 1)

    def do_NOOP(self, rest: bytes) -> None:
        self._no_arguments(rest)
        self.send_line(b"+OK")

    def do_RSET(self, rest: bytes) -> None:
        self._no_arguments(rest)
        self._deleted.clear()
        self.deleted = 0
        self.say(Reply.RESET, *self._totals())


class POP3Factory(ServerFactory):
    """Makes POP3 sessions that log in through ``portal`` to ``IMaildrop`` avatars."""

    protocol = POP3Server

    def __init__(
        self,
        portal,
        config: Config | None = None,
        clock=None,
        tls=None,
        userdb=None,
        mechanisms=None,
        run_in_thread=None,
        throttle=None,
        verifications: VerificationScheduler | None = None,
        secret: bytes | None = None,
        limiter=None,
    ):
        """Wire a POP3 service.

        ``tls``: the server TLS connection creator for STLS, or None to not offer it.
        ``userdb``: the ``IUserDB`` that SASL mechanisms needing stored keys consult.
        ``mechanisms``: name -> mechanism class (default: ``popserv.sasl.MECHANISMS``).
        ``run_in_thread``: how costly SASL steps leave the reactor thread (``deferToThread``).
        ``throttle``: the ``ILoginThrottle`` (default: one in memory, set from ``config``).
        ``verifications``: the ``VerificationScheduler`` every login waits its turn in
        (default: one of ``[auth] max_verifications`` and ``max_waiting_per_peer``).
        ``secret``: the server secret (``popserv.state``) keying made-up SCRAM salts.
        ``limiter``: the ``IConnectionLimiter`` (default: one in memory, set from ``config``).
        """
        if clock is None:
            from twisted.internet import reactor as clock
        self.portal = portal
        self.clock = clock
        self._own_throttle = throttle is None
        self.throttle = MemoryLoginThrottle(clock) if throttle is None else throttle
        self._own_verifications = verifications is None
        self.verifications = VerificationScheduler() if verifications is None else verifications
        self._own_limiter = limiter is None
        self.limiter = ConnectionLimiter(0, 0, reserve=DESCRIPTOR_RESERVE, files_per_connection=2)
        if limiter is not None:
            self.limiter = limiter
        self.config = config if config is not None else Config()
        self.tls = tls
        self.secret = secret
        self.userdb = userdb
        if run_in_thread is None:
            from twisted.internet.threads import deferToThread as run_in_thread
        #: Runs a blocking callable off the reactor thread, returning a Deferred.
        self.run_in_thread = run_in_thread
        if mechanisms is None:
            from popserv.sasl import MECHANISMS as mechanisms
        enabled = [name.encode("ascii") for name in self.config.auth_mechanisms]
        #: Mechanisms AUTH offers, in the order of the configuration.
        self.mechanisms = {name: mechanisms[name] for name in enabled if name in mechanisms}

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        self._config = config
        self._trusted = [
            ipaddress.ip_network(n, strict=False) for n in config.auth_trusted_networks
        ]
        # The parts made here follow the configuration; ones passed in keep their own.
        if self._own_throttle:
            self.throttle.settings = throttle_settings(config)
        if self._own_limiter:
            self.limiter.in_all = config.pop3_max_connections
            self.limiter.per_peer = config.pop3_max_connections_per_peer
        if self._own_verifications:
            self.verifications.limit = config.auth_max_verifications
            self.verifications.queued_per_peer = config.auth_max_waiting_per_peer

    def is_trusted(self, address) -> bool:
        """Whether a peer may log in with a plaintext password without TLS.

        Local (UNIX socket) peers are; IP peers when in ``auth_trusted_networks``.
        """
        if not isinstance(address, (IPv4Address, IPv6Address)):
            return address is not None and getattr(address, "type", None) != "TCP"
        try:
            ip = ipaddress.ip_address(address.host.split("%", 1)[0])
        except ValueError:
            return False
        if getattr(ip, "ipv4_mapped", None) is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._trusted)


def throttle_settings(config: Config) -> ThrottleSettings:
    """The throttle's part of the configuration."""
    return ThrottleSettings(
        failure_delay=config.pop3_failure_delay,
        failure_delay_max=config.pop3_failure_delay_max,
        max_failures=config.pop3_max_failures,
        login_delay=config.pop3_login_delay,
    )


def _saslprep(data: bytes) -> bytes | None:
    """SASLprep of UTF-8 text; None when it is not UTF-8 or holds prohibited characters."""
    from scramp.core import saslprep
    from scramp.utils import ScramException

    try:
        return saslprep(data.decode("utf-8")).encode("utf-8")
    except (UnicodeDecodeError, ScramException):
        return None


def _username_of(credentials) -> str | None:
    """The user name of credentials as text, for logs; None when it is not UTF-8."""
    name = getattr(credentials, "username", None)
    if isinstance(name, bytes):
        try:
            return name.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return name


def _is_tls_error(reason: Failure) -> bool:
    from OpenSSL.SSL import Error

    return reason.check(Error) is not None
