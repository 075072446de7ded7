"""Timers of the tunnel code, on an injected clock (``callLater``/``seconds``).

* :class:`DelayedCalls`: the pending delayed calls of one object, all
  cancelled at once when it stops.
* :class:`IdleTimer`: fires once nothing touched it for a while.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["DelayedCalls", "IdleTimer"]


class DelayedCalls:
    """Delayed calls scheduled by one owner, cancelled together by :meth:`cancel_all`."""

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._calls: list[Any] = []

    def later(self, delay: float, fn: Callable[[], object]) -> None:
        """Call *fn* after *delay* seconds (calls already done are forgotten here)."""
        self._calls = [c for c in self._calls if c.active()]
        self._calls.append(self._clock.callLater(delay, fn))

    def cancel_all(self) -> None:
        """Cancel every pending call."""
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []


class IdleTimer:
    """Calls *on_idle* once nothing touched it for *timeout* seconds (0 = never).

    ``touch`` only records the time; the single pending call re-arms itself
    for the remaining time, so marking activity per datagram is cheap.
    """

    def __init__(self, clock: Any, timeout: float, on_idle: Callable[[], None]) -> None:
        self._clock = clock
        self._timeout = timeout
        self._on_idle = on_idle
        self._last = clock.seconds()
        self._call: Any = None
        if timeout > 0:
            self._call = clock.callLater(timeout, self._check)

    def touch(self) -> None:
        """Record activity now."""
        self._last = self._clock.seconds()

    def cancel(self) -> None:
        """Stop watching."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _check(self) -> None:
        self._call = None
        remaining = self._last + self._timeout - self._clock.seconds()
        if remaining > 0:
            self._call = self._clock.callLater(remaining, self._check)
        else:
            self._on_idle()
