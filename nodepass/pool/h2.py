"""Type-3 (HTTP/2) pool: every member is one stream of an HTTP/2 connection over TLS 1.3.

Wire sequence, as NodePass speaks it:

* the client connects to the tunnel TCP port, TLS 1.3 with ALPN ``h2``
  (mandatory: the server closes a client that did not negotiate ``h2``);
  one HTTP/2 connection carries many members;
* a member is a ``POST /stream`` request (headers as Go's HTTP/2 client
  sends them, no END_STREAM) followed by one DATA byte ``0x00``;
* the server consumes that byte, answers ``200`` and writes the 4-byte ID
  as the first response bytes; from then on the request body (client to
  server) and the response body (server to client) are the member's byte
  pipe;
* a refused request (another client IP: 403, wrong method or path: 404,
  pool full or closing: 503) gets a response with no body and END_STREAM,
  then RST_STREAM NO_ERROR, so a Go client (which reads the first 4 body
  bytes as the ID whatever the status) fails cleanly instead of registering
  a bogus ID.

Flow control: credit goes back to the peer only for bytes the relay has
taken (:meth:`StreamTransport._consumed`), so a slow target slows the
peer's writer and a paused member never holds more than its window;
outgoing bytes wait in the member's queue for window (and for the TLS
socket when it is full), which pauses the relay's reader above the high
water mark.  The connection windows are raised to 1 GiB so that one stalled
member never blocks the others.

Data path: DATA frames of members bypass h2 both ways.  Received ones
(no flags, stream open both ways, no header block in progress) are parsed
here and their payload goes to the member as it arrives; their credit goes
back in WINDOW_UPDATE frames built here, once a quarter of the stream
window is due (16 MiB for the connection), and a peer that sends more than
twice the window it was given is closed with FLOW_CONTROL_ERROR.  Sent ones
are framed here and charged to h2's outbound windows exactly as
``send_data`` charges them, so WINDOW_UPDATE and SETTINGS handling stay h2's.
Every other frame goes through h2, in order.

Closing: the server ends a member with END_STREAM after its queued bytes
(Go's server sends nothing at all; a Go client sees end of file and resets
the stream in turn) and resets a stream whose client keeps sending after
that; the client ends with END_STREAM and then RST_STREAM CANCEL unless the
server already ended its side (as Go's client does), and never waits for
the server's end, because a Go server never sends it.  A peer's
RST_STREAM with NO_ERROR or CANCEL reaches the relay as an end of stream
after the bytes already received; other codes as an error.  h2 stops every
stream of a connection once a GOAWAY is sent or received, so a GOAWAY ends
the members it carries.

Server (:class:`H2ServerPool`): the tunnel TCP port's factory after the
handshake (:meth:`H2ServerPool.factory`); any number of client connections;
``MAX_CONCURRENT_STREAMS`` = ``max`` (h2's default of 100 would cap a Go
client), 1 MiB stream windows and frames like Go's server, the client IP
checked on each request, a connection without streams closed after twice
the report interval.  Refusals (TLS failures, no ``h2``, bad requests,
another IP, protocol errors) are counted in :attr:`H2ServerPool.refused` and
logged at most once per report interval per kind.

Client (:class:`H2ClientPool`): one connection at a time takes new members.
A Go server never frees the handler of a stream it answered, so one of its
connections hands out at most its ``MAX_CONCURRENT_STREAMS`` members over
its whole life: the client counts the streams it opened on a connection and
dials a new one when that count reaches the server's limit (the old one
stays for its members and closes once they are gone); a stream that gets
no response within the ID timeout marks its connection exhausted too.  A
PING goes out every report interval on every connection; three intervals
in a row without its answer (or any other byte from the server) close it
(its members end, the next refill round dials anew).
"""

from __future__ import annotations

import os
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from nodepass.log import NodePassLogger
from nodepass.net import addr_text
from nodepass.pool.base import ID_READ_TIMEOUT, ClientPoolBase, PoolConnection, ServerPoolBase
from nodepass.pool.stream import StreamTransport
from nodepass.pool.tcp import DialFactory
from nodepass.relay import set_keepalive, set_nodelay
from nodepass.relay.tls import TLSFactory

__all__ = [
    "ALPN",
    "H2ServerPool",
    "H2ClientPool",
    "request_headers",
]

ALPN = b"h2"
#: Per-stream receive window and largest frame we accept, server side (Go's server values).
SERVER_STREAM_WINDOW = 1 << 20
SERVER_MAX_FRAME = 1 << 20
#: Per-stream receive window of the client (Go's HTTP/2 client value) and its largest frame.
CLIENT_STREAM_WINDOW = 4 << 20
CLIENT_MAX_FRAME = 1 << 20
#: Connection-level receive window, both sides.
CONNECTION_WINDOW = 1 << 30
#: Unanswered PINGs after which a client connection counts as dead.
MISSED_PINGS = 3
HANDSHAKE_TIMEOUT = ID_READ_TIMEOUT
#: The client connection preface (``PRI * HTTP/2.0...``) that precedes the server's first frame.
_PREFACE_LEN = 24
#: Credit returned for bytes read on the fast path goes out once a stream has
#: this share of its receive window to give back (h2 itself waits for half).
_STREAM_UPDATE_SHARE = 4
#: ... and once the connection has this many bytes to give back.
_CONNECTION_UPDATE_AT = 16 << 20
_DATA = 0x0
_HEADERS = 0x1
_PUSH_PROMISE = 0x5
_CONTINUATION = 0x9
_END_HEADERS = 0x4
_WINDOW_UPDATE_HEAD = b"\x00\x00\x04\x08\x00"


def _window_update(stream_id: int, increment: int) -> bytes:
    return _WINDOW_UPDATE_HEAD + stream_id.to_bytes(4, "big") + increment.to_bytes(4, "big")
#: RST_STREAM codes that end a member like an end of stream (after the bytes received).
_ORDERLY_RESETS = (ErrorCodes.NO_ERROR, ErrorCodes.CANCEL)


def _data_frame_summary(self: hyperframe.frame.DataFrame) -> str:
    return f"<{len(self.data)} bytes>"


# h2 formats every frame it receives for its trace log, even with tracing
# off, and a DATA frame's text serializes and hex-encodes its whole payload:
# about a fifth of the CPU time of a transfer.  Describe DATA frames by their
# length instead.
hyperframe.frame.DataFrame._body_repr = _data_frame_summary  # type: ignore[method-assign,assignment]


