"""Real processes: ``python -m nodepass`` and ``twistd nodepass`` as a user (or systemd) runs them.

Each test spawns the command with the reactor (``spawnProcess``), reads its
log lines, talks to it over real sockets on 127.0.0.1, signals it and checks
what it leaves behind (exit status, state file).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from typing import Any

import treq
from twisted.internet import endpoints, protocol
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import HTTPConnectionPool

from tests.support import echo_roundtrip, echo_server, free_port, free_ports, new_dir, sleep
from tests.test_master_support import SSEReader, raw_request, reactor, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHUTDOWN_TIMEOUT = 5.0
"""NP_SHUTDOWN_TIMEOUT given to the processes (seconds)."""
START_TIMEOUT = 30.0
"""How long a process may take to start (interpreter start-up on a busy machine)."""

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_KEY = re.compile(r"API Key (created|loaded): ([0-9a-f]{32})")
_STARTED = re.compile(r"Master started: 127\.0\.0\.1:(\d+)(/\S*)")


class NodePassProcess(protocol.ProcessProtocol):
    """A spawned nodepass process: collects its output lines and its exit."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.raw = b""
        self._partial = b""
        self.ended: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def outReceived(self, data: bytes) -> None:
        self.raw += data
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        self.lines.extend(_ANSI.sub("", line.decode("utf-8", "replace")) for line in complete)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        self.ended.callback(None)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def search(self, pattern: re.Pattern[str] | str) -> re.Match[str] | None:
        for line in self.lines:
            match = re.search(pattern, line)
            if match:
                return match
        return None

    def wait_line(self, pattern: re.Pattern[str] | str, timeout: float = START_TIMEOUT) -> Deferred[Any]:
        def check() -> Any:
            if self.reason is not None and not self.search(pattern):
                raise AssertionError(f"process ended before {pattern!r}:\n{self.text}")
            return self.search(pattern)

        return wait_for(check, timeout=timeout)

    @inlineCallbacks
    def wait_exit(self, timeout: float = SHUTDOWN_TIMEOUT + 10) -> Any:
        """Wait for the process to end; return ``(exitCode, signal)``."""
        yield wait_for(lambda: self.reason is not None, timeout=timeout)
        assert self.reason is not None
        return exit_code(self.reason)

    def signal(self, name: str) -> None:
        self.transport.signalProcess(name)  # type: ignore[union-attr]

    @property
    def running(self) -> bool:
        return self.reason is None


