"""What every pool transport shares: members, the idle set, ID assignment, refill.

A pool *member* is one byte pipe between the two ends that carries one
exchange (or the control channel): a TCP connection for type 0, a QUIC stream
for type 1, a WebSocket for type 2, an HTTP/2 stream for type 3.  Whatever
carries it, a member is driven by a :class:`PoolConnection` (a
:class:`~nodepass.relay.RelayProtocol`), so the tunnel code relays, counts,
rate-limits and closes it without knowing the transport.

Wire rule common to all transports: once a member is open, the server names
it by writing exactly 4 random bytes (the ID; both ends use its 8 lower-case
hex digits); the first member of a server pool gets ``00 00 00 00`` and
becomes the control channel.  Nothing else is sent until the member is used;
each member is used once and then closed.

:class:`IdlePool` keeps idle members in FIFO order (``active`` = how many)
and offers:

* :meth:`IdlePool.take_idle` / :meth:`IdlePool.take`: the same two look-ups
  without waiting (None when there is nothing), which is what a new
  connection normally needs;
* :meth:`IdlePool.incoming_get` (ingress side): the oldest idle member,
  waiting up to a timeout ("insufficient pool connections");
* :meth:`IdlePool.outgoing_get` (egress side): the member with a given ID,
  waiting up to a timeout for it to arrive ("pool connection not found"); an
  idle member the peer closed stays findable by ID for a few seconds, because
  the peer's close can overtake the signal that names it;
* :meth:`IdlePool.when_idle`: fires once a member is idle (the control
  channel is taken then);
* :meth:`IdlePool.flush`, :meth:`IdlePool.close`, and an error counter.

A member that closes while idle leaves the pool at once.

:class:`ServerPoolBase` admits members (only while fewer than ``max`` are
idle, only from the handshaken client IP when one is set), writes their IDs
and, when ``strict`` is set (it is the ingress side), closes an idle member
that sends bytes before it was used, because a NodePass peer never does.

:class:`ClientPoolBase` keeps between ``min`` and ``max`` idle members: each
round it adjusts the interval (100 ms steps within [min_interval,
max_interval]: faster when fewer than 20 % of the capacity are idle, slower
above 80 %), opens ``capacity - idle`` members concurrently, then adjusts the
capacity by one (shrink when fewer than 20 % of the attempts succeeded, grow
above 80 %).  Between rounds it also replaces members as they go: whenever
a member leaves the idle set (taken for use, or closed by the peer) it opens
new ones at once until idle plus opening members reach the capacity again,
with at most :data:`REFILL_DIALS` openings under way.  The wire is the same
as with rounds alone; a burst of new connections no longer waits for the
next round.  An ID must arrive within 60 s (kept on the clock's
:class:`~nodepass.wheel.TimerWheel`, not one delayed call per member).
Subclasses say how one member is opened (:meth:`ClientPoolBase._open_member`).

Every member gets ``TCP_NODELAY`` (and keep-alive) as soon as it is
connected, on both ends, as NodePass's do: the 4-byte ID and the control
signals are small writes that must not wait for the peer's delayed ACK.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener, IProtocolFactory
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from nodepass.log import Level, NodePassLogger
from nodepass.net import addr_text
from nodepass.pool.interface import IClientPool, IServerPool
from nodepass.relay import RelayProtocol, is_plain_tcp, set_keepalive, set_nodelay, write_at_once
from nodepass.wheel import wheel_for

__all__ = [
    "CONTROL_ID",
    "ID_READ_TIMEOUT",
    "PoolError",
    "PoolConnection",
    "IdlePool",
    "ServerPoolBase",
    "ClientPoolBase",
    "norm_ip",
]

CONTROL_ID = "00000000"
ID_READ_TIMEOUT = 60.0
STEP = 0.1
#: How long / how many idle members closed by the peer stay findable by ID.
DEAD_SECONDS = 10.0
DEAD_KEEP = 1024
#: Members a client pool opens at once between rounds (see ClientPoolBase).
REFILL_DIALS = 64


class PoolError(Exception):
    """A pool request that could not be served (timeout, closed pool)."""


def norm_ip(host: str) -> str:
    """An IPv4-mapped IPv6 address as plain IPv4; anything else unchanged."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


