#!/usr/bin/env python3
"""Soak test: mixed TCP + UDP load with connection churn through a server + client pair.

Three child processes: a target (TCP echo, UDP echo), a ``server://`` end
(reverse mode: users connect to its target address) and a ``client://`` end
(dials the target).  Each tunnel end runs the same service ``python -m
nodepass URL`` runs, and also prints one JSON line of its own numbers every
``--sample`` seconds: resident memory, open file descriptors, idle pool
connections, pending reactor timers, live TCP connections and UDP sessions.

This process generates the load in threads, all at once, for ``--duration``
seconds:

* churn: connect, echo 1 B - 32 KiB of random bytes, compare, close;
* aborts: connect, send part of a request, close with a reset (or close at once);
* streams: one connection echoing 64 KiB chunks for ``--stream-life`` seconds, then a new one;
* UDP: datagrams with a sequence number from a new source port every 40 datagrams
  (the ends get ``NP_UDP_READ_TIMEOUT=5s``, so their UDP sessions keep expiring);
  a reply that comes after its 2 s wait counts as lost and is still checked when
  it arrives, and replies holding several datagrams back to back (a plain TCP
  pool keeps no datagram boundaries) are counted as merged, not as wrong.

Every ``--period`` seconds it prints a row per end.  After ``--warmup``
seconds, and again at the end, it pauses the load until both ends report no
live connection or session and takes a *quiet* sample, with an object census
of each end (SIGUSR1: a full collection, then live objects by type and
pymalloc's allocated blocks, written to the end's log).  The leak verdict
compares the final quiet sample with the first: resident memory, allocated
blocks, live objects, descriptors other than idle pool connections, and
pending timers must each grow by less than 5 % (descriptors and timers may
also grow by up to 3, whatever the percentage); the object types that grew
most are listed.  Exit status: 0 flat, 1 growth, 2 wrong data or a failed set-up.

Usage::

    python bench/soak.py --duration 1800            # the 30-minute soak, one row a minute
    python bench/soak.py --duration 60 --period 10 --warmup 15
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from npbench.load import recv_exact as _recv_exact  # noqa: E402
from npbench.procs import free_ports  # noqa: E402

GROWTH_LIMIT = 0.05
"""Allowed relative growth between the quiet samples."""


def wait_ready(port: int, timeout: float) -> None:
    """Until a TCP echo and a UDP echo succeed through *port* (the target's ``E`` mode)."""
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.settimeout(3)
                sock.sendall(b"Eready")
                if _recv_exact(sock, 5) == b"ready":
                    break
        except OSError as exc:
            last = exc
        time.sleep(0.3)
    else:
        raise RuntimeError(f"path on port {port} not ready: {last}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(0.5)
        while time.time() < deadline:
            udp.sendto(b"ready", ("127.0.0.1", port))
            try:
                if udp.recv(100) == b"ready":
                    return
            except OSError as exc:
                last = exc
        raise RuntimeError(f"UDP through port {port} not ready: {last}")
COUNT_SLACK = 3
"""Descriptors / timers a quiet sample may have above the first one whatever the percentage."""
QUIET_TIMEOUT = 60.0
"""How long a pause may wait for both ends to have no live connection or session."""


# --------------------------------------------------------------------------
# one tunnel end (run in a child process: ``--serve URL``)


def serve(url: str, sample: float) -> int:
    """Run *url* like ``python -m nodepass`` and print a JSON line of numbers every *sample* s."""
    import psutil
    from twisted.internet import reactor as _reactor
    from twisted.internet.task import LoopingCall

    from nodepass.env import Settings
    from nodepass.log import NodePassLogger
    from nodepass.service import build_service
    from nodepass.url import parse_url

    reactor: Any = _reactor
    config = parse_url(url)
    logger = NodePassLogger(config.log or "warn", stream=sys.stderr)
    service: Any = build_service(config, reactor=reactor, logger=logger, settings=Settings.from_environ())
    proc = psutil.Process()

    def report() -> None:
        session = getattr(service, "session", None)
        pool = getattr(session, "pool", None)
        line = {
            "rss": proc.memory_info().rss,
            "fds": proc.num_fds(),
            "pool": pool.active if pool is not None else 0,
            "timers": len(reactor.getDelayedCalls()),
            "tcps": service.stats.tcps,
            "udps": service.stats.udps,
        }
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    def stop() -> Any:
        return service.stopService() if service.running else None

    def census(*_: Any) -> None:
        """SIGUSR1: live objects by type (after a collection), one JSON line to standard error."""
        import collections

        gc.collect()
        counts = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())
        line = {"blocks": sys.getallocatedblocks(), "objects": sum(counts.values()), "types": counts}
        sys.stderr.write("census: " + json.dumps(line) + "\n")
        sys.stderr.flush()

    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(census))
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    LoopingCall(report).start(sample, now=False)
    reactor.run()
    return 0


