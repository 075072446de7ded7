"""The Go ``encoding/gob`` decoder against streams written by Go itself.

``tests/fixtures/gob/`` holds state files written by the Go NodePass v1.14.0
master and small vectors written by Go's standard encoder
(``vectors/main.go``); ``tests/fixtures/gob/README.md`` lists how they were
made.  Damaged variants of them must only ever raise :class:`GobError`.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from nodepass.master.gob import MAX_DEPTH, GobError, GobOpaque, _Reader, decode, decode_file

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "gob")
VECTORS = os.path.join(FIXTURES, "vectors")


def fixture(name: str) -> bytes:
    with open(os.path.join(FIXTURES, name), "rb") as handle:
        return handle.read()


def vector(name: str) -> bytes:
    with open(os.path.join(VECTORS, name), "rb") as handle:
        return handle.read()


def expected(name: str) -> dict[str, Any]:
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data


ALL_STREAMS = [
    fixture("go-master.gob"),
    fixture("go-master-fresh.gob"),
    *(vector(n) for n in ("point.gob", "kinds.gob", "time.gob", "tree.gob", "strings.gob", "nil-interface.gob")),
]


def as_api(item: dict[str, Any]) -> dict[str, Any]:
    """A decoded Go ``Instance`` struct in the shape of the Go API's JSON object."""
    meta = item["Meta"]
    return {
        "id": item["ID"], "alias": item["Alias"], "type": item["Type"], "status": item["Status"],
        "url": item["URL"], "config": item["Config"], "restart": item["Restart"],
        "meta": {
            "peer": {"sid": meta["Peer"]["SID"], "type": meta["Peer"]["Type"], "alias": meta["Peer"]["Alias"]},
            "tags": meta["Tags"],
        },
        "mode": item["Mode"], "ping": item["Ping"], "pool": item["Pool"], "tcps": item["TCPS"],
        "udps": item["UDPS"], "tcprx": item["TCPRX"], "tcptx": item["TCPTX"], "udprx": item["UDPRX"],
        "udptx": item["UDPTX"],
    }


class PrimitiveTests(TestCase):
    """The integer and float encodings, with the examples the gob documentation gives."""

    def read(self, data: bytes) -> _Reader:
        return _Reader(data, 0, len(data))

    def test_unsigned(self) -> None:
        self.assertEqual(self.read(b"\x00").unsigned(), 0)
        self.assertEqual(self.read(b"\x07").unsigned(), 7)
        self.assertEqual(self.read(b"\x7f").unsigned(), 127)
        self.assertEqual(self.read(b"\xff\x80").unsigned(), 128)
        self.assertEqual(self.read(b"\xfe\x01\x00").unsigned(), 256)
        self.assertEqual(self.read(b"\xf8" + b"\xff" * 8).unsigned(), 2**64 - 1)

    def test_signed(self) -> None:
        self.assertEqual(self.read(b"\xfe\x01\x01").signed(), -129)
        self.assertEqual(self.read(b"\x2c").signed(), 22)
        self.assertEqual(self.read(b"\x01").signed(), -1)
        self.assertEqual(self.read(b"\xff\x81").signed(), -65)

    def test_bad_integers(self) -> None:
        with self.assertRaisesRegex(GobError, "9-byte length"):
            self.read(b"\xf7" + b"\x01" * 9).unsigned()
        with self.assertRaisesRegex(GobError, "truncated"):
            self.read(b"\xfe\x01").unsigned()
        with self.assertRaisesRegex(GobError, "truncated"):
            self.read(b"").unsigned()


