"""Tests for popserv.delivery: atomic delivery into Maildirs, names, and stale tmp/ cleanup."""

import errno
import os
import re
import shutil
import stat
import threading
import time
from unittest import mock

from twisted.internet import reactor
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from popserv import delivery
from popserv.interfaces import DeliveryFailed, IDeliverer, IDelivery
from popserv.maildir import MaildirStore, crlf_size, uidl_for, wire_size_from_name

MESSAGE = b"Subject: hi\n\nline one\n.dot line\n\xff\xfe binary\n"
NAME_RE = re.compile(r"^(\d+)\.M(\d{6})P(\d+)Q(\d+)\.([^,:/]+),S=(\d+),W=(\d+)$")


class DeliveryTestCase(unittest.TestCase):
    def setUp(self):
        self.mailroot = os.path.abspath(self.mktemp())
        os.makedirs(self.mailroot)
        self.store = MaildirStore(self.mailroot, reactor=reactor)
        self.deliverer = delivery.MaildirDeliverer(self.store, "mx.example.org", reactor=reactor)
        self.addCleanup(self.deliverer.stop)

    def listing(self, user, sub):
        return sorted(os.listdir(os.path.join(self.store.path_for(user), sub)))

    def read_new(self, user):
        names = self.listing(user, "new")
        self.assertEqual(len(names), 1, names)
        with open(os.path.join(self.store.path_for(user), "new", names[0]), "rb") as f:
            return names[0], f.read()

    def deliver(self, users, data=MESSAGE):
        d = self.deliverer.begin(users)
        d.write(data)
        return d.finish()


