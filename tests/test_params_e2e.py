"""Every data-path URL parameter, end to end through real tunnels on 127.0.0.1.

Each test starts a real dual-end tunnel (server + client services from
:func:`make_tunnel_service`, short report/cooldown intervals) or a client in
single-end mode, and checks the effect of one parameter as NodePass defines
it, from the outside: what a user connection sees and what the target sees.
The rate test is a throughput *measurement* with a +/- 10 % tolerance; every
other check waits on events with generous timeouts.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any
from urllib.parse import unquote

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.python import log as twisted_log
from twisted.trial import unittest

from nodepass.env import Settings
from nodepass.log import Level
from nodepass.tunnel import TunnelService, make_tunnel_service
from nodepass.url import URLError, parse_tunnel_url
from tests.support import (
    FAST,
    NamedLogs,
    RawClient,
    UdpEcho,
    free_port,
    free_ports,
    make_cert_files,
    sleep,
    udp_user,
    wait_for,
)
from tests.test_datapath_e2e import Sender

reactor: Any = _reactor

TLS_HELLO = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x11" * 32
SOCKS5_HELLO = b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"
HTTP_GET = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"
PLAIN = b"plain data, nothing to block\n"


# -- targets -------------------------------------------------------------------------------
class Recorder(Protocol):
    """A target connection: records its peer and bytes; echoes when the target does."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.owner: Target = self.factory.owner  # type: ignore[attr-defined]
        self.peer = self.transport.getPeer()
        self.data = b""
        self.count = 0
        self.owner.conns.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        if self.owner.keep:
            self.data += data
        if self.owner.echo:
            assert self.transport is not None
            self.transport.write(data)


class Target:
    """A TCP target on 127.0.0.1 (and a UDP echo on the same port with ``udp``)."""

    def __init__(self, test: unittest.TestCase, *, echo: bool = True, keep: bool = True, udp: bool = False,
                 port: int = 0) -> None:
        self.echo = echo
        self.keep = keep
        self.conns: list[Recorder] = []
        self.datagrams: list[bytes] = []
        factory = Factory.forProtocol(Recorder)
        factory.owner = self  # type: ignore[attr-defined]
        port = port or (free_port() if udp else 0)
        self.tcp: Any = reactor.listenTCP(port, factory, backlog=128, interface="127.0.0.1")
        self.port = int(self.tcp.getHost().port)
        echo = UdpEcho()
        echo.got = self.datagrams
        self.udp: Any = reactor.listenUDP(self.port, echo, interface="127.0.0.1") if udp else None
        test.addCleanup(self.stop)

    @property
    def sessions(self) -> list[Recorder]:
        """Connections that carried data (latency probes connect and close without any)."""
        return [c for c in self.conns if c.count > 0]

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> defer.Deferred[Any]:
        waits = []
        for attr in ("tcp", "udp"):
            port = getattr(self, attr)
            setattr(self, attr, None)
            if port is not None:
                waits.append(defer.maybeDeferred(port.stopListening))
        for conn in self.conns:
            if conn.transport is not None:
                conn.transport.abortConnection()  # type: ignore[attr-defined]
        return defer.gatherResults(waits)


# -- users ----------------------------------------------------------------------------------
@defer.inlineCallbacks
def open_user(test: unittest.TestCase, port: int, send: bytes = b"", bind: str | None = None) -> Any:
    user = RawClient(send)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5,
                                  bindAddress=(bind, 0) if bind else None)
    yield connectProtocol(endpoint, user)
    test.addCleanup(lambda: user.lost or user.transport.abortConnection())  # type: ignore[union-attr]
    return user


@defer.inlineCallbacks
def echo_once(test: unittest.TestCase, port: int, payload: bytes = PLAIN) -> Any:
    """A user connection whose payload must come back in full; returns the open user."""
    user = yield open_user(test, port, payload)
    yield wait_for(lambda: len(user.data) >= len(payload) or user.lost, 10.0, "echo")
    test.assertEqual(user.data, payload)
    return user


@defer.inlineCallbacks
def refused_before_target(test: unittest.TestCase, port: int, payload: bytes, target: Target) -> Any:
    """The user connection is closed and no new connection reached *target*."""
    before = len(target.sessions)
    user = yield open_user(test, port, payload)
    yield defer.Deferred.addTimeout(user.closed, 10, reactor)
    test.assertEqual(user.data, b"")
    test.assertEqual(len(target.sessions), before, "the refused connection reached the target")


