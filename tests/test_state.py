"""The state directory and the server secret (popserv.state), and the salts it keys."""

import base64
import os
import re
import stat

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from popserv import auth, process, sasl, service, state
from popserv.config import Config
from popserv.testing import run_at_once
from tests.test_auth import CHEAP, write_file


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class SecretTests(SynchronousTestCase):
    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)

    def test_made_once_and_kept(self):
        """The first call makes 32 random bytes, mode 0600; later calls read the same."""
        secret, created = state.load_or_create_secret(self.directory)
        path = os.path.join(self.directory, "secret")
        self.assertEqual((len(secret), created, mode(path)), (32, [path], 0o600))
        self.assertEqual(state.load_or_create_secret(self.directory), (secret, []))
        self.assertEqual(os.listdir(self.directory), ["secret"])

    def test_wrong_size_is_refused(self):
        """A secret file of the wrong size is an error that says how to recover."""
        write_file(os.path.join(self.directory, "secret"), "short")
        with self.assertRaises(state.SecretError) as cm:
            state.load_or_create_secret(self.directory)
        self.assertIn("remove it", str(cm.exception))

    def test_salts_depend_on_secret_mechanism_and_user(self):
        """A salt is 16 bytes, the same for the same inputs and different for others."""
        salt = state.scram_salt(b"k" * 32, "SCRAM-SHA-256", "alice")
        self.assertEqual(len(salt), 16)
        self.assertEqual(salt, state.scram_salt(b"k" * 32, "SCRAM-SHA-256", "alice"))
        for other in [
            state.scram_salt(b"j" * 32, "SCRAM-SHA-256", "alice"),
            state.scram_salt(b"k" * 32, "SCRAM-SHA-1", "alice"),
            state.scram_salt(b"k" * 32, "SCRAM-SHA-256", "bob"),
        ]:
            self.assertNotEqual(other, salt)


class ServiceStateTests(SynchronousTestCase):
    """make_service creates the state directory and the secret, private, like the mailroot."""

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.config = Config(
            mailroot=os.path.join(self.root, "mail"),
            users=os.path.join(self.root, "users"),
            state_dir=os.path.join(self.root, "var", "state"),
            tls_self_signed_dir=os.path.join(self.root, "tls"),
            pop3_listen=("tcp:0:interface=127.0.0.1",),
            pop3s_listen=(),
            smtp_listen=(),
        )

    def test_created_private_and_owned(self):
        """The state directory (0700) and its secret (0600) are made, and given to [server] user."""
        top = service.make_service(self.config, reactor=MemoryReactorClock())
        directory = self.config.state_dir
        secret = os.path.join(directory, "secret")
        self.assertEqual((mode(directory), mode(secret)), (0o700, 0o600))
        owned = top.getServiceNamed("process-setup").owned
        self.assertIn(directory, owned)
        self.assertIn(secret, owned)

    def test_secret_kept_across_starts(self):
        """A second start reads the secret the first one made and creates nothing."""
        service.make_service(self.config, reactor=MemoryReactorClock())
        with open(os.path.join(self.config.state_dir, "secret"), "rb") as f:
            first = f.read()
        top = service.make_service(self.config, reactor=MemoryReactorClock())
        self.assertNotIn(self.config.state_dir, top.getServiceNamed("process-setup").owned)
        with open(os.path.join(self.config.state_dir, "secret"), "rb") as f:
            self.assertEqual(f.read(), first)

    def test_secret_open_to_others_is_refused(self):
        """A secret file other users may read stops the start, naming chmod."""
        service.make_service(self.config, reactor=MemoryReactorClock())
        path = os.path.join(self.config.state_dir, "secret")
        os.chmod(path, 0o644)
        with self.assertRaises(process.InsecureFile) as cm:
            process.check_secret_files(self.config)
        self.assertIn("server secret", str(cm.exception))
        self.assertIn(f"chmod 600 {path}", str(cm.exception))


class SaltTests(SynchronousTestCase):
    """Item 13: the salts SCRAM shows are keyed by the server secret, so restarts keep them."""

    def setUp(self):
        self.patch(auth, "HASHER", CHEAP)
        self.path = self.mktemp()
        write_file(self.path, "pat:{PLAIN}pencil\n" + "hal:{SSHA512}" + "A" * 88 + "\n")

    def server_salt(self, secret: bytes, user: str) -> bytes:
        """The salt a fresh user database and mechanism (as after a restart) show ``user``."""
        userdb = auth.PasswdFile(self.path, run_at_once, secret=secret)
        mechanism = sasl.ScramSHA256("pop.example.org", userdb, secret=secret)
        first = mechanism.start(b"n,,n=" + user.encode() + b",r=abc").data.decode()
        return base64.b64decode(re.search(r",s=([^,]+),", first).group(1))

    def test_salts_survive_a_restart(self):
        """With the same secret, derived and made-up salts are the same in a new process."""
        for user in ["pat", "hal", "nobody"]:
            self.assertEqual(
                self.server_salt(b"s" * 32, user), self.server_salt(b"s" * 32, user), user
            )

    def test_salts_differ_between_servers(self):
        """Another secret gives other salts, so salts do not tell which server made them."""
        for user in ["pat", "hal", "nobody"]:
            self.assertNotEqual(
                self.server_salt(b"s" * 32, user), self.server_salt(b"t" * 32, user), user
            )
