"""UDP sessions over pool connections (nodepass.tunnel.udp).

The unit tests run real UDP sockets on 127.0.0.1 and use a real TCP
connection as the pool connection between the ingress and egress halves.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from nodepass.env import Settings
from nodepass.log import LogRecord, NodePassLogger
from nodepass.relay import RelayProtocol
from nodepass.stats import TunnelStats
from nodepass.tunnel.udp import IdleTimer, PauseGate, UdpEgress, UdpIngress, peer_key
from tests.support import UdpEcho, UdpUser, free_ports, quiet_logger, silent_listener, sleep, wait_for

reactor: Any = _reactor


class FakePolicy:
    """Slot counting and a fixed UDP target, like DataPolicy with slot=limit."""

    def __init__(self, stats: TunnelStats, target: tuple[str, int], limit: int = 100) -> None:
        self.stats = stats
        self.target = target
        self.limit = limit
        self.throttle: Any = None
        self.bind_ip = ""
        self.admitted: list[str] = []
        self.released = 0

    def admit(self, kind: str, peer: str) -> bool:
        assert kind == "udp"
        if self.stats.udps >= self.limit:
            return False
        self.stats.udps += 1
        self.admitted.append(peer)
        return True

    def release(self, kind: str) -> None:
        assert kind == "udp"
        self.stats.udps -= 1
        self.released += 1

    def udp_target(self) -> defer.Deferred[tuple[str, int]]:
        return defer.succeed(self.target)


class PoolPair:
    """A real TCP connection whose two ends are RelayProtocols (a stand-in pool connection)."""

    def __init__(self) -> None:
        self.accepted: list[RelayProtocol] = []
        self.port: Any = None

    @defer.inlineCallbacks
    def make(self) -> Any:
        if self.port is None:
            factory = Factory.forProtocol(RelayProtocol)
            orig = factory.buildProtocol

            def build(addr: Any) -> Any:
                p = orig(addr)
                self.accepted.append(p)
                return p

            factory.buildProtocol = build  # type: ignore[method-assign]
            self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        client = RelayProtocol()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port), client)
        yield wait_for(lambda: len(self.accepted) > 0 and self.accepted[-1].transport is not None)
        return client, self.accepted[-1]


class UdpTunnelTests(unittest.TestCase):
    """Ingress and egress joined by real TCP 'pool connections'."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.records: list[LogRecord] = []
        self.logger = quiet_logger("debug", self.records)
        self.settings = Settings(udp_read_timeout=30.0)
        self.echo = UdpEcho()
        self.echo_port = reactor.listenUDP(0, self.echo, interface="127.0.0.1", maxPacketSize=65536)
        self.target = ("127.0.0.1", self.echo_port.getHost().port)
        self.in_stats = TunnelStats()
        self.out_stats = TunnelStats()
        self.in_policy = FakePolicy(self.in_stats, self.target)
        self.out_policy = FakePolicy(self.out_stats, self.target)
        self.pairs = PoolPair()
        self.signals: list[tuple[str, str]] = []
        self.links: list[tuple[RelayProtocol, RelayProtocol]] = []
        self.acquire_fail = False
        self.egress_done: list[defer.Deferred[None]] = []
        self.egress = UdpEgress(
            reactor=reactor,
            logger=self.logger,
            settings=self.settings,
            stats=self.out_stats,
            policy=self.out_policy,
        )
        self.ingress = self.make_ingress(self.settings)
        self.user = UdpUser()
        self.user_port = reactor.listenUDP(0, self.user, interface="127.0.0.1", maxPacketSize=65536)
        yield None

    def make_ingress(self, settings: Settings) -> UdpIngress:
        ingress = UdpIngress(
            reactor=reactor,
            logger=self.logger,
            settings=settings,
            stats=self.in_stats,
            policy=self.in_policy,
            listen=("127.0.0.1", 0),
            acquire=self.acquire,
            send_signal=self.signal,
        )
        ingress.start()
        return ingress

    @defer.inlineCallbacks
    def acquire(self) -> Any:
        if self.acquire_fail:
            raise TimeoutError("no idle pool connection")
        near, far = yield self.pairs.make()
        self.links.append((near, far))
        return (f"{len(self.links):08x}", near)

    def signal(self, remote: str, conn_id: str) -> None:
        self.signals.append((remote, conn_id))
        far = self.links[int(conn_id, 16) - 1][1]
        self.egress_done.append(self.egress.open(remote, far))

    @defer.inlineCallbacks
    def tearDown(self) -> Any:
        yield self.ingress.stop()
        yield self.egress.stop()
        for near, far in self.links:
            near.abort()
            far.abort()
        yield wait_for(lambda: all(n.lost and f.lost for n, f in self.links))
        yield self.user_port.stopListening()
        yield self.echo_port.stopListening()
        if self.pairs.port is not None:
            yield self.pairs.port.stopListening()

    @defer.inlineCallbacks
    def test_echo_round_trips_and_counters(self) -> Any:
        """Datagrams cross the tunnel both ways; one session, one signal, exact counters."""
        sent = 0
        for i in range(5):
            data = b"ping-%d-" % i + b"x" * (100 * i)
            reply = yield self.user.ask(data, self.ingress.port)
            self.assertEqual(reply, data)
            sent += len(data)
        user_addr = peer_key("127.0.0.1", self.user_port.getHost().port)
        self.assertEqual(self.signals, [(user_addr, "00000001")])
        self.assertEqual(self.in_stats.udprx, sent)
        self.assertEqual(self.in_stats.udptx, sent)
        self.assertEqual(self.out_stats.udptx, sent)
        self.assertEqual(self.out_stats.udprx, sent)
        self.assertEqual(self.in_stats.udps, 1)
        self.assertEqual(self.out_stats.udps, 1)
        self.assertEqual(self.ingress.sessions, 1)
        self.assertEqual(self.egress.sessions, 1)
        self.assertEqual(self.in_stats.tcprx + self.in_stats.tcptx, 0)

    @defer.inlineCallbacks
    def test_large_datagram(self) -> Any:
        """A datagram larger than Twisted's default 8 KiB read arrives whole."""
        data = bytes(range(256)) * 48  # 12288 bytes
        reply = yield self.user.ask(data, self.ingress.port)
        self.assertEqual(reply, data)

    @defer.inlineCallbacks
    def test_idle_session_ends_and_frees_slot(self) -> Any:
        """With no reply traffic for udp_read_timeout both halves end and free their slots."""
        yield self.ingress.stop()
        settings = Settings(udp_read_timeout=0.3)
        self.egress = UdpEgress(
            reactor=reactor,
            logger=self.logger,
            settings=settings,
            stats=self.out_stats,
            policy=self.out_policy,
        )
        self.ingress = self.make_ingress(settings)
        reply = yield self.user.ask(b"hello", self.ingress.port)
        self.assertEqual(reply, b"hello")
        yield wait_for(lambda: self.ingress.sessions == 0 and self.egress.sessions == 0)
        yield defer.gatherResults(self.egress_done)
        self.assertEqual((self.in_stats.udps, self.out_stats.udps), (0, 0))
        self.assertEqual((self.in_policy.released, self.out_policy.released), (1, 1))
        yield wait_for(lambda: self.links[0][0].lost and self.links[0][1].lost)
        # The next datagram opens a fresh session with a new pool connection.
        reply = yield self.user.ask(b"again", self.ingress.port)
        self.assertEqual(reply, b"again")
        self.assertEqual([conn_id for _, conn_id in self.signals], ["00000001", "00000002"])

    @defer.inlineCallbacks
    def test_slot_refused(self) -> Any:
        """A refused slot drops the datagram: no pool connection, no signal."""
        self.in_policy.limit = 0
        self.user.transport.write(b"dropped", ("127.0.0.1", self.ingress.port))  # type: ignore[union-attr,call-arg]
        yield wait_for(lambda: self.in_stats.udprx == 7)
        yield sleep(0.1)
        self.assertEqual(self.signals, [])
        self.assertEqual(self.links, [])
        self.assertEqual(self.ingress.sessions, 0)
        self.assertEqual(self.echo.got, [])

    @defer.inlineCallbacks
    def test_no_pool_connection(self) -> Any:
        """Without a pool connection the session is dropped, the slot freed, and a WARN logged."""
        self.acquire_fail = True
        self.user.transport.write(b"x", ("127.0.0.1", self.ingress.port))  # type: ignore[union-attr,call-arg]
        yield wait_for(lambda: self.in_policy.released == 1)
        self.assertEqual(self.ingress.sessions, 0)
        self.assertEqual(self.in_stats.udps, 0)
        self.assertTrue(any("request timeout" in r.text for r in self.records))
        self.acquire_fail = False
        reply = yield self.user.ask(b"later", self.ingress.port)
        self.assertEqual(reply, b"later")

    @defer.inlineCallbacks
    def test_pool_connection_closed_by_peer(self) -> Any:
        """When the pool connection ends, both halves drop the session."""
        reply = yield self.user.ask(b"one", self.ingress.port)
        self.assertEqual(reply, b"one")
        self.links[0][1].close()
        yield wait_for(lambda: self.ingress.sessions == 0 and self.egress.sessions == 0)
        self.assertEqual((self.in_stats.udps, self.out_stats.udps), (0, 0))

    @defer.inlineCallbacks
    def test_rate_limited_sessions_still_flow(self) -> Any:
        """With a throttle both halves charge it and datagrams still get through."""
        from nodepass.datapath.ratelimit import Throttle

        class Recording(Throttle):
            """A real throttle that also records what each direction was charged."""

            def __init__(self) -> None:
                super().__init__(reactor, 1_000_000)
                self.charged: dict[str, int] = {"read": 0, "write": 0}

            def consume(self, nbytes: int, producer: Any, direction: str = "read") -> None:
                self.charged[direction] += nbytes
                super().consume(nbytes, producer, direction)

        self.in_policy.throttle = Recording()
        self.out_policy.throttle = Recording()
        yield self.ingress.stop()
        self.ingress = self.make_ingress(self.settings)
        self.egress = UdpEgress(
            reactor=reactor,
            logger=self.logger,
            settings=self.settings,
            stats=self.out_stats,
            policy=self.out_policy,
        )
        sent = 0
        for i in range(3):
            data = b"r%d" % i * 1000
            reply = yield self.user.ask(data, self.ingress.port)
            self.assertEqual(reply, data)
            sent += len(data)
        # Each side charges every datagram once on the way in and once on the way out.
        for throttle in (self.in_policy.throttle, self.out_policy.throttle):
            self.assertEqual(throttle.charged, {"read": sent, "write": sent})  # type: ignore[union-attr]
        self.in_policy.throttle.stop()
        self.out_policy.throttle.stop()

    @defer.inlineCallbacks
    def test_two_peers_two_sessions(self) -> Any:
        """Each user address gets its own session and signal."""
        other = UdpUser()
        other_port = reactor.listenUDP(0, other, interface="127.0.0.1")
        self.addCleanup(other_port.stopListening)
        a = yield self.user.ask(b"from-a", self.ingress.port)
        b = yield other.ask(b"from-b", self.ingress.port)
        self.assertEqual((a, b), (b"from-a", b"from-b"))
        self.assertEqual(len(self.signals), 2)
        self.assertEqual(self.ingress.sessions, 2)
        self.assertEqual(self.in_stats.udps, 2)


