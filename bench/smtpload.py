"""An asyncio SMTP load client (standard library only): concurrent senders of fixed messages.

Each sender keeps one connection, and sends MAIL FROM, RCPT TO, DATA with a 10 KiB message
(dot-stuffed) to its own recipient until the time is up, counting the 250 replies to the
end of data.  The runner then counts the delivered files on disk.  Prints one JSON object.

Example: ``python3 bench/smtpload.py --port 12525 --rcpt smtp{}@bench.test --senders 8``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time


class SMTPError(Exception):
    pass


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One (possibly multi-line) reply: its code and its last line."""
    while True:
        line = await reader.readline()
        if len(line) < 4:
            raise SMTPError(f"bad reply line {line!r}")
        if line[3:4] != b"-":
            return int(line[:3]), line.rstrip()


async def command(reader, writer, line: bytes, expect: int) -> None:
    writer.write(line + b"\r\n")
    code, text = await read_reply(reader)
    if code != expect:
        raise SMTPError(f"{line.split(b' ')[0].decode()}: {text.decode(errors='replace')}")


def make_message(index: int, size: int, seed: int = 5321) -> bytes:
    """A message of about ``size`` octets in wire form: CRLF lines, dot-stuffed, ending CRLF."""
    rng = random.Random(seed + index)
    header = (
        f"From: <load{index}@example.org>\r\nTo: <user@bench.test>\r\n"
        f"Subject: smtp load {index}\r\n"
        f"Message-ID: <{index}.{rng.getrandbits(40):x}@example.org>\r\n"
        "\r\n"
    ).encode("ascii")
    lines = []
    total = len(header)
    while total < size:
        width = rng.randint(0, 76)
        line = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz .") for _ in range(width))
        line = line.encode("ascii")
        if line.startswith(b"."):
            line = b"." + line
        lines.append(line)
        total += len(line) + 2
    return header + b"\r\n".join(lines) + b"\r\n"


async def sender(args, index: int, deadline: float, results: dict) -> None:
    message = make_message(index, args.size)
    rcpt = args.rcpt.format(index).encode("ascii")
    reader, writer = await asyncio.open_connection(args.host, args.port)
    loop = asyncio.get_running_loop()
    try:
        code, text = await read_reply(reader)
        if code != 220:
            raise SMTPError(f"greeting: {text!r}")
        await command(reader, writer, b"EHLO load.example.org", 250)
        while loop.time() < deadline:
            await command(reader, writer, b"MAIL FROM:<load@example.org>", 250)
            await command(reader, writer, b"RCPT TO:<" + rcpt + b">", 250)
            await command(reader, writer, b"DATA", 354)
            writer.write(message + b".\r\n")
            code, text = await read_reply(reader)
            if code != 250:
                raise SMTPError(f"end of data: {text.decode(errors='replace')}")
            results["accepted"][index] += 1
        await command(reader, writer, b"QUIT", 221)
    except (OSError, SMTPError, asyncio.IncompleteReadError) as e:
        results["errors"].append(f"sender {index}: {e}")
    finally:
        writer.close()


async def run(args) -> dict:
    results = {"accepted": [0] * args.senders, "errors": []}
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    deadline = loop.time() + args.duration
    await asyncio.gather(*(sender(args, i, deadline, results) for i in range(args.senders)))
    wall = time.perf_counter() - start
    return {
        "accepted": sum(results["accepted"]),
        "per_sender": results["accepted"],
        "wall": wall,
        "message_octets": len(make_message(0, args.size)),
        "errors": results["errors"][:5],
        "error_count": len(results["errors"]),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--rcpt",
        default="smtp{}@bench.test",
        help="recipient; {} is replaced by the sender's number",
    )
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--size", type=int, default=10 * 1024)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    print(json.dumps(result), flush=True)
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
