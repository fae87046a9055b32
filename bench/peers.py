"""The servers the benchmark compares: how to lay out their data, start, stop and measure them.

Every server gets its own copy of the same mail (hard links to the generated files, in a
directory tree of its own), its own users file with the same ``{PLAIN}`` passwords (and,
for the Argon2 scenario, the same ``{ARGON2ID}`` hashes), and listens on 127.0.0.1 high
ports only.  POP3S peers serve the one self-signed RSA-2048 certificate the run makes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

import procstat

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PASSWORD = "bench-Pa55"
DOMAIN = "bench.test"
NOBODY = 65534  # Dovecot's and Postfix's mail user: mail processes must not run as root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_tls_context() -> ssl.SSLContext:
    """TLS for the load clients: no certificate check (the bench's own self-signed one)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def wait_for_port(
    port: int,
    proc: subprocess.Popen | None,
    log: str,
    timeout: float = 30.0,
    tls: bool = False,
    prefix: bytes = b"",
):
    """Wait until something answers on the port (a greeting line; after a TLS handshake
    with ``tls``; after sending ``prefix``, a PROXY header say), or fail with the log."""
    deadline = time.monotonic() + timeout
    context = client_tls_context() if tls else None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
                if prefix:
                    raw.sendall(prefix)
                with context.wrap_socket(raw) if tls else raw as s:
                    if s.recv(512):
                        return
        except OSError:
            pass
        time.sleep(0.1)
    what = "no TLS greeting" if tls else "nothing answers"
    raise RuntimeError(f"{what} on port {port} after {timeout}s:\n{tail(log)}")


def make_certificate(directory: str) -> tuple[str, str]:
    """A self-signed RSA-2048 certificate for localhost and 127.0.0.1: (cert, key) paths.

    popserv's own self-signed pair, with the key type the comparison asks for.
    """
    from cryptography.hazmat.primitives.asymmetric import rsa

    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from popserv.tls import generate_self_signed

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return generate_self_signed("localhost", directory, key=key)


def tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def _link_tree(sources: list[str], target: str) -> None:
    """Hard-link files into ``target`` (copy across file systems)."""
    for source in sources:
        dest = os.path.join(target, os.path.basename(source))
        try:
            os.link(source, dest)
        except OSError:
            shutil.copyfile(source, dest)


