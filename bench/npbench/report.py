"""Samples, medians, ratios, and the two outputs: a Markdown report and a JSON file.

Every metric keeps all its samples (one per round, ``None`` where that
round's measurement failed). A table cell is the median of a metric's
samples; a count of failures is their sum over all rounds. Ratios divide the
medians of two columns of the same run.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .scenario import Scenario

DIRECT = "direct"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    better: str  # "higher", "lower", or "" for a count of failures (no ratios)
    fmt: str
    direct: bool = True  # measured on the direct path too
    single_label: str = ""  # label in the single-end table ("" = same; "-" = not measured there)

    @property
    def total(self) -> bool:
        return self.better == ""

    def title(self, scenario: Scenario, params: dict[str, Any]) -> str:
        label = self.single_label if scenario.kind == "single" and self.single_label else self.label
        return label.format(**params)


METRICS: list[Metric] = [
    Metric("tput1", "throughput, 1 stream, Gbit/s", "higher", ".2f"),
    Metric("tput8", "throughput, 8 streams, Gbit/s", "higher", ".2f"),
    Metric("cpu_gb1", "CPU s per GB, 1 stream (tunnel ends together)", "lower", ".2f", False,
           "CPU s per GB, 1 stream"),
    Metric("cpu_gb8", "CPU s per GB, 8 streams (tunnel ends together)", "lower", ".2f", False,
           "CPU s per GB, 8 streams"),
    Metric("rtt_p50", "64 B TCP echo RTT p50, µs", "lower", ",.0f"),
    Metric("rtt_p99", "64 B TCP echo RTT p99, µs", "lower", ",.0f"),
    Metric("cpu_rtt", "CPU µs per TCP round trip", "lower", ",.0f", False),
    Metric("udp_p50", "64 B UDP echo RTT p50, µs", "lower", ",.0f"),
    Metric("udp_p99", "64 B UDP echo RTT p99, µs", "lower", ",.0f"),
    Metric("cps", "new connections/s (connect, 1 B echo, close; {workers} workers)", "higher", ",.0f"),
    Metric("cps_fail", "failed new connections (sum of all rounds)", "", ",.0f"),
    Metric("cpu_conn", "CPU ms per new connection", "lower", ".2f", False),
    Metric("burst_s", "{concurrency:,} concurrent connections opened + echoed, s", "lower", ".2f"),
    Metric("burst_fail", "failed of the {concurrency:,} concurrent (sum of all rounds)", "", ",.0f"),
    Metric("rss_loaded_server", "RSS with {concurrency:,} connections held: server, MiB", "lower", ".1f", False, "-"),
    Metric("rss_loaded_client", "RSS with {concurrency:,} connections held: client, MiB", "lower", ".1f", False,
           "RSS with {concurrency:,} connections held, MiB"),
    Metric("rss_idle_server", "idle RSS, pool of {idle_min:,}: server, MiB", "lower", ".1f", False, "-"),
    Metric("rss_idle_client", "idle RSS, pool of {idle_min:,}: client, MiB", "lower", ".1f", False, "idle RSS, MiB"),
    Metric("pool_fill", "pool of {idle_min:,} filled (99 %), s after the client started", "lower", ".2f", False, "-"),
    Metric("ttfb", "first byte through the tunnel, s after start", "lower", ".2f", False),
]
BY_KEY = {m.key: m for m in METRICS}
SUMMARY = ("tput1", "tput8", "cpu_gb1", "cpu_gb8", "rtt_p50", "rtt_p99", "cps", "cps_fail", "burst_s", "burst_fail",
           "rss_loaded_server", "rss_loaded_client", "rss_idle_server", "rss_idle_client", "ttfb")
"""The metrics of the summary table."""


class Results:
    """All samples of a run, by scenario key, implementation name and metric key."""

    def __init__(self) -> None:
        self.samples: dict[str, dict[str, dict[str, list[float | None]]]] = {}
        self.failed: dict[str, dict[str, str]] = {}
        self.notes: dict[str, list[str]] = {}

    def add(self, where: str, impl: str, metric: str, value: float | None) -> None:
        if metric not in BY_KEY:
            raise KeyError(f"unknown metric {metric!r}")
        self.samples.setdefault(where, {}).setdefault(impl, {}).setdefault(metric, []).append(value)

    def fail(self, where: str, impl: str, reason: str) -> None:
        """*impl* did not start in scenario *where*: no more rounds of it there."""
        self.failed.setdefault(where, {})[impl] = reason

    def is_failed(self, where: str, impl: str) -> bool:
        return impl in self.failed.get(where, {})

    def note(self, where: str, text: str) -> None:
        notes = self.notes.setdefault(where, [])
        if text not in notes:
            notes.append(text)

    def values(self, where: str, impl: str, metric: str) -> list[float | None]:
        return self.samples.get(where, {}).get(impl, {}).get(metric, [])

    def summary(self, where: str, impl: str, metric: str) -> float | None:
        """Median of the successful samples (the sum for failure counts); None when there are none."""
        got = [v for v in self.values(where, impl, metric) if v is not None]
        if not got:
            return None
        return float(sum(got)) if BY_KEY[metric].total else float(statistics.median(got))


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a <= 0 or b <= 0:
        return None
    return a / b


@dataclass
class Column:
    name: str  # implementation name in Results ("direct", "ours", "go", "baseline")
    label: str


def ratio_pairs(columns: list[Column]) -> list[tuple[str, str]]:
    """Which ratios the tables show: ours against each other column, then Go against direct."""
    names = [c.name for c in columns]
    pairs = [("ours", other) for other in ("go", "baseline", DIRECT) if other in names and "ours" in names]
    if "go" in names and DIRECT in names:
        pairs.append(("go", DIRECT))
    return pairs


def _failed_mark(results: Results, where: str, name: str) -> str:
    if not results.is_failed(where, name):
        return ""
    return " (failed to start later)" if results.samples.get(where, {}).get(name) else " (did not start)"


def scenario_table(results: Results, scenario: Scenario, columns: list[Column], params: dict[str, Any],
                   metrics: list[Metric] | None = None) -> str:
    """One Markdown table: a row per metric measured in *scenario*, a column per implementation, then ratios."""
    labels = {c.name: c.label for c in columns}
    pairs = ratio_pairs(columns)
    where = scenario.key
    head = ["metric", "better"] + [labels[c.name] + _failed_mark(results, where, c.name) for c in columns] + [
        f"{labels[a]} / {labels[b]}" for a, b in pairs
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for metric in metrics or METRICS:
        if scenario.kind == "single" and metric.single_label == "-":
            continue
        summaries = {c.name: results.summary(DIRECT if c.name == DIRECT else where, c.name, metric.key)
                     for c in columns}
        measured = any(results.values(DIRECT if c.name == DIRECT else where, c.name, metric.key) for c in columns)
        if not measured:
            continue
        cells = [metric.title(scenario, params), {"higher": "↑", "lower": "↓"}.get(metric.better, "")]
        for c in columns:
            value = summaries[c.name]
            if c.name == DIRECT and not metric.direct:
                cells.append("n/a")
            elif value is None:
                cells.append("–")
            else:
                cells.append(format(value, metric.fmt))
        for a, b in pairs:
            r = None if metric.total or (DIRECT in (a, b) and not metric.direct) else ratio(summaries[a], summaries[b])
            cells.append("–" if r is None else f"{r:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def scenario_notes(results: Results, scenario: Scenario, columns: list[Column]) -> list[str]:
    labels = {c.name: c.label for c in columns}
    notes = [scenario.note] if scenario.note else []
    for name, reason in results.failed.get(scenario.key, {}).items():
        notes.append(f"{labels.get(name, name)} failed to start, no further rounds: {reason}")
    notes.extend(results.notes.get(scenario.key, []))
    return notes


def summary_table(results: Results, scenarios: list[Scenario], params: dict[str, Any]) -> str:
    """Ours / Go at a glance: a row per key metric, a column per scenario where both were measured."""
    both = [s for s in scenarios
            if any(results.values(s.key, "ours", m) for m in BY_KEY) and any(results.values(s.key, "go", m)
                                                                              for m in BY_KEY)]
    if not both:
        return ""
    head = ["ours / Go"] + [s.short for s in both]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(both)) + "|"]
    for key in SUMMARY:
        metric = BY_KEY[key]
        cells = []
        for s in both:
            ours, go = results.summary(s.key, "ours", key), results.summary(s.key, "go", key)
            if metric.total:  # failure counts: both totals, a ratio of counts says little
                cells.append("–" if ours is None or go is None else f"{ours:,.0f} / {go:,.0f}")
                continue
            r = ratio(ours, go)
            cells.append("–" if r is None else f"{r:.2f}")
        if any(c != "–" for c in cells):
            label = metric.title(Scenario("dual"), params).replace(": server", ", server").replace(": client", ", client")
            mark = {"higher": " ↑", "lower": " ↓"}.get(metric.better, " (ours / Go totals)")
            lines.append(f"| {label}{mark} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(results: Results, scenarios: list[Scenario], columns: list[Column], params: dict[str, Any],
             header: list[str]) -> str:
    out = list(header)
    summary = summary_table(results, scenarios, params)
    if summary:
        out += ["", "### Summary: ours / Go (medians; below 1 is better for ↓ rows, above 1 for ↑ rows)", "",
                summary.rstrip("\n")]
    for scenario in scenarios:
        out.append(f"\n### {scenario.title}\n")
        out.append(scenario_table(results, scenario, columns, params))
        notes = scenario_notes(results, scenario, columns)
        notes.extend(results.notes.get(DIRECT, []))
        if notes:
            out.append("")
            out.extend(f"* {n}" for n in notes)
    return "\n".join(out) + "\n"


def to_json(results: Results, scenarios: list[Scenario], columns: list[Column], meta: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = dict(meta)
    data["columns"] = [{"name": c.name, "label": c.label} for c in columns]
    data["direct"] = results.samples.get(DIRECT, {}).get(DIRECT, {})
    data["direct_notes"] = results.notes.get(DIRECT, [])
    data["scenarios"] = []
    for s in scenarios:
        medians = {
            c.name: {m.key: results.summary(DIRECT if c.name == DIRECT else s.key, c.name, m.key) for m in METRICS}
            for c in columns
        }
        data["scenarios"].append({
            "key": s.key,
            "title": s.title,
            "kind": s.kind,
            "type": s.type,
            "tls": s.tls,
            "samples": results.samples.get(s.key, {}),
            "did_not_start": results.failed.get(s.key, {}),
            "note": s.note,
            "notes": scenario_notes(results, s, columns),
            "extra_notes": results.notes.get(s.key, []),
            "medians": medians,
        })
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def from_json(data: dict[str, Any]) -> tuple[Results, list[Scenario], list[Column]]:
    """The samples, scenarios and columns of a run saved by :func:`to_json`."""
    results = Results()
    results.samples[DIRECT] = {DIRECT: {k: list(v) for k, v in data.get("direct", {}).items()}}
    for note in data.get("direct_notes", []):
        results.note(DIRECT, note)
    scenarios = []
    for entry in data["scenarios"]:
        scenario = Scenario(entry["kind"], entry["type"], entry["tls"], entry.get("note", ""))
        scenarios.append(scenario)
        results.samples[scenario.key] = entry["samples"]
        for name, reason in entry.get("did_not_start", {}).items():
            results.fail(scenario.key, name, reason)
        if "extra_notes" in entry:
            extra = entry["extra_notes"]
        else:  # a file from before "extra_notes" existed: all its notes but the start failures
            extra = [n for n in entry.get("notes", []) if "did not start" not in n and "failed to start" not in n]
        for note in extra:
            results.note(scenario.key, note)
    columns = [Column(c["name"], c["label"]) for c in data["columns"]]
    return results, scenarios, columns


def header(meta: dict[str, Any]) -> list[str]:
    """The report's opening: the command, the machine, the software, the method and the load."""
    m, p, load = meta["machine"], meta["params"], meta["load"]
    when = meta["started_utc"].replace("T", " ").split("+")[0]
    order = ", ".join(c["label"] if c["name"] != "go" else meta["impls"]["go"]["label"] for c in meta["columns"])
    rows = [
        ("command", f"`{meta['command']}` (in `{meta['cwd']}`)"),
        ("machine", f"{m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']:.0f} GiB, {m['kernel']}"),
        ("software", f"Python {m['python']}, Twisted {m['twisted']}, psutil {m['psutil']}"
                     + (f", {m['iperf3']}" if m["iperf3"] else "")),
    ]
    for name, impl in meta["impls"].items():
        if name == "go":
            rows.append(("Go", f"`{impl['argv'][0]}`: {impl['label']}, built with {impl['version']}"))
        else:
            rows.append((impl["label"], f"`{impl['cwd']}`: {impl['version']}"))
    rows += [
        ("method", f"{p['repeat']} round(s), each: {order} in turn; medians; throughput with {p['tput_tool']}, "
                   f"{p['duration']:g} s runs; {p['rounds']} echo round trips; {p['workers']} connection workers; "
                   f"burst of {p['concurrency']:,}; idle pool min={p['idle_min']:,}; log={p['log']}"
                   + (f"; server URLs + `{p['server_query']}`" if p.get("server_query") else "")
                   + (f"; client URLs + `{p['client_query']}`" if p.get("client_query") else "")),
        ("load", f"1-min load average {load['load_start']:.2f} at start, {load['load_end']:.2f} at end, "
                 f"{load['load_max']:.2f} at most; other processes kept {load['other_cpus']:.2f} of "
                 f"{m['cpus']} CPUs busy on average over {load['wall_seconds']:.0f} s"),
    ]
    lines = [f"## Tunnel benchmark, {when} UTC", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if meta.get("header_notes"):
        lines.append("")
        lines += [f"* {n}" for n in meta["header_notes"]]
    lines += ["", "↑: higher is better, ↓: lower is better. Ratios divide the medians of two columns; "
                  "n/a: not applicable to the direct path; –: not measured or failed (see the notes)."]
    return lines


def render(data: dict[str, Any]) -> str:
    """The Markdown report of a run saved by :func:`to_json` (the same text the run printed)."""
    results, scenarios, columns = from_json(data)
    return markdown(results, scenarios, columns, data["params"], header(data))
