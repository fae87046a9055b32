"""Resource exhaustion from outside, against a real ``twistd popserv`` on 127.0.0.1.

The attacks of the outside security test, bounded in count and time: TLS connections
that never finish the handshake, connections refused over the limit, STLS or STARTTLS
followed by silence, commands sent by a client that never reads the replies, and a
flood of wrong passwords, each of which costs a real verification.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import argon2
from twisted.trial.unittest import SynchronousTestCase

from popserv.pop3 import Reply
from tests.live_smtp import free_port
from tests.live_twistd import TwistdServer
from tests.test_metrics import sample, scrape
from tests.test_throttle import RSSSampler

#: How long the server may take beyond a timeout to close what it must close.
MARGIN = 5.0


def open_fds(server: TwistdServer) -> int:
    return len(os.listdir(f"/proc/{server.process.pid}/fd"))


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes (or resets) ``sock`` within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if sock.recv(65536) == b"":
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


def wait_until(predicate, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def flood(sock: socket.socket, data: bytes, seconds: float) -> int:
    """Send as much of ``data`` as the server takes in ``seconds``, never reading; bytes sent."""
    sock.setblocking(False)
    sent, deadline = 0, time.monotonic() + seconds
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += sock.send(data[sent : sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
    sock.setblocking(True)
    return sent


class ExhaustionTestCase(SynchronousTestCase):
    settings: dict = {}

    def setUp(self):
        self.pop3s_port = free_port()
        settings = {
            "pop3": {"login_timeout": "1"},
            "pop3s": {"listen": f"tcp:{self.pop3s_port}:interface=127.0.0.1"},
            "smtp": {"timeout": "1"},
        }
        for section, keys in self.settings.items():
            settings.setdefault(section, {}).update(keys)
        self.server = TwistdServer(self, {"alice": "secret"}, smtp=True, settings=settings)
        self.server.start()
        self.baseline = open_fds(self.server)

    def connect(self, port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(sock.close)
        return sock

    def assert_back_to_baseline(self, extra: int = 0) -> None:
        ok = wait_until(lambda: open_fds(self.server) <= self.baseline + extra, MARGIN)
        self.assertTrue(ok, f"{open_fds(self.server)} descriptors, baseline {self.baseline}")


class HalfOpenTLSTests(ExhaustionTestCase):
    def test_silent_tls_connections_are_closed_at_the_login_timeout(self):
        """POP3S connections that never start the handshake are closed at login_timeout."""
        socks = [self.connect(self.pop3s_port) for _ in range(40)]
        time.sleep(1.0)
        for sock in socks:
            self.assertTrue(closed_by_server(sock, MARGIN))
        self.assert_back_to_baseline()

    def test_stls_then_silence_is_closed(self):
        """A client that sends STLS and then nothing is closed at login_timeout."""
        sock = self.connect(self.server.pop3_port)
        replies = sock.makefile("rb")
        replies.readline()
        sock.sendall(b"STLS\r\n")
        self.assertTrue(replies.readline().startswith(b"+OK"))
        self.assertTrue(closed_by_server(sock, 1.0 + MARGIN))
        self.assert_back_to_baseline()

    def test_smtp_starttls_then_silence_is_closed(self):
        """An SMTP client that sends STARTTLS and then nothing is closed at the timeout."""
        sock = self.connect(self.server.smtp_port)
        replies = sock.makefile("rb")
        replies.readline()
        sock.sendall(b"EHLO client.test\r\n")
        while not replies.readline().startswith(b"250 "):
            pass
        sock.sendall(b"STARTTLS\r\n")
        self.assertTrue(replies.readline().startswith(b"220"))
        self.assertTrue(closed_by_server(sock, 1.0 + MARGIN))
        self.assert_back_to_baseline()


class RefusedTLSTests(ExhaustionTestCase):
    settings = {"pop3": {"max_connections": "5", "login_timeout": "30"}}

    def test_refused_tls_connections_are_closed_at_once(self):
        """Over max_connections, POP3S connections are closed at once and hold nothing."""
        held = [self.connect(self.pop3s_port) for _ in range(5)]
        time.sleep(0.3)
        for _ in range(100):
            try:
                sock = self.connect(self.pop3s_port)
            except ConnectionResetError:
                continue  # aborted before the connect call even returned: closed at once
            self.assertTrue(closed_by_server(sock, MARGIN))
        self.assert_back_to_baseline(extra=len(held))
        # Plain POP3 is refused too while the five are held, and served once they go.
        plain = self.connect(self.server.pop3_port)
        self.assertIn(b"Too many connections", plain.makefile("rb").readline())
        for sock in held:
            sock.close()
        time.sleep(0.5)
        self.assertTrue(self.connect(self.server.pop3_port).recv(100).startswith(b"+OK"))


class UnreadRepliesTests(ExhaustionTestCase):
    settings = {"pop3": {"login_timeout": "2"}, "smtp": {"timeout": "2"}}

    def assert_flood_bounded(self, port: int, command: bytes) -> None:
        sock = self.connect(port)
        before = self.server.rss_kib()
        sent = flood(sock, command * 500_000, 1.5)
        peak = before
        for _ in range(10):
            peak = max(peak, self.server.rss_kib())
            time.sleep(0.1)
        grown = peak - before
        # The server stops reading after some 64 KiB of unread replies: the rest of
        # the flood waits in the kernel's socket buffers, not in the server.
        self.assertLess(grown, 4 * 1024, f"grew {grown} KiB after {sent} bytes")
        self.assertTrue(closed_by_server_unread(sock, 2.0 + MARGIN))
        self.assert_back_to_baseline()

    def test_pop3_capa_flood_without_reading(self):
        """CAPA sent 500,000 times by a client that never reads: memory stays flat."""
        self.assert_flood_bounded(self.server.pop3_port, b"CAPA\r\n")

    def test_smtp_ehlo_flood_without_reading(self):
        """EHLO sent 500,000 times by a client that never reads: memory stays flat."""
        self.assert_flood_bounded(self.server.smtp_port, b"EHLO x\r\n")


def closed_by_server_unread(sock: socket.socket, within: float) -> bool:
    """Whether the server drops ``sock`` within ``within`` s, reading only to see the end."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            while sock.recv(1 << 20):
                pass
            return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


