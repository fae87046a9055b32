"""Telling systemd how the server is doing (popserv.notify): the datagrams sd_notify sends.

The unit tests read them from a socket of their own; the live test starts a real
``twistd popserv`` with ``NOTIFY_SOCKET`` pointing at one, as systemd starts
etc/popserv.service (``Type=notify``), and checks what arrives, when and from whom.
Every listener is on 127.0.0.1.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import struct
import tempfile
import time
from unittest import mock

from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from popserv import notify, service
from popserv.config import Config
from tests.live_twistd import HOST, TwistdServer

#: The credentials the kernel attaches to a datagram on a socket with SO_PASSCRED.
_UCRED = struct.Struct("3i")


class Receiver:
    """A datagram socket standing in for systemd's: what arrives, and from which process."""

    def __init__(self, testcase, address: str | bytes):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        testcase.addCleanup(self.sock.close)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)

    def receive(self, timeout: float = 30.0) -> tuple[dict[str, str], tuple[int, int, int]]:
        """The next message as {field: value}, and the sender's (pid, uid, gid)."""
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        [(level, kind, credentials)] = ancillary
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
        lines = data.decode("utf-8").split("\n")
        assert lines[-1] == "", data
        return dict(line.split("=", 1) for line in lines[:-1]), _UCRED.unpack(credentials)

    def nothing_waiting(self) -> bool:
        self.sock.settimeout(0)
        try:
            self.sock.recv(4096, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        return False


def socket_dir(testcase) -> str:
    """A short directory for socket paths (trial's own are too long for sun_path)."""
    path = tempfile.mkdtemp(prefix="popserv-notify-")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


class NotifierTests(SynchronousTestCase):
    """The datagrams themselves, to a path or an abstract socket, or none at all."""

    def setUp(self):
        self.path = os.path.join(socket_dir(self), "notify")
        self.receiver = Receiver(self, self.path)

    def test_path_socket(self):
        """With NOTIFY_SOCKET a path, ready() sends READY=1 and the status, one datagram."""
        notifier = notify.Notifier({"NOTIFY_SOCKET": self.path})
        self.assertTrue(notifier.ready("Serving POP3 on tcp:110"))
        fields, (pid, _, _) = self.receiver.receive()
        self.assertEqual(fields, {"READY": "1", "STATUS": "Serving POP3 on tcp:110"})
        self.assertEqual(pid, os.getpid())
        self.assertTrue(self.receiver.nothing_waiting())

    def test_abstract_socket(self):
        """A leading @ names an abstract socket, as systemd writes it."""
        name = f"popserv-test-{os.getpid()}-{id(self)}"
        abstract = Receiver(self, b"\0" + name.encode())
        notifier = notify.Notifier({"NOTIFY_SOCKET": "@" + name})
        self.assertEqual(notifier.address, b"\0" + name.encode())
        self.assertTrue(notifier.stopping("Stopping"))
        self.assertEqual(abstract.receive()[0], {"STOPPING": "1", "STATUS": "Stopping"})
        self.assertTrue(self.receiver.nothing_waiting())

    def test_unset_does_nothing(self):
        """Without NOTIFY_SOCKET (or with it empty) no socket is even opened."""
        with mock.patch.object(notify.socket, "socket", side_effect=AssertionError("opened")):
            for environ in ({}, {"NOTIFY_SOCKET": ""}):
                notifier = notify.Notifier(environ)
                self.assertIsNone(notifier.address)
                self.assertFalse(notifier.ready("x"))
                self.assertFalse(notifier.reloading("x"))
                self.assertFalse(notifier.stopping("x"))
        self.assertTrue(self.receiver.nothing_waiting())

    def test_reads_the_process_environment(self):
        """By default the address comes from os.environ, where systemd puts it."""
        with mock.patch.dict(os.environ, {"NOTIFY_SOCKET": self.path}):
            notifier = notify.Notifier()
        self.assertEqual(notifier.address, os.fsencode(self.path))

    def test_reloading_carries_the_monotonic_time(self):
        """RELOADING=1 comes with MONOTONIC_USEC, the CLOCK_MONOTONIC time it was sent at."""
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notify.Notifier({"NOTIFY_SOCKET": self.path}).reloading("Reloading")
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        fields, _ = self.receiver.receive()
        self.assertEqual((fields["RELOADING"], fields["STATUS"]), ("1", "Reloading"))
        self.assertTrue(before <= int(fields["MONOTONIC_USEC"]) <= after)

    def test_a_line_end_cannot_add_a_field(self):
        """A value holding a line end stays one field: it cannot smuggle in READY=1."""
        notify.Notifier({"NOTIFY_SOCKET": self.path}).stopping("bad\nREADY=1")
        self.assertEqual(self.receiver.receive()[0], {"STOPPING": "1", "STATUS": "bad READY=1"})

    def test_nobody_listening_is_logged(self):
        """A socket that is not there is a logged warning, not an error of the server."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        missing = os.path.join(os.path.dirname(self.path), "missing")
        self.assertFalse(notify.Notifier({"NOTIFY_SOCKET": missing}).ready("x"))
        [event] = [e for e in observer if "notify_failed" in e["log_format"]]
        self.assertEqual(event["sending"], "READY=1")

    def test_other_address_kinds_are_ignored(self):
        """An address neither a path nor abstract (systemd 254's vsock:) is logged, unused."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        notifier = notify.Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
        self.assertIsNone(notifier.address)
        self.assertFalse(notifier.ready("x"))
        [event] = [e for e in observer if "notify_unsupported" in e["log_format"]]
        self.assertEqual(event["address"], "vsock:2:1234")


class ServiceTests(SynchronousTestCase):
    """make_service's NotifyService and SIGHUP reload, on a memory reactor."""

    def setUp(self):
        self.path = os.path.join(socket_dir(self), "notify")
        self.receiver = Receiver(self, self.path)
        root = os.path.abspath(self.mktemp())
        self.config = Config(
            mailroot=os.path.join(root, "mail"),
            users=os.path.join(root, "users"),
            state_dir=os.path.join(root, "state"),
            tls_self_signed_dir=os.path.join(root, "tls"),
            pop3_listen=("tcp:1110:interface=127.0.0.1",),
            pop3s_listen=(),
            smtp_listen=("tcp:2525:interface=127.0.0.1",),
        )
        self.reactor = MemoryReactorClock()
        with mock.patch.dict(os.environ, {"NOTIFY_SOCKET": self.path}):
            self.top = service.make_service(self.config, reactor=self.reactor)

    def fields(self) -> dict[str, str]:
        return self.receiver.receive()[0]

    def test_ready_once_the_reactor_runs(self):
        """READY=1 waits for the reactor to run, after every other part has started."""
        self.top.privilegedStartService()
        self.top.startService()
        self.addCleanup(self.top.stopService)
        self.assertTrue(self.receiver.nothing_waiting())
        self.assertEqual([s.name for s in self.top][-1], "systemd-notify")
        self.reactor.run()
        self.assertEqual(
            self.fields(),
            {
                "READY": "1",
                "STATUS": "Serving POP3 on tcp:1110:interface=127.0.0.1, POP3S on none, "
                "SMTP on tcp:2525:interface=127.0.0.1",
            },
        )

    def test_stopping_before_the_listeners_close(self):
        """STOPPING=1 is sent when the service stops, while the listeners still listen."""
        self.top.privilegedStartService()
        self.top.startService()
        self.reactor.run()
        self.fields()
        listener = self.top.getServiceNamed("pop3-0")
        seen = []
        original = self.top.getServiceNamed("systemd-notify").notifier.stopping

        def stopping(status):
            seen.append(listener.running)
            return original(status)

        self.top.getServiceNamed("systemd-notify").notifier.stopping = stopping
        self.top.stopService()
        self.assertEqual(self.fields()["STOPPING"], "1")
        self.assertEqual(seen, [True])

    def test_sighup_reload_is_announced(self):
        """A reload is RELOADING=1, then READY=1 once the certificate has been re-read."""
        reloader = self.top.getServiceNamed("tls-reload")
        reloader._reload_now()
        self.assertEqual(self.fields()["RELOADING"], "1")
        self.assertEqual(self.fields()["READY"], "1")

    def test_failed_reload_still_ends_the_reload(self):
        """A reload that fails, or raises, still sends READY=1, and the status says so."""
        notifier = self.top.getServiceNamed("systemd-notify")
        for outcome in (lambda: False, lambda: 1 / 0):
            reloader = service.ReloadOnSIGHUP(outcome, self.reactor, notify=notifier)
            try:
                reloader._reload_now()
            except ZeroDivisionError:
                pass
            self.assertEqual(self.fields()["RELOADING"], "1")
            ready = self.fields()
            self.assertEqual(ready["READY"], "1")
            self.assertIn("the TLS reload failed", ready["STATUS"])


class LiveTests(SynchronousTestCase):
    """A real twistd popserv, started as systemd starts etc/popserv.service."""

    def setUp(self):
        self.path = os.path.join(socket_dir(self), "notify")
        self.receiver = Receiver(self, self.path)
        settings = {}
        if os.geteuid() == 0:
            # As the unit's alternative: root binds, then becomes [server] user.
            self.user = pwd.getpwnam("nobody")
            settings = {"server": {"user": "nobody"}}
            os.chmod(os.path.dirname(self.path), 0o755)
            os.chmod(self.path, 0o777)
        else:
            self.user = pwd.getpwuid(os.geteuid())
        self.server = TwistdServer(self, {"alice": "secret"}, smtp=True, settings=settings)
        self.server.require_workers_can_run_as(self.user.pw_name)
        # The server's user must reach its files: trial's directory for the test is 0700.
        os.chmod(os.path.dirname(self.server.root), 0o711)
        os.chown(self.server.users_path, self.user.pw_uid, self.user.pw_gid)

    def greeting(self, port: int) -> bytes:
        """The first line a new connection gets, with no retry: the port must answer now."""
        with socket.create_connection(("127.0.0.1", port), 10) as conn:
            return conn.makefile("rb").readline()

    def test_ready_reloading_stopping(self):
        """READY=1 comes from twistd once the ports answer and root is dropped; SIGHUP gives
        RELOADING=1 then READY=1, and SIGTERM STOPPING=1, before the process exits."""
        child = self.server.spawn(env={**os.environ, "NOTIFY_SOCKET": self.path})
        try:
            ready, (pid, uid, gid) = self.receiver.receive()
        except TimeoutError:
            self.fail(f"no READY=1 from twistd (exit {child.poll()}):\n{self.server.log()}")
        self.assertEqual(ready["READY"], "1")
        self.assertIn(f"POP3 on tcp:{self.server.pop3_port}:interface=127.0.0.1", ready["STATUS"])
        self.assertEqual((pid, uid, gid), (child.pid, self.user.pw_uid, self.user.pw_gid))
        self.assertTrue(self.greeting(self.server.pop3_port).startswith(b"+OK"))
        self.assertTrue(self.greeting(self.server.smtp_port).startswith(f"220 {HOST}".encode()))

        child.send_signal(signal.SIGHUP)
        reloading, sender = self.receiver.receive()
        self.assertEqual((reloading["RELOADING"], sender[0]), ("1", child.pid))
        self.assertIn("MONOTONIC_USEC", reloading)
        reloaded, sender = self.receiver.receive()
        self.assertEqual((reloaded["READY"], sender[0]), ("1", child.pid))
        self.assertNotIn("failed", reloaded["STATUS"])
        self.assertIn("tls.reloaded:", self.server.log())

        child.send_signal(signal.SIGTERM)
        stopping, sender = self.receiver.receive()
        self.assertEqual((stopping["STOPPING"], sender[0]), ("1", child.pid))
        # twistd ends by the signal it got, which systemd counts as a clean stop.
        self.assertEqual(child.wait(20), -signal.SIGTERM)
        self.assertIn("Server Shut Down.", self.server.log())
        self.assertTrue(self.receiver.nothing_waiting())
