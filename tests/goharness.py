"""Run the Go NodePass v1.14.0 binary and our implementation side by side (interop tests).

This module holds no test cases. It offers:

* **Locating the Go peer**: ``$NODEPASS_GO_PEER`` if set, else
  ``../shared/peers/nodepass-go-v1.14.0`` next to the repository root (or
  next to the main checkout when this tree is a linked git worktree).
  :func:`skip_unless_go` raises ``SkipTest`` saying what is missing, so tests
  that need the binary skip cleanly on a fresh clone.
* **Peers with one interface** (:class:`Peer`): a child process running a URL
  with the Go binary (:func:`run_go`; in master mode a copy of the binary in
  a temporary directory is run, since Go writes ``gob/`` next to it) or with
  ``python -m nodepass`` (:func:`run_ours`), or our tunnel service in this
  process on the test's reactor (:class:`InProcessPeer`).  Each keeps its log
  lines (ANSI colour codes removed), waits for patterns, parses CHECK_POINT
  lines, and stops with SIGTERM then SIGKILL (processes; registered with
  ``addCleanup``).  :func:`launch` picks the kind by name: ``"go"``,
  ``"ours"`` (subprocess) or ``"inproc"``.
* **Pairs** (:class:`TunnelPair`): a server and a client of any two kinds for
  any pool ``type`` and ``tls`` code, reverse (flow ``-``, server mode 1) or
  forward (flow ``+``, server mode 2, the client listens), wired to echo
  targets (TCP echo and a UDP echo that prefixes its answers).
* **Traffic** (:func:`exercise` and the helpers below it): a first echo
  retried within a budget (Go holds user traffic until its certificate
  ``verify`` succeeds on a report tick, and a simultaneous verify makes both
  ends restart once), time to first byte, a 1 MiB echo checked by SHA-256,
  concurrent echoes, UDP datagrams both ways, and the traffic counters of
  both ends compared with the bytes moved.

Every peer gets ``NP_REPORT_INTERVAL=1s`` and ``NP_SERVICE_COOLDOWN=1s`` (see
:data:`PEER_ENV`), so verify, CHECK_POINT lines and restarts come quickly;
``NP_*``, ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` from the caller's environment
are not passed on, so runs do not depend on it.

Measured results (time to first byte, ...) are written to the trial log and,
when ``$NODEPASS_INTEROP_REPORT`` names a file, appended to it as JSON lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.protocol import Protocol
from twisted.python import log as twisted_log
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from tests.support import UdpEcho, connect, echo_server, free_ports, new_dir, reactor, sleep, udp_user, wait_for

__all__ = [
    "ROOT",
    "GO_PEER_ENV",
    "GO_PEER_DEFAULT",
    "PEER_ENV",
    "REPORT_INTERVAL",
    "FIRST_BYTE_BUDGET",
    "go_peer_path",
    "go_peer_problem",
    "skip_unless_go",
    "Traffic",
    "CheckPoint",
    "Peer",
    "PeerProcess",
    "InProcessPeer",
    "peer_env",
    "run_go",
    "run_ours",
    "launch",
    "run_master",
    "MasterAPI",
    "MasterInstance",
    "TunnelPair",
    "EchoUser",
    "Probe",
    "probe",
    "echo_once",
    "echo_many",
    "udp_exchange",
    "settled_traffic",
    "wait_traffic",
    "exercise",
    "record",
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GO_PEER_ENV = "NODEPASS_GO_PEER"
GO_PEER_NAME = "nodepass-go-v1.14.0"
GO_PEER_DEFAULT = os.path.normpath(os.path.join(ROOT, "..", "shared", "peers", GO_PEER_NAME))
REPORT_ENV = "NODEPASS_INTEROP_REPORT"

REPORT_INTERVAL = 1.0
"""Seconds between health rounds / CHECK_POINT lines of every peer (``NP_REPORT_INTERVAL``)."""

PEER_ENV: dict[str, str] = {
    "NP_REPORT_INTERVAL": "1s",
    "NP_SERVICE_COOLDOWN": "1s",
    "NP_SHUTDOWN_TIMEOUT": "3s",
}
"""Environment every peer starts with (callers may add or override entries)."""

START_TIMEOUT = 60.0
"""How long a peer may take to print a start-up line (interpreter start on a busy machine)."""

STOP_GRACE = 8.0
"""Seconds between SIGTERM and SIGKILL when stopping a peer process."""

FIRST_BYTE_BUDGET = 90.0
"""Seconds from the start of a pair until its first echo must have come back.

