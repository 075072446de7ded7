"""Type-1 (QUIC) pool: members are bidirectional streams of QUIC connections.

Wire behaviour (what a NodePass peer of either side expects):

* UDP on the tunnel address: the server binds the same host and port as the
  TCP tunnel port; the client dials the resolved tunnel address from a new
  ephemeral UDP socket for each QUIC connection.
* TLS 1.3 with ALPN ``np-quic`` on both sides (a peer offering anything else
  fails its handshake).  The server presents the session's certificate (the
  one whose fingerprint ``verify`` sends); a client with tls 1 does not verify
  it and sends no SNI, with tls 2 it verifies the chain and the ``sni`` name.
* One QUIC connection carries every member; each member is one
  client-opened bidirectional stream.  The client writes one ``0x00`` byte,
  the server reads exactly that byte and answers with the 4-byte ID (see
  :mod:`nodepass.pool.base`); the stream is then a plain byte pipe.
* The server accepts any number of connections from the handshaken client
  (a client opens a new one when a stream cannot be set up, and may keep the
  old one for the members it still carries); a connection from another IP is
  closed with application error 0, reason ``unauthorized IP``, and one that
  carries no member for three keepalive intervals (what a client abandoned)
  with ``no members``.  The incoming stream limit is the pool's ``max`` (and
  credit is renewed as streams end), so a peer with ``max`` above 128 is not
  capped.
* Ending a member: our side always ends its direction with FIN (orderly) or
  RESET_STREAM (abort) and keeps reading until the peer's FIN, so both ends
  release the stream and its stream credit; a peer that never finishes its
  direction is asked to stop (STOP_SENDING) after a linger period.
* Keepalive: a PING every ``keepalive`` seconds (the report interval); idle
  timeout three times that, so a dead peer ends the connection (and all its
  members) within about three report intervals.  The pool is closed with
  application error 0, ``pool closed``.

Flow control: aioquic grants credit (MAX_STREAM_DATA, MAX_DATA) as bytes
*arrive*, doubling its windows, so a peer could fill our memory while the
relay is paused.  :class:`_FlowConnection` replaces that rule: a stream's
credit is the bytes the relay *consumed* plus :data:`STREAM_WINDOW`, the
connection's the bytes consumed on all streams plus :data:`CONN_WINDOW`
(updates are sent once a quarter of a window was consumed).  A paused member
therefore holds at most one stream window and a connection at most one
connection window of unread bytes, and a slow target slows the peer's writer
instead of growing our buffers.  Outgoing bytes queue in aioquic's stream
buffer; :class:`QuicStreamTransport` reports the bytes not yet sent as its
buffer, which pauses the relay's reading side above the high-water mark.

Write boundaries: a write that fits in one packet is sent as one STREAM
frame, never split across two packets, so the peer reads it in one piece.
UDP datagrams carried on a member rely on that (there is no framing); with
aioquic's 1200-byte packets this holds up to about 1130 bytes, and up to
about 1380 once a connection found that its path carries 1452-byte datagrams.

Datagram size: connections start with 1200-byte datagrams and, once the
handshake is confirmed, probe 1452, 1400, 1350, 1300 and 1250 bytes (largest
first, "don't fragment", never above the peer's ``max_udp_payload_size``)
and keep the first size that is acknowledged (see
:class:`_FlowConnection`).

Garbage on the UDP port (unparsable datagrams, unknown versions, packets for
unknown connections, Initial packets that do not decrypt) and refused
connections (wrong IP, wrong ALPN, too many) are dropped, counted in
:attr:`QuicServerPool.dropped` / :attr:`QuicServerPool.refused`, and logged at
most once per keepalive interval; connections of the real client are not
affected.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import logging
import os
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

from aioquic._buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import (
    END_STATES,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    NetworkAddress,
    QuicConnection,
    stream_is_client_initiated,
    stream_is_unidirectional,
)
from aioquic.quic.packet import (
    QuicFrameType,
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
    pull_quic_transport_parameters,
)
from aioquic.quic.packet_builder import QuicDeliveryState, QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketPacer, QuicPacketSpace
from aioquic.quic.stream import QuicStream
from aioquic.tls import Epoch, load_pem_private_key, load_pem_x509_certificates
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError, ConnectionLost, MessageLengthError
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import DatagramProtocol
from twisted.python.failure import Failure

from nodepass.datapath.resolve import DNSCache, is_ip_literal
from nodepass.log import NodePassLogger
from nodepass.net import join_host_port, listen_any
from nodepass.pool.base import ClientPoolBase, PoolConnection, ServerPoolBase, norm_ip
from nodepass.pool.stream import StreamTransport
from nodepass.pool.udpio import GSO_SEGMENTS, DatagramSender, listen_udp, tune_socket

__all__ = [
    "ALPN",
    "STREAM_WINDOW",
    "CONN_WINDOW",
    "QuicStreamTransport",
    "QuicLink",
    "QuicServerPool",
    "QuicClientPool",
    "server_configuration",
    "client_configuration",
]

ALPN = "np-quic"
HANDSHAKE_BYTE = b"\x00"
#: Unread bytes one stream may hold (its flow-control window).
STREAM_WINDOW = 1 << 20
#: Unread bytes one connection may hold over all its streams.
CONN_WINDOW = 16 << 20
#: Connections the server keeps at once (the real client needs a few).
MAX_LINKS = 256
#: aioquic's own stream limit; the pool's ``max`` raises it.
AIOQUIC_STREAMS = 128
#: Bytes of a 1-RTT packet that are not stream data (header, AEAD tag, ACK
#: room) and of a STREAM frame header, for the "keep a write whole" rule.
PACKET_OVERHEAD = 64
FRAME_OVERHEAD = 20
#: QUIC versions spoken (v1 first, as peers dial it).
VERSIONS: list[int] = list(QuicConfiguration().supported_versions)
#: The pacer lets this much sending time (at its rate) go out in one burst:
#: a reactor timer fires at best about once per millisecond.
PACING_BURST = 0.002
#: Pacing rate relative to congestion window / smoothed RTT.
PACING_GAIN = 1.25
#: Datagram sizes tried, largest first, once a connection's handshake is
#: confirmed (see :class:`_FlowConnection`).  1452 is quic-go's largest
#: (1500-byte MTU, IPv6); the others fit common tunnels (PPPoE, WireGuard).
PROBE_SIZES = (1452, 1400, 1350, 1300, 1250)
#: A timer that fires this close before aioquic's deadline handles it (the
#: reactor's clock and poll timeouts are not exact).
TIMER_SLACK = 0.0002
#: A batch of received datagrams ends with an ACK at once (not after the ACK
#: delay) once this many packets wait for one.
ACK_AFTER = 2


# aioquic reports peers' protocol errors through the standard logging module;
# without a handler they would reach stderr.  What matters is logged here.
logging.getLogger("quic").addHandler(logging.NullHandler())


def _failure(exc: BaseException) -> Failure:
    return Failure(exc)  # type: ignore[no-untyped-call]


def _address(host: str, port: int) -> IAddress:
    host = norm_ip(host)
    if ":" in host:
        return IPv6Address("UDP", host, port)
    return IPv4Address("UDP", host, port)


class _Pacer(QuicPacketPacer):
    """aioquic's pacer with bursts that fit a reactor timer.

    aioquic lets at most 16 packets go out at once and then waits for the
    pacing interval, typically microseconds; a reactor timer fires about a
    millisecond later at best, so the connection would send 16 packets per
    millisecond whatever its window.  Here a burst is :data:`PACING_BURST`
    worth of sending at the pacing rate (at least 10 packets), and the rate
    is :data:`PACING_GAIN` times window / RTT (quic-go's rules).
    """

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        size = self._max_datagram_size
        rate = PACING_GAIN * congestion_window / max(smoothed_rtt, 1e-6)
        self.packet_time = max(1e-6, min(size / rate, 1.0))
        self.bucket_max = max(PACING_BURST, 10 * size / rate)
        if self.bucket_time > self.bucket_max:
            self.bucket_time = self.bucket_max


# -- flow control -----------------------------------------------------------------------------
class _FlowConnection(QuicConnection):
    """A QuicConnection whose receive credit follows consumption (see the module docstring).

    The glue reports consumed bytes with :meth:`consumed` and keeps
    :attr:`unconsumed` (bytes handed to members and not yet consumed).
    """

    def __init__(self, *, max_streams: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stream_window = self._configuration.max_stream_data
        self.conn_window = self._configuration.max_data
        self.unconsumed = 0
        self.consumed_by_stream: dict[int, int] = {}
        #: Per stream, (start, end) offsets of recent writes small enough for one packet.
        self.write_marks: dict[int, deque[tuple[int, int]]] = {}
        #: Streams whose consumption calls for a MAX_STREAM_DATA update.
        self.limits_due: set[int] = set()
        self.whole_limit = self._configuration.max_datagram_size - PACKET_OVERHEAD
        # aioquic has no setting for the peer's bidirectional stream limit; it is
        # sent in the transport parameters of the first flight.
        self._local_max_streams_bidi.value = max(AIOQUIC_STREAMS, max_streams)
        self._loss._pacer = _Pacer(max_datagram_size=self._max_datagram_size)
        #: Datagram sizes still to try, largest first (see :meth:`_send_size_probe`);
        #: None once one was acknowledged or the path refused a regular datagram.
        self.probe_sizes: list[int] | None = [size for size in PROBE_SIZES if size > self._max_datagram_size]
        #: Size of the probe in flight (0: none).
        self.probing = 0

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        super().send_stream_data(stream_id, data, end_stream)
        if 0 < len(data) <= self.whole_limit:
            stream = self._streams.get(stream_id)
            if stream is not None:
                stop = stream.sender._buffer_stop
                self.write_marks.setdefault(stream_id, deque()).append((stop - len(data), stop))

    def _write_stream_frame(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream, max_offset: int
    ) -> int:
        # A write that fits in one packet is sent as a frame of its own and
        # not split across two packets: when the rest of the current packet
        # (or of the congestion window) cannot take it, it goes first in the
        # next one.  The peer then reads it as one piece (a UDP datagram
        # carried on a member arrives whole).
        marks = self.write_marks.get(stream.stream_id or 0)
        if marks:
            start = stream.sender.next_offset
            while marks and marks[0][1] <= start:
                marks.popleft()
            if marks:
                first, stop = marks[0]
                if first <= start:
                    max_offset = min(max_offset, stop)
                    need = max_offset - start + FRAME_OVERHEAD
                    # An empty packet that could hold it but for the window
                    # waits for the window; a write too large for any packet
                    # (made before the datagram size went down) is split.
                    if need > builder.remaining_flight_space and (
                        not builder.packet_is_empty or need <= builder.remaining_buffer_space
                    ):
                        return 0
                else:
                    max_offset = min(max_offset, first)
        return super()._write_stream_frame(builder, space, stream, max_offset)

    def consumed(self, stream_id: int, nbytes: int) -> bool:
        """Record consumption; True when a credit update is now due."""
        total = self.consumed_by_stream.get(stream_id, 0) + nbytes
        self.consumed_by_stream[stream_id] = total
        stream = self._streams.get(stream_id)
        if stream is not None and total + self.stream_window - stream.max_stream_data_local >= self.stream_window // 4:
            self.limits_due.add(stream_id)
            return True
        limit = self._local_max_data
        return limit.used - self.unconsumed + self.conn_window - limit.value >= self.conn_window // 4

    def unsent(self, stream_id: int) -> int:
        """Bytes written on the stream and not yet sent."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return max(0, sender._buffer_stop - sender.highest_offset)

    def forget(self, stream_id: int) -> None:
        self.consumed_by_stream.pop(stream_id, None)
        self.limits_due.discard(stream_id)
        self.write_marks.pop(stream_id, None)

    # -- datagram size --------------------------------------------------------------------------
    # aioquic sends 1200-byte datagrams, the smallest QUIC allows.  Once the
    # handshake is confirmed, one PING padded to the next size of
    # PROBE_SIZES (no larger than the peer's max_udp_payload_size) is sent
    # with "don't fragment"; when it is acknowledged that size is used from
    # then on, when it is lost (or the kernel refuses it as too large) the
    # next smaller size is tried.  Probes are outside the congestion window,
    # their loss is no congestion signal, and they neither arm nor are
    # resent by the probe timeout (PTO): only later packets' ACKs declare
    # them lost.  A regular datagram the kernel refuses as too large (the
    # path MTU shrank) takes the connection back to 1200 bytes for good.
    def _parse_transport_parameters(self, data: bytes, from_session_ticket: bool = False) -> None:
        super()._parse_transport_parameters(data, from_session_ticket)
        try:
            limit = pull_quic_transport_parameters(Buffer(data=data)).max_udp_payload_size
        except Exception:  # noqa: BLE001 - aioquic has checked and applied them already
            return
        if limit is not None and self.probe_sizes:
            self.probe_sizes = [size for size in self.probe_sizes if size <= limit]

    def _send_size_probe(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        crypto = self._cryptos.get(Epoch.ONE_RTT)
        version = self._version
        if crypto is None or not crypto.send.is_valid() or not self._network_paths or version is None:
            return []
        assert self.probe_sizes
        size = self.probe_sizes.pop(0)
        builder = QuicPacketBuilder(
            host_cid=self.host_cid,
            is_client=self._is_client,
            max_datagram_size=size,
            packet_number=self._packet_number,
            peer_cid=self._peer_cid.cid,
            peer_token=self._peer_token,
            quic_logger=self._quic_logger,
            spin_bit=self._spin_bit,
            version=version,
        )
        builder.start_packet(QuicPacketType.ONE_RTT, crypto)
        builder.start_frame(QuicFrameType.PING, handler=self._size_probe_done, handler_args=(size,))
        builder._datagram_needs_padding = True  # PADDING up to ``size``
        datagrams, packets = builder.flush()
        self._packet_number = builder.packet_number
        space = self._spaces[Epoch.ONE_RTT]
        for packet in packets:
            packet.sent_time = now
            # Outside the congestion window; not counted as ack-eliciting in
            # flight, so the PTO neither waits for it nor resends it (the
            # peer still acknowledges its PING).
            packet.in_flight = False
            packet.is_ack_eliciting = False
            self._loss.on_packet_sent(packet=packet, space=space)
        self.probing = size
        addr = self._network_paths[0].addr
        return [(datagram, addr) for datagram in datagrams]

    def _size_probe_done(self, delivery: QuicDeliveryState, size: int) -> None:
        if self.probing == size:
            self.probing = 0
        if delivery == QuicDeliveryState.ACKED and self.probe_sizes is not None:
            self.probe_sizes = None
            self._set_datagram_size(size)

    def _set_datagram_size(self, size: int) -> None:
        self._max_datagram_size = size
        self.whole_limit = size - PACKET_OVERHEAD
        self._loss._pacer._max_datagram_size = size
        if hasattr(self._loss._cc, "_max_datagram_size"):
            self._loss._cc._max_datagram_size = size

    def datagram_too_large(self, size: int) -> None:
        """The kernel refused a datagram of ``size`` bytes as larger than the path."""
        if self.probing and size == self.probing:
            self.probing = 0  # that probe size is out; the next one may go
        elif size > SMALLEST_MAX_DATAGRAM_SIZE:
            self.probe_sizes = None
            self._set_datagram_size(SMALLEST_MAX_DATAGRAM_SIZE)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        out = self._datagrams_to_send(now)
        if self.probe_sizes and not self.probing and self._handshake_confirmed and self._state not in END_STATES:
            out += self._send_size_probe(now)
        return out

    def _datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        # aioquic visits every stream for every packet it builds; a pool keeps
        # many idle streams, so only the streams with something to send are
        # shown to it (the others are put back untouched afterwards).
        streams, queue = self._streams, self._streams_queue
        if len(streams) <= 8:
            return super().datagrams_to_send(now)
        due = self.limits_due
        busy = {
            sid: st
            for sid, st in streams.items()
            if not st.sender.buffer_is_empty
            or st.max_stream_data_local_sent != st.max_stream_data_local
            or sid in due
            or st.sender.reset_pending
            or st.receiver.stop_pending
            or (st.sender.is_finished and st.receiver.is_finished)
        }
        if len(busy) == len(streams):
            return super().datagrams_to_send(now)
        shown = set(busy)
        self._streams = busy
        self._streams_queue = [st for st in queue if st.stream_id in shown]
        try:
            return super().datagrams_to_send(now)
        finally:
            served = self._streams_queue
            for sid in shown - busy.keys():
                streams.pop(sid, None)  # finished and discarded by aioquic
            self._streams = streams
            self._streams_queue = served + [st for st in queue if st.stream_id not in shown]

    # Overrides of aioquic's credit rules.
    def _write_connection_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace) -> None:
        limit = self._local_max_data
        target = limit.used - self.unconsumed + self.conn_window
        if target - limit.value >= self.conn_window // 4:
            limit.value = target
        # aioquic doubles MAX_DATA once half of it was received; hide the
        # received count from that rule (it only feeds the doubling).
        used = limit.used
        limit.used = 0
        try:
            super()._write_connection_limits(builder, space)
        finally:
            limit.used = used

    def _write_stream_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream) -> None:
        sid = stream.stream_id or 0
        if stream.max_stream_data_local_sent == stream.max_stream_data_local and sid not in self.limits_due:
            return
        self.limits_due.discard(sid)
        if not stream.max_stream_data_local or stream.receiver.is_finished:
            return
        target = self.consumed_by_stream.get(sid, 0) + self.stream_window
        if target - stream.max_stream_data_local >= self.stream_window // 4:
            stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id or 0)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local


