"""Fair, bounded scheduling of password verifications: a few at once, taken in turn per client.

One Argon2id verification holds 64 MiB and a core for a tenth of a second, so at most
``limit`` run at once.  The rest wait in one queue per client address, and each free
slot goes to the next address in turn: a flood from some addresses delays everyone
else by one turn, not by the whole flood.  A verification whose client leaves while it
waits is dropped, never run.  It is about this process's CPU and memory, so it is
never shared between processes.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

#: Verifications one address may have waiting by default; more are refused at once.
MAX_QUEUED_PER_PEER = 50


class QueueFull(Exception):
    """The address already has as many verifications waiting as it may."""


class _Job:
    __slots__ = ("peer", "result", "run", "started")

    def __init__(self, peer: str, run: Callable[[], Any]):
        self.peer = peer
        self.run = run
        self.started = False
        self.result: defer.Deferred | None = None


class VerificationScheduler:
    """Runs at most ``limit`` jobs at once, round-robin between the addresses that wait."""

    def __init__(self, limit: int = 4, queued_per_peer: int = MAX_QUEUED_PER_PEER):
        self.limit = limit
        self.queued_per_peer = queued_per_peer
        #: Jobs running now.
        self.running = 0
        #: address -> its waiting jobs; the next address to serve comes first.
        self._queues: OrderedDict[str, deque[_Job]] = OrderedDict()
        self._dispatching = False

    @property
    def waiting(self) -> int:
        """Jobs queued, not yet started."""
        return sum(map(len, self._queues.values()))

    def submit(self, peer: str, run: Callable[[], Any]) -> defer.Deferred:
        """Call ``run`` (which may return a Deferred) once a slot is free and it is ``peer``'s turn.

        The Deferred fires with what ``run`` gives, or fails with ``QueueFull`` at once.
        Cancelling it drops a job still waiting; a job already running goes on to its end
        and keeps its slot until then, but its result is no longer delivered.
        """
        queue = self._queues.get(peer)
        if queue is not None and len(queue) >= self.queued_per_peer:
            return defer.fail(QueueFull(peer))
        job = _Job(peer, run)
        job.result = defer.Deferred(lambda _: self._cancel(job))
        if queue is None:
            queue = self._queues[peer] = deque()
        queue.append(job)
        self._dispatch()
        return job.result

    def _cancel(self, job: _Job) -> None:
        if job.started:
            return
        queue = self._queues.get(job.peer)
        if queue is not None and job in queue:
            queue.remove(job)
            if not queue:
                del self._queues[job.peer]

    def _dispatch(self) -> None:
        if self._dispatching:
            return  # a job that finished at once, inside the loop below
        self._dispatching = True
        try:
            while self.running < self.limit and self._queues:
                peer, queue = next(iter(self._queues.items()))
                job = queue.popleft()
                if queue:
                    self._queues.move_to_end(peer)
                else:
                    del self._queues[peer]
                self._start(job)
        finally:
            self._dispatching = False

    def _start(self, job: _Job) -> None:
        job.started = True
        self.running += 1
        defer.maybeDeferred(job.run).addBoth(self._finished, job)

    def _finished(self, result, job: _Job) -> None:
        self.running -= 1
        # The next address's turn comes before this one's follow-up, if any.
        self._dispatch()
        if not job.result.called:
            if isinstance(result, Failure):
                job.result.errback(result)
            else:
                job.result.callback(result)