def spawn(
    test: TestCase, args: list[str], state_dir: str, *, prefix: list[str] | None = None, **extra_env: str
) -> NodePassProcess:
    """Start ``python <args>`` (this interpreter) with the project importable; killed at cleanup.

    *prefix* runs it under another command that ends by executing it, such as
    ``ip netns exec NAME`` (so the process id is still that of the interpreter)."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=ROOT,
        PYTHONUNBUFFERED="1",
        NP_STATE_DIR=state_dir,
        NP_SHUTDOWN_TIMEOUT=f"{int(SHUTDOWN_TIMEOUT)}s",
        NP_SERVICE_COOLDOWN="500ms",
    )
    env.update(extra_env)
    proc = NodePassProcess()
    argv = [*(prefix or []), sys.executable, *args]
    reactor.spawnProcess(proc, argv[0], argv, env=env, path=state_dir)

    @inlineCallbacks
    def cleanup() -> Any:
        if proc.running:
            proc.signal("KILL")
            yield proc.ended

    test.addCleanup(cleanup)
    return proc


def exit_code(reason: Failure) -> tuple[int | None, int | None]:
    """``(exitCode, signal)`` of an ended process."""
    value = reason.value
    assert isinstance(value, (ProcessDone, ProcessTerminated)), value
    return value.exitCode, value.signal


@inlineCallbacks
def terminated_cleanly(test: TestCase, proc: NodePassProcess) -> Any:
    """Send SIGTERM to *proc*; it must exit with code 0 (not by a signal)."""
    proc.signal("TERM")
    status = yield proc.wait_exit()
    test.assertEqual(status, (0, None))


class MasterClient:
    """treq against a master process found from its log lines."""

    def __init__(self, test: TestCase, proc: NodePassProcess) -> None:
        self.test = test
        self.proc = proc
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    @inlineCallbacks
    def connect(self) -> Any:
        match = yield self.proc.wait_line(_STARTED)
        key = self.proc.search(_KEY)
        assert key is not None, self.proc.text
        self.key_word, self.key = key.group(1), key.group(2)
        self.base = f"http://127.0.0.1:{match.group(1)}{match.group(2)}"
        return self

    @inlineCallbacks
    def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        response = yield treq.request(
            method, self.base + path, data=data, headers={"X-API-Key": [self.key]}, pool=self.pool
        )
        content = yield treq.content(response)
        try:
            decoded = json.loads(content) if content else None
        except ValueError:
            decoded = content
        return response.code, decoded

    @inlineCallbacks
    def subscribe(self) -> Any:
        reader = SSEReader()
        response = yield treq.get(
            self.base + "/events", headers={"X-API-Key": [self.key]}, pool=self.pool, unbuffered=True
        )
        d = treq.collect(response, reader.feed)

        def ended(_: object) -> None:
            reader.ended = True

        d.addBoth(ended)
        return reader

    @inlineCallbacks
    def instances(self) -> Any:
        code, body = yield self.call("GET", "/instances")
        assert code == 200, (code, body)
        return {item["id"]: item for item in body if item["id"] != "********"}


def read_state(state_dir: str, name: str = "nodepass.json") -> dict[str, Any]:
    with open(os.path.join(state_dir, name), encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data


def state_instances(state_dir: str, name: str = "nodepass.json") -> dict[str, dict[str, Any]]:
    return {i["id"]: i for i in read_state(state_dir, name)["instances"] if i["id"] != "********"}


def plugin_installed() -> bool:
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins

    return any(p.tapname == "nodepass" for p in getPlugins(IServiceMaker))


class MasterProcessTests(TestCase):
    """A master process keeps its instances across SIGTERM and a restart."""

    timeout = 120

    def master_args(self, port: int) -> list[str]:
        return ["-m", "nodepass", f"master://127.0.0.1:{port}?log=info"]

    def exited_cleanly(self, status: tuple[int | None, int | None]) -> None:
        self.assertEqual(status, (0, None))

    @inlineCallbacks
    def run_lifecycle(self) -> Any:
        state_dir = new_dir(self)
        echo_port = echo_server(self)
        tunnel_port, local_port = free_ports(2)
        proc = spawn(self, self.master_args(0), state_dir)
        api = yield MasterClient(self, proc).connect()
        self.assertEqual(api.key_word, "created")
        code, server = yield api.call(
            "POST", "/instances",
            {"url": f"server://k3y@127.0.0.1:{tunnel_port}/127.0.0.1:{echo_port}", "alias": "srv"},
        )
        self.assertEqual(code, 201, server)
        code, client = yield api.call(
            "POST", "/instances",
            {"url": f"client://k3y@127.0.0.1:{tunnel_port}/127.0.0.1:{local_port}?min=2", "alias": "cli"},
        )
        self.assertEqual(code, 201, client)
        code, _ = yield api.call("PATCH", f"/instances/{client['id']}", {"meta": {"tags": {"env": "test"}}})
        self.assertEqual(code, 200)
        code, manual = yield api.call(
            "POST", "/instances", {"url": f"server://127.0.0.1:{free_port()}/127.0.0.1:9", "alias": "manual"}
        )
        self.assertEqual(code, 201, manual)
        code, _ = yield api.call("PATCH", f"/instances/{manual['id']}", {"restart": False})
        self.assertEqual(code, 200)
        # The master's own lines are never summarised: one line per instance created.
        yield wait_for(lambda: manual["id"] in proc.text)
        created = [line for line in proc.lines if "Instance created:" in line]
        self.assertEqual(len(created), 3, created)
        payload = b"nodepass-process-" * 1000
        got = yield echo_roundtrip(local_port, payload)
        self.assertEqual(got, payload)
        live = yield wait_for_counters(api, client["id"], len(payload))
        # a long-running process must not log per connection (twistd's "Starting factory" lines)
        noise = re.compile(r"(Starting|Stopping) (factory|protocol)")
        before_noise = sum(1 for line in proc.lines if noise.search(line))
        for i in range(5):
            got = yield echo_roundtrip(local_port, b"quiet %d" % i)
        yield sleep(0.5)
        noisy = [line for line in proc.lines if noise.search(line)]
        self.assertEqual(len(noisy), before_noise, noisy[-6:])
        live = yield wait_for_counters(api, client["id"], len(payload))
        reader = yield api.subscribe()
        yield wait_for(lambda: reader.of_type("initial"))

        proc.signal("TERM")
        status = yield proc.wait_exit()
        yield wait_for(lambda: reader.ended)
        self.assertEqual(len(reader.of_type("shutdown")), 1, reader.raw[-500:])
        self.assertIn("Master shutdown complete", proc.text)
        self.exited_cleanly(status)

        # the state on disk: valid JSON, every instance, counters, no temporaries left
        saved = state_instances(state_dir)
        self.assertEqual(set(saved), {server["id"], client["id"], manual["id"]})
        self.assertFalse(saved[manual["id"]]["restart"])
        self.assertEqual(saved[client["id"]]["alias"], "cli")
        self.assertEqual(saved[client["id"]]["meta"]["tags"], {"env": "test"})
        self.assertGreaterEqual(saved[client["id"]]["tcprx"], live["tcprx"])
        self.assertGreaterEqual(saved[client["id"]]["tcprx"], len(payload))
        leftovers = [n for n in os.listdir(state_dir) if n.endswith(".tmp")]
        self.assertEqual(leftovers, [])
        with open(os.path.join(state_dir, "nodepass.json"), "rb") as handle:
            json.loads(handle.read())
        self.assertEqual(os.stat(os.path.join(state_dir, "nodepass.json")).st_mode & 0o777, 0o600)

        # restart: same key, same ids/aliases/meta, counters kept, traffic flows again
        proc2 = spawn(self, self.master_args(0), state_dir)
        api2 = yield MasterClient(self, proc2).connect()
        self.assertEqual((api2.key_word, api2.key), ("loaded", api.key))
        yield proc2.wait_line("Auto-starting instance: " + ".*" + client["id"])
        after = yield api2.instances()
        self.assertEqual(set(after), {server["id"], client["id"], manual["id"]})
        for item in (after[server["id"]], after[client["id"]]):
            self.assertEqual(item["status"], "running", item)
            self.assertTrue(item["restart"])
        self.assertEqual((after[manual["id"]]["status"], after[manual["id"]]["alias"]), ("stopped", "manual"))
        self.assertEqual(after[server["id"]]["alias"], "srv")
        self.assertEqual(after[client["id"]]["alias"], "cli")
        self.assertEqual(after[client["id"]]["meta"]["tags"], {"env": "test"})
        self.assertGreaterEqual(after[client["id"]]["tcprx"], saved[client["id"]]["tcprx"])
        got = yield echo_roundtrip(local_port, payload)
        self.assertEqual(got, payload)
        grown = yield wait_for_counters(api2, client["id"], saved[client["id"]]["tcprx"] + len(payload))
        self.assertGreaterEqual(grown["tcprx"], 2 * len(payload))
        proc2.signal("TERM")
        status = yield proc2.wait_exit()
        self.exited_cleanly(status)
        final = state_instances(state_dir)
        self.assertGreaterEqual(final[client["id"]]["tcprx"], 2 * len(payload))
        # output to a pipe (a journal, a file) is plain, instance lines echoed by the master too
        self.assertIn(b"  INFO  Master started", proc2.raw)
        self.assertNotIn(b"\x1b[", proc.raw + proc2.raw)
        return state_dir, proc2

    def test_sigterm_saves_and_restart_restores(self) -> Any:
        """``python -m nodepass master://``: SIGTERM → shutdown event, exit 0, state kept; restart restores."""
        return self.run_lifecycle()


