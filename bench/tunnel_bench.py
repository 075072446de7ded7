#!/usr/bin/env python3
"""Tunnel benchmark on 127.0.0.1: direct vs through nodepass.

One run measures, for each path:

* TCP throughput (one connection, bulk upload to a sink that acknowledges
  the last byte),
* TCP request/response latency (64-byte echo round trips on one connection,
  p50/p99),
* new TCP connections per second (connect, 1-byte echo, close; 4 workers),
* UDP request/response latency (64-byte datagram echo, p50/p99),

and prints a Markdown table with absolute numbers and the ratio to the direct
path.  Paths:

* ``direct`` - the load generator talks to the target itself;
* ``tls0``   - dual-end: ``server://`` (mode 1, users connect to its target
  address) plus ``client://`` (mode 2, dials the real target), plain TCP pool;
* ``tls1``   - the same with the pool wrapped in TLS 1.3;
* ``single`` - ``client://`` mode 1, forwarding straight to the target.

Each nodepass end runs as its own process (``python -m nodepass URL``), like a
deployment, so the numbers include the real event-loop and process costs; the
target servers run in one more process and the load generator in this one.
Everything shares the machine's cores, which the table header reports.

Usage::

    python bench/tunnel_bench.py                # all paths, ~3 s per measurement
    python bench/tunnel_bench.py --duration 1 --paths direct,single
    # the same run also measures an older tree, alternating run by run:
    python bench/tunnel_bench.py --repeat 3 --baseline /tmp/nodepass-old
"""

from __future__ import annotations

import argparse
import os
import socket
import socketserver
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAYLOAD = 64


# --------------------------------------------------------------------------
# target servers (run in a child process: ``--serve-target``)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed early")
        buf += chunk
    return bytes(buf)


class _TargetHandler(socketserver.BaseRequestHandler):
    """First byte picks the mode: ``E`` echo, ``S`` sink (8-byte length, then data, ``OK``)."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            mode = sock.recv(1)
            if mode == b"E":
                while True:
                    data = sock.recv(65536)
                    if not data:
                        return
                    sock.sendall(data)
            elif mode == b"S":
                total = int.from_bytes(_recv_exact(sock, 8), "big")
                buf = bytearray(1 << 20)
                view = memoryview(buf)
                got = 0
                while got < total:
                    n = sock.recv_into(view, min(len(buf), total - got))
                    if n == 0:
                        return
                    got += n
                sock.sendall(b"OK")
                sock.recv(1)
        except OSError:
            return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512


def serve_target(port: int) -> None:
    """TCP echo/sink and UDP echo on 127.0.0.1:port (0 = pick); prints the port."""
    server = _Server(("127.0.0.1", port), _TargetHandler)
    port = server.server_address[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", port))

    def udp_echo() -> None:
        while True:
            data, addr = udp.recvfrom(65536)
            udp.sendto(data, addr)

    threading.Thread(target=udp_echo, daemon=True).start()
    print(port, flush=True)
    server.serve_forever()


# --------------------------------------------------------------------------
# load generator


def _connect(port: int, mode: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(mode)
    return sock


def upload(port: int, total: int) -> float:
    """Send *total* bytes to the sink; seconds until it acknowledged the last one."""
    chunk = memoryview(bytes(256 * 1024))
    sock = _connect(port, b"S")
    try:
        start = time.perf_counter()
        sock.sendall(total.to_bytes(8, "big"))
        left = total
        while left > 0:
            n = min(left, len(chunk))
            sock.sendall(chunk[:n])
            left -= n
        if _recv_exact(sock, 2) != b"OK":
            raise RuntimeError("sink did not acknowledge")
        return time.perf_counter() - start
    finally:
        sock.close()


def throughput(port: int, duration: float) -> float:
    """MB/s (10^6 bytes) for an upload sized to last about *duration* seconds."""
    probe = 32 * 1024 * 1024
    rate = probe / upload(port, probe)
    total = int(min(max(rate * duration, probe), 8 * 1024**3))
    return total / upload(port, total) / 1e6


def tcp_latency(port: int, count: int) -> list[float]:
    """Round-trip times (s) of *count* 64-byte echoes on one connection."""
    sock = _connect(port, b"E")
    data = b"x" * PAYLOAD
    times: list[float] = []
    try:
        for i in range(count + 50):
            start = time.perf_counter()
            sock.sendall(data)
            _recv_exact(sock, PAYLOAD)
            if i >= 50:
                times.append(time.perf_counter() - start)
    finally:
        sock.close()
    return times


def connections_per_second(port: int, duration: float, workers: int = 4) -> float:
    """Completed connect + 1-byte echo + close cycles per second."""
    stop = time.perf_counter() + duration
    counts = [0] * workers
    errors = [0] * workers

    def work(i: int) -> None:
        while time.perf_counter() < stop:
            try:
                sock = _connect(port, b"E")
                sock.sendall(b"!")
                _recv_exact(sock, 1)
                sock.close()
                counts[i] += 1
            except OSError:
                errors[i] += 1
                time.sleep(0.01)

    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def udp_latency(port: int, count: int) -> list[float]:
    """Round-trip times (s) of *count* 64-byte datagram echoes (lost ones retried)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(1.0)
    data = b"u" * PAYLOAD
    times: list[float] = []
    try:
        i = 0
        while len(times) < count:
            start = time.perf_counter()
            sock.sendto(data, ("127.0.0.1", port))
            try:
                sock.recvfrom(65536)
            except TimeoutError:
                continue
            i += 1
            if i > 20:
                times.append(time.perf_counter() - start)
    finally:
        sock.close()
    return times


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, int(round(p / 100 * (len(ordered) - 1)))))
    return ordered[k]


