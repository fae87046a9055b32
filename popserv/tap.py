"""``twistd popserv``: command-line options over the configuration file, and the service."""

from __future__ import annotations

import pwd

from twisted.application.service import IService
from twisted.python import usage

from popserv.config import (
    Config,
    ConfigError,
    check_config,
    parse_config_file,
    parse_domains,
    parse_value,
)
from popserv.interfaces import SharedStateUnavailable
from popserv.startup import LISTENER_SETTINGS, StartupError, check_ports, one_line

_EXAMPLE_LISTENER = "tcp:1110:interface=127.0.0.1"

#: Options that override one key of the file each: option -> (section, key).
_OVERRIDES = {
    "mailroot": ("server", "mailroot"),
    "users": ("server", "users"),
    "hostname": ("server", "hostname"),
    "tls-cert": ("tls", "cert"),
    "tls-key": ("tls", "key"),
    "metrics": ("metrics", "listen"),
    "workers": ("server", "workers"),
}


class Options(usage.Options):
    """Options of ``twistd popserv``; each one overrides the same key of the config file."""

    synopsis = "[options]"
    longdesc = (
        "Serve POP3 (RFC 1939) from Maildirs. Settings come from the built-in defaults, "
        "then the file given with --config, then the options below, which override the "
        "same key of the file. See etc/popserv.ini for every key and its default. "
        "Listeners are Twisted endpoint strings, such as tcp:110 or "
        f"{_EXAMPLE_LISTENER}; give --pop3 once per listener. POP3S (implicit TLS) "
        "listeners are plain stream endpoints too, such as tcp:995: popserv adds TLS."
    )

    optParameters = [
        [
            "config",
            None,
            None,
            "Read settings from this INI file (see etc/popserv.ini); "
            "without it, the built-in defaults apply.",
        ],
        [
            "mailroot",
            None,
            None,
            "Directory holding the users' Maildirs, created if missing "
            "(overrides [server] mailroot of the config file).",
        ],
        [
            "users",
            None,
            None,
            "Passwd-style users file, created empty if missing; manage it with the "
            "popserv command (overrides [server] users of the config file).",
        ],
        [
            "hostname",
            None,
            None,
            "Name this server gives itself in greetings "
            "(overrides [server] hostname of the config file).",
        ],
        [
            "tls-cert",
            None,
            None,
            "PEM certificate chain, server certificate first; give --tls-key too "
            "(overrides [tls] cert of the config file).",
        ],
        [
            "tls-key",
            None,
            None,
            "PEM private key of the certificate (overrides [tls] key of the config file).",
        ],
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics at /metrics on this endpoint, such as "
            "tcp:9110:interface=127.0.0.1 (overrides [metrics] listen of the config file).",
        ],
        [
            "workers",
            None,
            None,
            "Serve with this many worker processes, or auto (one per CPU); above 1, "
            "twistd supervises them (overrides [server] workers of the config file).",
        ],
    ]

    compData = usage.Completions(
        optActions={
            "config": usage.CompleteFiles("*.ini"),
            "mailroot": usage.CompleteDirs(),
            "users": usage.CompleteFiles(),
            "hostname": usage.CompleteHostnames(),
            "tls-cert": usage.CompleteFiles("*.pem"),
            "tls-key": usage.CompleteFiles("*.pem"),
        }
    )

    def __init__(self):
        super().__init__()
        self["pop3"] = []
        self["pop3s"] = []
        self["smtp"] = []
        self["domain"] = []

    def opt_pop3(self, description: str) -> None:
        """A POP3 listener endpoint, repeatable; replaces [pop3] listen of the config file."""
        self["pop3"].append(description)

    def opt_pop3s(self, description: str) -> None:
        """A plain POP3S endpoint (tcp:995), repeatable; replaces [pop3s] listen; '' for none."""
        self["pop3s"].append(description)

    def opt_smtp(self, description: str) -> None:
        """An SMTP listener such as tcp:25, repeatable; replaces [smtp] listen; '' for none."""
        self["smtp"].append(description)

    def opt_domain(self, name: str) -> None:
        """A local mail domain, repeatable; replaces [smtp] domains of the config file."""
        try:
            domains = parse_domains(name)
        except ValueError as e:
            raise StartupError(f"--domain: {e}") from None
        if len(domains) != 1:
            raise StartupError(f"--domain needs one domain name such as example.org: {name!r}")
        (domain,) = domains
        self["domain"].append(domain)

    def parseOptions(self, options=None) -> None:
        """Parse as ``usage.Options`` does, but stop a mistake with one line of its own:
        twistd prints its whole usage text before a UsageError (--help still prints it)."""
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise StartupError(f"{one_line(e)} (twistd popserv --help lists the options)") from None

    def postOptions(self) -> None:
        """Read the config file, apply the overrides, and check listeners, TLS files, users."""
        config = self._read_config()
        overrides = {}
        for option, (section, key) in _OVERRIDES.items():
            if self[option] is not None:
                try:
                    name, overrides[name] = parse_value(section, key, self[option])
                except ConfigError as e:
                    raise StartupError(f"--{option}: {e}") from None
        # Given at all, each replaces the file's list; an empty string adds no listener.
        for option in ("pop3", "pop3s", "smtp"):
            if self[option]:
                overrides[f"{option}_listen"] = tuple(d for d in self[option] if d.strip())
        if self["domain"]:
            overrides["smtp_domains"] = tuple(dict.fromkeys(self["domain"]))
        try:
            config = check_config(config.replace(**overrides))
        except ConfigError as e:
            raise StartupError(str(e)) from None
        if not config.pop3_listen:
            raise StartupError(
                f"no POP3 listener: pass --pop3 (e.g. --pop3 {_EXAMPLE_LISTENER}) "
                "or set [pop3] listen in the config file"
            )
        for description in config.pop3_listen:
            _check_endpoint(description)
        for description in config.pop3s_listen:
            if description.split(":", 1)[0].lower() in ("ssl", "tls"):
                raise StartupError(
                    f"POP3S listener {description!r} already has TLS: give a plain endpoint "
                    "such as tcp:995 with --pop3s or [pop3s] listen, and popserv adds TLS "
                    "with its certificate"
                )
            _check_endpoint(description, "POP3S")
        for description in config.smtp_listen:
            _check_endpoint(description, "SMTP")
        if config.metrics_listen:
            _check_endpoint(config.metrics_listen, "metrics")
        _check_tls(config)
        parent = self.parent if self.parent is not None else {}
        _check_process(config, parent.get("uid"), parent.get("gid"))
        _check_log(config, self.parent)
        _check_workers(config)
        self["popserv_config"] = config

    def _read_config(self) -> Config:
        if self["config"] is None:
            return Config()
        config, problems = parse_config_file(self["config"])
        if problems:
            raise StartupError(
                f"{one_line(problem)}; fix the file (etc/popserv.ini documents every key) "
                "or pass another with --config"
                for problem in problems
            )
        return config


