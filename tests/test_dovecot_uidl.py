"""Moving from Dovecot: popserv serves the UIDLs Dovecot (and Courier) served from a Maildir.

The unit tests read hand-made ``dovecot-uidlist`` and ``courierpop3dsizelist`` files; the
live tests run Debian's real Dovecot on 127.0.0.1 with its own configuration, record its
UIDLs over POP3, and require popserv to serve the same ones from the same Maildir.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import poplib
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

from twisted.internet import defer, threads
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from popserv import uidlist
from popserv.maildir import MAILDROP_THREADS, MaildirStore
from popserv.uidlist import (
    UidlFormat,
    UidlInheritance,
    parse_courier_sizelist,
    parse_dovecot_uidlist,
    read_xuidl,
)
from tests import live

UIDLIST_V3 = (
    "3 V1795752642 N6 G81d0bd1ec202096bd27a000083ecc375\n"
    "1 W54 :1700000001.M1P1Q1.host\n"
    "2 W54 P1795752642.2 :1700000002.M2P1Q2.host\n"
    "3 :1700000003.M3P1Q3.host,S=44,W=48\n"
    "5 W56 :1700000005.M5P1Q5.host:2,S\n"
)


def message(n: int, headers: bytes = b"") -> bytes:
    return headers + b"From: bob@example.org\nSubject: message %d\n\nbody %d\n" % (n, n)


# Formats and files


class UidlFormatTests(unittest.SynchronousTestCase):
    """Expanding Dovecot's pop3_uidl_format as Dovecot 2.3 does (values checked live below)."""

    def expand(self, text: str) -> str:
        return UidlFormat(text).expand(1, 1795752642, "1700000001.M1P1Q1.host,S=44")

    def test_default(self):
        """The default ``%08Xu%08Xv`` is UID and UIDVALIDITY as 8 lower-case hex digits each."""
        self.assertEqual(self.expand("%08Xu%08Xv"), "000000016b0902c2")

    def test_decimal(self):
        """``%u`` and ``%v`` are decimal; text between variables stays as it is."""
        self.assertEqual(self.expand("%v.%u"), "1795752642.1")
        self.assertEqual(self.expand("UID%u-%v"), "UID1-1795752642")

    def test_file_name(self):
        """``%f`` and ``%g`` are the base name, size fields included."""
        self.assertEqual(self.expand("%f"), "1700000001.M1P1Q1.host,S=44")
        self.assertEqual(self.expand("%g"), "1700000001.M1P1Q1.host,S=44")

    def test_modifiers(self):
        """Modifiers apply left to right: hex, case, reversal, MD5."""
        self.assertEqual(self.expand("%XUv"), "6B0902C2")
        self.assertEqual(self.expand("%Uf"), "1700000001.M1P1Q1.HOST,S=44")
        self.assertEqual(self.expand("%Lf"), "1700000001.m1p1q1.host,s=44")
        self.assertEqual(self.expand("%Rv"), "2462575971")
        md5 = hashlib.md5(b"1700000001.M1P1Q1.host,S=44").hexdigest()
        self.assertEqual(self.expand("%Mf"), md5)

    def test_widths(self):
        """``0<n>`` pads (never cuts), ``<n>`` keeps the first n, ``<o>.<n>`` a slice."""
        self.assertEqual(self.expand("%05u"), "00001")
        self.assertEqual(self.expand("%05f"), "1700000001.M1P1Q1.host,S=44")
        self.assertEqual(self.expand("%3f"), "170")
        self.assertEqual(self.expand("%2.3f"), "000")

    def test_percent(self):
        """``%%`` is one percent sign."""
        self.assertEqual(self.expand("%u%%"), "1%")

    def test_refused(self):
        """Unknown variables or modifiers, ``%m``, ``%{...}`` and no variable are ValueErrors."""
        for text in ["%q", "%08xu", "%m", "%{uid}", "%Zu", "uidl", "%%", "%u%", "%5%"]:
            self.assertRaises(ValueError, UidlFormat, text)

    def test_shapes(self):
        """Number-only formats have a shape; file-name formats have none."""
        self.assertTrue(UidlFormat("%08Xu%08Xv").shape.fullmatch("000000016b0902c2"))
        self.assertFalse(UidlFormat("%08Xu%08Xv").shape.fullmatch("0" * 64))
        self.assertTrue(UidlFormat("%v.%u").shape.fullmatch("1795752642.1"))
        self.assertIsNone(UidlFormat("%f").shape)
        self.assertIsNotNone(UidlFormat("%Mf").shape)


