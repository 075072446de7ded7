"""RFC 6455 frame code of the WebSocket pool (``nodepass.pool.wsframe``).

wsproto is the independent reference: frames we build are decoded by
wsproto's decoder, frames wsproto builds are decoded by ours, at every
length boundary (0, 1, 125, 126, 65535, 65536 ...), masked and unmasked,
fed whole, byte by byte and in random cuts, fragmented by the peer and with
control frames between the fragments.  Every framing error is checked for
its close code and for the events decoded before it.
"""

from __future__ import annotations

import os
import random
import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Pong
from wsproto.frame_protocol import Opcode, XorMaskerSimple

from nodepass.pool.wsframe import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameDecoder,
    close_code,
    close_frame,
    frame,
    mask,
    valid_close_code,
)
from tests.test_pool_ws import frames

LENGTHS = (0, 1, 2, 3, 4, 5, 124, 125, 126, 127, 1000, 16384, 65535, 65536, 65537, 300_000)


def ref_frames(data: bytes, from_client: bool) -> list[tuple[int, bytes, bool]]:
    """(opcode, payload, fin) of every frame in ``data`` by wsproto's decoder."""
    return [(int(op), payload, fin) for op, payload, fin in frames(data, client=not from_client)]


def peer(from_client: bool) -> Connection:
    """A wsproto end that sends what a client (masked) or a server sends."""
    return Connection(ConnectionType.CLIENT if from_client else ConnectionType.SERVER)


def decode(data: bytes, from_client: bool, cuts: list[int] | None = None) -> tuple[list[Any], FrameDecoder]:
    """Our events for ``data`` fed in pieces cut at ``cuts``."""
    decoder = FrameDecoder(masked=from_client)
    events: list[Any] = []
    start = 0
    for cut in [*(cuts or []), len(data)]:
        events += [(op, bytes(p), end) for op, p, end in decoder.receive(data[start:cut])]
        start = cut
    return events, decoder


def messages(events: list[Any]) -> list[bytes]:
    """Whole binary messages from data events."""
    out, parts = [], []
    for op, payload, end in events:
        if op == OP_BINARY:
            parts.append(payload)
            if end:
                out.append(b"".join(parts))
                parts = []
    return out


class MaskTests(unittest.TestCase):
    def test_same_as_wsproto_at_every_length(self) -> None:
        for n in LENGTHS:
            data, key = os.urandom(n), os.urandom(4)
            with self.subTest(n=n):
                masked = mask(data, key)
                self.assertEqual(bytes(masked), bytes(XorMaskerSimple(key).process(bytearray(data))))
                self.assertEqual(bytes(mask(masked, key)), data)

    def test_accepts_views(self) -> None:
        data, key = os.urandom(1001), os.urandom(4)
        self.assertEqual(bytes(mask(memoryview(data)[3:900], key)), bytes(mask(data[3:900], key)))


class EncodeTests(unittest.TestCase):
    def test_server_frames_decode_with_wsproto(self) -> None:
        for n in LENGTHS:
            payload = os.urandom(n)
            with self.subTest(n=n):
                out = frame(OP_BINARY, payload, masked=False)
                self.assertEqual(out[0], 0x82)
                self.assertFalse(out[1] & 0x80)
                self.assertEqual(ref_frames(out, from_client=False), [(Opcode.BINARY, payload, True)])

    def test_client_frames_are_masked_and_decode_with_wsproto(self) -> None:
        for n in LENGTHS:
            payload = os.urandom(n) if n else b""
            with self.subTest(n=n):
                out = frame(OP_BINARY, payload, masked=True)
                self.assertTrue(out[1] & 0x80)
                self.assertEqual(ref_frames(out, from_client=True), [(Opcode.BINARY, payload, True)])

    def test_length_encoding_is_minimal(self) -> None:
        for n, head in ((125, 2), (126, 4), (65535, 4), (65536, 10)):
            with self.subTest(n=n):
                self.assertEqual(len(frame(OP_BINARY, bytes(n), masked=False)), head + n)
                self.assertEqual(len(frame(OP_BINARY, bytes(n), masked=True)), head + 4 + n)

    def test_keys_are_fresh(self) -> None:
        keys = {frame(OP_BINARY, b"x", masked=True)[2:6] for _ in range(50)}
        self.assertGreater(len(keys), 45)

    def test_close_frames(self) -> None:
        self.assertEqual(close_frame(1000), b"\x88\x02\x03\xe8")
        self.assertEqual(close_frame(None), b"\x88\x00")
        self.assertEqual(ref_frames(close_frame(1003, "text", masked=True), from_client=True),
                         [(Opcode.CLOSE, b"\x03\xebtext", True)])
        # A long reason is cut to the 125-byte limit, never inside a character.
        long = close_frame(1002, "é" * 100)
        ((op, payload, _fin),) = ref_frames(long, from_client=False)
        self.assertEqual(op, Opcode.CLOSE)
        self.assertLessEqual(len(payload), 125)
        self.assertEqual(payload[2:].decode("utf-8"), "é" * 61)

    def test_close_codes(self) -> None:
        for code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999):
            self.assertTrue(valid_close_code(code), code)
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535):
            self.assertFalse(valid_close_code(code), code)
        self.assertEqual(close_code(b"\x03\xe8bye"), 1000)
        self.assertIsNone(close_code(b""))


