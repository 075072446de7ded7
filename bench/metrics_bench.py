#!/usr/bin/env python3
"""Cost of a Prometheus scrape of a master and of importing a Go state file, in one run.

* ``scrape``: a master's instance manager holding N instances (stopped, with
  counters; no sockets) is rendered in the Prometheus text format, as
  ``GET <base>/metrics`` does; reported per scrape and per instance, next to
  ``GET /instances`` (JSON of the same records) as the ratio.
* ``stall``: the longest the reactor goes without running a 1 ms heartbeat
  while ``GET <base>/metrics`` is answered, formatting in the reactor thread
  (``reactor=None``) vs in its thread pool (what the master does);
* ``gob``: the Go master's state file from ``tests/fixtures/gob/go-master.gob``
  decoded and converted to records, per file and per instance.

Usage::

    python bench/metrics_bench.py                   # N = 10, 100, 1000
    python bench/metrics_bench.py --instances 5000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from prometheus_client.exposition import generate_latest  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from nodepass.env import Settings  # noqa: E402
from nodepass.log import NodePassLogger  # noqa: E402
from nodepass.master.events import EventHub, dumps  # noqa: E402
from nodepass.master.gob import decode  # noqa: E402
from nodepass.master.instances import InstanceManager  # noqa: E402
from nodepass.master.metrics import master_metrics  # noqa: E402
from nodepass.master.migrate import go_records  # noqa: E402
from nodepass.url import parse_master_url  # noqa: E402


def best(fn: Any, repeat: int) -> float:
    """The fastest of *repeat* timings of ``fn()`` (seconds)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def manager(count: int) -> InstanceManager:
    clock = Clock()
    m = InstanceManager(
        parse_master_url("master://127.0.0.1:0"), reactor=clock, logger=NodePassLogger("none", stream=None),
        settings=Settings(), events=EventHub(clock=clock.seconds), tunnel_factory=lambda *a, **k: None,
    )
    records = [
        {"id": f"{i:08x}", "alias": f"instance {i}", "type": "server", "url": f"server://:{10000 + i}/127.0.0.1:80",
         "restart": False, "meta": {"peer": {"sid": "", "type": "", "alias": ""}, "tags": {"n": str(i)}},
         "mode": 1, "tcprx": i * 1000, "tcptx": i * 2000, "udprx": i, "udptx": i}
        for i in range(count)
    ]
    m.load(records)
    return m


class _Request:
    """Just enough of a Twisted request for :func:`nodepass.metrics.render`."""

    def getHeader(self, name: bytes) -> None:  # noqa: N802
        return None

    def setHeader(self, name: bytes, value: bytes) -> None:  # noqa: N802
        pass

    def setResponseCode(self, code: int) -> None:  # noqa: N802
        pass


def stalls(count: int, repeat: int) -> tuple[float, float]:
    """Longest heartbeat gap (s) during *repeat* scrapes: formatting inline vs in the thread pool."""
    from twisted.internet import reactor as global_reactor
    from twisted.internet.defer import inlineCallbacks
    from twisted.internet.task import LoopingCall, deferLater

    from nodepass.metrics import render

    reactor: Any = global_reactor
    m = manager(count)
    source = master_metrics(m, clock=time.time, started=time.time())
    result: dict[str, float] = {}
    last = [time.perf_counter()]
    worst = [0.0]

    def beat() -> None:
        now = time.perf_counter()
        worst[0] = max(worst[0], now - last[0])
        last[0] = now

    @inlineCallbacks
    def run() -> Any:
        heart = LoopingCall(beat)
        heart.start(0.001)
        for label, using in (("inline", None), ("pool", reactor)):
            yield render(_Request(), source, using)  # warm-up (thread pool start)
            yield deferLater(reactor, 0.05, lambda: None)
            worst[0] = 0.0
            for _ in range(repeat):
                yield render(_Request(), source, using)
                yield deferLater(reactor, 0.01, lambda: None)
            result[label] = worst[0]
        heart.stop()
        reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run()
    return result["inline"], result["pool"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, nargs="*", default=[10, 100, 1000])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, best of {args.repeat}")
    print()
    print("| instances | scrape (ms) | per instance (µs) | of which in the reactor thread (ms) "
          "| body (KiB) | GET /instances JSON (ms) | scrape / JSON |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for count in args.instances:
        m = manager(count)
        source = master_metrics(m, clock=time.time, started=time.time())
        body = generate_latest(source.snapshot())
        scrape = best(lambda source=source: generate_latest(source.snapshot()), args.repeat)
        frozen = best(source.snapshot, args.repeat)
        listing = best(lambda m=m: dumps(m.list()), args.repeat)
        print(f"| {count} | {scrape * 1e3:.2f} | {scrape / count * 1e6:.1f} | {frozen * 1e3:.2f} "
              f"| {len(body) / 1024:.0f} | {listing * 1e3:.2f} | {scrape / listing:.1f} |")
    big = max(args.instances)
    inline, pool = stalls(big, 5)
    print()
    print(f"longest reactor stall while answering a scrape of {big} instances: "
          f"{inline * 1e3:.1f} ms formatting in the reactor thread, {pool * 1e3:.1f} ms in its thread pool "
          f"(ratio {inline / pool:.1f})")
    with open(os.path.join(ROOT, "tests", "fixtures", "gob", "go-master.gob"), "rb") as handle:
        data = handle.read()
    records = go_records(decode(data))
    took = best(lambda: go_records(decode(data)), args.repeat * 10)
    print()
    print(f"gob import of go-master.gob ({len(data)} bytes, {len(records)} records): "
          f"{took * 1e6:.0f} µs ({took / len(records) * 1e6:.0f} µs per record); "
          f"json.loads of the same records as JSON: "
          f"{best(lambda: json.loads(json.dumps(records)), args.repeat * 10) * 1e6:.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
