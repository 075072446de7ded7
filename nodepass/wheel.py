"""Coarse timeouts for many objects on one clock: a timer wheel.

Every pool member waits up to a minute for its ID and every dial up to its
dial timeout, yet almost all of them finish within milliseconds.  A Twisted
``DelayedCall`` per object costs an allocation, a heap insertion and a
cancellation each time.  :class:`TimerWheel` files timeouts into slots of
``resolution`` seconds instead and keeps one delayed call per non-empty slot,
so thousands of pending timeouts cost a few delayed calls, and cancelling one
is a dictionary removal.

A timeout fires at the end of its slot: never early, at most ``resolution``
seconds late.  :func:`wheel_for` gives the wheel shared by everything on one
clock (reactor, or a test's ``Clock``).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

__all__ = ["TimerWheel", "Timeout", "wheel_for", "RESOLUTION"]

#: Seconds per slot of the shared wheels.
RESOLUTION = 0.25

_log = Logger()
_WHEELS: weakref.WeakKeyDictionary[Any, TimerWheel] = weakref.WeakKeyDictionary()


class Timeout:
    """One pending call of a :class:`TimerWheel` (``cancel``/``active`` as a DelayedCall)."""

    __slots__ = ("_wheel", "_slot", "_fn", "_args")

    def __init__(self, wheel: TimerWheel, slot: int, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        self._wheel: TimerWheel | None = wheel
        self._slot = slot
        self._fn = fn
        self._args = args

    def active(self) -> bool:
        """True until it fired or was cancelled."""
        return self._wheel is not None

    def cancel(self) -> None:
        """Do not call it (no effect once it fired or was cancelled)."""
        wheel, self._wheel = self._wheel, None
        if wheel is not None:
            wheel._remove(self)

    def _fire(self) -> None:
        self._wheel = None
        self._fn(*self._args)


class TimerWheel:
    """Timeouts filed into slots of ``resolution`` seconds on ``clock``."""

    def __init__(self, clock: Any, resolution: float = RESOLUTION) -> None:
        self._clock = clock
        self.resolution = resolution
        self._slots: dict[int, dict[Timeout, None]] = {}
        self._calls: dict[int, Any] = {}

    def __len__(self) -> int:
        """Pending timeouts."""
        return sum(len(s) for s in self._slots.values())

    def call_later(self, delay: float, fn: Callable[..., object], *args: Any) -> Timeout:
        """Call ``fn(*args)`` once ``delay`` seconds have passed (up to one slot later)."""
        slot = math.ceil((self._clock.seconds() + max(0.0, delay)) / self.resolution)
        entry = Timeout(self, slot, fn, args)
        entries = self._slots.get(slot)
        if entries is None:
            entries = self._slots[slot] = {}
            when = slot * self.resolution - self._clock.seconds()
            self._calls[slot] = self._clock.callLater(max(0.0, when), self._expire, slot)
        entries[entry] = None
        return entry

    def _remove(self, entry: Timeout) -> None:
        entries = self._slots.get(entry._slot)
        if entries is None:
            return
        entries.pop(entry, None)
        if not entries:
            del self._slots[entry._slot]
            call = self._calls.pop(entry._slot, None)
            if call is not None and call.active():
                call.cancel()

    def _expire(self, slot: int) -> None:
        self._calls.pop(slot, None)
        entries = self._slots.pop(slot, None)
        if not entries:
            return
        for entry in list(entries):
            if entry._wheel is not None:
                try:
                    entry._fire()
                except Exception:
                    _log.failure("timeout callback failed")


def wheel_for(clock: Any) -> TimerWheel:
    """The wheel shared by everything running on ``clock``."""
    wheel = _WHEELS.get(clock)
    if wheel is None:
        wheel = _WHEELS[clock] = TimerWheel(clock)
    return wheel