# --------------------------------------------------------------------------
# the load


@dataclass
class Counters:
    ops: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)
    udp_lost: int = 0
    udp_merged: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, kind: str) -> None:
        with self.lock:
            self.ops[kind] = self.ops.get(kind, 0) + 1

    def error(self, kind: str) -> None:
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def mismatch(self, what: str) -> None:
        with self.lock:
            self.wrong.append(what)

    def text(self) -> str:
        with self.lock:
            done = " ".join(f"{k}={v}" for k, v in sorted(self.ops.items()))
            errs = " ".join(f"{k}={v}" for k, v in sorted(self.errors.items())) or "none"
            return f"done: {done}; errors: {errs}; udp lost: {self.udp_lost}; wrong data: {len(self.wrong)}"


class Load:
    """Load threads against 127.0.0.1:*port*; ``running`` pauses them, ``stop`` ends them."""

    def __init__(self, port: int, churn: int, udp: int, pause: float, stream_life: float) -> None:
        self.port = port
        self.pause = pause
        self.stream_life = stream_life
        self.counters = Counters()
        self.running = threading.Event()
        self.stop = threading.Event()
        self.idle: dict[str, threading.Event] = {}
        self.threads: list[threading.Thread] = []
        plan = [("churn", self.churn)] * churn + [("abort", self.abort), ("stream", self.stream)]
        plan += [("udp", self.udp)] * udp
        for i, (name, fn) in enumerate(plan):
            tag = f"{name}{i}"
            self.idle[tag] = threading.Event()
            self.threads.append(threading.Thread(target=self._loop, args=(tag, fn), daemon=True))

    def start(self) -> None:
        self.running.set()
        for t in self.threads:
            t.start()

    def quiesce(self, timeout: float = 30.0) -> bool:
        """Pause the load; True once every thread is between operations."""
        self.running.clear()
        deadline = time.time() + timeout
        return all(e.wait(max(0.0, deadline - time.time())) for e in self.idle.values())

    def resume(self) -> None:
        for e in self.idle.values():
            e.clear()
        self.running.set()

    def finish(self) -> None:
        self.stop.set()
        self.running.set()
        for t in self.threads:
            t.join(15)

    def _loop(self, tag: str, fn: Any) -> None:
        rng = random.Random(tag)
        while not self.stop.is_set():
            if not self.running.is_set():
                self.idle[tag].set()
                self.running.wait()
                continue
            try:
                fn(rng)
            except OSError:
                self.counters.error(tag.rstrip("0123456789"))
                time.sleep(0.2)
            time.sleep(self.pause * rng.uniform(0.5, 1.5))

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def churn(self, rng: random.Random) -> None:
        size = rng.choice((1, 100, 1400, 8000, 32768))
        data = rng.randbytes(size)
        with self._connect() as sock:
            sock.sendall(b"E" + data)
            got = _recv_exact(sock, size)
        if got != data:
            self.counters.mismatch(f"churn: {size} bytes came back different")
        self.counters.ok("churn")

    def abort(self, rng: random.Random) -> None:
        sock = self._connect()
        if rng.random() < 0.5:
            sock.sendall(b"E" + rng.randbytes(rng.randint(1, 4000)))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        self.counters.ok("abort")

    def stream(self, rng: random.Random) -> None:
        end = time.time() + self.stream_life
        with self._connect() as sock:
            sock.sendall(b"E")
            while time.time() < end and self.running.is_set() and not self.stop.is_set():
                data = rng.randbytes(65536)
                sock.sendall(data)
                if _recv_exact(sock, len(data)) != data:
                    self.counters.mismatch("stream: a chunk came back different")
                    return
                time.sleep(self.pause)
        self.counters.ok("stream")

    def udp(self, rng: random.Random) -> None:
        sent: dict[int, bytes] = {}
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2.0)
            for seq in range(40):
                if self.stop.is_set() or not self.running.is_set():
                    break
                data = seq.to_bytes(4, "big") + rng.randbytes(rng.choice((16, 512, 1400)))
                sent[seq] = data
                sock.sendto(data, ("127.0.0.1", self.port))
                while True:  # a reply that arrives after its wait ended is checked, then skipped
                    try:
                        got, _ = sock.recvfrom(65536)
                    except TimeoutError:
                        with self.counters.lock:
                            self.counters.udp_lost += 1
                        break
                    last = self._check_datagrams(got, sent)
                    if last is None or last >= seq:
                        break
                time.sleep(self.pause / 4)
        self.counters.ok("udp")

    def _check_datagrams(self, got: bytes, sent: dict[int, bytes]) -> int | None:
        """Check a reply: one datagram, or several sent back to back that arrived merged (a plain
        TCP pool keeps no datagram boundaries).  The last sequence number in it, None if wrong."""
        offset, last = 0, None
        while offset < len(got):
            seq = int.from_bytes(got[offset : offset + 4], "big")
            data = sent.get(seq)
            if data is None or got[offset : offset + len(data)] != data:
                self.counters.mismatch("udp: a datagram came back different")
                return None
            if offset:
                with self.counters.lock:
                    self.counters.udp_merged += 1
            offset += len(data)
            last = seq
        return last


