"""The AUTHORIZATION state of a POP3 session: USER/PASS, APOP, AUTH (SASL), STLS and UTF8.

Every way of logging in ends in one ``portal.login`` for an ``IMaildrop``, taken in the
client address's turn among the password verifications, counted by the login throttle,
and answered, when it fails, at a fixed time after the command arrived.  A login hands
the session to a ``Transaction`` that owns the maildrop.

A command that logs in returns a Deferred that fires once its reply is sent: the
connection holds the client's next lines until then.
"""

from __future__ import annotations

import base64
import binascii
import secrets

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from popserv.interfaces import IMaildrop, MaildropLocked, UserDBUnavailable
from popserv.logsafe import untrusted
from popserv.pop3.replies import LOG_NAMESPACE, CommandError, Reply, no_arguments
from popserv.pop3.transaction import Transaction
from popserv.scheduler import QueueFull
from popserv.usernames import user_text

AUTHORIZATION = "AUTHORIZATION"

log = Logger(namespace=LOG_NAMESPACE)


class Authorization:
    """Logging in; ``continuation`` takes the client's SASL responses while an exchange runs."""

    state = AUTHORIZATION

    commands = {
        b"USER": "do_USER",
        b"PASS": "do_PASS",
        b"APOP": "do_APOP",
        b"AUTH": "do_AUTH",
        b"STLS": "do_STLS",
        b"UTF8": "do_UTF8",
    }

    def __init__(self, session):
        self.session = session
        self.factory = session.factory
        self._pending_user: bytes | None = None
        self._sasl = None
        #: Whether the SASL exchange has had client data yet, and whether it began a
        #: login attempt (a costly mechanism's first message): it then ends as a failure
        #: unless it ends in a login.
        self._sasl_data_seen = False
        self._sasl_attempt = False
        #: When the command being answered arrived: a failure is answered at a fixed
        #: time after it.
        self._arrived = 0.0
        #: The login waiting for (or in) its turn to be verified: cancelled if the client leaves.
        self._waiting: defer.Deferred | None = None
        self._delayed = None
        #: Fires once the reply to the command in progress is sent.
        self._done: defer.Deferred | None = None

    @property
    def continuation(self):
        """While a SASL exchange waits for the client's next response: what takes it."""
        return self._sasl_response if self._sasl is not None else None

    def apop_stamp(self) -> bytes:
        """RFC 1939 section 7: a token unique to this greeting.  Random, so it tells
        nothing of the process or its clock."""
        return b"<%s@%s>" % (
            secrets.token_hex(16).encode("ascii"),
            self.factory.config.hostname.encode("idna"),
        )

    def capabilities(self) -> list[bytes]:
        caps = []
        if self.session.plaintext_allowed():
            caps.append(b"USER")
        mechanisms = self.offered_mechanisms()
        if mechanisms:
            caps.append(b"SASL " + b" ".join(mechanisms))
        if self.factory.tls is not None and not self.session.secure:
            caps.append(b"STLS")
        return caps

    def offered_mechanisms(self) -> list[bytes]:
        """SASL mechanisms enabled and allowed on this connection (no plaintext ones in clear)."""
        plaintext_ok = self.session.plaintext_allowed()
        return [
            name
            for name, mechanism in self.factory.mechanisms.items()
            if plaintext_ok or not mechanism.plaintext
        ]

    def quit(self) -> None:
        self.session.enter(None)
        self.session.close(Reply.BYE)

    def connection_lost(self) -> None:
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

    # -- STLS and UTF8 ---------------------------------------------------------------

    def do_STLS(self, rest: bytes) -> None:
        no_arguments(rest)
        if self.session.secure:
            raise CommandError(Reply.ALREADY_TLS)
        if self.factory.tls is None:
            raise CommandError(Reply.NO_TLS)
        self._pending_user = None
        self.session.start_tls()

    def do_UTF8(self, rest: bytes) -> None:
        """Switch to UTF-8 mode: UTF-8 user names and passwords, normalized with SASLprep."""
        no_arguments(rest)
        self.session.utf8 = True
        self.session.say(Reply.UTF8)

    # -- USER/PASS and APOP --------------------------------------------------------------

    def do_USER(self, rest: bytes) -> None:
        if not self.session.plaintext_allowed():
            raise CommandError(Reply.PLAINTEXT_REFUSED)
        name = rest.strip()
        if not name:
            raise CommandError(Reply.BAD_USER)
        # Any name gets +OK: whether the user exists is not told before PASS.
        self._pending_user = name
        self.session.send_line(b"+OK")

    def do_PASS(self, rest: bytes) -> defer.Deferred:
        if not self.session.plaintext_allowed():
            raise CommandError(Reply.PLAINTEXT_REFUSED)
        if self._pending_user is None:
            raise CommandError(Reply.USER_FIRST)
        name, self._pending_user = self._pending_user, None
        # The password is everything after "PASS ", spaces included (RFC 1939 section 7).
        password = rest
        if self.session.utf8:
            # RFC 6856: UTF-8 names and passwords compare after SASLprep (RFC 4013).
            name, password = _saslprep(name), _saslprep(password)
            if name is None or password is None:
                return self.login(None, None)
        return self.login(UsernamePassword(name, password), user_text(name))

    def do_APOP(self, rest: bytes) -> defer.Deferred:
        """APOP name digest (RFC 1939 section 7), only when enabled."""
        from twisted.mail.pop3 import APOPCredentials

        if not self.factory.config.auth_apop:
            raise CommandError(Reply.NO_APOP)
        args = rest.split()
        if len(args) != 2:
            raise CommandError(Reply.BAD_ARGUMENTS)
        name, digest = args
        # Twisted's APOPCredentials compares with a hex *str* digest.
        credentials = APOPCredentials(
            self.session.apop_stamp, name, digest.decode("ascii", "replace").lower()
        )
        return self.login(credentials, user_text(name))

    # -- AUTH (RFC 5034) -----------------------------------------------------------------

    def do_AUTH(self, rest: bytes):
        """SASL authentication; bare AUTH lists the mechanisms (RFC 1734 form)."""
        args = rest.split()
        if not args:
            self.session.send_multiline(
                self.session.text(Reply.MECHANISMS), self.offered_mechanisms()
            )
            return None
        if len(args) > 2:
            raise CommandError(Reply.BAD_ARGUMENTS)
        mechanism = self.factory.mechanisms.get(args[0].upper())
        if mechanism is None:
            raise CommandError(Reply.NO_MECHANISM)
        if mechanism.plaintext and not self.session.plaintext_allowed():
            raise CommandError(Reply.PLAINTEXT_REFUSED)
        initial = None
        if len(args) == 2:
            initial = b"" if args[1] == b"=" else _decode_base64(args[1])
        self._sasl = mechanism(
            self.factory.config.hostname, self.factory.userdb, secret=self.factory.secret
        )
        self._arrived = self.factory.clock.seconds()
        self._sasl_data_seen = initial is not None
        return self._sasl_step(lambda: self._sasl.start(initial), initial is not None)

    def _sasl_response(self, line: bytes):
        """A client's answer to a "+ " challenge: base64 data, or "*" to cancel.

        Like commands before login, answers do not restart the (absolute) login timer.
        """
        self._arrived = self.factory.clock.seconds()
        if line.strip() == b"*":
            if self._sasl_attempt:
                return self._sasl_attempt_failed("sasl-cancelled", Reply.AUTH_CANCELLED)
            self._sasl = None
            self.session.say(Reply.AUTH_CANCELLED)
            return None
        try:
            data = _decode_base64(line.strip())
        except CommandError as e:
            if self._sasl_attempt:
                return self._sasl_attempt_failed("bad-sasl", e.reply, "response not base64")
            self._sasl = None
            self.session.say(e.reply)
            return None
        first_data = not self._sasl_data_seen
        self._sasl_data_seen = True
        try:
            return self._sasl_step(lambda: self._sasl.respond(data), first_data)
        except CommandError as e:
            self.session.say(e.reply)
            return None

    def response_too_long(self):
        """A SASL response over the limit ends the exchange."""
        if self._sasl_attempt:
            self._arrived = self.factory.clock.seconds()
            return self._sasl_attempt_failed("bad-sasl", Reply.BAD_SASL, "response too long")
        self._sasl = None
        self.session.bad_command(Reply.BAD_SASL)
        return None

    def _sasl_step(self, step, first_data: bool = False):
        """Run one step of the exchange; a costly one (SCRAM's key derivation) in a thread.

        A costly mechanism's first client message begins a login attempt: it waits its
        turn among the verifications and counts against the address's failures.
        """
        from popserv.sasl import SASLError

        if getattr(self._sasl, "costly", False):
            done = self._new_reply()
            if first_data:
                self._queue(lambda: self._sasl_attempt_started(step), None)
            else:
                self._sasl_in_thread(step)
            return done
        try:
            result = step()
        except SASLError as e:
            self._sasl_refused(e)
            raise CommandError(Reply.BAD_SASL) from None
        return self._sasl_result(result)

    def _sasl_in_thread(self, step) -> defer.Deferred:
        d = self.factory.run_in_thread(step)
        d.addCallbacks(self._sasl_result, self._sasl_error)
        d.addErrback(self._attempt_error, None)
        return d

    def _sasl_attempt_started(self, step) -> defer.Deferred:
        """The verification slot is ours: count the attempt, then derive the keys."""

        def derive():
            self._sasl_attempt = True
            return self._sasl_in_thread(step)

        return self._begin_attempt(None, derive)

    def _sasl_result(self, result):
        from popserv.sasl import Challenge

        if not self.session.connected:
            return None
        if isinstance(result, Challenge):
            # The client's answer comes as a continuation; an answer already waiting
            # in the buffer runs once this reply is out.
            self._answer_with(b"+ " + base64.b64encode(result.data))
            return None
        self._sasl = None
        credentials = result.credentials
        user = user_text(getattr(credentials, "username", None))
        if self._sasl_attempt:
            # The attempt began with the exchange; the portal now gives its verdict.
            self._sasl_attempt = False
            self._verify(credentials, user).addErrback(self._attempt_error, None)
            return None
        return self.login(credentials, user)

    def _sasl_refused(self, error: Exception) -> None:
        self._sasl = None
        self.log_login_failed(None, "bad-sasl", detail=str(error))

    def _sasl_attempt_failed(self, reason: str, reply: bytes, detail: str | None = None):
        """An exchange that began a login attempt ends without a login: a failed attempt.

        Its reply waits for the failure delay, counted from the client's last message.
        """
        self._sasl = None
        self._sasl_attempt = False
        done = self._new_reply()
        self.log_login_failed(None, reason, detail)
        self._count_failure(None, reply).addErrback(self._attempt_error, None)
        return done

    def _sasl_error(self, failure: Failure) -> None:
        from popserv.sasl import SASLError

        if not self.session.connected:
            return
        if failure.check(SASLError) and self._sasl_attempt:
            self._sasl_attempt_failed("bad-sasl", Reply.BAD_SASL, str(failure.value))
            return
        if failure.check(SASLError):
            self._sasl_refused(failure.value)
            self._answer(Reply.BAD_SASL)
            return
        log.failure("pop3.sasl_error: peer={peer}", failure, peer=self.session.peer)
        self._sasl = None
        if self._sasl_attempt:
            self._sasl_attempt = False
            self._end_attempt(self.factory.throttle.abandoned, None)
        self._answer(Reply.TEMP_FAILURE)

    # -- one login attempt ---------------------------------------------------------------

    def login(self, credentials, user: str | None) -> defer.Deferred:
        """Log in through the portal in this address's turn; fires once the reply is sent."""
        done = self._new_reply()
        self._arrived = self.factory.clock.seconds()
        self._queue(lambda: self._attempt(credentials, user), user)
        return done

    def _queue(self, run, user: str | None) -> None:
        d = self.factory.verifications.submit(self.session.peer_key, run)
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
            self._answer(Reply.TOO_MANY_LOGINS)
            return
        log.failure("pop3.login_error: peer={peer}", failure, peer=self.session.peer)
        self._answer(Reply.TEMP_FAILURE)

    def _attempt(self, credentials, user: str | None) -> defer.Deferred:
        """One login attempt, counted by the throttle whether or not the client stays."""
        return self._begin_attempt(user, lambda: self._verify(credentials, user))

    def _begin_attempt(self, user: str | None, proceed) -> defer.Deferred:
        """Count an attempt with the throttle, then ``proceed`` unless it is refused."""
        d = defer.maybeDeferred(self.factory.throttle.begin, self.session.peer_key, user)

        def started(allowed: bool):
            if not self.session.connected:
                # Gone while the throttle answered: nothing to verify for.
                self._end_attempt(self.factory.throttle.abandoned, user)
                return None
            if not allowed:
                self._sasl = None
                return self._refuse_attempt(user)
            return proceed()

        d.addCallback(started)
        d.addErrback(self._attempt_error, user)
        return d

    def _verify(self, credentials, user: str | None) -> defer.Deferred:
        if not user:
            d = defer.fail(UnauthorizedLogin("undecodable user name"))
        else:
            d = defer.maybeDeferred(self.factory.portal.login, credentials, None, IMaildrop)
        d.addCallbacks(
            self._logged_in, self._login_failed, callbackArgs=(user,), errbackArgs=(user,)
        )
        return d

    def _attempt_error(self, failure: Failure, user: str | None) -> None:
        log.failure(
            "pop3.login_error: peer={peer} user={user}",
            failure,
            peer=self.session.peer,
            user=untrusted(user),
        )
        self._answer(Reply.TEMP_FAILURE)

    def _end_attempt(self, outcome, user: str | None) -> None:
        """Tell the throttle how an attempt ended; nothing waits for it."""
        d = defer.maybeDeferred(outcome, self.session.peer_key, user)
        d.addErrback(
            lambda f: log.failure("pop3.throttle_error: peer={peer}", f, peer=self.session.peer)
        )

    def _refuse_attempt(self, user: str | None) -> defer.Deferred:
        """This address failed too often: refused without verifying, and counted."""
        self.log_login_failed(user, "too-many-failures")
        return self._count_failure(user, Reply.TOO_MANY_FAILURES)

    def _count_failure(self, user: str | None, reply: bytes) -> defer.Deferred:
        """Count a failed attempt; its reply goes out once the address's delay has passed."""
        d = defer.maybeDeferred(self.factory.throttle.failed, self.session.peer_key, user)
        d.addCallback(self._answer_at, reply)
        return d

    def _answer_at(self, delay: float, reply: bytes) -> None:
        """Reply ``delay`` seconds after the command arrived, however long the check took.

        Then the time a failure's reply takes tells nothing of whether the user exists
        or of how their password is stored: a dummy Argon2id, a bcrypt and a clear
        password all take their time inside the same delay.  The verification's turn
        is over by then: other logins are verified meanwhile.
        """
        wait = self._arrived + delay - self.factory.clock.seconds()
        if wait > 0:
            self._delayed = self.session.callLater(wait, self._answer, reply)
        else:
            self._answer(reply)

    def _logged_in(self, result, user: str):
        _, maildrop, logout = result
        self._end_attempt(self.factory.throttle.succeeded, user)
        if not self.session.connected:
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
        if not self.session.connected:
            logout()
            return
        if not allowed:
            logout()
            self.log_login_failed(user, "login-delay")
            self._answer(Reply.LOGIN_DELAY)
            return
        transaction = Transaction(self.session, user, maildrop, logout)
        self.session.user = user
        self.session.enter(transaction)
        count, octets = len(transaction.messages), transaction.octets
        log.info(
            "pop3.login: peer={peer} user={user} messages={count} octets={octets}",
            peer=self.session.peer,
            user=untrusted(user),
            count=count,
            octets=octets,
        )
        self._answer(Reply.LOGGED_IN, count, octets)

    def _login_failed(self, failure: Failure, user: str | None):
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
            log.failure(
                "pop3.login_error: peer={peer} user={user}",
                failure,
                peer=self.session.peer,
                user=untrusted(user),
            )
            reason, reply, outcome = "server-error", Reply.TEMP_FAILURE, throttle.abandoned
        self._end_attempt(outcome, user)
        self.log_login_failed(user, reason)
        self._answer(reply)
        return None

    def log_login_failed(self, user: str | None, reason: str, detail: str | None = None) -> None:
        """One event per failed login, the address first: what fail2ban counts.

        ``reason`` is one of a fixed set of words; the user name and any detail are the
        client's text, quoted so they cannot end the line or move the address.
        """
        fields = {"peer": self.session.peer, "user": untrusted(user), "reason": reason}
        text = "pop3.login_failed: peer={peer} user={user} reason={reason}"
        if detail is not None:
            fields["detail"] = untrusted(detail)
            text += " detail={detail}"
        log.info(text, **fields)

    # -- the reply that ends a command ---------------------------------------------------

    def _new_reply(self) -> defer.Deferred:
        """What the command in progress waits on: one Deferred, however its steps chain."""
        if self._done is None:
            self._done = defer.Deferred()
        return self._done

    def _answer(self, template: bytes, *args) -> None:
        self._answer_with(self.session.text(template, *args))

    def _answer_with(self, line: bytes) -> None:
        """Send the reply the command in progress waited for, and let input go on."""
        self._delayed = None
        self._waiting = None
        if not self.session.connected:
            return
        self.session.send_line(line)
        done, self._done = self._done, None
        if done is not None:
            done.callback(None)


def _decode_base64(data: bytes) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise CommandError(Reply.BAD_BASE64) from None


def _saslprep(data: bytes) -> bytes | None:
    """SASLprep of UTF-8 text; None when it is not UTF-8 or holds prohibited characters."""
    from scramp.core import saslprep
    from scramp.utils import ScramException

    try:
        return saslprep(data.decode("utf-8")).encode("utf-8")
    except (UnicodeDecodeError, ScramException):
        return None
