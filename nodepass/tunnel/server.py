"""Dual-end sessions: the part shared by both ends, and the server end.

A *session* is one run of the start sequence, from the handshake to the
failure that ends it; the service (:mod:`nodepass.tunnel`) logs the failure,
stops the session, waits ``service_cooldown`` and starts a new one.

:class:`DualEndSession` holds what both ends do once the pool and the control
channel are up:

* **ingress** (server with flow ``-``, client with flow ``+``): accept user
  TCP connections on the first target address, take a slot, sniff for
  blocked protocols, take an idle pool connection (``pool_get_timeout``), send
  ``tcp`` with the user's address and the connection ID, and relay; UDP goes
  through :class:`nodepass.tunnel.udp.UdpIngress`.  With tls 1 nothing is
  accepted until the peer's ``verify`` has been checked.
* **egress**: on ``tcp`` take the named pool connection (an error counts
  towards the flush rule), take a slot, dial a target through the data
  policy, send the PROXY header if configured, and relay; ``udp`` goes to
  :class:`nodepass.tunnel.udp.UdpEgress`.

One TCP exchange of either side, once admitted, is run by
:mod:`nodepass.tunnel.exchange`.

:class:`ServerSession` adds the server start sequence: listen on the tunnel
address, choose the mode (reverse binds the target; forward otherwise), serve
the HTTP handshake, then treat every new connection on the tunnel port as a
pool connection from the handshaken client IP; the first one becomes the
control channel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from nodepass.env import Settings
from nodepass.log import Level, NodePassLogger
from nodepass.net import addr_text as _addr_text
from nodepass.net import listen_tcp
from nodepass.pool import CONTROL_ID, PoolError, pool_type_name, probe_server_port, server_pool
from nodepass.relay import RelayProtocol
from nodepass.stats import TunnelStats
from nodepass.tunnel.exchange import EgressTCP, IngressTCP, peer_text
from nodepass.tunnel.exchange import err_text as _err_text
from nodepass.tunnel.handshake import HandshakeServerProtocol, TunnelConfig
from nodepass.tunnel.health import ControlChannel
from nodepass.tunnel.signals import Signal
from nodepass.tunnel.timers import DelayedCalls

__all__ = ["DualEndSession", "ServerSession", "SessionError", "addr_text"]



class SessionError(Exception):
    """A start step failed; the message is what NodePass logs after ``Server error:``."""


def addr_text(addr: Any) -> str:
    """``ip:port`` / ``[v6]:port`` of a Twisted address (IPv4-mapped shown as IPv4)."""
    return _addr_text(addr, unmap=True)


class _UserConnection(RelayProtocol):
    """A user connection accepted on the ingress side."""

    def __init__(self, session: DualEndSession) -> None:
        super().__init__()
        self.session = session

    def connectionMade(self) -> None:
        self.session._ingress_tcp(self)


class _UserFactory(Factory):
    def __init__(self, session: DualEndSession) -> None:
        self.session = session

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        if self.session.stopped:
            return None
        p = _UserConnection(self.session)
        p.factory = self
        return p


class DualEndSession:
    """State and data paths of one dual-end session (both ends)."""

    role = "server"
    #: Go prefixes start-step errors with the name of the start function.
    step_prefix = "start: "

    def __init__(
        self,
        *,
        config: Any,
        reactor: Any,
        logger: NodePassLogger,
        settings: Settings,
        stats: TunnelStats,
        policy: Any,
        exchanges: set[RelayProtocol],
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.logger = logger
        self.settings = settings
        self.stats = stats
        self.policy = policy
        self.exchanges = exchanges
        self.key: str = config.key
        self.flow = ""
        self.tls_code = 0
        self.pool: Any = None
        self.control: ControlChannel | None = None
        self.ended: defer.Deferred[str] = defer.Deferred()
        self.stopped = False
        self._listeners: list[Any] = []
        self._udp_ingress: Any = None
        self._udp_egress: Any = None
        self._ingress_open = False
        self._ingress_waiters: list[defer.Deferred[None]] = []
        self._calls = DelayedCalls(reactor)
        self.handshake_start = reactor.seconds()

    # -- start / failure / stop -------------------------------------------------------
    @defer.inlineCallbacks
    def start(self) -> Any:
        """Run the start sequence; failures end up in :attr:`ended`.

        A :class:`SessionError` ends the session with its message; any other
        error with ``step_prefix`` and its text.
        """
        try:
            yield self._start()
        except SessionError as exc:
            self.fail(str(exc))
        except Exception as exc:
            self.fail(f"{self.step_prefix}{_err_text(exc)}")

    def _start(self) -> Any:
        """The start sequence of one end (a Deferred; raises SessionError on a failed step)."""
        raise NotImplementedError

    def fail(self, reason: str) -> None:
        """End the session with an error (once); the service restarts it."""
        if not self.ended.called:
            self.ended.callback(reason)

    def stop(self, *, everything: bool = False) -> defer.Deferred[Any]:
        """Close the pool, control channel, listeners and UDP; with ``everything``
        also abort running exchanges (service shutdown)."""
        self.stopped = True
        if not self.ended.called:
            self.ended.callback("")
        self._calls.cancel_all()
        waiters, self._ingress_waiters = self._ingress_waiters, []
        for d in waiters:
            if not d.called:
                d.errback(SessionError("session stopped"))
        if self.control is not None:
            self.control.stop()
        if self.pool is not None:
            active = self.pool.active
            self.pool.close()
            self.logger.debug("Tunnel connection closed: pool active %d", active)
        waits: list[defer.Deferred[Any]] = []
        for port in self._listeners:
            result = port.stopListening()
            if isinstance(result, defer.Deferred):
                waits.append(result)
        self._listeners = []
        if self._udp_ingress is not None:
            waits.append(self._udp_ingress.stop())
            self._udp_ingress = None
        if self._udp_egress is not None:
            waits.append(self._udp_egress.stop())
            self._udp_egress = None
        if everything:
            for conn in list(self.exchanges):
                conn.abort()
        return defer.gatherResults(waits, consumeErrors=True).addBoth(lambda _: None)

    def _later(self, delay: float, fn: Callable[[], Any]) -> None:
        if self.stopped:
            return
        self._calls.later(delay, fn)

    def _sleep(self, delay: float) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._later(delay, lambda: d.callback(None))
        return d

    # -- control connection -------------------------------------------------------------
    @defer.inlineCallbacks
    def _set_control(self) -> Any:
        """Wait for >= 1 idle pool connection, then take ``00000000`` as control."""
        if self.pool.active == 0:
            # Woken by the first idle member (not by polling: the control
            # channel is up as soon as it can be).
            arrived = self.pool.when_idle()
            timer = self.reactor.callLater(self.settings.handshake_timeout, arrived.cancel)
            try:
                yield arrived
            except defer.CancelledError:
                pass
            finally:
                if timer.active():
                    timer.cancel()
            if self.stopped:
                raise SessionError(f"{self.step_prefix}setControlConn failed: setControlConn: context canceled")
            if self.pool.active == 0:
                detail = getattr(self.pool, "last_error", "")
                raise SessionError(
                    f"{self.step_prefix}setControlConn failed: setControlConn: handshake timeout"
                    + (f" (last pool connection error: {detail})" if detail else "")
                )
        try:
            conn = yield self.pool.outgoing_get(CONTROL_ID, self.settings.pool_get_timeout)
        except PoolError as exc:
            raise SessionError(
                f"{self.step_prefix}setControlConn failed: setControlConn: outgoingGet failed: {exc}"
            ) from None
        ms = int((self.reactor.seconds() - self.handshake_start) * 1000)
        self.logger.info("Marking tunnel handshake as complete in %dms", ms)
        if self.tls_code in (1, 2):
            self.logger.info("TLS certificate fingerprint verifying...")
        self.control = ControlChannel(
            reactor=self.reactor,
            logger=self.logger,
            settings=self.settings,
            stats=self.stats,
            key=self.key,
            conn=conn,
            pool=self.pool,
            role=self.role,
            tls_code=self.tls_code,
            own_fingerprint=self._own_fingerprint,
            on_launch=self._launch,
            on_failure=lambda reason: self.fail(f"{self.step_prefix}commonControl failed: commonControl: {reason}"),
            on_verified=self._verified,
        )
        self.control.start()
        self._probe_targets()
        if not self.control.gates_ingress:
            self._open_ingress()

    def _probe_targets(self) -> None:
        """``lbs=1`` with several targets: on the egress side (the side that dials
        them) probe every target at once now and each report interval, so that
        dials start at the fastest one."""
        egress = (self.role == "server") == (self.flow == "+")
        if self.stopped or not egress or self.config.lbs != 1 or len(self.config.targets) < 2:
            return

        def failed(failure: Failure) -> None:
            self.logger.debug("Target probe failed: %s", failure.getErrorMessage())

        self.policy.probe_latency().addErrback(failed)
        self._later(self.settings.report_interval, self._probe_targets)

    def _own_fingerprint(self) -> str:
        return ""

    def _verified(self) -> None:
        self._open_ingress()

    def _open_ingress(self) -> None:
        self._ingress_open = True
        waiters, self._ingress_waiters = self._ingress_waiters, []
        for d in waiters:
            d.callback(None)

    def _wait_ingress(self) -> defer.Deferred[None]:
        if self._ingress_open:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._ingress_waiters.append(d)
        return d

    def _send(self, signal: Signal) -> None:
        if self.control is not None:
            self.control.send(signal)

    # -- ingress ----------------------------------------------------------------------------
    def _bind_ingress(self) -> None:
        """Bind the first target address (TCP unless notcp, UDP unless noudp).

        Raises CannotListenError, leaving nothing open, when a bind fails."""
        target = self.config.targets[0]
        opened: list[Any] = []
        try:
            if self.policy.tcp_enabled:
                opened.append(listen_tcp(self.reactor, target.host, target.port, _UserFactory(self)))
            if self.policy.udp_enabled:
                from nodepass.tunnel.udp import UdpIngress

                ingress = UdpIngress(
                    reactor=self.reactor,
                    logger=self.logger,
                    settings=self.settings,
                    stats=self.stats,
                    policy=self.policy,
                    listen=(target.host, target.port),
                    acquire=self._acquire_for_udp,
                    send_signal=lambda remote, cid: self._send(Signal("udp", remote=remote, id=cid)),
                )
                ingress.start()
                self._udp_ingress = ingress
        except (CannotListenError, OSError):
            for port in opened:
                port.stopListening()
            raise
        self._listeners.extend(opened)

    def _take_idle(self) -> defer.Deferred[Any]:
        """An idle pool connection for a new user session (see ControlChannel.newest_first)."""
        newest = self.control is not None and self.control.newest_first
        return self.pool.incoming_get(self.settings.pool_get_timeout, newest=newest)  # type: ignore[no-any-return]

    @defer.inlineCallbacks
    def _acquire_for_udp(self) -> Any:
        yield self._wait_ingress()
        result = yield self._take_idle()
        return result

    def _ingress_tcp(self, user: _UserConnection) -> None:
        t: Any = user.transport
        peer = peer_text(t)
        if self.logger.enabled(Level.DEBUG):
            self.logger.debug("Target connection: %s <-> %s", addr_text(t.getHost()), peer)
        exchanges = self.exchanges
        exchanges.add(user)
        user.on_lost(lambda _reason: exchanges.discard(user))
        if not self._ingress_open:
            self._wait_ingress().addCallbacks(lambda _: self._ingress_admit(user, peer), lambda _: user.abort())
            return
        self._ingress_admit(user, peer)

    def _ingress_admit(self, user: _UserConnection, peer: str) -> None:
        if user.lost:
            return
        if not self.policy.admit("tcp", peer):
            user.abort()
            return
        IngressTCP(self, user, peer).start()

    # -- egress ------------------------------------------------------------------------------
    def _launch(self, signal: Signal) -> None:
        if signal.action == "tcp":
            if self.policy.tcp_enabled:
                self._egress_tcp(signal)
        elif signal.action == "udp":
            if self.policy.udp_enabled:
                self._egress_udp(signal)

    def _egress_tcp(self, signal: Signal) -> None:
        cid = signal.id
        if self.logger.enabled(Level.DEBUG):
            self.logger.debug("TCP launch signal: cid %s <- control", cid)
        conn = self.pool.take(cid)
        if conn is not None:
            self._egress_admit(conn, signal)
            return

        def missing(failure: Failure) -> None:
            failure.trap(PoolError)  # type: ignore[no-untyped-call]
            self.logger.error("commonTCPOnce: request timeout: %s", failure.value)
            if not self.stopped:
                self.pool.add_error()

        d = self.pool.outgoing_get(cid, self.settings.pool_get_timeout)
        d.addCallbacks(lambda got: self._egress_admit(got, signal), missing)
        d.addErrback(lambda failure: self.logger.error("commonTCPOnce: %s", _err_text(failure)))

    def _egress_admit(self, conn: Any, signal: Signal) -> None:
        if self.logger.enabled(Level.DEBUG):
            self.logger.debug("Tunnel connection: get %s <- pool active %d", signal.id, self.pool.active)
        if conn.lost:
            self.logger.debug("Tunnel connection: %s already closed by the peer", signal.id)
            return
        if not self.policy.admit("tcp", signal.remote):
            conn.close()
            return
        EgressTCP(self, conn, signal.remote).start()

    @defer.inlineCallbacks
    def _egress_udp(self, signal: Signal) -> Any:
        cid = signal.id
        self.logger.debug("UDP launch signal: cid %s <- control", cid)
        try:
            conn = yield self.pool.outgoing_get(cid, self.settings.pool_get_timeout)
        except PoolError as exc:
            self.logger.error("commonUDPOnce: request timeout: %s", exc)
            if not self.stopped:
                self.pool.add_error()
            return
        if self._udp_egress is None:
            from nodepass.tunnel.udp import UdpEgress

            self._udp_egress = UdpEgress(
                reactor=self.reactor,
                logger=self.logger,
                settings=self.settings,
                stats=self.stats,
                policy=self.policy,
            )
        self._udp_egress.open(signal.remote, conn)


class _TunnelPortFactory(Factory):
    """The tunnel port: handshake first, then pool connections."""

    def __init__(self, session: ServerSession) -> None:
        self.session = session

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        s = self.session
        if s.stopped:
            return None
        if s.phase == "handshake":
            p = HandshakeServerProtocol(
                key=s.key,
                reactor=s.reactor,
                logger=s.logger,
                timeout=s.settings.handshake_timeout,
                authorize=s._authorize,
            )
            if len(s._handshakes) > 256:
                s._handshakes = {h for h in s._handshakes if not h._done}
            s._handshakes.add(p)
            return p
        if s.phase == "pool" and s.pool is not None:
            factory = s.pool.factory()
            if factory is not None:
                return factory.buildProtocol(addr)  # type: ignore[no-any-return]
        return None


class ServerSession(DualEndSession):
    """One run of the server start sequence."""

    role = "server"

    def __init__(self, *, server_tls: Any, run_mode: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.server_tls = server_tls
        self.tls_code = server_tls.code if server_tls is not None else 0
        self.run_mode = run_mode
        self.phase = "init"
        self._handshakes: set[HandshakeServerProtocol] = set()
        self._handshake_done: defer.Deferred[None] = defer.Deferred()
        self.tunnel_port: Any = None

    def _own_fingerprint(self) -> str:
        return self.server_tls.fingerprint if self.server_tls is not None else ""

    @defer.inlineCallbacks
    def _start(self) -> Any:
        cfg = self.config
        try:
            self.tunnel_port = listen_tcp(self.reactor, cfg.tunnel.host, cfg.tunnel.port, _TunnelPortFactory(self))
        except CannotListenError as exc:
            raise SessionError(f"start: initTunnelListener failed: {_err_text(exc.socketError)}") from None
        self._listeners.append(self.tunnel_port)
        try:
            probe_server_port(cfg.type, self.reactor, cfg.tunnel.host, self.port)
        except (CannotListenError, OSError) as exc:
            raise SessionError(f"start: initTunnelListener failed: {_listen_err(exc)}") from None

        if self.run_mode == 1:
            try:
                self._bind_ingress()
            except (CannotListenError, OSError) as exc:
                raise SessionError(f"start: initTargetListener failed: {_listen_err(exc)}") from None
            self.flow = "-"
        elif self.run_mode == 2:
            self.flow = "+"
        else:
            try:
                self._bind_ingress()
                self.run_mode, self.flow = 1, "-"
            except (CannotListenError, OSError):
                self.run_mode, self.flow = 2, "+"
        self.stats.mode = self.run_mode

        self.logger.info("Pending tunnel handshake...")
        self.handshake_start = self.reactor.seconds()
        self.phase = "handshake"
        yield self._handshake_done
        if self.stopped:
            return
        self.logger.info("Getting tunnel pool ready...")
        yield self._set_control()

    def _authorize(self, client_ip: str, via: str = "") -> TunnelConfig | None:
        if self.phase != "handshake" or self.stopped:
            return None
        self.phase = "pool"
        config = TunnelConfig(flow=self.flow, max=self.config.max, tls=str(self.tls_code), type=str(self.config.type))
        pool = server_pool(
            self.config.type,
            self.reactor,
            self.logger,
            max_cap=self.config.max,
            client_ip=client_ip,
            tls=self.server_tls,
            keepalive=self.settings.report_interval,
            strict=self.flow == "-",
            host=self.config.tunnel.host,
            port=self.port,
            # WebSocket: which addresses may open pool connections.
            options={"wsip": self.config.wsip, "via": via} if self.config.type == 2 else None,
        )
        try:
            pool.start()
        except Exception as exc:
            pool.close()
            self.logger.error("Tunnel pool start failed: %s", _listen_err(exc))
            self.reactor.callLater(
                0, self.fail, f"start: initTunnelPool failed: {pool_type_name(self.config.type)}: {_listen_err(exc)}"
            )
            return None
        self.pool = pool
        self.logger.info("Sending tunnel config: %s", config.log_text())
        pending = list(self._handshakes)
        self._handshakes.clear()
        for p in pending:
            # Go closes the HTTP server: every other handshake connection ends.
            self.reactor.callLater(0, p.close)
        self.reactor.callLater(0, self._handshake_finished)
        return config

    def _handshake_finished(self) -> None:
        # stop() may have fired it in the meantime.
        if not self._handshake_done.called:
            self._handshake_done.callback(None)

    def stop(self, *, everything: bool = False) -> defer.Deferred[Any]:
        for p in list(self._handshakes):
            p.close()
        self._handshakes.clear()
        if not self._handshake_done.called:
            self._handshake_done.callback(None)
        return super().stop(everything=everything)

    @property
    def port(self) -> int:
        """The tunnel TCP port actually bound (useful with port 0)."""
        return int(self.tunnel_port.getHost().port) if self.tunnel_port is not None else 0


def _listen_err(exc: Exception) -> str:
    if isinstance(exc, CannotListenError):
        return _err_text(exc.socketError)
    return _err_text(exc)
