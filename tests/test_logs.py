"""Tests for popserv.logs: JSON lines, the [log] file and its rotation, how twistd is
handed the observer, and real ``twistd popserv`` processes writing JSON and text logs.

Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import os
import poplib
import subprocess
import sys

from twisted.application.service import Application, IServiceCollection, MultiService
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from popserv import logs, service, supervisor, tap
from popserv.config import ConfigError
from popserv.logs import LogSettings, event_as_json, json_file_observer
from popserv.logsafe import untrusted
from popserv.startup import StartupError
from tests.live_twistd import REPO, TWISTD, TwistdServer, wait_for_greeting
from tests.test_fail2ban import FAILED_LOGIN, FORGED, fail2ban_regex, failed_login_form

#: A user name a client chose: line ends, quotes, a backslash, an escape and non-ASCII.
NASTY = 'eve"\n\r\\ \x1b[31m caf\u00e9 \u2028' + FORGED


def emitted(**fields) -> dict:
    """The one event a Logger in namespace popserv.test sends for ``fields``."""
    events = []
    publisher = LogPublisher(events.append)
    log = Logger(namespace="popserv.test", observer=publisher)
    log.info("pop3.login_failed: peer={peer} user={user} reason={reason}", **fields)
    (event,) = events
    return event


class EventAsJSONTests(SynchronousTestCase):
    def test_fields_are_keys(self):
        """The event's fields are keys, beside time (ISO 8601 UTC), level, namespace and
        the message as the text log shows it; no log_ key is left."""
        event = emitted(peer="192.0.2.7", user="alice", reason="bad-credentials")
        midnight = datetime.datetime(2026, 12, 4, tzinfo=datetime.timezone.utc).timestamp()
        event["log_time"] = midnight + 0.25
        record = json.loads(event_as_json(event))
        self.assertEqual(
            record,
            {
                "peer": "192.0.2.7",
                "user": "alice",
                "reason": "bad-credentials",
                "time": "2026-12-04T00:00:00.250000Z",
                "level": "info",
                "namespace": "popserv.test",
                "message": "pop3.login_failed: peer=192.0.2.7 user=alice reason=bad-credentials",
            },
        )
        when = datetime.datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
        self.assertEqual(when.timestamp(), midnight + 0.25)

    def test_client_text_stays_on_one_line(self):
        """A user name with line ends, quotes and escapes is one line of ASCII, and parses
        back to the exact name; the message holds the quoted form."""
        event = emitted(peer="127.0.0.1", user=untrusted(NASTY), reason="bad-credentials")
        line = event_as_json(event)
        self.assertEqual(len(line.splitlines()), 1)
        self.assertTrue(line.isascii())
        self.assertTrue(line.isprintable())
        record = json.loads(line)
        self.assertEqual(record["user"], NASTY)
        self.assertEqual(record["message"], formatEvent(event))
        self.assertNotIn("\n", record["message"])

    def test_values_json_cannot_hold_become_text(self):
        """Objects, bytes, sets, odd keys and NaN become strings; the line still parses."""

        class Thing:
            def __str__(self):
                return "a thing"

        event = {
            "log_format": "odd",
            "log_level": LogLevel.warn,
            "thing": Thing(),
            "raw": b"\xffabc",
            "numbers": (1, 2.5),
            "nested": {("a", 1): {3}},
            "nan": float("nan"),
            "level_field": LogLevel.error,
        }
        record = json.loads(event_as_json(event))
        self.assertEqual(record["thing"], "a thing")
        self.assertEqual(record["raw"], "\\xffabc")
        self.assertEqual(record["numbers"], [1, 2.5])
        self.assertEqual(record["nested"], {"('a', 1)": [3]})
        self.assertEqual(record["nan"], "nan")
        self.assertEqual(record["level_field"], str(LogLevel.error))
        self.assertEqual(record["level"], "warn")

    def test_reserved_keys_win(self):
        """A field named like a reserved key gives way to it."""
        event = emitted(peer="p", user="u", reason="r")
        event.update(message=("legacy",), time=0, level="x", namespace="y")
        record = json.loads(event_as_json(event))
        self.assertEqual(record["message"], "pop3.login_failed: peer=p user=u reason=r")
        self.assertEqual((record["level"], record["namespace"]), ("info", "popserv.test"))
        self.assertNotEqual(record["time"], 0)

    def test_failure_traceback(self):
        """An event with a failure carries its traceback, still on one line."""
        failure = Failure(ZeroDivisionError("division by zero"))
        events = []
        Logger(namespace="popserv.test", observer=events.append).failure("boom", failure)
        line = event_as_json(events[0])
        record = json.loads(line)
        self.assertEqual((record["message"], record["level"]), ("boom", "critical"))
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertEqual(len(line.splitlines()), 1)


class ObserverTests(SynchronousTestCase):
    def test_one_line_per_event(self):
        """Each event is one line ending in LF, with no record separator."""
        out = io.StringIO()
        observer = json_file_observer(out)
        log = Logger(namespace="popserv.test", observer=observer)
        log.info("one {user}", user=untrusted("a\nb"))
        log.warn("two")
        text = out.getvalue()
        self.assertNotIn("\x1e", text)
        lines = text.split("\n")
        self.assertEqual(lines[-1], "")
        self.assertEqual([json.loads(line)["level"] for line in lines[:-1]], ["info", "warn"])

    def test_json_stdout(self):
        """twistd --logger popserv.logs.json_stdout: JSON lines on standard output."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        observer = logs.json_stdout()
        self.assertTrue(ILogObserver.providedBy(observer))
        Logger(namespace="popserv.test", observer=observer).info("hello {who}", who="you")
        self.assertEqual(json.loads(out.getvalue())["who"], "you")


