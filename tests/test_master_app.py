"""The Klein app alone, driven in memory with StubTreq (no sockets)."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from nodepass.env import Settings
from nodepass.log import NodePassLogger
from nodepass.master.app import MasterAPI, decode_body
from nodepass.master.events import EventHub
from nodepass.master.info import SystemInfo
from nodepass.master.instances import ApiError, InstanceManager
from nodepass.master.tcping import Tcping
from nodepass.url import parse_master_url
from tests.test_master_support import fake_factory


class AppTests(TestCase):
    def setUp(self) -> None:
        clock = Clock()
        master = parse_master_url("master://127.0.0.1:0/x/y?log=info")
        logger = NodePassLogger("none", stream=None)
        events = EventHub(clock=clock.seconds)
        self.manager = InstanceManager(
            master, reactor=clock, logger=logger, settings=Settings(), events=events,
            tunnel_factory=fake_factory,
        )
        self.manager.load(None)
        api = MasterAPI(
            master=master, manager=self.manager, events=events, sysinfo=SystemInfo(),
            tcping=Tcping(clock), logger=logger, clock=clock.seconds, started=0.0, tls_code=0,
        )
        self.client = StubTreq(api.resource())

    @inlineCallbacks
    def test_nested_prefix_and_auth(self) -> Any:
        r = yield self.client.get("http://h/x/y/v1/info")
        self.assertEqual(r.code, 401)
        body = yield r.content()
        self.assertEqual(json.loads(body), {"error": "Unauthorized: API key required"})
        r = yield self.client.request("OPTIONS", "http://h/x/y/v1/info")
        self.assertEqual(r.code, 200)
        self.assertEqual(r.headers.getRawHeaders("Access-Control-Allow-Origin"), ["*"])
        r = yield self.client.get("http://h/x/y/v1/instances", headers={"X-API-Key": self.manager.api_key})
        self.assertEqual(r.code, 200)
        items = yield r.json()
        self.assertEqual([i["id"] for i in items], ["********"])
        for path in ("/x/v1/info", "/x/y/info", "/x/y/v1"):
            r = yield self.client.get("http://h" + path, headers={"X-API-Key": self.manager.api_key})
            self.assertEqual(r.code, 404, path)

    def test_decode_body(self) -> None:
        self.assertEqual(decode_body(b'{"a": {"b": 1}}'), {"a": {"b": 1}})
        self.assertEqual(decode_body(b'{"t": {"k": 1, "k": 2}}')["t"].duplicates, ["k"])
        for raw in (b"", b"1", b"null", b"\xff", b"{" * 3):
            with self.assertRaises(ApiError):
                decode_body(raw)

    @inlineCallbacks
    def test_unexpected_exception_is_json_500(self) -> Any:
        def boom() -> Any:
            raise RuntimeError("kaboom")

        self.manager.list = boom  # type: ignore[method-assign]
        r = yield self.client.get("http://h/x/y/v1/instances", headers={"X-API-Key": self.manager.api_key})
        self.assertEqual(r.code, 500)
        body = yield r.json()
        self.assertEqual(body, {"error": "Internal server error"})
        self.assertEqual(r.headers.getRawHeaders("Access-Control-Allow-Origin"), ["*"])
