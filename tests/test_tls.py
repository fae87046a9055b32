"""Tests for popserv.tls: loading, self-signed certificates, fingerprints and reloading,
and the TLS wiring of the service, the twistd options and ``popserv gencert``."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import ipaddress
import os
import signal
import socket
import ssl
import stat

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL
from twisted.internet import defer, reactor, task, threads
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from popserv import admin, service, tap, tls
from popserv.config import Config, ConfigError, config_from_string
from tests.tlscerts import Authority, make_pki, start_tls_server, write_certs, write_key


def sha256_fingerprint(der: bytes) -> str:
    """The fingerprint as ``openssl x509 -fingerprint -sha256`` prints it."""
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def file_fingerprint(path: str) -> str:
    """The fingerprint of the first certificate of a PEM file."""
    end = "-----END CERTIFICATE-----"
    with open(path, encoding="ascii") as f:
        first = f.read().split(end)[0] + end
    return sha256_fingerprint(ssl.PEM_cert_to_DER_cert(first))


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


def events(observer, prefix: str) -> list[dict]:
    return [e for e in observer if e.get("log_format", "").startswith(prefix)]


class LoadTests(SynchronousTestCase):
    def setUp(self):
        self.pki = make_pki(os.path.abspath(self.mktemp()), intermediate=True)

    def test_loads_chain_and_key(self):
        """A PEM chain and its key give a connection creator for the first certificate."""
        loaded = tls.ReloadableTLS(self.pki.cert_path, self.pki.key_path)
        self.assertTrue(verifyObject(IOpenSSLServerConnectionCreator, loaded))
        self.assertEqual(loaded.fingerprint, self.pki.fingerprint)
        self.assertIsInstance(loaded.getContext(), SSL.Context)
        self.assertIsInstance(loaded.serverConnectionForTLS(None), SSL.Connection)
        self.assertEqual(len(loaded.options.extraCertChain), 1)

    def test_key_mismatch(self):
        """A key of another certificate is a CertificateError naming both files."""
        _, other_key = Authority.create().server()
        key_path = write_key(os.path.join(self.pki.directory, "other.pem"), other_key)
        with self.assertRaises(tls.CertificateError) as cm:
            tls.load_options(self.pki.cert_path, key_path)
        self.assertIn(key_path, str(cm.exception))
        self.assertIn(self.pki.cert_path, str(cm.exception))
        self.assertIn("does not match", str(cm.exception))

    def test_missing_file(self):
        """A missing file is a CertificateError naming it and the real cause (a
        CertificateError is a ValueError too, which once became "no PEM certificate")."""
        missing = os.path.join(self.pki.directory, "nothing.pem")
        with self.assertRaises(tls.CertificateError) as cm:
            tls.load_options(missing, self.pki.key_path)
        self.assertEqual(
            str(cm.exception),
            f"{missing}: cannot read the TLS certificate: No such file or directory",
        )
        with self.assertRaises(tls.CertificateError) as cm:
            tls.load_options(self.pki.cert_path, missing)
        self.assertEqual(
            str(cm.exception), f"{missing}: cannot read the TLS key: No such file or directory"
        )
        with self.assertRaises(tls.CertificateError) as cm:
            tls.fingerprint(missing)
        self.assertIn("cannot read the TLS certificate", str(cm.exception))

    def test_not_pem(self):
        """A certificate file without a PEM certificate, or a key file without a key, is refused."""
        junk = os.path.join(self.pki.directory, "junk.pem")
        with open(junk, "w") as f:
            f.write("not a certificate\n")
        with self.assertRaises(tls.CertificateError) as cm:
            tls.load_options(junk, self.pki.key_path)
        self.assertIn(junk, str(cm.exception))
        with self.assertRaises(tls.CertificateError) as cm:
            tls.load_options(self.pki.cert_path, self.pki.cert_path)
        self.assertIn("no PEM private key", str(cm.exception))

    def test_encrypted_key(self):
        """A passphrase-protected key is refused with a message saying so."""
        with open(self.pki.key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        encrypted = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
        with open(self.pki.key_path, "wb") as f:
            f.write(encrypted)
        with self.assertRaises(tls.CertificateError) as cm:
            tls.load_options(self.pki.cert_path, self.pki.key_path)
        self.assertIn("encrypted", str(cm.exception))

    def test_expired_certificate_warns(self):
        """An expired certificate still loads, with a warning naming the file."""
        authority = Authority.create()
        cert, key = authority.server()
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2)
        expired = (
            x509.CertificateBuilder()
            .subject_name(cert.subject)
            .issuer_name(cert.issuer)
            .public_key(cert.public_key())
            .serial_number(1)
            .not_valid_before(past - datetime.timedelta(days=1))
            .not_valid_after(past)
            .sign(authority.key, hashes.SHA256())
        )
        cert_path = write_certs(os.path.join(self.pki.directory, "old.pem"), expired)
        key_path = write_key(os.path.join(self.pki.directory, "old-key.pem"), key)
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        tls.load_options(cert_path, key_path)
        [warning] = events(observer, "tls.expired")
        self.assertEqual(warning["log_level"], LogLevel.warn)
        self.assertEqual(warning["cert"], cert_path)

    def test_fingerprint(self):
        """fingerprint() is the colon-separated SHA-256 of the first certificate's DER."""
        self.assertEqual(tls.fingerprint(self.pki.cert_path), file_fingerprint(self.pki.cert_path))
        self.assertRegex(tls.fingerprint(self.pki.cert_path), r"^([0-9A-F]{2}:){31}[0-9A-F]{2}$")


