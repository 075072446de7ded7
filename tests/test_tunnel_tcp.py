"""Dual-end tunnels over the TCP pool on real sockets: handshake, modes, TLS, load,
restart, refusal of bad input on the tunnel port."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from nodepass.env import Settings
from nodepass.log import Level, LogRecord
from nodepass.relay import RelayProtocol, join
from nodepass.tunnel import TunnelService, make_tunnel_service
from nodepass.tunnel.handshake import TunnelConfig, auth_token, build_request, parse_response
from nodepass.url import parse_tunnel_url
from tests import support
from tests.support import (
    FAST,
    Echo,
    NamedLogs,
    RawClient,
    UdpEcho,
    UdpUser,
    connect,
    echo_server,
    free_port,
    free_ports,
    make_cert_files,
    quiet_logger,
    silent_listener,
    sleep,
)

reactor: Any = _reactor

def wait_for(cond: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> defer.Deferred[Any]:
    """:func:`tests.support.wait_for` with this module's longer default timeout."""
    return support.wait_for(cond, timeout, what)


class Collector(Protocol):
    """Client side of a user connection: sends a payload, collects the echo."""

    def __init__(self, payload: bytes, expect: int) -> None:
        self.payload = payload
        self.expect = expect
        self.got: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        if self.payload:
            self.transport.write(self.payload)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.got.append(data)
        self.size += len(data)
        if self.size >= self.expect and not self.done.called:
            self.done.callback(b"".join(self.got))
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(b"".join(self.got))
        self.closed.callback(None)


@defer.inlineCallbacks
def echo_through(port: int, payload: bytes) -> Any:
    proto = Collector(payload, len(payload))
    yield connect(port, proto)
    data = yield proto.done
    yield proto.closed
    return data


class Tunnel(NamedLogs):
    """A server and a client service wired to an echo target."""

    def __init__(
        self,
        test: unittest.TestCase,
        *,
        tls: int = 0,
        flow: str = "-",
        server_key: str = "secret",
        client_key: str = "secret",
        server_extra: str = "",
        client_extra: str = "",
        settings: Settings = FAST,
    ) -> None:
        self.test = test
        self.settings = settings
        super().__init__()
        self.echo_port = reactor.listenTCP(0, Factory.forProtocol(Echo), backlog=1024, interface="127.0.0.1")
        test.addCleanup(self.echo_port.stopListening)
        echo = self.echo_port.getHost().port
        self.tunnel_port, self.user_port = free_ports(2)
        if flow == "-":
            server_target, client_target, smode = self.user_port, echo, 1
        else:
            server_target, client_target, smode = echo, self.user_port, 2
        self.server_url = (
            f"server://{server_key}@127.0.0.1:{self.tunnel_port}/127.0.0.1:{server_target}"
            f"?tls={tls}&mode={smode}{server_extra}"
        )
        self.client_url = (
            f"client://{client_key}@127.0.0.1:{self.tunnel_port}/127.0.0.1:{client_target}"
            f"?mode=2&min=8{client_extra}"
        )
        self.flow = flow
        self.server: TunnelService | None = None
        self.client: TunnelService | None = None

    def make(self, name: str) -> TunnelService:
        url = self.server_url if name == "server" else self.client_url
        svc = make_tunnel_service(parse_tunnel_url(url), reactor=reactor, logger=self.logger(name),
                                  settings=self.settings)
        self.test.addCleanup(lambda: svc.running and svc.stopService())
        return svc

    def start_server(self) -> TunnelService:
        self.server = self.make("server")
        self.server.startService()
        return self.server

    def start_client(self) -> TunnelService:
        self.client = self.make("client")
        self.client.startService()
        return self.client

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.start_server()
        self.start_client()
        yield self.ready()

    def new_session(self, name: str, old: Any, what: str) -> defer.Deferred[Any]:
        """Wait (15 s) until service *name* runs a session other than *old*, with its control connection."""

        def replaced() -> bool:
            svc: TunnelService | None = getattr(self, name)
            session = svc.session if svc is not None else None
            return session is not old and session is not None and session.control is not None

        return wait_for(replaced, what=what)

    def ingress(self) -> TunnelService | None:
        return self.server if self.flow == "-" else self.client

    @defer.inlineCallbacks
    def ready(self, timeout: float = 15.0) -> Any:
        def ok() -> bool:
            svc = self.ingress()
            s = svc.session if svc is not None else None
            return bool(s is not None and s._ingress_open and s._listeners and s.control is not None
                        and (self.flow == "+" or len(s._listeners) >= 2))

        yield wait_for(ok, timeout, "tunnel ready")


