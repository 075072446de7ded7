"""A decoder for Go ``encoding/gob`` streams (enough to read a Go master's state file).

A gob stream is a sequence of messages, each prefixed with its length.  A
message either defines a type (negative type id followed by a ``wireType``
description) or carries a value of an already known type.  :func:`decode`
reads the type definitions, then exactly one value, and returns it as plain
Python data:

=========================  ==================================================
Go type on the wire        Python value
=========================  ==================================================
bool                       ``bool``
int*, uint*                ``int``
float*                     ``float``
complex*                   ``complex``
string                     ``str`` (invalid UTF-8 becomes U+FFFD, as Go's JSON does)
[]byte                     ``bytes``
slice, array               ``list``
map                        ``dict`` (keys must be bool, number, string or []byte)
struct                     ``dict`` of field name → value; every field of the
                           sender's type is present, fields that were not sent
                           (Go leaves out zero values) get their zero value,
                           and ``None`` for struct, array and GobEncoder fields
interface{}                ``None`` for a nil interface; a non-nil one is refused
time.Time                  an aware ``datetime`` (microseconds; a time Python
                           cannot represent stays a :class:`GobOpaque`)
other GobEncoder,          :class:`GobOpaque` with the raw bytes
BinaryMarshaler,
TextMarshaler types
=========================  ==================================================

Anything malformed (truncated data, a length or count past the end, an
unknown type id, a field number out of range, bytes left over, nesting
deeper than :data:`MAX_DEPTH`) raises :class:`GobError`, and nothing else:
every problem a damaged file can cause is reported the same way.
"""

from __future__ import annotations

import datetime
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

__all__ = ["GobError", "GobOpaque", "decode", "decode_file", "MAX_DEPTH", "MAX_FILE_SIZE"]

MAX_DEPTH = 100
"""Deepest nesting of values accepted (a damaged recursive type cannot exhaust the stack)."""

MAX_FILE_SIZE = 64 << 20
"""Largest file :func:`decode_file` reads (bytes)."""

# Type ids every gob stream knows without a definition.
_BOOL, _INT, _UINT, _FLOAT, _BYTES, _STRING, _COMPLEX, _INTERFACE = range(1, 9)
_LAST_RESERVED = 63
"""Ids up to this one belong to gob itself; a stream may not define them."""

_BUILTIN_NAMES = {
    _BOOL: "bool",
    _INT: "int",
    _UINT: "uint",
    _FLOAT: "float",
    _BYTES: "[]byte",
    _STRING: "string",
    _COMPLEX: "complex",
    _INTERFACE: "interface",
}
_KEY_TYPES = frozenset({_BOOL, _INT, _UINT, _FLOAT, _BYTES, _STRING, _COMPLEX})
_ENCODINGS = {4: "GobEncoder", 5: "BinaryMarshaler", 6: "TextMarshaler"}


class GobError(ValueError):
    """The data is not a well-formed gob stream (or uses a feature this decoder refuses)."""


@dataclass(frozen=True)
class GobOpaque:
    """A value a Go type encoded itself (``GobEncoder``, ``BinaryMarshaler``, ``TextMarshaler``)."""

    type_name: str
    encoding: str
    data: bytes


@dataclass
class _Type:
    """One type defined in the stream."""

    kind: str  # "array" | "slice" | "struct" | "map" | "opaque"
    name: str = ""
    elem: int = 0
    key: int = 0
    length: int = 0
    fields: list[tuple[str, int]] = field(default_factory=list)
    encoding: str = ""


class _Reader:
    """Reads gob primitives from ``data[pos:end]``."""

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data = data
        self.pos = pos
        self.end = end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.remaining:
            raise GobError(f"truncated {what} at offset {self.pos}: {n} bytes needed, {self.remaining} left")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unsigned(self, what: str = "unsigned integer") -> int:
        if self.pos >= self.end:
            raise GobError(f"truncated {what} at offset {self.pos}")
        first = self.data[self.pos]
        self.pos += 1
        if first < 0x80:
            return first
        size = 256 - first
        if size > 8:
            raise GobError(f"invalid {what} at offset {self.pos - 1}: {size}-byte length")
        return int.from_bytes(self.take(size, what), "big")

    def signed(self, what: str = "integer") -> int:
        value = self.unsigned(what)
        if value & 1:
            return ~(value >> 1)
        return value >> 1

    def count(self, what: str, per_item: int = 1) -> int:
        """A length prefix that cannot be more than the bytes left (every item takes at least one)."""
        at = self.pos
        n = self.unsigned(what)
        if n * per_item > self.remaining:
            raise GobError(f"{what} at offset {at} is {n}, more than the {self.remaining} bytes left")
        return n


