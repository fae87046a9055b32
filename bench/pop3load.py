"""An asyncio POP3 load client (standard library only) that checks what it receives.

Each mode prints one JSON object on its last line of output.  Modes:

``sessions``  N clients loop connect, USER/PASS, STAT, QUIT for a while; client i takes
              users i, i+N, ... in turn.  With ``--tls`` each connection is POP3S (a full
              handshake), and with ``--resume`` too each client offers the TLS session of
              its previous connection and counts the ones the server resumed.
``download``  LIST, then RETR every message, ``--pipeline`` commands in flight; each RETR
              must carry exactly the octets LIST announced, and with ``--manifest`` the
              multiset of SHA-1s of the un-stuffed messages must equal the generator's.
``idle``      N sessions log in and stay idle; prints ``READY`` and waits for a line on
              standard input before it quits them all.
``bigdrop``   time from connect to the STAT answer, on the first and later logins, and
              how long UIDL and LIST of all messages take.
``retr``      RETR 1 of one user (the runner watches the server's memory meanwhile).
``stall``     sends RETR 1 and reads nothing for ``--hold`` seconds.
``warm``      log in and QUIT once per user, so a server's first-login work is done.
``logins``    one client logs in again and again for a while, one session at a time:
              the median and 90th percentile of the time from USER to PASS's ``+OK``.

``--tls`` makes every connection POP3S (implicit TLS, certificate not checked: the bench
makes its own self-signed one) in every mode.

Example: ``python3 bench/pop3load.py download --port 11110 --user dl --password pw``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import resource
import ssl
import sys
import time


class POP3Error(Exception):
    """A -ERR reply, a broken reply, or a failed check."""


class _Reply:
    __slots__ = ("multiline", "future", "status", "body")

    def __init__(self, multiline: bool, future: asyncio.Future):
        self.multiline = multiline
        self.future = future
        self.status = None
        self.body = None


class POP3Client(asyncio.Protocol):
    """Replies are matched to commands in order, so commands may be pipelined."""

    def __init__(self):
        self.transport = None
        self._buffer = bytearray()
        self._scan = 0
        self._pending: collections.deque[_Reply] = collections.deque()
        self._closed = asyncio.get_running_loop().create_future()
        self.received = 0

    @classmethod
    async def connect(
        cls, host: str, port: int, tls: ssl.SSLContext | None = None
    ) -> tuple[POP3Client, bytes]:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(cls, host, port, ssl=tls)
        status, _ = await client.greeting
        if not status.startswith(b"+OK"):
            client.close()
            raise POP3Error(f"greeting: {status.decode(errors='replace')}")
        return client, status

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.greeting = asyncio.get_running_loop().create_future()
        self._pending.append(_Reply(False, self.greeting))

    def connection_lost(self, exc) -> None:
        for reply in self._pending:
            if not reply.future.done():
                reply.future.set_exception(POP3Error(f"connection lost: {exc}"))
        self._pending.clear()
        if not self._closed.done():
            self._closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self._buffer += data
        buf = self._buffer
        while self._pending:
            reply = self._pending[0]
            if reply.status is None:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                reply.status = bytes(buf[:end])
                if not reply.multiline or not reply.status.startswith(b"+OK"):
                    del buf[: end + 2]
                    self._finish(reply)
                    continue
                # Keep the status line's CRLF: the terminator is then always CRLF "." CRLF.
                del buf[:end]
                self._scan = 0
            end = buf.find(b"\r\n.\r\n", self._scan)
            if end < 0:
                self._scan = max(0, len(buf) - 4)
                return
            reply.body = bytes(buf[2 : end + 2])
            del buf[: end + 5]
            self._finish(reply)

    def _finish(self, reply: _Reply) -> None:
        self._pending.popleft()
        if not reply.future.done():
            reply.future.set_result((reply.status, reply.body))

    def send(self, line: bytes, multiline: bool = False) -> asyncio.Future:
        """Send one command; the future gets ``(status, body)`` (body None if single-line)."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Reply(multiline, future))
        self.transport.write(line + b"\r\n")
        return future

    async def expect(self, multiline: bool, line: bytes):
        """Send a command and wait for its +OK reply; -ERR raises POP3Error."""
        status, body = await self.send(line, multiline)
        if not status.startswith(b"+OK"):
            what = line.split(b" ")[0].decode()
            raise POP3Error(f"{what}: {status.decode(errors='replace')}")
        return status, body

    async def login(self, user: str, password: str) -> None:
        await self.expect(False, b"USER " + user.encode())
        await self.expect(False, b"PASS " + password.encode())

    async def quit(self) -> None:
        try:
            await self.expect(False, b"QUIT")
        finally:
            self.transport.close()
        await self._closed

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        return self.transport.get_extra_info("ssl_object")