# --------------------------------------------------------------------------
# the ends


class End:
    """A tunnel end in a child process; ``latest`` is its most recent JSON line."""

    def __init__(self, name: str, url: str, sample: float, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log = open(log_dir / f"{name}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", url, "--sample", str(sample)],
            env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=self.log,
        )
        self.latest: dict[str, int] = {}
        self.samples = 0
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            with self.cond:
                self.latest = line
                self.samples += 1
                self.cond.notify_all()

    def fresh(self, timeout: float) -> dict[str, int]:
        """The next sample after now (the latest one if none arrives within *timeout*)."""
        with self.cond:
            seen = self.samples
            self.cond.wait_for(lambda: self.samples > seen, timeout)
            return dict(self.latest)

    def censuses(self) -> list[dict[str, Any]]:
        """The object censuses this end wrote to its log (one per quiet sample)."""
        with open(self.log.name, encoding="utf-8", errors="replace") as handle:
            return [json.loads(line.split("census: ", 1)[1]) for line in handle if line.startswith("census: ")]

    def census_growth(self, top: int = 8) -> list[str]:
        """Object types that grew most between the first and the last census."""
        rows = self.censuses()
        if len(rows) < 2:
            return []
        first, last = rows[0]["types"], rows[-1]["types"]
        grown = sorted(((last[k] - first.get(k, 0), k) for k in last), reverse=True)[:top]
        return [f"{self.name:6} {k}: {first.get(k, 0)} -> {last[k]}" for n, k in grown if n > 0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def row(elapsed: float, end: End, sample: dict[str, int]) -> str:
    return (
        f"{elapsed:7.0f}s {end.name:6} rss {sample.get('rss', 0) / 2**20:7.1f} MiB  fds {sample.get('fds', 0):4}"
        f"  pool {sample.get('pool', 0):4}  timers {sample.get('timers', 0):4}"
        f"  tcps {sample.get('tcps', 0):4}  udps {sample.get('udps', 0):4}"
        + (f"  objects {sample['objects']}  blocks {sample['blocks']}" if "objects" in sample else "")
    )


def quiet_sample(load: Load, ends: list[End], sample: float) -> dict[str, dict[str, int]]:
    """Pause the load until both ends have no live connection or session; their next samples."""
    load.quiesce()
    deadline = time.time() + QUIET_TIMEOUT
    snaps: dict[str, dict[str, int]] = {}
    while time.time() < deadline:
        snaps = {e.name: e.fresh(3 * sample) for e in ends}
        if all(s.get("tcps", 1) == 0 and s.get("udps", 1) == 0 for s in snaps.values()):
            break
    snaps = {e.name: e.fresh(3 * sample) for e in ends}  # one more, after the last close settled
    for e in ends:  # live objects and allocated blocks after a full collection, via the logs
        seen = len(e.censuses())
        e.proc.send_signal(signal.SIGUSR1)
        deadline = time.time() + 30
        while len(e.censuses()) <= seen and time.time() < deadline:
            time.sleep(0.2)
        rows = e.censuses()
        if len(rows) > seen:
            snaps[e.name].update(blocks=rows[-1]["blocks"], objects=rows[-1]["objects"])
    load.resume()
    return snaps


def verdict(first: dict[str, dict[str, int]], last: dict[str, dict[str, int]]) -> tuple[bool, list[str]]:
    """Whether every end stayed flat between the two quiet samples, and one line per figure."""
    flat = True
    lines: list[str] = []
    for name in first:
        a, b = first[name], last[name]
        figures = [
            ("rss", a["rss"], b["rss"], 0),
            ("allocated blocks", a.get("blocks", 0), b.get("blocks", 0), 0),
            ("live objects", a.get("objects", 0), b.get("objects", 0), 0),
            ("fds without pool", a["fds"] - a["pool"], b["fds"] - b["pool"], COUNT_SLACK),
            ("timers", a["timers"], b["timers"], COUNT_SLACK),
        ]
        for label, before, after, slack in figures:
            growth = (after - before) / before if before else 0.0
            ok = after <= before * (1 + GROWTH_LIMIT) or after - before <= slack
            flat = flat and ok
            shown = f"{before / 2**20:.1f} -> {after / 2**20:.1f} MiB" if label == "rss" else f"{before} -> {after}"
            lines.append(f"{name:6} {label:17} {shown:22} {growth * 100:+6.1f} %  {'ok' if ok else 'GROWTH'}")
    return flat, lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds of load (warm-up included)")
    parser.add_argument("--period", type=float, default=60.0, help="seconds between printed rows")
    parser.add_argument("--warmup", type=float, default=120.0, help="seconds before the first quiet sample")
    parser.add_argument("--sample", type=float, default=1.0, help="seconds between the ends' own samples")
    parser.add_argument("--churn", type=int, default=3, help="threads doing connect/echo/close")
    parser.add_argument("--udp", type=int, default=2, help="threads sending UDP datagrams")
    parser.add_argument("--pause", type=float, default=0.02, help="seconds each thread rests between operations")
    parser.add_argument("--stream-life", type=float, default=20.0, help="seconds one streaming connection lives")
    parser.add_argument("--tls", default="0", choices=("0", "1"), help="tls code of the tunnel")
    parser.add_argument("--min", type=int, default=16, help="client pool minimum")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        return serve(args.serve, args.sample)

    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"nodepass-soak-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("NP_UDP_READ_TIMEOUT", "5s")
    target = subprocess.Popen([sys.executable, "-m", "npbench.target", "0"], stdout=subprocess.PIPE, cwd=str(HERE))
    assert target.stdout is not None
    target_port = int(target.stdout.readline())
    tunnel_port, user_port = free_ports(2)
    ends = [
        End("server", f"server://soak@127.0.0.1:{tunnel_port}/127.0.0.1:{user_port}?mode=1&tls={args.tls}&log=warn",
            args.sample, env, log_dir),
        End("client", f"client://soak@127.0.0.1:{tunnel_port}/127.0.0.1:{target_port}?mode=2&min={args.min}&log=warn",
            args.sample, env, log_dir),
    ]
    print(
        f"soak: {args.duration:g} s, rows every {args.period:g} s, warm-up {args.warmup:g} s, tls={args.tls}, "
        f"{args.churn} churn + 1 abort + 1 stream + {args.udp} UDP threads, pause {args.pause:g} s; "
        f"logs in {log_dir}",
        flush=True,
    )
    load: Load | None = None
    try:
        wait_ready(user_port, 60.0)
        load = Load(user_port, args.churn, args.udp, args.pause, args.stream_life)
        start = time.time()
        load.start()
        first: dict[str, dict[str, int]] | None = None
        next_row = start + args.period
        end_at = start + args.duration
        while time.time() < end_at:
            time.sleep(max(0.0, min(next_row, end_at, start + args.warmup if first is None else end_at) - time.time()))
            now = time.time()
            if first is None and now >= start + args.warmup:
                first = quiet_sample(load, ends, args.sample)
                for e in ends:
                    print(row(now - start, e, first[e.name]) + "  (quiet, baseline)", flush=True)
            if now >= next_row:
                for e in ends:
                    print(row(now - start, e, e.latest), flush=True)
                print(f"         load {load.counters.text()}", flush=True)
                next_row += args.period
            if any(e.proc.poll() is not None for e in ends):
                print("a tunnel end exited", flush=True)
                return 2
        last = quiet_sample(load, ends, args.sample)
        load.finish()
        if first is None:
            print("the run ended before the warm-up did: no verdict", flush=True)
            return 2
        elapsed = time.time() - start
        for e in ends:
            print(row(elapsed, e, last[e.name]) + "  (quiet, final)", flush=True)
        print(f"load {load.counters.text()}")
        flat, lines = verdict(first, last)
        print("\n".join(lines))
        grown = [line for e in ends for line in e.census_growth()]
        if grown:
            print("object types that grew most between the quiet samples:\n  " + "\n  ".join(grown))
        if load.counters.wrong:
            print(f"WRONG DATA: {load.counters.wrong[:5]}")
            return 2
        print("verdict: " + ("flat (growth < 5 % after warm-up)" if flat else "GROWTH"), flush=True)
        return 0 if flat else 1
    except (RuntimeError, OSError) as exc:
        print(f"soak failed: {exc}", flush=True)
        return 2
    finally:
        if load is not None:
            load.stop.set()
            load.running.set()
        for e in ends:
            e.stop()
        target.terminate()
        target.wait(10)


if __name__ == "__main__":
    sys.exit(main())
