"""popserv's Prometheus metrics: the counters the protocols feed, and the page that serves them.

The protocols know only ``IMetrics``; this module is the one that imports
``prometheus_client``.  Each server keeps its metrics in a ``CollectorRegistry`` of its
own (not the library's global one), so tests and several servers in one process do not
mix their figures.  The figures are those of one process; see ``etc/popserv.ini``,
``[metrics]``, for several worker processes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from popserv.interfaces import IMetrics
from popserv.pop3.server import KNOWN_COMMANDS

#: The command label's values: the POP3 commands popserv knows, and SASL's responses.
#: Any other word a client sends counts as "unknown", so clients cannot make new series.
POP3_COMMANDS = frozenset(name.decode("ascii") for name in KNOWN_COMMANDS) | {"AUTH-RESPONSE"}

#: Login latency buckets, in seconds: from a clear password's check to a slow hash in a queue.
LOGIN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@implementer(IMetrics)
class Metrics:
    """popserv's counters, in ``registry``; its methods are what the protocols call."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        logins = Counter(
            "popserv_pop3_logins",
            "POP3 logins: ok (pop3.login events) and failed (pop3.login_failed events).",
            ["result"],
            registry=r,
        )
        # Children made once: a labelled lookup on each call would cost a lock and a dict.
        self._logins = {True: logins.labels(result="ok"), False: logins.labels(result="failed")}
        self._login_seconds = Histogram(
            "popserv_pop3_login_duration_seconds",
            "Seconds from a POP3 login command to its verdict, queueing and password check "
            "included, the delay a failure's reply is held back excluded.",
            buckets=LOGIN_BUCKETS,
            registry=r,
        )
        # livesum: with several processes, the sum over the living ones.
        self._sessions = Gauge(
            "popserv_pop3_sessions",
            "POP3 sessions logged in now (what popserv who lists).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self._sent = Counter("popserv_pop3_bytes_sent", "Octets sent to POP3 clients.", registry=r)
        commands = Counter(
            "popserv_pop3_commands",
            "POP3 command lines received, by command; any unknown word counts as unknown.",
            ["command"],
            registry=r,
        )
        self._commands = {
            name.encode("ascii"): commands.labels(command=name) for name in POP3_COMMANDS
        }
        self._unknown_command = commands.labels(command="unknown")
        messages = Counter(
            "popserv_smtp_messages",
            "SMTP messages at the end of their DATA: accepted (stored), rejected (5xx), "
            "failed (4xx).",
            ["result"],
            registry=r,
        )
        self._messages = {
            result: messages.labels(result=result) for result in ("accepted", "rejected", "failed")
        }
        self._received = Counter(
            "popserv_smtp_bytes_received",
            "Octets of SMTP message data (DATA) received, counted as each message ends.",
            registry=r,
        )
        handshakes = Counter(
            "popserv_tls_handshakes",
            "TLS handshakes of POP3S, STLS and SMTP STARTTLS, completed (ok) or failed.",
            ["result"],
            registry=r,
        )
        self._handshakes = {
            True: handshakes.labels(result="ok"),
            False: handshakes.labels(result="failed"),
        }
        self._cache = {
            True: Counter(
                "popserv_auth_cache_hits",
                "Passwords of slow-hash users accepted from the verified-password cache.",
                registry=r,
            ),
            False: Counter(
                "popserv_auth_cache_misses",
                "Passwords of slow-hash users verified against the hash (the cache did not "
                "hold them): wrong passwords, first logins, expired or changed entries.",
                registry=r,
            ),
        }

    def pop3_command(self, name: bytes) -> None:
        self._commands.get(name, self._unknown_command).inc()

    def pop3_sent(self, octets: int) -> None:
        self._sent.inc(octets)

    def pop3_login(self, ok: bool, seconds: float) -> None:
        self._logins[ok].inc()
        self._login_seconds.observe(seconds)

    def pop3_session_opened(self) -> None:
        self._sessions.inc()

    def pop3_session_closed(self) -> None:
        self._sessions.dec()

    def smtp_message(self, result: str, octets: int) -> None:
        self._messages[result].inc()
        self._received.inc(octets)

    def tls_handshake(self, ok: bool) -> None:
        self._handshakes[ok].inc()

    def auth_cache(self, hit: bool) -> None:
        self._cache[hit].inc()


class MetricsPage(Resource):
    """``registry`` in the Prometheus text format (or OpenMetrics, when the scraper asks).

    Rendered in the reactor thread: it reads counters in memory, about a millisecond for
    popserv's, and a thread would wait for the interpreter lock all the same.  (The
    library's ``MetricsResource`` runs its WSGI application on the global reactor's
    thread pool, which popserv neither picks nor uses.)
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry):
        super().__init__()
        self.registry = registry

    def render_GET(self, request) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return encoder(self.registry)


def metrics_site(registry: CollectorRegistry, reactor) -> Site:
    """An HTTP site serving ``registry`` at ``/metrics`` on ``reactor``, with no access log."""
    root = Resource()
    root.putChild(b"metrics", MetricsPage(registry))
    site = Site(root, reactor=reactor)
    site.noisy = False
    return site
