"""Tests for popserv.maildir, and the contract the in-memory fakes in popserv.testing share."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import time

from twisted.internet import defer
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from popserv import maildir
from popserv.interfaces import CommitFailed, IMaildrop, IMaildropStore, MaildropLocked
from popserv.maildir import (
    MAILDROP_THREADS,
    MaildirStore,
    crlf_size,
    crlf_size_of_chunks,
    uidl_for,
    unique_part,
    wire_size_from_name,
)
from popserv.testing import FakeMaildrop, FakeMaildropStore
from tests import live

MESSAGES = [b"Subject: one\n\nfirst\n", b"Subject: two\r\n\r\nsecond\r\n", b"third, no newline"]


class MaildropContractMixin:
    """What every IMaildropStore and its IMaildrops must do; subclasses build the store."""

    def make_store(self, mailboxes: dict[str, list[bytes]]):
        raise NotImplementedError

    def deliver(self, store, user: str, message: bytes) -> None:
        raise NotImplementedError

    @defer.inlineCallbacks
    def open_maildrop(self, store, user: str = "alice"):
        maildrop = yield store.open_maildrop(user)
        self.addCleanup(maildrop.close)
        return maildrop

    @defer.inlineCallbacks
    def reopened(self, store, first, user: str = "alice"):
        first.close()
        second = yield self.open_maildrop(store, user)
        return second

    @defer.inlineCallbacks
    def test_interfaces(self):
        """The store and its maildrops provide the interfaces they claim."""
        store = self.make_store({"alice": MESSAGES})
        verifyObject(IMaildropStore, store)
        maildrop = yield self.open_maildrop(store)
        verifyObject(IMaildrop, maildrop)
        self.assertEqual(maildrop.user, "alice")

    @defer.inlineCallbacks
    def test_snapshot_sizes(self):
        """The snapshot lists each message once, in delivery order, with its CRLF size."""
        store = self.make_store({"alice": [*MESSAGES, b""]})
        maildrop = yield self.open_maildrop(store)
        sizes = [size for _, size in maildrop.messages()]
        self.assertEqual(sizes, [23, 24, 17, 0])

    @defer.inlineCallbacks
    def test_uidls(self):
        """UIDLs are distinct, printable ASCII of at most 70 characters, and the same next time."""
        store = self.make_store({"alice": MESSAGES})
        maildrop = yield self.open_maildrop(store)
        uidls = [uidl for uidl, _ in maildrop.messages()]
        self.assertEqual(len(set(uidls)), len(MESSAGES))
        for uidl in uidls:
            self.assertTrue(0 < len(uidl) <= 70 and uidl.isascii() and uidl.isprintable())
            self.assertNotIn(" ", uidl)
        again = yield self.reopened(store, maildrop)
        self.assertEqual([uidl for uidl, _ in again.messages()], uidls)

    @defer.inlineCallbacks
    def test_open_bytes(self):
        """``open`` returns a binary file holding the message exactly as stored."""
        store = self.make_store({"alice": MESSAGES})
        maildrop = yield self.open_maildrop(store)
        for index, message in enumerate(MESSAGES):
            with maildrop.open(index) as f:
                self.assertEqual(f.read(), message)

    @defer.inlineCallbacks
    def test_bad_index(self):
        """Indexes outside the snapshot, negative ones included, raise IndexError."""
        store = self.make_store({"alice": MESSAGES})
        maildrop = yield self.open_maildrop(store)
        for index in (-1, len(MESSAGES)):
            self.assertRaises(IndexError, maildrop.open, index)
            self.assertRaises(IndexError, maildrop.commit, [index])

    @defer.inlineCallbacks
    def test_new_user_is_empty(self):
        """A user without a mailbox yet gets an empty maildrop."""
        store = self.make_store({})
        maildrop = yield self.open_maildrop(store, "newcomer@example.org")
        self.assertEqual(list(maildrop.messages()), [])

    @defer.inlineCallbacks
    def test_bad_user(self):
        """A user name that could escape the mail root fails with ValueError."""
        store = self.make_store({})
        self.assertRaises(ValueError, store.path_for, "../etc")
        yield self.assertFailure(store.open_maildrop("../etc"), ValueError)

    @defer.inlineCallbacks
    def test_commit_of_nothing_deletes_nothing(self):
        """A commit of no indexes removes nothing."""
        store = self.make_store({"alice": MESSAGES})
        maildrop = yield self.open_maildrop(store)
        before = list(maildrop.messages())
        yield maildrop.commit(())
        again = yield self.reopened(store, maildrop)
        self.assertEqual(list(again.messages()), before)

    @defer.inlineCallbacks
    def test_no_commit_deletes_nothing(self):
        """A session that closes without ``commit`` removes nothing."""
        store = self.make_store({"alice": MESSAGES})
        maildrop = yield self.open_maildrop(store)
        before = list(maildrop.messages())
        again = yield self.reopened(store, maildrop)
        self.assertEqual(list(again.messages()), before)

    @defer.inlineCallbacks
    def test_commit_deletes_only_marked(self):
        """``commit`` removes the given messages and keeps the others, UIDLs unchanged."""
        store = self.make_store({"alice": MESSAGES})
        maildrop = yield self.open_maildrop(store)
        before = list(maildrop.messages())
        result = yield maildrop.commit([0, 2])
        self.assertIsNone(result)
        again = yield self.reopened(store, maildrop)
        self.assertEqual(list(again.messages()), [before[1]])
        with again.open(0) as f:
            self.assertEqual(f.read(), MESSAGES[1])

    @defer.inlineCallbacks
    def test_commit_keeps_lock(self):
        """``commit`` does not release the lock; ``close`` does."""
        store = self.make_store({"alice": MESSAGES})
        maildrop = yield self.open_maildrop(store)
        yield maildrop.commit([0])
        yield self.assertFailure(store.open_maildrop("alice"), MaildropLocked)

    @defer.inlineCallbacks
    def test_lock_conflict(self):
        """A second session on the same maildrop fails with MaildropLocked."""
        store = self.make_store({"alice": MESSAGES})
        yield self.open_maildrop(store)
        yield self.assertFailure(store.open_maildrop("alice"), MaildropLocked)

    @defer.inlineCallbacks
    def test_other_users_do_not_conflict(self):
        """Sessions of different users hold different locks."""
        store = self.make_store({"alice": MESSAGES, "bob": MESSAGES})
        yield self.open_maildrop(store, "alice")
        bob = yield self.open_maildrop(store, "bob")
        self.assertEqual(len(bob.messages()), 3)

    @defer.inlineCallbacks
    def test_close_releases_lock(self):
        """After ``close`` (idempotent) the maildrop can be opened again."""
        store = self.make_store({"alice": MESSAGES})
        maildrop = yield self.open_maildrop(store)
        maildrop.close()
        maildrop.close()
        again = yield self.open_maildrop(store)
        self.assertEqual(len(again.messages()), 3)

    @defer.inlineCallbacks
    def test_stale_close_keeps_new_lock(self):
        """Closing an old session again does not release a newer session's lock."""
        store = self.make_store({"alice": MESSAGES})
        first = yield self.open_maildrop(store)
        first.close()
        yield self.open_maildrop(store)
        first.close()
        yield self.assertFailure(store.open_maildrop("alice"), MaildropLocked)

    @defer.inlineCallbacks
    def test_arrival_after_snapshot(self):
        """Mail arriving during a session is not in its snapshot but is in the next one."""
        store = self.make_store({"alice": MESSAGES[:1]})
        maildrop = yield self.open_maildrop(store)
        self.deliver(store, "alice", b"late\n")
        self.assertEqual(len(maildrop.messages()), 1)
        yield maildrop.commit([0])
        again = yield self.reopened(store, maildrop)
        self.assertEqual([size for _, size in again.messages()], [6])
        with again.open(0) as f:
            self.assertEqual(f.read(), b"late\n")