# --------------------------------------------------------------------------
# processes


def free_ports(count: int) -> list[int]:
    """*count* distinct ports free for TCP and UDP on 127.0.0.1 (probes held until all are chosen)."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            t = socket.socket()
            t.bind(("127.0.0.1", 0))
            held.append(t)
            port = int(t.getsockname()[1])
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            held.append(u)
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def start_nodepass(url: str, log_dir: Path, name: str, tree: Path = REPO) -> subprocess.Popen[bytes]:
    """``python -m nodepass URL`` with the ``nodepass`` package taken from *tree*."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + os.pathsep + env.get("PYTHONPATH", "")
    log = open(log_dir / f"{name}.log", "wb")
    # ``-m`` puts the working directory first on sys.path: run inside *tree*.
    return subprocess.Popen(
        [sys.executable, "-m", "nodepass", url], env=env, cwd=str(tree), stdout=log, stderr=subprocess.STDOUT
    )


def wait_ready(port: int, timeout: float) -> None:
    """Until a TCP echo and a UDP echo succeed through *port*."""
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            sock.settimeout(3)
            sock.sendall(b"Eready")
            if _recv_exact(sock, 5) == b"ready":
                sock.close()
                break
        except OSError as exc:
            last = exc
        time.sleep(0.3)
    else:
        raise RuntimeError(f"path on port {port} not ready: {last}")
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(0.5)
    try:
        while time.time() < deadline:
            u.sendto(b"ready", ("127.0.0.1", port))
            try:
                u.recvfrom(100)
                return
            except TimeoutError:
                continue
        raise RuntimeError(f"UDP on port {port} not ready")
    finally:
        u.close()


@dataclass
class Result:
    mbps: float
    tcp_p50: float
    tcp_p99: float
    cps: float
    udp_p50: float
    udp_p99: float
    #: CPU time of the tunnel processes: ms per MB of throughput, µs per TCP
    #: round trip, µs per new connection (0 for the direct path).
    cpu_mb: float = 0.0
    cpu_rtt: float = 0.0
    cpu_conn: float = 0.0


