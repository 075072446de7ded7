#!/usr/bin/env python3
"""Tunnel benchmark on 127.0.0.1: our ends against the Go NodePass binary and the direct path.

Each round measures the direct path once, then every scenario with each
implementation in turn (ours, Go, and an older tree of ours with
``--baseline``), so that load changes on the machine hit all of them alike;
the tables show medians over the rounds and ratios between columns of the
same run. Scenarios:

* dual-end: ``server://127.0.0.1:T/127.0.0.1:U?mode=1&tls=X[&type=Y]``
  (reverse mode: users connect to U) with
  ``client://127.0.0.1:T/127.0.0.1:<target>?mode=2``, for every ``--type`` x
  ``--tls`` (types 1 and 3 always use TLS);
* single-end: ``client://127.0.0.1:U/127.0.0.1:<target>?mode=1``.

All other parameters are the defaults (client ``min`` 64), except the log
level (``--log``, default ``warn``) and ``min`` for the idle-pool metric.
Every end is its own process, as deployed; the targets run in one more
process, iperf3 in its own, and the load generators in this one.

Metrics (each tunnel set-up is started afresh for each group):

* throughput, 1 and 8 streams: ``iperf3 -J`` through the tunnel (data and
  control connections); without iperf3, a built-in bulk upload to a sink;
* CPU seconds per GB: user + system CPU of the tunnel processes during the
  throughput run, per 10^9 bytes received;
* 64 B TCP echo round trips p50/p99 (and the tunnel CPU per round trip),
  64 B UDP echo round trips p50/p99;
* new connections per second: workers loop connect, 1-byte echo, close;
  failures counted; tunnel CPU per connection;
* a burst of N concurrent connections (``--concurrency``), each echoing
  64 B: time until the last echo, failures, and the RSS of each end while
  all are held;
* idle RSS of each end with a client pool of ``--idle-min`` (1024), and how
  long the pool took to fill;
* first byte: seconds from starting the server (the client starts as soon
  as the server listens) until a byte comes back through the tunnel.

Usage::

    python bench/tunnel_bench.py                       # type 0, tls 0 and 1, vs Go when present
    python bench/tunnel_bench.py --type 0,1,2,3 --tls 0,1 --peer /path/to/nodepass-go
    python bench/tunnel_bench.py --quick --peer none   # every metric briefly, our ends only
    python bench/tunnel_bench.py --baseline /tmp/nodepass-old --peer none --metrics tput,rtt

The Markdown report goes to standard output (and ``--markdown FILE``); all
samples go to a JSON file (``--json FILE``, by default in the log directory),
from which ``--render FILE`` prints the same report again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from npbench import load, procs, report  # noqa: E402
from npbench.report import DIRECT, Column, Results  # noqa: E402
from npbench.scenario import Scenario, parse_list, scenarios  # noqa: E402

DEFAULT_PEER = REPO.parent / "shared" / "peers" / "nodepass-go-v1.14.0"
GROUPS = {
    "tput": ("tput1", "tput8", "cpu_gb1", "cpu_gb8"),
    "rtt": ("rtt_p50", "rtt_p99", "cpu_rtt"),
    "udp": ("udp_p50", "udp_p99"),
    "cps": ("cps", "cps_fail", "cpu_conn"),
    "burst": ("burst_s", "burst_fail", "rss_loaded_server", "rss_loaded_client"),
    "idle": ("rss_idle_server", "rss_idle_client", "pool_fill"),
    "ttfb": ("ttfb",),
}
FULL = {"duration": 4.0, "rounds": 2000, "repeat": 3, "workers": 4, "concurrency": 2000, "idle_min": 1024,
        "settle": 2.0}
QUICK = {"duration": 1.0, "rounds": 200, "repeat": 1, "workers": 4, "concurrency": 200, "idle_min": 128,
         "settle": 0.3}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", default=None,
                   help="Go NodePass binary to compare with (default ../shared/peers/nodepass-go-v1.14.0 "
                        "relative to the repository when present; 'none' to skip)")
    p.add_argument("--type", default="0", help="pool types of the dual-end scenarios, e.g. 0,1,2,3 (default 0)")
    p.add_argument("--tls", default="0,1", help="tls modes of the dual-end scenarios (default 0,1)")
    p.add_argument("--paths", default="direct,dual,single", help="comma list of direct, dual, single")
    p.add_argument("--metrics", default="all", help="comma list of " + ", ".join(GROUPS) + " (default all)")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: every metric briefly (1 s runs, 200 round trips, 200 concurrent, "
                        "pool of 128, 1 round); explicit options still win")
    p.add_argument("--duration", type=float, help=f"seconds per throughput / connection-rate run ({FULL['duration']:g})")
    p.add_argument("--rounds", type=int, help=f"TCP echo round trips per latency run ({FULL['rounds']})")
    p.add_argument("--repeat", type=int, help=f"rounds; tables show medians ({FULL['repeat']})")
    p.add_argument("--workers", type=int, help=f"threads of the connection-rate run ({FULL['workers']})")
    p.add_argument("--concurrency", type=int, help=f"connections of the burst ({FULL['concurrency']})")
    p.add_argument("--idle-min", type=int, help=f"client pool min for the idle RSS ({FULL['idle_min']})")
    p.add_argument("--settle", type=float, help=f"pause before the burst and the idle RSS, s ({FULL['settle']:g})")
    p.add_argument("--log", default="warn", help="log level of every tunnel end (default warn)")
    p.add_argument("--server-query", default="",
                   help="extra URL parameters for every server end, e.g. 'max=4096' (as given, after the others)")
    p.add_argument("--client-query", default="",
                   help="extra URL parameters for every client end (single-end too), e.g. 'min=1024'")
    p.add_argument("--ready-timeout", type=float, default=90.0,
                   help="seconds to wait for a set-up to carry its first byte (default 90)")
    p.add_argument("--pool-timeout", type=float, default=60.0, help="seconds to wait for the idle pool to fill")
    p.add_argument("--tree", type=Path, default=REPO, help="source tree whose nodepass is 'ours' (default this one)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="an older source tree of ours, measured in the same rounds as a third column")
    p.add_argument("--tput-tool", choices=("auto", "iperf3", "builtin"), default="auto",
                   help="throughput with iperf3 (auto: when installed) or the built-in sink")
    p.add_argument("--json", type=Path, default=None, help="raw samples (default LOG_DIR/results.json)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the Markdown report to this file")
    p.add_argument("--log-dir", type=Path, default=None, help="where the ends' logs go (default a new temp dir)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="measure nothing: print the report of an earlier run from its --json file")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.types = parse_list(args.type, (0, 1, 2, 3), "type")
        args.tls_modes = parse_list(args.tls, (0, 1), "tls")
    except ValueError as exc:
        p.error(str(exc))
    args.path_list = [x.strip() for x in args.paths.split(",") if x.strip()]
    bad = [x for x in args.path_list if x not in ("direct", "dual", "single")]
    if bad:
        p.error(f"--paths: unknown {', '.join(bad)} (use direct, dual, single)")
    groups = list(GROUPS) if args.metrics == "all" else [x.strip() for x in args.metrics.split(",") if x.strip()]
    bad = [x for x in groups if x not in GROUPS]
    if bad:
        p.error(f"--metrics: unknown {', '.join(bad)} (use {', '.join(GROUPS)} or all)")
    args.groups = groups
    if args.repeat < 1 or args.concurrency < 1 or args.workers < 1 or args.idle_min < 1:
        p.error("--repeat, --concurrency, --workers and --idle-min must be at least 1")
    return args


def progress(text: str) -> None:
    print(time.strftime("%H:%M:%S ") + text, file=sys.stderr, flush=True)


class Bench:
    """One run: starts the targets, walks the rounds, keeps the results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results = Results()
        self.scenarios: list[Scenario] = scenarios(args.path_list, args.types, args.tls_modes)
        self.iperf3 = procs.find_iperf3(args.tput_tool)
        self.log_dir: Path = args.log_dir or Path(tempfile.mkdtemp(prefix="nodepass-bench-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.header_notes: list[str] = []
        self.impls: list[procs.Impl] = [procs.ours("ours", "ours", args.tree.resolve())]
        peer = self._peer()
        if peer is not None:
            self.impls.append(procs.go_peer(peer, self.log_dir))
        if args.baseline is not None:
            self.impls.append(procs.ours("baseline", "baseline", args.baseline.resolve()))
        self.columns = ([Column(DIRECT, "direct")] if "direct" in args.path_list else []) + [
            Column(i.name, "Go" if i.name == "go" else i.label) for i in self.impls
        ]
        self.cpu_watch = procs.CpuWatch()
        self.target: subprocess.Popen[bytes] | None = None
        self.target_port = 0
        self.loads: list[dict[str, Any]] = []

    def _peer(self) -> Path | None:
        wanted = self.args.peer
        if wanted is not None and wanted.lower() == "none":
            self.header_notes.append("Go columns skipped: --peer none.")
            return None
        path = Path(wanted) if wanted else DEFAULT_PEER
        if path.is_file() and os.access(path, os.X_OK):
            return path.resolve()
        self.header_notes.append(f"Go columns skipped: no executable peer binary at {path} (pass --peer PATH).")
        if wanted:
            raise SystemExit(f"--peer {wanted}: not an executable file")
        return None

    def want(self, group: str) -> bool:
        return group in self.args.groups

    # -- processes -------------------------------------------------------------------------------

    def start_target(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(BENCH) + os.pathsep + env.get("PYTHONPATH", "")
        self.target = subprocess.Popen([sys.executable, "-m", "npbench.target", "0"], stdout=subprocess.PIPE,
                                       env=env, cwd=str(BENCH))
        assert self.target.stdout is not None
        line = self.target.stdout.readline()
        if not line.strip():
            raise SystemExit("the target process did not start")
        self.target_port = int(line)

    def stop_target(self) -> None:
        procs.stop_process(self.target)

    def start(self, impl: procs.Impl, scenario: Scenario, target: int, tag: str,
              client_extra: str = "") -> procs.Tunnel:
        """Start the ends of *scenario* forwarding to *target*: the server first, the client once it listens."""
        user_port, tunnel_port = procs.free_ports(2)
        log = self.args.log
        server_extra = "&" + self.args.server_query.lstrip("&?") if self.args.server_query else ""
        client_extra += "&" + self.args.client_query.lstrip("&?") if self.args.client_query else ""
        started = time.perf_counter()
        if scenario.kind == "single":
            url = f"client://127.0.0.1:{user_port}/127.0.0.1:{target}?mode=1&log={log}{client_extra}"
            end = procs.launch(impl, "client", url, self.log_dir / f"{tag}-single.log")
            return procs.Tunnel(user_port, started, [end])
        query = f"mode=1&tls={scenario.tls}&log={log}" + (f"&type={scenario.type}" if scenario.type else "") + server_extra
        server = procs.launch(impl, "server", f"server://127.0.0.1:{tunnel_port}/127.0.0.1:{user_port}?{query}",
                              self.log_dir / f"{tag}-server.log")
        tunnel = procs.Tunnel(user_port, started, [server], tunnel_port)
        try:
            procs.wait_listening(server, tunnel_port, self.args.ready_timeout)
            tunnel.client_started = time.perf_counter()
            url = f"client://127.0.0.1:{tunnel_port}/127.0.0.1:{target}?mode=2&log={log}{client_extra}"
            tunnel.ends.append(procs.launch(impl, "client", url, self.log_dir / f"{tag}-client.log"))
        except BaseException:
            tunnel.stop()
            raise
        return tunnel

    def ready(self, tunnel: procs.Tunnel) -> float:
        """Seconds from the start of *tunnel* until a byte came back through it."""
        try:
            when = load.wait_first_echo(tunnel.user_port, self.args.ready_timeout, tunnel.alive)
        except load.MetricError as exc:
            errors = [f"{e.role}: {e.last_error()}" for e in tunnel.ends if e.last_error()]
            raise procs.StartFailed(str(exc) + (f" (last errors: {'; '.join(errors)})" if errors else "")) from exc
        return when - tunnel.started

    # -- metric groups -----------------------------------------------------------------------------

    def echo_metrics(self, where: str, name: str, port: int, tunnel: procs.Tunnel | None) -> None:
        a, res = self.args, self.results

        def cpu() -> float:
            return tunnel.cpu() if tunnel is not None else 0.0

        if self.want("rtt"):
            c0 = cpu()
            try:
                lat = load.tcp_rtt(port, a.rounds)
            except load.MetricError as exc:
                res.note(where, f"{name}: TCP round trips failed: {exc}")
                for key in GROUPS["rtt"]:
                    res.add(where, name, key, None)
            else:
                res.add(where, name, "rtt_p50", load.percentile(lat, 50) * 1e6)
                res.add(where, name, "rtt_p99", load.percentile(lat, 99) * 1e6)
                if tunnel is not None:
                    res.add(where, name, "cpu_rtt", (cpu() - c0) / (len(lat) + 50) * 1e6)
        if self.want("udp"):
            try:
                ulat, lost = load.udp_rtt(port, max(200, a.rounds // 2))
            except load.MetricError as exc:
                res.note(where, f"{name}: {exc}")
                res.add(where, name, "udp_p50", None)
                res.add(where, name, "udp_p99", None)
            else:
                res.add(where, name, "udp_p50", load.percentile(ulat, 50) * 1e6)
                res.add(where, name, "udp_p99", load.percentile(ulat, 99) * 1e6)
                if lost:
                    res.note(where, f"{name}: {lost} UDP datagrams got no answer within 0.5 s (retried)")
        if self.want("cps"):
            c0 = cpu()
            rate = load.connection_rate(port, a.duration, a.workers)
            res.add(where, name, "cps", rate.per_second)
            res.add(where, name, "cps_fail", float(rate.failed))
            if tunnel is not None:
                res.add(where, name, "cpu_conn", (cpu() - c0) / rate.done * 1e3 if rate.done else None)
        if self.want("burst"):
            time.sleep(a.settle)
            with load.burst(port, a.concurrency, timeout=max(60.0, a.concurrency / 50)) as b:
                res.add(where, name, "burst_s", b.elapsed if b.echoed else None)
                res.add(where, name, "burst_fail", float(b.failed))
                if b.errors:
                    why = ", ".join(f"{n}× {e}" for e, n in sorted(b.errors.items(), key=lambda x: -x[1]))
                    res.note(where, f"{name}: burst of {a.concurrency}: {b.failed} failed ({why})")
                if tunnel is not None:
                    peak: dict[str, float] = {}
                    for _ in range(3):
                        for role, mib in tunnel.rss().items():
                            peak[role] = max(peak.get(role, 0.0), mib)
                        time.sleep(0.1)
                    for role, mib in peak.items():
                        res.add(where, name, f"rss_loaded_{role}", mib)

    def tput_metrics(self, where: str, name: str, port: int, tunnel: procs.Tunnel | None) -> None:
        for streams, key, cpu_key in ((1, "tput1", "cpu_gb1"), (8, "tput8", "cpu_gb8")):
            c0 = tunnel.cpu() if tunnel is not None else 0.0
            try:
                if self.iperf3:
                    got = load.iperf3_throughput(self.iperf3, port, self.args.duration, streams)
                else:
                    got = load.builtin_throughput(port, self.args.duration, streams)
            except load.MetricError as exc:
                self.results.note(where, f"{name}: {streams}-stream throughput failed: {exc}")
                self.results.add(where, name, key, None)
                if tunnel is not None:
                    self.results.add(where, name, cpu_key, None)
                continue
            self.results.add(where, name, key, got.gbps)
            if tunnel is not None:
                self.results.add(where, name, cpu_key, (tunnel.cpu() - c0) / (got.total / 1e9) if got.total else None)

    def group_echo(self, scenario: Scenario, impl: procs.Impl, tag: str) -> None:
        tunnel = self.start(impl, scenario, self.target_port, tag)
        try:
            ttfb = self.ready(tunnel)
            if self.want("ttfb"):
                self.results.add(scenario.key, impl.name, "ttfb", ttfb)
            self.echo_metrics(scenario.key, impl.name, tunnel.user_port, tunnel)
        finally:
            tunnel.stop()

    def group_tput(self, scenario: Scenario, impl: procs.Impl, tag: str) -> None:
        if not self.iperf3:
            tunnel = self.start(impl, scenario, self.target_port, tag)
            try:
                self._tput_ready(scenario, impl, tunnel)
                self.tput_metrics(scenario.key, impl.name, tunnel.user_port, tunnel)
            finally:
                tunnel.stop()
            return
        # iperf3 cannot answer the readiness probe: an echo stands in on its port until the tunnel carries bytes.
        port = procs.free_ports(1)[0]
        probe = load.ProbeEcho(port)
        try:
            tunnel = self.start(impl, scenario, port, tag)
        except BaseException:
            probe.close()
            raise
        try:
            try:
                self._tput_ready(scenario, impl, tunnel)
            finally:
                probe.close()
            with procs.IperfServer(self.iperf3, port, self.log_dir / f"{tag}-iperf3.log"):
                self.tput_metrics(scenario.key, impl.name, tunnel.user_port, tunnel)
        finally:
            tunnel.stop()

    def _tput_ready(self, scenario: Scenario, impl: procs.Impl, tunnel: procs.Tunnel) -> None:
        ttfb = self.ready(tunnel)
        if self.want("ttfb"):
            self.results.add(scenario.key, impl.name, "ttfb", ttfb)

    def group_idle(self, scenario: Scenario, impl: procs.Impl, tag: str) -> None:
        a = self.args
        dual = scenario.kind == "dual"
        tunnel = self.start(impl, scenario, self.target_port, tag, f"&min={a.idle_min}" if dual else "")
        try:
            fill: float | None = None
            if dual:
                fill = self.wait_pool(scenario, impl, tunnel)
            else:
                self.ready(tunnel)
            time.sleep(a.settle)
            for role, mib in self.stable_rss(tunnel).items():
                self.results.add(scenario.key, impl.name, f"rss_idle_{role}", mib)
            if dual:
                self.results.add(scenario.key, impl.name, "pool_fill", fill)
        finally:
            tunnel.stop()

    def wait_pool(self, scenario: Scenario, impl: procs.Impl, tunnel: procs.Tunnel) -> float | None:
        """Seconds until the client's pool is full (None: known only from its log).

        Full means 99 % of ``--idle-min``: a pool at its size still replaces a
        connection now and then, and both implementations then report one or
        two less for a moment. Types 0 and 2 carry one TCP connection per pool
        member, counted from the client's sockets (one more is the control
        connection); types 1 and 3 multiplex, so there the client's
        ``CHECK_POINT|...|POOL=n`` log lines (one per report interval) tell."""
        want = max(1, math.ceil(self.args.idle_min * 0.99))
        client = tunnel.end("client")
        assert client is not None
        deadline = time.perf_counter() + self.args.pool_timeout
        seen = 0
        while time.perf_counter() < deadline:
            reason = tunnel.alive()
            if reason:
                raise procs.StartFailed(reason)
            if scenario.type in (0, 2):
                seen = max(seen, client.connections_to(tunnel.tunnel_port) - 1)
                if seen >= want:
                    return time.perf_counter() - tunnel.client_started
            else:
                seen = max(seen, client.pool())
                if seen >= want:
                    return None
            time.sleep(0.1)
        self.results.note(scenario.key, f"{impl.label}: the idle pool reached {seen} of {self.args.idle_min} "
                                        f"within {self.args.pool_timeout:g} s; RSS taken anyway")
        return None

    @staticmethod
    def stable_rss(tunnel: procs.Tunnel) -> dict[str, float]:
        """RSS of each end once two samples 0.5 s apart agree within 2 % (at most 10 s)."""
        last = tunnel.rss()
        deadline = time.perf_counter() + 10
        while time.perf_counter() < deadline:
            time.sleep(0.5)
            now = tunnel.rss()
            if all(abs(now[r] - last[r]) <= 0.02 * max(last[r], 1e-9) for r in now):
                return now
            last = now
        return last

    # -- the run ---------------------------------------------------------------------------------

    def measure_direct(self) -> None:
        if self.want("tput"):
            if self.iperf3:
                port = procs.free_ports(1)[0]
                with procs.IperfServer(self.iperf3, port, self.log_dir / "direct-iperf3.log"):
                    self.tput_metrics(DIRECT, DIRECT, port, None)
            else:
                self.tput_metrics(DIRECT, DIRECT, self.target_port, None)
        self.echo_metrics(DIRECT, DIRECT, self.target_port, None)

    def measure(self, scenario: Scenario, impl: procs.Impl, rnd: int) -> None:
        """The metric groups of one implementation in one scenario and round.

        A group whose start failed because a port was taken meanwhile is tried
        again on other ports (twice at most); any other start failure ends
        this implementation's rounds in this scenario (StartFailed goes up).
        An error during a group is noted and the next group runs."""
        tag = f"r{rnd + 1}-{scenario.key}-{impl.name}"
        echo = [g for g in ("rtt", "udp", "cps", "burst", "ttfb") if self.want(g)]
        groups = ([(", ".join(echo), self.group_echo, "echo")] if echo else []) + [
            (title, fn, name) for title, fn, name in (("throughput", self.group_tput, "tput"),
                                                      ("idle RSS", self.group_idle, "idle")) if self.want(name)
        ]
        for title, fn, name in groups:
            progress(f"  {scenario.key} {impl.name}: {title}")
            for attempt in range(3):
                try:
                    fn(scenario, impl, f"{tag}-{name}" + (f"-retry{attempt}" if attempt else ""))
                    break
                except procs.StartFailed as exc:
                    if attempt == 2 or not procs.port_clash(str(exc)):
                        raise
                    progress(f"  {scenario.key} {impl.name}: port taken, trying other ports ({exc})")
                except (OSError, RuntimeError, psutil.Error, load.MetricError) as exc:
                    self.results.note(scenario.key, f"{impl.label}, round {rnd + 1}, {title}: "
                                                    f"{type(exc).__name__}: {exc}")
                    progress(f"  {scenario.key} {impl.name}: {title} failed: {exc}")
                    break

    def run(self) -> bool:
        """All rounds; False when interrupted (the results so far are still reported)."""
        self.start_target()
        try:
            for rnd in range(self.args.repeat):
                self.cpu_watch.sample_load()
                self.loads.append({"round": rnd + 1, "load1": os.getloadavg()[0]})
                progress(f"round {rnd + 1}/{self.args.repeat}")
                if "direct" in self.args.path_list:
                    progress("  direct")
                    try:
                        self.measure_direct()
                    except (OSError, RuntimeError, load.MetricError) as exc:
                        self.results.note(DIRECT, f"direct, round {rnd + 1}: {type(exc).__name__}: {exc}")
                for scenario in self.scenarios:
                    for impl in self.impls:
                        if self.results.is_failed(scenario.key, impl.name):
                            continue
                        try:
                            self.measure(scenario, impl, rnd)
                        except procs.StartFailed as exc:
                            progress(f"  {scenario.key} {impl.name}: did not start: {exc}")
                            self.results.fail(scenario.key, impl.name, str(exc))
        except KeyboardInterrupt:
            self.header_notes.append("The run was interrupted: the tables hold the rounds measured until then.")
            return False
        finally:
            self.stop_target()
        return True

    # -- report ----------------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        a = self.args
        return {"duration": a.duration, "rounds": a.rounds, "repeat": a.repeat, "workers": a.workers,
                "concurrency": a.concurrency, "idle_min": a.idle_min, "settle": a.settle, "log": a.log,
                "quick": a.quick, "types": a.types, "tls": a.tls_modes, "paths": a.path_list,
                "metrics": a.groups, "tput_tool": "iperf3" if self.iperf3 else "built-in sink",
                "server_query": a.server_query, "client_query": a.client_query}

    def meta(self, started: datetime.datetime, machine: dict[str, Any], load: dict[str, float]) -> dict[str, Any]:
        return {
            "command": shlex.join(sys.orig_argv),
            "cwd": os.getcwd(),
            "started_utc": started.isoformat(timespec="seconds"),
            "machine": machine,
            "impls": {i.name: {"label": i.label, "version": i.version, "argv": i.argv, "cwd": str(i.cwd)}
                      for i in self.impls},
            "completed": not any("interrupted" in n for n in self.header_notes),
            "params": self.params(),
            "load": load,
            "rounds_load": self.loads,
            "header_notes": self.header_notes,
            "log_dir": str(self.log_dir),
        }


def _interrupt(_signum: int, _frame: object) -> None:
    """SIGTERM ends the run like Ctrl-C: every started process is stopped and the rounds so far reported."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.render is not None:
        output(report.render(json.loads(args.render.read_text(encoding="utf-8"))), args.markdown)
        return 0
    procs.raise_fd_limit()
    signal.signal(signal.SIGTERM, _interrupt)
    started = datetime.datetime.now(datetime.UTC)
    bench = Bench(args)
    machine = procs.machine_info(bench.iperf3)
    progress(f"logs in {bench.log_dir}")
    completed = bench.run()
    meta = bench.meta(started, machine, bench.cpu_watch.foreign())
    data = report.to_json(bench.results, bench.scenarios, bench.columns, meta)
    json_path = args.json or bench.log_dir / "results.json"
    report.write_json(json_path, data)
    output(report.render(data), args.markdown)
    progress(f"samples: {json_path}")
    return 0 if completed else 130


def output(text: str, path: Path | None) -> None:
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
