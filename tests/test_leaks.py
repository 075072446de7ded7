"""Resource leaks that would end a months-long run: file descriptors, timers, SSE subscribers.

Each test measures this process (psutil) before and after a churn of the
same operation and requires the numbers to come back near the baseline: a
small constant slack is allowed, growth in proportion to the churn is not.
"""

from __future__ import annotations

import collections
import gc
from collections.abc import Callable
from typing import Any

import psutil
from twisted.internet import endpoints
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.trial.unittest import TestCase

from nodepass.env import Settings
from nodepass.master.service import _default_tunnel_factory
from nodepass.tunnel import make_tunnel_service
from nodepass.url import parse_tunnel_url
from tests.support import RawClient, echo_roundtrip, echo_server, free_port, free_ports, quiet_logger, sleep
from tests.test_master_support import reactor, start_master, wait_for

FD_SLACK = 8
"""Descriptors a test may end with above its baseline (pool refills, a lingering socket)."""
TIMER_SLACK = 10
"""Delayed calls a test may end with above its baseline."""
OBJECT_SLACK = 10
"""Live objects of one nodepass class a test may end with above its baseline."""
SETTINGS = Settings(report_interval=0.5, service_cooldown=0.2, shutdown_timeout=3.0, reload_interval=3600.0)

MEASUREMENTS: list[str] = []
"""``name: before -> after`` lines, printed at the end of each test (for reports)."""


def fds() -> int:
    return int(psutil.Process().num_fds())


def timers() -> int:
    return len(reactor.getDelayedCalls())


def nodepass_objects() -> collections.Counter[str]:
    """Live objects of nodepass classes, by class name (after a full collection)."""
    gc.collect()
    names = (f"{getattr(type(o), '__module__', '')}.{type(o).__qualname__}" for o in gc.get_objects())
    return collections.Counter(name for name in names if name.startswith("nodepass."))


class LeakTestCase(TestCase):
    timeout = 120
    _objects: collections.Counter[str] | None = None

    def baseline(self) -> tuple[int, int]:
        """Record the baseline (nodepass objects too); return ``(fds, delayed calls)``."""
        self._objects = nodepass_objects()
        return fds(), timers()

    def _grown(self, extra: int) -> dict[str, int]:
        """nodepass classes with more live objects than at the baseline allows."""
        if self._objects is None:
            return {}
        now = nodepass_objects()
        # an idle pool socket added since the baseline holds a few objects of its own
        limit = OBJECT_SLACK + 3 * extra
        return {name: now[name] - self._objects[name] for name in now if now[name] - self._objects[name] > limit}

    @inlineCallbacks
    def settle(
        self, what: str, fd_base: int, timer_base: int, allowance: Callable[[], int] = lambda: 0
    ) -> Any:
        """Wait until fds, timers and objects are back near the baselines; fail with the numbers if not.

        *allowance* gives descriptors that are legitimately open now and were
        not at the baseline (idle pool connections the adaptive pool added).
        """

        def settled() -> bool:
            extra = allowance()
            return (
                fds() <= fd_base + FD_SLACK + extra
                and timers() <= timer_base + TIMER_SLACK
                and not self._grown(extra)
            )

        try:
            yield wait_for(settled, timeout=20, step=0.25)
        except AssertionError:
            pass
        after_fds, after_timers, extra = fds(), timers(), allowance()
        limit = fd_base + FD_SLACK + extra
        grown = self._grown(extra)
        line = (
            f"{what}: fds {fd_base} -> {after_fds} (of which {extra} idle pool sockets added),"
            f" delayed calls {timer_base} -> {after_timers}"
        )
        if self._objects is not None:
            line += f", nodepass objects {sum(self._objects.values())} -> {sum(nodepass_objects().values())}"
        MEASUREMENTS.append(line)
        print("\n  " + line)
        self.assertLessEqual(after_fds, limit, line)
        self.assertLessEqual(after_timers, timer_base + TIMER_SLACK, line)
        self.assertEqual(grown, {}, line)


def pool_growth(*services: Any) -> Callable[[], int]:
    """Descriptors of idle pool connections added since now (both ends live in this process)."""
    start = [s.stats.pool for s in services]
    return lambda: 2 * sum(max(s.stats.pool - p, 0) for s, p in zip(services, start, strict=True))


