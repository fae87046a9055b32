"""Assemble popserv's services from a Config: storage, users, portal, factories, listeners."""

from __future__ import annotations

import os
import signal
import sys
import threading

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from popserv.config import Config
from popserv.listeners import listener_endpoint
from popserv.proxyproto import PROXY_TIMEOUT

log = Logger()


def make_service(
    config: Config, reactor=None, *, foreground: bool = True, listen=None, shared=None, tls=None
) -> MultiService:
    """A MultiService with one named POP3 listener per ``config.pop3_listen`` entry.

    Listeners bind when the service starts (``privilegedStartService``), so ports below
    1024 work with ``twistd --uid``.  A missing mailroot or users file is created empty,
    so a first ``twistd -n popserv`` runs without any setup.  ``reactor`` (the global one
    by default) is handed to every part that needs time or threads.  ``foreground``:
    False under a daemonized twistd, whose listeners report a failed bind differently
    (see ``Listener``).

    A worker of several (``popserv.worker``) passes ``listen(kind, name, description,
    factory)``, which returns the service serving that listener (one that adopts the socket its
    supervisor bound) or None where it serves none (the metrics page), and ``shared``
    (``popserv.worker.SharedParts``): the throttle and limits all workers share, and
    ``tls``: the ``ReloadableTLS`` made of the files its supervisor read.
    """
    if reactor is None:
        from twisted.internet import reactor
    if listen is None:
        listen = _endpoint_listener(reactor, config.proxy_timeout)
    from popserv.auth import PasswdFile, checkers
    from popserv.cluster import naming_node, node_name
    from popserv.credcache import VerifiedPasswords
    from popserv.delivery import DeliveryRecovery, journal_dir
    from popserv.interfaces import NO_METRICS
    from popserv.maildir import MAILDROP_THREADS, MaildirStore
    from popserv.notify import Notifier, NotifyService
    from popserv.policy import MailboxPolicies
    from popserv.pop3 import POP3Factory
    from popserv.process import ProcessSetup
    from popserv.realm import MaildropRealm
    from popserv.sessions import WHO_DIR, MemorySessionRegistry
    from popserv.workers import Workers, WorkersService

    created, secret, tls = prepare_files(config, tls)
    node = node_name(config.cluster_node)
    # [cluster] database: what the nodes share (users, locks, counters, sessions) is there.
    database = _database(config, node, reactor)
    mailroot = os.path.abspath(config.mailroot)
    users = os.path.abspath(config.users)
    who_dir = os.path.join(os.path.abspath(config.state_dir), WHO_DIR)

    # Password hashes (and SCRAM's key derivation) get threads of their own, no more
    # than may verify at once: each Argon2id verification holds 64 MiB.
    verify = Workers(reactor, config.auth_max_verifications, "popserv-verify")
    maildrops = Workers(reactor, MAILDROP_THREADS, "popserv-maildrop")
    metrics = _metrics(config)
    # A password that passed a slow hash is accepted at the user's next poll with one HMAC;
    # the workers of a host share what they verified.
    if shared is None:
        cache = VerifiedPasswords(
            reactor,
            config.auth_cache_ttl,
            config.auth_cache_size,
            metrics=NO_METRICS if metrics is None else metrics,
        )
    else:
        cache = shared.verified_passwords(
            config, reactor, NO_METRICS if metrics is None else metrics
        )
    if database is None:
        userdb = PasswdFile(users, verify.run, secret=secret, cache=cache)
    else:
        userdb = _database_users(database, node, reactor, verify.run, secret, cache)
    locks = _maildrop_locks(config, database, node, reactor)
    store = MaildirStore(
        mailroot,
        maildrops.run,
        node=node,
        dovecot_uidl_format=config.pop3_dovecot_uidl_format,
        dovecot_reuse_xuidl=config.pop3_dovecot_reuse_xuidl,
        locks=locks,
    )
    policies = MailboxPolicies(userdb, config)
    realm = MaildropRealm(store, policies)
    # USER/PASS, PLAIN and LOGIN; APOP and CRAM-MD5; SCRAM's verified outcome.
    portal = Portal(realm, checkers(userdb))
    sessions = MemorySessionRegistry(reactor)
    shared_parts = {} if shared is None else shared.pop3_parts(config, reactor)
    cluster_state = None
    if database is not None:
        # The nodes' lockout and session list; the connection limits stay per node.
        cluster_state = _cluster_state(config, database, node, reactor)
        sessions = cluster_state.sessions
        shared_parts["throttle"] = cluster_state.throttle
    factory = POP3Factory(
        portal,
        config,
        clock=reactor,
        userdb=userdb,
        tls=tls,
        run_in_thread=verify.run,
        secret=secret,
        policies=policies,
        metrics=metrics,
        sessions=sessions,
        **shared_parts,
    )

    top = MultiService()
    # First child: it checks and raises limits before the listeners bind, and drops
    # root only once they all have (see popserv.process).
    ProcessSetup(config, created).setServiceParent(top)
    if database is not None:
        # Before the listeners, so the pool closes after they have stopped.
        from popserv.pgdb import DatabaseService

        DatabaseService(database, reactor).setServiceParent(top)
        userdb.service().setServiceParent(top)
        cluster_state.setServiceParent(top)
    if locks is not None:
        # Before the listeners too: stopped after them, it closes the lock connection last.
        from popserv.pglocks import AdvisoryLocksService

        AdvisoryLocksService(locks).setServiceParent(top)
    # Before any listener accepts: what a crash left half-delivered comes out of new/.
    DeliveryRecovery(journal_dir(mailroot, naming_node(config))).setServiceParent(top)
    # Before the listeners, so they stop (queued jobs done) after them.
    for name, workers in (("verify-threads", verify), ("maildrop-threads", maildrops)):
        threads = WorkersService(workers)
        threads.setName(name)
        threads.setServiceParent(top)
    for index, description in enumerate(config.pop3_listen):
        _add_listener(top, listen, "POP3", f"pop3-{index}", description, factory)
    tls_factory = TLSMemoryBIOFactory(tls, False, factory, clock=reactor)
    for index, description in enumerate(config.pop3s_listen):
        _add_listener(top, listen, "POP3S", f"pop3s-{index}", description, tls_factory)
    # systemd hears READY=1 once all is bound and root dropped, and of reloads and stops.
    notify = NotifyService(Notifier(), _status(config), reactor)
    reload_service = ReloadOnSIGHUP(tls.reload, reactor, notify=notify)
    reload_service.setName("tls-reload")
    reload_service.setServiceParent(top)
    if config.smtp_listen:
        _add_smtp(
            top, config, store, userdb, policies, tls, reactor, metrics, listen, shared, database
        )
    _add_watching(top, config, metrics, sessions, who_dir, reactor, listen)
    # Last: started after every other part, stopped before them.
    notify.setServiceParent(top)
    for child in top:
        if isinstance(child, Listener):
            child.foreground = foreground
    log.info(
        "popserv {hostname}: POP3 on {listeners}, POP3S on {tls_listeners}, "
        "SMTP on {smtp_listeners}, Maildirs under {mailroot}, users in {users}",
        hostname=config.hostname,
        listeners=", ".join(config.pop3_listen),
        tls_listeners=", ".join(config.pop3s_listen) or "none",
        smtp_listeners=", ".join(config.smtp_listen) or "none",
        mailroot=mailroot,
        users=users if database is None else "the database's popserv_users",
    )
    return top


