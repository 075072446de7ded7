"""Log output: colours only on terminals (and never with NO_COLOR), repeated lines summarised.

Unit tests drive :class:`~nodepass.log.NodePassLogger` with a
``twisted.internet.task.Clock``; the process tests run ``python -m nodepass``
in a pipe and on a pseudo-terminal, and flood a real tunnel port with
garbage connections while a real tunnel carries traffic.
"""

from __future__ import annotations

import errno
import io
import os
import re
import sys
from datetime import datetime
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.error import ConnectError
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, TestCase

from nodepass.env import Settings
from nodepass.log import Level, LineObserver, LogRecord, NodePassLogger, colour_wanted
from tests.support import echo_roundtrip, echo_server, free_ports, new_dir, reactor, sleep, wait_for
from tests.test_master_support import FakeTunnel, reset_fake_tunnels, start_master
from tests.test_process import ROOT, spawn

ESC = "\x1b["


class Tty(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class ColourTests(TestCase):
    def test_colour_wanted(self) -> None:
        self.assertTrue(colour_wanted(Tty(), {}))
        self.assertFalse(colour_wanted(io.StringIO(), {}))
        self.assertFalse(colour_wanted(Tty(), {"NO_COLOR": "1"}))
        self.assertTrue(colour_wanted(Tty(), {"NO_COLOR": ""}))  # empty means unset (no-color.org)
        self.assertFalse(colour_wanted(object(), {}))

        class Closed(io.StringIO):
            def isatty(self) -> bool:
                raise ValueError("I/O operation on closed file")

        self.assertFalse(colour_wanted(Closed(), {}))

    def test_logger_colours_only_a_terminal(self) -> None:
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "NO_COLOR"})
        for stream, coloured in ((Tty(), True), (io.StringIO(), False)):
            logger = NodePassLogger("info", stream=stream)
            logger.warn("careful")
            self.assertEqual(ESC in stream.getvalue(), coloured, stream.getvalue())
            self.assertEqual(logger.colour, coloured)
        self.patch(os, "environ", {"NO_COLOR": "1"})
        stream = Tty()
        NodePassLogger("info", stream=stream).warn("careful")
        self.assertNotIn(ESC, stream.getvalue())

    def test_line_observer_follows_its_stream(self) -> None:
        self.patch(os, "environ", {})
        for stream, coloured in ((Tty(), True), (io.StringIO(), False)):
            LineObserver(stream)({"log_level": Level.WARN, "log_format": "x", "log_time": 0.0})
            self.assertEqual(ESC in stream.getvalue(), coloured)

    @inlineCallbacks
    def test_master_echo_of_instance_lines_follows_the_master(self) -> Any:
        """Instance lines echoed to a plain master log are plain; the SSE copy keeps NodePass's colours."""
        reset_fake_tunnels()
        m = start_master(self)
        reader = yield m.subscribe()
        r = yield m.request("POST", "/instances", body={"url": "server://127.0.0.1:10101/127.0.0.1:10102"})
        self.assertEqual(r.code, 201)
        iid = r.json()["id"]
        yield wait_for(lambda: reader.of_type("log", iid))
        self.assertIn(f"Server started: server://127.0.0.1:10101/127.0.0.1:10102?log=debug [{iid}]", m.output.getvalue())
        self.assertNotIn(ESC, m.output.getvalue())
        self.assertIn("\x1b[32mINFO\x1b[0m", reader.of_type("log", iid)[0]["logs"])


