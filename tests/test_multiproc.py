"""``twistd popserv --workers 2``: real processes on loopback, and the supervisor's parts alone.

The live tests tell which worker served a session from ``popserv who``'s sockets (one per
worker, listing its logged-in sessions with its pid).  Where a test needs a connection to
land on one given worker, it stops the other with SIGSTOP: a stopped process accepts
nothing, so the listening socket they share hands the connection to the one running.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from popserv import supervisor
from popserv.config import Config
from popserv.logs import event_as_json
from popserv.pop3.replies import Reply
from popserv.sessions import read_sessions
from popserv.ticketkeys import TicketKeys
from popserv.tls import generate_self_signed
from popserv.worker import (
    AUTH_CACHE_KEY_FRAME,
    TICKET_KEYS_FRAME,
    WORKER_ENV,
    FrameReader,
    ParentWatch,
    auth_cache_key_frame,
    config_from_json,
    config_to_json,
    credentials_frame,
    read_auth_cache_key,
    read_credentials,
    read_ticket_keys,
    ticket_keys_frame,
)
from tests.live import require_client
from tests.live_smtp import free_port
from tests.live_twistd import REPO, TWISTD, TwistdServer, children, python_runs_as
from tests.test_tls_tickets import require_shared_ticket_keys

READY = re.compile(r"popserv\.worker_ready: pid=(\d+)")


class WorkersServer(TwistdServer):
    """A ``TwistdServer`` with ``[server] workers`` set, and ways to see its workers."""

    def __init__(self, testcase, users, *, workers: int = 2, settings=None, **kw):
        settings = {key: dict(value) for key, value in (settings or {}).items()}
        settings.setdefault("server", {})["workers"] = str(workers)
        super().__init__(testcase, users, settings=settings, **kw)
        self.testcase = testcase
        self.count = workers
        testcase.addCleanup(self.resume_all)

    def start(self, timeout: float = 30.0) -> None:
        super().start(timeout)
        self.wait_ready(timeout=timeout)

    def workers(self) -> list[int]:
        """The pids of the supervisor's living children."""
        return children(self.process.pid)

    def wait_ready(self, exclude=(), timeout: float = 30.0) -> list[int]:
        """Wait until ``count`` workers, none of them in ``exclude``, say they serve."""
        deadline = time.monotonic() + timeout
        while True:
            ready = {int(pid) for pid in READY.findall(self.log())}
            pids = [pid for pid in self.workers() if pid in ready and pid not in exclude]
            if len(pids) == self.count and len(self.workers()) == self.count:
                return pids
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"workers not ready ({pids}):\n{self.log()}")
            time.sleep(0.05)

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 20.0) -> str:
        """The log once ``pattern`` (a regular expression) is in it ``count`` times: the
        supervisor writes a worker's events a moment after the worker sent them."""
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, log := self.log())) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not {count} times in the log:\n{log}")
            time.sleep(0.05)
        return log

    def serving(self) -> list[int]:
        """The pid of each open session, as popserv who lists them."""
        sessions, problems = read_sessions(self.who_dir)
        self.testcase.assertEqual(problems, [])
        return [session.pid for session in sessions]

    def session_pid(self, port=None, tls=False) -> int:
        """Log in, ask which worker holds the session, log out: that worker's pid."""
        with Client(port or self.pop3_port, tls=tls) as client:
            client.login("alice", "secret")
            # A stopped worker would not answer popserv who.
            self.resume_all()
            (pid,) = self.serving()
            client.quit()
        return pid

    def only(self, pid: int) -> None:
        """Stop every worker but ``pid`` (SIGSTOP), so that it takes the next connections."""
        self.resume_all()
        for other in self.workers():
            if other != pid:
                os.kill(other, signal.SIGSTOP)

    def resume_all(self) -> None:
        if self.process is not None and self.process.poll() is None:
            for pid in self.workers():
                os.kill(pid, signal.SIGCONT)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Client:
    """A POP3 client on one connection, from a chosen source address, optionally POP3S."""

    def __init__(self, port: int, source: str = "127.0.0.1", tls: bool = False, proxy=b""):
        sock = socket.create_connection(("127.0.0.1", port), 10, source_address=(source, 0))
        if proxy:
            sock.sendall(proxy)
        if tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            sock = context.wrap_socket(sock)
        self.sock = sock
        self.file = sock.makefile("rb")
        self.greeting = self.file.readline()
        if not self.greeting.startswith(b"+OK"):
            raise AssertionError(f"no greeting: {self.greeting!r}")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def command(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.file.readline().rstrip(b"\r\n")

    def login(self, user: str, password: str) -> bytes:
        assert self.command(f"USER {user}").startswith(b"+OK")
        reply = self.command(f"PASS {password}")
        if not reply.startswith(b"+OK"):
            raise AssertionError(f"login refused: {reply!r}")
        return reply

    def quit(self) -> bytes:
        return self.command("QUIT")

    def fingerprint(self) -> str:
        """SHA-256 of the server's certificate, as popserv.tls.fingerprint writes it."""
        der = self.sock.getpeercert(binary_form=True)
        return hashlib.sha256(der).digest().hex(":").upper()


class WorkersTests(SynchronousTestCase):
    """A real ``twistd -n popserv --workers 2`` (set as [server] workers) on loopback."""

    def setUp(self):
        self.pop3s_port = free_port()
        self.server = WorkersServer(
            self,
            {"alice": "secret", "bob": "hunter2"},
            settings={
                "pop3": {"max_failures": "5"},
                "pop3s": {"listen": f"tcp:{self.pop3s_port}:interface=127.0.0.1"},
            },
        )
        self.server.start()

    def test_both_workers_accept(self):
        """Two worker processes, children of twistd, both serve sessions on the one port."""
        workers = self.server.workers()
        self.assertEqual(len(workers), 2)
        self.assertNotIn(self.server.process.pid, workers)
        seen = set()
        for _ in range(100):
            seen.add(self.server.session_pid())
            if len(seen) == 2:
                break
        self.assertEqual(seen, set(workers))
        for pid in workers:
            self.server.wait_log(rf"\[popserv.pop3#info,worker={pid}\] pop3.login: peer=127.0.0.1")

    def test_killed_worker_is_replaced_while_the_other_serves(self):
        """SIGKILL one worker: every session meanwhile works, on the other; a new worker
        takes the dead one's place and serves too."""
        killed, survivor = self.server.workers()
        os.kill(killed, signal.SIGKILL)
        served = []
        deadline = time.monotonic() + 30
        while True:
            # Any failure to connect, log in or quit fails the test.
            served.append(self.server.session_pid())
            new = set(served) - {killed, survivor}
            if new:
                break
            self.assertLess(time.monotonic(), deadline, f"no new worker:\n{self.server.log()}")
        self.assertNotIn(killed, served)
        self.assertEqual(served[0], survivor)
        (replacement,) = new
        self.assertEqual(sorted(self.server.workers()), sorted([survivor, replacement]))
        self.assertIn(f"popserv.worker_ended: pid={killed} killed by signal 9", self.server.log())

    def test_killed_supervisor_takes_its_workers_along(self):
        """SIGKILL of twistd ends its workers too, as it ends the sessions of a server of
        one process, so the next start finds the ports free."""
        workers = self.server.workers()
        self.server.kill()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers):
            self.assertLess(time.monotonic(), deadline, "a worker outlived twistd")
            time.sleep(0.05)
        self.server.start()
        self.assertFalse(set(self.server.workers()) & set(workers))
        self.assertIn(self.server.session_pid(), self.server.workers())

    def test_sighup_reloads_the_certificate_in_every_worker(self):
        """After the certificate files change and twistd gets SIGHUP, POP3S connections to
        either worker present the new certificate."""
        old = {self.fingerprint_on(pid) for pid in self.server.workers()}
        self.assertEqual(len(old), 1)
        fresh = os.path.abspath(self.mktemp())
        cert, key = generate_self_signed("renewed.test", fresh)
        tls_dir = os.path.join(self.server.root, "tls")
        shutil.copy(cert, os.path.join(tls_dir, "cert.pem"))
        shutil.copy(key, os.path.join(tls_dir, "key.pem"))
        self.server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while self.server.log().count("tls.reloaded:") < 2:
            self.assertLess(time.monotonic(), deadline, self.server.log())
            time.sleep(0.05)
        new = {pid: self.fingerprint_on(pid) for pid in self.server.workers()}
        self.assertEqual(len(set(new.values())), 1)
        self.assertNotEqual(set(new.values()), old)
        for pid in new:
            self.assertRegex(self.server.log(), rf"\[popserv.tls#info,worker={pid}\] tls.reloaded")

    def test_a_new_worker_gets_the_key_from_the_supervisor(self):
        """Workers are handed the certificate and key the supervisor read at start (as root,
        when started so), not the files: with the key file gone, a worker started in a dead
        one's place still serves POP3S, with the same certificate."""
        before = {self.fingerprint_on(pid) for pid in self.server.workers()}
        os.remove(os.path.join(self.server.root, "tls", "key.pem"))
        killed, survivor = self.server.workers()
        os.kill(killed, signal.SIGKILL)
        (replacement,) = set(self.server.wait_ready(exclude=(killed,))) - {survivor}
        self.assertEqual(self.fingerprint_on(replacement), before.pop())
        self.assertNotIn("cannot read the TLS key", self.server.log())

    def fingerprint_on(self, pid: int) -> str:
        """The certificate a POP3S connection served by worker ``pid`` gets."""
        self.server.only(pid)
        try:
            with Client(self.pop3s_port, tls=True) as client:
                client.login("alice", "secret")
                self.server.resume_all()
                self.assertEqual(self.server.serving(), [pid])
                client.quit()
                return client.fingerprint()
        finally:
            self.server.resume_all()

    def test_sigterm_stops_every_process_without_committing(self):
        """SIGTERM: twistd and both workers exit; a session left open commits nothing."""
        workers = self.server.workers()
        maildir = self.server.maildir("alice")
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(maildir, sub), exist_ok=True)
        with open(os.path.join(maildir, "new", "1.M1P1.test,S=12"), "wb") as f:
            f.write(b"Subject: x\n\n")
        client = Client(self.server.pop3_port)
        self.addCleanup(client.sock.close)
        client.login("alice", "secret")
        self.assertTrue(client.command("DELE 1").startswith(b"+OK"))
        self.server.process.send_signal(signal.SIGTERM)
        # twistd ends by the signal it got, which systemd counts as a clean stop.
        self.assertEqual(self.server.process.wait(30), -signal.SIGTERM)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers):
            self.assertLess(time.monotonic(), deadline, "a worker outlived twistd")
            time.sleep(0.05)
        self.assertEqual(client.file.readline(), b"")
        self.assertEqual(os.listdir(os.path.join(maildir, "new")), ["1.M1P1.test,S=12"])
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", self.server.pop3_port), 5)
        log = self.server.log()
        for pid in workers:
            self.assertIn(f"popserv.worker_stopped: pid={pid} exited with status 0", log)
        self.assertIn("Server Shut Down.", log)

    def test_lockout_counts_failures_on_both_workers(self):
        """Six wrong passwords from 127.0.0.1, three on each worker, with max_failures = 5:
        the sixth is refused as too many failures; 127.0.0.2 still logs in."""
        one, two = self.server.workers()
        replies = []
        for pid in (one, two, one, two, one, two):
            self.server.only(pid)
            with Client(self.server.pop3_port) as client:
                client.command("USER alice")
                replies.append(client.command("PASS wrong"))
                client.quit()
        self.server.resume_all()
        self.assertEqual(replies, [Reply.AUTH_FAILED] * 5 + [Reply.TOO_MANY_FAILURES])
        for pid in (one, two):
            failed = rf"\[popserv.pop3#info,worker={pid}\] pop3.login_failed: peer=127.0.0.1"
            self.assertEqual(len(re.findall(failed, self.server.wait_log(failed, 3))), 3, pid)
        with Client(self.server.pop3_port, source="127.0.0.2") as client:
            client.login("alice", "secret")
            client.quit()

    def test_fail2ban_reads_the_workers_events(self):
        """fail2ban's filter counts failed logins however many workers logged them."""
        require_client("fail2ban-regex")
        from tests.test_fail2ban import fail2ban_regex

        for pid in self.server.workers():
            self.server.only(pid)
            with Client(self.server.pop3_port) as client:
                client.command("USER alice")
                client.command("PASS wrong")
        self.server.resume_all()
        self.server.stop()
        lines, matched, ips = fail2ban_regex(self.server.log_path)
        self.assertEqual((matched, ips), (2, ["127.0.0.1"] * 2))

    def test_popserv_who_lists_every_workers_sessions(self):
        """popserv who --json lists the sessions of both workers, each with its pid."""
        one, two = self.server.workers()
        clients = []
        for pid, user, password in ((one, "alice", "secret"), (two, "bob", "hunter2")):
            self.server.only(pid)
            client = Client(self.server.pop3_port)
            self.addCleanup(client.sock.close)
            client.login(user, password)
            clients.append(client)
        self.server.resume_all()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "popserv",
                "who",
                "--state-dir",
                os.path.join(self.server.root, "state"),
                "--json",
            ],
            cwd=REPO,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        listed = sorted((s["user"], s["pid"]) for s in json.loads(out))
        self.assertEqual(listed, [("alice", one), ("bob", two)])