@inlineCallbacks
def wait_for_counters(api: MasterClient, instance_id: str, at_least: int) -> Any:
    """Poll the API until *instance_id* counted *at_least* received TCP bytes; return the instance."""
    item: dict[str, Any] = {}
    for _ in range(150):
        items = yield api.instances()
        item = items[instance_id]
        if item["tcprx"] >= at_least:
            return item
        yield sleep(0.2)
    raise AssertionError(f"counters never reached {at_least}: {item}")


class TwistdMasterTests(MasterProcessTests):
    """The same life cycle under ``twistd -n nodepass --master URL``."""

    def setUp(self) -> None:
        if not plugin_installed():
            raise SkipTest("the nodepass twistd plugin is not installed")

    def master_args(self, port: int) -> list[str]:
        return [
            "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
            "--nodaemon", "--pidfile=", "--logger", "nodepass.log.twistd_observer",
            "nodepass", "--master", f"master://127.0.0.1:{port}?log=info",
        ]

    def exited_cleanly(self, status: tuple[int | None, int | None]) -> None:
        # twistd ends a graceful SIGTERM shutdown by re-raising SIGTERM on itself
        # (systemd counts that as a clean stop); anything else is a failure.
        self.assertIn(status, [(0, None), (None, signal.SIGTERM)])