class RotationTests(SynchronousTestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "popserv.log")

    def write_events(self, settings: LogSettings, count: int) -> None:
        observer = logs.observer_for(settings, {})
        log = Logger(namespace="popserv.test", observer=observer)
        for n in range(count):
            log.info("pop3.login_failed: peer={peer} user={user}", peer="127.0.0.1", user=n)

    def test_keeps_at_most_keep_files(self):
        """With max_size 1k and keep 2, many events leave the file and two rotated ones,
        each no bigger than max_size plus one line, every line whole JSON."""
        self.write_events(LogSettings("json", self.path, 1024, 2), 300)
        self.assertEqual(
            sorted(os.listdir(self.directory)), ["popserv.log", "popserv.log.1", "popserv.log.2"]
        )
        users = []
        for name in ("popserv.log.2", "popserv.log.1", "popserv.log"):
            with open(os.path.join(self.directory, name), encoding="ascii") as f:
                text = f.read()
            self.assertLess(len(text), 1024 + 300)
            users += [json.loads(line)["user"] for line in text.splitlines()]
        self.assertEqual(users, list(range(300 - len(users), 300)))

    def test_zero_never_rotates(self):
        """max_size 0 keeps one file, however big."""
        self.write_events(LogSettings("text", self.path, 0, 2), 300)
        self.assertEqual(os.listdir(self.directory), ["popserv.log"])
        self.assertGreater(os.path.getsize(self.path), 300 * 50)

    def test_text_form_is_twistds(self):
        """A text [log] file has twistd's lines, the form etc/fail2ban reads."""
        observer = logs.observer_for(LogSettings("text", self.path), {})
        Logger(namespace="popserv.pop3", observer=observer).info(
            "pop3.login_failed: peer={peer} user={user} reason={reason}",
            peer="192.0.2.7",
            user=untrusted("x y"),
            reason="bad-credentials",
        )
        with open(self.path, encoding="utf-8") as f:
            (line,) = f.read().splitlines()
        match = FAILED_LOGIN.match(line)
        self.assertIsNotNone(match, line)
        self.assertEqual((match["peer"], match["user"]), ("192.0.2.7", '"x y"'))


