"""Joining two relay endpoints into one byte pipe ("data exchange").

:func:`join` connects two :class:`~nodepass.relay.endpoint.RelayProtocol` endpoints
(TCP connections or pool streams of any transport):

* each side's bytes are written to the other side, with no per-byte work;
  between two plain TCP sockets on Linux the kernel moves them itself
  (``splice``, :mod:`nodepass.relay.splice`), elsewhere they pass through
  Python once; a side whose transport has a true ``delivers_bursts``
  attribute (a QUIC member: one small chunk per packet, many per reactor
  turn) has its chunks written to the other side once per reactor turn
  (:class:`~nodepass.relay.write.TurnWriter`);
* each transport is registered as the *producer* of the other one, so a slow
  reader pauses the fast writer in both directions (back-pressure);
* ``TCP_NODELAY`` is set on both sockets (where there is one);
* bytes read from / written to the ``counted`` side are added to
  ``stats.tcprx`` / ``stats.tcptx`` (the user connection on the ingress side,
  the target connection on the egress side; pool connections never count);
* when a :class:`Throttle` is given, every chunk read from the counted side is
  charged with ``throttle.consume(n, producer, "read")`` and every chunk
  written to it with ``throttle.consume(n, producer, "write")``, where the
  producer is the side the chunk was read from, so the rate limit pauses
  reading;
* ``read_timeout`` > 0 closes the exchange once both directions have been
  idle for that long (Go: each direction stops after that idle time, and the
  exchange ends when both have stopped);
* when one side ends (EOF or error) the other side is closed after its
  pending writes are flushed (``half_close=True`` instead forwards a FIN to a
  plain TCP peer and lets the other direction continue).

The returned Deferred fires with a short reason text ("EOF", or the error that
ended the exchange) once both connections are closed; callers log it as
``Exchange complete: <reason>``.

Typical use (inside ``inlineCallbacks``)::

    # ``user`` is the RelayProtocol an accepting factory built
    target = yield policy.connect_tcp(Factory.forProtocol(RelayProtocol))
    reason = yield join(user, target, reactor=reactor, stats=stats, counted=user,
                        throttle=policy.throttle, read_timeout=policy.read_timeout)
    logger.info("Exchange complete: %s", reason)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, IReactorTime

from nodepass.relay.endpoint import RelayProtocol
from nodepass.relay.splice import can_splice, splice_join
from nodepass.relay.write import TurnWriter, direct_writer, set_nodelay
from nodepass.stats import TunnelStats

__all__ = ["join", "ThrottleLike"]


class ThrottleLike(TypingProtocol):
    """What the relay needs from a rate limiter (see nodepass.datapath.ratelimit)."""

    def consume(self, nbytes: int, producer: IPushProducer | None, direction: str = "read") -> None: ...

    def forget(self, producer: IPushProducer) -> None: ...


def _write_eof(side: RelayProtocol) -> bool:
    """Send FIN on a plain TCP transport; False when the transport cannot half-close."""
    t = side.transport
    fn = getattr(t, "loseWriteConnection", None)
    if fn is None or "TLS" in type(t).__name__:
        return False
    try:
        fn()
    except Exception:
        return False
    return True


def join(
    a: RelayProtocol,
    b: RelayProtocol,
    *,
    reactor: IReactorTime,
    stats: TunnelStats | None = None,
    counted: RelayProtocol | None = None,
    throttle: ThrottleLike | None = None,
    read_timeout: float = 0.0,
    half_close: bool = False,
) -> defer.Deferred[str]:
    """Pipe ``a`` and ``b`` together until both are closed.

    :param counted: the side (``a`` or ``b``) whose bytes count as tcprx (read
        from it) and tcptx (written to it), and which the throttle charges;
        None counts nothing.
    :param throttle: rate limiter; ``consume(n, gate)`` pauses the reading side.
    :param read_timeout: idle seconds per direction before the exchange is
        closed; 0 disables it.
    :param half_close: forward a FIN as a FIN on plain TCP transports and keep
        the other direction going (single-end style); otherwise an end on one
        side closes the other after its pending writes.
    :returns: Deferred fired with the reason text ("EOF" or the first error).
    """
    assert counted is None or counted is a or counted is b
    if can_splice(a, b):
        return splice_join(
            a, b, reactor=reactor, stats=stats, counted=counted, throttle=throttle,
            read_timeout=read_timeout, half_close=half_close,
        )
    done: defer.Deferred[str] = defer.Deferred()
    first_reason: list[str] = []
    last_read = {id(a): time.monotonic(), id(b): time.monotonic()}
    timer: list[Any] = [None]
    finished = [False]
    # Per destination: the writer gathering a bursty source's chunks, flushed
    # before the destination is closed or half-closed.
    gathered: dict[int, TurnWriter] = {}

    def flush(dst: RelayProtocol) -> None:
        writer = gathered.get(id(dst))
        if writer is not None:
            writer.flush()

    def close_both() -> None:
        flush(a)
        flush(b)
        a.close()
        b.close()

    def make_sink(src: RelayProtocol, dst: RelayProtocol) -> Callable[[bytes], None]:
        dst_transport = dst.transport
        dst_write = direct_writer(dst_transport) if dst_transport is not None else None
        if dst_write is not None and getattr(src.transport, "delivers_bursts", False):
            writer = gathered[id(dst)] = TurnWriter(reactor, dst_write)
            dst_write = writer.write
        count_rx = stats is not None and src is counted
        count_tx = stats is not None and dst is counted
        charge_read = throttle is not None and src is counted
        charge_write = throttle is not None and dst is counted
        gate = src.throttle_gate
        key = id(src)
        track = read_timeout > 0

        def sink(data: bytes) -> None:
            n = len(data)
            if track:
                last_read[key] = time.monotonic()
            if count_rx:
                stats.tcprx += n  # type: ignore[union-attr]
            if not dst.lost and dst_write is not None:
                dst_write(data)
                if count_tx:
                    stats.tcptx += n  # type: ignore[union-attr]
            if charge_read:
                throttle.consume(n, gate, "read")  # type: ignore[union-attr]
            elif charge_write:
                throttle.consume(n, gate, "write")  # type: ignore[union-attr]

        return sink

    def on_lost(side: RelayProtocol, other: RelayProtocol) -> Callable[[str], None]:
        def lost(reason: str) -> None:
            if not first_reason or (first_reason[0] == "EOF" and reason != "EOF"):
                first_reason[:] = [reason]
            writer = gathered.pop(id(side), None)
            if writer is not None:
                writer.discard()  # ``side`` is gone: nothing more reaches it
            flush(other)
            other.close()
            if throttle is not None:
                throttle.forget(side.throttle_gate)
            if a.lost and b.lost and not finished[0]:
                finished[0] = True
                if timer[0] is not None and timer[0].active():
                    timer[0].cancel()
                done.callback(first_reason[0] if first_reason else "EOF")

        return lost

    # Back-pressure: each transport pauses the other side's reading.
    for side, other in ((a, b), (b, a)):
        set_nodelay(side.transport)
        if not side.lost and not other.lost and side.transport is not None:
            try:
                side.transport.registerProducer(other.consumer_gate, True)  # type: ignore[attr-defined]
            except RuntimeError:
                pass

    if half_close:

        def make_eof(src: RelayProtocol, dst: RelayProtocol) -> Callable[[], None]:
            def eof() -> None:
                flush(dst)
                if not _write_eof(dst):
                    close_both()

            return eof

        a._on_eof = make_eof(a, b)
        b._on_eof = make_eof(b, a)

    a.on_lost(on_lost(a, b))
    b.on_lost(on_lost(b, a))
    if not a.lost:
        a.set_sink(make_sink(a, b))
    if not b.lost:
        b.set_sink(make_sink(b, a))

    if read_timeout > 0 and not finished[0]:

        def check() -> None:
            timer[0] = None
            if finished[0]:
                return
            now = time.monotonic()
            # The exchange ends once both directions have been idle that long.
            idle = now - max(last_read[id(a)], last_read[id(b)])
            if idle >= read_timeout:
                if not first_reason:
                    first_reason.append("read timeout")
                close_both()
                return
            timer[0] = reactor.callLater(read_timeout - idle, check)

        timer[0] = reactor.callLater(read_timeout, check)

    return done
