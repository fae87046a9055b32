"""Tests for the options of ``twistd popserv`` (popserv.tap) and the service they build."""

import importlib.util
import os
import socket
import stat

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from popserv import service, supervisor, tap
from popserv.config import Config

_COLLABORATORS = ("popserv.auth", "popserv.maildir", "popserv.pop3", "popserv.realm")


#: One POP3 listener on port 0 and no other: makeService binds each port for a moment.
ONE_PORT_0 = ("--pop3", "tcp:0:interface=127.0.0.1", "--pop3s", "", "--smtp", "")


def parse(*argv: str) -> tap.Options:
    """Options parsed from ``argv``, as twistd would."""
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


def write(path: str, text: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class OptionsTests(SynchronousTestCase):
    def test_defaults(self):
        """Without options, the built-in defaults apply."""
        self.assertEqual(parse()["popserv_config"], Config())

    def test_config_file(self):
        """--config reads its settings from the file."""
        path = write(self.mktemp(), "[server]\nmailroot = /srv/mail\n[pop3]\ntimeout = 900\n")
        config = parse("--config", path)["popserv_config"]
        self.assertEqual(config, Config(mailroot="/srv/mail", pop3_timeout=900.0))

    def test_overrides(self):
        """--mailroot, --users and --hostname override the same keys of the config file."""
        path = write(
            self.mktemp(),
            "[server]\nhostname = a.example\nmailroot = /a/mail\nusers = /a/users\n",
        )
        config = parse(
            "--config",
            path,
            "--mailroot",
            "/b/mail",
            "--users",
            "/b/users",
            "--hostname",
            "b.example",
        )["popserv_config"]
        self.assertEqual(config, Config(hostname="b.example", mailroot="/b/mail", users="/b/users"))

    def test_pop3_replaces_listeners(self):
        """Repeated --pop3 options replace the whole listener list of the config file."""
        path = write(self.mktemp(), "[pop3]\nlisten =\n  tcp:110\n  tcp:8110\n")
        config = parse(
            "--config", path, "--pop3", "tcp:1110:interface=127.0.0.1", "--pop3", "unix:pop3.sock"
        )["popserv_config"]
        self.assertEqual(config.pop3_listen, ("tcp:1110:interface=127.0.0.1", "unix:pop3.sock"))

    def test_smtp_and_domains(self):
        """Repeated --smtp and --domain replace [smtp] listen and domains of the config file."""
        path = write(self.mktemp(), "[smtp]\nlisten = tcp:25\ndomains = old.example\n")
        config = parse(
            "--config",
            path,
            "--smtp",
            "tcp:2525:interface=127.0.0.1",
            "--smtp",
            "tcp:25",
            "--domain",
            "Example.ORG.",
            "--domain",
            "localhost",
        )["popserv_config"]
        self.assertEqual(config.smtp_listen, ("tcp:2525:interface=127.0.0.1", "tcp:25"))
        self.assertEqual(config.smtp_domains, ("example.org", "localhost"))

    def test_bad_smtp_endpoint_and_domain(self):
        """A bad --smtp endpoint or --domain name stops the start with a line naming it."""
        with self.assertRaises(tap.StartupError) as cm:
            parse("--smtp", "tcp:notaport")
        self.assertIn("tcp:notaport", str(cm.exception))
        with self.assertRaises(tap.StartupError) as cm:
            parse("--domain", "a@b.example")
        self.assertIn("a@b.example", str(cm.exception))

    def test_empty_listener_turns_off(self):
        """--pop3s '' and --smtp '' leave no POP3S or SMTP listener, whatever the file says."""
        path = write(self.mktemp(), "[pop3s]\nlisten = tcp:995\n[smtp]\nlisten = tcp:25\n")
        config = parse("--config", path, "--pop3s", "", "--smtp", "")["popserv_config"]
        self.assertEqual((config.pop3s_listen, config.smtp_listen), ((), ()))
        self.assertEqual(config.pop3_listen, Config().pop3_listen)

    def test_empty_listener_beside_others(self):
        """An empty --pop3s or --smtp beside real ones adds nothing: the real ones stay."""
        config = parse("--pop3s", "", "--pop3s", "tcp:1995", "--smtp", "tcp:2525", "--smtp", " ")[
            "popserv_config"
        ]
        self.assertEqual((config.pop3s_listen, config.smtp_listen), (("tcp:1995",), ("tcp:2525",)))

    def test_empty_pop3_is_no_listener(self):
        """--pop3 '' alone leaves no POP3 listener, which stops the start with that one line."""
        with self.assertRaises(tap.StartupError) as cm:
            parse("--pop3", "")
        self.assertEqual(
            cm.exception.problems,
            [
                "no POP3 listener: pass --pop3 (e.g. --pop3 tcp:1110:interface=127.0.0.1) "
                "or set [pop3] listen in the config file"
            ],
        )

    def test_mistakes_are_not_usage_errors(self):
        """A mistake is a StartupError (one line, status 1), never a UsageError, for which
        twistd prints its whole usage text; an unknown option points at --help."""
        with self.assertRaises(tap.StartupError) as cm:
            parse("--frob")
        self.assertNotIsInstance(cm.exception, usage.UsageError)
        self.assertEqual(
            str(cm.exception),
            "popserv: option --frob not recognized (twistd popserv --help lists the options)",
        )

    def test_config_listeners_kept(self):
        """Without --pop3, the listeners of the config file stay."""
        path = write(self.mktemp(), "[pop3]\nlisten =\n  tcp:110\n  tcp:8110\n")
        self.assertEqual(
            parse("--config", path)["popserv_config"].pop3_listen, ("tcp:110", "tcp:8110")
        )

    def test_bad_config(self):
        """An unknown key in the config file stops the start naming file and key, and the fix."""
        path = write(self.mktemp(), "[pop3]\nlisen = tcp:110\n")
        with self.assertRaises(tap.StartupError) as cm:
            parse("--config", path)
        message = str(cm.exception)
        self.assertIn(path, message)
        self.assertIn("lisen", message)
        self.assertIn("--config", message)

    def test_missing_config(self):
        """A missing config file stops the start with a line naming it."""
        path = self.mktemp()
        with self.assertRaises(tap.StartupError) as cm:
            parse("--config", path)
        self.assertIn(path, str(cm.exception))

    def test_bad_endpoints(self):
        """A --pop3 string that makes no endpoint stops the start quoting it, with an example."""
        for description in ("nosuch:110", "tcp:pop3", "tcp:110:colour=blue", "tcp"):
            with self.assertRaises(tap.StartupError) as cm:
                parse("--pop3", description)
            message = str(cm.exception)
            self.assertIn(repr(description), message)
            self.assertIn("tcp:1110:interface=127.0.0.1", message)

    def test_bad_endpoint_in_config(self):
        """A listener of the config file is checked like a --pop3 option."""
        path = write(self.mktemp(), "[pop3]\nlisten = tcp:pop3\n")
        with self.assertRaises(tap.StartupError) as cm:
            parse("--config", path)
        self.assertIn("'tcp:pop3'", str(cm.exception))

    def test_endpoints_not_bound(self):
        """Checking listeners binds nothing: a port in use is still accepted."""
        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        busy = f"tcp:{listening.getsockname()[1]}:interface=127.0.0.1"
        self.assertEqual(parse("--pop3", busy)["popserv_config"].pop3_listen, (busy,))

    def test_no_listeners(self):
        """A config file with an empty listener list stops the start suggesting --pop3."""
        path = write(self.mktemp(), "[pop3]\nlisten =\n")
        with self.assertRaises(tap.StartupError) as cm:
            parse("--config", path)
        self.assertIn("--pop3", str(cm.exception))

    def test_empty_path(self):
        """An empty --mailroot or --users stops the start with a line naming the option."""
        for option in ("--mailroot", "--users", "--hostname"):
            with self.assertRaises(tap.StartupError) as cm:
                parse(option, " ")
            self.assertIn(option, str(cm.exception))

    def test_help_documents_every_option(self):
        """--help describes each option, and the overriding ones name the key they override."""
        text = " ".join(str(tap.Options()).split())
        for option in ("--config", "--pop3", "--mailroot", "--users", "--hostname", "--help"):
            self.assertIn(option, text)
        for key in ("[server] mailroot", "[server] users", "[server] hostname", "[pop3] listen"):
            self.assertIn(key, text)
        self.assertIn("etc/popserv.ini", text)


class MakeServiceTests(SynchronousTestCase):
    def test_calls_make_service(self):
        """makeService hands the parsed Config to popserv.service.make_service."""
        calls = []
        built = MultiService()

        def spy(config, foreground):
            calls.append((config, foreground))
            return built

        self.patch(service, "make_service", spy)
        # Port 0 only: makeService binds each port for a moment to find one in use.
        options = parse(*ONE_PORT_0, "--workers", "1")
        self.assertIs(tap.makeService(options), built)
        self.assertEqual(calls, [(options["popserv_config"], True)])

    def test_daemon_listeners(self):
        """Under a twistd that daemonizes (no -n), the service is built for a daemon."""
        calls = []
        self.patch(service, "make_service", lambda config, foreground: calls.append(foreground))
        options = parse(*ONE_PORT_0, "--workers", "1")
        options.parent = {"nodaemon": False}
        tap.makeService(options)
        options.parent = {"nodaemon": True}
        tap.makeService(options)
        self.assertEqual(calls, [False, True])

    def test_port_in_use(self):
        """makeService stops at a port another socket listens on, naming it and the option."""
        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        busy = f"tcp:{listening.getsockname()[1]}:interface=127.0.0.1"
        self.patch(service, "make_service", lambda config, foreground: self.fail("built"))
        options = parse("--pop3", "tcp:0:interface=127.0.0.1", "--smtp", busy, "--pop3s", "")
        with self.assertRaises(tap.StartupError) as cm:
            tap.makeService(options)
        self.assertEqual(
            cm.exception.problems,
            [
                f"cannot listen on {busy} (SMTP): address already in use; stop the other "
                "server or choose another port with --smtp or [smtp] listen"
            ],
        )

    def test_several_workers_make_a_supervisor(self):
        """With --workers above 1, makeService hands the Config to make_supervisor."""
        calls = []
        built = MultiService()

        def spy(config, reactor, foreground):
            calls.append((config.workers, foreground))
            return built

        self.patch(supervisor, "make_supervisor", spy)
        self.patch(service, "make_service", lambda config, foreground: self.fail("built"))
        options = parse(*ONE_PORT_0, "--workers", "3")
        self.assertIs(tap.makeService(options), built)
        self.assertEqual(calls, [(3, True)])

    def test_workers_option(self):
        """--workers overrides [server] workers: a count, or auto; 0 stops the start."""
        self.assertEqual(parse("--workers", "2")["popserv_config"].workers, 2)
        self.assertEqual(parse("--workers", "auto")["popserv_config"].workers, 0)
        with self.assertRaises(tap.StartupError) as cm:
            parse("--workers", "0")
        self.assertEqual(
            cm.exception.problems, ["--workers: [server] workers = '0': must be greater than 0"]
        )

    def test_unshareable_listener_with_workers(self):
        """With several workers, a listener they cannot share (ssl:) stops the start with
        one line; haproxy: over tcp: and unix: are shared, and one worker takes any."""
        from popserv.tls import generate_self_signed

        directory = os.path.abspath(self.mktemp())
        cert, key = generate_self_signed("tap.test", directory)
        ssl = f"ssl:4650:privateKey={key}:certKey={cert}"
        with self.assertRaises(tap.StartupError) as cm:
            parse("--workers", "2", "--smtp", ssl)
        self.assertEqual(
            cm.exception.problems,
            [
                f"[smtp] listen = {ssl}: several workers cannot share this listener; use "
                "tcp, tcp6, unix, systemd (or haproxy: before one of them), or set "
                "[server] workers = 1"
            ],
        )
        parse("--workers", "2", "--pop3", "haproxy:tcp:1110", "--pop3", "unix:/tmp/p.sock")
        parse("--workers", "1", "--smtp", ssl)


def _missing_collaborators():
    missing = [name for name in _COLLABORATORS if importlib.util.find_spec(name) is None]
    return f"not written yet: {', '.join(missing)}" if missing else None


class ServiceTests(SynchronousTestCase):
    """popserv.service.make_service, checked on a memory reactor: nothing binds."""

    skip = _missing_collaborators()

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.reactor = MemoryReactorClock()
        self.config = Config(
            mailroot=os.path.join(self.root, "data", "mail"),
            users=os.path.join(self.root, "etc", "users"),
            state_dir=os.path.join(self.root, "data", "state"),
            pop3_listen=("tcp:0:interface=127.0.0.1", "tcp:1110"),
            pop3s_listen=(),
            smtp_listen=(),
            tls_self_signed_dir=os.path.join(self.root, "data", "tls"),
        )

    def make(self, config=None):
        return service.make_service(config or self.config, reactor=self.reactor)

    def test_one_named_listener_per_endpoint(self):
        """Each listener becomes a named StreamServerEndpointService serving a POP3Factory."""
        from popserv.pop3 import POP3Factory

        top = self.make()
        self.assertIsInstance(top, MultiService)
        children = [child for child in top if (child.name or "").startswith("pop3-")]
        self.assertEqual(len(children), 2)
        self.assertEqual([child.name for child in children], ["pop3-0", "pop3-1"])
        for child in children:
            self.assertIsInstance(child, StreamServerEndpointService)
            self.assertIsInstance(child.factory, POP3Factory)
        self.assertIs(children[0].factory, children[1].factory)

    def test_binds_when_started(self):
        """Endpoints listen at privilegedStartService, on the addresses of the config."""
        top = self.make()
        self.assertEqual(self.reactor.tcpServers, [])
        top.privilegedStartService()
        self.addCleanup(top.stopService)
        bound = [(port, interface) for port, _, _, interface in self.reactor.tcpServers]
        self.assertEqual(bound, [(0, "127.0.0.1"), (1110, "")])
        factories = {factory for _, factory, _, _ in self.reactor.tcpServers}
        self.assertEqual(factories, {top.getServiceNamed("pop3-0").factory})

    def test_smtp_listeners(self):
        """Each SMTP listener is a named service sharing one SMTPFactory; tmp/ cleanup is there."""
        from popserv.delivery import StaleTempCleaner
        from popserv.smtp import SMTPFactory

        top = self.make(self.config.replace(smtp_listen=("tcp:0:interface=127.0.0.1", "tcp:2525")))
        children = [child for child in top if (child.name or "").startswith("smtp-")]
        self.assertEqual([child.name for child in children], ["smtp-0", "smtp-1"])
        self.assertIsInstance(children[0].factory, SMTPFactory)
        self.assertIs(children[0].factory, children[1].factory)
        self.assertEqual(len([c for c in top if isinstance(c, StaleTempCleaner)]), 1)
        top.privilegedStartService()
        self.addCleanup(top.stopService)
        bound = [(port, interface) for port, _, _, interface in self.reactor.tcpServers]
        self.assertEqual(bound, [(0, "127.0.0.1"), (1110, ""), (0, "127.0.0.1"), (2525, "")])

    def test_recovery_before_listeners(self):
        """Unfinished deliveries are rolled back by a service that starts before any listener."""
        from popserv.delivery import DeliveryRecovery

        for config in (self.config, self.config.replace(smtp_listen=("tcp:2525",))):
            children = list(self.make(config))
            [recovery] = [c for c in children if isinstance(c, DeliveryRecovery)]
            self.assertEqual(
                recovery.journal_dir,
                os.path.join(os.path.abspath(config.mailroot), ".popserv-deliveries"),
            )
            listeners = [c for c in children if (c.name or "").startswith(("pop3", "smtp-"))]
            self.assertTrue(listeners)
            self.assertLess(children.index(recovery), min(map(children.index, listeners)))

    def test_no_smtp(self):
        """An empty [smtp] listen starts no SMTP service."""
        from popserv.delivery import StaleTempCleaner

        top = self.make()
        self.assertEqual([c for c in top if (c.name or "").startswith("smtp-")], [])
        self.assertEqual([c for c in top if isinstance(c, StaleTempCleaner)], [])

    def test_creates_private_storage(self):
        """A missing mailroot (0700) and users file (0600, in a new directory) are created."""
        self.make()
        mailroot = os.stat(self.config.mailroot)
        self.assertTrue(stat.S_ISDIR(mailroot.st_mode))
        self.assertEqual(stat.S_IMODE(mailroot.st_mode), 0o700)
        users = os.stat(self.config.users)
        self.assertTrue(stat.S_ISREG(users.st_mode))
        self.assertEqual(stat.S_IMODE(users.st_mode), 0o600)
        self.assertEqual(users.st_size, 0)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(self.config.users)).st_mode), 0o700)

    def test_keeps_existing_storage(self):
        """An existing users file and mailroot are left as they are."""
        os.makedirs(self.config.mailroot, mode=0o750)
        os.chmod(self.config.mailroot, 0o750)
        os.makedirs(os.path.dirname(self.config.users))
        write(self.config.users, "")
        os.chmod(self.config.users, 0o640)
        self.make()
        self.assertEqual(stat.S_IMODE(os.stat(self.config.mailroot).st_mode), 0o750)
        self.assertEqual(stat.S_IMODE(os.stat(self.config.users).st_mode), 0o640)

    def test_relative_paths(self):
        """Relative paths are taken from the directory popserv starts in."""
        os.makedirs(self.root)
        cwd = os.getcwd()
        os.chdir(self.root)
        self.addCleanup(os.chdir, cwd)
        self.make(Config(pop3_listen=("tcp:0",)))
        self.assertTrue(os.path.isdir(os.path.join(self.root, "popserv-data", "mail")))
        self.assertTrue(os.path.isfile(os.path.join(self.root, "popserv-data", "users")))

    def test_logs_listeners_and_paths(self):
        """One event names the listeners, the mailroot and the users file."""
        from twisted.internet.testing import EventLoggingObserver

        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.make()
        events = [e for e in observer if e.get("log_namespace") == "popserv.service"]
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["listeners"], "tcp:0:interface=127.0.0.1, tcp:1110")
        self.assertEqual(events[0]["mailroot"], self.config.mailroot)
        self.assertEqual(events[0]["users"], self.config.users)