# -- configurations ------------------------------------------------------------------------------
def server_configuration(
    tls: Any, idle_timeout: float, *, stream_window: int = STREAM_WINDOW, conn_window: int = CONN_WINDOW
) -> QuicConfiguration:
    """The server configuration presenting ``tls``'s current certificate (a ServerTLS)."""
    crt, key = tls.pem()
    certs = load_pem_x509_certificates(crt)
    cfg = QuicConfiguration(
        is_client=False,
        alpn_protocols=[ALPN],
        idle_timeout=idle_timeout,
        max_data=conn_window,
        max_stream_data=stream_window,
    )
    cfg.certificate = certs[0]
    cfg.certificate_chain = certs[1:]
    cfg.private_key = load_pem_private_key(key)
    return cfg


def client_configuration(
    tls_code: int,
    server_name: str,
    idle_timeout: float,
    *,
    stream_window: int = STREAM_WINDOW,
    conn_window: int = CONN_WINDOW,
) -> QuicConfiguration:
    """The client configuration for a tls code: 2 verifies ``server_name`` (trust
    store: ``SSL_CERT_FILE`` when set, else the platform's), anything else does
    not verify and sends no SNI."""
    cfg = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        idle_timeout=idle_timeout,
        max_data=conn_window,
        max_stream_data=stream_window,
    )
    if tls_code == 2:
        cfg.verify_mode = ssl.CERT_REQUIRED
        cfg.server_name = server_name
        bundle = os.environ.get("SSL_CERT_FILE", "")
        if bundle:
            cfg.load_verify_locations(cafile=bundle)
        else:
            paths = ssl.get_default_verify_paths()
            if paths.cafile or paths.capath:
                cfg.load_verify_locations(cafile=paths.cafile, capath=paths.capath)
    else:
        cfg.verify_mode = ssl.CERT_NONE
        cfg.server_name = None
    return cfg


