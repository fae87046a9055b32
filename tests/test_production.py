"""Running popserv in production: secret-file modes, the descriptor limit, dropping root
after binding (popserv.process), and the systemd units in etc/, checked with systemd's
own tools.  Nothing here changes the test process's user; sockets are on 127.0.0.1.
"""

import fcntl
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from popserv import process, service, tap
from popserv.config import Config
from tests.live import require_client
from tests.live_smtp import free_port
from tests.live_twistd import REPO, TWISTD, write_private


class FakeOS:
    """The os functions ProcessSetup uses, recording calls instead of changing the process."""

    def __init__(self, calls: list, euid: int = 0):
        self.calls = calls
        self.uid = self.euid = euid

    def geteuid(self):
        return self.euid

    def getuid(self):
        return self.uid

    def chown(self, path, uid, gid):
        self.calls.append(("chown", path, uid, gid))

    def initgroups(self, name, gid):
        self.calls.append(("initgroups", name, gid))

    def setgid(self, gid):
        self.calls.append(("setgid", gid))

    def setuid(self, uid):
        self.calls.append(("setuid", uid))
        self.uid = self.euid = uid


class FakePwd:
    """One account, ``popserv`` (uid 998, gid 997), and root."""

    entries = {
        "popserv": SimpleNamespace(pw_name="popserv", pw_uid=998, pw_gid=997),
        "root": SimpleNamespace(pw_name="root", pw_uid=0, pw_gid=0),
    }

    def getpwnam(self, name):
        return self.entries[name]

    def getpwuid(self, uid):
        return next(e for e in self.entries.values() if e.pw_uid == uid)


class FakeResource:
    """getrlimit/setrlimit over a (soft, hard) pair."""

    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft, hard):
        self.limits = (soft, hard)

    def getrlimit(self, which):
        return self.limits

    def setrlimit(self, which, limits):
        self.limits = limits


class StorageTestCase(SynchronousTestCase):
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.config = Config(
            mailroot=os.path.join(self.root, "mail"),
            users=os.path.join(self.root, "etc", "users"),
            state_dir=os.path.join(self.root, "state"),
            tls_self_signed_dir=os.path.join(self.root, "tls"),
            pop3_listen=("tcp:0:interface=127.0.0.1",),
            pop3s_listen=("tcp:0:interface=127.0.0.1",),
            smtp_listen=(),
        )


class SecretFileTests(StorageTestCase):
    """The users file and the TLS key must not be open to other users of the machine."""

    def write(self, path, mode):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_private(path, "")
        os.chmod(path, mode)
        return path

    def test_users_file_readable_by_others_is_refused(self):
        """twistd popserv stops with a line naming the users file and chmod 600."""
        users = self.write(self.config.users, 0o644)
        with self.assertRaises(tap.StartupError) as cm:
            tap.Options().parseOptions(["--users", users, "--mailroot", self.config.mailroot])
        self.assertIn(users, str(cm.exception))
        self.assertIn("mode 0644", str(cm.exception))
        self.assertIn(f"chmod 600 {users}", str(cm.exception))

    def test_key_writable_by_others_is_refused(self):
        """A configured TLS key that others may write is refused too."""
        key = self.write(os.path.join(self.root, "key.pem"), 0o602)
        config = self.config.replace(tls_cert=key, tls_key=key)
        with self.assertRaises(process.InsecureFile) as cm:
            process.check_secret_files(config)
        self.assertIn("TLS key", str(cm.exception))

    def test_self_signed_key_is_checked(self):
        """Without a configured pair, the self-signed key of the TLS directory is checked."""
        self.write(os.path.join(self.config.tls_self_signed_dir, "key.pem"), 0o640)
        process.check_secret_files(self.config)
        os.chmod(os.path.join(self.config.tls_self_signed_dir, "key.pem"), 0o604)
        self.assertRaises(process.InsecureFile, process.check_secret_files, self.config)

    def test_private_and_group_modes_pass(self):
        """Modes 0600 and 0640 (a group such as ssl-cert) and missing files pass."""
        process.check_secret_files(self.config)
        self.write(self.config.users, 0o600)
        key = self.write(os.path.join(self.root, "key.pem"), 0o640)
        process.check_secret_files(self.config.replace(tls_cert=key, tls_key=key))

    def test_service_refuses_before_binding(self):
        """make_service's privilegedStartService raises before any listener binds."""
        reactor = MemoryReactorClock()
        top = service.make_service(self.config, reactor=reactor)
        os.chmod(self.config.users, 0o604)
        self.assertRaises(process.InsecureFile, top.privilegedStartService)
        self.assertEqual(reactor.tcpServers, [])

    def test_created_files_are_private(self):
        """Storage made at the first start: directories 0700, users file and TLS key 0600."""
        service.make_service(self.config, reactor=MemoryReactorClock())
        modes = {
            path: os.stat(path).st_mode & 0o777
            for path in (
                self.config.mailroot,
                os.path.dirname(self.config.users),
                self.config.users,
                self.config.tls_self_signed_dir,
                os.path.join(self.config.tls_self_signed_dir, "key.pem"),
            )
        }
        self.assertEqual(list(modes.values()), [0o700, 0o700, 0o600, 0o700, 0o600])