Go needs up to about 30 s (verify on a report tick, a simultaneous-verify
restart, a second verify, or a lost handshake answer and the server's
handshake timeout); the rest is headroom for interpreter start-up and TLS
pool set-up on a heavily loaded machine.  A liveness bound, not a timing
assertion: the measured time is reported, never asserted."""

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CHECKPOINT = re.compile(
    r"CHECK_POINT\|MODE=(\d+)\|PING=(\d+)ms\|POOL=(\d+)\|TCPS=(\d+)\|UDPS=(\d+)"
    r"\|TCPRX=(\d+)\|TCPTX=(\d+)\|UDPRX=(\d+)\|UDPTX=(\d+)"
)


# -- the Go binary --------------------------------------------------------------------------------
def _main_checkout(root: str) -> str | None:
    """The main checkout when *root* is a linked git worktree (its ``.git`` is a ``gitdir:`` file)."""
    try:
        with open(os.path.join(root, ".git"), encoding="utf-8") as handle:
            text = handle.read().strip()
    except OSError:  # no .git, or a directory: a plain clone
        return None
    gitdir = text.removeprefix("gitdir:").strip()
    parts = os.path.normpath(gitdir).split(os.sep)
    if len(parts) >= 3 and parts[-2] == "worktrees" and parts[-3] == ".git":
        return os.sep.join(parts[:-3]) or os.sep
    return None


def go_peer_path() -> str:
    """Where the Go binary is expected.

    ``$NODEPASS_GO_PEER`` when set; else ``../shared/peers/nodepass-go-v1.14.0``
    from the repository root, or from the main checkout when this tree is a
    linked git worktree and only the latter has it.
    """
    override = os.environ.get(GO_PEER_ENV)
    if override:
        return override
    main = _main_checkout(ROOT)
    if not os.path.exists(GO_PEER_DEFAULT) and main is not None:
        candidate = os.path.normpath(os.path.join(main, "..", "shared", "peers", GO_PEER_NAME))
        if os.path.exists(candidate):
            return candidate
    return GO_PEER_DEFAULT


def go_peer_problem() -> str | None:
    """Why the Go binary cannot be used (None when it can)."""
    path = go_peer_path()
    where = f"{path} (set {GO_PEER_ENV} to use another)"
    if not os.path.exists(path):
        return f"Go NodePass v1.14.0 peer not found at {where}"
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        return f"Go NodePass v1.14.0 peer at {where} is not an executable file"
    return None


def skip_unless_go() -> str:
    """The Go binary's path; raises ``SkipTest`` with the reason when it is unusable."""
    problem = go_peer_problem()
    if problem is not None:
        raise SkipTest(problem)
    return go_peer_path()


# -- counters ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Traffic:
    """The four cumulative byte counters of a tunnel end."""

    tcprx: int = 0
    tcptx: int = 0
    udprx: int = 0
    udptx: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.tcprx + other.tcprx, self.tcptx + other.tcptx,
                       self.udprx + other.udprx, self.udptx + other.udptx)

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(self.tcprx - other.tcprx, self.tcptx - other.tcptx,
                       self.udprx - other.udprx, self.udptx - other.udptx)

    def mirrored(self) -> Traffic:
        """The same bytes seen from the other end: RX and TX swapped."""
        return Traffic(self.tcptx, self.tcprx, self.udptx, self.udprx)


@dataclass(frozen=True)
class CheckPoint:
    """One parsed ``CHECK_POINT|MODE=..|PING=..ms|POOL=..|...`` line."""

    mode: int
    ping: int
    pool: int
    tcps: int
    udps: int
    traffic: Traffic

    @classmethod
    def parse(cls, line: str) -> CheckPoint | None:
        """The CHECK_POINT in *line*, or None when the line has none."""
        m = _CHECKPOINT.search(line)
        if m is None:
            return None
        n = [int(g) for g in m.groups()]
        return cls(n[0], n[1], n[2], n[3], n[4], Traffic(n[5], n[6], n[7], n[8]))


