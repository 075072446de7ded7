"""Tunnel services: a ``server://`` or ``client://`` URL running under Twisted.

:func:`make_tunnel_service` builds the :class:`TunnelService` for a parsed
URL.  The service logs ``Server started: ...`` / ``Client started: ...``,
then runs sessions in a loop: when a session fails it logs
``Server error: <reason>`` / ``Client error: <reason>`` at ERROR, stops it
(pool, control channel, listeners; running exchanges keep going), waits
``service_cooldown`` seconds, logs ``Server restart: ...`` and starts a new
one.  ``stopService`` closes everything, running exchanges included.

``stats`` (a :class:`~nodepass.stats.TunnelStats`) holds the live numbers the
master reads; counters persist across restarts.

A client with ``mode=1``, or ``mode=0`` when its tunnel address can be bound
locally, runs single-end forwarding (:mod:`nodepass.tunnel.single`) instead.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer

from nodepass.datapath.policy import DataPolicy
from nodepass.env import Settings
from nodepass.log import NodePassLogger
from nodepass.relay import RelayProtocol
from nodepass.stats import TunnelStats

__all__ = ["make_tunnel_service", "TunnelService", "ServerService", "ClientService"]


def startup_text(config: Any, prefix: str, mode: int) -> str:
    """``<prefix>: <config.startup_line()>``; a ``... restart`` line shows *mode*
    (the mode in use, when non-zero) in place of the configured one."""
    line = config.startup_line()
    if prefix.endswith("restart") and mode:
        line = re.sub(r"([?&])mode=\d+", rf"\g<1>mode={mode}", line)
    return f"{prefix}: {line}"


class TunnelService(Service):
    """Runs one tunnel URL with NodePass's restart-after-cooldown loop."""

    kind = "Server"

    def __init__(self, config: Any, *, reactor: Any, logger: NodePassLogger, settings: Settings) -> None:
        self.config = config
        self.reactor = reactor
        self.logger = logger
        self.settings = settings
        self.stats = TunnelStats()
        self.policy: Any = None
        self.session: Any = None
        self._exchanges: set[RelayProtocol] = set()
        self._cooldown: Any = None
        self._stopping = False
        self.run_mode = config.mode

    # -- hooks -------------------------------------------------------------------------
    def _new_session(self) -> Any:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Work done once before the first session (TLS set-up, policy)."""
        if self.policy is None:
            self.policy = DataPolicy.from_config(
                self.config, reactor=self.reactor, logger=self.logger, settings=self.settings, stats=self.stats
            )

    def _session_kwargs(self) -> dict[str, Any]:
        """What every session (either end) is built with."""
        return {
            "config": self.config,
            "reactor": self.reactor,
            "logger": self.logger,
            "settings": self.settings,
            "stats": self.stats,
            "policy": self.policy,
            "exchanges": self._exchanges,
        }

    def _startup_line(self, prefix: str) -> str:
        return startup_text(self.config, prefix, self.stats.mode)

    # -- Service -----------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._stopping = False
        try:
            self._prepare()
        except Exception as exc:
            self.logger.error("%s error: %s", self.kind, exc)
            raise
        self.logger.info("%s", self._startup_line(f"{self.kind} started"))
        self._run()

    def _run(self) -> None:
        self._cooldown = None
        if self._stopping:
            return
        session = self._new_session()
        self.session = session
        session.ended.addCallback(self._ended, session)
        session.start()

    def _ended(self, reason: str, session: Any) -> None:
        if self._stopping or session is not self.session or session.stopped:
            return
        self.logger.error("%s error: %s", self.kind, reason or "session ended")
        # The restart is scheduled first: nothing that goes wrong while the
        # old session is taken down may leave the tunnel stopped for good.
        self._cooldown = self.reactor.callLater(self.settings.service_cooldown, self._restart)
        try:
            session.stop()
            self.policy.reset()
        except Exception as exc:
            self.logger.error("%s stop failed: %s", self.kind, exc or type(exc).__name__)

    def _restart(self) -> None:
        self._cooldown = None
        if self._stopping:
            return
        self.stats.restarts += 1
        self.logger.info("%s", self._startup_line(f"{self.kind} restart"))
        self._run()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        if self._cooldown is not None and self._cooldown.active():
            self._cooldown.cancel()
        self._cooldown = None
        session, self.session = self.session, None
        d = session.stop(everything=True) if session is not None else defer.succeed(None)
        for conn in list(self._exchanges):
            conn.abort()
        if self.policy is not None:
            self.policy.stop()

        def done(_: Any) -> None:
            self.logger.info("%s shutdown complete", self.kind)

        return d.addBoth(done)


class ServerService(TunnelService):
    """``server://``: reverse (flow ``-``) or forward (flow ``+``) dual-end server."""

    kind = "Server"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server_tls: Any = None
        self._tls_ready = False

    def _prepare(self) -> None:
        if not self._tls_ready:
            from nodepass.tls import server_tls

            self.server_tls = server_tls(
                self.config.tls,
                self.config.crt,
                self.config.key_file,
                pool_type=self.config.type,
                logger=self.logger,
                reload_interval=self.settings.reload_interval,
            )
            self._tls_ready = True
        super()._prepare()

    def _new_session(self) -> Any:
        from nodepass.tunnel.server import ServerSession

        session = ServerSession(server_tls=self.server_tls, run_mode=self.run_mode, **self._session_kwargs())

        def remember_mode(result: str) -> str:
            # The auto-detected mode is kept for later restarts.
            if session.run_mode in (1, 2):
                self.run_mode = session.run_mode
            return result

        session.ended.addCallback(remember_mode)
        return session

    @property
    def port(self) -> int:
        """The tunnel port of the running session (0 if none)."""
        return self.session.port if self.session is not None else 0


class ClientService(TunnelService):
    """``client://``: dual-end client, or single-end forwarding (mode 1 / auto)."""

    kind = "Client"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.single: Any | None = None
        self._started_once = False

    def startService(self) -> None:
        if self.run_mode in (0, 1):
            from nodepass.tunnel.single import SingleEndService

            self._prepare()
            single = SingleEndService(
                self.config,
                reactor=self.reactor,
                logger=self.logger,
                settings=self.settings,
                stats=self.stats,
                policy=self.policy,
                announce=False,
            )
            if self.run_mode == 1 or single.bind():
                self.single = single
                self.run_mode = 1
                self.stats.mode = 1
                Service.startService(self)  # type: ignore[no-untyped-call]
                self.logger.info("%s", self._startup_line("Client started"))
                single.startService()
                return
            self.run_mode = 2
        super().startService()

    def _new_session(self) -> Any:
        from nodepass.tunnel.client import ClientSession

        # Only the first session may find the server not yet listening
        # because both ends were just started.
        first = not self._started_once
        self._started_once = True
        return ClientSession(quick_start=first, **self._session_kwargs())

    def stopService(self) -> defer.Deferred[None]:
        if self.single is not None:
            Service.stopService(self)  # type: ignore[no-untyped-call]
            single, self.single = self.single, None
            return defer.maybeDeferred(single.stopService).addBoth(lambda _: None)
        return super().stopService()


def make_tunnel_service(
    config: Any, *, reactor: Any, logger: NodePassLogger, settings: Settings
) -> TunnelService:
    """The service for a parsed ``server://`` / ``client://`` URL (see the module docstring)."""
    if config.scheme == "server":
        return ServerService(config, reactor=reactor, logger=logger, settings=settings)
    if config.scheme == "client":
        return ClientService(config, reactor=reactor, logger=logger, settings=settings)
    raise ValueError(f"not a tunnel URL scheme: {config.scheme!r}")
