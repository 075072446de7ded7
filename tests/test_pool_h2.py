"""Type-3 (HTTP/2) pool, with both ends in memory: real TLS 1.3 and real HTTP/2 frames
moved by ``iosim`` pumps, every timer on an injected :class:`Clock`.

Besides our own server and client, small scripted HTTP/2 peers built on h2
stand in for Go's: a server that never ends a response and never frees a
stream it answered (x/net's handler slots), a client that checks what our
server answers, and clients that send what a NodePass peer never sends.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial import unittest
from zope.interface import implementer

from nodepass.log import Level
from nodepass.pool.base import CONTROL_ID, ID_READ_TIMEOUT, PoolConnection
from nodepass.pool.h2 import (
    CLIENT_STREAM_WINDOW,
    SERVER_STREAM_WINDOW,
    H2ClientPool,
    H2ServerPool,
    request_headers,
)
from nodepass.relay import RelayProtocol
from nodepass.relay.tls import TLSFactory
from nodepass.tls import (
    ServerTLS,
    _load_pair,
    client_connection_creator,
    client_ssl_context,
    fingerprint,
    fingerprint_of_x509,
    server_tls,
)
from tests.support import make_cert_files, recording_logger
from tests.test_pool_stream import _Producer

SERVER_ADDR = IPv4Address("TCP", "127.0.0.1", 10101)
KEEPALIVE = 5.0


class Wire(iosim.FakeTransport):
    """An in-memory TCP connection end; ``black_hole`` drops everything it would send."""

    black_hole = False

    def write(self, data: bytes) -> None:
        if not self.black_hole:
            super().write(data)


@implementer(IHandshakeListener)
class RawH2(Protocol):
    """A scripted HTTP/2 peer over TLS: records events, hands them to ``on_event``."""

    def __init__(self, client_side: bool, settings: dict[Any, int] | None = None,
                 on_event: Callable[[RawH2, Any], None] | None = None) -> None:
        self.client_side = client_side
        self.settings = settings or {}
        self.on_event = on_event
        self.conn: h2.connection.H2Connection | None = None
        self.events: list[Any] = []
        self.lost = False
        self.handshake_done = False

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=self.client_side,
                                                                    header_encoding=None))
        conn.initiate_connection()
        if self.settings:
            conn.update_settings(self.settings)
        self.conn = conn
        self.flush()

    def dataReceived(self, data: bytes) -> None:
        assert self.conn is not None
        for ev in self.conn.receive_data(data):
            self.events.append(ev)
            if isinstance(ev, h2.events.DataReceived) and ev.flow_controlled_length:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if self.on_event is not None:
                self.on_event(self, ev)
        self.flush()

    def flush(self) -> None:
        if self.conn is not None and self.transport is not None:
            out = self.conn.data_to_send()
            if out:
                self.transport.write(out)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def request(self, headers: list[tuple[str, str]], body: bytes = b"\x00", end: bool = False) -> int:
        """Open a stream with ``headers`` and send ``body`` (client side)."""
        assert self.conn is not None
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers, end_stream=end and not body)
        if body:
            self.conn.send_data(sid, body, end_stream=end)
        self.flush()
        return sid

    def body(self, sid: int) -> bytes:
        return b"".join(e.data for e in self.of(h2.events.DataReceived) if e.stream_id == sid)

    def status(self, sid: int) -> bytes | None:
        for e in self.of(h2.events.ResponseReceived):
            if e.stream_id == sid:
                return dict(e.headers)[b":status"]  # type: ignore[no-any-return]
        return None


class GoLikeServer:
    """Answers ``POST /stream`` + 0x00 with 200 and a random ID the way nph2 does: the
    response never ends, and only the first ``slots`` streams of a connection are ever
    answered (x/net keeps the handler of every answered stream)."""

    def __init__(self, max_streams: int, slots: int | None = None) -> None:
        self.max_streams = max_streams
        self.slots = max_streams if slots is None else slots
        self.answered: dict[RawH2, int] = {}
        self.headers: list[list[tuple[bytes, bytes]]] = []
        self.first_bytes: list[bytes] = []
        self.ids: list[str] = []
        self.peers: list[RawH2] = []

    def protocol(self) -> RawH2:
        p = RawH2(False, {SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams,
                          SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20}, self.event)
        self.peers.append(p)
        return p

    def event(self, p: RawH2, ev: Any) -> None:
        assert p.conn is not None
        if isinstance(ev, h2.events.RequestReceived):
            self.headers.append(list(ev.headers))
        elif isinstance(ev, h2.events.DataReceived) and ev.data:
            started = {e.stream_id for e in p.of(h2.events.DataReceived) if e.data and e is not ev}
            if ev.stream_id in started:
                return
            self.first_bytes.append(ev.data[:1])
            if self.answered.get(p, 0) >= self.slots:
                return
            self.answered[p] = self.answered.get(p, 0) + 1
            raw = os.urandom(4) if self.ids else b"\x00\x00\x00\x00"  # the first ID names the control member
            self.ids.append(raw.hex())
            p.conn.send_headers(ev.stream_id, [(":status", "200"), ("content-type", "application/octet-stream")])
            p.conn.send_data(ev.stream_id, raw)


class Net:
    """Connects client factories to server factories with iosim pumps on one Clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.pumps: list[iosim.IOPump] = []
        self.wires: list[tuple[Wire, Wire]] = []
        self._port = 40000

    def connect(self, client_factory: Any, server_factory: Any, client_host: str = "127.0.0.1") -> tuple[Any, Any]:
        self._port += 1
        caddr = IPv4Address("TCP", client_host, self._port)
        cp = client_factory.buildProtocol(SERVER_ADDR)
        sp = server_factory.buildProtocol(caddr)
        ct = Wire(cp, False, hostAddress=caddr, peerAddress=SERVER_ADDR)
        st = Wire(sp, True, hostAddress=SERVER_ADDR, peerAddress=caddr)
        self.pumps.append(iosim.connect(sp, st, cp, ct, greet=False, clock=self.clock))
        self.wires.append((ct, st))
        return cp, sp

    def flush(self) -> None:
        for _ in range(50):
            moved = False
            for pump in list(self.pumps):
                if pump.flush():
                    moved = True
            self.clock.advance(0)
            if not moved:
                return

    def advance(self, seconds: float, step: float = 0.5) -> None:
        """Let ``seconds`` pass in steps, moving bytes after each step."""
        left = seconds
        while left > 1e-9:
            d = min(step, left)
            self.clock.advance(d)
            left -= d
            self.flush()


