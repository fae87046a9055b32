"""Real mail clients against a live popserv on 127.0.0.1: curl, fetchmail, getmail6, mpop.

Each test needs its client installed; without it the test is skipped, or fails when CI=true.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile

from twisted.internet import defer
from twisted.trial import unittest

from tests import live
from tests.live import CRLF, DOTS, NO_EOL, received_form, wire


def lf_form(message: bytes) -> bytes:
    """A message as a Unix mail client stores it: LF line ends, the last line terminated."""
    data = message.replace(b"\r\n", b"\n")
    return data if data.endswith(b"\n") else data + b"\n"


def without_first_header(message: bytes, name: bytes) -> bytes:
    """Drop the header field a client prepends (with its continuation lines), or fail."""
    prefix = name + b": "
    if not message.startswith(prefix):
        raise AssertionError(f"expected a leading {name!r} header in {message[:80]!r}")
    lines = message.split(b"\n")
    rest = 1
    while lines[rest][:1] in (b" ", b"\t"):
        rest += 1
    return b"\n".join(lines[rest:])


def read_dir(path: str) -> list[bytes]:
    """The contents of every file in a directory, sorted."""
    found = []
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as f:
            found.append(f.read())
    return sorted(found)


class ClientTestCase(unittest.TestCase):
    """A live server where alice has DOTS, CRLF and NO_EOL, and a scratch directory."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.server = yield live.start_server(self)
        self.messages = [DOTS, CRLF, NO_EOL]
        self.uidls = [
            self.server.deliver("alice", DOTS),
            self.server.deliver("alice", CRLF, sizes=False),
            self.server.deliver("alice", NO_EOL),
        ]
        self.work = os.path.abspath(self.mktemp())
        self.home = os.path.join(self.work, "home")
        os.makedirs(self.home)

    def env(self) -> dict[str, str]:
        """A clean environment: no proxy settings, a private HOME."""
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.home, "LANG": "C"}


class CurlTests(ClientTestCase):
    """curl's pop3:// URLs."""

    def curl(self, path: str = "", *options: str):
        curl = live.require_client("curl")
        url = f"pop3://alice:secret@127.0.0.1:{self.server.port}/{path}"
        argv = [curl, "-s", "-S", "--noproxy", "*", "--max-time", "20", *options, url]
        return live.run_program(argv, env=self.env())

    @defer.inlineCallbacks
    def test_list(self):
        """The mailbox URL lists each message number with its CRLF size."""
        ran = yield self.curl()
        self.assertEqual(ran.code, 0, ran.err)
        expected = b"".join(
            b"%d %d\r\n" % (n, len(wire(m))) for n, m in enumerate(self.messages, 1)
        )
        self.assertEqual(ran.out, expected)

    @defer.inlineCallbacks
    def test_retr(self):
        """A message URL retrieves the message byte-exact, lone-dot and dot-led lines included."""
        for number, message in enumerate(self.messages, 1):
            ran = yield self.curl(str(number))
            self.assertEqual(ran.code, 0, ran.err)
            self.assertEqual(ran.out, received_form(message))

    @defer.inlineCallbacks
    def test_dele(self):
        """-I -X 'DELE 2' deletes the message at curl's QUIT; the next listing lacks it."""
        ran = yield self.curl("", "-I", "-X", "DELE 2")
        self.assertEqual(ran.code, 0, ran.err)
        yield self.server.wait_idle()
        self.assertEqual(set(self.server.stored("alice")), {self.uidls[0], self.uidls[2]})
        ran = yield self.curl()
        self.assertEqual(ran.out, b"1 %d\r\n2 %d\r\n" % (len(wire(DOTS)), len(wire(NO_EOL))))

    @defer.inlineCallbacks
    def test_top(self):
        """-X 'TOP 1 0' prints the header of message 1 and the blank line after it."""
        ran = yield self.curl("", "-X", "TOP 1 0")
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(ran.out, wire(DOTS.split(b"\n\n")[0]) + b"\r\n\r\n")

    @defer.inlineCallbacks
    def test_uidl(self):
        """-X UIDL prints each message number with its Maildir unique name."""
        ran = yield self.curl("", "-X", "UIDL")
        self.assertEqual(ran.code, 0, ran.err)
        expected = b"".join(b"%d %s\r\n" % (n, u.encode()) for n, u in enumerate(self.uidls, 1))
        self.assertEqual(ran.out, expected)


