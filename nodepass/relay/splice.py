"""Zero-copy exchange between two plain TCP sockets with ``splice(2)``.

When both ends of an exchange are plain TCP connections (no TLS, no
multiplexed stream), the bytes need not pass through Python at all: the
kernel moves them from one socket into a pipe and from the pipe into the
other socket (``os.splice``), page by page, without copying them into user
space.  :func:`splice_join` does that with the same contract as
:func:`nodepass.relay.join` (it is what ``join`` uses when it can):

* driven by the reactor's readiness callbacks of the two transports (their
  ``doRead``/``doWrite`` are taken over for the exchange); no threads and no
  polling;
* one pipe per direction, taken from a small shared free list only while
  bytes wait in it (the destination would block), so idle exchanges hold
  no pipe;
* back-pressure: a direction whose pipe holds bytes stops reading its
  source until the destination drained them;
* counters and ``rate``: every splice is counted from its return value
  (``tcprx``/``tcptx`` for the counted side) and charged to the throttle,
  each splice bounded by the tokens available;
* ``read_timeout``, and the end of the exchange: non-half-close closes both
  sides once one side ended and what was read is delivered; ``half_close``
  forwards a FIN (``shutdown(SHUT_WR)``) and keeps the other direction;
* bytes read before the join (peeked for sniffing, or early data) and bytes
  still queued in a transport (a PROXY header) go out first.

Where splice is unavailable (not Linux, a TLS or stream transport, a test
transport) :func:`can_splice` is False and the copying relay is used.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import Any

from twisted.internet import defer, main
from twisted.internet.interfaces import IReactorTime

from nodepass.relay.endpoint import RelayProtocol
from nodepass.relay.write import is_plain_tcp, set_nodelay
from nodepass.stats import TunnelStats

__all__ = ["SPLICE_AVAILABLE", "can_splice", "splice_join", "PIPE_SIZE"]

SPLICE_AVAILABLE = hasattr(os, "splice") and hasattr(os, "pipe2")
#: Bytes a pipe holds (``F_SETPIPE_SZ`` when allowed, else the kernel default).
PIPE_SIZE = 1 << 20
#: Empty pipes kept for reuse (each is two descriptors).
FREE_PIPES = 64

_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = 1031
_free: list[tuple[int, int, int]] = []


def _new_pipe() -> tuple[int, int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    size = 65536
    try:
        import fcntl

        size = fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
    except (OSError, ImportError):
        pass
    return r, w, size


def _take_pipe() -> tuple[int, int, int]:
    return _free.pop() if _free else _new_pipe()


def _give_pipe(pipe: tuple[int, int, int], empty: bool) -> None:
    if empty and len(_free) < FREE_PIPES:
        _free.append(pipe)
        return
    os.close(pipe[0])
    os.close(pipe[1])


def _has_pending_writes(t: Any) -> bool:
    return bool(t._tempDataLen) or t.offset != len(t.dataBuffer)


def _take_pending_writes(t: Any) -> bytes:
    """Empty a Twisted transport's write buffer and return what it held."""
    queued = bytes(t.dataBuffer[t.offset:]) + b"".join(t._tempDataBuffer)
    t.dataBuffer, t.offset, t._tempDataBuffer, t._tempDataLen = b"", 0, [], 0
    return queued


def can_splice(a: RelayProtocol, b: RelayProtocol) -> bool:
    """Whether :func:`splice_join` can carry an exchange between ``a`` and ``b``."""
    if not SPLICE_AVAILABLE:
        return False
    for side in (a, b):
        t: Any = side.transport
        if side.lost or side._sink is not None or side._peekers or not is_plain_tcp(t):
            return False
        if not t.connected or t.disconnecting or t._writeDisconnecting or getattr(t, "_aborting", False):
            return False
    return True


