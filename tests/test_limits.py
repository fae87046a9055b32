"""Connection limits per client (by accounting key), in all, and by free descriptors."""

import resource

from twisted.trial.unittest import SynchronousTestCase

from popserv import limits
from popserv.limits import DESCRIPTORS, IN_ALL, PER_PEER, ConnectionLimiter


class ConnectionLimiterTests(SynchronousTestCase):
    def test_per_client_by_accounting_key(self):
        """An IPv4 address and its IPv4-mapped form, or two addresses of one IPv6 /64,
        are one client."""
        limiter = ConnectionLimiter(100, 2)
        self.assertIsNone(limiter.opened("192.0.2.7"))
        self.assertIsNone(limiter.opened("::ffff:192.0.2.7"))
        self.assertEqual(limiter.opened("192.0.2.7"), PER_PEER)
        self.assertIsNone(limiter.opened("2001:db8::1"))
        self.assertIsNone(limiter.opened("2001:db8::ffff:2"))
        self.assertEqual(limiter.opened("2001:db8:0:0:1::3"), PER_PEER)
        self.assertIsNone(limiter.opened("2001:db8:0:1::1"))
        limiter.closed("::ffff:192.0.2.7")
        self.assertIsNone(limiter.opened("192.0.2.7"))
        self.assertEqual(limiter.open, 5)

    def test_in_all(self):
        """Past the total, any client is refused; a closed connection frees its place."""
        limiter = ConnectionLimiter(2, 10)
        self.assertIsNone(limiter.opened("192.0.2.1"))
        self.assertIsNone(limiter.opened("192.0.2.2"))
        self.assertEqual(limiter.opened("192.0.2.3"), IN_ALL)
        limiter.closed("192.0.2.1")
        self.assertIsNone(limiter.opened("192.0.2.3"))

    def test_descriptor_reserve(self):
        """A connection that would leave less than the reserve of descriptors free is refused."""
        limiter = ConnectionLimiter(
            1000, 1000, reserve=0.25, files_per_connection=2, file_limit=lambda: 100
        )
        # Socket 60 and below in use, plus two files for this connection: 37 free.
        self.assertIsNone(limiter.opened("192.0.2.1", 60))
        # Socket 72, plus two files for each of two connections: 23 free, under 25.
        self.assertEqual(limiter.opened("192.0.2.2", 72), DESCRIPTORS)
        self.assertIsNone(limiter.opened("192.0.2.2", -1))

    def test_soft_file_limit(self):
        """The limit read is the process's soft RLIMIT_NOFILE."""
        self.assertEqual(limits.soft_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
