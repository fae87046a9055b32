"""TLS against a live popserv on loopback: STLS on the POP3 port and implicit TLS (POP3S).

Clients verify the server against a CA made at test time, for the name ``localhost``.
Passwords are refused without TLS here (no trusted networks), so a client that logs in
has used TLS.  A missing client skips its test, or fails it when CI=true.
"""

from __future__ import annotations

import os
import poplib
import pwd
import shutil
import socket
import ssl
import tempfile

from twisted.internet import defer, reactor, task, threads
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from popserv.pop3 import Reply
from tests import live
from tests.tlscerts import start_tls_server

MESSAGE = b"From: bob@example.org\nTo: alice@example.org\nSubject: over TLS\n\nHi.\n.dot\n"
#: The event a failed handshake logs.
TLS_FAILED = "pop3.tls_failed"
#: How long to wait for bytes that must not come.
QUIET = 0.3


def lf_form(message: bytes) -> bytes:
    return message.replace(b"\r\n", b"\n")


class TLSTestCase(unittest.TestCase):
    """A live server with STLS and POP3S, no trusted networks, and alice's one message."""

    timeout = 60
    server_options: dict = {"auth_trusted_networks": ()}

    @defer.inlineCallbacks
    def setUp(self):
        self.live = yield start_tls_server(self, **self.server_options)
        self.live.server.deliver("alice", MESSAGE)
        self.ca = self.live.pki.ca_path
        self.work = os.path.abspath(self.mktemp())
        self.home = os.path.join(self.work, "home")
        os.makedirs(self.home)

    def context(self) -> ssl.SSLContext:
        """A client context that trusts only the test CA and checks the host name."""
        return ssl.create_default_context(cafile=self.ca)

    def env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.home, "LANG": "C"}

    def capa(self, client: poplib.POP3) -> dict[str, list[str]]:
        return client.capa()


class PoplibTests(TLSTestCase):
    """Python's poplib, verifying the certificate."""

    def test_stls(self):
        """stls() upgrades the session: CAPA then shows USER and SASL PLAIN and no longer
        STLS, and mail is retrieved."""

        def session():
            client = poplib.POP3("localhost", self.live.port, timeout=10)
            try:
                before = self.capa(client)
                client.stls(self.context())
                after = self.capa(client)
                client.user("alice")
                client.pass_("secret")
                _, lines, _ = client.retr(1)
                client.quit()
            finally:
                client.close()
            return before, after, lines

        def check(result):
            before, after, lines = result
            self.assertIn("STLS", before)
            self.assertNotIn("USER", before)
            self.assertNotIn("PLAIN", before.get("SASL", []))
            self.assertIn("USER", after)
            self.assertIn("PLAIN", after["SASL"])
            self.assertNotIn("STLS", after)
            self.assertEqual(b"\n".join(lines) + b"\n", MESSAGE)

        return threads.deferToThread(session).addCallback(check)

    def test_pop3_ssl(self):
        """POP3_SSL on the POP3S port logs in, retrieves, and is offered no STLS."""

        def session():
            client = poplib.POP3_SSL("localhost", self.live.pop3s_port, context=self.context())
            try:
                caps = self.capa(client)
                client.user("alice")
                client.pass_("secret")
                _, lines, _ = client.retr(1)
                client.quit()
            finally:
                client.close()
            return caps, lines

        def check(result):
            caps, lines = result
            self.assertIn("USER", caps)
            self.assertNotIn("STLS", caps)
            self.assertEqual(b"\n".join(lines) + b"\n", MESSAGE)

        return threads.deferToThread(session).addCallback(check)