class MaildirContractTests(MaildropContractMixin, unittest.TestCase):
    """The contract, run against the real Maildir store."""

    def make_store(self, mailboxes):
        self.serial = 0
        store = MaildirStore(self.mktemp(), live.workers(self, MAILDROP_THREADS).run)
        for user, messages in mailboxes.items():
            store.create(user)
            for message in messages:
                self.deliver(store, user, message)
        return store

    def deliver(self, store, user, message):
        self.serial += 1
        name = f"1700000000.M{self.serial}P4242Q{self.serial}.test"
        path = os.path.join(store.path_for(user), "new", name)
        with open(path, "wb") as f:
            f.write(message)


class FakeContractTests(MaildropContractMixin, unittest.TestCase):
    """The same contract, run against the in-memory fake, so the fake cannot drift."""

    def make_store(self, mailboxes):
        return FakeMaildropStore({user: list(messages) for user, messages in mailboxes.items()})

    def deliver(self, store, user, message):
        store.deliver(user, message)


class FakeMaildropTests(unittest.TestCase):
    """What the fake offers beyond the contract, for the tests of other layers."""

    def test_unreadable(self):
        """An index listed as unreadable makes ``open`` raise OSError."""
        maildrop = FakeMaildrop([b"a\n", b"b\n"], unreadable={1})
        self.assertEqual(maildrop.open(0).read(), b"a\n")
        self.assertRaises(OSError, maildrop.open, 1)

    def test_undeletable(self):
        """An undeletable marked message makes ``commit`` fail with CommitFailed(1)."""
        maildrop = FakeMaildrop([b"a\n", b"b\n", b"c\n"], undeletable={1})
        failure = self.failureResultOf(maildrop.commit([0, 1]), CommitFailed)
        self.assertEqual(failure.value.failed, 1)
        self.assertEqual(maildrop.removed, ["fake-1"])

    def test_records_session(self):
        """``committed``, ``removed`` and ``closed`` record what the caller did."""
        maildrop = FakeMaildrop([b"a\n", b"b\n"])
        self.assertEqual(maildrop.messages(), (("fake-1", 3), ("fake-2", 3)))
        self.assertIsNone(self.successResultOf(maildrop.commit([1])))
        maildrop.close()
        self.assertEqual(
            (maildrop.committed, maildrop.removed, maildrop.closed), (True, ["fake-2"], True)
        )

    def test_store_shares_dict(self):
        """Commits through the fake store remove messages from the dict it was given."""
        mailboxes = {"alice": [b"a\n", b"b\n"]}
        store = FakeMaildropStore(mailboxes)
        maildrop = self.successResultOf(store.open_maildrop("alice"))
        self.successResultOf(maildrop.commit([0]))
        self.assertEqual(mailboxes, {"alice": [b"b\n"]})
        self.assertTrue(store.is_locked("alice"))
        maildrop.close()
        self.assertFalse(store.is_locked("alice"))