def raw_server_factory(clock: Clock, make: Callable[[], Protocol]) -> TLSMemoryBIOFactory:
    tls = server_tls(1, "", "", pool_type=3, logger=recording_logger()[0])
    assert tls is not None
    return TLSMemoryBIOFactory(tls.with_alpn(b"h2"), False, Factory.forProtocol(make), clock=clock)


def raw_client_factory(clock: Clock, make: Callable[[], Protocol], alpn: tuple[bytes, ...] = (b"h2",)) -> Any:
    creator = client_connection_creator(1, "", alpn=alpn)
    return TLSMemoryBIOFactory(creator, True, Factory.forProtocol(make), clock=clock)


class Case(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.net = Net(self.clock)
        self.logger, self.records = recording_logger()

    def make_server(self, max_cap: int = 64, client_ip: str = "127.0.0.1", strict: bool = False) -> H2ServerPool:
        tls = server_tls(1, "", "", pool_type=3, logger=self.logger)
        pool = H2ServerPool(self.clock, self.logger, max_cap=max_cap, client_ip=client_ip, tls=tls,
                            keepalive=KEEPALIVE, strict=strict, host="127.0.0.1", port=SERVER_ADDR.port)
        pool.start()
        self.addCleanup(pool.close)
        return pool

    def make_client(self, server_factory: Callable[[], Any], min_cap: int = 4, max_cap: int = 64,
                    interval: float = 0.5) -> H2ClientPool:
        def connect(factory: Any) -> None:
            self.net.connect(factory, server_factory())

        pool = H2ClientPool(self.clock, self.logger, min_cap=min_cap, max_cap=max_cap, min_interval=interval,
                            max_interval=interval, keepalive=KEEPALIVE, host="127.0.0.1", port=SERVER_ADDR.port,
                            dial_timeout=5.0, tls_code=1, server_name="", connect=connect)
        self.addCleanup(pool.close)
        return pool

    def pair(self, min_cap: int = 4, max_cap: int = 64, **server_kw: Any) -> tuple[H2ServerPool, H2ClientPool]:
        server = self.make_server(max_cap=max_cap, **server_kw)
        client = self.make_client(lambda: server.factory(), min_cap=min_cap, max_cap=max_cap)
        client.start()
        self.net.flush()
        return server, client

    def take(self, server: H2ServerPool, client: H2ClientPool, cid: str) -> tuple[PoolConnection, PoolConnection]:
        """Both ends of the member named ``cid``, taken out of the pools."""
        got: list[PoolConnection] = []
        client.outgoing_get(cid, 1.0).addCallback(got.append)
        server.outgoing_get(cid, 1.0).addCallback(got.append)
        self.assertEqual(len(got), 2, f"member {cid} not idle on both ends")
        return got[0], got[1]

    def some_member(self, server: H2ServerPool, client: H2ClientPool) -> tuple[PoolConnection, PoolConnection]:
        cid = next(c for c in client._idle if c != CONTROL_ID)
        return self.take(server, client, cid)

    def warnings(self) -> list[str]:
        return [r.text for r in self.records if r.level == Level.WARN]


def sink(conn: RelayProtocol) -> list[bytes]:
    got: list[bytes] = []
    conn.set_sink(got.append)
    return got


class IdExchangeTests(Case):
    def test_members_named_alike_on_both_ends(self) -> None:
        server, client = self.pair(min_cap=6)
        self.assertEqual(client.active, 6)
        self.assertEqual(list(client._idle), list(server._idle))
        self.assertEqual(next(iter(server._idle)), CONTROL_ID)
        self.assertEqual(client.dialed, 1)
        self.assertEqual(server.connection_count(), 1)
        client_end, server_end = self.some_member(server, client)
        got = sink(server_end)
        back = sink(client_end)
        client_end.transport.write(b"ping")  # type: ignore[union-attr]
        server_end.transport.write(b"pong")  # type: ignore[union-attr]
        self.net.flush()
        self.assertEqual((got, back), ([b"ping"], [b"pong"]))

    def test_request_as_go_sends_it_then_one_zero_byte(self) -> None:
        go = GoLikeServer(max_streams=16)
        client = self.make_client(lambda: raw_server_factory(self.clock, go.protocol), min_cap=3)
        client.start()
        self.net.flush()
        expected = [(k.encode(), v.encode()) for k, v in request_headers("127.0.0.1")]
        self.assertEqual(go.headers, [expected] * 3)
        self.assertEqual(go.first_bytes, [b"\x00"] * 3)
        self.assertEqual(sorted(client._idle), sorted(go.ids))

    def test_our_server_answers_200_then_the_id_at_once(self) -> None:
        server = self.make_server()
        go_client = RawH2(True)
        self.net.connect(raw_client_factory(self.clock, lambda: go_client), server.factory())
        self.net.flush()
        settings = go_client.conn.remote_settings  # type: ignore[union-attr]
        self.assertEqual(settings.max_concurrent_streams, 64)
        self.assertEqual(settings.initial_window_size, SERVER_STREAM_WINDOW)
        self.assertEqual(settings.max_frame_size, 1 << 20)
        sid = go_client.request(request_headers("none"))
        self.net.flush()
        self.assertEqual(go_client.status(sid), b"200")
        self.assertEqual(go_client.body(sid), b"\x00\x00\x00\x00")
        self.assertTrue(server.has(CONTROL_ID))
        # The response stays open: it is the member's server-to-client pipe.
        self.assertEqual(go_client.of(h2.events.StreamEnded), [])

    def test_bytes_after_the_handshake_byte_belong_to_the_member(self) -> None:
        server = self.make_server()
        go_client = RawH2(True)
        self.net.connect(raw_client_factory(self.clock, lambda: go_client), server.factory())
        self.net.flush()
        sid = go_client.request(request_headers("none"), body=b"\x00early")
        self.net.flush()
        conn = server._idle[CONTROL_ID]
        self.assertEqual(conn.buffered(), b"early")
        self.assertEqual(go_client.body(sid), b"\x00\x00\x00\x00")


class StreamLimitTests(Case):
    def test_more_than_100_members_on_one_connection(self) -> None:
        server, client = self.pair(min_cap=250, max_cap=300)
        self.assertEqual(client.active, 250)
        self.assertEqual(server.active, 250)
        self.assertEqual(client.dialed, 1)
        self.assertEqual(server.connection_count(), 1)
        (proto,) = client._connections
        self.assertEqual(proto.limit, 300)
        self.assertEqual(proto.opened, 250)

    def test_writes_keep_their_boundaries(self) -> None:
        server, client = self.pair()
        c, s = self.some_member(server, client)
        got = sink(s)
        for chunk in (b"a" * 10, b"b" * 1400, b"c"):
            c.transport.write(chunk)  # type: ignore[union-attr]
        self.net.flush()
        self.assertEqual(got, [b"a" * 10, b"b" * 1400, b"c"])


class FlowControlTests(Case):
    def check_backpressure(self, writer: PoolConnection, reader: PoolConnection, window: int) -> None:
        got = sink(reader)
        reader.transport.pauseProducing()  # type: ignore[union-attr]
        producer = _Producer()
        writer.transport.registerProducer(producer, True)  # type: ignore[union-attr]
        total = window + 3 * (1 << 20)
        block = os.urandom(64 * 1024)
        for _ in range(total // len(block)):
            writer.transport.write(block)  # type: ignore[union-attr]
        self.net.flush()
        # The peer may send one window's worth; the rest waits here and the
        # writer's producer (the relay's other side) is paused.
        self.assertEqual(got, [])
        held = sum(len(b) for b in reader.transport._inbox)  # type: ignore[union-attr]
        self.assertLessEqual(held, window)
        self.assertGreater(held, window // 2)
        self.assertEqual(writer.transport._buffered(), total - held)  # type: ignore[union-attr]
        self.assertEqual(producer.events, ["pause"])
        reader.transport.resumeProducing()  # type: ignore[union-attr]
        self.net.flush()
        # Credit came back as the bytes were taken: everything arrived, in order.
        self.assertEqual(b"".join(got), block * (total // len(block)))
        self.assertEqual(writer.transport._buffered(), 0)  # type: ignore[union-attr]
        self.assertEqual(producer.events, ["pause", "resume"])
        writer.transport.unregisterProducer()  # type: ignore[union-attr]

    def test_server_to_client(self) -> None:
        server, client = self.pair()
        c, s = self.some_member(server, client)
        self.check_backpressure(s, c, CLIENT_STREAM_WINDOW)

    def test_client_to_server(self) -> None:
        server, client = self.pair()
        c, s = self.some_member(server, client)
        self.check_backpressure(c, s, SERVER_STREAM_WINDOW)

    def test_a_stalled_member_does_not_stall_the_others(self) -> None:
        server, client = self.pair()
        (c1, s1), (c2, s2) = self.some_member(server, client), self.some_member(server, client)
        sink(s1)
        s1.transport.pauseProducing()  # type: ignore[union-attr]
        c1.transport.write(os.urandom(3 << 20))  # type: ignore[union-attr]
        self.net.flush()
        got = sink(s2)
        payload = os.urandom(3 << 20)
        c2.transport.write(payload)  # type: ignore[union-attr]
        self.net.flush()
        self.assertEqual(b"".join(got), payload)

    def test_socket_back_pressure_holds_bytes_in_the_member_queue(self) -> None:
        server, client = self.pair()
        c, s = self.some_member(server, client)
        (proto,) = client._connections
        proto.pauseProducing()  # what the TLS transport does when the socket is full
        c.transport.write(b"x" * 1000)  # type: ignore[union-attr]
        self.assertEqual(c.transport._buffered(), 1000)  # type: ignore[union-attr]
        got = sink(s)
        self.net.flush()
        self.assertEqual(got, [])
        proto.resumeProducing()
        self.net.flush()
        self.assertEqual(got, [b"x" * 1000])


class CloseTests(Case):
    def test_server_close_ends_the_stream_and_the_client_follows(self) -> None:
        server, client = self.pair()
        c, s = self.some_member(server, client)
        got = sink(c)
        s.transport.write(b"last words")  # type: ignore[union-attr]
        s.close()
        self.net.flush()
        self.assertEqual(got, [b"last words"])
        self.assertTrue(s.lost and c.lost)  # the client saw the end and closed in turn
        self.assertEqual(s.lost_reason, "EOF")
        self.assertEqual(c.lost_reason, "EOF")
        for pool in (server, client):
            (proto,) = pool._connections
            self.assertNotIn(c.transport, proto.streams.values())
            self.assertEqual(len(proto.streams), pool.active)

    def test_client_close_is_end_stream_then_cancel_and_loses_no_bytes(self) -> None:
        server, client = self.pair()
        c, s = self.some_member(server, client)
        got = sink(s)
        s.transport.pauseProducing()  # a slow target on the server side
        c.transport.write(b"upload")  # type: ignore[union-attr]
        c.close()
        self.net.flush()
        self.assertTrue(c.lost)
        self.assertFalse(s.lost)
        s.transport.resumeProducing()  # type: ignore[union-attr]
        self.net.flush()
        self.assertEqual(got, [b"upload"])
        self.assertTrue(s.lost)
        self.assertEqual(s.lost_reason, "EOF")
        (sproto,) = server._connections
        self.assertEqual(len(sproto.streams), server.active)

    def test_client_close_sequence_on_the_wire(self) -> None:
        go = GoLikeServer(max_streams=16)
        client = self.make_client(lambda: raw_server_factory(self.clock, go.protocol), min_cap=2)
        client.start()
        self.net.flush()
        cid = next(iter(client._idle))
        got: list[PoolConnection] = []
        client.outgoing_get(cid, 1.0).addCallback(got.append)
        (member,) = got
        sid = member.transport.stream_id  # type: ignore[union-attr]
        member.transport.write(b"bye")  # type: ignore[union-attr]
        member.close()
        self.net.flush()
        # A Go server never ends its response: the client does not wait for it.
        self.assertTrue(member.lost)
        (peer,) = go.peers
        kinds = [type(e).__name__ for e in peer.events if getattr(e, "stream_id", None) == sid]
        self.assertEqual(kinds[-3:], ["DataReceived", "StreamEnded", "StreamReset"])
        reset = peer.of(h2.events.StreamReset)[-1]
        self.assertEqual(reset.error_code, ErrorCodes.CANCEL)
        self.assertEqual(peer.body(sid), b"\x00bye")
        (proto,) = client._connections
        self.assertNotIn(sid, proto.streams)

    def test_abort_resets(self) -> None:
        server, client = self.pair()
        c, s = self.some_member(server, client)
        sink(s)
        c.abort()
        self.net.flush()
        self.assertTrue(c.lost and s.lost)


class KeepaliveTests(Case):
    def test_pings_answered_keep_the_connection(self) -> None:
        server, client = self.pair()
        (proto,) = client._connections
        self.net.advance(KEEPALIVE * 5)
        self.assertFalse(proto.lost)
        self.assertEqual(proto._unacked, 0)

    def test_late_answers_on_a_busy_connection_are_not_missed(self) -> None:
        server, client = self.pair()
        (proto,) = client._connections
        ct, st = self.net.wires[0]
        st.black_hole = True  # no PING answer comes back...
        for _ in range(6):
            self.clock.advance(KEEPALIVE)
            proto.heard = True  # ...but other bytes keep arriving in every interval
        self.assertFalse(proto.lost)
        self.assertEqual(proto._unacked, 0)

    def test_three_missed_acks_close_and_the_pool_redials(self) -> None:
        server, client = self.pair(min_cap=3)
        (proto,) = client._connections
        members = list(client._idle.values())
        ct, st = self.net.wires[0]
        st.black_hole = True  # the server's answers no longer arrive
        self.net.advance(KEEPALIVE * 3.5)
        self.assertFalse(proto.lost)
        self.net.advance(KEEPALIVE)
        self.assertTrue(proto.lost)
        self.assertTrue(all(m.lost for m in members))
        self.assertTrue(any("PINGs unanswered" in w for w in self.warnings()))
        self.net.advance(2.0)
        self.assertEqual(client.dialed, 2)
        self.assertGreaterEqual(client.active, 3)


class RolloverTests(Case):
    def use_members(self, client: H2ClientPool, count: int) -> None:
        """Take ``count`` members one after the other, closing each (the refill loop replaces them)."""
        used = 0
        while used < count:
            ids = [c for c in client._idle if c != CONTROL_ID]
            if not ids:
                self.net.advance(0.5)
                continue
            got: list[PoolConnection] = []
            client.outgoing_get(ids[0], 1.0).addCallback(got.append)
            got[0].close()
            used += 1
            self.net.flush()
        self.net.advance(2.0)

    def test_new_connection_once_the_server_limit_is_reached(self) -> None:
        go = GoLikeServer(max_streams=8)
        client = self.make_client(lambda: raw_server_factory(self.clock, go.protocol), min_cap=4, max_cap=8)
        client.start()
        self.net.flush()
        self.use_members(client, 50)
        # Every stream ever opened was answered: none waited on a full connection.
        self.assertEqual(sum(go.answered.values()), len(go.first_bytes))
        self.assertTrue(all(n <= 8 for n in go.answered.values()))
        self.assertGreaterEqual(client.dialed, 7)
        self.assertGreaterEqual(client.active, 4)
        self.assertEqual(self.warnings(), [])
        # Exhausted connections without members were closed; the one with the
        # control member (the first) stays.
        self.assertLessEqual(len(client._connections), 3)
        self.assertIn(go.peers[0], [p for p in go.peers if not p.lost])

    def test_no_response_within_the_id_timeout_marks_the_connection_exhausted(self) -> None:
        go = GoLikeServer(max_streams=100, slots=3)
        client = self.make_client(lambda: raw_server_factory(self.clock, go.protocol), min_cap=5, max_cap=100)
        client.start()
        self.net.flush()
        self.assertEqual(client.active, 3)
        self.assertEqual(client.dialed, 1)
        self.net.advance(ID_READ_TIMEOUT + 1, step=5.0)
        self.assertTrue(any("gave no response" in w for w in self.warnings()))
        self.assertEqual(client.dialed, 2)
        self.assertEqual(client.active, 5)


class RefusalTests(Case):
    def raw_client(self, server: H2ServerPool, host: str = "127.0.0.1") -> RawH2:
        peer = RawH2(True)
        self.net.connect(raw_client_factory(self.clock, lambda: peer), server.factory(), client_host=host)
        self.net.flush()
        return peer

    def assert_refused(self, peer: RawH2, sid: int, status: bytes) -> None:
        self.assertEqual(peer.status(sid), status)
        self.assertEqual(peer.body(sid), b"")  # nothing a Go client could take for an ID
        ended = [e.stream_id for e in peer.of(h2.events.StreamEnded)]
        self.assertIn(sid, ended)
        resets = [e for e in peer.of(h2.events.StreamReset) if e.stream_id == sid]
        self.assertTrue(all(e.error_code == ErrorCodes.NO_ERROR for e in resets))

    def test_another_ip_gets_403(self) -> None:
        server = self.make_server(client_ip="127.0.0.1")
        peer = self.raw_client(server, host="127.0.0.2")
        sid = peer.request(request_headers("none"))
        self.net.flush()
        self.assert_refused(peer, sid, b"403")
        self.assertEqual(server.active, 0)
        self.assertEqual(server.refused["client"], 1)

    def test_wrong_path_or_method_gets_404(self) -> None:
        server = self.make_server()
        peer = self.raw_client(server)
        bad_path = [(k, "/" if k == ":path" else v) for k, v in request_headers("none")]
        bad_method = [(k, "GET" if k == ":method" else v) for k, v in request_headers("none")]
        sids = [peer.request(bad_path), peer.request(bad_method, body=b"", end=True)]
        self.net.flush()
        for sid in sids:
            self.assert_refused(peer, sid, b"404")
        self.assertEqual(server.refused["request"], 2)
        self.assertEqual(server.active, 0)
        # The connection still serves proper requests.
        sid = peer.request(request_headers("none"))
        self.net.flush()
        self.assertEqual(peer.body(sid), b"\x00\x00\x00\x00")

    def test_full_pool_gets_503_and_our_client_reports_it(self) -> None:
        server = self.make_server(max_cap=2)
        peer = self.raw_client(server)
        for _ in range(2):
            peer.request(request_headers("none"))
        self.net.flush()
        self.assertTrue(server.full())
        # Its MAX_CONCURRENT_STREAMS is max: the next member comes on another connection.
        other = self.raw_client(server)
        sid = other.request(request_headers("none"))
        self.net.flush()
        self.assert_refused(other, sid, b"503")
        client = self.make_client(lambda: server.factory(), min_cap=1, max_cap=2)
        client.start()
        self.net.flush()
        self.assertEqual(client.active, 0)
        self.assertIn("status 503", client.last_error)

    def test_refusals_logged_at_most_once_per_interval(self) -> None:
        server = self.make_server(client_ip="127.0.0.1")
        peer = self.raw_client(server, host="127.0.0.2")
        for _ in range(5):
            peer.request(request_headers("none"))
        self.net.flush()
        self.assertEqual(server.refused["client"], 5)
        self.assertEqual(len(self.warnings()), 1)
        self.net.advance(KEEPALIVE)
        peer.request(request_headers("none"))
        self.net.flush()
        self.assertEqual(len(self.warnings()), 2)
        self.assertIn("4 more", self.warnings()[1])

    def test_client_without_alpn_h2_is_closed(self) -> None:
        server = self.make_server()
        for alpn in ((), (b"http/1.1",)):
            peer = RawH2(True)
            self.net.connect(raw_client_factory(self.clock, lambda p=peer: p, alpn=alpn), server.factory())
            self.net.flush()
            self.assertTrue(peer.handshake_done)
            self.assertTrue(peer.lost)
        self.assertEqual(server.refused["alpn"], 2)
        self.assertEqual(server.connection_count(), 0)
        self.assertEqual(len([w for w in self.warnings() if "ALPN" in w]), 1)

    def test_our_client_reports_a_server_without_h2(self) -> None:
        tls = server_tls(1, "", "", pool_type=3, logger=self.logger)
        assert tls is not None
        plain = TLSMemoryBIOFactory(tls.with_alpn(b"http/1.1"), False, Factory.forProtocol(Protocol),
                                    clock=self.clock)
        client = self.make_client(lambda: plain, min_cap=2)
        client.start()
        self.net.flush()
        self.assertEqual(client.active, 0)
        self.assertIn("ALPN", client.last_error)

    def test_garbage_after_tls_closes_that_connection_only(self) -> None:
        server, client = self.pair(min_cap=2)

        class Garbage(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(64))  # type: ignore[union-attr]

        self.net.connect(raw_client_factory(self.clock, Garbage), server.factory())
        self.net.flush()
        self.assertEqual(server.refused["connection"], 1)
        self.assertEqual(server.connection_count(), 1)
        c, s = self.some_member(server, client)
        got = sink(s)
        c.transport.write(b"still fine")  # type: ignore[union-attr]
        self.net.flush()
        self.assertEqual(got, [b"still fine"])

    def test_frame_larger_than_allowed_closes_at_once(self) -> None:
        server = self.make_server()

        class Huge(Protocol):
            def connectionMade(self) -> None:
                # The preface, then a SETTINGS frame header announcing 16 MiB - 1.
                self.transport.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\x04\x00\x00\x00\x00\x00")  # type: ignore[union-attr]

        self.net.connect(raw_client_factory(self.clock, Huge), server.factory())
        self.net.flush()
        self.assertEqual(server.refused["connection"], 1)
        self.assertEqual(server.connection_count(), 0)

    def test_plain_tcp_client_counted_as_tls_failure(self) -> None:
        server = self.make_server()

        class Plain(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # type: ignore[union-attr]

        self.net.connect(Factory.forProtocol(Plain), server.factory())
        self.net.flush()
        self.assertEqual(server.refused["tls"], 1)
        self.assertEqual(server.connection_count(), 0)


class GoawayTests(Case):
    def test_server_pool_close_sends_goaway_and_client_redials_later(self) -> None:
        server, client = self.pair(min_cap=3)
        (sproto,) = server._connections
        server.close()
        self.net.flush()
        self.assertTrue(sproto.lost)
        self.assertEqual(client.active, 0)
        self.assertEqual(client.connection_count(), 0)

    def test_idle_server_connection_goes_away_and_client_copes(self) -> None:
        server = self.make_server()
        peer = RawH2(True)
        self.net.connect(raw_client_factory(self.clock, lambda: peer), server.factory())
        self.net.flush()
        self.net.advance(2 * KEEPALIVE + 1)
        self.assertTrue(peer.lost)
        self.assertEqual(len(peer.of(h2.events.ConnectionTerminated)), 1)

    def test_goaway_from_the_server_ends_its_members(self) -> None:
        go = GoLikeServer(max_streams=16)
        client = self.make_client(lambda: raw_server_factory(self.clock, go.protocol), min_cap=3)
        client.start()
        self.net.flush()
        members = list(client._idle.values())
        (peer,) = go.peers
        assert peer.conn is not None
        peer.conn.close_connection()
        peer.flush()
        self.net.flush()
        self.assertTrue(all(m.lost for m in members))
        self.net.advance(1.0)
        self.assertEqual(client.dialed, 2)
        self.assertGreaterEqual(client.active, 3)


def lean_client_factory(make: Callable[[], Protocol], alpn: tuple[bytes, ...]) -> TLSFactory:
    """A peer on the lean TLS layer offering ``alpn`` (no verification, no SNI)."""
    return TLSFactory(client_ssl_context(1, "", alpn=alpn), False, Factory.forProtocol(make))


class LeanTLSTests(Case):
    """The pool runs on the lean TLS layer (:mod:`nodepass.relay.tls`); these peers use it too,
    so the negotiated protocol and the handshake completion are the lean layer's on both ends."""

    def test_lean_peers_without_h2_are_refused(self) -> None:
        server = self.make_server()
        peers = []
        for alpn in ((), (b"http/1.1",), (b"http/1.1", b"h3")):
            peer = RawH2(True)
            peers.append(peer)
            self.net.connect(lean_client_factory(lambda p=peer: p, alpn), server.factory())
            self.net.flush()
            self.assertTrue(peer.handshake_done)
            self.assertIsNone(peer.transport.negotiatedProtocol)  # type: ignore[union-attr]
            self.assertTrue(peer.lost)
        self.assertEqual(server.refused["alpn"], 3)
        self.assertEqual(server.connection_count(), 0)
        self.assertEqual(len([w for w in self.warnings() if "ALPN" in w]), 1)

    def test_lean_peer_offering_h2_among_others_is_served(self) -> None:
        server = self.make_server()
        peer = RawH2(True)
        self.net.connect(lean_client_factory(lambda: peer, (b"http/1.1", b"h2")), server.factory())
        self.net.flush()
        self.assertEqual(peer.transport.negotiatedProtocol, b"h2")  # type: ignore[union-attr]
        sid = peer.request(request_headers("none"))
        self.net.flush()
        self.assertEqual(peer.status(sid), b"200")
        self.assertEqual(len(peer.body(sid)), 4)
        self.assertFalse(peer.lost)
        self.assertEqual(server.refused["alpn"], 0)

    def test_our_client_refuses_a_lean_server_without_h2(self) -> None:
        tls = server_tls(1, "", "", pool_type=3, logger=self.logger)
        assert tls is not None
        listener = Listener()
        other = TLSFactory(lambda: tls.ssl_context((b"http/1.1",)), True, Factory.forProtocol(lambda: listener))
        client = self.make_client(lambda: other, min_cap=2)
        client.start()
        self.net.flush()
        self.assertEqual(client.active, 0)
        self.assertIn("ALPN", client.last_error)
        self.assertTrue(listener.lost)
        self.assertEqual(client.connection_count(), 0)

    def test_handshake_completed_once_before_any_frame(self) -> None:
        server = self.make_server()
        seen: list[str] = []

        @implementer(IHandshakeListener)
        class Probe(RawH2):
            def handshakeCompleted(self) -> None:
                seen.append("handshake")
                super().handshakeCompleted()

            def dataReceived(self, data: bytes) -> None:
                seen.append("data")
                super().dataReceived(data)

        peer = Probe(True)
        self.net.connect(lean_client_factory(lambda: peer, (b"h2",)), server.factory())
        self.net.flush()
        self.assertEqual(seen.count("handshake"), 1)
        self.assertEqual(seen[0], "handshake")
        self.assertIn("data", seen)  # the server's SETTINGS


class Listener(Protocol):
    """Takes whatever arrives; notes when the connection is gone."""

    lost = False

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class Code2Tests(Case):
    """tls=2: the client verifies the chain (``SSL_CERT_FILE``) and the server name; the server
    re-reads its certificate files once the reload interval has passed."""

    def setUp(self) -> None:
        super().setUp()
        self.dir = tempfile.mkdtemp()
        old = os.environ.get("SSL_CERT_FILE")
        self.addCleanup(lambda: os.environ.__setitem__("SSL_CERT_FILE", old) if old is not None
                        else os.environ.pop("SSL_CERT_FILE", None))
        self.now = [1000.0]

    def file_server(self, reload_interval: float = 3600.0) -> tuple[H2ServerPool, str, bytes]:
        crt, key, der = make_cert_files(self.dir)
        cert, pkey, der = _load_pair(crt, key)
        tls = ServerTLS(2, cert, pkey, der, crt_file=crt, key_file=key, reload_interval=reload_interval,
                        clock=lambda: self.now[0], logger=self.logger)
        pool = H2ServerPool(self.clock, self.logger, max_cap=64, client_ip="127.0.0.1", tls=tls,
                            keepalive=KEEPALIVE, host="127.0.0.1", port=SERVER_ADDR.port)
        pool.start()
        self.addCleanup(pool.close)
        return pool, crt, der

    def code2_client(self, server: H2ServerPool, name: str, min_cap: int = 2) -> H2ClientPool:
        def connect(factory: Any) -> None:
            self.net.connect(factory, server.factory())

        pool = H2ClientPool(self.clock, self.logger, min_cap=min_cap, max_cap=64, min_interval=0.5,
                            max_interval=0.5, keepalive=KEEPALIVE, host="127.0.0.1", port=SERVER_ADDR.port,
                            dial_timeout=5.0, tls_code=2, server_name=name, connect=connect)
        self.addCleanup(pool.close)
        return pool

    def test_trusted_and_named_server_carries_members(self) -> None:
        server, crt, der = self.file_server()
        os.environ["SSL_CERT_FILE"] = crt
        client = self.code2_client(server, "localhost")
        client.start()
        self.net.flush()
        self.assertEqual(client.active, 2)
        c, s = self.some_member(server, client)
        self.assertEqual(fingerprint_of_x509(c.transport.getPeerCertificate()), fingerprint(der))  # type: ignore[union-attr]
        (cproto,) = client._connections
        self.assertEqual(cproto.transport.server_name, "localhost")  # type: ignore[union-attr]
        (sproto,) = server._connections
        self.assertEqual(sproto.transport.server_name, "localhost")  # type: ignore[union-attr]

    def test_other_name_refused(self) -> None:
        server, crt, _der = self.file_server()
        os.environ["SSL_CERT_FILE"] = crt
        client = self.code2_client(server, "elsewhere.example")
        client.start()
        self.net.flush()
        self.assertEqual(client.active, 0)
        self.assertIn("TLS", client.last_error)
        self.assertEqual(server.connection_count(), 0)
        self.assertGreaterEqual(server.refused["tls"], 1)

    def test_untrusted_refused(self) -> None:
        server, _crt, _der = self.file_server()
        other = os.path.join(self.dir, "other")
        os.makedirs(other)
        os.environ["SSL_CERT_FILE"] = make_cert_files(other)[0]
        client = self.code2_client(server, "localhost")
        client.start()
        self.net.flush()
        self.assertEqual(client.active, 0)
        self.assertIn("certificate verify failed", client.last_error)

    def test_reloaded_certificate_served_to_new_connections(self) -> None:
        server, crt, der1 = self.file_server(reload_interval=60.0)
        _crt, _key, der2 = make_cert_files(self.dir)  # new files in place
        peer1 = RawH2(True)
        self.net.connect(lean_client_factory(lambda: peer1, (b"h2",)), server.factory())
        self.net.flush()
        self.assertEqual(peer1.transport.getPeerCertificate(), der1)  # type: ignore[union-attr]
        self.now[0] += 61
        peer2 = RawH2(True)
        self.net.connect(lean_client_factory(lambda: peer2, (b"h2",)), server.factory())
        self.net.flush()
        self.assertEqual(peer2.transport.getPeerCertificate(), der2)  # type: ignore[union-attr]
        self.assertEqual(peer2.transport.negotiatedProtocol, b"h2")  # type: ignore[union-attr]
        self.assertFalse(peer1.lost)  # the older connection is not disturbed
        self.assertIn("TLS cert reloaded: " + crt, [r.text for r in self.records])


class FastPathTests(Case):
    """DATA frames of members bypass h2 on the receiving side: payloads pass on as they arrive
    (whole frames for a UDP reader), flow control is kept and enforced, credit goes back in batches."""

    def test_frame_spanning_reads_streams_on_and_arrives_whole_for_udp(self) -> None:
        server, client = self.pair()
        (c1, s1), (c2, s2) = self.some_member(server, client), self.some_member(server, client)
        s2.transport.bufferSize = 8192  # type: ignore[union-attr]  # what a UDP session sets
        got1, got2 = sink(s1), sink(s2)
        payload = os.urandom(600 * 1024)  # one DATA frame, larger than one TLS read
        c1.transport.write(payload)  # type: ignore[union-attr]
        c2.transport.write(payload)  # type: ignore[union-attr]
        self.net.flush()
        self.assertEqual(b"".join(got1), payload)
        self.assertGreater(len(got1), 1)  # passed on before the frame was complete
        self.assertEqual(got2, [payload])

    def member_of_raw_client(self, server: H2ServerPool) -> tuple[RawH2, int, PoolConnection]:
        peer = self.raw_client(server)
        sid = peer.request(request_headers("none"))
        self.net.flush()
        self.assertEqual(peer.status(sid), b"200")
        got: list[PoolConnection] = []
        server.outgoing_get(peer.body(sid).hex(), 1.0).addCallback(got.append)
        self.assertEqual(len(got), 1)
        return peer, sid, got[0]

    def raw_client(self, server: H2ServerPool) -> RawH2:
        peer = RawH2(True)
        self.net.connect(raw_client_factory(self.clock, lambda: peer), server.factory())
        self.net.flush()
        return peer

    def test_credit_goes_back_in_quarter_window_batches(self) -> None:
        server = self.make_server()
        peer, sid, member = self.member_of_raw_client(server)
        got = sink(member)
        conn = peer.conn
        assert conn is not None
        sent = 0
        block = os.urandom(16 * 1024)
        while sent < 3 * SERVER_STREAM_WINDOW:
            window = conn.local_flow_control_window(sid)
            self.assertGreater(window, 0, "the server stopped giving credit")
            n = min(window, len(block))
            conn.send_data(sid, block[:n])
            sent += n
            peer.flush()
            self.net.flush()
        self.assertEqual(len(b"".join(got)), sent)
        updates = [e.delta for e in peer.of(h2.events.WindowUpdated) if e.stream_id == sid]
        self.assertTrue(updates)
        self.assertTrue(all(d >= SERVER_STREAM_WINDOW // 4 for d in updates), updates)
        self.assertGreaterEqual(sum(updates), sent - SERVER_STREAM_WINDOW // 4 - 1)

    def test_peer_sending_far_past_its_window_is_cut_off(self) -> None:
        server = self.make_server()
        peer, sid, member = self.member_of_raw_client(server)
        sink(member)
        member.transport.pauseProducing()  # type: ignore[union-attr]
        frame = (16384).to_bytes(3, "big") + b"\x00\x00" + sid.to_bytes(4, "big") + os.urandom(16384)
        assert peer.transport is not None
        for _ in range(2 * SERVER_STREAM_WINDOW // 16384 + 2):
            peer.transport.write(frame)  # raw frames: h2 on this side would refuse to send them
        self.net.flush()
        self.assertTrue(peer.lost)
        goaways = peer.of(h2.events.ConnectionTerminated)
        self.assertEqual([e.error_code for e in goaways], [ErrorCodes.FLOW_CONTROL_ERROR])
        self.assertEqual(server.refused["connection"], 1)
        self.assertTrue(member.lost)
