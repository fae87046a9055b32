"""popserv's Prometheus metrics: what each POP3 and SMTP event counts, and the /metrics page."""

import os
import poplib
import re
import smtplib
import ssl
import subprocess

from OpenSSL import SSL
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import task
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from popserv import service, tap
from popserv.config import Config
from popserv.interfaces import NO_METRICS, IMetrics
from popserv.metrics import Metrics, MetricsPage
from popserv.pop3 import POP3Factory
from popserv.realm import MaildropRealm
from tests.live import require_client
from tests.live_smtp import free_port
from tests.live_twistd import TwistdServer
from tests.test_pop3 import ControlledChecker, POP3TestCase
from tests.test_smtp import SMTPTestCase


class MetricsPOP3TestCase(POP3TestCase):
    """A POP3 session whose factory keeps metrics."""

    def setUp(self):
        self.metrics = Metrics()
        super().setUp()
        self.factory.metrics = self.metrics

    def value(self, name: str, **labels) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


class InterfaceTests(unittest.TestCase):
    def test_both_provide_imetrics(self):
        """The counters and the no-op default both provide IMetrics."""
        verifyObject(IMetrics, Metrics())
        verifyObject(IMetrics, NO_METRICS)

    def test_off_by_default(self):
        """A POP3 factory keeps no metrics unless it is given some."""
        factory = POP3Factory(Portal(MaildropRealm(None)), clock=task.Clock())
        self.assertIs(factory.metrics, NO_METRICS)

    def test_registries_are_separate(self):
        """Two servers in one process count apart, in registries of their own."""
        one, two = Metrics(), Metrics()
        one.pop3_login(True, 0.1)
        self.assertEqual(
            one.registry.get_sample_value("popserv_pop3_logins_total", {"result": "ok"}), 1.0
        )
        self.assertEqual(
            two.registry.get_sample_value("popserv_pop3_logins_total", {"result": "ok"}), 0.0
        )


class POP3LoginMetricsTests(MetricsPOP3TestCase):
    def test_good_login(self):
        """A login counts as ok, is timed, and is one session open until QUIT."""
        self.login()
        self.assertEqual(self.value("popserv_pop3_logins_total", result="ok"), 1.0)
        self.assertEqual(self.value("popserv_pop3_logins_total", result="failed"), 0.0)
        self.assertEqual(self.value("popserv_pop3_login_duration_seconds_count"), 1.0)
        self.assertEqual(self.value("popserv_pop3_sessions"), 1.0)
        self.send(b"QUIT\r\n")
        self.assertEqual(self.value("popserv_pop3_sessions"), 0.0)

    def test_dropped_session_is_closed(self):
        """A logged-in session that is dropped is no longer counted as open."""
        self.login()
        self.proto.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual(self.value("popserv_pop3_sessions"), 0.0)

    def test_bad_login(self):
        """A wrong password counts as failed and opens no session."""
        self.send(b"USER alice\r\nPASS wrong\r\n")
        self.clock.advance(self.config.pop3_failure_delay)
        self.assertEqual(self.value("popserv_pop3_logins_total", result="failed"), 1.0)
        self.assertEqual(self.value("popserv_pop3_logins_total", result="ok"), 0.0)
        self.assertEqual(self.value("popserv_pop3_sessions"), 0.0)

    def test_latency_excludes_the_failure_delay(self):
        """The histogram times the check, not the delay a failure's reply is held back."""
        checker = ControlledChecker()
        self.factory.portal = Portal(MaildropRealm(self.store), [checker])
        self.send(b"USER alice\r\nPASS secret\r\n")
        self.clock.advance(0.25)
        _, verdict = checker.pending.pop()
        verdict.errback(Failure(UnauthorizedLogin()))
        self.clock.advance(self.config.pop3_failure_delay)
        self.assertEqual(self.value("popserv_pop3_login_duration_seconds_sum"), 0.25)
        self.assertEqual(self.value("popserv_pop3_login_duration_seconds_bucket", le="0.25"), 1.0)
        self.assertEqual(self.value("popserv_pop3_login_duration_seconds_bucket", le="0.1"), 0.0)


