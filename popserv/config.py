"""Read popserv's INI configuration and command-line overrides into one frozen Config."""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
from dataclasses import dataclass, field

from popserv.hostname import fqdn


class ConfigError(ValueError):
    """A configuration problem, with a message naming the file, section and key."""


@dataclass(frozen=True)
class Config:
    """Every setting popserv has; ``etc/popserv.ini`` documents each with its default."""

    hostname: str = field(default_factory=fqdn)
    mailroot: str = "popserv-data/mail"
    users: str = "popserv-data/users"
    user: str = ""  # empty: keep the user the server starts as
    log_level: str = "info"
    state_dir: str = "popserv-data/state"
    proxy_timeout: float = 5.0  # haproxy: listeners; popserv.proxyproto.PROXY_TIMEOUT
    workers: int = 0  # serving processes; 0: auto, one per CPU (popserv.supervisor)

    # tcp6:PORT: all addresses, IPv6 and IPv4, on one socket (popserv.listeners).
    pop3_listen: tuple[str, ...] = ("tcp6:110",)
    pop3_timeout: float = 600.0
    pop3_login_timeout: float = 60.0
    pop3_failure_delay: float = 1.0
    pop3_failure_delay_max: float = 15.0
    pop3_login_delay: int = 0
    pop3_max_connections: int = 1000
    pop3_max_connections_per_peer: int = 50
    pop3_max_bad_commands: int = 20
    pop3_max_failures: int = 10
    pop3_dovecot_uidl_format: str = "%08Xu%08Xv"
    pop3_dovecot_reuse_xuidl: bool = False
    pop3_mark_seen: bool = True
    pop3_expire: int | None = None  # RFC 2449 EXPIRE in days; None: NEVER

    pop3s_listen: tuple[str, ...] = ("tcp6:995",)

    tls_cert: str = ""
    tls_key: str = ""
    tls_self_signed_dir: str = "popserv-data/tls"

    auth_trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    auth_allow_plaintext: bool = False
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    auth_apop: bool = False
    auth_max_verifications: int = 4
    auth_max_waiting_per_peer: int = 50
    auth_cache_ttl: float = 3600.0  # 0: no cache of verified passwords
    auth_cache_size: int = 10000

    smtp_listen: tuple[str, ...] = ("tcp6:25",)
    smtp_domains: tuple[str, ...] = ()  # empty: the hostname and localhost
    smtp_max_message_size: int = 25 * 1024 * 1024
    smtp_max_recipients: int = 100
    smtp_max_line_length: int = 1000
    smtp_timeout: float = 300.0
    smtp_max_connections: int = 1000
    smtp_max_connections_per_peer: int = 20
    smtp_max_bad_commands: int = 20
    smtp_max_rejected_recipients: int = 20
    smtp_postmaster: str = "postmaster"

    quota_storage: int = 0  # octets; 0: no limit
    quota_messages: int = 0  # 0: no limit
    quota_full_tempfail: bool = False
    metrics_listen: str = ""  # empty: no metrics kept or served

    log_format: str = "text"  # or json: one JSON object per line
    log_file: str = ""  # empty: twistd's own log (text), or where twistd would log (json)
    log_max_size: int = 10 * 1024 * 1024  # octets before a [log] file is rotated; 0: never
    log_keep: int = 10  # rotated files kept

    cluster_database: str = ""  # postgresql://...; empty: one node, users file, flock only
    cluster_node: str = ""  # empty: the host name (popserv.cluster.node_name)
    cluster_lock_timeout: float = 10.0  # seconds a silent node keeps its maildrop locks

    def replace(self, **changes) -> Config:
        """A copy with some settings changed (command-line overrides)."""
        return dataclasses.replace(self, **changes)


