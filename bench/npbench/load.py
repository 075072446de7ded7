"""Load generators: what a user of the tunnel does, measured from outside.

Every function talks to a port on 127.0.0.1 with plain blocking (or, for the
burst, non-blocking) sockets and the target protocol of ``npbench.target``
(first byte ``E`` echo, ``S`` sink). Each is bounded in time and returns its
failures instead of raising, except where noted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import selectors
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

PAYLOAD = 64
HOST = "127.0.0.1"


class MetricError(Exception):
    """A measurement could not be taken (the reason is the message)."""


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def connect(port: int, mode: bytes, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(mode)
    return sock


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile *p* (0-100) of *values*."""
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, int(round(p / 100 * (len(ordered) - 1)))))
    return ordered[k]


# -- readiness --------------------------------------------------------------------------------


def echo_once(port: int, timeout: float) -> bool:
    """One connection, ``E`` + one byte, the byte back within *timeout*: True on success."""
    try:
        sock = socket.create_connection((HOST, port), timeout=timeout)
    except OSError:
        return False
    try:
        sock.settimeout(timeout)
        sock.sendall(b"Er")
        return sock.recv(1) == b"r"
    except OSError:
        return False
    finally:
        sock.close()


def wait_first_echo(port: int, timeout: float, alive: Callable[[], str | None]) -> float:
    """Poll *port* with one-byte echoes until one succeeds; return the perf_counter time of it.

    *alive* returns a reason when the processes behind the port died (then
    this stops at once). Raises MetricError after *timeout* seconds."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if echo_once(port, 2.0):
            return time.perf_counter()
        reason = alive()
        if reason:
            raise MetricError(reason)
        time.sleep(0.02)
    raise MetricError(f"no byte came back through the tunnel within {timeout:g} s")


class ProbeEcho:
    """A short-lived echo target (``E`` mode only) on *port*, served by a thread.

    Stands in for a target that cannot answer the readiness probe (iperf3)
    until the tunnel in front of it carries traffic."""

    def __init__(self, port: int) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, port))
        self.listener.listen(128)
        self.listener.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            if conn.recv(1) != b"E":
                return
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()


# -- round trips --------------------------------------------------------------------------------


def tcp_rtt(port: int, count: int, time_limit: float = 60.0) -> list[float]:
    """Round-trip times (s) of up to *count* 64-byte echoes on one connection, after 50 warm-up ones."""
    data = b"x" * PAYLOAD
    times: list[float] = []
    stop = time.perf_counter() + time_limit
    try:
        sock = connect(port, b"E")
    except OSError as exc:
        raise MetricError(f"TCP echo: {exc}") from exc
    try:
        for i in range(count + 50):
            start = time.perf_counter()
            sock.sendall(data)
            recv_exact(sock, PAYLOAD)
            if i >= 50:
                times.append(time.perf_counter() - start)
            if start > stop:
                break
    except OSError as exc:
        raise MetricError(f"TCP echo after {len(times)} round trips: {exc}") from exc
    finally:
        sock.close()
    return times


def udp_rtt(port: int, count: int, time_limit: float = 30.0) -> tuple[list[float], int]:
    """Round-trip times (s) of up to *count* 64-byte datagram echoes, and how many were lost.

    Waits 0.5 s for each answer; the first 20 answers are warm-up. Raises
    MetricError when not a single datagram came back (it gives up after 10)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.5)
    data = b"u" * PAYLOAD
    times: list[float] = []
    answered = lost = 0
    stop = time.perf_counter() + time_limit
    try:
        while len(times) < count and time.perf_counter() < stop:
            start = time.perf_counter()
            sock.sendto(data, (HOST, port))
            try:
                sock.recvfrom(65536)
            except TimeoutError:
                lost += 1
                if not answered and lost >= 10:
                    break
                continue
            answered += 1
            if answered > 20:
                times.append(time.perf_counter() - start)
    finally:
        sock.close()
    if not times:
        raise MetricError(f"UDP echo: no answer ({lost} datagrams lost)")
    return times, lost


# -- connection rate ----------------------------------------------------------------------------