# -- peers ------------------------------------------------------------------------------------------
class Peer:
    """Log lines of one running NodePass end and what can be read from them.

    Subclasses feed :meth:`_line` and implement :attr:`alive` and :meth:`stop`.
    Positions returned by :meth:`mark` let a caller wait for lines logged
    after some moment only.
    """

    kind = "peer"

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url
        self.lines: list[str] = []
        self.started = reactor.seconds()

    def _line(self, text: str) -> None:
        self.lines.append(text)

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    def stop(self) -> defer.Deferred[Any]:
        """Stop this end; fires with ``(exit code, signal)`` for a process, None otherwise."""
        raise NotImplementedError

    # -- reading ------------------------------------------------------------------------------
    def mark(self) -> int:
        """The position after the last line seen so far."""
        return len(self.lines)

    def grep(self, pattern: str | re.Pattern[str], start: int = 0) -> list[str]:
        """Lines from *start* on that match *pattern* (``re.search``)."""
        return [line for line in self.lines[start:] if re.search(pattern, line)]

    def search(self, pattern: str | re.Pattern[str], start: int = 0) -> re.Match[str] | None:
        """The first match of *pattern* in the lines from *start* on."""
        for line in self.lines[start:]:
            m = re.search(pattern, line)
            if m:
                return m
        return None

    def tail(self, count: int = 40) -> str:
        """The last *count* lines, for failure messages."""
        return "\n".join(self.lines[-count:])

    def describe(self) -> str:
        return f"{self.name} [{self.kind}] {self.url}"

    def keep_log(self, test: TestCase) -> None:
        """At *test*'s cleanup (after the later-registered stop), write the lines to
        ``<test temp dir>/<name>.log``, so passing runs can be inspected too."""
        path = os.path.abspath(str(test.mktemp()))  # type: ignore[no-untyped-call]

        def save() -> None:
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, f"{self.name}.log"), "w", encoding="utf-8") as handle:
                handle.write(f"# {self.describe()}\n" + "\n".join(self.lines) + "\n")

        test.addCleanup(save)

    def wait_until(self, cond: Callable[[], Any], what: str, timeout: float = START_TIMEOUT) -> defer.Deferred[Any]:
        """Poll *cond* until it returns a true value (returned); fail with the log tail after *timeout*."""

        def check() -> Any:
            value = cond()
            if not value and not self.alive:
                raise AssertionError(f"{self.describe()} ended while waiting for {what}:\n{self.tail()}")
            return value

        def explain(failure: Failure) -> Failure:
            if failure.check(AssertionError) and "ended while" not in str(failure.value):
                raise AssertionError(f"{self.describe()}: {failure.value}\n--- last lines:\n{self.tail()}")
            return failure

        return wait_for(check, timeout=timeout, what=what, step=0.05).addErrback(explain)

    def wait_line(self, pattern: str | re.Pattern[str], timeout: float = START_TIMEOUT,
                  start: int = 0) -> defer.Deferred[re.Match[str]]:
        """Fires with the first match of *pattern* in a line at position *start* or later."""
        return self.wait_until(lambda: self.search(pattern, start), f"a line matching {pattern!r}", timeout)

    def wait_count(self, pattern: str | re.Pattern[str], count: int, timeout: float = START_TIMEOUT,
                   start: int = 0) -> defer.Deferred[Any]:
        """Wait until *count* lines from *start* on match *pattern*."""
        return self.wait_until(lambda: len(self.grep(pattern, start)) >= count,
                               f"{count} lines matching {pattern!r}", timeout)

    def checkpoints(self, start: int = 0) -> list[CheckPoint]:
        """Every CHECK_POINT logged from position *start* on, in order."""
        out = []
        for line in self.lines[start:]:
            cp = CheckPoint.parse(line)
            if cp is not None:
                out.append(cp)
        return out

    def traffic(self) -> Traffic:
        """The counters of the latest CHECK_POINT line (all zero before the first)."""
        cps = self.checkpoints()
        return cps[-1].traffic if cps else Traffic()


class PeerProcess(Peer, protocol.ProcessProtocol):
    """A peer running as a child process; stdout and stderr both feed its lines."""

    kind = "process"

    def __init__(self, name: str, url: str) -> None:
        Peer.__init__(self, name, url)
        self._partial = b""
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None

    def outReceived(self, data: bytes) -> None:
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        for raw in complete:
            self._line(_ANSI.sub("", raw.decode("utf-8", "replace")).rstrip("\r"))

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if self._partial:
            self.outReceived(b"\n")
        self.reason = reason
        self.ended.callback(None)

    @property
    def alive(self) -> bool:
        return self.reason is None

    @property
    def pid(self) -> int | None:
        return getattr(self.transport, "pid", None)

    @property
    def exit_status(self) -> tuple[int | None, int | None] | None:
        """``(exit code, signal)`` once ended, else None."""
        if self.reason is None:
            return None
        value = self.reason.value
        return getattr(value, "exitCode", None), getattr(value, "signal", None)

    def signal(self, name: str) -> None:
        """Send signal *name* (``"TERM"``, ``"KILL"``, ...) if still running."""
        if self.alive and self.transport is not None:
            self.transport.signalProcess(name)

    @defer.inlineCallbacks
    def stop(self, grace: float = STOP_GRACE) -> Any:
        """SIGTERM, then SIGKILL after *grace* seconds; fires with :attr:`exit_status`."""
        if self.alive:
            self.signal("TERM")
            waited = 0.0
            while self.alive and waited < grace:
                yield sleep(0.05)
                waited += 0.05
            if self.alive:
                self.signal("KILL")
                yield self.ended
        return self.exit_status


def peer_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a peer: ours minus ``NP_*``/``SSL_CERT_*``, plus :data:`PEER_ENV` and *extra*."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("NP_") and k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    env.update(PEER_ENV)
    env.update(extra or {})
    return env


def _spawn(test: TestCase, name: str, url: str, argv: Sequence[str], env: Mapping[str, str], cwd: str) -> PeerProcess:
    proc = PeerProcess(name, url)
    proc.keep_log(test)
    reactor.spawnProcess(proc, argv[0], list(argv), env=dict(env), path=cwd)
    test.addCleanup(proc.stop)
    return proc


