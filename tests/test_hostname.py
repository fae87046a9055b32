"""The host name popserv calls itself: the lookup (``hostname -f``, then getfqdn, then
gethostname), and its use in the self-signed certificate, the greetings and the default
local mail domains, up to a real ``twistd popserv`` that sets no ``[server] hostname``.

Everything runs on 127.0.0.1; curl is told to reach the host name there (``--resolve``).
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import smtplib
import socket
import ssl
import stat
import subprocess

from cryptography import x509
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from popserv import admin, hostname, tls
from popserv.config import Config
from popserv.hostname import fqdn, lookup_fqdn
from popserv.recipients import local_domains
from tests.live import require_client
from tests.live_smtp import free_port
from tests.live_twistd import TwistdServer


def answers(text: str):
    """A lookup that gives ``text``."""
    return lambda: text


def fails():
    raise OSError("lookup failed")


def san(cert_path: str) -> x509.SubjectAlternativeName:
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


class LookupTests(SynchronousTestCase):
    def test_hostname_f_first(self):
        """``hostname -f`` answering vm wins over a getfqdn() that says localhost."""
        name = lookup_fqdn(answers("vm\n"), answers("localhost"), answers("vm"))
        self.assertEqual(name, "vm")

    def test_hostname_f_before_getfqdn(self):
        """When both know a name, the one of ``hostname -f`` is taken."""
        name = lookup_fqdn(answers("mail.example.org\n"), answers("other.example"), fails)
        self.assertEqual(name, "mail.example.org")

    def test_falls_back_to_getfqdn(self):
        """``hostname -f`` failing (empty output), getfqdn() gives the name."""
        name = lookup_fqdn(answers(""), answers("mail.example.org"), answers("mail"))
        self.assertEqual(name, "mail.example.org")

    def test_falls_back_to_gethostname(self):
        """Both lookups giving only loopback names or failing, gethostname() is used."""
        name = lookup_fqdn(answers("localhost"), fails, answers("box"))
        self.assertEqual(name, "box")

    def test_localhost_last(self):
        """localhost only when no lookup knows better."""
        name = lookup_fqdn(answers("localhost.localdomain"), answers("localhost"), fails)
        self.assertEqual(name, "localhost")

    def test_junk_is_no_name(self):
        """An error message or several names on the output is passed over."""
        for junk in ("hostname: Name or service not known", "a.example b.example", "-x"):
            name = lookup_fqdn(answers(junk), answers("mail.example.org"), fails)
            self.assertEqual(name, "mail.example.org")

    def test_lower_case_without_final_dot(self):
        """The name is lower-cased and loses a final dot."""
        self.assertEqual(
            lookup_fqdn(answers("Mail.Example.ORG.\n"), fails, fails), "mail.example.org"
        )

    def test_fqdn_once(self):
        """fqdn() looks up once per process: the same answer, from one lookup."""
        self.assertIs(fqdn(), fqdn())
        self.assertEqual(fqdn.cache_info().currsize, 1)


class HostnameCommandTests(SynchronousTestCase):
    """``hostname -f`` run as a program, here a fake one first on PATH."""

    def fake_hostname(self, script: str) -> None:
        bin_dir = os.path.abspath(self.mktemp())
        os.makedirs(bin_dir)
        path = os.path.join(bin_dir, "hostname")
        with open(path, "w") as f:
            f.write("#!/bin/sh\n" + script + "\n")
        os.chmod(path, 0o755)
        self.patch(os, "environ", {**os.environ, "PATH": bin_dir})

    def test_output(self):
        """What the program prints with -f is the answer."""
        self.fake_hostname('[ "$1" = -f ] && echo vm.example.org')
        self.assertEqual(hostname.hostname_f_output().strip(), "vm.example.org")

    def test_exit_status(self):
        """A program that fails gives no name, whatever it printed."""
        self.fake_hostname("echo localhost; exit 1")
        self.assertEqual(hostname.hostname_f_output(), "")

    def test_timeout(self):
        """A program that hangs is given up after the timeout."""
        self.patch(hostname, "HOSTNAME_TIMEOUT", 0.2)
        self.fake_hostname("exec sleep 30")
        self.assertEqual(hostname.hostname_f_output(), "")

    def test_missing(self):
        """No hostname program at all gives no name."""
        self.patch(os, "environ", {**os.environ, "PATH": os.path.abspath(self.mktemp())})
        self.assertEqual(hostname.hostname_f_output(), "")

    def test_real(self):
        """On this machine the answer is what ``hostname -f`` prints, or a fallback."""
        try:
            printed = subprocess.run(
                ["hostname", "-f"], capture_output=True, text=True, timeout=5, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            printed = ""
        if printed and printed != "localhost":
            self.assertEqual(fqdn(), printed.lower())
        else:
            self.assertEqual(fqdn(), lookup_fqdn(answers(""), socket.getfqdn, socket.gethostname))


class DefaultsTests(SynchronousTestCase):
    def test_config_hostname(self):
        """Without [server] hostname, the server's name is fqdn()."""
        self.assertEqual(Config().hostname, fqdn())

    def test_default_local_domains(self):
        """Empty [smtp] domains: the host name and localhost are local."""
        self.assertEqual(local_domains(Config(hostname="vm")), ("vm", "localhost"))
        self.assertEqual(local_domains(Config()), tuple(dict.fromkeys((fqdn(), "localhost"))))

    def test_gencert_default(self):
        """popserv gencert without --hostname or --config makes the certificate for fqdn()."""
        directory = os.path.abspath(self.mktemp())
        with contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(admin.main(["gencert", "--dir", directory]), 0)
        names = san(tls.self_signed_paths(directory)[0]).get_values_for_type(x509.DNSName)
        self.assertEqual(names[0], fqdn())


