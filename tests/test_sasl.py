"""Tests for popserv.sasl: each mechanism against its RFC's example, and malformed exchanges."""

from __future__ import annotations

import base64
import re

import scramp
from twisted.cred.credentials import CramMD5Credentials, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from popserv import auth, sasl
from popserv.interfaces import ISASLVerified, UserDBUnavailable
from popserv.testing import run_at_once
from tests.test_auth import CHEAP, write_file

# RFC 7677, section 3 (SCRAM-SHA-256) and RFC 5802, section 5 (SCRAM-SHA-1): user "user",
# password "pencil".
RFC7677 = {
    "salt": "W22ZaJ0SNY7soEsUEjb6gQ==",
    "server_nonce": b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
    "client_first": b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
    "server_first": b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
    "client_final": b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
    "server_final": b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
}
RFC5802 = {
    "salt": "QSXCR+Q6sek8bf92",
    "server_nonce": b"3rfcNHYJY1ZVvWVs7j",
    "client_first": b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
    "server_first": b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
    "client_final": b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,"
    b"p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
    "server_final": b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
}


def scram_entry(mechanism: str, password: bytes, salt_b64: str) -> str:
    """A Dovecot-style ``{SCRAM-*}`` password field with the given salt, 4096 iterations."""
    keys = auth.scram_keys(mechanism, password, base64.b64decode(salt_b64), 4096)
    fields = [keys.salt, keys.stored_key, keys.server_key]
    encoded = ",".join(base64.b64encode(field).decode() for field in fields)
    return f"{{{mechanism}}}4096,{encoded}"


class UserDBCase(unittest.TestCase):
    """A passwd-file user database, with cheap Argon2, and the checkers over it."""

    users = ""

    def setUp(self):
        self.patch(auth, "HASHER", CHEAP)
        self.path = self.mktemp()
        write_file(self.path, self.users)
        self.userdb = auth.PasswdFile(self.path, run_at_once)

    def login(self, credentials):
        """The avatar id the matching checker gives, or its failure."""
        for checker in auth.checkers(self.userdb):
            if any(i.providedBy(credentials) for i in checker.credentialInterfaces):
                return checker.requestAvatarId(credentials)
        raise AssertionError(f"no checker for {credentials!r}")

    def assert_login(self, credentials, user: str) -> None:
        self.assertEqual(self.successResultOf(self.login(credentials)), user)

    def assert_refused(self, credentials) -> None:
        self.failureResultOf(self.login(credentials), UnauthorizedLogin)


class MechanismTableTests(unittest.TestCase):
    def test_table(self):
        """MECHANISMS maps each wire name to its class; only PLAIN and LOGIN are plaintext."""
        self.assertEqual(
            set(sasl.MECHANISMS),
            {b"PLAIN", b"LOGIN", b"CRAM-MD5", b"SCRAM-SHA-256", b"SCRAM-SHA-1"},
        )
        for name, mechanism in sasl.MECHANISMS.items():
            self.assertEqual(mechanism.name, name)
            self.assertEqual(mechanism.plaintext, name in (b"PLAIN", b"LOGIN"), name)


