"""One POP3 login attempt: its turn among the verifications, the throttle's count, the
portal's verdict, and the reply, which a failure gets at a fixed time after the command.

Whatever way the client logs in (USER/PASS, APOP, AUTH), the attempt goes through here,
and the command that started it waits on ``new_reply()``: it fires once the reply is out.
"""

from __future__ import annotations

from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from popserv.interfaces import (
    BUSY,
    IMaildrop,
    LockUnavailable,
    MaildropLocked,
    SharedStateUnavailable,
    UserDBUnavailable,
)
from popserv.logsafe import untrusted
from popserv.pop3.replies import LOG_NAMESPACE, Reply
from popserv.pop3.transaction import Transaction
from popserv.scheduler import QueueFull

log = Logger(namespace=LOG_NAMESPACE)


class LoginAttempts:
    """The login attempts of one session, one at a time, and the reply each waits for."""

    def __init__(self, session, give_up):
        """``give_up`` is called when an attempt ends without a login before it was verified."""
        self.session = session
        self.factory = session.factory
        self._give_up = give_up
        #: When the command being answered arrived: a failure is answered at a fixed
        #: time after it.
        self.arrived = 0.0
        #: The login waiting for (or in) its turn to be verified: cancelled if the client leaves.
        self._waiting: defer.Deferred | None = None
        self._delayed = None
        #: Fires once the reply to the command in progress is sent.
        self._done: defer.Deferred | None = None

    def connection_lost(self) -> None:
        if self._delayed is not None and self._delayed.active():
            self._delayed.cancel()
        if self._waiting is not None:
            # Still queued: dropped, never verified.  Already running: it ends as it may.
            self._waiting.cancel()

    def login(self, credentials, user: str | None) -> defer.Deferred:
        """Log in through the portal in this address's turn; fires once the reply is sent."""
        done = self.new_reply()
        self.arrived = self.factory.clock.seconds()
        self.queue(lambda: self._attempt(credentials, user), user)
        return done

    def queue(self, run, user: str | None) -> None:
        d = self.factory.verifications.submit(self.session.peer_key, run)
        d.addErrback(self._not_verified, user)
        if not d.called:
            # (One that ran at once may have led to the next command's login already.)
            self._waiting = d

    def _not_verified(self, failure: Failure, user: str | None) -> None:
        """The attempt never ran: its client left, or its address had too many waiting."""
        if failure.check(defer.CancelledError):
            return
        self._give_up()
        if failure.check(QueueFull):
            self.log_login_failed(user, "too-many-logins")
            self.answer(Reply.TOO_MANY_LOGINS)
            return
        log.failure("pop3.login_error: peer={peer}", failure, peer=self.session.peer)
        self.answer(Reply.TEMP_FAILURE)

    def _attempt(self, credentials, user: str | None) -> defer.Deferred:
        """One login attempt, counted by the throttle whether or not the client stays."""
        return self.begin_attempt(user, lambda: self.verify(credentials, user))

    def begin_attempt(self, user: str | None, proceed) -> defer.Deferred:
        """Count an attempt with the throttle, then ``proceed`` unless it is refused."""
        d = defer.maybeDeferred(self.factory.throttle.begin, self.session.peer_key, user)

        def started(allowed: bool):
            if not self.session.connected:
                # Gone while the throttle answered: nothing to verify for.
                self.end_attempt(self.factory.throttle.abandoned, user)
                return None
            if allowed is BUSY:
                # Logins under way from the address, not failures, reach the limit.
                self._give_up()
                self.end_attempt(self.factory.throttle.abandoned, user)
                self.log_login_failed(user, "too-many-logins")
                self.answer(Reply.TOO_MANY_LOGINS)
                return None
            if not allowed:
                self._give_up()
                return self._refuse_attempt(user)
            return proceed()

        d.addCallback(started)
        d.addErrback(self.attempt_error, user)
        return d

    def verify(self, credentials, user: str | None) -> defer.Deferred:
        if not user:
            d = defer.fail(UnauthorizedLogin("undecodable user name"))
        else:
            d = defer.maybeDeferred(self.factory.portal.login, credentials, None, IMaildrop)
        d.addCallbacks(
            self._logged_in, self._login_failed, callbackArgs=(user,), errbackArgs=(user,)
        )
        return d

    def attempt_error(self, failure: Failure, user: str | None) -> None:
        if failure.check(SharedStateUnavailable):
            # The nodes' shared counters are out of reach: no verdict, try again later.
            self.log_login_failed(user, "state-unavailable")
            self.answer(Reply.TEMP_FAILURE)
            return
        log.failure(
            "pop3.login_error: peer={peer} user={user}",
            failure,
            peer=self.session.peer,
            user=untrusted(user),
        )
        self.answer(Reply.TEMP_FAILURE)

    def end_attempt(self, outcome, user: str | None) -> None:
        """Tell the throttle how an attempt ended; nothing waits for it."""
        d = defer.maybeDeferred(outcome, self.session.peer_key, user)
        d.addErrback(
            lambda f: log.failure("pop3.throttle_error: peer={peer}", f, peer=self.session.peer)
        )

    def _refuse_attempt(self, user: str | None) -> defer.Deferred:
        """This address failed too often: refused without verifying, and counted."""
        self.log_login_failed(user, "too-many-failures")
        return self.count_failure(user, Reply.TOO_MANY_FAILURES)

    def count_failure(self, user: str | None, reply: bytes) -> defer.Deferred:
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
        wait = self.arrived + delay - self.factory.clock.seconds()
        if wait > 0:
            self._delayed = self.session.callLater(wait, self.answer, reply)
        else:
            self.answer(reply)

    def _logged_in(self, result, user: str):
        _, maildrop, logout = result
        self.end_attempt(self.factory.throttle.succeeded, user)
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
            self.answer(Reply.LOGIN_DELAY)
            return
        transaction = Transaction(self.session, user, maildrop, logout)
        self.session.user = user
        self.session.enter(transaction)
        self.factory.metrics.pop3_login(True, self.factory.clock.seconds() - self.arrived)
        count, octets = len(transaction.messages), transaction.octets
        log.info(
            "pop3.login: peer={peer} user={user} messages={count} octets={octets}",
            peer=self.session.peer,
            user=untrusted(user),
            count=count,
            octets=octets,
        )
        self.answer(Reply.LOGGED_IN, count, octets)

    def _login_failed(self, failure: Failure, user: str | None):
        throttle = self.factory.throttle
        if failure.check(UnauthorizedLogin, UnhandledCredentials):
            # The same reply, at the same time, for a bad user and a bad password; the
            # delay grows with each failure from this address.
            self.log_login_failed(user, "bad-credentials")
            return self.count_failure(user, Reply.AUTH_FAILED)
        if failure.check(MaildropLocked):
            # The password was right: the user's failures are forgiven, as by a login.
            reason, reply, outcome = "in-use", Reply.IN_USE, throttle.succeeded
        elif failure.check(UserDBUnavailable):
            reason, reply, outcome = "userdb-unavailable", Reply.TEMP_FAILURE, throttle.abandoned
        elif failure.check(LockUnavailable):
            reason, reply, outcome = "lock-unavailable", Reply.TEMP_FAILURE, throttle.abandoned
        else:
            log.failure(
                "pop3.login_error: peer={peer} user={user}",
                failure,
                peer=self.session.peer,
                user=untrusted(user),
            )
            reason, reply, outcome = "server-error", Reply.TEMP_FAILURE, throttle.abandoned
        self.end_attempt(outcome, user)
        self.log_login_failed(user, reason)
        self.answer(reply)
        return None

    def log_login_failed(self, user: str | None, reason: str, detail: str | None = None) -> None:
        """One event per failed login, the address first: what fail2ban counts.

        ``reason`` is one of a fixed set of words; the user name and any detail are the
        client's text, quoted so they cannot end the line or move the address.
        """
        self.factory.metrics.pop3_login(False, self.factory.clock.seconds() - self.arrived)
        fields = {"peer": self.session.peer, "user": untrusted(user), "reason": reason}
        text = "pop3.login_failed: peer={peer} user={user} reason={reason}"
        if detail is not None:
            fields["detail"] = untrusted(detail)
            text += " detail={detail}"
        log.info(text, **fields)

    def new_reply(self) -> defer.Deferred:
        """What the command in progress waits on: one Deferred, however its steps chain."""
        if self._done is None:
            self._done = defer.Deferred()
        return self._done

    def answer(self, template: bytes, *args) -> None:
        self.answer_with(self.session.text(template, *args))

    def answer_with(self, line: bytes) -> None:
        """Send the reply the command in progress waited for, and let input go on."""
        self._delayed = None
        self._waiting = None
        if not self.session.connected:
            return
        self.session.send_line(line)
        done, self._done = self._done, None
        if done is not None:
            done.callback(None)
