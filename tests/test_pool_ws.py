"""WebSocket pool (type 2) with two in-memory ends and an injected clock.

A client pool and a server pool are joined by in-memory TCP wires
(:class:`Wire`) that the test pumps by hand, so the opening handshake, the
ID message, framing, back-pressure, the close handshake and every refusal
can be checked byte by byte without sockets or waiting.  Raw peers (built
with wsproto and h11 directly, not with the code under test) stand in for a
NodePass peer or a hostile client.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Pong, TextMessage
from wsproto.frame_protocol import FrameDecoder, Opcode
from wsproto.utilities import generate_accept_token

from nodepass.log import Level
from nodepass.pool.base import PoolConnection
from nodepass.pool.ws import (
    CLOSE_TIMEOUT,
    DIAL_BUDGET,
    MAX_MESSAGE,
    RECV_LIMIT,
    UPGRADE_TIMEOUT,
    WsClientPool,
    WsServerPool,
    member_ip_policy,
    ws_target,
)
from tests.support import recording_logger

KEY = base64.b64encode(b"0123456789abcdef").decode()


def upgrade_request(*, method: str = "GET", version: str = "HTTP/1.1", connection: str = "Upgrade",
                    upgrade: str = "websocket", ws_version: str | None = "13", keys: tuple[str, ...] = (KEY,),
                    host: str = "tunnel.example") -> bytes:
    """An upgrade request with the given parts (None/empty leaves a header out)."""
    lines = [f"{method} / {version}", f"Host: {host}"]
    if connection:
        lines.append(f"Connection: {connection}")
    if upgrade:
        lines.append(f"Upgrade: {upgrade}")
    if ws_version is not None:
        lines.append(f"Sec-WebSocket-Version: {ws_version}")
    lines += [f"Sec-WebSocket-Key: {k}" for k in keys]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Wire(StringTransport):
    """One end of an in-memory TCP connection; bytes move on :func:`pump`.

    Reading can be paused (bytes then wait here), the write side reports a
    full buffer to its registered producer when :meth:`fill` is called, and
    a close reaches both protocols once pending bytes are delivered.
    """

    def __init__(self, host: IPv4Address, peer: IPv4Address) -> None:
        super().__init__(hostAddress=host, peerAddress=peer)
        self.other: Wire | None = None
        self.protocol: Any = None
        self.reading_paused = False
        self.pause_calls: list[bool] = []
        self.aborted = False
        self.closed = False
        self.received = b""

    def pauseProducing(self) -> None:
        self.reading_paused = True
        self.pause_calls.append(True)

    def resumeProducing(self) -> None:
        self.reading_paused = False
        self.pause_calls.append(False)

    def stopProducing(self) -> None:
        self.loseConnection()

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True
        self.clear()

    def fill(self, full: bool) -> None:
        """Pretend the socket's send buffer filled up (or drained)."""
        if self.producer is not None:
            (self.producer.pauseProducing if full else self.producer.resumeProducing)()


_PORTS = iter(range(40000, 60000))


def wire_pair(server: Protocol, client: Protocol, client_ip: str = "127.0.0.1") -> tuple[Wire, Wire]:
    """Connect ``server`` and ``client``; returns (server wire, client wire)."""
    s_addr = IPv4Address("TCP", "127.0.0.1", 10101)
    c_addr = IPv4Address("TCP", client_ip, next(_PORTS))
    sw, cw = Wire(s_addr, c_addr), Wire(c_addr, s_addr)
    sw.other, cw.other = cw, sw
    sw.protocol, cw.protocol = server, client
    server.makeConnection(sw)
    client.makeConnection(cw)
    return sw, cw


def pump(*wires: Wire, clock: Clock | None = None) -> None:
    """Deliver bytes both ways (not to paused readers) and closes, until nothing moves."""
    for _ in range(10000):
        moved = False
        if clock is not None:
            clock.advance(0)
        for w in wires:
            other = w.other
            assert other is not None
            if other.closed:
                continue
            data = w.value()
            if data and not other.reading_paused:
                w.clear()
                other.received += data
                other.protocol.dataReceived(data)
                moved = True
        for w in wires:
            other = w.other
            assert other is not None
            if w.disconnecting and not w.closed and not w.value():
                w.closed = other.closed = True
                w.protocol.connectionLost(Failure(ConnectionAborted() if w.aborted else ConnectionDone()))
                other.protocol.connectionLost(Failure(ConnectionDone()))
                moved = True
        if not moved:
            return
    raise AssertionError("wires never went quiet")


class RawPeer(Protocol):
    """Collects what the other end writes."""

    def __init__(self) -> None:
        self.data = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


def frames(data: bytes, client: bool) -> list[tuple[Opcode, bytes, bool]]:
    """(opcode, payload, fin) of every whole frame in ``data`` (sent by a
    server when ``client`` is True, i.e. unmasked)."""
    decoder = FrameDecoder(client=client)
    decoder.receive_bytes(data)
    out = []
    while True:
        frame = decoder.process_buffer()
        if frame is None:
            return out
        out.append((frame.opcode, bytes(frame.payload) if not isinstance(frame.payload, str) else frame.payload.encode(),
                    frame.frame_finished and frame.message_finished))


