"""Mailbox policy with real clients and a real Dovecot over the same Maildir.

poplib reads and marks, Dovecot's ``doveadm`` sees the flags and the Maildir++ quota,
swaks meets a full mailbox, and EXPIRE removes what it says it will.  Servers listen on
127.0.0.1 port 0 only.
"""

from __future__ import annotations

import os
import poplib
import re
import sys
import time

from twisted.internet import threads
from twisted.trial import unittest

import popserv
from popserv import quota, retention
from popserv.maildir import uidl_for
from tests.live import HOST, require_client, run_program, start_server
from tests.live_smtp import maildir_files, start_smtp
from tests.test_dovecot_uidl import Dovecot

MSG1 = b"Subject: one\r\n\r\nfirst message\r\n"
MSG2 = b"Subject: two\r\n\r\nsecond message\r\n"
K = 1024


def pop3(port: int, steps, user: str = "alice", password: str = "secret", quit: bool = True):
    """A blocking poplib session: ``steps(client)`` after login, then QUIT or a dropped line."""
    client = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        client.user(user)
        client.pass_(password)
        result = steps(client)
        if quit:
            client.quit()
        return result
    finally:
        client.close()


def uidls(client) -> list[bytes]:
    return [line.split()[1] for line in client.uidl()[1]]


class SeenTests(unittest.TestCase):
    """RETR marks a message read at QUIT; TOP and dropped sessions mark nothing."""

    timeout = 60

    async def asyncSetUp(self):
        self.server = await start_server(self)
        self.first = self.server.deliver("alice", MSG1)
        self.second = self.server.deliver("alice", MSG2)

    def setUp(self):
        from twisted.internet import defer

        return defer.ensureDeferred(self.asyncSetUp())

    def run_pop3(self, steps, **kwargs):
        return threads.deferToThread(pop3, self.server.port, steps, **kwargs)

    async def test_retr_marks_seen_top_does_not(self):
        """RETR 1, TOP 2, QUIT: message 1 is in cur/ with S, message 2 untouched, UIDLs kept."""

        def steps(client):
            before = uidls(client)
            client.retr(1)
            client.top(2, 0)
            return before

        before = await self.run_pop3(steps)
        await self.server.wait_idle()
        cur = maildir_files(self.server, "alice", "cur")
        new = maildir_files(self.server, "alice", "new")
        self.assertEqual(len(cur), 1)
        self.assertTrue(cur[0].startswith(self.first) and cur[0].endswith(":2,S"), cur)
        self.assertEqual([name.split(",")[0] for name in new], [self.second])
        after = await self.run_pop3(uidls)
        self.assertEqual(after, before)

    async def test_drop_moves_nothing(self):
        """The same session cut off before QUIT: nothing moved, no retrieval recorded."""

        def steps(client):
            client.retr(1)
            client.top(2, 0)
            client.sock.shutdown(2)

        await self.run_pop3(steps, quit=False)
        await self.server.wait_idle()
        self.assertEqual(maildir_files(self.server, "alice", "cur"), [])
        self.assertEqual(len(maildir_files(self.server, "alice", "new")), 2)
        self.assertEqual(retention.read(self.server.maildir("alice")), {})


