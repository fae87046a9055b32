"""A real PostgreSQL for the cluster tests: initdb and pg_ctl into a temporary directory.

The server listens on 127.0.0.1 only, on a port free a moment before, with its socket in
its own directory.  Run as root (as CI runs), the server runs as the unprivileged
``postgres`` user (initdb refuses root); otherwise as the user running the tests.  One
server serves every test of a process (``shared_server``); each test gets a database
of its own (``LivePostgres.new_database``) and drops nothing: the directory goes when
the process ends.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time

from tests.live import require_client
from tests.live_smtp import free_port

#: Seconds to wait for the server to accept connections after pg_ctl start.
START_TIMEOUT = 30.0

_databases = itertools.count(1)


def bin_dir() -> str:
    """Where the server's programs are: Debian's newest /usr/lib/postgresql/<v>/bin, else
    the directory pg_ctl on PATH really lives in (a symlink there may stand alone)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    search = os.pathsep.join([*found, os.environ.get("PATH", "")])
    return os.path.dirname(os.path.realpath(require_client("pg_ctl", search)))


def _version(path: str) -> int:
    try:
        return int(path.split("/")[-2])
    except ValueError:
        return 0


class LivePostgres:
    """One PostgreSQL server in a temporary directory, owned by an unprivileged user."""

    def __init__(self):
        self.bin = bin_dir()
        self.root = tempfile.mkdtemp(prefix="popserv-pg-")
        self.data = os.path.join(self.root, "data")
        self.sockets = os.path.join(self.root, "run")
        self.log = os.path.join(self.root, "server.log")
        self.port = free_port()
        self.user = None
        if os.geteuid() == 0:
            self.user = pwd.getpwnam("postgres")
        os.makedirs(self.sockets)
        if self.user is not None:
            for path in (self.root, self.sockets):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self.superuser = self.user.pw_name if self.user else pwd.getpwuid(os.geteuid()).pw_name

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [os.path.join(self.bin, argv[0]), *argv[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user.pw_name, "--", *command]
        return subprocess.run(command, check=check, capture_output=True, cwd=self.root, timeout=120)

    def initdb(self) -> None:
        """A new cluster: trust authentication on loopback and the socket only."""
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", self.superuser, "--no-sync")

    def start(self) -> None:
        """Start (or restart) the server and wait until it accepts connections."""
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.sockets} -c fsync=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "start")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            ready = self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), check=False)
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"PostgreSQL did not start; see {self.log}")

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m mode`` (``immediate`` is a crash, as the issue's tests need)."""
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def url(self, database: str = "postgres") -> str:
        """A libpq URI for ``database`` as the superuser, over TCP on loopback."""
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """What psql prints for ``sql`` (unaligned, tuples only)."""
        psql = os.path.join(self.bin, "psql")
        done = subprocess.run(
            [psql, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", self.url(database), "-c", sql],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return done.stdout

    def new_database(self) -> str:
        """The URI of a new, empty database of its own."""
        name = f"popserv_test_{os.getpid()}_{next(_databases)}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def destroy(self) -> None:
        """Stop the server and remove its directory."""
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


_shared: LivePostgres | None = None


def shared_server() -> LivePostgres:
    """The process's one PostgreSQL, started at first use and removed at exit.

    Tests that stop the server (``pg_ctl stop``) must start it again before they end.
    """
    global _shared
    if _shared is None:
        server = LivePostgres()
        server.initdb()
        server.start()
        atexit.register(server.destroy)
        _shared = server
    return _shared