class HandshakeUnitTests(unittest.TestCase):
    def test_token_vectors(self) -> None:
        self.assertEqual(auth_token("secret"), "f9e66e179b6747ae54108f82f8ade8b3c25d76fd30afde6c395822c530196169")
        self.assertEqual(auth_token("e68be2b4"), "8940572756af096447802f92b4c843ac61de93b80af9d37a85ed994508656d7e")

    def test_request_bytes(self) -> None:
        self.assertEqual(
            build_request("secret", "none"),
            b"GET / HTTP/1.1\r\nHost: none\r\nUser-Agent: Go-http-client/1.1\r\n"
            b"Authorization: Bearer f9e66e179b6747ae54108f82f8ade8b3c25d76fd30afde6c395822c530196169\r\n"
            b"Accept-Encoding: gzip\r\n\r\n",
        )

    def test_config_body_is_go_json(self) -> None:
        self.assertEqual(TunnelConfig("-", 1024, "1", "0").body(), b'{"flow":"-","max":1024,"tls":"1","type":"0"}\n')

    def test_parse_response(self) -> None:
        body = b'{"flow":"+","max":7,"tls":"2","type":"0"}\n'
        resp = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        self.assertEqual(parse_response(resp), TunnelConfig("+", 7, "2", "0"))
        from nodepass.tunnel.handshake import HandshakeError

        self.assertRaises(HandshakeError, parse_response, b"HTTP/1.1 401 Unauthorized\r\n\r\nUnauthorized\n")
        self.assertRaises(HandshakeError, parse_response, b"HTTP/1.1 200 OK\r\n\r\n{\"max\":\"x\"}")
        self.assertRaises(HandshakeError, parse_response, b"garbage")


class EchoTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def _echo(self, tls: int, flow: str, **kw: Any) -> Any:
        t = Tunnel(self, tls=tls, flow=flow, **kw)
        yield t.start()
        payload = os.urandom(300_000)
        data = yield echo_through(t.user_port, payload)
        self.assertEqual(hashlib.sha256(data).hexdigest(), hashlib.sha256(payload).hexdigest())
        # Counters: the ingress counts the user side, the egress the target side.
        yield wait_for(lambda: t.server.stats.tcprx == len(payload) and t.client.stats.tcprx == len(payload),
                       what="counters")
        for svc in (t.server, t.client):
            self.assertEqual(svc.stats.tcprx, len(payload))
            self.assertEqual(svc.stats.tcptx, len(payload))
        self.assertEqual(t.server.stats.mode, 1 if flow == "-" else 2)
        self.assertEqual(t.client.stats.mode, 2)
        yield wait_for(lambda: t.has("server", "CHECK_POINT|MODE=") and t.has("client", "CHECK_POINT|MODE="),
                       what="checkpoints")
        if os.environ.get("NP_TEST_DUMP") and any(r.level == Level.ERROR for n, r in t.records):
            with open(os.environ["NP_TEST_DUMP"], "w") as f:
                for n, r in t.records:
                    f.write(f"{r.time:.3f} {n} {r.level.name} {r.text}\n")
        self.assertEqual([(n, r.text) for n, r in t.records if r.level == Level.ERROR], [])
        self.assertTrue(t.has("server", f"Sending tunnel config: FLOW={flow}|MAX=1024|TLS={tls}|TYPE=0"))
        self.assertTrue(t.has("client", f"Loading tunnel config: FLOW={flow}|MAX=1024|TLS={tls}|TYPE=0"))
        self.assertTrue(t.has("server", "Marking tunnel handshake as complete in "))
        return t

    def test_reverse_tls0(self) -> Any:
        return self._echo(0, "-")

    def test_forward_tls0(self) -> Any:
        return self._echo(0, "+")

    @defer.inlineCallbacks
    def test_reverse_tls1(self) -> Any:
        t = yield self._echo(1, "-")
        yield wait_for(lambda: t.has("server", "TLS certificate fingerprint verified: sha256:")
                       and t.has("client", "TLS certificate fingerprint verified: sha256:"), what="verify")

    def test_forward_tls1(self) -> Any:
        return self._echo(1, "+")

    def _tls2(self, flow: str) -> Any:
        d = tempfile.mkdtemp()
        crt, key, _der = make_cert_files(d, cn="localhost", names=("localhost",))
        old = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = crt

        def restore() -> None:
            if old is None:
                os.environ.pop("SSL_CERT_FILE", None)
            else:
                os.environ["SSL_CERT_FILE"] = old

        self.addCleanup(restore)
        return self._echo(2, flow, server_extra=f"&crt={crt}&key={key}", client_extra="&sni=localhost")

    def test_reverse_tls2(self) -> Any:
        return self._tls2("-")

    def test_forward_tls2(self) -> Any:
        return self._tls2("+")


class LoadTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_200_concurrent_1mib(self) -> Any:
        # The payloads and their digests are made before the tunnel starts and
        # checked after it stopped: hashing 200 MiB blocks the reactor for
        # seconds on a loaded machine, longer than the control channel's
        # 3-interval read timeout.
        n, size = 200, 1 << 20
        payloads = [os.urandom(size) for _ in range(n)]
        digests = [hashlib.sha256(p).digest() for p in payloads]
        settings = Settings(report_interval=2.0, service_cooldown=0.5, pool_get_timeout=20.0)
        t = Tunnel(self, flow="-", settings=settings)
        t.client_url = t.client_url.replace("min=8", "min=256")
        yield t.start()
        protos = [Collector(p, size) for p in payloads]
        yield defer.gatherResults([connect(t.user_port, p) for p in protos])
        results = yield defer.gatherResults([p.done for p in protos])
        yield defer.gatherResults([p.closed for p in protos])
        total = n * size
        yield wait_for(lambda: t.server.stats.tcptx == total and t.client.stats.tcptx == total, 30, "counters")
        self.assertEqual(t.server.stats.tcprx, total)
        self.assertEqual(t.client.stats.tcprx, total)
        self.assertFalse(t.has("server", "Server error"))
        yield t.server.stopService()
        yield t.client.stopService()
        self.assertEqual([hashlib.sha256(got).digest() for got in results], digests)
        self.assertFalse(t.has("client", "Client error"))


class RestartTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_client_reconnects_after_server_restart(self) -> Any:
        t = Tunnel(self, flow="-")
        yield t.start()
        data = yield echo_through(t.user_port, b"before")
        self.assertEqual(data, b"before")
        old_client_session = t.client.session
        yield t.server.stopService()
        yield wait_for(lambda: t.has("client", "Client error: ", Level.ERROR), what="client error")
        t.start_server()
        yield t.new_session("client", old_client_session, "client reconnect")
        yield t.ready()
        data = yield echo_through(t.user_port, b"after" * 1000)
        self.assertEqual(data, b"after" * 1000)
        self.assertTrue(t.has("client", "Client restart: client://"))

    @defer.inlineCallbacks
    def test_server_restarts_when_control_drops(self) -> Any:
        t = Tunnel(self, flow="-")
        yield t.start()
        session = t.server.session
        yield wait_for(lambda: t.client.session is not None and t.client.session.control is not None,
                       what="client control channel")
        t.client.session.control.conn.abort()
        yield wait_for(lambda: t.has("server", "Server error: ", Level.ERROR), what="server error")
        yield t.new_session("server", session, "server back")
        yield t.ready()
        data = yield echo_through(t.user_port, b"x" * 5000)
        self.assertEqual(data, b"x" * 5000)


class BadInputTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_wrong_key_refused(self) -> Any:
        t = Tunnel(self, client_key="wrong")
        t.start_server()
        t.start_client()
        yield wait_for(lambda: t.has("client", "Client error: ", Level.ERROR), what="client error")
        self.assertTrue(any("status 401" in x for x in t.texts("client", Level.ERROR)))
        self.assertTrue(t.has("server", "unauthorized", Level.WARN))
        self.assertIsNone(t.server.session.pool)

    @defer.inlineCallbacks
    def test_http_errors_before_handshake(self) -> Any:
        t = Tunnel(self)
        t.start_server()
        yield wait_for(lambda: t.server.session is not None and t.server.session.phase == "handshake")
        cases = [
            (b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 404 Not Found\r\n", b"Not Found\n"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"HTTP/1.1 405 ", b"Method Not Allowed\n"),
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 401 ", b"Unauthorized\n"),
            (b"GET / HTTP/1.1\r\nAuthorization: Bearer " + auth_token("nope").encode() + b"\r\n\r\n",
             b"HTTP/1.1 401 ", b"Unauthorized\n"),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(40), b"HTTP/1.1 400 ", b"Bad Request\n"),
        ]
        for request, status, body in cases:
            raw = RawClient(request)
            yield connect(t.tunnel_port, raw)
            yield raw.closed
            self.assertTrue(raw.data.startswith(status), raw.data)
            self.assertTrue(raw.data.endswith(body), raw.data)
            self.assertIn(b"Connection: close\r\n", raw.data)
        # A silent connection is closed after the handshake timeout.
        silent = RawClient()
        yield connect(t.tunnel_port, silent)
        yield silent.closed
        self.assertTrue(t.has("server", "timed out", Level.WARN))
        # The server still takes a real client.
        t.start_client()
        yield t.ready()
        data = yield echo_through(t.user_port, b"fine")
        self.assertEqual(data, b"fine")

    @defer.inlineCallbacks
    def test_garbage_flood_during_live_transfer(self) -> Any:
        settings = Settings(report_interval=2.0, service_cooldown=0.2, pool_get_timeout=3.0)
        t = Tunnel(self, flow="-", settings=settings)
        yield t.start()
        # A live exchange that keeps going during the flood.
        live = Collector(b"", 1 << 30)
        yield connect(t.user_port, live)
        sent = [0]
        chunk = os.urandom(4096)

        def pump() -> None:
            live.transport.write(chunk)  # type: ignore[union-attr]
            sent[0] += len(chunk)

        loop = task.LoopingCall(pump)
        loop.start(0.01)
        garbage_kinds = [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            os.urandom(64),
            b"\x16\x03\x01\x00\x05hello",
            b"",
        ]
        for _batch in range(10):
            raws = []
            for i in range(100):
                raw = RawClient(garbage_kinds[i % len(garbage_kinds)])
                bind = "127.0.0.2" if i % 2 else None
                raws.append(raw)
                connect(t.tunnel_port, raw, bind=bind).addErrback(lambda f, r=raw: r.closed.callback(None))
            yield sleep(0.05)
            for raw in raws:
                if raw.transport is not None and not raw.closed.called:
                    raw.transport.abortConnection()  # type: ignore[union-attr]
            yield defer.gatherResults([r.closed for r in raws])
        loop.stop()
        yield wait_for(lambda: live.size == sent[0], 20, "live echo complete")
        self.assertEqual(live.size, sent[0])
        live.transport.loseConnection()  # type: ignore[union-attr]
        yield live.closed
        self.assertFalse(t.has("server", "Server error"))
        self.assertFalse(t.has("client", "Client error"))
        self.assertTrue(t.has("server", "is not the handshaken client", Level.WARN))
        # New exchanges still work.
        for _ in range(5):
            data = yield echo_through(t.user_port, b"still-good" * 100)
            self.assertEqual(data, b"still-good" * 100)

    @defer.inlineCallbacks
    def test_http_after_handshake_from_other_ip_is_closed(self) -> Any:
        t = Tunnel(self)
        yield t.start()
        raw = RawClient(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        yield connect(t.tunnel_port, raw, bind="127.0.0.2")
        yield raw.closed
        self.assertEqual(raw.data, b"")
        data = yield echo_through(t.user_port, b"ok")
        self.assertEqual(data, b"ok")


class ModeTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_auto_mode_picks_reverse_then_forward(self) -> Any:
        t = Tunnel(self)
        t.server_url = t.server_url.replace("mode=1", "mode=0")
        yield t.start()
        self.assertEqual(t.server.stats.mode, 1)
        self.assertTrue(t.has("server", "FLOW=-"))
        # Target port already taken (the echo server itself): forward mode.
        echo = t.echo_port.getHost().port
        t2 = Tunnel(self, flow="+")
        t2.server_url = f"server://secret@127.0.0.1:{t2.tunnel_port}/127.0.0.1:{echo}?mode=0"
        yield t2.start()
        self.assertEqual(t2.server.stats.mode, 2)
        data = yield echo_through(t2.user_port, b"fwd")
        self.assertEqual(data, b"fwd")


class UdpThroughTunnelTests(unittest.TestCase):
    timeout = 30

    def test_udp_reverse(self) -> Any:
        return self._udp("-")

    def test_udp_forward(self) -> Any:
        return self._udp("+")

    @defer.inlineCallbacks
    def _udp(self, flow: str) -> Any:
        t = Tunnel(self, flow=flow)
        echo = t.echo_port.getHost().port
        try:
            uport = reactor.listenUDP(echo, UdpEcho(), interface="127.0.0.1")
        except Exception:
            raise unittest.SkipTest("UDP port of the echo target is taken") from None
        self.addCleanup(uport.stopListening)
        yield t.start()
        user = UdpUser()
        sock = reactor.listenUDP(0, user, interface="127.0.0.1")
        self.addCleanup(sock.stopListening)
        for i in range(5):
            sock.write(b"dgram-%d" % i, ("127.0.0.1", t.user_port))
            yield wait_for(lambda i=i: len(user.replies) == i + 1, 10, "udp echo")
        self.assertEqual(user.replies, [b"dgram-%d" % i for i in range(5)])
        ingress = t.server if flow == "-" else t.client
        self.assertEqual(ingress.stats.udprx, sum(len(b"dgram-%d" % i) for i in range(5)))
        self.assertEqual(ingress.stats.udptx, ingress.stats.udprx)


class RelayTests(unittest.TestCase):
    """join() on real sockets: byte counts, peek, idle timeout, throttle charging."""

    timeout = 20

    @defer.inlineCallbacks
    def pair(self) -> Any:
        """Two accepted RelayProtocols (a, b) and their client-side peers (ca, cb)."""
        accepted: list[RelayProtocol] = []

        class F(Factory):
            def buildProtocol(self, addr: Any) -> RelayProtocol:
                p = RelayProtocol()
                accepted.append(p)
                return p

        port = reactor.listenTCP(0, F(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        ca, cb = Collector(b"", 1 << 30), Collector(b"", 1 << 30)
        yield connect(port.getHost().port, ca)
        yield wait_for(lambda: len(accepted) == 1)
        yield connect(port.getHost().port, cb)
        yield wait_for(lambda: len(accepted) == 2)
        for c in (ca, cb):
            self.addCleanup(lambda c=c: c.transport.abortConnection() if not c.closed.called else None)
        return accepted[0], accepted[1], ca, cb

    @defer.inlineCallbacks
    def test_join_counts_and_peek(self) -> Any:
        from nodepass.stats import TunnelStats

        a, b, ca, cb = yield self.pair()
        ca.transport.write(b"early-bytes")
        first = yield a.peek(5, 5.0, reactor)
        self.assertTrue(first.startswith(b"early"))
        stats = TunnelStats()
        charged: list[tuple[int, str]] = []

        class Throttle:
            def consume(self, n: int, producer: Any, direction: str = "read") -> None:
                charged.append((n, direction))

            def forget(self, producer: Any) -> None:
                pass

        done = join(a, b, reactor=reactor, stats=stats, counted=a, throttle=Throttle())
        yield wait_for(lambda: cb.size == len(b"early-bytes"))
        self.assertEqual(b"".join(cb.got), b"early-bytes")
        cb.transport.write(b"back" * 1000)
        yield wait_for(lambda: ca.size == 4000)
        self.assertEqual((stats.tcprx, stats.tcptx), (len(b"early-bytes"), 4000))
        self.assertEqual(sum(n for n, d in charged if d == "read"), len(b"early-bytes"))
        self.assertEqual(sum(n for n, d in charged if d == "write"), 4000)
        ca.transport.loseConnection()
        reason = yield done
        self.assertEqual(reason, "EOF")
        yield cb.closed

    @defer.inlineCallbacks
    def test_read_timeout_closes_idle_exchange(self) -> Any:
        a, b, ca, cb = yield self.pair()
        done = join(a, b, reactor=reactor, read_timeout=0.2)
        reason = yield done
        self.assertEqual(reason, "read timeout")
        yield ca.closed
        yield cb.closed


    @defer.inlineCallbacks
    def test_slow_reader_pauses_the_writer(self) -> Any:
        a, b, ca, cb = yield self.pair()
        done = join(a, b, reactor=reactor)
        cb.transport.pauseProducing()  # the far reader stops reading
        payload = os.urandom(16 << 20)
        ca.transport.write(payload)
        yield wait_for(lambda: _not_read(a), 15, "writer paused")
        # Nothing is lost: once the reader resumes everything arrives in order.
        cb.transport.resumeProducing()
        yield wait_for(lambda: cb.size == len(payload), 15, "all bytes")
        self.assertEqual(hashlib.sha256(b"".join(cb.got)).digest(), hashlib.sha256(payload).digest())
        self.assertFalse(_not_read(a))
        ca.transport.loseConnection()
        yield done


def _not_read(side: RelayProtocol) -> bool:
    """Whether the relay stopped reading ``side`` (the copying relay pauses it as
    its consumer's producer; the splice relay takes it out of the reactor's readers)."""
    return "consumer" in side._pause_reasons or side.transport not in reactor.getReaders()


class ClientSingleEndChoiceTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_mode0_binds_locally_and_forwards(self) -> Any:
        echo = echo_server(self)
        port = free_port()
        records: list[LogRecord] = []
        logger = quiet_logger("debug", records)
        url = f"client://127.0.0.1:{port}/127.0.0.1:{echo}?mode=0&noudp=1"
        svc = make_tunnel_service(parse_tunnel_url(url), reactor=reactor, logger=logger, settings=FAST)
        svc.startService()
        self.addCleanup(lambda: svc.running and svc.stopService())
        self.assertEqual(svc.stats.mode, 1)
        data = yield echo_through(port, b"single-end")
        self.assertEqual(data, b"single-end")
        self.assertEqual(sum(1 for r in records if r.text.startswith("Client started: ")), 1)
        yield svc.stopService()


class StopTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_stop_during_handshake_leaves_nothing_behind(self) -> Any:
        silent = silent_listener(self, 8)
        port = silent.getsockname()[1]
        records: list[LogRecord] = []
        logger = quiet_logger("debug", records)
        settings = Settings(report_interval=0.2, service_cooldown=0.2, handshake_timeout=30.0)
        url = f"client://k@127.0.0.1:{port}/127.0.0.1:9?mode=2"
        svc = make_tunnel_service(parse_tunnel_url(url), reactor=reactor, logger=logger, settings=settings)
        svc.startService()
        yield sleep(0.2)
        yield svc.stopService()
        self.assertTrue(any(r.text == "Client shutdown complete" for r in records))
        self.assertFalse(any("Client error" in r.text for r in records))

    @defer.inlineCallbacks
    def test_handshake_timeout_is_an_error(self) -> Any:
        silent = silent_listener(self, 8)
        records: list[LogRecord] = []
        logger = quiet_logger("debug", records)
        settings = Settings(report_interval=0.2, service_cooldown=0.2, handshake_timeout=0.3)
        url = f"client://k@127.0.0.1:{silent.getsockname()[1]}/127.0.0.1:9?mode=2"
        svc = make_tunnel_service(parse_tunnel_url(url), reactor=reactor, logger=logger, settings=settings)
        svc.startService()
        yield wait_for(lambda: any("Client error: " in r.text and "no response within" in r.text for r in records))
        yield svc.stopService()


class RestartRobustnessTests(unittest.TestCase):
    def test_restart_scheduled_even_when_stopping_the_session_fails(self) -> None:
        from twisted.internet.task import Clock

        from nodepass.tunnel import ServerService

        clock = Clock()
        sessions: list[Any] = []

        class Session:
            def __init__(self) -> None:
                self.ended: defer.Deferred[str] = defer.Deferred()
                self.stopped = False
                sessions.append(self)

            def start(self) -> None:
                pass

            def stop(self, everything: bool = False) -> defer.Deferred[None]:
                if len(sessions) == 1 and not everything:
                    raise RuntimeError("broken stop")
                return defer.succeed(None)

        class Service(ServerService):
            def _prepare(self) -> None:
                self.policy = type("P", (), {"reset": lambda s: None, "stop": lambda s: None})()

            def _new_session(self) -> Any:
                return Session()

        records: list[LogRecord] = []
        svc = Service(parse_tunnel_url("server://127.0.0.1:1/127.0.0.1:2"), reactor=clock,
                      logger=quiet_logger("debug", records), settings=FAST)
        svc.startService()
        sessions[0].ended.callback("lost")
        clock.advance(FAST.service_cooldown)
        self.assertEqual(len(sessions), 2)
        self.assertTrue(any("stop failed: broken stop" in r.text for r in records))
        svc.stopService()
