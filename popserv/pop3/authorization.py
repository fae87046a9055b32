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
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from popserv.pop3.login import LoginAttempts
from popserv.pop3.replies import LOG_NAMESPACE, CommandError, Reply, no_arguments
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
        self.logins = LoginAttempts(session, give_up=self._forget_exchange)

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

    def expire(self) -> bytes:
        """EXPIRE before login: the server's, or the shortest of all tagged USER."""
        return self.factory.policies.capability()

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

    def _forget_exchange(self) -> None:
        """A login that will not happen ends the SASL exchange that led to it."""
        self._sasl = None

    def connection_lost(self) -> None:
        self.logins.connection_lost()
        if self._sasl_attempt:
            # It cost a verification, like a cancelled exchange: counted the same way.
            self._sasl_attempt = False
            self.logins.log_login_failed(None, "sasl-cancelled", detail="connection closed")
            self.logins.end_attempt(self.factory.throttle.failed, None)

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
                return self.logins.login(None, None)
        return self.logins.login(UsernamePassword(name, password), user_text(name))

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
        return self.logins.login(credentials, user_text(name))

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
        self.logins.arrived = self.factory.clock.seconds()
        self._sasl_data_seen = initial is not None
        return self._sasl_step(lambda: self._sasl.start(initial), initial is not None)

    def _sasl_response(self, line: bytes):
        """A client's answer to a "+ " challenge: base64 data, or "*" to cancel.

        Like commands before login, answers do not restart the (absolute) login timer.
        """
        self.logins.arrived = self.factory.clock.seconds()
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
            self.logins.arrived = self.factory.clock.seconds()
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
            done = self.logins.new_reply()
            if first_data:
                self.logins.queue(lambda: self._sasl_attempt_started(step), None)
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
        d.addErrback(self.logins.attempt_error, None)
        return d

    def _sasl_attempt_started(self, step) -> defer.Deferred:
        """The verification slot is ours: count the attempt, then derive the keys."""

        def derive():
            self._sasl_attempt = True
            return self._sasl_in_thread(step)

        return self.logins.begin_attempt(None, derive)

    def _sasl_result(self, result):
        from popserv.sasl import Challenge

        if not self.session.connected:
            return None
        if isinstance(result, Challenge):
            # The client's answer comes as a continuation; an answer already waiting
            # in the buffer runs once this reply is out.
            self.logins.answer_with(b"+ " + base64.b64encode(result.data))
            return None
        self._sasl = None
        credentials = result.credentials
        user = user_text(getattr(credentials, "username", None))
        if self._sasl_attempt:
            # The attempt began with the exchange; the portal now gives its verdict.
            self._sasl_attempt = False
            self.logins.verify(credentials, user).addErrback(self.logins.attempt_error, None)
            return None
        return self.logins.login(credentials, user)

    def _sasl_refused(self, error: Exception) -> None:
        self._sasl = None
        self.logins.log_login_failed(None, "bad-sasl", detail=str(error))

    def _sasl_attempt_failed(self, reason: str, reply: bytes, detail: str | None = None):
        """An exchange that began a login attempt ends without a login: a failed attempt.

        Its reply waits for the failure delay, counted from the client's last message.
        """
        self._sasl = None
        self._sasl_attempt = False
        done = self.logins.new_reply()
        self.logins.log_login_failed(None, reason, detail)
        self.logins.count_failure(None, reply).addErrback(self.logins.attempt_error, None)
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
            self.logins.answer(Reply.BAD_SASL)
            return
        log.failure("pop3.sasl_error: peer={peer}", failure, peer=self.session.peer)
        self._sasl = None
        if self._sasl_attempt:
            self._sasl_attempt = False
            self.logins.end_attempt(self.factory.throttle.abandoned, None)
        self.logins.answer(Reply.TEMP_FAILURE)


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