class SelfSignedNameTests(SynchronousTestCase):
    def setUp(self):
        self.directory = os.path.join(os.path.abspath(self.mktemp()), "tls")
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def renewals(self) -> list[dict]:
        return [e for e in self.observer if e.get("log_format", "").startswith("tls.self_signed_")]

    def test_names_short_host(self):
        """A certificate for vm names vm, localhost, 127.0.0.1 and ::1."""
        cert_path, _ = tls.generate_self_signed("vm", self.directory)
        names = san(cert_path)
        self.assertEqual(names.get_values_for_type(x509.DNSName), ["vm", "localhost"])
        self.assertEqual(
            names.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )

    def test_names_host(self):
        """names_host: a DNS name in any case, or an IP address, of the subjectAltName."""
        cert_path, _ = tls.generate_self_signed("vm", self.directory)
        for name in ("vm", "VM", "localhost", "127.0.0.1", "::1"):
            self.assertTrue(tls.names_host(cert_path, name), name)
        for name in ("other.example", "vm.example", "192.0.2.7"):
            self.assertFalse(tls.names_host(cert_path, name), name)

    def test_renewed_for_new_host_name(self):
        """A self-signed certificate of an earlier host name is made again, with a warning."""
        old_cert, _ = tls.generate_self_signed("localhost", self.directory)
        old = tls.fingerprint(old_cert)
        loaded = tls.load_or_create(Config(hostname="vm", tls_self_signed_dir=self.directory))
        self.assertEqual(loaded.cert_path, old_cert)
        self.assertNotEqual(loaded.fingerprint, old)
        self.assertIn("vm", san(old_cert).get_values_for_type(x509.DNSName))
        [renewed] = self.renewals()
        self.assertEqual(renewed["log_level"], LogLevel.warn)
        self.assertEqual((renewed["old_fingerprint"], renewed["hostname"]), (old, "vm"))
        self.assertEqual(
            stat.S_IMODE(os.stat(tls.self_signed_paths(self.directory)[1]).st_mode), 0o600
        )

    def test_kept_when_it_names_the_host(self):
        """A self-signed certificate that names the host stays, without a renewal."""
        cert_path, _ = tls.generate_self_signed("vm", self.directory)
        before = tls.fingerprint(cert_path)
        loaded = tls.load_or_create(Config(hostname="vm", tls_self_signed_dir=self.directory))
        self.assertEqual(loaded.fingerprint, before)
        self.assertEqual(self.renewals(), [])

    def test_configured_certificate_never_replaced(self):
        """A configured [tls] cert is served even when it names another host."""
        cert_path, key_path = tls.generate_self_signed("other.example", self.directory)
        before = tls.fingerprint(cert_path)
        config = Config(hostname="vm", tls_cert=cert_path, tls_key=key_path)
        self.assertEqual(tls.load_or_create(config).fingerprint, before)
        self.assertEqual(tls.fingerprint(cert_path), before)


