"""Control-channel signals: JSON object -> XOR with the tunnel key -> base64 -> line.

A signal is a JSON object with the keys ``action`` (always), ``remote``,
``id`` and ``fp`` (each omitted when empty), written compactly in that order.
Its UTF-8 bytes are XORed with the tunnel key (byte ``i`` with key byte
``i mod len(key)``, restarting for every signal), encoded with standard
base64 (with ``=`` padding) and terminated by one ``\\n``.

Decoding reverses these steps.  Field names are matched without regard to
case and unknown keys are ignored, like the Go decoder.  Anything that fails
raises :class:`SignalError` with a readable message; the caller logs it and
skips the line.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["Signal", "SignalError", "encode", "decode", "xor", "LineSplitter"]

ACTIONS = ("tcp", "udp", "ping", "pong", "flush", "verify")


class SignalError(ValueError):
    """A control line that is not a valid signal."""


@dataclass(frozen=True)
class Signal:
    """One control signal; empty strings mean "absent"."""

    action: str
    remote: str = ""
    id: str = ""
    fp: str = ""

    def to_json(self) -> bytes:
        """Compact JSON in Go's field order, empty fields omitted."""
        obj: dict[str, str] = {"action": self.action}
        if self.remote:
            obj["remote"] = self.remote
        if self.id:
            obj["id"] = self.id
        if self.fp:
            obj["fp"] = self.fp
        # Go's encoder escapes <, > and & in strings; mirror that.
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
        text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        return text.encode("utf-8")


def _key_bytes(key: str | bytes) -> bytes:
    kb = key.encode("utf-8") if isinstance(key, str) else key
    if not kb:
        raise ValueError("tunnel key must not be empty")
    return kb


def xor(data: bytes, key: str | bytes) -> bytes:
    """XOR ``data`` with the repeating ``key`` (its own inverse)."""
    kb = _key_bytes(key)
    n = len(data)
    if n == 0:
        return b""
    reps = kb * (n // len(kb) + 1)
    return (int.from_bytes(data, "big") ^ int.from_bytes(reps[:n], "big")).to_bytes(n, "big")


def encode(signal: Signal, key: str | bytes) -> bytes:
    """The wire line for ``signal``, including the trailing newline."""
    return base64.b64encode(xor(signal.to_json(), key)) + b"\n"


def decode(line: bytes, key: str | bytes) -> Signal:
    """Parse one wire line (with or without its newline) into a Signal."""
    raw = line[:-1] if line.endswith(b"\n") else line
    raw = raw.replace(b"\r", b"")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignalError(f"decode signal failed: base64: {exc}") from None
    plain = xor(data, key)
    try:
        obj: Any = json.loads(plain.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SignalError(f"unmarshal signal failed: {exc}") from None
    if not isinstance(obj, dict):
        raise SignalError("unmarshal signal failed: not a JSON object")
    fields: dict[str, str] = {}
    for k, v in obj.items():
        lk = str(k).lower()
        if lk in ("action", "remote", "id", "fp"):
            if v is None:
                continue
            if not isinstance(v, str):
                raise SignalError(f"unmarshal signal failed: field {k!r} is not a string")
            fields[lk] = v
    return Signal(
        action=fields.get("action", ""),
        remote=fields.get("remote", ""),
        id=fields.get("id", ""),
        fp=fields.get("fp", ""),
    )


class LineSplitter:
    """Splits a byte stream into lines ending with ``\\n`` (newline removed).

    A line longer than ``max_line`` bytes raises :class:`SignalError`.
    """

    def __init__(self, max_line: int = 64 * 1024) -> None:
        self._buf = b""
        self._max = max_line

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data
        parts = buf.split(b"\n")
        self._buf = parts.pop()
        if len(self._buf) > self._max:
            self._buf = b""
            raise SignalError(f"control line longer than {self._max} bytes")
        return parts
