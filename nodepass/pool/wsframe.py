"""RFC 6455 frames for the WebSocket pool: headers, masking and an incremental decoder.

This is the data path of :mod:`nodepass.pool.ws`, kept small so that a frame
costs a few Python operations whatever its size:

* :func:`frame` builds one unfragmented frame (FIN set, no extension bits),
  masked with a fresh random key when a client sends it; :func:`close_frame`
  builds a close frame;
* :func:`mask` XORs a payload with a 4-byte key at C speed (four strided
  ``bytes.translate`` passes, no per-byte Python work);
* :class:`FrameDecoder` turns received bytes into events, checking every
  rule of RFC 6455 section 5 that applies to a connection without
  extensions: reserved bits clear, known opcodes, control frames unfragmented
  and at most 125 bytes, masking as the role requires, minimal length
  encoding, continuation frames only inside a fragmented message, and close
  frames with a valid code and a UTF-8 reason.  Text messages are refused:
  the pool carries binary messages only.

Payload bytes are handed out as they arrive (a frame split across reads
gives several pieces), so a large message never waits to be complete before
its first bytes move on; the caller decides whether to join pieces into
whole messages.
"""

from __future__ import annotations

import os
import struct

__all__ = [
    "OP_CONTINUATION",
    "OP_TEXT",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "FrameDecoder",
    "ProtocolError",
    "frame",
    "close_frame",
    "close_code",
    "mask",
    "valid_close_code",
]

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_CONTROL = (OP_CLOSE, OP_PING, OP_PONG)

#: Close codes that only an endpoint's own bookkeeping may use, never a frame.
_LOCAL_ONLY = (1004, 1005, 1006, 1015)
#: Largest payload a control frame may carry.
MAX_CONTROL = 125

_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")
#: One translation table per key byte value: ``table[k][b] == b ^ k``.
_XOR = [bytes(b ^ k for b in range(256)) for k in range(256)]

Piece = bytes | bytearray | memoryview
#: An event: (opcode, payload, last piece of its message).  Data pieces carry
#: OP_BINARY whatever frame they came from; control events carry their whole
#: payload and True.
Event = tuple[int, Piece, bool]