class Raw:
    """A blocking line client over a socket that can be switched to TLS (use in a thread)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.pending = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.pending:
            data = self.sock.recv(4096)
            if not data:
                raise EOFError(self.pending)
            self.pending += data
        line, _, self.pending = self.pending.partition(b"\r\n")
        return line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.line()

    def nothing_more(self) -> bool:
        """Whether no byte is buffered nor arrives within QUIET seconds."""
        if self.pending:
            return False
        self.sock.settimeout(QUIET)
        try:
            self.sock.recv(4096, socket.MSG_PEEK)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(10)
        return False

    def start_tls(self, context: ssl.SSLContext) -> None:
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def rest(self) -> bytes:
        """Everything until the server closes the connection."""
        data = self.pending
        while True:
            chunk = self.sock.recv(4096)
            if not chunk:
                return data
            data += chunk

    def close(self) -> None:
        self.sock.close()


def in_thread(f, *args):
    return threads.deferToThread(f, *args)


class RawSocketTests(TLSTestCase):
    """The STLS rules and the plaintext policy, checked byte by byte on a real socket."""

    def test_pipelined_commands_after_stls_are_dropped(self):
        """CAPA sent in the same packet as STLS is answered neither in clear nor inside TLS."""

        def session():
            raw = Raw(self.live.port)
            try:
                raw.line()
                raw.send(b"STLS\r\nCAPA\r\n")
                begin = raw.line()
                quiet_in_clear = raw.nothing_more()
                raw.start_tls(self.context())
                first = raw.command(b"NOOP")
                raw.send(b"QUIT\r\n")
                rest = raw.rest()
            finally:
                raw.close()
            return begin, quiet_in_clear, first, rest

        def check(result):
            begin, quiet_in_clear, first, rest = result
            self.assertEqual(begin, Reply.BEGIN_TLS)
            self.assertTrue(quiet_in_clear, "bytes arrived in clear after +OK to STLS")
            # NOOP is a TRANSACTION command: before login its reply is this -ERR.
            self.assertEqual(first, Reply.WRONG_STATE)
            self.assertEqual(rest, Reply.BYE + b"\r\n")

        return in_thread(session).addCallback(check)

    def test_stls_refused_once_secure_or_logged_in(self):
        """STLS inside TLS gets -ERR, and so does STLS after login on the POP3S port."""

        def session():
            upgraded = Raw(self.live.port)
            secure = Raw(self.live.pop3s_port)
            try:
                upgraded.line()
                upgraded.command(b"STLS")
                upgraded.start_tls(self.context())
                again = upgraded.command(b"STLS")
                secure.start_tls(self.context())
                secure.line()
                secure.command(b"USER alice")
                secure.command(b"PASS secret")
                in_transaction = secure.command(b"STLS")
                still = secure.command(b"STAT")
            finally:
                upgraded.close()
                secure.close()
            return again, in_transaction, still

        def check(result):
            again, in_transaction, still = result
            self.assertEqual(again, Reply.ALREADY_TLS)
            self.assertEqual(in_transaction, Reply.WRONG_STATE)
            self.assertEqual(still, b"+OK 1 %d" % len(live.wire(MESSAGE)))

        return in_thread(session).addCallback(check)

    def test_plaintext_refused(self):
        """Without TLS from an untrusted address, CAPA hides USER and USER/PASS get
        -ERR [AUTH] with a hint to use STLS."""

        def session():
            raw = Raw(self.live.port)
            try:
                raw.line()
                raw.send(b"CAPA\r\n")
                caps = []
                while (line := raw.line()) != b".":
                    caps.append(line)
                user = raw.command(b"USER alice")
                password = raw.command(b"PASS secret")
                raw.command(b"QUIT")
            finally:
                raw.close()
            return caps, user, password

        def check(result):
            caps, user, password = result
            self.assertIn(b"STLS", caps)
            self.assertNotIn(b"USER", caps)
            for reply in (user, password):
                self.assertTrue(reply.startswith(b"-ERR [AUTH] "), reply)
                self.assertIn(b"STLS", reply)

        return in_thread(session).addCallback(check)

    @defer.inlineCallbacks
    def test_failed_handshake(self):
        """Clear text after STLS fails the handshake, which is logged with the peer, while
        another session on the server goes on."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        other = yield in_thread(Raw, self.live.pop3s_port)
        self.addCleanup(other.close)
        yield in_thread(other.start_tls, self.context())
        yield in_thread(other.line)
        yield in_thread(other.command, b"USER alice")
        yield in_thread(other.command, b"PASS secret")

        def broken():
            raw = Raw(self.live.port)
            try:
                raw.line()
                raw.command(b"STLS")
                raw.send(b"USER alice\r\nPASS secret\r\n")
                return raw.rest()
            except ConnectionResetError:
                return b""
            finally:
                raw.close()

        rest = yield in_thread(broken)
        self.assertNotIn(b"+OK", rest)
        for _ in range(100):
            failures = [e for e in observer if e.get("log_format", "").startswith(TLS_FAILED)]
            if failures:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(failures[0]["peer"], "127.0.0.1")
        self.assertEqual(
            (yield in_thread(other.command, b"STAT")), b"+OK 1 %d" % len(live.wire(MESSAGE))
        )
        self.assertTrue((yield in_thread(other.command, b"QUIT")).startswith(b"+OK"))