class MasterChurnTests(LeakTestCase):
    @inlineCallbacks
    def test_create_delete_30_instances(self) -> Any:
        """30 server+client pairs created, carrying traffic, deleted: no descriptor or timer left."""
        echo_port = echo_server(self)
        m = start_master(self, url="master://127.0.0.1:0/api?log=warn", settings=SETTINGS,
                         factory=_default_tunnel_factory)

        @inlineCallbacks
        def cycle(traffic: bool) -> Any:
            tunnel_port, local_port = free_ports(2)
            r = yield m.request(
                "POST", "/instances",
                body={"url": f"server://leak@127.0.0.1:{tunnel_port}/127.0.0.1:{echo_port}?log=warn"},
            )
            self.assertEqual(r.code, 201, r.body)
            server_id = r.json()["id"]
            r = yield m.request(
                "POST", "/instances",
                body={"url": f"client://leak@127.0.0.1:{tunnel_port}/127.0.0.1:{local_port}?min=2&log=warn"},
            )
            self.assertEqual(r.code, 201, r.body)
            client_id = r.json()["id"]
            if traffic:
                got = yield echo_roundtrip(local_port, b"x" * 10000)
                self.assertEqual(len(got), 10000)
            for instance_id in (client_id, server_id):
                r = yield m.request("DELETE", f"/instances/{instance_id}")
                self.assertEqual(r.code, 204)

        for _ in range(2):  # warm-up: lazy imports, first sockets, caches
            yield cycle(True)
        yield wait_for(lambda: not m.service.manager.services, timeout=10)
        fd_base, timer_base = self.baseline()
        for i in range(30):
            yield cycle(i % 3 == 0)
        self.assertEqual(list(m.service.manager.services), [])
        self.assertEqual([r for r in m.service.manager.records if r != "********"], [])
        yield self.settle("master: 30 instance pairs created+deleted", fd_base, timer_base)


class TunnelChurnTests(LeakTestCase):
    @inlineCallbacks
    def start_pair(self, tunnel_port: int, local_port: int, echo_port: int) -> Any:
        server = self.start_server(tunnel_port, echo_port)
        client = make_tunnel_service(
            parse_tunnel_url(f"client://churn@127.0.0.1:{tunnel_port}/127.0.0.1:{local_port}?min=4&log=warn"),
            reactor=reactor, logger=quiet_logger("warn"), settings=SETTINGS,
        )
        client.startService()
        self.addCleanup(lambda: client.stopService() if client.running else None)
        yield echo_roundtrip(local_port, b"hello")
        return server, client

    def start_server(self, tunnel_port: int, echo_port: int) -> Any:
        server = make_tunnel_service(
            parse_tunnel_url(f"server://churn@127.0.0.1:{tunnel_port}/127.0.0.1:{echo_port}?max=8&log=warn"),
            reactor=reactor, logger=quiet_logger("warn"), settings=SETTINGS,
        )
        server.startService()
        if not hasattr(self, "servers"):
            self.servers: list[Any] = []
            self.addCleanup(lambda: DeferredList([s.stopService() for s in self.servers if s.running]))
        self.servers.append(server)  # (a stopped server is dropped, so only live ones are referenced)
        return server

    @inlineCallbacks
    def test_1000_short_connections(self) -> Any:
        """1000 short connections through a tunnel: descriptors and timers return to the baseline."""
        echo_port = echo_server(self)
        tunnel_port, local_port = free_ports(2)
        server, client = yield self.start_pair(tunnel_port, local_port, echo_port)
        for _ in range(5):
            yield echo_roundtrip(local_port, b"warm-up")
        yield wait_for(lambda: client.stats.tcps == 0 and server.stats.tcps == 0)
        fd_base, timer_base, growth = *self.baseline(), pool_growth(client)
        for batch in range(50):
            results = yield DeferredList(
                [echo_roundtrip(local_port, b"%d-%d " % (batch, i) * 50) for i in range(20)],
                consumeErrors=True,
            )
            self.assertTrue(all(ok for ok, _ in results), [r for ok, r in results if not ok][:1])
        yield wait_for(lambda: client.stats.tcps == 0 and server.stats.tcps == 0)
        self.assertGreaterEqual(client.stats.tcprx, 1000 * 50 * 4)
        yield self.settle("tunnel: 1000 short connections", fd_base, timer_base, growth)

    @inlineCallbacks
    def test_client_reconnects_after_5_server_restarts(self) -> Any:
        """The client survives 5 server restarts; each restart leaves nothing behind."""
        echo_port = echo_server(self)
        tunnel_port, local_port = free_ports(2)
        server, client = yield self.start_pair(tunnel_port, local_port, echo_port)
        fd_base = timer_base = -1
        growth = pool_growth()
        for round_ in range(6):
            yield server.stopService()
            self.servers.remove(server)
            server = self.start_server(tunnel_port, echo_port)
            got = yield echo_roundtrip(local_port, b"round %d" % round_, timeout=30)
            self.assertEqual(got, b"round %d" % round_)
            if round_ == 0:  # the baseline after one restart (lazy state of the restart path)
                yield wait_for(lambda: client.stats.tcps == 0)
                fd_base, timer_base, growth = *self.baseline(), pool_growth(client)
        yield wait_for(lambda: client.stats.tcps == 0)
        yield self.settle("tunnel: client after 5 server restarts", fd_base, timer_base, growth)


