"""Who is logged in: the open POP3 sessions of this process, and how ``popserv who`` reads them.

A login adds a session to a ``MemorySessionRegistry`` (a dict entry) and its end takes
it out; nothing is written anywhere per login.  Each server process answers on a Unix
socket of its own, ``<state_dir>/who/<pid>.sock``, by writing its snapshot as JSON and
closing: no request is read, so there is nothing to parse.  ``read_sessions`` connects
to every socket there; one nobody answers belongs to a process that is gone (the kernel
says so at once) and is removed.  Shared registries (a database, for several processes
or hosts) can implement ``ISessionRegistry`` later without changing the protocol.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
from dataclasses import asdict

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from popserv.interfaces import ISessionRegistry, OpenSession

log = Logger()

#: Where the sockets are, under ``[server] state_dir``.
WHO_DIR = "who"
SUFFIX = ".sock"
#: The longest path a Unix socket address holds (Linux: 108 octets with the final NUL).
_MAX_SOCKET_PATH = 107


@implementer(ISessionRegistry)
class MemorySessionRegistry:
    """The logged-in sessions of this process, in memory."""

    def __init__(self, clock, node: str | None = None):
        """``clock`` stamps logins (the reactor: wall-clock seconds); ``node`` names the host."""
        self._clock = clock
        self.node = node if node is not None else socket.gethostname()
        self._open: dict[int, tuple[str, str, float]] = {}
        self._keys = itertools.count()

    def __len__(self) -> int:
        return len(self._open)

    def opened(self, user: str, peer: str) -> int:
        key = next(self._keys)
        self._open[key] = (user, peer, self._clock.seconds())
        return key

    def closed(self, key: int) -> None:
        self._open.pop(key, None)

    def snapshot(self) -> list[OpenSession]:
        # The pid when asked, not when made: twistd forks to daemonize after building.
        pid = os.getpid()
        return [
            OpenSession(user, peer, since, pid, self.node)
            for user, peer, since in self._open.values()
        ]


def to_json(sessions: list[OpenSession]) -> bytes:
    return json.dumps([asdict(s) for s in sessions]).encode("utf-8")


class _Answer(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(to_json(self.factory.registry.snapshot()))
        self.transport.loseConnection()


class _AnswerFactory(Factory):
    protocol = _Answer
    noisy = False

    def __init__(self, registry):
        self.registry = registry


def _socket_path(directory: str, name: str, directory_fd: int | None) -> str:
    """``directory/name``, or, when too long for a socket address, a short way to it.

    Linux resolves ``/proc/self/fd/<fd>/name`` through the open directory ``fd``.
    """
    path = os.path.join(directory, name)
    if len(os.fsencode(path)) <= _MAX_SOCKET_PATH or directory_fd is None:
        return path
    return f"/proc/self/fd/{directory_fd}/{name}"


def _open_directory(directory: str) -> int | None:
    if len(os.fsencode(directory)) + 20 <= _MAX_SOCKET_PATH:
        return None
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY)


class WhoSocketService(Service):
    """This process's ``<state_dir>/who/<pid>.sock`` (mode 0600), open while the service runs.

    Bound in ``startService``, after root is dropped, so the socket belongs to the user
    the server runs as.  Stopping the listener removes it.
    """

    def __init__(self, registry: ISessionRegistry, directory: str, reactor):
        self.registry = registry
        self.directory = directory
        self._reactor = reactor
        self._port = None
        self._directory_fd: int | None = None

    def startService(self) -> None:
        super().startService()
        name = f"{os.getpid()}{SUFFIX}"
        try:
            self._directory_fd = _open_directory(self.directory)
            path = _socket_path(self.directory, name, self._directory_fd)
            if os.path.lexists(path):
                # A socket of a process that had our pid before: it is gone.
                os.unlink(path)
            endpoint = endpoints.UNIXServerEndpoint(self._reactor, path, mode=0o600)
        except OSError as e:
            self._failed(e)
            return
        d = endpoint.listen(_AnswerFactory(self.registry))
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, port) -> None:
        self._port = port

    def _failed(self, reason) -> None:
        # Serving mail matters more than being listed: say so, and go on.
        log.error(
            "popserv.who_unavailable: directory={directory} error={error}",
            directory=self.directory,
            error=getattr(reason, "value", reason),
        )

    def stopService(self):
        super().stopService()
        port, self._port = self._port, None
        d = port.stopListening() if port is not None else None
        if self._directory_fd is not None:
            fd, self._directory_fd = self._directory_fd, None
            if d is None:
                os.close(fd)
            else:
                d.addBoth(lambda result: (os.close(fd), result)[1])
        return d


def read_sessions(directory: str, timeout: float = 5.0) -> tuple[list[OpenSession], list[str]]:
    """The sessions of every server process using ``directory`` (``<state_dir>/who``).

    Sockets no process listens on any more are removed (when allowed) and skipped.
    Also returns what went wrong with the others: a process that accepts but does not
    answer in ``timeout`` seconds, or answers nonsense.
    """
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(SUFFIX))
    except FileNotFoundError:
        return [], []
    sessions: list[OpenSession] = []
    problems: list[str] = []
    directory_fd = _open_directory(directory)
    try:
        for name in names:
            path = _socket_path(directory, name, directory_fd)
            try:
                try:
                    data = _ask(path, timeout)
                except ConnectionResetError:
                    # A process killed with this connection in its queue resets it; the
                    # second try is refused (gone) or answered (it was something else).
                    data = _ask(path, timeout)
            except (ConnectionRefusedError, FileNotFoundError):
                _remove_stale(path)
                continue
            except OSError as e:
                problems.append(f"{os.path.join(directory, name)}: {e.strerror or 'no answer'}")
                continue
            try:
                sessions.extend(OpenSession(**entry) for entry in json.loads(data))
            except (ValueError, TypeError):
                problems.append(f"{os.path.join(directory, name)}: not a list of sessions")
    finally:
        if directory_fd is not None:
            os.close(directory_fd)
    return sessions, problems


def _ask(path: str, timeout: float) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _remove_stale(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # another reader did, or we may not: skipped all the same
