"""Type-2 (WebSocket) pool: one WebSocket, on its own TCP connection, per member.

Wire sequence of one member (NodePass v1.14 ``npws``, RFC 6455):

1. the client connects to the tunnel address (TCP; TLS 1.3 for ``wss``);
2. it sends ``GET / HTTP/1.1`` with ``Host: <URL host without port>``,
   ``Upgrade: websocket``, ``Connection: Upgrade``, ``Sec-WebSocket-Version:
   13`` and a fresh ``Sec-WebSocket-Key``; no subprotocol, no extension;
3. the server answers ``101 Switching Protocols`` (``Upgrade``,
   ``Connection``, ``Sec-WebSocket-Accept``; nothing else), or an HTTP error:
   ``503`` with the body ``pool full`` when ``max`` members are idle, ``403``
   for an address the server does not take members from, ``400``/``405``/
   ``426``/``431`` for a request that is not a valid upgrade;
4. right after the ``101`` the server sends the member's 4-byte ID as ONE
   binary message (no handshake byte from the client first);
5. data: binary messages only, unfragmented and uncompressed; one write is
   one message (a write longer than :data:`MAX_MESSAGE`, 256 KiB, becomes
   several; a NodePass peer reads messages of any size and writes at most
   16 KiB each);
6. end: a close frame with code 1000 from the end that finishes, answered at
   once by the other end, then the TCP connection closes (at most
   :data:`CLOSE_TIMEOUT` seconds after our close frame if the peer never
   answers).

Scheme and TLS on the client side (from the server's tls code and the URL):

====================== ======== ===============================================
tls code               scheme   certificate check
====================== ======== ===============================================
0, port not 443        ws://    none (plain TCP)
0, port 443            wss://   verified against the URL host (TLS-terminating
                                proxy or CDN in front of a plain server)
1                      wss://   none (SNI = URL host when it is a name)
2                      wss://   verified against the URL host (not ``sni``)
====================== ======== ===============================================

Frames are built and read by :mod:`nodepass.pool.wsframe` and the upgrade
by :mod:`nodepass.pool.wsupgrade`; h11 reads only upgrade heads that are
not of the plain form every WebSocket client and server sends.

How the member maps onto the pool's stream contract
(:class:`~nodepass.pool.stream.StreamTransport`):

* reads: the payload bytes of one socket read are delivered as one chunk
  (pieces of several messages joined, a large message as its pieces
  arrive), as a TCP member delivers what one ``recv`` returned; once someone
  sets ``bufferSize`` on the member (a UDP session does, see
  :class:`nodepass.tunnel.udp.PoolLink`) every message is delivered on its
  own instead, so a UDP datagram carried over a member stays one datagram
  (a message still incomplete after :data:`RECV_LIMIT` bytes is delivered
  in parts);
* back-pressure: each WebSocket is its own TCP connection, so pausing a
  member's reading pauses that socket, and a member's writes are paused
  while the socket's own send buffer is full (a producer registered on it);
* half-close: WebSocket has none.  ``loseWriteConnection`` sends the close
  frame (1000): messages the peer sent before it saw our close are still
  delivered, and its close answer ends our reading side.  A NodePass peer
  closes members fully anyway (its ``Close`` sends 1000 and waits for ours);
* reset: ``abortConnection`` drops the TCP connection without a close frame;
* a peer close with 1000 or 1001 is an orderly end of stream; any other
  code, a text message (answered with close 1003) or a framing error
  (answered with 1002/1007) ends the member with an error;
* pings are answered; we never ping (a NodePass peer does not read idle
  members, so no pong would come back).

Server side (:class:`WsServerPool`): WebSockets arrive on the tunnel TCP port
once the handshake is done (:meth:`WsServerPool.factory`), in TLS when the
session has it.  The upgrade request must arrive within
:data:`UPGRADE_TIMEOUT` seconds; it is checked as strictly as the NodePass
server does (GET, HTTP/1.1, the ``Connection``/``Upgrade`` tokens, version
13, exactly one key of 16 base64-encoded bytes).  Refused connections are
counted by reason (:attr:`WsServerPool.refused`) and logged at most once per
report interval.

Which addresses may open members (``wsip`` URL parameter, server side):
``auto`` (default) takes members only from the address that performed the
handshake, unless the handshake request came through an HTTP proxy or CDN
(it carried a forwarding header such as ``X-Forwarded-For`` or ``Via``); then
members may come from any address, as the NodePass server always allows
(CDN edges connect from many addresses).  ``same`` always requires the
handshake's address; ``any`` never checks.  See docs/configuration.md.
"""