@defer.inlineCallbacks
def udp_refused_by_slot(test: unittest.TestCase, pair: Any, side: str, target: Target) -> Any:
    """A new UDP peer gets no answer within 1 s, *target* sees no datagram and *side* logs the
    UDP slot refusal; returns that peer (a :class:`UdpUser`) for later asks."""
    udp = udp_user(test)
    yield test.assertFailure(udp.ask(b"datagram", pair.user_port, timeout=1.0), defer.TimeoutError)
    test.assertEqual(target.datagrams, [])
    test.assertTrue(pair.has(side, "UDP slot limit reached", Level.ERROR))
    return udp


# -- tunnels ----------------------------------------------------------------------------------
class Pair(NamedLogs):
    """A dual-end tunnel: flow ``-`` (server ingress, client dials *targets*) or ``+``."""

    def __init__(self, test: unittest.TestCase, targets: str, *, flow: str = "-", server_q: str = "",
                 client_q: str = "", tls: int = 0, settings: Settings = FAST,
                 client_host: str = "127.0.0.1") -> None:
        super().__init__()
        self.test = test
        self.flow = flow
        self.settings = settings
        self.tunnel_port, self.user_port = free_ports(2)
        user = f"127.0.0.1:{self.user_port}"
        spath, cpath, smode = (user, targets, 1) if flow == "-" else (targets, user, 2)
        self.server_url = (f"server://secret@127.0.0.1:{self.tunnel_port}/{spath}"
                           f"?tls={tls}&mode={smode}{server_q}")
        self.client_url = f"client://secret@{client_host}:{self.tunnel_port}/{cpath}?mode=2&min=4{client_q}"
        self.server: TunnelService | None = None
        self.client: TunnelService | None = None

    def _make(self, name: str, url: str) -> TunnelService:
        svc = make_tunnel_service(parse_tunnel_url(url), reactor=reactor, logger=self.logger(name),
                                  settings=self.settings)
        self.test.addCleanup(lambda: svc.running and svc.stopService())
        svc.startService()
        return svc

    @property
    def ingress(self) -> TunnelService:
        svc = self.server if self.flow == "-" else self.client
        assert svc is not None
        return svc

    @property
    def egress(self) -> TunnelService:
        svc = self.client if self.flow == "-" else self.server
        assert svc is not None
        return svc

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.server = self._make("server", self.server_url)
        self.client = self._make("client", self.client_url)

        def ready() -> bool:
            ing, eg = self.ingress.session, self.egress.session
            if ing is None or eg is None or ing.control is None or eg.control is None:
                return False
            if not ing._ingress_open:
                return False
            return self.flow == "-" or bool(ing._listeners or ing._udp_ingress)

        yield wait_for(ready, 15.0, "tunnel ready")
        return self


class Single(NamedLogs):
    """A client in single-end mode listening on ``user_port`` and forwarding to *targets*."""

    def __init__(self, test: unittest.TestCase, targets: str, query: str = "", settings: Settings = FAST) -> None:
        super().__init__()
        self.user_port = free_port()
        url = f"client://127.0.0.1:{self.user_port}/{targets}?mode=1{query}"
        self.service = make_tunnel_service(parse_tunnel_url(url), reactor=reactor, logger=self.logger("client"),
                                           settings=settings)
        test.addCleanup(lambda: self.service.running and self.service.stopService())
        self.service.startService()


# == rate ==========================================================================================
class Counter(Protocol):
    def connectionMade(self) -> None:
        self.factory.conns.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.factory.total += len(data)  # type: ignore[attr-defined]


