"""Type-0 TCP pool: IDs on the wire, client IP filter, gets with timeouts, refill rules."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.python.failure import Failure
from twisted.trial import unittest

from nodepass.pool.base import CONTROL_ID, PoolError
from nodepass.pool.tcp import TcpClientPool, TcpServerPool
from tests.support import RawClient, connect, quiet_logger, silent_listener, sleep, wait_for

reactor: Any = _reactor


class ServerPoolTests(unittest.TestCase):
    def setUp(self) -> None:
        self.pool = TcpServerPool(reactor, quiet_logger(), max_cap=8, client_ip="127.0.0.1", keepalive=1.0)
        self.port = reactor.listenTCP(0, self.pool.factory(), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.addCleanup(self.pool.close)
        self.portno = self.port.getHost().port
        self.readers: list[RawClient] = []

    def tearDown(self) -> Any:
        for r in self.readers:
            if r.transport is not None:
                r.transport.abortConnection()
        return defer.gatherResults([r.closed for r in self.readers])

    @defer.inlineCallbacks
    def connect(self, bind: str | None = None) -> Any:
        r = yield connect(self.portno, RawClient(), bind)
        self.readers.append(r)
        return r

    @defer.inlineCallbacks
    def test_first_id_is_control_then_random_4_bytes(self) -> Any:
        r1 = yield self.connect()
        yield wait_for(lambda: len(r1.data) == 4)
        self.assertEqual(r1.data, b"\x00\x00\x00\x00")
        r2 = yield self.connect()
        yield wait_for(lambda: len(r2.data) == 4)
        self.assertNotEqual(r2.data, b"\x00\x00\x00\x00")
        yield wait_for(lambda: self.pool.active == 2)
        self.assertTrue(self.pool.has(CONTROL_ID))
        self.assertTrue(self.pool.has(r2.data.hex()))
        # incoming_get never hands out the control connection.
        cid, conn = yield self.pool.incoming_get(1.0)
        self.assertEqual(cid, r2.data.hex())
        ctl = yield self.pool.outgoing_get(CONTROL_ID, 1.0)
        self.assertEqual(ctl.id, CONTROL_ID)
        self.assertEqual(self.pool.active, 0)
        conn.close()
        ctl.close()

    @defer.inlineCallbacks
    def test_incoming_get_oldest_or_newest(self) -> Any:
        readers = []
        for _ in range(4):  # control + three data connections, in arrival order
            r = yield self.connect()
            yield wait_for(lambda r=r: len(r.data) == 4)
            readers.append(r)
        yield wait_for(lambda: self.pool.active == 4)
        ids = [r.data.hex() for r in readers[1:]]
        cid, first = yield self.pool.incoming_get(1.0)
        self.assertEqual(cid, ids[0])
        cid, last = yield self.pool.incoming_get(1.0, newest=True)
        self.assertEqual(cid, ids[2])
        first.close()
        last.close()

    @defer.inlineCallbacks
    def test_foreign_ip_refused(self) -> Any:
        r = yield self.connect(bind="127.0.0.2")
        yield r.closed
        self.assertEqual(r.data, b"")
        self.assertEqual(self.pool.active, 0)

    @defer.inlineCallbacks
    def test_idle_connection_closing_leaves_pool(self) -> Any:
        r = yield self.connect()
        yield wait_for(lambda: self.pool.active == 1)
        r.transport.loseConnection()  # type: ignore[union-attr]
        yield wait_for(lambda: self.pool.active == 0)

    @defer.inlineCallbacks
    def test_get_timeouts(self) -> Any:
        yield self.assertFailure(self.pool.incoming_get(0.1), PoolError)
        yield self.assertFailure(self.pool.outgoing_get("deadbeef", 0.1), PoolError)

    @defer.inlineCallbacks
    def test_outgoing_get_waits_for_arrival(self) -> Any:
        d = self.pool.outgoing_get(CONTROL_ID, 5.0)
        self.assertFalse(d.called)
        yield self.connect()
        conn = yield d
        self.assertEqual(conn.id, CONTROL_ID)
        conn.close()

    @defer.inlineCallbacks
    def test_max_capacity_drops_extra(self) -> Any:
        for _ in range(10):
            yield self.connect()
        yield wait_for(lambda: self.pool.active == 8)
        yield sleep(0.2)
        self.assertEqual(self.pool.active, 8)
        self.assertEqual(sum(1 for r in self.readers if len(r.data) == 4), 8)

    @defer.inlineCallbacks
    def test_flush_and_errors(self) -> Any:
        for _ in range(3):
            yield self.connect()
        yield wait_for(lambda: self.pool.active == 3)
        self.pool.add_error()
        self.pool.add_error()
        self.assertEqual(self.pool.error_count(), 2)
        self.pool.flush()
        self.assertEqual(self.pool.active, 0)
        yield defer.gatherResults([r.closed for r in self.readers])
        self.pool.reset_error()
        self.assertEqual(self.pool.error_count(), 0)

    @defer.inlineCallbacks
    def test_strict_early_data_closes(self) -> Any:
        self.pool.strict = True
        yield self.connect()
        r = yield self.connect()
        yield wait_for(lambda: self.pool.active == 2)
        r.transport.write(b"GET / HTTP/1.1\r\n\r\n")  # type: ignore[union-attr]
        yield r.closed
        yield wait_for(lambda: self.pool.active == 1)


class ClientPoolTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_client_fills_and_matches_server_ids(self) -> Any:
        server = TcpServerPool(reactor, quiet_logger(), max_cap=16, client_ip="127.0.0.1")
        port = reactor.listenTCP(0, server.factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = TcpClientPool(reactor, quiet_logger(), min_cap=4, max_cap=16, min_interval=0.05, max_interval=0.2,
                            keepalive=1.0, host="127.0.0.1", port=port.getHost().port)
        self.addCleanup(client.close)
        self.addCleanup(server.close)
        client.start()
        yield wait_for(lambda: client.active >= 4 and server.active >= 4)
        self.assertTrue(client.has(CONTROL_ID))
        # Ingress on the server, egress on the client: same ID, same connection pair.
        cid, sconn = yield server.incoming_get(1.0)
        cconn = yield client.outgoing_get(cid, 1.0)
        got: list[bytes] = []
        cconn.set_sink(got.append)
        sconn.transport.write(b"ping-through-pool")
        yield wait_for(lambda: b"".join(got) == b"ping-through-pool")
        sconn.close()
        yield cconn.when_lost()
        client.close()
        self.assertEqual(client.active, 0)

    def test_adaptive_rules(self) -> None:
        c = TcpClientPool(reactor, quiet_logger(), min_cap=2, max_cap=5, min_interval=0.1, max_interval=0.5,
                       keepalive=1.0, host="127.0.0.1", port=1)
        self.assertEqual((c.capacity, c.interval), (2, 0.1))
        c._adjust_capacity(2)  # ratio 1.0 > 0.8: grow
        self.assertEqual(c.capacity, 3)
        c._adjust_capacity(0)  # ratio 0 < 0.2: shrink
        self.assertEqual(c.capacity, 2)
        c._adjust_capacity(0)  # never below min
        self.assertEqual(c.capacity, 2)
        c.capacity = 5
        c._adjust_capacity(5)  # never above max
        self.assertEqual(c.capacity, 5)
        # idle 0 < 20% of 5 and interval at min: stays; with idle > 80%: slower by 100 ms steps.
        c._adjust_interval()
        self.assertAlmostEqual(c.interval, 0.1)
        c._idle.update({f"{i:08x}": None for i in range(5)})  # type: ignore[misc]
        for _ in range(10):
            c._adjust_interval()
        self.assertAlmostEqual(c.interval, 0.5)
        c._idle.clear()
        c._adjust_interval()
        self.assertAlmostEqual(c.interval, 0.4)

    def test_swaps_min_max(self) -> None:
        c = TcpClientPool(reactor, quiet_logger(), min_cap=9, max_cap=3, min_interval=1.0, max_interval=0.1,
                       keepalive=1.0, host="127.0.0.1", port=1)
        self.assertEqual((c.min_cap, c.max_cap), (3, 9))
        self.assertEqual((c.min_interval, c.max_interval), (0.1, 1.0))

    @defer.inlineCallbacks
    def test_id_never_arrives_is_bounded(self) -> Any:
        """A server that accepts but never sends an ID does not add connections."""
        silent = silent_listener(self, 16)
        client = TcpClientPool(reactor, quiet_logger(), min_cap=2, max_cap=2, min_interval=0.05, max_interval=0.05,
                            keepalive=1.0, host="127.0.0.1", port=silent.getsockname()[1])
        client.start()
        yield sleep(0.3)
        self.assertEqual(client.active, 0)
        client.close()
        yield sleep(0.05)


class DialerTests(unittest.TestCase):
    """The dials a client pool has under way, given up when the pool closes."""

    def test_stop_gives_up_dials_whose_failure_is_reported_at_once(self) -> None:
        """Regression: a Twisted connector reports the failure of a stopped dial
        synchronously; stopping several used to change the set being walked."""
        from twisted.internet.error import UserError
        from twisted.internet.protocol import ClientFactory
        from twisted.internet.testing import MemoryReactor

        from nodepass.pool.tcp import Dialer

        failed: list[str] = []

        class Connector:
            state = "connecting"

            def __init__(self, factory: Any) -> None:
                self.factory = factory

            def stopConnecting(self) -> None:
                self.state = "disconnected"
                self.factory.clientConnectionFailed(self, Failure(UserError()))

        class Reactor(MemoryReactor):
            def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30,
                           bindAddress: Any = None) -> Connector:
                connector = Connector(factory)
                factory.startedConnecting(connector)
                return connector

        class Factory(ClientFactory):
            def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
                failed.append(reason.getErrorMessage())

        dialer = Dialer(Reactor(), "127.0.0.1", 1, 5.0)
        for _ in range(3):
            dialer.dial(Factory())
        self.assertEqual(len(dialer._connectors), 3)
        dialer.stop()
        self.assertEqual(len(failed), 3)
        self.assertEqual(dialer._connectors, set())