class Peer:
    """One server under test; subclasses say how it runs."""

    name = "?"
    pop3 = True
    smtp = False
    #: Serves POP3S (implicit TLS) with the run's certificate.
    pop3s = False
    #: Reads ``{ARGON2ID}`` password hashes.
    argon2 = False
    #: The only scenarios this peer takes part in (None: all it can).
    only: tuple[str, ...] | None = None
    #: "rss" (one process) or "pss" (sum over a process tree).
    memory_kind = "rss"

    def __init__(self, root: str):
        self.root = os.path.join(root, self.name)
        self.mail = os.path.join(self.root, "mail")
        self.users = os.path.join(self.root, "users")
        self.log = os.path.join(self.root, "server.log")
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.pop3_port = 0
        self.pop3s_port = 0
        self.smtp_port = 0
        #: Certificate and key files (PEM) for POP3S, set by the runner.
        self.cert: str | None = None
        self.key: str | None = None

    # -- data --------------------------------------------------------------

    def build(
        self, mailboxes: dict[str, tuple[list[str], str]], hashed: dict[str, str] | None = None
    ) -> None:
        """A fresh tree: ``user -> (message files, "new" or "cur")`` and the users file.

        ``hashed`` gives some users a password field of their own (``{ARGON2ID}$argon2id$...``)
        instead of ``{PLAIN}``; every peer gets the same strings.
        """
        hashed = hashed or {}
        if os.path.isdir(self.root):
            shutil.rmtree(self.root)
        os.makedirs(self.mail)
        for user, (files, sub) in mailboxes.items():
            self.add_mailbox(user, files, sub)
        with open(self.users, "w") as f:
            for user in mailboxes:
                field = hashed.get(user, "{PLAIN}" + PASSWORD)
                f.write(f"{user}:{field}\n")
        self.protect_users()

    def protect_users(self) -> None:
        """Readable by the server only (popserv refuses a users file others can read)."""
        os.chmod(self.users, 0o600)

    def add_mailbox(self, user: str, files: list[str], sub: str) -> None:
        path = os.path.join(self.mail, user)
        for d in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(path, d))
        _link_tree(files, os.path.join(path, sub))
        if sub == "cur":
            for name in os.listdir(os.path.join(path, "cur")):
                os.rename(os.path.join(path, "cur", name), os.path.join(path, "cur", name + ":2,"))
        self.own(path)

    def own(self, path: str) -> None:
        """Give a Maildir to the user the server's mail processes run as (default: keep root)."""

    def delivered(self, user: str) -> int:
        path = os.path.join(self.mail, user)
        return sum(
            len([n for n in os.listdir(os.path.join(path, sub)) if not n.startswith(".")])
            for sub in ("new", "cur")
        )

    # -- process -----------------------------------------------------------

    def command(self, smtp: bool) -> tuple[list[str], dict]:
        """argv and environment; ``self.pop3s_port`` is 0 unless POP3S is wanted."""
        raise NotImplementedError

    def start(self, smtp: bool = False, tls: bool = False) -> None:
        self.pop3_port = free_port()
        self.smtp_port = free_port() if smtp else 0
        self.pop3s_port = free_port() if tls else 0
        argv, env = self.command(smtp)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid = self.proc.pid
        port = self.smtp_port if smtp and not self.pop3 else self.pop3_port
        wait_for_port(port, self.proc, self.log)
        if smtp and self.pop3:
            wait_for_port(self.smtp_port, self.proc, self.log)
        if tls:
            wait_for_port(self.pop3s_port, self.proc, self.log, tls=True)
        self.after_start()

    def after_start(self) -> None:
        pass

    def login_target(self) -> int:
        """The POP3 port the login-latency scenario logs in on."""
        return self.pop3_port

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        self.proc = None
        self.pid = None

    # -- measures ----------------------------------------------------------

    def cpu(self) -> float:
        return procstat.cpu_seconds(self.pid)

    def memory(self) -> int:
        if self.memory_kind == "pss":
            return procstat.pss_tree(self.pid)
        return procstat.rss(self.pid)

    def reset_peak(self) -> None:
        if self.memory_kind == "rss":
            procstat.reset_peak(self.pid)

    def peak_memory(self) -> int:
        """Highest memory since ``reset_peak`` (the kernel's high-water mark for RSS)."""
        if self.memory_kind == "rss":
            return procstat.peak_rss(self.pid)
        return self.memory()


def _twistd(*args: str) -> list[str]:
    run = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
    return [sys.executable, "-c", run, "-n", "--pidfile=", *args]


