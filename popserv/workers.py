"""Blocking work off the reactor thread, in fixed sets of threads started and stopped with services.

popserv has one way to leave the reactor thread: ``Workers.run(f, *args)``, which returns a
Deferred that fires in the reactor thread.  Each kind of work has its own set, so one kind
never waits behind another: password verification and SCRAM key derivation (as many as
may verify at once), maildrop open and commit, delivery's fsync and rename.
``service.make_service`` makes the sets and hands each part only the ``run`` it needs.
"""

from __future__ import annotations

import queue
import threading

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


class Workers:
    """A fixed set of threads for blocking calls, each result handed to the reactor thread.

    ``start()`` and ``stop()`` bound the threads' lives, usually through a
    ``WorkersService``.  For library callers who start no service, ``run`` starts the
    threads when they are not running, and reactor shutdown stops them.  Call ``run``,
    ``start`` and ``stop`` from the reactor thread.

    A third of the CPU time per call of Twisted's ``ThreadPool``: idle threads wait on
    one queue, and a call costs a Deferred, a queue entry and one ``callFromThread``.
    """

    def __init__(self, reactor, size: int, name: str = "popserv-worker"):
        """``reactor`` gets the results (``callFromThread``); ``size`` threads run the calls."""
        if size < 1:
            raise ValueError(f"a set of workers needs at least one thread, not {size}")
        self.size = size
        self.name = name
        self._reactor = reactor
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._shutdown_trigger = None

    @property
    def running(self) -> bool:
        """Whether the threads are started."""
        return bool(self._threads)

    def start(self) -> None:
        """Start the threads; nothing while they run."""
        if self._threads:
            return
        jobs = self._jobs = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, args=(jobs,), name=f"{self.name}-{n}", daemon=True)
            for n in range(self.size)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Let the threads finish the queued jobs, then end them (joined); safe to call twice."""
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            thread.join()

    def run(self, f, *args) -> Deferred:
        """``f(*args)`` in one of the threads; the Deferred fires in the reactor thread."""
        if not self._threads:
            self.start()
            self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                "during", "shutdown", self._stop_at_shutdown
            )
        d = Deferred()
        self._jobs.put((f, args, d))
        return d

    def _stop_at_shutdown(self) -> None:
        self._shutdown_trigger = None  # firing, so no longer the reactor's to remove
        self.stop()

    def _work(self, jobs: queue.SimpleQueue) -> None:
        reactor = self._reactor
        while (job := jobs.get()) is not None:
            f, args, d = job
            try:
                result = f(*args)
            except BaseException:
                reactor.callFromThread(d.errback, Failure())
            else:
                reactor.callFromThread(d.callback, result)


class WorkersService(Service):
    """Starts a ``Workers`` with the service and stops it, queued jobs done, at the end."""

    def __init__(self, workers: Workers):
        self.workers = workers

    def startService(self) -> None:
        super().startService()
        self.workers.start()

    def stopService(self) -> None:
        self.workers.stop()
        return super().stopService()