class _Direction:
    """Bytes flowing from ``src`` to ``dst``."""

    __slots__ = (
        "exchange", "src", "dst", "src_t", "dst_t", "src_fd", "dst_fd", "pipe", "queued", "prefix",
        "eof", "done", "count_rx", "count_tx", "bucket", "charge", "last_read",
    )

    def __init__(self, exchange: _SpliceExchange, src: RelayProtocol, dst: RelayProtocol) -> None:
        #: Cleared when the exchange finishes (the exchange refers to this direction).
        self.exchange: _SpliceExchange | None = exchange
        self.src = src
        self.dst = dst
        src_t: Any = src.transport
        dst_t: Any = dst.transport
        self.src_t = src_t
        self.dst_t = dst_t
        self.src_fd: int = src_t.fileno()
        self.dst_fd: int = dst_t.fileno()
        self.pipe: tuple[int, int, int] | None = None
        self.queued = 0
        self.prefix = b""
        self.eof = False
        self.done = False
        self.count_rx = False
        self.count_tx = False
        self.bucket: Any = None
        self.charge: tuple[str, Any] | None = None
        self.last_read = time.monotonic()

    # The source's doRead, the destination's doWrite and the source's
    # end-of-file callback while the exchange runs (bound methods: smaller
    # than a closure each).
    def do_read(self) -> Any:
        exchange = self.exchange
        if exchange is None:
            self.src_t.stopReading()
            return None
        return exchange._read(self)

    def do_write(self) -> Any:
        exchange = self.exchange
        if exchange is None:
            self.dst_t.stopWriting()
            return None
        return exchange._write(self)

    def on_eof(self) -> None:
        exchange = self.exchange
        self.src_t.stopReading()
        if exchange is not None:
            exchange._eof(self)


