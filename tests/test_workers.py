"""Tests for popserv.workers: blocking calls in fixed sets of threads, results in the reactor."""

from __future__ import annotations

import os
import threading
import time

from twisted.application.service import MultiService
from twisted.internet import defer, reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from popserv import service
from popserv.config import Config
from popserv.delivery import DELIVERY_THREADS
from popserv.maildir import MAILDROP_THREADS
from popserv.testing import run_at_once
from popserv.workers import Workers, WorkersService


class RecordingReactor:
    """Just what Workers uses of a reactor: calls from threads and triggers are recorded."""

    def __init__(self):
        self.calls = []
        self.triggers = []

    def callFromThread(self, f, *args):
        self.calls.append((f, args))

    def addSystemEventTrigger(self, phase, event, f):
        handle = (phase, event, f)
        self.triggers.append(handle)
        return handle

    def removeSystemEventTrigger(self, handle):
        self.triggers.remove(handle)

    def fire_shutdown(self):
        """Run and drop the shutdown triggers, as a reactor's shutdown does."""
        while self.triggers:
            _, _, f = self.triggers.pop(0)
            f()

    def deliver(self):
        """Run the calls threads made, as the reactor thread would."""
        calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)


def alive(workers: Workers) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(workers.name + "-")]


class RunnerContractMixin:
    """What every runner does, the real ``Workers.run`` and the ``run_at_once`` fake alike."""

    def runner(self):
        raise NotImplementedError

    async def test_result(self):
        """The Deferred fires with what the call returned, given its arguments."""
        self.assertEqual(await self.runner()(lambda a, b: (a, b), 2, "x"), (2, "x"))

    async def test_failure(self):
        """An exception the call raises comes back as a failed Deferred."""
        with self.assertRaises(ZeroDivisionError):
            await self.runner()(lambda: 1 // 0)


class WorkersContractTests(RunnerContractMixin, unittest.TestCase):
    def runner(self):
        workers = Workers(reactor, 2, "popserv-contract")
        self.addCleanup(workers.stop)
        return workers.run


class RunAtOnceContractTests(RunnerContractMixin, unittest.TestCase):
    def runner(self):
        return run_at_once


class WorkersTests(unittest.TestCase):
    def make(self, reactor, size=2, name="popserv-test") -> Workers:
        workers = Workers(reactor, size, name)
        self.addCleanup(workers.stop)
        return workers

    async def test_off_the_reactor_thread(self):
        """A job runs in one of the threads; its result is handled in the reactor thread."""
        workers = self.make(reactor)
        ran_in = await workers.run(threading.current_thread)
        self.assertIsNot(ran_in, threading.current_thread())
        self.assertIn(ran_in, alive(workers))
        handled_in = await workers.run(lambda: None).addCallback(
            lambda _: threading.current_thread()
        )
        self.assertIs(handled_in, threading.current_thread())

    def test_result_comes_through_the_reactor(self):
        """Results reach their Deferreds only through the reactor's callFromThread."""
        fake = RecordingReactor()
        workers = self.make(fake)
        d = workers.run(lambda: "done")
        workers.stop()
        self.assertNoResult(d)
        fake.deliver()
        self.assertEqual(self.successResultOf(d), "done")

    def test_failure_comes_through_the_reactor(self):
        """An exception reaches its Deferred as a failure, through callFromThread too."""
        fake = RecordingReactor()
        workers = self.make(fake)
        d = workers.run(lambda: 1 // 0)
        workers.stop()
        self.assertNoResult(d)
        fake.deliver()
        self.failureResultOf(d, ZeroDivisionError)

    def test_stop_finishes_queued_jobs(self):
        """stop() runs every job queued before it, then ends (joins) the threads."""
        fake = RecordingReactor()
        workers = self.make(fake)
        workers.start()
        ran = []
        results = [workers.run(lambda: time.sleep(0.05))]
        results += [workers.run(lambda n=n: ran.append(n) or n) for n in range(20)]
        workers.stop()
        self.assertEqual(sorted(ran), list(range(20)))
        self.assertEqual(alive(workers), [])
        self.assertFalse(workers.running)
        fake.deliver()
        self.assertEqual([self.successResultOf(d) for d in results], [None, *range(20)])

    def test_start_and_stop(self):
        """start() starts size named threads, once; stop() ends them, and may be called twice."""
        workers = self.make(RecordingReactor(), size=3, name="popserv-sized")
        self.assertEqual((workers.running, alive(workers)), (False, []))
        workers.start()
        workers.start()
        self.assertTrue(workers.running)
        names = sorted(t.name for t in alive(workers))
        self.assertEqual(names, ["popserv-sized-0", "popserv-sized-1", "popserv-sized-2"])
        workers.stop()
        workers.stop()
        self.assertEqual((workers.running, alive(workers)), (False, []))

    def test_started_again(self):
        """Stopped workers start again, and run jobs as before."""
        fake = RecordingReactor()
        workers = self.make(fake)
        workers.start()
        workers.stop()
        workers.start()
        d = workers.run(lambda: 7)
        workers.stop()
        fake.deliver()
        self.assertEqual(self.successResultOf(d), 7)

    def test_lazy_start_stops_at_shutdown(self):
        """Without start(), the first run starts the threads and reactor shutdown ends them."""
        fake = RecordingReactor()
        workers = self.make(fake)
        d = workers.run(lambda: "first")
        workers.run(lambda: "second")
        self.assertTrue(workers.running)
        self.assertEqual(len(fake.triggers), 1)
        self.assertEqual(fake.triggers[0][:2], ("during", "shutdown"))
        fake.fire_shutdown()
        self.assertEqual((workers.running, alive(workers)), (False, []))
        workers.stop()
        fake.deliver()
        self.assertEqual(self.successResultOf(d), "first")

    def test_stop_removes_the_shutdown_trigger(self):
        """A lazily started set stopped by hand leaves no trigger; started again, one."""
        fake = RecordingReactor()
        workers = self.make(fake)
        workers.run(lambda: None)
        workers.stop()
        self.assertEqual(fake.triggers, [])
        workers.run(lambda: None)
        self.assertEqual(len(fake.triggers), 1)

    def test_started_by_hand_adds_no_trigger(self):
        """Workers started with start() (by a service) are the service's to stop."""
        fake = RecordingReactor()
        workers = self.make(fake)
        workers.start()
        workers.run(lambda: None)
        self.assertEqual(fake.triggers, [])

    def test_needs_a_thread(self):
        """A set of no threads is refused."""
        self.assertRaises(ValueError, Workers, RecordingReactor(), 0)


class WorkersServiceTests(unittest.TestCase):
    def test_starts_and_stops_with_its_parent(self):
        """The service starts the threads with its parent and stops them, joined, with it."""
        fake = RecordingReactor()
        workers = Workers(fake, 2, "popserv-service")
        self.addCleanup(workers.stop)
        top = MultiService()
        WorkersService(workers).setServiceParent(top)
        top.startService()
        self.assertEqual(len(alive(workers)), 2)
        d = workers.run(lambda: "queued")
        self.successResultOf(defer.maybeDeferred(top.stopService))
        self.assertEqual((workers.running, alive(workers)), (False, []))
        self.assertEqual(fake.triggers, [])
        fake.deliver()
        self.assertEqual(self.successResultOf(d), "queued")


class MakeServiceTests(unittest.TestCase):
    """make_service makes three sets of workers, hands each part its own, and runs them."""

    def test_each_part_gets_its_workers(self):
        """Verification and SCRAM, maildrops, deliveries: each set its part's, started and
        stopped with the server."""
        root = os.path.abspath(self.mktemp())
        config = Config(
            hostname="mx.example.org",
            mailroot=os.path.join(root, "mail"),
            users=os.path.join(root, "users"),
            state_dir=os.path.join(root, "state"),
            tls_self_signed_dir=os.path.join(root, "tls"),
            pop3_listen=("tcp:0:interface=127.0.0.1",),
            pop3s_listen=(),
            smtp_listen=("tcp:0:interface=127.0.0.1",),
            auth_max_verifications=3,
        )
        top = service.make_service(config, reactor=MemoryReactorClock())
        names = ("verify-threads", "maildrop-threads", "delivery-threads")
        verify, maildrops, deliveries = (top.getServiceNamed(n).workers for n in names)
        self.assertEqual(
            (verify.size, maildrops.size, deliveries.size), (3, MAILDROP_THREADS, DELIVERY_THREADS)
        )
        pop3 = top.getServiceNamed("pop3-0").factory
        smtp = top.getServiceNamed("smtp-0").factory
        self.assertEqual((pop3.userdb._run, pop3.run_in_thread), (verify.run, verify.run))
        self.assertEqual(pop3.portal.realm.store._run, maildrops.run)
        self.assertEqual(smtp.deliverer.run, deliveries.run)
        top.privilegedStartService()
        top.startService()
        self.addCleanup(lambda: top.running and top.stopService())
        self.assertEqual([w.running for w in (verify, maildrops, deliveries)], [True] * 3)
        top.stopService()
        self.assertEqual([w.running for w in (verify, maildrops, deliveries)], [False] * 3)
        self.assertEqual([alive(w) for w in (verify, maildrops, deliveries)], [[]] * 3)
