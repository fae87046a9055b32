"""SASL mechanisms as small state machines that turn client responses into cred credentials.

No I/O: the protocol base64-decodes each client response, hands it to ``start`` or
``respond``, sends a ``Challenge`` back as ``+ base64``, and logs a ``Success``'s
credentials in through the portal.  ``SASLError`` means a malformed exchange.
Mechanisms that verify the client themselves (SCRAM) end in ``SASLVerified``, which
fails at the portal like any bad password when the proof was wrong.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import scramp
from twisted.cred.credentials import CramMD5Credentials, UsernamePassword
from zope.interface import implementer

from popserv.interfaces import ISASLVerified, IUserDB, ScramKeys, UserDBUnavailable
from popserv.state import scram_salt


class Challenge(NamedTuple):
    """The server's next challenge: sent as ``"+ " + base64(data)``."""

    data: bytes


class Success(NamedTuple):
    """The exchange is complete: log in with ``credentials`` through the portal."""

    credentials: object


class SASLError(Exception):
    """A malformed client message: the exchange ends with ``-ERR``."""


@implementer(ISASLVerified)
class SASLVerified:
    """A SCRAM exchange's outcome; ``popserv.auth.VerifiedChecker`` turns it into a login."""

    def __init__(self, username: str, verified: bool, failure: Exception | None = None):
        self.username = username
        self.verified = verified
        self.failure = failure

    def __repr__(self) -> str:
        return f"SASLVerified({self.username!r}, verified={self.verified})"


# Keys the salts made up for users without SCRAM keys when no server secret is given:
# then they stay the same only while this process runs.
_PROCESS_SECRET = os.urandom(32)


class _Mechanism:
    """What every mechanism shares: its construction and the end of its exchange."""

    name: ClassVar[bytes]
    plaintext: ClassVar[bool] = False
    #: Whether a step may take long (key derivation): the protocol runs it in a thread.
    costly: ClassVar[bool] = False
    #: What the server asks with when AUTH came without an initial response.
    first_challenge: ClassVar[bytes] = b""

    def __init__(
        self,
        hostname: str,
        userdb: IUserDB,
        nonce: Callable[[], bytes] | None = None,
        secret: bytes | None = None,
    ):
        """``secret``: the server secret (``popserv.state``) that keys made-up SCRAM salts."""
        self.hostname = hostname
        self.userdb = userdb
        self.nonce = nonce or self.make_nonce
        self.secret = secret if secret is not None else _PROCESS_SECRET
        self._done = False

    @staticmethod
    def make_nonce() -> bytes:
        """Fresh random printable characters, no comma (fit for CRAM-MD5 and SCRAM)."""
        return secrets.token_urlsafe(18).encode("ascii")

    def _check_open(self) -> None:
        if self._done:
            raise SASLError("the exchange is already complete")

    def start(self, initial: bytes | None) -> Challenge | Success:
        """Take the initial response as the first client message, or ask for it."""
        self._check_open()
        if initial is None:
            return Challenge(self.first_challenge)
        return self.respond(initial)

    def _success(self, credentials) -> Success:
        self._done = True
        return Success(credentials)


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError(f"the {what} is not UTF-8") from None


class Plain(_Mechanism):
    """PLAIN (RFC 4616): ``[authzid] NUL authcid NUL passwd`` in one client message.

    Acting for another user is not supported: an authzid other than the authcid is
    a ``SASLError``.
    """

    name = b"PLAIN"
    plaintext = True

    def respond(self, data: bytes) -> Challenge | Success:
        """Parse the message into ``UsernamePassword``."""
        self._check_open()
        fields = data.split(b"\0")
        if len(fields) != 3:
            raise SASLError("PLAIN takes authzid, authcid and password separated by two NULs")
        authzid, authcid, password = fields
        for field, what in [(authzid, "authzid"), (authcid, "user name"), (password, "password")]:
            _text(field, what)
        if not authcid or not password:
            raise SASLError("PLAIN needs a user name and a password")
        if authzid and authzid != authcid:
            raise SASLError("logging in as another user (an authzid) is not supported")
        return self._success(UsernamePassword(authcid, password))


class Login(_Mechanism):
    """LOGIN (draft-murchison-sasl-login): ``Username:``, then ``Password:``, each in clear.

    An initial response (``AUTH LOGIN <user>``) is the user name.
    """

    name = b"LOGIN"
    plaintext = True
    first_challenge = b"Username:"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._user: bytes | None = None

    def respond(self, data: bytes) -> Challenge | Success:
        """Take the user name, then the password."""
        self._check_open()
        if self._user is None:
            if not data:
                raise SASLError("LOGIN needs a user name")
            self._user = data
            return Challenge(b"Password:")
        return self._success(UsernamePassword(self._user, data))