class _SpliceExchange:
    def __init__(
        self,
        a: RelayProtocol,
        b: RelayProtocol,
        *,
        reactor: IReactorTime,
        stats: TunnelStats | None,
        counted: RelayProtocol | None,
        throttle: Any,
        read_timeout: float,
        half_close: bool,
    ) -> None:
        self.a = a
        self.b = b
        self.reactor = reactor
        self.stats = stats
        self.throttle = throttle
        self.read_timeout = read_timeout
        self.half_close = half_close
        self.done: defer.Deferred[str] = defer.Deferred()
        self.reason = ""
        self.finished = False
        self.closing = False
        self.timer: Any = None
        self.ab = _Direction(self, a, b)
        self.ba = _Direction(self, b, a)
        for d in (self.ab, self.ba):
            d.count_rx = stats is not None and d.src is counted
            d.count_tx = stats is not None and d.dst is counted
            if throttle is not None and d.src is counted:
                d.charge = ("read", d.src.throttle_gate)
            elif throttle is not None and d.dst is counted:
                d.charge = ("write", d.src.throttle_gate)
            if d.charge is not None:
                bucket = getattr(throttle, "bucket", None)
                d.bucket = bucket(d.charge[0]) if bucket is not None else None
        self._taken: list[Any] = []

    # -- start ----------------------------------------------------------------------
    def start(self) -> defer.Deferred[str]:
        a, b = self.a, self.b
        for side in (a, b):
            set_nodelay(side.transport)
        # Bytes already read, and bytes already queued, go first.
        for d in (self.ab, self.ba):
            data = d.src.buffered()
            d.src._buf = []
            d.src._buf_len = 0
            if data:
                # Counted now, as the copying relay counts a chunk when it
                # hands it on; a PROXY header queued below was counted by
                # whoever wrote it.
                self._count(d, len(data), read=True)
                self._count(d, len(data), read=False)
                d.prefix = data
            if _has_pending_writes(d.dst_t):
                d.prefix = _take_pending_writes(d.dst_t) + d.prefix
        for side, d_in, d_out in ((a, self.ab, self.ba), (b, self.ba, self.ab)):
            transport: Any = side.transport
            read = d_in.do_read
            write = d_out.do_write
            transport.doRead = read
            transport.doWrite = write
            self._taken.append((transport, read, write))
            side._on_eof = d_in.on_eof
            side._resume("buffer")
        a.on_lost(lambda reason: self._lost(reason, a))
        b.on_lost(lambda reason: self._lost(reason, b))
        for d in (self.ab, self.ba):
            if self.finished:
                break
            if d.prefix:
                # Sent now: the destination is usually writable already, and
                # waiting for the next reactor pass would cost a poll round
                # (what it does not take is sent once it is writable).
                self._flush(d)
            elif not d.src._pause_reasons:
                d.src_t.startReading()
        if self.read_timeout > 0 and not self.finished:
            self.timer = self.reactor.callLater(self.read_timeout, self._check_idle)
        return self.done

    # -- accounting ------------------------------------------------------------------------
    def _count(self, d: _Direction, n: int, *, read: bool) -> None:
        stats = self.stats
        if read:
            if d.count_rx:
                stats.tcprx += n  # type: ignore[union-attr]
            if d.charge is not None:
                self.throttle.consume(n, d.charge[1], d.charge[0])
        elif d.count_tx:
            stats.tcptx += n  # type: ignore[union-attr]

    # -- reading ---------------------------------------------------------------------------
    def _read(self, d: _Direction) -> Any:
        if d.eof or self.closing or self.finished:
            d.src_t.stopReading()
            return None
        src = d.src
        while True:
            if d.queued or d.prefix:
                d.src_t.stopReading()
                d.dst_t.startWriting()
                return None
            if src._pause_reasons:
                return None
            pipe = d.pipe
            if pipe is None:
                pipe = d.pipe = _take_pipe()
            want = pipe[2]
            if d.bucket is not None:
                tokens = int(d.bucket.tokens)
                want = max(4096, min(want, tokens))
            try:
                n = os.splice(d.src_fd, pipe[1], want, flags=_FLAGS)
            except BlockingIOError:
                self._release_pipe(d)
                return None
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                self._note(exc)
                return main.CONNECTION_LOST
            if n == 0:
                self._release_pipe(d)
                d.src_t.stopReading()
                self._eof(d)
                return None
            d.queued += n
            if self.read_timeout > 0:
                d.last_read = time.monotonic()
            self._count(d, n, read=True)
            error = self._flush(d)
            if error is not None:
                return None
            if n < want:
                # The socket had no more for now; epoll says when it has.
                if not d.queued:
                    self._release_pipe(d)
                return None

    def _release_pipe(self, d: _Direction) -> None:
        if d.pipe is not None and not d.queued:
            _give_pipe(d.pipe, True)
            d.pipe = None

    # -- writing ---------------------------------------------------------------------------
    def _write(self, d: _Direction) -> Any:
        t = d.dst_t
        if t.disconnecting and not self.finished:
            # Someone closed this side from outside the exchange.
            self._give_back(t)
            return t.doWrite()
        self._flush(d)
        return None

    def _flush(self, d: _Direction) -> BaseException | None:
        """Move waiting bytes into the destination; on a full socket, wait for writability.

        Bytes someone writes to a spliced transport directly go out after
        what the exchange has queued."""
        while True:
            if d.prefix:
                try:
                    sent = d.dst_t.socket.send(d.prefix)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    self._write_failed(d, exc)
                    return exc
                d.prefix = d.prefix[sent:]
                if d.prefix:
                    d.dst_t.startWriting()
                    return None
            while d.queued:
                assert d.pipe is not None
                try:
                    sent = os.splice(d.pipe[0], d.dst_fd, d.queued, flags=_FLAGS)
                except BlockingIOError:
                    d.dst_t.startWriting()
                    return None
                except OSError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    self._write_failed(d, exc)
                    return exc
                d.queued -= sent
                self._count(d, sent, read=False)
            if not _has_pending_writes(d.dst_t):
                break
            d.prefix = _take_pending_writes(d.dst_t)
        d.dst_t.stopWriting()
        self._release_pipe(d)
        if d.eof:
            self._direction_done(d)
        elif not self.closing and not self.finished:
            if not d.src._pause_reasons and not d.src_t.disconnecting:
                d.src_t.startReading()
        if self.closing and not self.ab.queued and not self.ba.queued and not self.ab.prefix and not self.ba.prefix:
            self._finish()
        return None

    def _write_failed(self, d: _Direction, exc: OSError) -> None:
        self._note(exc)
        if d.pipe is not None:
            _give_pipe(d.pipe, False)
            d.pipe = None
            d.queued = 0
        # The destination is broken; the source is closed in order, as the
        # copying relay does.
        self._finish()

    # -- ends ------------------------------------------------------------------------------
    def _eof(self, d: _Direction) -> None:
        if d.eof:
            return
        d.eof = True
        if not self.half_close:
            # One side ended: deliver what was read either way, then close both.
            self.closing = True
            self.ab.src_t.stopReading()
            self.ba.src_t.stopReading()
            if not (self.ab.queued or self.ba.queued or self.ab.prefix or self.ba.prefix):
                self._finish()
            return
        if not d.queued and not d.prefix:
            self._direction_done(d)

    def _direction_done(self, d: _Direction) -> None:
        if d.done:
            return
        d.done = True
        if not self.half_close:
            return
        try:
            d.dst_t.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if self.ab.done and self.ba.done:
            self._finish()

    def _check_idle(self) -> None:
        self.timer = None
        if self.finished:
            return
        idle = time.monotonic() - max(self.ab.last_read, self.ba.last_read)
        if idle >= self.read_timeout:
            if not self.reason:
                self.reason = "read timeout"
            self._finish()
            return
        self.timer = self.reactor.callLater(self.read_timeout - idle, self._check_idle)

    def _note(self, exc: BaseException) -> None:
        if not self.reason or self.reason == "EOF":
            self.reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc)

    def _give_back(self, t: Any) -> None:
        for i, (taken, read, write) in enumerate(self._taken):
            if taken is t:
                if t.__dict__.get("doRead") is read:
                    del t.doRead
                if t.__dict__.get("doWrite") is write:
                    del t.doWrite
                del self._taken[i]
                return

    def _finish(self) -> None:
        """Hand both transports back to Twisted and close them in order."""
        if self.finished:
            return
        self.finished = True
        self.closing = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        for d in (self.ab, self.ba):
            d.exchange = None
            if d.pipe is not None:
                _give_pipe(d.pipe, not d.queued)
                d.pipe = None
                d.queued = 0
        for side in (self.a, self.b):
            t: Any = side.transport
            side._on_eof = None
            if t is None:
                continue
            self._give_back(t)
            if side.lost:
                continue
            # Nothing is queued in the transport (the exchange wrote to the
            # socket itself): close now, orderly, rather than on a write
            # event that a socket shut down both ways reports as a hang-up
            # (close() stops reading and writing first).
            t._writeDisconnected = True
            # close() alone sends the FIN (or the RST when unread bytes
            # remain, as after a shutdown); the shutdown call Twisted makes
            # first would only cost a system call.
            t._shouldShutdown = False
            side.close()

    def _lost(self, reason: str, side: RelayProtocol) -> None:
        if not self.reason or (self.reason == "EOF" and reason != "EOF"):
            self.reason = reason
        if self.throttle is not None:
            self.throttle.forget(side.throttle_gate)
        if not self.finished:
            # As the copying relay (and NodePass) do: the other side is closed in
            # order (FIN), whatever ended this one.
            self._finish()
        if self.a.lost and self.b.lost and not self.done.called:
            self.done.callback(self.reason or "EOF")


def splice_join(
    a: RelayProtocol,
    b: RelayProtocol,
    *,
    reactor: IReactorTime,
    stats: TunnelStats | None = None,
    counted: RelayProtocol | None = None,
    throttle: Any = None,
    read_timeout: float = 0.0,
    half_close: bool = False,
) -> defer.Deferred[str]:
    """Carry the exchange between ``a`` and ``b`` with splice (see the module
    docstring); same arguments and result as :func:`nodepass.relay.join`.
    Only call it when :func:`can_splice` says so."""
    return _SpliceExchange(
        a, b, reactor=reactor, stats=stats, counted=counted, throttle=throttle,
        read_timeout=read_timeout, half_close=half_close,
    ).start()
