"""The POP3 service's factory: one ``POP3Server`` per connection, and what they share.

The portal, the TLS context, the SASL mechanisms, the login throttle, the verification
queue and the connection limiter are made once here (or passed in, to share them with
other services or processes) and used by every session.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import ServerFactory

from popserv.config import Config
from popserv.interfaces import NO_METRICS
from popserv.limits import ConnectionLimiter
from popserv.peers import peer_host
from popserv.pop3.server import POP3Server
from popserv.scheduler import VerificationScheduler
from popserv.sessions import MemorySessionRegistry
from popserv.throttle import MemoryLoginThrottle, ThrottleSettings

#: Share of the descriptor limit POP3 leaves free (SMTP leaves more, so an SMTP flood
#: cannot take the descriptors POP3 needs).  Besides its socket, a session may hold
#: its lock file and one message open.
DESCRIPTOR_RESERVE = 0.1


class POP3Factory(ServerFactory):
    """Makes POP3 sessions that log in through ``portal`` to ``IMaildrop`` avatars."""

    protocol = POP3Server
    #: Whether each command is logged (``[server] log_level = debug``).
    log_commands = False

    def __init__(
        self,
        portal,
        config: Config | None = None,
        *,
        clock,
        tls=None,
        userdb=None,
        mechanisms=None,
        run_in_thread=None,
        throttle=None,
        verifications: VerificationScheduler | None = None,
        secret: bytes | None = None,
        limiter=None,
        policies=None,
        metrics=None,
        sessions=None,
    ):
        """Wire a POP3 service.

        ``clock``: the reactor (or a ``task.Clock``) that times sessions and failed logins.
        ``tls``: the server TLS connection creator for STLS, or None to not offer it.
        ``userdb``: the ``IUserDB`` that SASL mechanisms needing stored keys consult.
        ``mechanisms``: name -> mechanism class (default: ``popserv.sasl.MECHANISMS``).
        ``run_in_thread``: how costly SASL steps (SCRAM's key derivation) leave the
        reactor thread, a ``Workers.run``; needed only when such a mechanism is enabled.
        ``throttle``: the ``ILoginThrottle`` (default: one in memory, set from ``config``).
        ``verifications``: the ``VerificationScheduler`` every login waits its turn in
        (default: one of ``[auth] max_verifications`` and ``max_waiting_per_peer``).
        ``secret``: the server secret (``popserv.state``) keying made-up SCRAM salts.
        ``limiter``: the ``IConnectionLimiter`` (default: one in memory, set from ``config``).
        ``policies``: the ``popserv.policy.MailboxPolicies`` CAPA's EXPIRE comes from
        (default: from ``config`` and ``userdb``).
        ``metrics``: the ``IMetrics`` sessions report to (default: ``NO_METRICS``, none kept).
        ``sessions``: the ``ISessionRegistry`` of logged-in sessions (default: one in memory).
        """
        self.portal = portal
        self.clock = clock
        self._own_throttle = throttle is None
        self.throttle = MemoryLoginThrottle(clock) if throttle is None else throttle
        self._own_verifications = verifications is None
        self.verifications = VerificationScheduler() if verifications is None else verifications
        self._own_limiter = limiter is None
        if limiter is None:
            # The limits themselves follow the configuration (see the setter).
            limiter = ConnectionLimiter(0, 0, reserve=DESCRIPTOR_RESERVE, files_per_connection=2)
        self.limiter = limiter
        self.config = config if config is not None else Config()
        self.metrics = NO_METRICS if metrics is None else metrics
        self.sessions = MemorySessionRegistry(clock) if sessions is None else sessions
        self.tls = tls
        self.secret = secret
        self.userdb = userdb
        if policies is None:
            from popserv.policy import MailboxPolicies

            policies = MailboxPolicies(userdb, self.config)
        self.policies = policies
        #: Runs a blocking callable off the reactor thread, returning a Deferred.
        self.run_in_thread = run_in_thread
        if mechanisms is None:
            from popserv.sasl import MECHANISMS as mechanisms
        enabled = [name.encode("ascii") for name in self.config.auth_mechanisms]
        #: Mechanisms AUTH offers, in the order of the configuration.
        self.mechanisms = {name: mechanisms[name] for name in enabled if name in mechanisms}
        costly = [name for name, m in self.mechanisms.items() if getattr(m, "costly", False)]
        if costly and run_in_thread is None:
            raise TypeError(
                f"{costly[0].decode()} derives keys off the reactor thread: pass run_in_thread "
                "(a popserv.workers.Workers.run)"
            )

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        self._config = config
        self._trusted = [
            ipaddress.ip_network(n, strict=False) for n in config.auth_trusted_networks
        ]
        # The parts made here follow the configuration; ones passed in keep their own.
        if self._own_throttle:
            self.throttle.settings = throttle_settings(config)
        if self._own_limiter:
            self.limiter.in_all = config.pop3_max_connections
            self.limiter.per_peer = config.pop3_max_connections_per_peer
        self.log_commands = config.log_level == "debug"
        if self._own_verifications:
            self.verifications.limit = config.auth_max_verifications
            self.verifications.queued_per_peer = config.auth_max_waiting_per_peer

    def is_trusted(self, address) -> bool:
        """Whether a peer may log in with a plaintext password without TLS.

        Local (UNIX socket) peers are; IP peers when in ``auth_trusted_networks``.
        """
        if not isinstance(address, (IPv4Address, IPv6Address)):
            return address is not None and getattr(address, "type", None) != "TCP"
        try:
            ip = ipaddress.ip_address(peer_host(address).split("%", 1)[0])
        except ValueError:
            return False
        return any(ip in network for network in self._trusted)


def throttle_settings(config: Config) -> ThrottleSettings:
    """The throttle's part of the configuration."""
    return ThrottleSettings(
        failure_delay=config.pop3_failure_delay,
        failure_delay_max=config.pop3_failure_delay_max,
        max_failures=config.pop3_max_failures,
        login_delay=config.pop3_login_delay,
    )