def cpu_seconds(pids: tuple[int, ...]) -> float:
    """User + system CPU seconds used so far by the processes *pids* (Linux /proc; 0 elsewhere)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def median_result(runs: list[Result]) -> Result:
    """Field by field median of several runs."""
    return Result(*(statistics.median(getattr(r, f) for r in runs) for f in Result.__dataclass_fields__))


def measure(port: int, duration: float, rounds: int, repeat: int = 1, pids: tuple[int, ...] = ()) -> Result:
    """All metrics for one path; with *repeat* > 1 each one is the median of that many runs.

    *pids* are the tunnel processes whose CPU time is charged to each metric."""
    if repeat > 1:
        return median_result([measure(port, duration, rounds, 1, pids) for _ in range(repeat)])
    c0 = cpu_seconds(pids)
    t0 = time.perf_counter()
    mbps = throughput(port, duration)
    moved = mbps * (time.perf_counter() - t0)
    c1 = cpu_seconds(pids)
    lat = tcp_latency(port, rounds)
    c2 = cpu_seconds(pids)
    t0 = time.perf_counter()
    cps = connections_per_second(port, duration)
    conns = cps * (time.perf_counter() - t0)
    c3 = cpu_seconds(pids)
    ulat = udp_latency(port, max(200, rounds // 2))
    return Result(
        cpu_mb=(c1 - c0) * 1e3 / moved if pids and moved else 0.0,
        cpu_rtt=(c2 - c1) * 1e6 / (len(lat) + 50) if pids else 0.0,
        cpu_conn=(c3 - c2) * 1e6 / conns if pids and conns else 0.0,
        mbps=mbps,
        tcp_p50=pct(lat, 50) * 1e6,
        tcp_p99=pct(lat, 99) * 1e6,
        cps=cps,
        udp_p50=pct(ulat, 50) * 1e6,
        udp_p99=pct(ulat, 99) * 1e6,
    )


def table(results: dict[str, Result]) -> str:
    base = results.get("direct")

    def cell(value: float, ref: float | None, fmt: str) -> str:
        text = format(value, fmt)
        if ref and base is not None:
            text += f" ({value / ref:.2f}x)"
        return text

    head = (
        "| path | TCP MB/s | TCP RTT p50 µs | TCP RTT p99 µs | new conn/s | UDP RTT p50 µs | UDP RTT p99 µs |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for name, r in results.items():
        b = base if name != "direct" else None
        rows.append(
            "| {} | {} | {} | {} | {} | {} | {} |".format(
                name,
                cell(r.mbps, b.mbps if b else None, ".0f"),
                cell(r.tcp_p50, b.tcp_p50 if b else None, ".0f"),
                cell(r.tcp_p99, b.tcp_p99 if b else None, ".0f"),
                cell(r.cps, b.cps if b else None, ".0f"),
                cell(r.udp_p50, b.udp_p50 if b else None, ".0f"),
                cell(r.udp_p99, b.udp_p99 if b else None, ".0f"),
            )
        )
    cpu = [(name, r) for name, r in results.items() if r.cpu_mb or r.cpu_rtt or r.cpu_conn]
    if cpu:
        rows.append(
            "\nCPU time of the tunnel processes (all nodepass processes of the path together):\n\n"
            "| path | CPU ms per MB | CPU µs per TCP round trip | CPU µs per new connection |\n"
            "|---|---:|---:|---:|"
        )
        for name, r in cpu:
            rows.append(f"| {name} | {r.cpu_mb:.2f} | {r.cpu_rtt:.0f} | {r.cpu_conn:.0f} |")
    return head + "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per throughput/conn-rate run")
    parser.add_argument("--rounds", type=int, default=2000, help="echo round trips for TCP latency")
    parser.add_argument("--paths", default="direct,tls0,tls1,single", help="comma list of direct,tls0,tls1,single")
    parser.add_argument("--repeat", type=int, default=1, help="runs per metric; the median is shown")
    parser.add_argument("--log", default="warn", help="nodepass log level for the tunnel processes")
    parser.add_argument("--ready-timeout", type=float, default=40.0)
    parser.add_argument(
        "--min", type=int, default=0, help="client pool min for the dual-end paths (0: NodePass default, 64)"
    )
    parser.add_argument("--tree", type=Path, default=REPO, help="source tree whose nodepass package is measured")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="second source tree (e.g. an older checkout): every tunnel path is also run with it, "
        "alternating run by run with --tree, in rows marked (baseline)",
    )
    parser.add_argument("--serve-target", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_target is not None:
        serve_target(args.serve_target)
        return 0

    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"nodepass-bench-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    target = subprocess.Popen([sys.executable, __file__, "--serve-target", "0"], stdout=subprocess.PIPE)
    assert target.stdout is not None
    target_port = int(target.stdout.readline())
    wanted = [p.strip() for p in args.paths.split(",") if p.strip()]
    results: dict[str, Result] = {}
    failed: list[str] = []
    try:
        for name in wanted:
            if name == "direct":
                wait_ready(target_port, args.ready_timeout)
                results["direct"] = measure(target_port, args.duration, args.rounds, args.repeat)
                continue
            trees = [("", args.tree)] + ([(" (baseline)", args.baseline)] if args.baseline else [])
            started: list[tuple[str, int, tuple[int, ...]]] = []
            procs: list[subprocess.Popen[bytes]] = []
            try:
                for suffix, tree in trees:
                    user_port, tunnel_port = free_ports(2)
                    tag = name + ("-baseline" if suffix else "")
                    if name in ("tls0", "tls1"):
                        tls = name[-1]
                        server = (
                            f"server://127.0.0.1:{tunnel_port}/127.0.0.1:{user_port}?mode=1&tls={tls}&log={args.log}"
                        )
                        client = f"client://127.0.0.1:{tunnel_port}/127.0.0.1:{target_port}?mode=2&log={args.log}"
                        if args.min > 0:
                            client += f"&min={args.min}"
                        procs.append(start_nodepass(server, log_dir, f"{tag}-server", tree))
                        time.sleep(0.5)
                        procs.append(start_nodepass(client, log_dir, f"{tag}-client", tree))
                        label = f"dual-end tls={tls}"
                    elif name == "single":
                        client = f"client://127.0.0.1:{user_port}/127.0.0.1:{target_port}?mode=1&log={args.log}"
                        procs.append(start_nodepass(client, log_dir, tag, tree))
                        label = "single-end"
                    else:
                        raise SystemExit(f"unknown path {name!r}")
                    started.append(
                        (label + suffix, user_port, tuple(proc.pid for proc in procs[-2 if name != "single" else -1 :]))
                    )
                for _label, user_port, _pids in started:
                    wait_ready(user_port, args.ready_timeout)
                # Alternate the trees run by run so that load changes on the
                # machine hit both alike.
                runs: dict[str, list[Result]] = {label: [] for label, _, _ in started}
                for _ in range(args.repeat):
                    for label, user_port, pids in started:
                        runs[label].append(measure(user_port, args.duration, args.rounds, 1, pids))
                for label, _, _ in started:
                    results[label] = median_result(runs[label])
            except (RuntimeError, OSError) as exc:
                failed.append(f"{name}: {exc}")
                print(f"skipped {name}: {exc}", file=sys.stderr)
            finally:
                for proc in procs:
                    proc.terminate()
                for proc in procs:
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    finally:
        target.terminate()
        target.wait(10)

    print(
        f"\nnodepass tunnel benchmark — 127.0.0.1, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}, {args.duration:g} s runs, "
        f"median of {args.repeat}, log={args.log}"
        + (f", client min={args.min}" if args.min > 0 else "")
        + "\n"
        + (f"tree: {args.tree}; baseline: {args.baseline}\n" if args.baseline else "")
    )
    print(table(results))
    for line in failed:
        print(f"not measured: {line}")
    print(f"tunnel logs: {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
