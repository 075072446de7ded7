"""The relay endpoint: a connection that buffers, can be peeked at, and is joined later.

Every connection that may take part in an exchange (a user or target TCP
connection, a pool connection of any transport) is driven by a
:class:`RelayProtocol`.  Until it is joined, bytes that arrive are buffered
(and reading is paused once the buffer holds ``buffer_limit`` bytes);
:meth:`RelayProtocol.peek` lets the ingress side look at the first bytes
(protocol blocking) without consuming them; :meth:`RelayProtocol.set_sink`
routes incoming bytes to a callable (the peer connection's writer in a
:func:`nodepass.relay.join`, or the control channel's line reader).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, IReactorTime, ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["RelayProtocol", "DEFAULT_BUFFER_LIMIT", "reason_text"]

DEFAULT_BUFFER_LIMIT = 256 * 1024
_log = Logger()


def reason_text(reason: Failure | None) -> str:
    """"EOF" for an orderly close, else the error's text (or its type name)."""
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
        # Every attribute set later by Twisted is set here first, so that the
        # instance keeps a compact (key-sharing) attribute dictionary.
        self.connected = 0
        self.factory: Any = None
        self.transport: ITransport | None = None
        self.lost: bool = False
        self.lost_reason: str = ""
        self._buf: list[bytes] = []
        self._buf_len = 0
        self._sink: Callable[[bytes], None] | None = None
        self._on_eof: Callable[[], None] | None = None
        self._lost_calls: list[Callable[[str], object]] = []
        self._peekers: list[tuple[int, defer.Deferred[bytes], Any]] = []
        self._pause_reasons: set[str] = set()
        self._read_eof = False
        self._consumer_gate: _Gate | None = None
        self._throttle_gate: _Gate | None = None

    # -- gates (made when first needed: a gate and its owner form a cycle) --
    @property
    def consumer_gate(self) -> _Gate:
        """The producer the peer's transport pauses when its buffer is full."""
        gate = self._consumer_gate
        if gate is None:
            gate = self._consumer_gate = _Gate(self, "consumer")
        return gate

    @property
    def throttle_gate(self) -> _Gate:
        """The producer the rate limiter pauses."""
        gate = self._throttle_gate
        if gate is None:
            gate = self._throttle_gate = _Gate(self, "throttle")
        return gate

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
        self.lost_reason = reason_text(reason)
        for _n, d, call in self._peekers:
            if call is not None and call.active():
                call.cancel()
            d.callback(b"".join(self._buf))
        self._peekers = []
        calls, self._lost_calls = self._lost_calls, []
        for call in calls:
            try:
                call(self.lost_reason)
            except Exception:
                _log.failure("connection-lost callback failed")
        # Nothing pauses or feeds a closed connection: drop the gates and the
        # sink (which refer back to this connection or its peer), so that it
        # is freed at once rather than by the cycle collector.
        self._consumer_gate = self._throttle_gate = None
        self._sink = None
        self._on_eof = None

    # -- API -----------------------------------------------------------------
    def when_lost(self) -> defer.Deferred[str]:
        """A Deferred fired with the reason text when this connection ends."""
        if self.lost:
            return defer.succeed(self.lost_reason)
        d: defer.Deferred[str] = defer.Deferred()
        self._lost_calls.append(d.callback)
        return d

    def on_lost(self, call: Callable[[str], object]) -> None:
        """Call ``call(reason text)`` when this connection ends (at once if it
        has); the callbacks run in the order they were added.  Cheaper than
        :meth:`when_lost` on the per-connection path."""
        if self.lost:
            call(self.lost_reason)
        else:
            self._lost_calls.append(call)

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

    @property
    def awaiting_sink(self) -> bool:
        """True while reads are kept for a sink not set yet (each is later
        delivered on its own, so a transport that carries messages should
        not merge them meanwhile)."""
        return self._sink is None and not self.lost

    def set_sink(self, sink: Callable[[bytes], None] | None) -> None:
        """Deliver incoming bytes to ``sink``, first the buffered reads, one
        call per read as they arrived (a UDP session takes each read as one
        datagram); None buffers again."""
        self._sink = sink
        if sink is None:
            return
        buf = self._buf
        if buf:
            self._buf = []
            self._buf_len = 0
            for i, data in enumerate(buf):
                if self._sink is not sink:
                    # The sink changed meanwhile: the rest goes to the new one.
                    self._buf[:0] = buf[i:]
                    self._buf_len = sum(len(d) for d in self._buf)
                    if self._sink is not None:
                        self.set_sink(self._sink)
                    return
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
