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
from twisted.internet.protocol import ClientFactory, Factory
from twisted.python.failure import Failure

from nodepass.log import NodePassLogger
from nodepass.pool.base import ClientPoolBase, IdlePool, PoolConnection, ServerPoolBase
from nodepass.relay.connect import connect_tcp
from nodepass.relay.tls import TLSFactory

__all__ = ["TcpServerPool", "TcpClientPool"]


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


class _DialFactory(ClientFactory):
    """Connects one dial attempt to its member."""

    noisy = False  # one factory per member: no "Starting factory" log lines

    def __init__(self, conn: PoolConnection, failed: Callable[[Failure], None], done: Callable[[], None]) -> None:
        self.conn: PoolConnection | None = conn
        self.failed = failed
        self.done = done

    def buildProtocol(self, addr: IAddress | None) -> PoolConnection | None:
        self.done()
        # Handed over once and not kept, nor the callbacks that refer to it: a
        # TLS layer keeps this factory, and the member would otherwise be
        # freed only by the cycle collector.
        conn, self.conn = self.conn, None
        self.failed, self.done = _ignore, _nothing
        return conn

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.done()
        failed = self.failed
        self.conn, self.failed, self.done = None, _ignore, _nothing
        failed(reason)


def _ignore(_reason: Failure) -> None:
    pass


def _nothing() -> None:
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
        self.dial_timeout = dial_timeout
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self._connect = connect
        self._connectors: set[Any] = set()

    def _open_member(self, conn: PoolConnection, failed: Callable[[str], None]) -> None:
        connectors: list[Any] = []

        def done() -> None:
            for connector in connectors:
                self._connectors.discard(connector)
            connectors.clear()

        def dial_failed(reason: Failure) -> None:
            failed(f"dial tcp {self.host}:{self.port}: {reason.getErrorMessage()}")

        factory: Any = _DialFactory(conn, dial_failed, done)
        if self.ssl_context is not None:
            factory = TLSFactory(self.ssl_context, False, factory, self.server_hostname)
        if self._connect is not None:
            self._connect(factory)
            return
        connector = connect_tcp(self.reactor, self.host, self.port, factory, timeout=self.dial_timeout)
        if getattr(connector, "state", "connecting") == "connecting":
            # Still under way (a refused or failed dial may already be over).
            connectors.append(connector)
            self._connectors.add(connector)

    def _close_transport(self) -> None:
        for connector in list(self._connectors):
            if getattr(connector, "state", "") == "connecting":
                connector.stopConnecting()
        self._connectors.clear()