class DovecotReadsTheSameMaildirTests(unittest.TestCase):
    """A real Dovecot over the Maildir popserv served: the flags, and the same quota usage."""

    timeout = 120

    def quota_dovecot(self, server, storage: str) -> Dovecot:
        dovecot = Dovecot(self, server.mailroot, server.users_path, mail_plugins="quota")
        config = dovecot.config

        def with_quota() -> str:
            return config() + (
                f"plugin {{\n  quota = maildir:User quota\n  quota_rule = *:storage={storage}\n}}\n"
            )

        dovecot.config = with_quota
        return dovecot

    async def doveadm(self, dovecot: Dovecot, *args: str) -> str:
        ran = await run_program(
            ["doveadm", "-c", os.path.join(dovecot.base, "dovecot.conf"), *args], timeout=30
        )
        self.assertEqual(ran.code, 0, ran.out + ran.err + dovecot.log().encode())
        return ran.out.decode()

    async def test_seen_flag_and_quota_agree(self):
        """After popserv's RETR+QUIT and SMTP deliveries, Dovecot sees \\Seen and the same usage."""
        server = await start_server(self, fields={"alice": "userdb_quota_rule=*:storage=100K"})
        port = await start_smtp(self, server)
        for body in ((b"x" * 99 + b"\n") * 30, (b"y" * 99 + b"\n") * 50):
            ran = await run_program(
                [
                    require_client("swaks"),
                    "--server", "127.0.0.1", "--port", str(port), "--helo", "client.test",
                    "--from", "s@remote.example", "--to", f"alice@{HOST}",
                    "--body", body.decode(),
                ]
            )  # fmt: skip
            self.assertEqual(ran.code, 0, ran.out + ran.err)
        await threads.deferToThread(pop3, server.port, lambda c: c.retr(1))
        await server.wait_idle()
        ours = await self.popserv_quota(server)

        dovecot = self.quota_dovecot(server, "100K")
        await dovecot.start()
        flags = await self.doveadm(
            dovecot, "fetch", "-u", "alice", "flags", "mailbox", "INBOX", "all"
        )
        self.assertEqual(re.findall(r"flags: (.*)", flags)[0].split()[0], "\\Seen", flags)
        self.assertNotIn("\\Seen", re.findall(r"flags: (.*)", flags)[1])
        shown = await self.doveadm(dovecot, "quota", "get", "-u", "alice")
        storage = re.search(r"STORAGE\s+(\d+)\s+(\d+)", shown)
        messages = re.search(r"MESSAGE\s+(\d+)", shown)
        self.assertEqual(int(storage.group(2)), 100)
        self.assertEqual(int(storage.group(1)), -(-ours[0] // K))  # Dovecot shows KiB, rounded up
        self.assertEqual(int(messages.group(1)), ours[1])
        # Dovecot's own count of the files gives the very numbers popserv kept.
        await self.doveadm(dovecot, "quota", "recalc", "-u", "alice")
        with open(os.path.join(server.maildir("alice"), quota.MAILDIRSIZE)) as f:
            lines = f.read().split("\n")
        self.assertEqual(lines[0], "102400S")
        total = [sum(int(line.split()[i]) for line in lines[1:] if line) for i in (0, 1)]
        self.assertEqual(tuple(total), ours)

    async def popserv_quota(self, server) -> tuple[int, int]:
        """``popserv quota alice`` as an admin runs it: (bytes, messages)."""
        ran = await run_program(
            [
                sys.executable, "-m", "popserv", "quota", "alice",
                "--users", server.users_path, "--mailroot", server.mailroot,
            ],
            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(popserv.__file__))},
        )  # fmt: skip
        self.assertEqual(ran.code, 0, ran.err)
        out = ran.out.decode()
        self.assertIn("of 102400", out)
        storage = int(re.search(r"storage: (\d+) bytes", out).group(1))
        messages = int(re.search(r"messages: (\d+) of", out).group(1))
        return storage, messages


