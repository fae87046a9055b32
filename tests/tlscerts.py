"""TLS for tests: a CA and server certificates made at test time, and a loopback TLS server.

``start_tls_server`` is ``tests.live.start_server`` with STLS on and one POP3S listener,
both on 127.0.0.1 port 0.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, endpoints, reactor, task
from twisted.protocols.tls import TLSMemoryBIOFactory

from popserv.tls import ReloadableTLS
from tests import live


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key, days: int = 30):
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _ca_extensions(builder, key, issuer_key):
    return (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )


@dataclass
class Authority:
    """A certificate authority that signs server certificates."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, common_name: str = "popserv test CA") -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = _builder(common_name, _name(common_name), key.public_key(), days=60)
        cert = _ca_extensions(builder, key, key).sign(key, hashes.SHA256())
        return cls(cert, key)

    def intermediate(self, common_name: str = "popserv test intermediate") -> Authority:
        """A CA signed by this one."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = _builder(common_name, self.cert.subject, key.public_key())
        cert = _ca_extensions(builder, key, self.key).sign(self.key, hashes.SHA256())
        return Authority(cert, key)

    def server(
        self, names: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1",)
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A server certificate for ``names`` and ``ips``, and its key."""
        key = ec.generate_private_key(ec.SECP256R1())
        san = [x509.DNSName(n) for n in names] + [
            x509.IPAddress(ipaddress.ip_address(i)) for i in ips
        ]
        cert = (
            _builder(names[0], self.cert.subject, key.public_key())
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert, key


def write_certs(path: str, *certs: x509.Certificate) -> str:
    with open(path, "wb") as f:
        for cert in certs:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
    return path


def write_key(path: str, key) -> str:
    with open(path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return path


@dataclass
class PKI:
    """Files of a test CA and a server certificate for localhost signed by it."""

    directory: str
    ca_path: str
    cert_path: str
    key_path: str
    authority: Authority
    fingerprint: str


def make_pki(directory: str, *, intermediate: bool = False) -> PKI:
    """Write ca.pem, cert.pem (server certificate, then any intermediate) and key.pem."""
    os.makedirs(directory, exist_ok=True)
    root = Authority.create()
    signer = root.intermediate() if intermediate else root
    cert, key = signer.server()
    chain = (cert, signer.cert) if intermediate else (cert,)
    return PKI(
        directory=directory,
        ca_path=write_certs(os.path.join(directory, "ca.pem"), root.cert),
        cert_path=write_certs(os.path.join(directory, "cert.pem"), *chain),
        key_path=write_key(os.path.join(directory, "key.pem"), key),
        authority=root,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(":").upper(),
    )


@dataclass
class TLSServer:
    """A live popserv offering STLS on ``server.port`` and POP3S on ``pop3s_port``."""

    server: live.LiveServer
    pop3s_port: int
    tls: ReloadableTLS
    pki: PKI

    @property
    def port(self) -> int:
        return self.server.port


@defer.inlineCallbacks
def start_tls_server(testcase, pki: PKI | None = None, **config_overrides):
    """``live.start_server`` with the PKI's certificate for STLS and a POP3S listener."""
    if pki is None:
        pki = make_pki(os.path.abspath(testcase.mktemp()))
    tls = ReloadableTLS(pki.cert_path, pki.key_path)
    server = yield live.start_server(testcase, **config_overrides)
    server.factory.tls = tls
    tls_factory = TLSMemoryBIOFactory(tls, False, server.factory)
    endpoint = endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1")
    port = yield endpoint.listen(tls_factory)
    testcase.addCleanup(_shut_down, port, tls_factory)
    return TLSServer(server, port.getHost().port, tls, pki)


@defer.inlineCallbacks
def _shut_down(port, tls_factory: TLSMemoryBIOFactory):
    """Stop listening, give clients time to close, then abort what is left open."""
    yield port.stopListening()
    for _ in range(int(live.CLOSE_WAIT / 0.05)):
        if not tls_factory.protocols:
            return
        yield task.deferLater(reactor, 0.05, lambda: None)
    for protocol in list(tls_factory.protocols):
        protocol.transport.abortConnection()
    yield task.deferLater(reactor, 0, lambda: None)
