"""Durations, settings from the environment, log levels and line format."""

from __future__ import annotations

import io
import re

from twisted.logger import LogLevel
from twisted.trial import unittest

from nodepass.durations import format_duration, parse_duration
from nodepass.env import Settings
from nodepass.log import Level, LineObserver, NodePassLogger, format_line, parse_level
from nodepass.stats import TunnelStats


class DurationTests(unittest.TestCase):
    def test_parse(self) -> None:
        cases = {"0": 0.0, "5s": 5.0, "500ms": 0.5, "1h30m": 5400.0, "1.5s": 1.5, "2m3s": 123.0,
                 "100us": 0.0001, "100µs": 0.0001, "10ns": 1e-8, ".5s": 0.5, "-3s": -3.0}
        for text, seconds in cases.items():
            with self.subTest(text=text):
                self.assertAlmostEqual(parse_duration(text), seconds)

    def test_parse_errors(self) -> None:
        for text in ["", "5", "1.5", "s", "5x", "5s3", "abc", "--1s"]:
            with self.subTest(text=text):
                self.assertRaises(ValueError, parse_duration, text)

    def test_format_like_go(self) -> None:
        cases = {0: "0s", 300: "5m0s", 5400: "1h30m0s", 0.5: "500ms", 1.5: "1.5s", 3600: "1h0m0s",
                 0.0001: "100µs", 61.25: "1m1.25s", 1e-8: "10ns"}
        for seconds, text in cases.items():
            with self.subTest(seconds=seconds):
                self.assertEqual(format_duration(seconds), text)


class SettingsTests(unittest.TestCase):
    def test_defaults(self) -> None:
        s = Settings.from_environ({})
        self.assertEqual((s.semaphore_limit, s.report_interval, s.reload_interval, s.udp_read_timeout),
                         (65536, 5.0, 3600.0, 30.0))

    def test_overrides_and_invalid_fall_back(self) -> None:
        s = Settings.from_environ({"NP_REPORT_INTERVAL": "250ms", "NP_TCP_DATA_BUF_SIZE": "32768",
                                   "NP_POOL_GET_TIMEOUT": "7", "NP_SEMAPHORE_LIMIT": "-4"})
        self.assertEqual((s.report_interval, s.tcp_data_buf_size), (0.25, 32768))
        self.assertEqual((s.pool_get_timeout, s.semaphore_limit), (5.0, 65536))
        self.assertEqual(len(s.warnings), 2)
        self.assertIn("NP_POOL_GET_TIMEOUT", s.warnings[0] + s.warnings[1])


class LogTests(unittest.TestCase):
    def test_levels(self) -> None:
        self.assertEqual([parse_level(x) for x in ("debug", "INFO", "warn", "error", "event", "none", "??")],
                         [Level.DEBUG, Level.INFO, Level.WARN, Level.ERROR, Level.EVENT, Level.NONE, Level.INFO])

    def test_filtering_and_observers(self) -> None:
        out = io.StringIO()
        logger = NodePassLogger("error", stream=out, colour=False, clock=lambda: 0.0)
        seen: list[str] = []
        logger.add_observer(lambda r: seen.append(f"{r.level.name}:{r.text}"))
        logger.info("hidden")
        logger.error("bad %s", "thing")
        logger.event("CHECK_POINT|MODE=1")
        self.assertEqual(seen, ["ERROR:bad thing", "EVENT:CHECK_POINT|MODE=1"])
        self.assertEqual(len(out.getvalue().splitlines()), 2)
        logger.level = Level.NONE
        logger.event("nothing")
        self.assertEqual(len(seen), 2)

    def test_observer_failure_does_not_break_logging(self) -> None:
        out = io.StringIO()
        logger = NodePassLogger("info", stream=out, colour=False)

        def broken(record: object) -> None:
            raise RuntimeError("boom")

        logger.add_observer(broken)
        logger.info("still printed")
        self.assertIn("still printed", out.getvalue())

    def test_line_format(self) -> None:
        line = format_line(Level.INFO, "Server started", 1767348000.123)
        self.assertRegex(line, r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.123  \x1b\[32mINFO\x1b\[0m  Server started$")
        self.assertTrue(re.search(r"  WARN  x$", format_line(Level.WARN, "x", 0, colour=False)))

    def test_line_observer_formats_twisted_events(self) -> None:
        out = io.StringIO()
        observer = LineObserver(out, colour=False)
        observer({"log_level": LogLevel.warn, "log_format": "hello {who}", "who": "there", "log_time": 0.0})
        observer({"log_level": LogLevel.debug, "log_format": "quiet", "log_time": 0.0})
        self.assertEqual(out.getvalue().count("\n"), 1)
        self.assertIn("  WARN  hello there", out.getvalue())

    def test_checkpoint_line(self) -> None:
        stats = TunnelStats(mode=1, ping=3, pool=64, tcps=2, udps=1, tcprx=10, tcptx=20, udprx=30, udptx=40)
        self.assertEqual(stats.checkpoint_line(),
                         "CHECK_POINT|MODE=1|PING=3ms|POOL=64|TCPS=2|UDPS=1|TCPRX=10|TCPTX=20|UDPRX=30|UDPTX=40")
        stats.reset_traffic()
        self.assertEqual((stats.tcprx, stats.udptx, stats.tcps), (0, 0, 2))
