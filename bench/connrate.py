#!/usr/bin/env python3
"""Start-up and capacity figures of a server + client pair, ours against others, in one run.

Three measurements the main benchmark does not take, each for every
implementation given, alternating round by round:

* ``start``: the server and the client are started at the same moment (the
  client may be first to try the tunnel port); a user connects every 10 ms
  until a byte comes back.  Seconds from the start until then.
* ``fill``: the client starts with ``min=N``; CPU seconds (user + system,
  both ends) per pool connection opened, from the difference to a client with
  ``min=64``, and the resident, proportional and unique memory (RSS, PSS,
  USS) of each end once the pool is full.
* ``hold``: N users connected in waves of 1,000 (each user echoes one byte),
  all kept open, then every one of them echoes again; how many did, and the
  RSS of each end.

Usage (from the repository root)::

    python bench/connrate.py start --tls 0,1 --rounds 5 --impl ours=. --impl go=../shared/peers/nodepass-go-v1.14.0
    python bench/connrate.py fill --tls 0,1 --min 1024 --impl ours=. --impl before=/tmp/nodepass-before
    python bench/connrate.py hold --n 8000 --impl ours=.

``--impl NAME=PATH``: a source tree of ours (run as ``python -m nodepass``
inside it) or an executable (the Go binary).  Ends log at ``warn``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from npbench.procs import compile_tree

HOST = "127.0.0.1"


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((HOST, 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Echo:
    """An echo target on its own thread (asyncio), for any number of connections."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        async def serve() -> None:
            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                try:
                    while data := await reader.read(65536):
                        writer.write(data)
                        await writer.drain()
                except OSError:
                    pass
                writer.close()

            server = await asyncio.start_server(handle, HOST, 0, backlog=4096)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            await server.serve_forever()

        threading.Thread(target=lambda: self.loop.run_until_complete(serve()), daemon=True).start()
        ready.wait(10)


