"""popserv's SMTP receiver on loopback, beside a ``tests.live`` POP3 server, for interop tests.

Listens on 127.0.0.1 port 0 only; nothing here contacts any other address.
"""

from __future__ import annotations

import os
import random
import socket

from twisted.internet import endpoints, reactor

from popserv.auth import PasswdFile
from popserv.config import Config
from popserv.delivery import DELIVERY_THREADS, MaildirDeliverer
from popserv.quota import MaildirQuota
from popserv.smtp import SMTPFactory
from tests.live import HOST, LiveServer, _shut_down, _TrackingFactory, workers


def start_smtp(testcase, server: LiveServer, **config_overrides):
    """Listen for SMTP into ``server``'s Maildirs and users; fires with the port number.

    Quotas come from the POP3 server's ``policies``, as in ``popserv.service``.
    """
    settings = {
        "hostname": HOST,
        "mailroot": server.mailroot,
        "users": server.users_path,
        "smtp_listen": ("tcp:0:interface=127.0.0.1",),
    }
    settings.update(config_overrides)
    config = Config(**settings)
    delivery = workers(testcase, DELIVERY_THREADS, "popserv-delivery")
    deliverer = MaildirDeliverer(server.store, HOST, delivery.run, policies=server.policies)
    quota = MaildirQuota(server.store, server.policies, delivery.run)
    factory = SMTPFactory(
        deliverer, PasswdFile(server.users_path), config, clock=reactor, quota=quota
    )
    tracker = _TrackingFactory(factory)
    endpoint = endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1")

    def listening(port):
        testcase.addCleanup(_shut_down, port, tracker)
        return port.getHost().port

    return endpoint.listen(tracker).addCallback(listening)


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(word) for word in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A loopback TCP port that was free a moment ago, for a server in a child process.

    Taken below the kernel's ephemeral range where there is room: a port from that
    range (what binding port 0 gives) may meanwhile become the local end of any client
    connection the tests make, and the child then fails to bind it.
    """
    low, _ = _ephemeral_range()
    candidates = random.sample(range(10000, low), min(50, max(low - 10000, 0)))
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def maildir_files(server: LiveServer, user: str, sub: str) -> list[str]:
    """The file names in one of the user's Maildir subdirectories."""
    return sorted(os.listdir(os.path.join(server.maildir(user), sub)))