class FileLimitTests(SynchronousTestCase):
    def test_soft_limit_raised_to_hard(self):
        """The soft descriptor limit goes up to the hard one."""
        fake = FakeResource(1024, 4096)
        self.assertEqual(process.raise_file_limit(fake), (1024, 4096))
        self.assertEqual(fake.limits, (4096, 4096))

    def test_capped(self):
        """A huge or unlimited hard limit gives the cap, not more."""
        for hard in (1 << 20, FakeResource.RLIM_INFINITY):
            fake = FakeResource(1024, hard)
            self.assertEqual(process.raise_file_limit(fake), (1024, process.FILE_LIMIT))
            self.assertEqual(fake.limits, (process.FILE_LIMIT, hard))

    def test_never_lowered(self):
        """A soft limit already above the cap is left as it is."""
        fake = FakeResource(100000, 200000)
        self.assertEqual(process.raise_file_limit(fake), (100000, 100000))
        self.assertEqual(fake.limits, (100000, 200000))

    def test_logged_at_start(self):
        """The limit in force is logged when the service starts."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        setup = process.ProcessSetup(Config(users="/nonexistent/users"))
        setup.resource = FakeResource(1024, 8192)
        setup.privilegedStartService()
        [event] = [e for e in observer if e.get("log_namespace") == "popserv.process"]
        self.assertEqual((event["before"], event["after"]), (1024, 8192))


class PrivilegeTests(StorageTestCase):
    """Root binds the listeners, then becomes [server] user; os calls are faked."""

    def make(self, user="popserv", euid=0):
        self.calls = []
        reactor = MemoryReactorClock()
        original = reactor.listenTCP

        def listen(port, factory, backlog=50, interface=""):
            self.calls.append(("listen", port, interface))
            return original(port, factory, backlog, interface)

        reactor.listenTCP = listen
        top = service.make_service(self.config.replace(user=user), reactor=reactor)
        setup = top.getServiceNamed("process-setup")
        setup.os = FakeOS(self.calls, euid)
        setup.pwd = FakePwd()
        setup.resource = FakeResource(1024, 1024)
        self.addCleanup(lambda: top.running and top.stopService())
        return top

    def test_binds_then_drops(self):
        """Every listener binds before initgroups, setgid and setuid, in that order."""
        top = self.make()
        top.privilegedStartService()
        self.assertEqual([c[0] for c in self.calls], ["listen", "listen"])
        top.startService()
        switch = [c for c in self.calls if c[0] not in ("listen", "chown")]
        self.assertEqual(switch, [("initgroups", "popserv", 997), ("setgid", 997), ("setuid", 998)])
        self.assertEqual(self.calls[:2], [("listen", 0, "127.0.0.1")] * 2)

    def test_created_storage_given_to_the_user(self):
        """What the first start created (as root) is chowned to the user before the switch."""
        top = self.make()
        top.privilegedStartService()
        top.startService()
        chowned = [c[1] for c in self.calls if c[0] == "chown"]
        self.assertIn(self.config.mailroot, chowned)
        self.assertIn(self.config.users, chowned)
        self.assertIn(os.path.join(self.config.tls_self_signed_dir, "key.pem"), chowned)
        self.assertTrue(all(c[2:] == (998, 997) for c in self.calls if c[0] == "chown"))
        first_switch = next(i for i, c in enumerate(self.calls) if c[0] == "initgroups")
        self.assertTrue(all(c[0] != "chown" for c in self.calls[first_switch:]))

    def test_existing_storage_keeps_its_owner(self):
        """Storage that existed before the start is not chowned."""
        self.make()
        top = self.make()
        top.privilegedStartService()
        top.startService()
        self.assertEqual([c for c in self.calls if c[0] == "chown"], [])

    def test_no_user_no_switch(self):
        """With [server] user empty, root stays root (twistd --uid may still switch)."""
        top = self.make(user="")
        top.privilegedStartService()
        top.startService()
        self.assertEqual([c[0] for c in self.calls], ["listen", "listen"])

    def test_not_root_no_switch(self):
        """Not root (twistd --uid already switched, or systemd's User=): nothing is attempted."""
        top = self.make(euid=998)
        top.privilegedStartService()
        top.startService()
        self.assertEqual([c[0] for c in self.calls], ["listen", "listen"])

    def test_unknown_user_refused_by_options(self):
        """An unknown [server] user stops twistd popserv with a line naming it."""
        path = os.path.join(self.root, "popserv.ini")
        with open(path, "w") as f:
            f.write("[server]\nuser = no-such-user-here\n")
        with self.assertRaises(tap.StartupError) as cm:
            tap.Options().parseOptions(["--config", path])
        self.assertIn("no-such-user-here", str(cm.exception))
        self.assertIn("[server] user", str(cm.exception))


#: Where README.rst's production install puts popserv, and where the unit runs it from.
VENV = "/opt/popserv"
#: A root shell's PATH on Debian: python3 is the system's, as on a bare machine.
DEBIAN_ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Variables of this test run that would leak into the commands a root shell runs.
_NOT_A_ROOT_SHELL = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYENV_VERSION")


def production_commands() -> list[str]:
    """The shell commands of README.rst's "Running in production" block, each heredoc whole."""
    with open(os.path.join(REPO, "README.rst"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("Running in production\n=====================\n", 1)[1]
    block = re.search(r"::\n\n((?:    .*\n|\n)+)", section).group(1)
    commands: list[str] = []
    heredoc = None
    for line in (line[4:] for line in block.splitlines()):
        if heredoc is not None:
            commands[-1] += "\n" + line
            if line == heredoc:
                heredoc = None
        elif line.strip():
            commands.append(line)
            m = re.search(r"<<\s*'?(\w+)'?", line)
            heredoc = m.group(1) if m else None
    return commands


def venv_commands(commands: list[str]) -> list[str]:
    """Those that make /opt/popserv: from ``python3 -m venv`` on, while each works in it."""
    start = next(i for i, c in enumerate(commands) if c.startswith(f"python3 -m venv {VENV}"))
    made = []
    for command in commands[start:]:
        if VENV not in command:
            break
        made.append(command)
    return made


def unit_settings(name: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit in etc/, each key with all its values in order."""
    with open(os.path.join(REPO, "etc", name), encoding="utf-8") as f:
        settings: dict[str, list[str]] = {}
        for key, value in re.findall(r"^(\w+)=(.*)$", f.read(), re.M):
            settings.setdefault(key, []).append(value)
    return settings


class SystemdUnitTests(SynchronousTestCase):
    """etc/popserv.service and etc/popserv.socket, as systemd itself reads them."""

    def install_as_the_readme_says(self) -> None:
        """Run the README's commands that make /opt/popserv, in this checkout, as root."""
        if os.geteuid() != 0:
            raise SkipTest("the README's install makes /opt/popserv: run as root (CI does)")
        commands = production_commands()
        self.assertIn("apt-get install python3-venv", commands)
        with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
            self.assertRegex(f.read(), r'APT_PACKAGES="[^"]*\bpython3-venv\b')
        made = venv_commands(commands)
        self.assertEqual(made[:2], [f"python3 -m venv {VENV}", f"{VENV}/bin/pip install ."])
        # pip builds in the checkout; what it leaves there was not there before goes.
        for leftover in ("build", "popserv.egg-info"):
            path = os.path.join(REPO, leftover)
            if not os.path.exists(path):
                self.addCleanup(shutil.rmtree, path, True)
        env = {k: v for k, v in os.environ.items() if k not in _NOT_A_ROOT_SHELL}
        env["PATH"] = DEBIAN_ROOT_PATH
        # One install into /opt/popserv at a time, should two test runs meet.
        with open(os.path.join(tempfile.gettempdir(), "popserv-opt-install.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            ran = subprocess.run(
                ["bash", "-euc", "\n".join(made)],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
        self.assertEqual(ran.returncode, 0, ran.stdout + ran.stderr)

    def test_units_verify_cleanly_after_the_readme_install(self):
        """After the README's install, systemd-analyze verify reports nothing, not even a
        warning, for both units exactly as shipped: the program ExecStart names is there."""
        analyze = require_client("systemd-analyze")
        self.install_as_the_readme_says()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        for name in ("popserv.service", "popserv.socket"):
            shutil.copyfile(os.path.join(REPO, "etc", name), os.path.join(directory, name))
        ran = subprocess.run(
            [analyze, "verify", "popserv.service", "popserv.socket"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual((ran.returncode, ran.stdout + ran.stderr), (0, ""))

        # That program is the venv's twistd, and it knows popserv.
        [command] = unit_settings("popserv.service")["ExecStart"]
        program = command.split()[0]
        self.assertEqual(program, f"{VENV}/bin/twistd")
        ran = subprocess.run(
            [program, "popserv", "--help"], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(ran.returncode, 0, ran.stderr)
        self.assertIn("--config=", ran.stdout)
        # The plugin cache is up to date, so the server never tries to write into /opt.
        [plugins] = glob.glob(f"{VENV}/lib/python3*/site-packages/twisted/plugins")
        sources = glob.glob(os.path.join(plugins, "*.py"))
        cache = os.stat(os.path.join(plugins, "dropin.cache")).st_mtime
        self.assertLessEqual(max(os.stat(path).st_mtime for path in sources), cache)
        # Documentation= names files the install made.
        for name in ("popserv.service", "popserv.socket"):
            [documentation] = unit_settings(name)["Documentation"]
            for url in documentation.split():
                self.assertTrue(url.startswith("file://"), url)
                self.assertTrue(os.path.isfile(url[len("file://") :]), url)

    def test_service_settings(self):
        """The service runs the venv's twistd unprivileged, tells systemd when it is ready,
        logs to the journal, and is sandboxed."""
        settings = {k: v[-1] for k, v in unit_settings("popserv.service").items()}
        self.assertEqual(
            settings["ExecStart"],
            f"{VENV}/bin/twistd --nodaemon --no_save --pidfile= --logfile=- "
            "popserv --config /etc/popserv/popserv.ini",
        )
        self.assertEqual(settings["Type"], "notify")
        self.assertEqual(settings["NotifyAccess"], "main")
        self.assertEqual(settings["SyslogIdentifier"], "popserv")
        self.assertEqual(settings["Documentation"], f"file://{VENV}/README.rst")
        self.assertNotIn("LogsDirectory", settings)
        self.assertEqual(settings["User"], "popserv")
        self.assertEqual(settings["AmbientCapabilities"], "CAP_NET_BIND_SERVICE")
        for key, value in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("PrivateTmp", "yes"),
            ("UMask", "0077"),
            ("LimitNOFILE", "65536"),
            ("StateDirectory", "popserv"),
            ("KillMode", "mixed"),
        ]:
            self.assertEqual(settings[key], value, key)

    def test_socket_activation(self):
        """Sockets passed as systemd passes them serve POP3 and SMTP at index 0 and 1."""
        activate = require_client("systemd-socket-activate")
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        pop3, smtp = free_port(), free_port()
        users = write_private(os.path.join(root, "users"), "alice:{PLAIN}secret\n")
        config = os.path.join(root, "popserv.ini")
        with open(config, "w") as f:
            f.write(
                f"[server]\nhostname = activated.test\nmailroot = {root}/mail\nusers = {users}\n"
                f"state_dir = {root}/state\n"
                "[pop3]\nlisten = systemd:domain=INET:index=0\n[pop3s]\nlisten =\n"
                f"[tls]\nself_signed_dir = {root}/tls\n"
                "[smtp]\nlisten = systemd:domain=INET:index=1\n"
            )
        argv = [
            activate,
            f"--listen=127.0.0.1:{pop3}",
            f"--listen=127.0.0.1:{smtp}",
            # What systemd itself sets without FileDescriptorName= (Twisted requires names).
            "--fdname=popserv.socket:popserv.socket",
            sys.executable,
            "-c",
            TWISTD,
            "--nodaemon",
            "--pidfile=",
            f"--logfile={root}/twistd.log",
            "popserv",
            f"--config={config}",
        ]
        child = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.addCleanup(lambda: (child.kill(), child.wait(10)))
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", pop3), 1)
                break
            except OSError:
                self.assertLess(
                    time.monotonic(), deadline, "systemd-socket-activate never listened"
                )
                time.sleep(0.05)
        with conn:
            conn.settimeout(20)
            self.assertTrue(conn.recv(100).startswith(b"+OK"))
        with socket.create_connection(("127.0.0.1", smtp), 20) as conn:
            conn.settimeout(20)
            self.assertTrue(conn.recv(100).startswith(b"220 activated.test ESMTP"))
