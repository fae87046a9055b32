"""The contracts between popserv's layers: protocol, auth, realm and storage.

This module imports nothing else from popserv, so every other module can depend on it.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from twisted.cred.credentials import ICredentials
from zope.interface import Attribute, Interface, implementer

if TYPE_CHECKING:
    from twisted.mail.smtp import Address


class MaildropLocked(Exception):
    """Another session holds this maildrop (POP3 answers ``-ERR [IN-USE]``)."""


class LockUnavailable(Exception):
    """The maildrop lock cannot be taken now: its database is unreachable (``-ERR [SYS/TEMP]``)."""


class LockLost(Exception):
    """A session's maildrop lock is gone (its database connection was lost): commit nothing."""


class CommitFailed(Exception):
    """Some messages marked deleted could not be removed at QUIT."""

    def __init__(self, failed: int):
        super().__init__(f"{failed} deleted message(s) could not be removed")
        self.failed = failed


class UserDBUnavailable(Exception):
    """The user database cannot be read (POP3 answers ``-ERR [SYS/TEMP]``)."""


class SharedStateUnavailable(Exception):
    """What the nodes share (login counters, sessions) cannot be reached: try again later.

    POP3 answers a login ``-ERR [SYS/TEMP]``; SMTP answers ``451 4.3.0``.
    """


class QuotaLimits(NamedTuple):
    """A mailbox's limits: octets (physical sizes) and messages; 0 is no limit."""

    storage: int = 0
    messages: int = 0

    def __bool__(self) -> bool:
        """Whether there is any limit at all."""
        return bool(self.storage or self.messages)


#: EXPIRE (RFC 2449 section 6.7) that never removes anything: ``expire_days`` None.
NEVER = None


@dataclass(frozen=True)
class MailboxPolicy:
    """What the server does with one user's mail besides what the client asks.

    ``mark_seen``: a message retrieved in full gets the seen flag at QUIT.
    ``expire_days``: RFC 2449 EXPIRE, days a retrieved message is kept (0: removed at
    the QUIT of the session that retrieved it; ``NEVER``: kept).  ``quota``: the limits.
    """

    mark_seen: bool = True
    expire_days: int | None = NEVER
    quota: QuotaLimits = QuotaLimits()


class IMaildrop(Interface):
    """One user's mailbox as a POP3 session sees it: a snapshot fixed at login.

    Message numbers of the protocol are ``index + 1``; indexes are 0-based here.
    """

    expire_days = Attribute(
        "The user's EXPIRE policy (``MailboxPolicy.expire_days``), for CAPA after login."
    )

    def messages():
        """The snapshot: a sequence of ``(uidl, size)`` in message-number order.

        ``uidl`` is a printable ASCII ``str`` (RFC 1939: 0x21-0x7E, at most 70
        characters); ``size`` counts the octets with CRLF line ends, as sent on the
        wire before dot-stuffing.  The sequence never changes during the session.
        """

    def open(index):
        """A binary file-like object positioned at the start of the stored message.

        Raises ``OSError`` when the message cannot be read.
        """

    def commit(deleted, retrieved=frozenset()):
        """Remove the messages at the ``deleted`` indexes (the UPDATE state, at QUIT).

        The session keeps the DELE marks itself; storage sees them only here, once.
        ``retrieved``: the indexes sent in full by RETR, which the maildrop's policy
        marks seen, records for EXPIRE, or (EXPIRE 0) removes as well.  Returns a
        Deferred that fires with ``None``, or fails with ``CommitFailed`` when some
        messages could not be removed.  Raises ``IndexError`` for an index outside the
        snapshot.
        """

    def close():
        """Release the maildrop lock; idempotent, deletes nothing.

        Returns None, or a Deferred that fires once the lock is released (one kept in a
        database): QUIT's ``+OK`` waits for it, so the client may log in again at once.
        """

    def when_lost(callback):
        """Call ``callback()`` (in the reactor thread) if the lock is lost before ``close``.

        The session must then end at once; its ``commit`` fails with ``LockLost``.  A
        lock that cannot be lost (a local ``flock``) never calls it.
        """


class IMaildropLease(Interface):
    """One session's hold on a maildrop lock, from ``IMaildropLocks.lock``."""

    def verify():
        """Raise ``LockLost`` unless the lock is still held; blocks (a store's thread).

        A commit calls it first, so a session that lost its lock removes nothing.
        """

    def when_lost(callback):
        """Call ``callback()`` in the reactor thread if the lock is lost before ``release``."""

    def release():
        """Give the lock up; idempotent, callable from any thread, never blocks.

        Returns None once released, or a Deferred (fired in the reactor thread) when the
        release waits for a database.
        """


