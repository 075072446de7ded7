"""UDP sessions carried over pool connections, NodePass style.

NodePass gives UDP no framing on a pool connection: every datagram is one
write of its raw bytes, and every read of at most ``udp_data_buf_size`` bytes
from the pool connection is sent on as one datagram.  On a TLS pool each
datagram is one TLS record and arrives whole; on a plain TCP pool a burst of
datagrams may leave in one segment and arrive merged, exactly as with
NodePass itself (pool connections run with ``TCP_NODELAY``).

Usage from a dual-end tunnel core::

    # ingress side (listens for users; server flow "-" or client flow "+")
    ingress = UdpIngress(
        reactor=reactor, logger=logger, settings=settings, stats=stats,
        policy=policy, listen=config.targets[0],
        acquire=lambda: pool.incoming_get(timeout),  # -> Deferred[(conn_id, PoolConnection)]
        send_signal=lambda remote, conn_id: send(Signal("udp", remote=remote, id=conn_id)),
    )
    ingress.start()                 # binds the UDP socket; raises CannotListenError
    ...
    yield ingress.stop()            # closes the socket and every session

    # egress side (dials targets), on each ``udp`` signal:
    egress = UdpEgress(reactor=reactor, logger=logger, settings=settings,
                       stats=stats, policy=policy)
    conn = yield pool.outgoing_get(signal.id, timeout)  # a PoolConnection
    egress.open(signal.remote, conn)                # Deferred fires when that link is done
    ...
    egress.stop()

A pool connection is handed over as the :class:`~nodepass.tunnel.relay.RelayProtocol`
that drives it (bytes received before the hand-over stay buffered there);
:func:`as_link` wraps it as a :class:`PoolLink`.

Counting follows NodePass: UDPRX/UDPTX are the bytes read from / written to
the ingress listening socket and the egress target sockets; pool connections
are not counted.  Each session takes a slot through ``policy.admit("udp", ..)``
and gives it back exactly once with ``policy.release("udp")``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar
from typing import Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import DatagramProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from nodepass.env import Settings
from nodepass.log import NodePassLogger
from nodepass.net import join_host_port, listen_any
from nodepass.relay import RelayProtocol, direct_writer, set_nodelay
from nodepass.stats import TunnelStats
from nodepass.tunnel.timers import IdleTimer

__all__ = [
    "PoolLink",
    "as_link",
    "UdpPolicy",
    "UdpIngress",
    "UdpEgress",
    "TargetSocket",
    "open_target_socket",
    "peer_key",
    "listen_udp",
    "PauseGate",
    "IdleTimer",
    "PeerSession",
    "deliver",
]

#: Datagrams kept per session while its pool connection or target socket is
#: being set up; later ones are dropped, as a full socket buffer would.
PENDING_LIMIT = 256


# --------------------------------------------------------------------------
# small helpers


def peer_key(host: str, port: int) -> str:
    """The ``ip:port`` text NodePass uses for a UDP peer.

    IPv4-mapped IPv6 addresses are shown as plain IPv4 and IPv6 addresses are
    bracketed, as Go prints a ``UDPAddr``; a zone suffix is dropped.
    """
    return join_host_port(host, port, unmap=True, zone=False)


def _is_ipv6(host: str) -> bool:
    return ":" in host


def listen_udp(reactor: Any, host: str, port: int, protocol: DatagramProtocol, max_packet: int) -> Any:
    """Bind a UDP socket on ``host:port`` for *protocol* and return the port.

    An empty host means every interface; dual-stack ``::`` is tried first and
    plain IPv4 ``0.0.0.0`` when IPv6 is unavailable.  Datagrams longer than
    *max_packet* are truncated on reception (NodePass's buffer size).
    Raises :class:`~twisted.internet.error.CannotListenError`.
    """
    return listen_any(
        lambda interface: reactor.listenUDP(port, protocol, interface=interface, maxPacketSize=max_packet), host
    )


def _split(data: bytes, size: int) -> list[bytes]:
    """Cut *data* into pieces of at most *size* bytes (one datagram each)."""
    if len(data) <= size or size <= 0:
        return [data]
    view = memoryview(data)
    return [bytes(view[i : i + size]) for i in range(0, len(data), size)]


@implementer(IPushProducer)
class _GateHandle:
    """One reason to pause a :class:`PauseGate`; an ``IPushProducer`` for it."""

    def __init__(self, gate: PauseGate) -> None:
        self._gate = gate
        self.paused = False

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self._gate._change(+1)

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self._gate._change(-1)

    def stopProducing(self) -> None:
        self.resumeProducing()


class PauseGate:
    """Pauses one producer while any of its handles is paused.

    Several consumers (a throttle, pool connections whose write buffers are
    full) may each want a shared UDP socket to stop reading; each gets its own
    handle, and the socket reads again only when every handle has resumed.
    """

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self._pause = pause
        self._resume = resume
        self._count = 0

    def handle(self) -> _GateHandle:
        """A new handle, initially not pausing."""
        return _GateHandle(self)

    def release(self, handle: _GateHandle) -> None:
        """Forget *handle* (resumes it first if it was pausing)."""
        handle.resumeProducing()

    def _change(self, delta: int) -> None:
        before = self._count
        self._count += delta
        if before == 0 and self._count > 0:
            self._pause()
        elif before > 0 and self._count == 0:
            self._resume()


def _port_gate(udp_port: Any) -> PauseGate:
    def pause() -> None:
        if getattr(udp_port, "connected", True):
            udp_port.stopReading()

    def resume() -> None:
        if getattr(udp_port, "connected", True):
            udp_port.startReading()

    return PauseGate(pause, resume)


class PeerSession:
    """One user peer (``ip:port``) of a listening UDP socket, kept in *table* under *key*.

    :func:`deliver` makes it for the peer's first datagram and calls
    :meth:`begin`, which sets up the way on.  Datagrams wait in ``pending``
    (at most :data:`PENDING_LIMIT`; later ones are dropped) until the way on
    is ready and :meth:`_flush` is called; from then on :meth:`send` hands
    each one straight to :meth:`_forward`.
    """

    def __init__(self, key: str, addr: tuple[str, int], table: dict[str, Any]) -> None:
        self.key = key
        self.addr = addr
        self.pending: list[bytes] | None = []
        self.closed = False
        self.timer: IdleTimer | None = None
        self._table = table

    def begin(self) -> None:
        """Start setting up the way on (called once, right after creation)."""
        raise NotImplementedError

    def _forward(self, datagram: bytes) -> bool:
        """Send one datagram on; False when that failed (the rest of a flush is dropped)."""
        raise NotImplementedError

    def _end(self) -> bool:
        """Mark the session closed: drop the queue, leave the table, stop the idle
        timer.  False when it was closed already (nothing else to do)."""
        if self.closed:
            return False
        self.closed = True
        self.pending = None
        if self._table.get(self.key) is self:
            del self._table[self.key]
        if self.timer is not None:
            self.timer.cancel()
        return True

    def send(self, datagram: bytes) -> None:
        """Forward one datagram from the user (queued while the way on is not ready)."""
        if self.closed:
            return
        if self.pending is not None:
            if len(self.pending) < PENDING_LIMIT:
                self.pending.append(datagram)
            return
        self._forward(datagram)

    def _flush(self) -> None:
        """The way on is ready: forward the queued datagrams in order."""
        pending, self.pending = self.pending, None
        for datagram in pending or ():
            if self.closed or not self._forward(datagram):
                break


_Session = TypeVar("_Session", bound=PeerSession)


def deliver(
    table: dict[str, _Session],
    policy: UdpPolicy,
    datagram: bytes,
    addr: tuple[str, int],
    new_session: Callable[[str, tuple[str, int]], _Session],
) -> None:
    """Hand *datagram* from user *addr* to its session in *table*.

    The first datagram of a peer takes a UDP slot (``policy.admit``; refused:
    the datagram is dropped) and begins a new session from *new_session(key, addr)*.
    """
    key = peer_key(addr[0], addr[1])
    session = table.get(key)
    if session is None:
        if not policy.admit("udp", key):
            return
        session = new_session(key, addr)
        table[key] = session
        session.begin()
    session.send(datagram)


# --------------------------------------------------------------------------
# what udp.py needs from the outside


class Throttling(TypingProtocol):
    """The rate limiter as the data path sees it (``nodepass.datapath.ratelimit.Throttle``)."""

    def consume(self, nbytes: int, producer: Any | None, direction: str = "read") -> None: ...

    def forget(self, producer: Any) -> None: ...


class UdpPolicy(TypingProtocol):
    """The part of ``nodepass.datapath.policy.DataPolicy`` that UDP uses."""

    @property
    def throttle(self) -> Any: ...  # Throttling | None

    @property
    def bind_ip(self) -> str: ...

    def admit(self, kind: Any, peer: str) -> bool: ...

    def release(self, kind: Any) -> None: ...

    def udp_target(self) -> defer.Deferred[tuple[str, int]]: ...


class PoolLink:
    """One pool connection (a :class:`RelayProtocol`) as a UDP session uses it.

    Datagrams are written with one ``write`` each; received bytes are handed
    on per read, so each read becomes one datagram.
    """

    def __init__(self, conn: RelayProtocol) -> None:
        self.conn = conn
        set_nodelay(conn.transport)
        self._write = direct_writer(conn.transport) if conn.transport is not None else None

    def bind(self, on_data: Callable[[bytes], None], on_closed: Callable[[str], None]) -> None:
        """Deliver received bytes (first those already buffered) and, once, the end reason."""
        self.conn.when_lost().addCallback(on_closed)
        if not self.conn.lost:
            self.conn.set_sink(on_data)

    def set_read_size(self, size: int) -> None:
        """Read at most *size* bytes per socket read where the transport allows it."""
        transport: Any = self.conn.transport
        if transport is not None and hasattr(transport, "bufferSize"):
            transport.bufferSize = size

    @property
    def lost(self) -> bool:
        """True once the connection has ended."""
        return self.conn.lost

    def write(self, data: bytes) -> None:
        """Send *data* as one datagram (dropped once the connection has ended).

        One write per datagram, as NodePass does: on a plain TCP transport
        with nothing queued the bytes go to the socket at once instead of
        being merged with the next datagrams in the transport's buffer; on a
        TLS transport each datagram becomes a TLS record of its own (not
        batched with the next ones), so the reader gets it back whole and
        alone (see :func:`~nodepass.relay.direct_writer`).
        """
        if self.conn.lost or self._write is None:
            return
        self._write(data)

    def close(self) -> None:
        """Close after pending writes are flushed (idempotent)."""
        self.conn.close()

    @property
    def reader(self) -> Any:
        """Producer that pauses this connection's reading (for the throttle)."""
        return self.conn.throttle_gate

    def register_producer(self, producer: Any) -> None:
        """Have *producer* paused while this connection's write buffer is full."""
        transport = self.conn.transport
        if not self.conn.lost and transport is not None:
            try:
                transport.registerProducer(producer, True)  # type: ignore[attr-defined]
            except RuntimeError:
                pass


def as_link(conn: object) -> PoolLink:
    """Wrap a pool connection (a :class:`RelayProtocol`) as a :class:`PoolLink`."""
    if isinstance(conn, PoolLink):
        return conn
    if isinstance(conn, RelayProtocol):
        return PoolLink(conn)
    raise TypeError(f"{type(conn).__name__} is not a pool connection (RelayProtocol)")


# --------------------------------------------------------------------------
# connected UDP sockets towards a target


class TargetSocket(DatagramProtocol):
    """A connected UDP socket towards one target.

    Replies go to *on_datagram*; a refusal (ICMP port unreachable) or a send
    error goes to *on_error*.  ``count`` decides whether bytes are added to the
    tunnel's UDPRX/UDPTX (egress side) or not (single-end mode).
    """

    noisy = False  # one socket per UDP session: no "Starting protocol" log lines

    def __init__(
        self,
        *,
        stats: TunnelStats,
        throttle: Any,
        count: bool,
        max_packet: int,
    ) -> None:
        self._stats = stats
        self._throttle = throttle
        self._count = count
        self.max_packet = max_packet
        self.on_datagram: Callable[[bytes], None] = lambda data: None
        self.on_error: Callable[[str], None] = lambda reason: None
        self.gate: PauseGate | None = None
        self._throttle_handle: _GateHandle | None = None
        self.closed = False
        self.local = ""
        self.remote = ""

    def startProtocol(self) -> None:
        assert self.transport is not None
        self.gate = _port_gate(self.transport)
        self._throttle_handle = self.gate.handle()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        n = len(datagram)
        if self._count:
            self._stats.udprx += n
        if self._throttle is not None and self._throttle_handle is not None:
            self._throttle.consume(n, self._throttle_handle, "read")
        self.on_datagram(datagram)

    def connectionRefused(self) -> None:
        self.on_error("connection refused")

    def send(self, data: bytes) -> bool:
        """Send one datagram; False (and *on_error*) when the socket failed."""
        if self.closed or self.transport is None:
            return False
        try:
            transport: Any = self.transport
            transport.write(data)
        except Exception as exc:  # OSError, MessageLengthError and the like
            self.on_error(f"write to target failed: {exc}")
            return False
        if self._count:
            self._stats.udptx += len(data)
        return True

    def close(self) -> defer.Deferred[None]:
        """Close the socket (idempotent)."""
        if self.closed or self.transport is None:
            self.closed = True
            return defer.succeed(None)
        self.closed = True
        if self._throttle is not None and self._throttle_handle is not None:
            self._throttle.forget(self._throttle_handle)
        port: Any = self.transport
        result = port.stopListening()
        return result if isinstance(result, defer.Deferred) else defer.succeed(None)


def open_target_socket(
    reactor: Any,
    logger: NodePassLogger,
    policy: UdpPolicy,
    target: tuple[str, int],
    sock: TargetSocket,
) -> TargetSocket:
    """Bind *sock* (source address from ``policy.source``/``policy.bind_ip``) and
    connect it to *target* (an IP literal and port).

    When binding to the configured source IP fails, the system's choice is
    used instead from then on and an ERROR is logged (``dial`` fallback).
    Raises ``OSError``/``CannotListenError`` when even that fails.
    """
    host, port = target
    family_any = "::" if _is_ipv6(host) else "0.0.0.0"
    source = getattr(policy, "source", None)
    if source is not None:
        interface = source.udp_interface(host) or family_any
    else:
        bind_ip = getattr(policy, "bind_ip", "") or ""
        interface = bind_ip if bind_ip and _is_ipv6(bind_ip) == _is_ipv6(host) else family_any
    try:
        udp_port = reactor.listenUDP(0, sock, interface=interface, maxPacketSize=sock.max_packet)
    except (CannotListenError, OSError) as exc:
        if interface == family_any:
            raise
        if source is not None:
            source.fall_back(str(exc))
        else:
            logger.error("Target dial: fallback to system auto due to dialer failure: %s", exc)
        udp_port = reactor.listenUDP(0, sock, interface=family_any, maxPacketSize=sock.max_packet)
    try:
        udp_port.connect(host, port)
    except Exception:
        udp_port.stopListening()
        raise
    local = udp_port.getHost()
    sock.local = peer_key(local.host, local.port)
    sock.remote = peer_key(host, port)
    return sock


# --------------------------------------------------------------------------
# ingress side


class _IngressSession(PeerSession):
    """One user peer on the ingress side: its pool connection and idle timer."""

    def __init__(self, owner: UdpIngress, key: str, addr: tuple[str, int]) -> None:
        super().__init__(key, addr, owner._sessions)
        self.owner = owner
        self.link: PoolLink | None = None
        self.conn_id = ""
        self.write_handle: _GateHandle | None = None

    def begin(self) -> None:
        try:
            d = self.owner._acquire()
        except Exception as exc:
            d = defer.fail(exc)
        d.addCallbacks(self._got_link, self._no_link)

    def _no_link(self, failure: Failure) -> None:
        if not self.closed:
            self.owner._logger.warn("udp ingress: request timeout: %s", failure.getErrorMessage())
        self.close("no pool connection")

    def _got_link(self, result: tuple[str, Any]) -> None:
        conn_id, conn = result
        link = as_link(conn)
        if self.closed:
            link.close()
            return
        owner = self.owner
        self.link = link
        self.conn_id = conn_id
        owner._logger.debug("Tunnel connection: get %s for UDP %s", conn_id, self.key)
        link.set_read_size(owner._settings.udp_data_buf_size)
        self.timer = IdleTimer(owner._reactor, owner._settings.udp_read_timeout, self._idle)
        if owner._gate is not None:
            self.write_handle = owner._gate.handle()
            link.register_producer(self.write_handle)
        self._reader = link.reader
        link.bind(self._from_pool, self.close)
        if self.closed:
            return
        try:
            owner._send_signal(self.key, conn_id)
        except Exception as exc:
            owner._logger.error("udp ingress: signal failed: %s", exc)
            self.close("signal failed")
            return
        owner._logger.debug("UDP launch signal: cid %s <- %s", conn_id, self.key)
        self._flush()

    def _forward(self, datagram: bytes) -> bool:
        """Write one datagram from the user into the pool connection."""
        assert self.link is not None
        self.link.write(datagram)
        return True

    def _from_pool(self, data: bytes) -> None:
        if self.closed:
            return
        assert self.timer is not None
        self.timer.touch()
        owner = self.owner
        for datagram in _split(data, owner._settings.udp_data_buf_size):
            if not owner._send_to_user(datagram, self.addr):
                self.close("write to user failed")
                return
            if owner._throttle is not None:
                owner._throttle.consume(len(datagram), self._reader, "write")

    def _idle(self) -> None:
        self.owner._logger.debug("UDP session abort: %s idle", self.key)
        self.close("idle")

    def close(self, reason: str = "closed") -> None:
        """End the session: forget it, give back its slot, close the pool connection."""
        if not self._end():
            return
        owner = self.owner
        owner._policy.release("udp")
        if self.write_handle is not None and owner._gate is not None:
            owner._gate.release(self.write_handle)
        if self.link is not None:
            if owner._throttle is not None:
                owner._throttle.forget(self.link.reader)
            owner._logger.debug("Tunnel connection: closed %s (%s)", self.conn_id, reason)
            self.link.close()


class _IngressProtocol(DatagramProtocol):
    def __init__(self, owner: UdpIngress) -> None:
        self.owner = owner

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.owner._datagram(datagram, (addr[0], addr[1]))


class UdpIngress:
    """The listening side of UDP in a dual-end tunnel.

    One session per user ``ip:port``.  The first datagram of a session takes a
    slot and a pool connection from *acquire* (``() -> Deferred[(conn_id,
    link)]``), calls *send_signal(remote, conn_id)* so the core queues the
    ``udp`` signal, and writes the datagrams raw into the link.  Every read
    from the link goes back to the user as one datagram.  A session ends when
    the link brings nothing back for ``udp_read_timeout`` seconds, or on EOF or
    error; the next datagram then opens a new one.
    """

    def __init__(
        self,
        *,
        reactor: Any,
        logger: NodePassLogger,
        settings: Settings,
        stats: TunnelStats,
        policy: UdpPolicy,
        listen: Any,
        acquire: Callable[[], defer.Deferred[tuple[str, Any]]],
        send_signal: Callable[[str, str], None],
    ) -> None:
        """*listen* is a ``HostPort`` (``host``/``port``) or a ``(host, port)`` tuple."""
        self._reactor = reactor
        self._logger = logger
        self._settings = settings
        self._stats = stats
        self._policy = policy
        self._throttle = getattr(policy, "throttle", None)
        if isinstance(listen, tuple):
            self._host, self._port_number = listen[0], int(listen[1])
        else:
            self._host, self._port_number = listen.host, int(listen.port)
        self._acquire = acquire
        self._send_signal = send_signal
        self._sessions: dict[str, _IngressSession] = {}
        self._udp_port: Any = None
        self._gate: PauseGate | None = None
        self._read_handle: _GateHandle | None = None

    @property
    def port(self) -> int:
        """The bound UDP port number (after :meth:`start`)."""
        return int(self._udp_port.getHost().port)

    @property
    def sessions(self) -> int:
        """Number of live sessions."""
        return len(self._sessions)

    def start(self) -> None:
        """Bind the UDP socket.  Raises ``CannotListenError`` when it cannot."""
        if self._udp_port is not None:
            return
        self._udp_port = listen_udp(
            self._reactor,
            self._host,
            self._port_number,
            _IngressProtocol(self),
            self._settings.udp_data_buf_size,
        )
        self._gate = _port_gate(self._udp_port)
        self._read_handle = self._gate.handle()

    def stop(self) -> defer.Deferred[None]:
        """Close every session and the socket; fires when the socket is closed."""
        for session in list(self._sessions.values()):
            session.close("stopped")
        udp_port, self._udp_port = self._udp_port, None
        if udp_port is None:
            return defer.succeed(None)
        result = udp_port.stopListening()
        return result if isinstance(result, defer.Deferred) else defer.succeed(None)

    def _datagram(self, datagram: bytes, addr: tuple[str, int]) -> None:
        n = len(datagram)
        self._stats.udprx += n
        if self._throttle is not None and self._read_handle is not None:
            self._throttle.consume(n, self._read_handle, "read")
        deliver(self._sessions, self._policy, datagram, addr, lambda key, addr: _IngressSession(self, key, addr))

    def _send_to_user(self, datagram: bytes, addr: tuple[str, int]) -> bool:
        if self._udp_port is None:
            return False
        try:
            self._udp_port.write(datagram, addr)
        except Exception as exc:
            self._logger.error("udp ingress: write to %s failed: %s", peer_key(*addr), exc)
            return False
        self._stats.udptx += len(datagram)
        return True


# --------------------------------------------------------------------------
# egress side


class _EgressSession:
    """The target socket for one remote peer, shared by the links that carry it."""

    def __init__(self, owner: UdpEgress, remote: str) -> None:
        self.owner = owner
        self.remote = remote
        self.sock: TargetSocket | None = None
        self.ready: defer.Deferred[TargetSocket] = defer.Deferred()
        self.handlers: list[_EgressHandler] = []
        self.closed = False
        self._waiters: list[defer.Deferred[TargetSocket]] = []

    def dial(self) -> None:
        owner = self.owner
        try:
            d = owner._policy.udp_target()
        except Exception as exc:
            d = defer.fail(exc)
        d.addCallback(self._connect)
        d.addCallbacks(self._dialled, self._dial_failed)

    def _connect(self, target: tuple[str, int]) -> TargetSocket:
        owner = self.owner
        sock = TargetSocket(
            stats=owner._stats,
            throttle=owner._throttle,
            count=True,
            max_packet=owner._settings.udp_data_buf_size,
        )
        return open_target_socket(owner._reactor, owner._logger, owner._policy, target, sock)

    def _dialled(self, sock: TargetSocket) -> None:
        if self.closed:
            sock.close()
            return
        self.sock = sock
        sock.on_datagram = self._from_target
        sock.on_error = self._target_error
        self.owner._logger.debug("Target connection: %s <-> %s", sock.local, sock.remote)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(sock)

    def _dial_failed(self, failure: Failure) -> None:
        self.owner._logger.error("udp egress: dial failed: %s", failure.getErrorMessage())
        self.close()

    def when_ready(self) -> defer.Deferred[TargetSocket]:
        if self.sock is not None:
            return defer.succeed(self.sock)
        waiter: defer.Deferred[TargetSocket] = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def _from_target(self, datagram: bytes) -> None:
        if not self.handlers:
            return
        handler = self.handlers[-1]
        handler.from_target(datagram)

    def _target_error(self, reason: str) -> None:
        self.owner._logger.error("udp egress: %s: %s", self.remote, reason)
        self.close()

    def detach(self, handler: _EgressHandler) -> None:
        if handler in self.handlers:
            self.handlers.remove(handler)

    def close(self) -> None:
        """Close the socket, give back the slot, end every link on it."""
        if self.closed:
            return
        self.closed = True
        owner = self.owner
        if owner._sessions.get(self.remote) is self:
            del owner._sessions[self.remote]
        owner._policy.release("udp")
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(ConnectionError("UDP session closed"))
        for handler in list(self.handlers):
            handler.finish("session closed")
        if self.sock is not None:
            self.sock.close()


class _EgressHandler:
    """One pool connection carrying a remote peer's datagrams to its target socket."""

    def __init__(self, session: _EgressSession, link: PoolLink, creator: bool) -> None:
        self.session = session
        self.link = link
        self.creator = creator
        self.done: defer.Deferred[None] = defer.Deferred()
        self.finished = False
        self.sock: TargetSocket | None = None
        self.timers: list[IdleTimer] = []
        self._write_handle: _GateHandle | None = None
        self._reader = link.reader

    def start(self) -> None:
        self.session.when_ready().addCallbacks(self._ready, lambda f: self.finish("no target"))

    def _ready(self, sock: TargetSocket) -> None:
        if self.finished:
            return
        owner = self.session.owner
        self.sock = sock
        self.session.handlers.append(self)
        timeout = owner._settings.udp_read_timeout
        self._pool_timer = IdleTimer(owner._reactor, timeout, lambda: self._idle("tunnel"))
        self._target_timer = IdleTimer(owner._reactor, timeout, lambda: self._idle("target"))
        self.timers = [self._pool_timer, self._target_timer]
        if sock.gate is not None:
            self._write_handle = sock.gate.handle()
            self.link.register_producer(self._write_handle)
        self.link.set_read_size(owner._settings.udp_data_buf_size)
        owner._logger.debug("Starting transfer: %s <-> %s", self.session.remote, sock.remote)
        self.link.bind(self._from_pool, self.finish)

    def _from_pool(self, data: bytes) -> None:
        if self.finished or self.sock is None:
            return
        self._pool_timer.touch()
        owner = self.session.owner
        for datagram in _split(data, owner._settings.udp_data_buf_size):
            if not self.sock.send(datagram):
                self.finish("write to target failed")
                return
            if owner._throttle is not None:
                owner._throttle.consume(len(datagram), self._reader, "write")

    def from_target(self, datagram: bytes) -> None:
        if self.finished:
            return
        self._target_timer.touch()
        self.link.write(datagram)

    def _idle(self, direction: str) -> None:
        self.session.owner._logger.debug("UDP session abort: %s idle from %s", self.session.remote, direction)
        self.finish("idle")

    def finish(self, reason: str = "done") -> None:
        """Close this link; the creator's end also ends the session."""
        if self.finished:
            return
        self.finished = True
        for timer in self.timers:
            timer.cancel()
        if self._write_handle is not None and self.sock is not None and self.sock.gate is not None:
            self.sock.gate.release(self._write_handle)
        self.session.detach(self)
        throttle = self.session.owner._throttle
        if throttle is not None:
            throttle.forget(self._reader)
        self.link.close()
        if self.creator:
            self.session.close()
        self.done.callback(None)


class UdpEgress:
    """The dialing side of UDP in a dual-end tunnel.

    :meth:`open` is called for each ``udp`` signal with the pool connection it
    names.  The first link for a remote peer takes a slot and opens a connected
    UDP socket to a target (``policy.udp_target()``, source ``policy.bind_ip``);
    a later link for the same peer while that socket lives reuses it, and
    replies go to the newest link.  A link ends after ``udp_read_timeout``
    seconds without data in either direction, on EOF or on error; the end of
    the link that created the socket closes the socket and frees the slot.
    """

    def __init__(
        self,
        *,
        reactor: Any,
        logger: NodePassLogger,
        settings: Settings,
        stats: TunnelStats,
        policy: UdpPolicy,
    ) -> None:
        self._reactor = reactor
        self._logger = logger
        self._settings = settings
        self._stats = stats
        self._policy = policy
        self._throttle = getattr(policy, "throttle", None)
        self._sessions: dict[str, _EgressSession] = {}
        self._handlers: set[_EgressHandler] = set()

    @property
    def sessions(self) -> int:
        """Number of live target sockets."""
        return len(self._sessions)

    def open(self, remote: str, conn: Any) -> defer.Deferred[None]:
        """Carry *remote*'s datagrams over pool connection *conn* (a :class:`PoolLink`).

        Returns a Deferred that fires (with ``None``) when this link is done;
        it never fails.  A refused slot closes the link at once.
        """
        link = as_link(conn)
        session = self._sessions.get(remote)
        creator = False
        if session is None:
            if not self._policy.admit("udp", remote):
                link.close()
                return defer.succeed(None)
            session = _EgressSession(self, remote)
            self._sessions[remote] = session
            creator = True
        else:
            self._logger.debug("Using UDP session: %s", remote)
        handler = _EgressHandler(session, link, creator)
        self._handlers.add(handler)
        handler.done.addBoth(lambda _: self._handlers.discard(handler))
        handler.start()
        if creator:
            session.dial()
        return handler.done

    def stop(self) -> defer.Deferred[None]:
        """End every link and session."""
        for handler in list(self._handlers):
            handler.finish("stopped")
        for session in list(self._sessions.values()):
            session.close()
        return defer.succeed(None)