from __future__ import annotations

import ssl
from collections import Counter
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IAddress, IPushProducer
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from nodepass.log import NodePassLogger
from nodepass.net import addr_text
from nodepass.pool.base import ClientPoolBase, PoolConnection, ServerPoolBase
from nodepass.pool.stream import StreamTransport
from nodepass.pool.tcp import Dialer
from nodepass.pool.wsframe import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, FrameDecoder, close_code, close_frame, frame
from nodepass.pool.wsupgrade import (
    HeaderList,
    UpgradeRequest,
    check_answer,
    check_upgrade,
    http_error,
    needs_full_parser,
    parse_request,
    parse_response,
    request_key,
    switching_protocols,
)
from nodepass.relay import direct_writer, set_nodelay
from nodepass.relay.tls import TLSFactory

__all__ = [
    "WsServerPool",
    "WsClientPool",
    "WsStream",
    "ws_target",
    "member_ip_policy",
    "MAX_MESSAGE",
    "RECV_LIMIT",
    "UPGRADE_TIMEOUT",
    "DIAL_BUDGET",
    "CLOSE_TIMEOUT",
    "WSIP_VALUES",
]

#: Largest binary message we send; a longer write becomes several messages.
#: (A relay write is one socket read: at most 64 KiB from TCP, 256 KiB from
#: TLS.  NodePass itself writes 16 KiB messages and reads any size.)
MAX_MESSAGE = 256 * 1024
#: A message still incomplete after this many bytes is delivered in parts
#: (when messages are delivered one by one, see ``WsStream.bufferSize``).
RECV_LIMIT = 256 * 1024
#: Seconds a server waits for the upgrade request (TLS handshake included).
UPGRADE_TIMEOUT = 10.0
#: Seconds a client allows for connect, TLS and upgrade of one member.
DIAL_BUDGET = 30.0
#: Seconds to wait for the peer's close frame after ours.
CLOSE_TIMEOUT = 5.0
#: Status code of an orderly close, and the ones that read as end of stream.
NORMAL_CLOSE = 1000
_EOF_CODES = (1000, 1001)
#: Allowed values of the ``wsip`` URL parameter.
WSIP_VALUES = ("auto", "same", "any")
_USER_AGENT = b"Go-http-client/1.1"


def _failure(exc: BaseException) -> Failure:
    return Failure(exc)  # type: ignore[no-untyped-call]


def _h11() -> Any:
    """h11, imported the first time an upgrade head is not of the plain form."""
    import h11

    return h11


def member_ip_policy(wsip: str, handshake_ip: str, via: str) -> tuple[str, str]:
    """The address members must come from ('' = any) and why.

    ``wsip`` is the URL parameter (``auto``/``same``/``any``), ``handshake_ip``
    the address that performed the handshake and ``via`` the forwarding
    header its request carried ('' when none)."""
    if wsip == "any":
        return "", "wsip=any"
    if wsip == "auto" and via:
        return "", f"the handshake came through a proxy ({via} header)"
    return handshake_ip, ""


def ws_target(tls_code: int, host: str, port: int) -> tuple[str, ssl.SSLContext | None, str | None]:
    """(``ws``/``wss``, client TLS context or None, server name for SNI and
    verification) for a member dial.  An address as server name is verified
    but never sent as SNI."""
    from nodepass.tls import client_ssl_context

    if tls_code == 1:
        return "wss", client_ssl_context(1, ""), host or None
    if tls_code == 2 or port == 443:
        return "wss", client_ssl_context(2, host), host or None
    return "ws", None, None