def run_go(test: TestCase, url: str, *, env: Mapping[str, str] | None = None, name: str = "go",
           master: bool = False, cwd: str | None = None) -> PeerProcess:
    """Run *url* with the Go binary (skipping the test when it is unusable).

    The process runs in a new temporary directory (or *cwd*). With *master*
    the binary is first copied there and the copy runs, so its ``gob/``
    state lands in the temporary directory.
    """
    binary = skip_unless_go()
    workdir = cwd or new_dir(test)
    if master:
        copy = os.path.join(workdir, os.path.basename(binary))
        shutil.copyfile(binary, copy)
        os.chmod(copy, 0o755)
        binary = copy
    return _spawn(test, name, url, [binary, url], peer_env(env), workdir)


def run_ours(test: TestCase, url: str, *, env: Mapping[str, str] | None = None, name: str = "ours",
             cwd: str | None = None) -> PeerProcess:
    """Run *url* with ``python -m nodepass`` (this interpreter, this tree) in a new temporary directory."""
    workdir = cwd or new_dir(test)
    full = peer_env({"PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1", "NP_STATE_DIR": workdir, **(env or {})})
    return _spawn(test, name, url, [sys.executable, "-m", "nodepass", url], full, workdir)


class InProcessPeer(Peer):
    """Our tunnel service for *url* on the test's reactor, logging into :attr:`lines`.

    Settings come from :func:`peer_env` (*env* applied), as for a process.
    :meth:`traffic` reads the live counters of the service (the numbers the
    master reports), not the last CHECK_POINT line.  Stopped at cleanup.
    """

    kind = "in-process"

    def __init__(self, test: TestCase, url: str, *, env: Mapping[str, str] | None = None, name: str = "ours") -> None:
        from nodepass.env import Settings
        from nodepass.log import NodePassLogger, format_line
        from nodepass.tunnel import make_tunnel_service
        from nodepass.url import parse_tunnel_url

        super().__init__(name, url)
        config = parse_tunnel_url(url)
        self.settings = Settings.from_environ(peer_env(env))
        self.logger = NodePassLogger(config.log or "info", stream=None)
        self.logger.add_observer(lambda r: self._line(format_line(r.level, r.text, r.time, colour=False)))
        self.service = make_tunnel_service(config, reactor=reactor, logger=self.logger, settings=self.settings)
        self.keep_log(test)
        self.service.startService()
        test.addCleanup(self.stop)

    @property
    def alive(self) -> bool:
        return bool(self.service.running)

    def stop(self) -> defer.Deferred[Any]:
        if not self.service.running:
            return defer.succeed(None)
        return defer.maybeDeferred(self.service.stopService).addCallback(lambda _: None)

    def traffic(self) -> Traffic:
        s = self.service.stats
        return Traffic(s.tcprx, s.tcptx, s.udprx, s.udptx)


KINDS = ("go", "ours", "inproc")


def launch(test: TestCase, kind: str, url: str, *, env: Mapping[str, str] | None = None, name: str = "") -> Peer:
    """Start *url* as a peer of *kind*: ``"go"``, ``"ours"`` (subprocess) or ``"inproc"``."""
    name = name or kind
    if kind == "go":
        return run_go(test, url, env=env, name=name)
    if kind == "ours":
        return run_ours(test, url, env=env, name=name)
    if kind == "inproc":
        return InProcessPeer(test, url, env=env, name=name)
    raise ValueError(f"unknown peer kind {kind!r}; expected one of {KINDS}")


# -- masters ----------------------------------------------------------------------------------------
_MASTER_STARTED = re.compile(r"Master started: (\S+):(\d+)(/\S*)")
_API_KEY = re.compile(r"API Key (?:created|loaded): ([0-9a-f]{32})")


def run_master(test: TestCase, kind: str, *, prefix: str = "/api", env: Mapping[str, str] | None = None,
               name: str = "") -> PeerProcess:
    """Start a plain-HTTP ``master://`` on a free port with the Go binary (*kind* ``"go"``) or ours
    (``"ours"``); use :meth:`MasterAPI.connect` on the result."""
    port = free_ports(1)[0]
    url = f"master://127.0.0.1:{port}{prefix}?log=debug"
    if kind == "go":
        return run_go(test, url, env=env, name=name or "go-master", master=True)
    if kind == "ours":
        return run_ours(test, url, env=env, name=name or "ours-master")
    raise ValueError(f"a master runs as 'go' or 'ours', not {kind!r}")


