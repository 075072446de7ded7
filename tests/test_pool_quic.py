"""QUIC pool (type 1) with two in-memory ends on an injected clock.

:class:`_Net` is a :class:`Clock` that also offers ``listenUDP``: datagrams
between its ports arrive after a small delay of simulated time, so both
aioquic ends (our server pool and client pool, or a bare aioquic client) run
exactly as on sockets, deterministically and without wall-clock waits.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicProtocolVersion
from twisted.internet.address import IPv4Address
from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer

from nodepass.pool import CONTROL_ID, client_pool, probe_server_port, server_pool
from nodepass.pool.base import PoolConnection
from nodepass.pool.quic import (
    ALPN,
    PACING_BURST,
    PROBE_SIZES,
    QuicClientPool,
    QuicLink,
    QuicServerPool,
    _FlowConnection,
    _Pacer,
    client_configuration,
)
from nodepass.pool.udpio import GSO_SEGMENTS
from nodepass.relay import RelayProtocol
from nodepass.tls import server_tls
from tests.support import free_port, make_cert_files, new_dir, recording_logger

SERVER_PORT = 4433


class _Port:
    """A bound fake UDP port."""

    def __init__(self, net: _Net, host: str, port: int, protocol: DatagramProtocol) -> None:
        self.net = net
        self.host = host
        self.port = port
        self.protocol = protocol
        self.open = True
        protocol.transport = self  # type: ignore[assignment]

    def write(self, data: bytes, addr: Any) -> None:
        net = self.net
        if net.mtu and len(data) > net.mtu:
            if net.refuse_large:
                raise MessageLengthError("message too long")  # type: ignore[no-untyped-call]
            net.too_large += 1
            return  # lost on the way (a router drops it)
        net.send(data, (self.host, self.port), (str(addr[0]), int(addr[1])))

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", self.host, self.port)

    def stopListening(self) -> None:
        self.open = False
        self.net.ports.pop(self.port, None)


class _Net(Clock):
    """A clock with an in-memory UDP network (one host, ports by number).

    ``source`` is the address ports bound to a wildcard send from;
    ``blocked`` lists ports whose datagrams (to or from them) are lost;
    datagrams larger than ``mtu`` (when set) are lost, or refused by the
    sending port's ``write`` (as the kernel does with "don't fragment")
    when ``refuse_large`` is set.
    """

    def __init__(self, delay: float = 0.0005) -> None:
        super().__init__()
        self.delay = delay
        self.ports: dict[int, _Port] = {}
        self.blocked: set[int] = set()
        self.source = "127.0.0.1"
        self.datagrams = 0
        self.mtu = 0
        self.refuse_large = False
        self.too_large = 0
        self.largest = 0
        self._next = 50000

    def listenUDP(self, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192) -> _Port:
        if port == 0:
            self._next += 1
            port = self._next
        if port in self.ports:
            from twisted.internet.error import CannotListenError

            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        host = interface if interface not in ("", "0.0.0.0", "::") else self.source
        p = _Port(self, host, port, protocol)
        self.ports[port] = p
        return p

    def send(self, data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
        self.datagrams += 1
        self.largest = max(self.largest, len(data))
        self.callLater(self.delay, self._deliver, data, src, dst)

    def _deliver(self, data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
        port = self.ports.get(dst[1])
        if port is not None and dst[1] not in self.blocked and src[1] not in self.blocked:
            port.protocol.datagramReceived(data, src)

    def run(self, seconds: float, step: float = 0.001) -> None:
        end = self.seconds() + seconds
        while self.seconds() < end:
            self.advance(step)

    def run_until(self, cond: Callable[[], Any], limit: float = 30.0, what: str = "condition", step: float = 0.001) -> None:
        end = self.seconds() + limit
        while not cond():
            if self.seconds() > end:
                raise AssertionError(f"{what} not reached within {limit}s of simulated time")
            self.advance(step)


@implementer(IHalfCloseableProtocol)
class _Stubborn(Protocol):
    """Collects bytes and ignores the peer's end of stream (never closes its own)."""

    def __init__(self) -> None:
        self.data = b""
        self.eof = False
        self.lost: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = reason