# -- one member ----------------------------------------------------------------------------------
class QuicStreamTransport(StreamTransport):
    """One bidirectional stream of a :class:`QuicLink` as a Twisted transport."""

    #: Bytes arrive one packet's worth at a time, many packets per socket read.
    delivers_bursts = True

    def __init__(self, link: QuicLink, stream_id: int) -> None:
        super().__init__(link.reactor, link.peer, link.host)
        self.link = link
        link.live.add(self)
        self.stream_id = stream_id
        self.send_done = False  # FIN or RESET_STREAM queued
        self.recv_done = False  # peer's FIN or RESET_STREAM received
        self._linger: Any = None

    def _send(self, data: bytes) -> None:
        if self.send_done:
            return
        self.link.send_stream(self.stream_id, data)

    def write(self, data: bytes) -> None:
        super().write(data)
        if self._producer_paused:
            self.link.blocked.add(self)

    def _send_eof(self) -> None:
        if not self.send_done:
            self.send_done = True
            self.link.send_stream(self.stream_id, b"", end=True)
            self.link.maybe_forget(self)

    def _send_reset(self) -> None:
        if not self.send_done:
            self.send_done = True
            self.link.reset_stream(self.stream_id)
        if not self.recv_done:
            self.recv_done = True
            self.link.stop_stream(self.stream_id)
        self.link.maybe_forget(self)

    def _buffered(self) -> int:
        return self.link.unsent(self.stream_id)

    def _consumed(self, nbytes: int) -> None:
        self.link.consumed(self.stream_id, nbytes)

    def getPeerCertificate(self) -> Any:
        return self.link.peer_certificate()

    def _finish(self, reason: Failure) -> None:
        if self.disconnected:
            return
        self.link.live.discard(self)
        super()._finish(reason)
        self.link.blocked.discard(self)
        if not self.send_done:
            # The member ended without closing its direction (peer reset, connection end).
            self.send_done = True
            self.link.reset_stream(self.stream_id)
        if not self.recv_done and self._linger is None:
            self._linger = self.reactor.callLater(self.link.linger, self._stop_reading)
        self.link.maybe_forget(self)

    def _stop_reading(self) -> None:
        self._linger = None
        if not self.recv_done:
            self.recv_done = True
            self.link.stop_stream(self.stream_id)
            self.link.maybe_forget(self)

    def _peer_done(self) -> None:
        self.recv_done = True
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None