class UdpEgressTests(unittest.TestCase):
    """The egress half alone, driven through real TCP 'pool connections'."""

    timeout = 30

    def setUp(self) -> None:
        self.logger = NodePassLogger("debug", stream=None)
        self.records: list[LogRecord] = []
        self.logger.add_observer(self.records.append)
        self.echo = UdpEcho()
        self.echo_port = reactor.listenUDP(0, self.echo, interface="127.0.0.1")
        self.addCleanup(self.echo_port.stopListening)
        self.stats = TunnelStats()
        self.policy = FakePolicy(self.stats, ("127.0.0.1", self.echo_port.getHost().port))
        self.egress = UdpEgress(
            reactor=reactor, logger=self.logger, settings=Settings(), stats=self.stats, policy=self.policy
        )
        self.addCleanup(self.egress.stop)
        self.pairs = PoolPair()
        self.addCleanup(lambda: self.pairs.port and self.pairs.port.stopListening())

    @defer.inlineCallbacks
    def pair(self) -> Any:
        near, far = yield self.pairs.make()
        got: list[bytes] = []
        near.set_sink(got.append)
        self.addCleanup(near.abort)
        self.addCleanup(far.abort)
        return near, far, got

    @defer.inlineCallbacks
    def test_second_link_reuses_socket(self) -> Any:
        """A second link for the same remote shares the target socket; replies go to the newest."""
        near1, far1, got1 = yield self.pair()
        near2, far2, got2 = yield self.pair()
        done1 = self.egress.open("10.0.0.1:5000", far1)
        near1.transport.write(b"one")
        yield wait_for(lambda: got1 == [b"one"])
        self.egress.open("10.0.0.1:5000", far2)
        near2.transport.write(b"two")
        yield wait_for(lambda: got2 == [b"two"])
        self.assertEqual(self.egress.sessions, 1)
        self.assertEqual(self.stats.udps, 1)
        self.assertEqual(self.policy.admitted, ["10.0.0.1:5000"])
        # The creator's link ends: the session, its socket and the slot go too.
        near1.close()
        yield done1
        yield wait_for(lambda: far2.lost)
        self.assertEqual(self.egress.sessions, 0)
        self.assertEqual(self.stats.udps, 0)

    @defer.inlineCallbacks
    def test_dial_failure_closes_link_and_frees_slot(self) -> Any:
        """When no UDP target can be had, the pool connection is closed and the slot returned."""
        self.policy.udp_target = lambda: defer.fail(ConnectionError("all 1 targets failed"))  # type: ignore[method-assign]
        near, far, _ = yield self.pair()
        yield self.egress.open("10.0.0.2:6000", far)
        yield wait_for(lambda: near.lost)
        self.assertEqual((self.stats.udps, self.policy.released), (0, 1))
        self.assertTrue(any("all 1 targets failed" in r.text for r in self.records))

    @defer.inlineCallbacks
    def test_slot_refused_closes_link(self) -> Any:
        """A refused slot closes the pool connection at once."""
        self.policy.limit = 0
        near, far, _ = yield self.pair()
        yield self.egress.open("10.0.0.3:7000", far)
        yield wait_for(lambda: near.lost)
        self.assertEqual(self.egress.sessions, 0)
        self.assertEqual(self.echo.got, [])