class CRLFSizeTests(unittest.TestCase):
    """The CRLF size rule shared by the real store and the fake."""

    def test_lf(self):
        """Each bare LF counts as two octets."""
        self.assertEqual(crlf_size(b"a\nbb\n"), 7)

    def test_crlf(self):
        """A CRLF counts as it is."""
        self.assertEqual(crlf_size(b"a\r\nbb\r\n"), 7)

    def test_mixed(self):
        """Bare LFs grow, CRLFs and lone CRs do not."""
        self.assertEqual(crlf_size(b"a\r\nb\nc\rd\n"), 11)

    def test_no_final_newline(self):
        """A last line without newline counts as it is; the terminator's CRLF is not counted."""
        self.assertEqual(crlf_size(b"a\nlast"), 7)
        self.assertEqual(crlf_size(b""), 0)

    def test_cr_at_chunk_end(self):
        """A CR ending one chunk and an LF starting the next form one CRLF."""
        self.assertEqual(crlf_size_of_chunks([b"a\r", b"\nb"]), 4)
        self.assertEqual(crlf_size_of_chunks([b"a", b"\nb"]), 4)
        self.assertEqual(crlf_size_of_chunks([b"a\r", b"", b"\nb"]), 4)
        self.assertEqual(crlf_size_of_chunks([b"a\r", b"b\n"]), 5)