class BadInputTests(TestCase):
    """Bad requests and a corrupt state file lose nothing."""

    timeout = 120

    @inlineCallbacks
    def test_bad_requests_keep_master_and_state(self) -> Any:
        """Malformed, huge, deeply nested bodies, bad URLs, ids and meta: 4xx, nothing changes."""
        state_dir = new_dir(self)
        tunnel_port = free_port()
        proc = spawn(self, ["-m", "nodepass", "master://127.0.0.1:0?log=info"], state_dir)
        api = yield MasterClient(self, proc).connect()
        code, server = yield api.call(
            "POST", "/instances", {"url": f"server://127.0.0.1:{tunnel_port}/127.0.0.1:9", "alias": "keep"}
        )
        self.assertEqual(code, 201)
        sid = server["id"]
        code, _ = yield api.call(
            "PATCH", f"/instances/{sid}", {"meta": {"peer": {"type": "1"}, "tags": {"a": "b"}}}
        )
        self.assertEqual(code, 200)
        yield wait_for(lambda: state_instances(state_dir).get(sid, {}).get("meta", {}).get("tags"))
        before_state = state_instances(state_dir)
        before = yield api.instances()

        deep = b"[" * 100000 + b"]" * 100000
        bad: list[tuple[str, str, Any, bytes | None]] = [
            ("POST", "/instances", None, b"{not json"),
            ("POST", "/instances", None, b"\xff\xfe\x00garbage"),
            ("POST", "/instances", None, b"[]"),
            ("POST", "/instances", None, b'{"url": 5}'),
            ("POST", "/instances", None, b'{"url": "server://:1/x:2", "url": "server://:1/x:3"}'),
            ("POST", "/instances", None, b'{"url": "' + b"a" * (2 << 20) + b'"}'),
            ("POST", "/instances", None, deep),
            ("POST", "/instances", {"url": "ftp://127.0.0.1:1/127.0.0.1:2"}, None),
            ("POST", "/instances", {"url": "server://127.0.0.1:99999/127.0.0.1:2"}, None),
            ("POST", "/instances", {"url": "server://127.0.0.1:1/127.0.0.1:2?max=lots"}, None),
            ("POST", "/instances", {"url": "server://[::1/x"}, None),
            ("POST", "/instances", {"url": "server://h:1/" + "x" * 10000}, None),
            ("PATCH", f"/instances/{sid}", None, b"{oops"),
            ("PATCH", f"/instances/{sid}", None, deep),
            ("PATCH", f"/instances/{sid}", {"meta": {"peer": {"sid": "not-a-uuid"}}}, None),
            ("PATCH", f"/instances/{sid}", {"meta": {"peer": {"type": "t" * 300}}}, None),
            ("PATCH", f"/instances/{sid}", {"meta": {"tags": {"k": 5}}}, None),
            ("PATCH", f"/instances/{sid}", {"meta": {"tags": ["x"]}}, None),
            ("PATCH", f"/instances/{sid}", {"meta": "x", "alias": "changed"}, None),
            ("PATCH", f"/instances/{sid}", {"meta": {"tags": {"k" * 300: "v"}}, "alias": "changed"}, None),
            ("PATCH", f"/instances/{sid}", {"alias": "changed", "action": "explode"}, None),
            ("PATCH", f"/instances/{sid}", None, b'{"meta": {"tags": {"a": "1", "a": "2"}}}'),
            ("PUT", f"/instances/{sid}", None, b"nope"),
            ("PUT", f"/instances/{sid}", {"url": "client://"}, None),
            ("PUT", f"/instances/{sid}", {"url": "server://127.0.0.1:1/127.0.0.1:2?tls=9"}, None),
            ("GET", "/instances/zzzzzzzz", None, None),
            ("GET", "/instances/" + "a" * 5000, None, None),
            ("DELETE", "/instances/%00%ff", None, None),
            ("PATCH", "/instances/../instances", {"action": "stop"}, None),
            ("DELETE", "/instances/", None, None),
        ]
        wrong = []
        for method, path, body, raw in bad:
            code, answer = yield api.call(method, path, body, raw)
            if code not in (400, 404, 405, 409) or not (isinstance(answer, dict) and "error" in answer):
                if (method, path, code) == ("DELETE", "/instances/%00%ff", 400):
                    continue  # refused by the web framework before routing (plain-text 400)
                wrong.append((method, path[:40], repr(body or raw or b"")[:40], code, answer))
        self.assertEqual(wrong, [])
        # raw protocol garbage on the API port
        port = int(api.base.split(":")[2].split("/")[0])
        answer = yield raw_request(port, b"GARBAGE \x00\xff\r\n\r\n", until=b"HTTP/1.1 400")
        self.assertIn(b"400", answer)

        self.assertTrue(proc.running)
        after = yield api.instances()
        for field in ("alias", "url", "config", "meta", "restart", "status"):
            self.assertEqual(after[sid][field], before[sid][field], field)
        self.assertEqual(set(after), set(before))
        code, _ = yield api.call("PATCH", f"/instances/{sid}", {"alias": "still-works"})
        self.assertEqual(code, 200)
        yield wait_for(lambda: state_instances(state_dir).get(sid, {}).get("alias") == "still-works")
        now_state = state_instances(state_dir)
        self.assertEqual(set(now_state), set(before_state))
        self.assertEqual(now_state[sid]["meta"], before_state[sid]["meta"])
        self.assertNotIn("Traceback", proc.text)
        yield terminated_cleanly(self, proc)

    @inlineCallbacks
    def test_corrupt_state_falls_back_to_backup(self) -> Any:
        """A main state file truncated while the master is down: the backup is loaded, with ERROR lines."""
        state_dir = new_dir(self)
        tunnel_port = free_port()
        args = ["-m", "nodepass", "master://127.0.0.1:0?log=info"]
        proc = spawn(self, args, state_dir)
        api = yield MasterClient(self, proc).connect()
        code, server = yield api.call(
            "POST", "/instances", {"url": f"server://127.0.0.1:{tunnel_port}/127.0.0.1:9", "alias": "precious"}
        )
        self.assertEqual(code, 201)
        yield terminated_cleanly(self, proc)
        # the disk mangles the main file while the master is down
        path = os.path.join(state_dir, "nodepass.json")
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)

        proc2 = spawn(self, args, state_dir)
        api2 = yield MasterClient(self, proc2).connect()
        self.assertIsNotNone(proc2.search(r"ERROR\s+State file unreadable: .*nodepass\.json"), proc2.text)
        self.assertIsNotNone(proc2.search(r"State restored from backup"), proc2.text)
        self.assertEqual((api2.key_word, api2.key), ("loaded", api.key))
        items = yield api2.instances()
        self.assertEqual(list(items), [server["id"]])
        self.assertEqual(items[server["id"]]["alias"], "precious")
        self.assertEqual(items[server["id"]]["status"], "running")
        self.assertTrue(os.path.exists(path + ".corrupt"))
        # the main file is whole again
        yield wait_for(lambda: server["id"] in state_instances(state_dir))
        yield terminated_cleanly(self, proc2)