class ProtocolError(Exception):
    """The peer broke the framing rules: close with :attr:`code`."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def mask(data: Piece, key: bytes) -> bytearray:
    """``data`` XORed with ``key`` repeated (key byte 0 on data byte 0).

    Masking and unmasking are the same operation."""
    out = bytearray(data)
    if out:
        a, b, c, d = key
        out[0::4] = out[0::4].translate(_XOR[a])
        out[1::4] = out[1::4].translate(_XOR[b])
        out[2::4] = out[2::4].translate(_XOR[c])
        out[3::4] = out[3::4].translate(_XOR[d])
    return out


def _header(opcode: int, length: int, key: bytes | None) -> bytes:
    first = 0x80 | opcode
    bit = 0x80 if key is not None else 0
    if length < 126:
        head = bytes((first, bit | length))
    elif length < 0x10000:
        head = _HEAD16.pack(first, bit | 126, length)
    else:
        head = _HEAD64.pack(first, bit | 127, length)
    return head + key if key is not None else head


def frame(opcode: int, payload: Piece, masked: bool) -> bytes:
    """One whole frame; ``masked`` (a client's frames) draws a fresh random key."""
    if not masked:
        return _header(opcode, len(payload), None) + payload
    key = os.urandom(4)
    return _header(opcode, len(payload), key) + mask(payload, key)


def close_frame(code: int | None, reason: str = "", masked: bool = False) -> bytes:
    """A close frame with ``code`` (None: no code, empty payload) and ``reason``
    (cut to fit the 125-byte limit without breaking a UTF-8 character)."""
    if code is None:
        return frame(OP_CLOSE, b"", masked)
    text = reason.encode("utf-8")[: MAX_CONTROL - 2].decode("utf-8", "ignore").encode("utf-8")
    return frame(OP_CLOSE, code.to_bytes(2, "big") + text, masked)


def valid_close_code(code: int) -> bool:
    """True for a code a peer may send in a close frame (RFC 6455 section 7.4)."""
    if 3000 <= code <= 4999:
        return True
    return 1000 <= code <= 1014 and code not in _LOCAL_ONLY


def close_code(payload: Piece) -> int | None:
    """The code of a close frame's payload, None when it carries none."""
    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None


class FrameDecoder:
    """Incremental decoder for the frames one end receives.

    ``masked``: frames must be masked (we are the server) or must not be
    (we are the client).  :meth:`receive` returns the events of the bytes
    given; after a framing error it returns the events before the bad frame
    and sets :attr:`error`, and ignores everything after.  After a close
    frame it ignores everything too.
    """

    __slots__ = ("masked", "error", "closed", "_buf", "_left", "_key", "_fin", "_in_message")

    def __init__(self, masked: bool) -> None:
        self.masked = masked
        #: The framing error found, if any.
        self.error: ProtocolError | None = None
        #: A close frame was received.
        self.closed = False
        self._buf = b""  # the start of a frame whose header (or control payload) is incomplete
        self._left = 0  # payload bytes still to come in the current data frame
        self._key = b""  # its masking key, turned to the next payload byte
        self._fin = False  # the current data frame ends its message
        self._in_message = False  # a fragmented message waits for continuation frames

    def receive(self, data: bytes) -> list[Event]:
        """Decode ``data``, the next bytes from the peer."""
        out: list[Event] = []
        if self.error is not None or self.closed or not data:
            return out
        if self._buf:
            data = self._buf + data
            self._buf = b""
        try:
            self._decode(data, out)
        except ProtocolError as exc:
            self.error = exc
        return out

    def _decode(self, data: bytes, out: list[Event]) -> None:
        n = len(data)
        pos = 0
        view: memoryview | None = None
        while pos < n:
            left = self._left
            if left:
                # Inside a data frame: hand out what is here of its payload.
                end = pos + left
                if end >= n:
                    end = n
                if pos == 0 and end == n:
                    piece: Piece = data
                else:
                    if view is None:
                        view = memoryview(data)
                    piece = view[pos:end]
                size = end - pos
                key = self._key
                if key:
                    piece = mask(piece, key)
                    turn = size & 3
                    if turn:
                        self._key = key[turn:] + key[:turn]
                self._left = left = left - size
                pos = end
                out.append((OP_BINARY, piece, not left and self._fin))
                continue
            if n - pos < 2:
                break
            first = data[pos]
            if first & 0x70:
                raise ProtocolError(1002, "reserved bits set (no extension was agreed)")
            opcode = first & 0x0F
            fin = first >= 0x80
            control = opcode in _CONTROL
            if control:
                if not fin:
                    raise ProtocolError(1002, "fragmented control frame")
            elif opcode == OP_BINARY:
                if self._in_message:
                    raise ProtocolError(1002, "new message inside a fragmented one")
            elif opcode == OP_CONTINUATION:
                if not self._in_message:
                    raise ProtocolError(1002, "continuation frame outside a message")
            elif opcode == OP_TEXT:
                raise ProtocolError(1003, "unexpected text message (binary only)")
            else:
                raise ProtocolError(1002, f"unknown opcode {opcode:#x}")
            second = data[pos + 1]
            if (second >= 0x80) != self.masked:
                raise ProtocolError(1002, "unmasked frame from a client" if self.masked else "masked frame from a server")
            length = second & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                if length < 126:
                    raise ProtocolError(1002, "payload length not minimally encoded")
                head = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                if length < 0x10000 or length >> 63:
                    raise ProtocolError(1002, "payload length not minimally encoded or too large")
                head = 10
            if control and length > MAX_CONTROL:
                raise ProtocolError(1002, "control frame longer than 125 bytes")
            key = b""
            if self.masked:
                if n - pos < head + 4:
                    break
                key = data[pos + head : pos + head + 4]
                head += 4
            if control:
                start = pos + head
                if n - start < length:
                    break
                payload: Piece = data[start : start + length]
                if key:
                    payload = bytes(mask(payload, key))
                pos = start + length
                if opcode == OP_CLOSE:
                    _check_close(payload)
                    self.closed = True
                    out.append((OP_CLOSE, payload, True))
                    return
                out.append((opcode, payload, True))
                continue
            self._in_message = not fin
            self._fin = fin
            self._left = length
            self._key = key
            pos += head
            if not length:
                out.append((OP_BINARY, b"", fin))
        if pos < n:
            self._buf = data[pos:]


def _check_close(payload: Piece) -> None:
    if len(payload) == 1:
        raise ProtocolError(1002, "close frame with a 1-byte payload")
    code = close_code(payload)
    if code is not None and not valid_close_code(code):
        raise ProtocolError(1002, f"close frame with invalid code {code}")
    try:
        bytes(payload[2:]).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(1007, "close reason is not UTF-8") from None
