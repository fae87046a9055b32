"""CPU time and memory of a server's process tree, read from /proc (Linux only).

CPU: utime+stime of every live process below (and including) the root, plus their
cutime+cstime, which hold the time of children that already exited and were reaped
inside the tree (Dovecot's and Postfix's short-lived processes).  So the load client,
which shares the machine's cores, cannot hide what the server spent.
"""

from __future__ import annotations

import os
import resource
import threading
import time

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> None:
    """Lift the soft open-files limit to the hard one (1,000 idle sessions need it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may hold spaces: split after the last ")".
    return data[data.rfind(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def cpu_seconds(root: int) -> float:
    """User+system CPU seconds of the tree, including reaped children."""
    ticks = 0
    for pid in tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            # Fields after the name: state ppid ... utime(11) stime(12) cutime(13) cstime(14).
            ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / CLOCK_TICKS


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def rss(root: int) -> int:
    """Resident bytes of the root process alone (a single-process server)."""
    return _status_kib(root, "VmRSS:") * 1024


def peak_rss(root: int) -> int:
    return _status_kib(root, "VmHWM:") * 1024


def reset_peak(root: int) -> None:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); quietly skip if not allowed."""
    try:
        with open(f"/proc/{root}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def pss_tree(root: int) -> int:
    """Proportional set size of the whole tree, so shared pages are counted once."""
    total = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


class Sampler:
    """Samples ``measure()`` in a thread every ``interval`` seconds and keeps the maximum."""

    def __init__(self, measure, interval: float = 0.02):
        self.measure = measure
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.measure())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.measure())
            self.samples += 1
            time.sleep(self.interval)