# -- one member ---------------------------------------------------------------------------------
class WsStream(StreamTransport):
    """A member's byte pipe: the WebSocket of one :class:`_WsLink`."""

    def __init__(self, link: _WsLink) -> None:
        tcp: Any = link.transport
        super().__init__(link.reactor, tcp.getPeer(), tcp.getHost())
        self.link = link
        #: The carrying TCP (or TLS) transport, for socket options.
        self.transport = tcp

    def _send(self, data: bytes) -> None:
        self.link.send_data(data)

    def _send_eof(self) -> None:
        self.link.start_close(NORMAL_CLOSE)

    def _send_reset(self) -> None:
        self.link.abort()

    def _buffered(self) -> int:
        return self.high_water + 1 if self.link.write_blocked else 0

    def _reading_changed(self, paused: bool) -> None:
        self.link.pause_reading(paused)

    def getPeerCertificate(self) -> Any:
        get = getattr(self.transport, "getPeerCertificate", None)
        return get() if get is not None else None

    def setTcpNoDelay(self, enabled: bool) -> None:
        """Nothing to do: the link set ``TCP_NODELAY`` when it connected."""

    @property
    def bufferSize(self) -> int:
        """Bytes delivered per read at most, when messages are delivered one by one."""
        return RECV_LIMIT

    @bufferSize.setter
    def bufferSize(self, size: int) -> None:
        # Someone reads messages (UDP datagrams, one per message): deliver
        # message by message from now on.
        self.link.per_message = True


@implementer(IPushProducer)
class _WriteGate:
    """Registered on the TCP transport: it says when its send buffer is full."""

    def __init__(self, link: _WsLink) -> None:
        self.link = link

    def pauseProducing(self) -> None:
        self.link.write_blocked = True

    def resumeProducing(self) -> None:
        self.link.write_blocked = False
        stream = self.link.stream
        if stream is not None:
            stream.drained()

    def stopProducing(self) -> None:
        self.link.write_blocked = False


