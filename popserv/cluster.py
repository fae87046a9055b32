"""What makes a node one of several: its name, and whether a shared database is configured.

Several popserv nodes may share one mail root (a POSIX network file system) and one
PostgreSQL (``[cluster] database``).  Each node needs a name of its own
(``[cluster] node``, the host name by default): it goes into the names of delivered
files and of temporary files in the shared Maildirs, so two nodes never pick the same.
"""

from __future__ import annotations

import re
import socket

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


def clustered(config) -> bool:
    """Whether ``config`` names a shared database: users, locks and counters live there."""
    return bool(config.cluster_database)
