"""Data-path parameters over real sockets on 127.0.0.1: failover, dial source, probes, block."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.trial import unittest

from nodepass.datapath import AllTargetsFailed, DataPolicy, FirstBytesGate
from nodepass.env import Settings
from nodepass.log import Level, LogRecord
from nodepass.stats import TunnelStats
from nodepass.url import parse_tunnel_url
from tests import support
from tests.support import recording_logger


class Accepted(Protocol):
    """Records its peer in the factory and echoes nothing."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.factory.peers.append(self.transport.getPeer())  # type: ignore[attr-defined]


class Holder(Protocol):
    """Client side of a dialed target connection."""


class NetBase(unittest.TestCase):
    def setUp(self) -> None:
        self.ports: list[IListeningPort] = []
        self.clients: list[Protocol] = []

    def tearDown(self) -> defer.Deferred[Any]:
        for proto in self.clients:
            if proto.transport is not None:
                proto.transport.loseConnection()
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.ports])

    def listen(self) -> tuple[int, Factory]:
        factory = Factory.forProtocol(Accepted)
        factory.peers = []  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.ports.append(port)
        return port.getHost().port, factory

    @defer.inlineCallbacks
    def closed_port(self) -> Any:
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        return number

    def policy(self, url: str, **settings: Any) -> tuple[DataPolicy, list[LogRecord]]:
        logger, records = recording_logger()
        policy = DataPolicy.from_config(parse_tunnel_url(url), reactor=reactor, logger=logger,
                                        settings=Settings(**settings), stats=TunnelStats())
        return policy, records

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> defer.Deferred[Any]:
        """:func:`tests.support.wait_for` with this module's shorter default timeout."""
        return support.wait_for(predicate, timeout)


class FailoverTests(NetBase):
    @defer.inlineCallbacks
    def test_failover_reaches_the_second_target(self) -> Any:
        down = yield self.closed_port()
        up, factory = self.listen()
        policy, _ = self.policy(f"server://127.0.0.1:10101/127.0.0.1:{down},127.0.0.1:{up}")
        proto = yield policy.connect_tcp(Factory.forProtocol(Holder))
        self.clients.append(proto)
        self.assertEqual(proto.transport.getPeer().port, up)
        yield self.wait_for(lambda: len(factory.peers) == 1)
        self.assertFalse(policy.selector.healthy(0))
        # the failed target is skipped by the next dial although round-robin would start there
        proto2 = yield policy.connect_tcp(Factory.forProtocol(Holder))
        self.clients.append(proto2)
        self.assertEqual(proto2.transport.getPeer().port, up)

    @defer.inlineCallbacks
    def test_host_names_go_through_the_reactor_resolver(self) -> Any:
        up, factory = self.listen()
        policy, _ = self.policy(f"server://127.0.0.1:10101/localhost:{up}?dns=1m")
        proto = yield policy.connect_tcp(Factory.forProtocol(Holder))
        self.clients.append(proto)
        self.assertEqual((proto.transport.getPeer().host, proto.transport.getPeer().port),
                         ("127.0.0.1", up))
        self.assertEqual(policy.dns.cached("localhost"), "127.0.0.1")

    @defer.inlineCallbacks
    def test_all_targets_down(self) -> Any:
        a = yield self.closed_port()
        b = yield self.closed_port()
        policy, _ = self.policy(f"server://127.0.0.1:10101/127.0.0.1:{a},127.0.0.1:{b}")
        with self.assertRaises(AllTargetsFailed) as ctx:
            yield policy.connect_tcp(Factory.forProtocol(Holder))
        self.assertIn("all 2 targets failed", str(ctx.exception))

    @defer.inlineCallbacks
    def test_probe_prefers_the_target_that_answers(self) -> Any:
        down = yield self.closed_port()
        up, _ = self.listen()
        policy, _ = self.policy(f"client://127.0.0.1:10101/127.0.0.1:{down},127.0.0.1:{up}?lbs=1")
        ms = yield policy.probe_latency()
        self.assertIsInstance(ms, int)
        self.assertGreaterEqual(ms, 0)
        self.assertEqual(policy.selector.preferred, 1)
        self.assertFalse(policy.selector.healthy(0))
        proto = yield policy.connect_tcp(Factory.forProtocol(Holder))
        self.clients.append(proto)
        self.assertEqual(proto.transport.getPeer().port, up)

    @defer.inlineCallbacks
    def test_probe_with_nothing_listening_is_zero(self) -> Any:
        down = yield self.closed_port()
        policy, _ = self.policy(f"client://127.0.0.1:10101/127.0.0.1:{down}")
        ms = yield policy.probe_latency()
        self.assertEqual(ms, 0)