class Impl:
    def __init__(self, spec: str) -> None:
        self.name, _, path = spec.partition("=")
        self.path = Path(path or ".").resolve()
        self.tree = self.path.is_dir()
        if self.tree:
            compile_tree(self.path)  # start from bytecode, as an installed package does

    def start(self, url: str, log: Path) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        if self.tree:
            env["PYTHONPATH"] = str(self.path)
            cmd = [sys.executable, "-m", "nodepass", url]
            cwd = str(self.path)
        else:
            cmd = [str(self.path), url]
            cwd = tempfile.gettempdir()
        with open(log, "wb") as out:
            return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop(*procs: subprocess.Popen[bytes]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def echo_once(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(b"!")
            return s.recv(1) == b"!"
    except OSError:
        return False


def pair(impl: Impl, tls: str, target: int, logs: Path, client_query: str = "") -> tuple[int, int, list[subprocess.Popen[bytes]]]:
    user, tunnel = free_ports(2)
    server = impl.start(f"server://{HOST}:{tunnel}/{HOST}:{user}?mode=1&tls={tls}&log=warn", logs / "server.log")
    client = impl.start(f"client://{HOST}:{tunnel}/{HOST}:{target}?mode=2&log=warn{client_query}", logs / "client.log")
    return user, tunnel, [server, client]


def measure_start(impl: Impl, tls: str, echo: Echo, logs: Path) -> float:
    t0 = time.perf_counter()
    user, _tunnel, procs = pair(impl, tls, echo.port, logs)
    try:
        while not echo_once(user):
            if time.perf_counter() - t0 > 60:
                return float("nan")
            time.sleep(0.01)
        return time.perf_counter() - t0
    finally:
        stop(*procs)


def members(proc: subprocess.Popen[bytes], tunnel: int) -> int:
    try:
        conns = psutil.Process(proc.pid).net_connections(kind="tcp")
    except psutil.Error:
        return 0
    return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == tunnel) - 1


def measure_fill(impl: Impl, tls: str, n: int, echo: Echo, logs: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    cpu: dict[int, float] = {}
    for size in (64, n):
        user, tunnel, procs = pair(impl, tls, echo.port, logs, f"&min={size}")
        try:
            t0 = time.perf_counter()
            while members(procs[1], tunnel) < size * 0.99 and time.perf_counter() - t0 < 120:
                time.sleep(0.1)
            time.sleep(2.0)
            cpu[size] = 0.0
            for role, p in zip(("server", "client"), procs, strict=True):
                ps = psutil.Process(p.pid)
                t = ps.cpu_times()
                cpu[size] += t.user + t.system
                if size == n:
                    m = ps.memory_full_info()
                    out[f"{role} RSS MiB"] = m.rss / 2**20
                    out[f"{role} PSS MiB"] = m.pss / 2**20
                    out[f"{role} USS MiB"] = m.uss / 2**20
        finally:
            stop(*procs)
    out["CPU ms per pool connection (both ends)"] = (cpu[n] - cpu[64]) / (n - 64) * 1e3
    return out


def measure_hold(impl: Impl, tls: str, n: int, echo: Echo, logs: Path) -> dict[str, float]:
    user, _tunnel, procs = pair(impl, tls, echo.port, logs)
    held: list[socket.socket] = []
    try:
        t0 = time.perf_counter()
        while not echo_once(user):
            if time.perf_counter() - t0 > 60:
                raise SystemExit("the tunnel did not start")
            time.sleep(0.05)
        failed = 0
        for wave in range(0, n, 1000):
            socks = []
            for _ in range(min(1000, n - wave)):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex((HOST, user))
                socks.append(s)
            for s in socks:
                try:
                    s.settimeout(60)
                    s.sendall(b"h")
                    if s.recv(1) == b"h":
                        held.append(s)
                        continue
                except OSError:
                    pass
                failed += 1
                s.close()
        sel = selectors.DefaultSelector()
        for s in held:
            s.sendall(b"e")
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        again = 0
        deadline = time.perf_counter() + 60
        while sel.get_map() and time.perf_counter() < deadline:
            for key, _ in sel.select(1):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    again += s.recv(1) == b"e"
                except OSError:
                    pass
                sel.unregister(s)
        rss = {role: psutil.Process(p.pid).memory_info().rss / 2**20 for role, p in zip(("server", "client"), procs, strict=True)}
        return {"held": len(held), "failed": failed, "echoed again": again,
                "server RSS MiB": rss["server"], "client RSS MiB": rss["client"]}
    finally:
        for s in held:
            s.close()
        stop(*procs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("start", "fill", "hold"))
    p.add_argument("--impl", action="append", default=[], help="NAME=PATH (a source tree or a binary)")
    p.add_argument("--tls", default="0")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min", type=int, default=1024, help="pool size for fill")
    p.add_argument("--n", type=int, default=8000, help="connections for hold")
    a = p.parse_args()
    raise_fd_limit()
    impls = [Impl(spec) for spec in (a.impl or ["ours=."])]
    echo = Echo()
    logs = Path(tempfile.mkdtemp(prefix="nodepass-connrate-"))
    for tls in a.tls.split(","):
        results: dict[str, list[dict[str, float]]] = {i.name: [] for i in impls}
        for _ in range(a.rounds):
            for impl in impls:
                if a.what == "start":
                    results[impl.name].append({"first byte, s": measure_start(impl, tls, echo, logs)})
                elif a.what == "fill":
                    results[impl.name].append(measure_fill(impl, tls, a.min, echo, logs))
                else:
                    results[impl.name].append(measure_hold(impl, tls, a.n, echo, logs))
        for name, rows in results.items():
            keys = rows[0].keys()
            text = ", ".join(f"{k} {statistics.median(r[k] for r in rows):.2f}" for k in keys)
            print(f"{a.what} tls={tls} {name}: {text}  (median of {len(rows)}; all: "
                  + "; ".join(", ".join(f"{v:.2f}" for v in r.values()) for r in rows) + ")", flush=True)


if __name__ == "__main__":
    main()