class IMaildropLocks(Interface):
    """How a store keeps one session at a time in a maildrop: ``flock``, or that and a
    lock in the database all nodes share."""

    def lock(user, path):
        """Lock ``user``'s maildrop (``path``: its Maildir); blocks (a store's thread).

        Returns an ``IMaildropLease``.  Raises ``MaildropLocked`` when another session
        holds it, ``LockUnavailable`` when that cannot be told now.
        """


class IMaildropStore(Interface):
    """Where users' maildrops live; opens and locks them."""

    def open_maildrop(user, policy=None):
        """Lock ``user``'s maildrop and take its snapshot.

        ``policy`` (a ``MailboxPolicy``; the defaults without it) governs the session:
        with EXPIRE of some days, messages retrieved longer ago are removed first.
        Returns a Deferred firing with an ``IMaildrop``, or failing with
        ``MaildropLocked`` when another session holds it.
        """

    def path_for(user):
        """The Maildir directory of ``user`` (``str``)."""

    def create(user):
        """Create ``user``'s Maildir (``tmp``, ``new``, ``cur``) if missing."""


class IUserDB(Interface):
    """The user database: who exists, and how their passwords are checked."""

    def exists(user):
        """Whether ``user`` (``str``) is a known user."""

    def check(user, password):
        """Verify ``password`` (``bytes``) for ``user``.

        Returns a Deferred firing ``True`` or ``False``; the hash runs off the
        reactor thread, and an unknown user costs the same as a wrong password.
        Fails with ``UserDBUnavailable`` when the database cannot be read.
        """

    def secret(user):
        """The password itself (``bytes``) for APOP, or ``None`` unless stored in clear."""

    def cram_md5(user):
        """The 32-byte HMAC-MD5 context (outer then inner MD5 state, Dovecot's layout), or ``None``.

        From ``{CRAM-MD5}`` entries, or computed from a password stored in clear.
        """

    def scram(user, mechanism="SCRAM-SHA-256"):
        """``ScramKeys`` for ``mechanism`` (``str``, e.g. ``"SCRAM-SHA-1"``), or ``None``.

        Stored keys, or keys derived from a password stored in clear.  ``None`` for an
        unknown user or one whose stored scheme cannot serve the mechanism.
        """

    def fields(user):
        """``user``'s extra settings (``dict[str, str]``), empty for an unknown user.

        From the passwd-file's extra fields (``userdb_quota_rule=*:storage=100M``),
        with Dovecot's ``userdb_`` prefix taken off.
        """

    def field_values(name):
        """The distinct values (``set[str]``) users have for the extra field ``name``."""

    def mechanisms(user=None):
        """The mechanisms (``set[bytes]``, e.g. ``b"APOP"``) ``user``'s stored scheme can verify.

        Without a user: those any user's scheme can verify.  Unknown user: the empty set.
        """


class IConnectionLimiter(Interface):
    """How many connections a service takes, per client and in all.

    One per service (POP3, SMTP); the in-memory one counts in one process, later ones
    across processes and hosts.
    """

    open = Attribute(
        "Connections this process counts now (``int``); its descriptor reserve is reckoned "
        "from them."
    )

    def opened(peer, descriptor=-1):
        """Count a new connection from ``peer`` (an address, ``str``), if within limits.

        ``descriptor`` is its socket's number when known.  Returns ``None`` when the
        connection is counted, else (not counting it) the name of the limit it is over:
        ``"per-peer"``, ``"max_connections"`` or ``"descriptors"``.
        """

    def closed(peer):
        """A connection counted by ``opened`` has ended."""


class _Busy:
    """``ILoginThrottle.begin``'s answer when attempts under way, not failures, reach the
    limit: refuse for now without counting it (a burst of logins from one address)."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "BUSY"


BUSY = _Busy()


class ILoginThrottle(Interface):
    """Failed-login accounting: the delay before a failure's reply, lockout and LOGIN-DELAY.

    ``peer`` is the client's accounting key (``popserv.limits.accounting_key``: an
    IPv6 client counts by its /64), ``user`` the name the client gave (``str``), or None
    when it is not known yet or not decodable.  Every ``begin`` is ended by exactly one
    of ``succeeded``, ``failed`` or ``abandoned``.  Each method may return its result
    or a Deferred firing with it, so a store shared by several processes can serve.
    """

    def begin(peer, user):
        """A login attempt starts, before anything is verified: whether it may go on.

        Until it ends, the attempt counts against the peer's limit as if it had failed,
        so attempts made in parallel cannot pass the limit.  False: the peer failed
        too often; refuse without verifying, and end the attempt with ``failed``.
        ``BUSY`` (also false): the peer's failures are below the limit, but with its
        attempts under way they reach it; refuse without verifying for now, and end the
        attempt with ``abandoned``, so that a burst of logins from one address (many
        users behind one NAT) is never counted as failures.
        """

    def succeeded(peer, user):
        """The attempt verified: forget ``user``'s own failures from ``peer``, no one else's."""

    def failed(peer, user):
        """The attempt failed or was refused: it counts.  Returns the seconds to wait to reply."""

    def abandoned(peer, user):
        """The attempt ended without a verdict (server trouble): neither counted nor forgiven."""

    def login_allowed(user):
        """LOGIN-DELAY: whether ``user`` may log in now; if so, this login is their latest."""


class ScramKeys(NamedTuple):
    """What a server keeps to verify SCRAM (RFC 5802) without the password."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


