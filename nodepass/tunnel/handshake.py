"""The dual-end tunnel handshake: one HTTP/1.1 ``GET /`` on the tunnel port.

Client request (what a NodePass client sends)::

    GET / HTTP/1.1
    Host: <server name>
    User-Agent: Go-http-client/1.1
    Authorization: Bearer <token>
    Accept-Encoding: gzip

``token`` = lower-case hex of HMAC-SHA256 keyed with the tunnel key over an
empty message.  The server checks the method (405), the path (404) and the
token in constant time (401); every answer carries ``Connection: close``.  On
success it answers 200 with ``Content-Type: application/json`` and the body
``{"flow":F,"max":N,"tls":"C","type":"T"}\\n`` (keys sorted, ``max`` a JSON
number, the others strings).

:class:`HandshakeServerProtocol` serves one connection: it refuses garbage
(400), oversized headers (431) and requests that do not complete within the
handshake timeout, each with a clear log line, and never affects other
connections.  :func:`client_handshake` performs the request and returns the
:class:`TunnelConfig` the server sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.error import ConnectionRefusedError as RefusedError
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure

from nodepass.log import NodePassLogger
from nodepass.net import join_host_port

__all__ = [
    "FORWARDING_HEADERS",
    "auth_token",
    "verify_token",
    "TunnelConfig",
    "HandshakeError",
    "HandshakeRefused",
    "HandshakeServerProtocol",
    "build_request",
    "parse_response",
    "client_handshake",
]

MAX_HEADER = 16 * 1024

#: Headers an HTTP proxy or CDN adds to a request it forwards; the first one
#: found in the handshake request is passed to ``authorize`` (the WebSocket
#: pool then accepts members from other addresses, see nodepass.pool.ws).
FORWARDING_HEADERS = (
    "forwarded",
    "x-forwarded-for",
    "x-real-ip",
    "cf-connecting-ip",
    "true-client-ip",
    "fastly-client-ip",
    "x-client-ip",
    "via",
)


def auth_token(key: str) -> str:
    """HMAC-SHA256(key, b"") as 64 lower-case hex characters."""
    return hmac.new(key.encode("utf-8"), b"", hashlib.sha256).hexdigest()


def verify_token(key: str, token: str) -> bool:
    """Constant-time comparison of a received token with the expected one."""
    return hmac.compare_digest(token.encode("utf-8", "replace"), auth_token(key).encode("ascii"))


class HandshakeError(Exception):
    """The handshake failed; the message says why."""


class HandshakeRefused(HandshakeError):
    """Nothing accepted the handshake connection (the server is not listening yet)."""


@dataclass(frozen=True)
class TunnelConfig:
    """What the server announces: data flow ("-" or "+"), pool max, tls code, pool type."""

    flow: str
    max: int
    tls: str
    type: str

    def body(self) -> bytes:
        """The JSON body exactly as Go's encoder writes it (sorted keys, newline)."""
        return (
            json.dumps(
                {"flow": self.flow, "max": self.max, "tls": self.tls, "type": self.type},
                separators=(",", ":"),
                sort_keys=True,
            ).encode("utf-8")
            + b"\n"
        )

    def log_text(self) -> str:
        return f"FLOW={self.flow}|MAX={self.max}|TLS={self.tls}|TYPE={self.type}"


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
}


def _response(status: int, body: bytes, content_type: str) -> bytes:
    head = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        "Connection: close",
        f"Content-Type: {content_type}",
    ]
    if status != 200:
        head.append("X-Content-Type-Options: nosniff")
    head.append("Date: " + formatdate(usegmt=True))
    head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def _error(status: int) -> bytes:
    return _response(status, (_REASONS[status] + "\n").encode("ascii"), "text/plain; charset=utf-8")


