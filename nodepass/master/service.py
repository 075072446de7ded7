"""The master service: state, instances and the HTTP(S) API under one ``MultiService``.

Start-up, in order:

1. the state file is read (falling back to its backup, see
   :mod:`nodepass.master.store`); without state of its own, a Go master's
   ``gob/nodepass.gob`` is imported (see :mod:`nodepass.master.migrate`);
   every instance loads ``stopped``;
2. the API key is created or loaded (``API Key created: <key>`` /
   ``API Key loaded: <key>``, printed at every log level except ``none``);
3. instances with ``restart: true`` start (``Auto-starting instance: ...``);
4. the API listens (plain HTTP for ``tls=0``; ``tls=1`` an in-memory
   self-signed certificate; ``tls=2`` the ``crt``/``key`` files, falling back
   to ``tls=1`` when they cannot be loaded), and ``Master started:
   <host:port><base>`` is logged.  The Prometheus metrics are at
   ``<base>/metrics`` (with the key); with ``NP_METRICS_ADDR`` set they are
   also served without a key at ``http://NP_METRICS_ADDR/metrics``.

Graceful stop: every SSE subscriber receives ``shutdown`` and its stream ends;
every instance is stopped (their ``restart`` flags unchanged); the state is
saved (``Instances saved: <path>``); the listener closes; ``Master shutdown
complete`` is logged.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IListeningPort
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.server import Site

from nodepass.env import Settings
from nodepass.log import NodePassLogger
from nodepass.master.app import MasterAPI
from nodepass.master.events import EventHub
from nodepass.master.info import SystemInfo
from nodepass.master.instances import InstanceManager, TunnelFactory
from nodepass.master.metrics import master_metrics
from nodepass.master.migrate import find_go_state, import_go_state, resolve_go_state
from nodepass.master.store import StateStore
from nodepass.master.tcping import Tcping
from nodepass.metrics import MetricsServer, parse_metrics_address
from nodepass.net import join_host_port
from nodepass.url import MasterURL

__all__ = ["MasterService", "make_master_service"]


def _default_tunnel_factory(config: Any, **kwargs: Any) -> Any:
    from nodepass.tunnel import make_tunnel_service

    return make_tunnel_service(config, **kwargs)


class _QuietSite(Site):
    """A ``Site`` that does not write access logs."""

    def log(self, request: Any) -> None:  # noqa: D102 - no access log
        pass


class MasterService(MultiService):
    """A NodePass master: see the module docstring.

    ``address`` gives the listening ``(host, port)`` once started;
    ``manager``, ``events``, ``store`` and ``api`` expose the parts.
    *import_gob* names a Go master's state file (or a directory holding
    ``gob/nodepass.gob``) to import when there is no state of our own.
    """

    def __init__(
        self,
        config: MasterURL,
        *,
        reactor: Any,
        logger: NodePassLogger,
        settings: Settings,
        state_dir: str,
        tunnel_factory: TunnelFactory | None = None,
        sysinfo: SystemInfo | None = None,
        clock: Callable[[], float] | None = None,
        import_gob: str | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.import_gob = import_gob
        self.reactor = reactor
        self.logger = logger
        self.settings = settings
        default_clock: Callable[[], float] = getattr(reactor, "seconds", time.time)
        self.clock: Callable[[], float] = clock if clock is not None else default_clock
        self.events = EventHub(clock=self.clock)
        self.store = StateStore(state_dir, reactor=reactor, logger=logger, settings=settings)
        self.manager = InstanceManager(
            config,
            reactor=reactor,
            logger=logger,
            settings=settings,
            events=self.events,
            tunnel_factory=tunnel_factory or _default_tunnel_factory,
            on_change=self.store.request_save,
        )
        self.store.set_source(self.manager.snapshot_state)
        self.store.setServiceParent(self)  # type: ignore[no-untyped-call]
        self.manager.setServiceParent(self)  # type: ignore[no-untyped-call]
        self.sysinfo = sysinfo if sysinfo is not None else SystemInfo()
        self.tcping = Tcping(reactor, limit=10, timeout=max(settings.report_interval, 0.1))
        self.port: IListeningPort | None = None
        self.api: MasterAPI | None = None
        self._metrics_server: MetricsServer | None = None
        self.tls_code = 0

    @property
    def address(self) -> tuple[str, int]:
        """The ``(host, port)`` the API listens on."""
        assert self.port is not None, "the master is not listening"
        host = self.port.getHost()
        return host.host, host.port  # type: ignore[attr-defined]

    def _interface(self) -> str:
        host = self.config.host
        if not host:
            return ""
        try:
            ipaddress.ip_address(host)
            return host
        except ValueError:
            return socket.gethostbyname(host)

    def _tls(self) -> Any:
        if self.config.tls not in (1, 2):
            self.tls_code = 0
            return None
        from nodepass.tls import server_tls

        creator = server_tls(
            self.config.tls,
            self.config.crt,
            self.config.key_file,
            logger=self.logger,
            reload_interval=self.settings.reload_interval,
        )
        self.tls_code = creator.code if creator is not None else 0
        return creator

    def _load_state(self) -> list[dict[str, Any]] | None:
        """Our own state if there is any, else an imported Go state (or ``None``).

        Raises :class:`~nodepass.master.migrate.GoStateNotFound` when an
        explicitly named Go state file is missing and there is no state to
        fall back on.
        """
        if self.store.exists():
            if self.import_gob:
                self.logger.info(
                    "Go state file not imported: %s already holds this master's state", self.store.path
                )
            return self.store.load()
        path = resolve_go_state(self.import_gob) if self.import_gob else find_go_state(self.store.state_dir)
        if path is None:
            return None
        return import_go_state(path, self.logger)

    def startService(self) -> None:
        """Load state, start the auto-start instances, then listen."""
        self.manager.load(self._load_state())
        self.store.save_now()
        creator = self._tls()
        super().startService()  # type: ignore[no-untyped-call]
        started = self.clock()
        self.api = MasterAPI(
            master=self.config,
            manager=self.manager,
            events=self.events,
            sysinfo=self.sysinfo,
            tcping=self.tcping,
            logger=self.logger,
            clock=self.clock,
            started=started,
            tls_code=self.tls_code,
            reactor=self.reactor,
        )
        self.api.metrics = master_metrics(self.manager, clock=self.clock, started=started)
        if self.settings.metrics_addr:
            self._metrics_server = MetricsServer(
                parse_metrics_address(self.settings.metrics_addr),
                self.api.metrics,
                reactor=self.reactor,
                logger=self.logger,
            )
            self._metrics_server.startService()
        site = _QuietSite(self.api.resource())  # type: ignore[no-untyped-call]
        factory: Any = site
        if creator is not None:
            factory = TLSMemoryBIOFactory(creator, False, site)
        self.port = self.reactor.listenTCP(self.config.port, factory, interface=self._interface())
        self.logger.info("Master started: %s%s", join_host_port(*self.address), self.config.base)

    @inlineCallbacks
    def stopService(self) -> Any:
        """Tell SSE subscribers, stop the instances, save, stop listening."""
        Service.stopService(self)  # type: ignore[no-untyped-call]
        self.events.close_all()
        # Save first, so the state is on disk even if stopping the instances overruns.
        self.store.save_now()
        try:
            stopping = self.manager.stopService()
            stopping.addTimeout(max(self.settings.shutdown_timeout * 0.8, 0.1), self.reactor)
            yield stopping
        except Exception as exc:
            self.logger.error("Instance shutdown error: %s", exc or type(exc).__name__)
        self.store.stopService()  # type: ignore[no-untyped-call]
        if self._metrics_server is not None:
            server, self._metrics_server = self._metrics_server, None
            yield server.stopService()
        if self.port is not None:
            port, self.port = self.port, None
            yield port.stopListening()
        self.logger.info("Master shutdown complete")


#: Build (without starting) the master for *config*, keeping its state in
#: *state_dir*; the arguments are those of :class:`MasterService`.
make_master_service = MasterService
