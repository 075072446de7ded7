"""A scripted NodePass v1.14.0 peer for conformance tests.

It speaks the wire protocol with the standard library only (blocking
sockets, ``ssl``, ``hmac``, ``json``, ``base64``) and imports nothing from
``nodepass``, so the conformance tests check our implementation against an
independent encoding of the protocol:

* handshake: the exact request bytes of Go's ``net/http`` client, and a
  response shaped like Go's ``net/http`` server answering with
  ``json.NewEncoder`` over a map (sorted keys, trailing newline);
* TCP pool: 4 raw ID bytes per connection, the first one ``00000000``;
* signals: compact JSON (``action``, ``remote``, ``id``, ``fp``; empty ones
  left out) XORed with the tunnel key, standard base64, ``\\n``;
* control: answers ``ping`` with ``pong`` and pings on its own.

Everything here blocks, so tests run the scripts in threads while the
reactor serves the implementation under test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import queue
import socket
import ssl
import threading
import time
from typing import Any

TIMEOUT = 10.0


# -- encoding ----------------------------------------------------------------------------
def fnv_key(port_text: str) -> str:
    """The default tunnel key: FNV-1a-32 of the port text, 8 lower-case hex digits."""
    h = 0x811C9DC5
    for b in port_text.encode():
        h ^= b
        h = (h * 0x01000193) & 0xFFFFFFFF
    return f"{h:08x}"


def token(key: str) -> str:
    """Bearer token: hex HMAC-SHA256 keyed with the tunnel key over nothing."""
    return hmac.new(key.encode(), b"", hashlib.sha256).hexdigest()


def go_request(key: str, host: str = "none", bearer: str | None = None) -> bytes:
    """The bytes Go's http.Client writes for the handshake GET."""
    auth = bearer if bearer is not None else token(key)
    return (
        f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Go-http-client/1.1\r\n"
        f"Authorization: Bearer {auth}\r\nAccept-Encoding: gzip\r\n\r\n"
    ).encode()