class RepeatSummaryTests(TestCase):
    def make(self, interval: float = 10.0, level: str = "debug") -> tuple[NodePassLogger, Clock, list[LogRecord]]:
        clock = Clock()
        records: list[LogRecord] = []
        logger = NodePassLogger(level, stream=None, reactor=clock, repeat_interval=interval,
                                clock=clock.seconds)
        logger.add_observer(records.append)
        return logger, clock, records

    def test_first_line_at_once_then_one_summary(self) -> None:
        logger, clock, records = self.make()
        for i in range(100):
            logger.warn("Tunnel handshake from %s: not an HTTP request: closed", f"127.0.0.1:{40000 + i}")
            clock.advance(0.01)
        self.assertEqual([r.text for r in records], ["Tunnel handshake from 127.0.0.1:40000: not an HTTP request: closed"])
        clock.advance(8.99)
        self.assertEqual(len(records), 1)
        clock.advance(0.01)
        self.assertEqual(len(records), 2)
        summary = records[1]
        self.assertEqual(summary.level, Level.WARN)
        self.assertEqual(summary.repeats, 99)
        self.assertEqual(
            summary.text,
            "Tunnel handshake from 127.0.0.1:40099: not an HTTP request: closed (repeated 99 times in the last 10s)",
        )
        self.assertEqual(summary.time, 10.0)  # written when the interval ends
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_steady_flood_gives_one_summary_per_interval(self) -> None:
        logger, clock, records = self.make(interval=1.0)
        for _ in range(600):  # 60 s at 10 lines a second
            logger.warn("refused %s", "x")
            clock.advance(0.1)
        clock.advance(1.0)
        self.assertLessEqual(len(records), 62)
        self.assertEqual(1 + sum(r.repeats for r in records), 600)
        self.assertTrue(all(r.repeats for r in records[1:]))

    def test_late_summary_still_counts(self) -> None:
        """A line that arrives after the interval but before the (late) summary runs is counted."""
        logger, clock, records = self.make(interval=1.0)
        logger.warn("refused %s", 1)
        logger.warn("refused %s", 2)
        clock.rightNow = 1.5  # the reactor was busy: time passed, the summary has not run yet
        logger.warn("refused %s", 3)
        self.assertEqual(len(records), 1)
        clock.advance(0)
        self.assertEqual(records[-1].text, "refused 3 (repeated 2 times in the last 1s)")
        logger.warn("refused %s", 4)  # inside the next window
        clock.advance(1)
        self.assertEqual([r.text for r in records[2:]], ["refused 4 (repeated 1 time in the last 1s)"])
        clock.advance(1)
        self.assertFalse(any(r.repeats == 0 and r.text.startswith(" (") for r in records))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_quiet_kind_is_written_again(self) -> None:
        logger, clock, records = self.make()
        logger.info("Instance stopped [%s]", "a")
        clock.advance(11)
        logger.info("Instance stopped [%s]", "b")
        self.assertEqual([r.text for r in records], ["Instance stopped [a]", "Instance stopped [b]"])
        self.assertEqual(clock.getDelayedCalls(), [])  # nothing counted, nothing scheduled

    def test_single_repeat_wording(self) -> None:
        logger, clock, records = self.make(interval=5.0)
        logger.error("dial %s failed", "a")
        logger.error("dial %s failed", "b")
        clock.advance(5)
        self.assertEqual(records[-1].text, "dial b failed (repeated 1 time in the last 5s)")

    def test_kinds_are_level_and_template(self) -> None:
        logger, clock, records = self.make()
        logger.warn("x %s", 1)
        logger.error("x %s", 2)  # another level
        logger.warn("y %s", 3)  # another template
        logger.warn("x %s", 4)  # counted
        self.assertEqual([r.text for r in records], ["x 1", "x 2", "y 3"])
        clock.advance(10)
        self.assertEqual(records[-1].text, "x 4 (repeated 1 time in the last 10s)")

    def test_template_without_words_is_keyed_by_text(self) -> None:
        logger, clock, records = self.make()
        logger.info("%s", "Server started: a")
        logger.info("%s", "Server restart: b")
        logger.info("%s", "Server started: a")
        self.assertEqual([r.text for r in records], ["Server started: a", "Server restart: b"])
        clock.advance(10)
        self.assertEqual(records[-1].text, "Server started: a (repeated 1 time in the last 10s)")

    def test_checkpoint_is_never_summarised(self) -> None:
        logger, clock, records = self.make()
        line = "CHECK_POINT|MODE=1|PING=0ms|POOL=0|TCPS=0|UDPS=0|TCPRX=0|TCPTX=0|UDPRX=0|UDPTX=0"
        for _ in range(5):
            logger.event("%s", line)
        self.assertEqual(len(records), 5)

    def test_levels_below_the_threshold_do_not_count(self) -> None:
        logger, clock, records = self.make(level="warn")
        for _ in range(3):
            logger.debug("noise %d", 1)
        clock.advance(10)
        self.assertEqual(records, [])

    def test_flush_writes_pending_and_cancels_timers(self) -> None:
        logger, clock, records = self.make()
        logger.warn("x %s", 1)
        logger.warn("x %s", 2)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        logger.flush()
        self.assertEqual(records[-1].text, "x 2 (repeated 1 time in the last 10s)")
        self.assertEqual(clock.getDelayedCalls(), [])
        logger.warn("x %s", 3)  # a fresh start after a flush
        self.assertEqual(records[-1].text, "x 3")

    def test_disabled(self) -> None:
        for logger in (self.make(interval=0)[0], NodePassLogger("debug", stream=None)):
            records: list[LogRecord] = []
            logger.add_observer(records.append)
            for i in range(3):
                logger.warn("x %s", i)
            self.assertEqual(len(records), 3)

    def test_stream_gets_the_same_lines(self) -> None:
        clock = Clock()
        out = io.StringIO()
        logger = NodePassLogger("info", stream=out, reactor=clock, repeat_interval=2.0)
        for i in range(10):
            logger.warn("refused %s", i)
        clock.advance(2)
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertTrue(lines[1].endswith("  WARN  refused 9 (repeated 9 times in the last 2s)"), lines)

    def test_setting(self) -> None:
        self.assertEqual(Settings().log_repeat_interval, 10.0)
        self.assertEqual(Settings.from_environ({"NP_LOG_REPEAT_INTERVAL": "30s"}).log_repeat_interval, 30.0)
        self.assertEqual(Settings.from_environ({"NP_LOG_REPEAT_INTERVAL": "0"}).log_repeat_interval, 0.0)
        bad = Settings.from_environ({"NP_LOG_REPEAT_INTERVAL": "often"})
        self.assertEqual(bad.log_repeat_interval, 10.0)
        self.assertIn("NP_LOG_REPEAT_INTERVAL", bad.warnings[0])


