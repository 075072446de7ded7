"""Interop with the real Go NodePass v1.14.0 binary over the HTTP/2 pool (type 3).

Every test skips, naming the missing file, when the binary is not there (see
:mod:`tests.goharness`).  Pairs run with ``tls=1`` (Go forces it for type 3)
and carry a first echo, 1 MiB echoed and compared by SHA-256, concurrent
echoes, UDP datagrams both ways, and the traffic counters of both ends must
grow by exactly the bytes moved.  The pools are sized above h2's default
stream limit (100) to show that neither end caps the other there, and our
client is driven through a Go server far beyond that server's ``max``
streams over time (a Go server never frees an answered stream).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer

from tests.goharness import TunnelPair, echo_once, exercise, probe, record
from tests.support import reactor
from tests.test_interop_go import VERIFIED, gather
from tests.test_interop_go import InteropCase as GoInteropCase

POOL = 150  # idle members asked for: above h2's default limit of 100 streams


class InteropCase(GoInteropCase):
    timeout = 240

    def pairs(self, server: str, client: str) -> list[TunnelPair]:
        """Reverse flow with our end as a process, forward flow with our end in this process.

        Go puts the read deadline of its control channel (three report
        intervals) on the whole HTTP/2 connection, so a control line that
        waits behind the data of 120 exchanges on a busy machine for longer
        than that ends every member: a report interval of 2 s leaves room."""
        out = []
        for flow, ours in (("-", "ours"), ("+", "inproc")):
            out.append(TunnelPair(
                self, server=ours if server == "ours" else server, client=ours if client == "ours" else client,
                flow=flow, tls=1, type=3, server_params="&max=300", client_params=f"&min={POOL}",
                env={"NP_REPORT_INTERVAL": "2s"},
            ))
        return out

    @defer.inlineCallbacks
    def both_flows(self, server: str, client: str) -> Any:
        pairs = self.pairs(server, client)
        results = yield gather([exercise(p, concurrent=120, each=4096) for p in pairs])
        for pair, result in zip(pairs, results, strict=True):
            self.assertEqual(result.tcp_bytes, (1 << 20) + 120 * 4096)
            for peer in pair.peers:
                self.assertHealthy(peer)
            seen = {m.group(1) for p in pair.peers for line in p.grep(VERIFIED) if (m := VERIFIED.search(line))}
            self.assertEqual(len(seen), 1, f"{pair.label}: fingerprints verified: {seen}\n{pair.logs()}")
            # The client's pool grew past 100 members on the one HTTP/2 connection.
            assert pair.client is not None
            yield pair.client.wait_until(
                lambda c=pair.client: any(cp.pool >= POOL for cp in c.checkpoints()), f"POOL={POOL}", 30)
        return pairs


class H2InteropTests(InteropCase):
    def test_our_server_go_client(self) -> Any:
        return self.both_flows("ours", "go")

    def test_go_server_our_client(self) -> Any:
        return self.both_flows("go", "ours")


class H2ExhaustionTests(InteropCase):
    @defer.inlineCallbacks
    def test_our_client_beyond_go_server_max_over_time(self) -> Any:
        """Go server max=8: 50 user connections one after the other all get through.

        Every stream a Go HTTP/2 server answered keeps its handler, so each of
        its connections serves at most 8 pool streams over its life; our
        client moves to a new connection each time it has opened 8.
        """
        pair = TunnelPair(self, server="go", client="inproc", flow="-", tls=1, type=3,
                          server_params="&max=8", client_params="&min=4",
                          label="go server max=8 + our client, 50 sequential connections")
        yield pair.start()
        yield probe(pair.user_port, b"first " + os.urandom(8), since=pair.t0)
        ok = 0
        for i in range(50):
            payload = b"%d:" % i + os.urandom(2000)
            answer = yield echo_once(pair.user_port, payload, timeout=20.0)
            if answer == payload:
                ok += 1
        client = pair.client
        assert client is not None
        rollovers = client.grep(r"streams opened, the next ones go on a new connection")
        self.assertEqual(ok, 50, pair.logs())
        self.assertGreaterEqual(len(rollovers), 5, pair.logs())
        self.assertEqual(client.grep(r"gave no response"), [], pair.logs())
        for peer in pair.peers:
            self.assertHealthy(peer)
        record(self, "h2-rollover", label=pair.label, connections=len(rollovers) + 1)


class H2RestartTests(InteropCase):
    @defer.inlineCallbacks
    def restart_and_reconnect(self, pair: TunnelPair, which: str) -> Any:
        yield exercise(pair, big=65536, concurrent=5, each=1024, counters=False)
        survivor = pair.client if which == "server" else pair.server
        assert survivor is not None
        mark = survivor.mark()
        yield pair.restart(which)
        since = reactor.seconds()
        word = "Client" if which == "server" else "Server"
        yield survivor.wait_line(rf"{word} error:", start=mark)
        yield probe(pair.user_port, b"after restart " + os.urandom(8), since=since)
        self.assertHealthy(survivor)

    def test_restarts_both_ways(self) -> Any:
        """A Go server restarts under our client; our server restarts under a Go client."""
        go_server = TunnelPair(self, server="go", client="inproc", tls=1, type=3)
        our_server = TunnelPair(self, server="ours", client="go", tls=1, type=3)
        return gather([self.restart_and_reconnect(go_server, "server"),
                       self.restart_and_reconnect(our_server, "server")])
