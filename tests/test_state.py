"""The state directory and the server secret (popserv.state), and the salts it keys."""

import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from popserv import state
from tests.test_auth import write_file


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
