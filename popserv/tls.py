"""Certificates and TLS contexts: load a PEM chain and key, or make a self-signed pair.

``load_or_create`` gives one ``ReloadableTLS`` that both ``TLSMemoryBIOFactory``
(implicit TLS, POP3S) and ``transport.startTLS`` (STLS, STARTTLS) accept; ``reload``
swaps in freshly read files for new connections while open ones keep their own.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.logger import Logger
from zope.interface import implementer

from popserv import ticketkeys
from popserv.config import Config, ConfigError, check_config
from popserv.ticketkeys import TicketKeyRing

log = Logger()

#: TLS 1.2 suites offered: forward secrecy (ECDHE) and AEAD only, as in Mozilla's
#: "intermediate" profile; no static-RSA key exchange, no CBC or SHA-1 MACs.  TLS 1.3
#: suites are all of that kind and are left to OpenSSL.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

#: File names of the self-signed pair inside ``[tls] self_signed_dir``.
SELF_SIGNED_CERT = "cert.pem"
SELF_SIGNED_KEY = "key.pem"
#: Validity of a self-signed certificate; Apple clients refuse server certificates
#: valid for longer than 825 days.
SELF_SIGNED_DAYS = 825


class CertificateError(ConfigError):
    """A certificate or key file that cannot be used, with a message naming the file.

    ``part`` says which setting the fix is about: ``"cert"``, ``"key"``, or ``"pair"``
    when the two files do not go together.
    """

    def __init__(self, message: str, part: str = "pair"):
        super().__init__(message)
        self.part = part


def _read(path: str, what: str, part: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CertificateError(f"{path}: cannot read the {what}: {e.strerror}", part) from None


def _public_bytes(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _certificates(cert_path: str, data: bytes | None = None) -> list[x509.Certificate]:
    """The PEM chain of the file (or ``data``, its bytes read earlier); read first, so that
    "cannot read" is not reported as "no PEM certificate" (CertificateError is a ValueError
    too)."""
    if data is None:
        data = _read(cert_path, "TLS certificate", "cert")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError(f"{cert_path}: no PEM certificate in the file", "cert") from None


def _private_key(key_path: str, data: bytes | None = None):
    if data is None:
        data = _read(key_path, "TLS key", "key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertificateError(f"{key_path}: the private key is encrypted", "key") from None
    except ValueError:
        raise CertificateError(f"{key_path}: no PEM private key in the file", "key") from None
    except UnsupportedAlgorithm as e:
        raise CertificateError(f"{key_path}: a key of a kind not supported: {e}", "key") from None


def load_options(
    cert_path: str,
    key_path: str,
    pem: tuple[bytes, bytes] | None = None,
    ticket_keys: TicketKeyRing | None = None,
) -> CertificateOptions:
    """``CertificateOptions`` (TLS 1.2 at least) for a PEM chain, leaf first, and its key;
    ``pem`` is the two files' bytes when they were read already, ``ticket_keys`` the
    session-ticket keys the context shares with other processes (none: its own)."""
    cert_data, key_data = pem if pem is not None else (None, None)
    chain = _certificates(cert_path, cert_data)
    key = _private_key(key_path, key_data)
    if _public_bytes(key.public_key()) != _public_bytes(chain[0].public_key()):
        raise CertificateError(
            f"{key_path}: the private key does not match the first certificate of {cert_path}"
        )
    if chain[0].not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc):
        log.warn(
            "tls.expired: {cert} expired on {date}",
            cert=cert_path,
            date=chain[0].not_valid_after_utc.isoformat(),
        )
    # cryptography objects, not pyOpenSSL's deprecated X509/PKey wrappers.
    options = CertificateOptions(
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS),
        # A client that polls every few minutes resumes its last session (a ticket, or
        # TLS 1.2's session ID) instead of a full handshake.  Without ``ticket_keys`` the
        # ticket keys are this context's own, made by OpenSSL in memory, and go with it
        # at a reload.
        enableSessions=True,
        enableSessionTickets=True,
    )
    try:
        context = options.getContext()
    except SSL.Error as e:
        raise CertificateError(f"{cert_path}, {key_path}: OpenSSL refuses them: {e}") from None
    if ticket_keys is not None:
        ticketkeys.share(context, ticket_keys)
    return options


def fingerprint(cert_path: str, data: bytes | None = None) -> str:
    """The SHA-256 fingerprint of the file's first certificate (``data``: the file's bytes
    read earlier), as ``AB:CD:...``."""
    return _certificates(cert_path, data)[0].fingerprint(hashes.SHA256()).hex(":").upper()


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableTLS:
    """The server side of TLS for every listener, with files that ``reload`` re-reads.

    A connection takes the context current when it starts and keeps it, so a reload
    changes the certificate for new connections only and drops no session.
    """

    def __init__(
        self,
        cert_path: str,
        key_path: str,
        *,
        self_signed: bool = False,
        pem: tuple[bytes, bytes] | None = None,
        ticket_keys: TicketKeyRing | None = None,
    ):
        """``pem``: the files' bytes, read by a process that could (a supervisor still
        root hands them to its workers); otherwise the files are read here.
        ``ticket_keys``: the workers' shared session-ticket keys, kept at reloads."""
        self.cert_path = cert_path
        self.key_path = key_path
        self.self_signed = self_signed
        self.ticket_keys = ticket_keys
        if pem is None:
            pem = (_read(cert_path, "TLS certificate", "cert"), _read(key_path, "TLS key", "key"))
        #: The certificate chain and key as read at the start or the last reload.
        self.pem = pem
        self.options = load_options(cert_path, key_path, pem, ticket_keys)
        self.fingerprint = fingerprint(cert_path, pem[0])

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self.options.getContext(), None)

    def getContext(self) -> SSL.Context:
        """The current context, for APIs that want an old-style context factory."""
        return self.options.getContext()

    def reload(self) -> bool:
        """Re-read the files; a file that cannot be used is logged and the old one kept."""
        try:
            pem = (
                _read(self.cert_path, "TLS certificate", "cert"),
                _read(self.key_path, "TLS key", "key"),
            )
            options = load_options(self.cert_path, self.key_path, pem, self.ticket_keys)
            new_fingerprint = fingerprint(self.cert_path, pem[0])
        except CertificateError as e:
            log.error(
                "tls.reload_failed: {error}; still serving {fingerprint}",
                error=str(e),
                fingerprint=self.fingerprint,
            )
            return False
        self.pem = pem
        self.options = options
        self.fingerprint = new_fingerprint
        log.info(
            "tls.reloaded: {cert}, SHA-256 fingerprint {fingerprint}",
            cert=self.cert_path,
            fingerprint=self.fingerprint,
        )
        return True


