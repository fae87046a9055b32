"""Tests for popserv.config and for etc/popserv.ini, which must show every key at its default."""

import os
import re

from twisted.trial.unittest import SynchronousTestCase

from popserv.config import (
    _KEYS,
    Config,
    ConfigError,
    config_from_string,
    parse_config,
    read_config,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "etc", "popserv.ini")

EVERY_KEY = """\
[server]
hostname = mail.example.org
mailroot = /var/mail/popserv
users = /etc/popserv/users
user = popserv
log_level = debug
state_dir = /var/lib/popserv/state
proxy_timeout = 2.5
workers = 3

[pop3]
listen =
    tcp:110
    tcp:1110:interface=127.0.0.1
timeout = 900
login_timeout = 30.5
failure_delay = 0
failure_delay_max = 4
login_delay = 300
max_connections = 500
max_connections_per_peer = 5
max_bad_commands = 3
max_failures = 4
dovecot_uidl_format = %v.%u
dovecot_reuse_xuidl = yes
mark_seen = no
expire = 30

[pop3s]
listen = tcp:9995:interface=127.0.0.1

[tls]
cert = /etc/ssl/pop.pem
key = /etc/ssl/pop.key
self_signed_dir = /var/lib/popserv/tls

[auth]
trusted_networks = 10.0.0.0/8, fd00::/8
allow_plaintext = yes
mechanisms = plain, SCRAM-SHA-256
apop = yes
max_verifications = 2
max_waiting_per_peer = 30
cache_ttl = 600.5
cache_size = 50

[smtp]
listen =
    tcp:25
    tcp:2525:interface=::1
domains = Example.ORG, mail.example.org. localhost
max_message_size = 1048576
max_recipients = 10
max_line_length = 2000
timeout = 600
max_connections = 200
max_connections_per_peer = 5
max_bad_commands = 7
max_rejected_recipients = 8
postmaster = admin@example.org

[quota]
storage = 100M
messages = 5000
full_tempfail = yes
[metrics]
listen = tcp:9110:interface=127.0.0.1

[log]
format = JSON
file = /var/log/popserv/popserv.log
max_size = 1M
keep = 3

[cluster]
database = postgresql://popserv@db.example.org/popserv
node = pop-2
lock_timeout = 4
"""