@dataclass
class Rate:
    done: int
    failed: int
    elapsed: float

    @property
    def per_second(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0


def connection_rate(port: int, duration: float, workers: int) -> Rate:
    """*workers* threads loop connect, 1-byte echo, close for *duration* seconds.

    A connection that is refused, reset, closed early or silent for 5 s counts
    as failed (the worker then pauses 10 ms)."""
    stop = time.perf_counter() + duration
    done = [0] * workers
    failed = [0] * workers

    def work(i: int) -> None:
        while time.perf_counter() < stop:
            try:
                sock = connect(port, b"E", timeout=5.0)
                try:
                    sock.sendall(b"!")
                    recv_exact(sock, 1)
                finally:
                    sock.close()
                done[i] += 1
            except OSError:
                failed[i] += 1
                time.sleep(0.01)

    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Rate(sum(done), sum(failed), time.perf_counter() - start)


# -- burst of concurrent connections -----------------------------------------------------------


@dataclass
class Burst:
    """Outcome of :func:`burst`; the echoed connections stay open until the ``with`` ends."""

    wanted: int
    echoed: int = 0
    failed: int = 0
    elapsed: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    socks: list[socket.socket] = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.failed += 1
        self.errors[why] = self.errors.get(why, 0) + 1


@contextlib.contextmanager
def burst(port: int, n: int, timeout: float = 60.0) -> Iterator[Burst]:
    """Open *n* connections at once, echo 64 bytes on each, and hold them open.

    ``elapsed`` is the time from the first connect until the last echo came
    back; connections that fail, or have not echoed after *timeout* seconds,
    count as failed. The connections are closed when the ``with`` block ends,
    so the caller can look at the tunnel while they are held."""
    sel = selectors.DefaultSelector()
    result = Burst(n)
    request = b"E" + b"c" * PAYLOAD
    got: dict[socket.socket, int] = {}
    start = time.perf_counter()
    try:
        for _ in range(n):
            try:
                sock = socket.socket()
            except OSError as exc:
                result.fail(errno.errorcode.get(exc.errno or 0, str(exc)))
                continue
            result.socks.append(sock)
            sock.setblocking(False)
            code = sock.connect_ex((HOST, port))
            if code not in (0, errno.EINPROGRESS):
                result.fail(errno.errorcode.get(code, str(code)))
                continue
            sel.register(sock, selectors.EVENT_WRITE)
        pending = len(sel.get_map())
        deadline = start + timeout
        while pending and time.perf_counter() < deadline:
            for key, events in sel.select(timeout=0.5):
                sock = key.fileobj  # type: ignore[assignment]
                assert isinstance(sock, socket.socket)
                if events & selectors.EVENT_WRITE:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        result.fail(errno.errorcode.get(code, str(code)))
                        sel.unregister(sock)
                        pending -= 1
                        continue
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    try:
                        sock.send(request)
                    except OSError as exc:
                        result.fail(errno.errorcode.get(exc.errno or 0, str(exc)))
                        sel.unregister(sock)
                        pending -= 1
                        continue
                    got[sock] = 0
                    sel.modify(sock, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(65536)
                except OSError as exc:
                    data = b""
                    why = errno.errorcode.get(exc.errno or 0, str(exc))
                else:
                    why = "closed before the echo"
                if not data:
                    result.fail(why)
                    sel.unregister(sock)
                    pending -= 1
                    continue
                got[sock] += len(data)
                if got[sock] >= PAYLOAD:
                    sel.unregister(sock)
                    pending -= 1
                    result.echoed += 1
                    result.elapsed = time.perf_counter() - start
        for _ in range(pending):
            result.fail(f"no echo within {timeout:g} s")
        if pending:
            result.elapsed = time.perf_counter() - start
        yield result
    finally:
        sel.close()
        for sock in result.socks:
            sock.close()


# -- throughput ----------------------------------------------------------------------------------


@dataclass
class Transfer:
    gbps: float
    bytes: int
    moved: int = 0  # all bytes sent during the call (calibration included); 0 = ``bytes``

    @property
    def total(self) -> int:
        return self.moved or self.bytes


def _upload(port: int, total: int) -> float:
    """Send *total* bytes to the sink; seconds until it acknowledged the last one."""
    chunk = memoryview(bytes(256 * 1024))
    sock = connect(port, b"S", timeout=30.0)
    try:
        start = time.perf_counter()
        sock.sendall(total.to_bytes(8, "big"))
        left = total
        while left > 0:
            n = min(left, len(chunk))
            sock.sendall(chunk[:n])
            left -= n
        if recv_exact(sock, 2) != b"OK":
            raise ConnectionError("sink did not acknowledge")
        return time.perf_counter() - start
    finally:
        sock.close()


def builtin_throughput(port: int, duration: float, streams: int) -> Transfer:
    """Bulk upload to the built-in sink on *streams* connections in parallel (threads).

    The size is calibrated by a 16 MiB probe per stream so that the run lasts
    about *duration* seconds; Gbit/s counts payload bytes only."""
    probe = 16 * 1024 * 1024
    try:
        seconds = max(_parallel_upload(port, probe, streams), 1e-3)
        per_stream = int(min(max(probe * duration / seconds, probe), 8 * 1024**3))
        seconds = _parallel_upload(port, per_stream, streams)
    except OSError as exc:
        raise MetricError(f"sink upload: {exc}") from exc
    total = per_stream * streams
    return Transfer(total * 8 / seconds / 1e9, total, total + probe * streams)


def _parallel_upload(port: int, per_stream: int, streams: int) -> float:
    errors: list[OSError] = []

    def one() -> None:
        try:
            _upload(port, per_stream)
        except OSError as exc:
            errors.append(exc)

    start = time.perf_counter()
    threads = [threading.Thread(target=one, daemon=True) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def iperf3_throughput(iperf3: str, port: int, duration: float, streams: int) -> Transfer:
    """``iperf3 -c 127.0.0.1 -p PORT -t D -P N -J``: received bits per second and bytes.

    The iperf3 server takes one test at a time and may still be finishing the
    previous one when the next starts (its control connection closes through
    the tunnel); a "server is busy" answer is retried for up to 10 s."""
    seconds = max(1, int(round(duration)))
    cmd = [iperf3, "-c", HOST, "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J",
           "--connect-timeout", "10000"]
    for attempt in range(11):
        try:
            out = subprocess.run(cmd, capture_output=True, timeout=seconds + 60, check=False)
        except subprocess.TimeoutExpired as exc:
            raise MetricError(f"iperf3 did not finish within {seconds + 60} s") from exc
        try:
            report = json.loads(out.stdout)
        except ValueError as exc:
            text = (out.stderr or out.stdout).decode(errors="replace").strip()[-200:]
            raise MetricError(f"iperf3 exited {out.returncode}: {text}") from exc
        error = str(report.get("error", ""))
        if "busy" in error and attempt < 10:
            time.sleep(1.0)
            continue
        if error:
            raise MetricError(f"iperf3: {error}")
        received = report["end"]["sum_received"]
        return Transfer(float(received["bits_per_second"]) / 1e9, int(received["bytes"]))
    raise AssertionError("unreachable")