#: The flood's Argon2id cost: 8 MiB and one pass, an eighth of the default's memory, so
#: that 500 verifications take seconds on a shared CI machine, not half a minute.
FLOOD_HASH_KIB = 8 * 1024
#: What one waiting login (socket, session, queued job) may hold in the server, at most.
WAITING_LOGIN_KIB = 64


async def _wrong_login(port: int, source: str, sent, answered: list) -> bytes:
    """alice with a wrong password from ``source``; the reply to PASS, counted when it comes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        await asyncio.wait_for(reader.readline(), 60)
        writer.write(b"USER alice\r\nPASS wrong\r\n")
        await writer.drain()
        sent.set()
        await asyncio.wait_for(reader.readline(), 60)
        reply = (await asyncio.wait_for(reader.readline(), 120)).rstrip(b"\r\n")
        answered.append(reply)
        return reply
    finally:
        writer.close()


async def _wrong_logins(port: int, source: str, count: int) -> list[bytes]:
    """``count`` wrong logins at once from ``source``; their replies."""
    events = [asyncio.Event() for _ in range(count)]
    return list(await asyncio.gather(*(_wrong_login(port, source, e, []) for e in events)))


async def _login_and_leave(port: int, source: str) -> None:
    """A wrong login from ``source`` whose client hangs up as soon as PASS is sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    await asyncio.wait_for(reader.readline(), 60)
    writer.write(b"USER alice\r\nPASS wrong\r\n")
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def _right_login(port: int, source: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        await asyncio.wait_for(reader.readline(), 60)
        writer.write(b"USER alice\r\nPASS secret\r\nQUIT\r\n")
        await asyncio.wait_for(reader.readline(), 60)
        return (await asyncio.wait_for(reader.readline(), 120)).rstrip(b"\r\n")
    finally:
        writer.close()


async def _verification_flood(port: int, flood_hosts, per_host: int, leaver_hosts, per_leaver):
    """Wrong logins from every flood host at once, then logins that leave, then alice's.

    Returns the flood's replies, alice's reply, and how many flood replies had come
    before alice's login was sent and when its reply came.
    """
    answered: list[bytes] = []
    sources = [host for host in flood_hosts for _ in range(per_host)]
    sent = [asyncio.Event() for _ in sources]
    flood = [
        asyncio.create_task(_wrong_login(port, host, event, answered))
        for host, event in zip(sources, sent, strict=True)
    ]
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in sent)), 90)
    await asyncio.gather(
        *(_login_and_leave(port, host) for host in leaver_hosts for _ in range(per_leaver))
    )
    before = len(answered)
    reply = await _right_login(port, "127.0.0.2")
    after = len(answered)
    return await asyncio.gather(*flood), reply, before, after