class PoolLinkTests(unittest.TestCase):
    """How a datagram is written to a pool connection."""

    @defer.inlineCallbacks
    def test_one_send_per_datagram_on_plain_tcp(self) -> Any:
        """Each datagram reaches the socket at once, so consecutive ones are not merged."""

        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        from nodepass.tunnel.udp import as_link

        server = silent_listener(self, 1)
        conn = RelayProtocol()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.getsockname()[1]), conn)
        self.addCleanup(conn.abort)
        peer, _ = server.accept()
        self.addCleanup(peer.close)
        peer.settimeout(2)
        link = as_link(conn)
        link.write(b"first datagram")
        # No reactor turn in between: the bytes must already be on the wire.
        self.assertEqual(peer.recv(100), b"first datagram")
        link.write(b"second")
        self.assertEqual(peer.recv(100), b"second")


class HelperTests(unittest.TestCase):
    """Small pieces: addresses, idle timer, pause gate."""

    def test_peer_key(self) -> None:
        self.assertEqual(peer_key("127.0.0.1", 80), "127.0.0.1:80")
        self.assertEqual(peer_key("::ffff:10.0.0.1", 5), "10.0.0.1:5")
        self.assertEqual(peer_key("::1", 53), "[::1]:53")
        self.assertEqual(peer_key("fe80::1%eth0", 53), "[fe80::1]:53")

    def test_idle_timer(self) -> None:
        clock = task.Clock()
        fired: list[int] = []
        timer = IdleTimer(clock, 10, lambda: fired.append(1))
        clock.advance(6)
        timer.touch()
        clock.advance(6)
        self.assertEqual(fired, [])
        clock.advance(4)
        self.assertEqual(fired, [1])

    def test_idle_timer_zero_is_off(self) -> None:
        clock = task.Clock()
        fired: list[int] = []
        IdleTimer(clock, 0, lambda: fired.append(1))
        clock.advance(1000)
        self.assertEqual(fired, [])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_pause_gate(self) -> None:
        events: list[str] = []
        gate = PauseGate(lambda: events.append("pause"), lambda: events.append("resume"))
        a, b = gate.handle(), gate.handle()
        a.pauseProducing()
        b.pauseProducing()
        a.pauseProducing()
        a.resumeProducing()
        self.assertEqual(events, ["pause"])
        gate.release(b)
        self.assertEqual(events, ["pause", "resume"])


