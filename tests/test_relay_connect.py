"""Dials that connect at once (nodepass.relay.connect), on real sockets of 127.0.0.1."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionRefusedError, TimeoutError
from twisted.internet.protocol import ClientFactory, Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial import unittest

from nodepass.relay import RelayProtocol, is_plain_tcp
from nodepass.relay.connect import connect_tcp, dial, lean_reactor
from tests.support import echo_server, silent_listener, sleep, wait_for


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound and closed at once)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


class Recorder(RelayProtocol):
    made = False

    def connectionMade(self) -> None:
        self.made = True


class DialTests(unittest.TestCase):
    timeout = 30

    def test_the_reactor_is_driven_directly(self) -> None:
        self.assertTrue(lean_reactor(reactor))
        self.assertFalse(lean_reactor(MemoryReactorClock()))

    @defer.inlineCallbacks
    def test_connects_and_carries_bytes(self) -> Any:
        port = echo_server(self)
        proto = yield dial(reactor, "127.0.0.1", port, Factory.forProtocol(Recorder), timeout=5)
        self.assertTrue(proto.made)  # connectionMade ran before the Deferred fired
        self.assertTrue(is_plain_tcp(proto.transport))  # so the zero-copy relay can take it
        self.assertEqual(proto.transport.getPeer().port, port)
        proto.transport.write(b"ping")
        got = yield proto.peek(4, 10, reactor)
        self.assertEqual(got, b"ping")
        proto.close()
        reason = yield proto.when_lost()
        self.assertEqual(reason, "EOF")

    @defer.inlineCallbacks
    def test_host_name(self) -> Any:
        port = echo_server(self)
        proto = yield dial(reactor, "localhost", port, Factory.forProtocol(RelayProtocol), timeout=5)
        self.assertEqual(proto.transport.getPeer().host, "127.0.0.1")
        proto.abort()

    @defer.inlineCallbacks
    def test_refused(self) -> Any:
        with self.assertRaises(ConnectionRefusedError):
            yield dial(reactor, "127.0.0.1", closed_port(), Factory.forProtocol(RelayProtocol), timeout=5)

    @defer.inlineCallbacks
    def test_cancel(self) -> Any:
        listener = silent_listener(self, backlog=0)
        port = listener.getsockname()[1]
        d = dial(reactor, "127.0.0.1", port, Factory.forProtocol(RelayProtocol), timeout=5)
        d.cancel()
        with self.assertRaises(defer.CancelledError):
            yield d

    @defer.inlineCallbacks
    def test_timeout(self) -> Any:
        # A listener whose accept queue is full drops further SYNs: the
        # connect stays pending until the dial timeout.
        listener = silent_listener(self, backlog=0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
            self.addCleanup(s.close)
        yield sleep(0.2)
        with self.assertRaises(TimeoutError):
            yield dial(reactor, "127.0.0.1", port, Factory.forProtocol(RelayProtocol), timeout=0.5)


class ConnectorTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_factory_calls_as_with_connect_tcp(self) -> Any:
        port = echo_server(self)
        calls: list[str] = []
        built: list[RelayProtocol] = []
        lost: defer.Deferred[None] = defer.Deferred()

        class F(ClientFactory):
            noisy = False

            def startedConnecting(self, connector: Any) -> None:
                calls.append("started")

            def buildProtocol(self, addr: Any) -> RelayProtocol:
                calls.append("build")
                p = RelayProtocol()
                built.append(p)
                return p

            def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
                calls.append("lost")
                lost.callback(None)

        connector = connect_tcp(reactor, "127.0.0.1", port, F(), timeout=5)
        self.assertEqual(calls, ["started"])
        yield wait_for(lambda: built and built[0].transport is not None, what="connected")
        self.assertEqual(connector.state, "connected")
        built[0].close()
        yield lost
        self.assertEqual(calls, ["started", "build", "lost"])
        self.assertEqual(connector.state, "disconnected")

    @defer.inlineCallbacks
    def test_failure_reaches_the_factory(self) -> Any:
        failed: defer.Deferred[list[Failure]] = defer.Deferred()

        class F(ClientFactory):
            noisy = False

            def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
                failed.callback([reason])

        connect_tcp(reactor, "127.0.0.1", closed_port(), F(), timeout=5)
        (reason,) = yield failed
        self.assertTrue(reason.check(ConnectionRefusedError))

    def test_other_reactors_get_connect_tcp(self) -> None:
        memory = MemoryReactorClock()
        factory = ClientFactory()
        connect_tcp(memory, "10.0.0.1", 80, factory, timeout=2.5, bind=("10.0.0.2", 0))
        self.assertEqual(memory.tcpClients[-1], ("10.0.0.1", 80, factory, 2.5, ("10.0.0.2", 0)))
