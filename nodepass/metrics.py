"""Prometheus metrics of tunnels, built on ``prometheus_client``.

:class:`TunnelCollector` is a ``prometheus_client`` collector that reads the
live numbers of one or more tunnels each time it is scraped (no values are
copied in between).  Each tunnel is one :class:`TunnelSample`, labelled
``id``, ``alias`` and ``type`` (``server``/``client``):

* ``nodepass_tcp_rx_bytes_total``, ``nodepass_tcp_tx_bytes_total``,
  ``nodepass_udp_rx_bytes_total``, ``nodepass_udp_tx_bytes_total`` (counters):
  the ``tcprx``, ``tcptx``, ``udprx``, ``udptx`` byte counters;
* ``nodepass_tcp_connections``, ``nodepass_udp_sessions``,
  ``nodepass_pool_connections`` (gauges): ``tcps``, ``udps``, ``pool``;
* ``nodepass_ping_seconds`` (gauge): the last round trip (``ping`` / 1000);
* ``nodepass_mode`` (gauge): the run mode the tunnel chose;
* ``nodepass_status`` (state set): one sample per state (``running``,
  ``stopped``, ``error``), 1 for the current one;
* ``nodepass_restarts_total`` (counter): restarts after an error;

plus ``nodepass_build_info{version}``.  :class:`MetricsSource` adds the standard
process and platform collectors (``process_*``, ``python_*``).

:func:`render` answers a scrape (Prometheus text format, or OpenMetrics when
the ``Accept`` header asks for it): the collectors run in the reactor thread,
so they may read reactor-owned state safely, and only the formatting of the
collected values runs in the (injected) reactor's thread pool.
(``prometheus_client.twisted`` is not used: it collects in a thread of the
global reactor.)

A standalone tunnel exposes its metrics when ``NP_METRICS_ADDR`` is set
(:func:`with_metrics`): ``http://NP_METRICS_ADDR/metrics``, no
authentication, labels ``id=""`` and ``alias=""`` (the scrape target tells
tunnels apart).  This module does not import the master.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.web.resource import NoResource, Resource
from twisted.web.server import NOT_DONE_YET, Site

from nodepass import __version__
from nodepass.log import Level, LogRecord, NodePassLogger
from nodepass.net import join_host_port, listen_any
from nodepass.stats import TunnelStats
from nodepass.url import HostPort, parse_host_port

__all__ = [
    "LABELS",
    "STATES",
    "TUNNEL_METRICS",
    "TunnelSample",
    "TunnelCollector",
    "MetricsSource",
    "render",
    "MetricsPage",
    "MetricsServer",
    "with_metrics",
    "parse_metrics_address",
]

LABELS = ("id", "alias", "type")
"""Labels of every per-tunnel metric."""

STATES = ("running", "stopped", "error")
"""States of ``nodepass_status``."""

#: Per-tunnel metrics: exposed name → (type, help).
TUNNEL_METRICS: dict[str, tuple[str, str]] = {
    "nodepass_tcp_rx_bytes_total": ("counter", "TCP bytes received (the instance's tcprx counter)."),
    "nodepass_tcp_tx_bytes_total": ("counter", "TCP bytes sent (the instance's tcptx counter)."),
    "nodepass_udp_rx_bytes_total": ("counter", "UDP bytes received (the instance's udprx counter)."),
    "nodepass_udp_tx_bytes_total": ("counter", "UDP bytes sent (the instance's udptx counter)."),
    "nodepass_tcp_connections": ("gauge", "Active TCP connections."),
    "nodepass_udp_sessions": ("gauge", "Active UDP sessions."),
    "nodepass_pool_connections": ("gauge", "Connections in the tunnel pool."),
    "nodepass_ping_seconds": ("gauge", "Last measured tunnel round trip in seconds."),
    "nodepass_mode": ("gauge", "Run mode the tunnel chose (server 1 reverse, 2 forward; client 1 single-end, 2 dual-end; 0 unknown)."),
    "nodepass_status": ("stateset", "Run state of the instance: 1 for the current state."),
    "nodepass_restarts_total": ("counter", "Restarts of the tunnel after an error."),
}

_COUNTER_FIELDS = {
    "nodepass_tcp_rx_bytes_total": "tcprx",
    "nodepass_tcp_tx_bytes_total": "tcptx",
    "nodepass_udp_rx_bytes_total": "udprx",
    "nodepass_udp_tx_bytes_total": "udptx",
    "nodepass_restarts_total": "restarts",
}
_GAUGE_FIELDS = {
    "nodepass_tcp_connections": "tcps",
    "nodepass_udp_sessions": "udps",
    "nodepass_pool_connections": "pool",
    "nodepass_mode": "mode",
}


@dataclass(frozen=True)
class TunnelSample:
    """One tunnel at scrape time: its labels, its status and its numbers (``ping`` in milliseconds)."""

    id: str
    alias: str
    type: str
    status: str
    stats: TunnelStats

    @property
    def labels(self) -> list[str]:
        """Label values in :data:`LABELS` order."""
        return [self.id, self.alias, self.type]


class TunnelCollector(Collector):
    """Collects :data:`TUNNEL_METRICS` from *samples* (called at every scrape).

    *extra* may yield further metric families (e.g. the master's uptime).
    """

    def __init__(
        self,
        samples: Callable[[], Iterable[TunnelSample]],
        extra: Callable[[], Iterable[Metric]] | None = None,
    ) -> None:
        self.samples = samples
        self.extra = extra

    def collect(self) -> Iterator[Metric]:
        """One family per metric of :data:`TUNNEL_METRICS`, plus build info and *extra*."""
        counters = {
            name: CounterMetricFamily(name.removesuffix("_total"), TUNNEL_METRICS[name][1], labels=LABELS)
            for name in _COUNTER_FIELDS
        }
        gauges = {name: GaugeMetricFamily(name, TUNNEL_METRICS[name][1], labels=LABELS) for name in _GAUGE_FIELDS}
        ping = GaugeMetricFamily("nodepass_ping_seconds", TUNNEL_METRICS["nodepass_ping_seconds"][1], labels=LABELS)
        status = StateSetMetricFamily("nodepass_status", TUNNEL_METRICS["nodepass_status"][1], labels=LABELS)
        for sample in self.samples():
            labels = sample.labels
            for name, field in _COUNTER_FIELDS.items():
                counters[name].add_metric(labels, getattr(sample.stats, field))
            for name, field in _GAUGE_FIELDS.items():
                gauges[name].add_metric(labels, getattr(sample.stats, field))
            ping.add_metric(labels, sample.stats.ping / 1000.0)
            status.add_metric(labels, {state: state == sample.status for state in STATES})
        yield from counters.values()
        yield from gauges.values()
        yield ping
        yield status
        yield InfoMetricFamily("nodepass_build", "NodePass version.", value={"version": f"v{__version__}"})
        if self.extra is not None:
            yield from self.extra()

    def frozen(self) -> TunnelCollector:
        """A collector of the values as they are now (read in the caller's thread)."""
        samples = [
            TunnelSample(s.id, s.alias, s.type, s.status, copy.copy(s.stats)) for s in self.samples()
        ]
        extra = list(self.extra()) if self.extra is not None else []
        return TunnelCollector(lambda: samples, lambda: extra)


class MetricsSource:
    """What a scrape reads: *tunnels* plus the process, platform and GC collectors."""

    def __init__(self, tunnels: TunnelCollector) -> None:
        self.tunnels = tunnels
        self.system = CollectorRegistry()
        ProcessCollector(registry=self.system)
        PlatformCollector(registry=self.system)
        GCCollector(registry=self.system)

    def snapshot(self) -> Collector:
        """The tunnels' values as they are now; the system collectors are read when collected."""
        return _Parts(self.tunnels.frozen(), self.system)


class _Parts(Collector):
    def __init__(self, *parts: Collector) -> None:
        self.parts = parts

    def collect(self) -> Iterator[Metric]:
        for part in self.parts:
            yield from part.collect()


def render(request: Any, source: MetricsSource, reactor: Any) -> Deferred[bytes]:
    """Answer a scrape of *source* on the Twisted *request* (format chosen by ``Accept``).

    The tunnels' values are taken at once, in the reactor thread (they live
    in reactor-owned objects); building the metric families and the text, most
    of the work for many instances, runs in the thread pool of *reactor* (in
    this thread when it is ``None``), so tunnels keep moving data meanwhile.
    Fires with the body.
    """
    accept = request.getHeader(b"accept")
    encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
    snapshot = source.snapshot()
    if reactor is None:
        d: Deferred[bytes] = succeed(encoder(snapshot))
    else:
        d = deferToThreadPool(reactor, reactor.getThreadPool(), encoder, snapshot)

    def done(body: bytes) -> bytes:
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return body

    return d.addCallback(done)


class MetricsPage(Resource):
    """``GET`` / ``HEAD``: the metrics of *source*."""

    isLeaf = True

    def __init__(self, source: MetricsSource, reactor: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.source = source
        self.reactor = reactor

    def render_GET(self, request: Any) -> Any:  # noqa: N802 - Twisted's naming
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def write(body: bytes) -> None:
            if not gone:
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            if not gone:
                request.setResponseCode(500)
                request.finish()

        render(request, self.source, self.reactor).addCallbacks(write, failed)
        return NOT_DONE_YET


class _Root(Resource):
    """``/metrics`` is the page; every other path is a 404."""

    def __init__(self, page: Resource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.putChild(b"metrics", page)

    def getChild(self, path: bytes, request: Any) -> Resource:  # noqa: N802
        return NoResource()  # type: ignore[no-untyped-call,no-any-return]

    def render_GET(self, request: Any) -> bytes:  # noqa: N802
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"NodePass metrics are at /metrics\n"


class _QuietSite(Site):
    def log(self, request: Any) -> None:  # noqa: D102 - no access log
        pass


def parse_metrics_address(text: str) -> HostPort:
    """``host:port`` / ``[v6]:port`` / ``:port`` (all interfaces); port 0 picks a free one."""
    return parse_host_port(text, "NP_METRICS_ADDR", allow_port_zero=True)


class MetricsServer(Service):
    """Serves *source* at ``http://<address>/metrics`` (plain HTTP, no authentication)."""

    name = "metrics"

    def __init__(self, address: HostPort, source: MetricsSource, *, reactor: Any, logger: NodePassLogger) -> None:
        self.address = address
        self.source = source
        self.reactor = reactor
        self.logger = logger
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        """Listen; a failure propagates (the process does not start without its metrics)."""
        site = _QuietSite(_Root(MetricsPage(self.source, self.reactor)))  # type: ignore[no-untyped-call]
        self.port = listen_any(
            lambda interface: self.reactor.listenTCP(self.address.port, site, interface=interface),
            self.address.host,
        )
        super().startService()  # type: ignore[no-untyped-call]
        host: Any = self.port.getHost()
        self.logger.info("Metrics listening: http://%s/metrics", join_host_port(host.host, host.port))

    def stopService(self) -> Any:
        """Stop listening."""
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


class _StatusWatch:
    """A standalone tunnel's status from its log, by the master's rule.

    ``error`` after a ``Server error:`` / ``Client error:`` line, ``running``
    again at the next ``CHECK_POINT``.
    """

    def __init__(self) -> None:
        self.failed = False

    def __call__(self, record: LogRecord) -> None:
        if record.level == Level.EVENT and "CHECK_POINT" in record.text:
            self.failed = False
        elif record.level == Level.ERROR and ("Server error:" in record.text or "Client error:" in record.text):
            self.failed = True


class _WithMetrics(MultiService):
    """A tunnel service plus the listener for its metrics (started before it, stopped after it)."""

    def __init__(self, tunnel: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.tunnel = tunnel

    @property
    def stats(self) -> Any:
        """The tunnel's live statistics."""
        return self.tunnel.stats


def with_metrics(tunnel: Any, address: str, *, reactor: Any, logger: NodePassLogger) -> MultiService:
    """Wrap a tunnel service so that its metrics are served at *address* (``host:port``).

    Raises :class:`~nodepass.url.URLError` for an unusable *address*.
    """
    where = parse_metrics_address(address)
    watch = _StatusWatch()
    logger.add_observer(watch)

    def samples() -> Iterator[TunnelSample]:
        status = ("error" if watch.failed else "running") if tunnel.running else "stopped"
        yield TunnelSample("", "", tunnel.config.scheme, status, tunnel.stats)

    service = _WithMetrics(tunnel)
    server = MetricsServer(where, MetricsSource(TunnelCollector(samples)), reactor=reactor, logger=logger)
    server.setServiceParent(service)  # type: ignore[no-untyped-call]  # listens first: a busy address stops the start
    tunnel.setServiceParent(service)
    return service