class MasterRelayTests(TestCase):
    """The master relays an instance's lines as SSE ``log`` events: summarised, first line not delayed."""

    @inlineCallbacks
    def test_flood_of_instance_lines(self) -> Any:
        reset_fake_tunnels()
        settings = Settings(report_interval=5.0, reload_interval=3600.0, shutdown_timeout=2.0,
                            log_repeat_interval=0.5)
        m = start_master(self, settings=settings)
        reader = yield m.subscribe()
        r = yield m.request("POST", "/instances", body={"url": "server://127.0.0.1:10101/127.0.0.1:10102"})
        iid = r.json()["id"]
        tunnel = FakeTunnel.instances[0]
        tunnel.logger.warn("Tunnel handshake from %s: not an HTTP request: closed", "127.0.0.1:1")
        yield wait_for(lambda: any("127.0.0.1:1:" in e["logs"] for e in reader.of_type("log", iid)))
        for port in range(2, 500):
            tunnel.logger.warn("Tunnel handshake from %s: not an HTTP request: closed", f"127.0.0.1:{port}")
        yield wait_for(lambda: any("repeated" in e["logs"] for e in reader.of_type("log", iid)))
        texts = [e["logs"] for e in reader.of_type("log", iid) if "Tunnel handshake" in e["logs"]]
        self.assertEqual(len(texts), 2, texts)
        self.assertIn("127.0.0.1:499: not an HTTP request: closed (repeated 498 times in the last 500ms)", texts[1])
        echoed = [line for line in m.output.getvalue().splitlines() if "Tunnel handshake" in line]
        self.assertEqual(len(echoed), 2, echoed)
        # a repeated error line is counted, and its summary sets the status when it is written
        tunnel.fail("first")
        yield wait_for(lambda: m.service.manager.records[iid].status == "error")
        tunnel.checkpoint()
        yield wait_for(lambda: m.service.manager.records[iid].status == "running")
        tunnel.fail("second")
        self.assertEqual(m.service.manager.records[iid].status, "running")
        yield wait_for(lambda: any("Server error: second (repeated 1 time" in e["logs"]
                                   for e in reader.of_type("log", iid)))
        self.assertEqual(m.service.manager.records[iid].status, "error")


class RawProcess(protocol.ProcessProtocol):
    """A spawned process whose raw output (escape codes and all) is kept."""

    def __init__(self) -> None:
        self.raw = b""
        self.status: int | None = None
        self.ended = False

    def outReceived(self, data: bytes) -> None:
        self.raw += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.status = getattr(reason.value, "exitCode", None)
        self.ended = True

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", "replace")