class ParserTests(unittest.SynchronousTestCase):
    """Reading dovecot-uidlist and courierpop3dsizelist."""

    def test_dovecot_v3(self):
        """Version 3 gives UIDVALIDITY, and per base name the UID and any saved UIDL."""
        parsed = parse_dovecot_uidlist(UIDLIST_V3)
        self.assertEqual(parsed.uidvalidity, 1795752642)
        self.assertEqual(
            {base: (r.uid, r.pop3_uidl) for base, r in parsed.records.items()},
            {
                "1700000001.M1P1Q1.host": (1, None),
                "1700000002.M2P1Q2.host": (2, "1795752642.2"),
                "1700000003.M3P1Q3.host,S=44,W=48": (3, None),
                "1700000005.M5P1Q5.host": (5, None),
            },
        )

    def test_dovecot_skips_bad_lines(self):
        """Records that do not parse are skipped, the rest kept."""
        text = "3 V7 N9\nx :a\n4\n5 W1\n6 :\n7 :b\n\n"
        self.assertEqual(
            {b: r.uid for b, r in parse_dovecot_uidlist(text).records.items()}, {"b": 7}
        )

    def test_dovecot_v1(self):
        """Version 1 (``1 <uidvalidity> <next>``, ``<uid> <name>``) is read too."""
        parsed = parse_dovecot_uidlist("1 1234 3\n1 a.b.c:2,S\n2 d.e.f\n")
        self.assertEqual(parsed.uidvalidity, 1234)
        self.assertEqual({b: r.uid for b, r in parsed.records.items()}, {"a.b.c": 1, "d.e.f": 2})

    def test_dovecot_refused(self):
        """An empty file, another version or a missing UIDVALIDITY are ValueErrors."""
        for text in ["", "\n", "2 1 2\n", "3 N5\n", "1 x 2\n"]:
            self.assertRaises(ValueError, parse_dovecot_uidlist, text)

    def test_courier(self):
        """Courier's UIDL is UID<n>-<uidvalidity>, UID<n> without one, the escaped name for 0."""
        text = (
            "/3 9 1600000000\n"
            "1500000000.1_1.host:2,S 120 4:1600000000:0\n"
            "1500000001.1_1.host 80 5:0\n"
            "1500000002.a b+c.host:2, 80 0:0\n"
            "garbage\n"
        )
        self.assertEqual(
            parse_courier_sizelist(text),
            {
                "1500000000.1_1.host": "UID4-1600000000",
                "1500000001.1_1.host": "UID5",
                "1500000002.a b+c.host": "1500000002.a+20b+2Bc.host",
            },
        )
        self.assertRaises(ValueError, parse_courier_sizelist, "/1 2 3\n")

    def test_xuidl(self):
        """The first X-UIDL header's value is read, unfolded; a body line is not a header."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"Subject: x\r\nx-uidl:  abc\r\n\tdef \r\nX-UIDL: second\r\n\r\nbody\r\n")
        self.assertEqual(read_xuidl(path), "abc\tdef")
        with open(path, "wb") as f:
            f.write(b"Subject: x\n\nX-UIDL: in the body\n")
        self.assertIsNone(read_xuidl(path))


class InheritedStoreTests(unittest.TestCase):
    """A MaildirStore over Maildirs that Dovecot or Courier served."""

    def make_store(self, **options) -> MaildirStore:
        self.store = MaildirStore(
            self.mktemp(), live.workers(self, MAILDROP_THREADS).run, **options
        )
        self.path = self.store.create("alice")
        return self.store

    def write(self, sub: str, name: str, data: bytes = b"x\n") -> str:
        path = os.path.join(self.path, sub, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def write_file(self, name: str, text: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(text)

    @defer.inlineCallbacks
    def uidls(self):
        maildrop = yield self.store.open_maildrop("alice")
        maildrop.close()
        return [uidl for uidl, _ in maildrop.messages()]

    @defer.inlineCallbacks
    def test_dovecot_default(self):
        """Listed messages get Dovecot's UIDLs in UID order, a saved P first; others their own."""
        self.make_store()
        self.write_file("dovecot-uidlist", UIDLIST_V3)
        self.write("cur", "1700000003.M3P1Q3.host,S=44,W=48:2,S")
        self.write("cur", "1700000001.M1P1Q1.host:2,")
        self.write("new", "1600000000.M9P1Q9.host")  # older, but not listed
        self.write("cur", "1700000002.M2P1Q2.host:2,RS")
        self.assertEqual(
            (yield self.uidls()),
            [
                "000000016b0902c2",
                "1795752642.2",
                "000000036b0902c2",
                "1600000000.M9P1Q9.host",
            ],
        )

    @defer.inlineCallbacks
    def test_format_option(self):
        """The store expands the configured format for listed messages only."""
        self.make_store(dovecot_uidl_format="%v.%u")
        self.write_file("dovecot-uidlist", UIDLIST_V3)
        self.write("new", "1700000001.M1P1Q1.host")
        self.write("new", "1700000009.M9P1Q9.host")
        self.assertEqual((yield self.uidls()), ["1795752642.1", "1700000009.M9P1Q9.host"])

    @defer.inlineCallbacks
    def test_reuse_xuidl(self):
        """With X-UIDL reuse a listed message's valid X-UIDL wins over the format, not over P."""
        self.make_store(dovecot_reuse_xuidl=True)
        self.write_file("dovecot-uidlist", UIDLIST_V3)
        self.write("cur", "1700000001.M1P1Q1.host:2,", b"X-UIDL: kept-1\n\nx\n")
        self.write("cur", "1700000002.M2P1Q2.host:2,", b"X-UIDL: not-p\n\nx\n")
        self.write("cur", "1700000003.M3P1Q3.host,S=44,W=48:2,", b"X-UIDL: two words\n\nx\n")
        self.write("new", "1700000009.M9P1Q9.host", b"X-UIDL: unlisted\n\nx\n")
        self.assertEqual(
            (yield self.uidls()),
            ["kept-1", "1795752642.2", "000000036b0902c2", "1700000009.M9P1Q9.host"],
        )

    @defer.inlineCallbacks
    def test_own_never_collides(self):
        """An own UIDL of an inherited shape, or equal to an inherited one, is replaced."""
        self.make_store()
        self.write_file("dovecot-uidlist", "3 V1795752642 N3\n1 P1234 :a.b.c\n2 :d.e.f\n")
        self.write("new", "a.b.c")
        self.write("new", "d.e.f")
        self.write("new", "1234")  # equals the saved P of a.b.c
        self.write("new", "000000036b0902c2")  # looks like UID 3
        self.write("new", "UID7-1")  # looks like Courier's
        self.write("new", "1700000009.M9P1Q9.host")
        uidls = yield self.uidls()
        self.assertEqual(uidls[:2], ["1234", "000000026b0902c2"])
        self.assertIn("1700000009.M9P1Q9.host", uidls)
        others = [u for u in uidls[2:] if u != "1700000009.M9P1Q9.host"]
        self.assertEqual(len(others), 3)
        for uidl in others:
            self.assertTrue(uidl.startswith("~") and len(uidl) == 41, uidl)
        self.assertEqual(len(set(uidls)), 6)
        self.assertEqual((yield self.uidls()), uidls)

    @defer.inlineCallbacks
    def test_without_inherited_files_own_stay(self):
        """Without a dovecot-uidlist or Courier list, own UIDLs are unchanged, odd shapes too."""
        self.make_store()
        self.write("new", "000000036b0902c2")
        self.write("new", "1234")
        self.assertEqual(sorted((yield self.uidls())), ["000000036b0902c2", "1234"])

    @defer.inlineCallbacks
    def test_duplicate_inherited(self):
        """Of two listed messages saving one UIDL, the lower UID keeps it; the other, the format."""
        self.make_store()
        self.write_file("dovecot-uidlist", "3 V9 N3\n1 Psame :a.b.c\n2 Psame :d.e.f\n")
        self.write("new", "d.e.f")
        self.write("new", "a.b.c")
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertEqual((yield self.uidls()), ["same", "0000000200000009"])
        self.assertEqual([e for e in events if e["log_level"] == LogLevel.warn], [])

    @defer.inlineCallbacks
    def test_courier(self):
        """Messages in courierpop3dsizelist keep Courier's UIDLs; dovecot-uidlist wins over it."""
        self.make_store()
        self.write_file(
            "courierpop3dsizelist",
            "/3 9 1600000000\n1500000000.1_1.host:2,S 2 4:1600000000:0\n"
            "1500000001.1_1.host:2,S 2 5:1600000000:0\n",
        )
        self.write_file("dovecot-uidlist", "3 V9 N2\n1 :1500000001.1_1.host\n")
        self.write("cur", "1500000000.1_1.host:2,S")
        self.write("cur", "1500000001.1_1.host:2,S")
        self.write("new", "1500000002.1_1.host")
        self.assertEqual(
            (yield self.uidls()),
            ["0000000100000009", "UID4-1600000000", "1500000002.1_1.host"],
        )

    @defer.inlineCallbacks
    def test_bad_uidlist(self):
        """An unparsable dovecot-uidlist is ignored with a warning naming it."""
        self.make_store()
        self.write_file("dovecot-uidlist", "9 what\n")
        self.write("new", "1700000009.M9P1Q9.host")
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertEqual((yield self.uidls()), ["1700000009.M9P1Q9.host"])
        warned = [e.get("path") for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(warned, [os.path.join(self.path, "dovecot-uidlist")])

    @defer.inlineCallbacks
    def test_never_writes(self):
        """Listing and committing deletions leave dovecot-uidlist byte for byte as it was."""
        self.make_store()
        self.write_file("dovecot-uidlist", UIDLIST_V3)
        self.write("cur", "1700000001.M1P1Q1.host:2,")
        self.write("cur", "1700000002.M2P1Q2.host:2,")
        before = os.stat(os.path.join(self.path, "dovecot-uidlist"))
        maildrop = yield self.store.open_maildrop("alice")
        yield maildrop.commit([0])
        maildrop.close()
        self.assertEqual((yield self.uidls()), ["1795752642.2"])
        after = os.stat(os.path.join(self.path, "dovecot-uidlist"))
        with open(os.path.join(self.path, "dovecot-uidlist")) as f:
            self.assertEqual(f.read(), UIDLIST_V3)
        self.assertEqual((before.st_ino, before.st_mtime_ns), (after.st_ino, after.st_mtime_ns))

    @defer.inlineCallbacks
    def test_parsed_once_while_unchanged(self):
        """An unchanged uidlist is parsed once; an appended line is seen at the next login."""
        self.make_store()
        self.write_file("dovecot-uidlist", "3 V9 N2\n1 :a.b.c\n")
        self.write("new", "a.b.c")
        self.write("new", "d.e.f")
        calls = []
        real = uidlist.parse_dovecot_uidlist
        self.patch(uidlist, "parse_dovecot_uidlist", lambda t: calls.append(1) or real(t))
        self.store._inheritance = UidlInheritance()
        first = yield self.uidls()
        self.assertEqual((yield self.uidls()), first)
        self.assertEqual(len(calls), 1)
        with open(os.path.join(self.path, "dovecot-uidlist"), "a") as f:
            f.write("2 :d.e.f\n")
        self.assertEqual((yield self.uidls()), ["0000000100000009", "0000000200000009"])
        self.assertEqual(len(calls), 2)

    @defer.inlineCallbacks
    def test_many_messages_list_fast(self):
        """10,000 listed messages (sizes in the names) list in well under two seconds."""
        self.make_store()
        lines = ["3 V1795752642 N10001"]
        for n in range(1, 10_001):
            name = f"17000{n:05d}.M{n}P1Q{n}.host,S=2,W=3"
            lines.append(f"{n} :{name}")
            self.write("cur", name + ":2,S")
        self.write_file("dovecot-uidlist", "\n".join(lines) + "\n")
        started = time.monotonic()
        uidls = yield self.uidls()
        elapsed = time.monotonic() - started
        self.assertEqual(len(uidls), 10_000)
        self.assertEqual(uidls[-1], "000027106b0902c2")
        self.assertLess(elapsed, 2.0)


# A real Dovecot


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require_dovecot() -> str:
    path = shutil.which("dovecot") or (
        "/usr/sbin/dovecot" if os.access("/usr/sbin/dovecot", os.X_OK) else None
    )
    if path is None:
        if os.environ.get("CI") == "true":
            raise AssertionError("dovecot is missing (CI=true: install dovecot-core dovecot-pop3d)")
        raise unittest.SkipTest("dovecot is not installed")
    if not os.path.exists("/usr/lib/dovecot/pop3"):
        if os.environ.get("CI") == "true":
            raise AssertionError("Dovecot's POP3 server is missing (install dovecot-pop3d)")
        raise unittest.SkipTest("dovecot-pop3d is not installed")
    return path


def _open_ancestors(path: str, top: str) -> None:
    """Give others search (x) permission on the directories from ``top`` down to ``path``."""
    directory = os.path.dirname(path)
    while directory.startswith(top + os.sep):
        mode = os.stat(directory).st_mode
        os.chmod(directory, mode | 0o011)
        directory = os.path.dirname(directory)


class Dovecot:
    """A Dovecot POP3 server on 127.0.0.1 over ``<mailroot>/<user>`` Maildirs, for one test.

    As root, mail is accessed as ``nobody`` (Dovecot refuses UID 0) and the login and
    internal processes run as Debian's ``dovenull`` and ``dovecot``; otherwise all runs
    as the current user.  ``start`` re-owns the Maildirs, since the test writes as itself.
    """

    def __init__(self, testcase, mailroot: str, users_path: str, **settings: str):
        self.binary = _require_dovecot()
        self.testcase = testcase
        self.mailroot = mailroot
        self.users_path = users_path
        self.settings = settings
        self.port = _free_port()
        # Short, so that the UNIX sockets under it stay within 108 characters.
        self.base = tempfile.mkdtemp(prefix="popserv-dovecot-")
        os.chmod(self.base, 0o755)
        testcase.addCleanup(shutil.rmtree, self.base, True)
        self.process: subprocess.Popen | None = None
        testcase.addCleanup(self.stop_now)
        # trial makes test directories 0700; Dovecot's own users must pass through them.
        for path in (mailroot, users_path):
            _open_ancestors(os.path.abspath(path), os.getcwd())

    def config(self) -> str:
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            self.owner = (nobody.pw_uid, nobody.pw_gid)
            login, internal = "dovenull", "dovecot"
            for name in (login, internal):
                pwd.getpwnam(name)
        else:
            self.owner = None
            login = internal = getpass.getuser()
        uid, gid = self.owner or (os.getuid(), os.getgid())
        lines = [
            f"base_dir = {self.base}/run",
            f"state_dir = {self.base}/state",
            f"log_path = {self.base}/dovecot.log",
            "protocols = pop3",
            "listen = 127.0.0.1",
            "ssl = no",
            "disable_plaintext_auth = no",
            "auth_mechanisms = plain",
            f"mail_location = maildir:{self.mailroot}/%u",
            f"default_login_user = {login}",
            f"default_internal_user = {internal}",
            "first_valid_uid = 1",
            "passdb {",
            "  driver = passwd-file",
            f"  args = {self.users_path}",
            "}",
            "userdb {",
            "  driver = static",
            f"  args = uid={uid} gid={gid} home={self.mailroot}/%u",
            "}",
            "service pop3-login {",
            "  inet_listener pop3 {",
            "    address = 127.0.0.1",
            f"    port = {self.port}",
            "  }",
            "}",
        ]
        lines += [f"{key} = {value}" for key, value in self.settings.items()]
        return "\n".join(lines) + "\n"

    def log(self) -> str:
        try:
            with open(os.path.join(self.base, "dovecot.log")) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def start_now(self) -> None:
        """Start Dovecot in the foreground and wait until its POP3 port answers."""
        path = os.path.join(self.base, "dovecot.conf")
        with open(path, "w") as f:
            f.write(self.config())
        if self.owner is not None:
            for directory, dirs, files in os.walk(self.mailroot):
                for name in [directory] + [os.path.join(directory, n) for n in dirs + files]:
                    os.lchown(name, *self.owner)
        self.process = subprocess.Popen(
            [self.binary, "-F", "-c", path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"dovecot exited ({self.process.returncode}): {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(100).startswith(b"+OK"):
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"dovecot did not answer on port {self.port}: {self.log()}")

    def stop_now(self) -> None:
        """Stop Dovecot (its children with it) and wait for it to exit."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def start(self) -> defer.Deferred:
        return threads.deferToThread(self.start_now)

    def stop(self) -> defer.Deferred:
        return threads.deferToThread(self.stop_now)

    def session(self, user: str, password: str, delete=()) -> defer.Deferred:
        """UIDL at login, then DELE of message numbers ``delete`` and QUIT; fires with UIDLs."""
        d = threads.deferToThread(pop3_session, self.port, user, password, delete)

        def failed(failure):
            raise AssertionError(f"{failure.getErrorMessage()}; Dovecot's log:\n{self.log()}")

        return d.addErrback(failed)


def pop3_session(port: int, user: str, password: str, delete=()) -> list[str]:
    """A blocking poplib session on 127.0.0.1: the UIDLs in message-number order."""
    client = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        client.user(user)
        client.pass_(password)
        _, lines, _ = client.uidl()
        uidls = []
        for number, line in enumerate(lines, 1):
            got_number, uidl = line.decode("ascii").split(" ", 1)
            assert int(got_number) == number, lines
            uidls.append(uidl)
        for number in delete:
            client.dele(number)
        client.quit()
    except BaseException:
        client.close()
        raise
    return uidls


def _users_file(testcase, users: dict[str, str]) -> tuple[str, str]:
    root = os.path.abspath(testcase.mktemp())
    mailroot = os.path.join(root, "mail")
    os.makedirs(mailroot)
    users_path = os.path.join(root, "users")
    with open(users_path, "w") as f:
        f.writelines(f"{user}:{{PLAIN}}{password}\n" for user, password in users.items())
    return mailroot, users_path


class DovecotSwitchTests(unittest.TestCase):
    """popserv serves exactly the UIDLs a real Dovecot served, and Dovecot still can after."""

    timeout = 120

    def setUp(self):
        self.run = live.workers(self, MAILDROP_THREADS).run

    @defer.inlineCallbacks
    def store_uidls(self, store: MaildirStore, user: str):
        maildrop = yield store.open_maildrop(user)
        maildrop.close()
        return [uidl for uidl, _ in maildrop.messages()]

    @defer.inlineCallbacks
    def test_switch_and_back(self):
        """Dovecot's UIDLs survive the switch, deliveries and deletions on both sides, and back.

        popserv serves every message Dovecot listed with Dovecot's UIDL, in Dovecot's order;
        a message Dovecot never saw gets popserv's own UIDL, distinct from all of them;
        popserv leaves dovecot-uidlist untouched, so Dovecot afterwards serves the
        remaining messages under the UIDLs it served before.
        """
        _require_dovecot()
        server = yield live.start_server(self)
        dovecot = Dovecot(self, server.mailroot, server.users_path)
        uidlist_path = os.path.join(server.maildir("alice"), "dovecot-uidlist")
        server.deliver("alice", message(1))
        server.deliver("alice", message(2), sizes=False)
        server.deliver("alice", message(3), seen=True)
        server.deliver("alice", message(4), sizes=False, seen=True)
        yield dovecot.start()
        first = yield dovecot.session("alice", "secret")
        self.assertEqual(len(first), 4)
        # More mail, and a deletion through Dovecot.
        server.deliver("alice", message(5))
        server.deliver("alice", message(6), sizes=False)
        second = yield dovecot.session("alice", "secret", delete=[2])
        self.assertEqual(second[:4], first)
        remaining = second[:1] + second[2:]
        self.assertEqual((yield dovecot.session("alice", "secret")), remaining)
        yield dovecot.stop()

        # The switch: popserv on the same Maildir, with mail Dovecot never saw.
        late = server.deliver("alice", message(7))
        with open(uidlist_path, "rb") as f:
            uidlist_before = f.read()
        served = yield threads.deferToThread(pop3_session, server.port, "alice", "secret", [2, 6])
        self.assertEqual(served, remaining + [late])
        self.assertNotIn(late, remaining)
        yield server.wait_idle()
        with open(uidlist_path, "rb") as f:
            self.assertEqual(f.read(), uidlist_before)

        # And back to Dovecot: what popserv left keeps Dovecot's UIDLs.
        yield dovecot.start()
        back = yield dovecot.session("alice", "secret")
        kept = [remaining[0]] + remaining[2:]
        self.assertEqual(back[: len(kept)], kept)
        self.assertEqual(len(back), len(kept))
        self.assertNotIn("Error", dovecot.log())

    @defer.inlineCallbacks
    def test_formats(self):
        """For other common pop3_uidl_format values popserv expands what Dovecot served."""
        _require_dovecot()
        mailroot, users_path = _users_file(self, {"alice": "secret"})
        store = MaildirStore(mailroot, self.run)
        maildir = store.create("alice")
        for n in range(1, 4):
            name = f"17000000{n:02d}.M{n}P1Q{n}.host"
            if n == 2:
                name += f",S={len(message(n))}"
            with open(os.path.join(maildir, "new", name), "wb") as f:
                f.write(message(n))
        for text in ["%u", "%v.%u", "%f", "%g", "%Mf", "%XUv-%05u", "%Rf"]:
            dovecot = Dovecot(self, mailroot, users_path, pop3_uidl_format=text)
            yield dovecot.start()
            expected = yield dovecot.session("alice", "secret")
            yield dovecot.stop()
            store = MaildirStore(mailroot, self.run, dovecot_uidl_format=text)
            self.assertEqual((yield self.store_uidls(store, "alice")), expected, text)

    @defer.inlineCallbacks
    def test_saved_uidls(self):
        """UIDLs Dovecot saved with pop3_save_uidl are served whatever popserv's format."""
        _require_dovecot()
        mailroot, users_path = _users_file(self, {"bob": "secret"})
        store = MaildirStore(mailroot, self.run)
        maildir = store.create("bob")
        for n in range(1, 4):
            with open(os.path.join(maildir, "new", f"17000000{n:02d}.M{n}P1Q{n}.h"), "wb") as f:
                f.write(message(n))
        dovecot = Dovecot(
            self, mailroot, users_path, pop3_uidl_format="%v.%u", pop3_save_uidl="yes"
        )
        yield dovecot.start()
        expected = yield dovecot.session("bob", "secret")
        yield dovecot.stop()
        with open(os.path.join(maildir, "dovecot-uidlist")) as f:
            self.assertEqual(f.read().count(" P"), 3)
        self.assertEqual((yield self.store_uidls(store, "bob")), expected)

    @defer.inlineCallbacks
    def test_reused_xuidl(self):
        """With pop3_reuse_xuidl, popserv serves the X-UIDL values Dovecot served."""
        _require_dovecot()
        mailroot, users_path = _users_file(self, {"carol": "secret"})
        maildir = MaildirStore(mailroot).create("carol")
        bodies = [message(1, b"X-UIDL: old-server-1\n"), message(2), message(3, b"X-Uidl: 3\n")]
        for n, body in enumerate(bodies, 1):
            with open(os.path.join(maildir, "new", f"17000000{n:02d}.M{n}P1Q{n}.h"), "wb") as f:
                f.write(body)
        dovecot = Dovecot(self, mailroot, users_path, pop3_reuse_xuidl="yes")
        yield dovecot.start()
        expected = yield dovecot.session("carol", "secret")
        yield dovecot.stop()
        self.assertEqual(expected[0], "old-server-1")
        store = MaildirStore(mailroot, self.run, dovecot_reuse_xuidl=True)
        self.assertEqual((yield self.store_uidls(store, "carol")), expected)