class Pair:
    """A WebSocket server pool and client pool over in-memory wires."""

    def __init__(self, test: unittest.TestCase, *, max_cap: int = 8, min_cap: int = 1, client_ip: str = "127.0.0.1",
                 member_ip: str = "127.0.0.1", wsip: str = "auto", via: str = "", strict: bool = False) -> None:
        self.clock = Clock()
        self.logger, self.records = recording_logger()
        self.member_ip = member_ip
        self.server = WsServerPool(self.clock, self.logger, max_cap=max_cap, client_ip=client_ip, tls=None,
                                   keepalive=5.0, strict=strict, host="", port=10101, wsip=wsip, via=via)
        self.client = WsClientPool(self.clock, self.logger, min_cap=min_cap, max_cap=max_cap, min_interval=0.1,
                                   max_interval=1.0, keepalive=5.0, host="tunnel.example", port=10101,
                                   tls_code=0, connect=self._connect)
        self.wires: list[tuple[Wire, Wire]] = []
        test.addCleanup(self.close)

    def _connect(self, factory: Any) -> None:
        client = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 10101))
        server = self.server.factory().buildProtocol(IPv4Address("TCP", self.member_ip, 40000))
        self.wires.append(wire_pair(server, client, self.member_ip))

    def pump(self) -> None:
        pump(*[w for pair in self.wires for w in pair], clock=self.clock)

    def start(self) -> None:
        self.client.start()
        self.pump()

    def members(self) -> tuple[PoolConnection, PoolConnection]:
        """The idle control members (server side, client side), taken out of the pools."""
        s = self.server._take("00000000")
        c = self.client._take("00000000")
        assert s is not None and c is not None
        return s, c

    def close(self) -> None:
        self.client.close()
        self.server.close()
        self.pump()

    def texts(self, level: Level | None = None) -> list[str]:
        return [r.text for r in self.records if level is None or r.level == level]


