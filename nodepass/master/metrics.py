"""The master's Prometheus metrics (served at ``<base>/metrics``, see :mod:`nodepass.master.app`).

Every instance except the API-key instance ``********`` is one tunnel of
:class:`~nodepass.metrics.TunnelCollector` (labels ``id``, ``alias``,
``type``), read from the live records at scrape time, with the same numbers
``GET /instances`` shows.  The master adds:

* ``nodepass_master_uptime_seconds``: seconds since the API started (``/info.uptime``);
* ``nodepass_master_info{mid, alias}``: the master id and alias.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.metrics_core import GaugeMetricFamily, InfoMetricFamily, Metric

from nodepass.master.instances import InstanceManager
from nodepass.metrics import MetricsSource, TunnelCollector, TunnelSample
from nodepass.stats import TunnelStats

__all__ = ["MASTER_METRICS", "master_metrics"]

#: Master-level metrics: exposed name → (type, help).
MASTER_METRICS: dict[str, tuple[str, str]] = {
    "nodepass_master_uptime_seconds": ("gauge", "Seconds since the master API started."),
    "nodepass_master_info": ("info", "Master id and alias."),
}


def instance_samples(manager: InstanceManager) -> Iterator[TunnelSample]:
    """One sample per instance (the API-key instance left out), numbers as the API shows them."""
    for record in list(manager.records.values()):
        if record.is_pseudo:
            continue
        record.refresh()
        data = record.to_json()
        stats = TunnelStats(
            mode=data["mode"],
            ping=data["ping"],
            pool=data["pool"],
            tcps=data["tcps"],
            udps=data["udps"],
            tcprx=data["tcprx"],
            tcptx=data["tcptx"],
            udprx=data["udprx"],
            udptx=data["udptx"],
            restarts=record.restart_count(),
        )
        yield TunnelSample(record.id, record.alias, record.type, record.status, stats)


def master_metrics(manager: InstanceManager, *, clock: Callable[[], float], started: float) -> MetricsSource:
    """The instances, the master metrics and the process collectors."""

    def extra() -> Iterator[Metric]:
        uptime = GaugeMetricFamily(
            "nodepass_master_uptime_seconds",
            MASTER_METRICS["nodepass_master_uptime_seconds"][1],
            value=max(clock() - started, 0.0),
        )
        yield uptime
        yield InfoMetricFamily(
            "nodepass_master",
            MASTER_METRICS["nodepass_master_info"][1],
            value={"mid": manager.master_id, "alias": manager.pseudo.alias},
        )

    return MetricsSource(TunnelCollector(lambda: instance_samples(manager), extra))
