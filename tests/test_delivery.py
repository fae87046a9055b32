"""Tests for popserv.delivery: atomic delivery into Maildirs, names, and stale tmp/ cleanup."""

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import time
from unittest import mock

from twisted.trial import unittest
from zope.interface.verify import verifyObject

from popserv import delivery
from popserv.interfaces import DeliveryFailed, IDeliverer, IDelivery
from popserv.maildir import MaildirStore, crlf_size, uidl_for, wire_size_from_name
from tests import live

MESSAGE = b"Subject: hi\n\nline one\n.dot line\n\xff\xfe binary\n"
NAME_RE = re.compile(r"^(\d+)\.M(\d{6})P(\d+)Q(\d+)\.([^,:/]+),S=(\d+),W=(\d+)$")


class DeliveryTestCase(unittest.TestCase):
    def setUp(self):
        self.mailroot = os.path.abspath(self.mktemp())
        os.makedirs(self.mailroot)
        run = live.workers(self, delivery.DELIVERY_THREADS).run
        self.store = MaildirStore(self.mailroot, run)
        self.deliverer = delivery.MaildirDeliverer(self.store, "mx.example.org", run)

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
        returned = (await self.deliver(["alice"])).name
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
        name = (await started.finish()).name
        self.assertEqual(wire_size_from_name(name), crlf_size(b"a\r\nb\nc\r\n"))

    async def test_host_escaped(self):
        """A '/' or ':' or ',' in the host name is escaped, so the name stays one Maildir name."""
        self.deliverer.hostname = "a/b:c,d"
        name = (await self.deliver(["alice"])).name
        self.assertIn(".a\\057b\\072c\\054d,S=", name)

    async def test_names_unique(self):
        """Two deliveries in a row get different names."""
        first = (await self.deliver(["alice"])).name
        second = (await self.deliver(["alice"])).name
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
        """Record fsync, fdatasync, rename and link calls (in order) while letting them happen."""
        calls = []
        for name in ("fsync", "fdatasync", "rename", "link"):
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
        """Several recipients: fsync, the journal and its directory fsynced, a link into each
        new/, each new/ fsynced, then the journal's commit fsynced."""
        await self.deliver(["alice", "bob"])
        calls = self.record_calls()
        await self.deliver(["alice", "bob"])
        self.assertEqual(
            calls, ["fsync", "fsync", "fsync", "link", "link", "fsync", "fsync", "fdatasync"]
        )

    async def test_rename_keeps_inode(self):
        """The one recipient's file in new/ is the temporary file itself, not a copy."""
        started = self.deliverer.begin(["alice"])
        started.write(MESSAGE)
        inode = os.stat(os.path.join(self.store.path_for("alice"), "tmp", started.id)).st_ino
        name = (await started.finish()).name
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


class Crash(BaseException):
    """The process dies here: no cleanup code runs (only its locks are released)."""


