"""A real popserv on loopback for integration tests: users, Maildirs, listener, client runs.

Everything listens on 127.0.0.1 port 0 and nothing here contacts any other address.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from dataclasses import dataclass, field

from twisted.cred.portal import Portal
from twisted.internet import defer, endpoints, reactor, task
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import SkipTest

from popserv.auth import PasswdFile, checkers, hash_password
from popserv.config import Config
from popserv.maildir import MAILDROP_THREADS, MaildirStore, crlf_size
from popserv.policy import MailboxPolicies
from popserv.pop3 import POP3Factory
from popserv.realm import MaildropRealm
from popserv.workers import Workers

#: Host part of the Maildir file names written by ``deliver``.
HOST = "live.test"
#: How long cleanup waits for the server side of the connections to close.
CLOSE_WAIT = 5.0

_sequence = itertools.count(1)


def workers(testcase, size: int, name: str = "popserv-test") -> Workers:
    """Threads for blocking work, started, and stopped (queued jobs done) when the test ends."""
    started = Workers(reactor, size, name)
    started.start()
    testcase.addCleanup(started.stop)
    return started


def wire(message: bytes) -> bytes:
    """The CRLF form of a message before dot-stuffing: what RETR returns once unstuffed."""
    return message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


#: LF line ends on disk; a lone ".", dot-led lines and a 900-octet line in the body.
DOTS = (
    b"From: Bob <bob@example.org>\n"
    b"To: Alice <alice@example.org>\n"
    b"Subject: dots and long lines\n"
    b"Date: Fri, 27 Nov 2026 04:00:00 +0000\n"
    b"Message-ID: <dots@example.org>\n"
    b"MIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=utf-8\n"
    b"\n"
    b"Hi Alice,\n"
    b"..two dots\n"
    b".one dot\n"
    b".\n" + b"L" * 900 + b"\n"
    b"-- \n"
    b"Bob\n"
)
#: CRLF line ends on disk, as some delivery agents store it.
CRLF = (
    b"From: carol@example.org\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: stored with CRLF\r\n"
    b"\r\n"
    b".\r\n"
    b"..\r\n"
    b"last line\r\n"
)
#: No newline at the end of the file.
NO_EOL = b"From: dave@example.org\nSubject: no final newline\n\nthe end, unterminated"


def received_form(message: bytes) -> bytes:
    """What a client gets from RETR once dot-unstuffed: CRLF lines, the last one terminated."""
    data = wire(message)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


class _RecordingProtocol(ProtocolWrapper):
    """Passes everything through to the POP3 session and keeps what the client sent."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.client_bytes[self.index] += data
        super().dataReceived(data)

    def connectionLost(self, reason):
        # The session ends (and frees its maildrop lock) before waiters hear of it.
        self.wrappedProtocol.connectionLost(reason)
        self.wrappedProtocol = None
        self.factory.unregisterProtocol(self)


class _TrackingFactory(WrappingFactory):
    """Keeps each connection's client input and tells waiters when none is left open."""

    protocol = _RecordingProtocol

    def __init__(self, wrapped):
        super().__init__(wrapped)
        self.client_bytes: list[bytearray] = []
        self._idle_waiters: list[defer.Deferred] = []

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        protocol.index = len(self.client_bytes)
        self.client_bytes.append(bytearray())
        return protocol

    def unregisterProtocol(self, protocol) -> None:
        super().unregisterProtocol(protocol)
        if not self.protocols:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def when_idle(self) -> defer.Deferred:
        if not self.protocols:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle_waiters.append(d)
        return d


@dataclass
class LiveServer:
    """A listening popserv: its port, files and what clients sent it."""

    port: int
    root: str
    mailroot: str
    users_path: str
    store: MaildirStore
    factory: POP3Factory
    policies: MailboxPolicies
    _tracker: _TrackingFactory = field(repr=False)

    @property
    def client_bytes(self) -> list[bytes]:
        """Everything each connection's client sent, in connection order."""
        return [bytes(data) for data in self._tracker.client_bytes]

    def wait_idle(self, timeout: float = CLOSE_WAIT) -> defer.Deferred:
        """Fire once the server has seen every connection close (sessions ended, locks freed)."""
        d = self._tracker.when_idle()
        d.addTimeout(timeout, reactor)
        return d

    def maildir(self, user: str) -> str:
        """The user's Maildir, created if missing."""
        return self.store.create(user)

    def deliver(self, user: str, message: bytes, *, sizes: bool = True, seen: bool = False) -> str:
        """Put a message into the user's Maildir as Postfix or Dovecot would; returns its UIDL.

        The name is ``<secs>.M<usecs>P<pid>Q<n>.<host>``, with ``,S=<size>,W=<crlf size>``
        when ``sizes`` is true (Dovecot) and without (Postfix).  ``seen`` files it in
        ``cur/`` with the ``:2,S`` flag, as after an IMAP client read it.  Successive
        deliveries get increasing times, so message numbers follow delivery order.
        """
        maildir = self.maildir(user)
        n = next(_sequence)
        secs = int(time.time())
        unique = f"{secs}.M{n:06d}P{os.getpid()}Q{n}.{HOST}"
        name = unique + (f",S={len(message)},W={crlf_size(message)}" if sizes else "")
        temp = os.path.join(maildir, "tmp", name)
        with open(temp, "wb") as f:
            f.write(message)
        if seen:
            os.rename(temp, os.path.join(maildir, "cur", name + ":2,S"))
        else:
            os.rename(temp, os.path.join(maildir, "new", name))
        return unique

    def stored(self, user: str) -> dict[str, bytes]:
        """What is left in the user's ``new/`` and ``cur/``: UIDL (unique part) -> bytes."""
        maildir = self.maildir(user)
        found = {}
        for sub in ("new", "cur"):
            for name in os.listdir(os.path.join(maildir, sub)):
                with open(os.path.join(maildir, sub, name), "rb") as f:
                    found[name.split(",")[0].split(":")[0]] = f.read()
        return found