class RateTests(unittest.TestCase):
    """``rate``: the global limiter of each instance shapes user/target sockets."""

    timeout = 40
    RATE_MBIT = 20

    def sink(self) -> Any:
        factory = Factory.forProtocol(Counter)
        factory.total = 0  # type: ignore[attr-defined]
        factory.conns = []  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")

        def sink_closed() -> Any:
            # Runs after the tunnel services have stopped: the target side may
            # still be draining what the tunnel wrote before its FIN.
            return wait_for(
                lambda: all(c.transport is None or not c.transport.connected for c in factory.conns),
                10.0,
                "sink connections closed",
            )

        self.addCleanup(sink_closed)
        self.addCleanup(port.stopListening)
        return factory, f"127.0.0.1:{port.getHost().port}"

    @defer.inlineCallbacks
    def upload(self, pair: Pair | Single) -> Any:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", pair.user_port, timeout=5)
        sender = yield endpoint.connect(Factory.forProtocol(Sender))

        def stop() -> None:
            sender.stopped = True
            if sender.transport is not None:
                sender.transport.abortConnection()

        self.addCleanup(stop)
        return sender

    @defer.inlineCallbacks
    def measure(self, factory: Any, window: float) -> Any:
        start, before = reactor.seconds(), factory.total
        yield sleep(window)
        return (factory.total - before) / (reactor.seconds() - start)

    @defer.inlineCallbacks
    def assertShaped(self, throttle: Any, factory: Any, label: str) -> Any:
        """*throttle* exists; once its one-second burst is spent (and the pipeline settled),
        the sink behind *factory* receives RATE_MBIT +/- 10 % over 2 s."""
        self.assertIsNotNone(throttle)
        yield wait_for(lambda: throttle.read_bucket.tokens <= 0, 10.0, "throttle engaged")
        yield sleep(0.5)
        measured = yield self.measure(factory, 2.0)
        expected = self.RATE_MBIT * 125_000
        twisted_log.msg(f"{label} measured {measured * 8 / 1e6:.2f} Mbit/s")
        self.assertTrue(abs(measured - expected) <= 0.10 * expected,
                        f"measured {measured * 8 / 1e6:.2f} Mbit/s, expected {self.RATE_MBIT} +/- 10%")

    @defer.inlineCallbacks
    def test_measurement_rate_20_mbit_through_tunnel_within_10_percent(self) -> Any:
        """Measurement: rate=20 on both ends gives 20 Mbit/s +/- 10 % over ~2 s."""
        factory, target = self.sink()
        q = f"&rate={self.RATE_MBIT}"
        pair = yield Pair(self, target, server_q=q, client_q=q).start()
        yield self.upload(pair)
        yield self.assertShaped(pair.ingress.policy.throttle, factory, "rate=20")
        self.assertGreater(pair.ingress.stats.tcprx, 0)

    @defer.inlineCallbacks
    def test_measurement_rate_20_mbit_single_end_within_10_percent(self) -> Any:
        """Measurement: a single-end client with rate=20 forwards at 20 Mbit/s +/- 10 %."""
        factory, target = self.sink()
        single = Single(self, target, f"&rate={self.RATE_MBIT}")
        yield wait_for(lambda: single.service.stats.mode == 1, 5.0, "listening")
        yield self.upload(single)
        yield self.assertShaped(single.service.policy.throttle, factory, "single-end rate=20")

    @defer.inlineCallbacks
    def test_rate_0_is_many_times_faster_than_the_limit(self) -> Any:
        """rate=0 (default): the same upload runs far above 20 Mbit/s (a ratio, not an absolute)."""
        factory, target = self.sink()
        pair = yield Pair(self, target).start()
        self.assertIsNone(pair.ingress.policy.throttle)
        yield self.upload(pair)
        yield wait_for(lambda: factory.total > 0, 10.0, "first bytes")
        yield sleep(0.2)
        measured = yield self.measure(factory, 1.0)
        ratio = measured / (self.RATE_MBIT * 125_000)
        twisted_log.msg(f"rate=0 measured {measured * 8 / 1e6:.2f} Mbit/s ({ratio:.1f}x)")
        self.assertGreater(ratio, 3.0, f"unlimited throughput only {ratio:.1f}x the 20 Mbit/s limit")


# == slot ==========================================================================================
class SlotTests(unittest.TestCase):
    timeout = 40

    @defer.inlineCallbacks
    def test_ingress_slot_2_refuses_third_tcp_and_counts_udp(self) -> Any:
        target = Target(self, udp=True)
        pair = yield Pair(self, target.addr, server_q="&slot=2").start()
        u1 = yield echo_once(self, pair.user_port, b"first user.")
        yield echo_once(self, pair.user_port, b"second user")
        self.assertEqual(len(target.sessions), 2)
        yield refused_before_target(self, pair.user_port, b"third user.", target)
        self.assertTrue(pair.has("server", "TCP slot limit reached: 2/2", Level.ERROR))
        # UDP sessions share the limit: no room for a UDP peer while two TCP sessions run.
        udp = yield udp_refused_by_slot(self, pair, "server", target)
        # One TCP session ends: its slot goes to the UDP peer.
        u1.transport.loseConnection()
        yield wait_for(lambda: pair.server.stats.tcps == 1, 10.0, "slot released")  # type: ignore[union-attr]
        reply = yield udp.ask(b"datagram", pair.user_port, timeout=5.0)
        self.assertEqual(reply, b"datagram")
        self.assertEqual(pair.server.stats.udps, 1)  # type: ignore[union-attr]

    @defer.inlineCallbacks
    def test_egress_slot_1_refuses_second_session(self) -> Any:
        target = Target(self)
        pair = yield Pair(self, target.addr, client_q="&slot=1").start()
        yield echo_once(self, pair.user_port, b"first user.")
        user = yield open_user(self, pair.user_port, b"second user")
        yield defer.Deferred.addTimeout(user.closed, 10, reactor)
        self.assertEqual(user.data, b"")
        self.assertEqual(len(target.sessions), 1)
        self.assertTrue(pair.has("client", "TCP slot limit reached: 1/1", Level.ERROR))

    @defer.inlineCallbacks
    def test_egress_udp_session_takes_a_slot(self) -> Any:
        target = Target(self, udp=True)
        pair = yield Pair(self, target.addr, client_q="&slot=1").start()
        user = yield echo_once(self, pair.user_port, b"first user.")
        udp = yield udp_refused_by_slot(self, pair, "client", target)
        user.transport.loseConnection()
        yield wait_for(lambda: pair.client.stats.tcps == 0, 10.0, "slot released")  # type: ignore[union-attr]
        # The refused peer's next datagram opens a new session that gets the free slot.
        reply = yield udp.ask(b"datagram", pair.user_port, timeout=5.0)
        self.assertEqual(reply, b"datagram")