class ISASLVerified(ICredentials):
    """The outcome of a SASL exchange that verified the client itself (SCRAM).

    Only a checker that trusts the mechanisms which make these may accept them.
    """

    username = Attribute("The authenticated user (``str``).")
    verified = Attribute("Whether the client proved it knows the password.")
    failure = Attribute("An exception to fail the login with (``UserDBUnavailable``), or None.")


class DeliveryFailed(Exception):
    """A message could not be stored; nothing of it is in any mailbox.

    ``error`` is the ``OSError`` behind it, if any; ``disk_full`` says whether that was
    lack of space or quota (SMTP answers 452 4.3.1).
    """

    def __init__(self, reason: str, error: OSError | None = None):
        super().__init__(reason)
        self.error = error

    @property
    def disk_full(self) -> bool:
        return self.error is not None and self.error.errno in (errno.ENOSPC, errno.EDQUOT)


class MailboxFull(DeliveryFailed):
    """The message would take every recipient's mailbox over its quota (SMTP 552 5.2.2)."""

    def __init__(self, users):
        super().__init__("mailbox full: " + ", ".join(users))
        self.users = tuple(users)


@dataclass(frozen=True)
class Delivered:
    """Where a finished delivery went: its file name, and the users whose mailbox was full."""

    name: str
    full: tuple[str, ...] = ()


class IQuota(Interface):
    """How full users' mailboxes are, for refusing mail early (at RCPT)."""

    def usage(user):
        """A Deferred firing with ``popserv.quota.Usage`` of ``user``'s mailbox."""

    def admits(user, size):
        """A Deferred firing ``True`` when a message of ``size`` octets (0: not known)
        still fits; ``False`` when the mailbox is full or ``size`` would overfill it."""


class IDelivery(Interface):
    """One message being stored for some users; nothing is visible before ``finish``.

    ``id`` is the unique part of the Maildir name (and so the message's UIDL); ``size``
    counts the octets written so far.
    """

    def write(data):
        """Append ``bytes`` to the message; raises ``DeliveryFailed`` (and aborts) on error."""

    def finish():
        """Make the message durable and visible to every recipient at once.

        Each recipient's quota is checked as the message goes in; a recipient it would
        take over quota does not get it.  Returns a Deferred that fires with
        ``Delivered`` once it is in each other recipient's mailbox, or fails with
        ``DeliveryFailed`` (``MailboxFull`` when every mailbox was full) having left
        it in none.
        """

    def abort():
        """Drop the message; idempotent."""


class IDeliverer(Interface):
    """Atomic delivery into users' mailboxes (what the SMTP receiver writes to)."""

    def begin(users):
        """Start a message for the ``users`` (``str`` names); returns an ``IDelivery``.

        Raises ``DeliveryFailed`` when the message cannot even be started.
        """


@dataclass
class Session:
    """One SMTP connection as the receiver knows it; STARTTLS starts a new one.

    ``helo`` is the name the client gave (None before HELO or EHLO), ``esmtp`` whether
    it said EHLO, ``tls`` whether the connection is encrypted.
    """

    peer: str
    helo: bytes | None = None
    esmtp: bool = False
    tls: bool = False


@dataclass
class Envelope:
    """One message, from MAIL FROM to the reply at the end of its DATA.

    ``recipients`` are the accepted addresses as given (``bytes``, one per RCPT), ``users``
    the distinct users they map to; ``size`` counts the octets of DATA so far, ``failure``
    is the reply its end will get when it cannot be delivered, ``delivery`` the
    ``IDelivery`` it is written to once DATA has begun.
    """

    id: str
    sender: Address
    recipients: list[bytes] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    size: int = 0
    #: The SIZE the client declared at MAIL FROM (RFC 1870), None when it gave none.
    declared_size: int | None = None
    failure: tuple[int, bytes] | None = None
    delivery: IDelivery | None = None
    #: Recipients over ``[smtp] max_recipients`` were refused (and logged once).
    over_recipient_limit: bool = False