def _check_endpoint(description: str, kind: str = "POP3") -> None:
    """Stop at a listener string that cannot make an endpoint; binds nothing."""
    from twisted.internet import reactor

    from popserv.listeners import listener_endpoint

    option, key = LISTENER_SETTINGS[kind]
    try:
        listener_endpoint(reactor, description)
    except Exception as e:  # endpoint parsers raise ValueError, TypeError, OSError...
        raise StartupError(
            f"invalid {kind} listener {description!r}: {one_line(e)}; give an endpoint "
            f"string such as tcp:110 or {_EXAMPLE_LISTENER} with {option} or {key} "
            "(see Twisted's serverFromString documentation)"
        ) from None


def _check_tls(config: Config) -> None:
    """Stop at a certificate or key the server could not use, naming the file and the fix."""
    from popserv.tls import CertificateError, check_files

    try:
        check_files(config)
    except CertificateError as e:
        raise StartupError(str(e)) from None


def _check_process(config: Config, twistd_uid: int | None = None, twistd_gid=None) -> None:
    """Refuse, before twistd daemonizes, an exposed secret file or an unknown server user."""
    from popserv.preflight import check_start
    from popserv.process import check_secret_files, check_user

    if twistd_uid is not None and twistd_gid is None:
        try:
            pwd.getpwuid(twistd_uid)
        except KeyError:
            # twistd would look up the group of the uid after binding, with a traceback.
            raise StartupError(
                f"twistd --uid {twistd_uid}: no such user on this machine; fix: give "
                "--uid an existing user, or --gid as well for a uid without a passwd entry"
            ) from None
    try:
        check_secret_files(config)
        check_user(config)
        check_start(config, twistd_uid)  # files the server's user (--uid, [server] user) can use
    except ConfigError as e:
        raise StartupError(str(e)) from None


def _check_log(config: Config, twistd_options) -> None:
    """Refuse a [log] section that cannot be written, before twistd starts logging."""
    from popserv.logs import LogSettings, check_settings

    try:
        check_settings(LogSettings.from_config(config), twistd_options or {})
    except ConfigError as e:
        raise StartupError(str(e)) from None


def _check_workers(config: Config) -> None:
    """Refuse, with several workers, a listener whose socket they cannot share."""
    from popserv.supervisor import check_shareable, worker_count

    if worker_count(config) > 1:
        try:
            check_shareable(config)
        except ConfigError as e:
            raise StartupError(str(e)) from None


def makeService(options: Options) -> IService:
    """The popserv service for parsed ``twistd popserv`` options, with the log observer
    of its [log] section for twistd to use (see popserv.logs).

    twistd calls this before it daemonizes: a port another server holds, or a file
    that cannot be made, ends the start here with one line on the admin's terminal.
    """
    from popserv import logs, service, supervisor

    config = options["popserv_config"]
    check_ports(config)
    foreground = options.parent is None or bool(options.parent.get("nodaemon"))
    try:
        if config.cluster_database:
            # Before any worker starts: one line if the database is out of reach.
            from popserv.pgdb import reach_database

            reach_database(config.cluster_database)
        if supervisor.worker_count(config) > 1:
            from twisted.internet import reactor

            server = supervisor.make_supervisor(config, reactor=reactor, foreground=foreground)
        else:
            server = service.make_service(config, foreground=foreground)
    except ConfigError as e:
        raise StartupError(str(e)) from None
    except SharedStateUnavailable as e:
        raise StartupError(f"[cluster] database: {one_line(e)}") from None
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        raise StartupError(f"{where}{e.strerror or one_line(e)}") from None
    observer = logs.observer_for(logs.LogSettings.from_config(config), options.parent or {})
    if observer is None:
        return server
    return logs.ApplicationLog(server, observer)