def go_response(flow: str, max_: int, tls: str, type_: str) -> bytes:
    """What Go's net/http server sends for the successful handshake."""
    body = json.dumps({"flow": flow, "max": max_, "tls": tls, "type": type_},
                      separators=(",", ":"), sort_keys=True).encode() + b"\n"
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())
    head = (
        "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Date: {date}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def _xor(data: bytes, key: str) -> bytes:
    kb = key.encode()
    return bytes(b ^ kb[i % len(kb)] for i, b in enumerate(data))


def signal_json(action: str, remote: str = "", id: str = "", fp: str = "") -> bytes:
    """Go's compact JSON for a Signal struct with omitempty fields."""
    parts = [f'"action":{json.dumps(action)}']
    if remote:
        parts.append(f'"remote":{json.dumps(remote)}')
    if id:
        parts.append(f'"id":{json.dumps(id)}')
    if fp:
        parts.append(f'"fp":{json.dumps(fp)}')
    return ("{" + ",".join(parts) + "}").encode()


def encode_line(plain: bytes, key: str) -> bytes:
    return base64.b64encode(_xor(plain, key)) + b"\n"


def decode_line(line: bytes, key: str) -> bytes:
    """The JSON text inside one signal line (newline optional)."""
    return _xor(base64.b64decode(line.rstrip(b"\n"), validate=True), key)


def fingerprint(der: bytes) -> str:
    digest = hashlib.sha256(der).hexdigest().upper()
    return "sha256:" + ":".join(digest[i:i + 2] for i in range(0, 64, 2))


# -- blocking helpers ------------------------------------------------------------------------
def recv_exact(sock: Any, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def recv_until_close(sock: Any) -> bytes:
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return buf
        buf += chunk


def parse_http(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    """(status line, headers with lower-case names, body) of a whole response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, body


def tls_client_context() -> ssl.SSLContext:
    """Go's tls=1 client config: TLS 1.3 minimum, no verification, no SNI."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def tls_server_context(crt: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(crt, key)
    return ctx


def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    sock.settimeout(TIMEOUT)
    return sock


# -- control channel ----------------------------------------------------------------------
class Control:
    """The peer's end of the control connection (ID 00000000).

    A reader thread decodes every line, answers ``ping`` with ``pong`` and puts
    every other signal on ``inbox``; a pinger thread sends ``ping`` every
    ``interval`` seconds.  ``lines`` keeps each decoded JSON text in order.
    """

    def __init__(self, sock: Any, key: str, interval: float) -> None:
        self.sock = sock
        self.key = key
        self.interval = interval
        self.lines: list[bytes] = []
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.pongs = 0
        self._pending: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._ping, daemon=True)]
        for t in self._threads:
            t.start()

    def send_raw(self, data: bytes) -> None:
        with self._lock:
            self.sock.settimeout(TIMEOUT)
            try:
                self.sock.sendall(data)
            finally:
                self.sock.settimeout(0.05)

    def send(self, action: str, remote: str = "", id: str = "", fp: str = "") -> None:
        self.send_raw(encode_line(signal_json(action, remote, id, fp), self.key))

    def _ping(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.send("ping")
            except OSError:
                return

    def _read(self) -> None:
        buf = b""
        self.sock.settimeout(0.05)
        while not self._stop.is_set():
            # Reads and writes share one lock: an SSL socket is not safe for
            # concurrent use from two threads.
            try:
                with self._lock:
                    chunk = self.sock.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    text = decode_line(line, self.key)
                    obj = json.loads(text)
                except ValueError as exc:
                    self.errors.append(str(exc))
                    continue
                self.lines.append(text)
                if obj.get("action") == "ping":
                    try:
                        self.send("pong")
                    except OSError:
                        return
                elif obj.get("action") == "pong":
                    self.pongs += 1
                else:
                    self.inbox.put(obj)

    def expect(self, action: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The oldest received signal with ``action`` (others stay queued)."""
        for obj in self._pending:
            if obj.get("action") == action:
                self._pending.remove(obj)
                return obj
        deadline = time.monotonic() + timeout
        while True:
            try:
                obj = self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {action!r} signal; pending: {self._pending!r}") from None
            if obj.get("action") == action:
                return obj
            self._pending.append(obj)

    def wait_pongs(self, n: int, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while self.pongs < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.pongs} pongs received")
            time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        try:
            self.sock.close()
        except OSError:
            pass


# -- Go client ----------------------------------------------------------------------------
class GoClient:
    """A v1.14.0 client talking to a server tunnel port."""

    def __init__(self, port: int, key: str, tls: bool = False, interval: float = 0.5) -> None:
        self.port = port
        self.key = key
        self.tls = tls
        self.interval = interval
        self.pool: dict[str, Any] = {}
        self.order: list[str] = []
        self.fps: dict[str, str] = {}
        self.control: Control | None = None
        self._ctx = tls_client_context() if tls else None

    def handshake(self, bearer: str | None = None) -> tuple[str, dict[str, str], bytes]:
        sock = connect(self.port)
        try:
            sock.sendall(go_request(self.key, bearer=bearer))
            return parse_http(recv_until_close(sock))
        finally:
            sock.close()

    def dial_pool(self) -> str:
        """Open one pool connection and return its ID (hex)."""
        sock: Any = connect(self.port)
        if self._ctx is not None:
            sock = self._ctx.wrap_socket(sock, server_hostname=None)
            der = sock.getpeercert(binary_form=True)
        cid = recv_exact(sock, 4).hex()
        self.pool[cid] = sock
        self.order.append(cid)
        if self._ctx is not None:
            self.fps[cid] = fingerprint(der)
        return cid

    def start_control(self) -> Control:
        sock = self.pool.pop("00000000")
        self.order.remove("00000000")
        self.control = Control(sock, self.key, self.interval)
        return self.control

    def take(self, cid: str) -> Any:
        self.order.remove(cid)
        return self.pool.pop(cid)

    def take_oldest(self) -> tuple[str, Any]:
        cid = self.order[0]
        return cid, self.take(cid)

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        for sock in self.pool.values():
            sock.close()
        self.pool.clear()


# -- Go server ----------------------------------------------------------------------------
class GoServer:
    """A v1.14.0 server on a listening socket: one handshake, then a TCP pool."""

    def __init__(self, key: str, flow: str, max_: int = 16, interval: float = 0.5,
                 tls: tuple[str, str] | None = None, tls_code: str = "") -> None:
        """*tls* (crt, key) makes the pool TLS; the handshake then announces *tls_code* ("1" by default)."""
        self.key = key
        self.tls_code = tls_code or ("1" if tls else "0")
        self.flow = flow
        self.max = max_
        self.interval = interval
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port: int = self.listener.getsockname()[1]
        self._ctx = tls_server_context(*tls) if tls else None
        self.sni: list[str | None] = []  # server name sent by each TLS client hello
        self.versions: list[str | None] = []
        if self._ctx is not None:
            self._ctx.sni_callback = self._record_sni
        self.request: bytes = b""
        self.pool: dict[str, Any] = {}
        self.order: list[str] = []
        self._cond = threading.Condition()
        self._first = True
        self.control: Control | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _record_sni(self, _sock: Any, name: str | None, _ctx: Any) -> None:
        self.sni.append(name)

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            conn.settimeout(TIMEOUT)
            raw = b""
            while b"\r\n\r\n" not in raw:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                raw += chunk
            self.request = raw
            conn.sendall(go_response(self.flow, self.max, self.tls_code, "0"))
            conn.close()
            while not self._stop.is_set():
                sock: Any
                sock, _ = self.listener.accept()
                sock.settimeout(TIMEOUT)
                if self._ctx is not None:
                    sock = self._ctx.wrap_socket(sock, server_side=True)
                    self.versions.append(sock.version())
                if self._first:
                    raw_id, self._first = b"\0\0\0\0", False
                else:
                    raw_id = os.urandom(4)
                sock.sendall(raw_id)
                with self._cond:
                    self.pool[raw_id.hex()] = sock
                    self.order.append(raw_id.hex())
                    self._cond.notify_all()
        except OSError:
            return

    def wait_for(self, cid: str | None = None, count: int = 1, timeout: float = TIMEOUT) -> None:
        """Wait until ``cid`` (or ``count`` connections) are in the pool."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: (cid in self.pool) if cid is not None else len(self.order) >= count, timeout)
        if not ok:
            raise AssertionError(f"pool connection {cid or count} never arrived")

    def start_control(self) -> Control:
        self.wait_for("00000000")
        with self._cond:
            sock = self.pool.pop("00000000")
            self.order.remove("00000000")
        self.control = Control(sock, self.key, self.interval)
        return self.control

    def take(self, cid: str) -> Any:
        self.wait_for(cid)
        with self._cond:
            self.order.remove(cid)
            return self.pool.pop(cid)

    def take_oldest(self) -> tuple[str, Any]:
        self.wait_for(count=1)
        with self._cond:
            cid = self.order.pop(0)
            return cid, self.pool.pop(cid)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        if self.control is not None:
            self.control.close()
        with self._cond:
            for sock in self.pool.values():
                sock.close()
            self.pool.clear()
