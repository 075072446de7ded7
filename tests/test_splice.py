"""The zero-copy relay (splice) between two plain TCP sockets, on real sockets.

The far ends are ordinary blocking sockets driven from threads, so the
reactor under test only runs the relay.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import time
from typing import Any

import psutil
from twisted.internet import defer, ssl, threads
from twisted.internet.protocol import Factory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from nodepass.datapath.ratelimit import Throttle
from nodepass.relay import RelayProtocol, join
from nodepass.relay.splice import SPLICE_AVAILABLE, can_splice
from nodepass.stats import TunnelStats
from tests.support import make_cert_files, new_dir, reactor, wait_for


def _send_all(sock: socket.socket, data: bytes, shutdown: bool = True) -> None:
    view = memoryview(data)
    while view:
        n = sock.send(view[: 1 << 20])
        view = view[n:]
    if shutdown:
        sock.shutdown(socket.SHUT_WR)


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


class SpliceTestCase(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        if not SPLICE_AVAILABLE:
            raise unittest.SkipTest("os.splice is not available on this platform")

    @defer.inlineCallbacks
    def pair(self, tls: bool = False) -> Any:
        """Accepted relay endpoints (a, b) and the blocking far-end sockets (sa, sb)."""
        accepted: list[RelayProtocol] = []

        class F(Factory):
            def buildProtocol(self, addr: Any) -> RelayProtocol:
                p = RelayProtocol()
                accepted.append(p)
                return p

        factory: Any = F()
        if tls:
            crt, key, _der = make_cert_files(new_dir(self))
            with open(crt, "rb") as f1, open(key, "rb") as f2:
                cert = ssl.PrivateCertificate.loadPEM(f1.read() + f2.read())
            factory = TLSMemoryBIOFactory(cert.options(), False, factory)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        socks = []
        for n in (1, 2):
            s = socket.create_connection(("127.0.0.1", port.getHost().port))
            self.addCleanup(s.close)
            socks.append(s)
            yield wait_for(lambda n=n: len(accepted) == n)
        for p in accepted:
            self.addCleanup(lambda p=p: p.abort())
        return accepted[0], accepted[1], socks[0], socks[1]


class SpliceTransferTests(SpliceTestCase):
    @defer.inlineCallbacks
    def transfer(self, size: int) -> Any:
        a, b, sa, sb = yield self.pair()
        self.assertTrue(can_splice(a, b))
        stats = TunnelStats()
        done = join(a, b, reactor=reactor, stats=stats, counted=a)
        self.assertIn("doRead", a.transport.__dict__)  # the splice relay took the socket over
        payload = os.urandom(size)
        sender = threads.deferToThread(_send_all, sa, payload)
        got = yield threads.deferToThread(_recv_all, sb)
        yield sender
        reason = yield done
        self.assertEqual(reason, "EOF")
        self.assertEqual(len(got), size)
        self.assertEqual(hashlib.sha256(got).digest(), hashlib.sha256(payload).digest())
        self.assertEqual((stats.tcprx, stats.tcptx), (size, 0))
        self.assertTrue(a.lost and b.lost)

    def test_0_bytes(self) -> Any:
        return self.transfer(0)

    def test_1_byte(self) -> Any:
        return self.transfer(1)

    def test_64k_minus_1(self) -> Any:
        return self.transfer(65535)

    def test_64k(self) -> Any:
        return self.transfer(65536)

    def test_64k_plus_1(self) -> Any:
        return self.transfer(65537)

    def test_100_mib(self) -> Any:
        return self.transfer(100 << 20)

    @defer.inlineCallbacks
    def test_bytes_read_before_the_join_go_first(self) -> Any:
        a, b, sa, sb = yield self.pair()
        sa.sendall(b"early:")
        yield wait_for(lambda: a.buffered() == b"early:")
        b.transport.write(b"queued:")  # still in the transport's buffer when the join starts
        stats = TunnelStats()
        done = join(a, b, reactor=reactor, stats=stats, counted=b)
        sender = threads.deferToThread(_send_all, sa, b"late")
        got = yield threads.deferToThread(_recv_all, sb)
        yield sender
        yield done
        self.assertEqual(got, b"queued:early:late")
        self.assertEqual(stats.tcptx, len(b"early:late"))

    @defer.inlineCallbacks
    def test_half_close_both_ways(self) -> Any:
        a, b, sa, sb = yield self.pair()
        done = join(a, b, reactor=reactor, half_close=True)
        sa.sendall(b"question")
        sa.shutdown(socket.SHUT_WR)
        got = yield threads.deferToThread(_recv_all, sb)
        self.assertEqual(got, b"question")
        self.assertFalse(a.lost or b.lost)  # the other direction is still open
        sb.sendall(b"answer")
        sb.shutdown(socket.SHUT_WR)
        back = yield threads.deferToThread(_recv_all, sa)
        self.assertEqual(back, b"answer")
        reason = yield done
        self.assertEqual(reason, "EOF")

    @defer.inlineCallbacks
    def test_peer_reset_mid_transfer(self) -> Any:
        a, b, sa, sb = yield self.pair()
        fds = psutil.Process().num_fds()
        done = join(a, b, reactor=reactor)

        def send_then_reset() -> None:
            sa.sendall(os.urandom(4 << 20))
            sa.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sa.close()  # RST

        reader = threads.deferToThread(_recv_all, sb)
        yield threads.deferToThread(send_then_reset)
        yield reader
        reason = yield done
        self.assertNotEqual(reason, "")
        self.assertTrue(a.lost and b.lost)
        yield wait_for(lambda: psutil.Process().num_fds() <= fds, 10, "descriptors released")

    @defer.inlineCallbacks
    def test_slow_reader_holds_memory_flat(self) -> Any:
        a, b, sa, sb = yield self.pair()
        sb.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        done = join(a, b, reactor=reactor)
        payload = os.urandom(200 << 20)
        rss = psutil.Process().memory_info().rss
        sa.settimeout(0.5)
        sent = 0
        stalled = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                sent += sa.send(payload[sent : sent + (1 << 20)])
            except TimeoutError:
                stalled = True
                break
            yield defer.succeed(None)
            d: defer.Deferred[None] = defer.Deferred()
            reactor.callLater(0, d.callback, None)
            yield d
        self.assertTrue(stalled, "the writer never had to wait")
        self.assertLess(sent, len(payload))
        # Held in kernel buffers and one pipe, not in this process.
        self.assertLess(psutil.Process().memory_info().rss - rss, 32 << 20)
        sa.settimeout(None)
        rest = threads.deferToThread(_send_all, sa, payload[sent:])
        got = yield threads.deferToThread(_recv_all, sb)
        yield rest
        yield done
        self.assertEqual(hashlib.sha256(got).digest(), hashlib.sha256(payload).digest())

    @defer.inlineCallbacks
    def test_rate_limit_within_10_percent(self) -> Any:
        a, b, sa, sb = yield self.pair()
        rate = 5_000_000  # bytes/s
        throttle = Throttle(reactor, rate)
        stats = TunnelStats()
        done = join(a, b, reactor=reactor, stats=stats, counted=a, throttle=throttle)
        payload = os.urandom(3 * rate)
        start = time.monotonic()
        sender = threads.deferToThread(_send_all, sa, payload)
        got = yield threads.deferToThread(_recv_all, sb)
        elapsed = time.monotonic() - start
        yield sender
        yield done
        self.assertEqual(len(got), len(payload))
        # The bucket starts full (one second of traffic), then refills at the rate.
        measured = (len(payload) - rate) / elapsed
        self.assertGreater(measured, rate * 0.9 * 2 / 3)
        self.assertLess(measured, rate * 1.1)
        self.assertEqual(stats.tcprx, len(payload))

    @defer.inlineCallbacks
    def test_read_timeout(self) -> Any:
        a, b, sa, sb = yield self.pair()
        done = join(a, b, reactor=reactor, read_timeout=0.3)
        sa.sendall(b"x")
        reason = yield done
        self.assertEqual(reason, "read timeout")
        got = yield threads.deferToThread(_recv_all, sb)
        self.assertEqual(got, b"x")

    @defer.inlineCallbacks
    def test_tls_uses_the_copying_relay(self) -> Any:
        a, b, sa, sb = yield self.pair(tls=True)
        self.assertFalse(can_splice(a, b))
        join(a, b, reactor=reactor)
        self.assertNotIn("doRead", a.transport.__dict__)
