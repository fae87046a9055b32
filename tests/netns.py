"""A private network namespace holding only a loopback interface, for tests of wildcards.

Some tests must bind what the server binds by default, ``[::]`` with IPv4 included.
Inside a namespace of their own, every address is a loopback one, so such a test
listens on nothing but loopback, however wide its listener.  ``entered()`` moves the
calling thread in (sockets it makes, and processes it starts, then live there) and
back out.  Needs root and iproute2's ``ip``; otherwise the test skips (CI=true: fails).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import subprocess

from twisted.trial.unittest import SkipTest

from tests.live import require_client

CLONE_NEWNET = 0x40000000
_names = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


class LoopbackNamespace:
    """A namespace made for one test and deleted after it."""

    def __init__(self, testcase):
        if os.geteuid() != 0:
            if os.environ.get("CI") == "true":
                raise AssertionError("a private network namespace needs root (CI runs as root)")
            raise SkipTest("a private network namespace needs root")
        self.ip = require_client("ip", search="/usr/sbin:/sbin:/usr/bin:/bin")
        self.name = f"popserv-test-{os.getpid()}-{next(_names)}"
        subprocess.run([self.ip, "netns", "add", self.name], check=True, timeout=30)
        testcase.addCleanup(
            subprocess.run, [self.ip, "netns", "delete", self.name], check=False, timeout=30
        )
        subprocess.run(
            [self.ip, "-n", self.name, "link", "set", "lo", "up"], check=True, timeout=30
        )

    @contextlib.contextmanager
    def entered(self):
        """The calling thread in the namespace for the block, then back where it was."""
        back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        inside = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(inside)
            try:
                yield self
            finally:
                _setns(back)
        finally:
            os.close(inside)
            os.close(back)