class CrashTests(TestCase):
    """SIGKILL in the middle of a burst of saves leaves a whole, loadable state file."""

    timeout = 120

    @inlineCallbacks
    def test_sigkill_during_saves(self) -> Any:
        """SIGKILL during a burst of PATCHes: the state file parses and loads; temporaries are cleaned."""
        state_dir = new_dir(self)
        args = ["-m", "nodepass", "master://127.0.0.1:0?log=info"]
        proc = spawn(self, args, state_dir)
        api = yield MasterClient(self, proc).connect()
        code, server = yield api.call(
            "POST", "/instances", {"url": f"server://127.0.0.1:{free_port()}/127.0.0.1:9", "alias": "a0"}
        )
        self.assertEqual(code, 201)
        pending = [
            api.call("PATCH", f"/instances/{server['id']}", {"alias": f"a{i}", "meta": {"tags": {"i": str(i)}}})
            for i in range(1, 60)
        ]
        for d in pending:
            d.addErrback(lambda _: None)  # the requests in flight fail when the process dies
        yield wait_for(lambda: len([d for d in pending if d.called]) >= 10, timeout=60)
        proc.signal("KILL")
        status = yield proc.wait_exit()
        self.assertEqual(status, (None, signal.SIGKILL))
        yield DeferredList(pending)  # every request ends (answered or refused) before we go on
        saved = state_instances(state_dir)  # parses: never half-written
        self.assertEqual(list(saved), [server["id"]])
        self.assertRegex(saved[server["id"]]["alias"], r"^a\d+$")

        proc2 = spawn(self, args, state_dir)
        api2 = yield MasterClient(self, proc2).connect()
        self.assertEqual((api2.key_word, api2.key), ("loaded", api.key))
        items = yield api2.instances()
        self.assertEqual(items[server["id"]]["alias"], saved[server["id"]]["alias"])
        self.assertEqual([n for n in os.listdir(state_dir) if n.endswith(".tmp")], [])
        yield terminated_cleanly(self, proc2)