class SelfSignedTests(SynchronousTestCase):
    def setUp(self):
        self.directory = os.path.join(os.path.abspath(self.mktemp()), "tls")

    def load(self, path: str) -> x509.Certificate:
        with open(path, "rb") as f:
            return x509.load_pem_x509_certificate(f.read())

    def test_files_and_modes(self):
        """The key is written mode 0600 in a new directory of mode 0700, beside the certificate."""
        cert_path, key_path = tls.generate_self_signed("mail.example.org", self.directory)
        self.assertEqual((cert_path, key_path), tls.self_signed_paths(self.directory))
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o700)
        self.assertEqual(sorted(os.listdir(self.directory)), ["cert.pem", "key.pem"])
        tls.load_options(cert_path, key_path)

    def test_names(self):
        """The certificate names the host, localhost, 127.0.0.1 and ::1, for server use only."""
        cert_path, _ = tls.generate_self_signed("mail.example.org", self.directory)
        cert = self.load(cert_path)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["mail.example.org", "localhost"])
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        self.assertFalse(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        usage_ = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(usage_), [ExtendedKeyUsageOID.SERVER_AUTH])
        cert.verify_directly_issued_by(cert)
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertLessEqual(lifetime, datetime.timedelta(days=826))

    def test_ip_hostname(self):
        """A host name that is an IP address goes in as an IP address, not a DNS name."""
        cert_path, _ = tls.generate_self_signed("192.0.2.7", self.directory)
        san = self.load(cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(san.value.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertIn(
            ipaddress.ip_address("192.0.2.7"), san.value.get_values_for_type(x509.IPAddress)
        )

    def test_load_or_create_once(self):
        """Without a configured pair, one self-signed pair is made, then reused, with a warning."""
        config = Config(hostname="mail.example.org", tls_self_signed_dir=self.directory)
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        first = tls.load_or_create(config)
        second = tls.load_or_create(config)
        self.assertTrue(first.self_signed)
        self.assertEqual(first.fingerprint, second.fingerprint)
        self.assertEqual(first.fingerprint, file_fingerprint(first.cert_path))
        self.assertEqual(len(events(observer, "tls.generated")), 1)
        warnings = events(observer, "tls.self_signed")
        self.assertEqual([w["log_level"] for w in warnings], [LogLevel.warn] * 2)
        self.assertEqual(warnings[0]["fingerprint"], first.fingerprint)

    def test_load_or_create_configured(self):
        """A configured pair is loaded as it is, and no self-signed pair is made."""
        pki = make_pki(os.path.abspath(self.mktemp()))
        config = Config(
            tls_cert=pki.cert_path, tls_key=pki.key_path, tls_self_signed_dir=self.directory
        )
        loaded = tls.load_or_create(config)
        self.assertFalse(loaded.self_signed)
        self.assertEqual(loaded.fingerprint, pki.fingerprint)
        self.assertFalse(os.path.exists(self.directory))

    def test_cert_without_key(self):
        """A certificate without a key (or the reverse) is a configuration error."""
        for config in (Config(tls_cert="/c.pem"), Config(tls_key="/k.pem")):
            self.assertRaises(ConfigError, tls.load_or_create, config)
        with self.assertRaises(ConfigError) as cm:
            config_from_string("[tls]\ncert = /etc/c.pem\n", "popserv.ini")
        self.assertIn("popserv.ini", str(cm.exception))
        self.assertIn("[tls]", str(cm.exception))


class ReloadTests(SynchronousTestCase):
    def setUp(self):
        self.pki = make_pki(os.path.abspath(self.mktemp()))
        self.tls = tls.ReloadableTLS(self.pki.cert_path, self.pki.key_path)
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def test_reload_switches(self):
        """reload() reads new files: the new certificate serves from then on."""
        new = make_pki(os.path.abspath(self.mktemp()))
        os.replace(new.cert_path, self.pki.cert_path)
        os.replace(new.key_path, self.pki.key_path)
        old_context = self.tls.getContext()
        self.assertTrue(self.tls.reload())
        self.assertEqual(self.tls.fingerprint, new.fingerprint)
        self.assertIsNot(self.tls.getContext(), old_context)
        self.assertIs(self.tls.serverConnectionForTLS(None).get_context(), self.tls.getContext())
        self.assertEqual(events(self.observer, "tls.reloaded")[0]["fingerprint"], new.fingerprint)

    def test_bad_file_keeps_old(self):
        """A broken certificate file is logged as an error and the old context stays."""
        context = self.tls.getContext()
        with open(self.pki.cert_path, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\ntruncated\n")
        self.assertFalse(self.tls.reload())
        self.assertIs(self.tls.getContext(), context)
        self.assertEqual(self.tls.fingerprint, self.pki.fingerprint)
        [error] = events(self.observer, "tls.reload_failed")
        self.assertEqual(error["log_level"], LogLevel.error)
        self.assertIn(self.pki.cert_path, error["error"])

    def test_half_replaced_pair_keeps_old(self):
        """A new certificate whose key is not there yet keeps the old pair in service."""
        new = make_pki(os.path.abspath(self.mktemp()))
        context = self.tls.getContext()
        os.replace(new.cert_path, self.pki.cert_path)
        self.assertFalse(self.tls.reload())
        self.assertIs(self.tls.getContext(), context)
        self.assertIn("does not match", events(self.observer, "tls.reload_failed")[0]["error"])


def client_context(ca_path: str | None = None) -> ssl.SSLContext:
    """A client context trusting ``ca_path``, or checking nothing without it."""
    if ca_path is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=ca_path)


class Session:
    """A blocking POP3S client for use in a thread: lines in, lines out."""

    def __init__(self, port: int, context: ssl.SSLContext):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.file = self.sock.makefile("rb")
        self.greeting = self.file.readline()

    @property
    def fingerprint(self) -> str:
        return sha256_fingerprint(self.sock.getpeercert(binary_form=True))

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.file.readline()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class LiveReloadTests(TestCase):
    """Certificates as clients see them, over loopback sockets."""

    timeout = 30

    @defer.inlineCallbacks
    def test_reload_affects_new_connections_only(self):
        """After a reload, new sessions get the new certificate; an open session goes on."""
        live = yield start_tls_server(self)
        context = client_context()
        old = yield threads.deferToThread(Session, live.pop3s_port, context)
        self.addCleanup(old.close)
        self.assertEqual(old.fingerprint, live.pki.fingerprint)

        new_pki = make_pki(os.path.abspath(self.mktemp()))
        os.replace(new_pki.cert_path, live.pki.cert_path)
        os.replace(new_pki.key_path, live.pki.key_path)
        self.assertTrue(live.tls.reload())

        new = yield threads.deferToThread(Session, live.pop3s_port, context)
        self.addCleanup(new.close)
        self.assertEqual(new.fingerprint, new_pki.fingerprint)
        self.assertEqual((yield threads.deferToThread(old.command, b"USER alice")), b"+OK\r\n")
        reply = yield threads.deferToThread(old.command, b"PASS secret")
        self.assertTrue(reply.startswith(b"+OK Logged in"), reply)
        self.assertEqual(old.fingerprint, live.pki.fingerprint)
        reply = yield threads.deferToThread(old.command, b"QUIT")
        self.assertTrue(reply.startswith(b"+OK"), reply)

    @defer.inlineCallbacks
    def test_chain_sent(self):
        """The intermediate certificates of the file are sent: a client trusting only the root
        verifies the server."""
        pki = make_pki(os.path.abspath(self.mktemp()), intermediate=True)
        live = yield start_tls_server(self, pki)
        session = yield threads.deferToThread(Session, live.pop3s_port, client_context(pki.ca_path))
        self.addCleanup(session.close)
        self.assertEqual(session.greeting[:3], b"+OK")

    @defer.inlineCallbacks
    def test_tls_1_2_only_forward_secret_aead_suites(self):
        """TLS 1.2 offers ECDHE with AEAD only: static RSA and CBC suites are refused."""
        live = yield start_tls_server(self)

        def connect(ciphers):
            context = client_context()
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.set_ciphers(ciphers + ":@SECLEVEL=0")
            session = Session(live.pop3s_port, context)
            try:
                return session.sock.cipher()[0]
            finally:
                session.close()

        for refused in (
            "AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA:AES256-SHA",
            "ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES256-SHA384",
            "DHE-RSA-AES128-GCM-SHA256",
        ):
            with self.assertRaises(ssl.SSLError, msg=refused):
                yield threads.deferToThread(connect, refused)
        accepted = yield threads.deferToThread(
            connect, "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"
        )
        self.assertIn(accepted, ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256"))

    @defer.inlineCallbacks
    def test_tls_1_2_minimum(self):
        """A TLS 1.2 client is served and a TLS 1.1 client is refused by the server."""
        live = yield start_tls_server(self)
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

        def connect(version):
            context = client_context()
            context.set_ciphers("ALL:@SECLEVEL=0")
            context.minimum_version = context.maximum_version = version
            session = Session(live.pop3s_port, context)
            try:
                return session.sock.version()
            finally:
                session.close()

        version = yield threads.deferToThread(connect, ssl.TLSVersion.TLSv1_2)
        self.assertEqual(version, "TLSv1.2")
        with self.assertRaises(ssl.SSLError):
            yield threads.deferToThread(connect, ssl.TLSVersion.TLSv1_1)
        yield live.server.wait_idle()
        for _ in range(100):
            if events(observer, "pop3.tls_failed"):
                break
            yield sleep(0.02)
        self.assertEqual(events(observer, "pop3.tls_failed")[0]["peer"], "127.0.0.1")


class SighupTests(SynchronousTestCase):
    class Reactor:
        def callFromThread(self, f, *args):
            f(*args)

    def setUp(self):
        original = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, original)
        self.previous = []
        signal.signal(signal.SIGHUP, lambda signum, frame: self.previous.append(signum))
        self.installed_before = signal.getsignal(signal.SIGHUP)
        self.reloads = []
        self.service = service.ReloadOnSIGHUP(lambda: self.reloads.append(1), self.Reactor())

    def test_reloads_and_chains(self):
        """SIGHUP calls reload in the reactor thread and the handler installed before."""
        self.service.startService()
        self.addCleanup(self.service.stopService)
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(self.reloads, [1])
        self.assertEqual(self.previous, [signal.SIGHUP])

    def test_stop_restores(self):
        """Stopping the service puts the previous SIGHUP handler back."""
        self.service.startService()
        self.assertIsNot(signal.getsignal(signal.SIGHUP), self.installed_before)
        self.service.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), self.installed_before)

    def test_not_installed_before_start(self):
        """Building the service installs nothing; only a started service catches SIGHUP."""
        self.assertIs(signal.getsignal(signal.SIGHUP), self.installed_before)