class HandshakeServerProtocol(Protocol):
    """Serves the handshake on one connection of the tunnel port.

    ``authorize(peer_ip, via)`` is called for a request with a valid token
    (``via``: the first of :data:`FORWARDING_HEADERS` the request carries, ''
    when none) and returns the TunnelConfig to send, or None when the server
    no longer takes handshakes (the connection is then closed).
    """

    def __init__(
        self,
        *,
        key: str,
        reactor: Any,
        logger: NodePassLogger,
        timeout: float,
        authorize: Callable[[str, str], TunnelConfig | None],
    ) -> None:
        self.key = key
        self.reactor = reactor
        self.logger = logger
        self.timeout = timeout
        self.authorize = authorize
        self._buf = b""
        self._timer: Any = None
        self._done = False
        self.peer = "?"
        self.peer_ip = ""

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.peer_ip = getattr(peer, "host", "")
        port = getattr(peer, "port", 0)
        self.peer = join_host_port(self.peer_ip, port)
        if self.timeout > 0:
            self._timer = self.reactor.callLater(self.timeout, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self._done:
            return
        self.logger.warn("Tunnel handshake from %s timed out after %gs: closed", self.peer, self.timeout)
        self._finish(_error(408) if self._buf else None)

    def _finish(self, data: bytes | None) -> None:
        self._done = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if data:
            self.transport.write(data)  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def close(self) -> None:
        """Close this connection (the server stopped taking handshakes)."""
        if not self._done:
            self._finish(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._done:
            self._done = True
            if self._buf:
                self.logger.warn("Tunnel handshake from %s ended before a full request: closed", self.peer)

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEADER:
                self.logger.warn("Tunnel handshake from %s: request header too large: closed", self.peer)
                self._finish(_error(431))
            elif not _plausible_prefix(self._buf):
                self.logger.warn("Tunnel handshake from %s: not an HTTP request: closed", self.peer)
                self._finish(_error(400))
            return
        self._handle(self._buf[:end].decode("latin-1"))

    def _handle(self, head: str) -> None:
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self.logger.warn("Tunnel handshake from %s: malformed request line: closed", self.peer)
            self._finish(_error(400))
            return
        method, target, _version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                self.logger.warn("Tunnel handshake from %s: malformed header line: closed", self.peer)
                self._finish(_error(400))
                return
            headers.setdefault(name.strip().lower(), value.strip())
        path = target.split("?", 1)[0]
        if target.startswith("http://") or target.startswith("https://"):
            rest = target.split("://", 1)[1]
            path = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
            path = path.split("?", 1)[0]
        if method != "GET":
            self.logger.warn("Tunnel handshake from %s: method %s not allowed", self.peer, method[:16])
            self._finish(_error(405))
            return
        if path != "/":
            self.logger.warn("Tunnel handshake from %s: path %s not found", self.peer, path[:64])
            self._finish(_error(404))
            return
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not verify_token(self.key, auth[len("Bearer ") :]):
            self.logger.warn("Tunnel handshake from %s: unauthorized (missing or wrong key)", self.peer)
            self._finish(_error(401))
            return
        via = next((name for name in FORWARDING_HEADERS if name in headers), "")
        config = self.authorize(self.peer_ip, via)
        if config is None:
            self._finish(None)
            return
        self._finish(_response(200, config.body(), "application/json"))


def _plausible_prefix(buf: bytes) -> bool:
    """True while ``buf`` can still be the start of an HTTP/1.x request."""
    first = buf.split(b"\r\n", 1)[0]
    if b"\r\n" not in buf and len(first) > 8192:
        return False
    token = first.split(b" ", 1)[0]
    if not token:
        return len(buf) == 0
    return all(65 <= c <= 90 or 97 <= c <= 122 for c in token[:32]) and len(token) <= 32


def build_request(key: str, host: str) -> bytes:
    """The exact handshake request a NodePass client sends."""
    return (
        "GET / HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "User-Agent: Go-http-client/1.1\r\n"
        f"Authorization: Bearer {auth_token(key)}\r\n"
        "Accept-Encoding: gzip\r\n"
        "\r\n"
    ).encode()


def parse_response(data: bytes) -> TunnelConfig:
    """Parse a complete handshake response; raises HandshakeError."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        raise HandshakeError("tunnelHandshake: malformed HTTP response")
    head = data[:end].decode("latin-1").split("\r\n")
    body = data[end + 4 :]
    status_line = head[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/"):
        raise HandshakeError("tunnelHandshake: malformed HTTP response")
    try:
        status = int(status_line[1])
    except ValueError:
        raise HandshakeError("tunnelHandshake: malformed HTTP status") from None
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if status != 200:
        raise HandshakeError(f"tunnelHandshake: status {status}")
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    elif "content-length" in headers:
        try:
            body = body[: int(headers["content-length"])]
        except ValueError:
            pass
    try:
        obj = json.loads(body.decode("utf-8"))
        if not isinstance(obj, dict):
            raise ValueError("not an object")
        flow = obj.get("flow", "")
        mx = obj.get("max", 0)
        tls = obj.get("tls", "")
        typ = obj.get("type", "")
        if not isinstance(flow, str) or not isinstance(tls, str) or not isinstance(typ, str):
            raise ValueError("flow, tls and type must be strings")
        if isinstance(mx, bool) or not isinstance(mx, int):
            raise ValueError("max must be an integer")
    except (UnicodeDecodeError, ValueError) as exc:
        raise HandshakeError(f"tunnelHandshake: invalid config: {exc}") from None
    return TunnelConfig(flow=flow, max=mx, tls=tls, type=typ)


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        line, sep, rest = body.partition(b"\r\n")
        if not sep:
            break
        try:
            size = int(line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


class _ClientProtocol(Protocol):
    def __init__(self, request: bytes, done: defer.Deferred[bytes]) -> None:
        self.request = request
        self.done = done
        self.buf = b""

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > 64 * 1024:
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].lower()
        for line in head.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                try:
                    need = int(line.split(b":", 1)[1].strip())
                except ValueError:
                    return
                if len(self.buf) - end - 4 >= need and not self.done.called:
                    self.done.callback(self.buf)
                    self.transport.loseConnection()  # type: ignore[union-attr]
                return

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            if self.buf:
                self.done.callback(self.buf)
            else:
                msg = str(reason.value) if not isinstance(reason.value, ConnectionDone) else "EOF"
                self.done.errback(HandshakeError(f"tunnelHandshake: {msg}"))


def client_handshake(
    reactor: Any,
    *,
    host: str,
    port: int,
    key: str,
    server_name: str,
    timeout: float,
    tls_creator: Any = None,
) -> defer.Deferred[TunnelConfig]:
    """Send the handshake to ``host:port`` and return the server's TunnelConfig.

    The whole exchange (connect, request, response) must finish within
    ``timeout`` seconds.  ``tls_creator`` wraps the connection in TLS (used
    when the tunnel port is 443, as NodePass does).  Cancelling the returned
    Deferred aborts the attempt.
    """
    protos: list[_ClientProtocol] = []
    handles: list[Any] = []

    def cancel(_d: defer.Deferred[bytes]) -> None:
        for p in protos:
            if p.transport is not None:
                p.transport.abortConnection()  # type: ignore[attr-defined]
        for connector in handles:
            if getattr(connector, "state", "") == "connecting":
                connector.stopConnecting()

    raw: defer.Deferred[bytes] = defer.Deferred(cancel)
    request = build_request(key, server_name)

    class F(ClientFactory):
        noisy = False  # one factory per attempt: no "Starting factory" log lines

        def buildProtocol(self, addr: IAddress | None) -> Protocol:
            p = _ClientProtocol(request, raw)
            protos.append(p)
            return p

        def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
            if not raw.called:
                refused = reason.check(RefusedError) is not None  # type: ignore[no-untyped-call]
                error = HandshakeRefused if refused else HandshakeError
                raw.errback(error(f"tunnelHandshake: dial tcp {host}:{port}: {reason.getErrorMessage()}"))

    factory: Any = F()
    if tls_creator is not None:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        factory = TLSMemoryBIOFactory(tls_creator, True, factory)
    connector = reactor.connectTCP(host, port, factory, timeout=max(timeout, 0.1))
    handles.append(connector)

    def expire() -> None:
        if not raw.called:
            raw.errback(HandshakeError(f"tunnelHandshake: no response within {timeout:g}s"))
            for p in protos:
                if p.transport is not None:
                    p.transport.abortConnection()  # type: ignore[attr-defined]
            try:
                connector.disconnect()
            except Exception:
                pass

    call = reactor.callLater(timeout, expire) if timeout > 0 else None

    def cleanup(result: Any) -> Any:
        if call is not None and call.active():
            call.cancel()
        return result

    raw.addBoth(cleanup)
    return raw.addCallback(parse_response)