class NameTests(unittest.TestCase):
    """Reading unique parts, UIDLs and sizes from Maildir file names."""

    def test_unique_part(self):
        """The unique part ends at the first comma or colon."""
        self.assertEqual(unique_part("1700000000.M1P2Q3.h,S=12,W=14:2,S"), "1700000000.M1P2Q3.h")
        self.assertEqual(unique_part("1700000000.M1P2Q3.h:2,S"), "1700000000.M1P2Q3.h")
        self.assertEqual(unique_part("1700000000.12345_0.h"), "1700000000.12345_0.h")

    def test_wire_size(self):
        """``W=`` before the flags gives the size; its absence gives None."""
        self.assertEqual(wire_size_from_name("1.M1.h,S=12,W=14:2,S"), 14)
        self.assertEqual(wire_size_from_name("1.M1.h,W=14"), 14)
        self.assertIsNone(wire_size_from_name("1.M1.h,S=12:2,S"))
        self.assertIsNone(wire_size_from_name("1.M1.h:2,W=14"))
        self.assertIsNone(wire_size_from_name("1.M1.h,W=x"))

    def test_invalid_uidl_is_hashed(self):
        """A unique part that is no valid UIDL becomes a stable hex hash of it."""
        for name in ["x" * 71 + ".h", "1700000000.a b.h", "1700000000.\udce9.h", ",S=3"]:
            uidl = uidl_for(name)
            self.assertEqual(len(uidl), 64)
            self.assertTrue(all(c in "0123456789abcdef" for c in uidl))
            self.assertEqual(uidl_for(name + ":2,S"), uidl)
        self.assertNotEqual(uidl_for("1700000000.a b.h"), uidl_for("1700000000.a c.h"))
        self.assertEqual(uidl_for("x" * 70), "x" * 70)