def request_headers(authority: str) -> list[tuple[str, str]]:
    """The headers of one member's ``POST /stream``, in the order Go's HTTP/2 client sends them."""
    return [
        (":authority", authority),
        (":method", "POST"),
        (":path", "/stream"),
        (":scheme", "https"),
        ("accept-encoding", "gzip"),
        ("user-agent", "Go-http-client/2.0"),
    ]


def _failure(exc: BaseException) -> Failure:
    return Failure(exc)  # type: ignore[no-untyped-call]


class H2MemberError(Exception):
    """Why a member's stream ended abnormally (refused, reset, connection gone)."""


class _Refusals:
    """Counts refusals by kind; one warn line per kind at most every ``interval`` seconds."""

    def __init__(self, reactor: Any, logger: NodePassLogger, interval: float) -> None:
        self.reactor = reactor
        self.logger = logger
        self.interval = max(interval, 1.0)
        self.counts: Counter[str] = Counter()
        self._last: dict[str, float] = {}
        self._quiet: Counter[str] = Counter()

    def note(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        now = self.reactor.seconds()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._quiet[kind] += 1
            return
        self._last[kind] = now
        more = self._quiet.pop(kind, 0)
        self.logger.warn(
            "Tunnel pool: HTTP/2 %s refused: %s%s", kind, detail,
            f" (and {more} more since the last report)" if more else "",
        )


# -- one member ------------------------------------------------------------------------------
class _Stream(StreamTransport):
    """One HTTP/2 stream as a member's transport (see :mod:`nodepass.pool.stream`)."""

    def __init__(self, owner: _H2Connection, stream_id: int) -> None:
        t = owner.transport
        assert t is not None
        super().__init__(owner.reactor, t.getPeer(), t.getHost())
        self.owner = owner
        self.stream_id = stream_id
        self.out: deque[bytes] = deque()
        self.queued = 0
        #: END_STREAM waits behind the queued bytes.
        self.end_pending = False
        #: RST_STREAM CANCEL follows that END_STREAM (client close).
        self.cancel_after_end = False
        self.local_ended = False
        self.remote_ended = False
        #: Reset (either way) or ended both ways: nothing more can be sent.
        self.h2_closed = False
        #: Server: the handshake byte has not arrived yet.  Client: no response yet.
        self.opening = True
        #: Bytes read on the fast path (never seen by h2) that the member has not taken yet,
        #: and bytes taken whose window credit has not gone back to the peer.
        self.rx_fast = 0
        self.rx_credit = 0
        #: Bytes h2 delivered to the member that it has not taken yet (credit through h2).
        self.rx_slow = 0
        #: Deliver every DATA frame whole (see :attr:`bufferSize`).
        self.whole_frames = False

    # -- StreamTransport ----------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        if self.h2_closed or self.local_ended or self.end_pending:
            return
        self.out.append(data)
        self.queued += len(data)
        self.owner._pump(self)

    @property
    def bufferSize(self) -> int:
        """Bytes per delivery at most: a DATA frame."""
        return CLIENT_MAX_FRAME

    @bufferSize.setter
    def bufferSize(self, size: int) -> None:
        # Someone reads messages (UDP datagrams, one per DATA frame): deliver whole frames.
        self.whole_frames = True

    def _send_eof(self) -> None:
        if self.h2_closed or self.local_ended or self.end_pending:
            return
        self.end_pending = True
        self.owner._pump(self)

    def _send_reset(self) -> None:
        self.owner._reset(self, ErrorCodes.CANCEL)

    def _buffered(self) -> int:
        return self.queued

    def _consumed(self, nbytes: int) -> None:
        self.owner._ack(self.stream_id, nbytes)

    def getPeerCertificate(self) -> Any:
        get = getattr(self.owner.transport, "getPeerCertificate", None)
        return get() if get is not None else None

    def _finish(self, reason: Failure) -> None:
        if self.disconnected:
            return
        super()._finish(reason)
        self.owner._stream_finished(self)


# -- one HTTP/2 connection -------------------------------------------------------------------------
@implementer(IHandshakeListener, IPushProducer)
class _H2Connection(Protocol):
    """What both ends do on one HTTP/2 connection: events, windows, output.

    Runs on a TLS transport; the HTTP/2 state starts once the TLS handshake
    completed with ALPN ``h2`` (:meth:`_start_h2`).  Outgoing frames are
    written once per batch of received bytes, or at once for writes from
    the members.
    """

    client_side = False

    def __init__(self, reactor: Any, logger: NodePassLogger, keepalive: float) -> None:
        self.reactor = reactor
        self.logger = logger
        self.keepalive = keepalive
        self.h2: h2.connection.H2Connection | None = None
        self.streams: dict[int, _Stream] = {}
        #: Streams with bytes (or an end) waiting for window or for the socket.
        self._blocked: dict[int, _Stream] = {}
        self._batch = False
        self._write_paused = False
        #: Bytes arrived since the last keepalive tick.
        self.heard = False
        #: Received bytes not yet given to h2, how many there are, how many
        #: are needed before feeding, and the client preface still ahead.
        self._rx: list[bytes] = []
        self._rx_len = 0
        self._rx_need = 0 if self.client_side else _PREFACE_LEN
        self._rx_skip = 0 if self.client_side else _PREFACE_LEN
        self.lost = False
        self.going_away = False
        self.peer = "?"
        #: Why the connection was refused or failed before carrying members ("" if not).
        self.refused = ""
        self._handshake_timer: Any = None
        #: Frames written outside h2 (DATA, WINDOW_UPDATE), with h2's own output before them, in order.
        self._out: list[bytes] = []
        #: Connection-level credit for fast-path bytes taken, not yet returned.
        self._conn_credit = 0
        #: A header block is still open (CONTINUATION frames must follow): no fast path.
        self._in_headers = False
        #: The stream whose DATA payload is arriving, and how many of its bytes are still to come.
        self._fast_stream: _Stream | None = None
        self._fast_left = 0
        #: Per-stream receive window (this side's INITIAL_WINDOW_SIZE) and its update threshold.
        self._stream_window = 0
        self._stream_update_at = 0
        self._dispatch: dict[type, Callable[[Any], None]] = {
            h2.events.DataReceived: self._on_data,
            h2.events.WindowUpdated: self._on_window,
            h2.events.StreamEnded: self._on_stream_ended,
            h2.events.StreamReset: self._on_stream_reset,
            h2.events.RemoteSettingsChanged: self._on_settings,
            h2.events.ConnectionTerminated: self._on_goaway,
            h2.events.PingAckReceived: self._on_ping_ack,
            h2.events.RequestReceived: self._on_request,
            h2.events.ResponseReceived: self._on_response,
            h2.events.TrailersReceived: self._on_trailers,
        }

    # -- settings each side provides ------------------------------------------------------------
    def _local_settings(self) -> dict[SettingCodes | int, int]:
        raise NotImplementedError

    # -- Protocol -------------------------------------------------------------------------------
    #: Seconds from TCP connect until the connection must be set up.
    setup_timeout = HANDSHAKE_TIMEOUT

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peer = addr_text(self.transport.getPeer())
        set_keepalive(self.transport, self.keepalive)
        set_nodelay(self.transport)
        self._handshake_timer = self.reactor.callLater(self.setup_timeout, self._setup_timeout)

    def _setup_timeout(self) -> None:
        self._handshake_timer = None
        self._refuse_connection("tls", f"{self.peer}: not set up within {self.setup_timeout:.0f}s")
        self.abort()

    def _setup_done(self) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None

    def handshakeCompleted(self) -> None:
        if self.lost:
            return
        proto = getattr(self.transport, "negotiatedProtocol", None)
        if proto != ALPN:
            self._setup_done()
            self._refuse_connection("alpn", f"{self.peer}: TLS without ALPN h2 (negotiated {proto!r}): closed")
            self.abort()
            return
        self._start_h2()

    def _start_h2(self) -> None:
        assert self.transport is not None
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=self.client_side, header_encoding=None)
        )
        conn.local_settings = h2.settings.Settings(
            client=self.client_side, initial_values=self._local_settings()  # type: ignore[arg-type]
        )
        conn.max_inbound_frame_size = conn.local_settings.max_frame_size
        self._stream_window = conn.local_settings.initial_window_size
        self._stream_update_at = max(self._stream_window // _STREAM_UPDATE_SHARE, 1)
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW)
        self.h2 = conn
        try:
            self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        except RuntimeError:
            pass
        self._flush()

    def _refuse_connection(self, kind: str, detail: str) -> None:
        """This connection cannot carry members: note why (the caller closes it)."""
        if not self.refused:
            self.refused = detail
            self._note_refusal(kind, detail)

    def _note_refusal(self, kind: str, detail: str) -> None:
        """Count/log a refusal (server side)."""

    def dataReceived(self, data: bytes) -> None:
        """Bytes from TLS, handled a frame at a time; DATA frames of members on a fast path.

        h2 copies its input several times over (buffer, frame, payload) and
        builds objects for every frame, so a DATA frame without flags on a
        stream that is a member in both directions goes straight to the
        member, flow control kept here (:meth:`_ack`), and its payload is
        passed on as it arrives (whole frames only to a member whose reader
        set ``bufferSize``: UDP, a datagram per frame).  Every other frame,
        and any frame while a header block is open, goes to h2, in order,
        once it is complete."""
        if self.h2 is None or self.lost or self.going_away:
            return  # after a GOAWAY h2 takes no more frames
        self.heard = True
        self._batch = True
        try:
            oversized = self._receive(data)
        finally:
            self._batch = False
        self._flush()
        if oversized:
            self._oversized_frame(oversized)

    def _fast_ok(self, s: _Stream | None) -> bool:
        return (s is not None and not s.opening and not s.h2_closed and not s.remote_ended
                and not s.disconnected)

    def _receive(self, data: bytes) -> int:
        """Handle ``data``; the announced length of a frame too large to take (0 if none)."""
        pos = 0
        if self._fast_left:
            n = min(self._fast_left, len(data))
            self._fast_left -= n
            s = self._fast_stream
            if not self._fast_left:
                self._fast_stream = None
            piece = data if n == len(data) else data[:n]
            if s is not None and self._fast_ok(s) and self.streams.get(s.stream_id) is s:
                s.rx_fast += n
                s.data_received(piece)
                if self.lost:
                    return 0
            else:
                # The member is gone: its bytes still count against the connection window.
                self._conn_credit += n
            if n == len(data):
                return 0
            pos = n
        if self._rx:
            # A partial frame waits: complete it (rare: DATA frames of members are taken as they come).
            self._rx.append(data[pos:] if pos else data)
            self._rx_len += len(data) - pos
            if self._rx_len < self._rx_need:
                return 0
            data = b"".join(self._rx)
            pos = 0
            self._rx = []
            self._rx_len = 0
        elif len(data) - pos < self._rx_need:
            self._rx.append(data[pos:] if pos else data)
            self._rx_len = len(data) - pos
            return 0
        rest = self._frames(data, pos)
        if rest is None:
            return 0
        self._rx = [rest] if rest else []
        self._rx_len = len(rest)
        self._rx_need = 9 if len(rest) < 9 else 9 + int.from_bytes(rest[0:3], "big")
        assert self.h2 is not None
        return self._rx_need - 9 if self._rx_need - 9 > self.h2.max_inbound_frame_size else 0

    def _frames(self, buf: bytes, pos: int) -> bytes | None:
        """Handle the frames of ``buf`` from ``pos``; the partial frame left for later (None: stop reading)."""
        conn = self.h2
        assert conn is not None
        streams = self.streams
        limit = conn.max_inbound_frame_size
        size = len(buf)
        start = pos  # first byte not handled yet (h2 gets start..pos in one call)
        pos += self._rx_skip
        self._rx_skip = 0
        while pos + 9 <= size:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            end = pos + 9 + length
            kind = buf[pos + 3]
            if kind == _DATA and buf[pos + 4] == 0 and not self._in_headers and 0 < length <= limit:
                s = streams.get(int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF)
                # A frame is passed on in pieces only to a member that reads a
                # byte stream: not to one reading datagrams, nor to one that
                # still keeps its reads for its user (each read stays apart).
                if self._fast_ok(s) and (
                    end <= size
                    or not (s.whole_frames or getattr(s.protocol, "awaiting_sink", False))  # type: ignore[union-attr]
                ):
                    assert s is not None
                    if start < pos:
                        # Frames before this one first: they may change the stream.
                        if not self._feed(buf[start:pos]):
                            return None
                        start = pos
                        continue
                    if s.rx_fast + length > 2 * self._stream_window:
                        self._flow_control_error(s.stream_id)
                        return None
                    if end > size:
                        # Pass on what came of the payload; the rest follows as it arrives.
                        self._fast_stream = s
                        self._fast_left = end - size
                        end = size
                    if end > pos + 9:
                        s.rx_fast += end - pos - 9
                        s.data_received(buf[pos + 9 : end])
                        if self.lost:
                            return None
                    start = pos = end
                    continue
            if end > size:
                break
            if kind in (_HEADERS, _PUSH_PROMISE):
                self._in_headers = not buf[pos + 4] & _END_HEADERS
            elif kind == _CONTINUATION and buf[pos + 4] & _END_HEADERS:
                self._in_headers = False
            pos = end
        if start < pos and not self._feed(buf[start:pos]):
            return None
        return buf[pos:] if pos < size else b""

    def _oversized_frame(self, length: int) -> None:
        self._connection_error(ErrorCodes.FRAME_SIZE_ERROR,
                               h2.exceptions.FrameTooLargeError(f"frame of {length} bytes announced"))

    def _flow_control_error(self, stream_id: int) -> None:
        self._connection_error(ErrorCodes.FLOW_CONTROL_ERROR,
                               h2.exceptions.FlowControlError(f"stream {stream_id} sent beyond its window"))

    def _connection_error(self, code: ErrorCodes, exc: Exception) -> None:
        """A fault found here rather than by h2: GOAWAY ``code``, then as h2's own protocol errors."""
        conn = self.h2
        assert conn is not None
        self._batch = False
        try:
            conn.close_connection(error_code=code)
        except h2.exceptions.ProtocolError:
            pass
        self._protocol_error(exc)

    def _feed(self, data: bytes) -> bool:
        """Give h2 whole frames and handle its events; False once the connection is done for."""
        conn = self.h2
        assert conn is not None
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._batch = False
            self._protocol_error(exc)
            return False
        dispatch = self._dispatch
        for event in events:
            handler = dispatch.get(type(event))
            if handler is not None:
                handler(event)
            if self.lost:
                return False
        return not self.going_away

    def _protocol_error(self, exc: Exception) -> None:
        self.logger.debug("Tunnel pool: HTTP/2 connection %s: protocol error: %s", self.peer, exc)
        self._flush()
        self.close(flush=True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.lost:
            return
        self.lost = True
        self._setup_done()
        if self.h2 is None:
            self._lost_before_h2(reason)
        streams = list(self.streams.values())
        self.streams.clear()
        self._blocked.clear()
        failure = reason if not isinstance(reason.value, ConnectionDone) else _failure(
            H2MemberError("HTTP/2 connection closed")
        )
        for s in streams:
            s.h2_closed = True
            s.out.clear()
            s.queued = 0
            s.terminated(failure)
        self._connection_gone(reason)

    def _lost_before_h2(self, reason: Failure) -> None:
        """The connection ended before HTTP/2 started (TLS failed or was refused)."""

    def _connection_gone(self, reason: Failure) -> None:
        """Bookkeeping of the side once the connection is gone."""

    # -- output -----------------------------------------------------------------------------------
    def _flush(self) -> None:
        if self._batch or self.h2 is None or self.transport is None:
            return
        out = self.h2.data_to_send()
        if self._out:
            if out:
                self._out.append(out)
            out = b"".join(self._out)
            self._out = []
        if out:
            self.transport.write(out)

    def _emit(self, *frames: bytes) -> None:
        """Queue frames built here, after whatever h2 has queued (written by :meth:`_flush`)."""
        conn = self.h2
        assert conn is not None
        pending = conn.data_to_send()
        if pending:
            self._out.append(pending)
        self._out.extend(frames)

    def pauseProducing(self) -> None:
        """The socket is full: hold members' bytes in their queues."""
        self._write_paused = True

    def resumeProducing(self) -> None:
        self._write_paused = False
        self._pump_blocked()

    def stopProducing(self) -> None:
        self._write_paused = True

    def _pump_blocked(self) -> None:
        if not self._blocked or self._write_paused:
            return
        for s in list(self._blocked.values()):
            self._pump(s)
            if self._write_paused:
                break
        self._flush()

    def _pump(self, s: _Stream) -> None:
        """Move ``s``'s queued bytes into DATA frames as far as window and socket allow."""
        conn = self.h2
        if conn is None or self.lost:
            return
        if s.h2_closed:
            self._drop_output(s)
            return
        sid = s.stream_id
        sent = False
        try:
            st = conn.streams.get(sid)
            if (st is not None and not st.closed and not self.going_away
                    and conn.state_machine.state is not h2.connection.ConnectionState.CLOSED):
                sent = self._send_direct(conn, st, s)
            while s.out and not self._write_paused:
                window = conn.local_flow_control_window(sid)
                if window <= 0:
                    break
                head = s.out[0]
                n = min(len(head), window, conn.max_outbound_frame_size)
                if n == len(head):
                    s.out.popleft()
                    conn.send_data(sid, head)
                else:
                    conn.send_data(sid, head[:n])
                    s.out[0] = head[n:]
                s.queued -= n
                sent = True
            if not s.out and s.end_pending and not self._write_paused:
                s.end_pending = False
                s.local_ended = True
                conn.end_stream(sid)
                sent = True
                if s.remote_ended:
                    s.h2_closed = True
                elif s.cancel_after_end:
                    s.h2_closed = True
                    conn.reset_stream(sid, ErrorCodes.CANCEL)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            s.h2_closed = True
            self._drop_output(s)
        if s.out or s.end_pending:
            self._blocked[sid] = s
        else:
            self._blocked.pop(sid, None)
            self._forget_if_done(s)
        if sent:
            self._flush()
            s.drained()

    def _send_direct(self, conn: h2.connection.H2Connection, st: Any, s: _Stream) -> bool:
        """DATA frames built here for an open stream, h2's windows charged as
        ``send_data`` charges them; True if anything went out."""
        sid = s.stream_id
        tail = sid.to_bytes(4, "big")
        most = conn.max_outbound_frame_size
        out = s.out
        sent = False
        while out and not self._write_paused:
            window = min(conn.outbound_flow_control_window, st.outbound_flow_control_window)
            if window <= 0:
                break
            head = out[0]
            n = len(head)
            if n <= window and n <= most:
                out.popleft()
            else:
                n = min(n, window, most)
                out[0] = head[n:]
                head = head[:n]
            self._emit(n.to_bytes(3, "big") + b"\x00\x00" + tail, head)
            conn.outbound_flow_control_window -= n
            st.outbound_flow_control_window -= n
            s.queued -= n
            sent = True
        return sent

    def _drop_output(self, s: _Stream) -> None:
        s.out.clear()
        s.queued = 0
        s.end_pending = False
        self._blocked.pop(s.stream_id, None)
        self._forget_if_done(s)

    def _ack(self, stream_id: int, nbytes: int) -> None:
        """The member took ``nbytes``: give the peer its window back.

        Bytes h2 delivered are handed back through h2 (which waits for half
        a window); bytes of the fast path through WINDOW_UPDATE frames built
        here, once a quarter of the stream window (or 16 MiB for the
        connection) is due.  A member takes its bytes in arrival order, and
        h2 delivers a member's bytes before the fast path starts (the
        handshake byte's frame, the ID), so h2's count is served first."""
        conn = self.h2
        if conn is None or self.lost or nbytes <= 0:
            return
        s = self.streams.get(stream_id)
        if s is not None and s.rx_fast:
            slow = min(s.rx_slow, nbytes)
            fast = min(nbytes - slow, s.rx_fast)
            s.rx_slow -= slow
            s.rx_fast -= fast
            nbytes -= fast
            if fast:
                self._credit(s, fast)
            if nbytes <= 0:
                return
        elif s is not None and s.rx_slow:
            s.rx_slow -= min(s.rx_slow, nbytes)
        try:
            conn.acknowledge_received_data(nbytes, stream_id)
        except h2.exceptions.ProtocolError:
            return
        self._flush()

    def _credit(self, s: _Stream, nbytes: int) -> None:
        s.rx_credit += nbytes
        self._conn_credit += nbytes
        frames = []
        if s.rx_credit >= self._stream_update_at and not s.remote_ended and not s.h2_closed:
            frames.append(_window_update(s.stream_id, s.rx_credit))
            s.rx_credit = 0
        if self._conn_credit >= _CONNECTION_UPDATE_AT:
            frames.append(_window_update(0, self._conn_credit))
            self._conn_credit = 0
        if frames:
            self._emit(*frames)
            self._flush()

    def _reset(self, s: _Stream, code: ErrorCodes) -> None:
        """Reset ``s`` now (queued bytes are dropped)."""
        conn = self.h2
        was_open = not s.h2_closed
        s.h2_closed = True
        s.out.clear()
        s.queued = 0
        s.end_pending = False
        self._blocked.pop(s.stream_id, None)
        if conn is not None and was_open and not self.lost:
            try:
                conn.reset_stream(s.stream_id, code)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass
            self._flush()
        self._forget_if_done(s)

    # -- stream bookkeeping ---------------------------------------------------------------------------
    def _stream_finished(self, s: _Stream) -> None:
        """The member's transport is done (its protocol saw connectionLost)."""
        self._forget_if_done(s)

    def _forget_if_done(self, s: _Stream) -> None:
        if s.h2_closed and s.disconnected and not s.out and self.streams.get(s.stream_id) is s:
            # What the member never took still counts against the connection window.
            self._conn_credit += s.rx_fast
            s.rx_fast = 0
            del self.streams[s.stream_id]
            self._blocked.pop(s.stream_id, None)
            self._streams_changed()

    def _streams_changed(self) -> None:
        """A stream was added or forgotten."""

    def _reset_finished(self) -> None:
        """Reset every stream whose member is over but whose peer has not ended it."""
        for s in list(self.streams.values()):
            if s.disconnected and not s.h2_closed:
                self._reset(s, ErrorCodes.CANCEL)

    # -- events ----------------------------------------------------------------------------------------
    def _on_data(self, ev: h2.events.DataReceived) -> None:
        sid = ev.stream_id
        data = ev.data or b""
        padding = (ev.flow_controlled_length or 0) - len(data)
        if padding > 0:
            self._ack(sid, padding)
        s = self.streams.get(sid)
        if s is None:
            self._ack(sid, len(data))
            return
        if s.opening:
            data = self._opening_data(s, data)
        if data:
            s.rx_slow += len(data)
            s.data_received(data)

    def _opening_data(self, s: _Stream, data: bytes) -> bytes:
        """Bytes on a stream that is not a member yet; returns what is left for the member."""
        self._ack(s.stream_id, len(data))
        return b""

    def _on_window(self, ev: h2.events.WindowUpdated) -> None:
        if not self._blocked:
            return
        if ev.stream_id:
            s = self._blocked.get(ev.stream_id)
            if s is not None:
                self._pump(s)
        else:
            self._pump_blocked()

    def _on_stream_ended(self, ev: h2.events.StreamEnded) -> None:
        s = self.streams.get(ev.stream_id)
        if s is None:
            return
        s.remote_ended = True
        if s.local_ended:
            s.h2_closed = True
        if s.opening:
            self._opening_ended(s)
            return
        s.eof_received()
        self._forget_if_done(s)

    def _opening_ended(self, s: _Stream) -> None:
        """The peer ended a stream that is not a member yet."""

    def _on_stream_reset(self, ev: h2.events.StreamReset) -> None:
        s = self.streams.get(ev.stream_id)
        if s is None:
            return
        s.h2_closed = True
        self._drop_output(s)
        code = ev.error_code
        if not s.opening and code in _ORDERLY_RESETS:
            # The peer is done with both directions: what it sent still
            # reaches the member, then an end of stream.
            s.remote_ended = True
            s.eof_received()
        else:
            s.opening = False
            s.terminated(_failure(H2MemberError(f"HTTP/2 stream reset by the peer: {_code_name(code)}")))
        self._forget_if_done(s)

    def _on_settings(self, ev: h2.events.RemoteSettingsChanged) -> None:
        self._pump_blocked()

    def _on_goaway(self, ev: h2.events.ConnectionTerminated) -> None:
        self.going_away = True
        self.logger.debug(
            "Tunnel pool: HTTP/2 connection %s: GOAWAY %s (last stream %s)",
            self.peer, _code_name(ev.error_code), ev.last_stream_id,
        )
        # h2 sends nothing more once a GOAWAY was received: the members end.
        self.close(flush=True)

    def _on_ping_ack(self, ev: h2.events.PingAckReceived) -> None:
        """A PING was answered."""

    def _on_request(self, ev: h2.events.RequestReceived) -> None:
        """A request arrived (server)."""

    def _on_response(self, ev: h2.events.ResponseReceived) -> None:
        """A response arrived (client)."""

    def _on_trailers(self, ev: h2.events.TrailersReceived) -> None:
        """Trailers end the stream; nothing else to do."""

    # -- closing -----------------------------------------------------------------------------------------
    def goaway(self) -> None:
        """Send GOAWAY (no more streams, no more frames) and close after the output."""
        conn = self.h2
        if conn is not None and not self.lost and not self.going_away:
            self.going_away = True
            try:
                conn.close_connection()
            except h2.exceptions.ProtocolError:
                pass
            self._flush()
        self.close(flush=True)

    def close(self, flush: bool = True) -> None:
        """End the TLS connection (after the output when ``flush``)."""
        t = self.transport
        if t is None or self.lost:
            return
        try:
            t.unregisterProducer()  # type: ignore[attr-defined]
        except Exception:
            pass
        if flush:
            t.loseConnection()
        else:
            self.abort()

    def abort(self) -> None:
        t = self.transport
        if t is None or self.lost:
            return
        abort = getattr(t, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            t.loseConnection()


def _code_name(code: Any) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


# -- server ------------------------------------------------------------------------------------------------
class _H2ServerConnection(_H2Connection):
    """One client's HTTP/2 connection on the server: requests become members."""

    client_side = False

    def __init__(self, pool: H2ServerPool) -> None:
        super().__init__(pool.reactor, pool.logger, pool.keepalive)
        self.pool = pool
        self._idle_timer: Any = None

    def _local_settings(self) -> dict[SettingCodes | int, int]:
        return {
            SettingCodes.MAX_CONCURRENT_STREAMS: self.pool.max_cap,
            SettingCodes.INITIAL_WINDOW_SIZE: SERVER_STREAM_WINDOW,
            SettingCodes.MAX_FRAME_SIZE: SERVER_MAX_FRAME,
            SettingCodes.MAX_HEADER_LIST_SIZE: 1 << 20,
        }

    def connectionMade(self) -> None:
        super().connectionMade()
        self.pool._connections.add(self)
        if self.pool.closed:
            self.abort()

    def _note_refusal(self, kind: str, detail: str) -> None:
        self.pool.refusals.note(kind, detail)

    def _lost_before_h2(self, reason: Failure) -> None:
        if self.pool.closed:
            return
        why = reason.getErrorMessage() or "closed"
        self._refuse_connection("tls", f"{self.peer}: {why} before the TLS handshake completed")

    def _start_h2(self) -> None:
        self._setup_done()
        super()._start_h2()
        self.logger.debug("Tunnel pool: HTTP/2 connection from %s", self.peer)
        self._streams_changed()

    def _protocol_error(self, exc: Exception) -> None:
        self.pool.refusals.note("connection", f"{self.peer}: HTTP/2 protocol error: {exc}")
        super()._protocol_error(exc)

    def _connection_gone(self, reason: Failure) -> None:
        self._cancel_idle()
        self.pool._connections.discard(self)

    # -- requests ------------------------------------------------------------------------------------------
    def _refuse(self, sid: int, status: int, kind: str, detail: str) -> None:
        """Answer ``status`` with no body and END_STREAM, then RST_STREAM NO_ERROR."""
        conn = self.h2
        assert conn is not None
        self.pool.refusals.note(kind, f"{self.peer}: {detail} (HTTP {status})")
        try:
            conn.send_headers(sid, [(":status", str(status))], end_stream=True)
            conn.reset_stream(sid, ErrorCodes.NO_ERROR)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self._flush()

    def _on_request(self, ev: h2.events.RequestReceived) -> None:
        sid = ev.stream_id
        headers = dict(ev.headers or [])
        method = headers.get(b":method", b"")
        path = headers.get(b":path", b"").split(b"?", 1)[0]
        pool = self.pool
        host = getattr(self.transport.getPeer(), "host", "")  # type: ignore[union-attr]
        if not pool.client_allowed(host):
            self._refuse(sid, 403, "client", f"{host} is not the handshaken client {pool.client_ip}")
            return
        if method != b"POST" or path != b"/stream" or ev.stream_ended:
            what = method.decode("latin-1") + " " + path.decode("latin-1")
            self._refuse(sid, 404, "request", f"{what!r} is not a member request")
            return
        if pool.closed or pool.full():
            self._refuse(sid, 503, "full", "pool " + ("closed" if pool.closed else f"full ({pool.active} idle)"))
            return
        self.streams[sid] = _Stream(self, sid)
        self._streams_changed()

    def _opening_data(self, s: _Stream, data: bytes) -> bytes:
        """The first byte is the client's handshake byte: answer 200 and make the stream a member."""
        conn = self.h2
        assert conn is not None
        if not data:
            return b""
        self._ack(s.stream_id, 1)
        rest = data[1:]
        pool = self.pool
        if pool.closed or pool.full():
            del self.streams[s.stream_id]
            self._streams_changed()
            self._refuse(s.stream_id, 503, "full", "pool " + ("closed" if pool.closed else "full"))
            self._ack(s.stream_id, len(rest))
            return b""
        s.opening = False
        conn.send_headers(s.stream_id, [(":status", "200"), ("content-type", "application/octet-stream")])
        member = PoolConnection(pool, True)
        s.attach(member)  # admitted, then the ID goes out as the first response bytes
        if s.disconnected or s.disconnecting:
            self._ack(s.stream_id, len(rest))
            return b""
        return rest

    def _on_data(self, ev: h2.events.DataReceived) -> None:
        s = self.streams.get(ev.stream_id)
        if s is not None and s.disconnected and s.local_ended and not s.h2_closed:
            # The member is over on our side and the client keeps sending.
            self._ack(ev.stream_id, ev.flow_controlled_length or 0)
            self._reset(s, ErrorCodes.CANCEL)
            return
        super()._on_data(ev)

    def _opening_ended(self, s: _Stream) -> None:
        del self.streams[s.stream_id]
        self._streams_changed()
        self._refuse(s.stream_id, 404, "request", "request body ended before the handshake byte")

    def pool_closed(self) -> None:
        """Refuse the requests still waiting for their handshake byte, reset
        the streams whose member is over, and go away once none is left."""
        for s in [s for s in self.streams.values() if s.opening]:
            del self.streams[s.stream_id]
            self._refuse(s.stream_id, 503, "full", "pool closed")
        self._reset_finished()
        self._streams_changed()

    # -- idle connections ----------------------------------------------------------------------------
    def _streams_changed(self) -> None:
        if self.lost or self.h2 is None:
            return
        if self.streams:
            self._cancel_idle()
            return
        if self.pool.closed:
            self.goaway()
            return
        if self._idle_timer is None:
            self._idle_timer = self.reactor.callLater(self.pool.idle_timeout, self._idle)

    def _cancel_idle(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None

    def _idle(self) -> None:
        self._idle_timer = None
        if not self.streams and not self.lost:
            self.logger.debug("Tunnel pool: HTTP/2 connection %s idle: closed", self.peer)
            self.goaway()


class _ServerFactory(Factory):
    noisy = False

    def __init__(self, pool: H2ServerPool) -> None:
        self.pool = pool

    def buildProtocol(self, addr: Any) -> _H2ServerConnection:
        p = _H2ServerConnection(self.pool)
        p.factory = self
        return p


class H2ServerPool(ServerPoolBase):
    """Members are streams of HTTP/2 connections on the tunnel TCP port (TLS, ALPN ``h2``).

    ``refused`` counts what was turned away, by kind: ``tls`` (no TLS
    handshake), ``alpn`` (no ``h2``), ``client`` (another IP, 403),
    ``request`` (not ``POST /stream``, 404), ``full`` (503), ``connection``
    (HTTP/2 protocol error).
    """

    def __init__(
        self,
        reactor: Any,
        logger: NodePassLogger,
        *,
        host: str = "",
        port: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(reactor, logger, **kwargs)
        self.host = host
        self.port = port
        self.refusals = _Refusals(reactor, logger, self.keepalive)
        #: A connection without streams is closed after this many seconds (Go: twice the report interval).
        self.idle_timeout = max(2 * self.keepalive, 1.0)
        self._connections: set[_H2ServerConnection] = set()
        self._factory: TLSFactory | None = None
        if self.tls is not None:
            tls = self.tls
            self._factory = TLSFactory(lambda: tls.ssl_context((ALPN,)), True, _ServerFactory(self))

    @property
    def refused(self) -> Counter[str]:
        return self.refusals.counts

    def start(self) -> None:
        if self._factory is None:
            raise ValueError("HTTP/2 pool needs TLS")

    def factory(self) -> TLSFactory | None:
        return None if self.closed else self._factory

    def connection_count(self) -> int:
        """HTTP/2 connections currently open."""
        return len(self._connections)

    def close(self) -> None:
        super().close()
        for c in list(self._connections):
            if c.h2 is None:
                c.abort()
            else:
                c.pool_closed()


# -- client ----------------------------------------------------------------------------------------------
class _H2ClientConnection(_H2Connection):
    """Our HTTP/2 connection to the server; opens one stream per member."""

    client_side = True

    def __init__(self, pool: H2ClientPool) -> None:
        super().__init__(pool.reactor, pool.logger, pool.keepalive)
        self.pool = pool
        self.ready = False
        #: Streams opened over the connection's life (a Go server never frees one).
        self.opened = 0
        self.limit: int | None = None
        self.exhausted = False
        self.dead = False
        self._waiting: list[tuple[PoolConnection, Callable[[str], None]]] = []
        self._ping_timer: Any = None
        #: Intervals in a row with a PING out and nothing received.
        self._unacked = 0
        self._ping_out = False
        self.failure = ""
        self.setup_timeout = max(pool.dial_timeout, 5.0)

    def _local_settings(self) -> dict[SettingCodes | int, int]:
        return {
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: CLIENT_STREAM_WINDOW,
            SettingCodes.MAX_FRAME_SIZE: CLIENT_MAX_FRAME,
            SettingCodes.MAX_HEADER_LIST_SIZE: 10 << 20,
        }

    def usable(self) -> bool:
        """Whether new members may go on this connection."""
        if self.lost or self.going_away or self.dead or self.exhausted:
            return False
        return self.limit is None or self.opened + len(self._waiting) < self.limit

    # -- members -----------------------------------------------------------------------------------
    def open_member(self, member: PoolConnection, failed: Callable[[str], None]) -> None:
        if not self.ready:
            self._waiting.append((member, failed))
            return
        self._open_stream(member, failed)

    def _open_stream(self, member: PoolConnection, failed: Callable[[str], None]) -> None:
        conn = self.h2
        assert conn is not None
        if not self.usable() or self.pool.closed:
            self.pool._redispatch(member, failed)
            return
        try:
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, request_headers(self.pool.authority))
        except h2.exceptions.ProtocolError as exc:
            if conn.state_machine.state is not h2.connection.ConnectionState.CLOSED:
                self.exhausted = True
            # else: a GOAWAY came in the same read as the stream ends that
            # asked for this member; the connection closes once that event
            # is handled, and the next refill dials anew.
            failed(f"HTTP/2 connection to {self.peer}: stream not opened: {exc}")
            self._streams_changed()
            return
        self.opened += 1
        if self.limit is not None and self.opened >= self.limit:
            self.exhausted = True
            self.logger.debug(
                "Tunnel pool: HTTP/2 connection %s: %d streams opened, the next ones go on a new connection",
                self.peer, self.opened,
            )
        s = _Stream(self, sid)
        self.streams[sid] = s
        s.out.append(b"\x00")  # the handshake byte, within the server's window
        s.queued = 1
        self._pump(s)
        s.attach(member)

    def _fail_waiting(self, reason: str) -> None:
        waiting, self._waiting = self._waiting, []
        for _member, failed in waiting:
            failed(reason)

    # -- set-up -----------------------------------------------------------------------------------------
    def _note_refusal(self, kind: str, detail: str) -> None:
        self.failure = f"HTTP/2 connection to {detail}"

    def _lost_before_h2(self, reason: Failure) -> None:
        if not self.failure:
            self.failure = f"HTTP/2 connection to {self.peer}: TLS: {reason.getErrorMessage() or 'closed'}"

    def _on_settings(self, ev: h2.events.RemoteSettingsChanged) -> None:
        conn = self.h2
        assert conn is not None
        self.limit = max(1, min(conn.remote_settings.max_concurrent_streams, 1 << 31))
        if not self.ready:
            self.ready = True
            self._setup_done()
            self.logger.debug(
                "Tunnel pool: HTTP/2 connection to %s ready: %d streams per connection", self.peer, self.limit,
            )
            self._schedule_ping()
            waiting, self._waiting = self._waiting, []
            for member, failed in waiting:
                self._open_stream(member, failed)
        super()._on_settings(ev)

    # -- responses --------------------------------------------------------------------------------------
    def _on_response(self, ev: h2.events.ResponseReceived) -> None:
        s = self.streams.get(ev.stream_id)
        if s is None:
            return
        status = dict(ev.headers or []).get(b":status", b"")
        s.opening = False
        if status != b"200":
            text = status.decode("latin-1") or "none"
            self._reset(s, ErrorCodes.CANCEL)
            s.terminated(_failure(H2MemberError(f"HTTP/2 stream refused by the server: status {text}")))

    def _stream_finished(self, s: _Stream) -> None:
        if s.opening and not self.lost and not self.pool.closed and not self.exhausted:
            # No answer within the ID timeout: the server takes no more
            # streams on this connection (a Go server whose handlers are all held).
            self.exhausted = True
            self.logger.warn(
                "Tunnel pool: HTTP/2 connection %s gave no response to stream %d: using a new connection",
                self.peer, s.stream_id,
            )
        if not s.h2_closed and not self.lost:
            # Our member is over: END_STREAM after the queued bytes, then
            # CANCEL unless the server has ended its side already.
            if s.local_ended:
                self._reset(s, ErrorCodes.CANCEL)
            else:
                s.cancel_after_end = True
                s.end_pending = True
                self._pump(s)
        super()._stream_finished(s)

    def _streams_changed(self) -> None:
        if not self.streams and not self._waiting and (self.exhausted or self.pool.closed or self.dead):
            self.goaway()

    # -- keepalive --------------------------------------------------------------------------------------
    def _schedule_ping(self) -> None:
        if self.keepalive > 0 and not self.lost:
            self._ping_timer = self.reactor.callLater(self.keepalive, self._ping)

    def _ping(self) -> None:
        self._ping_timer = None
        conn = self.h2
        if conn is None or self.lost or self.going_away:
            return
        if self._ping_out:
            # A connection busy with data may answer late: only an interval
            # in which nothing at all arrived counts as missed.
            self._unacked = 0 if self.heard else self._unacked + 1
        self.heard = False
        if self._unacked >= MISSED_PINGS:
            self.dead = True
            self.logger.warn(
                "Tunnel pool: HTTP/2 connection %s: %d PINGs unanswered: closing", self.peer, self._unacked,
            )
            self.abort()
            return
        try:
            conn.ping(os.urandom(8))
        except h2.exceptions.ProtocolError:
            return
        self._ping_out = True
        self._flush()
        self._schedule_ping()

    def _on_ping_ack(self, ev: h2.events.PingAckReceived) -> None:
        self._ping_out = False
        self._unacked = 0

    def _connection_gone(self, reason: Failure) -> None:
        if self._ping_timer is not None and self._ping_timer.active():
            self._ping_timer.cancel()
        self._ping_timer = None
        if not self.failure:
            self.failure = f"HTTP/2 connection to {self.peer} closed: {reason.getErrorMessage()}"
        self._fail_waiting(self.failure)
        self.pool._connection_gone(self)


class H2ClientPool(ClientPoolBase):
    """Opens members as streams of HTTP/2 connections to ``host:port``.

    ``connect`` replaces the TCP dial in tests: it gets the (TLS-wrapping)
    client factory and must connect it.
    """

    def __init__(
        self,
        reactor: Any,
        logger: NodePassLogger,
        *,
        host: str = "",
        port: int = 0,
        dial_timeout: float = 5.0,
        tls_code: int = 1,
        server_name: str = "",
        connect: Callable[[Any], None] | None = None,
        **kwargs: Any,
    ) -> None:
        from nodepass.tls import client_ssl_context

        super().__init__(reactor, logger, **kwargs)
        self.host = host
        self.port = port
        self.dial_timeout = dial_timeout
        self.server_name = server_name
        #: ``:authority`` of every request (Go: the server name).
        self.authority = server_name or host or "none"
        # HTTP/2 always runs over TLS: code 0 means the unverified code 1.
        self.tls_code = tls_code if tls_code == 2 else 1
        self.ssl_context = client_ssl_context(self.tls_code, server_name, alpn=(ALPN,))
        #: The name sent as SNI and verified (tls 2 only; tls 1 sends none).
        self.server_hostname = server_name if self.tls_code == 2 else None
        self._connect = connect
        self._current: _H2ClientConnection | None = None
        self._connections: set[_H2ClientConnection] = set()
        self._connectors: set[Any] = set()
        #: HTTP/2 connections dialled over the pool's life.
        self.dialed = 0

    # -- members -------------------------------------------------------------------------------------
    def _open_member(self, conn: PoolConnection, failed: Callable[[str], None]) -> None:
        if self.closed:
            failed("pool closed")
            return
        current = self._current
        if current is None or not current.usable():
            current = self._dial()
        current.open_member(conn, failed)

    def _redispatch(self, conn: PoolConnection, failed: Callable[[str], None], reason: str = "") -> None:
        """A member that its connection could not take: try the next connection."""
        if self.closed:
            failed(reason or "pool closed")
            return
        self._open_member(conn, failed)

    def _dial(self) -> _H2ClientConnection:
        proto = _H2ClientConnection(self)
        proto.peer = f"{self.host}:{self.port}"
        self._current = proto
        self._connections.add(proto)
        self.dialed += 1
        connectors: list[Any] = []

        def done() -> None:
            for connector in connectors:
                self._connectors.discard(connector)

        def dial_failed(reason: Failure) -> None:
            proto.failure = f"dial tcp {self.host}:{self.port}: {reason.getErrorMessage()}"
            proto.lost = True
            proto._fail_waiting(proto.failure)
            self._connection_gone(proto)

        dial = DialFactory(proto, dial_failed, done)
        factory = TLSFactory(self.ssl_context, False, dial, self.server_hostname)
        if self._connect is not None:
            self._connect(factory)
        else:
            connector = self.reactor.connectTCP(self.host, self.port, factory, timeout=self.dial_timeout)
            connectors.append(connector)
            self._connectors.add(connector)
        return proto

    def _connection_gone(self, proto: _H2ClientConnection) -> None:
        self._connections.discard(proto)
        if self._current is proto:
            self._current = None
        if proto.failure and not proto.ready:
            self.last_error = proto.failure

    def connection_count(self) -> int:
        """HTTP/2 connections open or being opened."""
        return len(self._connections)

    def _close_transport(self) -> None:
        for connector in list(self._connectors):
            if getattr(connector, "state", "") == "connecting":
                connector.stopConnecting()
        self._connectors.clear()
        self._current = None
        for proto in list(self._connections):
            proto._fail_waiting("pool closed")
            if proto.h2 is None:
                proto.abort()
            else:
                proto._reset_finished()
                proto._streams_changed()