class DeliverTests(DeliveryTestCase):
    def test_interfaces(self):
        """The deliverer and its deliveries provide IDeliverer and IDelivery."""
        verifyObject(IDeliverer, self.deliverer)
        started = self.deliverer.begin(["alice"])
        self.addCleanup(started.abort)
        verifyObject(IDelivery, started)

    async def test_bytes_stored_as_written(self):
        """The stored file holds exactly the bytes written, 8-bit bytes included (binary mode)."""
        await self.deliver(["alice"])
        self.assertEqual(self.read_new("alice")[1], MESSAGE)

    async def test_name_carries_sizes(self):
        """The name is <secs>.M<usecs>P<pid>Q<n>.<host>,S=<size>,W=<crlf size>, as maildir reads."""
        before = int(time.time())
        returned = await self.deliver(["alice"])
        name, data = self.read_new("alice")
        self.assertEqual(returned, name)
        m = NAME_RE.match(name)
        self.assertIsNotNone(m, name)
        self.assertGreaterEqual(int(m.group(1)), before)
        self.assertEqual(int(m.group(3)), os.getpid())
        self.assertEqual(m.group(5), "mx.example.org")
        self.assertEqual(int(m.group(6)), len(MESSAGE))
        self.assertEqual(wire_size_from_name(name), crlf_size(MESSAGE))
        self.assertEqual(uidl_for(name), name.split(",")[0])

    async def test_crlf_size_across_writes(self):
        """A CRLF split across two writes counts once in W=."""
        started = self.deliverer.begin(["alice"])
        for chunk in (b"a\r", b"\nb\n", b"c\r\n"):
            started.write(chunk)
        name = await started.finish()
        self.assertEqual(wire_size_from_name(name), crlf_size(b"a\r\nb\nc\r\n"))

    async def test_host_escaped(self):
        """A '/' or ':' or ',' in the host name is escaped, so the name stays one Maildir name."""
        self.deliverer.hostname = "a/b:c,d"
        name = await self.deliver(["alice"])
        self.assertIn(".a\\057b\\072c\\054d,S=", name)

    async def test_names_unique(self):
        """Two deliveries in a row get different names."""
        first = await self.deliver(["alice"])
        second = await self.deliver(["alice"])
        self.assertNotEqual(uidl_for(first), uidl_for(second))

    async def test_several_recipients_one_inode(self):
        """Each recipient gets the message in new/, hard-linked from one file."""
        await self.deliver(["alice", "bob", "carol@example.org"])
        inodes = set()
        for user in ("alice", "bob", "carol@example.org"):
            name, data = self.read_new(user)
            self.assertEqual(data, MESSAGE)
            inodes.add(os.stat(os.path.join(self.store.path_for(user), "new", name)).st_ino)
        self.assertEqual(len(inodes), 1)

    async def test_duplicate_recipient_once(self):
        """A user named twice gets one copy."""
        await self.deliver(["alice", "alice"])
        self.assertEqual(len(self.listing("alice", "new")), 1)

    async def test_tmp_empty_after(self):
        """No temporary file is left once the message is delivered."""
        await self.deliver(["alice", "bob"])
        self.assertEqual(self.listing("alice", "tmp"), [])
        self.assertEqual(self.listing("bob", "tmp"), [])

    async def test_modes(self):
        """Delivered files are mode 0600 and created Maildirs 0700."""
        await self.deliver(["alice"])
        name, _ = self.read_new("alice")
        path = self.store.path_for("alice")
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(path, "new", name)).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o700)

    def record_calls(self):
        """Record fsync, rename and link calls (in order) while letting them happen."""
        calls = []
        for name in ("fsync", "rename", "link"):
            real = getattr(os, name)

            def spy(*args, name=name, real=real):
                calls.append(name)
                return real(*args)

            patcher = mock.patch.object(delivery.os, name, spy)
            patcher.start()
            self.addCleanup(patcher.stop)
        return calls

    async def test_fsync_before_rename(self):
        """One recipient: the file is fsynced, renamed into new/, then new/ is fsynced."""
        calls = self.record_calls()
        await self.deliver(["alice"])
        self.assertEqual(calls, ["fsync", "rename", "fsync"])
        self.assertEqual(self.listing("alice", "tmp"), [])

    async def test_fsync_before_link(self):
        """Several recipients: fsync, a link into each new/, then each new/ is fsynced."""
        calls = self.record_calls()
        await self.deliver(["alice", "bob"])
        self.assertEqual(calls, ["fsync", "link", "link", "fsync", "fsync"])

    async def test_rename_keeps_inode(self):
        """The one recipient's file in new/ is the temporary file itself, not a copy."""
        started = self.deliverer.begin(["alice"])
        started.write(MESSAGE)
        inode = os.stat(os.path.join(self.store.path_for("alice"), "tmp", started.id)).st_ino
        name = await started.finish()
        path = os.path.join(self.store.path_for("alice"), "new", name)
        self.assertEqual(os.stat(path).st_ino, inode)
        self.assertEqual(os.stat(path).st_nlink, 1)

    async def test_copy_across_devices(self):
        """Where a hard link fails with EXDEV, the message is copied, complete, into new/."""
        real_link = os.link

        def link(src, dst):
            if "/alice/tmp/" in src and "/bob/" in dst:
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return real_link(src, dst)

        with mock.patch.object(delivery.os, "link", link):
            await self.deliver(["alice", "bob"])
        self.assertEqual(self.read_new("bob")[1], MESSAGE)
        self.assertEqual(self.listing("bob", "tmp"), [])


