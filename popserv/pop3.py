"""The POP3 protocol (RFC 1939, RFC 2449): states, commands, replies and message streaming.

It talks to storage only through ``IMaildrop`` avatars handed out by a ``twisted.cred``
portal, and knows nothing of files or directories.
"""

from __future__ import annotations

import ipaddress
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
from popserv.interfaces import CommitFailed, IMaildrop, MaildropLocked, UserDBUnavailable

AUTHORIZATION = "AUTHORIZATION"
TRANSACTION = "TRANSACTION"
UPDATE = "UPDATE"

#: RFC 2449 section 4: a command line is at most 255 octets, CRLF included.
MAX_COMMAND_LINE = 255
#: How much pipelined input is buffered while a command is in progress before
#: the server stops reading from the socket.
PIPELINE_BUFFER = 64 * 1024
#: How many octets of a message are read from storage at a time.
CHUNK_SIZE = 64 * 1024


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
    CAPA = b"+OK Capability list follows."
    BYE = b"+OK Bye."


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
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            chunk = chunk.replace(b"\n.", b"\n..")
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
        self._header = header
        self._limiter = limiter
        self._encoder = WireEncoder()
        self._paused = False
        self._producing = False
        self._done = False
        self.sent = 0

    def start(self) -> None:
        self._protocol.transport.registerProducer(self, True)
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

    def _write_chunk(self) -> None:
        try:
            raw = self._source.read(CHUNK_SIZE)
        except OSError as e:
            self._protocol.log.error("pop3.unreadable: {user}: {error}",
                                     user=self._protocol.user, error=e)
            self._done = True
            self._source.close()
            self._protocol.transport.unregisterProducer()
            if self._header:
                # Nothing sent yet: the client can be told and the session goes on.
                self._protocol.send_line(Reply.UNREADABLE)
                self._protocol.streaming_done(self)
            else:
                # The reply has started; a broken multi-line answer must not look complete.
                self._protocol.transport.loseConnection()
            return
        finished = not raw
        if raw and self._limiter is not None:
            raw, finished = self._limiter.feed(raw)
        data = self._encoder.encode(raw)
        if self._header:
            data = self._header + data
            self._header = b""
        if finished:
            data += self._encoder.finish()
            self._done = True
            self._source.close()
        self.sent += len(data)
        self._protocol.transport.write(data)
        if finished:
            self._protocol.transport.unregisterProducer()
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
        self._busy = False
        self._processing = False
        self._reading_paused = False
        self._connected = False
        self._streamer: MessageStreamer | None = None
        self._messages: list[tuple[str, int]] = []
        self._committing = False
        self._delayed = None
        self.peer = "?"
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
        self._trusted = self.factory.is_trusted(peer)
        # Implicit TLS (POP3S, port 995): the transport is already encrypted.
        self.secure = ISSLTransport.providedBy(self.transport)
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            # Replies are written whole; Nagle would hold them for a delayed ACK.
            set_no_delay(True)
        self.setTimeout(self.factory.config.pop3_login_timeout)
        self.send_line(Reply.GREETING)

    def connectionLost(self, reason=None) -> None:
        self._connected = False
        if reason is not None and self.secure and _is_tls_error(reason):
            self.log.info("pop3.tls_failed: {peer}: {error}", peer=self.peer,
                          error=reason.getErrorMessage())
        self.setTimeout(None)
        if self._delayed is not None and self._delayed.active():
            self._delayed.cancel()
        if self._streamer is not None:
            self._streamer.stopProducing()
            self._streamer = None
        if self.state != AUTHORIZATION and not self._committing:
            # A dropped session deletes nothing; a QUIT already in UPDATE finishes its commit.
            self._end_session("disconnected")

    def timeoutConnection(self) -> None:
        self.log.info("pop3.timeout: {peer} {user} idle too long", peer=self.peer, user=self.user)
        self.send_line(Reply.TIMEOUT)
        self.transport.loseConnection()

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
        try:
            while not self._busy and self._connected and self.state != UPDATE:
                nl = self._buffer.find(b"\n")
                if nl < 0:
                    if len(self._buffer) > self.MAX_LENGTH:
                        self._buffer = b""
                        self._discarding = True
                    break
                line = self._buffer[:nl]
                self._buffer = self._buffer[nl + 1 :]
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) + 2 > self.MAX_LENGTH:
                    self._reply_too_long()
                    continue
                self.lineReceived(line)
        finally:
            self._processing = False
        if self._busy and len(self._buffer) > PIPELINE_BUFFER and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()

    def _reply_too_long(self) -> None:
        self.log.info("pop3.line_too_long: from {peer}", peer=self.peer)
        self.send_line(Reply.LINE_TOO_LONG)

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        name, _, rest = line.partition(b" ")
        name = name.upper()
        handler = self.commands[self.state].get(name)
        if handler is None:
            self.send_line(Reply.WRONG_STATE if name in self._all_commands else Reply.UNKNOWN)
            return
        try:
            getattr(self, handler)(rest)
        except _CommandError as e:
            self.send_line(e.reply)

    def _begin_async(self) -> None:
        """A command whose reply comes later: hold the following commands until it does."""
        self._busy = True

    def _end_async(self) -> None:
        self._busy = False
        if self._reading_paused and self._connected:
            self._reading_paused = False
            self.transport.resumeProducing()
        if self._connected:
            self._process()

    # -- output ------------------------------------------------------------

    def send_line(self, line: bytes) -> None:
        self.bytes_sent += len(line) + 2
        self.transport.write(line + b"\r\n")

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
        if self.maildrop.is_deleted(index):
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
        if self.state == AUTHORIZATION and self.factory.tls is not None and not self.secure:
            caps.append(b"STLS")
        caps += [b"RESP-CODES", b"PIPELINING", b"AUTH-RESP-CODE", b"EXPIRE NEVER"]
        if self.factory.config.pop3_login_delay:
            caps.append(b"LOGIN-DELAY %d" % self.factory.config.pop3_login_delay)
        caps.append(b"IMPLEMENTATION popserv-" + __version__.encode("ascii"))
        return caps

    def do_CAPA(self, rest: bytes) -> None:
        self._no_arguments(rest)
        self.send_multiline(Reply.CAPA, self.capabilities())

    # -- AUTHORIZATION -------------------------------------------------------

    def do_STLS(self, rest: bytes) -> None:
        """Start TLS (RFC 2595); input pipelined behind STLS is thrown away, never run."""
        self._no_arguments(rest)
        if self.secure:
            raise _CommandError(Reply.ALREADY_TLS)
        if self.factory.tls is None:
            raise _CommandError(Reply.NO_TLS)
        self.send_line(Reply.BEGIN_TLS)
        # Bytes sent before the handshake could be injected by anyone on the path
        # (CVE-2011-0411): they are dropped, and the login starts afresh.
        self._buffer = b""
        self._discarding = False
        self._pending_user = None
        self.secure = True
        self.transport.startTLS(self.factory.tls)
        self.log.info("pop3.stls: {peer}", peer=self.peer)

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
        try:
            user = name.decode("utf-8")
        except UnicodeDecodeError:
            user = None
        # The password is everything after "PASS ", spaces included (RFC 1939 section 7).
        self.login(UsernamePassword(name, rest), user)

    def login(self, credentials, user: str | None) -> None:
        """Log in through the portal; the reply waits, and so do pipelined commands."""
        self._begin_async()
        if user is None:
            d = defer.fail(UnauthorizedLogin("undecodable user name"))
        else:
            d = defer.maybeDeferred(
                self.factory.portal.login, credentials, None, IMaildrop
            )
        d.addCallbacks(self._logged_in, self._login_failed, callbackArgs=(user,),
                       errbackArgs=(user,))
        d.addErrback(lambda f: self.log.failure("pop3.login_error", f))

    def _logged_in(self, result, user: str) -> None:
        _, maildrop, logout = result
        if not self._connected:
            logout()
            return
        delay = self.factory.config.pop3_login_delay
        if delay:
            now = self.factory.clock.seconds()
            last = self.factory.last_logins.get(user)
            if last is not None and now - last < delay:
                logout()
                self.log.info("pop3.login_failed: {user} from {peer} ({reason})",
                              user=user, peer=self.peer, reason="login-delay")
                self.send_line(Reply.LOGIN_DELAY)
                self._end_async()
                return
            self.factory.last_logins[user] = now
        self.user = user
        self.maildrop = maildrop
        self._logout = logout
        self._messages = list(maildrop.messages())
        self.state = TRANSACTION
        self.setTimeout(self.factory.config.pop3_timeout)
        count = len(self._messages)
        octets = sum(size for _, size in self._messages)
        self.log.info("pop3.login: {user} from {peer}, {count} messages ({octets} octets)",
                      user=user, peer=self.peer, count=count, octets=octets)
        self.send_line(b"+OK Logged in, %d messages (%d octets)." % (count, octets))
        self._end_async()

    def _login_failed(self, failure: Failure, user: str | None) -> None:
        if failure.check(UnauthorizedLogin, UnhandledCredentials):
            reason, reply, delay = "bad credentials", Reply.AUTH_FAILED, True
        elif failure.check(MaildropLocked):
            reason, reply, delay = "in use", Reply.IN_USE, False
        elif failure.check(UserDBUnavailable):
            reason, reply, delay = "user database unavailable", Reply.TEMP_FAILURE, False
        else:
            self.log.failure("pop3.login_error: {user} from {peer}", failure,
                             user=user, peer=self.peer)
            reason, reply, delay = "server error", Reply.TEMP_FAILURE, False
        self.log.info("pop3.login_failed: {user} from {peer} ({reason})",
                      user=user, peer=self.peer, reason=reason)
        if not self._connected:
            return
        if delay and self.factory.config.pop3_failure_delay:
            # Same reply after the same delay for a bad user and a bad password.
            self._delayed = self.callLater(
                self.factory.config.pop3_failure_delay, self._reply_and_continue, reply
            )
        else:
            self._reply_and_continue(reply)

    def _reply_and_continue(self, reply: bytes) -> None:
        self._delayed = None
        self.send_line(reply)
        self._end_async()

    def do_QUIT(self, rest: bytes) -> None:
        if self.state == AUTHORIZATION:
            self.state = UPDATE
            self.send_line(Reply.BYE)
            self.transport.loseConnection()
            return
        # TRANSACTION -> UPDATE: only here are deletions carried out (RFC 1939 section 6).
        self.state = UPDATE
        self._begin_async()
        self._committing = True
        d = defer.maybeDeferred(self.maildrop.commit)
        d.addCallbacks(self._committed, self._commit_failed)
        d.addErrback(lambda f: self.log.failure("pop3.commit_error", f))

    def _committed(self, _) -> None:
        self._committing = False
        self._end_session("quit")
        self.send_line(b"+OK Logging out, %d messages deleted." % self.deleted)
        self.transport.loseConnection()

    def _commit_failed(self, failure: Failure) -> None:
        self._committing = False
        if failure.check(CommitFailed):
            self.log.error("pop3.commit_failed: {user}: {failed} messages not removed",
                           user=self.user, failed=failure.value.failed)
        else:
            self.log.failure("pop3.commit_failed: {user}", failure, user=self.user)
        self._end_session("quit, commit failed")
        self.send_line(Reply.COMMIT_FAILED)
        self.transport.loseConnection()

    def _end_session(self, how: str) -> None:
        logout, self._logout = self._logout, None
        if logout is None:
            return
        logout()
        self.log.info(
            "pop3.logout: {user} from {peer} ({how}): {retrieved} retrieved, "
            "{deleted} deleted, {bytes_sent} bytes sent",
            user=self.user, peer=self.peer, how=how, retrieved=self.retrieved,
            deleted=self.deleted if how.startswith("quit") else 0,
            bytes_sent=self.bytes_sent,
        )

    # -- TRANSACTION ---------------------------------------------------------

    def _live(self):
        """(number, uidl, size) of each message not marked deleted."""
        is_deleted = self.maildrop.is_deleted
        return [
            (i + 1, uidl, size)
            for i, (uidl, size) in enumerate(self._messages)
            if not is_deleted(i)
        ]

    def do_STAT(self, rest: bytes) -> None:
        self._no_arguments(rest)
        live = self._live()
        self.send_line(b"+OK %d %d" % (len(live), sum(size for _, _, size in live)))

    def do_LIST(self, rest: bytes) -> None:
        args = self._arguments(rest, 0, 1)
        if args:
            index = self._message_index(args[0])
            self.send_line(b"+OK %d %d" % (index + 1, self._messages[index][1]))
            return
        live = self._live()
        octets = sum(size for _, _, size in live)
        self.send_multiline(
            b"+OK %d messages (%d octets)" % (len(live), octets),
            [b"%d %d" % (number, size) for number, _, size in live],
        )

    def do_UIDL(self, rest: bytes) -> None:
        args = self._arguments(rest, 0, 1)
        if args:
            index = self._message_index(args[0])
            self.send_line(b"+OK %d %s" % (index + 1, self._messages[index][0].encode("ascii")))
            return
        self.send_multiline(
            b"+OK",
            [b"%d %s" % (number, uidl.encode("ascii")) for number, uidl, _ in self._live()],
        )

    def do_RETR(self, rest: bytes) -> None:
        (arg,) = self._arguments(rest, 1, 1)
        index = self._message_index(arg)
        header = b"+OK %d octets\r\n" % self._messages[index][1]
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
            self.log.error("pop3.unreadable: {user} message {number}: {error}",
                           user=self.user, number=index + 1, error=e)
            raise _CommandError(Reply.UNREADABLE) from None
        self._begin_async()
        self._streamer = MessageStreamer(self, source, header, limiter)
        self._streamer.start()

    def do_DELE(self, rest: bytes) -> None:
        (arg,) = self._arguments(rest, 1, 1)
        index = self._message_index(arg)
        self.maildrop.delete(index)
        self.deleted += 1
        self.send_line(b"+OK Message %d deleted." % (index + 1))

    def do_NOOP(self, rest: bytes) -> None:
        self._no_arguments(rest)
        self.send_line(b"+OK")

    def do_RSET(self, rest: bytes) -> None:
        self._no_arguments(rest)
        self.maildrop.undelete_all()
        self.deleted = 0
        live = self._live()
        self.send_line(b"+OK %d messages (%d octets)." % (
            len(live), sum(size for _, _, size in live)))


class POP3Factory(ServerFactory):
    """Makes POP3 sessions that log in through ``portal`` to ``IMaildrop`` avatars."""

    protocol = POP3Server

    def __init__(self, portal, config: Config | None = None, clock=None, tls=None):
        """``tls``: the server TLS connection creator for STLS, or None to not offer it."""
        if clock is None:
            from twisted.internet import reactor as clock
        self.portal = portal
        self.config = config if config is not None else Config()
        self.clock = clock
        self.tls = tls
        #: user -> time of their last login, for LOGIN-DELAY.
        self.last_logins: dict[str, float] = {}

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        self._config = config
        self._trusted = [ipaddress.ip_network(n, strict=False)
                         for n in config.auth_trusted_networks]

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


def _is_tls_error(reason: Failure) -> bool:
    from OpenSSL.SSL import Error
    return reason.check(Error) is not None
