"""The benchmark itself works (``bench/tunnel_bench.py``).

The smoke test runs the benchmark's ``--quick`` mode for real against our own
ends only (no Go binary needed): every metric once, briefly, through a real
server + client pair. Throughput uses iperf3 when it is installed and the
built-in sink otherwise. What is checked is that every metric was measured
and that the Markdown report and the JSON file are well-formed; no number is
compared with anything, because the numbers depend on the machine.

The unit tests check the report logic (scenario selection, medians, ratios,
an implementation that did not start) on hand-made samples.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.trial import unittest

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from npbench import report  # noqa: E402
from npbench.report import DIRECT, Column, Results  # noqa: E402
from npbench.scenario import Scenario, parse_list, scenarios  # noqa: E402

NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?$")
PARAMS = {"workers": 4, "concurrency": 2000, "idle_min": 1024}


def tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of *text* as rows of cells (separator rows dropped).

    Fails the calling test's assertions through ValueError when a table is
    malformed: a missing separator row or rows with differing cell counts."""
    found: list[list[list[str]]] = []
    block: list[str] = []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            if len(block) < 2 or not re.fullmatch(r"\|(-{3,}:?\|)+", block[1]):
                raise ValueError(f"table without a separator row: {block[:2]}")
            rows = [[c.strip() for c in row.strip().strip("|").split("|")] for row in block]
            widths = {len(r) for r in rows}
            if len(widths) != 1 or len(block[1].strip("|").split("|")) not in widths:
                raise ValueError(f"rows of different widths in table starting {block[0]!r}")
            found.append([rows[0]] + rows[2:])
            block = []
    return found


def section(text: str, title: str) -> str:
    """The part of the report under the ``### title`` heading."""
    start = text.index(f"### {title}")
    end = text.find("\n### ", start + 1)
    return text[start:] if end < 0 else text[start:end]


class ReportLogic(unittest.TestCase):
    def test_scenarios_force_tls_for_quic_and_http2(self) -> None:
        got = scenarios(["dual", "single"], [0, 1, 2, 3], [0, 1])
        self.assertEqual(
            [s.key for s in got],
            ["dual-type0-tls0", "dual-type0-tls1", "dual-type1-tls1", "dual-type2-tls0", "dual-type2-tls1",
             "dual-type3-tls1", "single"],
        )
        only_plain = scenarios(["dual"], [1, 3], [0])
        self.assertEqual([(s.type, s.tls) for s in only_plain], [(1, 1), (3, 1)])
        self.assertIn("runs as tls=1", only_plain[0].note)

    def test_selection_lists_refuse_unknown_values(self) -> None:
        self.assertEqual(parse_list("2, 0,2", (0, 1, 2, 3), "type"), [2, 0])
        with self.assertRaises(ValueError) as cm:
            parse_list("0,4", (0, 1, 2, 3), "type")
        self.assertIn("--type", str(cm.exception))
        with self.assertRaises(ValueError):
            parse_list(",", (0, 1), "tls")

    def test_medians_sums_and_ratios(self) -> None:
        s = Scenario("dual", 0, 0)
        res = Results()
        for v in (100.0, 300.0, 200.0):
            res.add(s.key, "ours", "rtt_p50", v)
        for v in (400.0, None, 400.0):
            res.add(s.key, "go", "rtt_p50", v)
        res.add(DIRECT, DIRECT, "rtt_p50", 50.0)
        for v in (1.0, 0.0, 2.0):
            res.add(s.key, "ours", "cps_fail", v)
        res.add(s.key, "ours", "ttfb", 0.5)
        res.add(s.key, "go", "ttfb", 2.0)
        columns = [Column(DIRECT, "direct"), Column("ours", "ours"), Column("go", "Go")]
        [table] = tables(report.scenario_table(res, s, columns, PARAMS))
        self.assertEqual(table[0], ["metric", "better", "direct", "ours", "Go", "ours / Go", "ours / direct",
                                    "Go / direct"])
        rows = {r[0]: r[1:] for r in table[1:]}
        self.assertEqual(rows["64 B TCP echo RTT p50, µs"], ["↓", "50", "200", "400", "0.50", "4.00", "8.00"])
        self.assertEqual(rows["failed new connections (sum of all rounds)"], ["", "–", "3", "–", "–", "–", "–"])
        self.assertEqual(rows["first byte through the tunnel, s after start"],
                         ["↓", "n/a", "0.50", "2.00", "0.25", "–", "–"])
        self.assertNotIn("throughput, 1 stream, Gbit/s", rows)  # never measured: no row

    def test_summary_of_ours_against_go(self) -> None:
        plain, quic = Scenario("dual", 0, 0), Scenario("dual", 1, 1)
        res = Results()
        res.add(plain.key, "ours", "tput1", 3.0)
        res.add(plain.key, "go", "tput1", 2.0)
        res.add(plain.key, "ours", "burst_fail", 5.0)
        res.add(plain.key, "go", "burst_fail", 0.0)
        res.add(quic.key, "go", "tput1", 1.0)  # ours not measured there: no column
        [table] = tables(report.summary_table(res, [plain, quic], PARAMS))
        self.assertEqual(table[0], ["ours / Go", "TCP tls=0"])
        self.assertEqual(table[1:], [["throughput, 1 stream, Gbit/s ↑", "1.50"],
                                     ["failed of the 2,000 concurrent (sum of all rounds) (ours / Go totals)",
                                      "5 / 0"]])
        self.assertEqual(report.summary_table(res, [quic], PARAMS), "")

    def test_implementation_that_did_not_start(self) -> None:
        s = Scenario("dual", 1, 1)
        res = Results()
        res.add(s.key, "go", "tput1", 3.0)
        res.fail(s.key, "ours", "server: ERROR  pool type 1 (QUIC) is not supported yet")
        columns = [Column("ours", "ours"), Column("go", "Go")]
        text = report.markdown(res, [s], columns, PARAMS, ["## header"])
        [table] = tables(text)
        self.assertEqual(table[0][2:], ["ours (did not start)", "Go", "ours / Go"])
        self.assertEqual(table[1], ["throughput, 1 stream, Gbit/s", "↑", "–", "3.00", "–"])
        self.assertIn("* ours failed to start, no further rounds: server: ERROR  pool type 1 (QUIC) is not supported yet",
                      text)
        res.add(s.key, "ours", "tput1", 1.0)  # an earlier round had started
        self.assertIn("ours (failed to start later)", report.markdown(res, [s], columns, PARAMS, []))
        data = report.to_json(res, [s], columns, {"command": "x"})
        self.assertEqual(data["scenarios"][0]["did_not_start"], {"ours": res.failed[s.key]["ours"]})
        self.assertEqual(data["scenarios"][0]["medians"]["go"]["tput1"], 3.0)

    def test_table_checker_rejects_ragged_rows(self) -> None:
        with self.assertRaises(ValueError):
            tables("| a | b |\n|---|---|\n| 1 |\n")
        with self.assertRaises(ValueError):
            tables("| a | b |\n| 1 | 2 |\n")