class ConfigFromStringTests(SynchronousTestCase):
    def test_empty(self):
        """An empty text gives the built-in defaults."""
        self.assertEqual(config_from_string(""), Config())

    def test_every_key(self):
        """Every key of every section sets its Config field, parsed to its type."""
        self.assertEqual(
            config_from_string(EVERY_KEY),
            Config(
                hostname="mail.example.org",
                mailroot="/var/mail/popserv",
                users="/etc/popserv/users",
                user="popserv",
                log_level="debug",
                state_dir="/var/lib/popserv/state",
                proxy_timeout=2.5,
                workers=3,
                pop3_listen=("tcp:110", "tcp:1110:interface=127.0.0.1"),
                pop3_timeout=900.0,
                pop3_login_timeout=30.5,
                pop3_failure_delay=0.0,
                pop3_failure_delay_max=4.0,
                pop3_login_delay=300,
                pop3_max_connections=500,
                pop3_max_connections_per_peer=5,
                pop3_max_bad_commands=3,
                pop3_max_failures=4,
                pop3_dovecot_uidl_format="%v.%u",
                pop3_dovecot_reuse_xuidl=True,
                pop3_mark_seen=False,
                pop3_expire=30,
                pop3s_listen=("tcp:9995:interface=127.0.0.1",),
                tls_cert="/etc/ssl/pop.pem",
                tls_key="/etc/ssl/pop.key",
                tls_self_signed_dir="/var/lib/popserv/tls",
                auth_trusted_networks=("10.0.0.0/8", "fd00::/8"),
                auth_allow_plaintext=True,
                auth_mechanisms=("PLAIN", "SCRAM-SHA-256"),
                auth_apop=True,
                auth_max_verifications=2,
                auth_max_waiting_per_peer=30,
                auth_cache_ttl=600.5,
                auth_cache_size=50,
                smtp_listen=("tcp:25", "tcp:2525:interface=::1"),
                smtp_domains=("example.org", "mail.example.org", "localhost"),
                smtp_max_message_size=1048576,
                smtp_max_recipients=10,
                smtp_max_line_length=2000,
                smtp_timeout=600.0,
                smtp_max_connections=200,
                smtp_max_connections_per_peer=5,
                smtp_max_bad_commands=7,
                smtp_max_rejected_recipients=8,
                smtp_postmaster="admin@example.org",
                quota_storage=100 * 1024 * 1024,
                quota_messages=5000,
                quota_full_tempfail=True,
                metrics_listen="tcp:9110:interface=127.0.0.1",
                log_format="json",
                log_file="/var/log/popserv/popserv.log",
                log_max_size=1024 * 1024,
                log_keep=3,
                cluster_database="postgresql://popserv@db.example.org/popserv",
                cluster_node="pop-2",
                cluster_lock_timeout=4.0,
            ),
        )

    def test_every_key_is_exercised(self):
        """The text above sets every key that config.py knows, so none goes untested."""
        parsed = {
            (section, key)
            for section, key in _KEYS
            if re.search(rf"^{key} =", EVERY_KEY.split(f"[{section}]")[1], re.M)
        }
        self.assertEqual(parsed, set(_KEYS))

    def test_workers(self):
        """[server] workers is auto (0: one per CPU) or a count of at least one."""
        self.assertEqual(config_from_string("[server]\nworkers = auto\n").workers, 0)
        self.assertEqual(config_from_string("[server]\nworkers = AUTO\n").workers, 0)
        self.assertEqual(config_from_string("[server]\nworkers = 1\n").workers, 1)
        for value in ("0", "-2", "many"):
            with self.assertRaises(ConfigError) as cm:
                config_from_string(f"[server]\nworkers = {value}\n")
            self.assertIn("[server] workers", str(cm.exception))

    def test_bad_log_values(self):
        """An unknown log format, a size that is none, or keeping no file is an error."""
        for text, key in [
            ("[log]\nformat = xml\n", "format"),
            ("[log]\nmax_size = big\n", "max_size"),
            ("[log]\nkeep = 0\n", "keep"),
        ]:
            with self.assertRaises(ConfigError) as cm:
                config_from_string(text, "popserv.ini")
            self.assertIn(f"[log] {key}", str(cm.exception))

    def test_bad_smtp_values(self):
        """A zero size limit or a domain with an '@' is an error naming the key."""
        for text, key in [
            ("[smtp]\nmax_message_size = 0\n", "max_message_size"),
            ("[smtp]\ndomains = example.org a@b\n", "domains"),
        ]:
            with self.assertRaises(ConfigError) as cm:
                config_from_string(text)
            self.assertIn(key, str(cm.exception))

    def test_bad_uidl_format(self):
        """A Dovecot UIDL format with an unknown or unusable variable is an error naming it."""
        for value, named in [("%08Xu%q", "%q"), ("%m", "%m"), ("uidl", "no variable")]:
            with self.assertRaises(ConfigError) as cm:
                config_from_string(f"[pop3]\ndovecot_uidl_format = {value}\n")
            self.assertIn("dovecot_uidl_format", str(cm.exception))
            self.assertIn(named, str(cm.exception))

    def test_bad_network(self):
        """A trusted network that is not an address or CIDR block is an error naming it."""
        with self.assertRaises(ConfigError) as cm:
            config_from_string("[auth]\ntrusted_networks = 10.0.0.0/8 lan\n")
        self.assertIn("trusted_networks", str(cm.exception))

    def test_unknown_mechanism(self):
        """An unknown SASL mechanism is an error naming it."""
        with self.assertRaises(ConfigError) as cm:
            config_from_string("[auth]\nmechanisms = PLAIN GSSAPI\n")
        self.assertIn("GSSAPI", str(cm.exception))

    def test_bad_boolean(self):
        """A yes/no key with another value is an error."""
        with self.assertRaises(ConfigError):
            config_from_string("[auth]\nallow_plaintext = maybe\n")

    def test_listeners_skip_blank_lines(self):
        """A multi-line listen value gives one listener per non-blank line, stripped."""
        config = config_from_string("[pop3]\nlisten =\n  tcp:110\n\n  unix:/run/pop3.sock  \n")
        self.assertEqual(config.pop3_listen, ("tcp:110", "unix:/run/pop3.sock"))

    def test_single_line_listener(self):
        """A listen value on one line is a list of one listener."""
        config = config_from_string("[pop3]\nlisten = tcp:995\n")
        self.assertEqual(config.pop3_listen, ("tcp:995",))

    def test_unknown_section(self):
        """An unknown section is an error naming the source and the section."""
        with self.assertRaises(ConfigError) as cm:
            config_from_string("[smtpd]\nlisten = tcp:25\n", source="site.ini")
        self.assertIn("site.ini", str(cm.exception))
        self.assertIn("[smtpd]", str(cm.exception))

    def test_unknown_key(self):
        """An unknown key is an error naming the source, section and key."""
        with self.assertRaises(ConfigError) as cm:
            config_from_string("[pop3]\nlisten = tcp:110\ntimout = 5\n", source="site.ini")
        message = str(cm.exception)
        self.assertIn("site.ini", message)
        self.assertIn("[pop3]", message)
        self.assertIn("timout", message)

    def test_key_in_wrong_section(self):
        """A known key under the wrong section is unknown there."""
        with self.assertRaises(ConfigError) as cm:
            config_from_string("[server]\ntimeout = 5\n", source="site.ini")
        self.assertIn("timeout", str(cm.exception))
        self.assertIn("[server]", str(cm.exception))

    def test_bad_values(self):
        """A value that does not parse is an error naming the file, section, key and value."""
        cases = [
            ("pop3", "timeout", "soon"),
            ("pop3", "timeout", "0"),
            ("pop3", "login_timeout", "-1"),
            ("pop3", "failure_delay", "-0.5"),
            ("pop3", "login_delay", "1.5"),
            ("pop3", "login_delay", "-1"),
            ("server", "mailroot", ""),
            ("server", "users", ""),
            ("auth", "cache_ttl", "-1"),
            ("auth", "cache_ttl", "1h"),
            ("auth", "cache_size", "0"),
        ]
        for section, key, value in cases:
            try:
                config_from_string(f"[{section}]\n{key} = {value}\n", source="site.ini")
            except ConfigError as e:
                message = str(e)
            else:
                self.fail(f"[{section}] {key} = {value!r} was accepted")
            for part in ("site.ini", f"[{section}]", key, repr(value)):
                self.assertIn(part, message)

    def test_every_problem_at_once(self):
        """Three mistakes in one file are one error with a line for each, not the first alone."""
        text = "[pop3]\ntimout = 5\n[auth]\napop = maybe\n[smtpd]\nlisten = tcp:25\n"
        with self.assertRaises(ConfigError) as cm:
            config_from_string(text, source="site.ini")
        self.assertEqual(
            str(cm.exception).splitlines(),
            [
                "site.ini: unknown key 'timout' in section [pop3]",
                "site.ini: [auth] apop = 'maybe': must be yes or no",
                "site.ini: unknown section [smtpd]",
            ],
        )

    def test_parse_config_keeps_the_good_values(self):
        """parse_config gives the valid settings and the list of problems, for popserv check."""
        config, problems = parse_config("[pop3]\ntimeout = 5\nlogin_timeout = never\n", "a.ini")
        self.assertEqual(config, Config(pop3_timeout=5.0))
        self.assertEqual(len(problems), 1)
        self.assertIn("login_timeout", problems[0])

    def test_syntax_error(self):
        """Text that is not INI is an error naming the source."""
        with self.assertRaises(ConfigError) as cm:
            config_from_string("listen = tcp:110\n", source="site.ini")
        self.assertIn("site.ini", str(cm.exception))