class UdpThroughTunnelTests(unittest.TestCase):
    """UDP through a real server + client pair in this process (plain and TLS pools)."""

    timeout = 60

    def setUp(self) -> None:
        self.records: list[LogRecord] = []
        self.settings = Settings(report_interval=0.3, service_cooldown=0.3, udp_read_timeout=30.0)
        self.echo = UdpEcho()
        self.echo_port = reactor.listenUDP(0, self.echo, interface="127.0.0.1", maxPacketSize=65536)
        self.addCleanup(self.echo_port.stopListening)
        self.user = UdpUser()
        self.user_port = reactor.listenUDP(0, self.user, interface="127.0.0.1", maxPacketSize=65536)
        self.addCleanup(self.user_port.stopListening)
        self.addCleanup(self.settle)

    @defer.inlineCallbacks
    def settle(self) -> Any:
        """After both services stopped: wait for pool dials still in flight to end."""
        from twisted.internet import tcp

        def busy() -> list[Any]:
            return [s for s in reactor.getReaders() + reactor.getWriters() if isinstance(s, tcp.Client)]

        for _ in range(150):
            if not busy():
                return
            yield sleep(0.02)
        for s in busy():
            s.abortConnection()
        yield sleep(0.05)

    def start(self, url: str, name: str) -> Any:
        from nodepass.tunnel import make_tunnel_service
        from nodepass.url import parse_tunnel_url

        logger = NodePassLogger("debug", stream=None)
        logger.add_observer(lambda r: self.records.append(LogRecord(r.level, f"{name}: {r.text}", r.time)))
        service = make_tunnel_service(parse_tunnel_url(url), reactor=reactor, logger=logger, settings=self.settings)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    @defer.inlineCallbacks
    def first_reply(self, data: bytes, port: int) -> Any:
        """Send *data* until a reply comes back (the tunnel may still be starting)."""
        for _ in range(40):
            d = self.user.ask(data, port, timeout=1)
            try:
                reply = yield d
                return reply
            except defer.TimeoutError:
                continue
        raise AssertionError("no reply through the tunnel")

    @defer.inlineCallbacks
    def run_echo(self, server_url: str, client_url: str, ingress_port: int, ingress: str) -> Any:
        server = self.start(server_url, "server")
        client = self.start(client_url, "client")
        first = yield self.first_reply(b"hello", ingress_port)
        self.assertEqual(first, b"hello")
        in_stats = (server if ingress == "server" else client).stats
        out_stats = (client if ingress == "server" else server).stats
        base_in = (in_stats.udprx, in_stats.udptx)
        base_out = (out_stats.udprx, out_stats.udptx)
        total = 0
        for i in range(5):
            data = b"datagram-%d:" % i + b"z" * (200 * i)
            reply = yield self.user.ask(data, ingress_port)
            self.assertEqual(reply, data)
            total += len(data)
        self.assertEqual(in_stats.udprx - base_in[0], total)
        self.assertEqual(in_stats.udptx - base_in[1], total)
        self.assertEqual(out_stats.udptx - base_out[1], total)
        self.assertEqual(out_stats.udprx - base_out[0], total)
        self.assertGreaterEqual(in_stats.udps, 1)
        self.assertGreaterEqual(out_stats.udps, 1)
        self.assertEqual(in_stats.tcprx + out_stats.tcprx, 0)

    def test_reverse_mode_plain_pool(self) -> Any:
        """Server mode 1 listens on its target address; the client dials the UDP echo."""
        tunnel, ingress = free_ports(2)
        echo = self.echo_port.getHost().port
        return self.run_echo(
            f"server://127.0.0.1:{tunnel}/127.0.0.1:{ingress}?mode=1&tls=0",
            f"client://127.0.0.1:{tunnel}/127.0.0.1:{echo}?mode=2",
            ingress,
            "server",
        )

    def test_forward_mode_tls_pool(self) -> Any:
        """Server mode 2 dials the echo; the client listens (flow "+"); pool in TLS."""
        tunnel, ingress = free_ports(2)
        echo = self.echo_port.getHost().port
        return self.run_echo(
            f"server://127.0.0.1:{tunnel}/127.0.0.1:{echo}?mode=2&tls=1",
            f"client://127.0.0.1:{tunnel}/127.0.0.1:{ingress}?mode=2",
            ingress,
            "client",
        )

    @defer.inlineCallbacks
    def test_idle_sessions_end_on_both_sides(self) -> Any:
        """After udp_read_timeout without traffic both ends drop the session (UDPS back to 0)."""
        self.settings = Settings(report_interval=0.3, service_cooldown=0.3, udp_read_timeout=0.5)
        tunnel, ingress = free_ports(2)
        echo = self.echo_port.getHost().port
        server = self.start(f"server://127.0.0.1:{tunnel}/127.0.0.1:{ingress}?mode=1", "server")
        client = self.start(f"client://127.0.0.1:{tunnel}/127.0.0.1:{echo}?mode=2", "client")
        reply = yield self.first_reply(b"idle?", ingress)
        self.assertEqual(reply, b"idle?")
        self.assertEqual((server.stats.udps, client.stats.udps), (1, 1))
        yield wait_for(lambda: (server.stats.udps, client.stats.udps) == (0, 0))
        reply = yield self.user.ask(b"again", ingress)
        self.assertEqual(reply, b"again")

    @defer.inlineCallbacks
    def test_burst_over_tls_pool_keeps_boundaries(self) -> Any:
        """A burst of datagrams written in one reactor pass over a TLS pool: each one reaches the
        target whole and alone (one TLS record per datagram, not one per batch of writes)."""
        tunnel, ingress = free_ports(2)
        echo = self.echo_port.getHost().port
        self.start(f"server://127.0.0.1:{tunnel}/127.0.0.1:{ingress}?mode=1&tls=1", "server")
        self.start(f"client://127.0.0.1:{tunnel}/127.0.0.1:{echo}?mode=2", "client")
        reply = yield self.first_reply(b"ready?", ingress)
        self.assertEqual(reply, b"ready?")
        self.echo.got.clear()
        burst = [b"burst-%03d:" % i + b"d" * 300 for i in range(60)]
        for data in burst:  # no reactor turn in between
            self.user.transport.write(data, ("127.0.0.1", ingress))  # type: ignore[union-attr]
        yield wait_for(lambda: sum(map(len, self.echo.got)) >= sum(map(len, burst)), what="burst at the target")
        self.assertEqual(self.echo.got, burst)