@implementer(IHandshakeListener)
class PoolConnection(RelayProtocol):
    """One pool member; after its ID phase it is an ordinary relay endpoint.

    ``wait_handshake``: on the server side, the ID is written once the
    transport's TLS handshake completes (TLS over TCP) instead of at once.
    """

    def __init__(self, pool: IdlePool, is_server: bool, wait_handshake: bool = False) -> None:
        super().__init__()
        self.pool = pool
        self.is_server = is_server
        self.wait_handshake = wait_handshake
        self.id = ""
        self.in_use = False
        self._id_buf = b""
        self._id_timer: Any = None
        self._peer_cert: Any = None

    # -- opening ----------------------------------------------------------------
    def connectionMade(self) -> None:
        if self.is_server:
            assert isinstance(self.pool, ServerPoolBase)
            if not self.pool._admit(self):
                self.abort()
                return
            if not self.wait_handshake:
                self.pool._assign(self)
            else:
                # A TLS handshake that never completes must not hold a socket forever.
                self._id_timer = self.pool.wheel.call_later(ID_READ_TIMEOUT, self._id_timeout)
        else:
            assert isinstance(self.pool, ClientPoolBase)
            self.pool._opened(self)
            set_keepalive(self.transport, self.pool.keepalive)
            set_nodelay(self.transport)
            self._id_timer = self.pool.wheel.call_later(ID_READ_TIMEOUT, self._id_timeout)

    def handshakeCompleted(self) -> None:
        if not self.is_server:
            # Kept as it is (DER bytes on the lean TLS layer); the fingerprint
            # is computed only for the member a ``verify`` names.
            self._peer_cert = self._read_peer_certificate()
            return
        self._cancel_id_timer()
        if not self.lost and not self.id:
            assert isinstance(self.pool, ServerPoolBase)
            self.pool._assign(self)

    def _cancel_id_timer(self) -> None:
        if self._id_timer is not None and self._id_timer.active():
            self._id_timer.cancel()
        self._id_timer = None

    def _id_timeout(self) -> None:
        self._id_timer = None
        self.abort()

    # -- data -------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if not self.is_server and not self.id:
            self._id_buf += data
            if len(self._id_buf) < 4:
                return
            raw, rest = self._id_buf[:4], self._id_buf[4:]
            self._id_buf = b""
            self._cancel_id_timer()
            self.id = raw.hex()
            assert isinstance(self.pool, ClientPoolBase)
            self.pool._got_id(self)
            if rest and not self.lost:
                super().dataReceived(rest)
            return
        if self.is_server and not self.in_use and self._sink is None:
            assert isinstance(self.pool, ServerPoolBase)
            if self.pool.strict and self.id and self.id != CONTROL_ID:
                self.pool._early_data(self)
                return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_id_timer()
        super().connectionLost(reason)
        self.pool._lost(self)

    # -- TLS --------------------------------------------------------------------
    def peer_fingerprint(self) -> str:
        """Fingerprint of the peer's TLS certificate on this member ("" if none),
        as seen when its handshake completed."""
        from nodepass.tls import fingerprint_of_x509

        cert = self._peer_cert if self._peer_cert is not None else self._read_peer_certificate()
        return fingerprint_of_x509(cert) if cert is not None else ""

    def _read_peer_certificate(self) -> Any:
        get = getattr(self.transport, "getPeerCertificate", None)
        if get is None:
            return None
        try:
            return get()
        except Exception:
            return None

    def peer_text(self, local: bool = False) -> str:
        """``ip:port`` of the peer (or of this end) of the carrying connection."""
        t = self.transport
        if t is None:
            return "?"
        return addr_text(t.getHost() if local else t.getPeer())