class QuotaOverSMTPTests(unittest.TestCase):
    """swaks against a 100K quota: refused when full, with the enhanced code of RFC 3463."""

    timeout = 60

    async def start(self, **smtp_config):
        self.server = await start_server(
            self,
            {"alice": "secret", "bob": "pw"},
            fields={"alice": "userdb_quota_rule=*:storage=100K"},
        )
        self.port = await start_smtp(self, self.server, **smtp_config)

    async def swaks(self, *to: str, size: int = 60 * K):
        body = self.mktemp()
        with open(body, "wb") as f:
            f.write(b"Subject: big\n\n" + (b"z" * 99 + b"\n") * (size // 100))
        return await run_program(
            [
                require_client("swaks"),
                "--server", "127.0.0.1", "--port", str(self.port), "--helo", "client.test",
                "--from", "s@remote.example", "--to", ",".join(f"{u}@{HOST}" for u in to),
                "--data", "@" + body,
            ]
        )  # fmt: skip

    async def test_second_message_refused_then_accepted_after_dele(self):
        """60K accepted, a second 60K refused with 552 5.2.2; after DELE+QUIT it fits again."""
        await self.start()
        ran = await self.swaks("alice")
        self.assertEqual(ran.code, 0, ran.out + ran.err)
        ran = await self.swaks("alice")
        self.assertNotEqual(ran.code, 0)
        self.assertIn(b"552 5.2.2 Mailbox full", ran.out)
        self.assertEqual(len(maildir_files(self.server, "alice", "new")), 1)
        self.assertEqual(maildir_files(self.server, "alice", "tmp"), [])
        await threads.deferToThread(pop3, self.server.port, lambda c: c.dele(1))
        await self.server.wait_idle()
        ran = await self.swaks("alice")
        self.assertEqual(ran.code, 0, ran.out + ran.err)
        self.assertEqual(len(maildir_files(self.server, "alice", "new")), 1)

    async def test_other_recipient_still_delivered(self):
        """One transaction to a full alice and to bob: bob gets it, the reply names alice."""
        await self.start()
        await self.swaks("alice")
        ran = await self.swaks("alice", "bob")
        self.assertIn(b"552 5.2.2 Mailbox full for alice", ran.out)
        self.assertEqual(len(maildir_files(self.server, "alice", "new")), 1)
        self.assertEqual(len(maildir_files(self.server, "bob", "new")), 1)

    async def test_full_tempfail(self):
        """``[quota] full_tempfail = yes``: 452 4.2.2, so the sender tries again later."""
        await self.start(quota_full_tempfail=True)
        await self.swaks("alice")
        ran = await self.swaks("alice")
        self.assertIn(b"452 4.2.2", ran.out)

    async def test_declared_size_refused_at_rcpt(self):
        """smtplib declares SIZE: a message that cannot fit is refused at RCPT, before DATA."""
        import smtplib

        await self.start()
        await self.swaks("alice")

        def send():
            with smtplib.SMTP("127.0.0.1", self.port, timeout=20) as client:
                client.ehlo("client.test")
                client.mail("s@remote.example", [f"SIZE={60 * K}"])
                return client.rcpt(f"alice@{HOST}")

        code, text = await threads.deferToThread(send)
        self.assertEqual((code, text[:5]), (552, b"5.2.2"))


class ExpireTests(unittest.TestCase):
    """RFC 2449 EXPIRE, advertised and carried out."""

    timeout = 60

    async def test_expire_zero(self):
        """EXPIRE 0: a retrieved message is gone after QUIT without DELE; the other stays."""
        server = await start_server(self, pop3_expire=0)
        server.deliver("alice", MSG1)
        kept = server.deliver("alice", MSG2)

        def steps(client):
            capa = client.capa()
            client.retr(1)
            return capa

        capa = await threads.deferToThread(pop3, server.port, steps)
        await server.wait_idle()
        self.assertEqual(capa["EXPIRE"], ["0"])
        self.assertEqual(list(server.stored("alice")), [kept])

    async def test_expire_days_after_restart(self):
        """EXPIRE 30: retrieved, backdated 31 days in the kept record, removed at next login."""
        server = await start_server(self, pop3_expire=30)
        old = server.deliver("alice", MSG1)
        young = server.deliver("alice", MSG2)
        await threads.deferToThread(pop3, server.port, lambda c: (c.retr(1), c.retr(2)))
        await server.wait_idle()
        maildir = server.maildir("alice")
        times = retention.read(maildir)
        self.assertEqual(set(times), {uidl_for(old), uidl_for(young)})
        times[uidl_for(old)] = int(time.time()) - 31 * 86400
        retention.write(maildir, times)

        def steps(client):
            return client.capa(), uidls(client)

        capa, listed = await threads.deferToThread(pop3, server.port, steps)
        self.assertEqual(capa["EXPIRE"], ["30"])
        self.assertEqual(listed, [young.encode()])
        self.assertEqual(list(server.stored("alice")), [young])

    async def test_per_user_value_in_capa(self):
        """A user's own EXPIRE: CAPA says USER before login and the user's value after."""
        server = await start_server(
            self, {"alice": "secret", "bob": "pw"}, fields={"bob": "userdb_pop3_expire=0"}
        )

        def capa_before_and_after(user, password):
            client = poplib.POP3("127.0.0.1", server.port, timeout=20)
            try:
                before = client.capa()["EXPIRE"]
                client.user(user)
                client.pass_(password)
                after = client.capa()["EXPIRE"]
                client.quit()
            finally:
                client.close()
            return before, after

        alice = await threads.deferToThread(capa_before_and_after, "alice", "secret")
        bob = await threads.deferToThread(capa_before_and_after, "bob", "pw")
        self.assertEqual(alice, (["0", "USER"], ["NEVER"]))
        self.assertEqual(bob, (["0", "USER"], ["0"]))