# == read ==========================================================================================
class ReadTimeoutTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_read_500ms_closes_idle_keeps_active(self) -> Any:
        target = Target(self)
        q = "&read=500ms"
        pair = yield Pair(self, target.addr, server_q=q, client_q=q).start()
        idle = yield echo_once(self, pair.user_port, b"idle user...")
        active = yield echo_once(self, pair.user_port, b"active user.")
        sent = len(active.data)
        # The active user talks every 100 ms for 2 s: four times the idle timeout.
        for i in range(20):
            active.transport.write(b"tick %02d\n" % i)
            sent += 8
            yield sleep(0.1)
        self.assertTrue(idle.lost, "the idle connection was not closed")
        self.assertFalse(active.lost, "the active connection was closed")
        yield wait_for(lambda: len(active.data) >= sent, 5.0, "active echo")
        # Once it stops talking it is closed too.
        yield defer.Deferred.addTimeout(active.closed, 10, reactor)

    @defer.inlineCallbacks
    def test_read_single_end_closes_idle(self) -> Any:
        target = Target(self)
        single = Single(self, target.addr, "&read=500ms")
        yield wait_for(lambda: single.service.stats.mode == 1, 5.0, "listening")
        idle = yield echo_once(self, single.user_port, b"idle user...")
        yield defer.Deferred.addTimeout(idle.closed, 10, reactor)

    @defer.inlineCallbacks
    def test_read_0_keeps_idle_connection(self) -> Any:
        target = Target(self)
        pair = yield Pair(self, target.addr).start()
        idle = yield echo_once(self, pair.user_port, b"idle user...")
        yield sleep(1.5)
        self.assertFalse(idle.lost)


# == proxy =========================================================================================
class ProxyTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def _check(self, user_port: int, target: Target) -> Any:
        user = yield open_user(self, user_port, b"hello", bind="127.0.0.2")
        yield wait_for(lambda: bool(target.sessions) and target.sessions[0].data.endswith(b"hello"), 10.0, "data")
        header = f"PROXY TCP4 127.0.0.2 127.0.0.1 {user.local_port} {target.port}\r\n".encode()
        self.assertEqual(target.sessions[0].data, header + b"hello")

    @defer.inlineCallbacks
    def test_reverse_egress_client_sends_v1_header_with_real_source(self) -> Any:
        target = Target(self, echo=False)
        pair = yield Pair(self, target.addr, client_q="&proxy=1").start()
        yield self._check(pair.user_port, target)

    @defer.inlineCallbacks
    def test_forward_egress_server_sends_v1_header(self) -> Any:
        target = Target(self, echo=False)
        pair = yield Pair(self, target.addr, flow="+", server_q="&proxy=1").start()
        yield self._check(pair.user_port, target)

    @defer.inlineCallbacks
    def test_single_end_sends_v1_header(self) -> Any:
        target = Target(self, echo=False)
        single = Single(self, target.addr, "&proxy=1")
        yield wait_for(lambda: single.service.stats.mode == 1, 5.0, "listening")
        yield self._check(single.user_port, target)

    @defer.inlineCallbacks
    def test_proxy_0_sends_no_header(self) -> Any:
        target = Target(self, echo=False)
        pair = yield Pair(self, target.addr).start()
        yield open_user(self, pair.user_port, b"hello")
        yield wait_for(lambda: bool(target.sessions) and target.sessions[0].data == b"hello", 10.0, "data")