class PlainTests(UserDBCase):
    users = "tim:{PLAIN}tanstaaftanstaaf\nKurt:{PLAIN}xipj3plmq\n"

    def mechanism(self) -> sasl.Plain:
        return sasl.Plain("pop.example.org", self.userdb)

    def test_rfc4616_example(self):
        """RFC 4616's ``\\0tim\\0tanstaaftanstaaf`` logs tim in."""
        result = self.mechanism().start(b"\0tim\0tanstaaftanstaaf")
        self.assertIsInstance(result, sasl.Success)
        self.assertIsInstance(result.credentials, UsernamePassword)
        self.assertEqual(result.credentials.username, b"tim")
        self.assertEqual(result.credentials.password, b"tanstaaftanstaaf")
        self.assert_login(result.credentials, "tim")

    def test_empty_challenge_first(self):
        """Without an initial response the server sends an empty challenge, then takes the reply."""
        mechanism = self.mechanism()
        self.assertEqual(mechanism.start(None), sasl.Challenge(b""))
        result = mechanism.respond(b"\0tim\0tanstaaftanstaaf")
        self.assert_login(result.credentials, "tim")

    def test_wrong_password(self):
        """A wrong password gives credentials the checker refuses."""
        result = self.mechanism().start(b"\0tim\0tanstaaf")
        self.assert_refused(result.credentials)

    def test_authzid_same_as_user(self):
        """An authzid equal to the user name is the user logging in as itself."""
        result = self.mechanism().start(b"tim\0tim\0tanstaaftanstaaf")
        self.assert_login(result.credentials, "tim")

    def test_rfc4616_authzid_example(self):
        """RFC 4616's ``Ursel\\0Kurt\\0xipj3plmq``, acting for another user, is a SASLError."""
        self.assertRaises(sasl.SASLError, self.mechanism().start, b"Ursel\0Kurt\0xipj3plmq")

    def test_malformed(self):
        """Missing NULs, extra fields, an empty user or password, or non-UTF-8 are SASLErrors."""
        for message in [
            b"timtanstaaftanstaaf",
            b"tim\0tanstaaftanstaaf",
            b"\0tim\0tanstaaf\0extra",
            b"\0\0tanstaaftanstaaf",
            b"\0tim\0",
            b"",
            b"\0t\xffm\0pw",
            b"\0tim\0p\xffw",
        ]:
            self.assertRaises(sasl.SASLError, self.mechanism().start, message)

    def test_complete_exchange(self):
        """A response after the exchange completed is a SASLError."""
        mechanism = self.mechanism()
        mechanism.start(b"\0tim\0tanstaaftanstaaf")
        self.assertRaises(sasl.SASLError, mechanism.respond, b"\0tim\0tanstaaftanstaaf")


class LoginTests(UserDBCase):
    users = "tim:{PLAIN}tanstaaftanstaaf\n"

    def mechanism(self) -> sasl.Login:
        return sasl.Login("pop.example.org", self.userdb)

    def test_flow(self):
        """LOGIN asks ``Username:`` then ``Password:``, and ends in UsernamePassword."""
        mechanism = self.mechanism()
        self.assertEqual(mechanism.start(None), sasl.Challenge(b"Username:"))
        self.assertEqual(mechanism.respond(b"tim"), sasl.Challenge(b"Password:"))
        result = mechanism.respond(b"tanstaaftanstaaf")
        self.assertIsInstance(result, sasl.Success)
        self.assert_login(result.credentials, "tim")
        self.assertRaises(sasl.SASLError, mechanism.respond, b"more")

    def test_initial_response_is_user(self):
        """An initial response is the user name, so the password is asked next."""
        mechanism = self.mechanism()
        self.assertEqual(mechanism.start(b"tim"), sasl.Challenge(b"Password:"))
        self.assert_refused(mechanism.respond(b"wrong").credentials)

    def test_empty_user(self):
        """An empty user name is a SASLError."""
        mechanism = self.mechanism()
        mechanism.start(None)
        self.assertRaises(sasl.SASLError, mechanism.respond, b"")
        self.assertRaises(sasl.SASLError, self.mechanism().start, b"")


