"""QUIC pool (type 1) end to end: our server and our client on real UDP/TCP sockets.

Both ends run in this process (their live counters are read).  Each pair
carries a first echo, 1 MiB echoed and compared by SHA-256, concurrent
echoes, UDP datagrams both ways, and both ends' traffic counters must grow
by exactly the bytes moved (see :func:`tests.goharness.exercise`).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import TestCase

from nodepass.pool.quic import QuicLink, _FlowConnection, client_configuration
from tests.goharness import (
    InProcessPeer,
    Traffic,
    TunnelPair,
    echo_many,
    echo_once,
    exercise,
    probe,
    settled_traffic,
    wait_traffic,
)
from tests.support import reactor, wait_for

#: UDP datagram sizes carried: each must arrive whole, and our QUIC packets
#: are 1200 bytes (no path-MTU discovery), so the largest stays below that.
UDP_SIZES = (1, 64, 512, 1100)


def server_pool_of(pair: TunnelPair) -> Any:
    """The QUIC pool of the in-process server end."""
    assert isinstance(pair.server, InProcessPeer)
    session = pair.server.service.session
    return session.pool if session is not None else None


class _RawClient(DatagramProtocol):
    """A bare QUIC client (our glue, no pool) from a chosen address."""

    def __init__(self, alpn: str = "np-quic") -> None:
        self.alpn = alpn
        self.link: QuicLink | None = None
        self.closed: list[str] = []

    def dial(self, port: int) -> None:
        cfg = client_configuration(1, "", 15.0)
        cfg.alpn_protocols = [self.alpn]
        conn = _FlowConnection(configuration=cfg, max_streams=128)
        assert self.transport is not None
        host = self.transport.getHost()
        self.link = QuicLink(reactor, conn, peer_addr=("127.0.0.1", port), host=IPv4Address("UDP", host.host, host.port),
                             send=self.transport.write, keepalive=5.0,
                             on_closed=lambda _l, reason: self.closed.append(reason))
        conn.connect(("127.0.0.1", port), now=reactor.seconds())
        self.link.transmit()

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if self.link is not None:
            self.link.datagram_received(data, addr)


#: Both ends run in this process, next to the test's own load: a report
#: interval of 2 s (control timeout 6 s) keeps a busy machine from failing a
#: session that is merely slow.
ENV = {"NP_REPORT_INTERVAL": "2s"}


class QuicEndToEndTests(TestCase):
    timeout = 240

    def pair(self, flow: str, **kw: Any) -> TunnelPair:
        return TunnelPair(self, server="inproc", client="inproc", flow=flow, tls=1, type=1, env=ENV, **kw)

    @defer.inlineCallbacks
    def test_reverse_flow_200_concurrent(self) -> Any:
        pair = self.pair("-", client_params="&min=256")
        result = yield exercise(pair, concurrent=200, each=2048, udp_sizes=UDP_SIZES)
        self.assertEqual(result.tcp_bytes, (1 << 20) + 200 * 2048)
        pool = server_pool_of(pair)
        self.assertEqual(pool.dropped.total, 0)
        self.assertEqual(pool.refused.total, 0)

    @defer.inlineCallbacks
    def test_forward_flow(self) -> Any:
        pair = self.pair("+")
        result = yield exercise(pair, concurrent=50, each=8192, udp_sizes=UDP_SIZES)
        self.assertEqual(result.tcp_bytes, (1 << 20) + 50 * 8192)

    @defer.inlineCallbacks
    def test_tls0_is_forced_to_1(self) -> Any:
        pair = TunnelPair(self, server="inproc", client="inproc", flow="-", tls=0, type=1, env=ENV)
        yield pair.start()
        yield probe(pair.user_port, b"plain asked, TLS given", since=pair.t0)
        assert pair.server is not None
        self.assertTrue(pair.server.grep("TLS code-1: RAM cert with TLS 1.3"))

    @defer.inlineCallbacks
    def test_server_restart_client_reconnects(self) -> Any:
        pair = self.pair("-")
        yield pair.start()
        yield probe(pair.user_port, b"before restart", since=pair.t0)
        assert pair.client is not None
        mark = pair.client.mark()
        yield pair.restart("server")
        again = reactor.seconds()
        yield probe(pair.user_port, b"after restart", since=again)
        yield echo_many(pair.user_port, 20, 4096)
        self.assertTrue(pair.client.grep("QUIC connection to .* ready", mark))

    @defer.inlineCallbacks
    def test_bad_input_refused_while_the_pair_keeps_working(self) -> Any:
        pair = self.pair("-")
        yield pair.start()
        yield probe(pair.user_port, b"healthy", since=pair.t0)
        pool = server_pool_of(pair)
        traffic = echo_many(pair.user_port, 30, 16384)
        # Garbage datagrams on the tunnel port's UDP side.
        junk = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(junk.stopListening)
        for batch in range(10):
            for _ in range(10):
                junk.write(os.urandom(64), ("127.0.0.1", pair.tunnel_port))
                junk.write(bytes([0xC0, 0, 0, 0, 1, 8]) + os.urandom(1300), ("127.0.0.1", pair.tunnel_port))
            yield wait_for(lambda n=batch: pool.dropped.total >= 20 * (n + 1), timeout=30, what="garbage counted")
        # A QUIC client from another IP, and one offering another protocol.
        stranger = _RawClient()
        port = reactor.listenUDP(0, stranger, interface="127.0.0.2")
        self.addCleanup(port.stopListening)
        stranger.dial(pair.tunnel_port)
        wrong = _RawClient(alpn="h3")
        port2 = reactor.listenUDP(0, wrong, interface="127.0.0.1")
        self.addCleanup(port2.stopListening)
        wrong.dial(pair.tunnel_port)
        yield wait_for(lambda: stranger.closed and wrong.closed, timeout=30, what="both strangers refused")
        self.assertEqual(stranger.closed, ["unauthorized IP"])
        assert stranger.link is not None
        self.assertEqual(stranger.link.active_members(), 0)
        sent = yield traffic
        self.assertEqual(sent, 30 * 16384)
        self.assertEqual(pool.dropped.total, 200)
        self.assertGreaterEqual(pool.refused.total, 2)
        assert pair.server is not None
        warnings = pair.server.grep("WARN.*QUIC")
        self.assertGreaterEqual(len(warnings), 2)
        self.assertLess(len(warnings), 20)
        # The pair still moves 1 MiB intact and counts exactly what it moved.
        assert pair.client is not None
        base_in = yield settled_traffic(pair.server)
        base_out = yield settled_traffic(pair.client)
        payload = os.urandom(1 << 20)
        echoed = yield echo_once(pair.user_port, payload, timeout=60.0)
        self.assertEqual(hashlib.sha256(echoed).digest(), hashlib.sha256(payload).digest())
        moved = Traffic(len(payload), len(payload))
        yield wait_traffic(pair.server, base_in + moved)
        yield wait_traffic(pair.client, base_out + moved)
