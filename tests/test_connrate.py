"""New connections through a real server + client pair: bursts, and a sooner start.

* A burst of 2,000 concurrent users is served in full: the server's users
  wait for pool connections (``pool_get_timeout``, generous here) while the
  client replaces every pool connection as soon as it is taken.
* A client started before its server does not fail its first session: the
  refused handshake is retried at short intervals (up to one cooldown).
* Pool connections carry ``TCP_NODELAY`` from the start, as NodePass's do
  (signals and IDs are never held back behind an unacknowledged segment).
* User listeners (dual-end and single-end) have a long listen backlog.

No timing is asserted: the outcome is.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.trial import unittest

from nodepass.env import Settings
from nodepass.log import Level
from nodepass.net import BACKLOG
from nodepass.service import raise_open_file_limit
from nodepass.tunnel import make_tunnel_service
from nodepass.url import parse_tunnel_url
from tests.support import connect, echo_roundtrip, free_port, quiet_logger, sleep, wait_for
from tests.test_tunnel_tcp import Tunnel

BURST = 2000
#: Descriptors the burst needs in this process (users, both ends, targets, echo).
BURST_FDS = 6 * BURST + 500


class Holder(Protocol):
    """A user that sends a line, waits for it to come back, and stays connected."""

    def __init__(self, line: bytes, echoed: defer.Deferred[bytes]) -> None:
        self.line = line
        self.buf = b""
        self.echoed = echoed
        self.gone: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.line)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= len(self.line) and not self.echoed.called:
            self.echoed.callback(self.buf)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.echoed.called:
            self.echoed.errback(ConnectionError(f"closed after {self.buf!r}"))
        self.gone.callback(None)


class BurstTests(unittest.TestCase):
    timeout = 240

    def setUp(self) -> None:
        soft, _hard = raise_open_file_limit()
        if 0 <= soft < BURST_FDS:
            raise unittest.SkipTest(f"needs {BURST_FDS} open files, the limit here is {soft}")

    @defer.inlineCallbacks
    def test_2000_concurrent_users_all_served(self) -> Any:
        settings = Settings(report_interval=2.0, service_cooldown=0.5, pool_get_timeout=180.0)
        t = Tunnel(self, flow="-", settings=settings, client_extra="&log=warn", server_extra="&log=warn")
        yield t.start()
        users: list[Holder] = []
        echoed: list[defer.Deferred[bytes]] = []
        connects = []
        for i in range(BURST):
            d: defer.Deferred[bytes] = defer.Deferred()
            user = Holder(b"burst-%05d\n" % i, d)
            users.append(user)
            echoed.append(d)
            connects.append(connect(t.user_port, user, timeout=60))
        results = yield defer.DeferredList(connects, consumeErrors=True)
        refused = [r for ok, r in results if not ok]
        self.assertEqual(refused, [], f"{len(refused)} of {BURST} connects failed")
        results = yield defer.DeferredList(echoed, consumeErrors=True)
        bad = [(i, r) for i, (ok, r) in enumerate(results) if not ok or r != users[i].line]
        self.assertEqual(bad[:3], [], f"{len(bad)} of {BURST} users were not served")
        # All of them were held at once, each through its own pool connection.
        self.assertEqual(t.server.stats.tcps, BURST)  # type: ignore[union-attr]
        yield wait_for(lambda: t.client.stats.tcps == BURST, timeout=30, what="egress slots")  # type: ignore[union-attr]
        for user in users:
            user.transport.loseConnection()  # type: ignore[union-attr]
        yield defer.DeferredList([u.gone for u in users])
        yield wait_for(lambda: t.server.stats.tcps == 0 and t.client.stats.tcps == 0,  # type: ignore[union-attr]
                       timeout=60, what="every exchange closed")
        self.assertFalse(t.has("server", "request timeout"))
        self.assertFalse(t.has("client", "request timeout"))
        self.assertFalse(t.has("server", "Server error"))
        self.assertFalse(t.has("client", "Client error"))
        data = yield echo_roundtrip(t.user_port, b"after the burst")
        self.assertEqual(data, b"after the burst")


class QuickStartTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_client_started_before_its_server(self) -> Any:
        """The first handshake is refused (nothing listens yet); the client tries
        again at short intervals, so the session neither fails nor waits a cooldown."""
        settings = Settings(report_interval=2.0, service_cooldown=20.0, pool_get_timeout=10.0)
        t = Tunnel(self, flow="-", settings=settings)
        t.start_client()
        yield wait_for(lambda: t.has("client", "Tunnel handshake refused, trying again", Level.DEBUG),
                       what="a refused first handshake")
        yield sleep(0.3)
        t.start_server()
        yield t.ready(timeout=15)  # well before the 20 s cooldown could have passed
        data = yield echo_roundtrip(t.user_port, b"first")
        self.assertEqual(data, b"first")
        self.assertFalse(t.has("client", "Client error"))
        self.assertFalse(t.has("client", "Client restart"))

    @defer.inlineCallbacks
    def test_no_server_within_one_cooldown_fails_as_before(self) -> Any:
        settings = Settings(report_interval=2.0, service_cooldown=0.4, pool_get_timeout=10.0)
        t = Tunnel(self, flow="-", settings=settings)
        t.start_client()
        yield wait_for(lambda: t.has("client", "Client error", Level.ERROR), what="the usual error")
        self.assertTrue(any("Connection was refused" in line for line in t.texts("client", Level.ERROR)))
        # Later sessions (restarts) do not retry quickly: one error per cooldown.
        yield wait_for(lambda: t.has("client", "Client restart"), what="a restart")
        t.start_server()
        yield t.ready(timeout=15)
        data = yield echo_roundtrip(t.user_port, b"late")
        self.assertEqual(data, b"late")


class NoDelayTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_pool_connections_carry_nodelay(self) -> Any:
        t = Tunnel(self, flow="-")
        yield t.start()
        for svc in (t.server, t.client):
            pool = svc.session.pool  # type: ignore[union-attr]
            conns = list(pool._idle.values())
            self.assertTrue(conns)
            conns.append(svc.session.control.conn)  # type: ignore[union-attr]
            for conn in conns:
                sock = conn.transport.getHandle()
                self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)


class BacklogTests(unittest.TestCase):
    """Every user-facing TCP listener queues a burst instead of dropping SYNs."""

    timeout = 60

    @defer.inlineCallbacks
    def test_dual_end_listeners(self) -> Any:
        t = Tunnel(self, flow="-")
        yield t.start()
        session = t.server.session  # type: ignore[union-attr]
        self.assertEqual([p.backlog for p in session._listeners], [BACKLOG, BACKLOG])

    def test_single_end_listener(self) -> None:
        port = free_port()
        svc = make_tunnel_service(
            parse_tunnel_url(f"client://127.0.0.1:{port}/127.0.0.1:9?mode=1&noudp=1"),
            reactor=reactor, logger=quiet_logger("warn"), settings=Settings(),
        )
        svc.startService()
        self.addCleanup(svc.stopService)
        self.assertEqual(svc.single._tcp_port.backlog, BACKLOG)  # type: ignore[attr-defined]