class UpgradeAndIdTests(unittest.TestCase):
    def test_request_response_and_id_message_on_the_wire(self) -> None:
        pair = Pair(self)
        pair.start()
        self.assertEqual(pair.server.active, 1)
        self.assertEqual(pair.client.active, 1)
        self.assertTrue(pair.server.has("00000000") and pair.client.has("00000000"))
        sw, cw = pair.wires[0]
        head, _, _ = sw.received.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        self.assertEqual(lines[0], "GET / HTTP/1.1")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        self.assertEqual(headers["host"], "tunnel.example")
        self.assertEqual(headers["upgrade"], "websocket")
        self.assertEqual(headers["connection"], "Upgrade")
        self.assertEqual(headers["sec-websocket-version"], "13")
        self.assertEqual(len(base64.b64decode(headers["sec-websocket-key"])), 16)
        self.assertNotIn("sec-websocket-extensions", headers)
        self.assertNotIn("sec-websocket-protocol", headers)
        # The answer: 101 with exactly the three upgrade headers, then the ID
        # as one binary message of 4 bytes.
        rhead, _, rest = cw.received.partition(b"\r\n\r\n")
        rlines = rhead.decode().split("\r\n")
        self.assertEqual(rlines[0], "HTTP/1.1 101 Switching Protocols")
        rheaders = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in rlines[1:])}
        self.assertEqual(set(rheaders), {"upgrade", "connection", "sec-websocket-accept"})
        self.assertEqual(rheaders["sec-websocket-accept"],
                         generate_accept_token(headers["sec-websocket-key"].encode()).decode())
        self.assertEqual(frames(rest, client=True), [(Opcode.BINARY, b"\x00\x00\x00\x00", True)])

    def test_later_members_get_random_ids_and_match(self) -> None:
        pair = Pair(self, min_cap=3)
        pair.start()
        self.assertEqual(pair.client.active, 3)
        self.assertEqual(set(pair.client._idle), set(pair.server._idle))
        self.assertIn("00000000", pair.client._idle)

    def test_ipv6_host_header_is_bracketed_and_has_no_port(self) -> None:
        logger, _ = recording_logger()
        pool = WsClientPool(Clock(), logger, min_cap=1, max_cap=1, min_interval=0.1, max_interval=1.0,
                            keepalive=5.0, host="::1", port=10101, tls_code=0)
        self.assertEqual(pool.host_header, "[::1]")

    def test_scheme_and_certificate_check_per_tls_code(self) -> None:
        import ssl

        self.assertEqual(ws_target(0, "tunnel.example", 10101), ("ws", None, None))
        for code, port, verified in ((0, 443, True), (1, 10101, False), (2, 10101, True)):
            with self.subTest(code=code, port=port):
                scheme, ctx, name = ws_target(code, "tunnel.example", port)
                assert ctx is not None
                self.assertEqual((scheme, name), ("wss", "tunnel.example"))  # SNI = URL host
                self.assertEqual(ctx.verify_mode == ssl.CERT_REQUIRED, verified)
                self.assertEqual(ctx.check_hostname, verified)
                self.assertEqual(ctx.minimum_version, ssl.TLSVersion.TLSv1_3)

    def test_refused_when_full_with_503_pool_full(self) -> None:
        pair = Pair(self, max_cap=1, min_cap=1)
        pair.start()
        self.assertEqual(pair.server.active, 1)
        # A second dial while the server holds max idle members.
        pair.client._create()
        pair.pump()
        self.assertEqual(pair.server.refused["pool full"], 1)
        sw, cw = pair.wires[1]
        self.assertTrue(cw.received.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"))
        self.assertTrue(cw.received.endswith(b"\r\n\r\npool full\n"))
        self.assertIn("503 pool full", pair.client.last_error)
        self.assertTrue(cw.closed)
        self.assertEqual(pair.client.active, 1)

    def test_server_ignores_path_and_host(self) -> None:
        pair = Pair(self)
        server = pair.server.factory().buildProtocol(None)
        peer = RawPeer()
        sw, cw = wire_pair(server, peer)
        cw.write(upgrade_request(host="anything:8080").replace(b"GET / ", b"GET /some/path?q=1 "))
        pump(sw, cw, clock=pair.clock)
        self.assertTrue(peer.data.startswith(b"HTTP/1.1 101 "))
        self.assertEqual(pair.server.active, 1)

    def test_client_refuses_an_answer_with_an_extension(self) -> None:
        pair = Pair(self)
        failures: list[str] = []
        member = PoolConnection(pair.client, False)
        factory_holder: list[Any] = []
        pair.client.dialer.connect = factory_holder.append
        pair.client._open_member(member, failures.append)
        link = factory_holder[0].buildProtocol(None)
        raw = RawPeer()
        sw, cw = wire_pair(raw, link)
        pump(sw, cw, clock=pair.clock)
        key = [line.split(b": ")[1] for line in raw.data.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key")][0]
        sw.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Accept: " + generate_accept_token(key) + b"\r\n"
                 b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n")
        pump(sw, cw, clock=pair.clock)
        self.assertEqual(len(failures), 1)
        self.assertIn("extension", failures[0])
        self.assertTrue(cw.closed)

    def test_client_upgrade_budget(self) -> None:
        pair = Pair(self)
        failures: list[str] = []
        holder: list[Any] = []
        pair.client.dialer.connect = holder.append
        pair.client._open_member(PoolConnection(pair.client, False), failures.append)
        link = holder[0].buildProtocol(None)
        silent = RawPeer()
        sw, cw = wire_pair(silent, link)
        pump(sw, cw, clock=pair.clock)
        pair.clock.advance(DIAL_BUDGET - 1)
        self.assertEqual(failures, [])
        pair.clock.advance(2)
        pump(sw, cw, clock=pair.clock)
        self.assertEqual(len(failures), 1)
        self.assertIn("no answer", failures[0])
        self.assertTrue(cw.aborted)


class FramingTests(unittest.TestCase):
    def setUp(self) -> None:
        self.pair = Pair(self)
        self.pair.start()
        self.s, self.c = self.pair.members()
        self.s_got: list[bytes] = []
        self.c_got: list[bytes] = []
        self.s.set_sink(self.s_got.append)
        self.c.set_sink(self.c_got.append)

    def test_each_write_is_one_message(self) -> None:
        assert self.c.transport is not None and self.s.transport is not None
        sw, cw = self.pair.wires[0]
        for datagram in (b"one", b"", b"two" * 100, b"x"):
            self.c.transport.write(datagram)
        self.assertEqual([p for _op, p, _fin in frames(cw.value(), client=False)], [b"one", b"two" * 100, b"x"])
        self.pair.pump()  # all three messages travel in one TCP read ...
        self.assertEqual(self.s_got, [b"one" + b"two" * 100 + b"x"])  # ... and arrive as one read

    def test_messages_are_reads_once_a_reader_sets_buffer_size(self) -> None:
        # A UDP session sets bufferSize: from then on one message is one read.
        assert self.c.transport is not None and self.s.transport is not None
        self.s.transport.bufferSize = 2048  # type: ignore[attr-defined]
        for datagram in (b"one", b"", b"two" * 100, b"x"):
            self.c.transport.write(datagram)
        self.pair.pump()
        self.assertEqual(self.s_got, [b"one", b"two" * 100, b"x"])
        self.s.transport.write(b"back")
        self.pair.pump()
        self.assertEqual(self.c_got, [b"back"])

    def test_long_writes_become_messages_of_at_most_max_message(self) -> None:
        assert self.s.transport is not None and self.c.transport is not None
        sw, cw = self.pair.wires[0]
        cw.received = b""
        payload = os.urandom(2 * MAX_MESSAGE + 1000)
        self.s.transport.write(payload)
        self.pair.pump()
        sizes = [(op, len(p), fin) for op, p, fin in frames(cw.received, client=True)]
        self.assertEqual(sizes, [(Opcode.BINARY, MAX_MESSAGE, True), (Opcode.BINARY, MAX_MESSAGE, True),
                                 (Opcode.BINARY, 1000, True)])
        self.assertEqual(b"".join(self.c_got), payload)
        self.c.transport.bufferSize = 2048  # type: ignore[attr-defined]
        self.c_got.clear()
        self.s.transport.write(payload)
        self.pair.pump()
        self.assertEqual([len(x) for x in self.c_got], [MAX_MESSAGE, MAX_MESSAGE, 1000])
        self.assertEqual(b"".join(self.c_got), payload)

    def test_client_frames_are_masked_binary(self) -> None:
        assert self.c.transport is not None
        sw, cw = self.pair.wires[0]
        sw.received = b""
        self.c.transport.write(b"secret")
        self.pair.pump()
        self.assertEqual(sw.received[0], 0x82)  # FIN + binary
        self.assertTrue(sw.received[1] & 0x80)  # masked
        self.assertNotIn(b"secret", sw.received)
        self.assertEqual(frames(sw.received, client=False), [(Opcode.BINARY, b"secret", True)])

    def test_a_message_split_across_reads_and_frames(self) -> None:
        # A peer sending one message as two fragments, byte by byte: as a
        # byte stream every payload byte moves on at once ...
        sw, cw = self.pair.wires[0]
        peer = Connection(ConnectionType.SERVER)
        data = peer.send(Message(data=b"abc", message_finished=False)) + peer.send(Message(data=b"def"))
        for i in range(len(data)):
            cw.protocol.dataReceived(data[i:i + 1])
        self.assertEqual(self.c_got, [b"a", b"b", b"c", b"d", b"e", b"f"])
        # ... and once messages are reads, the message arrives whole.
        assert self.c.transport is not None
        self.c.transport.bufferSize = 2048  # type: ignore[attr-defined]
        self.c_got.clear()
        for i in range(len(data)):
            cw.protocol.dataReceived(data[i:i + 1])
        self.assertEqual(self.c_got, [b"abcdef"])

    def test_a_message_larger_than_the_receive_limit_comes_in_parts(self) -> None:
        sw, cw = self.pair.wires[0]
        assert self.c.transport is not None
        self.c.transport.bufferSize = 2048  # type: ignore[attr-defined]
        peer = Connection(ConnectionType.SERVER)
        payload = os.urandom(RECV_LIMIT + 100_000)
        data = peer.send(BytesMessage(data=payload))
        for i in range(0, len(data), 65536):
            cw.protocol.dataReceived(data[i:i + 65536])
        self.assertEqual(b"".join(self.c_got), payload)
        self.assertGreaterEqual(len(self.c_got[0]), RECV_LIMIT)
        self.assertEqual(len(self.c_got), 2)

    def test_ping_is_answered_and_no_ping_is_sent(self) -> None:
        sw, cw = self.pair.wires[0]
        peer = Connection(ConnectionType.SERVER)
        cw.received = b""
        sw.received = b""
        cw.protocol.dataReceived(peer.send(Ping(payload=b"hi")))
        self.pair.pump()
        self.assertEqual(frames(sw.received, client=False), [(Opcode.PONG, b"hi", True)])
        self.pair.clock.advance(600)
        self.pair.pump()
        self.assertEqual(cw.received, b"")  # nothing unsolicited, ever
        self.assertFalse(self.s.lost or self.c.lost)

    def test_text_message_is_refused_with_1003(self) -> None:
        sw, cw = self.pair.wires[0]
        cw.received = b""
        client_side = Connection(ConnectionType.CLIENT)
        sw.protocol.dataReceived(client_side.send(TextMessage(data="hello")))
        self.pair.clock.advance(0)
        self.assertTrue(self.s.lost)
        self.assertIn("text message", self.s.lost_reason)
        self.assertEqual(self.s_got, [])
        out = sw.value()
        (op, payload, _fin), = frames(out, client=True)
        self.assertEqual((op, payload[:2]), (Opcode.CLOSE, (1003).to_bytes(2, "big")))

    def test_framing_error_closes_with_1002(self) -> None:
        sw, cw = self.pair.wires[0]
        # An unmasked frame from a client is a protocol error.
        sw.protocol.dataReceived(b"\x82\x03abc")
        self.pair.clock.advance(0)
        self.assertTrue(self.s.lost)
        (op, payload, _fin), = frames(sw.value(), client=True)
        self.assertEqual((op, payload[:2]), (Opcode.CLOSE, (1002).to_bytes(2, "big")))
        self.assertTrue(sw.disconnecting)


class CloseTests(unittest.TestCase):
    def setUp(self) -> None:
        self.pair = Pair(self)
        self.pair.start()
        self.s, self.c = self.pair.members()

    def test_orderly_close_is_a_1000_handshake_and_eof(self) -> None:
        sw, cw = self.pair.wires[0]
        sw.received = cw.received = b""
        assert self.c.transport is not None
        self.c.transport.write(b"last words")
        got: list[bytes] = []
        self.s.set_sink(got.append)
        self.c.close()
        self.pair.pump()
        self.assertEqual(got, [b"last words"])
        self.assertTrue(self.s.lost and self.c.lost)
        self.assertEqual((self.s.lost_reason, self.c.lost_reason), ("EOF", "EOF"))
        sent = frames(sw.received, client=False)
        answered = frames(cw.received, client=True)
        self.assertEqual(sent[-1], (Opcode.CLOSE, (1000).to_bytes(2, "big"), True))
        self.assertEqual(answered, [(Opcode.CLOSE, (1000).to_bytes(2, "big"), True)])
        self.assertTrue(sw.closed and cw.closed)
        self.assertFalse(sw.aborted or cw.aborted)

    def test_peer_close_is_answered_at_once(self) -> None:
        sw, cw = self.pair.wires[0]
        cw.received = b""
        peer = Connection(ConnectionType.SERVER)
        cw.protocol.dataReceived(peer.send(CloseConnection(code=1000)))
        self.assertEqual(frames(cw.value(), client=False), [(Opcode.CLOSE, (1000).to_bytes(2, "big"), True)])
        self.pair.clock.advance(0)
        self.assertTrue(self.c.lost)
        self.assertEqual(self.c.lost_reason, "EOF")

    def test_unusual_close_code_is_an_error(self) -> None:
        sw, cw = self.pair.wires[0]
        peer = Connection(ConnectionType.SERVER)
        cw.protocol.dataReceived(peer.send(CloseConnection(code=1011, reason="boom")))
        self.pair.clock.advance(0)
        self.assertTrue(self.c.lost)
        self.assertIn("1011", self.c.lost_reason)

    def test_peer_that_never_answers_is_dropped_after_the_close_timeout(self) -> None:
        sw, cw = self.pair.wires[0]
        self.s.close()
        self.pair.clock.advance(0)
        self.assertTrue(self.s.lost)
        cw.reading_paused = True  # the client never reads our close frame
        self.pair.pump()
        self.assertFalse(sw.disconnecting)
        self.pair.clock.advance(CLOSE_TIMEOUT - 0.5)
        self.assertFalse(sw.disconnecting)
        self.pair.clock.advance(1)
        self.assertTrue(sw.aborted)

    def test_abort_drops_the_tcp_connection_without_close_frame(self) -> None:
        sw, cw = self.pair.wires[0]
        cw.received = b""
        self.s.abort()
        self.pair.pump()
        self.assertTrue(sw.aborted)
        self.assertEqual(cw.received, b"")
        self.assertTrue(self.c.lost)
        self.assertIn("without a close frame", self.c.lost_reason)

    def test_bytes_held_by_a_paused_member_survive_the_close(self) -> None:
        assert self.s.transport is not None
        stream: Any = self.c.transport
        got: list[bytes] = []

        def sink(data: bytes) -> None:
            got.append(data)
            if len(got) == 1:
                stream.pauseProducing()  # a slow consumer stops after the first message

        self.c.set_sink(sink)
        stream.bufferSize = 2048  # one read per message
        self.s.transport.write(b"one")
        self.s.transport.write(b"two")
        self.s.close()
        sw, cw = self.pair.wires[0]
        cw.protocol.dataReceived(sw.value())  # data and close frame in one read
        sw.clear()
        self.pair.pump()
        self.assertTrue(cw.closed)  # the close handshake finished, TCP is gone
        self.assertEqual(got, [b"one"])
        self.assertFalse(self.c.lost)
        stream.resumeProducing()
        self.pair.clock.advance(0)
        self.assertEqual(got, [b"one", b"two"])
        self.assertTrue(self.c.lost)
        self.assertEqual(self.c.lost_reason, "EOF")

    def test_half_close_sends_1000_and_still_reads_until_the_answer(self) -> None:
        assert self.c.transport is not None and self.s.transport is not None
        got: list[bytes] = []
        self.c.set_sink(got.append)
        sw, cw = self.pair.wires[0]
        # The server's data is in flight when our close goes out.
        self.s.transport.write(b"in flight")
        self.c.transport.loseWriteConnection()  # type: ignore[attr-defined]
        self.assertFalse(self.c.lost)
        self.pair.pump()
        self.assertEqual(got, [b"in flight"])
        self.pair.clock.advance(0)
        self.assertTrue(self.c.lost)


class BackPressureTests(unittest.TestCase):
    def setUp(self) -> None:
        self.pair = Pair(self)
        self.pair.start()
        self.s, self.c = self.pair.members()

    def test_full_socket_pauses_the_writer_until_it_drains(self) -> None:
        events: list[str] = []

        class Producer:
            def pauseProducing(self) -> None:
                events.append("pause")

            def resumeProducing(self) -> None:
                events.append("resume")

            def stopProducing(self) -> None:
                events.append("stop")

        sw, cw = self.pair.wires[0]
        stream: Any = self.s.transport
        stream.registerProducer(Producer(), True)
        sw.fill(True)
        self.s.transport.write(b"more")  # type: ignore[union-attr]
        self.assertEqual(events, ["pause"])
        sw.fill(False)
        self.assertEqual(events, ["pause", "resume"])

    def test_paused_member_stops_reading_its_socket(self) -> None:
        sw, cw = self.pair.wires[0]
        got: list[bytes] = []
        self.c.set_sink(got.append)
        stream: Any = self.c.transport
        stream.pauseProducing()
        self.assertEqual(cw.pause_calls[-1], True)
        self.s.transport.write(b"waits")  # type: ignore[union-attr]
        self.pair.pump()
        self.assertEqual(got, [])
        stream.resumeProducing()
        self.assertEqual(cw.pause_calls[-1], False)
        self.pair.pump()
        self.assertEqual(got, [b"waits"])


class UpgradeFormTests(unittest.TestCase):
    """Plain upgrade heads take the quick reader, any other valid one is read
    by h11; both come to the same decision."""

    def serve(self, pair: Pair, request: bytes, step: int = 0) -> bytes:
        server = pair.server.factory().buildProtocol(None)
        peer = RawPeer()
        sw, cw = wire_pair(server, peer)
        if step:
            for i in range(0, len(request), step):
                server.dataReceived(request[i:i + step])
        else:
            cw.write(request)
        pump(sw, cw, clock=pair.clock)
        return peer.data

    def test_valid_requests_in_any_form_are_accepted(self) -> None:
        plain = upgrade_request()
        forms = {
            "plain": plain,
            "lower-case names, spaces": plain.replace(b"Upgrade: websocket", b"upgrade:   WebSocket  ")
                                             .replace(b"Connection: Upgrade", b"connection:keep-alive, upgrade"),
            "bare LF": plain.replace(b"\r\n", b"\n"),
            "folded header": plain.replace(b"Host: tunnel.example\r\n", b"Host: tunnel.example\r\nX-Long: a\r\n b\r\n"),
            "empty body": plain.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"),
            "control chars in a value": plain.replace(b"Host: tunnel.example", b"Host: tunnel.example\r\nX: a\x01b"),
        }
        for name, request in forms.items():
            for step in (0, 1, 7):
                with self.subTest(form=name, step=step):
                    pair = Pair(self)
                    answer = self.serve(pair, request, step)
                    self.assertTrue(answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), answer[:60])
                    head, _, rest = answer.partition(b"\r\n\r\n")
                    self.assertIn(b"Sec-WebSocket-Accept: " + generate_accept_token(KEY.encode()), head)
                    self.assertEqual(frames(rest, client=True), [(Opcode.BINARY, b"\x00\x00\x00\x00", True)])
                    self.assertEqual(pair.server.active, 1)

    def test_quick_reader_and_h11_agree(self) -> None:
        import h11

        from nodepass.pool.wsupgrade import check_upgrade, parse_request

        requests = [request for request, _status, _words in RefusalTests.CASES[:10]] + [
            upgrade_request(),
            upgrade_request(connection="keep-alive, Upgrade"),
            upgrade_request(upgrade="WebSocket, h2c"),
            upgrade_request().replace(b"Host: tunnel.example\r\n", b""),
            upgrade_request().replace(b"Host: tunnel.example", b"Host: a\r\nHost: b"),
        ]
        for request in requests:
            with self.subTest(request=request[:50]):
                head = request[:request.index(b"\r\n\r\n")]
                quick = parse_request(head)
                http = h11.Connection(h11.SERVER)
                http.receive_data(request)
                try:
                    event = http.next_event()
                except h11.RemoteProtocolError:
                    self.assertIsNone(quick)  # h11 refuses: the quick reader must not accept
                    continue
                full = check_upgrade(event.method, event.http_version, list(event.headers))
                if quick is not None:
                    self.assertEqual(check_upgrade(b"GET", b"1.1", quick), full)
                elif event.method == b"GET" and event.http_version == b"1.1":
                    self.fail("a plain GET request the quick reader did not take")

    def test_nodepass_heads_take_the_quick_reader(self) -> None:
        # The heads a NodePass (Go) client and server send, byte for byte.
        from nodepass.pool.wsupgrade import accept_token, check_answer, check_upgrade, parse_request, parse_response

        key = b"+25Z4ru5OHIe+WmNB34LsA=="
        request = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: Go-http-client/1.1\r\nConnection: Upgrade\r\n"
                   b"Sec-Websocket-Key: " + key + b"\r\nSec-Websocket-Version: 13\r\nUpgrade: websocket\r\n"
                   b"Accept-Encoding: gzip")
        headers = parse_request(request)
        assert headers is not None
        self.assertIsNone(check_upgrade(b"GET", b"1.1", headers))
        answer = (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nSec-Websocket-Accept: "
                  + accept_token(key) + b"\r\nUpgrade: websocket\r\nDate: Tue, 01 Dec 2026 13:53:49 GMT")
        parsed = parse_response(answer)
        assert parsed is not None
        self.assertEqual(parsed[0], 101)
        self.assertIsNone(check_answer(parsed[1], accept_token(key)))

    def test_request_and_accept_value(self) -> None:
        import h11

        from nodepass.pool.wsupgrade import UpgradeRequest, accept_token, check_upgrade

        request, accept = UpgradeRequest("[::1]", b"agent/1").new()
        http = h11.Connection(h11.SERVER)
        http.receive_data(request)
        event = http.next_event()
        headers = list(event.headers)
        self.assertIsNone(check_upgrade(event.method, event.http_version, headers))
        self.assertIn((b"host", b"[::1]"), headers)
        self.assertIn((b"user-agent", b"agent/1"), headers)
        key = dict(headers)[b"sec-websocket-key"]
        self.assertEqual(accept, generate_accept_token(key))
        self.assertEqual(accept_token(key), accept)
        self.assertNotEqual(UpgradeRequest("x", b"a").new()[1], UpgradeRequest("x", b"a").new()[1])

    def client_link(self, pair: Pair) -> tuple[Any, RawPeer, Wire, Wire, list[str]]:
        failures: list[str] = []
        holder: list[Any] = []
        pair.client.dialer.connect = holder.append
        member = PoolConnection(pair.client, False)
        pair.client._open_member(member, failures.append)
        link = holder[0].buildProtocol(None)
        raw = RawPeer()
        sw, cw = wire_pair(raw, link)
        pump(sw, cw, clock=pair.clock)
        return link, raw, sw, cw, failures

    def answer(self, raw: RawPeer, form: bytes = b"\r\n", extra: bytes = b"", accept: bytes | None = None) -> bytes:
        key = [line.split(b": ")[1] for line in raw.data.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key")][0]
        lines = [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection: Upgrade",
                 b"Sec-WebSocket-Accept: " + (accept if accept is not None else generate_accept_token(key))]
        return form.join(lines) + form + extra + form

    def test_client_takes_a_101_in_any_form(self) -> None:
        for form, step in ((b"\r\n", 0), (b"\r\n", 1), (b"\n", 0), (b"\n", 3)):
            with self.subTest(form=form, step=step):
                pair = Pair(self)
                link, raw, sw, cw, failures = self.client_link(pair)
                data = self.answer(raw, form) + Connection(ConnectionType.SERVER).send(BytesMessage(data=b"\x01\x02\x03\x04"))
                for i in range(0, len(data), step or len(data)):
                    link.dataReceived(data[i:i + (step or len(data))])
                self.assertEqual(failures, [])
                self.assertEqual(link.member.id, "01020304")

    def test_client_refuses_a_bad_101(self) -> None:
        cases = [
            (dict(accept=b"d3Jvbmc="), "Sec-WebSocket-Accept"),
            (dict(extra=b"Sec-WebSocket-Protocol: chat\r\n"), "subprotocol"),
        ]
        for kwargs, words in cases:
            with self.subTest(words=words):
                pair = Pair(self)
                link, raw, sw, cw, failures = self.client_link(pair)
                sw.write(self.answer(raw, **kwargs))  # type: ignore[arg-type]
                pump(sw, cw, clock=pair.clock)
                self.assertEqual(len(failures), 1)
                self.assertIn(words, failures[0])
                self.assertTrue(cw.aborted)
        pair = Pair(self)
        link, raw, sw, cw, failures = self.client_link(pair)
        sw.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
        pump(sw, cw, clock=pair.clock)
        self.assertIn("Connection: Upgrade", failures[0])

    def test_client_reports_a_refusal_with_or_without_body(self) -> None:
        for answer, words in (
            (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 10\r\n\r\npool full\n", "503 pool full"),
            (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", "refused: 403"),
            (b"HTTP/1.1 502 Bad Gateway\r\n\r\nupstream gone", "502 upstream gone"),
            (b"garbage\r\n\r\n", "bad answer"),
        ):
            with self.subTest(answer=answer[:20]):
                pair = Pair(self)
                link, raw, sw, cw, failures = self.client_link(pair)
                sw.write(answer)
                sw.loseConnection()
                pump(sw, cw, clock=pair.clock)
                self.assertEqual(len(failures), 1, failures)
                self.assertIn(words, failures[0])


class RefusalTests(unittest.TestCase):
    CASES = [
        (upgrade_request(method="POST"), 405, b"needs GET"),
        (upgrade_request(version="HTTP/1.0"), 426, b"HTTP/1.1"),
        (upgrade_request(connection="keep-alive"), 426, b"Connection"),
        (upgrade_request(upgrade="h2c"), 426, b"Upgrade header"),
        (upgrade_request(ws_version="8"), 400, b"version"),
        (upgrade_request(ws_version=None), 400, b"version"),
        (upgrade_request(keys=()), 400, b"exactly one"),
        (upgrade_request(keys=(KEY, KEY)), 400, b"exactly one"),
        (upgrade_request(keys=(base64.b64encode(b"short").decode(),)), 400, b"16 bytes"),
        (upgrade_request(keys=("not base64!!",)), 400, b"16 bytes"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n", 400, b"not an HTTP"),
        (b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 400, b"Host"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 70000, 431, b""),
    ]

    def refuse(self, pair: Pair, request: bytes, client_ip: str = "127.0.0.1") -> bytes:
        server = pair.server.factory().buildProtocol(None)
        peer = RawPeer()
        sw, cw = wire_pair(server, peer, client_ip)
        cw.write(request)
        pump(sw, cw, clock=pair.clock)
        self.assertTrue(sw.closed, "the server closes a refused connection")
        return peer.data

    def test_bad_upgrades_get_clear_http_errors_and_are_counted(self) -> None:
        pair = Pair(self)
        for request, status, words in self.CASES:
            with self.subTest(request=request[:40]):
                answer = self.refuse(pair, request)
                self.assertTrue(answer.startswith(b"HTTP/1.1 %d " % status), answer[:80])
                self.assertIn(b"\r\nConnection: close\r\n", answer)
                self.assertIn(words, answer)
        counts = pair.server.refused
        self.assertEqual(counts["bad upgrade"] + counts["bad HTTP request"], len(self.CASES))
        self.assertEqual(pair.server.active, 0)

    def test_refusals_are_logged_once_per_interval(self) -> None:
        pair = Pair(self)
        for _ in range(50):
            self.refuse(pair, upgrade_request(method="PUT"))
        warns = [t for t in pair.texts(Level.WARN) if "refused" in t]
        self.assertEqual(len(warns), 1)
        self.assertIn("needs GET", warns[0])
        pair.clock.advance(5.0)
        warns = [t for t in pair.texts(Level.WARN) if "refused" in t]
        self.assertEqual(len(warns), 2)
        self.assertIn("refused 49 more connections", warns[1])
        self.assertIn("bad upgrade: 49", warns[1])
        pair.clock.advance(60)
        self.assertEqual(len([t for t in pair.texts(Level.WARN) if "refused" in t]), 2)

    def test_refusals_after_close_are_counted_not_logged(self) -> None:
        pair = Pair(self)
        server = pair.server.factory().buildProtocol(None)
        sw, cw = wire_pair(server, RawPeer())
        cw.write(b"GET / HT")
        pump(sw, cw, clock=pair.clock)
        self.refuse(pair, upgrade_request(method="PUT"))  # logs and starts the quiet interval
        pair.server.close()
        pump(sw, cw, clock=pair.clock)  # the aborted upgrade is counted after the close
        self.assertEqual(pair.server.refused["incomplete upgrade"], 1)
        self.assertFalse([c for c in pair.clock.getDelayedCalls() if "_summary" in repr(c.func)])
        self.assertEqual(len([t for t in pair.texts() if "refused" in t]), 1)

    def test_silent_connection_times_out(self) -> None:
        pair = Pair(self)
        server = pair.server.factory().buildProtocol(None)
        peer = RawPeer()
        sw, cw = wire_pair(server, peer)
        cw.write(b"GET / HTTP/1.1\r\n")  # and nothing more
        pump(sw, cw, clock=pair.clock)
        pair.clock.advance(UPGRADE_TIMEOUT - 1)
        self.assertFalse(sw.disconnecting)
        pair.clock.advance(2)
        pump(sw, cw, clock=pair.clock)
        self.assertTrue(peer.data.startswith(b"HTTP/1.1 408 "))
        self.assertEqual(pair.server.refused["upgrade timeout"], 1)
        self.assertEqual(pair.server._upgrading, set())

    def test_foreign_address_gets_403(self) -> None:
        pair = Pair(self, client_ip="127.0.0.1")
        answer = self.refuse(pair, upgrade_request(), client_ip="127.0.0.9")
        self.assertTrue(answer.startswith(b"HTTP/1.1 403 Forbidden\r\n"))
        self.assertEqual(pair.server.refused["foreign address"], 1)
        self.assertEqual(pair.server.active, 0)

    def test_any_address_with_wsip_any_or_behind_a_proxy(self) -> None:
        for wsip, via in (("any", ""), ("auto", "x-forwarded-for")):
            with self.subTest(wsip=wsip, via=via):
                pair = Pair(self, client_ip="127.0.0.1", member_ip="127.0.0.9", wsip=wsip, via=via)
                pair.start()
                self.assertEqual(pair.server.active, 1)
                self.assertTrue(any("any address" in t for t in pair.texts(Level.INFO)))

    def test_same_refuses_even_behind_a_proxy(self) -> None:
        pair = Pair(self, client_ip="127.0.0.1", member_ip="127.0.0.9", wsip="same", via="via")
        pair.start()
        self.assertEqual(pair.server.active, 0)
        self.assertEqual(pair.server.refused["foreign address"], 1)
        self.assertIn("403", pair.client.last_error)

    def test_member_ip_policy(self) -> None:
        self.assertEqual(member_ip_policy("auto", "192.0.2.7", ""), ("192.0.2.7", ""))
        self.assertEqual(member_ip_policy("same", "192.0.2.7", "via")[0], "192.0.2.7")
        self.assertEqual(member_ip_policy("auto", "192.0.2.7", "cf-connecting-ip")[0], "")
        self.assertEqual(member_ip_policy("any", "192.0.2.7", "")[0], "")

    def test_closed_pool_refuses_and_aborts_pending_upgrades(self) -> None:
        pair = Pair(self)
        server = pair.server.factory().buildProtocol(None)
        sw, cw = wire_pair(server, RawPeer())
        self.assertEqual(len(pair.server._upgrading), 1)
        pair.server.close()
        self.assertTrue(sw.aborted)
        late = pair.server.factory().buildProtocol(None)
        sw2, cw2 = wire_pair(late, RawPeer())
        self.assertTrue(sw2.aborted)

    def test_early_data_on_strict_server_closes_the_member(self) -> None:
        pair = Pair(self, min_cap=2, strict=True)
        pair.start()
        cid = next(c for c in pair.client._idle if c != "00000000")
        member = pair.client._take(cid)
        assert member is not None and member.transport is not None
        member.transport.write(b"early")
        pair.pump()
        self.assertFalse(pair.server.has(cid))
        self.assertTrue(any("before use" in t for t in pair.texts(Level.WARN)))

    def test_pong_and_unsolicited_frames_do_not_disturb(self) -> None:
        pair = Pair(self)
        pair.start()
        s, c = pair.members()
        sw, cw = pair.wires[0]
        client_side = Connection(ConnectionType.CLIENT)
        sw.protocol.dataReceived(client_side.send(Pong(payload=b"x")) + client_side.send(BytesMessage(data=b"ok")))
        got: list[bytes] = []
        s.set_sink(got.append)
        self.assertEqual(got, [b"ok"])
        self.assertFalse(s.lost)