def run_worker() -> None:
    """``python -m popserv.worker``: serve as one of a supervisor's workers, on the global
    reactor (chosen here, as for a server of one process)."""
    from twisted.internet import reactor

    from popserv.worker import main

    main(reactor)


def prepare_files(config: Config, tls=None) -> tuple[list[str], bytes, object]:
    """What a first start needs, made if missing: mail root, users file, state directory
    with the secret, self-signed certificate.  Returns the paths this made (they go to
    [server] user when root becomes that user), the secret, and the ``ReloadableTLS``:
    one object for STLS and every POP3S listener, so SIGHUP reloads them all (``tls``,
    when given, is that object already).
    """
    from popserv.sessions import WHO_DIR
    from popserv.state import load_or_create_secret
    from popserv.tls import load_or_create

    created = _make_private_dir(os.path.abspath(config.mailroot))
    created += _make_private_file(os.path.abspath(config.users))
    state_dir = os.path.abspath(config.state_dir)
    created += _make_private_dir(state_dir)
    created += _make_private_dir(os.path.join(state_dir, WHO_DIR))
    secret, made = load_or_create_secret(state_dir)
    created += made
    tls_dir = os.path.abspath(config.tls_self_signed_dir)
    tls_dir_existed = os.path.exists(tls_dir)
    if tls is None:
        tls = load_or_create(config)
    if not tls_dir_existed and os.path.isdir(tls_dir):
        created += [tls_dir] + [os.path.join(tls_dir, name) for name in os.listdir(tls_dir)]
    return created, secret, tls


