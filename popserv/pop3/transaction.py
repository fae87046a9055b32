"""The TRANSACTION state of a POP3 session, and its UPDATE at QUIT.

It owns the logged-in user's maildrop snapshot and the DELE marks: storage sees the
marks once, when QUIT commits them (RFC 1939 section 6).  Any other end of the session
releases the maildrop and deletes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from popserv.interfaces import CommitFailed, LockLost
from popserv.logsafe import untrusted
from popserv.pop3.replies import LOG_NAMESPACE, CommandError, Reply, no_arguments
from popserv.pop3.wire import TopLimiter, UnreadableMessage, send_message

TRANSACTION = "TRANSACTION"

log = Logger(namespace=LOG_NAMESPACE)


class Transaction:
    """STAT, LIST, UIDL, TOP, RETR, DELE, RSET, NOOP, and QUIT's commit."""

    state = TRANSACTION
    #: Nothing but commands arrive in this state.
    continuation = None

    commands = {
        b"STAT": "do_STAT",
        b"LIST": "do_LIST",
        b"RETR": "do_RETR",
        b"DELE": "do_DELE",
        b"NOOP": "do_NOOP",
        b"RSET": "do_RSET",
        b"TOP": "do_TOP",
        b"UIDL": "do_UIDL",
    }

    def __init__(self, session, user: str, maildrop, logout):
        self.session = session
        self.user = user
        self.maildrop = maildrop
        self._logout = logout
        # The snapshot, as the maildrop gives it (a sequence; not copied).
        self.messages: Sequence[tuple[str, int]] = maildrop.messages()
        self.octets = sum(size for _, size in self.messages)
        #: Indexes marked by DELE: the session's own, handed to storage only at QUIT.
        self.deleted: set[int] = set()
        #: Indexes sent in full by RETR: marked seen (or expired) at QUIT, as policy says.
        self.read: set[int] = set()
        self.retrieved = 0
        factory = session.factory
        #: Listed by ``popserv who`` until ``_end``.
        self._listed = factory.sessions.opened(user, session.peer)
        factory.metrics.pop3_session_opened()
        maildrop.when_lost(self._lock_lost)

    def capabilities(self) -> list[bytes]:
        return []

    def expire(self) -> bytes:
        """EXPIRE after login: this user's value (RFC 2449 section 6.7)."""
        days = self.maildrop.expire_days
        return b"EXPIRE NEVER" if days is None else b"EXPIRE %d" % days

    # -- arguments -------------------------------------------------------------------

    def _message_index(self, text: bytes | None) -> int:
        """One parser for message numbers (RFC 1939): in range and not deleted."""
        if not text:
            raise CommandError(Reply.NO_MESSAGE_NUMBER)
        number = _number(text, Reply.BAD_MESSAGE_NUMBER)
        if not 1 <= number <= len(self.messages):
            raise CommandError(Reply.NO_SUCH_MESSAGE)
        index = number - 1
        if index in self.deleted:
            raise CommandError(Reply.DELETED)
        return index

    # -- listings ---------------------------------------------------------------------

    def _live(self) -> list[tuple[int, str, int]]:
        """(number, uidl, size) of each message not marked deleted."""
        deleted = self.deleted
        return [
            (number, uidl, size)
            for number, (uidl, size) in enumerate(self.messages, 1)
            if number - 1 not in deleted
        ]

    def _totals(self) -> tuple[int, int]:
        """Count and octets of the messages not marked deleted (STAT)."""
        if not self.deleted:
            return len(self.messages), self.octets
        live = self._live()
        return len(live), sum(size for _, _, size in live)

    def do_STAT(self, rest: bytes) -> None:
        no_arguments(rest)
        self.session.send_line(b"+OK %d %d" % self._totals())

    def do_LIST(self, rest: bytes) -> None:
        args = _arguments(rest, 0, 1)
        if args:
            index = self._message_index(args[0])
            self.session.send_line(b"+OK %d %d" % (index + 1, self.messages[index][1]))
            return
        # Lines start with a digit: no dot-stuffing to check (10,000 lines in a few ms).
        self._send_listing(
            self.session.text(Reply.LISTING, *self._totals()),
            "".join([f"{number} {size}\r\n" for number, _, size in self._live()]),
        )

    def do_UIDL(self, rest: bytes) -> None:
        args = _arguments(rest, 0, 1)
        if args:
            index = self._message_index(args[0])
            uidl = self.messages[index][0].encode("ascii")
            self.session.send_line(b"+OK %d %s" % (index + 1, uidl))
            return
        self._send_listing(
            b"+OK", "".join([f"{number} {uidl}\r\n" for number, uidl, _ in self._live()])
        )

    def _send_listing(self, first: bytes, body: str) -> None:
        self.session.write(first + b"\r\n" + body.encode("ascii") + b".\r\n")

    # -- messages ---------------------------------------------------------------------

    def do_RETR(self, rest: bytes) -> defer.Deferred | None:
        (arg,) = _arguments(rest, 1, 1)
        index = self._message_index(arg)
        header = self.session.text(Reply.RETR, self.messages[index][1]) + b"\r\n"
        sending = self._stream(index, header, None, whole=True)
        self.retrieved += 1
        return sending

    def do_TOP(self, rest: bytes) -> defer.Deferred | None:
        number, lines = _arguments(rest, 2, 2)
        index = self._message_index(number)
        count = _number(lines, Reply.BAD_LINE_COUNT)
        return self._stream(index, b"+OK\r\n", TopLimiter(count))

    def _stream(
        self, index: int, header: bytes, limiter, whole: bool = False
    ) -> defer.Deferred | None:
        """Send one message; the next command waits until its last octet is written.

        ``whole``: a RETR, which once sent to the end counts the message as read.
        """
        try:
            source = self.maildrop.open(index)
        except OSError as e:
            self._log_unreadable(index, e)
            raise CommandError(Reply.UNREADABLE) from None
        session = self.session
        session.reply_status = b"+"
        try:
            sending = send_message(
                session.flow, source, header, limiter, progress=session.resetTimeout
            )
        except UnreadableMessage as e:
            self._unreadable(Failure(e), index)
            return None
        read = index if whole else None
        if isinstance(sending, int):
            self._sent(sending, read)
            return None
        sending.addCallbacks(
            self._sent, self._unreadable, callbackArgs=(read,), errbackArgs=(index,)
        )
        return sending

    def _sent(self, octets: int, read: int | None) -> None:
        self.session.bytes_sent += octets
        if read is not None:
            self.read.add(read)

    def _unreadable(self, failure: Failure, index: int) -> None:
        failure.trap(UnreadableMessage)
        error = failure.value
        self.session.bytes_sent += error.sent
        self._log_unreadable(index, error.error)
        if error.sent:
            # The reply has started; a broken multi-line answer must not look complete.
            self.session.flow.abort()
        else:
            # Nothing sent yet: the client can be told and the session goes on.
            self.session.reply_status = b"-"
            self.session.say(Reply.UNREADABLE)

    def _log_unreadable(self, index: int, error: OSError) -> None:
        log.error(
            "pop3.unreadable: peer={peer} user={user} message={number} error={error}",
            peer=self.session.peer,
            user=untrusted(self.user),
            number=index + 1,
            error=untrusted(str(error)),
        )

    # -- marks ------------------------------------------------------------------------

    def do_DELE(self, rest: bytes) -> None:
        (arg,) = _arguments(rest, 1, 1)
        index = self._message_index(arg)
        self.deleted.add(index)
        self.session.say(Reply.MESSAGE_DELETED, index + 1)

    def do_NOOP(self, rest: bytes) -> None:
        no_arguments(rest)
        self.session.send_line(b"+OK")

    def do_RSET(self, rest: bytes) -> None:
        no_arguments(rest)
        self.deleted.clear()
        self.session.say(Reply.RESET, *self._totals())

    # -- the end of the session -------------------------------------------------------

    def quit(self) -> defer.Deferred:
        """TRANSACTION -> UPDATE: only here are deletions carried out (RFC 1939 section 6)."""
        self.session.enter(None)
        d = defer.maybeDeferred(self.maildrop.commit, frozenset(self.deleted), frozenset(self.read))
        d.addCallbacks(self._committed, self._commit_failed)
        d.addErrback(
            lambda f: log.failure("pop3.commit_error: peer={peer}", f, peer=self.session.peer)
        )
        return d

    def _committed(self, _) -> defer.Deferred:
        # The lock is released before the +OK: the client may log in again at once, anywhere.
        released = self._end("quit")
        released.addCallback(lambda _: self.session.close(Reply.LOGGING_OUT, len(self.deleted)))
        return released

    def _commit_failed(self, failure: Failure) -> None:
        if failure.check(LockLost):
            self._log_lock_lost()
            self._end("lock-lost")
            self.session.close(Reply.LOCK_LOST)
            return
        if failure.check(CommitFailed):
            log.error(
                "pop3.commit_failed: peer={peer} user={user} failed={failed}",
                peer=self.session.peer,
                user=untrusted(self.user),
                failed=failure.value.failed,
            )
        else:
            log.failure(
                "pop3.commit_failed: peer={peer} user={user}",
                failure,
                peer=self.session.peer,
                user=untrusted(self.user),
            )
        self._end("commit-failed")
        self.session.close(Reply.COMMIT_FAILED)

    def connection_lost(self) -> None:
        """A dropped session deletes nothing."""
        self._end("disconnected")

    def _lock_lost(self) -> None:
        """The maildrop lock went (another node may serve the maildrop now): end the
        session at once, deleting nothing."""
        session = self.session
        if session.phase is not self:
            return  # over, or in QUIT's commit, which checks the lock itself
        self._log_lock_lost()
        session.enter(None)
        self._end("lock-lost")
        if session.flow.stream is not None:
            # In the middle of a message: a reply now would look like part of it.
            session.flow.abort()
        else:
            session.close(Reply.LOCK_LOST)

    def _log_lock_lost(self) -> None:
        log.error(
            "pop3.lock_lost: peer={peer} user={user} marked={marked}",
            peer=self.session.peer,
            user=untrusted(self.user),
            marked=len(self.deleted),
        )

    def _end(self, how: str) -> defer.Deferred:
        """Log out once; fires when the maildrop lock is released."""
        logout, self._logout = self._logout, None
        if logout is None:
            return defer.succeed(None)
        released = defer.maybeDeferred(logout)
        released.addErrback(
            lambda f: log.failure("pop3.logout_error: peer={peer}", f, peer=self.session.peer)
        )
        factory = self.session.factory
        factory.sessions.closed(self._listed)
        factory.metrics.pop3_session_closed()
        log.info(
            "pop3.logout: peer={peer} user={user} how={how} retrieved={retrieved} "
            "deleted={deleted} bytes_sent={bytes_sent}",
            peer=self.session.peer,
            user=untrusted(self.user),
            how=how,
            retrieved=self.retrieved,
            deleted=len(self.deleted) if how not in ("disconnected", "lock-lost") else 0,
            bytes_sent=self.session.bytes_sent,
        )
        return released


def _number(text: bytes, error: bytes) -> int:
    """A decimal number: digits only, no sign, no overflow."""
    if not text.isdigit() or len(text) > 10:
        raise CommandError(error)
    return int(text)


def _arguments(rest: bytes, least: int, most: int) -> list[bytes]:
    args = rest.split()
    if not least <= len(args) <= most:
        if least and not args:
            raise CommandError(Reply.NO_MESSAGE_NUMBER)
        raise CommandError(Reply.BAD_ARGUMENTS)
    return args
