"""Mistakes that stop ``twistd popserv`` from starting, each told in one line.

twistd answers a ``UsageError`` with its whole usage text, and a port that will not bind
with a traceback; an admin needs one line naming the file, key or port, and the fix.
``StartupError`` carries those lines.  ``check_ports`` binds every TCP listener's address
for a moment before twistd daemonizes, so that a port another server holds is reported
on the admin's terminal, not after the fork, where only the log would see it.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterable

from twisted.internet import endpoints
from twisted.internet.abstract import isIPv6Address
from twisted.internet.protocol import Factory

from popserv.config import Config

#: Kind of listener -> (its option of ``twistd popserv``, its key in the config file).
LISTENER_SETTINGS = {
    "POP3": ("--pop3", "[pop3] listen"),
    "POP3S": ("--pop3s", "[pop3s] listen"),
    "SMTP": ("--smtp", "[smtp] listen"),
    "metrics": ("--metrics", "[metrics] listen"),
}


class StartupError(SystemExit):
    """Problems that stop ``twistd popserv``: one ``popserv: ...`` line each on stderr.

    A ``SystemExit`` (exit status 1, its text on stderr), because twistd prints its
    usage text before any ``UsageError``, and a traceback for any other exception.
    """

    def __init__(self, problems: str | Iterable[str]):
        texts = [problems] if isinstance(problems, str) else list(problems)
        self.problems = [line for text in texts for line in text.splitlines() if line.strip()]
        super().__init__("\n".join(f"popserv: {line}" for line in self.problems))


class ListenFailed(Exception):
    """A listener of a daemon that could not bind: twistd reports an Exception to the
    waiting parent through its status pipe (a SystemExit would leave the parent waiting)."""


def one_line(text: object) -> str:
    """``text`` with its line breaks and runs of spaces made single spaces."""
    return " ".join(str(text).split())


def listeners(config: Config) -> list[tuple[str, str]]:
    """``(kind, endpoint string)`` of every listener the configuration asks for."""
    found = [("POP3", description) for description in config.pop3_listen]
    found += [("POP3S", description) for description in config.pop3s_listen]
    found += [("SMTP", description) for description in config.smtp_listen]
    if config.metrics_listen:
        found.append(("metrics", config.metrics_listen))
    return found


def cannot_listen(kind: str, description: str, reason: OSError | str | None) -> str:
    """The line for a listener that cannot bind: which one, why, and what to change."""
    option, key = LISTENER_SETTINGS[kind]
    code = getattr(reason, "errno", None)
    if code == errno.EADDRINUSE and description.lower().startswith("unix:"):
        why = "the file already exists"
        fix = f"if no server uses it, remove it, or choose another path with {option} or {key}"
    elif code == errno.EADDRINUSE:
        why = "address already in use"
        fix = f"stop the other server or choose another port with {option} or {key}"
    elif code in (errno.EACCES, errno.EPERM):
        why = "permission denied"
        fix = (
            "ports below 1024 need root (start twistd as root; --uid or [server] user then "
            f"drops it), or choose a port above 1023 with {option} or {key}"
        )
    elif code == errno.EADDRNOTAVAIL:
        why = "no such address on this machine"
        fix = f"give one of this machine's addresses as interface= with {option} or {key}"
    else:
        text = getattr(reason, "strerror", None) or reason or "unknown error"
        why = one_line(text)
        fix = f"choose another endpoint with {option} or {key}"
    return f"cannot listen on {description} ({kind}): {why}; {fix}"


class _AddressRecorder:
    """Stands in for the reactor so that an endpoint tells where it would listen."""

    def __init__(self):
        self.tcp: list[tuple[str, int]] = []
        self.unix: list[tuple[str, bool]] = []

    def listenTCP(self, port, factory, backlog=50, interface=""):
        self.tcp.append((interface, port))

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface=""):
        self.tcp.append((interface, port))

    def listenUNIX(self, address, factory, backlog=50, mode=0o666, wantPID=0):
        self.unix.append((address, bool(wantPID)))


def _addresses(description: str) -> _AddressRecorder:
    """Where an endpoint string listens: TCP ``(interface, port)``, socket files."""
    recorder = _AddressRecorder()
    try:
        endpoint = endpoints.serverFromString(recorder, description)
    except Exception:  # not an endpoint: the option checks have named it
        return recorder
    try:
        listening = endpoint.listen(Factory())
    except AttributeError:  # systemd: and the like need what the recorder lacks
        return recorder
    listening.addErrback(lambda failure: None)  # the same, found inside the Deferred
    return recorder


def tcp_addresses(description: str) -> list[tuple[str, int]]:
    """``(interface, port)`` a TCP endpoint string listens on; none for other kinds."""
    return _addresses(description).tcp


def _bind(interface: str, port: int) -> socket.socket:
    """A socket listening on the address, as Twisted's TCP port would (SO_REUSEADDR)."""
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    address = socket.getaddrinfo(
        interface or None, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )[0][4]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return sock


def _bind_as(description: str, interface: str, port: int) -> socket.socket:
    """Bind as the listener would: the dual-stack form falls back to IPv4 without IPv6."""
    from popserv.listeners import NO_IPV6, dual_stack

    try:
        return _bind(interface, port)
    except OSError as e:
        if dual_stack(description) is None or e.errno not in NO_IPV6:
            raise
    return _bind("0.0.0.0", port)


def _socket_file_in_the_way(path: str, locked: bool) -> bool:
    """Whether a ``unix:`` listener's bind would fail on a file already at ``path``.

    With a lock file (``lockfile=1``, the default) Twisted removes a socket left by a
    server that died; never any other file, nor a socket that still answers.
    """
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return False
    if not stat.S_ISSOCK(mode):
        return True
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return not locked
    return True


def check_ports(config: Config) -> None:
    """Raise StartupError, one line per listener, if a listener's port cannot be had.

    TCP addresses are bound, and held until all are tried, so two listeners of this
    configuration on one port are found too; port 0 (any free port) always binds and
    nothing is kept.  A ``unix:`` socket file already there is named as well.
    """
    problems = []
    held: list[tuple[int, str, socket.socket]] = []
    try:
        for kind, description in listeners(config):
            addresses = _addresses(description)
            for path, locked in addresses.unix:
                if _socket_file_in_the_way(path, locked):
                    in_use = OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE), path)
                    problems.append(cannot_listen(kind, description, in_use))
            for interface, port in addresses.tcp:
                if port == 0:
                    continue
                try:
                    held.append(
                        (port, f"{description} ({kind})", _bind_as(description, interface, port))
                    )
                except OSError as e:
                    same = [name for other, name, _ in held if other == port]
                    if e.errno == errno.EADDRINUSE and same:
                        option, key = LISTENER_SETTINGS[kind]
                        problems.append(
                            f"cannot listen on {description} ({kind}): the same port as "
                            f"{same[0]}; give each listener its own port with {option} or {key}"
                        )
                    else:
                        problems.append(cannot_listen(kind, description, e))
    finally:
        for _, _, sock in held:
            sock.close()
    if problems:
        raise StartupError(problems)
