"""WebSocket pool (type 2) end to end: our server and our client, real sockets.

Both ends run in this process (:class:`tests.goharness.InProcessPeer`) on
127.0.0.1: TCP echo and UDP echo targets, 1 MiB echoed and checked by
SHA-256, 200 concurrent users, UDP datagrams, traffic counters equal to the
bytes moved, reverse and forward flow with ``tls`` 0 and 1, a server restart,
and hostile clients on the tunnel port while the healthy pair keeps working.
"""

from __future__ import annotations

import base64
import os
import random
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import TextMessage

from nodepass.pool.ws import WsServerPool
from tests.goharness import (
    InProcessPeer,
    MasterAPI,
    TunnelPair,
    echo_once,
    exercise,
    probe,
    run_master,
    udp_exchange,
)
from tests.gopeer import token
from tests.support import RawClient, connect, free_ports, reactor, wait_for

#: Enough idle members and patience for 200 users arriving at once; both ends
#: and all users share this process, so the control channel gets a 9 s
#: silence limit (three report intervals) instead of 3 s.
LOAD_PARAMS = "&min=256"
LOAD_ENV = {"NP_POOL_GET_TIMEOUT": "15s", "NP_REPORT_INTERVAL": "3s"}


def upgrade(key: bytes | None = None, method: str = "GET", extra: str = "") -> bytes:
    key = key or base64.b64encode(os.urandom(16))
    return (f"{method} / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key.decode()}\r\n{extra}\r\n").encode()


def server_pool(peer: InProcessPeer) -> WsServerPool:
    session = peer.service.session
    assert session is not None and isinstance(session.pool, WsServerPool)
    return session.pool