# == block =========================================================================================
class BlockTests(unittest.TestCase):
    timeout = 40

    @defer.inlineCallbacks
    def _check_block(self, block: str, refused: list[tuple[bytes, str]], passed: list[bytes], flow: str = "-") -> Any:
        target = Target(self)
        q = f"&block={block}"
        pair = yield Pair(self, target.addr, flow=flow, server_q=q if flow == "-" else "",
                          client_q=q if flow == "+" else "").start()
        who = "server" if flow == "-" else "client"
        for payload, name in refused:
            yield refused_before_target(self, pair.user_port, payload, target)
            self.assertTrue(pair.has(who, f"blocked {name} protocol from 127.0.0.1:", Level.WARN), name)
        for payload in passed:
            user = yield echo_once(self, pair.user_port, payload)
            user.transport.loseConnection()

    def test_block_3_refuses_tls_passes_plain(self) -> Any:
        return self._check_block("3", [(TLS_HELLO, "TLS")], [PLAIN, HTTP_GET, SOCKS5_HELLO])

    def test_block_1_refuses_socks5(self) -> Any:
        return self._check_block("1", [(SOCKS5_HELLO, "SOCKS5")], [PLAIN, HTTP_GET, TLS_HELLO])

    def test_block_2_refuses_http(self) -> Any:
        return self._check_block("2", [(HTTP_GET, "HTTP")], [PLAIN, SOCKS5_HELLO])

    def test_block_13_refuses_socks_and_tls(self) -> Any:
        return self._check_block("13", [(SOCKS5_HELLO, "SOCKS5"), (TLS_HELLO, "TLS")], [PLAIN, HTTP_GET])

    def test_block_on_forward_ingress_client(self) -> Any:
        return self._check_block("2", [(HTTP_GET, "HTTP")], [PLAIN], flow="+")

    @defer.inlineCallbacks
    def test_short_first_bytes_are_not_stuck(self) -> Any:
        """A client that sends fewer than 8 bytes and waits still gets through (bounded sniff)."""
        target = Target(self)
        pair = yield Pair(self, target.addr, server_q="&block=3").start()
        yield echo_once(self, pair.user_port, b"hi")


# == notcp / noudp ===================================================================================
class NoProtocolTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_notcp_ingress_refuses_tcp_udp_works(self) -> Any:
        target = Target(self, udp=True)
        pair = yield Pair(self, target.addr, server_q="&notcp=1").start()
        yield wait_for(lambda: pair.server.session._udp_ingress is not None, 5.0, "udp")  # type: ignore[union-attr]
        yield self.assertFailure(open_user(self, pair.user_port, b"x"), ConnectionRefusedError)
        reply = yield udp_user(self).ask(b"over udp", pair.user_port)
        self.assertEqual(reply, b"over udp")
        self.assertEqual(target.sessions, [])

    @defer.inlineCallbacks
    def test_noudp_ingress_drops_udp_tcp_works(self) -> Any:
        target = Target(self, udp=True)
        pair = yield Pair(self, target.addr, server_q="&noudp=1").start()
        yield echo_once(self, pair.user_port, PLAIN)
        yield self.assertFailure(udp_user(self).ask(b"over udp", pair.user_port, timeout=1.0),
                                 defer.TimeoutError)
        self.assertEqual(target.datagrams, [])

    @defer.inlineCallbacks
    def test_notcp_egress_ignores_tcp_signal(self) -> Any:
        target = Target(self, udp=True)
        pair = yield Pair(self, target.addr, client_q="&notcp=1").start()
        user = yield open_user(self, pair.user_port, PLAIN)
        reply = yield udp_user(self).ask(b"over udp", pair.user_port)
        self.assertEqual(reply, b"over udp")
        yield sleep(0.5)
        self.assertEqual(target.sessions, [])
        self.assertEqual(user.data, b"")

    @defer.inlineCallbacks
    def test_noudp_egress_ignores_udp_signal(self) -> Any:
        target = Target(self, udp=True)
        pair = yield Pair(self, target.addr, client_q="&noudp=1").start()
        yield self.assertFailure(udp_user(self).ask(b"over udp", pair.user_port, timeout=1.0),
                                 defer.TimeoutError)
        self.assertEqual(target.datagrams, [])
        yield echo_once(self, pair.user_port, PLAIN)

    @defer.inlineCallbacks
    def test_noudp_single_end_does_not_listen_udp(self) -> Any:
        target = Target(self, udp=True)
        single = Single(self, target.addr, "&noudp=1")
        yield wait_for(lambda: single.service.stats.mode == 1, 5.0, "listening")
        yield echo_once(self, single.user_port, PLAIN)
        yield self.assertFailure(udp_user(self).ask(b"over udp", single.user_port, timeout=1.0),
                                 defer.TimeoutError)
        self.assertEqual(target.datagrams, [])