class CycleTests(LeakTestCase):
    """A tunnelled connection leaves nothing for the cycle collector: each one
    is freed as soon as it ends.  Garbage in reference cycles would make the
    collector run (and walk every live object) again and again under load."""

    @inlineCallbacks
    def carry(self, tls: int) -> Any:
        echo_port = echo_server(self)
        tunnel_port, local_port = free_ports(2)
        server = make_tunnel_service(
            parse_tunnel_url(f"server://cycle@127.0.0.1:{tunnel_port}/127.0.0.1:{local_port}?tls={tls}&log=warn"),
            reactor=reactor, logger=quiet_logger("warn"), settings=SETTINGS,
        )
        client = make_tunnel_service(
            parse_tunnel_url(f"client://cycle@127.0.0.1:{tunnel_port}/127.0.0.1:{echo_port}?min=8&log=warn"),
            reactor=reactor, logger=quiet_logger("warn"), settings=SETTINGS,
        )
        for svc in (server, client):
            svc.startService()
            self.addCleanup(lambda s=svc: s.stopService() if s.running else None)
        got = yield echo_roundtrip(local_port, b"warm-up", timeout=30)
        self.assertEqual(got, b"warm-up")
        for _ in range(3):
            yield echo_roundtrip(local_port, b"warm-up")
        yield wait_for(lambda: client.stats.tcps == 0 and server.stats.tcps == 0)
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        count = 200
        for batch in range(count // 20):
            results = yield DeferredList(
                [echo_roundtrip(local_port, b"%d-%d " % (batch, i) * 20) for i in range(20)],
                consumeErrors=True,
            )
            self.assertTrue(all(ok for ok, _ in results), [r for ok, r in results if not ok][:1])
        yield wait_for(lambda: client.stats.tcps == 0 and server.stats.tcps == 0)
        yield sleep(0.5)
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            ours = collections.Counter(
                f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage
                if type(o).__module__.startswith("nodepass.")
            )
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        line = (f"tls={tls}: {count} tunnelled connections left {sum(ours.values())} nodepass objects"
                f" in reference cycles {dict(ours.most_common(5))}")
        MEASUREMENTS.append(line)
        print("\n  " + line)
        # Each connection used to leave about 20 (the test's own clients leave
        # theirs, which are not counted).
        self.assertLess(sum(ours.values()), count // 10, line)

    def test_plain(self) -> Any:
        return self.carry(0)

    def test_tls(self) -> Any:
        return self.carry(1)


class FailureChurnTests(LeakTestCase):
    @inlineCallbacks
    def test_client_retrying_a_dead_server(self) -> Any:
        """A client whose server is gone retries for ever without piling up sockets or timers."""
        dead_port, local_port = free_ports(2)
        settings = Settings(report_interval=0.5, service_cooldown=0.05, shutdown_timeout=3.0)
        errors: list[str] = []
        logger = quiet_logger("warn")
        logger.add_observer(lambda record: errors.append(record.text) if "Client error" in record.text else None)
        client = make_tunnel_service(
            parse_tunnel_url(f"client://dead@127.0.0.1:{dead_port}/127.0.0.1:{local_port}?min=2&mode=2&log=warn"),
            reactor=reactor, logger=logger, settings=settings,
        )
        client.startService()
        self.addCleanup(lambda: client.stopService() if client.running else None)
        yield wait_for(lambda: len(errors) >= 3)
        fd_base, timer_base = self.baseline()
        yield wait_for(lambda: len(errors) >= 43, timeout=60)
        yield self.settle(f"client: {len(errors)} failed reconnects", fd_base, timer_base)

    @inlineCallbacks
    def test_connections_to_a_dead_target(self) -> Any:
        """100 user connections whose target refuses: each is closed, nothing accumulates."""
        dead_port = free_port()
        tunnel_port, local_port = free_ports(2)
        server = make_tunnel_service(
            parse_tunnel_url(f"server://dt@127.0.0.1:{tunnel_port}/127.0.0.1:{dead_port}?mode=2&log=warn"),
            reactor=reactor, logger=quiet_logger("warn"), settings=SETTINGS,
        )
        server.startService()
        self.addCleanup(lambda: server.stopService() if server.running else None)
        client = make_tunnel_service(
            parse_tunnel_url(f"client://dt@127.0.0.1:{tunnel_port}/127.0.0.1:{local_port}?min=4&log=warn"),
            reactor=reactor, logger=quiet_logger("warn"), settings=SETTINGS,
        )
        client.startService()
        self.addCleanup(lambda: client.stopService() if client.running else None)

        @inlineCallbacks
        def refused_once() -> Any:
            """Connect to the client's local port (retrying until it listens); wait for the close."""
            for _ in range(100):
                try:
                    proto = yield endpoints.connectProtocol(
                        endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", local_port), RawClient(b"ping")
                    )
                    break
                except Exception:
                    yield sleep(0.1)
            else:
                raise AssertionError("local port never listened")
            yield wait_for(lambda: proto.lost, timeout=30)

        for _ in range(3):
            yield refused_once()
        yield wait_for(lambda: client.stats.tcps == 0 and server.stats.tcps == 0)
        fd_base, timer_base, growth = *self.baseline(), pool_growth(client)
        for _ in range(5):
            yield DeferredList([refused_once() for _ in range(20)], consumeErrors=True)
        yield wait_for(lambda: client.stats.tcps == 0 and server.stats.tcps == 0)
        yield self.settle("tunnel: 100 connections to a dead target", fd_base, timer_base, growth)


class SSEChurnTests(LeakTestCase):
    @inlineCallbacks
    def test_20_subscribers_dropped(self) -> Any:
        """20 SSE subscribers that disconnect (abruptly or cleanly) leave the hub and free their sockets."""
        m = start_master(self, url="master://127.0.0.1:0/api?log=warn", settings=SETTINGS)
        r = yield m.request("POST", "/instances", body={"url": "server://127.0.0.1:10101/127.0.0.1:8080"})
        self.assertEqual(r.code, 201)
        port = m.service.address[1]
        request = (
            f"GET {m.config.base}/events HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {m.key}\r\n\r\n"
        ).encode()

        @inlineCallbacks
        def open_one() -> Any:
            proto = yield endpoints.connectProtocol(
                endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), RawClient(request)
            )
            yield wait_for(lambda: b'"type":"initial"' in proto.data)
            return proto

        warm = yield open_one()
        warm.transport.abortConnection()
        yield wait_for(lambda: not m.service.events.subscribers)
        fd_base, timer_base = self.baseline()
        protos = []
        for _ in range(20):
            proto = yield open_one()
            protos.append(proto)
        self.assertEqual(len(m.service.events.subscribers), 20)
        for i, proto in enumerate(protos):
            if i % 2:
                proto.transport.abortConnection()
            else:
                proto.transport.loseConnection()
        yield wait_for(lambda: all(p.lost for p in protos))
        yield wait_for(lambda: not m.service.events.subscribers)
        # events raised now reach nobody and break nothing
        r = yield m.request("PATCH", f"/instances/{r.json()['id']}", body={"alias": "after"})
        self.assertEqual(r.code, 200)
        self.assertEqual(m.service.events.subscribers, [])
        yield self.settle("sse: 20 subscribers opened and dropped", fd_base, timer_base)
