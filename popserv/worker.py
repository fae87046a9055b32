"""One worker process of ``[server] workers``: serves on the sockets its supervisor bound.

``popserv.supervisor`` starts ``python -m popserv.worker`` with the listening sockets as
descriptors 3, 4, ... and ``POPSERV_WORKER`` in the environment: JSON of the effective
``Config`` (command-line overrides applied, nothing parsed again), which socket serves
which listener, and the shared-state file.  The worker builds the serving objects of
``popserv.service.make_service`` and adopts each socket instead of binding; ``haproxy:``
listeners get ``popserv.proxyproto``'s PROXY-protocol wrapper, as the endpoint would add it.

Standard input is a pipe from the supervisor carrying frames (``frame``): first the
certificate and key it read, then the TLS session-ticket keys shared by every worker
(``popserv.ticketkeys``), then the key of the verified-password digests they share
(``popserv.credcache``); later, new ticket keys at each rotation.  No key is ever
written to disk.

Its log goes to standard output as JSON lines, which the supervisor writes into its own
log with ``worker=<pid>``.  A worker dies with its supervisor, as a killed server of one
process takes its sessions with it: on Linux the kernel kills it (``PR_SET_PDEATHSIG``);
elsewhere the pipe on standard input ends, and the worker stops.  SIGTERM stops it
cleanly (open sessions end without committing), SIGHUP re-reads the certificate (the
ticket keys stay), SIGINT is ignored: a Ctrl-C at the terminal reaches every process,
and the supervisor stops the workers itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys

from twisted.application.service import Service
from twisted.internet import defer, tcp, unix
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.main import CONNECTION_DONE
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from popserv.config import Config
from popserv.proxyproto import PROXY_TIMEOUT, ProxyEndpoint
from popserv.ticketkeys import TicketKeyRing, TicketKeys

#: Named, since the module runs as __main__.
log = Logger(namespace="popserv.worker")

#: The environment variable holding the worker's settings.
WORKER_ENV = "POPSERV_WORKER"
#: The first descriptor of the listening sockets in a worker.
FIRST_LISTENER_FD = 3
#: prctl's option for the signal a process gets when its parent ends (linux/prctl.h).
_PR_SET_PDEATHSIG = 1
#: The kinds of frame on a worker's standard input, and the longest line that starts one.
TLS_FRAME = b"tls"
TICKET_KEYS_FRAME = b"ticket-keys"
AUTH_CACHE_KEY_FRAME = b"auth-cache-key"
MAX_HEADER = 80


def config_to_json(config: Config) -> dict:
    """The Config as JSON values: its fields, tuples as lists."""
    return dataclasses.asdict(config)


def config_from_json(fields: dict) -> Config:
    """The Config that ``config_to_json`` wrote."""
    names = {f.name for f in dataclasses.fields(Config)}
    values = {}
    for name, value in fields.items():
        if name not in names:
            raise ValueError(f"unknown Config field {name!r}")
        values[name] = tuple(value) if isinstance(value, list) else value
    return Config(**values)


def worker_settings(config: Config, listeners: list[dict], shared_state: str) -> str:
    """The text of ``POPSERV_WORKER``: the Config, the listeners, the shared-state file and
    the supervisor's pid.

    Each listener is ``{"name", "description", "fd", "family", "haproxy"}``, its ``fd``
    the descriptor number in the worker.
    """
    return json.dumps(
        {
            "config": config_to_json(config),
            "listeners": listeners,
            "shared_state": shared_state,
            "supervisor": os.getpid(),
        }
    )


def die_with(supervisor: int) -> None:
    """Have the kernel kill this process when its parent ends (Linux); if the parent,
    ``supervisor``, is gone already, end now."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the pipe's end stops the worker (ParentWatch)
    if os.getppid() != supervisor:
        os._exit(1)