class LiveHostnameTests(SynchronousTestCase):
    """A real twistd without [server] hostname or [smtp] domains, reached by the host name."""

    def setUp(self):
        self.name = fqdn()
        self.pop3s_port = free_port()
        self.server = TwistdServer(
            self,
            {"alice": "secret"},
            smtp=True,
            settings={
                "server": {"hostname": None},
                "pop3s": {"listen": f"tcp:{self.pop3s_port}:interface=127.0.0.1"},
                "smtp": {"domains": None},
            },
        )
        self.server.start()
        self.cert_path = os.path.join(self.server.root, "tls", "cert.pem")

    def tls_greeting(self, server_name: str) -> bytes:
        context = ssl.create_default_context(cafile=self.cert_path)
        with socket.create_connection(("127.0.0.1", self.pop3s_port), 10) as raw:
            with context.wrap_socket(raw, server_hostname=server_name) as conn:
                return conn.recv(100)

    def test_certificate_verifies_by_host_name(self):
        """Python's ssl, trusting the self-signed certificate, accepts it for the host name,
        for localhost, and for 127.0.0.1, and refuses it for another name."""
        for name in (self.name, "localhost", "127.0.0.1"):
            self.assertTrue(self.tls_greeting(name).startswith(b"+OK"), name)
        with self.assertRaises(ssl.SSLCertVerificationError):
            self.tls_greeting("other.invalid")

    def test_curl_by_host_name(self):
        """curl --cacert, told the host name is at 127.0.0.1, retrieves over POP3S from
        pop3s://<host name>/ a message sent to alice@<host name>."""
        curl = require_client("curl")
        with smtplib.SMTP("127.0.0.1", self.server.smtp_port, timeout=10) as client:
            client.sendmail("s@remote.example", [f"alice@{self.name}"], b"\r\nby name\r\n")
        port = self.pop3s_port
        done = subprocess.run(
            [curl, "-sS", "--max-time", "20", "--cacert", self.cert_path]
            + ["--resolve", f"{self.name}:{port}:127.0.0.1"]
            + [f"pop3s://alice:secret@{self.name}:{port}/1"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(f"by {self.name} (popserv)", done.stdout)
        self.assertEqual(done.stdout.splitlines()[-1], "by name")

    def test_mail_to_host_name_accepted(self):
        """The SMTP greeting names the host; mail to alice@<host name> is delivered,
        mail to another domain is refused as relaying."""
        with smtplib.SMTP(local_hostname="client.test", timeout=10) as client:
            code, banner = client.connect("127.0.0.1", self.server.smtp_port)
            self.assertEqual((code, banner.split()[0]), (220, self.name.encode()))
            self.assertEqual(client.ehlo()[0], 250)
            self.assertEqual(client.mail("sender@remote.example")[0], 250)
            self.assertEqual(client.rcpt(f"alice@{self.name}")[0], 250)
            self.assertEqual(client.rcpt("alice@other.example")[0], 550)
            self.assertEqual(client.data(b"Subject: to the host name\r\n\r\nhello\r\n")[0], 250)
        self.assertEqual(len(os.listdir(self.server.maildir("alice", "new"))), 1)