class IRecipientPolicy(Interface):
    """Whom the SMTP receiver takes mail from and for, and the trace each message gets.

    The policy only receives the protocol's ``Session`` and ``Envelope``; it keeps no
    state of a connection or a message.  It refuses by raising (or failing with) one of
    ``twisted.mail.smtp``'s ``SMTPServerError`` family, whose code and text are the reply.
    """

    def check_sender(session, envelope):
        """Accept ``envelope.sender`` (None), or a Deferred that fires when it is accepted."""

    def check_recipient(session, envelope, address):
        """The user (``str``) that ``address`` (``twisted.mail.smtp.Address``) delivers to.

        May return a Deferred firing with it.  Raises ``SMTPBadRcpt`` for an address
        that is not ours, ``SMTPServerError`` (4xx) when it cannot be told now.
        """

    def trace_headers(session, envelope):
        """The ``Return-Path`` and ``Received`` lines of the message (``bytes``, LF-ended)."""


class IVerifiedDigests(Interface):
    """Where ``popserv.credcache.VerifiedPasswords`` keeps its digests: one process's
    memory, or the table the workers of a host share (``popserv.sharedstate``).

    Each user has at most one entry; the store keeps the bytes and dates it is given and
    decides nothing: the cache says what expires and how many stay.
    """

    def matches(user, digest, now):
        """Whether ``user``'s entry is ``digest`` (compared in constant time) and
        expires after ``now``."""

    def remember(user, digest, expires, size):
        """Keep ``digest`` as ``user``'s until ``expires``; beyond ``size`` users, drop
        others: the least recently matched (memory) or the soonest to expire (shared)."""

    def forget(user):
        """Drop ``user``'s entry, if any."""

    def __len__():
        """How many entries are kept now, expired ones included."""


class IMetrics(Interface):
    """What the protocols tell the server's counters; they never see how those are kept.

    Each call is cheap and answers nothing, so the protocols call it directly on their
    paths; the default (``NO_METRICS``) does nothing at all.
    """

    def pop3_command(name):
        """A POP3 command line arrived; ``name`` (``bytes``, upper case) may be anything."""

    def pop3_sent(octets):
        """``octets`` more were sent to POP3 clients."""

    def pop3_login(ok, seconds):
        """A POP3 login ended: succeeded (``ok``) or failed, ``seconds`` after its command."""

    def pop3_session_opened():
        """A POP3 session logged in (TRANSACTION)."""

    def pop3_session_closed():
        """A logged-in POP3 session ended, however it ended."""

    def smtp_message(result, octets):
        """An SMTP message's DATA ended: ``"accepted"``, ``"rejected"`` (5xx) or ``"failed"``
        (4xx), with the ``octets`` of it received."""

    def tls_handshake(ok):
        """A TLS handshake (POP3S, STLS, SMTP STARTTLS) completed or failed."""

    def auth_cache(hit):
        """A password for a slow hash was checked: found in the verified-password cache
        (``hit``), or verified the slow way."""


@implementer(IMetrics)
class _NoMetrics:
    """Counts nothing: metrics are off."""

    def pop3_command(self, name):
        pass

    def pop3_sent(self, octets):
        pass

    def pop3_login(self, ok, seconds):
        pass

    def pop3_session_opened(self):
        pass

    def pop3_session_closed(self):
        pass

    def smtp_message(self, result, octets):
        pass

    def tls_handshake(self, ok):
        pass

    def auth_cache(self, hit):
        pass


#: The metrics of a server that keeps none.
NO_METRICS = _NoMetrics()


@dataclass(frozen=True)
class OpenSession:
    """One logged-in POP3 session as ``popserv who`` shows it.

    ``since`` is when it logged in (seconds since the epoch), ``pid`` and ``node`` the
    process and host that serve it.
    """

    user: str
    peer: str
    since: float
    pid: int
    node: str


class ISessionRegistry(Interface):
    """The logged-in POP3 sessions, for ``popserv who``.

    The in-memory one knows its own process; shared ones (a database) know them all.
    """

    def opened(user, peer):
        """A session of ``user`` (``str``) from ``peer`` (an address, ``str``) logged in.

        Returns a key for ``closed``.
        """

    def closed(key):
        """The session ``opened`` returned ``key`` for has ended; idempotent."""

    def snapshot():
        """The open sessions now: a list of ``OpenSession``."""