class DialSourceTests(NetBase):
    @defer.inlineCallbacks
    def test_dial_binds_the_source_address(self) -> Any:
        up, factory = self.listen()
        policy, records = self.policy(f"server://127.0.0.1:10101/127.0.0.1:{up}?dial=127.0.0.2")
        proto = yield policy.connect_tcp(Factory.forProtocol(Holder))
        self.clients.append(proto)
        self.assertEqual(proto.transport.getHost().host, "127.0.0.2")
        yield self.wait_for(lambda: len(factory.peers) == 1)
        self.assertEqual(factory.peers[0].host, "127.0.0.2")
        self.assertFalse([r for r in records if r.level == Level.ERROR])

    @defer.inlineCallbacks
    def test_unusable_source_falls_back_to_auto(self) -> Any:
        up, factory = self.listen()
        policy, records = self.policy(f"server://127.0.0.1:10101/127.0.0.1:{up}?dial=192.0.2.77")
        proto = yield policy.connect_tcp(Factory.forProtocol(Holder))
        self.clients.append(proto)
        self.assertEqual(proto.transport.getHost().host, "127.0.0.1")
        self.assertEqual(policy.bind_ip, "")
        errors = [r.text for r in records if r.level == Level.ERROR]
        self.assertEqual(len(errors), 1)
        self.assertIn("fallback to system auto due to dialer failure", errors[0])

    @defer.inlineCallbacks
    def test_udp_session_socket_uses_the_source_address(self) -> Any:
        seen: list[tuple[str, int]] = []

        class Sink(DatagramProtocol):
            def datagramReceived(self, datagram: bytes, addr: Any) -> None:
                seen.append(addr)

        server = reactor.listenUDP(0, Sink(), interface="127.0.0.1")
        self.ports.append(server)
        target_port = server.getHost().port
        policy, _ = self.policy(f"server://127.0.0.1:10101/127.0.0.1:{target_port}?dial=127.0.0.2")
        ip, port = yield policy.udp_target()
        self.assertEqual((ip, port), ("127.0.0.1", target_port))
        session = reactor.listenUDP(0, DatagramProtocol(), interface=policy.udp_interface(ip))
        self.ports.append(session)
        session.write(b"ping", (ip, port))
        yield self.wait_for(lambda: bool(seen))
        self.assertEqual(seen[0][0], "127.0.0.2")


class Gatekeeper(Protocol):
    """An ingress-side stand-in: sniff the first bytes, close blocked ones, greet the rest."""

    def connectionMade(self) -> None:
        policy: DataPolicy = self.factory.policy  # type: ignore[attr-defined]
        self.gate = FirstBytesGate(reactor, policy.sniff_timeout, self.decide)

    def decide(self, first: bytes) -> None:
        policy: DataPolicy = self.factory.policy  # type: ignore[attr-defined]
        assert self.transport is not None
        peer = self.transport.getPeer()
        assert isinstance(peer, IPv4Address)
        if policy.sniff(first, f"{peer.host}:{peer.port}") is not None:
            self.transport.loseConnection()
        else:
            self.transport.write(b"WELCOME " + first + b"|END")

    def dataReceived(self, data: bytes) -> None:
        self.gate.feed(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.gate.cancel()


class Client(Protocol):
    def __init__(self, send: bytes) -> None:
        self.send = send
        self.received = b""
        self.closed: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self.send:
            self.transport.write(self.send)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received.endswith(b"|END") and self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(self.received)


class BlockTests(NetBase):
    def gate_server(self, query: str) -> tuple[int, DataPolicy, list[LogRecord]]:
        logger, records = recording_logger()
        policy = DataPolicy.from_config(
            parse_tunnel_url(f"server://127.0.0.1:10101/127.0.0.1:1?{query}"), reactor=reactor,
            logger=logger, settings=Settings(), stats=TunnelStats(), sniff_timeout=0.2)
        factory = Factory.forProtocol(Gatekeeper)
        factory.policy = policy  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.ports.append(port)
        return port.getHost().port, policy, records

    @defer.inlineCallbacks
    def talk(self, port: int, send: bytes) -> Any:
        client = Client(send)
        factory = Factory.forProtocol(lambda: client)
        from twisted.internet.endpoints import TCP4ClientEndpoint

        yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
        received = yield client.closed
        return received

    @defer.inlineCallbacks
    def test_short_socks5_greeting_is_blocked_after_the_timeout(self) -> Any:
        port, _, records = self.gate_server("block=1")
        received = yield self.talk(port, b"\x05\x01\x00")
        self.assertEqual(received, b"")
        self.assertTrue(any("blocked SOCKS5 protocol from 127.0.0.1:" in r.text for r in records))

    @defer.inlineCallbacks
    def test_server_speaks_first_protocols_are_not_stalled(self) -> Any:
        port, _, _ = self.gate_server("block=123")
        received = yield self.talk(port, b"")
        self.assertEqual(received, b"WELCOME |END")

    @defer.inlineCallbacks
    def test_plain_and_unselected_protocols_pass(self) -> Any:
        port, _, _ = self.gate_server("block=13")
        received = yield self.talk(port, b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(received, b"WELCOME GET / HTTP/1.1\r\n\r\n|END")
        received = yield self.talk(port, b"\x16\x03\x01\x00\x05hello")
        self.assertEqual(received, b"")