def _database(config: Config, node: str, reactor):
    """The shared ``popserv.pgdb.Database`` of ``[cluster] database``, or None without one."""
    if not config.cluster_database:
        return None
    from popserv.pgdb import open_database

    return open_database(config.cluster_database, reactor, name=f"popserv {node}")


def _maildrop_locks(config: Config, database, node: str, reactor):
    """With a shared database, maildrop locks every node sees (``popserv.pglocks``); else
    None: the store's ``flock`` alone."""
    if database is None:
        return None
    from popserv.pglocks import cluster_locks

    return cluster_locks(database.conninfo, node, reactor, config.cluster_lock_timeout)


def _database_users(database, node: str, reactor, run, secret, cache):
    """The users of ``popserv_users``, read now (blocking, as the database was opened)."""
    from popserv.pgusers import DatabaseUsers

    name = f"popserv {node} users"
    userdb = DatabaseUsers(database, reactor, run, secret=secret, cache=cache, name=name)
    userdb.load()
    return userdb


def _cluster_state(config: Config, database, node: str, reactor):
    """The ``popserv.pgstate.ClusterState`` of this node: its shared throttle and sessions."""
    from popserv.pgstate import ClusterState
    from popserv.pop3 import throttle_settings

    return ClusterState(database, reactor, node, throttle_settings(config))


def _endpoint_listener(reactor, proxy_timeout: float):
    """How a server of one process listens: each endpoint string bound by its own service."""

    def listen(kind: str, name: str, description: str, factory):
        return Listener(kind, description, factory, reactor, proxy_timeout=proxy_timeout)

    return listen


def _add_listener(top: MultiService, listen, kind: str, name: str, description: str, factory):
    """The service ``listen`` makes for one listener, named ``name``, if it makes one."""
    listener = listen(kind, name, description, factory)
    if listener is not None:
        listener.setName(name)
        listener.setServiceParent(top)
    return listener


def _status(config: Config) -> str:
    """The one line systemd shows for the running server (systemctl status)."""
    return (
        f"Serving POP3 on {', '.join(config.pop3_listen) or 'none'}, "
        f"POP3S on {', '.join(config.pop3s_listen) or 'none'}, "
        f"SMTP on {', '.join(config.smtp_listen) or 'none'}"
    )


def _metrics(config: Config):
    """The server's metrics (``IMetrics``), or None to keep none: no [metrics] listen."""
    if not config.metrics_listen:
        return None
    from popserv.metrics import Metrics

    return Metrics()


def _add_watching(
    top: MultiService, config: Config, metrics, sessions, who_dir, reactor, listen
) -> None:
    """What admins watch the server with: the metrics page, and the socket of popserv who."""
    from popserv.sessions import WhoSocketService

    if metrics is not None:
        from popserv.metrics import metrics_site

        site = metrics_site(metrics.registry, reactor)
        if _add_listener(top, listen, "metrics", "metrics", config.metrics_listen, site):
            log.info("popserv.metrics: /metrics on {endpoint}", endpoint=config.metrics_listen)
    who = WhoSocketService(sessions, who_dir, reactor)
    who.setName("who")
    who.setServiceParent(top)