class TunnelProcessTests(TestCase):
    """``python -m nodepass server://…`` and ``client://…`` as two processes."""

    timeout = 120

    @inlineCallbacks
    def test_two_processes_carry_traffic_and_stop_on_sigint(self) -> Any:
        """Echo traffic across two processes; garbage and silent peers on the tunnel port; SIGINT → exit 0."""
        work = new_dir(self)
        echo_port = echo_server(self)
        tunnel_port, local_port = free_ports(2)
        server = spawn(
            self, ["-m", "nodepass", f"server://pw@127.0.0.1:{tunnel_port}/127.0.0.1:{echo_port}?log=info"], work,
            NP_HANDSHAKE_TIMEOUT="2s",
        )
        yield server.wait_line("Pending tunnel handshake")  # the tunnel port listens
        # garbage before any client: each connection is refused and closed by the server
        # (b"" and a partial request: silent peers are closed after NP_HANDSHAKE_TIMEOUT)
        junks = (b"\x00" * 4096, b"GET / HTTP/1.1\r\n\r\n", os.urandom(2048), b"\r\n" * 100, b"", b"GET / HTTP/1.1\r\n")
        results = yield DeferredList(
            [raw_garbage(tunnel_port, junk, must_close=True, wait=20) for junk in junks], consumeErrors=True
        )
        self.assertEqual([r for ok, r in results if not ok], [])
        client = spawn(
            self, ["-m", "nodepass", f"client://pw@127.0.0.1:{tunnel_port}/127.0.0.1:{local_port}?min=2"], work
        )
        yield client.wait_line("Client started")
        payload = b"two-processes " * 5000
        got = yield echo_roundtrip(local_port, payload)
        self.assertEqual(got, payload)

        # garbage on the tunnel port once the tunnel is up: nothing else is disturbed
        for junk in (b"\x00" * 4096, b"GET / HTTP/1.1\r\n\r\n", os.urandom(2048), b"\r\n" * 100):
            yield raw_garbage(tunnel_port, junk)
        got = yield echo_roundtrip(local_port, payload)
        self.assertEqual(got, payload)
        self.assertTrue(server.running and client.running)

        for proc, word in ((client, "Client"), (server, "Server")):
            proc.signal("INT")
            status = yield proc.wait_exit()
            self.assertEqual(status, (0, None), proc.text)
            self.assertIn(f"{word} shutdown complete", proc.text)
            self.assertNotIn("Traceback", proc.text)


@inlineCallbacks
def raw_garbage(port: int, junk: bytes, *, must_close: bool = False, wait: float = 1.0) -> Any:
    """Connect, send *junk*, and wait until the peer closes (or, unless *must_close*, close ourselves)."""
    closed: list[bool] = []

    class _P(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.write(junk)  # type: ignore[union-attr]

        def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
            closed.append(True)

    proto = yield endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), _P())
    try:
        yield wait_for(lambda: closed, timeout=wait)
    except AssertionError:
        if must_close:
            raise
        proto.transport.abortConnection()