class MasterAPI:
    """treq against a master process found from its start-up lines, plus its event stream.

    :meth:`create` adds an instance and returns a :class:`MasterInstance`
    peer fed by the ``/events`` stream.
    """

    def __init__(self, test: TestCase, process: PeerProcess, base: str, key: str) -> None:
        from twisted.web.client import HTTPConnectionPool

        self.test = test
        self.process = process
        self.base = base
        self.key = key
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.events: list[dict[str, Any]] = []
        self.instances: dict[str, MasterInstance] = {}
        self._buffer = b""

    @classmethod
    @defer.inlineCallbacks
    def connect(cls, test: TestCase, process: PeerProcess) -> Any:
        """Wait for the master's ``Master started`` and API key lines; subscribe to ``/events``."""
        started = yield process.wait_line(_MASTER_STARTED)
        key = yield process.wait_line(_API_KEY)
        api = cls(test, process, f"http://127.0.0.1:{started.group(2)}{started.group(3)}", key.group(1))
        yield api._subscribe()
        return api

    @defer.inlineCallbacks
    def call(self, method: str, path: str, body: Any = None) -> Any:
        """``(status code, decoded JSON or None)`` of one request with the API key."""
        import treq

        data = json.dumps(body).encode() if body is not None else None
        headers = {"X-API-Key": [self.key], "Content-Type": ["application/json"]}
        response = yield treq.request(method, self.base + path, data=data, headers=headers, pool=self.pool)
        content = yield treq.content(response)
        return response.code, (json.loads(content) if content else None)

    @defer.inlineCallbacks
    def _subscribe(self) -> Any:
        import treq

        response = yield treq.get(self.base + "/events", headers={"X-API-Key": [self.key]}, pool=self.pool,
                                  unbuffered=True)
        treq.collect(response, self._feed).addErrback(lambda _: None)

    def _feed(self, data: bytes) -> None:
        self._buffer += data
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            for line in block.decode("utf-8", "replace").split("\n"):
                if line.startswith("data: "):
                    event = json.loads(line[len("data: "):])
                    self.events.append(event)
                    peer = self.instances.get((event.get("instance") or {}).get("id", ""))
                    if peer is not None:
                        peer._event(event)

    @defer.inlineCallbacks
    def create(self, url: str, name: str = "") -> Any:
        """POST an instance for *url*; fires with its :class:`MasterInstance` (fails on a non-201)."""
        code, body = yield self.call("POST", "/instances", {"url": url})
        if code != 201:
            raise AssertionError(f"{self.process.name}: POST /instances answered {code} {body}")
        peer = MasterInstance(self, body["id"], url, name or f"{self.process.name}-{body['id']}")
        peer.keep_log(self.test)
        self.instances[body["id"]] = peer
        for event in self.events:  # events that arrived before the answer
            if (event.get("instance") or {}).get("id") == body["id"]:
                peer._event(event)
        return peer


class MasterInstance(Peer):
    """An instance of a master, seen through the master's event stream as a dashboard sees it.

    ``log`` events feed its lines; every ``update`` event adds a CHECK_POINT
    line made from the instance's counters, so the :class:`Peer` helpers read
    the numbers the master reports.  Stopping it stops the instance (PATCH).
    """

    kind = "master instance"

    def __init__(self, api: MasterAPI, instance_id: str, url: str, name: str) -> None:
        super().__init__(name, url)
        self.api = api
        self.id = instance_id
        self.instance: dict[str, Any] = {}

    def _event(self, event: dict[str, Any]) -> None:
        if event.get("instance"):
            self.instance = event["instance"]
        if event.get("type") == "log":
            for text in str(event.get("logs") or "").splitlines():
                self._line(_ANSI.sub("", text))
        elif event.get("type") == "update":
            i = self.instance
            self._line("(update event) CHECK_POINT|MODE={mode}|PING={ping}ms|POOL={pool}|TCPS={tcps}|UDPS={udps}"
                       "|TCPRX={tcprx}|TCPTX={tcptx}|UDPRX={udprx}|UDPTX={udptx}".format(**i))

    @property
    def alive(self) -> bool:
        return self.api.process.alive

    def stop(self) -> defer.Deferred[Any]:
        return self.api.call("PATCH", f"/instances/{self.id}", {"action": "stop"}).addCallback(lambda _: None)


# -- pairs ------------------------------------------------------------------------------------------
UDP_PREFIX = b"echo:"
"""What the UDP echo target puts before each answer (so the two directions differ in size)."""


class PrefixUdpEcho(UdpEcho):
    """UDP echo that answers ``UDP_PREFIX + datagram``."""

    prefix = UDP_PREFIX


def _kind_name(kind: str | MasterAPI) -> str:
    return kind.process.name if isinstance(kind, MasterAPI) else kind