# (section, key) -> (Config field, parser)
def _listeners(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise ValueError("must be yes or no")


def _optional_text(text: str) -> str:
    return text.strip()


def _networks(text: str) -> tuple[str, ...]:
    networks = tuple(text.replace(",", " ").split())
    for network in networks:
        ipaddress.ip_network(network, strict=False)
    return networks


def _mechanisms(text: str) -> tuple[str, ...]:
    from popserv.sasl import MECHANISMS

    known = [name.decode("ascii") for name in MECHANISMS]
    names = tuple(text.replace(",", " ").upper().split())
    for name in names:
        if name not in known:
            raise ValueError(f"unknown mechanism {name}; known: {' '.join(known)}")
    return names


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def parse_domains(text: str) -> tuple[str, ...]:
    """Domain names, space or comma separated, lower case, without a final dot."""
    names = tuple(dict.fromkeys(n.lower().rstrip(".") for n in text.replace(",", " ").split()))
    for name in names:
        if not name or "@" in name or "/" in name:
            raise ValueError(f"bad domain name {name!r}")
    return names


def _log_level(text: str) -> str:
    value = text.strip().lower()
    if value not in ("info", "debug"):
        raise ValueError("must be info or debug")
    return value


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("text", "json"):
        raise ValueError("must be text or json")
    return value


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _uidl_format(text: str) -> str:
    from popserv.uidlist import UidlFormat

    return UidlFormat(text.strip()).text


def _expire(text: str) -> int | None:
    from popserv.policy import parse_expire

    return parse_expire(text)


def _workers(text: str) -> int:
    if text.strip().lower() == "auto":
        return 0
    return _positive_int(text)


def _size(text: str) -> int:
    from popserv.quota import parse_size

    return parse_size(text)


def _node_name(text: str) -> str:
    from popserv.cluster import check_node_name

    return check_node_name(text.strip())


_KEYS = {
    ("server", "hostname"): ("hostname", _text),
    ("server", "mailroot"): ("mailroot", _text),
    ("server", "users"): ("users", _text),
    ("server", "user"): ("user", _optional_text),
    ("server", "log_level"): ("log_level", _log_level),
    ("server", "state_dir"): ("state_dir", _text),
    ("server", "proxy_timeout"): ("proxy_timeout", _positive_float),
    ("server", "workers"): ("workers", _workers),
    ("pop3", "listen"): ("pop3_listen", _listeners),
    ("pop3", "timeout"): ("pop3_timeout", _positive_float),
    ("pop3", "login_timeout"): ("pop3_login_timeout", _positive_float),
    ("pop3", "failure_delay"): ("pop3_failure_delay", _non_negative_float),
    ("pop3", "failure_delay_max"): ("pop3_failure_delay_max", _non_negative_float),
    ("pop3", "login_delay"): ("pop3_login_delay", _non_negative_int),
    ("pop3", "max_connections"): ("pop3_max_connections", _positive_int),
    ("pop3", "max_connections_per_peer"): ("pop3_max_connections_per_peer", _positive_int),
    ("pop3", "max_bad_commands"): ("pop3_max_bad_commands", _positive_int),
    ("pop3", "max_failures"): ("pop3_max_failures", _positive_int),
    ("pop3", "dovecot_uidl_format"): ("pop3_dovecot_uidl_format", _uidl_format),
    ("pop3", "dovecot_reuse_xuidl"): ("pop3_dovecot_reuse_xuidl", _boolean),
    ("pop3", "mark_seen"): ("pop3_mark_seen", _boolean),
    ("pop3", "expire"): ("pop3_expire", _expire),
    ("pop3s", "listen"): ("pop3s_listen", _listeners),
    ("tls", "cert"): ("tls_cert", _optional_text),
    ("tls", "key"): ("tls_key", _optional_text),
    ("tls", "self_signed_dir"): ("tls_self_signed_dir", _text),
    ("auth", "trusted_networks"): ("auth_trusted_networks", _networks),
    ("auth", "allow_plaintext"): ("auth_allow_plaintext", _boolean),
    ("auth", "mechanisms"): ("auth_mechanisms", _mechanisms),
    ("auth", "apop"): ("auth_apop", _boolean),
    ("auth", "max_verifications"): ("auth_max_verifications", _positive_int),
    ("auth", "max_waiting_per_peer"): ("auth_max_waiting_per_peer", _non_negative_int),
    ("auth", "cache_ttl"): ("auth_cache_ttl", _non_negative_float),
    ("auth", "cache_size"): ("auth_cache_size", _positive_int),
    ("smtp", "listen"): ("smtp_listen", _listeners),
    ("smtp", "domains"): ("smtp_domains", parse_domains),
    ("smtp", "max_message_size"): ("smtp_max_message_size", _positive_int),
    ("smtp", "max_recipients"): ("smtp_max_recipients", _positive_int),
    ("smtp", "max_line_length"): ("smtp_max_line_length", _positive_int),
    ("smtp", "timeout"): ("smtp_timeout", _positive_float),
    ("smtp", "max_connections"): ("smtp_max_connections", _positive_int),
    ("smtp", "max_connections_per_peer"): ("smtp_max_connections_per_peer", _positive_int),
    ("smtp", "max_bad_commands"): ("smtp_max_bad_commands", _positive_int),
    ("smtp", "max_rejected_recipients"): ("smtp_max_rejected_recipients", _positive_int),
    ("smtp", "postmaster"): ("smtp_postmaster", _text),
    ("quota", "storage"): ("quota_storage", _size),
    ("quota", "messages"): ("quota_messages", _non_negative_int),
    ("quota", "full_tempfail"): ("quota_full_tempfail", _boolean),
    ("metrics", "listen"): ("metrics_listen", _optional_text),
    ("log", "format"): ("log_format", _log_format),
    ("log", "file"): ("log_file", _optional_text),
    ("log", "max_size"): ("log_max_size", _size),
    ("log", "keep"): ("log_keep", _positive_int),
    ("cluster", "database"): ("cluster_database", _optional_text),
    ("cluster", "node"): ("cluster_node", _node_name),
    ("cluster", "lock_timeout"): ("cluster_lock_timeout", _positive_float),
}


def parse_value(section: str, key: str, text: str) -> tuple[str, object]:
    """``(Config field, value)`` of one setting; a bad value is a ConfigError naming it."""
    name, parse = _KEYS[(section, key)]
    try:
        return name, parse(text)
    except ValueError as e:
        raise ConfigError(f"[{section}] {key} = {text!r}: {e}") from None


def check_config(config: Config, source: str = "") -> Config:
    """The checks that span several keys (each value is checked as it is parsed)."""
    where = f"{source}: " if source else ""
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError(
            f"{where}[tls] cert and key (--tls-cert and --tls-key) must be given together, "
            "or neither for a self-signed certificate"
        )
    return config


def parse_config(text: str, source: str = "<string>") -> tuple[Config, list[str]]:
    """The settings of INI text and every problem in it, each naming source, section and key.

    A bad value or unknown key is left out (its default stays), so one reading finds all
    the mistakes of a file instead of stopping at the first.
    """
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none")
    try:
        parser.read_string(text, source=source)
    except configparser.Error as e:
        return Config(), [f"{source}: {e}"]
    known_sections = {section for section, _ in _KEYS}
    values = {}
    problems = []
    for section in parser.sections():
        if section not in known_sections:
            problems.append(f"{source}: unknown section [{section}]")
            continue
        for key, raw in parser.items(section):
            if (section, key) not in _KEYS:
                problems.append(f"{source}: unknown key {key!r} in section [{section}]")
                continue
            try:
                name, values[name] = parse_value(section, key, raw)
            except ConfigError as e:
                problems.append(f"{source}: {e}")
    config = Config(**values)
    try:
        check_config(config, source)
    except ConfigError as e:
        problems.append(str(e))
    return config, problems


def config_from_string(text: str, source: str = "<string>") -> Config:
    """Parse INI text; unknown sections or keys and bad values are one error naming them all."""
    config, problems = parse_config(text, source)
    if problems:
        raise ConfigError("\n".join(problems))
    return config


def parse_config_file(path: str) -> tuple[Config, list[str]]:
    """``parse_config`` of a file; a missing or unreadable file is the one problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        return Config(), [f"{path}: cannot read configuration: {e.strerror}"]
    return parse_config(text, source=path)


def read_config(path: str) -> Config:
    """Read a configuration file; any problem in it is one ConfigError listing them all."""
    config, problems = parse_config_file(path)
    if problems:
        raise ConfigError("\n".join(problems))
    return config


def _format_expire(days: int | None) -> str:
    from popserv.policy import format_expire

    return format_expire(days)


def _format_size(octets: int) -> str:
    from popserv.quota import format_size

    return format_size(octets)


def _format_workers(count: int) -> str:
    return str(count) if count else "auto"


#: Values whose text is not simply ``str(value)``, by the parser that reads them.
_FORMATS = {_expire: _format_expire, _size: _format_size, _workers: _format_workers}


def _format_value(value: object, parse) -> str:
    """A value as the INI file writes it, so that parsing it gives the value back."""
    if parse in _FORMATS:
        return _FORMATS[parse](value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, tuple):
        if parse is _listeners:
            return "".join(f"\n    {item}" for item in value)
        return " ".join(value)
    return str(value)


def config_to_string(config: Config, only_changed: bool = False) -> str:
    """The settings as INI text (``popserv check``); ``only_changed``: only those not at
    their default, as ``doveconf -n`` shows them."""
    defaults = Config() if only_changed else None
    sections: dict[str, list[str]] = {}
    for (section, key), (name, parse) in _KEYS.items():
        value = getattr(config, name)
        if defaults is not None and value == getattr(defaults, name):
            continue
        text = _format_value(value, parse)
        separator = "" if not text or text.startswith("\n") else " "
        sections.setdefault(section, []).append(f"{key} ={separator}{text}\n")
    return "\n".join(f"[{section}]\n" + "".join(lines) for section, lines in sections.items())