class PlaintextPolicyTests(TLSTestCase):
    """Legacy clients: plaintext logins when the configuration allows them."""

    server_options = {"auth_trusted_networks": (), "auth_allow_plaintext": True}

    def test_allow_plaintext(self):
        """With allow_plaintext, USER/PASS log in without TLS and CAPA lists USER."""

        def session():
            client = poplib.POP3("127.0.0.1", self.live.port, timeout=10)
            try:
                caps = self.capa(client)
                client.user("alice")
                reply = client.pass_("secret")
                client.quit()
            finally:
                client.close()
            return caps, reply

        def check(result):
            caps, reply = result
            self.assertIn("USER", caps)
            self.assertTrue(reply.startswith(b"+OK"), reply)

        return in_thread(session).addCallback(check)


class TrustedNetworkTests(TLSTestCase):
    """The default trusted networks: loopback may log in without TLS."""

    server_options: dict = {}

    def test_loopback_trusted(self):
        """From 127.0.0.1 with the default trusted networks, USER/PASS work in clear."""

        def session():
            client = poplib.POP3("127.0.0.1", self.live.port, timeout=10)
            try:
                client.user("alice")
                reply = client.pass_("secret")
                client.quit()
            finally:
                client.close()
            return reply

        return in_thread(session).addCallback(
            lambda reply: self.assertTrue(reply.startswith(b"+OK"), reply)
        )


class CurlTests(TLSTestCase):
    """curl: --ssl-reqd on pop3:// (STLS) and pop3s://."""

    def curl(self, scheme: str, port: int, *options: str):
        curl = live.require_client("curl")
        argv = [
            curl, "-s", "-S", "--noproxy", "*", "--max-time", "20", "--cacert", self.ca,
            "--resolve", f"localhost:{port}:127.0.0.1", "-u", "alice:secret", *options,
            f"{scheme}://localhost:{port}/1",
        ]  # fmt: skip
        return live.run_program(argv, env=self.env())

    @defer.inlineCallbacks
    def test_stls(self):
        """curl --ssl-reqd upgrades pop3:// with STLS and retrieves the message."""
        ran = yield self.curl("pop3", self.live.port, "--ssl-reqd")
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(ran.out, live.received_form(MESSAGE))
        self.assertTrue(self.live.server.client_bytes[0].startswith(b"CAPA\r\nSTLS\r\n"))

    @defer.inlineCallbacks
    def test_pop3s(self):
        """curl retrieves over pop3:// on the POP3S port."""
        ran = yield self.curl("pop3s", self.live.pop3s_port)
        self.assertEqual(ran.code, 0, ran.err)
        self.assertEqual(ran.out, live.received_form(MESSAGE))

    @defer.inlineCallbacks
    def test_untrusted_certificate(self):
        """Against another CA, curl refuses the server: the tests do verify certificates."""
        self.ca = os.path.join(self.work, "other-ca.pem")
        from tests.tlscerts import Authority, write_certs

        write_certs(self.ca, Authority.create().cert)
        ran = yield self.curl("pop3s", self.live.pop3s_port)
        self.assertNotEqual(ran.code, 0)
        self.assertEqual(ran.out, b"")