class IdlePool:
    """Idle set (FIFO by arrival), waiters, error counter."""

    def __init__(self, reactor: Any, logger: NodePassLogger, max_cap: int, keepalive: float) -> None:
        self.reactor = reactor
        #: Coarse timeouts of the members (ID reads, TLS handshakes).
        self.wheel = wheel_for(reactor)
        self.logger = logger
        self.max_cap = max(1, max_cap)
        self.keepalive = keepalive
        self.closed = False
        #: Why the most recent attempt to open a member failed ("" if none did).
        self.last_error = ""
        self._idle: OrderedDict[str, PoolConnection] = OrderedDict()
        #: Users waiting for any idle member, oldest first (a dict: a burst
        #: may queue thousands, each removed in O(1) when it times out).
        self._any_waiters: dict[defer.Deferred[tuple[str, PoolConnection]], None] = {}
        self._id_waiters: dict[str, list[defer.Deferred[PoolConnection]]] = {}
        self._errors = 0
        self._dead: OrderedDict[str, tuple[float, PoolConnection]] = OrderedDict()
        self._idle_waiters: list[defer.Deferred[None]] = []

    # -- counters --------------------------------------------------------------
    @property
    def active(self) -> int:
        """Idle pool members (the POOL figure)."""
        return len(self._idle)

    def ready(self) -> bool:
        return not self.closed

    def full(self) -> bool:
        """True when ``max`` members are idle (a server then refuses new ones)."""
        return len(self._idle) >= self.max_cap

    def add_error(self) -> None:
        self._errors += 1

    def error_count(self) -> int:
        return self._errors

    def reset_error(self) -> None:
        self._errors = 0

    def has(self, conn_id: str) -> bool:
        return conn_id in self._idle

    def when_idle(self) -> defer.Deferred[None]:
        """A Deferred fired once at least one member is idle (at once if one is)."""
        if self._idle:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    # -- internal --------------------------------------------------------------
    def _enqueue(self, conn: PoolConnection) -> None:
        """A member with an ID is ready: hand it to a waiter or keep it idle."""
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
                d2 = next(iter(self._any_waiters))
                del self._any_waiters[d2]
                if d2.called:
                    continue
                conn.in_use = True
                d2.callback((conn.id, conn))
                return
        if len(self._idle) >= self.max_cap or conn.id in self._idle:
            conn.abort()
            return
        self._idle[conn.id] = conn
        if self._idle_waiters:
            self._wake_idle_waiters()

    def _wake_idle_waiters(self) -> None:
        woken, self._idle_waiters = self._idle_waiters, []
        for w in woken:
            if not w.called:
                w.callback(None)

    def _left_idle(self) -> None:
        """A member left the idle set (taken for use, or closed)."""

    def _lost(self, conn: PoolConnection) -> None:
        if conn.id and self._idle.get(conn.id) is conn:
            del self._idle[conn.id]
            self._left_idle()
            self.logger.debug("Tunnel pool: idle %s closed: %s", conn.id, conn.lost_reason)
            # The peer may close a member right after naming it in a signal
            # (verify does); its close can overtake the signal.  Keep it
            # findable by ID for a while, as a pool that never reads idle
            # members would.
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
            self._left_idle()
        return conn

    # -- API -------------------------------------------------------------------
    def take_idle(self, *, newest: bool = False) -> tuple[str, PoolConnection] | None:
        """The oldest (``newest``: the most recent) idle member other than the
        control one, taken now; None when there is none (or the pool is closed)."""
        if self.closed:
            return None
        idle = self._idle
        if not newest:
            # The common case: the oldest member is not the control one.
            first = next(iter(idle), None)
            if first is not None and first != CONTROL_ID:
                conn = self._take(first)
                if conn is not None and not conn.lost:
                    return first, conn
        candidates = list(idle)
        for cid in reversed(candidates) if newest else candidates:
            if cid == CONTROL_ID:
                continue
            conn = self._take(cid)
            if conn is not None and not conn.lost:
                return cid, conn
        return None

    def take(self, conn_id: str) -> PoolConnection | None:
        """The member named ``conn_id`` taken now (an idle one, or one the peer
        closed a moment ago); None when it has not arrived."""
        if self.closed:
            return None
        conn = self._take(conn_id)
        if conn is not None:
            return conn
        dead = self._dead.pop(conn_id, None)
        return dead[1] if dead is not None else None

    def incoming_get(
        self, timeout: float, *, newest: bool = False
    ) -> defer.Deferred[tuple[str, PoolConnection]]:
        """The oldest idle member (never the control one), waiting up to ``timeout``.

        ``newest=True`` takes the most recently added one instead: the TLS
        ``verify`` sender uses it so that it does not pick the member a
        NodePass peer (which takes its oldest) is about to name in its own
        ``verify`` at the same moment.
        """
        if self.closed:
            return defer.fail(PoolError("IncomingGet: pool closed"))
        got = self.take_idle(newest=newest)
        if got is not None:
            return defer.succeed(got)
        # Cancelled (the user left): it leaves the queue at once.
        d: defer.Deferred[tuple[str, PoolConnection]] = defer.Deferred(self._forget_waiter)
        self._any_waiters[d] = None

        def expire() -> None:
            if self._any_waiters.pop(d, 0) is None:
                d.errback(PoolError("IncomingGet: insufficient pool connections"))

        call = self.reactor.callLater(timeout, expire)
        d.addBoth(_cancel_call(call))
        return d

    def _forget_waiter(self, d: defer.Deferred[tuple[str, PoolConnection]]) -> None:
        self._any_waiters.pop(d, None)

    def outgoing_get(self, conn_id: str, timeout: float) -> defer.Deferred[PoolConnection]:
        """The member named ``conn_id``, waiting up to ``timeout`` for it to arrive."""
        if self.closed:
            return defer.fail(PoolError("OutgoingGet: pool closed"))
        conn = self.take(conn_id)
        if conn is not None:
            return defer.succeed(conn)
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
        """Close every idle member.

        The close is orderly (FIN, or TLS close_notify then FIN, or the
        transport's end-of-stream), as Go's ``Close`` does; an idle member has
        no pending writes to wait for."""
        idle = list(self._idle.values())
        self._idle.clear()
        self._dead.clear()
        for conn in idle:
            conn.close()

    def close(self) -> None:
        """Stop the pool: close idle members and fail every waiter."""
        if self.closed:
            return
        self.closed = True
        self.flush()
        self._wake_idle_waiters()
        anyw, self._any_waiters = self._any_waiters, {}
        for d in list(anyw):
            if not d.called:
                d.errback(PoolError("IncomingGet: pool closed"))
        idw, self._id_waiters = self._id_waiters, {}
        for lst in idw.values():
            for d2 in lst:
                if not d2.called:
                    d2.errback(PoolError("OutgoingGet: pool closed"))


