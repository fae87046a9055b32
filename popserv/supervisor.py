"""``[server] workers`` above 1: the twistd process binds every listener and supervises the
worker processes that serve them.

``make_supervisor`` builds the supervisor's ``MultiService``.  It makes what a first
start needs (as ``make_service`` does), binds each POP3, POP3S and SMTP listener in
``privilegedStartService`` (so ports below 1024 bind before ``twistd --uid`` or
``[server] user`` drop root) and stops reading from them; after root is dropped it opens
the shared state (``popserv.sharedstate``) and starts the workers (``popserv.worker``),
each given every listening socket.  The workers all accept on the same sockets, so a
connection waits in the kernel's queue until one of them takes it, even while another
is being restarted.

The supervisor restarts a worker that ends, at once when it had served a while, else
after a delay that doubles with each quick end; a worker that ends while the server
starts (before every worker has served once) stops it: a start that cannot serve fails
at once.  SIGHUP is passed on to every worker, SIGTERM (the server's stop) too, and the
supervisor exits once they have.  Each worker's JSON log lines become events of the
supervisor's log with ``worker=<pid>``.  With ``[metrics] listen`` the workers keep their
figures in ``prometheus_client``'s multiprocess files under ``<state_dir>/metrics`` and
the supervisor serves their sum.  The supervisor makes the TLS session-ticket keys at
start, in memory, hands them to each worker it starts and sends new ones every
``ROTATION_INTERVAL`` (``popserv.ticketkeys``), so a client resumes its session
whichever worker takes its next connection.  It makes the key of the verified-password
digests the workers share (``popserv.credcache``) the same way, once, and hands it to each
worker it starts, so a password verified on one is a hit on all.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sqlite3
import sys
import time

from twisted.application.service import MultiService, Service

# Everything used once root is dropped is imported here, spawnProcess's module too: the
# server's user may not be able to read the Python installation (one under /root, say).
from twisted.internet import defer, endpoints, process, task  # noqa: F401
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger, LogLevel, globalLogPublisher

from popserv import sharedstate
from popserv.config import Config, ConfigError
from popserv.notify import NotifyService
from popserv.process import process_alive
from popserv.service import Listener
from popserv.ticketkeys import ROTATION_INTERVAL, TicketKeys
from popserv.worker import (
    FIRST_LISTENER_FD,
    WORKER_ENV,
    auth_cache_key_frame,
    credentials_frame,
    ticket_keys_frame,
    worker_settings,
)

log = Logger()

#: Endpoint types whose sockets the workers can adopt (after any ``haproxy:`` prefix).
SHAREABLE = ("tcp", "tcp6", "unix", "systemd")
#: A worker that served this many seconds is restarted at once when it ends.
STABLE_AFTER = 10.0
#: Seconds before restarting a worker that ended sooner; doubled each time, up to the cap.
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
#: Seconds the workers get to stop after SIGTERM, before they are killed.
STOP_TIMEOUT = 15.0
#: Seconds between two clean-ups of the shared state (expired failures and logins).
PRUNE_INTERVAL = 60.0
#: The longest line a worker's output may have; longer ones are cut.
MAX_LINE = 1024 * 1024
#: Where the workers' metrics files are, under ``[server] state_dir``.
METRICS_DIR = "metrics"


def worker_count(config: Config) -> int:
    """How many workers serve: ``[server] workers``, or for auto the CPUs this process may use."""
    if config.workers:
        return config.workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _shareable(description: str) -> bool:
    kind, _, rest = description.partition(":")
    kind = kind.strip().lower()
    if kind == "haproxy":
        return _shareable(rest)
    return kind in SHAREABLE or kind.isdigit()


def check_shareable(config: Config) -> None:
    """Raise ConfigError for a listener that several workers could not serve together."""
    for section, descriptions in (
        ("pop3", config.pop3_listen),
        ("pop3s", config.pop3s_listen),
        ("smtp", config.smtp_listen),
    ):
        for description in descriptions:
            if not _shareable(description):
                raise ConfigError(
                    f"[{section}] listen = {description}: several workers cannot share this "
                    f"listener; use {', '.join(SHAREABLE)} (or haproxy: before one of them), "
                    "or set [server] workers = 1"
                )


def _listeners(config: Config) -> list[tuple[str, str, str]]:
    """(kind, name, description) of every listener the workers serve, as make_service
    names them."""
    return [
        (kind, f"{kind.lower()}-{index}", description)
        for kind, descriptions in (
            ("POP3", config.pop3_listen),
            ("POP3S", config.pop3s_listen),
            ("SMTP", config.smtp_listen),
        )
        for index, description in enumerate(descriptions)
    ]


def make_supervisor(
    config: Config, reactor, *, foreground: bool = True, spawn=None
) -> MultiService:
    """The twistd service of a server of several workers (see the module's docstring).

    ``reactor`` runs it all (``twistd popserv`` hands in the global one); ``foreground``
    as for ``make_service``; ``spawn`` is ``reactor.spawnProcess`` unless a test hands in
    another.
    """
    from popserv.notify import Notifier
    from popserv.process import ProcessSetup
    from popserv.service import ReloadOnSIGHUP, prepare_files

    count = worker_count(config)
    # Read now, as root if started so: workers get the bytes, not the files (a key only
    # root may read, as certbot leaves it, still serves).
    created, _, tls = prepare_files(config)
    state_dir = os.path.abspath(config.state_dir)
    metrics_dir = None
    if config.metrics_listen:
        # The workers write their figures there, as [server] user.
        metrics_dir = os.path.join(state_dir, METRICS_DIR)
        _empty_directory(metrics_dir)
        created.append(metrics_dir)
    top = MultiService()
    ProcessSetup(config, created).setServiceParent(top)
    listeners = []
    for kind, name, description in _listeners(config):
        listener = SharedListener(kind, description, reactor, foreground)
        listener.setName(name)
        listener.setServiceParent(top)
        listeners.append(listener)
    on_ended = None
    if metrics_dir is not None:
        on_ended = _add_metrics_page(top, config, metrics_dir, reactor, foreground)
    shared = SharedStateKeeper(
        os.path.join(state_dir, sharedstate.SHARED_STATE_FILE),
        reactor,
        login_delay=config.pop3_login_delay,
    )
    shared.setServiceParent(top)
    notify = SupervisorNotify(Notifier(), _status(config, count), reactor)
    pool = WorkerPool(
        count,
        worker_config(config, count),
        listeners,
        shared,
        reactor,
        spawn=spawn,
        tls=tls,
        metrics_dir=metrics_dir,
        on_ready=notify.workers_ready,
        on_ended=on_ended,
    )
    pool.setServiceParent(top)
    reload_service = ReloadOnSIGHUP(pool.reload, reactor, notify=notify)
    reload_service.setName("reload")
    reload_service.setServiceParent(top)
    notify.setServiceParent(top)
    log.info(
        "popserv {hostname}: {count} workers on POP3 {listeners}, POP3S {tls_listeners}, "
        "SMTP {smtp_listeners}",
        hostname=config.hostname,
        count=count,
        listeners=", ".join(config.pop3_listen),
        tls_listeners=", ".join(config.pop3s_listen) or "none",
        smtp_listeners=", ".join(config.smtp_listen) or "none",
    )
    return top


def _status(config: Config, count: int) -> str:
    """The one line systemd shows for the running server (systemctl status)."""
    return (
        f"Serving POP3 on {', '.join(config.pop3_listen) or 'none'}, "
        f"POP3S on {', '.join(config.pop3s_listen) or 'none'}, "
        f"SMTP on {', '.join(config.smtp_listen) or 'none'}, with {count} workers"
    )


def worker_config(config: Config, count: int) -> Config:
    """The Config each worker serves with: ``[auth] max_verifications`` divided among them,
    so that the hashes verified at once (and their memory) stay within the setting."""
    return config.replace(
        workers=count,
        auth_max_verifications=max(1, config.auth_max_verifications // count),
    )


class HeldForWorkers(Factory):
    """The factory of a socket the supervisor holds for its workers: it never accepts on it."""

    noisy = False

    def buildProtocol(self, addr):
        return None


class _PortRecorder:
    """An endpoint that keeps the port its wrapped endpoint listens with."""

    def __init__(self, endpoint):
        self.endpoint = endpoint
        self.port = None

    def listen(self, factory):
        return self.endpoint.listen(factory).addCallback(self._record)

    def _record(self, port):
        self.port = port
        return port


class SharedListener(Listener):
    """One listener, bound by the supervisor in ``privilegedStartService``, for the workers.

    It binds as a listener of one process does (the same endpoints, the same one-line
    errors), then its reactor stops reading from it: only the workers accept.  ``haproxy``
    says whether the workers must expect a PROXY header first.
    """

    def __init__(self, kind: str, description: str, reactor, foreground: bool = True):
        self.held = HeldForWorkers()
        super().__init__(kind, description, self.held, reactor, foreground)
        self.endpoint = _PortRecorder(self.endpoint)
        # haproxy: wraps the factory it is given; the workers wrap theirs the same way.
        self.haproxy = description.partition(":")[0].strip().lower() == "haproxy"

    @property
    def port(self):
        return self.endpoint.port

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        port = self.port
        if port is None:
            raise RuntimeError(f"{self.description}: the listener did not bind at once")
        port.stopReading()
        factory = getattr(port.factory, "wrappedFactory", None) if self.haproxy else port.factory
        if factory is not self.held:
            raise RuntimeError(f"{self.description}: several workers cannot share this listener")
        log.info(
            "popserv.listening: {name} {description} on {address}",
            name=self.name,
            description=self.description,
            address=_address(port.getHost()),
        )

    def spec(self, fd: int) -> dict:
        """What a worker needs to serve this listener from its descriptor ``fd``."""
        return {
            "name": self.name,
            "description": self.description,
            "fd": fd,
            "family": int(self.port.addressFamily),
            "haproxy": self.haproxy,
        }


def _address(address) -> str:
    host = getattr(address, "host", None)
    if host is None:
        return str(getattr(address, "name", address))
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"


def _add_metrics_page(top: MultiService, config: Config, directory: str, reactor, foreground):
    """The workers' metrics, summed from their multiprocess files, served at ``/metrics``;
    returns what to call with the pid of a worker that ended (its live gauges go)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

    from popserv.metrics import metrics_site

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    site = metrics_site(registry, reactor)
    listener = Listener("metrics", config.metrics_listen, site, reactor, foreground)
    listener.setName("metrics")
    listener.setServiceParent(top)
    log.info(
        "popserv.metrics: /metrics on {endpoint}, summed over the workers",
        endpoint=config.metrics_listen,
    )
    return lambda pid: mark_process_dead(pid, directory)


def _empty_directory(directory: str) -> None:
    """``directory`` made (0700) or emptied: a new start counts from zero."""
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    os.makedirs(directory, 0o700)


class SharedStateKeeper(Service):
    """The supervisor's hold on the shared state: made at start, kept small, and rid of
    what workers that ended had counted."""

    name = "shared-state"

    def __init__(self, path: str, reactor, *, login_delay: float = 0):
        self.path = path
        self._reactor = reactor
        self.login_delay = login_delay
        self.db = None
        self._pruning = None

    def startService(self) -> None:
        # After ProcessSetup: made by the user the workers run as.
        super().startService()
        try:
            self.db = sharedstate.open_database(self.path)
            sharedstate.forget_processes_except(self.db, process_alive)
            sharedstate.forget_verified(self.db)
        except (OSError, sqlite3.Error) as e:
            # No worker could count failed logins: better no server than one without.
            self.db = None
            log.critical(
                "popserv.shared_state_unavailable: {path}: {error}; the server stops "
                "(the state directory must be writable by the server's user)",
                path=self.path,
                error=str(e),
            )
            self._reactor.callLater(0, _stop, self._reactor)
            return
        self._pruning = task.LoopingCall(self.prune)
        self._pruning.clock = self._reactor
        self._pruning.start(PRUNE_INTERVAL, now=False)

    def prune(self) -> None:
        try:
            sharedstate.prune(self.db, self._reactor.seconds(), login_delay=self.login_delay)
        except Exception:
            log.failure("popserv.shared_state_error: pruning {path}", path=self.path)

    def forget(self, pid: int) -> None:
        """Drop what the ended worker ``pid`` counted, before another takes its place."""
        if self.db is None:
            return
        try:
            sharedstate.forget_process(self.db, pid)
        except Exception:
            log.failure("popserv.shared_state_error: forgetting worker {pid}", pid=pid)

    def stopService(self):
        super().stopService()
        if self._pruning is not None and self._pruning.running:
            self._pruning.stop()
        if self.db is not None:
            self.db.close()
            self.db = None


def _stop(reactor) -> None:
    if reactor.running:
        reactor.stop()


class SupervisorNotify(NotifyService):
    """systemd's notifications for a supervisor: READY=1 once every worker serves, not
    when the reactor starts; reloads and the stop as for one process."""

    def startService(self) -> None:
        Service.startService(self)

    def workers_ready(self) -> None:
        """Every worker serves: the server is up."""
        if self.running:
            self.notifier.ready(self.status)


class WorkerPool(Service):
    """``count`` worker processes, each in a slot of its own, kept running while this runs."""

    name = "workers"

    def __init__(
        self,
        count: int,
        config: Config,
        listeners: list[SharedListener],
        shared: SharedStateKeeper,
        reactor,
        *,
        spawn=None,
        tls=None,
        metrics_dir: str | None = None,
        on_ready=None,
        on_ended=None,
        observer=None,
        ticket_keys: TicketKeys | None = None,
        auth_cache_key: bytes | None = None,
    ):
        """``ticket_keys``: the TLS session-ticket keys to start with (none: new ones);
        ``auth_cache_key``: the key of the verified-password digests (none: a new one)."""
        self.count = count
        self.config = config
        self.listeners = listeners
        self.shared = shared
        self._reactor = reactor
        self._spawn = spawn if spawn is not None else reactor.spawnProcess
        #: The ReloadableTLS whose certificate and key each new worker is handed.
        self.tls = tls
        self.metrics_dir = metrics_dir
        #: The session-ticket keys every worker has, made here in memory and rotated.
        self.ticket_keys = ticket_keys if ticket_keys is not None else TicketKeys.make()
        self._rotation = None
        #: The key of the verified-password digests every worker shares; never rotated:
        #: a new one would only turn every entry into a miss.
        self.auth_cache_key = auth_cache_key if auth_cache_key is not None else os.urandom(32)
        self._on_ready = on_ready
        #: Called with the pid of each worker that ended.
        self._on_ended = on_ended
        self.observer = observer if observer is not None else globalLogPublisher
        #: slot -> the worker in it now (None while it waits to restart).
        self.workers: dict[int, WorkerProcess | None] = {}
        self._quick_ends: dict[int, int] = {}
        self._restarts: dict[int, object] = {}
        self._stopping = False
        self._ever_ready = False
        self._stopped: list[defer.Deferred] = []

    def startService(self) -> None:
        super().startService()
        if self.shared.db is None:
            return  # the server is stopping: see popserv.shared_state_unavailable
        self._rotation = task.LoopingCall(self.rotate_ticket_keys)
        self._rotation.clock = self._reactor
        self._rotation.start(ROTATION_INTERVAL, now=False)
        for slot in range(self.count):
            self._start(slot)

    def rotate_ticket_keys(self) -> None:
        """A new current ticket key to every worker; the old one still opens tickets until
        the next rotation."""
        self.ticket_keys = self.ticket_keys.rotated()
        for worker in self.workers.values():
            if worker is not None:
                worker.send(ticket_keys_frame(self.ticket_keys))
        log.info(
            "tls.ticket_keys_rotated: new session-ticket key for workers {pids}", pids=self.pids()
        )

    def pids(self) -> list[int]:
        """The pids of the workers running now."""
        return [w.pid for w in self.workers.values() if w is not None and w.pid is not None]

    def _start(self, slot: int) -> None:
        self._restarts.pop(slot, None)
        child_fds = {0: "w", 1: "r", 2: "r"}
        specs = []
        for offset, listener in enumerate(self.listeners):
            fd = FIRST_LISTENER_FD + offset
            child_fds[fd] = listener.port.fileno()
            specs.append(listener.spec(fd))
        env = {
            key: value
            for key, value in os.environ.items()
            # systemd's variables are the supervisor's: its sockets, its notifications.
            if key not in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET")
        }
        env[WORKER_ENV] = worker_settings(self.config, specs, self.shared.path)
        # The workers import the popserv this process runs.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(
            [package_root, *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        if self.metrics_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        pem = self.tls.pem if self.tls is not None else None
        worker = WorkerProcess(self, slot, self._reactor.seconds(), pem)
        self.workers[slot] = worker
        self._spawn(
            worker,
            sys.executable,
            [sys.executable, "-m", "popserv.worker"],
            env=env,
            path=os.getcwd(),
            childFDs=child_fds,
        )
        log.info("popserv.worker_started: pid={pid} slot={slot}", pid=worker.pid, slot=slot)

    def _ready(self, worker: WorkerProcess) -> None:
        worker.ready = True
        if worker.reload_pending:
            worker.reload_pending = False
            worker.signal("HUP")
        if not self._ever_ready and all(w is not None and w.ready for w in self.workers.values()):
            self._ever_ready = True
            if self._on_ready is not None:
                self._on_ready()

    def _ended(self, worker: WorkerProcess, status: str) -> None:
        slot = worker.slot
        if self.workers.get(slot) is worker:
            self.workers[slot] = None
        self.shared.forget(worker.pid)
        if self._on_ended is not None:
            self._on_ended(worker.pid)
        worker.ended.callback(None)
        if self._stopping or not self.running:
            log.info("popserv.worker_stopped: pid={pid} {status}", pid=worker.pid, status=status)
            return
        if not self._ever_ready:
            log.error(
                "popserv.worker_failed: pid={pid} {status} while the server was starting; "
                "it stops (see the worker's messages above)",
                pid=worker.pid,
                status=status,
            )
            self._reactor.callLater(0, _stop, self._reactor)
            return
        lived = self._reactor.seconds() - worker.started
        if lived >= STABLE_AFTER:
            self._quick_ends[slot] = 0
            delay = 0.0
        else:
            quick = self._quick_ends.get(slot, 0)
            self._quick_ends[slot] = quick + 1
            delay = min(RESTART_DELAY * 2**quick, RESTART_DELAY_MAX)
        log.warn(  # noqa: G010 (twisted.logger has no warning())
            "popserv.worker_ended: pid={pid} {status} after {lived:.1f} s; "
            "another starts in {delay:.1f} s",
            pid=worker.pid,
            status=status,
            lived=lived,
            delay=delay,
        )
        self._restarts[slot] = self._reactor.callLater(delay, self._start, slot)

    def reload(self) -> bool:
        """SIGHUP to every worker (each re-reads the certificate); later to one still starting."""
        for worker in self.workers.values():
            if worker is None:
                continue
            if worker.ready:
                worker.signal("HUP")
            else:
                worker.reload_pending = True
        log.info("popserv.reload_forwarded: to workers {pids}", pids=self.pids())
        return True

    def stopService(self):
        super().stopService()
        self._stopping = True
        if self._rotation is not None and self._rotation.running:
            self._rotation.stop()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        running = [w for w in self.workers.values() if w is not None]
        for worker in running:
            worker.signal("TERM")
        if not running:
            return None
        done = defer.DeferredList([w.ended for w in running])
        killer = self._reactor.callLater(STOP_TIMEOUT, self._kill, running)

        def stopped(result):
            if killer.active():
                killer.cancel()
            return result

        return done.addBoth(stopped)

    def _kill(self, workers: list[WorkerProcess]) -> None:
        for worker in workers:
            if not worker.ended.called:
                log.warn(  # noqa: G010
                    "popserv.worker_killed: pid={pid} did not stop in {timeout} s",
                    pid=worker.pid,
                    timeout=STOP_TIMEOUT,
                )
                worker.signal("KILL")

    def forward(self, worker: WorkerProcess, line: bytes) -> None:
        """One line of a worker's output: its JSON event into this log, or the line as text."""
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            self.stray(worker, line)
            return
        self.observer(forwarded_event(record, worker.pid))
        if record.get("namespace") == "popserv.worker" and record.get("worker_ready") is True:
            self._ready(worker)

    def stray(self, worker: WorkerProcess, line: bytes) -> None:
        """A line a worker wrote that is no event (Python's own errors, on standard error)."""
        log.warn(  # noqa: G010
            "popserv.worker_output: pid={pid} {line}",
            pid=worker.pid,
            line=line.decode("utf-8", "backslashreplace"),
        )


def forwarded_event(record: dict, pid: int) -> dict:
    """A worker's JSON log line as an event of this process, its time, namespace and level
    kept, marked ``worker=<pid>`` (in the text form: ``[namespace#level,worker=<pid>]``)."""
    fields = {
        key: value
        for key, value in record.items()
        if key not in ("time", "level", "namespace", "message", "system", "traceback")
        and not key.startswith("log_")
    }
    try:
        level = LogLevel.levelWithName(str(record.get("level")))
    except Exception:
        level = LogLevel.info
    namespace = str(record.get("namespace") or "popserv.worker")
    text = str(record.get("message", ""))
    if record.get("traceback"):
        text += "\n" + str(record["traceback"])
    return {
        **fields,
        "worker": pid,
        "log_format": "{log_text}",
        "log_text": text,
        "log_namespace": namespace,
        "log_level": level,
        "log_system": f"{namespace}#{level.name},worker={pid}",
        "log_time": _timestamp(record.get("time")),
    }


def _timestamp(text) -> float:
    """Seconds since the epoch of an ISO 8601 UTC time ("...Z"); now when there is none."""
    if isinstance(text, str):
        try:
            return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return time.time()


class WorkerProcess(ProcessProtocol):
    """One worker: its output read line by line, its end reported to the pool."""

    def __init__(self, pool: WorkerPool, slot: int, started: float, pem=None):
        self.pool = pool
        self._pem = pem
        self.slot = slot
        self.started = started
        self.pid: int | None = None
        self.ready = False
        self.reload_pending = False
        self.ended = defer.Deferred()
        self._buffers = {1: b"", 2: b""}

    def makeConnection(self, transport) -> None:
        self.pid = transport.pid
        super().makeConnection(transport)
        # First things on the worker's standard input, read before it serves; later
        # frames are new ticket keys (popserv.worker.ParentWatch).
        self.send(
            credentials_frame(self._pem)
            + ticket_keys_frame(self.pool.ticket_keys)
            + auth_cache_key_frame(self.pool.auth_cache_key)
        )
        self._pem = None

    def send(self, data: bytes) -> None:
        """Frames to the worker's standard input."""
        try:
            self.transport.writeToChild(0, data)
        except Exception:  # already gone: processEnded follows
            pass

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except Exception:  # already gone: processEnded follows
            pass

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd not in self._buffers:
            return
        *lines, rest = (self._buffers[fd] + data).split(b"\n")
        if len(rest) > MAX_LINE:
            lines.append(rest[:MAX_LINE])
            rest = b""
        self._buffers[fd] = rest
        for line in lines:
            self._line(fd, line)

    def childConnectionLost(self, fd: int) -> None:
        rest = self._buffers.get(fd)
        if rest:
            self._buffers[fd] = b""
            self._line(fd, rest)

    def _line(self, fd: int, line: bytes) -> None:
        if not line.strip():
            return
        if fd == 1:
            self.pool.forward(self, line)
        else:
            self.pool.stray(self, line)

    def processEnded(self, reason) -> None:
        for fd in (1, 2):
            self.childConnectionLost(fd)
        value = reason.value
        if getattr(value, "signal", None):
            status = f"killed by signal {value.signal}"
        else:
            status = f"exited with status {getattr(value, 'exitCode', None)}"
        self.pool._ended(self, status)
