"""The client end of a dual-end session.

Start sequence (one session): send the HTTP handshake to the tunnel address
(``handshake_timeout`` for the whole exchange; https only when the tunnel
port is ``443``; in the first session of the process a refused connection is
tried again every 50 ms for up to ``service_cooldown`` seconds, since both
ends are often started together and the server may not listen yet - the
session then fails as before), adopt ``flow``/``max``/``tls``/``type`` from the answer,
start the client pool (``min`` from the URL, ``max`` from the server, TLS as
the server said), take connection ``00000000`` as the control channel, and
with flow ``+`` listen on the first target address as the ingress side.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from nodepass.pool import UnknownPoolType, client_pool
from nodepass.tunnel.handshake import HandshakeError, HandshakeRefused, TunnelConfig, client_handshake
from nodepass.tunnel.server import DualEndSession, SessionError, _listen_err

__all__ = ["ClientSession", "QUICK_RETRY"]

#: Pause between the quick handshake attempts at start.
QUICK_RETRY = 0.05


class ClientSession(DualEndSession):
    """One run of the dual-end client start sequence."""

    role = "client"
    step_prefix = "commonStart: "

    def __init__(self, *, quick_start: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.quick_start = quick_start
        self.tunnel_config: TunnelConfig | None = None
        self._handshake: defer.Deferred[TunnelConfig] | None = None

    def stop(self, *, everything: bool = False) -> defer.Deferred[Any]:
        if self._handshake is not None and not self._handshake.called:
            self._handshake.cancel()
        return super().stop(everything=everything)

    @defer.inlineCallbacks
    def _start(self) -> Any:
        cfg = self.config
        self.stats.mode = 2
        self.logger.info("Pending tunnel handshake...")
        self.handshake_start = self.reactor.seconds()
        https = cfg.tunnel.port_text == "443"
        tls_creator = None
        if https:
            from twisted.internet import ssl

            tls_creator = ssl.optionsForClientTLS(cfg.tunnel.host)
        # At start the server may simply not listen yet (both ends started
        # together): a refused connection is tried again at short intervals
        # for up to one cooldown, instead of failing the session and waiting
        # the cooldown before the next attempt.  Anything else fails at once.
        retry_until = self.reactor.seconds() + self.settings.service_cooldown if self.quick_start else 0.0
        delay = QUICK_RETRY
        while True:
            try:
                self._handshake = client_handshake(
                    self.reactor,
                    host=cfg.tunnel.host or "127.0.0.1",
                    port=cfg.tunnel.port,
                    key=self.key,
                    server_name=cfg.server_name,
                    timeout=self.settings.handshake_timeout,
                    tls_creator=tls_creator,
                )
                tc = yield self._handshake
                break
            except HandshakeRefused as exc:
                if self.stopped or self.reactor.seconds() + delay > retry_until:
                    raise SessionError(f"commonStart: tunnelHandshake failed: {exc}") from None
                self.logger.debug("Tunnel handshake refused, trying again in %dms", int(delay * 1000))
                yield self._sleep(delay)
            except HandshakeError as exc:
                raise SessionError(f"commonStart: tunnelHandshake failed: {exc}") from None
        if self.stopped:
            return
        self.tunnel_config = tc
        self.flow = tc.flow
        self.logger.info("Loading tunnel config: %s", tc.log_text())
        if tc.flow not in ("+", "-"):
            raise SessionError(f"commonStart: tunnelHandshake: unknown flow {tc.flow!r}")
        try:
            pool_type = int(tc.type)
        except ValueError:
            pool_type = -1
        self.tls_code = int(tc.tls) if tc.tls in ("1", "2") else 0
        if pool_type == 1 and self.tls_code == 0:
            # QUIC cannot run without TLS: use the in-memory certificate mode.
            self.tls_code = 1
        try:
            self.pool = client_pool(
                pool_type,
                self.reactor,
                self.logger,
                min_cap=cfg.min,
                max_cap=tc.max,
                min_interval=self.settings.min_pool_interval,
                max_interval=self.settings.max_pool_interval,
                keepalive=self.settings.report_interval,
                host=cfg.tunnel.host or "127.0.0.1",
                port=cfg.tunnel.port,
                dial_timeout=self.settings.tcp_dial_timeout,
                tls_code=self.tls_code,
                server_name=cfg.server_name,
            )
        except UnknownPoolType as exc:
            raise SessionError(f"commonStart: initTunnelPool failed: {exc}") from None
        self.pool.start()
        self.logger.info("Getting tunnel pool ready...")
        yield self._set_control()
        if self.flow == "+":
            try:
                self._bind_ingress()
            except Exception as exc:
                raise SessionError(f"commonStart: initTargetListener failed: {_listen_err(exc)}") from None