class CramMD5Tests(UserDBCase):
    # RFC 2195's example; "doveadm pw -s CRAM-MD5 -p tanstaaftanstaaf" made ann's value.
    users = (
        "tim:{PLAIN}tanstaaftanstaaf\n"
        "ann:{CRAM-MD5}d06d4e1b26fccaa4b0b61801132340a354b21152711fb604ca3e035e7015116b\n"
        "hal:{SHA256-CRYPT}$5$Z6q/0dg1JbU7CBu1$zN.CLaGODcxW1fNO6Efvx8LBwa.yXPNRZ5SrtCSFXf.\n"
    )
    challenge = b"<1896.697170952@postoffice.reston.mci.net>"

    def mechanism(self) -> sasl.CramMD5:
        return sasl.CramMD5(
            "postoffice.reston.mci.net", self.userdb, nonce=lambda: b"1896.697170952"
        )

    def answer(self, response: bytes):
        mechanism = self.mechanism()
        self.assertEqual(mechanism.start(None), sasl.Challenge(self.challenge))
        return mechanism.respond(response)

    def test_rfc2195_example(self):
        """RFC 2195's challenge and ``tim b913a6...3890`` log tim in through SecretChecker."""
        result = self.answer(b"tim b913a602c7eda7a495b4e6e7334d3890")
        self.assertIsInstance(result.credentials, CramMD5Credentials)
        self.assertEqual(result.credentials.username, b"tim")
        self.assertEqual(result.credentials.challenge, self.challenge)
        self.assert_login(result.credentials, "tim")

    def test_stored_context(self):
        """A ``{CRAM-MD5}`` entry, as doveadm writes it, verifies the same answer."""
        self.assert_login(self.answer(b"ann b913a602c7eda7a495b4e6e7334d3890").credentials, "ann")

    def test_upper_case_digest(self):
        """Hex digits in upper case are accepted."""
        self.assert_login(self.answer(b"tim B913A602C7EDA7A495B4E6E7334D3890").credentials, "tim")

    def test_refused(self):
        """A wrong digest, an unknown user, or a hashed password's user fail as bad credentials."""
        for response in [
            b"tim b913a602c7eda7a495b4e6e7334d3891",
            b"ann 00000000000000000000000000000000",
            b"nobody b913a602c7eda7a495b4e6e7334d3890",
            b"hal b913a602c7eda7a495b4e6e7334d3890",
        ]:
            self.assert_refused(self.answer(response).credentials)

    def test_default_challenge(self):
        """The challenge is ``<random.time@hostname>`` and differs each time."""
        first = sasl.CramMD5("pop.example.org", self.userdb).start(None).data
        second = sasl.CramMD5("pop.example.org", self.userdb).start(None).data
        self.assertRegex(first, re.compile(rb"^<\d+\.\d+@pop\.example\.org>$"))
        self.assertNotEqual(first, second)

    def test_malformed(self):
        """An initial response, no space, no user, or a digest not 32 hex digits: SASLError."""
        self.assertRaises(sasl.SASLError, self.mechanism().start, b"tim")
        self.assertRaises(sasl.SASLError, self.mechanism().respond, b"tim " + b"0" * 32)
        for response in [
            b"tim",
            b"b913a602c7eda7a495b4e6e7334d3890",
            b" b913a602c7eda7a495b4e6e7334d3890",
            b"tim b913a602c7eda7a495b4e6e7334d389",
            b"tim b913a602c7eda7a495b4e6e7334d3890a",
            b"tim g913a602c7eda7a495b4e6e7334d3890",
        ]:
            mechanism = self.mechanism()
            mechanism.start(None)
            self.assertRaises(sasl.SASLError, mechanism.respond, response)


