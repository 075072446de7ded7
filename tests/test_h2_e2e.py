"""HTTP/2 pool (type 3) end to end, our server with our client on real sockets.

Both ends run in this process (:class:`tests.goharness.InProcessPeer`), so
their live counters are read.  Each pair carries a first echo, 1 MiB echoed
and compared by SHA-256, 200 concurrent echoes and UDP datagrams both ways,
and both ends' counters must grow by exactly the bytes moved.  The server
end is restarted under a running client, and a healthy pair keeps carrying
traffic while its tunnel port is fed what a NodePass client never sends.
"""

from __future__ import annotations

import os
from typing import Any

import h2.events
from twisted.internet import defer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase

from nodepass.pool.h2 import request_headers
from nodepass.tls import client_connection_creator
from tests.goharness import InProcessPeer, TunnelPair, exercise, probe
from tests.support import reactor, sleep, wait_for
from tests.test_pool_h2 import RawH2

CONCURRENT = 200


def gather(ds: list[defer.Deferred[Any]]) -> defer.Deferred[list[Any]]:
    return defer.gatherResults(ds, consumeErrors=True).addErrback(lambda f: f.value.subFailure)


def server_pool(peer: Any) -> Any:
    assert isinstance(peer, InProcessPeer)
    session = peer.service.session
    return session.pool if session is not None else None


class _Once(ClientFactory):
    def __init__(self, proto: Protocol) -> None:
        self.proto = proto
        self.failed: list[Any] = []

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.proto

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.failed.append(reason)


def dial(port: int, proto: Protocol, *, alpn: tuple[bytes, ...] | None = (b"h2",), bind: str | None = None) -> None:
    """Connect ``proto`` to 127.0.0.1:``port``, over TLS offering ``alpn`` (None: plain TCP)."""
    factory: Any = _Once(proto)
    if alpn is not None:
        factory = TLSMemoryBIOFactory(client_connection_creator(1, "", alpn=alpn), True, factory)
    kw: dict[str, Any] = {"bindAddress": (bind, 0)} if bind else {}
    reactor.connectTCP("127.0.0.1", port, factory, timeout=5, **kw)


class Garbage(Protocol):
    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.lost = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.payload)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class H2PairTests(TestCase):
    timeout = 240

    def pair(self, flow: str, kind: str = "inproc", **kw: Any) -> TunnelPair:
        return TunnelPair(self, server=kind, client=kind, flow=flow, tls=1, type=3,
                          server_params="&max=512", client_params="&min=256", **kw)

    @defer.inlineCallbacks
    def test_both_flows(self) -> Any:
        """Reverse and forward flow at once: echo, 1 MiB, 200 concurrent, UDP, counters.

        Every end is a process of its own (as deployed), so that four ends
        do not share one interpreter on a busy machine; all members of a
        pair share one HTTP/2 connection, so the control channel waits
        behind the data of 200 exchanges: a report interval of 2 s (the
        control channel's read timeout is three of them) keeps a loaded
        machine from ending a healthy session."""
        pairs = [self.pair(flow, "ours", env={"NP_REPORT_INTERVAL": "2s"}) for flow in "-+"]
        results = yield gather([exercise(p, concurrent=CONCURRENT, each=4096) for p in pairs])
        for pair, result in zip(pairs, results, strict=True):
            self.assertEqual(result.tcp_bytes, (1 << 20) + CONCURRENT * 4096)
            client = pair.client
            assert client is not None
            # One HTTP/2 connection carried the whole pool.
            self.assertEqual(len(client.grep(r"HTTP/2 connection to \S+ ready")), 1, pair.logs())
            for peer in pair.peers:
                self.assertEqual(peer.grep("Traceback"), [], pair.logs())

    @defer.inlineCallbacks
    def test_server_restart_client_reconnects(self) -> Any:
        pair = self.pair("-")
        yield exercise(pair, big=65536, concurrent=5, each=1024, counters=False)
        client = pair.client
        assert client is not None
        mark = client.mark()
        yield pair.restart("server")
        since = reactor.seconds()
        yield client.wait_line(r"Client error:", start=mark)
        yield probe(pair.user_port, b"after restart " + os.urandom(8), since=since)
        yield client.wait_line(r"Marking tunnel handshake as complete", start=mark)
        self.assertEqual(client.grep("Traceback"), [], pair.logs())

    @defer.inlineCallbacks
    def test_bad_input_is_refused_while_the_pair_carries_traffic(self) -> Any:
        pair = self.pair("-")
        yield exercise(pair, big=65536, concurrent=5, each=1024, counters=False)
        pool = server_pool(pair.server)
        port = pair.tunnel_port

        no_alpn, http11 = Garbage(b""), Garbage(b"")
        dial(port, no_alpn, alpn=())
        dial(port, http11, alpn=(b"http/1.1",))
        plain = Garbage(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(100))
        dial(port, plain, alpn=None)
        # The preface, then a DATA frame on stream 0: a connection error.
        frames = Garbage(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x00\x00\x00\x00\x00\x00" + os.urandom(4))
        dial(port, frames)
        wrong = RawH2(True)
        dial(port, wrong)
        stranger = RawH2(True)
        dial(port, stranger, bind="127.0.0.2")
        yield wait_for(lambda: wrong.conn is not None and stranger.conn is not None, timeout=20,
                       what="HTTP/2 set-up of the scripted clients")
        get = [(k, "GET" if k == ":method" else v) for k, v in request_headers("none")]
        bad_sid = wrong.request(get, body=b"", end=True)
        other_sid = stranger.request(request_headers("none"))
        # Meanwhile the real pair keeps working.
        result = yield exercise(pair, big=1 << 20, concurrent=20, each=4096, counters=False)
        self.assertEqual(result.tcp_bytes, (1 << 20) + 20 * 4096)
        yield wait_for(lambda: all(g.lost for g in (no_alpn, http11, plain, frames))
                       and wrong.status(bad_sid) and stranger.status(other_sid), timeout=20,
                       what="every bad client answered or closed")
        self.assertEqual(wrong.status(bad_sid), b"404")
        self.assertEqual(stranger.status(other_sid), b"403")
        self.assertEqual(wrong.body(bad_sid) + stranger.body(other_sid), b"")
        self.assertEqual(len(stranger.of(h2.events.StreamEnded)), 1)
        counts = dict(pool.refused)
        self.assertEqual(counts.get("alpn"), 2, counts)
        self.assertEqual(counts.get("tls"), 1, counts)
        self.assertEqual(counts.get("connection"), 1, counts)
        self.assertEqual(counts.get("request"), 1, counts)
        self.assertEqual(counts.get("client"), 1, counts)
        server = pair.server
        assert server is not None
        for kind in ("alpn", "tls", "connection", "request", "client"):
            self.assertTrue(server.grep(rf"WARN  Tunnel pool: HTTP/2 {kind} refused"), server.tail())
        self.assertEqual(len(server.grep(r"HTTP/2 alpn refused")), 1)  # once per interval
        for p in (wrong, stranger):
            p.transport.loseConnection()  # type: ignore[union-attr]
        yield sleep(0.1)