class TunnelPair:
    """A server and a client of chosen kinds, wired to echo targets on 127.0.0.1.

    *server* / *client* are peer kinds (see :func:`launch`) or a
    :class:`MasterAPI`, whose master then runs that end as an instance.  *flow* ``"-"``
    (reverse): server mode 1 listens for users on :attr:`user_port`, the
    client dials the targets.  *flow* ``"+"`` (forward): server mode 2 dials
    the targets, the client listens on :attr:`user_port`.  *tls* and *type*
    go into the server URL (``tls=2`` needs ``crt``/``key`` in
    *server_params*).  *server_params* / *client_params* are appended to the
    query (``&name=value...``); *env* applies to both ends, *server_env* /
    *client_env* to one.  Every URL has ``log=debug`` so failures show all.
    """

    def __init__(
        self,
        test: TestCase,
        *,
        server: str | MasterAPI,
        client: str | MasterAPI,
        flow: str = "-",
        tls: int = 0,
        type: int = 0,
        key: str = "interop",
        server_params: str = "",
        client_params: str = "",
        env: Mapping[str, str] | None = None,
        server_env: Mapping[str, str] | None = None,
        client_env: Mapping[str, str] | None = None,
        label: str = "",
    ) -> None:
        if flow not in ("-", "+"):
            raise ValueError(f"flow must be '-' or '+', not {flow!r}")
        self.test = test
        self.server_kind = server
        self.client_kind = client
        self.flow = flow
        self.tls = tls
        self.type = type
        self.tunnel_port, self.user_port, self.target_port = free_ports(3)
        echo_server(test, self.target_port)
        self.udp_echo = PrefixUdpEcho()
        udp = reactor.listenUDP(self.target_port, self.udp_echo, interface="127.0.0.1", maxPacketSize=65536)
        test.addCleanup(udp.stopListening)
        reverse = flow == "-"
        server_target = self.user_port if reverse else self.target_port
        client_target = self.target_port if reverse else self.user_port
        self.server_url = (f"server://{key}@127.0.0.1:{self.tunnel_port}/127.0.0.1:{server_target}"
                           f"?log=debug&tls={tls}&type={type}&mode={1 if reverse else 2}{server_params}")
        self.client_url = (f"client://{key}@127.0.0.1:{self.tunnel_port}/127.0.0.1:{client_target}"
                           f"?log=debug&mode=2{client_params}")
        self.server_env = {**(env or {}), **(server_env or {})}
        self.client_env = {**(env or {}), **(client_env or {})}
        self.label = label or (f"{_kind_name(server)} server + {_kind_name(client)} client, type={type} tls={tls} "
                               f"{'reverse' if reverse else 'forward'}")
        self.server: Peer | None = None
        self.client: Peer | None = None
        self.t0 = 0.0

    # -- ends -----------------------------------------------------------------------------------
    def _launch(self, kind: str | MasterAPI, url: str, env: Mapping[str, str], role: str) -> defer.Deferred[Peer]:
        name = f"{_kind_name(kind)}-{role}"
        if isinstance(kind, MasterAPI):
            return kind.create(url, name)  # type: ignore[no-any-return]
        return defer.succeed(launch(self.test, kind, url, env=env, name=name))

    @defer.inlineCallbacks
    def start_server(self) -> Any:
        """Start the server end; fires with its :class:`Peer`."""
        self.server = yield self._launch(self.server_kind, self.server_url, self.server_env, "server")
        return self.server

    @defer.inlineCallbacks
    def start_client(self) -> Any:
        """Start the client end; fires with its :class:`Peer`."""
        self.client = yield self._launch(self.client_kind, self.client_url, self.client_env, "client")
        return self.client

    @defer.inlineCallbacks
    def start(self) -> Any:
        """Start the server, wait until it awaits the handshake, start the client; sets :attr:`t0`."""
        self.t0 = reactor.seconds()
        server = yield self.start_server()
        yield server.wait_line("Pending tunnel handshake")
        yield self.start_client()
        return self

    @defer.inlineCallbacks
    def restart(self, which: str) -> Any:
        """Stop end *which* (``"server"``/``"client"``) and start it again with the same URL.

        Fires with the exit status of the stopped end (None for in-process ends).
        """
        old: Peer | None = getattr(self, which)
        assert old is not None
        status = yield old.stop()
        yield self.start_server() if which == "server" else self.start_client()
        return status

    @property
    def ingress(self) -> Peer:
        """The end where users connect (server for flow ``-``, client for ``+``)."""
        peer = self.server if self.flow == "-" else self.client
        assert peer is not None
        return peer

    @property
    def egress(self) -> Peer:
        """The end that dials the targets."""
        peer = self.client if self.flow == "-" else self.server
        assert peer is not None
        return peer

    @property
    def peers(self) -> list[Peer]:
        return [p for p in (self.server, self.client) if p is not None]

    def logs(self) -> str:
        """Both ends' last lines, for failure messages."""
        return "\n".join(f"--- {p.describe()}\n{p.tail()}" for p in self.peers)


