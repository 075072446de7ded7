"""The HTTP/1.1 upgrade that opens each WebSocket of the pool (RFC 6455 section 4).

Every pool member does one upgrade, so the usual case is handled without an
HTTP library: the client sends a request built once per pool with only the
key changing (:class:`UpgradeRequest`), the server reads a request head of
the plain form every WebSocket client sends (:func:`parse_request`) and
answers with a fixed 101 (:func:`switching_protocols`), and the client reads
that 101 (:func:`parse_response`).  These readers accept only heads that are
strictly well-formed: every line ``CRLF``-terminated, a ``GET`` request
line, header names that are tokens, values of visible characters, one
``Host``, no body.  Anything else returns None, and :mod:`nodepass.pool.ws`
hands the bytes to h11, which parses them in full and decides (so an odd but
valid request is still served, and a broken one gets h11's error).

:func:`check_upgrade` and :func:`check_answer` are the WebSocket rules on
the parsed headers, the same whichever reader produced them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re

__all__ = [
    "HeaderList",
    "UpgradeRequest",
    "accept_token",
    "check_answer",
    "check_upgrade",
    "http_error",
    "needs_full_parser",
    "parse_request",
    "parse_response",
    "switching_protocols",
    "FAST_HEAD_LIMIT",
]

HeaderList = list[tuple[bytes, bytes]]

#: A head longer than this (without its blank line) is left to h11.
FAST_HEAD_LIMIT = 8192

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_REQUEST_LINE = re.compile(rb"GET [\x21-\x7e]+ HTTP/1\.1")
_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([0-9]{3})(?: [\t \x21-\x7e]*)?")
_FIELD = re.compile(
    rb"([-!#$%&'*+.^_`|~0-9A-Za-z]+):[\t ]*((?:[\x21-\x7e](?:[\t \x21-\x7e]*[\x21-\x7e])?)?)[\t ]*"
)
_SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "


def accept_token(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.strip() + _GUID).digest())


class UpgradeRequest:
    """The client's upgrade request for one ``Host``; each :meth:`new` has a fresh key.

    Headers: ``Host``, ``Upgrade: websocket``, ``Connection: Upgrade``,
    ``Sec-WebSocket-Version: 13``, ``User-Agent`` and ``Sec-WebSocket-Key``;
    no subprotocol, no extension, no ``Origin``."""

    def __init__(self, host: str, user_agent: bytes) -> None:
        try:
            name = host.encode("idna")
        except UnicodeError:
            name = host.encode("utf-8")
        self._head = (
            b"GET / HTTP/1.1\r\nHost: " + name
            + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nUser-Agent: "
            + user_agent + b"\r\nSec-WebSocket-Key: "
        )

    def new(self) -> tuple[bytes, bytes]:
        """(request bytes, the accept value the answer must carry)."""
        key = base64.b64encode(os.urandom(16))
        return self._head + key + b"\r\n\r\n", accept_token(key)


def switching_protocols(key: bytes) -> bytes:
    """The server's 101 answer to a request with ``Sec-WebSocket-Key: key``."""
    return _SWITCHING + accept_token(key) + b"\r\n\r\n"


def http_error(status: int, phrase: str, headers: HeaderList, body: bytes) -> bytes:
    """A complete HTTP/1.1 error response."""
    head = b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode("latin-1"))
    return head + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n" + body


def needs_full_parser(buffered: bytes) -> bool:
    """True when bytes without a ``CRLFCRLF`` must go to h11 at once: too long
    for the quick reader, or a blank line with bare ``LF`` endings."""
    return len(buffered) > FAST_HEAD_LIMIT or b"\n\n" in buffered or b"\n\r\n" in buffered


def _fields(lines: list[bytes]) -> HeaderList | None:
    out: HeaderList = []
    match = _FIELD.fullmatch
    for line in lines:
        m = match(line)
        if m is None:
            return None
        out.append((m.group(1).lower(), m.group(2)))
    return out