class ResumptionTests(TLSTestCase):
    """openssl s_client -sess_out, then -sess_in: the second connection resumes the first's
    session, with TLS 1.3 tickets and TLS 1.2 alike, on POP3S and after STLS."""

    def s_client(self, port: int, version: str, *session: str, starttls: bool = False):
        openssl = live.require_client("openssl")
        command = [
            openssl, "s_client", f"-{version}", "-connect", f"127.0.0.1:{port}",
            "-servername", "localhost", "-CAfile", self.ca, "-verify_return_error",
            "-ign_eof", *(["-starttls", "pop3"] if starttls else []), *session,
        ]  # fmt: skip
        # QUIT at once; -ign_eof waits for the server's +OK and close, tickets included.
        argv = ["sh", "-c", 'printf "QUIT\\r\\n" | "$@"', "s_client", *command]
        return live.run_program(argv, env=self.env())

    @defer.inlineCallbacks
    def resumes(self, version: str, starttls: bool = False):
        port = self.live.port if starttls else self.live.pop3s_port
        saved = os.path.join(self.work, f"session-{version}")
        first = yield self.s_client(port, version, "-sess_out", saved, starttls=starttls)
        self.assertEqual(first.code, 0, first.err)
        self.assertIn(b"\nNew, ", first.out)
        self.assertIn(b"+OK", first.out)
        for _ in range(3):
            again = yield self.s_client(port, version, "-sess_in", saved, starttls=starttls)
            self.assertEqual(again.code, 0, again.err)
            self.assertIn(b"\nReused, ", again.out)
            self.assertIn(b"Verify return code: 0 (ok)", again.out)

    def test_tls13_ticket(self):
        """A TLS 1.3 ticket from one POP3S connection resumes the next ones."""
        return self.resumes("tls1_3")

    def test_tls12_session(self):
        """A TLS 1.2 session resumes too."""
        return self.resumes("tls1_2")

    def test_after_stls(self):
        """STLS on the POP3 port resumes as POP3S does."""
        return self.resumes("tls1_3", starttls=True)


class FetchmailTests(TLSTestCase):
    """fetchmail: --ssl (POP3S) and --sslproto with STLS, checking the certificate."""

    def setUp(self):
        return super().setUp().addCallback(lambda _: self.write_config())

    def write_config(self):
        self.out = os.path.join(self.work, "out")
        os.makedirs(self.out)
        self.mda = os.path.join(self.work, "mda")
        with open(self.mda, "w") as f:
            f.write(f'#!/bin/sh\nexec cat > "$(mktemp {self.out}/msg.XXXXXX)"\n')
        os.chmod(self.mda, 0o755)

    def fetchmail(self, port: int, *options: str):
        fetchmail = live.require_client("fetchmail")
        rc = os.path.join(self.work, "fetchmailrc")
        with open(rc, "w") as f:
            f.write(f'poll localhost protocol pop3 port {port}\n  user "alice" password "secret"\n')
        os.chmod(rc, 0o600)
        argv = [
            fetchmail, "-N", "--pidfile", os.path.join(self.work, "fetchmail.pid"),
            "-f", rc, "--idfile", os.path.join(self.work, "ids"),
            "--mda", self.mda, "--nokeep", "--sslcertck", "--sslcertfile", self.ca, *options,
        ]  # fmt: skip
        return live.run_program(argv, env=self.env())

    def fetched(self) -> list[bytes]:
        found = []
        for name in os.listdir(self.out):
            with open(os.path.join(self.out, name), "rb") as f:
                found.append(f.read().split(b"\n", 1)[1])  # without fetchmail's Received line
        return found

    def assert_fetched(self) -> None:
        self.assertEqual(len(self.fetched()), 1)
        self.assertTrue(self.fetched()[0].endswith(MESSAGE), self.fetched()[0])

    @defer.inlineCallbacks
    def test_ssl(self):
        """fetchmail --ssl fetches from the POP3S port."""
        ran = yield self.fetchmail(self.live.pop3s_port, "--ssl")
        self.assertEqual(ran.code, 0, ran.err)
        self.assert_fetched()

    @defer.inlineCallbacks
    def test_stls(self):
        """fetchmail --sslproto tls1.2+ upgrades with STLS and fetches."""
        ran = yield self.fetchmail(self.live.port, "--sslproto", "tls1.2+")
        self.assertEqual(ran.code, 0, ran.err)
        self.assert_fetched()
        self.assertIn(b"STLS\r\n", self.live.server.client_bytes[0])