def start_server(
    testcase,
    users: dict[str, str] | None = None,
    *,
    argon2: bool = False,
    schemes: dict[str, str] | None = None,
    fields: dict[str, str] | None = None,
    **config_overrides,
) -> defer.Deferred:
    """Start popserv on 127.0.0.1 port 0 for one test; fires with a ``LiveServer``.

    Passwords are stored ``{PLAIN}`` for speed, or as popserv's real Argon2id hashes
    with ``argon2=True``; ``schemes`` picks another scheme per user (user -> scheme name).
    ``fields`` gives users extra fields of the users file (``userdb_quota_rule=...``).
    The portal has every popserv checker, so APOP and each SASL mechanism work.
    Cleanup stops listening and waits for open connections to close.
    """
    if users is None:
        users = {"alice": "secret"}
    root = os.path.abspath(testcase.mktemp())
    mailroot = os.path.join(root, "mail")
    os.makedirs(mailroot)
    users_path = os.path.join(root, "users")
    default_scheme = "ARGON2ID" if argon2 else "PLAIN"
    with open(users_path, "w", encoding="utf-8") as f:
        for user, password in users.items():
            entry = hash_password(password, (schemes or {}).get(user, default_scheme))
            extra = (fields or {}).get(user)
            f.write(f"{user}:{entry}::::::{extra}\n" if extra else f"{user}:{entry}\n")
    settings = {
        "hostname": HOST,
        "mailroot": mailroot,
        "users": users_path,
        "pop3_failure_delay": 0.05,
        "pop3_listen": ("tcp:0:interface=127.0.0.1",),
    }
    settings.update(config_overrides)
    config = Config(**settings)
    # Threads as make_service gives them; stopped once the listener is (cleanups run last first).
    verify = workers(testcase, config.auth_max_verifications, "popserv-verify")
    store = MaildirStore(mailroot, workers(testcase, MAILDROP_THREADS, "popserv-maildrop").run)
    userdb = PasswdFile(users_path, verify.run)
    policies = MailboxPolicies(userdb, config)
    portal = Portal(MaildropRealm(store, policies), checkers(userdb))
    factory = POP3Factory(
        portal,
        config,
        clock=reactor,
        userdb=userdb,
        run_in_thread=verify.run,
        policies=policies,
    )
    tracker = _TrackingFactory(factory)
    endpoint = endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1")

    def listening(port):
        server = LiveServer(
            port=port.getHost().port,
            root=root,
            mailroot=mailroot,
            users_path=users_path,
            store=store,
            factory=factory,
            policies=policies,
            _tracker=tracker,
        )
        testcase.addCleanup(_shut_down, port, tracker)
        for user in users:
            store.create(user)
        return server

    return endpoint.listen(tracker).addCallback(listening)


@defer.inlineCallbacks
def _shut_down(port, tracker: _TrackingFactory):
    yield port.stopListening()
    waiting = tracker.when_idle()
    timer = reactor.callLater(CLOSE_WAIT, waiting.cancel)
    try:
        yield waiting
    except defer.CancelledError:
        # A test left a client connected: close the server side so no socket leaks.
        for protocol in list(tracker.protocols):
            protocol.transport.abortConnection()
        yield task.deferLater(reactor, 0, lambda: None)
    else:
        timer.cancel()


def require_client(name: str, search: str | None = None) -> str:
    """The path of an installed client program; skips the test without it, fails it in CI.

    ``search`` is a PATH-style list of directories to look in instead of ``$PATH``.
    """
    path = shutil.which(name, path=search)
    if path is None:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"the {name} client is missing (CI=true: install it)")
        raise SkipTest(f"{name} is not installed")
    return path


@dataclass(frozen=True)
class Ran:
    """What a finished program wrote and how it exited."""

    out: bytes
    err: bytes
    code: int


def run_program(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    path: str | None = None,
    timeout: float = 30.0,
) -> defer.Deferred:
    """Run a program without blocking the reactor; fires with ``Ran``.

    ``timeout(1)`` kills it after ``timeout`` seconds; that is reported as a failure.
    """
    if env is None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    args = ["--kill-after=5", f"{timeout:g}", *argv]
    d = getProcessOutputAndValue("/usr/bin/timeout", args, env=env, path=path, reactor=reactor)

    def finished(result):
        out, err, code = result
        if code in (124, 137):
            raise AssertionError(f"{argv[0]} did not finish in {timeout:g}s: {err!r}")
        return Ran(out, err, code)

    return d.addCallback(finished)
