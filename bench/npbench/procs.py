"""The implementations under test and their processes.

An :class:`Impl` knows how to start one tunnel end from a NodePass URL: ours
(``python -m nodepass URL`` inside a source tree), an older tree of ours
(``--baseline``), or the Go binary (``--peer``). An :class:`End` is one such
running process with its log file; :class:`Tunnel` is the one or two ends of a
set-up and the ports users connect to. Facts about the machine for the report
header are gathered here too.
"""

from __future__ import annotations

import os
import platform
import random
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .target import raise_fd_limit

__all__ = ["raise_fd_limit"]

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?\s+")
POOL = re.compile(r"CHECK_POINT\|.*?\|POOL=(\d+)\|")


class StartFailed(Exception):
    """A tunnel end did not come up; the message says why (for the report)."""


@dataclass
class Impl:
    """One implementation: its column name in the report and how to run an end of it."""

    name: str
    label: str
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    version: str = ""

    def command(self, url: str) -> list[str]:
        return [*self.argv, url]


def compile_tree(tree: Path) -> None:
    """Byte-compile *tree*'s ``nodepass`` package, as installing it does.

    An end run from a source tree would otherwise compile every module again
    at each start when the environment forbids writing bytecode
    (``PYTHONDONTWRITEBYTECODE``), which adds a quarter of a second or more
    to each start-up and so to the first-byte figures; an installed package,
    like the Go binary, starts from compiled code."""
    package = tree / "nodepass"
    if package.is_dir():
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)],
                       capture_output=True, timeout=300, check=False)


def ours(name: str, label: str, tree: Path) -> Impl:
    """``python -m nodepass`` with the package taken from *tree* (the process
    runs inside it), byte-compiled first (:func:`compile_tree`)."""
    compile_tree(tree)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + os.pathsep + env.get("PYTHONPATH", "")
    return Impl(name, label, [sys.executable, "-m", "nodepass"], tree, env, tree_version(tree))


def go_peer(binary: Path, cwd: Path) -> Impl:
    """The Go binary, run from *cwd* (a scratch directory: it may write state next to itself only in master mode)."""
    return Impl("go", "Go " + go_release(binary), [str(binary)], cwd, dict(os.environ), go_version(binary))


def tree_version(tree: Path) -> str:
    """``nodepass X.Y @ <commit>[+dirty]`` of a source tree (git when it is a checkout)."""
    text = ""
    init = tree / "nodepass" / "__init__.py"
    if init.exists():
        m = re.search(r'__version__ = "([^"]+)"', init.read_text())
        text = f"nodepass {m.group(1)}" if m else "nodepass"
    try:
        commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        text += f" @ {commit}" + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return text


