"""Client single-end forwarding mode (nodepass.tunnel.single), on real sockets."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.trial import unittest

from nodepass.env import Settings
from nodepass.log import LogRecord, NodePassLogger
from nodepass.tunnel.single import SingleEndService, make_single_end
from nodepass.url import parse_tunnel_url
from tests.support import RawClient, UdpEcho, free_port, quiet_logger, udp_user, wait_for

reactor: Any = _reactor


class TcpEcho(Protocol):
    """Echo target that also records everything it received."""

    received: list[bytes]

    def connectionMade(self) -> None:
        self.received = []
        self.factory.conns.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        assert self.transport is not None
        self.transport.write(data)


class SingleEndTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.records: list[LogRecord] = []
        self.logger = quiet_logger("debug", self.records)
        self.settings = Settings(report_interval=0.2, udp_read_timeout=30.0, service_cooldown=0.2)
        self.tcp_factory = Factory.forProtocol(TcpEcho)
        self.tcp_factory.conns = []  # type: ignore[attr-defined]
        self.tcp_target = reactor.listenTCP(0, self.tcp_factory, interface="127.0.0.1")
        self.addCleanup(self.tcp_target.stopListening)
        self.udp_target = reactor.listenUDP(0, UdpEcho(), interface="127.0.0.1")
        self.addCleanup(self.udp_target.stopListening)
        self.services: list[SingleEndService] = []

    def start(self, query: str = "", target_port: int | None = None) -> SingleEndService:
        port = free_port()
        tport = target_port or self.tcp_target.getHost().port
        url = f"client://127.0.0.1:{port}/127.0.0.1:{tport}?mode=1" + (f"&{query}" if query else "")
        config = parse_tunnel_url(url)
        service = make_single_end(config, reactor=reactor, logger=self.logger, settings=self.settings)
        service.startService()
        self.services.append(service)
        self.addCleanup(service.stopService)
        return service

    def texts(self) -> list[str]:
        return [r.text for r in self.records]

    def test_listener_backlog_takes_bursts(self) -> None:
        """Regression: the single-end listener had Twisted's backlog of 50, so a burst of
        new connections waited for SYN retransmissions; it now has the tunnel's."""
        import shutil
        import subprocess

        from nodepass.net import BACKLOG

        if shutil.which("ss") is None:
            raise unittest.SkipTest("needs ss (iproute2) to read a listener's backlog")
        service = self.start()
        port = service._tcp_port.getHost().port
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        backlog = int(out.split()[2])  # Send-Q of a listening socket: its backlog
        with open("/proc/sys/net/core/somaxconn") as f:
            self.assertEqual(backlog, min(BACKLOG, int(f.read())))

    @defer.inlineCallbacks
    def connect(self, port: int) -> Any:
        client = RawClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        return client

    @defer.inlineCallbacks
    def test_tcp_echo_and_counters(self) -> Any:
        """Bytes go to the target and back; TCPRX/TCPTX count the user side exactly."""
        service = self.start()
        self.assertTrue(service.bound)
        client = yield self.connect(service.tcp_port)
        payload = b"hello single-end " * 5000
        assert client.transport is not None
        client.transport.write(payload)
        yield wait_for(lambda: len(client.data) >= len(payload))
        self.assertEqual(client.data, payload)
        self.assertEqual(service.stats.tcprx, len(payload))
        self.assertEqual(service.stats.tcptx, len(payload))
        self.assertEqual(service.stats.tcps, 1)
        client.transport.loseConnection()
        yield client.closed
        yield wait_for(lambda: service.stats.tcps == 0)
        self.assertTrue(any(t.startswith("Starting exchange: 127.0.0.1:") for t in self.texts()))
        yield wait_for(lambda: any(t.startswith("Exchange complete:") for t in self.texts()))

    @defer.inlineCallbacks
    def test_udp_echo_and_counters(self) -> Any:
        """Datagrams reach the UDP target and replies come back; UDPRX/UDPTX exact."""
        service = self.start(target_port=self.udp_target.getHost().port)
        user = udp_user(self)
        total = 0
        for i in range(4):
            data = b"datagram %d " % i * (i + 1)
            reply = yield user.ask(data, service.udp_port)
            self.assertEqual(reply, data)
            total += len(data)
        self.assertEqual(service.stats.udprx, total)
        self.assertEqual(service.stats.udptx, total)
        self.assertEqual(service.stats.udps, 1)
        self.assertEqual(service.stats.tcprx, 0)

    @defer.inlineCallbacks
    def test_udp_session_idle_timeout(self) -> Any:
        """A UDP session without replies for udp_read_timeout ends and frees its slot."""
        self.settings = Settings(report_interval=0.2, udp_read_timeout=0.2)
        service = self.start(target_port=self.udp_target.getHost().port)
        user = udp_user(self)
        reply = yield user.ask(b"x", service.udp_port)
        self.assertEqual(reply, b"x")
        yield wait_for(lambda: service.stats.udps == 0)
        reply = yield user.ask(b"y", service.udp_port)
        self.assertEqual(reply, b"y")

    @defer.inlineCallbacks
    def test_startup_and_checkpoint_lines(self) -> Any:
        """`Client started: client://...` then CHECK_POINT lines with MODE=1 and POOL=0."""
        service = self.start()
        yield wait_for(lambda: sum("CHECK_POINT|" in t for t in self.texts()) >= 2)
        started = [t for t in self.texts() if t.startswith("Client started: client://")]
        self.assertEqual(len(started), 1)
        self.assertIn("&mode=1&", started[0])
        checkpoints = [r for r in self.records if r.text.startswith("CHECK_POINT|")]
        self.assertEqual(checkpoints[0].level.name, "EVENT")
        self.assertRegex(
            checkpoints[0].text,
            r"^CHECK_POINT\|MODE=1\|PING=\d+ms\|POOL=0\|TCPS=0\|UDPS=0\|TCPRX=0\|TCPTX=0\|UDPRX=0\|UDPTX=0$",
        )
        self.assertEqual(service.stats.mode, 1)

    @defer.inlineCallbacks
    def test_notcp(self) -> Any:
        """notcp=1 opens no TCP listener."""
        service = self.start("notcp=1")
        self.assertEqual(service.tcp_port, 0)
        self.assertNotEqual(service.udp_port, 0)
        yield None

    @defer.inlineCallbacks
    def test_bind_failure_retries(self) -> Any:
        """A taken tunnel address logs `Client error` and retries after the cooldown."""
        blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        self.addCleanup(blocker.close)
        port = blocker.getsockname()[1]
        config = parse_tunnel_url(f"client://127.0.0.1:{port}/127.0.0.1:{self.tcp_target.getHost().port}?mode=1")
        service = make_single_end(config, reactor=reactor, logger=self.logger, settings=self.settings)
        self.assertFalse(service.bind())
        self.assertFalse(service.bound)
        service.startService()
        self.addCleanup(service.stopService)
        yield wait_for(lambda: any(t.startswith("Client restart: ") for t in self.texts()))
        errors = [r for r in self.records if r.text.startswith("Client error: ")]
        self.assertTrue(errors)
        self.assertEqual(errors[0].level.name, "ERROR")

    @defer.inlineCallbacks
    def test_slot_limit(self) -> Any:
        """slot=1: a second connection is closed while the first is open."""
        service = self.start("slot=1")
        first = yield self.connect(service.tcp_port)
        first.transport.write(b"a")
        yield wait_for(lambda: first.data == b"a")
        second = yield self.connect(service.tcp_port)
        yield second.closed
        self.assertEqual(second.data, b"")
        self.assertTrue(any("slot limit reached" in t for t in self.texts()))
        first.transport.loseConnection()
        yield first.closed

    @defer.inlineCallbacks
    def test_block_http(self) -> Any:
        """block=2 closes an HTTP request before any target is dialled."""
        service = self.start("block=2")
        client = yield self.connect(service.tcp_port)
        client.transport.write(b"GET / HTTP/1.1\r\n\r\n")
        yield client.closed
        self.assertEqual(client.data, b"")
        # Only report probes (which send nothing) may have reached the target.
        self.assertEqual([c.received for c in self.tcp_factory.conns if c.received], [])  # type: ignore[attr-defined]
        self.assertTrue(any("blocked HTTP protocol" in t for t in self.texts()))

    @defer.inlineCallbacks
    def test_proxy_header(self) -> Any:
        """proxy=1 sends a PROXY v1 line to the target first; it is not echoed into TCPRX."""
        service = self.start("proxy=1")
        client = yield self.connect(service.tcp_port)
        client.transport.write(b"payload")
        yield wait_for(lambda: b"payload" in client.data)
        (target,) = [c for c in self.tcp_factory.conns if c.received]  # type: ignore[attr-defined]
        got = b"".join(target.received)
        self.assertTrue(got.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 "), got)
        self.assertTrue(got.endswith(b"\r\npayload"))
        self.assertEqual(service.stats.tcprx, len(b"payload"))
        client.transport.loseConnection()
        yield client.closed

    @defer.inlineCallbacks
    def test_rate_limited_tcp_still_flows(self) -> Any:
        """rate=1 (125 kB/s) pauses and resumes reading; every byte still arrives."""
        service = self.start("rate=1")
        client = yield self.connect(service.tcp_port)
        payload = bytes(range(256)) * 800  # 204800 bytes: more than one second's budget
        client.transport.write(payload)
        yield wait_for(lambda: len(client.data) >= len(payload), timeout=20)
        self.assertEqual(client.data, payload)
        self.assertEqual(service.stats.tcprx, len(payload))
        throttle = service.policy.throttle
        assert throttle is not None
        self.assertLess(throttle.read_bucket.tokens, throttle.read_bucket.capacity)
        client.transport.loseConnection()
        yield client.closed

    @defer.inlineCallbacks
    def test_auto_mode_through_tunnel_service(self) -> Any:
        """client mode=0 with a free tunnel address runs single-end (MODE=1) via the tunnel service."""
        from nodepass.tunnel import make_tunnel_service

        port = free_port()
        config = parse_tunnel_url(f"client://127.0.0.1:{port}/127.0.0.1:{self.tcp_target.getHost().port}")
        service = make_tunnel_service(config, reactor=reactor, logger=self.logger, settings=self.settings)
        service.startService()
        self.addCleanup(service.stopService)
        client = yield self.connect(port)
        client.transport.write(b"auto")
        yield wait_for(lambda: client.data == b"auto")
        self.assertEqual(service.stats.mode, 1)
        self.assertEqual(service.stats.tcprx, 4)
        yield wait_for(lambda: any(t.startswith("CHECK_POINT|MODE=1|") for t in self.texts()))
        client.transport.loseConnection()
        yield client.closed


class SingleEndIPv6Tests(unittest.TestCase):
    """Single-end UDP forwarding on [::1]."""

    timeout = 30

    def setUp(self) -> None:
        try:
            probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            probe.bind(("::1", 0))
            probe.close()
        except OSError:
            raise unittest.SkipTest("no IPv6 loopback") from None

    @defer.inlineCallbacks
    def test_udp_echo_ipv6(self) -> Any:
        """Peers are keyed and answered over IPv6; counters exact."""
        echo = reactor.listenUDP(0, UdpEcho(), interface="::1")
        self.addCleanup(echo.stopListening)
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.bind(("::1", 0))
        port = sock.getsockname()[1]
        sock.close()
        config = parse_tunnel_url(f"client://[::1]:{port}/[::1]:{echo.getHost().port}?mode=1&notcp=1")
        settings = Settings(report_interval=5.0)
        logger = NodePassLogger("debug", stream=None)
        service = make_single_end(config, reactor=reactor, logger=logger, settings=settings)
        service.startService()
        self.addCleanup(service.stopService)
        got: list[bytes] = []

        class User6(DatagramProtocol):
            def datagramReceived(self, datagram: bytes, addr: Any) -> None:
                got.append(datagram)

        user = reactor.listenUDP(0, User6(), interface="::1")
        self.addCleanup(user.stopListening)
        user.write(b"six", ("::1", service.udp_port))
        yield wait_for(lambda: got == [b"six"])
        self.assertEqual((service.stats.udprx, service.stats.udptx), (3, 3))