class AtomicityTests(DeliveryTestCase):
    def test_nothing_visible_before_finish(self):
        """While a message is being written, it is in tmp/ only."""
        started = self.deliverer.begin(["alice"])
        started.write(MESSAGE)
        self.addCleanup(started.abort)
        self.assertEqual(self.listing("alice", "new"), [])
        self.assertEqual(self.listing("alice", "tmp"), [started.id])

    def test_abort_removes_temp(self):
        """abort() removes the temporary file, and a second abort is harmless."""
        started = self.deliverer.begin(["alice"])
        started.write(MESSAGE)
        started.abort()
        started.abort()
        self.assertEqual(self.listing("alice", "tmp"), [])
        self.assertEqual(self.listing("alice", "new"), [])

    def test_enospc_on_write(self):
        """ENOSPC while writing raises DeliveryFailed (disk_full) and leaves nothing behind."""
        started = self.deliverer.begin(["alice"])

        class FullDisk:
            def write(self, data):
                raise OSError(errno.ENOSPC, "No space left on device")

            def close(self):
                pass

        started._file = FullDisk()
        with self.assertRaises(DeliveryFailed) as cm:
            started.write(MESSAGE)
        self.assertTrue(cm.exception.disk_full)
        self.assertEqual(self.listing("alice", "tmp"), [])
        self.assertEqual(self.listing("alice", "new"), [])

    async def test_enospc_on_fsync(self):
        """ENOSPC at the final flush/fsync fails the delivery with nothing in new/ or tmp/."""
        started = self.deliverer.begin(["alice"])
        started.write(MESSAGE)

        def fsync(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        with mock.patch.object(delivery.os, "fsync", fsync):
            with self.assertRaises(DeliveryFailed) as cm:
                await started.finish()
        self.assertTrue(cm.exception.disk_full)
        self.assertEqual(self.listing("alice", "tmp"), [])
        self.assertEqual(self.listing("alice", "new"), [])

    async def test_failed_link_rolls_back(self):
        """When linking into the second recipient fails, the first one's copy is removed too."""
        real_link = os.link

        def link(src, dst):
            if "/bob/" in dst:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_link(src, dst)

        with mock.patch.object(delivery.os, "link", link):
            with self.assertRaises(DeliveryFailed):
                await self.deliver(["alice", "bob"])
        for user in ("alice", "bob"):
            self.assertEqual(self.listing(user, "new"), [])
            self.assertEqual(self.listing(user, "tmp"), [])

    async def test_arrives_at_next_login(self):
        """A delivery during a POP3 session is not in its snapshot, but is at the next login."""
        await self.deliver(["alice"])
        maildrop = await self.store.open_maildrop("alice")
        await self.deliver(["alice"])
        self.assertEqual(len(maildrop.messages()), 1)
        maildrop.close()
        maildrop = await self.store.open_maildrop("alice")
        self.addCleanup(maildrop.close)
        self.assertEqual(len(maildrop.messages()), 2)
        self.assertEqual(maildrop.messages()[1][1], crlf_size(MESSAGE))


class RenameTests(DeliveryTestCase):
    async def test_rename_across_devices(self):
        """Where renaming into new/ fails with EXDEV, the message is copied and tmp/ emptied."""

        def rename(src, dst):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        with mock.patch.object(delivery.os, "rename", rename):
            await self.deliver(["alice"])
        self.assertEqual(self.read_new("alice")[1], MESSAGE)
        self.assertEqual(self.listing("alice", "tmp"), [])

    async def test_enospc_on_rename(self):
        """ENOSPC on the rename fails the delivery (disk_full) with nothing in new/ or tmp/."""

        def rename(src, dst):
            raise OSError(errno.ENOSPC, "No space left on device")

        with mock.patch.object(delivery.os, "rename", rename):
            with self.assertRaises(DeliveryFailed) as cm:
                await self.deliver(["alice"])
        self.assertTrue(cm.exception.disk_full)
        self.assertEqual(self.listing("alice", "new"), [])
        self.assertEqual(self.listing("alice", "tmp"), [])

    async def test_directory_fsync_fails_after_rename(self):
        """When new/ cannot be fsynced, the renamed file is removed again: nothing is kept."""
        real_fsync = os.fsync
        calls = []

        def fsync(fd):
            calls.append(fd)
            if len(calls) == 2:
                raise OSError(errno.EIO, "Input/output error")
            return real_fsync(fd)

        with mock.patch.object(delivery.os, "fsync", fsync):
            with self.assertRaises(DeliveryFailed):
                await self.deliver(["alice"])
        self.assertEqual(self.listing("alice", "new"), [])
        self.assertEqual(self.listing("alice", "tmp"), [])


class RemovedMaildirTests(DeliveryTestCase):
    async def test_maildir_removed_between_deliveries(self):
        """A Maildir removed after a delivery is made again by the next one."""
        await self.deliver(["alice"])
        shutil.rmtree(self.store.path_for("alice"))
        await self.deliver(["alice"])
        self.assertEqual(self.read_new("alice")[1], MESSAGE)

    async def test_new_removed_during_delivery(self):
        """A new/ removed while a message is written is made again before the rename or link."""
        for users in (["alice"], ["alice", "bob"]):
            started = self.deliverer.begin(users)
            started.write(MESSAGE)
            for user in users:
                shutil.rmtree(os.path.join(self.store.path_for(user), "new"))
            await started.finish()
            for user in users:
                self.assertEqual(self.read_new(user)[1], MESSAGE)
                shutil.rmtree(os.path.join(self.store.path_for(user), "new"))
                os.mkdir(os.path.join(self.store.path_for(user), "new"))

    def test_maildir_made_once(self):
        """The Maildir is made on the first delivery only, not on every one."""
        calls = []
        real_create = self.store.create
        self.store.create = lambda user: calls.append(user) or real_create(user)
        for _ in range(3):
            self.deliverer.begin(["alice"]).abort()
        self.assertEqual(calls, ["alice"])


class RecordingReactor:
    """Just what Workers uses of a reactor: calls from threads are recorded, not run."""

    def __init__(self):
        self.calls = []
        self.triggers = []

    def callFromThread(self, f, *args):
        self.calls.append((f, args))

    def addSystemEventTrigger(self, phase, event, f):
        self.triggers.append((phase, event, f))


class WorkersTests(unittest.TestCase):
    async def test_result_and_failure(self):
        """A call's result, or its exception, reaches the Deferred in the reactor thread."""
        workers = delivery.Workers(reactor, 2)
        self.addCleanup(workers.stop)
        threads = []
        self.assertEqual(await workers.run(lambda a, b: a + b, 2, 3), 5)
        await workers.run(lambda: threads.append(threading.current_thread()))
        self.assertNotEqual(threads, [threading.current_thread()])
        with self.assertRaises(ZeroDivisionError):
            await workers.run(lambda: 1 // 0)

    def test_stop_finishes_queued_jobs(self):
        """Stopping (at reactor shutdown) runs what was queued, then ends the threads."""
        fake = RecordingReactor()
        workers = delivery.Workers(fake, 2)
        self.assertEqual(fake.triggers, [("during", "shutdown", workers.stop)])
        ran = []
        for n in range(20):
            workers.run(lambda n=n: ran.append(n) or n)
        workers.stop()
        self.assertEqual(sorted(ran), list(range(20)))
        self.assertEqual(len(fake.calls), 20)
        self.assertFalse(any(t.is_alive() for t in workers._threads))

    def test_deliverer_starts_workers_once(self):
        """A deliverer starts its threads at its first blocking call, and again after a stop."""
        fake = RecordingReactor()
        deliverer = delivery.MaildirDeliverer(None, "mx.example.org", reactor=fake)
        self.assertIsNone(deliverer._workers)
        deliverer.in_thread(lambda: None)
        deliverer.in_thread(lambda: None)
        self.assertEqual(len(fake.triggers), 1)
        deliverer.stop()
        deliverer.stop()
        self.assertEqual(len(fake.calls), 2)
        deliverer.in_thread(lambda: None)
        self.assertEqual(len(fake.triggers), 2)
        deliverer.stop()
        self.assertEqual(len(fake.calls), 3)


class StaleCleanupTests(DeliveryTestCase):
    def make_temp(self, user, name, age):
        path = os.path.join(self.store.create(user), "tmp", name)
        with open(path, "wb") as f:
            f.write(b"partial")
        then = time.time() - age
        os.utime(path, (then, then))
        return path

    def test_old_removed_young_kept(self):
        """tmp/ files older than 36 hours are removed, younger ones (live deliveries) kept."""
        old = self.make_temp("alice", "old", 37 * 3600)
        young = self.make_temp("alice", "young", 35 * 3600)
        old_domain = self.make_temp("bob@example.org", "old", 40 * 3600)
        self.assertEqual(delivery.remove_stale_temp_files(self.mailroot), 2)
        self.assertFalse(os.path.exists(old))
        self.assertFalse(os.path.exists(old_domain))
        self.assertTrue(os.path.exists(young))

    def test_service_cleans_at_start(self):
        """StaleTempCleaner removes stale files when the service starts."""
        old = self.make_temp("alice", "old", 37 * 3600)
        cleaner = delivery.StaleTempCleaner(self.mailroot)
        self.assertTrue(os.path.exists(old))
        cleaner.startService()
        self.assertFalse(os.path.exists(old))

    def test_maildir_removed_while_scanning(self):
        """A user directory removed while the cleaner scans is skipped, not an error."""
        old = self.make_temp("alice", "old", 37 * 3600)
        os.makedirs(os.path.join(self.mailroot, "example.org"))
        real_scandir = os.scandir

        def scandir(path):
            if path.endswith("example.org"):
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
            return real_scandir(path)

        with mock.patch.object(delivery.os, "scandir", scandir):
            self.assertEqual(delivery.remove_stale_temp_files(self.mailroot), 1)
        self.assertFalse(os.path.exists(old))

    def test_missing_mailroot(self):
        """A mail root that does not exist yet has nothing to clean."""
        self.assertEqual(delivery.remove_stale_temp_files(self.mailroot + "-missing"), 0)
