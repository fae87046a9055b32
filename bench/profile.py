"""Profile popserv with py-spy while one benchmark scenario runs, and print the hot spots.

Usage: ``python3 bench/profile.py SCENARIO [--quick] [--rate HZ]`` (needs ``py-spy``:
``pip install py-spy``).  Builds the same data as ``bench/run.py``, starts popserv, runs
one repetition of the scenario under ``py-spy record``, keeps the collapsed stacks in
``bench/results/profile-SCENARIO.txt`` and prints the functions with the most samples,
by own time and including callees.  Only popserv is profiled, and no numbers are
recorded: the profiler slows the server down.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402


def hot_spots(path: str, top: int) -> str:
    """Own and inclusive sample shares per function, from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
    if not total:
        return "no samples"
    out = [f"{total} samples (the reactor waiting in epoll is left out)", "", "own time:"]
    out += [f"  {n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    out += ["", "including callees:"]
    out += [f"  {n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenario", choices=run.SCENARIOS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    if shutil.which("py-spy") is None:
        parser.error("py-spy is not installed (pip install py-spy)")
    bench_args = argparse.Namespace(
        quick=args.quick, reps=1, seed=1939, only=args.scenario, peers="popserv"
    )
    bench = run.Bench(bench_args)
    bench.prepare()
    (peer,) = bench.peers
    results = os.path.join(HERE, "results")
    os.makedirs(results, exist_ok=True)
    out = os.path.join(results, f"profile-{args.scenario}.txt")
    peer.start(**run.start_options(args.scenario))
    try:
        spy = subprocess.Popen(
            [
                "py-spy",
                "record",
                "--pid",
                str(peer.pid),
                "--rate",
                str(args.rate),
                "--format",
                "raw",
                "--output",
                out,
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            getattr(bench, "scenario_" + args.scenario)(peer, 0)
        finally:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
    finally:
        peer.stop()
    for note in bench.notes:
        print("note:", note)
    print(hot_spots(out, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
