"""WebSocket pool (type 2) against the Go NodePass v1.14.0 binary, both directions.

Each test starts its pairs at once (Go holds traffic until its ``verify``
succeeds with ``tls=1``, which takes a few report intervals) and runs
:func:`tests.goharness.exercise` on each: first echo, 1 MiB by SHA-256,
concurrent users, UDP datagrams, and both ends' counters equal to the bytes
moved.  Skipped with the reason when ``../shared/peers/nodepass-go-v1.14.0``
is absent.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from nodepass.pool.ws import WsServerPool
from tests.goharness import TunnelPair, exercise, skip_unless_go


def _matrix(test: TestCase, server: str, client: str) -> list[TunnelPair]:
    return [
        TunnelPair(test, server=server, client=client, type=2, tls=0, flow="-"),
        TunnelPair(test, server=server, client=client, type=2, tls=1, flow="-"),
        TunnelPair(test, server=server, client=client, type=2, tls=0, flow="+"),
        TunnelPair(test, server=server, client=client, type=2, tls=1, flow="+"),
    ]


class GoInterop(TestCase):
    timeout = 240

    def setUp(self) -> None:
        skip_unless_go()

    @defer.inlineCallbacks
    def test_go_client_to_our_server(self) -> Any:
        pairs = _matrix(self, "inproc", "go")
        results = yield self._run_pairs(pairs)
        for pair, result in zip(pairs, results, strict=True):
            self.assertGreater(result.tcp_bytes, 1 << 20)
            server: Any = pair.server
            pool = server.service.session.pool
            self.assertIsInstance(pool, WsServerPool)
            # The Go client's upgrades all passed the strict checks.
            self.assertEqual(sum(pool.refused[k] for k in ("bad upgrade", "bad HTTP request", "foreign address")), 0)

    @defer.inlineCallbacks
    def test_our_client_to_go_server(self) -> Any:
        pairs = _matrix(self, "go", "inproc")
        results = yield self._run_pairs(pairs)
        for pair, result in zip(pairs, results, strict=True):
            self.assertGreater(result.tcp_bytes, 1 << 20)
            go = pair.server
            assert go is not None
            self.assertEqual(go.grep(r"(?i)panic|unexpected frame|protocol violation"), [], go.tail())

    def _run_pairs(self, pairs: list[TunnelPair]) -> defer.Deferred[Any]:
        d = defer.gatherResults([exercise(p, concurrent=50, each=8192) for p in pairs], consumeErrors=True)

        def first_error(failure: Any) -> Any:
            if failure.check(defer.FirstError):
                return failure.value.subFailure
            return failure

        return d.addErrback(first_error)