@implementer(IStreamServerEndpoint)
class InheritedSocketEndpoint:
    """The listening socket at descriptor ``fd``, bound by the supervisor, accepted on here.

    Unlike Twisted's ``AdoptedStreamServerEndpoint``, a Unix socket's path stays when
    this process stops listening: the supervisor and the other workers still serve it.
    """

    def __init__(self, reactor, fd: int, family: int):
        self._reactor = reactor
        self.fd = fd
        self.family = family

    def listen(self, factory) -> defer.Deferred:
        return defer.execute(self._adopt, factory)

    def _adopt(self, factory):
        if self.family == socket.AF_UNIX:
            port = _SharedUNIXPort.adopt(self._reactor, self.fd, factory)
        else:
            port = self._reactor.adoptStreamPort(self.fd, self.family, factory)
        # The reactor accepts on its own duplicate.
        os.close(self.fd)
        return port


class AdoptedListener(Service):
    """Listens on ``endpoint`` from start to stop, as the endpoint service of one process
    does, adopting in ``privilegedStartService`` where that one binds."""

    def __init__(self, endpoint, factory):
        self.endpoint = endpoint
        self.factory = factory
        self.port = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        outcome = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        self.port = outcome[0]

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


class _SharedUNIXPort(unix.Port):
    """A Unix socket the supervisor bound: its path is the supervisor's to remove, and
    it is closed, never shut down (that would stop it listening for every process)."""

    _shouldShutdown = False

    @classmethod
    def adopt(cls, reactor, fd: int, factory) -> _SharedUNIXPort:
        port = cls._fromListeningDescriptor(reactor, fd, factory)
        port.startListening()
        return port

    def connectionLost(self, reason) -> None:
        # unix.Port's own would remove the path, which the other workers still serve.
        tcp.Port.connectionLost(self, reason)


def adopting(listeners: list[dict], reactor, proxy_timeout: float = PROXY_TIMEOUT):
    """The ``listen`` of ``make_service`` for a worker: each listener from its descriptor.

    ``proxy_timeout`` is ``haproxy:`` listeners' time for the PROXY header.
    """
    by_name = {spec["name"]: spec for spec in listeners}

    def listen(kind: str, name: str, description: str, factory):
        spec = by_name.get(name)
        if spec is None:
            # Served by the supervisor (the metrics page), or not at all.
            return None
        endpoint = InheritedSocketEndpoint(reactor, spec["fd"], spec["family"])
        if spec["haproxy"]:
            # As a haproxy: endpoint string wraps its inner endpoint.
            endpoint = ProxyEndpoint(endpoint, reactor, proxy_timeout)
        return AdoptedListener(endpoint, factory)

    return listen


class SharedParts:
    """The throttle, connection limiters and verified-password cache of a worker, over
    the shared database."""

    def __init__(self, path: str, cache_key: bytes | None = None):
        """``cache_key``: the supervisor's key of the verified-password digests (None:
        one of this worker's own, so that its entries hit only here)."""
        from popserv.sharedstate import open_database

        self.path = path
        self.db = open_database(path)
        self.cache_key = cache_key if cache_key is not None else os.urandom(32)

    def verified_passwords(self, config: Config, clock, metrics):
        """The ``VerifiedPasswords`` every worker with the same key shares."""
        from popserv.credcache import VerifiedPasswords
        from popserv.sharedstate import SharedDigests

        return VerifiedPasswords(
            clock,
            config.auth_cache_ttl,
            config.auth_cache_size,
            metrics=metrics,
            key=self.cache_key,
            store=SharedDigests(self.db),
        )

    def pop3_parts(self, config: Config, clock) -> dict:
        """``POP3Factory`` keywords: the shared ``throttle`` and ``limiter``."""
        from popserv.pop3.factory import DESCRIPTOR_RESERVE, throttle_settings
        from popserv.sharedstate import SharedConnectionLimiter, SharedLoginThrottle

        limiter = SharedConnectionLimiter(
            self.db,
            "pop3",
            config.pop3_max_connections,
            config.pop3_max_connections_per_peer,
            reserve=DESCRIPTOR_RESERVE,
            files_per_connection=2,
        )
        throttle = SharedLoginThrottle(self.db, clock, throttle_settings(config))
        return {"throttle": throttle, "limiter": limiter}

    def smtp_limiter(self, config: Config):
        """The shared ``IConnectionLimiter`` of the SMTP listeners."""
        from popserv.sharedstate import SharedConnectionLimiter
        from popserv.smtp import DESCRIPTOR_RESERVE

        return SharedConnectionLimiter(
            self.db,
            "smtp",
            config.smtp_max_connections,
            config.smtp_max_connections_per_peer,
            reserve=DESCRIPTOR_RESERVE,
            files_per_connection=1,
        )