class DecodeTests(unittest.TestCase):
    def test_every_length_from_both_roles(self) -> None:
        for from_client in (False, True):
            for n in LENGTHS:
                payload = os.urandom(n)
                data = peer(from_client).send(BytesMessage(data=payload))
                with self.subTest(from_client=from_client, n=n):
                    events, decoder = decode(data, from_client)
                    self.assertIsNone(decoder.error)
                    self.assertEqual(messages(events), [payload])
                    self.assertTrue(events[-1][2])

    def test_byte_by_byte(self) -> None:
        # Every cut position: inside the header, the extended length, the
        # key, and the payload at each key phase.
        for from_client in (False, True):
            payload = os.urandom(300)
            data = peer(from_client).send(BytesMessage(data=payload)) * 2
            with self.subTest(from_client=from_client):
                events, decoder = decode(data, from_client, cuts=list(range(1, len(data))))
                self.assertIsNone(decoder.error)
                self.assertEqual(messages(events), [payload, payload])

    def test_random_cuts_many_messages(self) -> None:
        rnd = random.Random(6455)
        for from_client in (False, True):
            sender = peer(from_client)
            sent = [os.urandom(rnd.choice(LENGTHS[:-1])) for _ in range(40)]
            data = b"".join(sender.send(BytesMessage(data=m)) for m in sent)
            cuts = sorted(rnd.sample(range(1, len(data)), 200))
            with self.subTest(from_client=from_client):
                events, decoder = decode(data, from_client, cuts)
                self.assertIsNone(decoder.error)
                self.assertEqual(messages(events), sent)

    def test_a_read_that_is_all_payload_is_handed_out_without_a_copy(self) -> None:
        decoder = FrameDecoder(masked=False)
        head = frame(OP_BINARY, bytes(3000), masked=False)[:4]
        decoder.receive(head)
        middle = os.urandom(1000)
        ((op, piece, end),) = decoder.receive(middle)
        self.assertIs(piece, middle)
        self.assertFalse(end)

    def test_fragmented_message_with_control_frames_between(self) -> None:
        for from_client in (False, True):
            sender = peer(from_client)
            data = (sender.send(Message(data=b"abc", message_finished=False))
                    + sender.send(Ping(payload=b"p1"))
                    + sender.send(Message(data=b"", message_finished=False))
                    + sender.send(Pong(payload=b"p2"))
                    + sender.send(Message(data=b"def", message_finished=True))
                    + sender.send(BytesMessage(data=b"next")))
            with self.subTest(from_client=from_client):
                for cuts in ([], list(range(1, len(data)))):
                    events, decoder = decode(data, from_client, cuts)
                    self.assertIsNone(decoder.error)
                    self.assertEqual(messages(events), [b"abcdef", b"next"])
                    controls = [(op, p) for op, p, _ in events if op != OP_BINARY]
                    self.assertEqual(controls, [(OP_PING, b"p1"), (OP_PONG, b"p2")])
                    # The message ends only with its last fragment.
                    ends = [end for op, p, end in events if op == OP_BINARY and p]
                    self.assertEqual(sum(ends), 2)
                    self.assertTrue(ends[-1])

    def test_close_ends_decoding(self) -> None:
        for from_client in (False, True):
            sender = peer(from_client)
            data = (sender.send(BytesMessage(data=b"last"))
                    + sender.send(CloseConnection(code=1000, reason="bye")))
            with self.subTest(from_client=from_client):
                events, decoder = decode(data + b"\x82\x01x" * 3, from_client)
                self.assertEqual(events, [(OP_BINARY, b"last", True), (OP_CLOSE, b"\x03\xe8bye", True)])
                self.assertTrue(decoder.closed)
                self.assertEqual(decoder.receive(b"\x82\x01x"), [])

    def test_empty_close_and_every_valid_code(self) -> None:
        events, decoder = decode(b"\x88\x00", from_client=False)
        self.assertEqual(events, [(OP_CLOSE, b"", True)])
        for code in (1000, 1001, 1011, 3000, 4999):
            events, decoder = decode(close_frame(code, "é", masked=True), from_client=True)
            self.assertIsNone(decoder.error)
            self.assertEqual(close_code(events[0][1]), code)


