"""Data-path parameters as pure logic on a simulated clock.

Covers rate, slot, proxy, block, dns, lbs and dial.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError as defer_CancelledError
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IPushProducer,
    IResolutionReceiver,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from nodepass.datapath import (
    AllTargetsFailed,
    DataPolicy,
    DialAddressError,
    DNSCache,
    FirstBytesGate,
    ProxyHeaderError,
    SlotLimiter,
    Throttle,
    TokenBucket,
    build_v1_header,
    detect,
    parse_block,
    parse_dial,
    rate_to_bytes,
)
from nodepass.datapath.dial import SourceAddress
from nodepass.datapath.targets import TargetSelector
from nodepass.env import Settings
from nodepass.log import Level, LogRecord
from nodepass.stats import TunnelStats
from nodepass.url import parse_tunnel_url
from tests.support import FakeResolution, recording_logger


@implementer(IPushProducer)
class FakeProducer:
    """Counts pause/resume calls; ``paused`` mirrors a transport's reading state."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.resumes = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self.resumes += 1

    def stopProducing(self) -> None:
        pass


def pump(bucket: Throttle, clock: Clock, producer: FakeProducer, seconds: float,
         chunk: int = 16384, step: float = 0.01, direction: str = "read") -> list[int]:
    """Simulate a source that pushes *chunk*-byte reads whenever it is not paused.

    Returns the bytes admitted during each simulated second.
    """
    per_second = [0] * int(round(seconds))
    steps = int(round(seconds / step))
    for i in range(steps):
        second = int(i * step)
        while not producer.paused:
            bucket.consume(chunk, producer, direction)  # type: ignore[arg-type]
            per_second[min(second, len(per_second) - 1)] += chunk
        clock.advance(step)
    return per_second