class DestinationTests(SynchronousTestCase):
    def test_text_without_file_is_twistds(self):
        """format = text and no file: no observer; twistd logs as it always did."""
        self.assertIsNone(logs.observer_for(LogSettings(), {"logfile": "x.log"}))
        logs.check_settings(LogSettings(), {"syslog": True})

    def test_twistd_logger_wins(self):
        """twistd --logger chooses the log: [log] opens no file and checks nothing."""
        missing = os.path.join(os.path.abspath(self.mktemp()), "popserv.log")
        settings = LogSettings("json", file=os.path.join(missing, "x.log"))
        twistd_options = {"logger": logs.json_stdout}
        logs.check_settings(settings, twistd_options)
        self.assertIsNone(logs.observer_for(LogSettings("json", file=missing), twistd_options))
        self.assertFalse(os.path.exists(missing))

    def test_json_to_stdout_under_nodaemon(self):
        """JSON without a file goes to standard output under twistd -n (or --logfile=-)."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        for twistd_options in ({"nodaemon": True}, {"nodaemon": True, "logfile": "-"}):
            observer = logs.observer_for(LogSettings("json"), twistd_options)
            Logger(observer=observer).info("to stdout")
        self.assertEqual(len(out.getvalue().splitlines()), 2)

    def test_json_to_twistds_logfile(self):
        """JSON without a file goes to twistd's --logfile, rotated with max_size/keep."""
        path = os.path.join(os.path.abspath(self.mktemp()))
        observer = logs.observer_for(LogSettings("json", max_size=100, keep=1), {"logfile": path})
        log = Logger(observer=observer)
        for _ in range(5):
            log.info("into twistd's file")
        self.assertTrue(os.path.exists(path + ".1"))
        self.assertFalse(os.path.exists(path + ".2"))

    def test_unwritable_settings_refused(self):
        """A missing directory, JSON to --syslog, or a daemon on stdout is refused."""
        missing = os.path.join(os.path.abspath(self.mktemp()), "no", "popserv.log")
        for settings, twistd_options, words in [
            (LogSettings(file=missing), {}, "does not exist"),
            (LogSettings("json"), {"syslog": True}, "--syslog"),
            (LogSettings("json"), {"logfile": "-"}, "standard output"),
        ]:
            with self.assertRaises(ConfigError) as cm:
                logs.check_settings(settings, twistd_options)
            self.assertIn(words, str(cm.exception))
            self.assertIn("[log]", str(cm.exception))

    def test_usage_error(self):
        """twistd popserv stops with one line naming [log] file before it starts."""
        missing = os.path.join(os.path.abspath(self.mktemp()), "no", "popserv.log")
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(f"[log]\nfile = {missing}\n")
        options = tap.Options()
        options.parent = {"nodaemon": True}
        with self.assertRaises(StartupError) as cm:
            options.parseOptions(["--config", path])
        self.assertIn(f"[log] file = {missing}", str(cm.exception))


class ApplicationTests(SynchronousTestCase):
    def make(self, text: str) -> tuple[object, MultiService]:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        options = tap.Options()
        options.parent = {"nodaemon": True}
        options.parseOptions(["--config", path])
        built = MultiService()
        self.patch(service, "make_service", lambda config, **kwargs: built)
        self.patch(supervisor, "make_supervisor", lambda config, **kwargs: built)
        return tap.makeService(options), built

    def test_observer_is_the_applications(self):
        """With [log] set, the service twistd adds to its application makes the observer
        the application's ILogObserver, which twistd prefers to its --logfile."""
        log_path = os.path.join(os.path.abspath(self.mktemp()))
        made, built = self.make(f"[log]\nformat = json\nfile = {log_path}\n")
        application = Application("popserv")
        made.setServiceParent(application)
        observer = application.getComponent(ILogObserver)
        self.assertIs(observer, made.observer)
        self.assertIn(made, list(IServiceCollection(application)))
        self.assertEqual(list(made), [built])
        Logger(observer=observer).info("hello {who}", who="file")
        with open(log_path, encoding="ascii") as f:
            self.assertEqual(json.loads(f.read())["who"], "file")

    def test_default_leaves_twistd_alone(self):
        """Without [log] settings the server itself is returned, and twistd logs as before."""
        made, built = self.make("")
        self.assertIs(made, built)


