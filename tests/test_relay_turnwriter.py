"""TurnWriter and the relay's gathering of a bursty source's chunks (QUIC members)."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from nodepass.relay import RelayProtocol, TurnWriter, join


class _Counting(StringTransport):
    """A string transport that counts write calls."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class _Bursty(_Counting):
    delivers_bursts = True


class TurnWriterTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.out: list[bytes] = []
        self.writer = TurnWriter(self.clock, self.out.append)

    def test_chunks_of_one_turn_go_out_as_one_write(self) -> None:
        for chunk in (b"a", b"bc", b"def"):
            self.writer.write(chunk)
        self.assertEqual(self.out, [])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0)
        self.assertEqual(self.out, [b"abcdef"])
        self.writer.write(b"g")
        self.clock.advance(0)
        self.assertEqual(self.out, [b"abcdef", b"g"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flush_passes_on_at_once_and_cancels_the_turn_call(self) -> None:
        self.writer.write(b"x")
        self.writer.write(b"y")
        self.writer.flush()
        self.assertEqual(self.out, [b"xy"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.writer.flush()  # nothing pending: nothing written
        self.assertEqual(self.out, [b"xy"])

    def test_discard_forgets_pending_chunks(self) -> None:
        self.writer.write(b"lost")
        self.assertEqual(self.writer.discard(), [b"lost"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1)
        self.assertEqual(self.out, [])


class JoinGatheringTests(TestCase):
    """join() gathers what a bursty source delivers, and flushes before closing."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.src = RelayProtocol()
        self.src_t = _Bursty()
        self.src.makeConnection(self.src_t)
        self.dst = RelayProtocol()
        self.dst_t = _Counting()
        self.dst.makeConnection(self.dst_t)
        self.done = join(self.src, self.dst, reactor=self.clock)

    def test_a_turn_of_chunks_is_one_write_and_the_plain_direction_is_not_gathered(self) -> None:
        for i in range(20):
            self.src.dataReceived(bytes([i]) * 100)
        self.assertEqual(self.dst_t.writes, 0)
        self.clock.advance(0)
        self.assertEqual(self.dst_t.writes, 1)
        self.assertEqual(self.dst_t.value(), b"".join(bytes([i]) * 100 for i in range(20)))
        # The other direction (a plain source) is written through at once.
        self.dst.dataReceived(b"reply")
        self.assertEqual(self.src_t.value(), b"reply")

    def test_source_end_flushes_gathered_bytes_before_closing_the_destination(self) -> None:
        self.src.dataReceived(b"last ")
        self.src.dataReceived(b"words")
        self.src.connectionLost(Failure(Exception("gone")))
        self.assertEqual(self.dst_t.value(), b"last words")
        self.assertTrue(self.dst_t.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_destination_end_drops_what_was_gathered_for_it(self) -> None:
        self.src.dataReceived(b"never sent")
        self.dst.connectionLost(Failure(Exception("gone")))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.dst_t.writes, 0)
        self.src.connectionLost(Failure(Exception("gone")))
        self.assertTrue(self.done.called)