class OursToOurs(TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def _traffic(self, tls: int, flow: str) -> Any:
        pair = TunnelPair(self, server="inproc", client="inproc", type=2, tls=tls, flow=flow,
                          client_params=LOAD_PARAMS, env=LOAD_ENV)
        result = yield exercise(pair, concurrent=200, each=4096, udp_sizes=(1, 64, 512, 1400, 8192))
        self.assertEqual(result.udp_received, result.udp_sent + 5 * len(b"echo:"))
        # Only WebSockets went through the tunnel port.
        pool = server_pool(pair.server)  # type: ignore[arg-type]
        self.assertEqual(pool.refused["bad upgrade"], 0)
        return pair

    def test_reverse_tls0(self) -> Any:
        return self._traffic(0, "-")

    def test_forward_tls0(self) -> Any:
        return self._traffic(0, "+")

    def test_reverse_tls1(self) -> Any:
        return self._traffic(1, "-")

    def test_forward_tls1(self) -> Any:
        return self._traffic(1, "+")

    @defer.inlineCallbacks
    def test_server_restart_client_reconnects(self) -> Any:
        pair = TunnelPair(self, server="inproc", client="inproc", type=2, tls=1, flow="-")
        yield exercise(pair, concurrent=20, each=2048, udp_sizes=(100,))
        client = pair.client
        assert client is not None
        mark = client.mark()
        yield pair.restart("server")
        since = reactor.seconds()
        yield probe(pair.user_port, b"after restart " + os.urandom(8), since=since)
        # The client noticed, started a new session, and carries traffic again.
        self.assertTrue(client.grep("Tunnel handshaked|Loading tunnel config", mark), client.tail())
        payload = os.urandom(1 << 20)
        echoed = yield echo_once(pair.user_port, payload, timeout=60.0)
        self.assertEqual(echoed, payload)
        sent, received = yield udp_exchange(self, pair.user_port, (1, 1400))
        self.assertEqual(received, sent + 2 * len(b"echo:"))


class MasterInstances(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_master_runs_and_reports_websocket_instances(self) -> Any:
        master = run_master(self, "ours")
        api = yield MasterAPI.connect(self, master)
        pair = TunnelPair(self, server=api, client=api, type=2, tls=1, flow="-")
        yield exercise(pair, concurrent=20, each=2048, udp_sizes=(64, 1400))
        for end in pair.peers:
            last = end.checkpoints()[-1]
            self.assertGreater(last.pool, 0, end.tail())
            self.assertGreater(last.traffic.tcprx, 1 << 20)


class HandshakeAddressTests(TestCase):
    """Which addresses may open members, decided at the handshake (``wsip``)."""

    timeout = 60

    @defer.inlineCallbacks
    def _session(self, extra_header: str = "", params: str = "") -> Any:
        tunnel_port, user_port, target_port = free_ports(3)
        server = InProcessPeer(self, f"server://k@127.0.0.1:{tunnel_port}/127.0.0.1:{user_port}"
                                     f"?log=debug&type=2&mode=1{params}", name="server")
        yield server.wait_line("Pending tunnel handshake")
        hello = (f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: Go-http-client/1.1\r\n"
                 f"Authorization: Bearer {token('k')}\r\n{extra_header}Accept-Encoding: gzip\r\n\r\n").encode()
        handshake = RawClient(hello)
        yield connect(tunnel_port, handshake)
        yield wait_for(lambda: b'"type":"2"' in handshake.data, 10, "handshake answer")
        return server, tunnel_port

    @defer.inlineCallbacks
    def _member(self, port: int, bind: str) -> Any:
        member = RawClient(upgrade())
        yield connect(port, member, bind=bind)
        yield wait_for(lambda: b"\r\n\r\n" in member.data, 10, "upgrade answer")
        head = member.data.split(b"\r\n", 1)[0]
        if head.startswith(b"HTTP/1.1 101"):
            yield wait_for(lambda: len(member.data.partition(b"\r\n\r\n")[2]) >= 6, 10, "ID message")
        assert member.transport is not None
        member.transport.loseConnection()
        return head, member.data.partition(b"\r\n\r\n")[2]

    @defer.inlineCallbacks
    def test_direct_handshake_takes_members_from_that_address_only(self) -> Any:
        server, port = yield self._session()
        head, _ = yield self._member(port, "127.0.0.2")
        self.assertEqual(head, b"HTTP/1.1 403 Forbidden")
        head, rest = yield self._member(port, "127.0.0.1")
        self.assertEqual(head, b"HTTP/1.1 101 Switching Protocols")
        self.assertEqual(rest[:6], b"\x82\x04\x00\x00\x00\x00")
        self.assertEqual(server_pool(server).refused["foreign address"], 1)

    @defer.inlineCallbacks
    def test_handshake_through_a_proxy_takes_members_from_anywhere(self) -> Any:
        server, port = yield self._session("X-Forwarded-For: 198.51.100.7\r\n")
        head, rest = yield self._member(port, "127.0.0.2")
        self.assertEqual(head, b"HTTP/1.1 101 Switching Protocols")
        self.assertEqual(rest[:6], b"\x82\x04\x00\x00\x00\x00")
        self.assertTrue(server.grep("accepted from any address .*x-forwarded-for"), server.tail())

    @defer.inlineCallbacks
    def test_wsip_same_ignores_the_proxy(self) -> Any:
        server, port = yield self._session("Via: 1.1 cdn\r\n", params="&wsip=same")
        head, _ = yield self._member(port, "127.0.0.2")
        self.assertEqual(head, b"HTTP/1.1 403 Forbidden")

    @defer.inlineCallbacks
    def test_wsip_any_takes_members_from_anywhere(self) -> Any:
        server, port = yield self._session(params="&wsip=any")
        head, _ = yield self._member(port, "127.0.0.2")
        self.assertEqual(head, b"HTTP/1.1 101 Switching Protocols")


class HostileClients(TestCase):
    """Garbage, bad upgrades, text frames, foreign addresses and floods on the
    tunnel port, while the healthy pair keeps carrying traffic."""

    timeout = 240

    @defer.inlineCallbacks
    def _attack(self, port: int) -> Any:
        rng = random.Random(8)
        users: list[RawClient] = []

        def send(data: bytes, bind: str | None = None) -> defer.Deferred[Any]:
            user = RawClient(data)
            users.append(user)
            return connect(port, user, bind=bind).addErrback(lambda _: None)

        attacks: list[bytes] = []
        attacks += [bytes(rng.getrandbits(8) for _ in range(300)) + b"\r\n\r\n" for _ in range(60)]
        attacks += [upgrade(method="POST") for _ in range(10)]
        attacks += [upgrade(key=b"c2hvcnQ=") for _ in range(10)]
        attacks += [upgrade().replace(b"Version: 13", b"Version: 8") for _ in range(10)]
        attacks += [b"GET / HTTP/1.0\r\n\r\n" for _ in range(10)]
        attacks += [b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 100_000 for _ in range(3)]
        # Valid upgrades followed at once by a text message: answered with close 1003.
        text = Connection(ConnectionType.CLIENT).send(TextMessage(data="not binary"))
        attacks += [upgrade() + text for _ in range(20)]
        yield defer.gatherResults([send(a) for a in attacks])
        # Members from another address than the handshaken client.
        yield defer.gatherResults([send(upgrade(), bind="127.0.0.2") for _ in range(10)])
        yield wait_for(lambda: all(u.lost for u in users), 30, "the server to close every hostile connection")
        return users

    @defer.inlineCallbacks
    def test_hostile_clients_are_refused_while_traffic_flows(self) -> Any:
        # Forward flow: the server only uses members the client names, so a
        # hostile member that reaches the pool can never receive user traffic.
        pair = TunnelPair(self, server="inproc", client="inproc", type=2, tls=0, flow="+")
        yield exercise(pair, concurrent=10, each=1024, udp_sizes=(64,))
        server = pair.server
        assert server is not None
        pool = server_pool(server)  # type: ignore[arg-type]
        payload = os.urandom(1 << 20)
        during = echo_once(pair.user_port, payload, timeout=90.0)
        users = yield self._attack(pair.tunnel_port)
        echoed = yield during
        self.assertEqual(echoed, payload)
        # After the storm: traffic still flows (the counters were checked by
        # the first exercise of this pair).
        yield exercise(pair, concurrent=50, each=4096, udp_sizes=(1, 1400), counters=False)
        refused = pool.refused
        self.assertEqual(refused["bad upgrade"], 30 + 10)  # POST, short key, version 8, HTTP/1.0
        self.assertEqual(refused["bad HTTP request"] + refused["incomplete upgrade"], 60 + 3)
        self.assertEqual(refused["foreign address"], 10)
        answers = [u.data.split(b"\r\n", 1)[0] for u in users]
        self.assertEqual(answers.count(b"HTTP/1.1 403 Forbidden"), 10)
        self.assertEqual(answers.count(b"HTTP/1.1 431 Request Header Fields Too Large"), 3)
        # The text-message members got their ID, then close 1003.
        closes = [u.data for u in users if u.data.startswith(b"HTTP/1.1 101 ")]
        self.assertEqual(len(closes), 20)
        for data in closes:
            rest = data.partition(b"\r\n\r\n")[2]
            self.assertEqual(rest[:2], b"\x82\x04")
            self.assertEqual((rest[6], rest[8:10]), (0x88, b"\x03\xeb"))  # close frame, code 1003
        # Logged, but not one line per connection.
        warned = server.grep("WebSocket pool: refused")
        self.assertGreaterEqual(len(warned), 1)
        self.assertLess(len(warned), 40)

    @defer.inlineCallbacks
    def test_garbage_on_the_tls_port(self) -> Any:
        pair = TunnelPair(self, server="inproc", client="inproc", type=2, tls=1, flow="-")
        yield exercise(pair, concurrent=5, each=1024, udp_sizes=(64,))
        server = pair.server
        assert server is not None
        users = []
        for _ in range(20):
            user = RawClient(upgrade())  # plain HTTP where TLS is expected
            users.append(user)
            yield connect(pair.tunnel_port, user)
        yield wait_for(lambda: all(u.lost for u in users), 30, "the server to close every plain connection")
        pool = server_pool(server)  # type: ignore[arg-type]
        yield wait_for(lambda: pool.refused["TLS handshake failed"] == 20, 10, "20 counted TLS failures")
        yield exercise(pair, concurrent=20, each=1024, udp_sizes=(64,), counters=False)
