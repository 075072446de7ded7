"""TCP probes of the master API's /tcping: real sockets and a memory reactor."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, gatherResults, inlineCallbacks
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IAddress, IHostResolution, IResolutionReceiver
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from nodepass.master.tcping import Tcping, TcpingBusy, split_target
from tests.support import FakeResolution


class SplitTargetTests(unittest.TestCase):
    def test_valid(self) -> None:
        cases = {
            "127.0.0.1:80": ("127.0.0.1", 80),
            "example.com:65535": ("example.com", 65535),
            "[::1]:8080": ("::1", 8080),
            ":9090": ("", 9090),
            "host:0": ("host", 0),
            "host:http": ("host", 80),
        }
        for target, expected in cases.items():
            with self.subTest(target=target):
                self.assertEqual(split_target(target), expected)

    def test_invalid(self) -> None:
        cases = {
            "": "Target address required",
            "nohost": "address nohost: missing port in address",
            "host:": "address host:: missing port in address",
            "::1:80": "too many colons",
            "[::1]": "missing port",
            "[::1:80": "missing ']'",
            "[::1]x80": "unexpected text",
            "1.2.3.4:99999": "invalid port 99999",
            "host:nosuchservice": "unknown port nosuchservice",
        }
        for target, message in cases.items():
            with self.subTest(target=target):
                with self.assertRaises(ValueError) as caught:
                    split_target(target)
                self.assertIn(message, str(caught.exception))


class _Quiet(Protocol):
    pass


class RealSocketTests(unittest.TestCase):
    """Probes over the loopback interface with the global reactor."""

    def setUp(self) -> None:
        self.port = reactor.listenTCP(0, Factory.forProtocol(_Quiet), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.listening = self.port.getHost().port
        self.tcping = Tcping(reactor, limit=10, timeout=5.0)

    @inlineCallbacks
    def test_listening_port_connects(self) -> Any:
        target = f"127.0.0.1:{self.listening}"
        result = yield self.tcping.probe(target)
        self.assertEqual(set(result), {"target", "connected", "latency", "error"})
        self.assertEqual(result["target"], target)
        self.assertIs(result["connected"], True)
        self.assertIsInstance(result["latency"], int)
        self.assertGreaterEqual(result["latency"], 0)
        self.assertIsNone(result["error"])
        self.assertEqual(self.tcping.in_flight, 0)

    @inlineCallbacks
    def test_closed_port_refused(self) -> Any:
        # A bound but non-listening socket reserves the port and refuses connections.
        closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(closed.close)
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        target = f"127.0.0.1:{port}"
        result = yield self.tcping.probe(target)
        self.assertEqual(
            result,
            {
                "target": target,
                "connected": False,
                "latency": 0,
                "error": f"dial tcp 127.0.0.1:{port}: connect: connection refused",
            },
        )
        self.assertEqual(self.tcping.in_flight, 0)

    @inlineCallbacks
    def test_host_name_resolved(self) -> Any:
        # "localhost" may resolve to ::1 first (refused: only 127.0.0.1 listens);
        # the probe then tries the next address.
        result = yield self.tcping.probe(f"localhost:{self.listening}")
        self.assertIs(result["connected"], True)
        self.assertIsNone(result["error"])

    @inlineCallbacks
    def test_name_no_dns_can_spell(self) -> Any:
        """A name the IDNA codec refuses is "no such host", not an error logged by the
        system resolver's thread (found by fuzzing the API)."""
        result = yield self.tcping.probe("\U00106d71.example:80")
        self.assertIs(result["connected"], False)
        self.assertIn("no such host", result["error"])
        self.assertEqual(self.tcping.in_flight, 0)

    @inlineCallbacks
    def test_eleventh_concurrent_probe_is_refused(self) -> Any:
        target = f"127.0.0.1:{self.listening}"
        # connectTCP never completes synchronously, so all ten are in flight here.
        pending = [self.tcping.probe(target) for _ in range(10)]
        self.assertEqual(self.tcping.in_flight, 10)
        with self.assertRaises(TcpingBusy) as caught:
            self.tcping.probe(target)
        self.assertIn("too many requests", str(caught.exception))
        results = yield gatherResults(pending)
        self.assertEqual([r["connected"] for r in results], [True] * 10)
        self.assertEqual(self.tcping.in_flight, 0)
        again = yield self.tcping.probe(target)
        self.assertIs(again["connected"], True)

    def test_malformed_target_raises_and_takes_no_slot(self) -> None:
        for target in ["", "127.0.0.1", "::1:80", "127.0.0.1:70000"]:
            with self.subTest(target=target):
                self.assertRaises(ValueError, self.tcping.probe, target)
        self.assertEqual(self.tcping.in_flight, 0)


class FakeResolver:
    """Resolves names from a table; names missing from it never complete."""

    def __init__(self, table: dict[str, Sequence[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        self.asked.append(hostName)
        resolution = FakeResolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        if hostName in self.table:
            for address in self.table[hostName]:
                kind = IPv6Address if ":" in address else IPv4Address
                resolutionReceiver.addressResolved(kind("TCP", address, portNumber))
            resolutionReceiver.resolutionComplete()
        return resolution


class MemoryReactorTests(unittest.TestCase):
    """Deterministic probes: connections are completed or failed by hand."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.resolver = FakeResolver(
            {"two.example": ["10.0.0.1", "10.0.0.2"], "none.example": []}
        )
        self.reactor.installNameResolver(self.resolver)
        self.tcping = Tcping(self.reactor, limit=10, timeout=5.0)
        self.results: list[dict[str, object]] = []

    def start(self, target: str) -> Deferred[dict[str, object]]:
        d = self.tcping.probe(target)
        d.addCallback(self.results.append)
        return d

    def connect(self, index: int) -> StringTransport:
        """Complete the connection attempt number ``index``."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[index]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return transport

    def refuse(self, index: int) -> None:
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[index]
        factory.clientConnectionFailed(
            self.reactor.connectors[index], Failure(ConnectionRefusedError())
        )

    def test_latency_in_whole_milliseconds_and_connection_closed(self) -> None:
        self.start("10.1.2.3:443")
        self.assertEqual(self.reactor.tcpClients[0][:2], ("10.1.2.3", 443))
        self.reactor.advance(0.2507)
        transport = self.connect(0)
        self.assertEqual(
            self.results,
            [{"target": "10.1.2.3:443", "connected": True, "latency": 250, "error": None}],
        )
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.tcping.in_flight, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_timeout(self) -> None:
        self.start("10.9.9.9:80")
        self.reactor.advance(4.9)
        self.assertEqual(self.results, [])
        self.reactor.advance(0.2)
        self.assertEqual(
            self.results,
            [
                {
                    "target": "10.9.9.9:80",
                    "connected": False,
                    "latency": 0,
                    "error": "dial tcp 10.9.9.9:80: i/o timeout",
                }
            ],
        )
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(self.tcping.in_flight, 0)

    def test_timeout_during_lookup(self) -> None:
        self.start("slow.example:80")
        self.assertEqual(self.resolver.asked, ["slow.example"])
        self.reactor.advance(5.0)
        self.assertEqual(self.results[0]["error"], "dial tcp: lookup slow.example: i/o timeout")
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.tcping.in_flight, 0)

    def test_unknown_host(self) -> None:
        self.start("none.example:80")
        self.assertEqual(
            self.results,
            [
                {
                    "target": "none.example:80",
                    "connected": False,
                    "latency": 0,
                    "error": "dial tcp: lookup none.example: no such host",
                }
            ],
        )

    def test_next_address_after_refusal(self) -> None:
        self.start("two.example:22")
        self.assertEqual(self.reactor.tcpClients[0][:2], ("10.0.0.1", 22))
        self.refuse(0)
        self.assertEqual(self.results, [])
        self.assertEqual(self.reactor.tcpClients[1][:2], ("10.0.0.2", 22))
        self.connect(1)
        self.assertIs(self.results[0]["connected"], True)

    def test_all_addresses_fail_reports_first_error(self) -> None:
        self.start("two.example:22")
        self.refuse(0)
        self.refuse(1)
        self.assertEqual(
            self.results[0]["error"], "dial tcp 10.0.0.1:22: connect: connection refused"
        )
        self.assertEqual(self.tcping.in_flight, 0)

    def test_ipv6_literal(self) -> None:
        self.start("[::1]:8080")
        self.assertEqual(self.reactor.tcpClients[0][:2], ("::1", 8080))
        self.refuse(0)
        self.assertEqual(self.results[0]["target"], "[::1]:8080")
        self.assertEqual(self.results[0]["error"], "dial tcp [::1]:8080: connect: connection refused")

    def test_limit(self) -> None:
        for n in range(10):
            self.start(f"10.0.0.{n + 1}:80")
        self.assertEqual(self.tcping.in_flight, 10)
        self.assertRaises(TcpingBusy, self.tcping.probe, "10.0.0.99:80")
        self.assertEqual(len(self.reactor.tcpClients), 10)
        self.refuse(3)
        self.assertEqual(self.tcping.in_flight, 9)
        self.start("10.0.0.99:80")
        self.assertEqual(self.tcping.in_flight, 10)
        self.assertRaises(TcpingBusy, self.tcping.probe, "10.0.0.100:80")

    def test_custom_limit(self) -> None:
        tcping = Tcping(self.reactor, limit=2, timeout=1.0)
        tcping.probe("10.0.0.1:1")
        tcping.probe("10.0.0.2:1")
        self.assertRaises(TcpingBusy, tcping.probe, "10.0.0.3:1")
        self.reactor.advance(1.0)
        self.assertEqual(tcping.in_flight, 0)

    def test_cancel_frees_slot(self) -> None:
        d = self.tcping.probe("10.0.0.1:80")
        failures: list[Failure] = []
        d.addErrback(failures.append)
        d.cancel()
        self.assertTrue(failures[0].check(CancelledError))
        self.assertEqual(self.tcping.in_flight, 0)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        # A late connection after cancellation is closed and changes nothing.
        transport = self.connect(0)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.tcping.in_flight, 0)

    def test_bad_arguments(self) -> None:
        self.assertRaises(ValueError, Tcping, self.reactor, limit=0)
        self.assertRaises(ValueError, Tcping, self.reactor, timeout=0)