class FetchmailTests(ClientTestCase):
    """fetchmail handing each message to an MDA that writes it to a file."""

    def setUp(self):
        d = super().setUp()
        d.addCallback(lambda _: self.write_config())
        return d

    def write_config(self):
        self.out = os.path.join(self.work, "out")
        os.makedirs(self.out)
        self.rc = os.path.join(self.work, "fetchmailrc")
        # fetchmail 6.4 tries STLS even when CAPA lacks it, unless sslproto is empty.
        with open(self.rc, "w") as f:
            f.write(
                f"poll 127.0.0.1 protocol pop3 port {self.server.port}\n"
                f'  user "alice" password "secret" sslproto \'\'\n'
            )
        os.chmod(self.rc, 0o600)
        self.mda = os.path.join(self.work, "mda")
        with open(self.mda, "w") as f:
            f.write(f'#!/bin/sh\nexec cat > "$(mktemp {self.out}/msg.XXXXXX)"\n')
        os.chmod(self.mda, 0o755)

    def fetchmail(self, *options: str):
        fetchmail = live.require_client("fetchmail")
        argv = [
            fetchmail, "-N", "--pidfile", os.path.join(self.work, "fetchmail.pid"),
            "-f", self.rc, "--idfile", os.path.join(self.work, "ids"),
            "--mda", self.mda, "--norewrite", *options,
        ]  # fmt: skip
        return live.run_program(argv, env=self.env())

    def fetched(self) -> list[bytes]:
        return [without_first_header(m, b"Received") for m in read_dir(self.out)]

    @defer.inlineCallbacks
    def test_keep_with_uidl(self):
        """--keep --uidl fetches every message with TOP n 99999999, leaves them on the server,
        and a later run fetches only mail it has not seen."""
        ran = yield self.fetchmail("--keep", "--uidl")
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(self.fetched(), sorted(lf_form(m) for m in self.messages))
        self.assertIn(b"TOP 1 99999999\r\n", self.server.client_bytes[0])
        self.assertEqual(set(self.server.stored("alice")), set(self.uidls))

        ran = yield self.fetchmail("--keep", "--uidl")
        self.assertEqual(ran.code, 1, ran.err)  # 1: no new mail
        self.assertEqual(len(read_dir(self.out)), 3)

        late = b"From: erin@example.org\nSubject: late\n\n.\n..late\n"
        self.server.deliver("alice", late)
        ran = yield self.fetchmail("--keep", "--uidl")
        self.assertEqual(ran.code, 0, ran.err)
        expected = sorted([lf_form(m) for m in self.messages] + [lf_form(late)])
        self.assertEqual(self.fetched(), expected)
        self.assertEqual(len(self.server.stored("alice")), 4)

    @defer.inlineCallbacks
    def test_delete(self):
        """Without --keep, fetchmail retrieves every message and the server deletes them."""
        ran = yield self.fetchmail("--nokeep", "--all")
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(self.fetched(), sorted(lf_form(m) for m in self.messages))
        yield self.server.wait_idle()
        self.assertEqual(self.server.stored("alice"), {})


class GetmailTests(ClientTestCase):
    """getmail6 delivering into a Maildir, run as an unprivileged user."""

    def setUp(self):
        d = super().setUp()
        d.addCallback(lambda _: self.make_dirs())
        return d

    def make_dirs(self):
        # getmail refuses to deliver as root, and nobody cannot enter _trial_temp.
        self.dir = tempfile.mkdtemp(prefix="popserv-getmail-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        os.chmod(self.dir, 0o755)
        self.maildir = os.path.join(self.dir, "Maildir")
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(self.maildir, sub))
        os.makedirs(os.path.join(self.dir, "state"))

    def write_rc(self, delete: bool) -> str:
        rc = os.path.join(self.dir, "getmailrc")
        with open(rc, "w") as f:
            f.write(
                "[retriever]\n"
                "type = SimplePOP3Retriever\n"
                "server = 127.0.0.1\n"
                f"port = {self.server.port}\n"
                "username = alice\n"
                "password = secret\n"
                "\n[destination]\n"
                "type = Maildir\n"
                f"path = {self.maildir}/\n"
                "\n[options]\n"
                f"delete = {str(delete).lower()}\n"
                "read_all = false\n"
                "delivered_to = false\n"
                "received = false\n"
                f"message_log = {self.dir}/getmail.log\n"
            )
        return rc

    def getmail(self, delete: bool):
        getmail = live.require_client("getmail")
        rc = self.write_rc(delete)
        argv = [getmail, "--getmaildir", os.path.join(self.dir, "state"), "--rcfile", rc]
        env = self.env()
        env["HOME"] = self.dir
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            for parent, dirs, files in os.walk(self.dir):
                for name in [parent, *(os.path.join(parent, n) for n in dirs + files)]:
                    os.chown(name, nobody.pw_uid, nobody.pw_gid)
            argv = [
                live.require_client("setpriv"), f"--reuid={nobody.pw_uid}",
                f"--regid={nobody.pw_gid}", "--clear-groups", *argv,
            ]  # fmt: skip
        return live.run_program(argv, env=env)

    def fetched(self) -> list[bytes]:
        new = os.path.join(self.maildir, "new")
        return [without_first_header(m, b"Return-Path") for m in read_dir(new)]

    @defer.inlineCallbacks
    def test_keep_then_only_new(self):
        """delete=false fetches all and leaves them; with read_all=false a later run fetches
        only newly delivered mail."""
        ran = yield self.getmail(delete=False)
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(self.fetched(), sorted(lf_form(m) for m in self.messages))
        self.assertEqual(set(self.server.stored("alice")), set(self.uidls))

        ran = yield self.getmail(delete=False)
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(len(self.fetched()), 3)

        late = b"From: erin@example.org\nSubject: late\n\n.\n..late\n"
        self.server.deliver("alice", late)
        ran = yield self.getmail(delete=False)
        self.assertEqual(ran.code, 0, ran.err)
        expected = sorted([lf_form(m) for m in self.messages] + [lf_form(late)])
        self.assertEqual(self.fetched(), expected)
        self.assertEqual(len(self.server.stored("alice")), 4)

    @defer.inlineCallbacks
    def test_delete(self):
        """delete=true fetches every message and empties the server's Maildir."""
        ran = yield self.getmail(delete=True)
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(self.fetched(), sorted(lf_form(m) for m in self.messages))
        yield self.server.wait_idle()
        self.assertEqual(self.server.stored("alice"), {})


