"""A real HAProxy in front of one or several ``twistd popserv`` nodes, on loopback.

``HAProxy`` runs ``haproxy -db`` over a copy of the shipped etc/haproxy/popserv.cfg in
which only the addresses change: the frontends bind free 127.0.0.1 ports and each
backend lists the test's nodes as node1..nodeN.  ``ProxiedTwistd`` and
``ProxiedClusterNode`` are popserv with ``haproxy:`` listeners; ``SourcedPOP3`` and
``SourcedPOP3_SSL`` connect from a loopback address of the test's choosing, so the
client is known only by the PROXY header.  Nothing here reaches beyond 127.0.0.0/8.
"""

from __future__ import annotations

import csv
import io
import os
import poplib
import re
import signal
import socket
import ssl
import subprocess
import time

from popserv.proxyproto import V2_SIGNATURE
from tests.live import require_client
from tests.live_cluster import ClusterNode
from tests.live_smtp import free_port
from tests.live_twistd import REPO, TwistdServer

#: The shipped HAProxy configuration the integration tests run (a port-substituted copy).
SHIPPED_CFG = os.path.join(REPO, "etc", "haproxy", "popserv.cfg")
#: Loopback addresses the clients connect from, both other than HAProxy's own 127.0.0.1.
CLIENT_7, CLIENT_8 = "127.0.0.7", "127.0.0.8"
#: A PROXY v2 LOCAL header, as HAProxy's health checks send: the balancer's own connection.
LOCAL_HEADER = V2_SIGNATURE + bytes([0x20, 0x00, 0x00, 0x00])
#: The backends of the shipped file, by the port their frontend binds there.
BACKENDS = {110: "pop3_nodes", 995: "pop3s_nodes", 25: "smtp_nodes"}


def proxied_listeners(settings=None, direct: bool = False):
    """Settings with haproxy: POP3, POP3S and SMTP listeners on free ports, and the ports.

    ``direct`` adds a plain POP3 and SMTP listener beside each, for a test that talks
    to one node without the balancer.
    """
    ports = {"pop3": free_port(), "pop3s": free_port(), "smtp": free_port()}
    direct_ports = {"pop3": free_port(), "smtp": free_port()} if direct else {}
    sections = {}
    for section, port in ports.items():
        listen = f"haproxy:tcp:{port}:interface=127.0.0.1"
        if section in direct_ports:
            listen += f"\n    tcp:{direct_ports[section]}:interface=127.0.0.1"
        sections[section] = {"listen": listen}
    for section, keys in (settings or {}).items():
        sections.setdefault(section, {}).update(keys)
    return sections, ports, direct_ports


class ProxiedTwistd(TwistdServer):
    """twistd popserv with haproxy: listeners only: POP3, POP3S and SMTP on loopback.

    ``start`` waits for the greeting that a v2 LOCAL header (as a health check sends)
    gets; a connection without a header would get none.
    """

    greeting_prefix = LOCAL_HEADER

    def __init__(self, testcase, users, settings=None):
        sections, ports, _ = proxied_listeners(settings)
        super().__init__(testcase, users, smtp=True, settings=sections)
        self.pop3_port, self.pop3s_port, self.smtp_port = ports.values()
        self.cert = os.path.join(self.root, "tls", "cert.pem")

    def backends(self) -> dict[int, int]:
        """This server's port behind each shipped frontend port."""
        return {110: self.pop3_port, 995: self.pop3s_port, 25: self.smtp_port}


class ProxiedClusterNode(ClusterNode):
    """A node of a ``LiveCluster`` with haproxy: listeners, and plain ones beside them.

    ``direct_pop3_port`` and ``direct_smtp_port`` reach the node without the balancer
    (and without a PROXY header); the node's TLS certificate is its own.
    """

    greeting_prefix = LOCAL_HEADER

    def __init__(self, testcase, cluster, name, *, smtp=True, settings=None):
        sections, ports, direct = proxied_listeners(settings, direct=True)
        super().__init__(testcase, cluster, name, smtp=True, settings=sections)
        self.pop3_port, self.pop3s_port, self.smtp_port = ports.values()
        self.direct_pop3_port, self.direct_smtp_port = direct.values()
        self.cert = os.path.join(self.root, "tls", "cert.pem")

    def backends(self) -> dict[int, int]:
        """This node's port behind each shipped frontend port."""
        return {110: self.pop3_port, 995: self.pop3s_port, 25: self.smtp_port}


