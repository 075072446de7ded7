"""The master REST API against a real master on 127.0.0.1 (tunnels faked)."""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from nodepass import __version__
from nodepass.url import parse_tunnel_url
from tests.test_master_support import FakeTunnel, reset_fake_tunnels, start_master

INSTANCE_KEYS = [
    "id", "alias", "type", "status", "url", "config", "restart", "meta", "mode", "ping", "pool",
    "tcps", "udps", "tcprx", "tcptx", "udprx", "udptx",
]
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, PATCH, POST, PUT, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Authorization, X-API-Key, Cache-Control",
}
SERVER_URL = "server://127.0.0.1:10101/127.0.0.1:10102"
SID = "550e8400-e29b-41d4-a716-446655440000"


class MasterAPITests(TestCase):
    """Every endpoint's success and error paths."""

    def setUp(self) -> None:
        reset_fake_tunnels()
        self.m = start_master(self)

    def assertCors(self, response: Any) -> None:
        for name, value in CORS.items():
            self.assertEqual(response.header(name), value, name)

    def assertError(self, response: Any, code: int, message: str) -> None:
        self.assertEqual(response.code, code, response.body)
        self.assertEqual(response.json(), {"error": message})
        self.assertEqual(response.header("Content-Type"), "application/json")
        self.assertTrue(response.body.endswith(b"\n"))
        self.assertCors(response)

    @inlineCallbacks
    def create(self, url: str = SERVER_URL, alias: str = "s1") -> Any:
        r = yield self.m.request("POST", "/instances", body={"url": url, "alias": alias})
        self.assertEqual(r.code, 201, r.body)
        return r.json()

    # ---------------------------------------------------------------- auth / CORS
    @inlineCallbacks
    def test_auth_required_everywhere(self) -> Any:
        """Protected routes answer 401 without a key and with a wrong key."""
        inst = yield self.create()
        routes = [
            ("GET", "/instances"), ("POST", "/instances"), ("GET", f"/instances/{inst['id']}"),
            ("PATCH", f"/instances/{inst['id']}"), ("PUT", f"/instances/{inst['id']}"),
            ("DELETE", f"/instances/{inst['id']}"), ("GET", "/events"), ("GET", "/info"),
            ("POST", "/info"), ("GET", "/tcping?target=127.0.0.1:1"), ("GET", "/instances/"),
            ("DELETE", "/instances"),
        ]
        for method, path in routes:
            r = yield self.m.request(method, path, key=None)
            self.assertError(r, 401, "Unauthorized: API key required")
            r = yield self.m.request(method, path, key="0" * 32)
            self.assertError(r, 401, "Unauthorized: Invalid API key")
        # still there
        r = yield self.m.request("GET", f"/instances/{inst['id']}")
        self.assertEqual(r.code, 200)

    @inlineCallbacks
    def test_options_preflight(self) -> Any:
        """OPTIONS answers 200 with CORS headers and an empty body, before auth."""
        for path in ["/instances", "/instances/doesnotexist", "/events", "/info", "/tcping",
                     "/openapi.json", "/docs"]:
            r = yield self.m.request("OPTIONS", path, key=None)
            self.assertEqual(r.code, 200, path)
            self.assertEqual(r.body, b"")
            self.assertCors(r)

    @inlineCallbacks
    def test_public_routes(self) -> Any:
        """openapi.json and docs need no key."""
        r = yield self.m.request("GET", "/openapi.json", key=None)
        self.assertEqual(r.code, 200)
        self.assertCors(r)
        self.assertEqual(r.header("Content-Type"), "application/json")
        doc = r.json()
        self.assertEqual(doc["servers"], [{"url": "/api/v1"}])
        r = yield self.m.request("GET", "/docs", key=None)
        self.assertEqual(r.code, 200)
        self.assertCors(r)
        self.assertIn(b"swagger", r.body.lower())
        self.assertIn(b"/api/v1/openapi.json", r.body)
        r = yield self.m.request("GET", "/docs/swagger-ui.css", key=None)
        self.assertIn(r.code, (200, 404))  # 404 only when the Swagger UI files are not installed
        self.assertCors(r)
        r = yield self.m.request("POST", "/openapi.json", key=None)
        self.assertError(r, 405, "Method not allowed")
        self.assertEqual(r.header("Allow"), "GET, HEAD, OPTIONS")

    @inlineCallbacks
    def test_unknown_paths(self) -> Any:
        """Paths outside the routes are 404."""
        for path in ["/api/v1/nope", "/api/v1/info/", "/", "/api/v2/info", "/api"]:
            r = yield self.m.request("GET", self.m.root + path, absolute=True)
            self.assertEqual(r.code, 404, path)
            self.assertEqual(r.json(), {"error": "Not found"})

    # ---------------------------------------------------------------- list / create
    @inlineCallbacks
    def test_list_includes_pseudo_instance(self) -> Any:
        r = yield self.m.request("GET", "/instances")
        self.assertEqual(r.code, 200)
        self.assertCors(r)
        items = r.json()
        self.assertEqual(len(items), 1)
        pseudo = items[0]
        self.assertEqual(list(pseudo), INSTANCE_KEYS)
        self.assertEqual(pseudo["id"], "********")
        self.assertEqual(pseudo["url"], self.m.key)
        self.assertRegex(pseudo["url"], r"^[0-9a-f]{32}$")
        self.assertRegex(pseudo["config"], r"^[0-9a-f]{16}$")
        self.assertEqual((pseudo["type"], pseudo["status"], pseudo["restart"]), ("", "", False))
        self.assertEqual(pseudo["meta"], {"peer": {"sid": "", "type": "", "alias": ""}, "tags": {}})

    @inlineCallbacks
    def test_create(self) -> Any:
        inst = yield self.create()
        self.assertEqual(list(inst), INSTANCE_KEYS)
        self.assertRegex(inst["id"], r"^[0-9a-f]{8}$")
        self.assertEqual(inst["alias"], "s1")
        self.assertEqual(inst["type"], "server")
        self.assertEqual(inst["status"], "running")
        self.assertEqual(inst["url"], SERVER_URL + "?log=debug")
        self.assertEqual(
            inst["config"],
            parse_tunnel_url(SERVER_URL).canonical(self.m.config),
        )
        for part in ("block=0", "dial=auto", "dns=5m0s", "log=debug", "max=1024", "read=0s",
                     "slot=65536", "type=0"):
            self.assertIn(part, inst["config"])
        self.assertIs(inst["restart"], True)
        self.assertEqual(inst["meta"], {"peer": {"sid": "", "type": "", "alias": ""}, "tags": {}})
        self.assertEqual(len(FakeTunnel.instances), 1)
        self.assertTrue(FakeTunnel.instances[0].running)
        self.assertIs(FakeTunnel.instances[0].parent, self.m.service.manager)
        r = yield self.m.request("GET", "/instances")
        self.assertEqual({i["id"] for i in r.json()}, {"********", inst["id"]})

    @inlineCallbacks
    def test_create_errors(self) -> Any:
        cases = [
            (b"", "Invalid request body"),
            (b"{", "Invalid request body"),
            (b"[1]", "Invalid request body"),
            (b'{"alias": "x"}', "Invalid request body"),
            (b'{"url": ""}', "Invalid request body"),
            (b'{"url": 5}', "Invalid request body"),
            (b'{"url": "http://127.0.0.1:1/x"}', "Invalid URL scheme"),
            (b'{"url": "server"}', "Invalid URL scheme"),
            (b'{"url": "server://a", "url": "server://b"}', "Invalid request body: duplicate key 'url'"),
        ]
        for raw, message in cases:
            r = yield self.m.request("POST", "/instances", raw=raw)
            self.assertError(r, 400, message)
        r = yield self.m.request("POST", "/instances", body={"url": "server://127.0.0.1/x:1"})
        self.assertEqual(r.code, 400)
        self.assertTrue(r.json()["error"].startswith("Invalid URL format: "), r.json())
        r = yield self.m.request("POST", "/instances", body={"url": SERVER_URL, "alias": "a" * 257})
        self.assertError(r, 400, "Instance alias exceeds maximum length 256")
        r = yield self.m.request("GET", "/instances")
        self.assertEqual(len(r.json()), 1)

    @inlineCallbacks
    def test_method_not_allowed(self) -> Any:
        """Every method a route does not serve: JSON 405 with Allow, everywhere, no HTML page."""
        inst = yield self.create()
        allow = {
            "/instances": "GET, HEAD, POST, OPTIONS",
            f"/instances/{inst['id']}": "GET, HEAD, PATCH, PUT, DELETE, OPTIONS",
            "/instances/********": "GET, HEAD, PATCH, PUT, DELETE, OPTIONS",
            "/events": "GET, HEAD, OPTIONS",
            "/info": "GET, HEAD, POST, OPTIONS",
            "/tcping?target=127.0.0.1:1": "GET, HEAD, OPTIONS",
            "/openapi.json": "GET, HEAD, OPTIONS",
            "/docs": "GET, HEAD, OPTIONS",
            "/docs/swagger-ui.css": "GET, HEAD, OPTIONS",
            "/docs/no-such-file": "GET, HEAD, OPTIONS",
        }
        methods = ("GET", "POST", "PUT", "PATCH", "DELETE", "TRACE", "CONNECT", "PROPFIND", "FOO")
        for path, allowed in allow.items():
            for method in methods:
                if method in allowed.split(", "):
                    continue
                r = yield self.m.request(method, path)
                self.assertEqual(r.code, 405, (method, path, r.body))
                self.assertError(r, 405, "Method not allowed")
                self.assertEqual(r.header("Allow"), allowed)
        # the key is checked first on protected routes, the id is looked up first on instances
        r = yield self.m.request("TRACE", "/info", key=None)
        self.assertError(r, 401, "Unauthorized: API key required")
        r = yield self.m.request("TRACE", "/instances/abcdef01")
        self.assertError(r, 404, "Instance not found")
        self.assertIsNone(r.header("Allow"))

    @inlineCallbacks
    def test_head_like_get_without_body(self) -> Any:
        inst = yield self.create()
        paths = ["/instances", f"/instances/{inst['id']}", "/instances/********", "/info",
                 "/tcping?target=127.0.0.1:1", "/openapi.json", "/docs", "/docs/swagger-ui.css",
                 "/instances/abc", "/docs/nope"]
        for path in paths:
            get = yield self.m.request("GET", path)
            head = yield self.m.request("HEAD", path)
            with self.subTest(path=path):
                self.assertEqual(head.code, get.code)
                self.assertEqual(head.body, b"")
                self.assertEqual(head.header("Content-Type"), get.header("Content-Type"))
                if path not in ("/info", "/tcping?target=127.0.0.1:1"):  # uptime, latency may change
                    self.assertEqual(head.header("Content-Length"), str(len(get.body)))
                self.assertCors(head)
        head = yield self.m.request("HEAD", "/info", key=None)
        self.assertEqual((head.code, head.body), (401, b""))
        # HEAD on the event stream: its headers, no subscription
        head = yield self.m.request("HEAD", "/events")
        self.assertEqual((head.code, head.body), (200, b""))
        self.assertEqual(head.header("Content-Type"), "text/event-stream")
        self.assertEqual(self.m.service.events.subscribers, [])

    @inlineCallbacks
    def test_no_html_error_pages(self) -> Any:
        """404s below and beside the route base are JSON, for any method."""
        for method in ("GET", "POST", "DELETE", "TRACE"):
            for path in ("/docs/nope", "/docs/swagger-ui.css/x", "/nope", "/info/x"):
                if method != "GET" and path.startswith("/docs"):
                    continue  # 405 there (test_method_not_allowed)
                r = yield self.m.request(method, path)
                with self.subTest(method=method, path=path):
                    self.assertEqual(r.code, 404)
                    self.assertEqual(r.header("Content-Type"), "application/json")
                    self.assertIn("error", r.json())
            r = yield self.m.request(method, self.m.root + "/elsewhere", absolute=True)
            self.assertEqual((r.code, r.json()), (404, {"error": "Not found"}))

    # ---------------------------------------------------------------- single instance
    @inlineCallbacks
    def test_get_instance(self) -> Any:
        inst = yield self.create()
        r = yield self.m.request("GET", f"/instances/{inst['id']}")
        self.assertEqual(r.code, 200)
        self.assertEqual(r.json()["id"], inst["id"])
        r = yield self.m.request("GET", "/instances/%2A%2A%2A%2A%2A%2A%2A%2A")
        self.assertEqual(r.json()["url"], self.m.key)
        r = yield self.m.request("GET", "/instances/abc")
        self.assertError(r, 404, "Instance not found")
        r = yield self.m.request("GET", "/instances/a/b")
        self.assertError(r, 404, "Instance not found")
        r = yield self.m.request("GET", "/instances/")
        self.assertError(r, 400, "Instance ID is required")

    @inlineCallbacks
    def test_patch_fields(self) -> Any:
        inst = yield self.create()
        path = f"/instances/{inst['id']}"
        r = yield self.m.request("PATCH", path, body={
            "alias": "renamed", "restart": False,
            "meta": {"peer": {"sid": SID, "type": "1", "alias": "remote"}, "tags": {"b": "2", "a": "1"}},
        })
        self.assertEqual(r.code, 200, r.body)
        got = r.json()
        self.assertEqual(got["alias"], "renamed")
        self.assertIs(got["restart"], False)
        self.assertEqual(got["meta"], {"peer": {"sid": SID, "type": "1", "alias": "remote"},
                                       "tags": {"a": "1", "b": "2"}})
        self.assertEqual(list(got["meta"]["tags"]), ["a", "b"])
        # empty peer keeps the peer; tags replace; "" alias is ignored
        r = yield self.m.request("PATCH", path, body={"alias": "", "meta": {"peer": {}, "tags": {"c": "3"}}})
        got = r.json()
        self.assertEqual(got["alias"], "renamed")
        self.assertEqual(got["meta"]["peer"], {"sid": SID, "type": "1", "alias": "remote"})
        self.assertEqual(got["meta"]["tags"], {"c": "3"})
        # a partial peer changes only the given fields; tags {} clears
        r = yield self.m.request("PATCH", path, body={"meta": {"peer": {"alias": "x"}, "tags": {}}})
        got = r.json()
        self.assertEqual(got["meta"], {"peer": {"sid": SID, "type": "1", "alias": "x"}, "tags": {}})
        # case-insensitive field names
        r = yield self.m.request("PATCH", path, body={"ALIAS": "upper"})
        self.assertEqual(r.json()["alias"], "upper")

    @inlineCallbacks
    def test_null_is_a_field_left_out(self) -> Any:
        """``null`` anywhere in a request body means "not given" (as NodePass decodes it)."""
        inst = yield self.create()
        iid = inst["id"]
        r = yield self.m.request("PATCH", f"/instances/{iid}", body={
            "alias": "kept", "restart": False,
            "meta": {"peer": {"sid": SID, "type": "1", "alias": "p"}, "tags": {"a": "b"}},
        })
        self.assertEqual(r.code, 200, r.body)
        before = r.json()
        for body in (
            {"alias": None, "action": None, "restart": None, "meta": None},
            {"meta": {"peer": None, "tags": None}},
            {"meta": {"peer": {"sid": None, "type": None, "alias": None}}},
            {"ALIAS": None, "Meta": {"PEER": {"SID": None}}},
        ):
            r = yield self.m.request("PATCH", f"/instances/{iid}", body=body)
            with self.subTest(body=body):
                self.assertEqual(r.code, 200, r.body)
                self.assertEqual(r.json(), before)
        r = yield self.m.request("POST", "/instances", body={"url": SERVER_URL, "alias": None})
        self.assertEqual((r.code, r.json()["alias"]), (201, ""))
        for body in ({"url": None}, {"url": None, "alias": "x"}):
            r = yield self.m.request("POST", "/instances", body=body)
            self.assertError(r, 400, "Invalid request body")
            r = yield self.m.request("PUT", f"/instances/{iid}", body=body)
            self.assertError(r, 400, "Invalid request body")
        r = yield self.m.request("POST", "/info", body={"alias": "m"})
        self.assertEqual(r.json()["alias"], "m")
        r = yield self.m.request("POST", "/info", body={"alias": None})
        self.assertEqual(r.json()["alias"], "")

    @inlineCallbacks
    def test_url_must_start_with_its_scheme(self) -> Any:
        for url in (" " + SERVER_URL, "\t" + SERVER_URL, SERVER_URL + "\n", SERVER_URL + "?x=\x7f"):
            r = yield self.m.request("POST", "/instances", body={"url": url})
            self.assertEqual(r.code, 400, url)
        r = yield self.m.request("POST", "/instances", body={"url": "SERVER" + SERVER_URL[6:]})
        self.assertEqual(r.code, 201)

    @inlineCallbacks
    def test_patch_validation_applies_nothing(self) -> Any:
        inst = yield self.create()
        path = f"/instances/{inst['id']}"
        cases: list[tuple[Any, str]] = [
            ({"alias": "new", "action": "jump"}, "Invalid action: jump"),
            ({"alias": "a" * 257}, "Instance alias exceeds maximum length 256"),
            ({"alias": "new", "meta": {"peer": {"sid": "not-a-uuid"}}}, "Meta peer.sid must be a UUID v4"),
            ({"meta": {"peer": {"sid": "550e8400-e29b-11d4-a716-446655440000"}}}, "Meta peer.sid must be a UUID v4"),
            ({"meta": {"peer": {"type": "t" * 257}}}, "Meta peer.type exceeds maximum length 256"),
            ({"meta": {"peer": {"alias": "p" * 257}}}, "Meta peer.alias exceeds maximum length 256"),
            ({"meta": {"tags": {"k" * 257: "v"}}}, "Meta tag key exceeds maximum length 256"),
            ({"meta": {"tags": {"k": "v" * 257}}}, "Meta tag value exceeds maximum length 256"),
            ({"meta": {"tags": {"k": 1}}}, "Invalid request body: meta.tags values must be strings"),
            ({"restart": "no"}, "Invalid request body: restart must be a boolean"),
            ({"alias": "new", "meta": []}, "Invalid request body: meta must be an object"),
        ]
        for body, message in cases:
            r = yield self.m.request("PATCH", path, body=body)
            self.assertError(r, 400, message)
        for raw in [b"", b"nope", b"[]"]:
            r = yield self.m.request("PATCH", path, raw=raw)
            self.assertError(r, 400, "Invalid request body")
        r = yield self.m.request(
            "PATCH", path, raw=b'{"alias":"new","meta":{"tags":{"env":"a","env":"b"}}}')
        self.assertError(r, 400, "Meta tag key duplicated: env")
        r = yield self.m.request("GET", path)
        self.assertEqual(r.json()["alias"], "s1")
        self.assertEqual(r.json()["meta"]["tags"], {})
        r = yield self.m.request("PATCH", "/instances/nothere", body={"alias": "x"})
        self.assertError(r, 404, "Instance not found")

    @inlineCallbacks
    def test_patch_actions(self) -> Any:
        inst = yield self.create()
        path = f"/instances/{inst['id']}"
        first = FakeTunnel.instances[0]
        r = yield self.m.request("PATCH", path, body={"action": "stop"})
        self.assertEqual(r.code, 200)
        self.assertEqual(r.json()["status"], "stopped")
        self.assertTrue(first.stopped)
        self.assertIsNone(first.parent)
        self.assertEqual(self.m.service.manager.services, [])
        r = yield self.m.request("PATCH", path, body={"action": "start"})
        self.assertEqual(r.json()["status"], "running")
        self.assertEqual(len(FakeTunnel.instances), 2)
        r = yield self.m.request("PATCH", path, body={"action": "restart"})
        self.assertEqual(r.json()["status"], "running")
        self.assertEqual(len(FakeTunnel.instances), 3)
        self.assertTrue(FakeTunnel.instances[1].stopped)
        # restart also starts a stopped instance
        yield self.m.request("PATCH", path, body={"action": "stop"})
        r = yield self.m.request("PATCH", path, body={"action": "restart"})
        self.assertEqual(r.json()["status"], "running")

    @inlineCallbacks
    def test_counters_cumulative_and_reset(self) -> Any:
        inst = yield self.create()
        path = f"/instances/{inst['id']}"
        tunnel = FakeTunnel.instances[-1]
        tunnel.stats.tcprx, tunnel.stats.tcptx, tunnel.stats.udprx = 100, 200, 7
        tunnel.stats.mode, tunnel.stats.pool, tunnel.stats.tcps = 1, 3, 2
        r = yield self.m.request("GET", path)
        got = r.json()
        self.assertEqual((got["tcprx"], got["tcptx"], got["udprx"], got["mode"], got["pool"], got["tcps"]),
                         (100, 200, 7, 1, 3, 2))
        yield self.m.request("PATCH", path, body={"action": "restart"})
        tunnel = FakeTunnel.instances[-1]
        tunnel.stats.tcprx, tunnel.stats.mode = 50, 2
        r = yield self.m.request("GET", path)
        self.assertEqual((r.json()["tcprx"], r.json()["tcptx"]), (150, 200))
        r = yield self.m.request("PATCH", path, body={"action": "reset"})
        got = r.json()
        self.assertEqual([got[k] for k in ("tcprx", "tcptx", "udprx", "udptx")], [0, 0, 0, 0])
        tunnel.stats.tcprx = 80
        r = yield self.m.request("GET", path)
        self.assertEqual(r.json()["tcprx"], 30)
        r = yield self.m.request("PATCH", path, body={"action": "stop"})
        got = r.json()
        self.assertEqual((got["tcprx"], got["pool"], got["tcps"], got["mode"]), (30, 0, 0, 2))

    @inlineCallbacks
    def test_status_from_log_lines(self) -> Any:
        inst = yield self.create()
        path = f"/instances/{inst['id']}"
        tunnel = FakeTunnel.instances[-1]
        tunnel.fail("bind: address already in use")
        r = yield self.m.request("GET", path)
        self.assertEqual(r.json()["status"], "error")
        tunnel.checkpoint()
        r = yield self.m.request("GET", path)
        self.assertEqual(r.json()["status"], "running")

    @inlineCallbacks
    def test_start_failure_is_contained(self) -> Any:
        FakeTunnel.fail_start = True
        inst = yield self.create()
        self.assertEqual(inst["status"], "error")
        self.assertEqual(self.m.service.manager.services, [])
        FakeTunnel.fail_start = False
        r = yield self.m.request("PATCH", f"/instances/{inst['id']}", body={"action": "restart"})
        self.assertEqual(r.json()["status"], "running")
        r = yield self.m.request("GET", "/info")
        self.assertEqual(r.code, 200)

    @inlineCallbacks
    def test_put(self) -> Any:
        inst = yield self.create()
        path = f"/instances/{inst['id']}"
        yield self.m.request("PATCH", path, body={"alias": "keep", "restart": False})
        new = "client://127.0.0.1:10103/127.0.0.1:10104"
        r = yield self.m.request("PUT", path, body={"url": new})
        self.assertEqual(r.code, 200, r.body)
        got = r.json()
        self.assertEqual((got["type"], got["url"], got["alias"], got["restart"], got["status"]),
                         ("client", new + "?log=debug", "keep", False, "running"))
        self.assertTrue(got["config"].startswith(new + "?block=0"))
        self.assertTrue(FakeTunnel.instances[0].stopped)
        self.assertEqual(FakeTunnel.instances[-1].config.scheme, "client")
        r = yield self.m.request("PUT", path, body={"url": new})
        self.assertError(r, 409, "Instance URL conflict")
        r = yield self.m.request("PUT", path, body={"url": new + "?log=debug"})
        self.assertError(r, 409, "Instance URL conflict")
        r = yield self.m.request("PUT", path, raw=b"{}")
        self.assertError(r, 400, "Invalid request body")
        r = yield self.m.request("PUT", path, body={"url": "tcp://x:1"})
        self.assertError(r, 400, "Invalid URL scheme")
        r = yield self.m.request("PUT", "/instances/nothere", body={"url": new})
        self.assertError(r, 404, "Instance not found")

    @inlineCallbacks
    def test_delete(self) -> Any:
        inst = yield self.create()
        path = f"/instances/{inst['id']}"
        r = yield self.m.request("DELETE", path)
        self.assertEqual(r.code, 204)
        self.assertEqual(r.body, b"")
        self.assertCors(r)
        self.assertTrue(FakeTunnel.instances[0].stopped)
        r = yield self.m.request("GET", path)
        self.assertError(r, 404, "Instance not found")
        r = yield self.m.request("DELETE", path)
        self.assertError(r, 404, "Instance not found")

    # ---------------------------------------------------------------- pseudo-instance
    @inlineCallbacks
    def test_pseudo_instance_rules(self) -> Any:
        path = "/instances/********"
        r = yield self.m.request("PUT", path, body={"url": SERVER_URL})
        self.assertError(r, 403, "Forbidden: API Key")
        r = yield self.m.request("DELETE", path)
        self.assertError(r, 403, "Forbidden: API Key")
        old = self.m.key
        mid = self.m.service.manager.master_id
        r = yield self.m.request("PATCH", path, body={"alias": "ignored", "action": "stop"})
        self.assertEqual(r.code, 200)
        self.assertEqual(r.json()["url"], old)
        self.assertEqual(r.json()["alias"], "")
        r = yield self.m.request("PATCH", path, body={"action": "restart"})
        self.assertEqual(r.code, 200)
        new = r.json()["url"]
        self.assertNotEqual(new, old)
        self.assertRegex(new, r"^[0-9a-f]{32}$")
        self.assertEqual(r.json()["config"], mid)
        r = yield self.m.request("GET", "/info", key=old)
        self.assertError(r, 401, "Unauthorized: Invalid API key")
        r = yield self.m.request("GET", "/info", key=new)
        self.assertEqual(r.code, 200)
        self.assertIn(f"API Key regenerated: {new}", self.m.output.getvalue())

    # ---------------------------------------------------------------- info / tcping
    @inlineCallbacks
    def test_info(self) -> Any:
        r = yield self.m.request("GET", "/info")
        self.assertEqual(r.code, 200)
        info = r.json()
        expected = {"mid", "alias", "os", "arch", "cpu", "mem_total", "mem_used", "swap_total",
                    "swap_used", "netrx", "nettx", "diskr", "diskw", "sysup", "ver", "name",
                    "uptime", "log", "tls", "crt", "key"}
        self.assertEqual(set(info), expected)
        self.assertEqual(list(info), sorted(info))
        self.assertEqual(info["mid"], self.m.service.manager.master_id)
        self.assertEqual(info["ver"], f"v{__version__}")
        major, minor = (int(x) for x in re.match(r"v?(\d+)\.(\d+)", info["ver"]).groups())  # type: ignore[union-attr]
        self.assertGreaterEqual((major, minor), (1, 10))
        self.assertEqual((info["name"], info["log"], info["tls"], info["crt"], info["key"]),
                         ("127.0.0.1", "debug", "0", "", ""))
        self.assertIsInstance(info["uptime"], int)
        r = yield self.m.request("POST", "/info", body={"alias": "my master"})
        self.assertEqual(r.code, 200)
        self.assertEqual(r.json()["alias"], "my master")
        r = yield self.m.request("GET", "/instances/********")
        self.assertEqual(r.json()["alias"], "my master")
        r = yield self.m.request("POST", "/info", body={"alias": "x" * 257})
        self.assertError(r, 400, "Master alias exceeds maximum length 256")
        r = yield self.m.request("POST", "/info", raw=b"x")
        self.assertError(r, 400, "Invalid request body")
        r = yield self.m.request("POST", "/info", body={})
        self.assertEqual(r.json()["alias"], "")

    @inlineCallbacks
    def test_tcping(self) -> Any:
        r = yield self.m.request("GET", "/tcping")
        self.assertError(r, 400, "Target address required")
        r = yield self.m.request("GET", "/tcping?target=nonsense")
        self.assertEqual(r.code, 400)
        host, port = self.m.service.address
        r = yield self.m.request("GET", f"/tcping?target=127.0.0.1:{port}")
        self.assertEqual(r.code, 200)
        got = r.json()
        self.assertEqual((got["target"], got["connected"], got["error"]), (f"127.0.0.1:{port}", True, None))
        self.assertIsInstance(got["latency"], int)

    @inlineCallbacks
    def test_tcping_busy(self) -> Any:
        tcping = self.m.service.tcping
        tcping._in_flight = tcping.limit
        self.addCleanup(setattr, tcping, "_in_flight", 0)
        r = yield self.m.request("GET", "/tcping?target=127.0.0.1:1")
        self.assertEqual(r.code, 429)
        self.assertIn("too many requests", r.json()["error"])

    @inlineCallbacks
    def test_startup_log(self) -> Any:
        out = self.m.output.getvalue()
        host, port = self.m.service.address
        self.assertIn(f"Master started: 127.0.0.1:{port}/api/v1", out)
        self.assertIn(f"API Key created: {self.m.key}", out)
        yield None


class PrefixTests(TestCase):
    """A custom prefix moves every route."""

    @inlineCallbacks
    def test_custom_prefix(self) -> Any:
        m = start_master(self, url="master://127.0.0.1:0/admin//?log=warn")
        self.assertTrue(m.base.endswith("/admin/v1"))
        r = yield m.request("GET", "/info")
        self.assertEqual(r.code, 200)
        r = yield m.request("GET", m.root + "/api/v1/info", absolute=True)
        self.assertEqual(r.code, 404)
        # the key is printed even when INFO is hidden
        self.assertIn(f"API Key created: {m.key}", m.output.getvalue())
