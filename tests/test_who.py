"""``popserv who``: logged-in sessions, from the registry to each process's socket to the table."""

import json
import os
import poplib
import socket
import subprocess
import sys

from twisted.internet import reactor, task, threads
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from popserv import sessions as sessions_module
from popserv.interfaces import ISessionRegistry, OpenSession
from popserv.sessions import (
    WHO_DIR,
    MemorySessionRegistry,
    WhoSocketService,
    read_sessions,
)
from tests.live_twistd import REPO, TwistdServer
from tests.test_pop3 import POP3TestCase


class MemorySessionRegistryTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.registry = MemorySessionRegistry(self.clock, node="pop1.example.org")

    def test_provides_the_interface(self):
        """The in-memory registry provides ISessionRegistry."""
        verifyObject(ISessionRegistry, self.registry)

    def test_opened_sessions_are_listed_until_closed(self):
        """An opened session is in the snapshot, with its login time, pid and node, until closed."""
        alice = self.registry.opened("alice", "192.0.2.7")
        self.clock.advance(5)
        self.registry.opened("bob", "2001:db8::1")
        self.assertEqual(
            sorted(self.registry.snapshot(), key=lambda s: s.user),
            [
                OpenSession("alice", "192.0.2.7", 1_700_000_000, os.getpid(), "pop1.example.org"),
                OpenSession("bob", "2001:db8::1", 1_700_000_005, os.getpid(), "pop1.example.org"),
            ],
        )
        self.registry.closed(alice)
        self.registry.closed(alice)
        self.assertEqual([s.user for s in self.registry.snapshot()], ["bob"])

    def test_same_user_twice(self):
        """Two sessions of one user are two entries; closing one leaves the other."""
        first = self.registry.opened("alice", "192.0.2.7")
        self.registry.opened("alice", "192.0.2.8")
        self.registry.closed(first)
        self.assertEqual([s.peer for s in self.registry.snapshot()], ["192.0.2.8"])


class POP3RegistrationTests(POP3TestCase):
    def listed(self):
        return [(s.user, s.peer) for s in self.factory.sessions.snapshot()]

    def test_not_listed_before_login(self):
        """A connection that has not logged in is not a session to list."""
        self.send(b"USER alice\r\n")
        self.assertEqual(self.listed(), [])

    def test_listed_from_login_to_quit(self):
        """A session is listed once logged in, with its user and address, until QUIT."""
        self.login()
        self.assertEqual(self.listed(), [("alice", "192.0.2.7")])
        self.send(b"QUIT\r\n")
        self.assertEqual(self.listed(), [])

    def test_dropped_session_is_unlisted(self):
        """A logged-in session that drops is no longer listed."""
        self.login()
        self.proto.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual(self.listed(), [])

    def test_failed_login_is_not_listed(self):
        """A failed login lists nothing."""
        self.send(b"USER alice\r\nPASS wrong\r\n")
        self.clock.advance(self.config.pop3_failure_delay)
        self.assertEqual(self.listed(), [])


def stale_socket(directory: str, name: str) -> None:
    """Leave a socket file nobody listens on, as a killed server does."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(f"/proc/self/fd/{fd}/{name}")
    finally:
        os.close(fd)


class WhoSocketTests(unittest.TestCase):
    """The per-process socket, served in this process, read as ``popserv who`` reads it."""

    def setUp(self):
        # Deep under the test's directory: longer than a socket address may be.
        deep = "d" * max(1, 110 - len(os.path.abspath(self.mktemp())))
        self.directory = os.path.abspath(os.path.join(self.mktemp(), deep, "state", WHO_DIR))
        os.makedirs(self.directory)
        self.registry = MemorySessionRegistry(reactor, node="here")
        self.service = WhoSocketService(self.registry, self.directory, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def read(self):
        return threads.deferToThread(read_sessions, self.directory)

    def test_path_is_long(self):
        """This test's socket path is over the 107 octets of a socket address."""
        self.assertGreater(len(os.path.join(self.directory, f"{os.getpid()}.sock")), 107)

    async def test_snapshot_over_the_socket(self):
        """Each connection gets the registry's snapshot; the socket is the owner's only."""
        self.registry.opened("alice", "127.0.0.1")
        sessions, problems = await self.read()
        self.assertEqual(problems, [])
        self.assertEqual(
            [(s.user, s.peer, s.pid) for s in sessions], [("alice", "127.0.0.1", os.getpid())]
        )
        mode = os.stat(os.path.join(self.directory, f"{os.getpid()}.sock")).st_mode & 0o777
        self.assertEqual(mode, 0o600)

    async def test_stale_socket_is_removed(self):
        """A socket nobody listens on (its server is gone) is skipped and removed."""
        stale = os.path.join(self.directory, "999999999.sock")
        stale_socket(self.directory, "999999999.sock")
        self.assertTrue(os.path.exists(stale))
        sessions, problems = await self.read()
        self.assertEqual((sessions, problems), ([], []))
        self.assertFalse(os.path.exists(stale))

    async def test_socket_removed_at_stop(self):
        """Stopping the service removes its socket."""
        await self.service.stopService()
        self.assertEqual(os.listdir(self.directory), [])
        self.service.startService()


