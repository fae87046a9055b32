"""Local delivery policy: which addresses are ours, the users they map to, the trace headers.

popserv never relays: a recipient at a domain that is not local is refused.  Recipients
map to users of the ``IUserDB``: ``alice@<local domain>`` is the user ``alice@<domain>``
when the users file has that entry, else the user ``alice`` (each tried as given, then in
lower case).  A quoted local part that needs no quotes is the same address (``"bob"`` is
``bob``), a domain with an empty label is refused, and postmaster is always accepted.
A recipient whose mailbox is full, or would be with the SIZE the client declared, is
refused here (552 5.2.2, or 452 4.2.2 with ``[quota] full_tempfail``).
"""

from __future__ import annotations

import functools
import re
from email.utils import formatdate

from twisted.mail import smtp
from zope.interface import implementer

from popserv.config import Config
from popserv.interfaces import Envelope, IRecipientPolicy, IUserDB, Session, UserDBUnavailable
from popserv.smtpreplies import (
    BAD_RECIPIENT,
    RELAY_DENIED,
    SHARED_STATE_DOWN,
    UNKNOWN_USER,
    USERDB_DOWN,
    error_args,
    mailbox_full,
)

_UNSAFE_IN_HEADER = re.compile(rb"[^!-'*-[\]-~]")  # printable, minus "(", ")", "\"
# RFC 5321 section 4.1.2: a Dot-string local part, and a quoted-pair inside a Quoted-string.
_DOT_STRING = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_QUOTED_PAIR = re.compile(r"\\([ -~])")


def local_domains(config: Config) -> tuple[str, ...]:
    """The configured local domains, or the host name and ``localhost``."""
    if config.smtp_domains:
        return config.smtp_domains
    return tuple(dict.fromkeys((config.hostname.lower().rstrip("."), "localhost")))


def _unquoted(local: str) -> str:
    """A quoted local part that needs no quotes, without them: ``"bob"`` is ``bob``.

    RFC 5321 section 4.1.2 makes the two the same address.  A part that needs its quotes
    (a space, an ``@``, a leading dot) stays as it is, and so matches no user.
    """
    if len(local) >= 2 and local[0] == local[-1] == '"':
        inner = _QUOTED_PAIR.sub(r"\1", local[1:-1])
        if _DOT_STRING.fullmatch(inner):
            return inner
    return local


def _domain_name(domain: str) -> str | None:
    """The domain in lower case without one final dot; None when a label is empty."""
    domain = domain.lower()
    if domain.endswith("."):
        domain = domain[:-1]
    if "" in domain.split("."):
        return None
    return domain


def _header_safe(text: bytes, limit: int = 255) -> bytes:
    """Client-supplied text made safe for a trace header: printable ASCII, no comments."""
    return _UNSAFE_IN_HEADER.sub(b"?", text[:limit])


@functools.lru_cache(maxsize=4)
def _date(seconds: int) -> bytes:
    """An RFC 5322 date in local time; the same for every message of that second."""
    return formatdate(seconds, localtime=True).encode("ascii")


def address_literal(host: str) -> bytes:
    """The peer's address as an SMTP address literal: ``[192.0.2.7]``, ``[IPv6:...]``."""
    if ":" in host:
        return b"[IPv6:" + host.encode("ascii", "replace") + b"]"
    return b"[" + host.encode("ascii", "replace") + b"]"


def _with_protocol(session: Session) -> bytes:
    """The ``with`` keyword of the Received header (RFC 3848)."""
    if not session.esmtp:
        return b"SMTP"
    return b"ESMTPS" if session.tls else b"ESMTP"


@implementer(IRecipientPolicy)
class LocalRecipients:
    """Mail for the users of the ``IUserDB`` at the local domains, from anyone."""

    def __init__(
        self,
        userdb: IUserDB,
        domains: tuple[str, ...],
        hostname: str,
        clock,
        postmaster: str = "postmaster",
        *,
        quota=None,
        full_tempfail: bool = False,
        available=None,
    ):
        """``quota``: an ``IQuota``, or None to leave quotas to the delivery.

        ``available``: a callable, false while the database the nodes share is down:
        recipients then get 451 4.3.0 (None: no such database).
        """
        self.userdb = userdb
        self.available = available
        self.quota = quota
        self.full_tempfail = full_tempfail
        self.domains = frozenset(d.lower() for d in domains)
        self.hostname = hostname.encode("ascii", "replace")
        self.clock = clock
        self.postmaster = postmaster

    def check_sender(self, session: Session, envelope: Envelope) -> None:
        """Any sender is accepted, the null sender too."""

    def check_recipient(self, session: Session, envelope: Envelope, address: smtp.Address):
        """Local domain and known user, else ``SMTPBadRcpt``: 550 5.7.1 or 550 5.1.1.

        Then, with a quota, room for the message: a Deferred firing with the user.
        While the shared database is unavailable: 451 4.3.0, try again later.
        """
        if self.available is not None and not self.available():
            raise smtp.SMTPServerError(*error_args(SHARED_STATE_DOWN))
        user = self.resolve(address)
        if self.quota is None:
            return user
        d = self.quota.admits(user, envelope.declared_size or 0)
        return d.addCallback(self._room, user, address)

    def _room(self, admitted: bool, user: str, address: smtp.Address) -> str:
        if not admitted:
            raise smtp.SMTPServerError(*error_args(mailbox_full(self.full_tempfail)))
        return user

    def resolve(self, address: smtp.Address) -> str:
        """The user an address delivers to; raises ``SMTPServerError`` with the reply."""
        try:
            domain = _domain_name(address.domain.decode("ascii"))
            local = _unquoted(address.local.decode("ascii"))
        except UnicodeDecodeError:
            domain = None
        if domain is None:
            raise smtp.SMTPBadRcpt(address, *error_args(BAD_RECIPIENT))
        if local.lower() == "postmaster" and (domain in self.domains or domain == "localhost"):
            # RFC 5321 section 4.5.1: postmaster is always accepted, at localhost too.
            return self.postmaster
        if domain not in self.domains:
            raise smtp.SMTPBadRcpt(address, *error_args(RELAY_DENIED))
        candidates = dict.fromkeys(
            [f"{local}@{domain}", local, f"{local.lower()}@{domain}", local.lower()]
        )
        try:
            for candidate in candidates:
                if local and self.userdb.exists(candidate):
                    return candidate
        except UserDBUnavailable:
            raise smtp.SMTPServerError(*error_args(USERDB_DOWN)) from None
        raise smtp.SMTPBadRcpt(address, *error_args(UNKNOWN_USER))

    def trace_headers(self, session: Session, envelope: Envelope) -> bytes:
        """``Return-Path`` and ``Received`` (RFC 5321 section 4.4), as LF-ended lines.

        ``for <address>`` appears only with one recipient, so Bcc recipients stay hidden
        from each other while one file serves them all.
        """
        helo_name = _header_safe(session.helo or b"") or b"unknown"
        lines = [
            b"Return-Path: <" + _header_safe(bytes(envelope.sender), 512) + b">",
            b"Received: from " + helo_name + b" (" + address_literal(session.peer) + b")",
            b"\tby "
            + self.hostname
            + b" (popserv) with "
            + _with_protocol(session)
            + b" id "
            + envelope.id.encode("ascii"),
        ]
        date = _date(int(self.clock.seconds()))
        if len(envelope.recipients) == 1:
            rcpt = _header_safe(envelope.recipients[0], 512)
            lines.append(b"\tfor <" + rcpt + b">; " + date)
        else:
            lines[-1] += b";"
            lines.append(b"\t" + date)
        lines.append(b"")
        return b"\n".join(lines)