class ThrottleTests(unittest.TestCase):
    def assertWithin(self, value: float, expected: float, delta: float) -> None:
        self.assertTrue(abs(value - expected) <= delta,
                        f"{value} is not within {delta} of {expected}")

    def test_rate_conversion(self) -> None:
        self.assertEqual(rate_to_bytes(20), 2_500_000)
        self.assertEqual(rate_to_bytes(0), 0)
        self.assertIsNone(Throttle.from_rate(Clock(), 0))
        throttle = Throttle.from_rate(Clock(), 8)
        assert throttle is not None
        self.assertEqual(throttle.bytes_per_second, 1_000_000)

    def test_admitted_bytes_per_second_match_the_limit(self) -> None:
        clock = Clock()
        rate = 1_000_000
        throttle = Throttle(clock, rate)
        producer = FakeProducer()
        per_second = pump(throttle, clock, producer, 10.0)
        # First second: the full bucket (1 s of burst) plus one second of refill.
        self.assertWithin(per_second[0], 2 * rate, delta=2 * 16384)
        for second, admitted in enumerate(per_second[1:], start=1):
            with self.subTest(second=second):
                self.assertWithin(admitted, rate, delta=rate * 0.05)
        self.assertGreater(producer.pauses, 5)
        # Steady state across 9 s: within a chunk of the limit.
        self.assertWithin(sum(per_second[1:]), 9 * rate, delta=2 * 16384)

    def test_directions_have_independent_buckets(self) -> None:
        clock = Clock()
        throttle = Throttle(clock, 100_000)
        reader, writer = FakeProducer(), FakeProducer()
        throttle.consume(150_000, reader)
        self.assertTrue(reader.paused)
        throttle.consume(50_000, writer, "write")
        self.assertFalse(writer.paused)
        self.assertLess(throttle.read_bucket.tokens, 0)
        self.assertEqual(throttle.write_bucket.tokens, 50_000)

    def test_resumes_only_after_the_debt_is_repaid(self) -> None:
        clock = Clock()
        bucket = TokenBucket(clock, 1000)
        producer = FakeProducer()
        bucket.consume(1500, producer)  # 500 bytes of debt -> 0.5 s
        self.assertTrue(producer.paused)
        clock.advance(0.49)
        self.assertTrue(producer.paused)
        clock.advance(0.02)
        self.assertFalse(producer.paused)
        self.assertEqual(producer.resumes, 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_external_resume_is_paused_again_and_debt_accumulates(self) -> None:
        clock = Clock()
        bucket = TokenBucket(clock, 1000)
        producer = FakeProducer()
        bucket.consume(1500, producer)
        producer.resumeProducing()  # e.g. back-pressure released it early
        bucket.consume(1000, producer)
        self.assertTrue(producer.paused)
        clock.advance(1.4)
        self.assertTrue(producer.paused)
        clock.advance(0.2)
        self.assertFalse(producer.paused)

    def test_forget_and_reset(self) -> None:
        clock = Clock()
        throttle = Throttle(clock, 1000)
        gone, waiting = FakeProducer(), FakeProducer()
        throttle.consume(3000, gone)
        throttle.consume(10, waiting)
        throttle.forget(gone)
        clock.advance(5)
        self.assertTrue(gone.paused)  # never resumed after forget
        self.assertFalse(waiting.paused)
        throttle.consume(5000, waiting)
        self.assertTrue(waiting.paused)
        throttle.reset()
        self.assertFalse(waiting.paused)
        self.assertEqual(throttle.read_bucket.tokens, 1000)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_no_producer_only_charges(self) -> None:
        clock = Clock()
        bucket = TokenBucket(clock, 1000)
        bucket.consume(3000, None)
        self.assertEqual(clock.getDelayedCalls(), [])
        later = FakeProducer()
        bucket.consume(1, later)
        self.assertTrue(later.paused)
        clock.advance(2.01)
        self.assertFalse(later.paused)

    def test_bad_direction_and_rate(self) -> None:
        throttle = Throttle(Clock(), 10)
        self.assertRaises(ValueError, throttle.consume, 1, None, "sideways")
        self.assertRaises(ValueError, TokenBucket, Clock(), 0)


class SlotTests(unittest.TestCase):
    def policy(self, query: str) -> tuple[DataPolicy, list[LogRecord], TunnelStats]:
        logger, records = recording_logger()
        stats = TunnelStats()
        config = parse_tunnel_url(f"server://127.0.0.1:10101/127.0.0.1:8080?{query}")
        policy = DataPolicy.from_config(config, reactor=MemoryReactorClock(), logger=logger,
                                        settings=Settings(), stats=stats)
        return policy, records, stats

    def test_slot_two_admits_two_and_refuses_the_third(self) -> None:
        policy, records, stats = self.policy("slot=2")
        self.assertTrue(policy.admit("tcp", "10.0.0.1:1000"))
        self.assertTrue(policy.admit("udp", "10.0.0.1:1001"))
        self.assertEqual((stats.tcps, stats.udps), (1, 1))
        self.assertFalse(policy.admit("tcp", "10.0.0.1:1002"))
        errors = [r for r in records if r.level == Level.ERROR]
        self.assertEqual(len(errors), 1)
        self.assertIn("TCP slot limit reached: 1/2", errors[0].text)
        self.assertIn("10.0.0.1:1002", errors[0].text)
        policy.release("udp")
        self.assertTrue(policy.admit("tcp", "10.0.0.1:1003"))
        self.assertEqual((stats.tcps, stats.udps), (2, 0))

    def test_slot_zero_is_unlimited_and_uncounted(self) -> None:
        policy, records, stats = self.policy("slot=0")
        for _ in range(100):
            self.assertTrue(policy.admit("tcp"))
        self.assertEqual(stats.tcps, 0)
        policy.release("tcp")
        self.assertEqual(stats.tcps, 0)

    def test_release_never_goes_negative(self) -> None:
        stats = TunnelStats()
        slots = SlotLimiter(3, stats)
        slots.release("tcp")
        slots.release("udp")
        self.assertEqual((stats.tcps, stats.udps), (0, 0))
        self.assertRaises(ValueError, slots.try_acquire, "sctp")

    def test_notcp_noudp_read_rate(self) -> None:
        policy, _, _ = self.policy("notcp=1&read=30s&rate=20")
        self.assertFalse(policy.tcp_enabled)
        self.assertTrue(policy.udp_enabled)
        self.assertEqual(policy.read_timeout, 30.0)
        assert policy.throttle is not None
        self.assertEqual(policy.throttle.bytes_per_second, 2_500_000)
        plain, _, _ = self.policy("")
        self.assertIsNone(plain.throttle)
        self.assertEqual(plain.read_timeout, 0.0)
        self.assertTrue(plain.tcp_enabled and plain.udp_enabled)
        self.assertFalse(plain.blocking)


class ProxyHeaderTests(unittest.TestCase):
    def test_ipv4(self) -> None:
        header = build_v1_header(IPv4Address("TCP", "203.0.113.7", 51000), ("192.168.1.20", 80))
        self.assertEqual(header, b"PROXY TCP4 203.0.113.7 192.168.1.20 51000 80\r\n")
        self.assertEqual(build_v1_header("10.0.0.1:5", "10.0.0.2:6"),
                         b"PROXY TCP4 10.0.0.1 10.0.0.2 5 6\r\n")

    def test_ipv6(self) -> None:
        header = build_v1_header("[2001:db8::1]:40000", IPv6Address("TCP", "2001:DB8:0::2", 443))
        self.assertEqual(header, b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 443\r\n")

    def test_mapped_and_mixed(self) -> None:
        self.assertEqual(build_v1_header(("::ffff:10.1.1.1", 1), ("10.2.2.2", 2)),
                         b"PROXY TCP4 10.1.1.1 10.2.2.2 1 2\r\n")
        self.assertEqual(build_v1_header(("10.1.1.1", 1), ("::1", 2)),
                         b"PROXY TCP6 ::ffff:10.1.1.1 ::1 1 2\r\n")

    def test_bad_address(self) -> None:
        self.assertRaises(ProxyHeaderError, build_v1_header, "example.com:80", "10.0.0.1:1")
        self.assertRaises(ProxyHeaderError, build_v1_header, "10.0.0.1", "10.0.0.1:1")
        self.assertRaises(ValueError, build_v1_header, "10.0.0.1:99999", "10.0.0.1:1")

    def test_policy_proxy_switch(self) -> None:
        logger, _ = recording_logger()
        on = DataPolicy.from_config(parse_tunnel_url("client://127.0.0.1:1/127.0.0.1:2?proxy=1"),
                                    reactor=MemoryReactorClock(), logger=logger,
                                    settings=Settings(), stats=TunnelStats())
        off = DataPolicy.from_config(parse_tunnel_url("client://127.0.0.1:1/127.0.0.1:2"),
                                     reactor=MemoryReactorClock(), logger=logger,
                                     settings=Settings(), stats=TunnelStats())
        self.assertEqual(on.proxy_header("1.2.3.4:5", ("127.0.0.1", 2)),
                         b"PROXY TCP4 1.2.3.4 127.0.0.1 5 2\r\n")
        self.assertEqual(off.proxy_header("1.2.3.4:5", ("127.0.0.1", 2)), b"")


SOCKS5_HELLO = b"\x05\x01\x00"
SOCKS4_CONNECT = b"\x04\x01\x00\x50\x7f\x00\x00\x01user\x00"
HTTP_GET = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
TLS_CLIENT_HELLO = bytes.fromhex("160301020001000200" "0303") + b"\x00" * 32


class SniffTests(unittest.TestCase):
    ALL = frozenset({1, 2, 3})

    def test_detects_each_protocol(self) -> None:
        self.assertEqual(detect(SOCKS5_HELLO, self.ALL), "SOCKS5")
        self.assertEqual(detect(SOCKS4_CONNECT, self.ALL), "SOCKS4")
        self.assertEqual(detect(HTTP_GET, self.ALL), "HTTP")
        self.assertEqual(detect(b"CONNECT example.com:443 HTTP/1.1\r\n", self.ALL), "HTTP")
        self.assertEqual(detect(b"OPTIONS * HTTP/1.1\r\n", self.ALL), "HTTP")
        self.assertEqual(detect(TLS_CLIENT_HELLO, self.ALL), "TLS")

    def test_plain_data_passes(self) -> None:
        for data in [b"SSH-2.0-OpenSSH_9.6\r\n", b"hello world",
                     b"\x00\x01\x02\x03\x04\x05\x06\x07", b"PROPFINDX /", b"G", b"",
                     b"\x05\x00\x00", b"\x04\x03", b"get / HTTP/1.1"]:
            with self.subTest(data=data):
                self.assertIsNone(detect(data, self.ALL))

    def test_only_selected_rules_apply(self) -> None:
        self.assertIsNone(detect(HTTP_GET, {1, 3}))
        self.assertIsNone(detect(SOCKS5_HELLO, {2, 3}))
        self.assertIsNone(detect(TLS_CLIENT_HELLO, {1, 2}))
        self.assertIsNone(detect(TLS_CLIENT_HELLO, set()))
        self.assertEqual(detect(TLS_CLIENT_HELLO, {3}), "TLS")

    def test_parse_block_combinations(self) -> None:
        self.assertEqual(parse_block("123"), frozenset({1, 2, 3}))
        self.assertEqual(parse_block("13"), frozenset({1, 3}))
        self.assertEqual(parse_block("0"), frozenset())
        self.assertEqual(parse_block(""), frozenset())
        self.assertEqual(parse_block(31), frozenset({1, 3}))
        self.assertEqual(parse_block(frozenset({2})), frozenset({2}))

    def test_policy_sniff_logs_the_block(self) -> None:
        logger, records = recording_logger()
        policy = DataPolicy.from_config(
            parse_tunnel_url("server://127.0.0.1:1/127.0.0.1:2?block=12"),
            reactor=MemoryReactorClock(), logger=logger, settings=Settings(), stats=TunnelStats())
        self.assertTrue(policy.blocking)
        self.assertEqual(policy.sniff(SOCKS5_HELLO, "10.0.0.9:4000"), "SOCKS5")
        self.assertIsNone(policy.sniff(TLS_CLIENT_HELLO, "10.0.0.9:4001"))
        warns = [r.text for r in records if r.level == Level.WARN]
        self.assertEqual(warns, ["blocked SOCKS5 protocol from 10.0.0.9:4000"])

    def test_gate_fires_at_eight_bytes(self) -> None:
        clock = Clock()
        got: list[bytes] = []
        gate = FirstBytesGate(clock, 1.0, got.append)
        self.assertEqual(gate.feed(b"GET "), b"")
        self.assertEqual(got, [])
        self.assertEqual(gate.feed(b"/ HTTP/1.1"), b"")
        self.assertEqual(got, [b"GET / HTTP/1.1"])
        self.assertEqual(gate.feed(b"more"), b"more")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_gate_times_out_with_partial_or_no_data(self) -> None:
        clock = Clock()
        got: list[bytes] = []
        FirstBytesGate(clock, 0.5, got.append).feed(SOCKS5_HELLO)
        silent: list[bytes] = []
        FirstBytesGate(clock, 0.5, silent.append)
        clock.advance(0.49)
        self.assertEqual((got, silent), ([], []))
        clock.advance(0.02)
        self.assertEqual(got, [SOCKS5_HELLO])
        self.assertEqual(silent, [b""])

    def test_gate_cancel(self) -> None:
        clock = Clock()
        got: list[bytes] = []
        gate = FirstBytesGate(clock, 0.5, got.append)
        gate.cancel()
        clock.advance(1)
        self.assertEqual(got, [])


@implementer(IHostnameResolver)
class FakeResolver:
    """Answers from ``table``; a missing name resolves to nothing (a failed lookup).

    With ``hold=True`` answers wait until :meth:`release` is called.
    """

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[str] = []
        self.hold = False
        self._held: list[tuple[IResolutionReceiver, str]] = []

    def resolveHostName(self, resolutionReceiver: IResolutionReceiver, hostName: str,
                        portNumber: int = 0,
                        addressTypes: Sequence[type[IAddress]] | None = None,
                        transportSemantics: str = "TCP") -> IResolutionReceiver:
        self.calls.append(hostName)
        resolutionReceiver.resolutionBegan(FakeResolution(hostName))
        if self.hold:
            self._held.append((resolutionReceiver, hostName))
        else:
            self._answer(resolutionReceiver, hostName)
        return resolutionReceiver

    def _answer(self, receiver: IResolutionReceiver, name: str) -> None:
        for host in self.table.get(name, []):
            cls = IPv6Address if ":" in host else IPv4Address
            receiver.addressResolved(cls("TCP", host, 0))
        receiver.resolutionComplete()

    def release(self) -> None:
        held, self._held = self._held, []
        for receiver, name in held:
            self._answer(receiver, name)


def result_of(d: Deferred[object]) -> object:
    out: list[object] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


class DNSCacheTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.resolver = FakeResolver({"svc.example": ["2001:db8::5", "192.0.2.5", "192.0.2.6"]})
        self.logger, self.records = recording_logger()
        self.cache = DNSCache(self.resolver, self.clock, ttl=60.0, logger=self.logger)

    def test_ttl(self) -> None:
        self.assertEqual(result_of(self.cache.resolve("svc.example", 80)), ("192.0.2.5", 80))
        self.clock.advance(59)
        self.assertEqual(result_of(self.cache.resolve("svc.example", 81)), ("192.0.2.5", 81))
        self.assertEqual(self.resolver.calls, ["svc.example"])
        self.clock.advance(1)
        self.resolver.table["svc.example"] = ["192.0.2.99"]
        self.assertEqual(result_of(self.cache.resolve("svc.example", 80)), ("192.0.2.99", 80))
        self.assertEqual(self.resolver.calls, ["svc.example", "svc.example"])

    def test_zero_ttl_always_resolves(self) -> None:
        cache = DNSCache(self.resolver, self.clock, ttl=0)
        for _ in range(3):
            self.assertEqual(result_of(cache.resolve_host("svc.example")), "192.0.2.5")
        self.assertEqual(len(self.resolver.calls), 3)

    def test_ip_literals_bypass_the_resolver(self) -> None:
        self.assertEqual(result_of(self.cache.resolve("10.9.8.7", 1)), ("10.9.8.7", 1))
        self.assertEqual(result_of(self.cache.resolve("::1", 2)), ("::1", 2))
        self.assertEqual(result_of(self.cache.resolve("", 3)), ("127.0.0.1", 3))
        self.assertEqual(self.resolver.calls, [])

    def test_ipv6_only_name(self) -> None:
        self.resolver.table["v6.example"] = ["2001:db8::7"]
        self.assertEqual(result_of(self.cache.resolve_host("v6.example")), "2001:db8::7")

    def test_failure_is_logged_not_cached_and_retried(self) -> None:
        outcome = result_of(self.cache.resolve("late.example", 80))
        assert isinstance(outcome, Failure)
        self.assertTrue(outcome.check(DNSLookupError))
        warns = [r.text for r in self.records if r.level == Level.WARN]
        self.assertEqual(len(warns), 1)
        self.assertIn("late.example", warns[0])
        self.resolver.table["late.example"] = ["198.51.100.1"]
        self.assertEqual(result_of(self.cache.resolve("late.example", 80)), ("198.51.100.1", 80))
        self.assertEqual(self.resolver.calls, ["late.example", "late.example"])

    def test_failed_refresh_falls_back_to_the_previous_answer(self) -> None:
        self.assertEqual(result_of(self.cache.resolve_host("svc.example")), "192.0.2.5")
        self.clock.advance(61)
        del self.resolver.table["svc.example"]
        self.assertEqual(result_of(self.cache.resolve_host("svc.example")), "192.0.2.5")
        self.assertTrue(any("previous address" in r.text for r in self.records))
        # still not cached: the next use asks again
        self.cache.resolve_host("svc.example")
        self.assertEqual(len(self.resolver.calls), 3)

    def test_concurrent_lookups_share_one_query_and_clear(self) -> None:
        self.resolver.hold = True
        first = self.cache.resolve_host("svc.example")
        second = self.cache.resolve_host("svc.example")
        self.assertFalse(first.called)
        self.resolver.release()
        self.assertEqual((result_of(first), result_of(second)), ("192.0.2.5", "192.0.2.5"))
        self.assertEqual(len(self.resolver.calls), 1)
        self.cache.clear()
        self.resolver.hold = False
        self.cache.resolve_host("svc.example")
        self.assertEqual(len(self.resolver.calls), 2)


class SelectorTests(unittest.TestCase):
    def test_round_robin(self) -> None:
        sel = TargetSelector(3, 0, Clock())
        self.assertEqual([sel.order() for _ in range(4)],
                         [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]])

    def test_unhealthy_targets_are_skipped_until_retry(self) -> None:
        clock = Clock()
        sel = TargetSelector(3, 0, clock, retry_after=10)
        sel.failed(1)
        self.assertEqual(sel.order(), [0, 2, 1])
        self.assertEqual(sel.order(), [2, 0, 1])
        clock.advance(10)
        self.assertEqual(sel.order(), [2, 0, 1])
        self.assertEqual(sel.order(), [0, 1, 2])

    def test_single_target(self) -> None:
        sel = TargetSelector(1, 2, Clock())
        sel.failed(0)
        self.assertEqual(sel.order(), [0])

    def test_lowest_latency(self) -> None:
        sel = TargetSelector(3, 1, Clock())
        self.assertEqual(sel.probed({0: 0.030, 1: None, 2: 0.004}), 0.004)
        self.assertEqual(sel.order(), [2, 0, 1])
        self.assertFalse(sel.healthy(1))
        sel.succeeded(0)  # a successful failover makes the working target preferred
        self.assertEqual(sel.order(), [0, 2, 1])
        self.assertIsNone(sel.probed({0: None, 1: None, 2: None}))

    def test_primary_backup_falls_back_after_the_interval(self) -> None:
        clock = Clock()
        sel = TargetSelector(2, 2, clock, fallback_interval=300, retry_after=1000)
        self.assertEqual(sel.order(), [0, 1])
        sel.failed(0)
        sel.succeeded(1)
        clock.advance(299)
        self.assertEqual(sel.order(), [1, 0])  # sticky backup
        clock.advance(1)
        self.assertEqual(sel.order(), [0, 1])  # primary again, its failure mark cleared
        sel.succeeded(0)
        self.assertEqual(sel.order(), [0, 1])

    def test_invalid(self) -> None:
        self.assertRaises(ValueError, TargetSelector, 0, 0, Clock())
        self.assertRaises(ValueError, TargetSelector, 2, 5, Clock())


def memory_policy(url: str, reactor: MemoryReactorClock,
                  settings: Settings | None = None) -> tuple[DataPolicy, list[LogRecord]]:
    logger, records = recording_logger()
    policy = DataPolicy.from_config(parse_tunnel_url(url), reactor=reactor, logger=logger,
                                    settings=settings or Settings(), stats=TunnelStats(),
                                    resolver=FakeResolver({}))
    return policy, records


def fail_last(reactor: MemoryReactorClock) -> None:
    factory = reactor.tcpClients[-1][2]
    factory.clientConnectionFailed(reactor.connectors[-1], Failure(ConnectionRefusedError()))


def succeed_last(reactor: MemoryReactorClock) -> None:
    host, port, factory = reactor.tcpClients[-1][:3]
    proto = factory.buildProtocol(IPv4Address("TCP", host, port))
    proto.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", host, port)))


class DialerMemoryTests(unittest.TestCase):
    def test_primary_backup_dials_back_to_the_primary_after_the_interval(self) -> None:
        reactor = MemoryReactorClock()
        policy, _ = memory_policy("server://127.0.0.1:9000/10.0.0.1:80,10.0.0.2:80?lbs=2",
                                  reactor, Settings(fallback_interval=60.0))
        factory = Factory.forProtocol(Protocol)
        d1 = policy.connect_tcp(factory)
        self.assertEqual(reactor.tcpClients[-1][:2], ("10.0.0.1", 80))
        fail_last(reactor)
        self.assertEqual(reactor.tcpClients[-1][:2], ("10.0.0.2", 80))
        succeed_last(reactor)
        self.assertIsInstance(result_of(d1), Protocol)
        # sticky: the next dial starts at the backup
        policy.connect_tcp(factory)
        self.assertEqual(reactor.tcpClients[-1][:2], ("10.0.0.2", 80))
        succeed_last(reactor)
        reactor.advance(61)
        policy.connect_tcp(factory)
        self.assertEqual(reactor.tcpClients[-1][:2], ("10.0.0.1", 80))

    def test_all_targets_failed(self) -> None:
        reactor = MemoryReactorClock()
        policy, _ = memory_policy("server://127.0.0.1:9000/10.0.0.1:80,10.0.0.2:81", reactor)
        d = policy.connect_tcp(Factory.forProtocol(Protocol))
        fail_last(reactor)
        fail_last(reactor)
        outcome = result_of(d)
        assert isinstance(outcome, Failure)
        self.assertTrue(outcome.check(AllTargetsFailed))
        self.assertIn("all 2 targets failed", outcome.getErrorMessage())

    def test_dial_timeout_and_bind_address(self) -> None:
        reactor = MemoryReactorClock()
        policy, _ = memory_policy("server://127.0.0.1:9000/10.0.0.1:80?dial=10.0.0.200", reactor,
                                  Settings(tcp_dial_timeout=2.5))
        policy.connect_tcp(Factory.forProtocol(Protocol))
        host, port, _factory, timeout, bind = reactor.tcpClients[-1]
        self.assertEqual((host, port, timeout, bind), ("10.0.0.1", 80, 2.5, ("10.0.0.200", 0)))
        self.assertEqual(policy.bind_ip, "10.0.0.200")

    def test_udp_target_rotates_and_skips_unhealthy(self) -> None:
        reactor = MemoryReactorClock()
        policy, _ = memory_policy("server://127.0.0.1:9000/10.0.0.1:53,10.0.0.2:53", reactor)
        self.assertEqual(result_of(policy.udp_target()), ("10.0.0.1", 53))
        self.assertEqual(result_of(policy.udp_target()), ("10.0.0.2", 53))
        policy.selector.failed(0)
        self.assertEqual(result_of(policy.udp_target()), ("10.0.0.2", 53))

    def test_unresolvable_target_fails_over(self) -> None:
        reactor = MemoryReactorClock()
        policy, records = memory_policy("server://127.0.0.1:9000/nowhere.invalid:80,10.0.0.2:80",
                                        reactor)
        policy.connect_tcp(Factory.forProtocol(Protocol))
        self.assertEqual(reactor.tcpClients[-1][:2], ("10.0.0.2", 80))
        self.assertTrue(any("nowhere.invalid" in r.text for r in records))


class DialParseTests(unittest.TestCase):
    def test_values(self) -> None:
        self.assertEqual(parse_dial("auto"), "")
        self.assertEqual(parse_dial(""), "")
        self.assertEqual(parse_dial("127.0.0.1"), "127.0.0.1")
        self.assertEqual(parse_dial("[2001:DB8::1]"), "2001:db8::1")

    def test_bad_address_is_a_clear_error(self) -> None:
        for bad in ["localhost", "300.1.1.1", "1.2.3", "10.0.0.1:80", "auto2"]:
            with self.subTest(bad=bad):
                with self.assertRaises(DialAddressError) as ctx:
                    parse_dial(bad)
                self.assertIn("dial", str(ctx.exception))
                self.assertIn(repr(bad), str(ctx.exception))

    def test_policy_refuses_a_bad_dial(self) -> None:
        class Config:
            targets = parse_tunnel_url("server://127.0.0.1:1/127.0.0.1:2").targets
            lbs, dns, dial, read, rate, slot, proxy = 0, 300.0, "eth0", 0.0, 0, 0, 0
            block: frozenset[int] = frozenset()
            notcp = noudp = False

        logger, _ = recording_logger()
        with self.assertRaises(DialAddressError):
            DataPolicy.from_config(Config(), reactor=MemoryReactorClock(), logger=logger,
                                   settings=Settings(), stats=TunnelStats())

    def test_udp_interface_and_fallback(self) -> None:
        logger, records = recording_logger()
        source = SourceAddress("192.0.2.1", logger)
        self.assertEqual(source.udp_interface("10.0.0.1"), "192.0.2.1")
        self.assertTrue(source.fall_back("bind failed"))
        self.assertFalse(source.fall_back("again"))
        self.assertEqual(source.udp_interface("10.0.0.1"), "")
        self.assertEqual(source.udp_interface("2001:db8::1"), "::")
        self.assertIsNone(source.tcp_bind())
        errors = [r.text for r in records if r.level == Level.ERROR]
        self.assertEqual(len(errors), 1)
        self.assertIn("fallback to system auto due to dialer failure", errors[0])


class DialCancelTests(unittest.TestCase):
    def test_cancel_stops_the_failover(self) -> None:
        reactor = MemoryReactorClock()
        policy, _ = memory_policy("server://127.0.0.1:9000/10.0.0.1:80,10.0.0.2:80", reactor)
        d = policy.connect_tcp(Factory.forProtocol(Protocol))
        self.assertEqual(len(reactor.tcpClients), 1)
        d.cancel()
        outcome = result_of(d)
        assert isinstance(outcome, Failure)
        self.assertTrue(outcome.check(defer_CancelledError))
        self.assertEqual(len(reactor.tcpClients), 1)  # no further target was tried