class POP3TrafficMetricsTests(MetricsPOP3TestCase):
    def test_commands_by_name(self):
        """Each command line counts under its name, whatever its case or outcome."""
        self.login()
        self.send(b"stat\r\nSTAT\r\nRETR 99\r\nNOOP\r\n")
        self.assertEqual(self.value("popserv_pop3_commands_total", command="STAT"), 2.0)
        self.assertEqual(self.value("popserv_pop3_commands_total", command="RETR"), 1.0)
        self.assertEqual(self.value("popserv_pop3_commands_total", command="USER"), 1.0)
        self.assertEqual(self.value("popserv_pop3_commands_total", command="PASS"), 1.0)

    def test_unknown_words_share_one_label(self):
        """Words that are no command all count as "unknown": a client makes no new series."""
        for n in range(5):
            self.send(b"XJUNK%d\r\n" % n)
        self.assertEqual(self.value("popserv_pop3_commands_total", command="unknown"), 5.0)
        labels = {
            sample.labels["command"]
            for metric in self.metrics.registry.collect()
            if metric.name == "popserv_pop3_commands"
            for sample in metric.samples
        }
        self.assertFalse([label for label in labels if label.startswith("XJUNK")])

    def test_bytes_sent_are_the_octets_written(self):
        """Every octet written to the client is counted: greeting, replies, messages."""
        self.send(b"USER alice\r\nPASS secret\r\nRETR 1\r\nLIST\r\nQUIT\r\n")
        written = len(self.greeting) + len(self.transport.value())
        self.assertGreater(written, 100)
        self.assertEqual(self.value("popserv_pop3_bytes_sent_total"), float(written))


class TLSMetricsTests(MetricsPOP3TestCase):
    def test_handshake_completed(self):
        """A completed handshake (POP3S or STLS) counts as ok."""
        self.proto.handshakeCompleted()
        self.assertEqual(self.value("popserv_tls_handshakes_total", result="ok"), 1.0)

    def test_handshake_failed(self):
        """A TLS connection lost to a TLS error before its handshake counts as failed."""
        self.proto.secure = True
        self.proto.connectionLost(Failure(SSL.Error("no shared cipher")))
        self.assertEqual(self.value("popserv_tls_handshakes_total", result="failed"), 1.0)
        self.assertEqual(self.value("popserv_tls_handshakes_total", result="ok"), 0.0)

    def test_error_after_handshake_is_no_failed_handshake(self):
        """A TLS error later in a session is not counted as a failed handshake."""
        self.proto.secure = True
        self.proto.handshakeCompleted()
        self.proto.connectionLost(Failure(SSL.Error("bad record mac")))
        self.assertEqual(self.value("popserv_tls_handshakes_total", result="failed"), 0.0)


class SMTPMetricsTests(SMTPTestCase):
    config_changes = {"smtp_max_message_size": 100}

    def setUp(self):
        super().setUp()
        self.metrics = Metrics()
        self.factory.metrics = self.metrics

    def value(self, name: str, **labels) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def test_accepted(self):
        """A stored message counts as accepted, with its octets."""
        self.envelope(b"alice@localhost")
        self.send(b"Subject: x\r\n\r\nhello\r\n.\r\n")
        self.assertEqual(self.value("popserv_smtp_messages_total", result="accepted"), 1.0)
        self.assertEqual(self.value("popserv_smtp_bytes_received_total"), 21.0)

    def test_rejected(self):
        """A message refused for good (552, too big) counts as rejected."""
        self.envelope(b"alice@localhost")
        self.send(b"Subject: x\r\n\r\n" + b"y" * 120 + b"\r\n.\r\n")
        self.assertEqual(self.value("popserv_smtp_messages_total", result="rejected"), 1.0)
        self.assertEqual(self.value("popserv_smtp_messages_total", result="accepted"), 0.0)

    def test_failed(self):
        """A message that cannot be stored now (452, disk full) counts as failed."""
        self.envelope(b"alice@localhost")

        def full(data):
            raise OSError(28, "No space left on device")

        self.proto.envelope.delivery._file.write = full
        self.send(b"line\r\n.\r\n")
        self.assertEqual(self.value("popserv_smtp_messages_total", result="failed"), 1.0)

    def test_starttls_handshake(self):
        """SMTP STARTTLS handshakes count with the POP3 ones."""
        self.proto.handshakeCompleted()
        self.assertEqual(self.value("popserv_tls_handshakes_total", result="ok"), 1.0)