# -- users ------------------------------------------------------------------------------------------
class EchoUser(Protocol):
    """A user connection: writes *payload* once connected, collects the answer.

    :attr:`done` fires (with the bytes) once *expect* bytes arrived or the
    connection was lost, whichever comes first; :attr:`first_byte` is the
    reactor time of the first answer byte.
    """

    def __init__(self, payload: bytes, expect: int | None = None) -> None:
        self.payload = payload
        self.expect = len(payload) if expect is None else expect
        self.chunks: list[bytes] = []
        self.size = 0
        self.first_byte: float | None = None
        self.lost = False
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self.payload:
            self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        if self.first_byte is None:
            self.first_byte = reactor.seconds()
        self.chunks.append(data)
        self.size += len(data)
        if self.size >= self.expect and not self.done.called:
            self.done.callback(self.data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        if not self.done.called:
            self.done.callback(self.data)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abortConnection()  # type: ignore[attr-defined]


@defer.inlineCallbacks
def echo_once(port: int, payload: bytes, timeout: float = 30.0) -> Any:
    """Send *payload* through 127.0.0.1:*port* and return the answer (once as long, or at close/timeout)."""
    user = EchoUser(payload)
    yield connect(port, user, timeout=timeout)
    timer = reactor.callLater(timeout, user.close)
    try:
        data = yield user.done
    finally:
        if timer.active():
            timer.cancel()
        user.close()
    return data


@dataclass(frozen=True)
class Probe:
    """The outcome of :func:`probe`."""

    first_byte: float
    """Seconds from the probe's *since* to the first answer byte of the successful attempt."""
    attempts: int
    clean: bool
    """True when every failed attempt was refused at connect, so no probe byte can have been
    counted by the tunnel except the successful attempt's (once each way)."""


@defer.inlineCallbacks
def probe(port: int, payload: bytes, *, since: float, budget: float = FIRST_BYTE_BUDGET,
          attempt_timeout: float = 12.0) -> Any:
    """Echo *payload* through *port*, retrying until it comes back whole; fires with a :class:`Probe`.

    A connect that is refused, a connection closed before the whole echo or
    an attempt longer than *attempt_timeout* is retried after 0.5 s, until
    *budget* seconds after *since* (a reactor time); then it fails with
    AssertionError naming the last problem.
    """
    attempts = 0
    clean = True
    problem = "no attempt"
    while True:
        attempts += 1
        user = EchoUser(payload)
        try:
            yield connect(port, user, timeout=5.0)
        except Exception as exc:
            problem = f"connect: {exc}"
        else:
            timer = reactor.callLater(attempt_timeout, user.close)
            data = yield user.done
            if timer.active():
                timer.cancel()
            user.close()
            if data == payload:
                assert user.first_byte is not None
                return Probe(user.first_byte - since, attempts, clean)
            clean = False
            problem = f"got {len(data)} of {len(payload)} bytes back ({'closed' if user.lost else 'timeout'})"
        if reactor.seconds() - since > budget:
            raise AssertionError(f"no echo through port {port} within {budget}s after {attempts} attempts; "
                                 f"last: {problem}")
        yield sleep(0.5)


@defer.inlineCallbacks
def echo_many(port: int, count: int, size: int, timeout: float = 60.0) -> Any:
    """*count* concurrent users each echo *size* distinct random bytes; fires with the total bytes sent.

    Fails with AssertionError naming how many answers were wrong.
    """
    payloads = [os.urandom(size) for _ in range(count)]
    results = yield defer.gatherResults([echo_once(port, p, timeout) for p in payloads], consumeErrors=True)
    wrong = [i for i, (p, r) in enumerate(zip(payloads, results, strict=True)) if p != r]
    if wrong:
        sizes = [len(results[i]) for i in wrong[:5]]
        raise AssertionError(f"{len(wrong)} of {count} concurrent echoes wrong (received sizes {sizes}...)")
    return count * size


@defer.inlineCallbacks
def udp_exchange(test: TestCase, port: int, sizes: Sequence[int], timeout: float = 10.0) -> Any:
    """Send one datagram per size through 127.0.0.1:*port* from one user, one at a time.

    Each answer must be :data:`UDP_PREFIX` + the datagram. Fires with
    ``(bytes sent, bytes received)``.
    """
    user = udp_user(test)
    sent = received = 0
    for i, size in enumerate(sizes):
        data = (b"%d:" % i + os.urandom(size))[:size] if size > 4 else os.urandom(size)
        answer = yield user.ask(data, port, timeout=timeout)
        if answer != UDP_PREFIX + data:
            raise AssertionError(f"UDP datagram {i} ({size} bytes): answer of {len(answer)} bytes is not the echo")
        sent += len(data)
        received += len(answer)
    return sent, received


# -- counters -----------------------------------------------------------------------------------------
@defer.inlineCallbacks
def settled_traffic(peer: Peer, timeout: float = 20.0) -> Any:
    """The counters of *peer* once two successive samples agree (no traffic in flight).

    Process peers: two CHECK_POINT lines logged after the call; in-process
    peers: two readings one report interval apart.
    """
    if isinstance(peer, InProcessPeer):
        previous = peer.traffic()
        while True:
            yield sleep(REPORT_INTERVAL / 2)
            current = peer.traffic()
            if current == previous:
                return current
            previous = current
    start = peer.mark()

    def settled() -> bool:
        cps = peer.checkpoints(start)
        return len(cps) >= 2 and cps[-1].traffic == cps[-2].traffic

    yield peer.wait_until(settled, "two equal CHECK_POINT lines", timeout)
    return peer.checkpoints(start)[-1].traffic


@defer.inlineCallbacks
def wait_traffic(peer: Peer, expected: Traffic, timeout: float = 20.0) -> Any:
    """Wait until *peer* reports *expected*, and check that the next sample still does.

    Fails with AssertionError showing the last counters seen when they never
    match, or when they move on past *expected*.
    """
    start = peer.mark()
    try:
        yield wait_for(lambda: peer.traffic() == expected, timeout=timeout, what="traffic", step=0.05)
    except AssertionError:
        raise AssertionError(f"{peer.name}: counters {peer.traffic()} never became {expected}") from None
    if isinstance(peer, InProcessPeer):
        yield sleep(REPORT_INTERVAL)
    else:
        seen = len(peer.checkpoints(start))
        yield peer.wait_until(lambda: len(peer.checkpoints(start)) > seen, "one more CHECK_POINT line", timeout)
    if peer.traffic() != expected:
        raise AssertionError(f"{peer.name}: counters moved on from {expected} to {peer.traffic()}")
    return expected


# -- scenarios ------------------------------------------------------------------------------------------
@dataclass
class Result:
    """What :func:`exercise` measured for one pair."""

    label: str
    first_byte: float = 0.0
    attempts: int = 0
    tcp_bytes: int = 0
    udp_sent: int = 0
    udp_received: int = 0
    ingress: dict[str, int] = field(default_factory=dict)
    egress: dict[str, int] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds spent in each step (``start``, ``first byte``, ``settle``, ``traffic``, ``counters``)."""


@defer.inlineCallbacks
def exercise(pair: TunnelPair, *, big: int = 1 << 20, concurrent: int = 50, each: int = 8192,
             udp_sizes: Sequence[int] = (1, 64, 512, 1400), counters: bool = True) -> Any:
    """Start *pair* (unless started) and move traffic through it; fires with a :class:`Result`.

    First echo within :data:`FIRST_BYTE_BUDGET`, *big* random bytes echoed in
    one connection and compared by SHA-256, *concurrent* users echoing *each*
    bytes at once, one UDP datagram per entry of *udp_sizes*. With
    *counters*, both ends' counters must then have grown by exactly the bytes
    moved: the ingress counts user bytes, the egress target bytes, so the
    egress sees the UDP directions mirrored.
    """
    result = Result(pair.label)
    mark = [reactor.seconds()]

    def phase(name: str) -> None:
        now = reactor.seconds()
        result.phases[name] = round(now - mark[0], 2)
        mark[0] = now

    if pair.server is None:
        yield pair.start()
        phase("start")
    try:
        hello = b"first byte " + os.urandom(16)
        first = yield probe(pair.user_port, hello, since=pair.t0)
        result.first_byte, result.attempts = first.first_byte, first.attempts
        phase("first byte")
        if counters and first.clean:
            # Only the successful probe moved bytes: both ends start from exactly that.
            base_in = base_out = Traffic(len(hello), len(hello))
        elif counters:
            base_in, base_out = yield defer.gatherResults(
                [settled_traffic(pair.ingress), settled_traffic(pair.egress)], consumeErrors=True)
            phase("settle")
        payload = os.urandom(big)
        echoed = yield echo_once(pair.user_port, payload, timeout=60.0)
        if hashlib.sha256(echoed).hexdigest() != hashlib.sha256(payload).hexdigest():
            raise AssertionError(f"1 MiB echo differs: {len(echoed)} bytes back, sha256 mismatch")
        many = yield echo_many(pair.user_port, concurrent, each)
        result.tcp_bytes = big + many
        result.udp_sent, result.udp_received = yield udp_exchange(pair.test, pair.user_port, udp_sizes)
        phase("traffic")
        if counters:
            moved = Traffic(result.tcp_bytes, result.tcp_bytes, result.udp_sent, result.udp_received)
            yield defer.gatherResults([wait_traffic(pair.ingress, base_in + moved),
                                       wait_traffic(pair.egress, base_out + moved.mirrored())],
                                      consumeErrors=True)
            result.ingress = asdict(pair.ingress.traffic())
            result.egress = asdict(pair.egress.traffic())
            phase("counters")
    except defer.FirstError as exc:
        raise AssertionError(f"{pair.label}: {exc.subFailure.value}\n{pair.logs()}") from None
    except AssertionError as exc:
        raise AssertionError(f"{pair.label}: {exc}\n{pair.logs()}") from None
    record(pair.test, "exercise", **asdict(result))
    return result


def record(test: TestCase, event: str, **fields: Any) -> None:
    """Note a measurement: trial's log always, ``$NODEPASS_INTEROP_REPORT`` (JSON lines) when set."""
    entry = {"test": test.id(), "event": event, **fields}
    text = json.dumps(entry, sort_keys=True, default=str)
    twisted_log.msg(f"interop: {text}")
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text + "\n")