class GetmailTests(TLSTestCase):
    """getmail6's SimplePOP3SSLRetriever with ca_certs, run as an unprivileged user."""

    @defer.inlineCallbacks
    def test_pop3s(self):
        """getmail fetches over POP3S, verifying the certificate for localhost."""
        getmail = live.require_client("getmail")
        # getmail refuses to deliver as root, and nobody cannot enter _trial_temp.
        directory = tempfile.mkdtemp(prefix="popserv-getmail-tls-")
        self.addCleanup(shutil.rmtree, directory, True)
        os.chmod(directory, 0o755)
        maildir = os.path.join(directory, "Maildir")
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(maildir, sub))
        os.makedirs(os.path.join(directory, "state"))
        ca = shutil.copy(self.ca, os.path.join(directory, "ca.pem"))
        rc = os.path.join(directory, "getmailrc")
        with open(rc, "w") as f:
            f.write(
                "[retriever]\ntype = SimplePOP3SSLRetriever\nserver = localhost\n"
                f"port = {self.live.pop3s_port}\nusername = alice\npassword = secret\n"
                f"ca_certs = {ca}\n"
                f"\n[destination]\ntype = Maildir\npath = {maildir}/\n"
                "\n[options]\ndelete = true\nreceived = false\ndelivered_to = false\n"
            )
        argv = [getmail, "--getmaildir", os.path.join(directory, "state"), "--rcfile", rc]
        env = dict(self.env(), HOME=directory)
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            for parent, dirs, files in os.walk(directory):
                for name in [parent, *(os.path.join(parent, n) for n in dirs + files)]:
                    os.chown(name, nobody.pw_uid, nobody.pw_gid)
            argv = [
                live.require_client("setpriv"), f"--reuid={nobody.pw_uid}",
                f"--regid={nobody.pw_gid}", "--clear-groups", *argv,
            ]  # fmt: skip
        ran = yield live.run_program(argv, env=env)
        self.assertEqual(ran.code, 0, ran.out + ran.err)
        [name] = os.listdir(os.path.join(maildir, "new"))
        with open(os.path.join(maildir, "new", name), "rb") as f:
            self.assertTrue(f.read().endswith(MESSAGE))
        yield self.live.server.wait_idle()
        self.assertEqual(self.live.server.stored("alice"), {})


class MpopTests(TLSTestCase):
    """mpop (GnuTLS) with --tls-starttls=on (STLS) and =off (POP3S), trusting the test CA."""

    def mpop(self, port: int, starttls: str):
        mpop = live.require_client("mpop")
        maildir = os.path.join(self.work, "Maildir")
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(maildir, sub), exist_ok=True)
        rc = os.path.join(self.work, "mpoprc")
        with open(rc, "w") as f:
            f.write("account default\n")
        os.chmod(rc, 0o600)
        argv = [
            mpop, "-C", rc, "--host=localhost", f"--port={port}", "--tls=on",
            f"--tls-starttls={starttls}", f"--tls-trust-file={self.ca}", "--auth=user",
            "--user=alice", "--passwordeval=echo secret", f"--delivery=maildir,{maildir}",
            f"--uidls-file={self.work}/uidls", "--keep=off",
        ]  # fmt: skip
        return live.run_program(argv, env=self.env())

    def assert_fetched(self) -> None:
        new = os.path.join(self.work, "Maildir", "new")
        [name] = os.listdir(new)
        with open(os.path.join(new, name), "rb") as f:
            self.assertTrue(f.read().endswith(MESSAGE))

    @defer.inlineCallbacks
    def test_starttls(self):
        """mpop --tls-starttls=on logs in after STLS and fetches."""
        ran = yield self.mpop(self.live.port, "on")
        self.assertEqual(ran.code, 0, ran.out + ran.err)
        self.assert_fetched()
        self.assertIn(b"STLS\r\n", self.live.server.client_bytes[0])

    @defer.inlineCallbacks
    def test_pop3s(self):
        """mpop --tls-starttls=off fetches over the POP3S port."""
        ran = yield self.mpop(self.live.pop3s_port, "off")
        self.assertEqual(ran.code, 0, ran.out + ran.err)
        self.assert_fetched()