class CramMD5(_Mechanism):
    """CRAM-MD5 (RFC 2195): a ``<random.time@host>`` challenge, answered ``user hexdigest``.

    The client sends no initial response.  ``nonce()`` makes the ``random.time``
    part; the answer becomes Twisted's ``CramMD5Credentials`` for
    ``popserv.auth.SecretChecker``.
    """

    name = b"CRAM-MD5"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._challenge: bytes | None = None

    @staticmethod
    def make_nonce() -> bytes:
        """Random digits and the time, as RFC 2195's example (``1896.697170952``)."""
        return b"%d.%d" % (secrets.randbits(63), time.time())

    def start(self, initial: bytes | None) -> Challenge | Success:
        """Send the challenge; an initial response is an error."""
        self._check_open()
        if initial is not None or self._challenge is not None:
            raise SASLError("CRAM-MD5 takes no initial response")
        self._challenge = (
            b"<" + self.nonce() + b"@" + self.hostname.encode("ascii", "replace") + b">"
        )
        return Challenge(self._challenge)

    def respond(self, data: bytes) -> Challenge | Success:
        """Parse ``user SP digest`` (32 hex digits) into ``CramMD5Credentials``."""
        self._check_open()
        if self._challenge is None:
            raise SASLError("CRAM-MD5 starts with the server's challenge")
        user, space, digest = data.rpartition(b" ")
        if not space or not user:
            raise SASLError("CRAM-MD5 takes a user name, a space and the digest")
        if len(digest) != 32 or not all(c in b"0123456789abcdefABCDEF" for c in digest):
            raise SASLError("the CRAM-MD5 digest is not 32 hexadecimal digits")
        credentials = CramMD5Credentials(self.hostname)
        credentials.challenge = self._challenge
        credentials.username = user
        credentials.response = digest.lower()
        return self._success(credentials)


class _Scram(_Mechanism):
    """SCRAM (RFC 5802) with scramp, against ``IUserDB.scram`` keys; no channel binding.

    Exchange: client-first -> server-first; client-final -> server-final (the proof
    checked); an empty client response -> ``Success(SASLVerified(user, True))``.
    A wrong proof ends at once in ``Success(SASLVerified(user, False))``, which the
    portal refuses like a wrong password.  An unknown user, or one whose stored scheme
    has no SCRAM keys, gets a made-up salt, so the exchange does not tell.
    """

    scram_name: ClassVar[str]
    costly = True  # each lookup derives keys with PBKDF2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._server = None
        self._user = ""
        self._unavailable: UserDBUnavailable | None = None
        self._final_sent = False

    def respond(self, data: bytes) -> Challenge | Success:
        """Advance the exchange by one client message."""
        self._check_open()
        if self._server is None:
            return self._client_first(_text(data, "client-first message"))
        if not self._final_sent:
            return self._client_final(_text(data, "client-final message"))
        if data:
            raise SASLError("SCRAM's last client response must be empty")
        return self._success(SASLVerified(self._user, True))

    def _keys(self, user: str) -> tuple[bytes, bytes, bytes, int]:
        """scramp's ``auth_fn``: the user's keys, or made-up ones that no proof matches."""
        self._user = user
        keys = None
        try:
            keys = self.userdb.scram(user, self.scram_name)
        except UserDBUnavailable as e:
            self._unavailable = e
        if keys is None or len(keys.salt) < 12 or not 4096 <= keys.iterations <= 10_000_000:
            # Unknown, or nothing scramp accepts: the salt made up, but the same each
            # time and after restarts, as a stored salt is.
            salt = scram_salt(self.secret, self.scram_name, user)
            size = scramp.ScramMechanism(self.scram_name).hf().digest_size
            keys = ScramKeys(salt, 4096, os.urandom(size), os.urandom(size))
        return keys.salt, keys.stored_key, keys.server_key, keys.iterations

    def _client_first(self, message: str) -> Challenge | Success:
        mechanism = scramp.ScramMechanism(self.scram_name)
        nonce = self.nonce().decode("ascii", "replace")
        try:
            # A plain function: some scramp releases refuse a bound method.
            self._server = mechanism.make_server(lambda user: self._keys(user), s_nonce=nonce)
            self._server.set_client_first(message)
        except scramp.ScramException as e:
            raise SASLError(f"bad SCRAM client-first message: {e}") from None
        if self._unavailable is not None:
            return self._success(SASLVerified(self._user, False, self._unavailable))
        return Challenge(self._server.get_server_first().encode("utf-8"))

    def _client_final(self, message: str) -> Challenge | Success:
        try:
            self._server.set_client_final(message)
        except scramp.ScramException as e:
            # scramp 1.5 gives an enum, 1.4 (the last for Python 3.10) the RFC's string.
            if getattr(e.server_error, "value", e.server_error) == "invalid-proof":
                return self._success(SASLVerified(self._user, False))
            raise SASLError(f"bad SCRAM client-final message: {e}") from None
        self._final_sent = True
        return Challenge(self._server.get_server_final().encode("utf-8"))


class ScramSHA256(_Scram):
    """SCRAM-SHA-256 (RFC 7677)."""

    name = b"SCRAM-SHA-256"
    scram_name = "SCRAM-SHA-256"


class ScramSHA1(_Scram):
    """SCRAM-SHA-1 (RFC 5802)."""

    name = b"SCRAM-SHA-1"
    scram_name = "SCRAM-SHA-1"


MECHANISMS: dict[bytes, type] = {
    mechanism.name: mechanism for mechanism in (Plain, Login, CramMD5, ScramSHA256, ScramSHA1)
}