class MaildirStoreTests(unittest.TestCase):
    """Behaviour of the real Maildir store beyond the contract."""

    def setUp(self):
        self.run = live.workers(self, MAILDROP_THREADS).run
        self.store = MaildirStore(self.mktemp(), self.run)
        self.path = self.store.create("alice")

    def write(self, sub: str, name: str | bytes, data: bytes) -> str:
        if isinstance(name, bytes):
            name = os.fsdecode(name)
        path = os.path.join(self.path, sub, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    @defer.inlineCallbacks
    def snapshot(self):
        maildrop = yield self.store.open_maildrop("alice")
        maildrop.close()
        return list(maildrop.messages())

    @defer.inlineCallbacks
    def open_maildrop(self):
        maildrop = yield self.store.open_maildrop("alice")
        self.addCleanup(maildrop.close)
        return maildrop

    def test_path_for(self):
        """Plain users live under the root, users with a domain under the lower-cased domain."""
        root = self.store.mailroot
        self.assertEqual(self.store.path_for("alice"), os.path.join(root, "alice"))
        self.assertEqual(
            self.store.path_for("Alice@Example.ORG"), os.path.join(root, "example.org", "Alice")
        )

    def test_path_for_rejects(self):
        """Names that are empty, dot-led, contain '/', NUL or controls, or two '@' are rejected."""
        bad = ["", ".", "..", ".hidden", "a/b", "/abs", "a\0b", "a\nb", "a@b@c", "@example.org"]
        bad += ["alice@", "alice@..", "alice@.x", "alice@a/b", "..@example.org"]
        for user in bad:
            self.assertRaises(ValueError, self.store.path_for, user)
        self.assertRaises(TypeError, self.store.path_for, b"alice")

    def test_create_modes(self):
        """``create`` makes the Maildir and missing parents with mode 0700, and may run twice."""
        old_umask = os.umask(0)
        self.addCleanup(os.umask, old_umask)
        path = self.store.create("bob@example.org")
        self.assertEqual(self.store.create("bob@example.org"), path)
        for directory in [self.store.mailroot, os.path.dirname(path), path] + [
            os.path.join(path, sub) for sub in ("tmp", "new", "cur")
        ]:
            self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700, directory)

    @defer.inlineCallbacks
    def test_file_modes(self):
        """The lock file and the size cache are created with mode 0600."""
        old_umask = os.umask(0)
        self.addCleanup(os.umask, old_umask)
        self.write("new", "1700000000.M1P1Q1.h", b"a\n")
        yield self.snapshot()
        for name in ("popserv.lock", "popserv-sizes"):
            mode = os.stat(os.path.join(self.path, name)).st_mode
            self.assertEqual(stat.S_IMODE(mode), 0o600, name)

    @defer.inlineCallbacks
    def test_name_forms(self):
        """Names with S=/W=/flags, flags only, or neither all list with the right UIDL and size."""
        self.write("cur", "1700000001.M1P1Q1.host,S=5,W=99:2,S", b"hello")
        self.write("cur", "1700000002.M1P1Q1.host,S=4:2,RS", b"a\nb\n")
        self.write("cur", "1700000003.M1P1Q1.host:2,", b"a\nb\n")
        self.write("new", "1700000004.12345_0.host", b"a\r\nb")
        self.assertEqual(
            (yield self.snapshot()),
            [
                ("1700000001.M1P1Q1.host", 99),
                ("1700000002.M1P1Q1.host", 6),
                ("1700000003.M1P1Q1.host", 6),
                ("1700000004.12345_0.host", 4),
            ],
        )

    @defer.inlineCallbacks
    def test_computed_sizes(self):
        """Without W= the size is computed: LF, CRLF, mixed, no final newline, CR at 64 KiB."""
        boundary = b"a" * (maildir.CHUNK_SIZE - 1) + b"\r\nb\n"
        bodies = [b"a\nb\n", b"a\r\nb\r\n", b"a\r\nb\nc\rd\n", b"a\nb", boundary]
        for number, body in enumerate(bodies):
            self.write("new", f"17000000{number:02}.M1P1Q1.h", body)
        sizes = [size for _, size in (yield self.snapshot())]
        self.assertEqual(sizes, [6, 6, 11, 4, len(boundary) + 1])

    @defer.inlineCallbacks
    def test_size_cache(self):
        """A computed size is cached and reused while the file's mtime is unchanged."""
        path = self.write("cur", "1700000000.M1P1Q1.h:2,S", b"a\nb\n")
        self.assertEqual((yield self.snapshot())[0][1], 6)
        st = os.stat(path)
        with open(path, "wb") as f:
            f.write(b"a\nb\r")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.assertEqual((yield self.snapshot())[0][1], 6)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        self.assertEqual((yield self.snapshot())[0][1], 5)

    @defer.inlineCallbacks
    def test_size_cache_skips_reading(self):
        """With a valid cache file, a restarted server's listing reads no message file."""
        self.write("cur", "1700000000.M1P1Q1.h:2,S", b"a\nb\n")
        yield self.snapshot()
        self.store = MaildirStore(self.store.mailroot, self.run)
        read = []
        real_size = maildir._crlf_size_of_path
        self.patch(
            maildir, "_crlf_size_of_path", lambda path, *a: read.append(path) or real_size(path, *a)
        )
        self.assertEqual((yield self.snapshot())[0][1], 6)
        self.assertEqual(read, [])

    @defer.inlineCallbacks
    def test_listing_parses_only_new_names(self):
        """After new mail, a listing reads only the new messages, not the known ones."""
        self.write("new", "1700000000.M1P1Q1.h", b"a\n")
        yield self.snapshot()
        new = self.write("new", "1700000001.M1P1Q1.h", b"bb\n")
        read = []
        real_size = maildir._crlf_size_of_path
        self.patch(
            maildir, "_crlf_size_of_path", lambda path, *a: read.append(path) or real_size(path, *a)
        )
        self.assertEqual([size for _, size in (yield self.snapshot())], [3, 4])
        self.assertEqual(read, [new])

    @defer.inlineCallbacks
    def test_corrupt_cache(self):
        """A corrupt size cache is ignored with a warning, and rewritten."""
        self.write("new", "1700000000.M1P1Q1.h", b"a\n")
        cache = os.path.join(self.path, "popserv-sizes")
        with open(cache, "wb") as f:
            f.write(b"garbage\n\xff\n")
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertEqual((yield self.snapshot())[0][1], 3)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual([e["path"] for e in warnings], [cache])
        with open(cache, "rb") as f:
            self.assertTrue(f.read().startswith(b"1700000000.M1P1Q1.h 3 "))

    @defer.inlineCallbacks
    def test_unreadable_at_listing(self):
        """A message whose size cannot be read is listed with its size on disk and a
        warning, so the client sees it; opening it fails, the others open."""
        self.write("new", "1700000000.M1P1Q1.h", b"a\n")
        bad = self.write("new", "1700000001.M1P1Q1.h", b"bb\n")
        real_size = maildir._crlf_size_of_path

        real_open = maildir._open_nofollow

        def refusing(real):
            def call(path, *args):
                if path == bad:
                    raise PermissionError(errno.EACCES, "Permission denied", path)
                return real(path, *args)

            return call

        self.patch(maildir, "_crlf_size_of_path", refusing(real_size))
        self.patch(maildir, "_open_nofollow", refusing(real_open))
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        drop = yield self.open_maildrop()
        self.assertEqual(
            list(drop.messages()), [("1700000000.M1P1Q1.h", 3), ("1700000001.M1P1Q1.h", 3)]
        )
        self.assertIn(bad, [e.get("path") for e in events if e["log_level"] == LogLevel.warn])
        with drop.open(0) as f:
            self.assertEqual(f.read(), b"a\n")
        self.assertRaises(PermissionError, drop.open, 1)

    @defer.inlineCallbacks
    def test_ignores_non_messages(self):
        """tmp/, dotfiles, directories and symlinks are not messages."""
        outside = os.path.join(self.store.mailroot, "secret")
        with open(outside, "wb") as f:
            f.write(b"secret\n")
        self.write("tmp", "1700000000.M1P1Q1.h", b"partial")
        self.write("new", ".hidden", b"x\n")
        os.mkdir(os.path.join(self.path, "cur", "1700000000.M2P1Q1.h"))
        os.symlink(outside, os.path.join(self.path, "cur", "1700000000.M3P1Q1.h"))
        self.write("new", "1700000000.M4P1Q1.h", b"real\n")
        self.assertEqual((yield self.snapshot()), [("1700000000.M4P1Q1.h", 6)])

    @defer.inlineCallbacks
    def test_control_files_are_not_messages(self):
        """Lock, size cache, UIDL lists, quota and folder files in new/ or cur/ are never listed."""
        control = [
            "popserv.lock",
            "popserv-sizes",
            "popserv-sizes.tmp",
            "dovecot-uidlist",
            "dovecot-uidlist.lock",
            "dovecot-uidvalidity",
            "dovecot-keywords",
            "dovecot.index.log",
            "courierpop3dsizelist",
            "courierimapuiddb",
            "maildirsize",
            "maildirfolder",
            "subscriptions",
            ".1700000000.M9P1Q1.h",
        ]
        for sub in ("new", "cur"):
            for name in control:
                self.write(sub, name, b"not a message\n")
        self.write("new", "1700000000.M4P1Q1.h", b"real\n")
        self.assertEqual((yield self.snapshot()), [("1700000000.M4P1Q1.h", 6)])

    @defer.inlineCallbacks
    def test_nested_maildir_keeps_its_lock(self):
        """Opened as a Maildir, another's parent lists nothing of it: its lock stays held."""
        inner = yield self.store.open_maildrop("new@example.org")
        self.addCleanup(inner.close)
        outer = yield self.store.open_maildrop("example.org")
        self.addCleanup(outer.close)
        listed = outer.messages()
        yield outer.commit(range(len(listed)))
        lock = os.path.join(self.store.path_for("new@example.org"), "popserv.lock")
        self.assertTrue(os.path.exists(lock))
        yield self.assertFailure(self.store.open_maildrop("new@example.org"), MaildropLocked)
        self.assertEqual(listed, ())

    @defer.inlineCallbacks
    def test_order(self):
        """Messages sort by seconds, then M<usecs>, across new/ and cur/; no-time names by mtime."""
        self.write("cur", "1000000000.M10P1Q2.h:2,S", b"")
        self.write("new", "1000000000.M5P1Q1.h", b"")
        self.write("new", "1000000000.12345_0.h", b"")
        self.write("cur", "999999999.M1P1Q1.h:2,", b"")
        legacy = self.write("new", "legacy", b"")
        os.utime(legacy, (500000000, 500000000))
        self.assertEqual(
            [uidl for uidl, _ in (yield self.snapshot())],
            [
                "legacy",
                "999999999.M1P1Q1.h",
                "1000000000.12345_0.h",
                "1000000000.M5P1Q1.h",
                "1000000000.M10P1Q2.h",
            ],
        )

    @defer.inlineCallbacks
    def test_uidl_survives_move(self):
        """The UIDL stays the same when a message moves from new/ to cur/ and gains flags."""
        path = self.write("new", "1700000000.M1P1Q1.h,S=2,W=3", b"a\n")
        first = yield self.snapshot()
        os.rename(path, os.path.join(self.path, "cur", "1700000000.M1P1Q1.h,S=2,W=3:2,S"))
        self.assertEqual((yield self.snapshot()), first)

    @defer.inlineCallbacks
    def test_hashed_uidl_survives_move(self):
        """A hashed UIDL of an odd name also survives the move to cur/."""
        path = self.write("new", b"1700000000.\xe9 odd.h", b"a\n")
        [(uidl, size)] = yield self.snapshot()
        self.assertEqual((len(uidl), size), (64, 3))
        os.rename(path, path.replace(os.sep + "new" + os.sep, os.sep + "cur" + os.sep) + ":2,S")
        self.assertEqual((yield self.snapshot()), [(uidl, 3)])

    @defer.inlineCallbacks
    def test_duplicate_unique_part(self):
        """Two files with one unique part list once, so UIDLs stay unique."""
        self.write("new", "1700000000.M1P1Q1.h", b"a\n")
        self.write("cur", "1700000000.M1P1Q1.h:2,S", b"a\n")
        self.assertEqual((yield self.snapshot()), [("1700000000.M1P1Q1.h", 3)])

    @defer.inlineCallbacks
    def test_open_follows_move(self):
        """``open`` finds a message that moved to cur/ or changed flags after the snapshot."""
        path = self.write("new", "1700000000.M1P1Q1.h", b"moving\n")
        maildrop = yield self.open_maildrop()
        moved = os.path.join(self.path, "cur", "1700000000.M1P1Q1.h:2,S")
        os.rename(path, moved)
        with maildrop.open(0) as f:
            self.assertEqual(f.read(), b"moving\n")
        os.rename(moved, moved + "R")
        with maildrop.open(0) as f:
            self.assertEqual(f.read(), b"moving\n")

    @defer.inlineCallbacks
    def test_open_gone(self):
        """``open`` of a message removed behind the session's back raises OSError."""
        path = self.write("new", "1700000000.M1P1Q1.h", b"gone\n")
        maildrop = yield self.open_maildrop()
        os.unlink(path)
        self.assertRaises(OSError, maildrop.open, 0)

    @defer.inlineCallbacks
    def test_commit_gone_counts_as_removed(self):
        """A marked message that is already gone counts as removed at commit."""
        path = self.write("new", "1700000000.M1P1Q1.h", b"a\n")
        maildrop = yield self.open_maildrop()
        os.unlink(path)
        self.assertIsNone((yield maildrop.commit([0])))

    @defer.inlineCallbacks
    def test_commit_follows_move(self):
        """``commit`` removes a marked message even after it moved to cur/."""
        path = self.write("new", "1700000000.M1P1Q1.h", b"a\n")
        maildrop = yield self.open_maildrop()
        os.rename(path, os.path.join(self.path, "cur", "1700000000.M1P1Q1.h:2,S"))
        yield maildrop.commit([0])
        self.assertEqual(os.listdir(os.path.join(self.path, "cur")), [])

    @defer.inlineCallbacks
    def test_commit_failure(self):
        """One file that cannot be unlinked fails commit with CommitFailed(1); the rest go."""
        paths = [self.write("cur", f"170000000{n}.M1P1Q1.h:2,S", b"x\n") for n in range(3)]
        real_unlink = os.unlink

        def refusing_unlink(path, *args, **kwargs):
            if path == paths[1]:
                raise PermissionError(errno.EPERM, "Operation not permitted", path)
            return real_unlink(path, *args, **kwargs)

        self.patch(os, "unlink", refusing_unlink)
        maildrop = yield self.open_maildrop()
        failure = yield self.assertFailure(maildrop.commit(range(3)), CommitFailed)
        self.assertEqual(failure.failed, 1)
        self.assertEqual([os.path.exists(p) for p in paths], [False, True, False])

    @defer.inlineCallbacks
    def test_lock_released_on_failed_open(self):
        """A failed open leaves the first session's lock in place and leaks no descriptor."""
        first = yield self.open_maildrop()
        fds = len(os.listdir("/proc/self/fd"))
        yield self.assertFailure(self.store.open_maildrop("alice"), MaildropLocked)
        self.assertEqual(len(os.listdir("/proc/self/fd")), fds)
        first.close()
        yield self.open_maildrop()

    def spawn_locker(self) -> subprocess.Popen:
        """A child process that holds the maildrop lock until its stdin closes."""
        script = (
            "import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
            "try:\n"
            "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "except BlockingIOError:\n"
            "    print('busy', flush=True)\n"
            "    sys.exit()\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n"
        )
        lock = os.path.join(self.path, "popserv.lock")
        child = subprocess.Popen(
            [sys.executable, "-c", script, lock], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.addCleanup(child.wait)
        self.addCleanup(child.stdout.close)
        self.addCleanup(child.stdin.close)
        return child

    @defer.inlineCallbacks
    def test_lock_across_processes(self):
        """Another process holding the lock makes open fail; its death releases the lock."""
        child = self.spawn_locker()
        self.assertEqual(child.stdout.readline(), b"locked\n")
        yield self.assertFailure(self.store.open_maildrop("alice"), MaildropLocked)
        child.kill()
        child.wait()
        yield self.open_maildrop()

    @defer.inlineCallbacks
    def test_lock_seen_by_other_process(self):
        """An open session's lock stops another process from taking it."""
        yield self.open_maildrop()
        child = self.spawn_locker()
        self.assertEqual(child.stdout.readline(), b"busy\n")


class ListingCacheTests(unittest.TestCase):
    """Later logins reuse the last listing while the Maildir is unchanged."""

    def setUp(self):
        self.run = live.workers(self, MAILDROP_THREADS).run
        self.store = MaildirStore(self.mktemp(), self.run)
        self.path = self.store.create("alice")
        for n in range(3):
            self.write("new", f"17000000{n:02d}.M{n}P1Q{n}.h,S=2,W=3", b"a\n")
        self.age()
        self.scans = []
        real_scandir = os.scandir

        def counting_scandir(path):
            self.scans.append(path)
            return real_scandir(path)

        self.patch(maildir.os, "scandir", counting_scandir)

    def write(self, sub, name, data):
        with open(os.path.join(self.path, sub, name), "wb") as f:
            f.write(data)

    def age(self):
        """Make new/ and cur/ look untouched for a minute."""
        old = time.time() - 60
        for sub in ("new", "cur"):
            os.utime(os.path.join(self.path, sub), (old, old))

    @defer.inlineCallbacks
    def uidls(self):
        maildrop = yield self.store.open_maildrop("alice")
        maildrop.close()
        return [uidl for uidl, _ in maildrop.messages()]

    @defer.inlineCallbacks
    def test_unchanged_maildir_is_not_listed_again(self):
        """A second login on an unchanged Maildir reads no directory."""
        first = yield self.uidls()
        scans = len(self.scans)
        second = yield self.uidls()
        self.assertEqual(second, first)
        self.assertEqual(len(self.scans), scans)
        self.assertEqual(len(first), 3)

    @defer.inlineCallbacks
    def test_new_mail_is_seen(self):
        """A message delivered since the last login is in the next snapshot."""
        yield self.uidls()
        self.write("new", "1700000099.M9P1Q9.h,S=2,W=3", b"b\n")
        uidls = yield self.uidls()
        self.assertEqual(uidls[-1], "1700000099.M9P1Q9.h")

    @defer.inlineCallbacks
    def test_removal_by_another_agent_is_seen(self):
        """A message removed by another program since the last login is gone from the next."""
        first = yield self.uidls()
        os.unlink(os.path.join(self.path, "new", "1700000001.M1P1Q1.h,S=2,W=3"))
        uidls = yield self.uidls()
        self.assertEqual(uidls, [first[0], first[2]])

    @defer.inlineCallbacks
    def test_fresh_directories_are_not_trusted(self):
        """A listing taken while new/ was changed within STABLE_AGE is not reused."""
        self.write("new", "1700000050.M5P1Q5.h,S=2,W=3", b"c\n")
        yield self.uidls()
        scans = len(self.scans)
        yield self.uidls()
        self.assertGreater(len(self.scans), scans)

    @defer.inlineCallbacks
    def test_commit_is_seen(self):
        """Messages deleted by a session's commit are gone at the next login."""
        maildrop = yield self.store.open_maildrop("alice")
        yield maildrop.commit([0])
        maildrop.close()
        uidls = yield self.uidls()
        self.assertEqual(len(uidls), 2)

    @defer.inlineCallbacks
    def test_cache_is_bounded(self):
        """The store keeps the listings of a bounded number of Maildirs."""
        self.patch(maildir, "MAX_CACHED_LISTINGS", 2)
        for user in ("a", "b", "c"):
            path = self.store.create(user)
            old = time.time() - 60
            for sub in ("new", "cur"):
                os.utime(os.path.join(path, sub), (old, old))
            drop = yield self.store.open_maildrop(user)
            drop.close()
        self.assertEqual(len(self.store._listings), 2)