class ServiceTests(SynchronousTestCase):
    """The TLS wiring of popserv.service.make_service, on a memory reactor."""

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.config = Config(
            hostname="mail.example.org",
            mailroot=os.path.join(self.root, "mail"),
            users=os.path.join(self.root, "users"),
            state_dir=os.path.join(self.root, "state"),
            pop3_listen=("tcp:1110",),
            pop3s_listen=("tcp:0:interface=127.0.0.1", "tcp:1995"),
            tls_self_signed_dir=os.path.join(self.root, "tls"),
            smtp_listen=(),
        )

    def make(self, config=None):
        return service.make_service(config or self.config, reactor=MemoryReactorClock())

    def test_pop3s_listeners(self):
        """Each POP3S endpoint gets a named listener wrapping the POP3 factory in TLS."""
        top = self.make()
        pop3 = top.getServiceNamed("pop3-0").factory
        for name in ("pop3s-0", "pop3s-1"):
            factory = top.getServiceNamed(name).factory
            self.assertIsInstance(factory, TLSMemoryBIOFactory)
            self.assertIs(factory.wrappedFactory, pop3)
        self.assertIsInstance(pop3.tls, tls.ReloadableTLS)

    def test_self_signed_on_first_start(self):
        """Without a configured certificate, STLS uses a self-signed one made in the TLS dir."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        top = self.make()
        pop3_tls = top.getServiceNamed("pop3-0").factory.tls
        self.assertEqual(pop3_tls.cert_path, os.path.join(self.root, "tls", "cert.pem"))
        [warning] = events(observer, "tls.self_signed")
        self.assertEqual(warning["fingerprint"], file_fingerprint(pop3_tls.cert_path))

    def test_configured_certificate(self):
        """A configured pair serves STLS and POP3S; nothing self-signed is made."""
        pki = make_pki(os.path.join(self.root, "pki"))
        top = self.make(self.config.replace(tls_cert=pki.cert_path, tls_key=pki.key_path))
        self.assertEqual(top.getServiceNamed("pop3-0").factory.tls.fingerprint, pki.fingerprint)
        self.assertFalse(os.path.exists(os.path.join(self.root, "tls")))

    def test_no_pop3s(self):
        """An empty POP3S list adds no POP3S listener; STLS is still offered."""
        top = self.make(self.config.replace(pop3s_listen=()))
        names = {child.name for child in top}
        self.assertEqual({name for name in names if name and name.startswith("pop")}, {"pop3-0"})
        self.assertIn("tls-reload", names)
        self.assertIsNotNone(top.getServiceNamed("pop3-0").factory.tls)

    def test_sighup_service(self):
        """A ReloadOnSIGHUP service reloads the TLS object the listeners use."""
        top = self.make()
        reloader = top.getServiceNamed("tls-reload")
        self.assertIsInstance(reloader, service.ReloadOnSIGHUP)
        self.assertEqual(reloader._reload, top.getServiceNamed("pop3-0").factory.tls.reload)


def parse(*argv: str) -> Config:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options["popserv_config"]


class OptionsTests(SynchronousTestCase):
    def test_pop3s_replaces(self):
        """Repeated --pop3s options replace [pop3s] listen."""
        config = parse("--pop3s", "tcp:1995:interface=127.0.0.1", "--pop3s", "tcp:995")
        self.assertEqual(config.pop3s_listen, ("tcp:1995:interface=127.0.0.1", "tcp:995"))
        self.assertEqual(parse().pop3s_listen, ("tcp6:995",))

    def test_pop3s_must_be_plain(self):
        """An ssl: POP3S endpoint is refused: popserv adds TLS itself."""
        with self.assertRaises(tap.StartupError) as cm:
            parse("--pop3s", "ssl:995:privateKey=k.pem")
        self.assertIn("plain", str(cm.exception))
        with self.assertRaises(tap.StartupError) as cm:
            parse("--pop3s", "tcp:pop3s")
        self.assertIn("invalid POP3S listener 'tcp:pop3s'", str(cm.exception))

    def test_tls_files(self):
        """--tls-cert and --tls-key set the certificate and key."""
        cert, key = tls.generate_self_signed("localhost", os.path.abspath(self.mktemp()))
        config = parse("--tls-cert", cert, "--tls-key", key)
        self.assertEqual((config.tls_cert, config.tls_key), (cert, key))

    def test_unusable_tls_files(self):
        """A --tls-cert that cannot be read stops the start with the reason, not another."""
        _, key = tls.generate_self_signed("localhost", os.path.abspath(self.mktemp()))
        missing = os.path.abspath("missing.pem")
        with self.assertRaises(tap.StartupError) as cm:
            parse("--tls-cert", missing, "--tls-key", key)
        self.assertEqual(
            cm.exception.problems,
            [
                f"{missing}: cannot read the TLS certificate: No such file or directory; fix: "
                "set [tls] cert (or --tls-cert) to a PEM certificate chain the server can "
                "read, server certificate first"
            ],
        )

    def test_cert_without_key(self):
        """--tls-cert without --tls-key (or the reverse) stops the start saying to give both."""
        for option in ("--tls-cert", "--tls-key"):
            with self.assertRaises(tap.StartupError) as cm:
                parse(option, "/etc/x.pem")
            self.assertIn("together", str(cm.exception))


class GencertTests(SynchronousTestCase):
    def setUp(self):
        self.directory = os.path.join(os.path.abspath(self.mktemp()), "tls")

    def run_admin(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = admin.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_prints_paths_and_fingerprint(self):
        """gencert writes the pair for --hostname and prints both paths and the fingerprint."""
        code, out, _ = self.run_admin(
            "gencert", "--hostname", "mail.example.org", "--dir", self.directory
        )
        self.assertEqual(code, 0)
        cert_path, key_path = tls.self_signed_paths(self.directory)
        self.assertEqual(
            out.splitlines(),
            [
                f"certificate: {cert_path}",
                f"key: {key_path}",
                f"SHA-256 fingerprint: {file_fingerprint(cert_path)}",
            ],
        )
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)

    def test_force(self):
        """An existing pair is kept unless --force, which replaces it."""
        self.run_admin("gencert", "--hostname", "a.example", "--dir", self.directory)
        cert_path, _ = tls.self_signed_paths(self.directory)
        before = file_fingerprint(cert_path)
        code, _, err = self.run_admin("gencert", "--hostname", "b.example", "--dir", self.directory)
        self.assertEqual(code, 1)
        self.assertIn("--force", err)
        self.assertEqual(file_fingerprint(cert_path), before)
        code, _, _ = self.run_admin(
            "gencert", "--hostname", "b.example", "--dir", self.directory, "--force"
        )
        self.assertEqual(code, 0)
        self.assertNotEqual(file_fingerprint(cert_path), before)

    def test_config_names_host_and_dir(self):
        """With --config, the host name and directory come from the file."""
        os.makedirs(os.path.dirname(self.directory))
        path = os.path.join(os.path.dirname(self.directory), "popserv.ini")
        with open(path, "w") as f:
            f.write(f"[server]\nhostname = c.example\n[tls]\nself_signed_dir = {self.directory}\n")
        code, _, _ = self.run_admin("gencert", "--config", path)
        self.assertEqual(code, 0)
        with open(os.path.join(self.directory, "cert.pem"), "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName)[0], "c.example")
