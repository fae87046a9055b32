"""Connection limits per client (by accounting key), in all, and by free descriptors."""

import resource

from twisted.trial.unittest import SynchronousTestCase

from popserv import limits


class ConnectionLimiterTests(SynchronousTestCase):
    def test_soft_file_limit(self):
        """The limit read is the process's soft RLIMIT_NOFILE."""
        self.assertEqual(limits.soft_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
