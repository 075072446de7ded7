"""Requests that real dashboards send, replayed against the master API.

Each test names the client behaviour it reproduces; they pin down what a
dashboard relies on rather than what the API documentation alone says.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from nodepass.master.events import EVENT_LIMIT, encode_events
from tests.test_master_support import reset_fake_tunnels, start_master

SERVER_URL = "server://127.0.0.1:10101/127.0.0.1:10102"
UPPER_SID = "E621E1F8-C36C-495A-93FC-0C247A3E6E5F"
"""A UUID v4 as Swift's ``UUID().uuidString`` spells it (upper case)."""


class DashboardCompatTests(TestCase):
    """PATCH bodies and reads taken from the dashboards' client code."""

    def setUp(self) -> None:
        reset_fake_tunnels()
        self.m = start_master(self)

    @inlineCallbacks
    def create(self) -> Any:
        r = yield self.m.request("POST", "/instances", body={"url": SERVER_URL})
        self.assertEqual(r.code, 201, r.body)
        return r.json()

    @inlineCallbacks
    def test_peer_service_types_beyond_two(self) -> Any:
        """Dashboards tag services with peer types "0" to "7" (external targets use 3/4)."""
        inst = yield self.create()
        path = f"/instances/{inst['id']}"
        for kind in ("3", "4", "5", "6", "7"):
            r = yield self.m.request("PATCH", path, body={
                "meta": {"peer": {"alias": "svc", "sid": UPPER_SID, "type": kind}},
            })
            self.assertEqual(r.code, 200, r.body)
            self.assertEqual(r.json()["meta"]["peer"]["type"], kind)
        r = yield self.m.request("GET", path)
        self.assertEqual(r.json()["meta"]["peer"]["type"], "7")

    @inlineCallbacks
    def test_peer_sid_kept_as_sent(self) -> Any:
        """The sid comes back exactly as sent: clients compare it with their own UUID string."""
        inst = yield self.create()
        path = f"/instances/{inst['id']}"
        r = yield self.m.request("PATCH", path, body={
            "meta": {"peer": {"alias": "svc", "sid": UPPER_SID, "type": "1"}},
        })
        self.assertEqual(r.code, 200, r.body)
        self.assertEqual(r.json()["meta"]["peer"]["sid"], UPPER_SID)
        r = yield self.m.request("GET", "/instances")
        peers = [i["meta"]["peer"]["sid"] for i in r.json() if i["id"] == inst["id"]]
        self.assertEqual(peers, [UPPER_SID])

    @inlineCallbacks
    def test_peer_type_still_bounded(self) -> Any:
        """A peer type is free text, but still a string of at most 256 characters."""
        inst = yield self.create()
        path = f"/instances/{inst['id']}"
        r = yield self.m.request("PATCH", path, body={"meta": {"peer": {"type": "t" * 257}}})
        self.assertEqual(r.code, 400, r.body)
        self.assertEqual(r.json(), {"error": "Meta peer.type exceeds maximum length 256"})
        r = yield self.m.request("PATCH", path, body={"meta": {"peer": {"type": 3}}})
        self.assertEqual(r.code, 400, r.body)

    @inlineCallbacks
    def test_peer_body_with_null_alias(self) -> Any:
        """A peer object whose unset fields are JSON null (Go pointers without omitempty).

        ``null`` is "not given": the stored value stays; the other fields apply.
        """
        inst = yield self.create()
        path = f"/instances/{inst['id']}"
        r = yield self.m.request("PATCH", path, body={"meta": {"peer": {"alias": "first"}}})
        self.assertEqual(r.code, 200, r.body)
        sid = "3f1e0c9a-4b2d-4c8e-9a7f-0123456789ab"
        r = yield self.m.request("PATCH", path, body={
            "meta": {"peer": {"sid": sid, "type": "4", "alias": None}},
        })
        self.assertEqual(r.code, 200, r.body)
        self.assertEqual(r.json()["meta"]["peer"], {"sid": sid, "type": "4", "alias": "first"})


class EventSizeTests(TestCase):
    """Every instance fits in one SSE event below 64 KiB (the Go dashboard's stream reader limit).

    Non-ASCII text in a URL is stored percent-encoded and control characters in
    tags are JSON-escaped, so character counts alone do not bound the event.
    """

    def setUp(self) -> None:
        reset_fake_tunnels()
        self.m = start_master(self)

    def url_with(self, filler: str, length: int = 8000) -> str:
        base = "server://127.0.0.1:10101/127.0.0.1:10102?zz="
        return base + filler * (length - len(base))

    @inlineCallbacks
    def test_non_ascii_url_too_large_once_encoded(self) -> Any:
        """A URL within the character limit but huge once percent-encoded is a 400 (POST and PUT)."""
        big = self.url_with("\u4e2d")
        r = yield self.m.request("POST", "/instances", body={"url": big})
        self.assertEqual(r.code, 400, r.body[:200])
        self.assertIn("too long once encoded", r.json()["error"])
        r = yield self.m.request("POST", "/instances", body={"url": self.url_with("a")})
        self.assertEqual(r.code, 201, r.body[:200])
        inst = r.json()
        r = yield self.m.request("PUT", f"/instances/{inst['id']}", body={"url": big})
        self.assertEqual(r.code, 400, r.body[:200])
        self.assertIn("too long once encoded", r.json()["error"])

    @inlineCallbacks
    def test_escaped_tags_count_as_sent(self) -> Any:
        """Tag size is measured as JSON: 6000 control characters are 36000 bytes, over 32 KiB."""
        r = yield self.m.request("POST", "/instances", body={"url": self.url_with("a", 100)})
        inst = r.json()
        tags = {f"k{i:02d}": "\x01" * 250 for i in range(24)}
        r = yield self.m.request("PATCH", f"/instances/{inst['id']}", body={"meta": {"tags": tags}})
        self.assertEqual(r.code, 400, r.body[:200])
        self.assertEqual(r.json(), {"error": "Meta tags exceed maximum size 32768 bytes"})

    @inlineCallbacks
    def test_largest_accepted_instance_fits_one_event(self) -> Any:
        """The biggest instance the API accepts, with a long log, still encodes below the limit."""
        # grow a non-ASCII URL until the API refuses it; keep the largest accepted one
        accepted = None
        for length in range(2000, 8200, 100):
            r = yield self.m.request("POST", "/instances", body={"url": self.url_with("\u00e9", length)})
            if r.code != 201:
                break
            if accepted is not None:
                yield self.m.request("DELETE", f"/instances/{accepted['id']}")
            accepted = r.json()
        self.assertIsNotNone(accepted)
        assert accepted is not None
        path = f"/instances/{accepted['id']}"
        wide = "\u2028"  # JSON-escaped to 6 bytes
        tags: dict[str, str] = {}
        for i in range(1000):
            trial = dict(tags, **{f"t{i:03d}" + "\x01" * 200: "\x01" * 256})
            r = yield self.m.request("PATCH", path, body={"meta": {"tags": trial}})
            if r.code != 200:
                break
            tags = trial
        r = yield self.m.request("PATCH", path, body={
            "alias": wide * 256,
            "meta": {"peer": {"sid": "", "type": wide * 256, "alias": wide * 256}},
        })
        self.assertEqual(r.code, 200, r.body[:200])
        instance = r.json()
        self.assertGreater(len(tags), 10)
        frames = encode_events("log", 0.0, instance, ("x" * 100 + "\n") * 2000)
        self.assertGreater(len(frames), 1)
        for frame in frames:
            self.assertLess(len(frame), EVENT_LIMIT)
