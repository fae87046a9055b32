"""A short memory of passwords that passed a slow hash, so a client's next poll skips the hash.

POP3 clients log in every few minutes with the same password, and one Argon2id
verification costs 64 MiB and a tenth of a second.  After a slow scheme accepts a
password, this remembers an HMAC-SHA-256 of it (under a random key made at start and
kept only in memory), bound to the user and to the stored hash it matched; the same
password against the same stored hash is then accepted with one HMAC, in the reactor
thread.  Anything else (another password, another stored hash, an entry past its
time) goes the slow way again.  Failures are never remembered: each guess still costs
a full verification.

One process keeps its digests in memory (``MemoryDigests``).  The workers of one host
share them (``popserv.sharedstate.SharedDigests``, in their SQLite file) under one key
their supervisor made and handed each of them, so a user verified on one worker is a
hit on every other.  Only the key is secret: it never leaves the processes' memory.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections import OrderedDict
from collections.abc import Callable

from twisted.internet import defer
from zope.interface import implementer

from popserv.interfaces import NO_METRICS, IVerifiedDigests


@implementer(IVerifiedDigests)
class MemoryDigests:
    """The digests of one process, in a dict kept in least recently used order."""

    def __init__(self):
        #: user -> (digest, the time it expires), least recently used first.
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def matches(self, user: str, digest: bytes, now: float) -> bool:
        entry = self._entries.get(user)
        if entry is None:
            return False
        remembered, expires = entry
        if expires <= now:
            del self._entries[user]
            return False
        if not hmac.compare_digest(remembered, digest):
            return False
        self._entries.move_to_end(user)  # only a hit counts as a use
        return True

    def remember(self, user: str, digest: bytes, expires: float, size: int) -> None:
        self._entries[user] = (digest, expires)
        self._entries.move_to_end(user)
        while len(self._entries) > size:
            self._entries.popitem(last=False)

    def forget(self, user: str) -> None:
        self._entries.pop(user, None)


class VerifiedPasswords:
    """At most ``size`` users' last verified password digests, each for ``ttl`` seconds.

    An entry's time counts from the slow verification that made it; using it does not
    extend it, so each user's password meets its real hash at least once per ``ttl``.
    When the cache is full, the store drops an entry: in memory the least recently
    used, in the workers' shared store the soonest to expire.  ``ttl`` 0 turns the
    cache off: every check is the slow one.
    """

    def __init__(
        self,
        clock,
        ttl: float = 3600.0,
        size: int = 10000,
        metrics=NO_METRICS,
        key: bytes | None = None,
        store: IVerifiedDigests | None = None,
    ):
        """``clock`` (an ``IReactorTime``) dates the entries; ``metrics`` counts hits and
        misses; ``key`` (random by default) keys the digests in ``store`` (this process's
        memory by default): caches with the same key and store share their entries."""
        self.clock = clock
        self.ttl = ttl
        self.size = size
        self.metrics = metrics
        self._key = os.urandom(32) if key is None else key
        self._store = MemoryDigests() if store is None else store

    def __len__(self) -> int:
        return len(self._store)

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
        if self._store.matches(user, digest, self.clock.seconds()):
            self.metrics.auth_cache(True)
            return defer.succeed(True)
        self.metrics.auth_cache(False)
        return verify().addCallback(self._verified, user, digest)

    def forget(self, user: str) -> None:
        """Drop ``user``'s entry, if any: the stored password changed or the user is gone."""
        self._store.forget(user)

    def _verified(self, ok: bool, user: str, digest: bytes) -> bool:
        if ok:
            self._store.remember(user, digest, self.clock.seconds() + self.ttl, self.size)
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
