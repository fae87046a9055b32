"""A connection's flow: lines in order, waiting on handlers, backpressure both ways, closing."""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from popserv.lineflow import CLOSE_GRACE, ConnectionFlow


class Receiver:
    """Records lines; answers each with the Deferred the test queued, if any."""

    limit = 20

    def __init__(self):
        self.lines = []
        self.too_long = 0
        self.results = []

    def line_received(self, line):
        self.lines.append(line)
        return self.results.pop(0) if self.results else None

    def line_too_long(self):
        self.too_long += 1

    def line_limit(self, line):
        return self.limit

    def longest_line(self):
        return self.limit


class FlowTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.transport = StringTransport()
        self.receiver = Receiver()
        self.flow = ConnectionFlow(self.transport, self.clock, self.receiver, input_bound=10)


class LineTests(FlowTestCase):
    def test_lines_split_across_packets(self):
        """Lines end at CRLF, whatever the packets; a bare LF does not end one."""
        self.flow.data_received(b"ON")
        self.flow.data_received(b"E\r\nTW\nO\r\nTHR")
        self.flow.data_received(b"EE\r\n")
        self.assertEqual(self.receiver.lines, [b"ONE", b"TW\nO", b"THREE"])

    def test_lf_with_strip_cr(self):
        """With strip_cr, LF ends a line and a CR before it is dropped (POP3)."""
        flow = ConnectionFlow(
            StringTransport(), self.clock, self.receiver, delimiter=b"\n", strip_cr=True
        )
        flow.data_received(b"A\r\nB\nC\r")
        self.assertEqual(self.receiver.lines, [b"A", b"B"])

    def test_over_long_line_is_answered_and_forgotten(self):
        """A line over the limit is answered once, its rest forgotten, and the next runs."""
        self.flow.data_received(b"X" * 30)
        self.flow.data_received(b"Y" * 30 + b"\r")
        self.flow.data_received(b"\nNEXT\r\n")
        self.assertEqual(self.receiver.too_long, 1)
        self.assertEqual(self.receiver.lines, [b"NEXT"])

    def test_over_long_complete_line(self):
        """A complete line over its limit is answered without being handled."""
        self.flow.data_received(b"Z" * 25 + b"\r\nOK\r\n")
        self.assertEqual((self.receiver.too_long, self.receiver.lines), (1, [b"OK"]))

    def test_drop_buffered(self):
        """After drop_buffered, what came behind the current line is forgotten."""
        self.receiver.line_received = lambda line: (
            self.receiver.lines.append(line),
            self.flow.drop_buffered(),
        )[0]
        self.flow.data_received(b"STLS\r\nINJECTED\r\n")
        self.flow.data_received(b"AFTER\r\n")
        self.assertEqual(self.receiver.lines, [b"STLS", b"AFTER"])


class WaitingTests(FlowTestCase):
    def test_lines_wait_for_a_pending_handler(self):
        """A handler's Deferred holds the next lines until it fires."""
        pending = defer.Deferred()
        self.receiver.results = [pending]
        self.flow.data_received(b"SLOW\r\nNEXT\r\nLAST\r\n")
        self.assertEqual(self.receiver.lines, [b"SLOW"])
        self.assertTrue(self.flow.waiting)
        pending.callback(None)
        self.assertEqual(self.receiver.lines, [b"SLOW", b"NEXT", b"LAST"])

    def test_fired_deferred_does_not_hold(self):
        """A Deferred that has already fired holds nothing."""
        self.receiver.results = [defer.succeed(None)]
        self.flow.data_received(b"A\r\nB\r\n")
        self.assertEqual(self.receiver.lines, [b"A", b"B"])

    def test_reading_stops_past_the_bound(self):
        """Input waiting behind a handler past input_bound stops the reading, until it fires."""
        pending = defer.Deferred()
        self.receiver.results = [pending]
        self.flow.data_received(b"SLOW\r\nA\r\n")
        self.assertEqual(self.transport.producerState, "producing")
        self.flow.data_received(b"B\r\nC\r\nD\r\n")
        self.assertEqual(self.transport.producerState, "paused")
        pending.callback(None)
        self.assertEqual(self.transport.producerState, "producing")

    def test_failed_handler_is_logged_and_input_goes_on(self):
        """A handler's failure is logged, and the next lines still run."""
        self.receiver.results = [defer.fail(ValueError("boom"))]
        self.flow.data_received(b"A\r\nB\r\n")
        self.assertEqual(self.receiver.lines, [b"A", b"B"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class OutputTests(FlowTestCase):
    def test_unread_replies_hold_input(self):
        """While the transport's buffer is full, no line is handled; they run on resume."""
        self.flow.pauseProducing()
        self.flow.data_received(b"A\r\nB\r\nC\r\nD\r\n")
        self.assertEqual(self.receiver.lines, [])
        self.assertEqual(self.transport.producerState, "paused")
        self.flow.resumeProducing()
        self.assertEqual(self.receiver.lines, [b"A", b"B", b"C", b"D"])
        self.assertEqual(self.transport.producerState, "producing")

    def test_close_is_polite_with_a_deadline(self):
        """A close sends the last reply, and is aborted if not done within CLOSE_GRACE."""
        self.flow.close(b"BYE\r\n")
        self.assertEqual(self.transport.value(), b"BYE\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.transport.producer)
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(CLOSE_GRACE)
        self.assertTrue(self.transport.disconnected)

    def test_close_aborts_a_client_that_does_not_read(self):
        """A close while the client is not reading aborts at once, writing nothing."""
        self.flow.pauseProducing()
        self.flow.close(b"BYE\r\n")
        self.assertEqual(self.transport.value(), b"")
        self.assertTrue(self.transport.disconnected)

    def test_no_input_after_close(self):
        """No line is handled once the connection is closing."""
        self.flow.close()
        self.flow.data_received(b"A\r\n")
        self.assertEqual(self.receiver.lines, [])

    def test_lost_cancels_the_deadline(self):
        """A connection that closes in time leaves no timer behind."""
        self.flow.close()
        self.flow.lost()
        self.assertEqual(self.clock.getDelayedCalls(), [])