class ListenerKindsTests(SynchronousTestCase):
    """systemd:, haproxy: and unix: listeners, each served by both workers."""

    def test_socket_activation(self):
        """Sockets passed as systemd passes them (index 0 and 1) serve POP3 and SMTP on both
        workers; the workers never see systemd's variables."""
        activate = require_client("systemd-socket-activate")
        server = WorkersServer(
            self,
            {"alice": "secret"},
            settings={
                "pop3": {"listen": "systemd:domain=INET:index=0"},
                "smtp": {"listen": "systemd:domain=INET:index=1"},
            },
        )
        smtp_port = free_port()
        argv = [
            activate,
            f"--listen=127.0.0.1:{server.pop3_port}",
            f"--listen=127.0.0.1:{smtp_port}",
            "--fdname=popserv.socket:popserv.socket",
            sys.executable,
            "-c",
            TWISTD,
            "--nodaemon",
            "--pidfile=",
            f"--logfile={server.log_path}",
            "popserv",
            f"--config={server.config_path}",
        ]
        server.process = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        # systemd-socket-activate starts twistd at the first connection.
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", server.pop3_port), 1)
                break
            except OSError:
                self.assertLess(time.monotonic(), deadline, "systemd-socket-activate is not up")
                time.sleep(0.05)
        with conn:
            conn.settimeout(30)
            self.assertTrue(conn.recv(100).startswith(b"+OK"))
        for pid in server.wait_ready():
            server.only(pid)
            with socket.create_connection(("127.0.0.1", smtp_port), 10) as conn:
                conn.settimeout(10)
                self.assertTrue(conn.recv(100).startswith(b"220 twistd.test ESMTP"))
                self.assertEqual(server.session_pid(), pid)
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            self.assertFalse([v for v in environ if v.startswith(b"LISTEN_")])

    def test_haproxy_and_unix(self):
        """A haproxy: listener reads the PROXY header on either worker before POP3 begins;
        a unix: socket is served by both, and a worker that stops cleanly leaves both
        sockets (and the path) to the others."""
        directory = tempfile.mkdtemp(prefix="popserv-mp-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "pop3.sock")
        port = free_port()
        listen = f"\n    haproxy:tcp:{port}:interface=127.0.0.1\n    unix:{path}"
        server = WorkersServer(self, {"alice": "secret"}, settings={"pop3": {"listen": listen}})
        server.spawn()
        pids = server.wait_ready()
        header = f"PROXY TCP4 127.0.0.5 127.0.0.1 5555 {port}\r\n".encode()
        for pid in pids:
            server.only(pid)
            with Client(port, proxy=header) as client:
                # Taken as a POP3 command, the header would be answered -ERR first.
                client.login("alice", "secret")
                server.resume_all()
                self.assertEqual(server.serving(), [pid])
                client.quit()
            server.only(pid)
            with UnixClient(path) as client:
                client.login("alice", "secret")
                server.resume_all()
                self.assertEqual(server.serving(), [pid])
                client.quit()
        os.kill(pids[0], signal.SIGTERM)
        (survivor,) = [pid for pid in server.wait_ready(exclude=[pids[0]]) if pid in pids]
        self.assertTrue(os.path.exists(path))
        for _ in range(4):
            with UnixClient(path) as client:
                client.login("alice", "secret")
                client.quit()
            with Client(port, proxy=header) as client:
                client.login("alice", "secret")
                client.quit()
        server.stop()
        self.assertFalse(os.path.exists(path))


class UnixClient(Client):
    """The POP3 client over a Unix socket."""

    def __init__(self, path: str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(path)
        self.sock = sock
        self.file = sock.makefile("rb")
        self.greeting = self.file.readline()
        if not self.greeting.startswith(b"+OK"):
            raise AssertionError(f"no greeting: {self.greeting!r}")


class WatchingTests(SynchronousTestCase):
    """What admins see of a server of workers: systemd's notifications, the metrics."""

    def test_ready_once_both_workers_serve(self):
        """READY=1 comes from twistd only once both workers serve; SIGHUP gives RELOADING=1
        then READY=1, SIGTERM STOPPING=1; the workers send nothing."""
        from tests.test_notify import Receiver, socket_dir

        path = os.path.join(socket_dir(self), "notify")
        receiver = Receiver(self, path)
        server = WorkersServer(self, {"alice": "secret"})
        child = server.spawn(env={**os.environ, "NOTIFY_SOCKET": path})
        ready, (pid, _, _) = receiver.receive()
        self.assertEqual((ready["READY"], pid), ("1", child.pid))
        self.assertEqual(len(READY.findall(server.log())), 2)
        self.assertIn("with 2 workers", ready["STATUS"])
        child.send_signal(signal.SIGHUP)
        reloading, (pid, _, _) = receiver.receive()
        self.assertEqual((reloading["RELOADING"], pid), ("1", child.pid))
        reloaded, (pid, _, _) = receiver.receive()
        self.assertEqual((reloaded["READY"], pid), ("1", child.pid))
        child.send_signal(signal.SIGTERM)
        stopping, (pid, _, _) = receiver.receive()
        self.assertEqual((stopping["STOPPING"], pid), ("1", child.pid))
        child.wait(30)
        self.assertTrue(receiver.nothing_waiting())

    def test_metrics_are_summed_over_the_workers(self):
        """The supervisor's /metrics counts the logins of both workers, and still does
        after one of them is killed and replaced."""
        metrics_port = free_port()
        server = WorkersServer(
            self,
            {"alice": "secret"},
            settings={"metrics": {"listen": f"tcp:{metrics_port}:interface=127.0.0.1"}},
        )
        server.start()
        one, two = server.workers()
        for pid in (one, two, two):
            server.only(pid)
            self.assertEqual(server.session_pid(), pid)
        server.resume_all()
        self.assertEqual(scrape(metrics_port)['popserv_pop3_logins_total{result="ok"}'], 3)
        os.kill(one, signal.SIGKILL)
        server.wait_ready(exclude=[one])
        page = scrape(metrics_port)
        self.assertEqual(page['popserv_pop3_logins_total{result="ok"}'], 3)
        self.assertEqual(page["popserv_pop3_sessions"], 0)


def scrape(port: int) -> dict[str, float]:
    """The samples of a /metrics page: name{labels} -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


class TicketKeyTests(SynchronousTestCase):
    """TLS sessions resume whichever worker takes the next connection (the workers share
    the supervisor's ticket keys), as ``openssl s_client -sess_out``/``-sess_in`` see it.

    Each connection is steered to one worker by stopping the other (SIGSTOP), so the
    reconnections alternate between the two: none lands where its ticket was made by luck.
    """

    def setUp(self):
        self.openssl = require_client("openssl")
        require_shared_ticket_keys()
        self.pop3s_port = free_port()
        self.server = WorkersServer(
            self,
            {"alice": "secret"},
            settings={"pop3s": {"listen": f"tcp:{self.pop3s_port}:interface=127.0.0.1"}},
        )
        self.server.start()
        self.session_file = os.path.abspath(self.mktemp())

    def s_client(self, version: str, *, first: bool = False, stls: bool = False) -> str:
        """One POP3S (or STLS) connection that waits for the greeting and QUITs; "New" or
        "Reused", as openssl says of its TLS session."""
        args = [self.openssl, "s_client", version, "-crlf", "-ign_eof"]
        if stls:
            args += ["-connect", f"127.0.0.1:{self.server.pop3_port}", "-starttls", "pop3"]
        else:
            args += ["-connect", f"127.0.0.1:{self.pop3s_port}"]
        args += ["-sess_out" if first else "-sess_in", self.session_file]
        ran = subprocess.run(args, input=b"QUIT\n", capture_output=True, timeout=20)
        out = ran.stdout.decode("utf-8", "replace")
        self.assertIn("+OK Bye", out, ran.stderr)
        (state,) = re.findall(r"^(New|Reused), TLSv", out, re.MULTILINE)
        return state

    def resumes_on_both(self, version: str, stls: bool = False) -> None:
        first, second = self.server.workers()
        self.server.only(first)
        self.assertEqual(self.s_client(version, first=True, stls=stls), "New")
        landed = []
        for turn in range(6):
            pid = (second, first)[turn % 2]
            self.server.only(pid)
            landed.append((pid, self.s_client(version, stls=stls)))
        self.server.resume_all()
        self.assertEqual(landed, [(pid, "Reused") for pid, _ in landed])
        self.assertEqual({pid for pid, _ in landed}, {first, second})
        for _ in range(4):
            self.assertEqual(self.s_client(version, stls=stls), "Reused")
        self.assertNotIn("tls.ticket_keys_local", self.server.log())

    def test_tls13_tickets_resume_on_every_worker(self):
        """A TLS 1.3 ticket from one worker resumes on the other, every time."""
        self.resumes_on_both("-tls1_3")

    def test_tls12_tickets_resume_on_every_worker(self):
        """So does a TLS 1.2 session ticket."""
        self.resumes_on_both("-tls1_2")

    def test_stls_sessions_resume_on_every_worker(self):
        """STLS on the POP3 port uses the same keys."""
        self.resumes_on_both("-tls1_3", stls=True)

    def test_sighup_keeps_the_keys(self):
        """After a certificate reload (a new context in each worker), a session from before
        it resumes on either worker."""
        first, second = self.server.workers()
        self.server.only(first)
        self.assertEqual(self.s_client("-tls1_3", first=True), "New")
        self.server.resume_all()
        self.server.process.send_signal(signal.SIGHUP)
        self.server.wait_log(r"tls\.reloaded:", count=2)
        for pid in (second, first):
            self.server.only(pid)
            self.assertEqual(self.s_client("-tls1_3"), "Reused")


class StartFailureTests(SynchronousTestCase):
    """A worker that cannot start stops the server, with the worker's error in the log."""

    def test_key_the_server_user_cannot_read(self):
        """Started as root with [server] user = nobody and a key only root may read, the
        supervisor reads the key as root and hands it to its workers, which serve POP3S as
        nobody."""
        if os.geteuid() != 0:
            raise SkipTest("needs root, to become [server] user")
        if not python_runs_as("nobody"):
            raise SkipTest(f"nobody cannot run {sys.executable} (a Python under /root?)")
        keys = os.path.abspath(self.mktemp())
        cert, key = generate_self_signed("twistd.test", keys)
        os.chmod(key, 0o600)  # root's, as certbot leaves a key
        port = free_port()
        server = WorkersServer(
            self,
            {"alice": "secret"},
            settings={
                "server": {"user": "nobody"},
                "tls": {"cert": cert, "key": key},
                "pop3s": {"listen": f"tcp:{port}:interface=127.0.0.1"},
            },
        )
        os.chmod(os.path.dirname(server.root), 0o711)
        server.start()
        for _ in server.workers():
            with Client(port, tls=True) as client:
                self.assertTrue(client.login("alice", "secret").startswith(b"+OK"))
                client.quit()
        self.assertNotIn("popserv.worker_failed", server.log())


class FakeWorkerTransport:
    """What ``spawnProcess`` gives back, recording the signals sent."""

    def __init__(self, pid: int):
        self.pid = pid
        self.signals: list[str] = []
        self.written: list[tuple[int, bytes]] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.written.append((fd, data))


class FakeListener:
    """A ``SharedListener`` already bound, on descriptor ``fd``."""

    def __init__(self, name: str, fd: int, haproxy: bool = False):
        self.name = name
        self.haproxy = haproxy
        self.port = self
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def spec(self, fd: int) -> dict:
        return {
            "name": self.name,
            "description": "tcp:110",
            "fd": fd,
            "family": 2,
            "haproxy": self.haproxy,
        }


class FakeKeeper:
    """A ``SharedStateKeeper`` that remembers which pids it was told to forget."""

    path = "/nonexistent/popserv-shared.sqlite3"
    db = "open"

    def __init__(self):
        self.forgotten: list[int] = []

    def forget(self, pid: int) -> None:
        self.forgotten.append(pid)


class WorkerPoolTests(SynchronousTestCase):
    """The supervisor's pool of workers, with spawnProcess and time faked."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.reactor.running = True
        self.spawned = []
        self.events = []
        self.readied = []
        self.keeper = FakeKeeper()
        self.pool = supervisor.WorkerPool(
            2,
            Config(workers=2),
            [FakeListener("pop3-0", 7), FakeListener("smtp-0", 9, haproxy=True)],
            self.keeper,
            self.reactor,
            spawn=self.spawn,
            on_ready=lambda: self.readied.append(True),
            observer=self.events.append,
        )
        self.pool.startService()

    def spawn(self, protocol, executable, args, env, path, childFDs):
        transport = FakeWorkerTransport(1000 + len(self.spawned))
        self.spawned.append((protocol, args, env, childFDs))
        protocol.makeConnection(transport)
        return transport

    def worker(self, slot: int):
        return self.pool.workers[slot]

    def say_ready(self, worker) -> None:
        line = {
            "namespace": "popserv.worker",
            "level": "info",
            "worker_ready": True,
            "message": "popserv.worker_ready: ...",
            "time": "2026-12-04T09:00:00.000000Z",
        }
        worker.childDataReceived(1, json.dumps(line).encode() + b"\n")

    def end(self, worker, signal_number=9) -> None:
        reason = ProcessTerminated(signal=signal_number) if signal_number else ProcessDone(0)
        worker.processEnded(Failure(reason))

    def test_workers_get_the_sockets_and_the_config(self):
        """Each worker runs popserv.worker with every listening socket from descriptor 3
        and the Config as JSON; systemd's variables stay the supervisor's."""
        self.assertEqual(len(self.spawned), 2)
        protocol, args, env, child_fds = self.spawned[0]
        self.assertEqual(args, [sys.executable, "-m", "popserv.worker"])
        self.assertEqual(child_fds, {0: "w", 1: "r", 2: "r", 3: 7, 4: 9})
        settings = json.loads(env[WORKER_ENV])
        self.assertEqual(config_from_json(settings["config"]), Config(workers=2))
        self.assertEqual(
            [(s["name"], s["fd"], s["haproxy"]) for s in settings["listeners"]],
            [("pop3-0", 3, False), ("smtp-0", 4, True)],
        )
        self.assertEqual(settings["shared_state"], self.keeper.path)
        self.assertNotIn("NOTIFY_SOCKET", env)
        self.assertNotIn("LISTEN_FDS", env)

    def stdin_frames(self, worker) -> list[tuple[bytes, list[bytes]]]:
        """The frames written to ``worker``'s standard input so far."""
        data = b"".join(chunk for fd, chunk in worker.transport.written if fd == 0)
        return FrameReader().feed(data)

    def test_workers_get_the_credentials_then_the_ticket_keys(self):
        """Every worker's standard input starts with the certificate frame, then the
        pool's ticket keys, then its verified-password key: the same for every worker,
        made in memory."""
        keys = self.pool.ticket_keys
        self.assertEqual(len(self.pool.auth_cache_key), 32)
        for slot in (0, 1):
            frames = self.stdin_frames(self.worker(slot))
            self.assertEqual(
                frames,
                [
                    (b"tls", [b"", b""]),
                    (TICKET_KEYS_FRAME, [keys.to_bytes()]),
                    (AUTH_CACHE_KEY_FRAME, [self.pool.auth_cache_key]),
                ],
            )

    def test_a_restarted_worker_gets_the_same_cache_key(self):
        """A worker started in a dead one's place gets the key the others have, so the
        passwords they verified are hits there too; another pool makes another key."""
        key = self.pool.auth_cache_key
        for slot in (0, 1):
            self.say_ready(self.worker(slot))
        self.end(self.worker(1))
        self.reactor.advance(supervisor.RESTART_DELAY)
        self.assertEqual(len(self.spawned), 3)
        self.assertEqual(self.stdin_frames(self.worker(1))[-1], (AUTH_CACHE_KEY_FRAME, [key]))
        other = supervisor.WorkerPool(1, Config(), [], FakeKeeper(), self.reactor, spawn=self.spawn)
        self.assertNotEqual(other.auth_cache_key, key)

    def test_ticket_keys_rotate_for_every_worker(self):
        """Every ROTATION_INTERVAL each worker gets new keys, the previous current one
        kept; a worker started later gets the keys of the moment."""
        first = self.pool.ticket_keys
        self.reactor.advance(supervisor.ROTATION_INTERVAL)
        rotated = self.pool.ticket_keys
        self.assertEqual(rotated.previous, first.current)
        self.assertNotEqual(rotated.current, first.current)
        for slot in (0, 1):
            self.assertEqual(
                self.stdin_frames(self.worker(slot))[-1], (TICKET_KEYS_FRAME, [rotated.to_bytes()])
            )
        for slot in (0, 1):
            self.say_ready(self.worker(slot))
        self.end(self.worker(0))
        self.reactor.advance(supervisor.RESTART_DELAY)
        self.assertEqual(
            self.stdin_frames(self.worker(0))[:2],
            [(b"tls", [b"", b""]), (TICKET_KEYS_FRAME, [rotated.to_bytes()])],
        )
        self.pool.stopService()
        self.reactor.advance(supervisor.ROTATION_INTERVAL)
        self.assertEqual(self.pool.ticket_keys, rotated)

    def test_ready_once_every_worker_serves(self):
        """on_ready is called once, when the last of the first workers says it serves."""
        self.say_ready(self.worker(0))
        self.assertEqual(self.readied, [])
        self.say_ready(self.worker(1))
        self.assertEqual(self.readied, [True])
        self.end(self.worker(0))
        self.reactor.advance(1)
        self.say_ready(self.worker(0))
        self.assertEqual(self.readied, [True])

    def test_restart_backs_off_for_quick_ends(self):
        """A worker that ends soon after its start is restarted after 0.5 s, then 1 s,
        2 s...; one that served STABLE_AFTER seconds is restarted at once."""
        for slot in (0, 1):
            self.say_ready(self.worker(slot))
        waits = []
        for _ in range(4):
            worker = self.worker(0)
            self.end(worker)
            self.assertIsNone(self.pool.workers[0])
            started = len(self.spawned)
            waited = 0.0
            while len(self.spawned) == started:
                self.reactor.advance(0.25)
                waited += 0.25
            waits.append(waited)
            self.say_ready(self.worker(0))
        self.assertEqual(waits, [0.5, 1.0, 2.0, 4.0])
        self.reactor.advance(supervisor.STABLE_AFTER)
        self.end(self.worker(0))
        self.reactor.advance(0)
        self.assertIsNotNone(self.pool.workers[0])
        self.assertEqual(self.keeper.forgotten, [1000, 1002, 1003, 1004, 1005])

    def test_worker_failing_at_start_stops_the_server(self):
        """A worker that ends while the server starts (before every worker served) stops
        the reactor: no restarts."""
        self.end(self.worker(0), signal_number=None)
        self.reactor.advance(1)
        self.assertTrue(self.reactor.hasStopped)
        self.assertEqual(len(self.spawned), 2)

    def test_a_worker_failing_after_the_start_is_restarted(self):
        """Once every worker has served, one that ends before it serves is restarted."""
        for slot in (0, 1):
            self.say_ready(self.worker(slot))
        self.end(self.worker(0))
        self.reactor.advance(0.5)
        self.end(self.worker(0), signal_number=None)
        self.reactor.advance(1.0)
        self.assertFalse(self.reactor.hasStopped)
        self.assertEqual(len(self.spawned), 4)

    def test_unusable_shared_state_stops_the_server(self):
        """Without the shared state no worker starts, and the server stops, saying why."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        reactor = MemoryReactorClock()
        reactor.running = True
        keeper = supervisor.SharedStateKeeper("/nonexistent/dir/shared.sqlite3", reactor)
        keeper.startService()
        self.addCleanup(keeper.stopService)
        pool = supervisor.WorkerPool(1, Config(), [], keeper, reactor, spawn=self.fail)
        pool.startService()
        reactor.advance(0)
        self.assertTrue(reactor.hasStopped)
        (event,) = [e for e in logged if e["log_level"] == LogLevel.critical]
        self.assertIn("popserv.shared_state_unavailable: /nonexistent/dir", formatEvent(event))

    def test_sighup_is_forwarded(self):
        """reload() sends SIGHUP to every serving worker, and to a starting one once it serves."""
        self.say_ready(self.worker(0))
        self.assertTrue(self.pool.reload())
        self.assertEqual(self.worker(0).transport.signals, ["HUP"])
        self.assertEqual(self.worker(1).transport.signals, [])
        self.say_ready(self.worker(1))
        self.assertEqual(self.worker(1).transport.signals, ["HUP"])

    def test_stop_terminates_and_waits(self):
        """stopService sends SIGTERM to each worker and fires once all have ended; none is
        restarted; one still running after STOP_TIMEOUT gets SIGKILL."""
        for slot in (0, 1):
            self.say_ready(self.worker(slot))
        one, two = self.worker(0), self.worker(1)
        d = self.pool.stopService()
        self.assertEqual((one.transport.signals, two.transport.signals), (["TERM"], ["TERM"]))
        self.end(one, signal_number=None)
        self.assertNoResult(d)
        self.reactor.advance(supervisor.STOP_TIMEOUT)
        self.assertEqual(two.transport.signals, ["TERM", "KILL"])
        self.end(two)
        self.successResultOf(d)
        self.reactor.advance(60)
        self.assertEqual(len(self.spawned), 2)

    def test_worker_events_join_the_log(self):
        """A worker's JSON line becomes an event with its namespace, level, time and
        fields, marked with the worker's pid; other output is logged as it is."""
        worker = self.worker(0)
        record = {
            "time": "2026-12-04T09:12:03.120455Z",
            "level": "info",
            "namespace": "popserv.pop3",
            "message": "pop3.login_failed: peer=192.0.2.7 user=alice reason=bad-credentials",
            "peer": "192.0.2.7",
            "user": "alice",
        }
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        line = json.dumps(record).encode()
        worker.childDataReceived(1, line[:20])
        self.assertEqual(self.events, [])
        worker.childDataReceived(1, line[20:] + b"\nnot json\n")
        event = self.events[0]
        self.assertEqual(formatEvent(event), record["message"])
        self.assertEqual(event["log_namespace"], "popserv.pop3")
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event["log_system"], "popserv.pop3#info,worker=1000")
        self.assertEqual(
            (event["peer"], event["user"], event["worker"]), ("192.0.2.7", "alice", 1000)
        )
        self.assertAlmostEqual(event["log_time"], 1796375523.120455, places=3)
        as_json = json.loads(event_as_json(event))
        self.assertEqual(
            {key: as_json[key] for key in ("time", "namespace", "message", "peer", "worker")},
            {
                "time": record["time"],
                "namespace": "popserv.pop3",
                "message": record["message"],
                "peer": "192.0.2.7",
                "worker": 1000,
            },
        )
        self.assertEqual(len(self.events), 1)
        worker.childDataReceived(2, b"Traceback (most recent call last):\n")
        stray = [formatEvent(e) for e in logged if e["log_namespace"] == "popserv.supervisor"]
        self.assertEqual(
            stray,
            [
                "popserv.worker_output: pid=1000 not json",
                "popserv.worker_output: pid=1000 Traceback (most recent call last):",
            ],
        )


class ParentWatchTests(TestCase):
    """Where the kernel does not end a worker with its supervisor, the pipe's end does."""

    def watch(self, data: bytes, received=None) -> defer.Deferred:
        """A watch on a new pipe, ``data`` written and the writing end closed; fires on stop.

        ``received`` is given each frame as ``(kind, parts)``.
        """
        from twisted.internet import reactor

        read, write = os.pipe()
        stopped = defer.Deferred()
        deliver = None if received is None else lambda kind, parts: received((kind, parts))
        watch = ParentWatch(lambda: stopped.callback(None), read, deliver)
        self.addCleanup(os.close, read)
        reactor.addReader(watch)
        self.addCleanup(reactor.removeReader, watch)
        if data:
            os.write(write, data)
        os.close(write)
        return stopped

    def test_hang_up_stops(self):
        """A pipe closed with nothing in it (epoll: a hang-up alone) stops the worker."""
        return self.watch(b"")

    def test_end_of_file_stops(self):
        """A pipe closed after a frame stops the worker once it is read."""
        return self.watch(ticket_keys_frame(TicketKeys.make()))

    def test_frames_while_serving(self):
        """Frames written while the worker serves reach it, each whole, in order."""
        keys = [TicketKeys.make(), TicketKeys.make().rotated()]
        received = []
        stopped = self.watch(b"".join(ticket_keys_frame(k) for k in keys), received.append)
        return stopped.addCallback(
            lambda _: self.assertEqual(
                received, [(TICKET_KEYS_FRAME, [k.to_bytes()]) for k in keys]
            )
        )


class FrameTests(SynchronousTestCase):
    """The certificate, key and ticket keys reach a worker on its standard input, before
    anything else; later ticket keys arrive while it serves."""

    def through_a_pipe(self, pem):
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        keys = TicketKeys.make().rotated()
        os.write(write, credentials_frame(pem) + ticket_keys_frame(keys) + b"later bytes")
        os.close(write)
        return read_credentials(read), read_ticket_keys(read) == keys, os.read(read, 100)

    def test_auth_cache_key(self):
        """The verified-password key comes back as written; a short one is refused."""
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        key = os.urandom(32)
        os.write(write, auth_cache_key_frame(key) + auth_cache_key_frame(b"short"))
        os.close(write)
        self.assertEqual(read_auth_cache_key(read), key)
        self.assertRaises(ValueError, read_auth_cache_key, read)

    def test_read_back_exactly(self):
        """The two PEM texts and the keys come back as written, and nothing after them is
        consumed."""
        pem = (b"-----BEGIN CERTIFICATE-----\nAAA\n", b"-----BEGIN PRIVATE KEY-----\nBB\n")
        self.assertEqual(self.through_a_pipe(pem), (pem, True, b"later bytes"))

    def test_none(self):
        """A supervisor without TLS material sends an empty frame: the worker reads the files."""
        self.assertEqual(self.through_a_pipe(None), (None, True, b"later bytes"))

    def test_supervisor_ended_early(self):
        """A pipe that ends inside the frame is an error, not a worker serving without TLS."""
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        os.write(write, b"tls 10 10\nshort")
        os.close(write)
        self.assertRaises(EOFError, read_credentials, read)

    def test_frames_in_pieces(self):
        """Frames split anywhere come out whole, once each, in order."""
        keys = [TicketKeys.make(), TicketKeys.make().rotated()]
        data = b"".join(ticket_keys_frame(k) for k in keys)
        reader = FrameReader()
        frames = []
        for at in range(0, len(data), 7):
            frames += reader.feed(data[at : at + 7])
        self.assertEqual(frames, [(TICKET_KEYS_FRAME, [k.to_bytes()]) for k in keys])

    def test_not_a_frame(self):
        """A line that is no frame header is refused rather than guessed at."""
        self.assertRaises(ValueError, FrameReader().feed, b"hello world\n")
        self.assertRaises(ValueError, FrameReader().feed, b"x" * 100)


class SupervisorPartsTests(SynchronousTestCase):
    def test_config_travels_as_json(self):
        """The Config a worker gets is the supervisor's, tuples and None included."""
        config = Config(pop3_listen=("tcp:1", "tcp:2"), pop3_expire=None, workers=3)
        text = json.dumps(config_to_json(config))
        self.assertEqual(config_from_json(json.loads(text)), config)

    def test_auto_is_one_per_cpu(self):
        """workers = auto (0) is the number of CPUs this process may run on."""
        self.assertEqual(supervisor.worker_count(Config(workers=0)), len(os.sched_getaffinity(0)))
        self.assertEqual(supervisor.worker_count(Config(workers=3)), 3)

    def test_verifications_are_divided(self):
        """[auth] max_verifications is shared out, at least one per worker."""
        config = Config(auth_max_verifications=4)
        self.assertEqual(supervisor.worker_config(config, 2).auth_max_verifications, 2)
        self.assertEqual(supervisor.worker_config(config, 8).auth_max_verifications, 1)