def frame(kind: bytes, *parts: bytes) -> bytes:
    """One message on a worker's standard input: a line of its kind and the length of each
    part (``tls 1234 241``), then the parts."""
    return b" ".join([kind, *(b"%d" % len(part) for part in parts)]) + b"\n" + b"".join(parts)


def credentials_frame(pem: tuple[bytes, bytes] | None) -> bytes:
    """The certificate chain and key (both empty when there are none): the first frame."""
    return frame(TLS_FRAME, *(pem if pem is not None else (b"", b"")))


def ticket_keys_frame(keys: TicketKeys) -> bytes:
    """The session-ticket keys: sent after the credentials, and again at each rotation."""
    return frame(TICKET_KEYS_FRAME, keys.to_bytes())


def auth_cache_key_frame(key: bytes) -> bytes:
    """The key of the shared verified-password digests: sent after the ticket keys."""
    return frame(AUTH_CACHE_KEY_FRAME, key)


def _header(line: bytes) -> tuple[bytes, list[int]]:
    kind, *lengths = line.split()
    if not lengths or not all(length.isdigit() for length in lengths):
        raise ValueError(f"not a frame from the supervisor: {line[:40]!r}")
    return kind, [int(length) for length in lengths]


def read_frame(fd: int, kind: bytes) -> list[bytes]:
    """The parts of the next frame on ``fd``, which must be a ``kind`` one; read before the
    reactor runs, no byte past the frame."""

    def exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = os.read(fd, count - len(data))
            if not chunk:
                raise EOFError(f"the supervisor ended before it sent the {kind.decode()} frame")
            data += chunk
        return data

    line = b""
    while not line.endswith(b"\n"):
        line += exactly(1)
        if len(line) > MAX_HEADER:
            raise ValueError("not a frame from the supervisor")
    found, lengths = _header(line)
    if found != kind:
        raise ValueError(f"a {found!r} frame from the supervisor, not {kind!r}")
    return [exactly(length) for length in lengths]


def read_credentials(fd: int = 0) -> tuple[bytes, bytes] | None:
    """What ``credentials_frame`` wrote on ``fd``."""
    cert, key = read_frame(fd, TLS_FRAME)
    return (cert, key) if cert and key else None


def read_ticket_keys(fd: int = 0) -> TicketKeys:
    """What ``ticket_keys_frame`` wrote on ``fd``."""
    (keys,) = read_frame(fd, TICKET_KEYS_FRAME)
    return TicketKeys.from_bytes(keys)


def read_auth_cache_key(fd: int = 0) -> bytes:
    """What ``auth_cache_key_frame`` wrote on ``fd``."""
    (key,) = read_frame(fd, AUTH_CACHE_KEY_FRAME)
    if len(key) < 32:
        raise ValueError("the supervisor's verified-password key is too short")
    return key


class FrameReader:
    """Frames out of bytes as they arrive, for reading in the reactor."""

    def __init__(self):
        self._buffer = b""

    def feed(self, data: bytes) -> list[tuple[bytes, list[bytes]]]:
        """Every frame ``data`` completes, as ``(kind, parts)``."""
        self._buffer += data
        frames = []
        while True:
            line, newline, rest = self._buffer.partition(b"\n")
            if not newline:
                if len(line) > MAX_HEADER:
                    raise ValueError("not a frame from the supervisor")
                return frames
            kind, lengths = _header(line)
            if len(rest) < sum(lengths):
                return frames
            parts = []
            for length in lengths:
                parts.append(rest[:length])
                rest = rest[length:]
            self._buffer = rest
            frames.append((kind, parts))