def raw(first: int, payload: bytes, *, masked: bool = False, length: bytes | None = None) -> bytes:
    """A frame with a hand-made first byte and length field."""
    key = b"\x01\x02\x03\x04"
    if length is None:
        length = bytes((len(payload) | (0x80 if masked else 0),))
    elif masked:
        length = bytes((length[0] | 0x80,)) + length[1:]
    body = bytes(mask(payload, key)) if masked else payload
    return bytes((first,)) + length + (key if masked else b"") + body


class ErrorTests(unittest.TestCase):
    CASES = [
        ("reserved bit", raw(0xC2, b"x"), 1002),
        ("unknown data opcode", raw(0x83, b"x"), 1002),
        ("unknown control opcode", raw(0x8B, b""), 1002),
        ("fragmented ping", raw(0x09, b"x"), 1002),
        ("long ping", raw(0x89, b"x" * 126, length=b"\x7e\x00\x7e"), 1002),
        ("16-bit length for 100 bytes", raw(0x82, b"x" * 100, length=b"\x7e\x00\x64"), 1002),
        ("64-bit length for 1000 bytes", raw(0x82, b"x" * 1000, length=b"\x7f" + struct.pack("!Q", 1000)), 1002),
        ("64-bit length with the top bit", raw(0x82, b"", length=b"\x7f" + struct.pack("!Q", 1 << 63)), 1002),
        ("continuation outside a message", raw(0x80, b"x"), 1002),
        ("new message inside a fragmented one", raw(0x02, b"x") + raw(0x82, b"y"), 1002),
        ("text message", raw(0x81, b"hi"), 1003),
        ("close with one byte", raw(0x88, b"\x03"), 1002),
        ("close with code 1005", raw(0x88, b"\x03\xed"), 1002),
        ("close with code 999", raw(0x88, b"\x03\xe7"), 1002),
        ("close with code 2000", raw(0x88, b"\x07\xd0"), 1002),
        ("close reason not UTF-8", raw(0x88, b"\x03\xe8\xff\xfe"), 1007),
    ]

    def test_each_error_has_its_code_and_keeps_what_came_before(self) -> None:
        for from_client in (False, True):
            before = peer(from_client).send(BytesMessage(data=b"before"))
            for name, bad, code in self.CASES:
                bad = self._as(bad, from_client)
                with self.subTest(name=name, from_client=from_client):
                    decoder = FrameDecoder(masked=from_client)
                    events = decoder.receive(before + bad + before)
                    self.assertEqual(messages([(op, bytes(p), e) for op, p, e in events]), [b"before"])
                    assert decoder.error is not None
                    self.assertEqual(decoder.error.code, code, decoder.error.text)
                    self.assertEqual(decoder.receive(before), [])

    @staticmethod
    def _as(bad: bytes, from_client: bool) -> bytes:
        """The same frame(s) masked when a client sends them."""
        if not from_client:
            return bad
        out, pos = b"", 0
        while pos < len(bad):
            first, second = bad[pos], bad[pos + 1]
            n, head = second & 0x7F, 2
            if n == 126:
                n, head = int.from_bytes(bad[pos + 2:pos + 4], "big"), 4
            elif n == 127:
                n, head = int.from_bytes(bad[pos + 2:pos + 10], "big"), 10
            n = min(n, len(bad) - pos - head)
            length = bad[pos + 1:pos + head]
            out += raw(first, bad[pos + head:pos + head + n], masked=True, length=length)
            pos += head + n
        return out

    def test_wrong_masking_for_the_role(self) -> None:
        server_side = FrameDecoder(masked=True)
        server_side.receive(frame(OP_BINARY, b"x", masked=False))
        assert server_side.error is not None
        self.assertEqual(server_side.error.code, 1002)
        self.assertIn("unmasked", server_side.error.text)
        client_side = FrameDecoder(masked=False)
        client_side.receive(frame(OP_BINARY, b"x", masked=True))
        assert client_side.error is not None
        self.assertIn("masked frame from a server", client_side.error.text)


class PropertyTests(unittest.TestCase):
    @settings(max_examples=60, deadline=None)
    @given(
        payloads=st.lists(st.binary(max_size=700), min_size=1, max_size=8),
        fragment=st.integers(min_value=1, max_value=300),
        cuts=st.lists(st.integers(min_value=1, max_value=6000), max_size=12),
        from_client=st.booleans(),
    )
    def test_any_fragmentation_and_any_cuts(self, payloads: list[bytes], fragment: int, cuts: list[int],
                                            from_client: bool) -> None:
        sender = peer(from_client)
        data = b""
        for payload in payloads:
            pieces = [payload[i:i + fragment] for i in range(0, len(payload), fragment)] or [b""]
            for i, piece in enumerate(pieces):
                data += sender.send(Message(data=piece, message_finished=i == len(pieces) - 1))
                if i % 2:
                    data += sender.send(Ping(payload=b"x"))
        events, decoder = decode(data, from_client, sorted({c for c in cuts if c < len(data)}))
        self.assertIsNone(decoder.error)
        self.assertEqual(messages(events), payloads)