class QuicPairCase(unittest.TestCase):
    """Helpers: a server and client pool on one :class:`_Net`."""

    def setUp(self) -> None:
        self.net = _Net()
        self.slog, self.srecords = recording_logger("debug")
        self.clog, self.crecords = recording_logger("debug")
        self.tls = server_tls(1, "", "", logger=self.slog)

    def tearDown(self) -> None:
        for pool in getattr(self, "_pools", []):
            pool.close()
        self.net.run(0.05)

    def _server(self, max_cap: int = 64, client_ip: str = "127.0.0.1", keepalive: float = 5.0,
                tls: Any = None, strict: bool = False) -> QuicServerPool:
        pool = server_pool(1, self.net, self.slog, max_cap=max_cap, client_ip=client_ip, tls=tls or self.tls,
                           keepalive=keepalive, strict=strict, host="127.0.0.1", port=SERVER_PORT)
        assert isinstance(pool, QuicServerPool)
        pool.start()
        self._pools = [*getattr(self, "_pools", []), pool]
        return pool

    def _client(self, min_cap: int = 4, max_cap: int = 64, keepalive: float = 5.0, tls_code: int = 1,
                server_name: str = "", host: str = "127.0.0.1") -> QuicClientPool:
        pool = client_pool(1, self.net, self.clog, min_cap=min_cap, max_cap=max_cap, min_interval=0.1,
                           max_interval=1.0, keepalive=keepalive, host=host, port=SERVER_PORT, dial_timeout=5.0,
                           tls_code=tls_code, server_name=server_name)
        assert isinstance(pool, QuicClientPool)
        self._pools = [*getattr(self, "_pools", []), pool]
        pool.start()
        return pool

    def _ready(self, server: QuicServerPool, client: QuicClientPool, count: int, limit: float = 30.0) -> None:
        self.net.run_until(lambda: server.active >= count and client.active >= count, limit,
                           f"{count} idle members on both ends")

    def _take(self, server: QuicServerPool, client: QuicClientPool, cid: str = "") -> tuple[PoolConnection, PoolConnection]:
        if not cid:
            cid = next(c for c in client._idle if c != CONTROL_ID and c in server._idle)
        got: list[PoolConnection] = []
        server.outgoing_get(cid, 1.0).addCallback(got.append)
        client.outgoing_get(cid, 1.0).addCallback(got.append)
        self.assertEqual(len(got), 2)
        return got[0], got[1]

    def _one_pair(self) -> tuple[QuicServerPool, QuicClientPool, PoolConnection, PoolConnection, int]:
        """Both pools, one member taken on each end, and its stream ID."""
        server = self._server()
        client = self._client(min_cap=2)
        self._ready(server, client, 2)
        s, c = self._take(server, client)
        return server, client, s, c, c.transport.stream_id  # type: ignore[union-attr]

    def assertReleased(self, sid: int, server: QuicServerPool, client: QuicClientPool) -> None:
        """Both aioquic ends dropped the stream (both directions ended)."""
        self.assertNotIn(sid, self._link(server).conn._streams)
        self.assertNotIn(sid, self._link(client).conn._streams)

    @staticmethod
    def _link(pool: Any) -> QuicLink:
        links = list(pool._all) if isinstance(pool, QuicServerPool) else list(pool.links)
        assert len(links) == 1, links
        return links[0]


