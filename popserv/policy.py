"""Each user's mailbox policy: read marks, EXPIRE and quota, from the config and the userdb.

The config gives everyone's defaults (``[pop3] mark_seen``, ``[pop3] expire``,
``[quota] storage`` and ``messages``); a user's extra fields in the users file override
them as Dovecot's would: ``userdb_quota_rule=*:storage=100M`` (also ``quota_rule2``...,
applied in order) and popserv's ``userdb_pop3_expire=30`` (or ``NEVER``).
"""

from __future__ import annotations

import re

from twisted.logger import Logger

from popserv.interfaces import NEVER, IUserDB, MailboxPolicy, QuotaLimits, UserDBUnavailable
from popserv.logsafe import untrusted
from popserv.quota import parse_rule

log = Logger()

EXPIRE_FIELD = "pop3_expire"
_RULE_FIELD = re.compile(r"quota_rule\d*")


def parse_expire(text: str) -> int | None:
    """``NEVER`` (None) or a whole number of days, 0 included (RFC 2449 EXPIRE)."""
    text = text.strip()
    if text.upper() == "NEVER":
        return NEVER
    if not text.isdigit() or len(text) > 5:
        raise ValueError(f"not an EXPIRE value: {text!r} (NEVER or a number of days)")
    return int(text)


def format_expire(days: int | None) -> str:
    return "NEVER" if days is NEVER else str(days)


def _expire_order(days: int | None) -> float:
    return float("inf") if days is NEVER else days


def _rule_order(name: str) -> int:
    return int(name[len("quota_rule") :] or 1)


class MailboxPolicies:
    """The ``MailboxPolicy`` of each user, and what CAPA says of EXPIRE before login."""

    def __init__(self, userdb: IUserDB | None, config):
        self.userdb = userdb
        self.mark_seen = config.pop3_mark_seen
        self.expire_days = config.pop3_expire
        self.quota = QuotaLimits(config.quota_storage, config.quota_messages)
        self._warned: set[tuple[str, str]] = set()

    def for_user(self, user: str) -> MailboxPolicy:
        """The defaults, with the user's own fields over them; a bad field is logged and ignored."""
        fields = self._fields(user)
        expire, quota = self.expire_days, self.quota
        if EXPIRE_FIELD in fields:
            try:
                expire = parse_expire(fields[EXPIRE_FIELD])
            except ValueError as e:
                self._warn(user, EXPIRE_FIELD, e)
        rules = sorted((k for k in fields if _RULE_FIELD.fullmatch(k)), key=_rule_order)
        for name in rules:
            try:
                quota = parse_rule(fields[name], quota)
            except ValueError as e:
                self._warn(user, name, e)
        return MailboxPolicy(self.mark_seen, expire, quota)

    def _fields(self, user: str) -> dict[str, str]:
        if self.userdb is None:
            return {}
        try:
            return self.userdb.fields(user)
        except UserDBUnavailable:
            return {}

    def _warn(self, user: str, field: str, error: Exception) -> None:
        if (user, field) not in self._warned:
            self._warned.add((user, field))
            log.warn(  # noqa: G010 (twisted.logger has no warning())
                "ignoring {field} of user {user}: {error}",
                field=field,
                user=untrusted(user),
                error=str(error),
            )

    def capability(self) -> bytes:
        """``EXPIRE`` as CAPA lists it before login (RFC 2449 section 6.7).

        When some user's value differs from the default, the shortest of all is shown,
        tagged ``USER``: after login CAPA gives the user's own.
        """
        values = {self.expire_days}
        if self.userdb is not None:
            try:
                texts = self.userdb.field_values(EXPIRE_FIELD)
            except UserDBUnavailable:
                texts = ()
            for text in texts:
                try:
                    values.add(parse_expire(text))
                except ValueError:
                    continue
        shortest = min(values, key=_expire_order)
        text = b"EXPIRE " + format_expire(shortest).encode("ascii")
        return text + b" USER" if len(values) > 1 else text
