"""Client single-end forwarding mode (client ``mode=1``, or ``mode=0`` when the
local bind of the tunnel address succeeds).

No server and no pool: the client listens on its *tunnel* address, TCP and UDP
(each unless ``notcp``/``noudp``), and forwards every user connection or UDP
peer straight to the target list.  As in NodePass v1.14, target connections are
dialled per user session; nothing is dialled in advance.

* TCP: accept, take a slot, optional protocol blocking (``block``), dial a
  target (``lbs`` order with failover, ``dial`` source address, DNS cache),
  optional PROXY v1 header, then relay both ways (a FIN from the user reaches
  the target as a FIN).  Bytes read from / written to the accepted connection
  count as TCPRX/TCPTX and are rate limited.
* UDP: one session per peer ``ip:port`` with its own connected socket to a
  target; replies go back through the listening socket.  A session ends after
  ``udp_read_timeout`` seconds without a reply.  Bytes through the listening
  socket count as UDPRX/UDPTX and are rate limited.  A failed send towards
  the target ends only that session (NodePass restarts the whole client).
* Every ``report_interval`` a TCP connect probe of the targets gives PING and
  the ``CHECK_POINT|MODE=1|...|POOL=0|...`` line is logged at EVENT level.

Usage::

    service = make_single_end(config, reactor=reactor, logger=logger, settings=settings)
    service.startService()        # logs "Client started: ...", binds, starts reporting
    service.stats                 # live TunnelStats (mode 1)
    yield service.stopService()

For ``mode=0`` the client core may call :meth:`SingleEndService.bind` first:
``True`` means the listeners are up and this service should run (and
``startService`` keeps them); ``False`` means the address is taken and the
dual-end mode should be used instead.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from nodepass.datapath.policy import DataPolicy
from nodepass.env import Settings
from nodepass.log import NodePassLogger
from nodepass.net import addr_text, listen_tcp
from nodepass.relay import RelayProtocol, join
from nodepass.stats import TunnelStats
from nodepass.tunnel import startup_text
from nodepass.tunnel.timers import IdleTimer
from nodepass.tunnel.udp import (
    PeerSession,
    TargetSocket,
    _GateHandle,
    _port_gate,
    deliver,
    listen_udp,
    open_target_socket,
    peer_key,
)

__all__ = ["SingleEndService", "make_single_end"]


def _addr_text(addr: Any) -> str:
    """A Twisted address as :func:`~nodepass.tunnel.udp.peer_key` shows it."""
    return addr_text(addr, unmap=True, zone=False)


# --------------------------------------------------------------------------
# TCP


class _UserConnection(RelayProtocol):
    """An accepted user connection in single-end mode."""

    owner: SingleEndService

    def connectionMade(self) -> None:
        owner = self.owner
        assert self.transport is not None
        self.peer = _addr_text(self.transport.getPeer())
        self.target: RelayProtocol | None = None
        self.admitted = owner.policy.admit("tcp", self.peer)
        if not self.admitted:
            self.abort()
            return
        owner._tcp_conns.add(self)
        self.when_lost().addBoth(self._user_lost)
        policy = owner.policy
        if policy.blocking:
            d = self.peek(policy.sniff_bytes, policy.sniff_timeout, owner.reactor)
            d.addCallback(self._sniffed)
        else:
            self._dial()

    def _sniffed(self, first: bytes) -> None:
        if self.lost:
            return
        if self.owner.policy.sniff(first, self.peer) is not None:
            self.abort()
            return
        self._dial()

    def _dial(self) -> None:
        factory = Factory.forProtocol(RelayProtocol)
        d = self.owner.policy.connect_tcp(factory)
        d.addCallbacks(self._connected, self._dial_failed)

    def _dial_failed(self, failure: Failure) -> None:
        if not self.lost:
            self.owner.logger.error("single-end: dial target failed: %s", failure.getErrorMessage())
            self.abort()

    def _connected(self, target: Any) -> None:
        owner = self.owner
        assert isinstance(target, RelayProtocol)
        self.target = target
        if self.lost:
            target.abort()
            return
        assert self.transport is not None and target.transport is not None
        target_peer = target.transport.getPeer()
        try:
            header = owner.policy.proxy_header(self.transport.getPeer(), target_peer)
        except ValueError as exc:
            owner.logger.error("single-end: PROXY header failed: %s", exc)
            target.abort()
            self.abort()
            return
        if header:
            target.transport.write(header)
        owner.logger.info("Starting exchange: %s <-> %s", self.peer, _addr_text(target_peer))
        done = join(
            self,
            target,
            reactor=owner.reactor,
            stats=owner.stats,
            counted=self,
            throttle=cast(Any, owner.policy.throttle),
            read_timeout=owner.policy.read_timeout,
            half_close=True,
        )
        done.addCallback(lambda reason: owner.logger.info("Exchange complete: %s", reason))

    def _user_lost(self, _reason: object) -> None:
        owner = self.owner
        owner._tcp_conns.discard(self)
        throttle = owner.policy.throttle
        if throttle is not None:
            throttle.forget(self.throttle_gate)
        if self.target is not None and not self.target.lost:
            self.target.close()
        if self.admitted:
            self.admitted = False
            owner.policy.release("tcp")


class _UserFactory(Factory):
    def __init__(self, owner: SingleEndService) -> None:
        self.owner = owner

    def buildProtocol(self, addr: Any) -> _UserConnection:
        proto = _UserConnection()
        proto.owner = self.owner
        proto.factory = self
        return proto


# --------------------------------------------------------------------------
# UDP


class _UdpSession(PeerSession):
    """One UDP peer: a connected socket to a target and a reply idle timer."""

    def __init__(self, owner: _UdpForwarder, key: str, addr: tuple[str, int]) -> None:
        super().__init__(key, addr, owner.sessions)
        self.owner = owner
        self.sock: TargetSocket | None = None
        self.reply_handle: _GateHandle | None = None

    def begin(self) -> None:
        service = self.owner.service
        try:
            d = service.policy.udp_target()
        except Exception as exc:
            d = defer.fail(exc)
        d.addCallbacks(self._target, self._failed)

    def _failed(self, failure: Failure) -> None:
        if not self.closed:
            self.owner.service.logger.error("single-end: UDP dial failed: %s", failure.getErrorMessage())
        self.close()

    def _target(self, target: tuple[str, int]) -> None:
        if self.closed:
            return
        service = self.owner.service
        sock = TargetSocket(
            stats=service.stats,
            throttle=None,
            count=False,
            max_packet=service.settings.udp_data_buf_size,
        )
        try:
            open_target_socket(service.reactor, service.logger, service.policy, target, sock)
        except Exception as exc:
            service.logger.error("single-end: UDP dial failed: %s", exc)
            self.close()
            return
        self.sock = sock
        sock.on_datagram = self._reply
        sock.on_error = self._error
        if sock.gate is not None:
            self.reply_handle = sock.gate.handle()
        self.timer = IdleTimer(service.reactor, service.settings.udp_read_timeout, self._idle)
        service.logger.debug("Target connection: %s <-> %s", sock.local, sock.remote)
        self._flush()

    def _forward(self, datagram: bytes) -> bool:
        assert self.sock is not None
        return self.sock.send(datagram)

    def _reply(self, datagram: bytes) -> None:
        if self.closed:
            return
        assert self.timer is not None
        self.timer.touch()
        if not self.owner.send_to_user(datagram, self.addr, self.reply_handle):
            self.close()

    def _error(self, reason: str) -> None:
        self.owner.service.logger.error("single-end: UDP %s: %s", self.key, reason)
        self.close()

    def _idle(self) -> None:
        self.owner.service.logger.debug("UDP session abort: %s idle", self.key)
        self.close()

    def close(self) -> None:
        if not self._end():
            return
        owner = self.owner
        throttle = owner.service.policy.throttle
        if throttle is not None and self.reply_handle is not None:
            throttle.forget(self.reply_handle)
        if self.sock is not None:
            self.sock.close()
        owner.service.policy.release("udp")


class _UdpForwarder(DatagramProtocol):
    """The listening UDP socket of single-end mode and its sessions."""

    def __init__(self, service: SingleEndService) -> None:
        self.service = service
        self.sessions: dict[str, _UdpSession] = {}
        self.read_handle: _GateHandle | None = None

    def startProtocol(self) -> None:
        self.read_handle = _port_gate(self.transport).handle()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        service = self.service
        n = len(datagram)
        service.stats.udprx += n
        throttle = service.policy.throttle
        if throttle is not None and self.read_handle is not None:
            throttle.consume(n, self.read_handle)
        deliver(self.sessions, service.policy, datagram, (addr[0], addr[1]), lambda key, peer: _UdpSession(self, key, peer))

    def send_to_user(self, datagram: bytes, addr: tuple[str, int], producer: Any) -> bool:
        transport: Any = self.transport
        if transport is None:
            return False
        try:
            transport.write(datagram, addr)
        except Exception as exc:
            self.service.logger.error("single-end: UDP write to %s failed: %s", peer_key(*addr), exc)
            return False
        n = len(datagram)
        self.service.stats.udptx += n
        throttle = self.service.policy.throttle
        if throttle is not None and producer is not None:
            throttle.consume(n, producer, "write")
        return True

    def close_sessions(self) -> None:
        for session in list(self.sessions.values()):
            session.close()


# --------------------------------------------------------------------------
# the service


class SingleEndService(Service):
    """A client in single-end forwarding mode (see the module docstring)."""

    def __init__(
        self,
        config: Any,
        *,
        reactor: Any,
        logger: NodePassLogger,
        settings: Settings,
        stats: TunnelStats | None = None,
        policy: DataPolicy | None = None,
        announce: bool = True,
    ) -> None:
        """*config* is the client's :class:`~nodepass.url.TunnelURL`.

        *stats* and *policy* may be shared with a client core that chose this
        mode; by default they are created here.  ``announce=False`` leaves the
        ``Client started`` line to the caller.
        """
        self.config = config
        self.reactor = reactor
        self.logger = logger
        self.settings = settings
        self.stats = stats if stats is not None else TunnelStats()
        self.policy = (
            policy
            if policy is not None
            else DataPolicy.from_config(config, reactor=reactor, logger=logger, settings=settings, stats=self.stats)
        )
        self.announce = announce
        self._tcp_port: Any = None
        self._udp_port: Any = None
        self._udp: _UdpForwarder | None = None
        self._tcp_conns: set[_UserConnection] = set()
        self._report: LoopingCall | None = None
        self._report_done: defer.Deferred[Any] | None = None
        self._restart: Any = None
        self._stopping = False

    # -- binding ---------------------------------------------------------------
    @property
    def bound(self) -> bool:
        """True while the listeners are up."""
        return self._tcp_port is not None or self._udp_port is not None

    @property
    def tcp_port(self) -> int:
        """The TCP port listened on (useful with port 0 in tests), 0 if none."""
        return int(self._tcp_port.getHost().port) if self._tcp_port is not None else 0

    @property
    def udp_port(self) -> int:
        """The UDP port listened on, 0 if none."""
        return int(self._udp_port.getHost().port) if self._udp_port is not None else 0

    def bind(self) -> bool:
        """Open the tunnel-address listeners (TCP unless notcp, UDP unless noudp).

        Returns False, with nothing left open, when a bind fails (the reason
        is kept in :attr:`bind_error`).
        """
        if self.bound:
            return True
        self.bind_error = ""
        host, port = self.config.tunnel.host, int(self.config.tunnel.port)
        try:
            if not self.config.notcp:
                factory = _UserFactory(self)
                self._tcp_port = listen_tcp(self.reactor, host, port, factory)
            if not self.config.noudp:
                forwarder = _UdpForwarder(self)
                udp_port = listen_udp(self.reactor, host, port, forwarder, self.settings.udp_data_buf_size)
                self._udp, self._udp_port = forwarder, udp_port
        except (CannotListenError, OSError) as exc:
            self.bind_error = str(exc)
            self._close_listeners()
            return False
        return True

    def _close_listeners(self) -> defer.Deferred[Any]:
        waits: list[defer.Deferred[Any]] = []
        for attr in ("_tcp_port", "_udp_port"):
            port = getattr(self, attr)
            setattr(self, attr, None)
            if port is not None:
                result = port.stopListening()
                if isinstance(result, defer.Deferred):
                    waits.append(result)
        if self._udp is not None:
            self._udp.close_sessions()
            self._udp = None
        return defer.gatherResults(waits) if waits else defer.succeed(None)

    # -- lifecycle -------------------------------------------------------------
    def _startup_text(self, prefix: str) -> str:
        return startup_text(self.config, prefix, self.stats.mode)

    def startService(self) -> None:
        """Log ``Client started``, bind the listeners and start the report timer.

        A bind failure logs ``Client error: ...`` and retries after
        ``service_cooldown`` seconds, as NodePass restarts its core.
        """
        super().startService()  # type: ignore[no-untyped-call]
        self._stopping = False
        if self.announce:
            self.logger.info("%s", self._startup_text("Client started"))
        self._start_core()

    def _start_core(self) -> None:
        self._restart = None
        if self._stopping:
            return
        if not self.bind():
            self.logger.error("Client error: single-end listen failed: %s", self.bind_error)
            self._restart = self.reactor.callLater(self.settings.service_cooldown, self._again)
            return
        self.stats.mode = 1
        self._report = LoopingCall(self._tick)
        self._report.clock = self.reactor
        self._report_done = self._report.start(self.settings.report_interval, now=True)
        self._report_done.addErrback(lambda f: self.logger.error("single-end report failed: %s", f.getErrorMessage()))

    def _again(self) -> None:
        self._restart = None
        if self._stopping:
            return
        self.logger.info("%s", self._startup_text("Client restart"))
        self.policy.reset()
        self._start_core()

    def _tick(self) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = self.policy.probe_latency()

        def report(ping: Any) -> None:
            self.stats.ping = int(ping) if isinstance(ping, int) else 0
            if not self._stopping:
                self.logger.event("%s", self.stats.checkpoint_line())

        def failed(_f: Failure) -> None:
            report(0)

        d.addCallbacks(report, failed)
        return d

    def stopService(self) -> defer.Deferred[Any]:
        """Stop reporting, close the listeners, every TCP connection and UDP session."""
        self._stopping = True
        result = super().stopService()  # type: ignore[no-untyped-call]
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._restart = None
        if self._report is not None and self._report.running:
            self._report.stop()
        self._report = None
        waits: list[defer.Deferred[Any]] = [self._close_listeners()]
        if isinstance(result, defer.Deferred):
            waits.append(result)
        for conn in list(self._tcp_conns):
            waits.append(conn.when_lost())
            if conn.target is not None:
                waits.append(conn.target.when_lost())
                conn.target.abort()
            conn.abort()
        self.policy.stop()
        return defer.gatherResults(waits).addCallback(lambda _: None)


#: Build the single-end forwarding service for a ``client://`` *config*; the
#: arguments are those of :class:`SingleEndService` (``.stats`` is mode 1 once
#: listening).
make_single_end = SingleEndService
