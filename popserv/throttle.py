"""Failed-login accounting in one process's memory: delays, lockout and LOGIN-DELAY.

Failures are counted per client address and, within it, per user name, so a login
forgives only that user's failures; the address as a whole is locked out once the
failures and the attempts still being verified reach the limit.  Memory stays bounded:
at most ``MAX_TRACKED_PEERS`` addresses, each forgotten after ``FAILURE_MEMORY`` quiet
seconds, and at most ``MAX_USERS_PER_PEER`` user names per address.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from zope.interface import implementer

from popserv.interfaces import BUSY, ILoginThrottle

#: Addresses whose failed logins are remembered, at most (oldest forgotten first).
MAX_TRACKED_PEERS = 10000
#: Seconds without a failed login after which an address starts afresh.
FAILURE_MEMORY = 600
#: User names counted apart per address; failures for further names share one count,
#: which no login forgives.
MAX_USERS_PER_PEER = 16


@dataclass(frozen=True)
class ThrottleSettings:
    """What the throttle needs of the configuration (``[pop3]``'s keys of the same names)."""

    failure_delay: float = 1.0
    failure_delay_max: float = 15.0
    max_failures: int = 10
    login_delay: int = 0


class _Peer:
    """One address: its failures by user name, their sum, attempts in flight, the last failure."""

    __slots__ = ("failures", "in_flight", "last", "total")

    def __init__(self):
        self.failures: dict[str | None, int] = {}
        self.total = 0
        self.in_flight = 0
        self.last = 0.0


@implementer(ILoginThrottle)
class MemoryLoginThrottle:
    """``ILoginThrottle`` for one process; every call answers at once.

    ``clock`` gives ``seconds()`` (the reactor, or a ``task.Clock`` in tests);
    ``settings`` may be replaced while it runs.
    """

    def __init__(
        self,
        clock,
        settings: ThrottleSettings | None = None,
        max_peers: int = MAX_TRACKED_PEERS,
        memory: float = FAILURE_MEMORY,
    ):
        self.clock = clock
        self.settings = settings if settings is not None else ThrottleSettings()
        self.max_peers = max_peers
        self.memory = memory
        #: address -> its record, least recently used first.
        self._peers: OrderedDict[str, _Peer] = OrderedDict()
        #: user -> time of their last login, oldest first (only with a LOGIN-DELAY).
        self._logins: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        """How many addresses are remembered."""
        return len(self._peers)

    def _peer(self, peer: str) -> _Peer:
        """The record of ``peer``, made the most recent; failures forgotten after a quiet spell."""
        record = self._peers.pop(peer, None)
        if record is None:
            record = _Peer()
        elif record.total and self.clock.seconds() - record.last > self.memory:
            record.failures.clear()
            record.total = 0
        self._peers[peer] = record
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)
        return record

    def _drop_if_empty(self, peer: str, record: _Peer) -> None:
        if not record.total and not record.in_flight and self._peers.get(peer) is record:
            del self._peers[peer]

    def begin(self, peer: str, user: str | None) -> bool:
        record = self._peer(peer)
        others = record.total + record.in_flight
        record.in_flight += 1
        return admission(record.total, others, self.settings.max_failures)

    def succeeded(self, peer: str, user: str | None) -> None:
        record = self._peers.get(peer)
        if record is None:
            return
        record.in_flight = max(record.in_flight - 1, 0)
        record.total -= record.failures.pop(user, 0)
        self._drop_if_empty(peer, record)

    def failed(self, peer: str, user: str | None) -> float:
        record = self._peer(peer)
        record.in_flight = max(record.in_flight - 1, 0)
        if user not in record.failures and len(record.failures) >= MAX_USERS_PER_PEER:
            user = None
        record.failures[user] = record.failures.get(user, 0) + 1
        record.total += 1
        record.last = self.clock.seconds()
        base = self.settings.failure_delay
        cap = max(self.settings.failure_delay_max, base)
        return min(base * 2 ** min(record.total - 1, 32), cap)

    def abandoned(self, peer: str, user: str | None) -> None:
        record = self._peers.get(peer)
        if record is None:
            return
        record.in_flight = max(record.in_flight - 1, 0)
        self._drop_if_empty(peer, record)

    def login_allowed(self, user: str) -> bool:
        delay = self.settings.login_delay
        if not delay:
            return True
        now = self.clock.seconds()
        logins = self._logins
        while logins:
            oldest, when = next(iter(logins.items()))
            if now - when < delay:
                break
            del logins[oldest]
        if user in logins:
            return False
        logins[user] = now
        return True


def admission(failures: int, others: int, limit: int):
    """``ILoginThrottle.begin``'s answer: True, False (failed too often) or ``BUSY``."""
    if others < limit:
        return True
    return False if failures >= limit else BUSY