class LiveJSONTests(SynchronousTestCase):
    """A real twistd -n popserv with [log] format = json and [log] file."""

    def test_json_file(self):
        """Every line of the file is JSON; failed logins are events with the peer and the
        user exactly as the client sent it; twistd's --logfile stays unused."""
        log_path = os.path.join(os.path.abspath(self.mktemp()))
        server = TwistdServer(
            self, {"alice": "secret"}, settings={"log": {"format": "json", "file": log_path}}
        )
        server.start()
        client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=10)
        self.addCleanup(client.close)
        client.user("alice")
        with self.assertRaises(poplib.error_proto):
            client.pass_("wrong")
        plain = base64.b64encode(b"\0" + NASTY.encode() + b"\0wrong").decode()
        with self.assertRaises(poplib.error_proto):
            client._shortcmd(f"AUTH PLAIN {plain}")
        client.quit()
        server.stop()
        with open(log_path, "rb") as f:
            data = f.read()
        self.assertNotIn(b"\x1e", data)
        records = [json.loads(line) for line in data.decode("ascii").splitlines()]
        failed = [r for r in records if r["message"].startswith("pop3.login_failed:")]
        self.assertEqual(
            [(r["peer"], r["user"], r["reason"]) for r in failed],
            [("127.0.0.1", "alice", "bad-credentials"), ("127.0.0.1", NASTY, "bad-credentials")],
        )
        self.assertEqual({(r["namespace"], r["level"]) for r in failed}, {("popserv.pop3", "info")})
        self.assertIn("Server Shut Down.", [r["message"] for r in records])
        self.assertEqual(server.log(), "")


class LiveTextRotationTests(SynchronousTestCase):
    """A real twistd -n popserv writing twistd's text lines to a small, rotated [log] file."""

    def start(self, max_size: str) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.log_path = os.path.join(self.directory, "popserv.log")
        settings = {"log": {"file": self.log_path, "max_size": max_size, "keep": "2"}}
        self.server = TwistdServer(self, {"alice": "secret"}, settings=settings)
        self.server.start()

    def fail_logins(self, count: int) -> None:
        for n in range(count):
            client = poplib.POP3("127.0.0.1", self.server.pop3_port, timeout=10)
            try:
                client.user(f"nobody{n}")
                with self.assertRaises(poplib.error_proto):
                    client.pass_("wrong")
            finally:
                client.close()

    def test_rotation_keeps_two(self):
        """Far more than 2k of log leaves the file and at most 2 rotated ones, whose
        failed-login lines keep the form fail2ban reads."""
        self.start("2k")
        self.fail_logins(40)
        self.server.stop()
        self.assertEqual(
            sorted(os.listdir(self.directory)), ["popserv.log", "popserv.log.1", "popserv.log.2"]
        )
        lines = []
        for name in ("popserv.log.2", "popserv.log.1", "popserv.log"):
            with open(os.path.join(self.directory, name), encoding="utf-8") as f:
                text = f.read()
            self.assertLess(len(text), 2048 + 500)
            lines += text.splitlines()
        failed = [line for line in lines if "pop3.login_failed" in line]
        self.assertTrue(failed)
        for line in failed:
            self.assertRegex(line, failed_login_form(self.server.worker_count))
        self.assertEqual(failed[-1].split(" user=")[1].split()[0], "nobody39")

    def test_fail2ban_reads_the_file(self):
        """fail2ban-regex with etc/fail2ban's filter counts the failures in a [log] file."""
        self.start("1M")
        self.fail_logins(3)
        self.server.stop()
        lines, matched, ips = fail2ban_regex(self.log_path)
        self.assertEqual((matched, ips), (3, ["127.0.0.1"] * 3))
        self.assertGreater(lines, matched)


class LiveLoggerOptionTests(SynchronousTestCase):
    """twistd --logger popserv.logs.json_stdout, for journald and log shippers."""

    def test_json_stdout(self):
        """twistd -n --logger popserv.logs.json_stdout popserv writes JSON lines to stdout."""
        server = TwistdServer(self, {"alice": "secret"})
        process = subprocess.Popen(
            [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "--logger"]
            + ["popserv.logs.json_stdout", "popserv", "--config", server.config_path],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(process.wait, 10)
        self.addCleanup(process.kill)
        self.assertTrue(wait_for_greeting(server.pop3_port, process), "twistd did not start")
        self.assertIsNone(process.poll(), "twistd exited")
        process.terminate()
        out, _ = process.communicate(timeout=10)
        records = [json.loads(line) for line in out.decode("ascii").splitlines()]
        namespaces = {r["namespace"] for r in records}
        self.assertIn("popserv.service", namespaces)
        started = [r for r in records if r["namespace"] == "popserv.service"][0]
        self.assertEqual(started["hostname"], "twistd.test")
        self.assertEqual(server.log(), "")