def _add_smtp(
    top: MultiService,
    config: Config,
    store,
    userdb,
    policies,
    tls,
    reactor,
    metrics=None,
    listen=None,
    shared=None,
    database=None,
) -> None:
    """The SMTP listeners, delivering into ``store``; dead deliveries are cleaned up at start.

    With the shared ``database``, recipients get 451 4.3.0 while it is unavailable.
    """
    from popserv.cluster import mail_host, naming_node
    from popserv.delivery import DELIVERY_THREADS, MaildirDeliverer, StaleTempCleaner, journal_dir
    from popserv.quota import MaildirQuota
    from popserv.smtp import SMTPFactory
    from popserv.workers import Workers, WorkersService

    StaleTempCleaner(store.mailroot).setServiceParent(top)
    workers = Workers(reactor, DELIVERY_THREADS, "popserv-delivery")
    threads = WorkersService(workers)
    threads.setName("delivery-threads")
    threads.setServiceParent(top)
    node = naming_node(config)
    deliverer = MaildirDeliverer(
        store,
        mail_host(config),
        workers.run,
        journal_dir=journal_dir(store.mailroot, node),
        policies=policies,
    )
    quota = MaildirQuota(store, policies, workers.run)
    factory = SMTPFactory(
        deliverer,
        userdb,
        config,
        clock=reactor,
        context_factory=tls,
        quota=quota,
        metrics=metrics,
        limiter=None if shared is None else shared.smtp_limiter(config),
        available=None if database is None else lambda: database.available,
    )
    if listen is None:
        listen = _endpoint_listener(reactor, config.proxy_timeout)
    for index, description in enumerate(config.smtp_listen):
        _add_listener(top, listen, "SMTP", f"smtp-{index}", description, factory)


class Listener(StreamServerEndpointService):
    """One listener; if it cannot bind at start, the start ends with one line naming it.

    Ports that others hold are found before twistd daemonizes (``popserv.startup``);
    this catches the rest (a race, an address that went away).  The line is logged;
    in the foreground it also goes to the terminal and the process exits with status 1.
    A daemon raises ``ListenFailed`` instead, which twistd hands to the waiting parent.
    """

    _raiseSynchronously = True  # as strports.service: a failed listen raises at start

    def __init__(
        self,
        kind: str,
        description: str,
        factory,
        reactor,
        foreground=True,
        *,
        proxy_timeout: float = PROXY_TIMEOUT,
    ):
        endpoint = listener_endpoint(reactor, description, proxy_timeout=proxy_timeout)
        super().__init__(endpoint, factory)
        self.kind = kind
        self.description = description
        self.foreground = foreground

    def privilegedStartService(self) -> None:
        from popserv.startup import ListenFailed, cannot_listen

        try:
            super().privilegedStartService()
        except (CannotListenError, OSError) as e:
            reason = e.socketError if isinstance(e, CannotListenError) else e
            problem = cannot_listen(self.kind, self.description, reason)
            log.critical("popserv.listen_failed: {problem}", problem=problem)
            if not self.foreground:
                raise ListenFailed(problem) from None
            # twistd has pointed sys.stderr at the log by now: tell the terminal itself.
            print(f"popserv: {problem}", file=sys.__stderr__, flush=True)
            raise SystemExit(1) from None


class ReloadOnSIGHUP(Service):
    """Calls ``reload`` in the reactor thread on each SIGHUP, while the service runs.

    Any handler installed before is still called, and is put back on stop.  Outside
    the main thread (where signals cannot be caught) it does nothing.  ``notify`` (a
    ``popserv.notify.NotifyService``) tells systemd when a reload begins and ends;
    ``reload`` returning False means it failed.
    """

    def __init__(self, reload, reactor, notify=None):
        self._reload = reload
        self._reactor = reactor
        self._notify = notify
        self._installed = False
        self._previous = None

    def startService(self) -> None:
        super().startService()
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.signal(signal.SIGHUP, self._received)
        self._installed = True

    def stopService(self) -> None:
        if self._installed:
            previous = self._previous if self._previous is not None else signal.SIG_DFL
            signal.signal(signal.SIGHUP, previous)
            self._installed = False
        return super().stopService()

    def _received(self, signum, frame) -> None:
        self._reactor.callFromThread(self._reload_now)
        if callable(self._previous):
            self._previous(signum, frame)

    def _reload_now(self) -> None:
        log.info("popserv.sighup: re-reading the TLS certificate and key")
        if self._notify is None:
            self._reload()
            return
        self._notify.reloading()
        succeeded = False
        try:
            succeeded = self._reload() is not False
        finally:
            # Even when the reload raised: systemd would otherwise wait for its end.
            self._notify.reloaded(succeeded)


def _make_private_dir(path: str) -> list[str]:
    """Create ``path`` and any missing parents, readable by the owner only; those created."""
    if os.path.isdir(path):
        return []
    created = _make_private_dir(os.path.dirname(path))
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return created
    return [*created, path]


def _make_private_file(path: str) -> list[str]:
    """Create an empty ``path`` (mode 0600), with its directory, unless it exists; those created."""
    created = _make_private_dir(os.path.dirname(path))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return created
    os.close(fd)
    return [*created, path]
