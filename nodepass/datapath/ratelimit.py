"""Bandwidth shaping for the ``rate`` parameter.

NodePass converts ``rate`` (Mbit/s) into bytes per second by multiplying by
125 000 and keeps **one limiter per tunnel instance**.  That limiter holds two
independent token buckets:

* the *read* bucket is charged for bytes read from a shaped socket;
* the *write* bucket is charged for bytes written to a shaped socket.

Each bucket holds at most one second of traffic (``R`` tokens), starts full and
refills continuously at ``R`` bytes per second.  Shaped sockets are the
user-facing sockets on the ingress side, the target sockets on the egress side
and, in single-end mode, the accepted connections and the listening UDP socket;
pool and control connections are never shaped.  Since every session of the
instance shares the same two buckets, the limit applies to the instance as a
whole, once per direction: data travelling user -> target passes the read
bucket on the ingress side (and the write bucket on the egress side), and data
travelling target -> user the other way round.

Shaping here works through Twisted's producer API instead of blocking reads
and writes: every chunk that crosses a shaped socket is charged with
:meth:`Throttle.consume`, naming the push producer that delivered it (the
transport the bytes were read from).  When the bucket runs into debt the
producer is paused and a single ``callLater`` timer resumes every paused
producer once the debt has been paid back.  Tokens may go negative (bytes are
charged after they were read), so the long-run rate stays at ``R`` even when
something else resumes a producer early (for example the relay's own
back-pressure); there is no polling and no busy loop.
"""

from __future__ import annotations

from typing import Literal

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime

__all__ = ["BYTES_PER_MBIT", "Direction", "Throttle", "TokenBucket", "rate_to_bytes"]

BYTES_PER_MBIT = 125_000
"""NodePass's conversion factor: 1 Mbit/s = 125 000 bytes/s."""

Direction = Literal["read", "write"]


def rate_to_bytes(rate_mbit: int) -> int:
    """Return the byte rate for a ``rate`` value in Mbit/s (``0`` or less means off = 0)."""
    if rate_mbit <= 0:
        return 0
    return rate_mbit * BYTES_PER_MBIT


class TokenBucket:
    """One token bucket that pauses push producers while it is in debt.

    ``capacity`` (default: one second's worth of ``bytes_per_second``) bounds
    the burst.  The bucket starts full.
    """

    def __init__(
        self, clock: IReactorTime, bytes_per_second: float, capacity: float | None = None
    ) -> None:
        if bytes_per_second <= 0:
            raise ValueError(f"rate must be positive, got {bytes_per_second!r} bytes/s")
        self._clock = clock
        self.rate = float(bytes_per_second)
        self.capacity = float(capacity if capacity is not None else bytes_per_second)
        self._tokens = self.capacity
        self._stamp = clock.seconds()
        self._paused: dict[int, IPushProducer] = {}
        self._timer: IDelayedCall | None = None

    # accounting ------------------------------------------------------------
    def _refill(self) -> None:
        now = self._clock.seconds()
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
        self._stamp = now

    @property
    def tokens(self) -> float:
        """Tokens available now (negative while in debt)."""
        self._refill()
        return self._tokens

    @property
    def paused(self) -> int:
        """How many producers this bucket currently holds paused."""
        return len(self._paused)

    def consume(self, nbytes: int, producer: IPushProducer | None = None) -> None:
        """Charge *nbytes*; pause *producer* until the resulting debt is repaid.

        With no producer the bytes are only charged (later chunks pay for them).
        """
        if nbytes <= 0:
            return
        self._refill()
        self._tokens -= nbytes
        if self._tokens >= 0:
            return
        if producer is not None:
            # Pause again even if already recorded: something else (back-pressure)
            # may have resumed it meanwhile.
            self._paused[id(producer)] = producer
            producer.pauseProducing()
        self._schedule()

    def _schedule(self) -> None:
        if not self._paused:
            return
        delay = max(0.0, -self._tokens / self.rate)
        if self._timer is not None and self._timer.active():
            self._timer.reset(delay)
        else:
            self._timer = self._clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        self._refill()
        if self._tokens < 0:
            self._schedule()
            return
        waiting = list(self._paused.values())
        self._paused.clear()
        for producer in waiting:
            try:
                producer.resumeProducing()
            except Exception:  # a closed transport must not stop the others
                pass

    def forget(self, producer: IPushProducer) -> None:
        """Drop *producer* from the paused set without resuming it (its connection ended)."""
        self._paused.pop(id(producer), None)
        if not self._paused and self._timer is not None and self._timer.active():
            self._timer.cancel()
            self._timer = None

    def reset(self) -> None:
        """Refill completely and resume every paused producer (used on restart)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._tokens = self.capacity
        self._stamp = self._clock.seconds()
        waiting = list(self._paused.values())
        self._paused.clear()
        for producer in waiting:
            try:
                producer.resumeProducing()
            except Exception:
                pass

    def stop(self) -> None:
        """Cancel the wake-up timer and forget all producers (tunnel shutdown)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._paused.clear()


class Throttle:
    """The per-instance rate limiter: a read bucket and a write bucket of the same rate.

    ``consume(n, producer)`` charges the *read* bucket, the common case: the
    relay reads a chunk from a shaped socket and names that socket's transport
    as the producer.  Chunks that are about to be *written* to a shaped socket
    (they were read from a pool or target connection) should be charged with
    ``direction="write"`` and the producer that delivered them; that keeps the
    two directions independent, each limited to the full rate, as NodePass
    does.  Charging everything to the read bucket is still correct, only
    stricter (both directions then share one budget).
    """

    def __init__(self, reactor: IReactorTime, bytes_per_second: float) -> None:
        self.bytes_per_second = float(bytes_per_second)
        self.read_bucket = TokenBucket(reactor, bytes_per_second)
        self.write_bucket = TokenBucket(reactor, bytes_per_second)

    @classmethod
    def from_rate(cls, reactor: IReactorTime, rate_mbit: int) -> Throttle | None:
        """The throttle for a ``rate`` value in Mbit/s, or ``None`` when it is off (``<= 0``)."""
        bps = rate_to_bytes(rate_mbit)
        return cls(reactor, bps) if bps > 0 else None

    def bucket(self, direction: Direction | str) -> TokenBucket:
        """The bucket charged for *direction* (``"read"`` or ``"write"``; else ``ValueError``)."""
        if direction == "read":
            return self.read_bucket
        if direction == "write":
            return self.write_bucket
        raise ValueError(f"direction must be 'read' or 'write', got {direction!r}")

    def consume(
        self, nbytes: int, producer: IPushProducer | None, direction: str = "read"
    ) -> None:
        """Charge *nbytes* to the *direction* bucket, pausing *producer* while in debt."""
        self.bucket(direction).consume(nbytes, producer)

    def forget(self, producer: IPushProducer) -> None:
        """Forget *producer* in both buckets; call when its connection is lost."""
        self.read_bucket.forget(producer)
        self.write_bucket.forget(producer)

    def reset(self) -> None:
        """Refill both buckets and resume paused producers (NodePass resets on restart)."""
        self.read_bucket.reset()
        self.write_bucket.reset()

    def stop(self) -> None:
        """Cancel timers in both buckets."""
        self.read_bucket.stop()
        self.write_bucket.stop()
