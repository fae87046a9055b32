"""When each message was first retrieved, kept in the Maildir so EXPIRE survives restarts.

``popserv-retrieved`` in the Maildir's root holds one ``<uidl> <unix-seconds>`` line per
message retrieved by RETR, by popserv's own UIDL of the file (the unique part of its
name), which stays the same when the message moves to ``cur/`` and gains flags.  It is
written, by replacing it whole, only at a QUIT that retrieved something new, with the
maildrop lock held, and read at login when EXPIRE is some days.  Blocking; run in threads.
"""

from __future__ import annotations

import contextlib
import os

from twisted.logger import Logger

from popserv.cluster import create_temp

log = Logger()

RETRIEVED_NAME = "popserv-retrieved"


def read(maildir: str) -> dict[str, int]:
    """UIDL -> retrieval time; empty when there is no file, and a bad line is skipped."""
    path = os.path.join(maildir, RETRIEVED_NAME)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    times = {}
    for line in data.decode("ascii", "replace").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isdigit():
            times[fields[0]] = int(fields[1])
    return times


def write(maildir: str, times: dict[str, int], node: str = "") -> None:
    """Replace the file atomically (a new file and a rename), or remove it when empty.

    The new file is made in the Maildir's ``tmp/`` under a name of this ``node``'s and
    process's own: Maildirs may be shared by several of each.
    """
    path = os.path.join(maildir, RETRIEVED_NAME)
    if not times:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    text = "".join(f"{uidl} {when}\n" for uidl, when in sorted(times.items()))
    fd, temp = create_temp(os.path.join(maildir, "tmp"), RETRIEVED_NAME, node)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("ascii"))
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def expired(times: dict[str, int], days: int, now: float) -> set[str]:
    """The UIDLs retrieved more than ``days`` days before ``now``."""
    limit = now - days * 86400
    return {uidl for uidl, when in times.items() if when < limit}