class ResumingContext(ssl.SSLContext):
    """A client context that offers ``offer``, a session of an earlier connection.

    asyncio's ``create_connection`` has no ``session`` argument; it makes its
    ``SSLObject`` with ``wrap_bio``, which is where the session goes in.  One context per
    client: a session may only be offered through the context that made it.
    """

    offer: ssl.SSLSession | None = None

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None, session=None):
        return super().wrap_bio(
            incoming, outgoing, server_side, server_hostname, session or self.offer
        )


def tls_context(resume: bool = False) -> ssl.SSLContext:
    """POP3S without a certificate check; TLS as the Python/OpenSSL default negotiates."""
    context = (ResumingContext if resume else ssl.SSLContext)(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def unstuffed_size(body: bytes) -> int:
    """Octets of a multi-line body once its dot-stuffing is removed (RFC 1939 3)."""
    return len(body) - body.count(b"\r\n..") - (1 if body.startswith(b"..") else 0)


def unstuff(body: bytes) -> bytes:
    if body.startswith(b".."):
        body = body[1:]
    return body.replace(b"\r\n..", b"\r\n.")


def parse_listing(body: bytes) -> list[tuple[int, bytes]]:
    """``LIST``/``UIDL`` body -> [(number, second field)]."""
    out = []
    for line in body.split(b"\r\n"):
        if line:
            number, value = line.split(None, 1)
            out.append((int(number), value))
    return out


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- modes -----------------------------------------------------------------


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_sessions(args) -> dict:
    users = args.user.split(",")
    count = [0] * args.clients
    offered = [0] * args.clients
    resumed = [0] * args.clients
    errors: list[str] = []
    seen: set[tuple[str, str]] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.duration

    async def one(i: int) -> None:
        mine = users[i % len(users) :: args.clients] or [users[i % len(users)]]
        tls = tls_context(args.resume) if args.tls else None
        turn = 0
        while loop.time() < deadline:
            user = mine[turn % len(mine)]
            turn += 1
            try:
                client, _ = await POP3Client.connect(args.host, args.port, tls)
                if tls is not None:
                    sslobj = client.ssl_object
                    seen.add((sslobj.version(), sslobj.cipher()[0]))
                    if args.resume and tls.offer is not None:
                        offered[i] += 1
                        resumed[i] += sslobj.session_reused
                await client.login(user, args.password)
                await client.expect(False, b"STAT")
                if args.resume:
                    # Taken after the replies: a TLS 1.3 ticket comes after the handshake.
                    tls.offer = client.ssl_object.session
                await client.quit()
                count[i] += 1
            except (OSError, POP3Error) as e:
                errors.append(f"{user}: {e}")
                if len(errors) > 20:
                    return
                await asyncio.sleep(0.05)

    cpu = _cpu()
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(args.clients)))
    wall = time.perf_counter() - start
    result = {
        "sessions": sum(count),
        "wall": wall,
        "client_cpu": _cpu() - cpu,
        "errors": errors[:5],
        "error_count": len(errors),
    }
    if args.tls:
        result["tls"] = sorted(" ".join(pair) for pair in seen)
    if args.resume:
        result["offered"] = sum(offered)
        result["resumed"] = sum(resumed)
    return result