# -- one QUIC connection ---------------------------------------------------------------------------
class QuicLink:
    """Drives one aioquic connection on the reactor.

    Datagrams in: :meth:`datagram_received`; datagrams out through ``send``
    (runs of one size through ``send_run`` when given, see :meth:`_write_all`);
    one re-armed timer for aioquic's own deadlines and one for the keepalive
    PING; all times are ``reactor.seconds()``.  Members are
    :class:`QuicStreamTransport` objects in :attr:`streams` (kept until aioquic
    has released their stream, so late frames of an ended member are never
    taken for a new stream).

    Callbacks: ``on_ready(link)`` once the TLS handshake completed;
    ``on_stream(transport)`` (server side) for each new peer stream once its
    handshake byte arrived; ``on_cid(link, cid, issued)`` when a connection ID
    of ours is issued or retired; ``on_closed(link, reason)`` once, when the
    connection ends for any reason.

    Closing: the connection ends as soon as a CONNECTION_CLOSE was sent or
    received (members end at once); the closing and draining periods are not
    waited for.
    """

    def __init__(
        self,
        reactor: Any,
        conn: _FlowConnection,
        *,
        peer_addr: NetworkAddress,
        host: IAddress,
        send: Callable[[bytes, NetworkAddress], None],
        keepalive: float,
        send_run: Callable[[list[bytes], NetworkAddress], None] | None = None,
        on_ready: Callable[[QuicLink], None] | None = None,
        on_stream: Callable[[QuicStreamTransport], None] | None = None,
        on_cid: Callable[[QuicLink, bytes, bool], None] | None = None,
        on_closed: Callable[[QuicLink, str], None] | None = None,
        on_tick: Callable[[QuicLink], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.conn = conn
        self.peer_addr = peer_addr
        self.peer = _address(str(peer_addr[0]), int(peer_addr[1]))
        self.host = host
        self._send = send
        self._send_run = send_run
        self.keepalive = keepalive
        self.linger = max(3 * keepalive, 1.0)
        self.on_ready = on_ready
        self.on_stream = on_stream
        self.on_cid = on_cid
        self.on_closed = on_closed
        self.on_tick = on_tick
        #: Keepalive ticks in a row without a member.
        self.empty_ticks = 0
        self.streams: dict[int, QuicStreamTransport] = {}
        #: Members still connected to a protocol.
        self.live: set[QuicStreamTransport] = set()
        self.blocked: set[QuicStreamTransport] = set()
        self.ready = False
        self.closed = False
        self.close_reason = ""
        #: False: peer streams are refused (a connection about to be closed).
        self.accept_streams = True
        self.members_opened = 0
        self._done: set[int] = set()
        self._timer: Any = None
        self._timer_at: float | None = None
        #: Datagrams received since our last ACK while one was owed.
        self._unacked = 0
        #: Stream data or stream ends were queued since the last transmit.
        self._queued = False
        self._transmit_call: Any = None
        self._ping_call: Any = None
        self._ping_ids = itertools.count()

    @property
    def text(self) -> str:
        """The peer as ``ip:port``."""
        return join_host_port(str(self.peer_addr[0]), self.peer_addr[1], unmap=True)

    # -- input -----------------------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: NetworkAddress) -> None:
        if self.closed:
            return
        conn = self.conn
        conn.receive_datagram(data, addr, now=self.reactor.seconds())
        space = conn._spaces.get(Epoch.ONE_RTT)
        if space is not None and space.ack_at is not None:
            self._unacked += 1
        try:
            self._process_events()
        finally:
            # Whatever a member did with its event, the connection goes on.
            if self.conn._close_event is not None:
                self.transmit()
            else:
                self.transmit_soon()

    def first_datagram(self, data: bytes, addr: NetworkAddress) -> bool:
        """Feed the Initial that created this (server) connection; False when it
        produced nothing to send (it did not decrypt: not a QUIC client)."""
        now = self.reactor.seconds()
        self.conn.receive_datagram(data, addr, now=now)
        out = self.conn.datagrams_to_send(now=now)
        if not out:
            return False
        for datagram, to in out:
            self._write(datagram, to)
        self._process_events()
        self.transmit()
        return True

    def _handle_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self.closed:
            return
        now = self.reactor.seconds()
        due = self.conn.get_timer()
        if due is None:
            return
        if due > now + TIMER_SLACK:
            # The deadline moved later since the timer was set: wait for it.
            self._arm_timer(due, now)
            return
        self.conn.handle_timer(now=max(now, due))
        self._process_events()
        self.transmit()

    def _process_events(self) -> None:
        conn = self.conn
        event = conn.next_event()
        while event is not None:
            if isinstance(event, events.StreamDataReceived):
                self._stream_data(event.stream_id, event.data, event.end_stream)
            elif isinstance(event, events.StreamReset):
                self._stream_reset(event.stream_id, f"stream reset by peer (code {event.error_code})")
            elif isinstance(event, events.StopSendingReceived):
                self._stop_sending(event.stream_id)
            elif isinstance(event, events.HandshakeCompleted):
                self._handshake_completed()
            elif isinstance(event, events.ConnectionIdIssued):
                if self.on_cid is not None:
                    self.on_cid(self, event.connection_id, True)
            elif isinstance(event, events.ConnectionIdRetired):
                if self.on_cid is not None:
                    self.on_cid(self, event.connection_id, False)
            elif isinstance(event, events.ConnectionTerminated):
                self._end(event.reason_phrase or f"error {event.error_code:#x}")
            event = conn.next_event()

    def _stream_data(self, stream_id: int, data: bytes, end: bool) -> None:
        t = self.streams.get(stream_id)
        if t is None:
            if (
                self.on_stream is None
                or stream_is_unidirectional(stream_id)
                or stream_is_client_initiated(stream_id) == self.conn._is_client
                or self.closed
                or not self.accept_streams
            ):
                self._refuse(stream_id, data)
                return
            if not data:
                if end:
                    self._refuse(stream_id, data)
                return
            # A new peer stream: its first byte is the handshake byte.
            self.conn.consumed(stream_id, 1)
            t = QuicStreamTransport(self, stream_id)
            self.streams[stream_id] = t
            self.on_stream(t)
            data = data[1:]
        if data:
            self.conn.unconsumed += len(data)
            t.data_received(data)
        if end:
            t._peer_done()
            t.eof_received()
            self.maybe_forget(t)

    def _refuse(self, stream_id: int, data: bytes) -> None:
        """A stream no member reads: credit its bytes and end both directions."""
        if data:
            self.conn.consumed(stream_id, len(data))
        for fn in (self.conn.stop_stream, self.conn.reset_stream):
            try:
                fn(stream_id, 0)
            except (RuntimeError, ValueError):
                pass
        self.conn.forget(stream_id)

    def _stream_reset(self, stream_id: int, why: str) -> None:
        t = self.streams.get(stream_id)
        if t is None:
            return
        t._peer_done()
        t.terminated(_failure(ConnectionLost(why)))
        self.maybe_forget(t)

    def _stop_sending(self, stream_id: int) -> None:
        # aioquic has reset our direction already; the member cannot write any more.
        t = self.streams.get(stream_id)
        if t is None:
            return
        t.send_done = True
        t.terminated(_failure(ConnectionLost("stream stopped by peer (STOP_SENDING)")))
        self.maybe_forget(t)

    def _handshake_completed(self) -> None:
        self.ready = True
        self._schedule_ping()
        if self.on_ready is not None:
            self.on_ready(self)

    def _end(self, reason: str) -> None:
        """The connection is over: members end, timers stop, the owner is told (once)."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        for call in (self._ping_call, self._transmit_call):
            if call is not None and call.active():
                call.cancel()
        self._ping_call = self._transmit_call = None
        self._cancel_timer()
        streams, self.streams = self.streams, {}
        self.blocked.clear()
        self._done.clear()
        for t in streams.values():
            t.send_done = t.recv_done = True
            t._peer_done()
            t.terminated(_failure(ConnectionLost(f"QUIC connection closed: {reason}")))
        if self.on_closed is not None:
            self.on_closed(self, reason)

    # -- output ------------------------------------------------------------------------------------
    def transmit_soon(self) -> None:
        if self._transmit_call is None and not self.closed:
            self._transmit_call = self.reactor.callLater(0, self.transmit)

    def transmit(self) -> None:
        """Send what aioquic has queued and re-arm its timer."""
        if self._transmit_call is not None:
            if self._transmit_call.active():
                self._transmit_call.cancel()
            self._transmit_call = None
        if self.closed:
            return
        now = self.reactor.seconds()
        conn = self.conn
        space = conn._spaces.get(Epoch.ONE_RTT)
        if (
            space is not None
            and space.ack_at is not None
            and space.ack_at > now
            and (self._unacked >= ACK_AFTER or self._queued)
        ):
            # A batch of packets arrived: acknowledge them now rather than
            # after the ACK delay, so that the sender's window moves on.  An
            # ACK that is owed anyway rides along with data we send now
            # (request/response traffic) instead of costing a packet later.
            space.ack_at = now
        self._queued = False
        try:
            self._write_all(conn.datagrams_to_send(now=now))
            # Sending announces new connection IDs: route them before the peer uses them.
            self._process_events()
        finally:
            if space is None or space.ack_at is None:
                self._unacked = 0
            self._after_send(now)

    def _after_send(self, now: float) -> None:
        """End the link after a CONNECTION_CLOSE, resume writers, re-arm the timer."""
        close = self.conn._close_event
        if close is not None:
            # CONNECTION_CLOSE sent (ours) or received (the peer's): over.
            self._end(close.reason_phrase or f"error {close.error_code:#x}")
            return
        due = self.conn.get_timer()
        if due is not None:
            self._arm_timer(due, now)
        if self.blocked:
            for t in list(self.blocked):
                t.drained()
                if not t._producer_paused:
                    self.blocked.discard(t)

    def _arm_timer(self, due: float, now: float) -> None:
        """Have the timer fire at ``due`` or earlier.

        aioquic's deadline moves with nearly every packet (idle timeout, loss
        detection, ACK delay, pacing).  A timer set for an earlier time is
        left alone (when it fires, the current deadline is checked and the
        timer set again if it is not due), and one set for a later time is
        moved earlier; so the timer is not replaced for each packet.
        """
        timer = self._timer
        if timer is None:
            self._timer_at = due
            self._timer = self.reactor.callLater(max(0.0, due - now), self._handle_timer)
        elif due < (self._timer_at or 0.0):
            self._timer_at = due
            timer.reset(max(0.0, due - now))

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_at = None

    def _write_all(self, out: list[tuple[bytes, NetworkAddress]]) -> None:
        """Send datagrams in order; runs of one size to one address (the
        last of a run may be shorter) go out together where ``send_run`` is
        given (one system call, see :class:`DatagramSender`)."""
        send_run = self._send_run
        if send_run is None or len(out) == 1:
            for datagram, addr in out:
                self._write(datagram, addr)
            return
        i, count = 0, len(out)
        while i < count:
            first, addr = out[i]
            size = len(first)
            limit = min(GSO_SEGMENTS, 65000 // size)
            j = i + 1
            while j < count and j - i < limit and out[j][1] == addr:
                n = len(out[j][0])
                if n > size:
                    break
                j += 1
                if n < size:
                    break  # a shorter one ends the run
            if j - i == 1:
                self._write(first, addr)
            else:
                self._write_run([d for d, _a in out[i:j]], addr)
            i = j

    def _write(self, datagram: bytes, addr: NetworkAddress) -> None:
        try:
            self._send(datagram, addr)
        except Exception as exc:  # noqa: BLE001 - OSError or Twisted's own UDP errors
            self._not_sent(exc, len(datagram))

    def _write_run(self, datagrams: list[bytes], addr: NetworkAddress) -> None:
        assert self._send_run is not None
        try:
            self._send_run(datagrams, addr)
        except Exception as exc:  # noqa: BLE001 - OSError or Twisted's own UDP errors
            self._not_sent(exc, len(datagrams[0]))

    def _not_sent(self, exc: Exception, size: int) -> None:
        """Datagrams of ``size`` bytes were not sent.  They are lost: QUIC's
        recovery sends their frames again.  Too large for the path (the
        kernel knows a smaller MTU now): that probe size is ruled out, or
        the connection goes back to the smallest size; either way the next
        send may go at once."""
        if isinstance(exc, MessageLengthError) or (isinstance(exc, OSError) and exc.errno == errno.EMSGSIZE):
            self.conn.datagram_too_large(size)
            self.transmit_soon()

    def _schedule_ping(self) -> None:
        if not self.closed and self.keepalive > 0:
            self._ping_call = self.reactor.callLater(self.keepalive, self._ping)

    def _ping(self) -> None:
        self._ping_call = None
        if self.closed:
            return
        self._sweep()
        self.conn.send_ping(next(self._ping_ids))
        self.transmit()
        self._schedule_ping()
        self.empty_ticks = self.empty_ticks + 1 if self.active_members() == 0 else 0
        if self.on_tick is not None:
            self.on_tick(self)

    # -- members -----------------------------------------------------------------------------------
    def open_stream(self) -> QuicStreamTransport:
        """A new local bidirectional stream (client side), handshake byte written."""
        stream_id = self.conn.get_next_available_stream_id()
        t = QuicStreamTransport(self, stream_id)
        self.streams[stream_id] = t
        self.members_opened += 1
        self.send_stream(stream_id, HANDSHAKE_BYTE)
        return t

    def send_stream(self, stream_id: int, data: bytes, end: bool = False) -> None:
        if self.closed:
            return
        try:
            self.conn.send_stream_data(stream_id, data, end_stream=end)
        except (RuntimeError, ValueError):
            return  # the stream was reset or discarded meanwhile
        self._queued = True
        self.transmit_soon()

    def reset_stream(self, stream_id: int) -> None:
        """RESET_STREAM: our direction ends without its queued bytes."""
        self._end_direction(self.conn.reset_stream, stream_id)

    def stop_stream(self, stream_id: int) -> None:
        """STOP_SENDING: the peer is asked to end its direction."""
        self._end_direction(self.conn.stop_stream, stream_id)

    def _end_direction(self, fn: Callable[[int, int], None], stream_id: int) -> None:
        if not self.closed:
            try:
                fn(stream_id, 0)
            except (RuntimeError, ValueError):
                pass  # already ended, or released
            self._queued = True
            self.transmit_soon()

    def unsent(self, stream_id: int) -> int:
        return self.conn.unsent(stream_id)

    def consumed(self, stream_id: int, nbytes: int) -> None:
        self.conn.unconsumed -= nbytes
        if self.conn.consumed(stream_id, nbytes):
            self.transmit_soon()

    def maybe_forget(self, t: QuicStreamTransport) -> None:
        """A member whose two directions are over is dropped once aioquic released its stream."""
        if t.send_done and t.recv_done and t.disconnected and self.streams.get(t.stream_id) is t:
            self._done.add(t.stream_id)
            if len(self._done) >= 64:
                self._sweep()

    def _sweep(self) -> None:
        live = self.conn._streams
        for stream_id in [s for s in self._done if s not in live]:
            self._done.discard(stream_id)
            self.streams.pop(stream_id, None)
            self.conn.forget(stream_id)

    def active_members(self) -> int:
        """Members still connected to a protocol."""
        return len(self.live)

    def peer_certificate(self) -> Any:
        return getattr(self.conn.tls, "_peer_certificate", None)

    # -- closing -----------------------------------------------------------------------------------
    def close(self, reason: str) -> None:
        """Send CONNECTION_CLOSE (application error 0, ``reason``); the connection ends."""
        if self.closed:
            return
        self.conn.close(error_code=0, reason_phrase=reason)
        self.transmit()
        self._end(reason)

    def abandon(self, reason: str) -> None:
        """End the connection without a word to the peer."""
        self._end(reason)


# -- rate-limited reporting -----------------------------------------------------------------------------
class _Tally:
    """Counts refusals by reason; the first of a quiet period is logged at once,
    the rest as one summary line per ``interval``."""

    def __init__(self, reactor: Any, logger: NodePassLogger, interval: float, what: str) -> None:
        self.reactor = reactor
        self.logger = logger
        self.interval = max(interval, 1.0)
        self.what = what
        self.total = 0
        self._pending: dict[str, int] = {}
        self._call: Any = None
        self._stopped = False

    def add(self, reason: str, addr: Any) -> None:
        """Count one refusal from ``addr`` (an ``(ip, port)`` pair); once
        stopped (the pool closed) it is only counted."""
        self.total += 1
        if self._stopped:
            return
        if self._call is None:
            source = join_host_port(str(addr[0]), addr[1], unmap=True)
            self.logger.warn("QUIC %s from %s: %s", self.what, source, reason)
            self._call = self.reactor.callLater(self.interval, self._flush)
            return
        self._pending[reason] = self._pending.get(reason, 0) + 1

    def _flush(self) -> None:
        self._call = None
        if not self._pending:
            return
        count = sum(self._pending.values())
        detail = ", ".join(f"{n} {r}" for r, n in sorted(self._pending.items()))
        self._pending = {}
        self.logger.warn("QUIC %s: %d more in the last %gs (%s)", self.what, count, self.interval, detail)
        self._call = self.reactor.callLater(self.interval, self._flush)

    def stop(self) -> None:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


# -- server -------------------------------------------------------------------------------------------
class _ServerPort(DatagramProtocol):
    """The UDP side of the tunnel port: routes datagrams to connections by connection ID."""

    noisy = False

    def __init__(self, pool: QuicServerPool) -> None:
        self.pool = pool

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.pool._datagram(data, addr)


class QuicServerPool(ServerPoolBase):
    """Accepts QUIC connections on the UDP side of the tunnel port; their
    streams are the pool's members."""

    #: Receive windows of new connections (see the module docstring).
    stream_window = STREAM_WINDOW
    conn_window = CONN_WINDOW

    def __init__(self, reactor: Any, logger: NodePassLogger, *, host: str = "", port: int = 0, **kwargs: Any) -> None:
        super().__init__(reactor, logger, **kwargs)
        self.host = host
        self.port = port
        self.idle_timeout = 3 * self.keepalive
        self.udp_port: Any = None
        self._sender: DatagramSender | None = None
        self.links: dict[bytes, QuicLink] = {}  # every connection ID of every live connection
        self._all: set[QuicLink] = set()
        self._config: QuicConfiguration | None = None
        self._config_pem: tuple[bytes, bytes] | None = None
        self._garbage: set[QuicLink] = set()
        self.dropped = _Tally(reactor, logger, self.keepalive, "datagram dropped")
        self.refused = _Tally(reactor, logger, self.keepalive, "connection refused")

    @classmethod
    def probe(cls, reactor: Any, host: str, port: int) -> None:
        """Check that the UDP side of the tunnel port can be bound (raises
        CannotListenError); the socket is released before this returns."""

        def bind(interface: str) -> None:
            sock = socket.socket(socket.AF_INET6 if ":" in interface else socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind((interface, port))
            except OSError as exc:
                raise CannotListenError(interface, port, exc) from None  # type: ignore[no-untyped-call]
            finally:
                sock.close()

        listen_any(bind, host)

    def start(self) -> None:
        if self.udp_port is not None or self.closed:
            return
        self.udp_port = listen_any(
            lambda interface: listen_udp(self.reactor, self.port, _ServerPort(self), interface), self.host
        )
        tune_socket(self.udp_port)
        self._sender = DatagramSender(self.udp_port)
        self.logger.debug("QUIC pool listening on udp %s", join_host_port(self.host, self.port))

    def _configuration(self) -> QuicConfiguration:
        pem = self.tls.pem()
        if self._config is None or pem != self._config_pem:
            self._config = server_configuration(
                self.tls, self.idle_timeout, stream_window=self.stream_window, conn_window=self.conn_window
            )
            self._config_pem = pem
        return self._config

    @property
    def connections(self) -> int:
        """QUIC connections currently open."""
        return len(self._all)

    # -- datagrams ------------------------------------------------------------------------------------
    def _datagram(self, data: bytes, addr: Any) -> None:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
        except ValueError:
            self.dropped.add("not a QUIC packet", addr)
            return
        if (
            header.packet_type != QuicPacketType.VERSION_NEGOTIATION
            and header.version is not None
            and header.version not in VERSIONS
        ):
            if len(data) >= SMALLEST_MAX_DATAGRAM_SIZE:
                self._send(
                    encode_quic_version_negotiation(
                        source_cid=header.destination_cid,
                        destination_cid=header.source_cid,
                        supported_versions=VERSIONS,
                    ),
                    addr,
                )
            self.dropped.add("unsupported QUIC version", addr)
            return
        link = self.links.get(header.destination_cid)
        if link is not None:
            link.datagram_received(data, addr)
            return
        if header.packet_type != QuicPacketType.INITIAL or len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
            self.dropped.add("packet for no known connection", addr)
            return
        self._accept(header.destination_cid, data, addr)

    def _accept(self, dcid: bytes, data: bytes, addr: Any) -> None:
        if self.closed:
            self.dropped.add("pool closed", addr)
            return
        if len(self._all) >= MAX_LINKS:
            self.refused.add(f"more than {MAX_LINKS} connections", addr)
            return
        conn = _FlowConnection(
            configuration=self._configuration(), original_destination_connection_id=dcid, max_streams=self.max_cap
        )
        host = self.udp_port.getHost()
        link = QuicLink(
            self.reactor,
            conn,
            peer_addr=addr,
            host=_address(host.host, host.port),
            send=self._send,
            send_run=self._send_run,
            keepalive=self.keepalive,
            on_ready=self._ready,
            on_stream=self._member,
            on_cid=self._cid,
            on_closed=self._closed_link,
            on_tick=self._tick,
        )
        # Streams of a connection from another IP are refused from the start;
        # the connection is closed once its handshake completed (the close
        # can carry its reason only then).
        link.accept_streams = self.client_allowed(str(addr[0]))
        self.links[dcid] = link
        self.links[conn.host_cid] = link
        self._all.add(link)
        if not link.first_datagram(data, addr):
            self._garbage.add(link)
            link.abandon("undecryptable Initial")
            self.dropped.add("Initial packet that does not decrypt", addr)

    def _cid(self, link: QuicLink, cid: bytes, issued: bool) -> None:
        if issued:
            self.links[cid] = link
        elif self.links.get(cid) is link:
            del self.links[cid]

    def _send(self, datagram: bytes, addr: Any) -> None:
        if self.udp_port is not None and self._sender is not None:
            self._sender.send(datagram, addr)

    def _send_run(self, datagrams: list[bytes], addr: Any) -> None:
        if self.udp_port is not None and self._sender is not None:
            self._sender.send_run(datagrams, addr)

    # -- connection events -----------------------------------------------------------------------------
    def _ready(self, link: QuicLink) -> None:
        if not link.accept_streams:
            self.refused.add(f"unauthorized IP (the handshaken client is {self.client_ip})", link.peer_addr)
            link.close("unauthorized IP")
            return
        self.logger.debug("QUIC connection from %s", link.text)

    def _tick(self, link: QuicLink) -> None:
        # A Go client abandons (never closes) a connection on which a stream
        # failed; one that carries no member for three intervals is closed.
        if link.empty_ticks >= 3:
            link.close("no members")

    def _member(self, t: QuicStreamTransport) -> None:
        t.attach(PoolConnection(self, True))

    def _closed_link(self, link: QuicLink, reason: str) -> None:
        self._all.discard(link)
        for cid, other in list(self.links.items()):
            if other is link:
                del self.links[cid]
        if link in self._garbage:
            self._garbage.discard(link)
        elif not link.ready:
            self.refused.add(f"handshake failed: {reason}", link.peer_addr)
        else:
            self.logger.debug("QUIC connection from %s closed: %s", link.text, reason)

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        for link in list(self._all):
            link.close("pool closed")
        self._all.clear()
        self.links.clear()
        self.dropped.stop()
        self.refused.stop()
        if self.udp_port is not None:
            port, self.udp_port = self.udp_port, None
            port.stopListening()


# -- client -------------------------------------------------------------------------------------------
class _ClientPort(DatagramProtocol):
    noisy = False

    def __init__(self) -> None:
        self.link: QuicLink | None = None

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if self.link is not None:
            self.link.datagram_received(data, addr)


class QuicClientPool(ClientPoolBase):
    """Opens members as streams of one QUIC connection to ``host:port``.

    A new connection is opened when there is none, when the current one ended,
    or when a stream on it failed before its ID arrived (the server refuses
    streams it cannot take); a replaced connection stays up while it carries
    members and is closed once the last one ends.
    """

    #: Receive windows of new connections (see the module docstring).
    stream_window = STREAM_WINDOW
    conn_window = CONN_WINDOW

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
        **kwargs: Any,
    ) -> None:
        super().__init__(reactor, logger, **kwargs)
        self.host = host
        self.port = port
        self.dial_timeout = dial_timeout if dial_timeout > 0 else 5.0
        self.tls_code = tls_code
        self.server_name = server_name
        self.idle_timeout = 3 * self.keepalive
        self.link: QuicLink | None = None
        self.links: set[QuicLink] = set()
        self.dials = 0
        self._connecting = False
        self._waiting: list[tuple[PoolConnection, Callable[[str], None]]] = []
        self._dns: DNSCache | None = None
        self._ports: dict[QuicLink, Any] = {}
        self._dial_timer: Any = None

    # -- ClientPoolBase ----------------------------------------------------------------------------
    def _open_member(self, conn: PoolConnection, failed: Callable[[str], None]) -> None:
        link = self.link
        if link is not None and link.ready and not link.closed:
            self._stream(link, conn, failed)
            return
        self._waiting.append((conn, failed))
        if not self._connecting:
            self._dial()

    def _close_transport(self) -> None:
        self._cancel_dial_timer()
        waiting, self._waiting = self._waiting, []
        for _conn, failed in waiting:
            failed("pool closed")
        for link in list(self.links):
            link.close("pool closed")
        self.links.clear()
        self.link = None

    # -- connections -------------------------------------------------------------------------------
    def _dial(self) -> None:
        self._connecting = True
        self.dials += 1
        if self._dns is None:
            self._dns = DNSCache(getattr(self.reactor, "nameResolver", None), self.reactor, logger=self.logger)  # type: ignore[arg-type]
        host = self.host.strip("[]")
        d = self._dns.resolve_host(host) if not is_ip_literal(host) and host else None
        if d is None:
            self._connect(host or "127.0.0.1")
        else:
            d.addCallbacks(self._connect, lambda f: self._dial_failed(f"resolve {self.host}: {f.getErrorMessage()}"))

    def _connect(self, ip: str) -> None:
        if self.closed:
            self._connecting = False
            return
        ip = ip.split("%", 1)[0]
        try:
            family6 = ipaddress.ip_address(ip).version == 6
            proto = _ClientPort()
            udp = listen_udp(self.reactor, 0, proto, "::" if family6 else "0.0.0.0")
        except (OSError, ValueError) as exc:
            self._dial_failed(f"listen udp: {exc}")
            return
        tune_socket(udp)
        sender = DatagramSender(udp)
        addr = (ip, self.port)
        cfg = client_configuration(
            self.tls_code,
            self.server_name,
            self.idle_timeout,
            stream_window=self.stream_window,
            conn_window=self.conn_window,
        )
        conn = _FlowConnection(configuration=cfg, max_streams=self.max_cap)
        local = udp.getHost()
        link = QuicLink(
            self.reactor,
            conn,
            peer_addr=addr,
            host=_address(local.host, local.port),
            send=sender.send,
            send_run=sender.send_run,
            keepalive=self.keepalive,
            on_ready=self._ready,
            on_closed=self._closed_link,
        )
        proto.link = link
        self._ports[link] = udp
        self.links.add(link)
        self.link = link
        conn.connect(addr, now=self.reactor.seconds())
        link.transmit()
        self._cancel_dial_timer()
        self._dial_timer = self.reactor.callLater(self.dial_timeout, self._dial_timeout, link)

    def _dial_timeout(self, link: QuicLink) -> None:
        self._dial_timer = None
        if not link.ready and not link.closed:
            link.close("handshake timeout")

    def _cancel_dial_timer(self) -> None:
        if self._dial_timer is not None and self._dial_timer.active():
            self._dial_timer.cancel()
        self._dial_timer = None

    def _dial_failed(self, reason: str) -> None:
        self._connecting = False
        self._cancel_dial_timer()
        waiting, self._waiting = self._waiting, []
        for _conn, failed in waiting:
            failed(reason)

    def _ready(self, link: QuicLink) -> None:
        self._cancel_dial_timer()
        self._connecting = False
        self.logger.debug("QUIC connection to %s ready", link.text)
        if link is not self.link or self.closed:
            return
        waiting, self._waiting = self._waiting, []
        for conn, failed in waiting:
            self._stream(link, conn, failed)

    def _stream(self, link: QuicLink, conn: PoolConnection, failed: Callable[[str], None]) -> None:
        try:
            t = link.open_stream()
        except Exception as exc:  # aioquic refuses: this connection cannot take more
            self._retire(link)
            failed(f"open stream: {exc}")
            return
        t.attach(conn)

        def lost(reason: str) -> None:
            if not conn.id:
                self._retire(link)
            self._maybe_close(link)

        conn.when_lost().addCallback(lost)

    def _retire(self, link: QuicLink) -> None:
        """No new members on ``link``: the next one dials a new connection."""
        if self.link is link:
            self.link = None
            self._connecting = False

    def _maybe_close(self, link: QuicLink) -> None:
        if link is not self.link and not link.closed and link.active_members() == 0:
            link.close("no members left")

    def _closed_link(self, link: QuicLink, reason: str) -> None:
        self.links.discard(link)
        udp = self._ports.pop(link, None)
        if udp is not None:
            udp.stopListening()
        current = link is self.link
        if current:
            self.link = None
            self._cancel_dial_timer()
            self._connecting = False
        if not link.ready:
            self.last_error = f"QUIC dial {link.text}: {reason}"
            if current:
                waiting, self._waiting = self._waiting, []
                for _conn, failed in waiting:
                    failed(self.last_error)
        else:
            self.logger.debug("QUIC connection to %s closed: %s", link.text, reason)
        if self._waiting and not self._connecting and not self.closed:
            self._dial()
