"""A real ``twistd -n popserv`` in a child process, for fault, load and log-format tests.

It listens on free 127.0.0.1 ports only; nothing here contacts any other address.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import sys
import time

from twisted.trial.unittest import SkipTest

from popserv.auth import hash_password
from tests.live_smtp import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
HOST = "twistd.test"
#: [server] workers of every TwistdServer whose test does not choose: one process, as the
#: tests were written for, unless POPSERV_TEST_WORKERS asks for more (README, "Development").
TEST_WORKERS = os.environ.get("POPSERV_TEST_WORKERS", "1")


def write_private(path: str, text: str) -> str:
    """Write ``text`` to a new file of mode 0600 (as popserv wants its users file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


def wait_for_greeting(port: int, process, timeout: float = 20.0, prefix: bytes = b"") -> bool:
    """Whether POP3 on 127.0.0.1:``port`` greets (``+OK``) within ``timeout`` seconds,
    each try sending ``prefix`` first; False as soon as ``process`` has exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), 1) as conn:
                if prefix:
                    conn.sendall(prefix)
                if conn.recv(100).startswith(b"+OK"):
                    return True
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def children(parent: int) -> list[int]:
    """The living (not zombie) child processes of ``parent``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            found.append(int(entry))
    return sorted(found)


def python_runs_as(user: str) -> bool:
    """Whether ``user`` can run this Python with Twisted and this checkout's popserv."""
    account = pwd.getpwnam(user)
    try:
        ran = subprocess.run(
            [sys.executable, "-c", "import twisted, popserv"],
            cwd=REPO,
            user=account.pw_uid,
            group=account.pw_gid,
            extra_groups=[],
            capture_output=True,
        )
    except PermissionError:
        return False
    return ran.returncode == 0


def rss_kib(pid: int) -> int:
    """The resident set size (VmRSS) of process ``pid``, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


class TwistdServer:
    """One popserv child process over a directory of its own: config, users, Maildirs, log.

    ``settings`` adds or replaces keys of the config file: ``{"pop3": {"timeout": "5"}}``
    (a value of None leaves the key out, at its default);
    ``backlog`` is the POP3 listener's queue of connections not yet accepted.
    ``start`` may be called again after ``kill`` or ``stop``: same files, same ports.
    ``program`` is the Python code the child runs: twistd, after any setup a test puts
    before it (a lower descriptor limit, say).  ``stdout_log`` logs as etc/popserv.service
    does, with ``--logfile=-``; the child's standard output then goes to ``log_path``.
    """

    program = TWISTD

    def __init__(
        self,
        testcase,
        users: dict[str, str],
        *,
        smtp: bool = False,
        settings=None,
        backlog=50,
        stdout_log: bool = False,
    ):
        self.stdout_log = stdout_log
        self.root = os.path.abspath(testcase.mktemp())
        os.makedirs(self.root)
        self.mailroot = os.path.join(self.root, "mail")
        self.users_path = write_private(
            os.path.join(self.root, "users"),
            "".join(f"{user}:{hash_password(pw, 'PLAIN')}\n" for user, pw in users.items()),
        )
        self.log_path = os.path.join(self.root, "twistd.log")
        self.stderr_path = os.path.join(self.root, "twistd.stderr")
        self.pop3_port = free_port()
        self.smtp_port = free_port() if smtp else None
        sections = {
            "server": {
                "hostname": HOST,
                "mailroot": self.mailroot,
                "users": self.users_path,
                "state_dir": os.path.join(self.root, "state"),
                # The tests of several workers (tests.test_multiproc) ask for them.
                "workers": TEST_WORKERS,
            },
            "pop3": {
                "listen": f"tcp:{self.pop3_port}:interface=127.0.0.1:backlog={backlog}",
                "failure_delay": "0",
            },
            "pop3s": {"listen": ""},
            "tls": {"self_signed_dir": os.path.join(self.root, "tls")},
            "smtp": {
                "listen": f"tcp:{self.smtp_port}:interface=127.0.0.1" if smtp else "",
            },
        }
        for section, keys in (settings or {}).items():
            sections.setdefault(section, {}).update(keys)
        #: How many processes serve: 1 is twistd itself, more are its workers.
        self.worker_count = int(sections["server"]["workers"])
        self.who_dir = os.path.join(sections["server"]["state_dir"], "who")
        self.config_path = os.path.join(self.root, "popserv.ini")
        with open(self.config_path, "w", encoding="utf-8") as f:
            for section, keys in sections.items():
                f.write(f"[{section}]\n")
                f.writelines(
                    f"{key} = {value}\n" for key, value in keys.items() if value is not None
                )
        self.process: subprocess.Popen | None = None
        testcase.addCleanup(self.kill)

    def spawn(self, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start twistd without waiting for it; ``env`` replaces the environment."""
        argv = [
            sys.executable,
            "-c",
            self.program,
            "-n",
            "--pidfile=",
            "--logfile=-" if self.stdout_log else f"--logfile={self.log_path}",
        ]
        # Standard error holds what stops twistd before it logs (a one-line startup error).
        with (
            open(self.log_path, "ab") if self.stdout_log else open(os.devnull, "wb") as out,
            open(self.stderr_path, "ab") as err,
        ):
            self.process = subprocess.Popen(
                [*argv, "popserv", "--config", self.config_path],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=err,
            )
        return self.process

    #: What a client sends before it can expect the greeting (a PROXY header, say).
    greeting_prefix = b""

    def start(self, timeout: float = 20.0) -> None:
        """Start twistd and wait until POP3 answers with a greeting (from every worker)."""
        self.spawn()
        if not (
            wait_for_greeting(self.pop3_port, self.process, timeout, self.greeting_prefix)
            and self.wait_workers(timeout)
        ):
            self.kill()
            with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
                err = f.read()
            raise AssertionError(f"twistd did not start:\n{self.log()}\nstderr:\n{err}")

    def wait_workers(self, timeout: float) -> bool:
        """Whether, within ``timeout`` seconds, every worker runs and has its popserv who
        socket (made as it starts to serve); at once for a server of one process."""
        deadline = time.monotonic() + timeout
        while self.worker_count > 1:
            pids = children(self.process.pid)
            if len(pids) == self.worker_count and all(
                os.path.exists(os.path.join(self.who_dir, f"{pid}.sock")) for pid in pids
            ):
                return True
            if self.process.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def serving_pids(self) -> list[int]:
        """The processes that hold sessions (each with its popserv who socket): twistd
        itself, or with several workers the supervisor's children."""
        if self.worker_count > 1:
            return children(self.process.pid)
        return [self.process.pid]

    def kill(self) -> None:
        """SIGKILL the server (if running) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM: a clean shutdown, which flushes and closes the log."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        """The server's log so far."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def rss_kib(self) -> int:
        """The server's resident set size (VmRSS), in KiB: twistd's, plus its workers'."""
        return sum(rss_kib(pid) for pid in {self.process.pid, *self.serving_pids()})

    def require_workers_can_run_as(self, user: str) -> None:
        """Skip the test if its workers, started as ``user``, could not run this Python
        (one under /root, say): twistd would refuse to start."""
        if self.worker_count > 1 and not python_runs_as(user):
            raise SkipTest(f"{user} cannot run {sys.executable}, as the workers would")

    def maildir(self, user: str, sub: str = "") -> str:
        """The path of ``user``'s Maildir (or of one of its subdirectories)."""
        return os.path.join(self.mailroot, user, sub)