def self_signed_paths(directory: str) -> tuple[str, str]:
    """Where the self-signed certificate and key of ``directory`` are kept."""
    return os.path.join(directory, SELF_SIGNED_CERT), os.path.join(directory, SELF_SIGNED_KEY)


def _san(hostname: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(hostname)))
    except ValueError:
        names.append(x509.DNSName(hostname.encode("idna").decode("ascii")))
    if hostname != "localhost":
        names.append(x509.DNSName("localhost"))
    for address in ("127.0.0.1", "::1"):
        if hostname != address:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
    return names


def names_host(cert_path: str, hostname: str) -> bool:
    """Whether the file's first certificate names ``hostname`` in its subjectAltName."""
    cert = _certificates(cert_path)[0]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    wanted = _san(hostname)[0]
    if isinstance(wanted, x509.IPAddress):
        return wanted.value in san.get_values_for_type(x509.IPAddress)
    return wanted.value.lower() in (name.lower() for name in san.get_values_for_type(x509.DNSName))


def _write_atomically(path: str, data: bytes, mode: int) -> None:
    """Replace ``path``; a file it replaces keeps its owner (the server user's, say)."""
    temp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        _keep_owner(fd, path)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)


def _keep_owner(fd: int, path: str) -> None:
    try:
        old = os.stat(path)
    except FileNotFoundError:
        return
    new = os.fstat(fd)
    if (old.st_uid, old.st_gid) != (new.st_uid, new.st_gid):
        try:
            os.fchown(fd, old.st_uid, old.st_gid)
        except PermissionError:
            pass