class VectorTests(TestCase):
    """Values written by Go's own encoder decode to exactly what was encoded."""

    def test_documentation_example(self) -> None:
        """The Point{22, 33} stream spelled out byte by byte in the gob documentation."""
        doc = bytes.fromhex(
            "1fff810301010550 6f696e7401ff8200 0102010158010400 0101590104000000 07ff82012c014200".replace(" ", "")
        )
        self.assertEqual(doc, vector("point.gob"))
        self.assertEqual(decode(doc), {"X": 22, "Y": 33})

    def test_every_kind(self) -> None:
        self.assertEqual(
            decode(vector("kinds.gob")),
            {
                "Flag": True,
                "Small": -7,
                "Negative": -129,
                "Big": 2**64 - 1,
                "Ratio": 17.5,
                "Wave": complex(1.5, -2),
                "Raw": b"\x00\x01\x02\xff",
                "Text": "héllo, wörld",
                "Words": ["a", "", "ccc"],
                "Triple": [1, 0, -1],
                "Counts": {"one": 1},
                "ByNumber": {-5: "minus five"},
                "Nested": {"Label": "in", "Count": 300},
                "Optional": None,
                "Items": [{"Label": "x", "Count": 0}, {"Label": "", "Count": 2}],
                "Empty": {},
                "Zero": 0,
            },
        )

    def test_time(self) -> None:
        got = decode(vector("time.gob"))
        self.assertEqual(got["Name"], "stamp")
        self.assertEqual(
            got["When"], datetime.datetime(2024, 2, 29, 13, 14, 15, 123456, tzinfo=datetime.UTC)
        )
        self.assertIsNone(got["Never"])  # the zero time is not sent
        zone = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
        self.assertEqual(got["Local"], datetime.datetime(1999, 12, 31, 23, 59, 59, tzinfo=zone))
        self.assertEqual(got["Local"].utcoffset(), datetime.timedelta(hours=5, minutes=30))

    def test_recursive_type(self) -> None:
        self.assertEqual(
            decode(vector("tree.gob")),
            {
                "Name": "root",
                "Children": [
                    {"Name": "leaf", "Children": []},
                    {"Name": "branch", "Children": [{"Name": "twig", "Children": []}]},
                ],
            },
        )

    def test_top_level_map(self) -> None:
        self.assertEqual(decode(vector("strings.gob")), {"k": ["v1", "v2"]})

    def test_interfaces(self) -> None:
        self.assertEqual(decode(vector("nil-interface.gob")), {"Name": "empty", "Value": None})
        with self.assertRaisesRegex(GobError, "interface values are not supported.*main.Inner"):
            decode(vector("interface.gob"))

    def test_unknown_encoder_type_stays_opaque(self) -> None:
        # a GobEncoder type "Time" whose bytes are no time: kept as they are
        stream = bytearray(vector("time.gob"))
        blob = bytes.fromhex("010000000edd727a27075bcd15ffff")
        at = stream.index(blob)
        stream[at] = 9  # an unknown time encoding version
        got = decode(bytes(stream))
        self.assertEqual(got["When"], GobOpaque("Time", "GobEncoder", b"\x09" + blob[1:]))


class GoMasterStateTests(TestCase):
    """State files written by the Go NodePass master decode to what its API showed."""

    def check(self, name: str) -> dict[str, Any]:
        state = decode_file(os.path.join(FIXTURES, f"{name}.gob"))
        want = expected(f"{name}.expected.json")
        self.assertEqual(sorted(state), sorted(i["id"] for i in want["instances"]))
        for item in want["instances"]:
            got = state[item["id"]]
            # The status is the one thing the file may hold differently: Go lets a late
            # "Client error" line of a stopping instance turn it to "error" before its
            # final save, after the API had answered "stopped".
            self.assertIn(got["Status"], ("", "stopped", "running", "error"))
            self.assertEqual(as_api(got), {**item, "status": got["Status"]})
            # the hidden counter bases and reset offsets are in the file too
            for base in ("TCPRXBase", "TCPTXBase", "UDPRXBase", "UDPTXBase", "TCPRXReset", "UDPTXReset"):
                self.assertEqual(got[base], 0)
        return state

    def test_fresh_master(self) -> None:
        state = self.check("go-master-fresh")
        pseudo = state["********"]
        self.assertRegex(pseudo["URL"], "^[0-9a-f]{32}$")  # the API key
        self.assertRegex(pseudo["Config"], "^[0-9a-f]{16}$")  # the master id

    def test_master_with_instances(self) -> None:
        state = self.check("go-master")
        # values set through the Go API when the fixture was made (make_fixtures.py)
        by_alias = {item["Alias"]: item for item in state.values()}
        self.assertEqual(by_alias["go-master-1"]["ID"], "********")
        server, client, spare = by_alias["web server"], by_alias["web client"], by_alias["spare ✓"]
        self.assertEqual((server["Type"], server["Restart"], server["Mode"]), ("server", True, 1))
        self.assertEqual(server["URL"], "server://127.0.0.1:21741/127.0.0.1:21742?log=info")
        self.assertEqual((client["Type"], client["Restart"], client["Mode"]), ("client", False, 2))
        self.assertEqual(
            client["Meta"],
            {"Peer": {"SID": "3f8e2a4c-6b1d-4e5f-9a7b-0c1d2e3f4a5b", "Type": "1", "Alias": "edge"},
             "Tags": {"env": "prod", "owner": "ops"}},
        )
        for item in (server, client):
            self.assertEqual((item["TCPRX"], item["TCPTX"]), (65536, 65536))
            self.assertEqual((item["UDPRX"], item["UDPTX"]), (10000, 10000))
        self.assertTrue(spare["URL"].startswith("server://fixture-pass@127.0.0.1:21743/"))
        self.assertEqual(spare["Meta"]["Tags"], {"role": "standby"})
        self.assertFalse(spare["Restart"])


