"""Type-0 (TCP) connection pool, server and client side, wire-compatible with NodePass.

Wire sequence on every pool connection: TCP connect, the TLS handshake when
the tls code is 1 or 2, then the server writes exactly 4 random bytes, the
connection ID (both ends name it by its 8 lower-case hex digits).  The first
connection of a server pool instance gets ``00 00 00 00`` and becomes the
control channel.  Nothing else is sent until the connection is used; each
connection is used once and then closed.

Both pools keep idle connections in FIFO order (``active`` = how many) and
offer:

* :meth:`incoming_get` (ingress side): the oldest idle connection, waiting up
  to a timeout ("insufficient pool connections");
* :meth:`outgoing_get` (egress side): the connection with a given ID, waiting
  up to a timeout for it to arrive ("pool connection not found"); an idle
  connection the peer closed stays findable by ID for a few seconds, because
  the peer's close can overtake the signal that names it;
* :meth:`flush`, :meth:`close`, and an error counter.

A connection that closes while idle leaves the pool at once.

The server pool accepts only connections from the handshaken client IP,
drops new ones when ``max`` are already idle, gives a TLS handshake 60 s, and (when ``strict`` is set,
i.e. it is the ingress side) closes an idle connection that sends bytes before
it was used, because a NodePass peer never does.

The client pool keeps between ``min`` and ``max`` idle connections: each
round it adjusts the interval (100 ms steps within [min_interval,
max_interval]: faster when fewer than 20 % of the capacity are idle, slower
above 80 %), dials ``capacity - idle`` connections concurrently, then adjusts
the capacity by one (shrink when fewer than 20 % of the attempts succeeded,
grow above 80 %).  An ID must arrive within 60 s.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IHandshakeListener
from twisted.internet.protocol import ClientFactory, Factory, connectionDone
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from nodepass.log import NodePassLogger
from nodepass.tunnel.relay import RelayProtocol

__all__ = [
    "PoolError",
    "PoolConnection",
    "ServerPool",
    "ClientPool",
    "CONTROL_ID",
    "ID_READ_TIMEOUT",
    "set_keepalive",
]

CONTROL_ID = "00000000"
ID_READ_TIMEOUT = 60.0
STEP = 0.1
#: How long / how many idle connections closed by the peer stay findable by ID.
DEAD_SECONDS = 10.0
DEAD_KEEP = 1024


class PoolError(Exception):
    """A pool request that could not be served (timeout, closed pool)."""


def set_keepalive(transport: Any, period: float) -> None:
    """Enable TCP keep-alive with the given period on a (possibly TLS) transport."""
    import socket

    t = transport
    for _ in range(4):
        if t is None:
            return
        handle = getattr(t, "getHandle", None)
        sock = handle() if handle is not None else None
        if isinstance(sock, socket.socket):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                secs = max(1, int(period))
                if hasattr(socket, "TCP_KEEPIDLE"):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, secs)
                if hasattr(socket, "TCP_KEEPINTVL"):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, secs)
            except OSError:
                pass
            return
        t = getattr(t, "transport", None)


@implementer(IHandshakeListener)
class PoolConnection(RelayProtocol):
    """One pool connection; after its ID phase it is an ordinary relay endpoint."""

    def __init__(self, pool: _PoolBase, is_server: bool, tls: bool) -> None:
        super().__init__()
        self.pool = pool
        self.is_server = is_server
        self.tls = tls
        self.id = ""
        self.in_use = False
        self._id_buf = b""
        self._id_timer: Any = None
        self._on_id: Callable[[PoolConnection], None] | None = None
        self._peer_fp = ""

    # -- server side ---------------------------------------------------------
    def connectionMade(self) -> None:
        if self.is_server:
            assert isinstance(self.pool, ServerPool)
            if not self.pool._admit(self):
                self.abort()
                return
            if not self.tls:
                self.pool._assign(self)
            else:
                # A TLS handshake that never completes must not hold a socket forever.
                self._id_timer = self.pool.reactor.callLater(ID_READ_TIMEOUT, self._id_timeout)
        else:
            assert isinstance(self.pool, ClientPool)
            set_keepalive(self.transport, self.pool.keepalive)
            self._id_timer = self.pool.reactor.callLater(ID_READ_TIMEOUT, self._id_timeout)

    def handshakeCompleted(self) -> None:
        if not self.is_server:
            self._peer_fp = self._read_peer_fingerprint()
            return
        if self._id_timer is not None and self._id_timer.active():
            self._id_timer.cancel()
        self._id_timer = None
        if not self.lost and not self.id:
            assert isinstance(self.pool, ServerPool)
            self.pool._assign(self)

    def _id_timeout(self) -> None:
        self._id_timer = None
        self.abort()

    def dataReceived(self, data: bytes) -> None:
        if not self.is_server and not self.id:
            self._id_buf += data
            if len(self._id_buf) < 4:
                return
            raw, rest = self._id_buf[:4], self._id_buf[4:]
            self._id_buf = b""
            if self._id_timer is not None and self._id_timer.active():
                self._id_timer.cancel()
            self._id_timer = None
            self.id = raw.hex()
            assert isinstance(self.pool, ClientPool)
            self.pool._got_id(self)
            if rest and not self.lost:
                super().dataReceived(rest)
            return
        if self.is_server and not self.in_use and self._sink is None:
            assert isinstance(self.pool, ServerPool)
            if self.pool.strict and self.id and self.id != CONTROL_ID:
                self.pool._early_data(self)
                return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._id_timer is not None and self._id_timer.active():
            self._id_timer.cancel()
        self._id_timer = None
        super().connectionLost(reason)
        self.pool._lost(self)

    def peer_fingerprint(self) -> str:
        """Fingerprint of the peer's TLS certificate on this connection ("" if none),
        as seen when its handshake completed."""
        if self._peer_fp:
            return self._peer_fp
        return self._read_peer_fingerprint()

    def _read_peer_fingerprint(self) -> str:
        from nodepass.tls import fingerprint_of_x509

        t = self.transport
        get = getattr(t, "getPeerCertificate", None)
        if get is None:
            return ""
        try:
            cert = get()
        except Exception:
            return ""
        if cert is None:
            return ""
        return fingerprint_of_x509(cert)


class _Factory(Factory):
    noisy = False

    def __init__(self, pool: _PoolBase, is_server: bool, tls: bool) -> None:
        self.pool = pool
        self.is_server = is_server
        self.tls = tls

    def buildProtocol(self, addr: IAddress | None) -> PoolConnection:
        p = PoolConnection(self.pool, self.is_server, self.tls)
        p.factory = self
        return p


class _PoolBase:
    """Idle set (FIFO by arrival), waiters, error counter."""

    def __init__(self, reactor: Any, logger: NodePassLogger, max_cap: int, keepalive: float) -> None:
        self.reactor = reactor
        self.logger = logger
        self.max_cap = max(1, max_cap)
        self.keepalive = keepalive
        self.closed = False
        self._idle: OrderedDict[str, PoolConnection] = OrderedDict()
        self._any_waiters: list[defer.Deferred[tuple[str, PoolConnection]]] = []
        self._id_waiters: dict[str, list[defer.Deferred[PoolConnection]]] = {}
        self._errors = 0
        self._dead: OrderedDict[str, tuple[float, PoolConnection]] = OrderedDict()

    # -- counters --------------------------------------------------------------
    @property
    def active(self) -> int:
        """Idle pool connections (the POOL figure)."""
        return len(self._idle)

    def ready(self) -> bool:
        return not self.closed

    def add_error(self) -> None:
        self._errors += 1

    def error_count(self) -> int:
        return self._errors

    def reset_error(self) -> None:
        self._errors = 0

    def has(self, conn_id: str) -> bool:
        return conn_id in self._idle

    # -- internal --------------------------------------------------------------
    def _enqueue(self, conn: PoolConnection) -> None:
        """A connection with an ID is ready: hand it to a waiter or keep it idle."""
        if self.closed:
            conn.abort()
            return
        waiters = self._id_waiters.pop(conn.id, None)
        if waiters:
            d = waiters.pop(0)
            if waiters:
                self._id_waiters[conn.id] = waiters
            conn.in_use = True
            d.callback(conn)
            return
        if conn.id != CONTROL_ID:
            while self._any_waiters:
                d2 = self._any_waiters.pop(0)
                if d2.called:
                    continue
                conn.in_use = True
                d2.callback((conn.id, conn))
                return
        if len(self._idle) >= self.max_cap or conn.id in self._idle:
            conn.abort()
            return
        self._idle[conn.id] = conn

    def _lost(self, conn: PoolConnection) -> None:
        if conn.id and self._idle.get(conn.id) is conn:
            del self._idle[conn.id]
            self.logger.debug("Tunnel pool: idle %s closed: %s", conn.id, conn.lost_reason)
            # The peer may close a connection right after naming it in a signal
            # (verify does); its close can overtake the signal.  Keep it
            # findable by ID for a while, as a pool that never reads idle
            # connections would.
            now = self.reactor.seconds()
            self._dead[conn.id] = (now, conn)
            while self._dead:
                first = next(iter(self._dead.values()))
                if len(self._dead) <= DEAD_KEEP and now - first[0] <= DEAD_SECONDS:
                    break
                self._dead.popitem(last=False)

    def _take(self, conn_id: str) -> PoolConnection | None:
        conn = self._idle.pop(conn_id, None)
        if conn is not None:
            conn.in_use = True
        return conn

    # -- API -------------------------------------------------------------------
    def incoming_get(
        self, timeout: float, *, newest: bool = False
    ) -> defer.Deferred[tuple[str, PoolConnection]]:
        """The oldest idle connection (never the control one), waiting up to ``timeout``.

        ``newest=True`` takes the most recently added one instead: the TLS
        ``verify`` sender uses it so that it does not pick the connection a
        NodePass peer (which takes its oldest) is about to name in its own
        ``verify`` at the same moment.
        """
        if self.closed:
            return defer.fail(PoolError("IncomingGet: pool closed"))
        candidates = list(self._idle)
        for cid in reversed(candidates) if newest else candidates:
            if cid == CONTROL_ID:
                continue
            conn = self._take(cid)
            if conn is not None and not conn.lost:
                return defer.succeed((cid, conn))
        d: defer.Deferred[tuple[str, PoolConnection]] = defer.Deferred()
        self._any_waiters.append(d)

        def expire() -> None:
            if d in self._any_waiters:
                self._any_waiters.remove(d)
                d.errback(PoolError("IncomingGet: insufficient pool connections"))

        call = self.reactor.callLater(timeout, expire)
        d.addBoth(_cancel_call(call))
        return d

    def outgoing_get(self, conn_id: str, timeout: float) -> defer.Deferred[PoolConnection]:
        """The connection named ``conn_id``, waiting up to ``timeout`` for it to arrive."""
        if self.closed:
            return defer.fail(PoolError("OutgoingGet: pool closed"))
        conn = self._take(conn_id)
        if conn is not None:
            return defer.succeed(conn)
        dead = self._dead.pop(conn_id, None)
        if dead is not None:
            return defer.succeed(dead[1])
        d: defer.Deferred[PoolConnection] = defer.Deferred()
        self._id_waiters.setdefault(conn_id, []).append(d)

        def expire() -> None:
            lst = self._id_waiters.get(conn_id)
            if lst and d in lst:
                lst.remove(d)
                if not lst:
                    del self._id_waiters[conn_id]
                d.errback(PoolError("OutgoingGet: pool connection not found"))

        call = self.reactor.callLater(timeout, expire)
        d.addBoth(_cancel_call(call))
        return d

    def flush(self) -> None:
        """Close every idle connection.

        The close is orderly (FIN, or TLS close_notify then FIN), as Go's
        ``Close`` does; an idle connection has no pending writes to wait for."""
        idle = list(self._idle.values())
        self._idle.clear()
        self._dead.clear()
        for conn in idle:
            conn.close()

    def close(self) -> None:
        """Stop the pool: close idle connections and fail every waiter."""
        if self.closed:
            return
        self.closed = True
        self.flush()
        anyw, self._any_waiters = self._any_waiters, []
        for d in anyw:
            if not d.called:
                d.errback(PoolError("IncomingGet: pool closed"))
        idw, self._id_waiters = self._id_waiters, {}
        for lst in idw.values():
            for d2 in lst:
                if not d2.called:
                    d2.errback(PoolError("OutgoingGet: pool closed"))


def _cancel_call(call: Any) -> Callable[[Any], Any]:
    def cancel(result: Any) -> Any:
        if call.active():
            call.cancel()
        return result

    return cancel


class ServerPool(_PoolBase):
    """Accepting side.  Use :meth:`factory` as the protocol factory for the
    tunnel port once the handshake is done (it wraps TLS when configured)."""

    def __init__(
        self,
        reactor: Any,
        logger: NodePassLogger,
        *,
        max_cap: int,
        client_ip: str,
        tls: Any = None,
        keepalive: float = 5.0,
        strict: bool = False,
    ) -> None:
        super().__init__(reactor, logger, max_cap, keepalive)
        self.client_ip = client_ip
        self.tls = tls
        self.strict = strict
        self._first = True
        self._conns: set[PoolConnection] = set()
        plain = _Factory(self, True, tls is not None)
        self._factory: Any = TLSMemoryBIOFactory(tls, False, plain) if tls is not None else plain

    def factory(self) -> Factory:
        return self._factory  # type: ignore[no-any-return]

    def _admit(self, conn: PoolConnection) -> bool:
        if self.closed:
            return False
        if len(self._idle) >= self.max_cap:
            self.logger.debug("Tunnel pool full: %d idle, connection dropped", len(self._idle))
            return False
        peer = conn.transport.getPeer()  # type: ignore[union-attr]
        host = getattr(peer, "host", "")
        if self.client_ip and _norm_ip(host) != _norm_ip(self.client_ip):
            self.logger.warn("Tunnel connection refused: %s is not the handshaken client %s", host, self.client_ip)
            return False
        set_keepalive(conn.transport, self.keepalive)
        self._conns.add(conn)
        return True

    def _assign(self, conn: PoolConnection) -> None:
        if self.closed:
            conn.abort()
            return
        if self._first:
            self._first = False
            raw = b"\x00\x00\x00\x00"
        else:
            while True:
                raw = os.urandom(4)
                cid = raw.hex()
                if cid != CONTROL_ID and cid not in self._idle:
                    break
        conn.id = raw.hex()
        conn.transport.write(raw)  # type: ignore[union-attr]
        self.logger.debug("Tunnel pool: id %s -> %s", conn.id, _peer(conn))
        self._enqueue(conn)

    def _early_data(self, conn: PoolConnection) -> None:
        peer = conn.transport.getPeer()  # type: ignore[union-attr]
        self.logger.warn(
            "Tunnel connection %s from %s sent data before use: closed",
            conn.id, getattr(peer, "host", "?"),
        )
        self._lost(conn)
        conn.abort()

    def _lost(self, conn: PoolConnection) -> None:
        self._conns.discard(conn)
        super()._lost(conn)

    def close(self) -> None:
        super().close()
        for conn in list(self._conns):
            if not conn.in_use:
                conn.abort()


def _peer(conn: PoolConnection, local: bool = False) -> str:
    t = conn.transport
    if t is None:
        return "?"
    addr = t.getHost() if local else t.getPeer()
    return f"{getattr(addr, 'host', '?')}:{getattr(addr, 'port', 0)}"


def _norm_ip(host: str) -> str:
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


class ClientPool(_PoolBase):
    """Dialling side: keeps between ``min_cap`` and ``max_cap`` idle connections."""

    def __init__(
        self,
        reactor: Any,
        logger: NodePassLogger,
        *,
        min_cap: int,
        max_cap: int,
        min_interval: float,
        max_interval: float,
        keepalive: float,
        connect: Callable[[ClientFactory], None] | None = None,
        host: str = "",
        port: int = 0,
        dial_timeout: float = 5.0,
        tls_creator: Any = None,
    ) -> None:
        min_cap = max(1, min_cap)
        max_cap = max(1, max_cap)
        if min_cap > max_cap:
            min_cap, max_cap = max_cap, min_cap
        if min_interval <= 0:
            min_interval = 1.0
        if max_interval <= 0:
            max_interval = 1.0
        if min_interval > max_interval:
            min_interval, max_interval = max_interval, min_interval
        super().__init__(reactor, logger, max_cap, keepalive)
        self.min_cap = min_cap
        self.capacity = min_cap
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.interval = min_interval
        self.host = host
        self.port = port
        self.dial_timeout = dial_timeout
        self.tls_creator = tls_creator
        self._connect = connect
        self._timer: Any = None
        self._running = False
        self._pending: set[PoolConnection] = set()
        self._connectors: set[Any] = set()
        #: Why the most recent pool connection attempt failed ("" if none did).
        self.last_error = ""

    # -- refill loop -------------------------------------------------------------
    def start(self) -> None:
        """Start the refill loop (first round at once)."""
        if self._running or self.closed:
            return
        self._running = True
        self._round()

    def _adjust_interval(self) -> None:
        idle = len(self._idle)
        if idle < int(self.capacity * 0.2) and self.interval > self.min_interval:
            self.interval = max(self.interval - STEP, self.min_interval)
        if idle > int(self.capacity * 0.8) and self.interval < self.max_interval:
            self.interval = min(self.interval + STEP, self.max_interval)

    def _adjust_capacity(self, created: int) -> None:
        ratio = created / self.capacity if self.capacity else 0.0
        if ratio < 0.2 and self.capacity > self.min_cap:
            self.capacity -= 1
        if ratio > 0.8 and self.capacity < self.max_cap:
            self.capacity += 1

    def _round(self) -> None:
        self._timer = None
        if self.closed:
            return
        self._adjust_interval()
        need = self.capacity - len(self._idle)
        if need <= 0:
            self._adjust_capacity(0)
            self._schedule()
            return
        ds = [self._create() for _ in range(need)]

        def finished(results: list[tuple[bool, Any]]) -> None:
            if self.closed:
                return
            created = sum(1 for ok, value in results if ok and value)
            self._adjust_capacity(created)
            self._schedule()

        defer.DeferredList(ds, consumeErrors=True).addCallback(finished)

    def _schedule(self) -> None:
        if not self.closed:
            self._timer = self.reactor.callLater(self.interval, self._round)

    def _create(self) -> defer.Deferred[bool]:
        """Dial one pool connection; fires True once it holds an ID."""
        d: defer.Deferred[bool] = defer.Deferred()
        pool = self

        class F(ClientFactory):
            noisy = False  # one factory per pool connection: no "Starting factory" log lines

            def buildProtocol(self, addr: IAddress | None) -> PoolConnection:
                p = PoolConnection(pool, False, pool.tls_creator is not None)

                def got_id(_c: PoolConnection) -> None:
                    if not d.called:
                        d.callback(True)

                def lost(reason: str) -> None:
                    if not d.called:
                        pool.last_error = f"connection closed before its ID arrived: {reason}"
                        d.callback(False)

                p._on_id = got_id
                p.when_lost().addCallback(lost)
                pool._pending.add(p)
                return p

            def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
                if not d.called:
                    pool.last_error = f"dial tcp {pool.host}:{pool.port}: {reason.getErrorMessage()}"
                    d.callback(False)

        factory: Any = F()
        if self.tls_creator is not None:
            factory = TLSMemoryBIOFactory(self.tls_creator, True, factory)
        try:
            if self._connect is not None:
                self._connect(factory)
            else:
                connector = self.reactor.connectTCP(self.host, self.port, factory, timeout=self.dial_timeout)
                self._connectors.add(connector)

                def forget(result: bool) -> bool:
                    self._connectors.discard(connector)
                    return result

                d.addCallback(forget)
        except Exception:
            if not d.called:
                d.callback(False)
        return d

    def _got_id(self, conn: PoolConnection) -> None:
        self._pending.discard(conn)
        if self.closed:
            conn.abort()
            return
        cb = conn._on_id
        conn._on_id = None
        self.logger.debug("Tunnel pool: id %s <- %s", conn.id, _peer(conn, local=True))
        self._enqueue(conn)
        if cb is not None:
            cb(conn)

    def _lost(self, conn: PoolConnection) -> None:
        self._pending.discard(conn)
        super()._lost(conn)

    def close(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        super().close()
        for conn in list(self._pending):
            conn.abort()
        self._pending.clear()
        for connector in list(self._connectors):
            if getattr(connector, "state", "") == "connecting":
                connector.stopConnecting()
        self._connectors.clear()