class _WsLink(Protocol):
    """One TCP (or TLS) connection carrying one WebSocket.

    Subclasses do the opening handshake (:meth:`_upgrade_data`) and then call
    :meth:`_open`; from there on this class runs the frames for the
    :class:`WsStream` it created.  ``masked``: our frames are masked (we are
    the client) and the peer's must not be.
    """

    masked = False

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.decoder: FrameDecoder | None = None
        self.stream: WsStream | None = None
        self.write_blocked = False
        #: Deliver each message on its own (see :attr:`WsStream.bufferSize`).
        self.per_message = False
        self._gate: _WriteGate | None = None
        self._write: Callable[[bytes], None] = lambda data: None
        self._prefix = b""  # sent with our first frame (the server's 101)
        self._head = b""  # the upgrade head so far
        #: h11's connection, for an upgrade head not of the plain form.
        self.http: Any = None
        self._parts: list[Any] = []
        self._parts_len = 0
        self._timer: Any = None
        self._close_timer: Any = None
        self._close_sent = False
        self._clean_end = False
        self._failed = False
        self.peer = "?"
        self.lost = False

    # -- connection ----------------------------------------------------------------------
    def connectionMade(self) -> None:
        t: Any = self.transport
        self.peer = addr_text(t.getPeer())
        self._write = direct_writer(t)
        set_nodelay(t)

    def dataReceived(self, data: bytes) -> None:
        if self.stream is None:
            self._upgrade_data(data)
        else:
            self._frames(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self._cancel_timers()
        self._gate = None
        stream = self.stream
        if stream is None:
            self._upgrade_lost(reason)
            return
        if stream.disconnected:
            return
        if self._clean_end:
            # The end of stream was delivered (or waits behind paused bytes,
            # which the protocol still gets): nothing more to report unless
            # nothing is pending any more.
            if not stream._inbox and not stream._eof_pending:
                stream.terminated(_failure(ConnectionDone()))
            return
        if isinstance(reason.value, ConnectionDone):
            reason = _failure(ConnectionLost("websocket closed without a close frame"))
        stream.terminated(reason)

    # -- the upgrade head -----------------------------------------------------------------------
    def _upgrade_data(self, data: bytes) -> None:
        """Collect the upgrade head; a plain one goes to :meth:`_quick`, any
        other (and everything after it) to :meth:`_full_parse`."""
        if self.http is not None:
            self._full_parse(data)
            return
        buffered = self._head + data if self._head else data
        end = buffered.find(b"\r\n\r\n")
        if end < 0:
            if needs_full_parser(buffered):
                self._head = b""
                self._full_parse(buffered)
            else:
                self._head = buffered
            return
        self._head = b""
        if not self._quick(buffered[:end], buffered[end + 4 :]):
            self._full_parse(buffered)

    # -- what subclasses provide -------------------------------------------------------------
    def _quick(self, head: bytes, rest: bytes) -> bool:
        """Act on a complete head (without its blank line) followed by
        ``rest``; False when it is not of the plain form."""
        raise NotImplementedError

    def _full_parse(self, data: bytes) -> None:
        """Feed ``data`` to h11 (:attr:`http`, created on the first call)."""
        raise NotImplementedError

    def _upgrade_lost(self, reason: Failure) -> None:
        """The TCP connection ended before the WebSocket opened."""

    # -- opening -------------------------------------------------------------------------------
    def _open(self, member: PoolConnection, rest: bytes) -> None:
        """The WebSocket is open: run ``member`` on it; ``rest`` are the bytes
        that followed the upgrade head (the first frames)."""
        self._cancel_timers()
        self.decoder = FrameDecoder(masked=not self.masked)
        stream = WsStream(self)
        self.stream = stream
        gate = _WriteGate(self)
        self._gate = gate
        t: Any = self.transport
        t.registerProducer(gate, True)
        stream.attach(member)
        if self._prefix and not self.lost and not stream.disconnecting:
            # Nothing was written on the member at once: send the 101 alone.
            self._out(b"")
        if rest and not self.lost:
            self._frames(rest)

    def _out(self, data: bytes) -> None:
        if self._prefix:
            data = self._prefix + data
            self._prefix = b""
        self._write(data)

    # -- frames ----------------------------------------------------------------------------------
    def _frames(self, data: bytes) -> None:
        decoder = self.decoder
        stream = self.stream
        if decoder is None or stream is None:
            return
        # Messages one by one once a reader asked for them, and while the
        # member waits for its user (reads kept apart until then).
        per_message = self.per_message or bool(getattr(stream.protocol, "awaiting_sink", False))
        parts = self._parts
        for opcode, payload, end in decoder.receive(data):
            if opcode == OP_BINARY:
                if payload:
                    parts.append(payload)
                    self._parts_len += len(payload)
                if per_message and parts and (end or self._parts_len >= RECV_LIMIT):
                    self._deliver()
            elif opcode == OP_PING:
                self._send_control(frame(OP_PONG, payload, self.masked))
            elif opcode == OP_CLOSE:
                if not per_message:
                    self._deliver()
                self._on_close(close_code(payload), bytes(payload[2:]))
                return
            # Pongs need nothing.
        if parts and not per_message:
            self._deliver()
        error = decoder.error
        if error is not None:
            self._protocol_error(error.code, error.text)
            self._close_tcp()

    def _deliver(self) -> None:
        """Hand the collected payload pieces to the member as one read."""
        parts = self._parts
        if not parts:
            return
        data = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
        parts.clear()
        self._parts_len = 0
        stream = self.stream
        assert stream is not None
        stream.data_received(data)

    def _on_close(self, code: int | None, reason: bytes) -> None:
        """The peer's close frame: answer it (unless it answers ours) and end."""
        stream = self.stream
        assert stream is not None
        if not self._close_sent and not self.lost:
            # Answer with the peer's code, as RFC 6455 suggests.
            self._close_sent = True
            self._out(close_frame(code, "", self.masked))
        if code in _EOF_CODES:
            self._clean_end = True
            stream.eof_received()
        else:
            text = f"websocket closed by peer with code {code or 1005}"
            if reason:
                text += ": " + reason.decode("utf-8", "replace")
            stream.terminated(_failure(ConnectionLost(text)))
        self._close_tcp()

    def _protocol_error(self, code: int, text: str) -> None:
        """The peer broke the protocol: close with ``code`` and end the member."""
        if self._failed:
            return
        self._failed = True
        self.start_close(code, text[:120])
        stream = self.stream
        if stream is not None and not stream.disconnected:
            stream.terminated(_failure(ConnectionLost(f"websocket protocol error: {text}")))

    def _send_control(self, data: bytes) -> None:
        if self.lost or self._close_sent:
            return
        self._out(data)

    # -- for the stream --------------------------------------------------------------------------
    def send_data(self, data: bytes) -> None:
        """Send ``data`` as one binary message (several above :data:`MAX_MESSAGE` bytes)."""
        if self.lost or self._close_sent or self.decoder is None or self.decoder.closed:
            return
        if len(data) <= MAX_MESSAGE:
            self._out(frame(OP_BINARY, data, self.masked))
            return
        view = memoryview(data)
        masked = self.masked
        self._out(b"".join(
            frame(OP_BINARY, view[i : i + MAX_MESSAGE], masked) for i in range(0, len(data), MAX_MESSAGE)
        ))

    def start_close(self, code: int, reason: str = "") -> None:
        """Send our close frame; the TCP connection ends when the peer answers
        or after :data:`CLOSE_TIMEOUT` seconds."""
        decoder = self.decoder
        if self.lost or self._close_sent or decoder is None or decoder.closed:
            return
        self._close_sent = True
        self._out(close_frame(code, reason, self.masked))
        if self._close_timer is None:
            self._close_timer = self.reactor.callLater(CLOSE_TIMEOUT, self._close_expired)

    def _close_expired(self) -> None:
        self._close_timer = None
        self.abort()

    def abort(self) -> None:
        """Drop the TCP connection at once."""
        if not self.lost and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def pause_reading(self, paused: bool) -> None:
        t: Any = self.transport
        if self.lost or t is None:
            return
        if paused:
            t.pauseProducing()
        else:
            t.resumeProducing()

    def _close_tcp(self) -> None:
        """Close the TCP connection after what is queued (the close handshake is done)."""
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        t: Any = self.transport
        if self.lost or t is None:
            return
        if self._gate is not None:
            self._gate = None
            t.unregisterProducer()
        t.loseConnection()

    def _cancel_timers(self) -> None:
        for name in ("_timer", "_close_timer"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)


# -- refusals ----------------------------------------------------------------------------------
class _Refusals:
    """Counts refused connections by reason; logs the first at once and the
    rest as one summary line per ``interval`` seconds."""

    #: Reasons that are part of normal operation: logged at debug level only.
    quiet = frozenset({"pool full", "closed before upgrade", "pool closed"})

    def __init__(self, reactor: Any, logger: NodePassLogger, interval: float) -> None:
        self.reactor = reactor
        self.logger = logger
        self.interval = max(1.0, interval)
        self.counts: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self._last = ("", "")
        self._quiet_until = 0.0
        self._timer: Any = None
        self._stopped = False

    def add(self, reason: str, peer: str, detail: str) -> None:
        self.counts[reason] += 1
        if self._stopped:
            return
        now = self.reactor.seconds()
        if now >= self._quiet_until and self._timer is None:
            self._quiet_until = now + self.interval
            self._log(reason in self.quiet, "WebSocket pool: refused %s: %s", peer, detail)
            return
        self._pending[reason] += 1
        self._last = (peer, detail)
        if self._timer is None:
            self._timer = self.reactor.callLater(max(0.0, self._quiet_until - now), self._summary)

    def _summary(self) -> None:
        self._timer = None
        if not self._pending:
            return
        total = sum(self._pending.values())
        kinds = ", ".join(f"{reason}: {n}" for reason, n in self._pending.most_common())
        quiet = all(reason in self.quiet for reason in self._pending)
        self._pending.clear()
        self._quiet_until = self.reactor.seconds() + self.interval
        self._log(quiet, "WebSocket pool: refused %d more connections in %gs (%s); last %s: %s",
                  total, self.interval, kinds, *self._last)

    def _log(self, quiet: bool, msg: str, *args: object) -> None:
        (self.logger.debug if quiet else self.logger.warn)(msg, *args)

    def stop(self) -> None:
        """Log nothing more (the pool closed); counting goes on."""
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


# -- server ----------------------------------------------------------------------------------------
class _ServerLink(_WsLink):
    """The accepting end: checks the upgrade request, answers it, opens a member.

    A request head of the plain form is read by :func:`parse_request`; any
    other goes to h11 (:attr:`http`), which reads it in full."""

    def __init__(self, pool: WsServerPool) -> None:
        super().__init__(pool.reactor)
        self.pool = pool
        self._headers: HeaderList | None = None
        self._refused = False
        self._got_bytes = False

    def connectionMade(self) -> None:
        super().connectionMade()
        pool = self.pool
        if pool.closed:
            self._refused = True
            self.abort()
            return
        if len(pool._upgrading) >= pool.max_upgrading:
            self._refused = True
            pool.refusals.add("too many pending upgrades", self.peer,
                              f"{len(pool._upgrading)} connections are already waiting to upgrade")
            self.abort()
            return
        pool._upgrading.add(self)
        self._timer = self.reactor.callLater(UPGRADE_TIMEOUT, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self.stream is not None or self._refused:
            return
        detail = f"no complete upgrade request within {UPGRADE_TIMEOUT:g}s"
        if self._got_bytes:
            self._refuse(408, "upgrade timeout", detail)
            return
        self._refused = True
        self.pool._upgrading.discard(self)
        self.pool.refusals.add("upgrade timeout", self.peer, detail)
        self.abort()

    def _upgrade_data(self, data: bytes) -> None:
        if self._refused:
            return
        self._got_bytes = True
        super()._upgrade_data(data)

    def _quick(self, head: bytes, rest: bytes) -> bool:
        headers = parse_request(head)
        if headers is None:
            return False
        problem = check_upgrade(b"GET", b"1.1", headers)
        if problem is not None:
            status, text, extra = problem
            self._refuse(status, "bad upgrade", text, extra)
        else:
            self._accept(headers, rest)
        return True

    def _full_parse(self, data: bytes) -> None:
        """Read the request with h11 (a head not of the plain form)."""
        h11 = _h11()
        http = self.http
        if http is None:
            http = self.http = h11.Connection(h11.SERVER)
        http.receive_data(data)
        while not self._refused and self.stream is None:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if exc.error_status_hint in (400, 431) else 400
                self._refuse(status, "bad HTTP request", f"not an HTTP/1.1 request: {exc}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                return
            if isinstance(event, h11.Request):
                self._headers = list(event.headers)
                problem = check_upgrade(event.method, event.http_version, self._headers)
                if problem is not None:
                    status, text, extra = problem
                    self._refuse(status, "bad upgrade", text, extra)
                    return
            elif isinstance(event, h11.EndOfMessage) and self._headers is not None:
                self._accept(self._headers, http.trailing_data[0])
                return

    def _accept(self, headers: HeaderList, rest: bytes) -> None:
        pool = self.pool
        if pool.closed:
            self._refuse(503, "pool closed", "pool closed")
            return
        t: Any = self.transport
        host = getattr(t.getPeer(), "host", "")
        if not pool.client_allowed(host):
            self._refuse(403, "foreign address",
                         f"{host} is not the handshaken client {pool.client_ip}", body="forbidden")
            return
        if pool.full():
            self._refuse(503, "pool full", f"{pool.active} idle members", body="pool full")
            return
        pool._upgrading.discard(self)
        # The 101 leaves together with the ID message the member writes at once.
        self._prefix = switching_protocols(request_key(headers))
        self._open(PoolConnection(pool, True), rest)

    def _refuse(self, status: int, reason: str, detail: str,
                extra: HeaderList | None = None, body: str | None = None) -> None:
        """Answer an HTTP error, count and log it, and close."""
        self._refused = True
        self.pool._upgrading.discard(self)
        self.pool.refusals.add(reason, self.peer, detail)
        text = ((body if body is not None else detail) + "\n").encode("utf-8", "replace")
        headers = [
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"X-Content-Type-Options", b"nosniff"),
            (b"Connection", b"close"),
            (b"Content-Length", str(len(text)).encode()),
            *(extra or []),
        ]
        self._write(http_error(status, HTTPStatus(status).phrase, headers, text))
        t: Any = self.transport
        if t is not None and not self.lost:
            t.loseConnection()

    def _upgrade_lost(self, reason: Failure) -> None:
        pool = self.pool
        pool._upgrading.discard(self)
        if self._refused:
            return
        if isinstance(reason.value, ssl.SSLError):
            pool.refusals.add("TLS handshake failed", self.peer, f"TLS handshake failed: {reason.getErrorMessage()}")
        elif self._got_bytes:
            pool.refusals.add("incomplete upgrade", self.peer, "closed during the upgrade request")
        else:
            pool.refusals.add("closed before upgrade", self.peer, "closed without a request")


class _ServerFactory(Factory):
    noisy = False

    def __init__(self, pool: WsServerPool) -> None:
        self.pool = pool

    def buildProtocol(self, addr: IAddress | None) -> _ServerLink:
        link = _ServerLink(self.pool)
        link.factory = self
        return link


class WsServerPool(ServerPoolBase):
    """Members are WebSockets arriving on the tunnel TCP port (ws, or wss with TLS).

    ``wsip`` (``auto``/``same``/``any``) and ``via`` (the forwarding header
    of the handshake request, '' when none) decide which addresses may open
    members (see :func:`member_ip_policy`)."""

    def __init__(
        self,
        reactor: Any,
        logger: NodePassLogger,
        *,
        host: str = "",
        port: int = 0,
        wsip: str = "auto",
        via: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(reactor, logger, **kwargs)
        self.host = host
        self.port = port
        handshake_ip = self.client_ip
        self.client_ip, why = member_ip_policy(wsip, handshake_ip, via)
        if why:
            logger.info("WebSocket pool: connections accepted from any address (%s)", why)
        #: Refused connections so far, by reason.
        self.refusals = _Refusals(reactor, logger, self.keepalive)
        #: Connections waiting for their upgrade; at most max_upgrading at once.
        self._upgrading: set[_ServerLink] = set()
        self.max_upgrading = max(1024, 2 * self.max_cap)
        plain = _ServerFactory(self)
        self._factory: Any = TLSFactory(self.tls.ssl_context, True, plain) if self.tls is not None else plain

    @property
    def refused(self) -> Counter[str]:
        """Refused connections by reason (``bad upgrade``, ``pool full``, ...)."""
        return self.refusals.counts

    def factory(self) -> Factory:
        return self._factory  # type: ignore[no-any-return]

    def close(self) -> None:
        super().close()
        self.refusals.stop()
        for link in list(self._upgrading):
            link.abort()
        self._upgrading.clear()


# -- client ----------------------------------------------------------------------------------------
class _ClientLink(_WsLink):
    """The dialling end of one member: sends the upgrade, checks the answer.

    A 101 of the plain form is read by :func:`parse_response`; any other
    answer (a refusal with its body, or an odd head) goes to h11."""

    masked = True

    def __init__(self, pool: WsClientPool, member: PoolConnection, failed: Callable[[str], None]) -> None:
        super().__init__(pool.reactor)
        self.pool = pool
        self.member = member
        self.failed = failed
        self._accept = b""
        self._reject_status = 0
        self._reject_body = b""

    def connectionMade(self) -> None:
        super().connectionMade()
        pool = self.pool
        if pool.closed:
            self._fail("pool closed")
            return
        pool._links.add(self)
        request, self._accept = pool.request.new()
        self._write(request)
        self._timer = self.reactor.callLater(DIAL_BUDGET, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self.stream is None:
            self._fail(f"websocket upgrade: no answer within {DIAL_BUDGET:g}s")

    def _fail(self, reason: str) -> None:
        if self._failed:
            return
        self._failed = True
        self.pool._links.discard(self)
        self.failed(reason)
        self.abort()

    def _upgrade_data(self, data: bytes) -> None:
        if not self._failed:
            super()._upgrade_data(data)

    def _quick(self, head: bytes, rest: bytes) -> bool:
        answer = parse_response(head)
        if answer is None or answer[0] != 101:
            return False
        self._switched(answer[1], rest)
        return True

    def _switched(self, headers: HeaderList, rest: bytes) -> None:
        """The server answered 101: check it and open the member."""
        problem = check_answer(headers, self._accept)
        if problem is not None:
            self._fail(f"websocket upgrade: bad answer: {problem}")
            return
        self.pool._links.discard(self)
        self._open(self.member, rest)

    def _full_parse(self, data: bytes) -> None:
        """Read the answer with h11: a refusal (status and body) or an odd 101."""
        h11 = _h11()
        http = self.http
        if http is None:
            http = self.http = h11.Connection(h11.CLIENT)
            http.send(h11.Request(method="GET", target="/", headers=[
                ("Host", self.pool.host_header), ("Connection", "Upgrade"), ("Upgrade", "websocket")]))
            http.send(h11.EndOfMessage())
        http.receive_data(data)
        while not self._failed and self.stream is None:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(f"websocket upgrade: bad answer: {exc}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                return
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    self._switched(list(event.headers), http.trailing_data[0])
                    return
            elif isinstance(event, h11.Response):
                self._reject_status = event.status_code
            elif isinstance(event, h11.Data):
                self._reject_body = (self._reject_body + event.data)[:256]
            elif isinstance(event, h11.EndOfMessage):
                self._rejected()
                return

    def _rejected(self) -> None:
        body = self._reject_body.decode("utf-8", "replace").strip()
        self._fail(f"websocket upgrade refused: {self._reject_status}" + (f" {body}" if body else ""))

    def _upgrade_lost(self, reason: Failure) -> None:
        if self._reject_status:
            self._rejected()
        else:
            self._fail(f"websocket upgrade: connection closed: {reason.getErrorMessage()}")


class _DialFactory(ClientFactory):
    noisy = False

    def __init__(self, pool: WsClientPool, member: PoolConnection, failed: Callable[[str], None]) -> None:
        self.pool = pool
        self.member = member
        self.failed = failed

    def buildProtocol(self, addr: IAddress | None) -> _ClientLink:
        return _ClientLink(self.pool, self.member, self.failed)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.failed(f"dial tcp {self.pool.host}:{self.pool.port}: {reason.getErrorMessage()}")


class WsClientPool(ClientPoolBase):
    """Dials one WebSocket per member to ``host:port`` (see the module docstring
    for ws/wss and certificate checks; ``server_name`` is not used: NodePass
    checks WebSocket servers against the URL host).  ``connect`` replaces the
    TCP dial in tests."""

    def __init__(
        self,
        reactor: Any,
        logger: NodePassLogger,
        *,
        host: str = "",
        port: int = 0,
        dial_timeout: float = 5.0,
        tls_code: int = 0,
        server_name: str = "",
        connect: Callable[[ClientFactory], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(reactor, logger, **kwargs)
        self.host = host
        self.port = port
        self.scheme, ssl_context, server_hostname = ws_target(tls_code, host, port)
        #: Host header: the URL host without port (IPv6 in brackets).
        self.host_header = f"[{host}]" if ":" in host else host
        #: The upgrade request, built once (only the key changes).
        self.request = UpgradeRequest(self.host_header, _USER_AGENT)
        self.dialer = Dialer(reactor, host, port, dial_timeout, ssl_context, server_hostname, connect)
        self._links: set[_ClientLink] = set()
        logger.debug("WebSocket pool: %s://%s:%d/", self.scheme, self.host_header, port)

    def _open_member(self, conn: PoolConnection, failed: Callable[[str], None]) -> None:
        self.dialer.dial(_DialFactory(self, conn, failed))

    def _close_transport(self) -> None:
        self.dialer.stop()
        for link in list(self._links):
            link._fail("pool closed")
        self._links.clear()