_RANDOM = bytearray()


def _random4() -> bytes:
    """4 bytes from the system's random source, read 4 KiB at a time."""
    if len(_RANDOM) < 4:
        _RANDOM[:] = os.urandom(4096)
    raw = bytes(_RANDOM[-4:])
    del _RANDOM[-4:]
    return raw


def _cancel_call(call: Any) -> Callable[[Any], Any]:
    def cancel(result: Any) -> Any:
        if call.active():
            call.cancel()
        return result

    return cancel


@implementer(IServerPool)
class ServerPoolBase(IdlePool):
    """The accepting side, for any transport.

    A transport front-end builds a :class:`PoolConnection` (``is_server=True``)
    for each new member and connects it to the member's transport; the
    connection then calls :meth:`_admit` and :meth:`_assign`.  Subclasses
    provide :meth:`factory` (members arriving on the tunnel TCP port) and/or
    :meth:`start` (listeners of their own, such as QUIC's UDP port).
    """

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

    # -- IServerPool -----------------------------------------------------------
    def start(self) -> None:
        """Open listeners of the transport's own (nothing for TCP-port transports)."""

    def factory(self) -> IProtocolFactory | None:
        """The protocol factory for connections on the tunnel TCP port, or None
        when this transport does not use that port (they are then refused)."""
        return None

    def client_allowed(self, host: str) -> bool:
        """Whether a member from ``host`` may join (the handshaken client IP, when set)."""
        return not self.client_ip or norm_ip(host) == norm_ip(self.client_ip)

    # -- members ---------------------------------------------------------------
    def _admit(self, conn: PoolConnection) -> bool:
        if self.closed:
            return False
        if self.full():
            self.logger.debug("Tunnel pool full: %d idle, connection dropped", len(self._idle))
            return False
        peer = conn.transport.getPeer()  # type: ignore[union-attr]
        host = getattr(peer, "host", "")
        if not self.client_allowed(host):
            self.logger.warn("Tunnel connection refused: %s is not the handshaken client %s", host, self.client_ip)
            return False
        set_keepalive(conn.transport, self.keepalive)
        set_nodelay(conn.transport)
        self._conns.add(conn)
        return True

    def new_id(self) -> bytes:
        """The next member ID: ``00000000`` first, then random and not idle."""
        if self._first:
            self._first = False
            return b"\x00\x00\x00\x00"
        while True:
            raw = _random4()
            cid = raw.hex()
            if cid != CONTROL_ID and cid not in self._idle:
                return raw

    def _assign(self, conn: PoolConnection) -> None:
        if self.closed:
            conn.abort()
            return
        raw = self.new_id()
        conn.id = raw.hex()
        t: Any = conn.transport
        # Written at once, not on the next reactor pass: the member is
        # usable only once the peer has its ID.
        rest = write_at_once(t, raw) if is_plain_tcp(t) else raw
        if rest is not None:
            t.write(rest)
        if self.logger.enabled(Level.DEBUG):
            self.logger.debug("Tunnel pool: id %s -> %s", conn.id, conn.peer_text())
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