def parse_request(head: bytes) -> HeaderList | None:
    """Headers (names in lower case) of a plain ``GET ... HTTP/1.1`` request
    head (without its final ``CRLFCRLF``), or None when it is not of that
    strict form (see the module docstring)."""
    if len(head) > FAST_HEAD_LIMIT:
        return None
    lines = head.split(b"\r\n")
    if _REQUEST_LINE.fullmatch(lines[0]) is None:
        return None
    headers = _fields(lines[1:])
    if headers is None:
        return None
    hosts = 0
    for name, _value in headers:
        if name == b"host":
            hosts += 1
        elif name == b"content-length" or name == b"transfer-encoding":
            return None
    return headers if hosts == 1 else None


def parse_response(head: bytes) -> tuple[int, HeaderList] | None:
    """(status, headers) of an ``HTTP/1.1`` response head (without its final
    ``CRLFCRLF``), or None when it is not of the strict form."""
    if len(head) > FAST_HEAD_LIMIT:
        return None
    lines = head.split(b"\r\n")
    m = _STATUS_LINE.fullmatch(lines[0])
    if m is None:
        return None
    headers = _fields(lines[1:])
    if headers is None:
        return None
    return int(m.group(1)), headers


def _tokens(headers: HeaderList, name: bytes) -> list[str]:
    """Lower-case comma-separated tokens of every ``name`` header."""
    out: list[str] = []
    for key, value in headers:
        if key == name:
            out.extend(t.strip().lower() for t in value.decode("latin-1").split(","))
    return out


def check_upgrade(method: bytes, version: bytes, headers: HeaderList) -> tuple[int, str, HeaderList] | None:
    """Why a request is not a valid WebSocket upgrade: (status, text, extra
    headers for the answer), or None when it is one.  ``headers`` have
    lower-case names."""
    upgrade_hint = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    if version != b"1.1":
        return 426, f"websocket upgrade needs HTTP/1.1, got HTTP/{version.decode('latin-1')}", upgrade_hint
    if "upgrade" not in _tokens(headers, b"connection"):
        return 426, "websocket upgrade needs the Connection header to contain Upgrade", upgrade_hint
    if "websocket" not in _tokens(headers, b"upgrade"):
        return 426, "websocket upgrade needs the Upgrade header to contain websocket", upgrade_hint
    if method != b"GET":
        return 405, f"websocket upgrade needs GET, got {method[:16].decode('latin-1')}", []
    versions = [v for k, v in headers if k == b"sec-websocket-version"]
    if versions != [b"13"]:
        shown = b", ".join(versions)[:32].decode("latin-1")
        return 400, f"unsupported websocket version {shown!r} (only 13)", [(b"Sec-WebSocket-Version", b"13")]
    keys = [v for k, v in headers if k == b"sec-websocket-key"]
    if len(keys) != 1:
        return 400, f"websocket upgrade needs exactly one Sec-WebSocket-Key header, got {len(keys)}", []
    try:
        raw = base64.b64decode(keys[0].strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        return 400, "Sec-WebSocket-Key is not 16 bytes in base64", []
    return None


def request_key(headers: HeaderList) -> bytes:
    """The ``Sec-WebSocket-Key`` of a request that passed :func:`check_upgrade`."""
    return next(v for k, v in headers if k == b"sec-websocket-key").strip()


def check_answer(headers: HeaderList, accept: bytes) -> str | None:
    """What is wrong with a 101 answer to our request (None: nothing).
    ``headers`` have lower-case names."""
    if "upgrade" not in _tokens(headers, b"connection"):
        return "missing Connection: Upgrade"
    if "websocket" not in _tokens(headers, b"upgrade"):
        return "missing Upgrade: websocket"
    accepts = [v.strip() for k, v in headers if k == b"sec-websocket-accept"]
    if accepts != [accept]:
        return "wrong Sec-WebSocket-Accept"
    if any(k == b"sec-websocket-extensions" for k, _v in headers):
        return "the server chose an extension we did not offer"
    if any(k == b"sec-websocket-protocol" for k, _v in headers):
        return "the server chose a subprotocol we did not offer"
    return None