class HAProxy:
    """``haproxy -db`` in the foreground over a copy of etc/haproxy/popserv.cfg, on loopback.

    ``nodes``: one ``{110: port, 995: port, 25: port}`` per node (a ``backends()``), in
    the order of node1, node2...  The copy differs from the shipped file only where a
    test must: frontends bind free 127.0.0.1 ports, the backends list the test's nodes,
    the log goes to standard error (a file here) and a stats socket is added, so the
    test can see the health checks pass.  Stopped by its PID at cleanup.
    """

    def __init__(self, testcase, nodes: list[dict[int, int]]):
        path = require_client("haproxy", search="/usr/sbin:/usr/bin")
        self.root = os.path.abspath(testcase.mktemp())
        os.makedirs(self.root)
        # A loopback TCP stats socket: a Unix one's path would be too long for HAProxy.
        self.stats_port = free_port()
        self.log_path = os.path.join(self.root, "haproxy.log")
        self.names = [f"node{n}" for n in range(1, len(nodes) + 1)]
        with open(SHIPPED_CFG, encoding="utf-8") as f:
            text = f.read()
        substitutions = [
            (
                r"(?m)^global\n",
                f"global\n    stats socket ipv4@127.0.0.1:{self.stats_port} level user\n",
                1,
            ),
            (r"(?m)^    log /dev/log local0$", "    log stderr format raw local0", 1),
        ]
        for pattern, replacement, count in substitutions:
            text, made = re.subn(pattern, replacement, text)
            testcase.assertEqual(made, count, pattern)
        #: The shipped frontend port (110, 995, 25) -> the port this copy binds instead.
        self.ports = {}
        for shipped, backend in BACKENDS.items():
            servers = "".join(
                f"    server {name} 127.0.0.1:{node[shipped]}\n"
                for name, node in zip(self.names, nodes, strict=True)
            )
            shipped_servers = rf"(?m)^    server node1 192\.0\.2\.11:{shipped}\n"
            shipped_servers += rf"    server node2 192\.0\.2\.12:{shipped}\n"
            text, made = re.subn(shipped_servers, servers, text)
            testcase.assertEqual(made, 1, backend)
            self.ports[shipped] = free_port()
            bind = f"    bind 127.0.0.1:{self.ports[shipped]}"
            text, made = re.subn(rf"(?m)^    bind :{shipped}$", bind, text)
            testcase.assertEqual(made, 1, shipped)
        # Nothing of the copy may point anywhere but loopback.
        testcase.assertNotIn("192.0.2.", text)
        self.config_path = os.path.join(self.root, "haproxy.cfg")
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(text)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [path, "-db", "-f", self.config_path],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        testcase.addCleanup(self.stop)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stats(self) -> list[dict[str, str]]:
        """The rows of ``show stat`` on the stats socket."""
        with socket.create_connection(("127.0.0.1", self.stats_port), 5) as s:
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return list(csv.DictReader(io.StringIO(data.decode().lstrip("# "))))

    def servers(self) -> dict[str, dict[str, tuple[str, str]]]:
        """Backend -> node -> (status, last check's status), from the stats socket."""
        servers: dict[str, dict[str, tuple[str, str]]] = {}
        for row in self.stats():
            if row["svname"] in self.names:
                servers.setdefault(row["pxname"], {})[row["svname"]] = (
                    row["status"],
                    row["check_status"],
                )
        return servers

    def sessions(self, backend: str) -> dict[str, int]:
        """Node -> connections HAProxy has passed it in ``backend`` so far."""
        return {
            row["svname"]: int(row["stot"])
            for row in self.stats()
            if row["pxname"] == backend and row["svname"] in self.names
        }

    def wait_checked(self, timeout: float = 20.0) -> dict[str, dict[str, tuple[str, str]]]:
        """Wait until every node of every backend has passed a health check; their states."""
        deadline = time.monotonic() + timeout
        servers = {}
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"haproxy exited:\n{self.log()}")
            try:
                servers = self.servers()
            except OSError:
                servers = {}
            checks = [check for nodes in servers.values() for _, check in nodes.values()]
            if (
                set(servers) == set(BACKENDS.values())
                and all(len(nodes) == len(self.names) for nodes in servers.values())
                and all(check == "L7OK" for check in checks)
            ):
                return servers
            time.sleep(0.1)
        raise AssertionError(f"health checks did not pass: {servers}\n{self.log()}")


class SourcedPOP3(poplib.POP3):
    """poplib.POP3 from a source address of the test's choosing (127.0.0.7, say)."""

    def __init__(self, source: str, port: int):
        self.source = source
        super().__init__("127.0.0.1", port, timeout=10)

    def _create_socket(self, timeout):
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )


class SourcedPOP3_SSL(poplib.POP3_SSL):
    """poplib.POP3_SSL from a source address of the test's choosing."""

    def __init__(self, source: str, port: int, context: ssl.SSLContext):
        self.source = source
        super().__init__("127.0.0.1", port, timeout=10, context=context)

    def _create_socket(self, timeout):
        sock = socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )
        return self.context.wrap_socket(sock, server_hostname=self.host)
