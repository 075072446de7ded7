"""StreamTransport: a member carried inside another connection behaves like a TCP transport.

Two ends are joined by an in-memory pipe with a send queue that the test
drains by hand, so back-pressure, half-close, close and reset can be observed
step by step on an injected clock.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.trial import unittest

from nodepass.pool.stream import StreamTransport
from nodepass.relay import RelayProtocol


class _Pipe(StreamTransport):
    """One end of an in-memory pipe; bytes wait in ``queue`` until :meth:`pump`."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock, IPv4Address("TCP", "127.0.0.1", 1), IPv4Address("TCP", "127.0.0.1", 2))
        self.other: _Pipe | None = None
        self.queue: list[bytes | None] = []  # None = end of stream
        self.resets = 0
        self.credit_returned = 0
        self.reading_events: list[bool] = []

    def _send(self, data: bytes) -> None:
        self.queue.append(data)

    def _send_eof(self) -> None:
        self.queue.append(None)

    def _send_reset(self) -> None:
        self.resets += 1
        self.queue.clear()
        if self.other is not None:
            self.other.terminated()

    def _buffered(self) -> int:
        return sum(len(b) for b in self.queue if b is not None)

    def _consumed(self, nbytes: int) -> None:
        self.credit_returned += nbytes

    def _reading_changed(self, paused: bool) -> None:
        self.reading_events.append(paused)

    def pump(self) -> None:
        queue, self.queue = self.queue, []
        assert self.other is not None
        for item in queue:
            if item is None:
                self.other.eof_received()
            else:
                self.other.data_received(item)
        self.drained()


def _pair(clock: Clock) -> tuple[_Pipe, _Pipe, RelayProtocol, RelayProtocol]:
    a, b = _Pipe(clock), _Pipe(clock)
    a.other, b.other = b, a
    pa, pb = RelayProtocol(), RelayProtocol()
    a.attach(pa)
    b.attach(pb)
    return a, b, pa, pb


class _Producer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


class StreamTransportTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_bytes_flow_and_keep_boundaries(self) -> None:
        a, b, pa, pb = _pair(self.clock)
        got: list[bytes] = []
        pb.set_sink(got.append)
        a.write(b"one")
        a.write(b"two")
        a.pump()
        self.assertEqual(got, [b"one", b"two"])
        self.assertEqual(b.credit_returned, 6)
        self.assertEqual(b.getPeer().host, "127.0.0.1")

    def test_paused_reading_keeps_bytes_and_credit(self) -> None:
        a, b, pa, pb = _pair(self.clock)
        got: list[bytes] = []
        pb.set_sink(got.append)
        b.pauseProducing()
        a.write(b"x" * 10)
        a.write(b"y")
        a.loseWriteConnection()
        a.pump()
        self.assertEqual(got, [])
        self.assertEqual(b.credit_returned, 0)
        self.assertFalse(pb.lost)
        b.resumeProducing()
        self.assertEqual(got, [b"x" * 10, b"y"])
        self.assertEqual(b.credit_returned, 11)
        self.assertEqual(b.reading_events, [True, False])
        # The peer's end of stream reached the relay endpoint after the bytes:
        # not joined in half-close mode, it closes in turn.
        self.clock.advance(0)
        self.assertTrue(pb.lost)
        self.assertEqual(pb.lost_reason, "EOF")
        self.assertIn(None, b.queue)

    def test_producer_paused_above_high_water(self) -> None:
        a, b, pa, pb = _pair(self.clock)
        producer = _Producer()
        a.registerProducer(producer, True)
        a.write(b"z" * (a.high_water + 1))
        self.assertEqual(producer.events, ["pause"])
        a.write(b"more")
        self.assertEqual(producer.events, ["pause"])
        a.pump()
        self.assertEqual(producer.events, ["pause", "resume"])
        a.unregisterProducer()

    def test_half_close_each_way(self) -> None:
        a, b, pa, pb = _pair(self.clock)
        eofs: list[str] = []
        pb._on_eof = lambda: eofs.append("b")
        pa._on_eof = lambda: eofs.append("a")
        a.loseWriteConnection()
        a.pump()
        self.assertEqual(eofs, ["b"])
        self.assertFalse(pb.lost)
        b.write(b"reply")
        got: list[bytes] = []
        pa.set_sink(got.append)
        b.loseWriteConnection()
        b.pump()
        self.assertEqual(got, [b"reply"])
        self.assertEqual(eofs, ["b", "a"])
        self.clock.advance(0)
        self.assertTrue(pa.lost and pb.lost)

    def test_lose_connection_reports_next_turn(self) -> None:
        a, b, pa, pb = _pair(self.clock)
        a.write(b"last")
        pa.close()
        self.assertFalse(pa.lost)
        self.assertTrue(a.disconnecting)
        a.write(b"ignored")
        self.clock.advance(0)
        self.assertTrue(pa.lost)
        self.assertEqual(pa.lost_reason, "EOF")
        self.assertEqual(a.queue, [b"last", None])
        # Bytes arriving after our close are dropped but still credited.
        b.write(b"late")
        b.pump()
        self.assertEqual(a.credit_returned, 4)

    def test_abort_resets_both_ends(self) -> None:
        a, b, pa, pb = _pair(self.clock)
        a.write(b"dropped")
        pa.abort()
        self.assertEqual(a.resets, 1)
        self.assertEqual(a.queue, [])
        self.assertTrue(pb.lost)
        self.clock.advance(0)
        self.assertTrue(pa.lost)
        self.assertIn("aborted", pa.lost_reason)
