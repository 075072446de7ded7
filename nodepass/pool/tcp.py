"""Type-0 (TCP) pool: one TCP connection per member, TLS per the tls code.

Wire sequence on every member: TCP connect, the TLS handshake when the tls
code is 1 or 2, then the server writes the 4-byte ID (see
:mod:`nodepass.pool.base`).

The server side (:class:`TcpServerPool`) takes connections on the tunnel TCP
port once the handshake is done (:meth:`TcpServerPool.factory`), wrapping
them in TLS when configured and writing the ID once the TLS handshake
completes (60 s at most).  The client side (:class:`TcpClientPool`) dials the
tunnel address for each member, with the TLS set-up of the server's tls code.
TLS runs on the lean layer of :mod:`nodepass.relay.tls`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure

from nodepass.log import NodePassLogger
from nodepass.pool.base import ClientPoolBase, IdlePool, PoolConnection, ServerPoolBase
from nodepass.relay.connect import connect_tcp
from nodepass.relay.tls import TLSFactory

__all__ = ["TcpServerPool", "TcpClientPool", "Dialer", "DialFactory"]


class _MemberFactory(Factory):
    noisy = False

    def __init__(self, pool: IdlePool, wait_handshake: bool) -> None:
        self.pool = pool
        self.wait_handshake = wait_handshake

    def buildProtocol(self, addr: IAddress | None) -> PoolConnection:
        p = PoolConnection(self.pool, True, self.wait_handshake)
        p.factory = self
        return p


class TcpServerPool(ServerPoolBase):
    """Members are TCP (or TLS over TCP) connections on the tunnel port."""

    def __init__(self, reactor: Any, logger: NodePassLogger, **kwargs: Any) -> None:
        super().__init__(reactor, logger, **kwargs)
        plain = _MemberFactory(self, self.tls is not None)
        self._factory: Any = TLSFactory(self.tls.ssl_context, True, plain) if self.tls is not None else plain

    def factory(self) -> Factory:
        return self._factory  # type: ignore[no-any-return]


class Dialer:
    """The TCP dials of a client pool to one address, in TLS with a context.

    :meth:`dial` wraps a factory in TLS (``ssl_context``; ``server_hostname``
    is the name sent and verified, None: no SNI) and connects it (``connect``
    replaces the TCP connect in tests); :meth:`stop` gives up the dials still
    connecting (the pool closed).  Used by the TCP and WebSocket pools.
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        timeout: float,
        ssl_context: Any = None,
        server_hostname: str | None = None,
        connect: Callable[[ClientFactory], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.connect = connect
        #: Dials still connecting (each leaves once it connected or failed).
        self._connectors: set[Any] = set()

    def dial(self, factory: ClientFactory) -> None:
        """Connect ``factory`` (in TLS when there is a context) to the address."""
        tracked = _Tracked(factory, self._connectors)
        wrapped: Any = tracked
        if self.ssl_context is not None:
            wrapped = TLSFactory(self.ssl_context, False, tracked, self.server_hostname)
        if self.connect is not None:
            self.connect(wrapped)
            return
        connect_tcp(self.reactor, self.host, self.port, wrapped, timeout=self.timeout)

    def stop(self) -> None:
        """Stop every dial that has not connected yet."""
        connectors = list(self._connectors)
        self._connectors.clear()
        for connector in connectors:
            if getattr(connector, "state", "") == "connecting":
                connector.stopConnecting()


class _Tracked(ClientFactory):
    """Forwards to ``factory`` and keeps the connector in ``connecting`` until
    the dial has an outcome (so nothing holds a finished dial)."""

    noisy = False

    def __init__(self, factory: ClientFactory, connecting: set[Any]) -> None:
        self.factory = factory
        self.connecting = connecting
        self.connector: Any = None

    def startedConnecting(self, connector: Any) -> None:
        self.connector = connector
        self.connecting.add(connector)
        self.factory.startedConnecting(connector)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        self.connecting.discard(self.connector)
        self.connector = None
        return self.factory.buildProtocol(addr)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.connecting.discard(connector)
        self.factory.clientConnectionFailed(connector, reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        self.factory.clientConnectionLost(connector, reason)


class DialFactory(ClientFactory):
    """Connects one dial attempt to its protocol (a member, or a connection
    that carries members); ``failed`` is called with the reason when the dial
    failed, and ``done`` (when given) once the dial has an outcome."""

    noisy = False  # one factory per dial: no "Starting factory" log lines

    def __init__(
        self, conn: Protocol, failed: Callable[[Failure], None], done: Callable[[], None] | None = None
    ) -> None:
        self.conn: Protocol | None = conn
        self.failed = failed
        self.done = done

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        done = self.done
        # Handed over once and not kept, nor the callbacks that refer to it: a
        # TLS layer keeps this factory, and the protocol would otherwise be
        # freed only by the cycle collector.
        conn, self.conn = self.conn, None
        self.failed, self.done = _ignore, None
        if done is not None:
            done()
        return conn

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        done, failed = self.done, self.failed
        self.conn, self.failed, self.done = None, _ignore, None
        if done is not None:
            done()
        failed(reason)


def _ignore(_reason: Failure) -> None:
    pass


class TcpClientPool(ClientPoolBase):
    """Dials ``host:port`` for each member (``connect`` replaces the dial in tests).

    ``ssl_context`` (a standard-library client context) wraps members in TLS;
    ``server_hostname`` is the name sent and verified (None: no SNI)."""

    def __init__(
        self,
        reactor: Any,
        logger: NodePassLogger,
        *,
        host: str = "",
        port: int = 0,
        dial_timeout: float = 5.0,
        ssl_context: Any = None,
        server_hostname: str | None = None,
        connect: Callable[[ClientFactory], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(reactor, logger, **kwargs)
        self.host = host
        self.port = port
        self.dialer = Dialer(reactor, host, port, dial_timeout, ssl_context, server_hostname, connect)

    def _open_member(self, conn: PoolConnection, failed: Callable[[str], None]) -> None:
        def dial_failed(reason: Failure) -> None:
            failed(f"dial tcp {self.host}:{self.port}: {reason.getErrorMessage()}")

        self.dialer.dial(DialFactory(conn, dial_failed))

    def _close_transport(self) -> None:
        self.dialer.stop()
