"""Interop with the real Go NodePass v1.14.0 binary over the QUIC pool (type 1).

Every test skips, naming the missing file, when the binary is not there (see
:mod:`tests.goharness`).  Our end runs in this process, so its live pool and
counters can be read.  Each pair carries a first echo (retried within the
harness budget: Go holds user traffic until its certificate check passes on
a report tick), 1 MiB echoed and compared by SHA-256, concurrent echoes, UDP
datagrams both ways, and the traffic counters of both ends must grow by
exactly the bytes moved.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.goharness import Peer, TunnelPair, echo_many, exercise, probe, skip_unless_go
from tests.support import reactor, wait_for
from tests.test_quic_e2e import UDP_SIZES, server_pool_of


def gather(ds: list[defer.Deferred[Any]]) -> defer.Deferred[list[Any]]:
    """All results of *ds*; the first failure is raised as itself."""
    return defer.gatherResults(ds, consumeErrors=True).addErrback(lambda f: f.value.subFailure)


class QuicInteropTests(TestCase):
    timeout = 240

    def setUp(self) -> None:
        skip_unless_go()

    def assertHealthy(self, peer: Peer) -> None:
        self.assertTrue(peer.alive, f"{peer.describe()} ended:\n{peer.tail()}")
        self.assertEqual(peer.grep("Traceback"), [], f"{peer.describe()} printed a traceback:\n{peer.tail()}")

    @defer.inlineCallbacks
    def test_go_client_with_our_server_over_128_streams(self) -> Any:
        # The Go client keeps min=200 streams open at once on one connection;
        # aioquic alone would stop it at 128.
        pairs = [
            TunnelPair(self, server="inproc", client="go", flow=flow, tls=1, type=1,
                       server_params="&max=300", client_params="&min=200")
            for flow in "-+"
        ]
        yield gather([p.start() for p in pairs])
        yield gather([wait_for(lambda p=p: server_pool_of(p) is not None and server_pool_of(p).active >= 200,
                               timeout=60, what="200 idle QUIC members") for p in pairs])
        for pair in pairs:
            pool = server_pool_of(pair)
            self.assertEqual(pool.connections, 1)
            link = next(iter(pool._all))
            self.assertGreater(link.active_members(), 128)
        results = yield gather([exercise(p, concurrent=50, each=4096, udp_sizes=UDP_SIZES) for p in pairs])
        for pair, result in zip(pairs, results, strict=True):
            self.assertEqual(result.tcp_bytes, (1 << 20) + 50 * 4096)
            self.assertEqual(server_pool_of(pair).dropped.total, 0)
            for peer in pair.peers:
                self.assertHealthy(peer)

    @defer.inlineCallbacks
    def test_our_server_restarts_and_the_go_client_comes_back(self) -> Any:
        pair = TunnelPair(self, server="inproc", client="go", flow="-", tls=1, type=1)
        yield pair.start()
        yield probe(pair.user_port, b"before restart", since=pair.t0)
        yield pair.restart("server")
        yield probe(pair.user_port, b"after restart", since=reactor.seconds())
        sent = yield echo_many(pair.user_port, 20, 8192)
        self.assertEqual(sent, 20 * 8192)
        for peer in pair.peers:
            self.assertHealthy(peer)

    @defer.inlineCallbacks
    def test_go_server_with_our_client(self) -> Any:
        pairs = [TunnelPair(self, server="go", client="inproc", flow=flow, tls=1, type=1) for flow in "-+"]
        results = yield gather([exercise(p, concurrent=50, each=4096, udp_sizes=UDP_SIZES) for p in pairs])
        for pair, result in zip(pairs, results, strict=True):
            self.assertEqual(result.tcp_bytes, (1 << 20) + 50 * 4096)
            assert pair.client is not None
            self.assertTrue(pair.client.grep("TLS certificate fingerprint verified"), pair.logs())
            for peer in pair.peers:
                self.assertHealthy(peer)

    @defer.inlineCallbacks
    def test_go_server_tls0_forced_to_quic_tls1(self) -> Any:
        # tls=0 with type 1: the Go server announces tls 1, our client follows.
        pair = TunnelPair(self, server="go", client="inproc", flow="-", tls=0, type=1)
        result = yield exercise(pair, concurrent=10, each=4096, udp_sizes=UDP_SIZES)
        self.assertEqual(result.tcp_bytes, (1 << 20) + 10 * 4096)
