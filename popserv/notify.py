"""Tell systemd how the server is doing (sd_notify): ready, reloading, stopping.

A ``Type=notify`` unit gets the address of a datagram socket in ``$NOTIFY_SOCKET`` (a
path, or an abstract name written with a leading ``@``), and systemd considers the
service started only once ``READY=1`` arrives there.  Without the variable (a server not
started by systemd) nothing is sent.  Only the standard library is used, so popserv
needs no binding to libsystemd.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger()

#: Seconds a datagram may wait for room in systemd's queue before it is given up.
SEND_TIMEOUT = 5.0


def notify_address(environ: Mapping[str, str]) -> bytes | None:
    """The socket address in ``NOTIFY_SOCKET``, abstract for ``@name``; None when unset.

    An address of another kind (systemd 254 also knows ``vsock:``) is logged and ignored.
    """
    value = environ.get("NOTIFY_SOCKET", "")
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    log.warn(  # noqa: G010 (twisted.logger has no warning())
        "popserv.notify_unsupported: NOTIFY_SOCKET={address} is neither a path nor an "
        "abstract socket name; systemd hears nothing from this server",
        address=value,
    )
    return None


class Notifier:
    """Sends ``KEY=value`` lines in one datagram to systemd's notification socket."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        self.address = notify_address(os.environ if environ is None else environ)

    def send(self, **fields: object) -> bool:
        """Send ``fields`` as one message; False when there is no socket or it failed."""
        if self.address is None:
            return False
        message = "".join(
            f"{key}={' '.join(str(value).splitlines())}\n" for key, value in fields.items()
        )
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT)
                sock.sendto(message.encode("utf-8"), self.address)
        except OSError as e:
            log.warn(  # noqa: G010
                "popserv.notify_failed: could not tell systemd {sending}: {error}",
                sending=message.splitlines()[0],
                error=str(e),
            )
            return False
        return True

    def ready(self, status: str) -> bool:
        """Startup or a reload is complete: systemd may count the service as running."""
        return self.send(READY=1, STATUS=status)

    def reloading(self, status: str) -> bool:
        """A reload begins; ``READY=1`` ends it (systemd 253+ wants the monotonic time)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=usec, STATUS=status)

    def stopping(self, status: str) -> bool:
        """The server has begun to shut down."""
        return self.send(STOPPING=1, STATUS=status)


class NotifyService(Service):
    """``READY=1`` once the reactor runs, ``STOPPING=1`` when the service stops.

    Added as the last child of popserv's ``MultiService``: its ``startService`` runs
    after every listener has bound (``privilegedStartService``, before twistd changes
    user) and after ``ProcessSetup`` has dropped root, and the reactor has started
    accepting once the readiness call runs.  Stopped first, so systemd hears of the
    shutdown before any listener closes.
    """

    name = "systemd-notify"

    def __init__(self, notifier: Notifier, status: str, reactor):
        self.notifier = notifier
        self.status = status
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(self._ready)

    def _ready(self) -> None:
        if self.running:
            self.notifier.ready(self.status)

    def stopService(self):
        self.notifier.stopping("Stopping: closing the listeners and sessions")
        return super().stopService()

    def reloading(self) -> None:
        """Tell systemd a reload (SIGHUP) has begun."""
        self.notifier.reloading("Reloading the TLS certificate and key")

    def reloaded(self, succeeded: bool) -> None:
        """Tell systemd the reload is over, and whether the new files are in use."""
        status = self.status
        if not succeeded:
            status += "; the TLS reload failed, the old certificate stays (see the log)"
        self.notifier.ready(status)
