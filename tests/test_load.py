"""Load against a real ``twistd popserv`` on loopback: 1,000 concurrent connections all
served, memory back near its baseline once they close, and flat memory for a client that
asks for a 20 MB message and never reads it.

Figures (resident memory of the server, in KiB) go to the test log (``_trial_temp/test.log``).
"""

import asyncio
import resource
import socket
import time

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from tests.live_twistd import TwistdServer
from tests.test_faults import Session, deliver

log = Logger()

CONNECTIONS = 1000
#: Every tenth connection logs in, each as a user of its own (a maildrop admits one session).
USERS = CONNECTIONS // 10
#: How far above its baseline the server's memory may stay once every client is gone.
SETTLED_SLACK_KIB = 15 * 1024
#: How much a client that never reads may make the server grow.
STALLED_READER_SLACK_KIB = 10 * 1024


def raise_own_file_limit(needed: int) -> None:
    """Let this (client) process hold ``needed`` sockets, or skip the test if it cannot."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise AssertionError(f"RLIMIT_NOFILE hard limit {hard} < {needed} (ulimit -Hn)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def _reply(reader: asyncio.StreamReader) -> bytes:
    return (await asyncio.wait_for(reader.readline(), 30)).rstrip(b"\r\n")


async def _multi(reader: asyncio.StreamReader) -> list[bytes]:
    lines = []
    while (line := await _reply(reader)) != b".":
        lines.append(line)
    return lines


async def _many_sessions(port: int, count: int, users: int, measure) -> dict:
    """Open ``count`` connections and hold them all; then each one works and quits."""
    opened = asyncio.Event()
    waiting = 0
    outcome = {"greeted": 0, "capa": 0, "logged_in": 0, "quit": 0}

    async def one(n: int):
        nonlocal waiting
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            if (await _reply(reader)).startswith(b"+OK"):
                outcome["greeted"] += 1
            waiting += 1
            if waiting == count:
                opened.set()
            await opened.wait()
            writer.write(b"CAPA\r\n")
            if (await _reply(reader)).startswith(b"+OK"):
                await _multi(reader)
                outcome["capa"] += 1
            if n % 10 == 0:
                user = b"user%03d" % (n // 10 % users)
                writer.write(b"USER " + user + b"\r\nPASS pw\r\nSTAT\r\n")
                await _reply(reader)
                if (await _reply(reader)).startswith(b"+OK Logged in"):
                    outcome["logged_in"] += 1
                await _reply(reader)
            writer.write(b"QUIT\r\n")
            if (await _reply(reader)).startswith(b"+OK"):
                outcome["quit"] += 1
        finally:
            writer.close()
            await writer.wait_closed()

    async def all_of_them():
        tasks = [asyncio.ensure_future(one(n)) for n in range(count)]
        await asyncio.wait_for(opened.wait(), 60)
        outcome["peak_kib"] = measure()
        await asyncio.gather(*tasks)

    await all_of_them()
    return outcome


class ConnectionLoadTests(SynchronousTestCase):
    def test_thousand_concurrent_connections(self):
        """1,000 connections open at once are all served; memory returns near its baseline."""
        raise_own_file_limit(CONNECTIONS + 200)
        server = TwistdServer(
            self,
            {f"user{n:03d}": "pw" for n in range(USERS)},
            settings={
                "pop3": {
                    "max_connections": str(CONNECTIONS * 2),
                    "max_connections_per_peer": str(CONNECTIONS * 2),
                },
                # Its logins all come from 127.0.0.1 at once.
                "auth": {"max_waiting_per_peer": str(USERS)},
            },
            backlog=CONNECTIONS,
        )
        server.start()
        # One full session first, so that lazily imported code is not counted as growth.
        warm = Session(server.pop3_port)
        self.assertTrue(warm.login(b"user000", b"pw").startswith(b"+OK Logged in"))
        warm.command(b"QUIT")
        warm.close()
        time.sleep(0.5)
        baseline = server.rss_kib()
        started = time.monotonic()
        outcome = asyncio.run(_many_sessions(server.pop3_port, CONNECTIONS, USERS, server.rss_kib))
        elapsed = time.monotonic() - started
        self.assertEqual(
            {key: outcome[key] for key in ("greeted", "capa", "quit")},
            {"greeted": CONNECTIONS, "capa": CONNECTIONS, "quit": CONNECTIONS},
        )
        self.assertEqual(outcome["logged_in"], USERS)
        time.sleep(2)
        after = server.rss_kib()
        log.info(
            "load.connections: {count} connections in {elapsed:.1f}s; server RSS "
            "{baseline} KiB at baseline, {peak} KiB at peak, {after} KiB after",
            count=CONNECTIONS,
            elapsed=elapsed,
            baseline=baseline,
            peak=outcome["peak_kib"],
            after=after,
        )
        self.assertLess(after, baseline + SETTLED_SLACK_KIB)
        self.assertGreater(outcome["peak_kib"], baseline)

    def test_client_that_never_reads_a_big_message(self):
        """RETR of a 20 MB message to a client that reads nothing leaves memory flat."""
        server = TwistdServer(self, {"alice": "secret"})
        line = b"x" * 76 + b"\n"
        deliver(server, "alice", b"Subject: big\n\n" + line * (20 * 1024 * 1024 // len(line)))
        server.start()
        stalled = socket.socket()
        self.addCleanup(stalled.close)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.settimeout(30)
        stalled.connect(("127.0.0.1", server.pop3_port))
        stalled.sendall(b"USER alice\r\nPASS secret\r\n")
        time.sleep(0.5)
        baseline = server.rss_kib()
        stalled.sendall(b"RETR 1\r\n")
        peak = baseline
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            peak = max(peak, server.rss_kib())
            time.sleep(0.05)
        # Meanwhile the server serves others.
        other = Session(server.pop3_port)
        self.assertTrue(other.command(b"CAPA").startswith(b"+OK"))
        other.close()
        log.info(
            "load.stalled_reader: server RSS {baseline} KiB before RETR of 20 MB, "
            "at most {peak} KiB while the client read nothing (+{growth} KiB)",
            baseline=baseline,
            peak=peak,
            growth=peak - baseline,
        )
        self.assertLess(peak - baseline, STALLED_READER_SLACK_KIB)
        # The server only waited: once read, the whole message arrives.
        received = bytearray()
        while not received.endswith(b"\r\n.\r\n"):
            chunk = stalled.recv(1 << 20)
            self.assertTrue(chunk, "connection closed before the end of the message")
            received += chunk
        self.assertGreater(len(received), 20 * 1024 * 1024)


class SessionsPerUserTests(SynchronousTestCase):
    def test_one_session_per_user(self):
        """While a user is logged in, their other logins get [IN-USE]; after QUIT one gets in."""
        server = TwistdServer(self, {"alice": "secret", "bob": "pw"})
        server.start()
        first = Session(server.pop3_port)
        self.addCleanup(first.close)
        self.assertTrue(first.login().startswith(b"+OK Logged in"))
        for _ in range(3):
            other = Session(server.pop3_port)
            self.assertEqual(other.login(), b"-ERR [IN-USE] Mailbox is locked by another session.")
            other.close()
        bob = Session(server.pop3_port)
        self.addCleanup(bob.close)
        self.assertTrue(bob.login(b"bob", b"pw").startswith(b"+OK Logged in"))
        self.assertTrue(first.command(b"QUIT").startswith(b"+OK"))
        again = Session(server.pop3_port)
        self.addCleanup(again.close)
        self.assertTrue(again.login().startswith(b"+OK Logged in"))