def spawn_raw(test: TestCase, args: list[str], *, pty: bool, **env: str) -> RawProcess:
    """``python -m nodepass <args>`` with its output on a pseudo-terminal (*pty*) or a pipe."""
    environ = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    environ.update(PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", **env)
    proc = RawProcess()
    transport = reactor.spawnProcess(
        proc, sys.executable, [sys.executable, "-m", "nodepass", *args], env=environ, path=ROOT, usePTY=pty
    )

    @inlineCallbacks
    def cleanup() -> Any:
        if not proc.ended:
            transport.signalProcess("KILL")
            yield wait_for(lambda: proc.ended, timeout=30)

    test.addCleanup(cleanup)
    return proc


class TerminalTests(TestCase):
    """Colours and help as a user sees them on a terminal and in a pipe."""

    timeout = 120

    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            raise SkipTest("pseudo-terminals are exercised on Linux")

    @inlineCallbacks
    def log_lines(self, pty: bool, **env: str) -> Any:
        port = free_ports(1)[0]
        proc = spawn_raw(self, [f"server://127.0.0.1:{port}/127.0.0.1:1?log=debug"], pty=pty, **env)
        yield wait_for(lambda: "Pending tunnel handshake" in proc.text, timeout=30)
        return proc.text

    @inlineCallbacks
    def test_colours_on_a_terminal_only(self) -> Any:
        text = yield self.log_lines(pty=True)
        self.assertIn("\x1b[32mINFO\x1b[0m  Server started", text)
        self.assertIn("\x1b[34mDEBUG\x1b[0m", text)
        text = yield self.log_lines(pty=False)
        self.assertIn("  INFO  Server started", text)
        self.assertNotIn(ESC, text)
        text = yield self.log_lines(pty=True, NO_COLOR="1")
        self.assertIn("  INFO  Server started", text)
        self.assertNotIn(ESC, text)

    @inlineCallbacks
    def test_help_and_version_on_a_terminal(self) -> Any:
        for flag in ("--help", "--version"):
            proc = spawn_raw(self, [flag], pty=True)
            yield wait_for(lambda p=proc: p.ended, timeout=30)
            self.assertEqual(proc.status, 0, proc.text)
            self.assertIn("nodepass-", proc.text)
            self.assertNotIn("Error", proc.text)
            if flag == "--help":
                self.assertIn("│ server://password@host/host?<query> │", proc.text)
                self.assertIn("-v, --version", proc.text)
            else:
                self.assertRegex(proc.text, r"^nodepass-\S+ \w+/\w+ python-\S+\r?\n$")


class FloodTests(TestCase):
    """Garbage connections flood a real tunnel port while a real tunnel carries traffic."""

    timeout = 240
    FLOOD = 600
    BATCH = 50

    @inlineCallbacks
    def flood_once(self, port: int) -> Any:
        from tests.support import RawClient, connect

        proto = RawClient(b"GARBAGE / HTTP/1.1\r\n\r\n")
        try:
            yield connect(port, proto, bind="127.0.0.2")
        except ConnectError as exc:
            # the server accepted and reset the connection before the connect was reported
            return isinstance(exc.osError, int) and exc.osError == errno.ECONNRESET or "104" in str(exc)
        yield wait_for(lambda: proto.lost, timeout=30)
        return True

    @inlineCallbacks
    def test_flood_is_summarised_and_the_tunnel_keeps_working(self) -> Any:
        work = new_dir(self)
        echo_port = echo_server(self)
        tunnel_port, local_port = free_ports(2)
        server = spawn(
            self, ["-m", "nodepass", f"server://pw@127.0.0.1:{tunnel_port}/127.0.0.1:{echo_port}?log=info"],
            work, NP_LOG_REPEAT_INTERVAL="1s",
        )
        yield server.wait_line("Pending tunnel handshake")
        client = spawn(self, ["-m", "nodepass", f"client://pw@127.0.0.1:{tunnel_port}/127.0.0.1:{local_port}"], work)
        yield client.wait_line("Client started")
        payload = b"flood " * 10000
        got = yield echo_roundtrip(local_port, payload)
        self.assertEqual(got, payload)

        refused = 0
        for start in range(0, self.FLOOD, self.BATCH):
            batch = [self.flood_once(tunnel_port) for _ in range(self.BATCH)]
            if start % (self.BATCH * 6) == 0:  # traffic while the flood goes on
                batch.append(echo_roundtrip(local_port, payload))
            results = yield DeferredList(batch, consumeErrors=True)
            failed = [r for ok, r in results if not ok]
            self.assertEqual(failed, [])
            refused += sum(1 for ok, r in results[: self.BATCH] if r is True)
            for _ok, r in results[self.BATCH:]:
                self.assertEqual(r, payload)
        self.assertGreater(refused, self.FLOOD * 9 // 10)

        def refusal_lines() -> list[str]:
            return [line for line in server.lines if "  WARN  Tunnel connection refused" in line]

        def represented() -> int:
            total = 0
            for line in refusal_lines():
                match = re.search(r"\(repeated (\d+) times? in the last 1s\)$", line)
                total += int(match.group(1)) if match else 1  # a summary stands for N lines
            return total

        try:
            yield wait_for(lambda: represented() >= refused, timeout=30, what="summaries of every refusal")
        except AssertionError:
            self.fail(f"{represented()} of {refused} refusals logged:\n{server.text}")
        yield sleep(1.5)  # one more interval: nothing else may come
        lines = refusal_lines()
        self.assertEqual(represented(), refused, "\n".join(lines))
        self.assertTrue(any("repeated" in line for line in lines), lines)
        # at most one line of the kind per interval (1 s): the first, then summaries
        stamps = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f") for line in lines]
        gaps = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:], strict=False)]
        self.assertTrue(all(gap >= 0.99 for gap in gaps), "\n".join(lines))
        self.assertLess(len(lines), refused // 10)
        self.assertLess(len(server.lines), 100, server.text)

        got = yield echo_roundtrip(local_port, payload)
        self.assertEqual(got, payload)
        self.assertTrue(server.running and client.running)
        for proc in (client, server):
            proc.signal("INT")
            status = yield proc.wait_exit()
            self.assertEqual(status, (0, None), proc.text)