def generate_self_signed(hostname: str, directory: str, key=None) -> tuple[str, str]:
    """Make a key (mode 0600; EC P-256 unless ``key`` is given) and a self-signed
    certificate for ``hostname``.

    The certificate also names localhost, 127.0.0.1 and ::1, so local clients that
    check names accept it once they trust it.  Returns ``(cert_path, key_path)``.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    cert_path, key_path = self_signed_paths(directory)
    if key is None:
        key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(_san(hostname)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomically(key_path, key_pem, 0o600)
    _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info(
        "tls.generated: self-signed certificate for {hostname} in {cert}",
        hostname=hostname,
        cert=cert_path,
    )
    return cert_path, key_path


def tls_files(config: Config) -> tuple[str, str, bool]:
    """The certificate and key the server uses, and whether they are the self-signed pair."""
    if config.tls_cert:
        return os.path.abspath(config.tls_cert), os.path.abspath(config.tls_key), False
    cert_path, key_path = self_signed_paths(os.path.abspath(config.tls_self_signed_dir))
    return cert_path, key_path, True


def _fix(error: CertificateError, config: Config) -> str:
    """How the admin makes the files named in ``error`` usable: which setting to change."""
    cert_path, key_path, self_signed = tls_files(config)
    if self_signed:
        return (
            f"remove {cert_path} and {key_path} for a new self-signed pair at the next "
            "start (or run popserv gencert --force), or set [tls] cert and key"
        )
    return {
        "cert": "set [tls] cert (or --tls-cert) to a PEM certificate chain the server can "
        "read, server certificate first",
        "key": "set [tls] key (or --tls-key) to the certificate's unencrypted PEM key, "
        "readable by the server",
    }.get(
        error.part,
        "set [tls] cert and key (or --tls-cert and --tls-key) to a certificate and its own key",
    )


def _load(config: Config) -> ReloadableTLS:
    cert_path, key_path, self_signed = tls_files(config)
    try:
        return ReloadableTLS(cert_path, key_path, self_signed=self_signed)
    except CertificateError as e:
        raise CertificateError(f"{e}; fix: {_fix(e, config)}", e.part) from None


def check_files(config: Config) -> None:
    """Raise CertificateError, one line naming the file and the setting to fix, if the
    server could not use its certificate and key; a self-signed pair not made yet passes.

    ``twistd popserv`` asks this before it starts and ``popserv check`` reports it, in
    the same words.
    """
    if bool(config.tls_cert) != bool(config.tls_key):
        return  # check_config names the missing half
    cert_path, key_path, self_signed = tls_files(config)
    if self_signed and not (os.path.exists(cert_path) and os.path.exists(key_path)):
        return  # made at the first start
    _load(config)


def load_or_create(config: Config) -> ReloadableTLS:
    """The configured certificate and key, or a self-signed pair made on first use.

    The self-signed pair is made again when it no longer names ``config.hostname``
    (the host was renamed since).  A self-signed certificate is announced with a
    warning giving its SHA-256 fingerprint, which users can compare with what their
    mail client shows.
    """
    check_config(config)
    cert_path, key_path, self_signed = tls_files(config)
    if not self_signed:
        return _load(config)
    if not (os.path.exists(cert_path) and os.path.exists(key_path)):
        generate_self_signed(config.hostname, os.path.dirname(cert_path))
    elif not names_host(cert_path, config.hostname):
        # Ours, made at an earlier start under another host name: clients that connect
        # by this name would refuse it, so it is made again.
        log.warn(
            "tls.self_signed_renewed: {cert} (SHA-256 fingerprint {old_fingerprint}) "
            "does not name the host {hostname}; a new self-signed certificate replaces it",
            cert=cert_path,
            old_fingerprint=fingerprint(cert_path),
            hostname=config.hostname,
        )
        generate_self_signed(config.hostname, os.path.dirname(cert_path))
    tls = _load(config)
    log.warn(
        "tls.self_signed: no [tls] cert and key are configured, so TLS uses the self-signed "
        "certificate {cert} (SHA-256 fingerprint {fingerprint}); mail clients will warn "
        "until they trust it. Configure a real certificate for production.",
        cert=cert_path,
        fingerprint=tls.fingerprint,
    )
    return tls