# == dial ==========================================================================================
class DialTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_dial_source_address_reverse(self) -> Any:
        target = Target(self)
        pair = yield Pair(self, target.addr, client_q="&dial=127.0.0.2").start()
        yield echo_once(self, pair.user_port)
        self.assertEqual(target.sessions[0].peer.host, "127.0.0.2")

    @defer.inlineCallbacks
    def test_dial_source_address_forward_and_udp(self) -> Any:
        target = Target(self, udp=True)
        seen: list[str] = []
        orig = target.udp.protocol.datagramReceived

        def spy(datagram: bytes, addr: Any) -> None:
            seen.append(addr[0])
            orig(datagram, addr)

        target.udp.protocol.datagramReceived = spy
        pair = yield Pair(self, target.addr, flow="+", server_q="&dial=127.0.0.2").start()
        yield echo_once(self, pair.user_port)
        self.assertEqual(target.sessions[0].peer.host, "127.0.0.2")
        reply = yield udp_user(self).ask(b"udp", pair.user_port)
        self.assertEqual(reply, b"udp")
        self.assertEqual(seen, ["127.0.0.2"])

    @defer.inlineCallbacks
    def test_dial_single_end(self) -> Any:
        target = Target(self)
        single = Single(self, target.addr, "&dial=127.0.0.2")
        yield wait_for(lambda: single.service.stats.mode == 1, 5.0, "listening")
        yield echo_once(self, single.user_port)
        self.assertEqual(target.sessions[0].peer.host, "127.0.0.2")

    @defer.inlineCallbacks
    def test_unusable_dial_address_falls_back_to_auto(self) -> Any:
        target = Target(self)
        pair = yield Pair(self, target.addr, client_q="&dial=192.0.2.77").start()
        yield echo_once(self, pair.user_port)
        self.assertEqual(target.sessions[0].peer.host, "127.0.0.1")
        self.assertTrue(pair.has("client", "fallback to system auto due to dialer failure", Level.ERROR))

    def test_bad_dial_is_a_clear_error(self) -> None:
        for bad in ("nope", "300.1.1.1", "example.com"):
            with self.assertRaises(URLError) as ctx:
                parse_tunnel_url(f"client://k@127.0.0.1:10101/127.0.0.1:80?dial={bad}")
            self.assertIn("dial", str(ctx.exception))
            self.assertIn(bad, str(ctx.exception))
        # The command line refuses it before anything starts.
        import io
        from unittest import mock

        from nodepass import cli

        out, err = io.StringIO(), io.StringIO()
        with mock.patch.object(cli.sys, "stdout", out), mock.patch.object(cli.sys, "stderr", err):
            status = cli.main(["client://k@127.0.0.1:10101/127.0.0.1:80?dial=eth0"])
        self.assertEqual(status, 1)
        self.assertIn("invalid URL: invalid dial='eth0'", err.getvalue())


# == dns ===========================================================================================
class DnsTests(unittest.TestCase):
    """A target given by name is resolved through the DNS cache (TTL behaviour:
    tests.test_datapath_units.DNSCacheTests.test_ttl / test_zero_ttl_always_resolves)."""

    timeout = 30

    @defer.inlineCallbacks
    def test_localhost_target_dual_end(self) -> Any:
        target = Target(self)
        pair = yield Pair(self, f"localhost:{target.port}", client_q="&dns=30s").start()
        yield echo_once(self, pair.user_port)
        self.assertEqual(len(target.sessions), 1)

    @defer.inlineCallbacks
    def test_localhost_tunnel_host(self) -> Any:
        """The client resolves a named tunnel host for the handshake and every pool dial."""
        target = Target(self)
        pair = yield Pair(self, target.addr, client_host="localhost", client_q="&dns=1m").start()
        yield echo_once(self, pair.user_port)
        # The effective server name defaults to the named tunnel host (the `config` string
        # keeps the literal default `sni=none`, as the Go master writes it).
        self.assertTrue(pair.has("client", "&sni=localhost&"))

    @defer.inlineCallbacks
    def test_localhost_target_single_end(self) -> Any:
        target = Target(self)
        single = Single(self, f"localhost:{target.port}", "&dns=0")
        yield wait_for(lambda: single.service.stats.mode == 1, 5.0, "listening")
        yield echo_once(self, single.user_port)
        yield echo_once(self, single.user_port)
        self.assertEqual(len(target.sessions), 2)


# == multi-target / lbs ===========================================================================
def dead_addr() -> str:
    return f"127.0.0.1:{free_port()}"