def go_release(binary: Path) -> str:
    """The release the Go binary names in its usage banner (e.g. ``v1.14.0``)."""
    try:
        out = subprocess.run([str(binary)], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "?"
    m = re.search(r"nodepass-(v[\w.\-]+)", ANSI.sub("", (out.stdout + out.stderr).decode(errors="replace")))
    return m.group(1) if m else "?"


def go_version(binary: Path) -> str:
    """The Go toolchain recorded in the binary's build information (``go1.25.0``)."""
    try:
        with open(binary, "rb") as f:
            data = f.read()
    except OSError:
        return "?"
    start = data.find(b"\xff Go buildinf:")
    m = re.search(rb"go1\.\d+(?:\.\d+)?", data[start:start + 256] if start >= 0 else data)
    return m.group().decode() if m else "?"


# -- ports -----------------------------------------------------------------------------------------


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux; 32768-60999 elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
            return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(count: int) -> list[int]:
    """*count* distinct ports free for TCP and UDP on 127.0.0.1, below the ephemeral range.

    The benchmark opens thousands of outgoing connections, whose local ports
    come from the ephemeral range; a listening port chosen there could be
    taken by one of them before the tunnel end binds it. So ports are drawn at
    random from 10000 up to the start of that range; every probe socket stays
    bound until all are chosen."""
    lo = 10000
    hi = max(lo + 1000, ephemeral_range()[0] - 1)
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for port in random.sample(range(lo, hi), min(hi - lo, 200 * count)):
            if len(ports) == count:
                break
            t = socket.socket()
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            held += [t, u]
            try:
                t.bind(("127.0.0.1", port))
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    if len(ports) < count:
        raise RuntimeError(f"no {count} free ports on 127.0.0.1 between {lo} and {hi}")
    return ports


def port_clash(reason: str) -> bool:
    """Whether a start failure says a port was taken (worth a retry on other ports)."""
    return "address already in use" in reason.lower()


# -- processes ---------------------------------------------------------------------------------


@dataclass
class End:
    """One running tunnel process and its log."""

    role: str
    proc: subprocess.Popen[bytes]
    log: Path
    ps: psutil.Process

    def exited(self) -> str | None:
        """Why the process is gone (with its last log error), or None while it runs."""
        code = self.proc.poll()
        if code is None:
            return None
        return f"{self.role} exited with code {code}" + (f": {self.last_error()}" if self.last_error() else "")

    def text(self) -> str:
        try:
            return ANSI.sub("", self.log.read_text(errors="replace"))
        except OSError:
            return ""

    def errors(self) -> list[str]:
        """The end's ERROR log lines, without their time stamps."""
        return [STAMP.sub("", line.strip()) for line in self.text().splitlines() if "ERROR" in line]

    def last_error(self) -> str:
        errors = self.errors()
        return errors[-1] if errors else ""

    def pool(self) -> int:
        """The highest ``POOL=`` of the end's ``CHECK_POINT`` log lines so far (-1: none yet)."""
        counts = [int(n) for n in POOL.findall(self.text())]
        return max(counts) if counts else -1

    def cpu(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def rss(self) -> float:
        """Resident set size in MiB."""
        return float(self.ps.memory_info().rss) / 2**20

    def listening(self, port: int) -> bool:
        return listens(self.ps, port)

    def connections_to(self, port: int) -> int:
        """Established TCP connections of this process to *port* on the far side."""
        return sum(1 for c in _tcp(self.ps)
                   if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == port)

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after 10 s; waits for the process either way."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def listens(ps: psutil.Process, port: int) -> bool:
    """Whether the process has a TCP socket listening on *port*."""
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in _tcp(ps))


def _tcp(ps: psutil.Process) -> list[Any]:
    get = getattr(ps, "net_connections", None) or ps.connections
    try:
        return list(get(kind="tcp"))
    except psutil.Error:
        return []


def launch(impl: Impl, role: str, url: str, log: Path) -> End:
    with open(log, "wb") as out:
        proc = subprocess.Popen(impl.command(url), cwd=str(impl.cwd), env=impl.env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return End(role, proc, log, psutil.Process(proc.pid))


def wait_listening(end: End, port: int, timeout: float) -> None:
    """Until *end* listens on TCP *port*. Fails at once when it exits or logs an error first."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if end.listening(port):
            return
        reason = end.exited()
        if reason:
            raise StartFailed(reason)
        error = end.last_error()
        if error:
            raise StartFailed(f"{end.role}: {error}")
        time.sleep(0.02)
    raise StartFailed(f"{end.role} not listening on its port after {timeout:g} s")


@dataclass
class Tunnel:
    """The running ends of one set-up; users connect to ``user_port``."""

    user_port: int
    started: float
    ends: list[End] = field(default_factory=list)
    tunnel_port: int = 0
    client_started: float = 0.0

    def end(self, role: str) -> End | None:
        return next((e for e in self.ends if e.role == role), None)

    def alive(self) -> str | None:
        for end in self.ends:
            reason = end.exited()
            if reason:
                return reason
        return None

    def cpu(self) -> float:
        return sum(end.cpu() for end in self.ends)

    def rss(self) -> dict[str, float]:
        return {end.role: end.rss() for end in self.ends}

    def stop(self) -> None:
        for end in self.ends:
            end.stop()


class IperfServer:
    """``iperf3 -s`` on 127.0.0.1:port for the duration of a ``with`` block."""

    def __init__(self, binary: str, port: int, log: Path) -> None:
        self.binary = binary
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> IperfServer:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([self.binary, "-s", "-B", "127.0.0.1", "-p", str(self.port)],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        ps = psutil.Process(self.proc.pid)
        deadline = time.perf_counter() + 20
        while time.perf_counter() < deadline:
            if listens(ps, self.port):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.__exit__()
        raise RuntimeError(f"iperf3 server did not listen on port {self.port} (see {self.log})")

    def __exit__(self, *_exc: object) -> None:
        stop_process(self.proc)


# -- machine -----------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def iperf3_version(binary: str | None) -> str:
    if not binary:
        return ""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.stdout.splitlines()[0].strip() if out.stdout else "?"


def twisted_version() -> str:
    try:
        import twisted

        return str(twisted.__version__)
    except ImportError:
        return "?"


def machine_info(iperf3: str | None) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "twisted": twisted_version(),
        "psutil": psutil.__version__,
        "iperf3": iperf3_version(iperf3),
        "memory_gib": psutil.virtual_memory().total / 2**30,
    }


def find_iperf3(wanted: str) -> str | None:
    """The iperf3 binary to use for *wanted* (``auto``, ``iperf3``, ``builtin``)."""
    if wanted == "builtin":
        return None
    found = shutil.which("iperf3") or ("/usr/bin/iperf3" if os.access("/usr/bin/iperf3", os.X_OK) else None)
    if wanted == "iperf3" and not found:
        raise SystemExit("--tput-tool iperf3: iperf3 not found (apt-get install iperf3)")
    return found


class CpuWatch:
    """How busy the machine was apart from this benchmark and the processes it started.

    Compares the machine's busy CPU time with the CPU time of this process and
    its waited-for children (``getrusage``); every child is waited for before
    :meth:`foreign` is read, so the difference is what other work used."""

    def __init__(self) -> None:
        self.busy0 = self._busy()
        self.own0 = self._own()
        self.t0 = time.monotonic()
        self.loads: list[float] = [os.getloadavg()[0]]

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))

    @staticmethod
    def _own() -> float:
        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            r = resource.getrusage(who)
            total += r.ru_utime + r.ru_stime
        return total

    def sample_load(self) -> None:
        self.loads.append(os.getloadavg()[0])

    def foreign(self) -> dict[str, float]:
        """Load averages seen and the CPUs other work kept busy on average (0 = idle machine)."""
        self.sample_load()
        wall = max(time.monotonic() - self.t0, 1e-9)
        other = (self._busy() - self.busy0) - (self._own() - self.own0)
        return {
            "load_start": self.loads[0],
            "load_end": self.loads[-1],
            "load_max": max(self.loads),
            "other_cpus": max(0.0, other / wall),
            "wall_seconds": wall,
        }