class DamagedStreamTests(TestCase):
    """Truncated, corrupted or foreign data is a GobError with a message, never anything else."""

    def test_every_truncation(self) -> None:
        data = fixture("go-master.gob")
        for size in range(len(data)):
            with self.assertRaises(GobError, msg=f"truncated to {size} bytes"):
                decode(data[:size])

    def test_messages(self) -> None:
        data = fixture("go-master.gob")
        cases = {
            b"": "empty gob stream",
            data + b"\x00": "bytes after the value",
            data + data[:20]: "bytes after the value",
            b"\x04\xff\xc8\x00\x00": "type id 100, which the stream never defined",
            b"\x03\xff\x81\x00": "describes 0 kinds",
            b"\x02\x0b\x03": "reserved id",
            b"\x00": "empty message",
        }
        for stream, message in cases.items():
            with self.assertRaisesRegex(GobError, message, msg=stream.hex()):
                decode(stream)

    def test_duplicate_type_definition(self) -> None:
        data = fixture("go-master.gob")
        first = data[: data[0] + 1]  # the first message is a short type definition
        with self.assertRaisesRegex(GobError, "defined twice"):
            decode(first + data)

    def test_deep_nesting_is_bounded(self) -> None:
        # type 65 = []65 (a slice of itself); the value nests one level per byte
        define = b"\xff\x81" + b"\x02\x01\x02\xff\x82\x00\x01\xff\x82\x00\x00"
        value = b"\xff\x82\x00" + b"\x01" * (MAX_DEPTH + 10) + b"\x00"
        stream = bytes([len(define)]) + define + _length(len(value)) + value
        with self.assertRaisesRegex(GobError, "nested deeper"):
            decode(stream)

    def test_counts_past_the_end(self) -> None:
        # a map claiming 2**32 entries in a message of a few bytes
        data = bytearray(fixture("go-master-fresh.gob"))
        value_at = len(data) - 0x52  # the value message is the last 0x52 bytes after its length
        self.assertEqual(data[value_at - 1], 0x52)
        self.assertEqual(bytes(data[value_at : value_at + 4]), b"\xff\x88\x00\x01")
        data[value_at + 3 : value_at + 4] = b"\xfb\x01\x00\x00\x00\x00"
        data[value_at - 1] = 0x52 + 5
        with self.assertRaisesRegex(GobError, "more than the"):
            decode(bytes(data))

    def test_not_a_file(self) -> None:
        with self.assertRaises(OSError):
            decode_file(os.path.join(FIXTURES, "no-such.gob"))

    @settings(max_examples=400, deadline=None)
    @given(
        st.sampled_from(ALL_STREAMS),
        st.lists(
            st.tuples(st.integers(0, 3), st.integers(0, 10_000), st.binary(min_size=1, max_size=8)),
            min_size=1,
            max_size=6,
        ),
    )
    def test_random_damage_only_raises_gob_error(self, stream: bytes, edits: list[tuple[int, int, bytes]]) -> None:
        data = bytearray(stream)
        for op, where, chunk in edits:
            at = where % (len(data) + 1)
            if op == 0 and at < len(data):
                data[at] = chunk[0]  # overwrite a byte
            elif op == 1:
                del data[at : at + len(chunk)]  # drop bytes
            elif op == 2:
                data[at:at] = chunk  # insert bytes
            else:
                data[at : at + 1] = bytes([data[at] ^ (1 << (chunk[0] % 8))]) if at < len(data) else b""
        try:
            decode(bytes(data))
        except GobError as exc:
            self.assertTrue(str(exc))


def _length(n: int) -> bytes:
    """The gob unsigned encoding of *n*."""
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([256 - len(raw)]) + raw