class LbsTests(unittest.TestCase):
    timeout = 40

    @defer.inlineCallbacks
    def test_lbs0_fails_over_to_live_target(self) -> Any:
        alive = Target(self)
        pair = yield Pair(self, f"{dead_addr()},{alive.addr}", client_q="&lbs=0").start()
        for i in range(4):
            yield echo_once(self, pair.user_port, b"round %d....." % i)
        self.assertEqual(len(alive.sessions), 4)

    @defer.inlineCallbacks
    def test_lbs0_round_robin_spreads_connections(self) -> Any:
        first, second = Target(self), Target(self)
        pair = yield Pair(self, f"{first.addr},{second.addr}").start()
        for i in range(4):
            yield echo_once(self, pair.user_port, b"round %d....." % i)
        self.assertEqual((len(first.sessions), len(second.sessions)), (2, 2))

    @defer.inlineCallbacks
    def test_lbs2_primary_while_up_backup_when_down(self) -> Any:
        primary, backup = Target(self), Target(self)
        pair = yield Pair(self, f"{primary.addr},{backup.addr}", client_q="&lbs=2").start()
        for _ in range(3):
            yield echo_once(self, pair.user_port)
        self.assertEqual((len(primary.sessions), len(backup.sessions)), (3, 0))
        yield primary.stop()
        for _ in range(2):
            yield echo_once(self, pair.user_port)
        self.assertEqual((len(primary.sessions), len(backup.sessions)), (3, 2))

    @defer.inlineCallbacks
    def test_lbs1_dual_end_probes_every_tick_and_prefers_the_live_target(self) -> Any:
        alive = Target(self)
        pair = yield Pair(self, f"{dead_addr()},{alive.addr}", client_q="&lbs=1").start()
        policy = pair.egress.policy
        # No user connection yet: only the health-loop probes can find the live target.
        yield wait_for(lambda: policy.selector.preferred == 1 and 1 in policy.selector.latency, 5.0, "probe")
        calls: list[int] = []
        real = policy.probe_latency

        def counting() -> Any:
            calls.append(1)
            return real()

        policy.probe_latency = counting
        yield sleep(1.0)
        self.assertGreaterEqual(len(calls), 2, "lbs=1 probes are not sent every report tick")
        self.assertEqual(pair.ingress.policy.selector.latency, {}, "the ingress side must not probe")
        yield echo_once(self, pair.user_port)
        self.assertEqual(len(alive.sessions), 1)
        self.assertFalse(pair.has("client", "Target dial failed"))

    @defer.inlineCallbacks
    def test_lbs2_returns_to_primary_after_fallback_interval(self) -> Any:
        primary, backup = Target(self), Target(self)
        port = primary.port
        settings = Settings(report_interval=0.2, service_cooldown=0.2, handshake_timeout=2.0,
                            pool_get_timeout=2.0, fallback_interval=0.5)
        pair = yield Pair(self, f"{primary.addr},{backup.addr}", client_q="&lbs=2", settings=settings).start()
        yield primary.stop()
        yield echo_once(self, pair.user_port)
        self.assertEqual(len(backup.sessions), 1)
        # The primary comes back on the same port; after the fallback interval it is used again.
        revived = Target(self, port=port)
        yield sleep(0.6)
        yield echo_once(self, pair.user_port)
        yield echo_once(self, pair.user_port)
        self.assertEqual((len(revived.sessions), len(backup.sessions)), (2, 1))

    @defer.inlineCallbacks
    def test_lbs1_forward_mode_server_probes(self) -> Any:
        alive = Target(self)
        pair = yield Pair(self, f"{dead_addr()},{alive.addr}", flow="+", server_q="&lbs=1").start()
        selector = pair.server.policy.selector  # type: ignore[union-attr]
        yield wait_for(lambda: selector.preferred == 1 and 1 in selector.latency, 5.0, "server probe")
        self.assertEqual(pair.client.policy.selector.latency, {})  # type: ignore[union-attr]
        yield echo_once(self, pair.user_port)
        self.assertEqual(len(alive.sessions), 1)

    @defer.inlineCallbacks
    def test_lbs1_prefers_the_faster_target(self) -> Any:
        """Both targets up; the probe reports the second as faster, so dials go there."""
        first, second = Target(self), Target(self)
        pair = yield Pair(self, f"{first.addr},{second.addr}", client_q="&lbs=1").start()
        dialer = pair.egress.policy.dialer
        dialer._probe_one = lambda idx: defer.succeed(0.001 if idx == 1 else 0.050)
        yield wait_for(lambda: dialer.selector.preferred == 1, 5.0, "preferred")
        for _ in range(3):
            yield echo_once(self, pair.user_port)
        self.assertEqual((len(first.sessions), len(second.sessions)), (0, 3))

    @defer.inlineCallbacks
    def test_single_end_ping_is_best_probe_latency(self) -> Any:
        first, second = Target(self), Target(self)
        single = Single(self, f"{first.addr},{second.addr}", "&lbs=1")
        yield wait_for(lambda: single.service.stats.mode == 1, 5.0, "listening")
        dialer = single.service.policy.dialer
        dialer._probe_one = lambda idx: defer.succeed(0.042 if idx == 1 else None)
        yield wait_for(lambda: single.has("client", "CHECK_POINT|MODE=1|PING=42ms|POOL=0"), 5.0, "PING=42ms")
        self.assertEqual(dialer.selector.preferred, 1)
        yield echo_once(self, single.user_port)
        self.assertEqual((len(first.sessions), len(second.sessions)), (0, 1))