def _knows(section: str, key: str, value: str) -> bool:
    """Whether this checkout's popserv/config.py accepts ``[section] key = value``."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from popserv.config import ConfigError, config_from_string

    try:
        config_from_string(f"[{section}]\n{key} = {value}\n")
    except ConfigError:
        return False
    return True


class Popserv(Peer):
    """This checkout's ``twistd popserv``, one serving process (``[server] workers = 1``)."""

    name = "popserv"
    pop3s = True
    argon2 = True
    workers = 1

    def __init__(self, root: str):
        super().__init__(root)
        self._smtp_option: bool | None = None
        self._notify: socket.socket | None = None
        self._notify_path = ""

    @classmethod
    def available(cls) -> bool:
        """Whether this checkout can run the peer's number of workers."""
        return cls.workers == 1 or _knows("server", "workers", str(cls.workers))

    @property
    def smtp(self) -> bool:
        """Whether this checkout's ``twistd popserv`` has ``--smtp`` yet."""
        if self._smtp_option is None:
            out = subprocess.run(
                _twistd("popserv", "--help"),
                cwd=REPO,
                env=self._env(),
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
            self._smtp_option = "--smtp" in out and "--domain" in out
        return self._smtp_option

    def _env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def command(self, smtp: bool):
        config = os.path.join(self.root, "popserv.ini")
        with open(config, "w") as f:
            f.write(self._config_text())
        argv = _twistd(
            "--logfile",
            self.log,
            "popserv",
            "--config",
            config,
            "--pop3",
            f"tcp:{self.pop3_port}:interface=127.0.0.1",
            "--mailroot",
            self.mail,
            "--users",
            self.users,
        )
        if self.pop3s_port:
            argv += ["--pop3s", f"tcp:{self.pop3s_port}:interface=127.0.0.1"]
        if smtp:
            argv += ["--smtp", f"tcp:{self.smtp_port}:interface=127.0.0.1", "--domain", DOMAIN]
        env = self._env()
        if os.path.exists(os.path.join(REPO, "popserv", "notify.py")):
            # READY=1 comes once every worker serves, not when the first one does.
            self._notify_path = os.path.join(self.root, "notify.sock")
            if os.path.exists(self._notify_path):
                os.unlink(self._notify_path)
            self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._notify.bind(self._notify_path)
            self._notify.settimeout(0.5)
            env["NOTIFY_SOCKET"] = self._notify_path
        return argv, env

    def after_start(self) -> None:
        if self._notify is None:
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{tail(self.log)}")
            try:
                message = self._notify.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in message.split(b"\n"):
                return
        raise RuntimeError(f"no READY=1 from popserv after 60s:\n{tail(self.log)}")

    def stop(self) -> None:
        super().stop()
        if self._notify is not None:
            self._notify.close()
            self._notify = None
            os.unlink(self._notify_path)

    #: (section, key, value): no POP3S unless asked (``--pop3s`` replaces it), no SMTP
    #: unless asked, and connection limits above what the idle scenario opens (as
    #: Dovecot's are raised).  Keys this checkout's config.py does not know yet are left out.
    SETTINGS = (
        ("server", "hostname", DOMAIN),
        ("pop3s", "listen", ""),
        ("smtp", "listen", ""),
        ("pop3", "max_connections", "5000"),
        ("pop3", "max_connections_per_peer", "5000"),
    )

    def _config_text(self) -> str:
        if self.cert:
            tls = [f"cert = {self.cert}", f"key = {self.key}"]
        else:
            tls = [f"self_signed_dir = {self.root}/tls"]
        sections: dict[str, list[str]] = {"tls": tls}
        settings = (*self.SETTINGS, ("server", "workers", str(self.workers)))
        for section, key, value in settings:
            if _knows(section, key, value):
                sections.setdefault(section, []).append(f"{key} = {value}")
        return "".join(
            f"[{name}]\n" + "".join(line + "\n" for line in lines)
            for name, lines in sections.items()
        )


class PopservWorkers(Popserv):
    """The same popserv with two serving processes behind its supervisor."""

    name = "popserv-w2"
    workers = 2
    memory_kind = "pss"


#: The shipped HAProxy configuration the cluster peers run, with loopback addresses.
HAPROXY_CFG = os.path.join(REPO, "etc", "haproxy", "popserv.cfg")


class PopservCluster(Popserv):
    """popserv nodes in cluster mode behind ``haproxy -db`` (the shipped config), on one host.

    A PostgreSQL of its own (``tests.live_pg``: initdb as ``postgres``, loopback only)
    holds popserv's schema and the users; every node has ``[cluster] database``, a node
    name, the peer's mail root and users file, and ``haproxy:`` listeners, which the
    shipped etc/haproxy/popserv.cfg (its addresses replaced) balances.  Node 1 also
    listens without PROXY on ``login_port``, for the login latency the database adds.
    CPU is summed over the nodes, HAProxy and PostgreSQL.
    """

    name = "popserv-ha1"
    nodes = 1
    argon2 = False
    only = ("sessions", "tls", "login")
    memory_kind = "pss"

    def __init__(self, root: str):
        super().__init__(root)
        self.database = None
        self.url = ""
        self.procs: list[subprocess.Popen] = []
        self.login_port = 0

    def login_target(self) -> int:
        return self.login_port

    @classmethod
    def available(cls) -> bool:
        """Whether this checkout knows [cluster] and HAProxy and PostgreSQL are installed."""
        if shutil.which("haproxy", path="/usr/sbin:/usr/bin") is None:
            return False
        if REPO not in sys.path:
            sys.path.insert(0, REPO)
        try:
            from tests.live_pg import bin_dir

            bin_dir()
        except Exception:
            return False
        return _knows("cluster", "node", "node1")

    def _users(self) -> list[tuple[str, str]]:
        with open(self.users) as f:
            return [tuple(line.rstrip("\n").split(":", 1)) for line in f if ":" in line]

    def start(self, smtp: bool = False, tls: bool = False) -> None:
        try:
            self._start(tls)
        except BaseException:
            self.stop()
            raise

    def _start(self, tls: bool) -> None:
        if REPO not in sys.path:
            sys.path.insert(0, REPO)
        from popserv.pgdb import open_database
        from popserv.proxyproto import V2_SIGNATURE
        from tests.live_pg import LivePostgres

        self.database = LivePostgres()
        self.database.initdb()
        self.database.start()
        self.url = self.database.new_database()
        db = open_database(self.url)
        try:
            rows = ", ".join(f"('{user}', '{password}')" for user, password in self._users())
            db.call(
                lambda conn: conn.execute(
                    f"INSERT INTO popserv_users (name, password) VALUES {rows}"
                )
            )
        finally:
            db.stop()
        self.login_port = free_port()
        backends = []
        for n in range(1, self.nodes + 1):
            ports = {110: free_port(), 995: free_port(), 25: free_port()}
            backends.append(ports)
            self.procs.append(self._start_node(n, ports, tls))
        # A PROXY v2 LOCAL header, as HAProxy's health checks send.
        local = V2_SIGNATURE + bytes([0x20, 0x00, 0x00, 0x00])
        for proc, ports in zip(self.procs, backends, strict=True):
            wait_for_port(ports[110], proc, self.log, prefix=local)
        for _ in range(5):
            # A port free a moment ago may be taken by then (an outgoing connection's).
            self.pop3_port, self.pop3s_port = free_port(), free_port() if tls else 0
            self.smtp_port = free_port()
            haproxy = self._start_haproxy(backends)
            try:
                haproxy.wait(1.0)
            except subprocess.TimeoutExpired:
                break
        else:
            raise RuntimeError(f"haproxy did not start:\n{tail(self.root + '/haproxy.log')}")
        self.procs.append(haproxy)
        self.pid = self.procs[0].pid
        self._wait_checked(tls)

    def _start_node(self, n: int, ports: dict[int, int], tls: bool) -> subprocess.Popen:
        pop3 = f"haproxy:tcp:{ports[110]}:interface=127.0.0.1"
        if n == 1:
            pop3 += f"\n    tcp:{self.login_port}:interface=127.0.0.1"
        listen = {
            "pop3": pop3,
            "pop3s": f"haproxy:tcp:{ports[995]}:interface=127.0.0.1" if tls else "",
            "smtp": f"haproxy:tcp:{ports[25]}:interface=127.0.0.1",
        }
        text = self._config_text()
        for section, value in listen.items():
            text += f"[{section}]\nlisten = {value}\n"
        text += f"[cluster]\ndatabase = {self.url}\nnode = node{n}\n"
        text += f"[server]\nmailroot = {self.mail}\nusers = {self.users}\n"
        text += f"state_dir = {self.root}/state{n}\n"
        config = os.path.join(self.root, f"node{n}.ini")
        with open(config, "w") as f:
            f.write(_merge_sections(text))
        log = os.path.join(self.root, f"node{n}.log")
        with open(log, "ab") as out:
            return subprocess.Popen(
                _twistd("--logfile", log, "popserv", "--config", config),
                cwd=REPO,
                env=self._env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _start_haproxy(self, backends: list[dict[int, int]]) -> subprocess.Popen:
        with open(HAPROXY_CFG) as f:
            text = f.read()
        self.stats_port = free_port()
        text = text.replace(
            "global\n", f"global\n    stats socket ipv4@127.0.0.1:{self.stats_port} level user\n", 1
        )
        text = text.replace("    log /dev/log local0\n", "", 1)
        text = text.replace("    log global\n", "", 1)
        # The bench's clients all come from 127.0.0.1: no per-source limit applies.
        text = text.replace("    tcp-request connection reject if", "    # reject if")
        fronts = {110: self.pop3_port, 995: self.pop3s_port, 25: self.smtp_port}
        for shipped, port in fronts.items():
            servers = "".join(
                f"    server node{n} 127.0.0.1:{ports[shipped]}\n"
                for n, ports in enumerate(backends, 1)
            )
            old = f"    server node1 192.0.2.11:{shipped}\n    server node2 192.0.2.12:{shipped}\n"
            assert old in text, shipped
            text = text.replace(old, servers if port else "")
            text = text.replace(
                f"    bind :{shipped}\n", f"    bind 127.0.0.1:{port or free_port()}\n"
            )
        assert "192.0.2." not in text
        config = os.path.join(self.root, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(text)
        with open(os.path.join(self.root, "haproxy.log"), "ab") as out:
            return subprocess.Popen(
                ["haproxy", "-db", "-f", config],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _wait_checked(self, tls: bool) -> None:
        """Until every node of the POP3 (and POP3S) backend has passed a health check."""
        wanted = {"pop3_nodes"} | ({"pop3s_nodes"} if tls else set())
        deadline = time.monotonic() + 60
        rows = ""
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.stats_port), 5) as s:
                    s.sendall(b"show stat\n")
                    rows = b"".join(iter(lambda: s.recv(65536), b"")).decode()
            except OSError:
                time.sleep(0.2)
                continue
            up = [
                line.split(",")[0]
                for line in rows.splitlines()
                if line.split(",")[1:2]
                and line.split(",")[1].startswith("node")
                and line.split(",")[17] == "UP"
            ]
            if all(up.count(backend) == self.nodes for backend in wanted):
                return
            time.sleep(0.2)
        raise RuntimeError(f"HAProxy's checks did not pass:\n{rows}")

    def after_start(self) -> None:
        pass

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        self.procs = []
        self.pid = None
        if self.database is not None:
            self.database.destroy()
            self.database = None

    def cpu(self) -> float:
        total = sum(procstat.cpu_seconds(proc.pid) for proc in self.procs)
        return total + procstat.cpu_seconds(self._postmaster())

    def memory(self) -> int:
        return sum(procstat.pss_tree(proc.pid) for proc in self.procs)

    def _postmaster(self) -> int:
        with open(os.path.join(self.database.data, "postmaster.pid")) as f:
            return int(f.readline())


class PopservCluster2(PopservCluster):
    """The same with two nodes behind the one HAProxy."""

    name = "popserv-ha2"
    nodes = 2


def _merge_sections(text: str) -> str:
    """An INI text with each section's lines gathered under one header (later keys win)."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        elif "=" in line and current is not None:
            key, value = (part.strip() for part in line.split("=", 1))
            while i + 1 < len(lines) and lines[i + 1].startswith("    "):
                i += 1
                value += "\n" + lines[i]
            current[key] = value
        i += 1
    return "".join(
        f"[{name}]\n" + "".join(f"{key} = {value}\n" for key, value in keys.items())
        for name, keys in sections.items()
    )


class TwistedPeer(Peer):
    """Twisted's own POP3 and SMTP classes (twisted_peer.tac says why not ``twistd mail``)."""

    name = "twisted"
    smtp = True

    def command(self, smtp: bool):
        env = dict(os.environ)
        env.update(
            BENCH_MAILROOT=self.mail,
            BENCH_USERS=self.users,
            BENCH_POP3=f"tcp:{self.pop3_port}:interface=127.0.0.1",
            BENCH_SMTP=f"tcp:{self.smtp_port}:interface=127.0.0.1" if smtp else "",
            BENCH_DOMAIN=DOMAIN,
        )
        return _twistd("--logfile", self.log, "-y", os.path.join(HERE, "twisted_peer.tac")), env


def _chown_tree(path: str, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for directory, subdirs, _ in os.walk(path):
        for d in subdirs:
            os.chown(os.path.join(directory, d), uid, gid)


class Dovecot(Peer):
    """Debian's Dovecot: its own config file and base_dir, passwd-file auth, maildir.

    Login processes run in high-performance mode (``service_count = 0``, one per core).
    Everything else, the authentication cache (``auth_cache_size = 0``) and the TLS
    settings besides the certificate, stays at Dovecot's defaults.
    """

    name = "dovecot"
    memory_kind = "pss"
    binary = "/usr/sbin/dovecot"
    pop3s = True
    argon2 = True
    #: Settings added to the defaults (none: no authentication cache).
    tuning = ""

    def __init__(self, root: str):
        super().__init__(root)
        # base_dir holds UNIX sockets: keep its path short.
        self.base_dir = tempfile.mkdtemp(prefix="popbench-dovecot-")
        os.chmod(self.base_dir, 0o755)

    @classmethod
    def available(cls) -> bool:
        return os.access(cls.binary, os.X_OK)

    def own(self, path: str) -> None:
        _chown_tree(path, NOBODY, NOBODY)

    def protect_users(self) -> None:
        # Dovecot's auth process reads the passwd-file as its internal user.
        os.chown(self.users, 0, _ids("dovecot")[1])
        os.chmod(self.users, 0o640)

    def command(self, smtp: bool):
        config = os.path.join(self.root, "dovecot.conf")
        cores = os.cpu_count() or 1
        if self.pop3s_port:
            tls = f"ssl = yes\nssl_cert = <{self.cert}\nssl_key = <{self.key}"
            pop3s = f"address = 127.0.0.1\n    port = {self.pop3s_port}"
        else:
            tls, pop3s = "ssl = no", "port = 0"
        with open(config, "w") as f:
            f.write(f"""# Written by bench/peers.py
base_dir = {self.base_dir}/run
state_dir = {self.base_dir}/state
instance_name = popbench-{self.name}-{os.getpid()}
protocols = pop3
listen = 127.0.0.1
{tls}
{self.tuning}disable_plaintext_auth = no
auth_mechanisms = plain
log_path = {self.log}
mail_location = maildir:{self.mail}/%u
first_valid_uid = 1
default_process_limit = 2000
default_client_limit = 5000
default_vsz_limit = 1G
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {self.users}
}}
userdb {{
  driver = static
  args = uid={NOBODY} gid={NOBODY} home={self.mail}/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    {pop3s}
  }}
  service_count = 0
  process_min_avail = {cores}
  client_limit = 2000
}}
service pop3 {{
  process_limit = 2000
}}
""")
        os.makedirs(os.path.join(self.base_dir, "state"), exist_ok=True)
        return [self.binary, "-F", "-c", config], dict(os.environ)

    def cleanup(self) -> None:
        shutil.rmtree(self.base_dir, ignore_errors=True)


class DovecotCache(Dovecot):
    """The same Dovecot with a 10 MB authentication cache (Argon2 scenario only)."""

    name = "dovecot-cache"
    only = ("argon2",)
    tuning = "auth_cache_size = 10M\n"

    def auth_cache_entries(self) -> int | None:
        """Entries in the authentication cache (``doveadm auth cache flush`` empties it)."""
        out = subprocess.run(
            ["doveadm", "-c", os.path.join(self.root, "dovecot.conf"), "auth", "cache", "flush"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.split()
        return int(out[0]) if out and out[0].isdigit() else None


class Postfix(Peer):
    """Debian's Postfix as the SMTP peer: its own config and queue directories, loopback only.

    Mail goes through the ``virtual`` delivery agent into Maildirs owned by ``nobody``;
    Postfix answers 250 once its queue file is fsynced and delivers afterwards, so the
    runner counts a message only when its file is in the Maildir.
    """

    name = "postfix"
    pop3 = False
    smtp = True
    memory_kind = "pss"

    def __init__(self, root: str):
        super().__init__(root)
        self.base_dir = tempfile.mkdtemp(prefix="popbench-postfix-")
        os.chmod(self.base_dir, 0o755)
        self.config_dir = os.path.join(self.base_dir, "etc")
        self.queue_dir = os.path.join(self.base_dir, "spool")
        self.data_dir = os.path.join(self.base_dir, "lib")

    @classmethod
    def available(cls) -> bool:
        return shutil.which("postfix") is not None and os.path.isfile("/etc/postfix/master.cf")

    def own(self, path: str) -> None:
        _chown_tree(path, NOBODY, NOBODY)

    def build(self, mailboxes, hashed=None) -> None:
        super().build(mailboxes, hashed)
        with open(os.path.join(self.root, "vmailbox"), "w") as f:
            for user in mailboxes:
                f.write(f"{user}@{DOMAIN} {user}/\n")

    def command(self, smtp: bool):
        for d in (self.config_dir, self.queue_dir, self.data_dir):
            os.makedirs(d, exist_ok=True)
        os.chown(self.data_dir, *_ids("postfix"))
        with open("/etc/postfix/master.cf") as f:
            master = f.read().splitlines()
        out = []
        for line in master:
            fields = line.split()
            if fields and fields[0] == "smtp" and fields[1] == "inet":
                line = f"127.0.0.1:{self.smtp_port} inet n - n - - smtpd"
            elif fields and not line.startswith((" ", "\t", "#")) and len(fields) >= 8:
                fields[4] = "n"  # no chroot: the chroot would need a copy of /etc files
                line = " ".join(fields)
            out.append(line)
        with open(os.path.join(self.config_dir, "master.cf"), "w") as f:
            f.write("\n".join(out) + "\n")
        with open(os.path.join(self.config_dir, "main.cf"), "w") as f:
            f.write(f"""# Written by bench/peers.py
compatibility_level = 3.6
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
myhostname = mx.{DOMAIN}
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
maillog_file = {self.log}
maillog_file_prefixes = {self.root}
smtpd_banner = $myhostname ESMTP
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {self.mail}
virtual_mailbox_maps = texthash:{os.path.join(self.root, "vmailbox")}
virtual_uid_maps = static:{NOBODY}
virtual_gid_maps = static:{NOBODY}
virtual_minimum_uid = 100
message_size_limit = 52428800
virtual_mailbox_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
default_process_limit = 100
alias_maps =
alias_database =
local_recipient_maps =
relayhost =
""")
        subprocess.run(
            ["postfix", "-c", self.config_dir, "set-permissions"], capture_output=True, timeout=60
        )
        subprocess.run(["postfix", "-c", self.config_dir, "check"], capture_output=True, timeout=60)
        return ["postfix", "-c", self.config_dir, "start-fg"], dict(os.environ)

    def after_start(self) -> None:
        # start-fg runs the master in our child process, possibly behind a shell: find it.
        pid_file = os.path.join(self.queue_dir, "pid", "master.pid")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with open(pid_file) as f:
                    self.pid = int(f.read().split()[0])
                return
            except (OSError, ValueError, IndexError):
                time.sleep(0.1)

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", self.config_dir, "stop"], capture_output=True, timeout=60)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        self.pid = None

    def cleanup(self) -> None:
        shutil.rmtree(self.base_dir, ignore_errors=True)


def _ids(user: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid
