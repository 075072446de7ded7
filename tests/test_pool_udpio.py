"""UDP socket I/O of the QUIC pool on real loopback sockets: runs sent in one
system call (UDP_SEGMENT) and coalesced reads (UDP_GRO) keep every datagram
and its boundaries."""

from __future__ import annotations

import socket
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import DatagramProtocol
from twisted.trial import unittest

from nodepass.pool.udpio import BatchReadPort, DatagramSender, listen_udp, segments, tune_socket

LINUX = sys.platform.startswith("linux")


class _Collect(DatagramProtocol):
    def __init__(self, want: int) -> None:
        self.got: list[tuple[bytes, Any]] = []
        self.want = want
        self.done: Deferred[None] = Deferred()

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.got.append((data, addr))
        if len(self.got) >= self.want and not self.done.called:
            self.done.callback(None)


def _run(count: int, size: int, tail: int) -> list[bytes]:
    return [bytes([i]) * size for i in range(count)] + ([b"\xff" * tail] if tail else [])


class DatagramSenderTests(unittest.TestCase):
    def _receiver(self) -> socket.socket:
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(receiver.close)
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(30)
        return receiver

    def _sender(self) -> DatagramSender:
        port = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return DatagramSender(port)

    def test_a_run_arrives_as_separate_datagrams(self) -> None:
        receiver = self._receiver()
        sender = self._sender()
        self.assertEqual(sender.gso, LINUX)
        run = _run(5, 1200, 300)
        for _ in range(2):
            sender.send_run(run, receiver.getsockname())
            self.assertEqual([receiver.recv(65536) for _ in run], run)
            sender.gso = False  # and the same, one datagram at a time

    def test_too_large_for_the_path_raises_for_the_caller(self) -> None:
        port = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        tune_socket(port)
        sender = DatagramSender(port)
        receiver = self._receiver()
        with self.assertRaises(OSError):
            sender.send(bytes(70000), receiver.getsockname())  # above any UDP payload


class BatchReadPortTests(unittest.TestCase):
    def _listen(self, want: int) -> tuple[Any, _Collect]:
        proto = _Collect(want)
        port = listen_udp(reactor, 0, proto, "127.0.0.1")
        self.addCleanup(port.stopListening)
        return port, proto

    @inlineCallbacks
    def test_coalesced_reads_are_handed_over_one_datagram_at_a_time(self) -> Any:
        runs = [_run(20, 1452, 0), _run(7, 1200, 500), _run(1, 900, 0), _run(30, 1250, 1)]
        want = sum(map(len, runs))
        port, proto = self._listen(want)
        if LINUX:
            self.assertIsInstance(port, BatchReadPort)
            self.assertTrue(port.gro)
        sender_port = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(sender_port.stopListening)
        sender = DatagramSender(sender_port)
        dest = ("127.0.0.1", port.getHost().port)
        for run in runs:  # sent with UDP_SEGMENT: the receiver's kernel keeps them together
            sender.send_run(run, dest)
        yield proto.done
        self.assertEqual([d for d, _a in proto.got], [d for run in runs for d in run])
        self.assertEqual({a for _d, a in proto.got}, {("127.0.0.1", sender_port.getHost().port)})

    def test_listen_udp_on_another_reactor_is_its_listenUDP(self) -> None:
        from tests.test_pool_quic import _Net

        net = _Net()
        port = listen_udp(net, 4433, DatagramProtocol(), "127.0.0.1")
        self.assertIs(net.ports[4433], port)

    def test_segments_cut_at_the_announced_size(self) -> None:
        gro = [(17, 104, (1200).to_bytes(4, sys.byteorder))]
        data = b"a" * 1200 + b"b" * 1200 + b"c" * 7
        self.assertEqual(segments(data, gro), [b"a" * 1200, b"b" * 1200, b"c" * 7])
        self.assertEqual(segments(data[:1200], gro), [data[:1200]])  # one datagram: as it is
        self.assertEqual(segments(data, []), [data])
        self.assertEqual(segments(data, [(0, 1, b"x")]), [data])  # another control message