def _read_struct(r: _Reader, handlers: dict[int, Callable[[], None]], what: str) -> None:
    """Read one of gob's own description structs: (field delta, value)* then 0."""
    number = -1
    while True:
        delta = r.unsigned(f"{what} field number")
        if delta == 0:
            return
        number += delta
        handler = handlers.get(number)
        if handler is None:
            raise GobError(f"{what}: unknown field {number} at offset {r.pos}")
        handler()


def _read_common(r: _Reader, into: _Type) -> None:
    def name() -> None:
        into.name = _text(r.take(r.count("type name length"), "type name"))

    def ident() -> None:
        r.signed("type id")

    _read_struct(r, {0: name, 1: ident}, "type description")


def _read_type(r: _Reader) -> _Type:
    """Read a ``wireType`` value: exactly one of its seven kinds is set."""
    found: list[_Type] = []

    def common_and(kind: str, extra: dict[int, Callable[[_Type], None]]) -> Callable[[], None]:
        def read() -> None:
            t = _Type(kind)
            handlers: dict[int, Callable[[], None]] = {0: partial(_read_common, r, t)}
            for number, reader in extra.items():
                handlers[number] = partial(reader, t)
            _read_struct(r, handlers, f"{kind} type")
            found.append(t)

        return read

    def elem(t: _Type) -> None:
        t.elem = r.signed("element type id")

    def key(t: _Type) -> None:
        t.key = r.signed("key type id")

    def length(t: _Type) -> None:
        t.length = r.signed("array length")
        if t.length < 0:
            raise GobError(f"negative array length {t.length}")

    def fields(t: _Type) -> None:
        for _ in range(r.count("struct field count")):
            entry = _Type("field")

            def name(entry: _Type = entry) -> None:
                entry.name = _text(r.take(r.count("field name length"), "field name"))

            def ident(entry: _Type = entry) -> None:
                entry.elem = r.signed("field type id")

            _read_struct(r, {0: name, 1: ident}, "struct field")
            t.fields.append((entry.name, entry.elem))

    handlers: dict[int, Callable[[], None]] = {
        0: common_and("array", {1: elem, 2: length}),
        1: common_and("slice", {1: elem}),
        2: common_and("struct", {1: fields}),
        3: common_and("map", {1: key, 2: elem}),
    }
    for number, encoding in _ENCODINGS.items():

        def opaque(encoding: str = encoding) -> None:
            t = _Type("opaque", encoding=encoding)
            _read_struct(r, {0: lambda: _read_common(r, t)}, "encoder type")
            found.append(t)

        handlers[number] = opaque
    _read_struct(r, handlers, "type definition")
    if len(found) != 1:
        raise GobError(f"type definition describes {len(found)} kinds of type, not one")
    return found[0]


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


_EPOCH_YEAR_1 = datetime.datetime(1, 1, 1, tzinfo=datetime.UTC)