class ParentWatch:
    """Reads the supervisor's pipe (standard input) after the first frames: later frames
    go to ``received`` (new ticket keys), and the pipe's end stops the worker.

    The end shows as end of file, or (epoll) as a hang-up, which the reactor reports
    with ``connectionLost`` alone.
    """

    def __init__(self, stop, fd: int = 0, received=None):
        self._stop = stop
        self._fd = fd
        self._received = received
        self._frames = FrameReader()
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "supervisor-pipe"

    def doRead(self):
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            return CONNECTION_DONE
        try:
            frames = self._frames.feed(data)
        except ValueError as e:
            # Nothing after it can be trusted; serving goes on with what it has.
            log.error("popserv.worker_bad_frame: {error}", error=str(e))
            self._frames = FrameReader()
            return None
        for kind, parts in frames:
            if self._received is not None:
                self._received(kind, parts)
        return None

    def connectionLost(self, reason) -> None:
        log.info("popserv.worker_orphaned: pid={pid} the supervisor is gone", pid=os.getpid())
        self._stop()


class _Stopper:
    """Stops the reactor once, however many ways the stop is asked for: the supervisor's
    SIGTERM, systemd's SIGTERM to every process of the unit, the supervisor's pipe."""

    def __init__(self, reactor):
        self._reactor = reactor
        self.stopping = False

    def __call__(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("popserv.worker_stopping: pid={pid}", pid=os.getpid())
        if self._reactor.running:
            self._reactor.stop()

    def signalled(self, signum, frame) -> None:
        self._reactor.callFromThread(self)


def main(reactor) -> None:
    """Serve as the worker ``POPSERV_WORKER`` describes, on ``reactor``, until stopped."""
    from twisted.logger import globalLogBeginner

    from popserv.logs import json_file_observer

    settings = json.loads(os.environ.pop(WORKER_ENV))
    die_with(settings["supervisor"])
    globalLogBeginner.beginLoggingTo([json_file_observer(sys.stdout)], redirectStandardIO=False)
    from popserv.service import make_service

    config = config_from_json(settings["config"])
    listeners = settings["listeners"]
    pem = read_credentials(0)
    ticket_keys = TicketKeyRing(read_ticket_keys(0))
    cache_key = read_auth_cache_key(0)
    from popserv.tls import ReloadableTLS, tls_files

    cert_path, key_path, self_signed = tls_files(config)
    # Without pem (a supervisor that had none) the files are read here.
    tls = ReloadableTLS(
        cert_path, key_path, self_signed=self_signed, pem=pem, ticket_keys=ticket_keys
    )
    top = make_service(
        config,
        reactor,
        listen=adopting(listeners, reactor, config.proxy_timeout),
        shared=SharedParts(settings["shared_state"], cache_key),
        tls=tls,
    )
    stop = _Stopper(reactor)
    top.privilegedStartService()
    reactor.callWhenRunning(top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)

    def received(kind: bytes, parts: list[bytes]) -> None:
        if kind == TICKET_KEYS_FRAME:
            ticket_keys.update(TicketKeys.from_bytes(parts[0]))

    watch = ParentWatch(stop, received=received)

    def ready() -> None:
        # Twisted's handlers are in place by now; these replace them.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, stop.signalled)
        reactor.addReader(watch)
        log.info(
            "popserv.worker_ready: pid={pid} serving {listeners}",
            pid=os.getpid(),
            listeners=", ".join(spec["name"] for spec in listeners),
            worker_ready=True,
        )

    reactor.callWhenRunning(ready)
    reactor.run()
    log.info("popserv.worker_stopped: pid={pid}", pid=os.getpid())


if __name__ == "__main__":
    from popserv.service import run_worker

    run_worker()
