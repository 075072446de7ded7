"""Opening TCP connections without Twisted's extra reactor pass.

Every tunnelled connection opens one or two TCP connections (the target on
the egress side, the pool member that replaces the one used on the client),
so the cost of a dial is on the critical path of the connection rate.
``reactor.connectTCP`` starts the ``connect`` only on the next reactor pass
(a ``callLater(0)``), arms a delayed call for the timeout, and on completion
calls ``connect`` a second time and re-registers the socket with the poller
three times.  :func:`connect_tcp` makes the same kind of connection with:

* the ``connect`` system call made at once (IP literals; a host name still
  goes through the reactor's resolver first);
* the socket created non-blocking, so no extra ``ioctl``;
* completion read from ``SO_ERROR`` alone, keeping the read registration
  (one poller update instead of three);
* the timeout filed in the clock's :class:`~nodepass.wheel.TimerWheel`.

The connector, transport and factory calls are Twisted's own (``IConnector``,
``startedConnecting``, ``buildProtocol``, ``clientConnectionFailed`` with
the same error types), so any ``ClientFactory`` works with it.  Reactors
that are not Twisted's POSIX ones (test reactors) get ``reactor.connectTCP``.

:func:`dial` is the endpoint-style form: a Deferred fired with the connected
protocol once its ``connectionMade`` ran.
"""

from __future__ import annotations

import socket
from errno import EALREADY, EINPROGRESS, EISCONN, EWOULDBLOCK
from os import strerror
from typing import Any

from twisted.internet import abstract, defer, error, tcp
from twisted.internet.interfaces import IAddress, IConnector, IProtocol, IProtocolFactory
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure

from nodepass.wheel import wheel_for

__all__ = ["connect_tcp", "dial", "lean_reactor", "LeanClient"]

_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0) | getattr(socket, "SOCK_CLOEXEC", 0)


def lean_reactor(reactor: Any) -> bool:
    """Whether :func:`connect_tcp` can drive ``reactor`` itself."""
    return isinstance(reactor, PosixReactorBase) and _NONBLOCK != 0


class _Client(tcp.Client):
    """A TCP client transport that connects at once (see the module docstring)."""

    _started = False

    def createInternetSocket(self) -> socket.socket:
        return socket.socket(self.addressFamily, self.socketType | _NONBLOCK)

    def _finishInit(self, whenDone: Any, skt: Any, error: Any, reactor: Any) -> None:
        if whenDone:
            # tcp.Connection.__init__ without its second non-blocking ioctl.
            abstract.FileDescriptor.__init__(self, reactor=reactor)
            self.socket = skt
            self.fileno = skt.fileno  # type: ignore[method-assign]
            self.protocol = None  # type: ignore[assignment]
            # Set now rather than once connected, so that the instance keeps
            # a compact attribute dictionary.
            self.connected = 0
            self.logstr = ""
            self._started = True
        else:
            reactor.callLater(0, self.failIfNotConnected, error)

    def start(self) -> None:
        """Make the connect call (the connector calls it once it is set up)."""
        me: Any = self
        if not self._started:
            return
        if self._requiresResolution:
            me.resolveAddress()
            return
        try:
            me._setRealAddress(self.addr)
        except Exception:
            me.failIfNotConnected(Failure())  # type: ignore[no-untyped-call]

    def doConnect(self) -> None:  # type: ignore[override]
        me: Any = self
        if not hasattr(self, "connector"):
            return
        if self.__dict__.get("doRead") is None:
            # First call: the connect system call itself.
            me.doWrite = me.doRead = self.doConnect
            try:
                result = self.socket.connect_ex(me.realAddress)
            except OSError as exc:
                result = exc.args[0]
            if result in (EINPROGRESS, EWOULDBLOCK, EALREADY):
                me.startReading()
                me.startWriting()
                return
            if result not in (0, EISCONN):
                me.failIfNotConnected(_connect_error(result))
                return
        else:
            err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                me.failIfNotConnected(_connect_error(err))
                return
        del me.doWrite
        del me.doRead
        made = getattr(self.connector, "made", None)
        # Still registered for reading, which the connection needs anyway.
        me.stopWriting()
        me._connectDone()
        if made is not None and self.connected and not self.disconnected:
            made(self.protocol)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        # The connector and this transport refer to each other (and the
        # connector to the factory): break that, so the connection is freed at
        # once rather than by the cycle collector.
        connector = self.__dict__.pop("connector", None)
        if connector is not None and getattr(connector, "transport", None) is self:
            connector.transport = None

    def failIfNotConnected(self, err: Any) -> None:
        connector = self.__dict__.get("connector")
        super().failIfNotConnected(err)  # type: ignore[no-untyped-call]
        if connector is not None and getattr(connector, "transport", None) is self:
            connector.transport = None