def _go_time(blob: bytes) -> datetime.datetime | None:
    """A Go ``time.Time`` from its binary form (version 1 or 2), or ``None`` if it is not one."""
    if len(blob) not in (15, 16) or blob[0] != len(blob) - 14:
        return None
    seconds, nanos, offset_minutes = struct.unpack(">qiH", blob[1:15])
    if offset_minutes >= 0x8000:
        offset_minutes -= 0x10000
    offset_seconds = blob[15] if len(blob) == 16 else 0
    if not 0 <= nanos < 1_000_000_000:
        return None
    try:
        when = _EPOCH_YEAR_1 + datetime.timedelta(seconds=seconds, microseconds=nanos // 1000)
        if offset_minutes == -1:
            return when
        zone = datetime.timezone(datetime.timedelta(minutes=offset_minutes, seconds=offset_seconds))
        return when.astimezone(zone)
    except (OverflowError, ValueError):
        return None


class _Decoder:
    def __init__(self, types: dict[int, _Type]) -> None:
        self.types = types

    def defined(self, type_id: int) -> _Type:
        t = self.types.get(type_id)
        if t is None:
            raise GobError(f"value uses type id {type_id}, which the stream never defined")
        return t

    def zero(self, type_id: int) -> Any:
        zeros: dict[int, Any] = {
            _BOOL: False, _INT: 0, _UINT: 0, _FLOAT: 0.0, _BYTES: b"", _STRING: "",
            _COMPLEX: 0j, _INTERFACE: None,
        }
        if type_id in zeros:
            return zeros[type_id]
        kind = self.defined(type_id).kind
        if kind == "slice":
            return []
        if kind == "map":
            return {}
        return None

    def float(self, r: _Reader) -> float:
        bits = r.unsigned("float")
        value: float = struct.unpack("<d", bits.to_bytes(8, "big"))[0]
        return value

    def value(self, r: _Reader, type_id: int, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise GobError(f"values nested deeper than {MAX_DEPTH} levels")
        if type_id == _BOOL:
            flag = r.unsigned("bool")
            if flag > 1:
                raise GobError(f"invalid bool value {flag} at offset {r.pos}")
            return flag == 1
        if type_id == _INT:
            return r.signed()
        if type_id == _UINT:
            return r.unsigned()
        if type_id == _FLOAT:
            return self.float(r)
        if type_id == _COMPLEX:
            return complex(self.float(r), self.float(r))
        if type_id == _BYTES:
            return r.take(r.count("byte slice length"), "byte slice")
        if type_id == _STRING:
            return _text(r.take(r.count("string length"), "string"))
        if type_id == _INTERFACE:
            name = _text(r.take(r.count("interface type name length"), "interface type name"))
            if name:
                raise GobError(f"interface values are not supported (one holds a {name!r})")
            return None
        t = self.defined(type_id)
        if t.kind == "struct":
            return self.struct(r, t, depth)
        if t.kind in ("slice", "array"):
            n = r.count(f"{t.kind} length")
            if t.kind == "array" and n != t.length:
                raise GobError(f"array of {n} elements for a type of {t.length}")
            return [self.value(r, t.elem, depth + 1) for _ in range(n)]
        if t.kind == "map":
            if t.key not in _KEY_TYPES:
                raise GobError(f"map keys of type id {t.key} are not supported")
            out: dict[Any, Any] = {}
            for _ in range(r.count("map size", per_item=2)):
                k = self.value(r, t.key, depth + 1)
                out[k] = self.value(r, t.elem, depth + 1)
            return out
        blob = r.take(r.count("encoded value length"), "encoded value")
        if t.name == "Time" and t.encoding != "TextMarshaler":
            when = _go_time(blob)
            if when is not None:
                return when
        return GobOpaque(t.name, t.encoding, blob)

    def struct(self, r: _Reader, t: _Type, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        number = -1
        while True:
            delta = r.unsigned("field number")
            if delta == 0:
                break
            number += delta
            if number >= len(t.fields):
                raise GobError(
                    f"field {number} of struct {t.name or '(unnamed)'} at offset {r.pos}: it has {len(t.fields)}"
                )
            name, field_type = t.fields[number]
            out[name] = self.value(r, field_type, depth + 1)
        for name, field_type in t.fields:
            if name not in out:
                out[name] = self.zero(field_type)
        return out


def decode(data: bytes) -> Any:
    """Decode the single value of the gob stream *data*; raises :class:`GobError`."""
    data = bytes(data)
    stream = _Reader(data, 0, len(data))
    types: dict[int, _Type] = {}
    if not data:
        raise GobError("empty gob stream")
    while stream.remaining:
        at = stream.pos
        size = stream.unsigned("message length")
        if size == 0:
            raise GobError(f"empty message at offset {at}")
        if size > stream.remaining:
            raise GobError(f"truncated message at offset {at}: {size} bytes announced, {stream.remaining} left")
        message = _Reader(data, stream.pos, stream.pos + size)
        stream.pos += size
        type_id = message.signed("type id")
        if type_id < 0:
            defined = -type_id
            if defined <= _LAST_RESERVED:
                raise GobError(f"type definition for reserved id {defined} at offset {at}")
            if defined in types:
                raise GobError(f"type id {defined} defined twice (offset {at})")
            types[defined] = _read_type(message)
        else:
            if type_id == 0:
                raise GobError(f"value of type id 0 at offset {at}")
            decoder = _Decoder(types)
            is_struct = type_id in types and types[type_id].kind == "struct"
            if not is_struct:
                singleton = message.unsigned("field number")
                if singleton != 0:
                    raise GobError(f"top-level value at offset {at} does not start with field 0")
            value = decoder.value(message, type_id, 0)
            if message.remaining:
                raise GobError(f"{message.remaining} bytes left over in the value message at offset {at}")
            if stream.remaining:
                raise GobError(f"{stream.remaining} bytes after the value (offset {stream.pos})")
            return value
        if message.remaining:
            raise GobError(f"{message.remaining} bytes left over in the type definition at offset {at}")
    raise GobError("the stream ends before any value (truncated?)")


def decode_file(path: str) -> Any:
    """Read and decode the gob file at *path* (read-only); raises :class:`GobError` or ``OSError``."""
    with open(path, "rb") as handle:
        data = handle.read(MAX_FILE_SIZE + 1)
    if len(data) > MAX_FILE_SIZE:
        raise GobError(f"{path}: larger than {MAX_FILE_SIZE} bytes")
    return decode(data)