def scrape(port: int) -> str:
    """The /metrics page, as curl (a real HTTP client) fetches it."""
    curl = require_client("curl")
    result = subprocess.run(
        [curl, "-sS", "--fail", "--max-time", "10", f"http://127.0.0.1:{port}/metrics"],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"curl failed: {result.stderr!r}")
    return result.stdout.decode("utf-8")


def sample(page: str, name: str, labels: str = "") -> float | None:
    """The value of one sample line of a Prometheus text page, or None without one."""
    selector = re.escape(name + (f"{{{labels}}}" if labels else ""))
    match = re.search(rf"^{selector} (\S+)$", page, re.M)
    return float(match.group(1)) if match else None


class TwistdMetricsTests(unittest.TestCase):
    """A real ``twistd popserv --metrics``, driven by poplib, smtplib and curl."""

    def setUp(self):
        self.metrics_port = free_port()
        self.pop3s_port = free_port()
        self.server = TwistdServer(
            self,
            {"alice": "secret"},
            smtp=True,
            settings={
                "metrics": {"listen": f"tcp:{self.metrics_port}:interface=127.0.0.1"},
                "pop3s": {"listen": f"tcp:{self.pop3s_port}:interface=127.0.0.1"},
            },
        )
        self.server.start()

    def test_logins_commands_bytes_and_latency(self):
        """After one good and one bad login, /metrics shows both, with commands and bytes."""
        good = poplib.POP3("127.0.0.1", self.server.pop3_port, timeout=10)
        good.user("alice")
        good.pass_("secret")
        good.stat()
        good.quit()
        bad = poplib.POP3("127.0.0.1", self.server.pop3_port, timeout=10)
        bad.user("alice")
        with self.assertRaises(poplib.error_proto):
            bad.pass_("wrong")
        bad.quit()
        page = scrape(self.metrics_port)
        self.assertEqual(sample(page, "popserv_pop3_logins_total", 'result="ok"'), 1.0)
        self.assertEqual(sample(page, "popserv_pop3_logins_total", 'result="failed"'), 1.0)
        self.assertEqual(sample(page, "popserv_pop3_commands_total", 'command="USER"'), 2.0)
        self.assertEqual(sample(page, "popserv_pop3_commands_total", 'command="STAT"'), 1.0)
        self.assertGreater(sample(page, "popserv_pop3_bytes_sent_total"), 50.0)
        self.assertEqual(sample(page, "popserv_pop3_login_duration_seconds_count"), 2.0)
        self.assertEqual(
            sample(page, "popserv_pop3_login_duration_seconds_bucket", 'le="+Inf"'), 2.0
        )
        self.assertEqual(sample(page, "popserv_pop3_sessions"), 0.0)
        self.assertIn("# TYPE popserv_pop3_login_duration_seconds histogram", page)

    def test_open_session_and_tls_handshake(self):
        """A POP3S login is a completed handshake and one open session until it ends."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client = poplib.POP3_SSL("127.0.0.1", self.pop3s_port, timeout=10, context=context)
        client.user("alice")
        client.pass_("secret")
        page = scrape(self.metrics_port)
        self.assertEqual(sample(page, "popserv_tls_handshakes_total", 'result="ok"'), 1.0)
        self.assertEqual(sample(page, "popserv_pop3_sessions"), 1.0)
        client.quit()

    def test_smtp_message(self):
        """A message received over SMTP counts as accepted, with its octets."""
        message = b"Subject: counted\r\n\r\nhello\r\n"
        with smtplib.SMTP("127.0.0.1", self.server.smtp_port, timeout=10) as client:
            client.sendmail("bob@remote.example", ["alice@localhost"], message)
        page = scrape(self.metrics_port)
        self.assertEqual(sample(page, "popserv_smtp_messages_total", 'result="accepted"'), 1.0)
        self.assertGreaterEqual(sample(page, "popserv_smtp_bytes_received_total"), len(message))

    def test_only_at_metrics(self):
        """Other paths are not found; the page is served at /metrics only."""
        curl = require_client("curl")
        result = subprocess.run(
            [
                curl,
                "-s",
                "-o",
                os.devnull,
                "-w",
                "%{http_code}",
                f"http://127.0.0.1:{self.metrics_port}/",
            ],
            capture_output=True,
            check=False,
        )
        self.assertEqual(result.stdout, b"404")


class PageTests(unittest.TestCase):
    def render(self, accept: bytes | None = None) -> tuple[bytes, bytes]:
        from twisted.web.test.requesthelper import DummyRequest

        metrics = Metrics()
        metrics.pop3_login(False, 0.5)
        request = DummyRequest([b""])
        if accept is not None:
            request.requestHeaders.setRawHeaders(b"accept", [accept])
        body = MetricsPage(metrics.registry).render_GET(request)
        return body, request.responseHeaders.getRawHeaders(b"content-type")[0]

    def test_text_format(self):
        """The page is Prometheus' text format, with every metric's HELP and TYPE."""
        body, content_type = self.render()
        self.assertTrue(content_type.startswith(b"text/plain"))
        self.assertIn(b'popserv_pop3_logins_total{result="failed"} 1.0\n', body)
        for name in (
            b"popserv_pop3_logins_total",
            b"popserv_pop3_sessions",
            b"popserv_pop3_bytes_sent_total",
            b"popserv_pop3_commands_total",
            b"popserv_pop3_login_duration_seconds",
            b"popserv_smtp_messages_total",
            b"popserv_smtp_bytes_received_total",
            b"popserv_tls_handshakes_total",
        ):
            self.assertIn(b"# HELP " + name + b" ", body)

    def test_openmetrics_when_asked(self):
        """A scraper that asks for OpenMetrics gets it."""
        body, content_type = self.render(b"application/openmetrics-text; version=1.0.0")
        self.assertTrue(content_type.startswith(b"application/openmetrics-text"))
        self.assertTrue(body.endswith(b"# EOF\n"))


class OptionAndServiceTests(unittest.TestCase):
    def setUp(self):
        root = os.path.abspath(self.mktemp())
        self.config = Config(
            mailroot=os.path.join(root, "mail"),
            users=os.path.join(root, "users"),
            state_dir=os.path.join(root, "state"),
            pop3_listen=("tcp:0:interface=127.0.0.1",),
            pop3s_listen=(),
            smtp_listen=("tcp:0:interface=127.0.0.1",),
            tls_self_signed_dir=os.path.join(root, "tls"),
        )

    def test_option_sets_the_key(self):
        """--metrics ENDPOINT overrides [metrics] listen."""
        options = tap.Options()
        options.parseOptions(["--pop3", "tcp:1110", "--metrics", "tcp:9110:interface=127.0.0.2"])
        self.assertEqual(options["popserv_config"].metrics_listen, "tcp:9110:interface=127.0.0.2")

    def test_bad_endpoint_refused(self):
        """A --metrics string that makes no endpoint stops the start with a line naming it."""
        with self.assertRaises(tap.StartupError) as cm:
            tap.Options().parseOptions(["--pop3", "tcp:1110", "--metrics", "tcp:metrics"])
        self.assertIn("'tcp:metrics'", str(cm.exception))

    def test_off_by_default(self):
        """Without [metrics] listen nothing is served and the protocols count nothing."""
        top = service.make_service(self.config, reactor=MemoryReactorClock())
        self.assertNotIn("metrics", [child.name for child in top])
        self.assertIs(top.getServiceNamed("pop3-0").factory.metrics, NO_METRICS)
        self.assertIs(top.getServiceNamed("smtp-0").factory.metrics, NO_METRICS)

    def test_served_on_its_endpoint(self):
        """[metrics] listen binds a site at privilegedStartService; POP3 and SMTP share one."""
        reactor = MemoryReactorClock()
        config = self.config.replace(metrics_listen="tcp:9110:interface=127.0.0.1")
        top = service.make_service(config, reactor=reactor)
        listener = top.getServiceNamed("metrics")
        self.assertIsInstance(listener.factory, Site)
        pop3_metrics = top.getServiceNamed("pop3-0").factory.metrics
        self.assertIsInstance(pop3_metrics, Metrics)
        self.assertIs(top.getServiceNamed("smtp-0").factory.metrics, pop3_metrics)
        top.privilegedStartService()
        self.addCleanup(top.stopService)
        bound = {port: factory for port, factory, _, _ in reactor.tcpServers}
        self.assertIs(bound[9110], listener.factory)