LeanClient = _Client


def _connect_error(code: int) -> Any:
    make: Any = error.getConnectError
    return make((code, strerror(code)))


class _Connector(tcp.Connector):
    """A connector whose transport connects at once and whose timeout is on the wheel."""

    made: Any = None

    def _makeTransport(self) -> _Client:
        make: Any = _Client
        return make(self.host, self.port, self.bindAddress, self, self.reactor)  # type: ignore[no-any-return]

    def connect(self) -> None:
        me: Any = self
        if self.state != "disconnected":
            raise RuntimeError("can't connect in this state")
        self.state = "connecting"
        if not self.factoryStarted:
            me.factory.doStart()
            self.factoryStarted = 1
        transport: Any = self._makeTransport()
        self.transport = transport
        if self.timeout is not None:
            timeout_error: Any = error.TimeoutError
            me.timeoutID = wheel_for(self.reactor).call_later(
                self.timeout, transport.failIfNotConnected, timeout_error()
            )
        self.factory.startedConnecting(self)
        if self.state == "connecting" and me.transport is transport:
            transport.start()


def connect_tcp(
    reactor: Any,
    host: str,
    port: int,
    factory: ClientFactory,
    *,
    timeout: float | None = 30.0,
    bind: tuple[str, int] | None = None,
) -> IConnector:
    """``reactor.connectTCP(host, port, factory, timeout, bind)``, without the
    extra reactor pass (see the module docstring)."""
    if not lean_reactor(reactor):
        return reactor.connectTCP(host, port, factory, timeout=timeout, bindAddress=bind)  # type: ignore[no-any-return]
    connector = _Connector(host, port, factory, timeout, bind, reactor)  # type: ignore[arg-type]
    connector.connect()
    return connector


class _DialFactory(ClientFactory):
    """Builds the caller's protocol and fires the dial's Deferred."""

    noisy = False

    def __init__(self, factory: IProtocolFactory, done: defer.Deferred[IProtocol]) -> None:
        self.wrapped = factory
        self.done: defer.Deferred[IProtocol] | None = done
        self.cancelled = False

    def buildProtocol(self, addr: IAddress | None) -> Any:
        return self.wrapped.buildProtocol(addr)  # type: ignore[arg-type]

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        # The Deferred is let go once fired (its canceller refers to this factory).
        done, self.done = self.done, None
        if done is None or done.called:
            return
        if self.cancelled:
            done.errback(defer.CancelledError())
        else:
            done.errback(reason)

    def made(self, protocol: IProtocol) -> None:
        done, self.done = self.done, None
        if done is not None and not done.called:
            done.callback(protocol)


def dial(
    reactor: Any,
    host: str,
    port: int,
    factory: IProtocolFactory,
    *,
    timeout: float | None = 30.0,
    bind: tuple[str, int] | None = None,
) -> defer.Deferred[IProtocol]:
    """Connect like a TCP client endpoint: a Deferred fired with the protocol
    ``factory`` built, once its ``connectionMade`` ran; it fails with the
    connection error, and cancelling it stops the attempt (``CancelledError``).

    Only for reactors where :func:`lean_reactor` is true."""
    connectors: list[Any] = []

    def cancel(_d: defer.Deferred[IProtocol]) -> None:
        wrapper.cancelled = True
        for c in connectors:
            if c.state == "connecting":
                c.stopConnecting()

    done: defer.Deferred[IProtocol] = defer.Deferred(canceller=cancel)
    wrapper = _DialFactory(factory, done)
    connector = _Connector(host, port, wrapper, timeout, bind, reactor)  # type: ignore[arg-type]
    connector.made = wrapper.made
    connectors.append(connector)
    connector.connect()
    return done
