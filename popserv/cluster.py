"""What makes a node one of several: its name, and whether a shared database is configured.

Several popserv nodes may share one mail root (a POSIX network file system) and one
PostgreSQL (``[cluster] database``).  Each node needs a name of its own
(``[cluster] node``, the host name by default): it goes into the names of delivered
files and of temporary files in the shared Maildirs, so two nodes never pick the same.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile

#: Letters, digits, ``-``, ``_`` and ``.``: safe inside a Maildir file name, where
#: ``/`` and ``:`` are not, and ``,`` starts the ``,S=`` size fields.
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def check_node_name(name: str) -> str:
    """``name`` if it may name a node (``[cluster] node``); empty means the default."""
    if name and not _NODE_NAME.fullmatch(name):
        raise ValueError(
            "a node name is 1 to 63 letters, digits, '.', '-' or '_', starting with a "
            "letter or digit"
        )
    return name


def node_name(configured: str = "", gethostname=socket.gethostname) -> str:
    """The node's name: ``[cluster] node``, else the short host name made safe."""
    if configured:
        return configured
    host = re.sub(r"[^A-Za-z0-9._-]", "_", gethostname().split(".")[0]) or "localhost"
    return host[:63]


def naming_node(config) -> str:
    """The node that names shared files in a cluster; empty for a node alone.

    A cluster (``[cluster] database`` or ``node`` set) names delivered files and
    delivery journals after the node, so nodes sharing a mail root (and often
    ``[server] hostname`` too) never pick the same; one node alone keeps the names
    it always had.
    """
    if config.cluster_database or config.cluster_node:
        return node_name(config.cluster_node)
    return ""


def mail_host(config) -> str:
    """The host part of delivered file names: the node's in a cluster, else the host's."""
    return naming_node(config) or config.hostname


def create_temp(directory: str, name: str, node: str = "") -> tuple[int, str]:
    """A new file (descriptor, path) in ``directory``, to be renamed over ``name``.

    Its name holds the node, the process and a random part, and it is created
    exclusively: writers on several nodes and in several processes never share one.
    """
    prefix = f"{name}.{node_name(node)}.P{os.getpid()}."
    return tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