class QuicPoolTests(QuicPairCase):
    # -- ID exchange ---------------------------------------------------------------------------------
    def test_ids_match_and_first_is_control(self) -> None:
        server = self._server()
        client = self._client(min_cap=4)
        self._ready(server, client, 4)
        self.assertEqual(set(server._idle), set(client._idle))
        self.assertIn(CONTROL_ID, server._idle)
        self.assertEqual(server.connections, 1)
        link = self._link(client)
        self.assertEqual(link.conn.tls.alpn_negotiated, ALPN)
        # The client's members see the certificate whose fingerprint verify sends.
        _s, c = self._take(server, client)
        self.assertEqual(c.peer_fingerprint(), self.tls.fingerprint)

    def test_more_than_128_streams_open_at_once(self) -> None:
        server = self._server(max_cap=300)
        client = self._client(min_cap=200, max_cap=300)
        self._ready(server, client, 200)
        link = self._link(server)
        self.assertGreater(link.active_members(), 128)
        self.assertEqual(self._link(client).conn._remote_max_streams_bidi, 300)
        self.assertEqual(server.connections, 1)
        self.assertEqual(client.dials, 1)

    def test_stream_credit_renewed_as_members_end(self) -> None:
        # The server allows 130 streams at once; ending members must give
        # the client credit for new ones on the same connection.
        server = self._server(max_cap=130)
        client = self._client(min_cap=130, max_cap=130)
        self._ready(server, client, 130)
        for _round in range(2):
            for cid in [c for c in client._idle if c != CONTROL_ID]:
                s, c = self._take(server, client, cid)
                c.transport.write(b"x")
                c.close()
                s.close()
            self.net.run(0.5)
            self._ready(server, client, 130)
        self.assertEqual(client.dials, 1)
        self.assertGreater(self._link(client).conn._remote_max_streams_bidi, 300)
        # Ended streams were released on both ends.
        self.assertLessEqual(len(self._link(server).conn._streams), 131)

    # -- close semantics -----------------------------------------------------------------------------------
    def test_half_close_each_way_then_both_streams_released(self) -> None:
        server, client, s, c, sid = self._one_pair()
        got_s: list[bytes] = []
        got_c: list[bytes] = []
        eofs: list[str] = []
        s.set_sink(got_s.append)
        c.set_sink(got_c.append)
        s._on_eof = lambda: eofs.append("server")
        c._on_eof = lambda: eofs.append("client")
        c.transport.write(b"hello")
        c.transport.loseWriteConnection()  # type: ignore[union-attr]
        self.net.run(0.05)
        self.assertEqual(b"".join(got_s), b"hello")
        self.assertEqual(eofs, ["server"])
        self.assertFalse(s.lost or c.lost)
        s.transport.write(b"bye")
        s.transport.loseWriteConnection()  # type: ignore[union-attr]
        self.net.run(0.2)
        self.assertEqual(b"".join(got_c), b"bye")
        self.assertEqual(eofs, ["server", "client"])
        self.assertTrue(s.lost and c.lost)
        self.assertReleased(sid, server, client)

    def test_close_sends_fin_and_the_other_side_follows(self) -> None:
        server, client, s, c, sid = self._one_pair()
        got: list[bytes] = []
        c.set_sink(got.append)
        s.transport.write(b"last words")
        s.close()
        self.net.run(0.2)
        # A plain relay endpoint (not joined) closes in turn on the peer's FIN.
        self.assertEqual(b"".join(got), b"last words")
        self.assertTrue(c.lost)
        self.assertEqual(c.lost_reason, "EOF")
        self.assertTrue(s.lost)
        self.assertReleased(sid, server, client)

    def test_abort_resets_both_directions(self) -> None:
        server, client, s, c, sid = self._one_pair()
        c.transport.write(b"dropped")
        c.abort()
        self.net.run(0.2)
        self.assertTrue(s.lost)
        self.assertIn("by peer", s.lost_reason)
        self.assertReleased(sid, server, client)

    def test_peer_that_never_finishes_is_stopped_after_linger(self) -> None:
        server = self._server(keepalive=1.0)
        client = self._client(min_cap=1, keepalive=1.0)
        self._ready(server, client, 1)
        link = self._link(client)
        t = link.open_stream()
        peer = _Stubborn()
        t.attach(peer)
        self.net.run(0.05)
        self.assertEqual(len(peer.data), 4)  # the ID
        sid = t.stream_id
        member = server._idle.pop(peer.data.hex())
        member.close()  # FIN from the server; our stubborn end never sends one
        self.net.run(0.1)
        self.assertTrue(peer.eof)
        self.assertIsNone(peer.lost)
        self.assertIn(sid, self._link(server).conn._streams)
        # After the linger period the server asks the peer to stop (STOP_SENDING),
        # which resets the peer's direction: the stream is released on both ends.
        self.net.run(3.5)
        self.assertIsNotNone(peer.lost)
        self.assertNotIn(sid, self._link(server).conn._streams)
        self.assertNotIn(sid, link.conn._streams)

    def test_writes_that_fit_a_packet_arrive_whole(self) -> None:
        # Several members write datagram-sized chunks at once: each write is
        # one reception on the other side (UDP over a member relies on it).
        server = self._server()
        client = self._client(min_cap=8)
        self._ready(server, client, 8)
        pairs = [self._take(server, client) for _ in range(6)]
        received: list[list[bytes]] = []
        sizes = [1, 700, 1100, 300, 1000, 64]
        for s, _c in pairs:
            got: list[bytes] = []
            received.append(got)
            s.set_sink(got.append)
        for size in sizes:
            for _s, c in pairs:
                c.transport.write(os.urandom(size))  # type: ignore[union-attr]
        self.net.run(0.5)
        for got in received:
            self.assertEqual([len(b) for b in got], sizes)

    # -- flow control -------------------------------------------------------------------------------------
    def test_paused_reader_bounds_memory_and_slows_the_writer(self) -> None:
        server = self._server()
        server.stream_window = window = 256 * 1024
        client = self._client(min_cap=2)
        self._ready(server, client, 2)
        s, c = self._take(server, client)
        got: list[bytes] = []
        s.set_sink(got.append)
        s.transport.pauseProducing()  # type: ignore[union-attr]
        payload = os.urandom(4 * window)
        events: list[str] = []

        class Producer:
            def pauseProducing(self) -> None:
                events.append("pause")

            def resumeProducing(self) -> None:
                events.append("resume")

            def stopProducing(self) -> None:
                events.append("stop")

        ct = c.transport
        assert ct is not None
        ct.registerProducer(Producer(), True)  # type: ignore[attr-defined]
        ct.write(payload)
        self.assertEqual(events, ["pause"])
        self.net.run(2.0)
        slink = self._link(server)
        # At most one stream window is held unread; the rest waits at the writer.
        self.assertEqual(got, [])
        self.assertLessEqual(slink.conn.unconsumed, window)
        self.assertGreaterEqual(slink.conn.unconsumed, window * 3 // 4)
        self.assertGreaterEqual(ct._buffered(), len(payload) - window - 4)  # type: ignore[attr-defined]
        self.assertEqual(events, ["pause"])
        s.transport.resumeProducing()  # type: ignore[union-attr]
        self.net.run_until(lambda: sum(map(len, got)) >= len(payload), 30.0, "all bytes delivered")
        self.assertEqual(hashlib.sha256(b"".join(got)).digest(), hashlib.sha256(payload).digest())
        self.assertEqual(events, ["pause", "resume"])
        self.assertEqual(slink.conn.unconsumed, 0)
        ct.unregisterProducer()  # type: ignore[attr-defined]

    def test_connection_window_bounds_unread_bytes_over_all_streams(self) -> None:
        server = self._server()
        server.stream_window = 128 * 1024
        server.conn_window = 1024 * 1024
        client = self._client(min_cap=24, max_cap=64)
        self._ready(server, client, 24)
        pairs = [self._take(server, client) for _ in range(20)]
        for s, c in pairs:
            s.transport.pauseProducing()  # type: ignore[union-attr]
            c.transport.write(os.urandom(server.stream_window))  # type: ignore[union-attr]
        self.net.run(2.0)
        slink = self._link(server)
        # 20 paused streams could take 2.5 MiB; the connection holds at most its window.
        self.assertLessEqual(slink.conn.unconsumed, server.conn_window)
        self.assertGreaterEqual(slink.conn.unconsumed, server.conn_window * 3 // 4)
        for s, _c in pairs:
            s.transport.resumeProducing()  # type: ignore[union-attr]
        self.net.run(2.0)
        self.assertEqual(slink.conn.unconsumed, 0)

    # -- keepalive and dead peers --------------------------------------------------------------------------
    def test_keepalive_holds_an_idle_connection_and_a_dead_server_is_noticed(self) -> None:
        server = self._server(keepalive=1.0)
        client = self._client(min_cap=3, keepalive=1.0)
        self._ready(server, client, 3)
        link = self._link(client)
        # Idle timeout is 3 s; PINGs every second keep the idle connection up.
        self.net.run(10.0, step=0.01)
        self.assertFalse(link.closed)
        self.assertEqual(client.dials, 1)
        # The server goes silent: within about three report intervals the
        # client's connection ends and every member with it.
        self.net.blocked.add(SERVER_PORT)
        start = self.net.seconds()
        self.net.run_until(lambda: link.closed, 6.0, "client notices the dead server", step=0.01)
        self.assertLessEqual(self.net.seconds() - start, 4.5)
        self.assertIn("Idle timeout", link.close_reason)
        self.assertEqual(client.active, 0)
        # Back again: a fresh connection refills the pool.
        self.net.blocked.clear()
        self.net.run_until(lambda: server.active >= 3 and client.active >= 3, 30.0, "refilled", step=0.01)
        self.assertGreaterEqual(client.dials, 2)

    def test_pool_close_ends_the_peer_connection(self) -> None:
        server = self._server()
        client = self._client(min_cap=3)
        self._ready(server, client, 3)
        slink = self._link(server)
        client.close()
        self.net.run(0.1)
        self.assertTrue(slink.closed)
        self.assertEqual(slink.close_reason, "pool closed")
        self.assertEqual(server.active, 0)
        self.assertEqual(server.connections, 0)

    # -- refusals ---------------------------------------------------------------------------------------------
    def test_full_server_refuses_streams_and_client_redials_without_leaking(self) -> None:
        server = self._server(max_cap=3)
        client = self._client(min_cap=6, max_cap=6)
        self.net.run(5.0, step=0.002)
        self.assertEqual(server.active, 3)
        self.assertEqual(client.active, 3)
        self.assertGreater(client.dials, 1)
        # Replaced connections without members are closed, not abandoned.
        self.assertLessEqual(len(client.links), 2)
        self.assertLessEqual(server.connections, 2)

    def test_unauthorized_ip_is_closed_at_connection_level(self) -> None:
        server = self._server(client_ip="127.0.0.9")
        client = self._client(min_cap=2)
        self.net.run(1.0)
        self.assertEqual(server.active, 0)
        self.assertEqual(client.active, 0)
        self.assertGreaterEqual(server.refused.total, 1)
        self.assertIn("unauthorized IP", client.last_error)
        warnings = [r.text for r in self.srecords if "unauthorized IP" in r.text and r.level.name == "WARN"]
        self.assertTrue(warnings)
        self.assertLessEqual(len(warnings), 2)

    def test_ipv4_mapped_source_is_the_handshaken_client(self) -> None:
        server = self._server(client_ip="127.0.0.1")
        self.net.source = "::ffff:127.0.0.1"
        client = self._client(min_cap=2)
        self._ready(server, client, 2)
        self.assertEqual(server.refused.total, 0)

    def _raw_client(self, alpn: str = ALPN, keepalive: float = 5.0) -> tuple[QuicLink, list[str]]:
        """A bare QUIC connection to the server (our glue, no pool, no streams)."""
        cfg = QuicConfiguration(is_client=True, alpn_protocols=[alpn], idle_timeout=3 * keepalive)
        cfg.verify_mode = 0
        conn = _FlowConnection(configuration=cfg, max_streams=128)
        closed: list[str] = []

        class Proto(DatagramProtocol):
            def datagramReceived(self, data: bytes, addr: Any) -> None:
                link.datagram_received(data, addr)

        port = self.net.listenUDP(0, Proto())
        link = QuicLink(self.net, conn, peer_addr=("127.0.0.1", SERVER_PORT), host=IPv4Address("UDP", "127.0.0.1", 1),
                        send=port.write, keepalive=keepalive,
                        on_closed=lambda _l, reason: closed.append(reason))
        conn.connect(("127.0.0.1", SERVER_PORT), now=self.net.seconds())
        link.transmit()
        return link, closed

    def test_connection_without_members_is_closed(self) -> None:
        # What a Go client leaves behind after a failed stream: a live
        # connection it never uses again.
        server = self._server(keepalive=1.0)
        link, closed = self._raw_client(keepalive=1.0)
        self.net.run(0.5)
        self.assertTrue(link.ready)
        self.assertEqual(server.connections, 1)
        self.net.run(5.0, step=0.01)
        self.assertEqual(closed, ["no members"])
        self.assertEqual(server.connections, 0)

    def test_wrong_alpn_is_refused(self) -> None:
        server = self._server()
        link, closed = self._raw_client(alpn="h3")
        self.net.run(1.0)
        self.assertTrue(closed)
        self.assertFalse(link.ready)
        self.assertEqual(server.refused.total, 1)
        self.assertEqual(server.connections, 0)

    def test_garbage_datagrams_are_dropped_counted_and_logged_once(self) -> None:
        server = self._server(keepalive=1.0)
        client = self._client(min_cap=2, keepalive=1.0)
        self._ready(server, client, 2)
        sent: list[bytes] = []

        class Collect(DatagramProtocol):
            def datagramReceived(self, data: bytes, addr: Any) -> None:
                sent.append(data)

        junk = self.net.listenUDP(0, Collect())
        dcid = os.urandom(8)
        initial_v1 = bytes([0xC0]) + QuicProtocolVersion.VERSION_1.to_bytes(4, "big") + b"\x08" + dcid + b"\x08" + os.urandom(8)
        packets = [
            b"",
            os.urandom(7),
            bytes([0x40]) + os.urandom(40),  # short header, unknown connection
            initial_v1 + b"\x00" + b"\x44\xd0" + os.urandom(1300),  # Initial that does not decrypt
            bytes([0xC0]) + b"\x0a\x0a\x0a\x0a" + b"\x08" + dcid + b"\x08" + dcid + b"\x00\x44\xb0" + os.urandom(1200),  # unknown version
            initial_v1 + os.urandom(100),  # Initial too short to open a connection
        ] * 20
        before = len([r for r in self.srecords if "dropped" in r.text])
        for p in packets:
            junk.write(p, ("127.0.0.1", SERVER_PORT))
        self.net.run(0.5)
        self.assertEqual(server.dropped.total, len(packets))
        self.assertEqual(server.connections, 1)
        # The unknown version is answered with a version negotiation packet.
        self.assertTrue(any(d[1:5] == b"\x00\x00\x00\x00" for d in sent))
        self.net.run(2.5, step=0.01)
        lines = [r for r in self.srecords if "dropped" in r.text][before:]
        self.assertGreaterEqual(len(lines), 1)
        self.assertLessEqual(len(lines), 2)
        # The real client still works.
        s, c = self._take(server, client)
        got: list[bytes] = []
        s.set_sink(got.append)
        c.transport.write(b"still fine")
        self.net.run(0.1)
        self.assertEqual(b"".join(got), b"still fine")

    # -- TLS 2 ---------------------------------------------------------------------------------------------------
    def test_tls2_verifies_the_server_name(self) -> None:
        crt, key, der = make_cert_files(new_dir(self), names=("tunnel.example",))
        tls = server_tls(2, crt, key, logger=self.slog)
        self.patch(os, "environ", {**os.environ, "SSL_CERT_FILE": crt})
        server = self._server(tls=tls)
        client = self._client(min_cap=2, tls_code=2, server_name="tunnel.example")
        self._ready(server, client, 2)
        # A wrong name fails the handshake: no members, a clear error.
        server.close()
        client.close()
        server2 = self._server(tls=tls)
        bad = self._client(min_cap=2, tls_code=2, server_name="other.example")
        self.net.run(2.0)
        self.assertEqual(bad.active, 0)
        self.assertEqual(server2.active, 0)
        self.assertIn("QUIC dial", bad.last_error)



class QuicSendingTests(QuicPairCase):
    """Pacing bursts, datagram size probing, timer re-arming and prompt ACKs."""

    # -- pacer ----------------------------------------------------------------------------------------
    @staticmethod
    def _burst(pacer: _Pacer, now: float) -> int:
        """Packets the pacer lets go at one instant from a full bucket."""
        pacer.update_bucket(now=now)
        sent = 0
        while pacer.next_send_time(now=now) is None and sent < 10_000:
            pacer.update_after_send(now=now)
            sent += 1
        return sent

    def test_pacer_burst_is_two_milliseconds_of_sending(self) -> None:
        pacer = _Pacer(max_datagram_size=1200)
        # Window / RTT = 15 MiB/s, times the gain: one packet per 2**-14 s.
        pacer.update_rate(congestion_window=245_760, smoothed_rtt=2**-6)
        self.assertEqual(pacer.packet_time, 2**-14)
        self.assertEqual(pacer.bucket_max, PACING_BURST)
        burst = self._burst(pacer, now=10.0)
        self.assertEqual(burst, math.ceil(PACING_BURST / 2**-14))  # 33, where aioquic allows 16
        # Once the bucket is empty, the next packet waits one packet time.
        self.assertEqual(pacer.next_send_time(now=10.0), 10.0 + 2**-14)

    def test_pacer_burst_is_at_least_ten_packets(self) -> None:
        pacer = _Pacer(max_datagram_size=1200)
        # A slow path: one packet per 2**-10 s, 2 ms would be 2 packets.
        pacer.update_rate(congestion_window=122_880, smoothed_rtt=0.125)
        self.assertEqual(pacer.packet_time, 2**-10)
        self.assertEqual(pacer.bucket_max, 10 * 2**-10)
        self.assertEqual(self._burst(pacer, now=10.0), 10)

    def test_pacer_rate_drop_shrinks_a_full_bucket(self) -> None:
        pacer = _Pacer(max_datagram_size=1200)
        pacer.update_rate(congestion_window=122_880, smoothed_rtt=0.125)
        pacer.update_bucket(now=10.0)
        self.assertEqual(pacer.bucket_time, 10 * 2**-10)
        pacer.update_rate(congestion_window=245_760, smoothed_rtt=2**-6)  # faster: smaller bucket
        self.assertEqual(pacer.bucket_time, PACING_BURST)
        self.assertEqual(self._burst(pacer, now=10.0), 33)

    def test_connections_use_the_reactor_sized_pacer(self) -> None:
        server = self._server()
        client = self._client(min_cap=1)
        self._ready(server, client, 1)
        for pool in (server, client):
            self.assertIsInstance(self._link(pool).conn._loss._pacer, _Pacer)

    # -- datagram size -----------------------------------------------------------------------------------
    def _transfer(self, server: QuicServerPool, client: QuicClientPool, size: int, chunk: int) -> None:
        """Send ``size`` bytes in ``chunk``-byte writes client -> server; check them by sha256."""
        s, c = self._take(server, client)
        got: list[bytes] = []
        s.set_sink(got.append)
        payload = os.urandom(size)
        for i in range(0, size, chunk):
            c.transport.write(payload[i : i + chunk])  # type: ignore[union-attr]
        self.net.run_until(lambda: sum(map(len, got)) >= size, 30.0, "all bytes delivered")
        self.assertEqual(hashlib.sha256(b"".join(got)).digest(), hashlib.sha256(payload).digest())

    def _sizes(self, server: QuicServerPool, client: QuicClientPool) -> tuple[int, int]:
        return self._link(server).conn._max_datagram_size, self._link(client).conn._max_datagram_size

    def test_largest_probe_size_is_taken_when_the_path_carries_it(self) -> None:
        server = self._server()
        client = self._client(min_cap=2)
        self._ready(server, client, 2)
        self.net.run(0.1)
        self.assertEqual(self._sizes(server, client), (PROBE_SIZES[0], PROBE_SIZES[0]))
        self.assertEqual(self.net.largest, PROBE_SIZES[0])
        self.assertEqual(self._link(client).conn.whole_limit, PROBE_SIZES[0] - 64)
        # Bulk data now goes in full-size datagrams.
        before = self.net.datagrams
        self._transfer(server, client, 512 * 1024, 16 * 1024)
        self.assertLess(self.net.datagrams - before, 512 * 1024 // 1200)

    def test_lost_probes_step_down_to_a_size_the_path_carries(self) -> None:
        self.net.mtu = 1400  # larger datagrams vanish on the way
        server = self._server(keepalive=1.0)
        client = self._client(min_cap=2, keepalive=1.0)
        self._ready(server, client, 2)
        # Only ACKs of later packets declare a probe lost: keep some traffic going.
        self.net.run_until(lambda: self._sizes(server, client) == (1400, 1400), 30.0, "1400-byte datagrams",
                           step=0.01)
        self.assertGreater(self.net.too_large, 0)
        self._transfer(server, client, 256 * 1024, 1000)
        self.assertEqual(self._sizes(server, client), (1400, 1400))
        self.assertEqual(self._link(client).conn.probe_sizes, None)

    def test_probes_refused_by_the_kernel_step_down_at_once(self) -> None:
        self.net.mtu = 1350
        self.net.refuse_large = True
        server = self._server()
        client = self._client(min_cap=2)
        self._ready(server, client, 2)
        self.net.run(0.1)
        self.assertEqual(self._sizes(server, client), (1350, 1350))
        self._transfer(server, client, 256 * 1024, 4096)

    def test_path_that_shrinks_takes_the_connection_back_to_1200(self) -> None:
        server = self._server()
        client = self._client(min_cap=2)
        self._ready(server, client, 2)
        self.net.run(0.1)
        self.assertEqual(self._sizes(server, client), (1452, 1452))
        # Writes that fit one 1452-byte packet are queued to be sent whole;
        # then the path only takes 1200 bytes and the kernel says so.
        self.net.mtu = 1200
        self.net.refuse_large = True
        self._transfer(server, client, 400 * 1350, 1350)
        self.assertEqual(self._sizes(server, client)[1], 1200)
        self.assertEqual(self._link(client).conn.probe_sizes, None)

    def test_peer_max_udp_payload_size_bounds_the_probes(self) -> None:
        server = self._server()
        client = self._client(min_cap=1)
        self._ready(server, client, 1)
        conn = self._link(client).conn
        conn.probe_sizes = list(PROBE_SIZES)
        # (as a restored ticket: the connection ID checks of a real handshake are skipped)
        conn._parse_transport_parameters(self._peer_params(max_udp_payload_size=1350), from_session_ticket=True)
        self.assertEqual(conn.probe_sizes, [1350, 1300, 1250])

    @staticmethod
    def _peer_params(**fields: Any) -> bytes:
        from aioquic._buffer import Buffer
        from aioquic.quic.packet import QuicTransportParameters, push_quic_transport_parameters

        buf = Buffer(capacity=512)
        push_quic_transport_parameters(buf, QuicTransportParameters(**fields))
        return buf.data

    # -- timer ---------------------------------------------------------------------------------------
    def test_timer_is_moved_earlier_never_later_and_never_replaced(self) -> None:
        server = self._server()
        client = self._client(min_cap=1)
        self._ready(server, client, 1)
        self.net.run(0.5)  # quiet: the next deadline is the idle timeout's
        link = self._link(client)
        call = link._timer
        self.assertIsNotNone(call)
        self.assertLessEqual(call.getTime(), link.conn.get_timer())
        now = self.net.seconds()
        at = call.getTime()
        link._arm_timer(at + 5.0, now)  # later: left alone
        self.assertIs(link._timer, call)
        self.assertEqual(call.getTime(), at)
        link._arm_timer(now + 0.0001, now)  # earlier: the same call, moved
        self.assertIs(link._timer, call)
        self.assertEqual(call.getTime(), now + 0.0001)
        # Firing before aioquic's deadline only sets the timer again for it.
        due = link.conn.get_timer()
        self.assertGreater(due, now + 0.001)
        sent = self.net.datagrams
        self.net.advance(0.0001)
        self.assertEqual(self.net.datagrams, sent)
        self.assertIsNotNone(link._timer)
        self.assertEqual(link._timer.getTime(), due)

    def test_timer_never_fires_after_the_connection_deadline(self) -> None:
        server = self._server()
        client = self._client(min_cap=4)
        self._ready(server, client, 4)
        links = [self._link(server), self._link(client)]
        s, c = self._take(server, client)
        s.set_sink(lambda data: None)
        for _ in range(200):
            c.transport.write(os.urandom(3000))  # type: ignore[union-attr]
            self.net.advance(0.0003)
            for link in links:
                due = link.conn.get_timer()
                if due is not None:
                    self.assertIsNotNone(link._timer)
                    self.assertLessEqual(link._timer.getTime(), due)

    # -- ACK after a batch -------------------------------------------------------------------------
    def test_batch_of_packets_is_acknowledged_without_the_ack_delay(self) -> None:
        server = self._server()
        client = self._client(min_cap=2)
        self._ready(server, client, 2)
        self.net.run(0.5)
        s, c = self._take(server, client)
        s.set_sink(lambda data: None)
        loss = self._link(client).conn._loss
        self.assertEqual(loss.bytes_in_flight, 0)
        c.transport.write(os.urandom(5000))  # type: ignore[union-attr]
        self.net.advance(0)  # the client sends its packets at once
        self.assertGreater(loss.bytes_in_flight, 0)
        # One way and back (2 x 0.5 ms): the server's ACK left with the batch,
        # not after its 1 ms ACK delay.
        self.net.advance(self.net.delay)
        self.net.advance(0)
        self.net.advance(self.net.delay)
        self.assertEqual(loss.bytes_in_flight, 0)

    # -- tally -----------------------------------------------------------------------------------------
    def test_refusals_after_close_are_counted_without_a_timer(self) -> None:
        server = self._server()
        server.close()
        before = len(self.net.getDelayedCalls())
        server.dropped.add("pool closed", ("127.0.0.1", 1))
        self.assertEqual(server.dropped.total, 1)
        self.assertEqual(len(self.net.getDelayedCalls()), before)



class DatagramRunTests(unittest.TestCase):
    """Runs of equal-sized datagrams handed to ``send_run`` together."""

    def _link(self) -> tuple[QuicLink, list[tuple[str, list[int], Any]]]:
        calls: list[tuple[str, list[int], Any]] = []
        conn = _FlowConnection(configuration=client_configuration(1, "", 5.0), max_streams=8)
        link = QuicLink(
            Clock(),
            conn,
            peer_addr=("127.0.0.1", 1),
            host=IPv4Address("UDP", "127.0.0.1", 2),
            send=lambda d, a: calls.append(("one", [len(d)], a)),
            send_run=lambda ds, a: calls.append(("run", [len(d) for d in ds], a)),
            keepalive=5.0,
        )
        return link, calls

    def test_runs_end_at_a_larger_datagram_a_shorter_one_or_another_address(self) -> None:
        link, calls = self._link()
        a, b = ("127.0.0.1", 1), ("127.0.0.1", 2)
        sizes = [(1200, a), (1200, a), (1200, a), (400, a), (1200, a), (1452, a), (1200, a), (1200, b), (1200, b)]
        link._write_all([(bytes(n), addr) for n, addr in sizes])
        self.assertEqual(calls, [
            ("run", [1200, 1200, 1200, 400], a),
            ("one", [1200], a),
            ("run", [1452, 1200], a),
            ("run", [1200, 1200], b),
        ])

    def test_runs_are_bounded_in_segments(self) -> None:
        link, calls = self._link()
        addr = ("127.0.0.1", 1)
        link._write_all([(bytes(1200), addr)] * (GSO_SEGMENTS + 3))
        self.assertEqual([(kind, len(sizes)) for kind, sizes, _a in calls], [("run", GSO_SEGMENTS), ("run", 3)])
        calls.clear()
        link._write_all([(bytes(9000), addr)] * 9)  # 65,000 bytes at most per call
        self.assertEqual([len(sizes) for _k, sizes, _a in calls], [7, 2])


class ProbeTests(unittest.TestCase):
    def test_probe_reports_a_busy_udp_port(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.error import CannotListenError

        port = free_port()
        probe_server_port(1, reactor, "127.0.0.1", port)  # free: no error
        # The probe released the port at once.
        busy = reactor.listenUDP(port, DatagramProtocol(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(busy.stopListening)
        self.assertRaises(CannotListenError, probe_server_port, 1, reactor, "127.0.0.1", port)


_ = RelayProtocol
