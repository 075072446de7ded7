"""WebSocket pool (type 2) against the Go NodePass v1.14.0 binary, both directions.

Every test starts a reverse and a forward pair at once, our ends as their
own processes (``python -m nodepass``), and runs
:func:`tests.goharness.exercise` on each: first echo (Go holds traffic
until its ``verify`` succeeds with ``tls=1``), 1 MiB by SHA-256, concurrent
users, UDP datagrams, and both ends' counters equal to the bytes moved.
Skipped with the reason when ``../shared/peers/nodepass-go-v1.14.0`` is
absent.

The report interval is 2 s here: the Go end drops a control connection that
stays silent for three intervals, and on a busy machine one second leaves
too little room.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.goharness import TunnelPair, exercise, skip_unless_go

ENV = {"NP_REPORT_INTERVAL": "2s"}


class GoInterop(TestCase):
    timeout = 240

    def setUp(self) -> None:
        skip_unless_go()

    @defer.inlineCallbacks
    def _pairs(self, server: str, client: str, tls: int) -> Any:
        pairs = [TunnelPair(self, server=server, client=client, type=2, tls=tls, flow=flow, env=ENV)
                 for flow in ("-", "+")]
        try:
            results = yield defer.gatherResults([exercise(p, concurrent=50, each=8192) for p in pairs],
                                                consumeErrors=True)
        except defer.FirstError as exc:
            exc.subFailure.raiseException()
        for pair, result in zip(pairs, results, strict=True):
            self.assertGreater(result.tcp_bytes, 1 << 20)
            for end in pair.peers:
                # No refused WebSocket and no protocol complaint on either side.
                self.assertEqual(end.grep(r"(?i)WebSocket pool: refused|panic|unexpected frame|protocol violation"),
                                 [], end.tail())
        return pairs

    def test_go_client_to_our_server_tls0(self) -> Any:
        return self._pairs("ours", "go", 0)

    def test_go_client_to_our_server_tls1(self) -> Any:
        return self._pairs("ours", "go", 1)

    def test_our_client_to_go_server_tls0(self) -> Any:
        return self._pairs("go", "ours", 0)

    def test_our_client_to_go_server_tls1(self) -> Any:
        return self._pairs("go", "ours", 1)
