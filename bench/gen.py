"""Generate the benchmark's Maildir message sets, deterministically from a seed.

Each set is a flat directory of message files under ``bench/data/<profile>/sets/<set>/``
plus a ``manifest.json`` giving, per message, its file name, its size on disk (LF line
ends), its size on the wire (CRLF, as POP3 LIST must report it) and the SHA-1 of its wire
form, so that load clients can check what a server sends.  The runner hard-links these
files into each server's own Maildir tree; nothing here writes outside ``bench/data``.

Sets (``--quick`` shrinks the counts, not the kinds):

- ``mixed``: 1,000 messages of 2-200 KiB (log-uniform), LF line ends, some lines starting
  with ``.`` (and some that are just ``.``), some base64 "attachment" blocks; names carry
  ``,S=`` and ``,W=`` sizes, as Dovecot's and popserv's deliveries write them.
- ``huge``: 20 messages of 5 MiB.
- ``big``: 10,000 messages of 1-4 KiB, names without sizes (as Postfix's ``local`` writes
  them), so a server must read every file on the first login.
- ``stream``: one 50 MB message.

Usage: ``python3 bench/gen.py [--quick] [--seed N] [--force]``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import random
import shutil
import string
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
KIB = 1024
MIB = 1024 * KIB

#: (set, count, smallest, largest, names carry sizes) for each profile.
PROFILES = {
    "full": [
        ("mixed", 1000, 2 * KIB, 200 * KIB, True),
        ("huge", 20, 5 * MIB, 5 * MIB, True),
        ("big", 10000, 1 * KIB, 4 * KIB, False),
        ("stream", 1, 50_000_000, 50_000_000, True),
    ],
    "quick": [
        ("mixed", 300, 2 * KIB, 200 * KIB, True),
        ("huge", 5, 5 * MIB, 5 * MIB, True),
        ("big", 3000, 1 * KIB, 4 * KIB, False),
        ("stream", 1, 50_000_000, 50_000_000, True),
    ],
}

HOST = "benchhost"
FIRST_SECOND = 1_700_000_000


def profile_dir(profile: str) -> str:
    return os.path.join(DATA, profile)


def _line_pool(rng: random.Random) -> tuple[list[bytes], list[bytes]]:
    """Text lines (a few of them dot-led) and base64 lines to build bodies from."""
    words = [
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 10)))
        for _ in range(2000)
    ]
    text = []
    for i in range(4000):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(0, 14)))
        if i % 97 == 0:
            line = "." + line  # must be dot-stuffed on the wire
        elif i % 211 == 0:
            line = "."  # would end the reply if not stuffed
        elif i % 307 == 0:
            line = ".."
        text.append(line.encode("ascii") + b"\n")
    b64 = []
    for _ in range(1000):
        raw = bytes(rng.getrandbits(8) for _ in range(57))
        b64.append(base64.b64encode(raw) + b"\n")
    return text, b64


def _message(rng: random.Random, pool, number: int, size: int) -> bytes:
    """A message of exactly ``size`` octets on disk, LF line ends, ending in a newline."""
    text, b64 = pool
    header = (
        f"Return-Path: <sender{number % 37}@example.org>\n"
        f"From: Sender {number % 37} <sender{number % 37}@example.org>\n"
        f"To: user@bench.test\n"
        f"Subject: benchmark message {number}\n"
        f"Date: Tue, 14 Nov 2023 22:13:20 +0000\n"
        f"Message-ID: <{number}.{rng.getrandbits(48):x}@example.org>\n"
        f"MIME-Version: 1.0\n"
        f"Content-Type: text/plain; charset=us-ascii\n\n"
    ).encode("ascii")
    need = size - len(header)
    parts = [header]
    while need > 0:
        # Mostly text, with a base64 block in about one chunk out of four.
        source = b64 if rng.random() < 0.25 else text
        lines = rng.choices(source, k=max(1, min(2000, need // 40)))
        chunk = b"".join(lines)
        parts.append(chunk)
        need -= len(chunk)
    data = b"".join(parts)[: size - 1] + b"\n"
    assert len(data) == size
    return data


def wire_form(data: bytes) -> bytes:
    """The message as POP3 sends it, before dot-stuffing: CRLF line ends."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _sizes(rng: random.Random, count: int, low: int, high: int) -> list[int]:
    if low == high:
        return [low] * count
    return [int(math.exp(rng.uniform(math.log(low), math.log(high)))) for _ in range(count)]


def generate(profile: str, seed: int, force: bool = False, out=sys.stdout) -> str:
    """Write every set of ``profile``; skip the work when the same seed already made them."""
    root = profile_dir(profile)
    stamp_path = os.path.join(root, "stamp.json")
    stamp = {"profile": profile, "seed": seed, "sets": PROFILES[profile], "version": 1}
    if not force:
        try:
            with open(stamp_path) as f:
                if json.load(f) == json.loads(json.dumps(stamp)):
                    return root
        except (OSError, ValueError):
            pass
    if os.path.isdir(root):
        shutil.rmtree(root)
    os.makedirs(root)
    rng = random.Random(seed)
    pool = _line_pool(rng)
    for set_index, (name, count, low, high, sized) in enumerate(PROFILES[profile]):
        set_dir = os.path.join(root, "sets", name)
        os.makedirs(set_dir)
        manifest = []
        total = 0
        for i, size in enumerate(_sizes(rng, count, low, high)):
            data = _message(rng, pool, i, size)
            wire = wire_form(data)
            # Delivery time rises with i, so every server numbers messages in file order.
            unique = (
                f"{FIRST_SECOND + set_index * 100_000 + i}.M{(i * 7919) % 1_000_000:06d}"
                f"P{1000 + set_index}Q{i}.{HOST}"
            )
            filename = f"{unique},S={len(data)},W={len(wire)}" if sized else unique
            with open(os.path.join(set_dir, filename), "wb") as f:
                f.write(data)
            manifest.append(
                {
                    "name": filename,
                    "size": len(data),
                    "wire": len(wire),
                    "sha1": hashlib.sha1(wire).hexdigest(),
                }
            )
            total += len(data)
        with open(os.path.join(root, "sets", name + ".json"), "w") as f:
            json.dump(manifest, f)
        print(f"gen: {profile}/{name}: {count} messages, {total / MIB:.1f} MiB", file=out)
    with open(stamp_path, "w") as f:
        json.dump(stamp, f)
    return root


def load_manifest(profile: str, name: str) -> list[dict]:
    with open(os.path.join(profile_dir(profile), "sets", name + ".json")) as f:
        return json.load(f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the smaller sets of --quick runs")
    parser.add_argument("--seed", type=int, default=1939, help="random seed (default 1939)")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args(argv)
    generate("quick" if args.quick else "full", args.seed, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
