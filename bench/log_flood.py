#!/usr/bin/env python3
"""Log volume under a connection flood on a tunnel port, with and without line summaries.

A ``server://`` and a ``client://`` process (``python -m nodepass URL``) carry
a tunnel to an echo target; this process opens garbage connections to the
tunnel port from 127.0.0.2 (not the handshaken client, so the server refuses
each one with a WARN line) as fast as *--workers* threads can for
*--duration* seconds, while one more thread keeps echoing through the tunnel.
Then it counts what the server wrote: its WARN lines, how many refusals they
stand for (a summary ``… (repeated N times in the last 10s)`` stands for N),
and whether every echo came back.

Each setting of ``NP_LOG_REPEAT_INTERVAL`` given with *--intervals* is one
run (``0`` writes every line, as NodePass does); the table compares them.

Usage::

    python bench/log_flood.py                      # 60 s each for 0 and 10s
    python bench/log_flood.py --duration 10 --intervals 0,1s,10s
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY = re.compile(r"\(repeated (\d+) times? in the last \S+\)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo_target() -> int:
    """A threaded echo server on 127.0.0.1; returns its port."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return int(listener.getsockname()[1])


def start(url: str, log_path: str, interval: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", NP_LOG_REPEAT_INTERVAL=interval)
    with open(log_path, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "nodepass", url], stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_text(path: str, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, encoding="utf-8", errors="replace") as f:
            if text in f.read():
                return
        time.sleep(0.1)
    raise SystemExit(f"{text!r} not seen in {path}")


def echo_once(port: int, payload: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
            return got == payload
    except OSError:
        return False


def run(interval: str, duration: float, workers: int) -> dict[str, object]:
    work = tempfile.mkdtemp(prefix="np-flood-")
    target = echo_target()
    tunnel, local = free_port(), free_port()
    server_log, client_log = os.path.join(work, "server.log"), os.path.join(work, "client.log")
    server = start(f"server://k@127.0.0.1:{tunnel}/127.0.0.1:{target}?log=info", server_log, interval)
    client: subprocess.Popen[bytes] | None = None
    try:
        wait_text(server_log, "Pending tunnel handshake")  # before the client: it must not take the port
        client = start(f"client://k@127.0.0.1:{tunnel}/127.0.0.1:{local}?mode=2", client_log, interval)
        wait_text(client_log, "Client started")
        payload = b"x" * 4096
        deadline = time.monotonic() + 60
        while not echo_once(local, payload):
            if time.monotonic() > deadline:
                raise SystemExit("the tunnel never carried an echo")
            time.sleep(0.2)
        stop = time.monotonic() + duration
        counts = {"flood": 0, "echo_ok": 0, "echo_failed": 0}
        lock = threading.Lock()

        def flood() -> None:
            while time.monotonic() < stop:
                s = socket.socket()
                s.settimeout(5)
                try:
                    s.bind(("127.0.0.2", 0))
                    s.connect(("127.0.0.1", tunnel))
                    s.sendall(b"GARBAGE\r\n\r\n")
                    s.recv(16)
                except OSError:
                    pass
                finally:
                    s.close()
                with lock:
                    counts["flood"] += 1

        def traffic() -> None:
            while time.monotonic() < stop:
                ok = echo_once(local, payload)
                with lock:
                    counts["echo_ok" if ok else "echo_failed"] += 1
                time.sleep(0.1)

        threads = [threading.Thread(target=flood) for _ in range(workers)] + [threading.Thread(target=traffic)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(12)  # the last summary comes at the end of its interval
        with open(server_log, encoding="utf-8", errors="replace") as f:
            warn = [line for line in f.read().splitlines() if "  WARN  " in line and "refused" in line]
        represented = sum(int(m.group(1)) if (m := SUMMARY.search(line)) else 1 for line in warn)
        return {"interval": interval, **counts, "warn_lines": len(warn), "refusals_logged": represented}
    finally:
        for proc in (client, server):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="flood seconds per run")
    parser.add_argument("--workers", type=int, default=4, help="flooding threads")
    parser.add_argument("--intervals", default="0,10s", help="NP_LOG_REPEAT_INTERVAL values, comma-separated")
    args = parser.parse_args()
    rows = [run(i, args.duration, args.workers) for i in args.intervals.split(",")]
    print(f"flood of {args.duration:g} s, {args.workers} workers, {os.cpu_count()} CPUs\n")
    print("| NP_LOG_REPEAT_INTERVAL | connections sent | refusals logged | WARN lines written | echoes ok / failed |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['interval']} | {r['flood']} | {r['refusals_logged']} | {r['warn_lines']} |"
              f" {r['echo_ok']} / {r['echo_failed']} |")


if __name__ == "__main__":
    main()