class VerificationFloodTests(SynchronousTestCase):
    """Many wrong passwords at once against a real ``twistd popserv``, /metrics on."""

    def test_wrong_password_flood_keeps_memory_bounded(self):
        """500 wrong PASS at once from 20 addresses: at most max_verifications hashes' memory.

        Every attempt is really verified (``max_failures`` raised so the throttle lets them
        all through), against an Argon2id hash of 8 MiB (``FLOOD_HASH_KIB``; at the
        default 64 MiB, 500 verifications take 20 s or more on two shared cores).  With 4
        at most at once, the server grows by 4 hashes (32 MiB) plus what the waiting
        logins hold (about 3 MiB for 500, far under ``WAITING_LOGIN_KIB`` each): 35 MiB
        measured, where 16 at once grow it by 130 MiB and 500 at once would take 4 GiB.
        100 more logins whose clients hang up while they wait are never verified, and
        alice, from 127.0.0.2, is let in after one turn of the addresses, not after the
        flood.
        """
        metrics_port = free_port()
        server = TwistdServer(
            self,
            {},
            settings={
                "pop3": {"max_failures": "10000", "max_connections_per_peer": "30"},
                "auth": {"max_verifications": "4"},
                "metrics": {"listen": f"tcp:{metrics_port}:interface=127.0.0.1"},
            },
            backlog=1024,
        )
        hasher = argon2.PasswordHasher(time_cost=1, memory_cost=FLOOD_HASH_KIB, parallelism=1)
        with open(server.users_path, "w", encoding="utf-8") as f:
            f.write("alice:{ARGON2ID}" + hasher.hash("secret") + "\n")
        server.start()
        # Lazy imports, the threads' first hashes and the memory they keep come before
        # the baseline: four wrong logins at once fill the four threads once.
        warm = asyncio.run(_wrong_logins(server.pop3_port, "127.0.0.3", 4))
        self.assertEqual(warm, [Reply.AUTH_FAILED] * 4)
        time.sleep(0.2)
        baseline = server.rss_kib()
        # Each verification that runs for a slow hash counts as a miss of the password cache.
        misses_before = sample(scrape(metrics_port), "popserv_auth_cache_misses_total")
        sampler = RSSSampler(server)
        flood_hosts = [f"127.0.10.{n}" for n in range(1, 21)]
        leaver_hosts = [f"127.0.11.{n}" for n in range(1, 11)]
        flood, reply, before, after = asyncio.run(
            _verification_flood(server.pop3_port, flood_hosts, 25, leaver_hosts, 10)
        )
        peak = sampler.stop()
        verified = sample(scrape(metrics_port), "popserv_auth_cache_misses_total") - misses_before

        self.assertTrue(reply.startswith(b"+OK Logged in"), reply)
        self.assertEqual(set(flood), {Reply.AUTH_FAILED})
        # alice's is one more verification; of the 100 that left, a few may have started.
        self.assertGreaterEqual(verified, 501)
        self.assertLess(verified, 501 + 10)
        # The flood was still waiting when alice came, and most of it was still when she
        # was let in: one turn of 20 addresses, 4 verifications in progress, some slack.
        self.assertLess(before, 400)
        self.assertLess(after - before, 60)
        bound = 4 * FLOOD_HASH_KIB + len(flood) * WAITING_LOGIN_KIB
        self.assertLess(peak - baseline, bound, f"grew by {(peak - baseline) // 1024} MiB")