class CrashTests(DeliveryTestCase):
    """A delivery to several users cut off at each point, then the start-up rollback."""

    USERS = ("alice", "bob", "carol@example.org")

    def setUp(self):
        super().setUp()
        self.journal_dir = os.path.join(self.mailroot, delivery.JOURNAL_DIR)
        self.journals = []
        real_create = delivery.Journal.create

        def create(*args):
            journal = real_create(*args)
            self.journals.append(journal)
            return journal

        patcher = mock.patch.object(delivery.Journal, "create", create)
        patcher.start()
        self.addCleanup(patcher.stop)

    def copies(self) -> list[int]:
        return [len(self.listing(user, "new")) for user in self.USERS]

    def crash_delivery(self, **crashing) -> None:
        """Deliver to USERS with the os functions in ``crashing`` dying, ending the process."""
        started = self.deliverer.begin(self.USERS)
        started.write(MESSAGE)
        f, started._file = started._file, None
        with contextlib.ExitStack() as stack:
            for name, crash in crashing.items():
                stack.enter_context(mock.patch.object(delivery.os, name, crash))
            with self.assertRaises(Crash):
                started._finish_blocking(f)
        for journal in self.journals:
            if journal._fd < 0:
                continue
            os.close(journal._fd)  # the dead process's descriptors, and so its locks, go
            journal._fd = -1

    def after_links(self, count: int):
        """An os.link that dies after ``count`` links were made."""
        real_link, made = os.link, []

        def link(src, dst):
            if len(made) == count:
                raise Crash()
            made.append(dst)
            return real_link(src, dst)

        return link

    async def assert_rolled_back_then_retried(self):
        self.assertEqual(delivery.roll_back_unfinished(self.journal_dir), 1)
        self.assertEqual(self.copies(), [0, 0, 0])
        for user in self.USERS:
            self.assertEqual(self.listing(user, "tmp"), [])
        self.assertEqual(os.listdir(self.journal_dir), [])
        # The sender, which got no 250, sends the message again: one copy each.
        await self.deliver(list(self.USERS))
        self.assertEqual(self.copies(), [1, 1, 1])

    async def test_crash_between_links(self):
        """Cut off after 0, 1 or 2 of 3 links: the start removes them; a retry gives one each."""
        for count in (0, 1, 2):
            self.crash_delivery(link=self.after_links(count))
            self.assertEqual(sum(self.copies()), count)
            await self.assert_rolled_back_then_retried()
            for user in self.USERS:
                for name in self.listing(user, "new"):
                    os.unlink(os.path.join(self.store.path_for(user), "new", name))

    async def test_crash_after_last_link_before_commit(self):
        """Cut off with every link made but before the commit: the start removes them all."""

        def pwrite(fd, data, offset):
            raise Crash()

        self.crash_delivery(pwrite=pwrite)
        self.assertEqual(self.copies(), [1, 1, 1])
        await self.assert_rolled_back_then_retried()

    async def test_crash_before_journal_is_written(self):
        """Cut off while the journal is being written: no link was made, none is made."""

        def write(fd, data):
            raise Crash()

        self.crash_delivery(write=write)
        self.assertEqual(self.copies(), [0, 0, 0])
        self.assertEqual(delivery.roll_back_unfinished(self.journal_dir), 0)
        self.assertEqual(os.listdir(self.journal_dir), [])

    def test_committed_delivery_is_kept(self):
        """Cut off after the commit (its 250 may be on the way): the start keeps every copy."""
        real_unlink = os.unlink

        def unlink(path):
            if path.startswith(self.journal_dir):
                raise Crash()
            return real_unlink(path)

        self.crash_delivery(unlink=unlink)
        self.assertEqual(delivery.roll_back_unfinished(self.journal_dir), 0)
        self.assertEqual(self.copies(), [1, 1, 1])
        self.assertEqual(self.listing("alice", "tmp"), [])
        self.assertEqual(os.listdir(self.journal_dir), [])

    def test_journal_durable_before_first_link(self):
        """At the first link, the pending journal naming every target is already fsynced."""
        real_link, real_fsync, fsynced, seen = os.link, os.fsync, [], []

        def fsync(fd):
            fsynced.append(os.readlink(f"/proc/self/fd/{fd}"))
            return real_fsync(fd)

        def link(src, dst):
            if not seen:
                [name] = os.listdir(self.journal_dir)
                path = os.path.join(self.journal_dir, name)
                seen.append(path in fsynced and self.journal_dir in fsynced)
                with open(path, "rb") as f:
                    data = f.read()
                self.assertEqual(data[:1], b"P")
                targets = json.loads(data[1:])["targets"]
                self.assertEqual(
                    [t.split("/new/")[0] for t in targets],
                    [self.store.path_for(user) for user in self.USERS],
                )
            return real_link(src, dst)

        started = self.deliverer.begin(self.USERS)
        started.write(MESSAGE)
        f, started._file = started._file, None
        with (
            mock.patch.object(delivery.os, "link", link),
            mock.patch.object(delivery.os, "fsync", fsync),
        ):
            started._finish_blocking(f)
        self.assertEqual(seen, [True])
        self.assertEqual(os.listdir(self.journal_dir), [])

    async def test_failed_delivery_leaves_no_journal(self):
        """A link that fails (disk full) is undone at once, journal included."""
        real_link = os.link

        def link(src, dst):
            if "/bob/" in dst:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_link(src, dst)

        with mock.patch.object(delivery.os, "link", link):
            with self.assertRaises(DeliveryFailed):
                await self.deliver(list(self.USERS))
        self.assertEqual(self.copies(), [0, 0, 0])
        self.assertEqual(os.listdir(self.journal_dir), [])

    async def test_one_recipient_needs_no_journal(self):
        """One recipient's rename is atomic by itself: no journal is written."""
        await self.deliver(["alice"])
        self.assertEqual(self.journals, [])
        self.assertFalse(os.path.exists(self.journal_dir))

    def test_live_delivery_is_left_alone(self):
        """A journal still locked (a delivery under way in another process) is not touched."""
        os.makedirs(self.journal_dir)
        target = os.path.join(self.store.create("alice"), "new", "1.M2P3Q4.x,S=1,W=1")
        with open(target, "wb"):
            pass
        journal = delivery.Journal.create(
            self.journal_dir, "1.M2P3Q4.x", "/nowhere/tmp/x", [target]
        )
        self.assertEqual(delivery.roll_back_unfinished(self.journal_dir), 0)
        self.assertTrue(os.path.exists(target))
        journal.close()
        self.assertEqual(os.listdir(self.journal_dir), [])

    def test_damaged_journal_removes_only_its_own_files(self):
        """A journal naming other files, or cut off mid-write, removes nothing but itself."""
        os.makedirs(self.journal_dir)
        other = os.path.join(self.store.create("alice"), "new", "9.M9P9Q9.x,S=1,W=1")
        with open(other, "wb"):
            pass
        record = {"temp": other, "targets": [other, self.users_file()]}
        for name, data in [
            ("1.M1P1Q1.x", b"P" + json.dumps(record).encode()),
            ("2.M2P2Q2.x", b'P{"te'),
        ]:
            with open(os.path.join(self.journal_dir, name), "wb") as f:
                f.write(data)
        self.assertEqual(delivery.roll_back_unfinished(self.journal_dir), 2)
        self.assertTrue(os.path.exists(other))
        self.assertTrue(os.path.exists(self.users_file()))
        self.assertEqual(os.listdir(self.journal_dir), [])

    def users_file(self) -> str:
        path = os.path.join(self.mailroot, "..", "users")
        if not os.path.exists(path):
            with open(path, "w") as f:
                f.write("alice:x\n")
        return os.path.abspath(path)

    def test_service_rolls_back_at_start(self):
        """DeliveryRecovery rolls back when the service starts; a missing directory is fine."""
        self.crash_delivery(link=self.after_links(2))
        delivery.DeliveryRecovery(self.journal_dir + "-missing").startService()
        self.assertEqual(sum(self.copies()), 2)
        delivery.DeliveryRecovery(self.journal_dir).startService()
        self.assertEqual(self.copies(), [0, 0, 0])


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