# == sni ===========================================================================================
class HandshakeRecorder(Protocol):
    def connectionMade(self) -> None:
        self.factory.requests.append(b"")  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.factory.requests[-1] += data  # type: ignore[attr-defined]
        if b"\r\n\r\n" in self.factory.requests[-1]:  # type: ignore[attr-defined]
            self.transport.loseConnection()  # type: ignore[union-attr]


class SniTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def _handshake_host(self, query: str) -> Any:
        factory = Factory.forProtocol(HandshakeRecorder)
        factory.requests = []  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        logs = NamedLogs()
        url = f"client://secret@127.0.0.1:{port.getHost().port}/127.0.0.1:1?mode=2{query}"
        svc = make_tunnel_service(parse_tunnel_url(url), reactor=reactor, logger=logs.logger("client"),
                                  settings=FAST)
        self.addCleanup(lambda: svc.running and svc.stopService())
        svc.startService()
        yield wait_for(lambda: any(b"\r\n\r\n" in r for r in factory.requests), 5.0, "handshake request")
        return [r for r in factory.requests if r][0]

    @defer.inlineCallbacks
    def test_sni_is_the_handshake_host(self) -> Any:
        request = yield self._handshake_host("&sni=np-test.example")
        self.assertIn(b"\r\nHost: np-test.example\r\n", request)
        request = yield self._handshake_host("")
        self.assertIn(b"\r\nHost: none\r\n", request)

    def _server_names(self, pair: Pair) -> set[Any]:
        pool = pair.server.session.pool  # type: ignore[union-attr]
        return {c.transport.server_name for c in pool._conns if c.transport is not None}

    @defer.inlineCallbacks
    def test_tls2_pool_connections_send_sni(self) -> Any:
        d = tempfile.mkdtemp()
        crt, key, _der = make_cert_files(d, cn="np-test.example", names=("np-test.example",))
        old = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = crt
        self.addCleanup(lambda: os.environ.pop("SSL_CERT_FILE", None) if old is None
                        else os.environ.__setitem__("SSL_CERT_FILE", old))
        target = Target(self)
        pair = yield Pair(self, target.addr, tls=2, server_q=f"&crt={crt}&key={key}",
                          client_q="&sni=np-test.example").start()
        yield echo_once(self, pair.user_port)
        self.assertEqual(self._server_names(pair), {"np-test.example"})

    @defer.inlineCallbacks
    def test_tls1_sends_no_sni(self) -> Any:
        """tls=1 skips verification and, as NodePass, sends no SNI even with sni= set."""
        target = Target(self)
        pair = yield Pair(self, target.addr, tls=1, client_q="&sni=np-test.example").start()
        yield echo_once(self, pair.user_port)
        self.assertEqual(self._server_names(pair), {None})


# == config string ===================================================================================
class CanonicalTests(unittest.TestCase):
    def test_every_parameter_in_config_string(self) -> None:
        client = parse_tunnel_url(
            "client://k@127.0.0.1:1/a.example:2,127.0.0.1:3?sni=x.example&lbs=2&dns=30s&dial=127.0.0.2"
            "&read=500ms&rate=20&slot=2&proxy=1&block=13&notcp=1").canonical()
        for part in ("sni=x.example", "lbs=2", "dns=30s", "dial=127.0.0.2", "read=500ms", "rate=20",
                     "slot=2", "proxy=1", "block=13", "notcp=1", "noudp=0"):
            self.assertIn(part, client)
        server = parse_tunnel_url(
            "server://k@127.0.0.1:1/a.example:2,127.0.0.1:3?lbs=1&dns=1m&dial=::1&read=1s&rate=5"
            "&slot=9&proxy=0&block=2&noudp=1").canonical()
        server = unquote(server)
        for part in ("lbs=1", "dns=1m0s", "dial=::1", "read=1s", "rate=5", "slot=9", "proxy=0", "block=2",
                     "notcp=0", "noudp=1"):
            self.assertIn(part, server)