class ScramSHA256Tests(UserDBCase):
    mechanism_class = sasl.ScramSHA256
    vector = RFC7677
    users = (
        scram_entry("SCRAM-SHA-256", b"pencil", RFC7677["salt"]) + "\n"
        # The wire user "user" gets these from the entries above; others below.
        "pat:{PLAIN}pencil\n"
        "hal:{SSHA512}wbHQsyQCJi6gN7kU6PHIhGiXf0SxDiRNgTnyVwGIY40zTYdia00KlacYV/4/czTJIvQfXBeNU"
        "DLiFzooOaKxMF63rGk=\n"
    )

    def setUp(self):
        self.users = "user:" + self.users
        super().setUp()

    def mechanism(self, nonce: bytes | None = None):
        return self.mechanism_class(
            "pop.example.org", self.userdb, nonce=(lambda: nonce) if nonce else None
        )

    def rfc_exchange(self):
        """Drive the RFC's example; return the mechanism and the server's messages."""
        mechanism = self.mechanism(self.vector["server_nonce"])
        first = mechanism.start(self.vector["client_first"])
        final = mechanism.respond(self.vector["client_final"])
        return mechanism, first, final

    def client_login(self, user: str, password: str, initial: bool = True):
        """A full exchange with scramp's client; the Success at its end."""
        client = scramp.ScramClient([self.mechanism_class.scram_name], user, password)
        mechanism = self.mechanism()
        if initial:
            first = mechanism.start(client.get_client_first().encode())
        else:
            self.assertEqual(mechanism.start(None), sasl.Challenge(b""))
            first = mechanism.respond(client.get_client_first().encode())
        client.set_server_first(first.data.decode())
        final = mechanism.respond(client.get_client_final().encode())
        if isinstance(final, sasl.Success):
            return final
        client.set_server_final(final.data.decode())
        return mechanism.respond(b"")

    def test_rfc_example(self):
        """The RFC's example: server-first and server-final byte for byte, then the login."""
        mechanism, first, final = self.rfc_exchange()
        self.assertEqual(first, sasl.Challenge(self.vector["server_first"]))
        self.assertEqual(final, sasl.Challenge(self.vector["server_final"]))
        result = mechanism.respond(b"")
        self.assertIsInstance(result, sasl.Success)
        verifyObject(ISASLVerified, result.credentials)
        self.assert_login(result.credentials, "user")

    def test_non_empty_last_response(self):
        """A non-empty response after server-final is a SASLError."""
        mechanism, _, _ = self.rfc_exchange()
        self.assertRaises(sasl.SASLError, mechanism.respond, b"v=x")

    def test_scramp_client(self):
        """scramp's client logs in, with or without an initial response."""
        self.assert_login(self.client_login("user", "pencil").credentials, "user")
        self.assert_login(self.client_login("user", "pencil", initial=False).credentials, "user")

    def test_derived_from_plain(self):
        """A ``{PLAIN}`` user logs in with keys derived from the password."""
        self.assert_login(self.client_login("pat", "pencil").credentials, "pat")

    def test_wrong_password(self):
        """A wrong proof ends the exchange in credentials the checker refuses, not an error."""
        for user in ["user", "pat"]:
            result = self.client_login(user, "pen")
            self.assertIsInstance(result, sasl.Success)
            self.assert_refused(result.credentials)

    def test_scheme_without_scram(self):
        """A user whose scheme cannot serve SCRAM (SSHA512) is refused like a wrong password."""
        self.assert_refused(self.client_login("hal", "pencil").credentials)

    def test_unknown_user(self):
        """An unknown user gets a plausible server-first, the same salt each time, then refusal."""
        salts = []
        for _ in range(2):
            mechanism = self.mechanism(b"servernonce")
            first = mechanism.start(b"n,,n=nobody,r=clientnonce").data.decode()
            match = re.fullmatch(r"r=clientnonceservernonce,s=([A-Za-z0-9+/=]+),i=4096", first)
            self.assertIsNotNone(match, first)
            salts.append(base64.b64decode(match.group(1)))
        self.assertEqual(salts[0], salts[1])
        self.assertEqual(len(salts[0]), 16)
        self.assert_refused(self.client_login("nobody", "pencil").credentials)

    def test_stable_derived_salt(self):
        """A ``{PLAIN}`` user's salt is the same in every exchange, as a stored one is."""
        firsts = {self.mechanism(b"s").start(b"n,,n=pat,r=c").data for _ in range(2)}
        self.assertEqual(len(firsts), 1)

    def test_malformed_client_first(self):
        """Bad gs2 headers, channel binding (``p=``), an authzid or missing fields: SASLError."""
        for message in [
            b"x,,n=user,r=abc",
            b"n,n=user,r=abc",
            b"p=tls-unique,,n=user,r=abc",
            b"p=tls-server-end-point,,n=user,r=abc",
            b"n,a=admin,n=user,r=abc",
            b"n,,n=user",
            b"n,,r=abc",
            b"n,,n=,r=abc",
            b"n,,n=us\xffer,r=abc",
            b"n,,m=ext,n=user,r=abc",
            b"",
        ]:
            self.assertRaises(sasl.SASLError, self.mechanism().start, message)

    def test_malformed_client_final(self):
        """A wrong nonce, a wrong channel binding or a missing proof in client-final: SASLError."""
        nonce = self.vector["server_first"].split(b",")[0][2:]
        for message in [
            b"c=biws,r=" + nonce[:-1] + b",p=" + self.vector["client_final"].split(b"p=")[1],
            b"c=eSws,r=" + nonce + b",p=" + self.vector["client_final"].split(b"p=")[1],
            b"c=biws,r=" + nonce,
            b"garbage",
        ]:
            mechanism = self.mechanism(self.vector["server_nonce"])
            mechanism.start(self.vector["client_first"])
            self.assertRaises(sasl.SASLError, mechanism.respond, message)

    def test_unavailable(self):
        """An unreadable user database ends the exchange in credentials failing with it."""
        self.userdb.path = self.mktemp()
        result = self.mechanism().start(self.vector["client_first"])
        self.assertIsInstance(result, sasl.Success)
        self.failureResultOf(self.login(result.credentials), UserDBUnavailable)


class ScramSHA1Tests(ScramSHA256Tests):
    mechanism_class = sasl.ScramSHA1
    vector = RFC5802
    users = (
        scram_entry("SCRAM-SHA-1", b"pencil", RFC5802["salt"]) + "\n"
        "pat:{PLAIN}pencil\n"
        "hal:{SCRAM-SHA-256}4096,KmaB0Dp9f4Pa15POXDOcCg==,"
        "puuxanGJRkRuunSxu53iT/qBGCVmo6VEC3LQkFA6QMI=,gKHadWN9+ItFdruyFMiCs+eP8CpZJyFe6o4yn24QMiU=\n"
    )
