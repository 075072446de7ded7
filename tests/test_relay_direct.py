"""direct_writer: relay writes that skip the transport's deferred send, without reordering."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from nodepass.log import NodePassLogger
from nodepass.relay import direct_writer
from nodepass.tls import client_connection_creator, server_tls


class _Collect(Protocol):
    """Collects bytes; fires ``done`` once ``want`` bytes have arrived."""

    def __init__(self, want: int) -> None:
        self.want = want
        self.chunks: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size >= self.want and not self.done.called:
            self.done.callback(b"".join(self.chunks))


class _Sender(Protocol):
    def __init__(self) -> None:
        self.ready: defer.Deferred[_Sender] = defer.Deferred()

    def connectionMade(self) -> None:
        self.ready.callback(self)


@implementer(IHandshakeListener)
class _SenderHandshake(_Sender):
    """Ready once the TLS handshake is done."""

    def connectionMade(self) -> None:
        pass

    def handshakeCompleted(self) -> None:
        self.ready.callback(self)


def _one(proto: Protocol) -> Factory:
    f = Factory()
    f.noisy = False
    f.buildProtocol = lambda addr: proto  # type: ignore[method-assign]
    return f


def _client(proto: Protocol) -> ClientFactory:
    f = ClientFactory()
    f.noisy = False
    f.buildProtocol = lambda addr: proto  # type: ignore[method-assign]
    return f


class DirectWriterTests(TestCase):
    timeout = 30

    def _payload(self) -> tuple[list[bytes], bytes]:
        # One chunk far larger than a socket buffer (the kernel takes part,
        # the rest is queued), then small chunks that must queue behind it.
        parts = [bytes(range(256)) * (16 * 1024)] + [b"%06d" % i for i in range(500)]
        return parts, b"".join(parts)

    @defer.inlineCallbacks
    def test_plain_tcp_sends_directly_and_keeps_order(self) -> Any:
        parts, whole = self._payload()
        sink = _Collect(len(whole))
        port = reactor.listenTCP(0, _one(sink), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        sender = _Sender()
        reactor.connectTCP("127.0.0.1", port.getHost().port, _client(sender))
        yield sender.ready
        self.addCleanup(lambda: sender.transport.abortConnection())  # type: ignore[union-attr]
        self.addCleanup(lambda: sink.transport.abortConnection() if sink.transport else None)  # type: ignore[union-attr]
        t: Any = sender.transport
        write = direct_writer(t)
        self.assertNotEqual(write, t.write)
        write(b"x")
        # Nothing was left for the reactor: the byte went out at once.
        self.assertEqual((t._tempDataLen, len(t.dataBuffer) - t.offset), (0, 0))
        for part in parts:
            write(part)
        got = yield sink.done
        self.assertEqual(got, b"x" + whole)

    def test_other_transports_get_their_own_write(self) -> None:
        t = StringTransport()
        self.assertEqual(direct_writer(t), t.write)
        direct_writer(t)(b"abc")
        self.assertEqual(t.value(), b"abc")

    @defer.inlineCallbacks
    def test_tls_write_is_not_held_back_and_keeps_order(self) -> Any:
        logger = NodePassLogger("none", stream=None)
        server_ctx = server_tls(1, "", "", logger=logger)
        parts, whole = self._payload()
        sink = _Collect(len(whole) + 2)
        port = reactor.listenTCP(0, TLSMemoryBIOFactory(server_ctx, False, _one(sink)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        sender = _SenderHandshake()
        reactor.connectTCP(
            "127.0.0.1",
            port.getHost().port,
            TLSMemoryBIOFactory(client_connection_creator(1, ""), True, _client(sender)),
        )
        yield sender.ready
        self.addCleanup(lambda: sender.transport.abortConnection())  # type: ignore[union-attr]
        t: Any = sender.transport
        t.write(b"A")  # held back by the TLS transport's small-write batching
        self.assertEqual(t._aggregator._buffer, [b"A"])
        write = direct_writer(t)
        write(b"B")
        # The held-back byte went first, and nothing waits for the next pass.
        self.assertEqual(t._aggregator._buffer, [])
        for part in parts:
            write(part)
        got = yield sink.done
        self.assertEqual(got, b"AB" + whole)