class SmokeRun(unittest.TestCase):
    """``tunnel_bench.py --quick`` against our own ends, for real."""

    def run_bench(self) -> tuple[str, dict[str, Any]]:
        out = Path(self.mktemp())
        out.mkdir(parents=True)
        cmd = [sys.executable, str(BENCH / "tunnel_bench.py"), "--quick", "--peer", "none", "--tls", "0",
               "--paths", "direct,dual", "--json", str(out / "r.json"), "--markdown", str(out / "r.md"),
               "--log-dir", str(out / "logs")]
        # A hang guard only: the run takes seconds, but the machine may be busy.
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        text = (out / "r.md").read_text(encoding="utf-8")
        self.assertEqual(text.strip(), proc.stdout.strip())
        # The JSON file alone gives the same report again.
        again = subprocess.run([sys.executable, str(BENCH / "tunnel_bench.py"), "--render", str(out / "r.json")],
                               capture_output=True, text=True, timeout=120, check=False)
        self.assertEqual(again.returncode, 0, again.stderr[-3000:])
        self.assertEqual(again.stdout, proc.stdout)
        return text, json.loads((out / "r.json").read_text(encoding="utf-8"))

    def test_quick_mode_measures_every_metric(self) -> None:
        text, data = self.run_bench()
        head, dual = tables(text)
        info = {row[0]: row[1] for row in head[1:]}
        self.assertIn("--quick", info["command"])
        self.assertIn(f"{os.cpu_count()} CPUs", info["machine"])
        self.assertIn("Python", info["software"])
        self.assertIn("load average", info["load"])
        self.assertIn("Go columns skipped: --peer none.", text)

        self.assertEqual(dual[0], ["metric", "better", "direct", "ours", "ours / direct"])
        params = data["params"]
        scenario = Scenario("dual", 0, 0)
        rows = {r[0]: r[1:] for r in dual[1:]}
        notes = section(text, scenario.title)
        self.assertEqual(sorted(rows), sorted(m.title(scenario, params) for m in report.METRICS))
        for metric in report.METRICS:
            better, direct, ours, vs_direct = rows[metric.title(scenario, params)]
            if NUMBER.match(ours) is None:
                # Only a datagram echo may be lost on a very busy machine, and then a note says so.
                self.assertIn(metric.key, ("udp_p50", "udp_p99"), f"{metric.key}: {ours!r}")
                self.assertIn("* ours: UDP echo", notes)
            if metric.direct:
                self.assertTrue(NUMBER.match(direct) or metric.key.startswith("udp"), f"{metric.key}: {direct!r}")
            else:
                self.assertEqual(direct, "n/a")

        self.assertEqual(params["tput_tool"], "iperf3" if shutil.which("iperf3") else "built-in sink")
        self.assertIn("--quick", data["command"])
        self.assertEqual(data["machine"]["cpus"], os.cpu_count())
        [entry] = data["scenarios"]
        self.assertEqual(entry["key"], "dual-type0-tls0")
        self.assertEqual(entry["did_not_start"], {})
        ours = entry["samples"]["ours"]
        for metric in report.METRICS:
            self.assertEqual(len(ours[metric.key]), 2 if metric.key == "ttfb" else 1, metric.key)
        for key in ("tput1", "tput8", "rtt_p50", "cps", "burst_s"):
            self.assertEqual(len(data["direct"][key]), 1, key)
        self.assertEqual(data["direct"]["burst_fail"], [0.0])