class MpopTests(ClientTestCase):
    """mpop delivering into a Maildir, with UIDL-based only_new."""

    def setUp(self):
        d = super().setUp()
        d.addCallback(lambda _: self.write_config())
        return d

    def write_config(self):
        self.maildir = os.path.join(self.work, "Maildir")
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(self.maildir, sub))
        self.rc = os.path.join(self.work, "mpoprc")
        # Without TLS, mpop's automatic choice refuses every method that sends the password.
        with open(self.rc, "w") as f:
            f.write(
                f"account default\nhost 127.0.0.1\nport {self.server.port}\n"
                "user alice\npassword secret\nauth user\ntls off\n"
            )
        os.chmod(self.rc, 0o600)

    def mpop(self, *options: str):
        mpop = live.require_client("mpop")
        argv = [
            mpop, "-C", self.rc, f"--delivery=maildir,{self.maildir}",
            f"--uidls-file={self.work}/uidls", *options,
        ]  # fmt: skip
        return live.run_program(argv, env=self.env())

    def fetched(self) -> list[bytes]:
        new = os.path.join(self.maildir, "new")
        return [without_first_header(m, b"Received") for m in read_dir(new)]

    @defer.inlineCallbacks
    def test_keep_only_new(self):
        """--keep=on --only-new=on fetches everything once, then only new mail."""
        ran = yield self.mpop("--keep=on", "--only-new=on")
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(self.fetched(), sorted(lf_form(m) for m in self.messages))
        self.assertEqual(set(self.server.stored("alice")), set(self.uidls))

        late = b"From: erin@example.org\nSubject: late\n\n.\n..late\n"
        self.server.deliver("alice", late)
        ran = yield self.mpop("--keep=on", "--only-new=on")
        self.assertEqual(ran.code, 0, ran.err)
        expected = sorted([lf_form(m) for m in self.messages] + [lf_form(late)])
        self.assertEqual(self.fetched(), expected)

    @defer.inlineCallbacks
    def test_delete(self):
        """--keep=off fetches every message and the server deletes them."""
        ran = yield self.mpop("--keep=off")
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(self.fetched(), sorted(lf_form(m) for m in self.messages))
        yield self.server.wait_idle()
        self.assertEqual(self.server.stored("alice"), {})


class RequireClientTests(unittest.TestCase):
    """How a missing client program is reported."""

    missing = "popserv-no-such-client"

    def test_skips_outside_ci(self):
        """Outside CI a missing client skips the test."""
        self.patch(os, "environ", {"PATH": os.environ.get("PATH", "")})
        self.assertRaises(unittest.SkipTest, live.require_client, self.missing)

    def test_fails_in_ci(self):
        """With CI=true a missing client fails the test, naming the client."""
        self.patch(os, "environ", {"PATH": os.environ.get("PATH", ""), "CI": "true"})
        error = self.assertRaises(AssertionError, live.require_client, self.missing)
        self.assertIn(self.missing, str(error))

    def test_finds_installed(self):
        """An installed program is found on PATH."""
        self.assertEqual(live.require_client("sh"), shutil.which("sh"))
