"""RFC 6856 on a live popserv: a UTF-8 user added with ``popserv adduser``, UTF8 and LANG.

Python's poplib speaks UTF8 and LANG; curl logs the same user in without UTF8.
"""

from __future__ import annotations

import io
import os
import poplib
import sys
import unicodedata
import urllib.parse

import argon2
from twisted.internet import defer, threads
from twisted.trial import unittest

from popserv import admin, auth
from tests import live
from tests.live import received_form, wire

USER = "josé"
PASSWORD = "contraseña añeja"

#: Raw UTF-8 in the header fields (RFC 6532), as a delivery agent stored it.
MESSAGE = (
    "From: José Núñez <josé@example.org>\n"
    "To: Zoë Ångström <zoë@example.org>\n"
    "Subject: Café, niño y 日本語\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "\n"
    "Olá, açúcar.\n"
    ".línea con punto\n"
).encode()


class UTF8UserTestCase(unittest.TestCase):
    """A live server; josé is added through the admin command and has MESSAGE."""

    timeout = 30
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")

    @defer.inlineCallbacks
    def setUp(self):
        # A cheap Argon2id: adduser's default scheme, read back from the hash when verified.
        self.patch(auth, "HASHER", argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
        self.server = yield live.start_server(self, auth_mechanisms=self.mechanisms)
        stdin = io.TextIOWrapper(io.BytesIO(PASSWORD.encode("utf-8") + b"\n"), encoding="utf-8")
        self.patch(sys, "stdin", stdin)
        code = admin.main([
            "adduser", "--users", self.server.users_path, "--mailroot", self.server.mailroot,
            "--password-stdin", USER,
        ])  # fmt: skip
        self.assertEqual(code, 0)
        self.server.deliver(USER, MESSAGE)

    def in_thread(self, f, *args):
        return threads.deferToThread(f, *args)

    def connect(self) -> poplib.POP3:
        client = poplib.POP3("127.0.0.1", self.server.port, timeout=10)
        client.encoding = "utf-8"
        return client


class AdminTests(UTF8UserTestCase):
    """What ``popserv adduser`` wrote for a UTF-8 name."""

    def test_users_file_line(self):
        """The users file holds the name in UTF-8 with an {ARGON2ID} hash of the password."""
        with open(self.server.users_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        name, field = lines[-1].split(":", 1)
        self.assertEqual(name, USER)
        self.assertTrue(field.startswith("{ARGON2ID}$argon2id$"), field)
        self.assertTrue(auth.PasswdFile(self.server.users_path).exists(USER))


class PoplibUTF8Tests(UTF8UserTestCase):
    """poplib sending UTF8, then USER/PASS in UTF-8."""

    @defer.inlineCallbacks
    def test_capa(self):
        """CAPA before login lists UTF8 with its USER argument, and LANG."""

        def session():
            client = self.connect()
            try:
                return client.capa()
            finally:
                client.quit()

        caps = yield self.in_thread(session)
        self.assertEqual(caps["UTF8"], ["USER"])
        self.assertEqual(caps["LANG"], [])

    @defer.inlineCallbacks
    def test_login_and_retrieve(self):
        """After UTF8, the UTF-8 user logs in and RETR returns the raw UTF-8 headers unchanged."""

        def session():
            client = self.connect()
            try:
                utf8 = client.utf8()
                client.user(USER)
                logged_in = client.pass_(PASSWORD)
                _, lines, octets = client.retr(1)
                return utf8, logged_in, lines, octets
            finally:
                client.quit()

        utf8, logged_in, lines, octets = yield self.in_thread(session)
        self.assertEqual(utf8, b"+OK UTF-8 mode on.")
        self.assertEqual(logged_in, b"+OK Logged in, 1 messages (%d octets)." % len(wire(MESSAGE)))
        self.assertEqual(b"\r\n".join(lines) + b"\r\n", received_form(MESSAGE))
        sent = self.server.client_bytes[0]
        self.assertIn(b"UTF8\r\nUSER jos\xc3\xa9\r\nPASS contrase\xc3\xb1a a\xc3\xb1eja\r\n", sent)

    @defer.inlineCallbacks
    def test_decomposed_name_and_password(self):
        """In UTF8 mode a decomposed (NFD) name and password match the NFC entry (SASLprep)."""
        nfd_user = unicodedata.normalize("NFD", USER)
        nfd_password = unicodedata.normalize("NFD", PASSWORD)
        self.assertNotEqual(nfd_user, USER)

        def session():
            client = self.connect()
            try:
                client.utf8()
                client.user(nfd_user)
                return client.pass_(nfd_password)
            finally:
                client.quit()

        logged_in = yield self.in_thread(session)
        self.assertTrue(logged_in.startswith(b"+OK Logged in"), logged_in)
        self.assertIn(b"USER jose\xcc\x81\r\n", self.server.client_bytes[0])


class PoplibLANGTests(UTF8UserTestCase):
    """poplib sending LANG (RFC 6856 section 3)."""

    @defer.inlineCallbacks
    def test_lang_lists(self):
        """LANG without an argument lists en and es, each with its name."""

        def session():
            client = self.connect()
            try:
                return client._longcmd("LANG")
            finally:
                client.quit()

        first, lines, _ = yield self.in_thread(session)
        self.assertTrue(first.startswith(b"+OK"), first)
        self.assertEqual(lines, [b"en English", "es Español".encode()])

    @defer.inlineCallbacks
    def test_lang_es(self):
        """LANG es switches the reply texts to Spanish, errors and the login reply alike."""

        def session():
            client = self.connect()
            try:
                changed = client._shortcmd("LANG es")
                try:
                    client._shortcmd("STAT")
                except poplib.error_proto as e:
                    error = e.args[0]
                client.utf8()
                client.user(USER)
                logged_in = client.pass_(PASSWORD)
                return changed, error, logged_in
            finally:
                client.quit()

        changed, error, logged_in = yield self.in_thread(session)
        self.assertEqual(changed, b"+OK es Idioma cambiado.")
        self.assertEqual(error, "-ERR Orden no válida en este estado.".encode())
        expected = f"+OK Sesión iniciada, 1 mensajes ({len(wire(MESSAGE))} octetos)."
        self.assertEqual(logged_in, expected.encode())


class CurlTestCase(UTF8UserTestCase):
    """curl with the UTF-8 user percent-encoded in the URL: it never sends UTF8."""

    def curl(self):
        curl = live.require_client("curl")
        quote = urllib.parse.quote
        url = f"pop3://{quote(USER)}:{quote(PASSWORD)}@127.0.0.1:{self.server.port}/1"
        argv = [curl, "-s", "-S", "--noproxy", "*", "--max-time", "15", url]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.mktemp(), "LANG": "C"}
        return live.run_program(argv, env=env, timeout=20)


class CurlSASLTests(CurlTestCase):
    """curl where PLAIN and LOGIN are offered."""

    @defer.inlineCallbacks
    def test_sasl_plain(self):
        """With SASL offered, curl logs in with AUTH PLAIN (UTF-8 inside) and gets the message."""
        ran = yield self.curl()
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(ran.out, received_form(MESSAGE))
        sent = self.server.client_bytes[0]
        self.assertTrue(sent.startswith(b"CAPA\r\nAUTH PLAIN\r\n"), sent)
        self.assertNotIn(b"UTF8", sent)


class CurlUserPassTests(CurlTestCase):
    """curl where no SASL is offered, so it falls back to USER/PASS."""

    mechanisms = ()

    @defer.inlineCallbacks
    def test_user_pass_without_utf8(self):
        """USER/PASS in UTF-8 without a UTF8 command is accepted (compared byte for byte)."""
        ran = yield self.curl()
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(ran.out, received_form(MESSAGE))
        sent = self.server.client_bytes[0]
        self.assertTrue(sent.startswith(b"CAPA\r\nUSER jos\xc3\xa9\r\nPASS "), sent)
        self.assertNotIn(b"UTF8", sent)
