"""The timer wheel: coarse timeouts sharing delayed calls (on a fake clock)."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from nodepass.wheel import TimerWheel, wheel_for


class TimerWheelTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.wheel = TimerWheel(self.clock, resolution=0.25)
        self.fired: list[str] = []

    def test_fires_never_early_and_at_most_one_slot_late(self) -> None:
        self.clock.advance(0.1)
        self.wheel.call_later(1.0, self.fired.append, "a")
        self.clock.advance(0.99)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.25)
        self.assertEqual(self.fired, ["a"])

    def test_timeouts_in_one_slot_share_one_delayed_call(self) -> None:
        for i in range(100):
            self.wheel.call_later(5.01 + i * 0.001, self.fired.append, str(i))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(len(self.wheel), 100)
        self.clock.advance(5.25)
        self.assertEqual(len(self.fired), 100)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.wheel), 0)

    def test_cancel(self) -> None:
        keep = self.wheel.call_later(1.0, self.fired.append, "keep")
        gone = self.wheel.call_later(1.0, self.fired.append, "gone")
        self.assertTrue(gone.active())
        gone.cancel()
        gone.cancel()  # a second cancel does nothing
        self.assertFalse(gone.active())
        self.clock.advance(2.0)
        self.assertEqual(self.fired, ["keep"])
        self.assertFalse(keep.active())
        keep.cancel()  # after it fired: nothing

    def test_an_emptied_slot_leaves_no_delayed_call(self) -> None:
        entries = [self.wheel.call_later(60.0, self.fired.append, "x") for _ in range(10)]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        for entry in entries:
            entry.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(61)
        self.assertEqual(self.fired, [])

    def test_a_failing_callback_does_not_stop_the_others(self) -> None:
        def boom() -> None:
            raise RuntimeError("boom")

        self.wheel.call_later(1.0, boom)
        self.wheel.call_later(1.0, self.fired.append, "after")
        self.clock.advance(1.5)
        self.assertEqual(self.fired, ["after"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_shared_wheel_per_clock(self) -> None:
        self.assertIs(wheel_for(self.clock), wheel_for(self.clock))
        self.assertIsNot(wheel_for(self.clock), wheel_for(Clock()))
