"""Joining two TCP connections into one byte pipe ("data exchange").

Every TCP connection that may take part in an exchange is driven by a
:class:`RelayProtocol` (or a subclass, such as a pool connection).  Until it
is joined, bytes that arrive are buffered (and reading is paused once the
buffer holds ``buffer_limit`` bytes); :meth:`RelayProtocol.peek` lets the
ingress side look at the first bytes (protocol blocking) without consuming
them.

:func:`join` then connects two such protocols:

* each side's bytes are written to the other side, with no per-byte work;
* each transport is registered as the *producer* of the other one, so a slow
  reader pauses the fast writer in both directions (back-pressure);
* ``TCP_NODELAY`` is set on both sockets;
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

A third use is the control channel: :meth:`RelayProtocol.set_sink` routes the
incoming bytes to any callable instead of a peer connection.

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

from twisted.internet import defer, tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOProtocol, _AggregateSmallWrites
from twisted.python.failure import Failure
from zope.interface import implementer

from nodepass.stats import TunnelStats

__all__ = ["RelayProtocol", "join", "set_nodelay", "direct_writer", "ThrottleLike"]

DEFAULT_BUFFER_LIMIT = 256 * 1024


class ThrottleLike(TypingProtocol):
    """What the relay needs from a rate limiter (see nodepass.datapath.ratelimit)."""

    def consume(self, nbytes: int, producer: IPushProducer | None, direction: str = "read") -> None: ...

    def forget(self, producer: IPushProducer) -> None: ...


def set_nodelay(transport: Any) -> None:
    """Set TCP_NODELAY on a transport (also through a TLS wrapper); best effort."""
    seen = 0
    while transport is not None and seen < 4:
        fn = getattr(transport, "setTcpNoDelay", None)
        if fn is not None:
            try:
                fn(True)
            except Exception:
                pass
            return
        transport = getattr(transport, "transport", None)
        seen += 1


def direct_writer(transport: Any) -> Callable[[bytes], None]:
    """A ``write`` for ``transport`` that sends at once when nothing is queued.

    Twisted's ``write`` always queues and sends on the next reactor pass,
    which costs a writer registration, a poll round and an unregistration
    per chunk.  For a plain TCP transport whose queue is empty this hands the
    chunk straight to the socket (``writeSomeData``) and queues only what the
    kernel did not take, so ordering, back-pressure (the queue still pauses a
    registered producer) and error handling stay Twisted's.

    A TLS transport normally holds every write smaller than 64 kB back
    until the next reactor pass (and copies each one) to batch small
    writes; a relay chunk is already one read's worth, so it goes to the TLS
    layer at once, after anything the batcher still holds.  Any other
    transport (test transports) gets its own ``write``.
    """
    batcher = getattr(transport, "_aggregator", None)
    if isinstance(transport, TLSMemoryBIOProtocol) and isinstance(batcher, _AggregateSmallWrites):
        tls_t: Any = transport
        tls_write: Any = TLSMemoryBIOProtocol.write
        agg: Any = batcher

        def write_tls(data: bytes) -> None:
            if agg._buffer:
                agg.flush()
            tls_write(tls_t, data)

        return write_tls
    if not is_plain_tcp(transport):
        return transport.write  # type: ignore[no-any-return]
    t: Any = transport

    def write(data: bytes) -> None:
        rest = write_at_once(t, data)
        if rest is not None:
            t.write(rest)

    return write


def is_plain_tcp(transport: Any) -> bool:
    """True for a Twisted TCP transport with no TLS started on it."""
    return type(transport) in (tcp.Server, tcp.Client) and not getattr(transport, "TLS", False)


def write_at_once(t: Any, data: bytes) -> bytes | None:
    """Hand *data* to the socket of plain TCP transport *t* (see :func:`is_plain_tcp`)
    now when the transport is open and nothing is queued.

    Returns ``None`` when the socket took everything, else the bytes still to
    ``write`` (all of *data* when nothing was sent at once).
    """
    if (
        t.connected
        and not t.disconnecting
        and not t._writeDisconnecting
        and not t._tempDataLen
        and t.offset == len(t.dataBuffer)
    ):
        sent = t.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            if sent >= len(data):
                return None
            return data[sent:]
    return data


def _reason_text(reason: Failure | None) -> str:
    if reason is None or isinstance(reason.value, ConnectionDone):
        return "EOF"
    value = reason.value
    text = str(value).strip()
    return text or type(value).__name__


@implementer(IPushProducer)
class _Gate:
    """Pauses a transport's reading for any of several independent reasons.

    The consumer (back-pressure), the throttle and the pre-join buffer each
    hold their own flag; the transport reads again only when no flag is set.
    """

    def __init__(self, owner: RelayProtocol, reason: str) -> None:
        self._owner = owner
        self._reason = reason

    def pauseProducing(self) -> None:
        self._owner._pause(self._reason)

    def resumeProducing(self) -> None:
        self._owner._resume(self._reason)

    def stopProducing(self) -> None:
        self._owner._resume(self._reason)


@implementer(IHalfCloseableProtocol)
class RelayProtocol(Protocol):
    """A TCP connection that can be peeked at, then joined to another one.

    Attributes after the connection ends: ``lost`` is True and ``lost_reason``
    holds the reason text.  ``when_lost()`` gives a Deferred fired then.
    """

    buffer_limit: int = DEFAULT_BUFFER_LIMIT

    def __init__(self) -> None:
        self.transport: ITransport | None = None
        self.lost: bool = False
        self.lost_reason: str = ""
        self._buf: list[bytes] = []
        self._buf_len = 0
        self._sink: Callable[[bytes], None] | None = None
        self._on_eof: Callable[[], None] | None = None
        self._lost_waiters: list[defer.Deferred[str]] = []
        self._peekers: list[tuple[int, defer.Deferred[bytes], Any]] = []
        self._pause_reasons: set[str] = set()
        self._read_eof = False
        self.consumer_gate = _Gate(self, "consumer")
        self.throttle_gate = _Gate(self, "throttle")

    # -- reading control -------------------------------------------------
    def _pause(self, reason: str) -> None:
        was = bool(self._pause_reasons)
        self._pause_reasons.add(reason)
        if not was and not self.lost and self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def _resume(self, reason: str) -> None:
        if reason not in self._pause_reasons:
            return
        self._pause_reasons.discard(reason)
        if not self._pause_reasons and not self.lost and self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    # -- Protocol ----------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None:
            sink(data)
            return
        self._buf.append(data)
        self._buf_len += len(data)
        if self._buf_len >= self.buffer_limit:
            self._pause("buffer")
        self._check_peekers()

    def readConnectionLost(self) -> None:
        """The peer sent FIN (only called for half-closeable transports)."""
        self._read_eof = True
        if self._on_eof is not None:
            cb, self._on_eof = self._on_eof, None
            cb()
        else:
            # Not joined in half-close mode: treat as a full close.
            if self.transport is not None:
                self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self._read_eof and self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self.lost_reason = _reason_text(reason)
        for _n, d, call in self._peekers:
            if call is not None and call.active():
                call.cancel()
            d.callback(b"".join(self._buf))
        self._peekers = []
        waiters, self._lost_waiters = self._lost_waiters, []
        for w in waiters:
            w.callback(self.lost_reason)

    # -- API -----------------------------------------------------------------
    def when_lost(self) -> defer.Deferred[str]:
        """A Deferred fired with the reason text when this connection ends."""
        if self.lost:
            return defer.succeed(self.lost_reason)
        d: defer.Deferred[str] = defer.Deferred()
        self._lost_waiters.append(d)
        return d

    def buffered(self) -> bytes:
        """Bytes received but not yet delivered to a sink (not consumed)."""
        return b"".join(self._buf)

    def peek(self, nbytes: int, timeout: float, reactor: IReactorTime) -> defer.Deferred[bytes]:
        """Wait until ``nbytes`` are buffered, the connection ends, or ``timeout``
        seconds pass; fire with the buffered bytes (possibly fewer or empty).
        Nothing is consumed: the bytes are delivered later as usual."""
        if self._buf_len >= nbytes or self.lost or self._sink is not None:
            return defer.succeed(b"".join(self._buf))
        d: defer.Deferred[bytes] = defer.Deferred()

        def expire() -> None:
            for i, item in enumerate(self._peekers):
                if item[1] is d:
                    del self._peekers[i]
                    break
            d.callback(b"".join(self._buf))

        call = reactor.callLater(timeout, expire) if timeout > 0 else None
        self._peekers.append((nbytes, d, call))
        return d

    def _check_peekers(self) -> None:
        if not self._peekers:
            return
        keep = []
        for n, d, call in self._peekers:
            if self._buf_len >= n:
                if call is not None and call.active():
                    call.cancel()
                d.callback(b"".join(self._buf))
            else:
                keep.append((n, d, call))
        self._peekers = keep

    def set_sink(self, sink: Callable[[bytes], None] | None) -> None:
        """Deliver incoming bytes to ``sink`` (buffered bytes first); None buffers again."""
        self._sink = sink
        if sink is None:
            return
        if self._buf:
            data = b"".join(self._buf)
            self._buf = []
            self._buf_len = 0
            sink(data)
        self._resume("buffer")

    def close(self) -> None:
        """Close after flushing pending writes.

        A registered producer is dropped first: a TLS transport would
        otherwise wait for it before shutting down."""
        if not self.lost and self.transport is not None:
            unregister = getattr(self.transport, "unregisterProducer", None)
            if unregister is not None:
                try:
                    unregister()
                except Exception:
                    pass
            self.transport.loseConnection()

    def abort(self) -> None:
        """Close at once, dropping pending writes."""
        if not self.lost and self.transport is not None:
            abort = getattr(self.transport, "abortConnection", None)
            if abort is not None:
                abort()
            else:
                self.transport.loseConnection()


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
    done: defer.Deferred[str] = defer.Deferred()
    first_reason: list[str] = []
    last_read = {id(a): time.monotonic(), id(b): time.monotonic()}
    timer: list[Any] = [None]
    finished = [False]

    def close_both() -> None:
        a.close()
        b.close()

    def make_sink(src: RelayProtocol, dst: RelayProtocol) -> Callable[[bytes], None]:
        dst_transport = dst.transport
        dst_write = direct_writer(dst_transport) if dst_transport is not None else None
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
                if not _write_eof(dst):
                    close_both()

            return eof

        a._on_eof = make_eof(a, b)
        b._on_eof = make_eof(b, a)

    a.when_lost().addCallback(on_lost(a, b))
    b.when_lost().addCallback(on_lost(b, a))
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