@implementer(IClientPool)
class ClientPoolBase(IdlePool):
    """The dialling side, for any transport: keeps between ``min_cap`` and
    ``max_cap`` idle members (see the module docstring for the rules)."""

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
        self._timer: Any = None
        self._running = False
        #: Members being opened (dialled, or waiting for their ID) -> the Deferred
        #: of the round that opens them (None for replacements).
        self._opening: dict[PoolConnection, defer.Deferred[bool] | None] = {}

    # -- what a transport provides ---------------------------------------------------
    def _open_member(self, conn: PoolConnection, failed: Callable[[str], None]) -> None:
        """Open one member and connect it to ``conn`` (``conn.makeConnection``).

        Call ``failed(reason)`` when that cannot happen (dial refused, stream
        refused...); once connected, the member's own end reports the rest.
        May raise: the attempt then counts as failed with the exception text.
        """
        raise NotImplementedError

    def _close_transport(self) -> None:
        """Pool closed: give up attempts under way and shared connections."""

    # -- refill loop -----------------------------------------------------------------
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
        need = self.capacity - len(self._idle) - self.opening
        if need <= 0:
            self._adjust_capacity(0)
            self._schedule()
            return
        ds: list[defer.Deferred[bool]] = []
        for _ in range(need):
            d: defer.Deferred[bool] = defer.Deferred()
            ds.append(d)
            self._create(d)

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

    def _left_idle(self) -> None:
        if self._running and not self.closed:
            self._refill()

    def _refill(self) -> None:
        """Open members until idle + opening reach the capacity (at most
        :data:`REFILL_DIALS` openings under way)."""
        count = min(self.capacity - len(self._idle) - self.opening, REFILL_DIALS - self.opening)
        for _ in range(count):
            self._create()

    def _create(self, done: defer.Deferred[bool] | None = None) -> None:
        """Open one member; ``done`` (if any) fires True once it holds an ID,
        False otherwise."""
        conn = PoolConnection(self, False)
        self._opening[conn] = done
        try:
            self._open_member(conn, lambda reason: self._open_failed(conn, reason))
        except Exception as exc:
            self._open_failed(conn, str(exc) or type(exc).__name__)

    @property
    def opening(self) -> int:
        """Members being opened (dialled, or waiting for their ID)."""
        return len(self._opening)

    def _open_failed(self, conn: PoolConnection, reason: str) -> None:
        if conn not in self._opening:
            return
        d = self._opening.pop(conn)
        self.last_error = reason
        if d is not None:
            d.callback(False)

    # -- members ---------------------------------------------------------------------
    def _opened(self, conn: PoolConnection) -> None:
        """A member's transport is connected; it now waits for its ID."""
        if self.closed:
            conn.abort()

    def _got_id(self, conn: PoolConnection) -> None:
        d = self._opening.pop(conn, None)
        if self.closed:
            conn.abort()
            return
        if self.logger.enabled(Level.DEBUG):
            self.logger.debug("Tunnel pool: id %s <- %s", conn.id, conn.peer_text(local=True))
        self._enqueue(conn)
        if d is not None:
            d.callback(True)
        if not self.closed and not self.has(conn.id):
            # It went straight to a waiter: replace it too.
            self._left_idle()

    def _lost(self, conn: PoolConnection) -> None:
        if conn in self._opening:
            self._open_failed(conn, f"connection closed before its ID arrived: {conn.lost_reason}")
        super()._lost(conn)

    def close(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        super().close()
        opening, self._opening = self._opening, {}
        for conn, d in opening.items():
            conn.abort()
            if d is not None and not d.called:
                d.callback(False)
        self._close_transport()