async def run_download(args) -> dict:
    client, _ = await POP3Client.connect(args.host, args.port, _tls(args))
    await client.login(args.user, args.password)
    cpu = _cpu()
    start = time.perf_counter()
    _, body = await client.expect(True, b"LIST")
    listing = parse_listing(body)
    sizes = {number: int(size) for number, size in listing}
    mismatches = []
    digests = []
    octets = 0
    window = asyncio.Semaphore(args.pipeline)
    verify = args.manifest is not None

    async def retr(number: int) -> None:
        nonlocal octets
        async with window:
            status, body = await client.send(b"RETR %d" % number, True)
        if not status.startswith(b"+OK"):
            raise POP3Error(f"RETR {number}: {status.decode(errors='replace')}")
        size = unstuffed_size(body)
        octets += size
        if size != sizes[number]:
            mismatches.append((number, sizes[number], size))
        if verify:
            digests.append(hashlib.sha1(unstuff(body)).hexdigest())

    # The semaphore keeps at most ``pipeline`` RETRs on the wire; replies come in order.
    await asyncio.gather(*(retr(number) for number in sorted(sizes)))
    wall = time.perf_counter() - start
    client_cpu = _cpu() - cpu
    await client.quit()
    result = {
        "messages": len(sizes),
        "octets": octets,
        "listed_octets": sum(sizes.values()),
        "wall": wall,
        "client_cpu": client_cpu,
        "size_mismatches": len(mismatches),
        "first_mismatches": mismatches[:3],
    }
    if verify:
        with open(args.manifest) as f:
            expected = sorted(m["sha1"] for m in json.load(f))
        result["content_ok"] = sorted(digests) == expected
        result["expected_messages"] = len(expected)
    return result