def run_who(*args: str) -> subprocess.CompletedProcess:
    """``popserv who`` as an admin runs it: a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "popserv", "who", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


class TwistdWhoTests(unittest.TestCase):
    """``popserv who --config`` against a real ``twistd popserv``, with poplib logged in."""

    def setUp(self):
        self.server = TwistdServer(self, {"alice": "secret", "bob": "hunter2"})
        self.server.start()
        self.who_dir = os.path.join(self.server.root, "state", WHO_DIR)

    def login(self, user: str, password: str) -> poplib.POP3:
        client = poplib.POP3("127.0.0.1", self.server.pop3_port, timeout=10)
        client.user(user)
        client.pass_(password)
        return client

    def test_lists_an_open_session_until_quit(self):
        """A logged-in user is listed with address, time, pid (of the process serving the
        session) and node; after QUIT, not."""
        client = self.login("alice", "secret")
        anonymous = poplib.POP3("127.0.0.1", self.server.pop3_port, timeout=10)
        ran = run_who("--config", self.server.config_path)
        self.assertEqual(ran.returncode, 0, ran.stderr)
        header, *rows = ran.stdout.splitlines()
        self.assertEqual(header.split(), ["USER", "ADDRESS", "SINCE", "PID", "NODE"])
        self.assertEqual(len(rows), 1, ran.stdout)
        user, address, since, pid, node = rows[0].split()
        self.assertEqual((user, address), ("alice", "127.0.0.1"))
        self.assertIn(int(pid), self.server.serving_pids())
        self.assertEqual(node, socket.gethostname())
        self.assertRegex(since, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$")
        client.quit()
        anonymous.quit()
        ran = run_who("--config", self.server.config_path)
        self.assertEqual((ran.returncode, ran.stdout.splitlines()[1:]), (0, []))

    def test_json(self):
        """--json prints one object per session."""
        client = self.login("bob", "hunter2")
        ran = run_who("--config", self.server.config_path, "--json")
        self.assertEqual(ran.returncode, 0, ran.stderr)
        (entry,) = json.loads(ran.stdout)
        self.assertEqual((entry["user"], entry["address"]), ("bob", "127.0.0.1"))
        self.assertIn(entry["pid"], self.server.serving_pids())
        client.quit()

    def test_dead_server_is_ignored_and_its_socket_removed(self):
        """After SIGKILL the server's sockets are left behind; popserv who removes them."""
        self.login("alice", "secret")
        sockets = sorted(f"{pid}.sock" for pid in self.server.serving_pids())
        self.server.kill()
        self.assertEqual(sorted(os.listdir(self.who_dir)), sockets)
        ran = run_who("--state-dir", os.path.join(self.server.root, "state"))
        self.assertEqual((ran.returncode, ran.stdout.splitlines()[1:]), (0, []), ran.stderr)
        self.assertEqual(os.listdir(self.who_dir), [])

    def test_clean_stop_removes_the_socket(self):
        """A server that stops cleanly leaves no socket behind: one per serving process."""
        self.assertEqual(
            sorted(os.listdir(self.who_dir)),
            sorted(f"{pid}.sock" for pid in self.server.serving_pids()),
        )
        self.server.stop()
        self.assertEqual(os.listdir(self.who_dir), [])


class ServiceTests(unittest.TestCase):
    def test_who_socket_service_and_private_directory(self):
        """The server has a who socket service, over <state_dir>/who made with mode 0700."""
        from twisted.internet.testing import MemoryReactorClock

        from popserv import service
        from popserv.config import Config

        root = os.path.abspath(self.mktemp())
        config = Config(
            mailroot=os.path.join(root, "mail"),
            users=os.path.join(root, "users"),
            state_dir=os.path.join(root, "state"),
            pop3_listen=("tcp:0:interface=127.0.0.1",),
            pop3s_listen=(),
            smtp_listen=(),
            tls_self_signed_dir=os.path.join(root, "tls"),
        )
        top = service.make_service(config, reactor=MemoryReactorClock())
        who = top.getServiceNamed("who")
        self.assertIsInstance(who, WhoSocketService)
        self.assertIs(who.registry, top.getServiceNamed("pop3-0").factory.sessions)
        self.assertEqual(os.stat(os.path.join(root, "state", WHO_DIR)).st_mode & 0o777, 0o700)


class WhoCommandTests(unittest.TestCase):
    def test_state_directory_no_server_used(self):
        """A state directory no server has used is an error naming it, not an empty list."""
        state_dir = os.path.abspath(self.mktemp())
        ran = run_who("--state-dir", state_dir)
        self.assertEqual(ran.returncode, 1)
        self.assertIn(os.path.join(state_dir, WHO_DIR), ran.stderr)
        self.assertEqual(ran.stdout, "")

    def test_socket_of_a_process_killed_while_asked(self):
        """A process killed with the question in its queue resets it: asked again, the
        socket refuses (the process is gone), so it is skipped and removed, not reported."""
        state_dir = os.path.abspath(self.mktemp())
        directory = os.path.join(state_dir, WHO_DIR)
        os.makedirs(directory)
        stale_socket(directory, "7.sock")
        answers = [ConnectionResetError(104, "Connection reset by peer"), None]

        def ask(path, timeout):
            answer = answers.pop(0)
            if answer is None:
                raise ConnectionRefusedError(111, "Connection refused")
            raise answer

        self.patch(sessions_module, "_ask", ask)
        self.assertEqual(read_sessions(directory), ([], []))
        self.assertEqual((answers, os.listdir(directory)), ([], []))

    def test_unanswering_socket_is_reported(self):
        """A socket that accepts but never answers is reported after the others, status 1."""
        state_dir = os.path.abspath(self.mktemp())
        directory = os.path.join(state_dir, WHO_DIR)
        os.makedirs(directory)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            self.addCleanup(os.close, fd)
            s.bind(f"/proc/self/fd/{fd}/1.sock")
            s.listen()
            sessions, problems = read_sessions(directory, timeout=0.1)
        self.assertEqual(sessions, [])
        self.assertEqual(len(problems), 1)
        self.assertIn("1.sock", problems[0])
