"""The machine's fully qualified host name, looked up once, as the admin's tools see it.

``socket.getfqdn()`` answers ``localhost`` on a host whose ``/etc/hosts`` lists its name
after ``localhost`` on the same address, while ``hostname -f`` (what admins check)
gives the real name.  The greeting, the self-signed certificate and the default local
mail domains all use this one answer.
"""

from __future__ import annotations

import functools
import re
import socket
import subprocess
from collections.abc import Callable

#: Names that only ever mean this machine over loopback: a last resort, never a choice.
LOOPBACK_NAMES = frozenset(
    {"localhost", "localhost.localdomain", "localhost6", "localhost6.localdomain6"}
    | {"ip6-localhost", "ip6-loopback"}
)
#: Seconds ``hostname -f`` may take (it can wait on a resolver) before it is given up.
HOSTNAME_TIMEOUT = 2.0

_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")


def hostname_f_output() -> str:
    """What ``hostname -f`` prints; empty when it fails, hangs or is not installed."""
    try:
        done = subprocess.run(
            ["hostname", "-f"],
            capture_output=True,
            text=True,
            timeout=HOSTNAME_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""


def usable_name(text: str) -> str:
    """``text`` as a host name in lower case without a final dot; empty if it is none."""
    name = text.strip().lower().rstrip(".")
    return name if _NAME.fullmatch(name) else ""


def lookup_fqdn(
    hostname_f: Callable[[], str] = hostname_f_output,
    getfqdn: Callable[[], str] = socket.getfqdn,
    gethostname: Callable[[], str] = socket.gethostname,
) -> str:
    """The first real name of ``hostname -f``, ``getfqdn()``, ``gethostname()``.

    A lookup that fails or gives a loopback name is passed over; ``localhost`` only
    when none of them knows better.
    """
    for lookup in (hostname_f, getfqdn, gethostname):
        try:
            name = usable_name(lookup())
        except OSError:
            continue
        if name and name not in LOOPBACK_NAMES:
            return name
    return "localhost"


@functools.lru_cache(maxsize=1)
def fqdn() -> str:
    """This machine's fully qualified name (``lookup_fqdn``), looked up once per process."""
    return lookup_fqdn()
