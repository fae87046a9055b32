"""A short memory of passwords that passed a slow hash, so a client's next poll skips the hash.

POP3 clients log in every few minutes with the same password, and one Argon2id
verification costs 64 MiB and a tenth of a second.  After a slow scheme accepts a
password, this remembers an HMAC-SHA-256 of it (under a random key made at start and
kept only in memory), bound to the user and to the stored hash it matched; the same
password against the same stored hash is then accepted with one HMAC, in the reactor
thread.  Anything else (another password, another stored hash, an entry past its
time) goes the slow way again.  Failures are never remembered: each guess still costs
a full verification.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections import OrderedDict
from collections.abc import Callable

from twisted.internet import defer

from popserv.interfaces import NO_METRICS


class VerifiedPasswords:
    """At most ``size`` users' last verified password digests, each for ``ttl`` seconds.

    An entry's time counts from the slow verification that made it; using it does not
    extend it, so each user's password meets its real hash at least once per ``ttl``.
    The least recently used entry goes first when the cache is full.  ``ttl`` 0 turns
    the cache off: every check is the slow one.
    """

    def __init__(
        self,
        clock,
        ttl: float = 3600.0,
        size: int = 10000,
        metrics=NO_METRICS,
        key: bytes | None = None,
    ):
        """``clock`` (an ``IReactorTime``) dates the entries; ``metrics`` counts hits and misses."""
        self.clock = clock
        self.ttl = ttl
        self.size = size
        self.metrics = metrics
        self._key = os.urandom(32) if key is None else key
        #: user -> (digest, the time it expires), least recently used first.
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def check(
        self, user: str, stored: str, password: bytes, verify: Callable[[], defer.Deferred[bool]]
    ) -> defer.Deferred[bool]:
        """True at once if ``password`` passed against ``stored`` lately; else ``verify()``.

        ``stored`` is the user's whole password field (``{ARGON2ID}$argon2id$...``), so a
        new password, a new hash of the same one or a changed scheme never matches an
        old entry.  A True from ``verify()`` is remembered; a False or a failure is not.
        """
        if self.ttl <= 0:
            return verify()
        digest = self._digest(user, stored, password)
        entry = self._entries.get(user)
        if entry is not None:
            remembered, expires = entry
            if expires <= self.clock.seconds():
                del self._entries[user]
            elif hmac.compare_digest(remembered, digest):
                self._entries.move_to_end(user)
                self.metrics.auth_cache(True)
                return defer.succeed(True)
        self.metrics.auth_cache(False)
        return verify().addCallback(self._verified, user, digest)

    def forget(self, user: str) -> None:
        """Drop ``user``'s entry, if any: the stored password changed or the user is gone."""
        self._entries.pop(user, None)

    def _verified(self, ok: bool, user: str, digest: bytes) -> bool:
        if ok:
            self._entries[user] = (digest, self.clock.seconds() + self.ttl)
            self._entries.move_to_end(user)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return ok

    def _digest(self, user: str, stored: str, password: bytes) -> bytes:
        """HMAC-SHA-256 of the three, each length-prefixed so no two triples share an input."""
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (
            user.encode("utf-8", "surrogateescape"),
            stored.encode("utf-8", "surrogateescape"),
            password,
        ):
            mac.update(struct.pack(">I", len(part)))
            mac.update(part)
        return mac.digest()