class ReadConfigTests(SynchronousTestCase):
    def test_reads_file(self):
        """read_config parses the file it is given."""
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write("[server]\nmailroot = /srv/mail\n")
        self.assertEqual(read_config(path), Config(mailroot="/srv/mail"))

    def test_missing_file(self):
        """A missing file is a ConfigError naming the path and the reason."""
        path = self.mktemp()
        with self.assertRaises(ConfigError) as cm:
            read_config(path)
        self.assertIn(path, str(cm.exception))
        self.assertIn("No such file", str(cm.exception))

    def test_errors_name_the_file(self):
        """Errors inside a file name that file."""
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write("[pop3]\nbogus = 1\n")
        with self.assertRaises(ConfigError) as cm:
            read_config(path)
        self.assertIn(path, str(cm.exception))
        self.assertIn("bogus", str(cm.exception))


class SampleFileTests(SynchronousTestCase):
    def test_sample_matches_defaults(self):
        """etc/popserv.ini sets every key to the built-in default (hostname is per machine)."""
        config = read_config(SAMPLE)
        self.assertEqual(config.replace(hostname=Config().hostname), Config())

    def test_sample_shows_every_key(self):
        """Every known key appears in etc/popserv.ini under its own section."""
        with open(SAMPLE, encoding="utf-8") as f:
            text = f.read()
        sections = dict(re.findall(r"^\[(\w+)\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S))
        for section, key in _KEYS:
            self.assertIn(section, sections)
            self.assertRegex(sections[section], rf"(?m)^(# )?{key} =", (section, key))