async def run_idle(args) -> dict:
    raise_nofile()
    users = [f"{args.user}{i:04d}" for i in range(args.clients)]
    clients: list[POP3Client] = []
    errors: list[str] = []
    gate = asyncio.Semaphore(args.concurrency)

    async def open_one(user: str) -> None:
        async with gate:
            try:
                client, _ = await POP3Client.connect(args.host, args.port)
                await client.login(user, args.password)
                await client.expect(False, b"STAT")
                clients.append(client)
            except (OSError, POP3Error) as e:
                errors.append(f"{user}: {e}")

    start = time.perf_counter()
    await asyncio.gather(*(open_one(user) for user in users))
    wall = time.perf_counter() - start
    ready = {
        "sessions": len(clients),
        "wall": wall,
        "errors": errors[:5],
        "error_count": len(errors),
    }
    print("READY " + json.dumps(ready), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    # Every session must still be alive after the idle period.
    alive = 0
    for client in clients:
        try:
            await asyncio.wait_for(client.expect(False, b"NOOP"), 10)
            alive += 1
        except (OSError, POP3Error, asyncio.TimeoutError):
            pass
    await asyncio.gather(*(c.quit() for c in clients), return_exceptions=True)
    ready["alive_after_idle"] = alive
    return ready


async def _time_to_stat(args, user: str) -> float:
    start = time.perf_counter()
    client, _ = await POP3Client.connect(args.host, args.port)
    await client.login(user, args.password)
    await client.expect(False, b"STAT")
    elapsed = time.perf_counter() - start
    await client.quit()
    return elapsed


async def run_bigdrop(args) -> dict:
    first = await _time_to_stat(args, args.user)
    later = [await _time_to_stat(args, args.user) for _ in range(args.later)]
    client, _ = await POP3Client.connect(args.host, args.port)
    await client.login(args.user, args.password)
    status, _ = await client.expect(False, b"STAT")
    count = int(status.split()[1])
    start = time.perf_counter()
    _, body = await client.expect(True, b"UIDL")
    uidl_time = time.perf_counter() - start
    uidls = parse_listing(body)
    start = time.perf_counter()
    _, body = await client.expect(True, b"LIST")
    list_time = time.perf_counter() - start
    listing = parse_listing(body)
    await client.quit()
    later.sort()
    return {
        "messages": count,
        "first_login": first,
        "later_login": later[len(later) // 2],
        "uidl": uidl_time,
        "list": list_time,
        "uidl_count": len(uidls),
        "list_count": len(listing),
        "unique_uidls": len({u for _, u in uidls}),
    }


async def run_retr(args) -> dict:
    client, _ = await POP3Client.connect(args.host, args.port)
    await client.login(args.user, args.password)
    status, _ = await client.expect(False, b"LIST 1")
    listed = int(status.split()[2])
    start = time.perf_counter()
    _, body = await client.expect(True, b"RETR 1")
    wall = time.perf_counter() - start
    size = unstuffed_size(body)
    del body
    await client.quit()
    return {"listed": listed, "octets": size, "wall": wall, "size_ok": listed == size}


async def run_stall(args) -> dict:
    client, _ = await POP3Client.connect(args.host, args.port)
    await client.login(args.user, args.password)
    client.transport.pause_reading()
    client.transport.write(b"RETR 1\r\n")
    print("READY {}", flush=True)
    await asyncio.sleep(args.hold)
    received = client.received
    client.transport.abort()
    return {"received_before_hold_end": received, "hold": args.hold}


async def run_warm(args) -> dict:
    users = args.user.split(",")
    gate = asyncio.Semaphore(args.concurrency)
    errors = []
    tls = _tls(args)

    async def one(user: str) -> None:
        async with gate:
            try:
                client, _ = await POP3Client.connect(args.host, args.port, tls)
                await client.login(user, args.password)
                await client.expect(False, b"STAT")
                await client.quit()
            except (OSError, POP3Error) as e:
                errors.append(f"{user}: {e}")

    start = time.perf_counter()
    await asyncio.gather(*(one(user) for user in users))
    wall = time.perf_counter() - start
    return {"users": len(users), "wall": wall, "errors": errors[:5], "error_count": len(errors)}


async def run_logins(args) -> dict:
    users = args.user.split(",")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.duration
    times: list[float] = []
    while loop.time() < deadline:
        client, _ = await POP3Client.connect(args.host, args.port, _tls(args))
        started = time.perf_counter()
        await client.login(users[len(times) % len(users)], args.password)
        times.append(time.perf_counter() - started)
        await client.expect(False, b"STAT")
        await client.quit()
    times.sort()
    return {
        "logins": len(times),
        "median_ms": 1000 * times[len(times) // 2],
        "p90_ms": 1000 * times[len(times) * 9 // 10],
        "errors": [],
        "error_count": 0,
    }


def _tls(args) -> ssl.SSLContext | None:
    return tls_context() if args.tls else None


MODES = {
    "sessions": run_sessions,
    "download": run_download,
    "idle": run_idle,
    "bigdrop": run_bigdrop,
    "retr": run_retr,
    "stall": run_stall,
    "warm": run_warm,
    "logins": run_logins,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--user",
        required=True,
        help="user name; comma-separated list (sessions, warm); prefix (idle)",
    )
    parser.add_argument("--password", required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=50, help="logins in flight (idle)")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--pipeline", type=int, default=1)
    parser.add_argument("--manifest", help="generator manifest to check contents against")
    parser.add_argument("--later", type=int, default=3, help="later logins to time (bigdrop)")
    parser.add_argument("--hold", type=float, default=5.0)
    parser.add_argument("--tls", action="store_true", help="POP3S: TLS from the first octet")
    parser.add_argument(
        "--resume", action="store_true", help="offer the previous TLS session (sessions --tls)"
    )
    args = parser.parse_args(argv)
    try:
        result = asyncio.run(MODES[args.mode](args))
    except (OSError, POP3Error) as e:
        result = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
