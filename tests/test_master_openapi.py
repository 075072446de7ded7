"""The OpenAPI document, the Swagger UI page, and their agreement with the live API."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import treq
from hypothesis import given, settings
from hypothesis import strategies as st
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from nodepass.master import docs as docs_module
from nodepass.master.app import ROUTE_METHODS, allow_header
from nodepass.master.docs import ASSETS, docs_resource, swagger_ui_directory
from nodepass.master.openapi import ID_PATTERN, TARGET_PATTERN, URL_PATTERN, openapi_document
from nodepass.master.tcping import Tcping, split_target

BASE = "/api/v1"
METHODS = ("get", "post", "put", "patch", "delete")

#: path -> method -> statuses the contract lists for it.
EXPECTED: dict[str, dict[str, set[str]]] = {
    "/instances": {
        "get": {"200", "401", "405"},
        "post": {"201", "400", "401", "405", "409"},
    },
    "/instances/{id}": {
        "get": {"200", "400", "401", "404", "405"},
        "patch": {"200", "400", "401", "404", "405"},
        "put": {"200", "400", "401", "403", "404", "405", "409"},
        "delete": {"204", "400", "401", "403", "404", "405"},
    },
    "/events": {"get": {"200", "401", "405"}},
    "/info": {"get": {"200", "401", "405"}, "post": {"200", "400", "401", "405"}},
    "/tcping": {"get": {"200", "400", "401", "405", "429"}},
    "/openapi.json": {"get": {"200"}},
    "/docs": {"get": {"200"}},
}
PUBLIC = {"/openapi.json", "/docs"}
BODIES = {
    ("/instances", "post"): "InstanceCreate",
    ("/instances/{id}", "patch"): "InstancePatch",
    ("/instances/{id}", "put"): "InstancePut",
    ("/info", "post"): "InfoPatch",
}


def schema_validator(document: dict[str, Any], name: str) -> OAS31Validator:
    """A JSON Schema validator for components/schemas/<name> of ``document``."""
    wrapper = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return OAS31Validator(wrapper)


def refs(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.append(value)
            else:
                found.extend(refs(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(refs(item))
    return found


class DocumentTests(unittest.TestCase):
    def setUp(self) -> None:
        self.doc = openapi_document(BASE)

    def test_valid_openapi_31(self) -> None:
        self.assertTrue(self.doc["openapi"].startswith("3.1."))
        validate(self.doc, cls=OpenAPIV31SpecValidator)
        self.assertEqual(list(OpenAPIV31SpecValidator(self.doc).iter_errors()), [])

    def test_validator_catches_a_broken_document(self) -> None:
        broken = copy.deepcopy(self.doc)
        del broken["paths"]["/instances/{id}"]["parameters"]  # {id} no longer declared
        self.assertRaises(OpenAPIValidationError, validate, broken, cls=OpenAPIV31SpecValidator)

    def test_every_ref_resolves(self) -> None:
        all_refs = refs(self.doc)
        self.assertTrue(all_refs)
        for ref in all_refs:
            with self.subTest(ref=ref):
                node: Any = self.doc
                self.assertTrue(ref.startswith("#/"))
                for part in ref[2:].split("/"):
                    self.assertIn(part, node)
                    node = node[part]

    def test_servers_follow_base(self) -> None:
        self.assertEqual(self.doc["servers"], [{"url": "/api/v1"}])
        self.assertEqual(openapi_document("/admin/v1")["servers"], [{"url": "/admin/v1"}])

    def test_fresh_copy_each_call(self) -> None:
        self.doc["paths"].clear()
        self.doc["components"]["schemas"]["Info"]["properties"].clear()
        again = openapi_document(BASE)
        self.assertIn("/info", again["paths"])
        self.assertIn("mid", again["components"]["schemas"]["Info"]["properties"])

    def test_api_key_security(self) -> None:
        self.assertEqual(
            self.doc["components"]["securitySchemes"]["ApiKey"],
            {
                "type": "apiKey",
                "in": "header",
                "name": "X-API-Key",
                "description": self.doc["components"]["securitySchemes"]["ApiKey"]["description"],
            },
        )
        self.assertEqual(self.doc["security"], [{"ApiKey": []}])
        for path, methods in self.doc["paths"].items():
            for method in METHODS:
                if method in methods:
                    with self.subTest(path=path, method=method):
                        if path in PUBLIC:
                            self.assertEqual(methods[method]["security"], [])
                        else:
                            self.assertNotIn("security", methods[method])

    def test_paths_methods_and_statuses(self) -> None:
        paths = self.doc["paths"]
        self.assertEqual(set(paths), set(EXPECTED))
        for path, methods in EXPECTED.items():
            documented = {m for m in METHODS if m in paths[path]}
            self.assertEqual(documented, set(methods), path)
            for method, statuses in methods.items():
                with self.subTest(path=path, method=method):
                    self.assertEqual(set(paths[path][method]["responses"]), statuses)

    def test_request_bodies(self) -> None:
        for path, methods in self.doc["paths"].items():
            for method in METHODS:
                if method not in methods:
                    continue
                operation = methods[method]
                expected = BODIES.get((path, method))
                with self.subTest(path=path, method=method):
                    if expected is None:
                        self.assertNotIn("requestBody", operation)
                    else:
                        schema = operation["requestBody"]["content"]["application/json"]["schema"]
                        self.assertEqual(schema, {"$ref": f"#/components/schemas/{expected}"})

    def test_every_json_response_has_a_schema(self) -> None:
        for path, methods in self.doc["paths"].items():
            for method in METHODS:
                for status, response in methods.get(method, {}).get("responses", {}).items():
                    if "$ref" in response:
                        name = response["$ref"].rsplit("/", 1)[1]
                        response = self.doc["components"]["responses"][name]
                    with self.subTest(path=path, method=method, status=status):
                        if status == "204":
                            self.assertNotIn("content", response)
                        else:
                            for media in response["content"].values():
                                self.assertIn("schema", media)

    def test_schema_names_and_fields(self) -> None:
        schemas = self.doc["components"]["schemas"]
        for name in ["Instance", "InstanceCreate", "InstancePatch", "InstancePut", "Info",
                     "InfoPatch", "Tcping", "Error", "Event"]:
            self.assertIn(name, schemas)
        self.assertEqual(
            schemas["Instance"]["required"],
            ["id", "alias", "type", "status", "url", "config", "restart", "meta", "mode",
             "ping", "pool", "tcps", "udps", "tcprx", "tcptx", "udprx", "udptx"],
        )
        self.assertEqual(set(schemas["Instance"]["properties"]), set(schemas["Instance"]["required"]))
        self.assertEqual(
            set(schemas["Info"]["required"]),
            {"mid", "alias", "os", "arch", "cpu", "mem_total", "mem_used", "swap_total",
             "swap_used", "netrx", "nettx", "diskr", "diskw", "sysup", "ver", "name", "uptime",
             "log", "tls", "crt", "key"},
        )
        self.assertEqual(set(schemas["Tcping"]["required"]), {"target", "connected", "latency", "error"})
        self.assertEqual(set(schemas["Event"]["required"]), {"type", "time", "instance", "logs"})
        self.assertEqual(
            schemas["InstancePatch"]["properties"]["action"]["enum"],
            ["start", "stop", "restart", "reset", "", None],
        )

    def test_schemas_accept_real_shapes(self) -> None:
        instance = {
            "id": "de7ba80f", "alias": "s1", "type": "server", "status": "running",
            "url": "server://127.0.0.1:10101/127.0.0.1:8080",
            "config": "server://127.0.0.1:10101/127.0.0.1:8080?block=0",
            "restart": True, "meta": {"peer": {"sid": "", "type": "", "alias": ""}, "tags": {"a": "b"}},
            "mode": 1, "ping": 3, "pool": 64, "tcps": 0, "udps": 0,
            "tcprx": 10, "tcptx": 20, "udprx": 0, "udptx": 0,
        }
        schema_validator(self.doc, "Instance").validate(instance)
        pseudo = dict(instance, id="********", type="", status="", url="0" * 32, config="1" * 16)
        schema_validator(self.doc, "Instance").validate(pseudo)
        schema_validator(self.doc, "Event").validate(
            {"type": "update", "time": "2026-11-24T02:12:45.2112Z", "instance": instance, "logs": ""}
        )
        schema_validator(self.doc, "Event").validate(
            {"type": "shutdown", "time": "2026-11-24T02:12:45Z", "instance": None, "logs": ""}
        )
        tcping = {"target": "a:1", "connected": False, "latency": 0, "error": "dial tcp: x"}
        schema_validator(self.doc, "Tcping").validate(tcping)
        schema_validator(self.doc, "Tcping").validate(dict(tcping, connected=True, error=None))
        schema_validator(self.doc, "Error").validate({"error": "Instance not found"})
        schema_validator(self.doc, "InstancePatch").validate(
            {"alias": "x", "action": "reset", "restart": False,
             "meta": {"peer": {"sid": "3f1e0c9a-4b2d-4c8e-9a7f-0123456789ab", "type": "1"}, "tags": {}}}
        )

    def test_schemas_reject_wrong_shapes(self) -> None:
        self.assertFalse(schema_validator(self.doc, "Tcping").is_valid({"target": "a:1"}))
        self.assertFalse(schema_validator(self.doc, "InstancePatch").is_valid({"action": "jump"}))
        self.assertFalse(schema_validator(self.doc, "InstanceCreate").is_valid({"alias": "x"}))
        self.assertFalse(
            schema_validator(self.doc, "InstancePatch").is_valid({"meta": {"peer": {"type": "t" * 257}}})
        )
        self.assertFalse(
            schema_validator(self.doc, "Event").is_valid(
                {"type": "bogus", "time": "x", "instance": None, "logs": ""}
            )
        )


class AgreementTests(unittest.TestCase):
    """The document's patterns and null rules against the server's own checks."""

    def setUp(self) -> None:
        self.doc = openapi_document(BASE)

    def test_route_methods_are_the_documented_ones(self) -> None:
        for path, methods in ROUTE_METHODS.items():
            documented = {m.upper().encode() for m in METHODS if m in self.doc["paths"][path]}
            self.assertEqual(set(methods), documented, path)
        self.assertEqual(set(ROUTE_METHODS), set(self.doc["paths"]))
        self.assertEqual(allow_header((b"GET", b"POST")), b"GET, HEAD, POST, OPTIONS")
        allow = self.doc["components"]["responses"]["MethodNotAllowed"]["headers"]["Allow"]
        self.assertIs(allow["required"], True)

    def test_ids(self) -> None:
        from nodepass.master.instances import _new_hex

        for _ in range(100):
            self.assertRegex(_new_hex(4), ID_PATTERN)
        self.assertRegex("********", ID_PATTERN)
        for bad in ("", "abc", "ABCDEF01", "*******", "abcdef012", "a/b"):
            self.assertNotRegex(bad, ID_PATTERN)

    @given(st.text())
    @settings(max_examples=300, deadline=None)
    def test_target_pattern_rejections_are_server_rejections(self, target: str) -> None:
        if re.search(TARGET_PATTERN, target) is None:
            self.assertRaises(ValueError, split_target, target)

    @given(st.from_regex(TARGET_PATTERN, fullmatch=True).filter(lambda t: t.rsplit(":", 1)[1].isdigit()))
    @settings(max_examples=200, deadline=None)
    def test_numeric_targets_in_range_are_accepted(self, target: str) -> None:
        port = int(target.rsplit(":", 1)[1])
        if port <= 65535:
            self.assertEqual(split_target(target)[1], port)
        else:
            self.assertRaises(ValueError, split_target, target)

    def test_target_samples(self) -> None:
        for good in ("127.0.0.1:80", "[::1]:443", "example.com:http", ":22", "host:0080"):
            self.assertRegex(good, TARGET_PATTERN)
            split_target(good)
        for bad in ("nohost", "a:b:c", "[::1]", "::1:80", "a:٣", "a:", "[a]x:1"):
            self.assertNotRegex(bad, TARGET_PATTERN)
            self.assertRaises(ValueError, split_target, bad)

    @given(st.one_of(st.text(), st.text().map(lambda t: "server://" + t), st.text().map(lambda t: " client://" + t)))
    @settings(max_examples=300, deadline=None)
    def test_url_pattern_rejections_are_server_rejections(self, url: str) -> None:
        from nodepass.master.instances import ApiError, check_instance_url
        from nodepass.url import parse_master_url

        if re.search(URL_PATTERN, url) is None:
            with self.assertRaises(ApiError) as caught:
                check_instance_url(url, parse_master_url("master://127.0.0.1:0"))
            self.assertEqual(caught.exception.status, 400)

    def test_null_accepted_where_the_server_ignores_it(self) -> None:
        for name, body in (
            ("InstancePatch", {"alias": None, "action": None, "restart": None, "meta": None}),
            ("InstancePatch", {"meta": {"peer": None, "tags": None}}),
            ("InstancePatch", {"meta": {"peer": {"sid": None, "type": None, "alias": None}}}),
            ("InstancePatch", {"action": "", "meta": {"peer": {"sid": ""}}}),
            ("InstanceCreate", {"url": "server://:1/a:2", "alias": None}),
            ("InfoPatch", {"alias": None}),
        ):
            with self.subTest(name=name, body=body):
                schema_validator(self.doc, name).validate(body)
        for name, body in (
            ("InstanceCreate", {"url": None}),
            ("InstancePut", {"url": None}),
            ("InstancePatch", {"meta": {"tags": {"a": None}}}),
            ("InstanceCreate", {"url": " server://:1/a:2"}),
            ("InstanceCreate", {"url": "server://:1/a:2", "alias": "a" * 257}),
        ):
            with self.subTest(name=name, body=body):
                self.assertFalse(schema_validator(self.doc, name).is_valid(body))

    def test_links_follow_created_instances(self) -> None:
        operation_ids = {
            op["operationId"] for item in self.doc["paths"].values() for m, op in item.items() if m in METHODS
        }
        created = self.doc["paths"]["/instances"]["post"]["responses"]["201"]["links"]
        self.assertEqual(
            {link["operationId"] for link in created.values()},
            {"getInstance", "updateInstance", "replaceInstanceUrl", "deleteInstance"},
        )
        for item in self.doc["paths"].values():
            for method, operation in item.items():
                for response in operation.get("responses", {}).values() if method in METHODS else ():
                    for link in response.get("links", {}).values():
                        self.assertIn(link["operationId"], operation_ids)
                        self.assertEqual(set(link["parameters"]), {"id"})


def mounted(base: str, resource: IResource) -> Resource:
    """A site root with ``resource`` at ``<base>/docs``."""
    root = Resource()
    node = root
    for segment in [s for s in base.split("/") if s]:
        child = Resource()
        node.putChild(segment.encode(), child)
        node = child
    node.putChild(b"docs", resource)  # type: ignore[arg-type]
    return root


class DocsPageTests(unittest.TestCase):
    """The page and its files over a real loopback HTTP server."""

    def setUp(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.origin = self.serve(mounted(BASE, docs_resource(BASE)))

    def serve(self, root: Resource) -> str:
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    @inlineCallbacks
    def get(self, path: str, origin: str | None = None) -> Any:
        response = yield treq.get((origin or self.origin) + path, pool=self.pool)
        body = yield treq.content(response)
        return response, body

    @inlineCallbacks
    def test_page(self) -> Any:
        for path in [f"{BASE}/docs", f"{BASE}/docs/"]:
            response, body = yield self.get(path)
            self.assertEqual(response.code, 200, path)
            self.assertTrue(response.headers.getRawHeaders("Content-Type")[0].startswith("text/html"))
            page = body.decode("utf-8")
            self.assertIn('<div id="swagger-ui"></div>', page)
            self.assertIn(f'url: "{BASE}/openapi.json"', page)
            self.assertIn("validatorUrl: null", page)

    @inlineCallbacks
    def test_page_references_no_other_host(self) -> Any:
        _response, body = yield self.get(f"{BASE}/docs")
        page = body.decode("utf-8")
        self.assertNotRegex(page, r"(?i)https?:")
        self.assertNotRegex(page, r"(?i)(src|href)\s*=\s*[\"']?//")
        links = re.findall(r"(?:src|href)=\"([^\"]+)\"", page)
        self.assertEqual(
            sorted(links),
            sorted(f"{BASE}/docs/{name}" for name in ASSETS),
        )

    @inlineCallbacks
    def test_assets_served_from_package(self) -> Any:
        folder = swagger_ui_directory()
        for name, content_type in ASSETS.items():
            response, body = yield self.get(f"{BASE}/docs/{name}")
            with self.subTest(name=name):
                self.assertEqual(response.code, 200)
                self.assertEqual(response.headers.getRawHeaders("Content-Type"), [content_type])
                self.assertEqual(body, (folder / name).read_bytes())
        _response, script = yield self.get(f"{BASE}/docs/swagger-ui-bundle.js")
        self.assertIn(b"SwaggerUIBundle", script)

    def test_stylesheet_loads_nothing_remote(self) -> None:
        css = (swagger_ui_directory() / "swagger-ui.css").read_text("utf-8")
        targets = re.findall(r"url\(\s*['\"]?([^'\")]*)", css)
        self.assertTrue(targets)
        for target in targets:
            self.assertTrue(target.startswith("data:"), target[:60])
        self.assertNotIn("@import", css)

    def test_swagger_ui_supports_openapi_31(self) -> None:
        # OpenAPI 3.1 documents need Swagger UI 5 or later.
        bundle = (swagger_ui_directory() / "swagger-ui-bundle.js").read_text("utf-8")
        versions = re.findall(r'version:"(\d+)\.\d+\.\d+"', bundle)
        self.assertTrue(versions)
        self.assertGreaterEqual(max(int(v) for v in versions), 5)

    @inlineCallbacks
    def test_unknown_asset_is_404(self) -> Any:
        for path in ["index.html", "swagger-ui.js.map", "../openapi.json", "a/b"]:
            response, _ = yield self.get(f"{BASE}/docs/{path}")
            self.assertEqual(response.code, 404, path)

    @inlineCallbacks
    def test_other_base(self) -> Any:
        origin = self.serve(mounted("/admin/v1", docs_resource("/admin/v1")))
        _response, body = yield self.get("/admin/v1/docs", origin)
        page = body.decode("utf-8")
        self.assertIn('url: "/admin/v1/openapi.json"', page)
        self.assertIn('src="/admin/v1/docs/swagger-ui-bundle.js"', page)

    @inlineCallbacks
    def test_without_swagger_ui_files(self) -> Any:
        def missing() -> Path:
            raise docs_module.SwaggerUIMissing("not installed")

        self.patch(docs_module, "swagger_ui_directory", missing)
        origin = self.serve(mounted(BASE, docs_resource(BASE)))
        response, body = yield self.get(f"{BASE}/docs", origin)
        page = body.decode("utf-8")
        self.assertEqual(response.code, 200)
        self.assertIn("swagger-ui-py", page)
        self.assertIn(f'href="{BASE}/openapi.json"', page)
        response, _ = yield self.get(f"{BASE}/docs/swagger-ui.css", origin)
        self.assertEqual(response.code, 404)


def rule_to_openapi(rule: str) -> str:
    """``/instances/<path:instance_id>`` -> ``/instances/{}`` (parameter names ignored)."""
    return re.sub(r"<[^>]*>", "{}", rule)


def openapi_shape(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


class LiveApiTests(unittest.TestCase):
    """The Klein application agrees with the document."""

    def setUp(self) -> Any:
        from tests.test_master_support import start_master

        self.master = start_master(self)
        self.doc = openapi_document(self.master.config.base)

    def test_every_klein_route_is_documented(self) -> None:
        from nodepass.master.app import MasterAPI

        documented = {openapi_shape(p): p for p in self.doc["paths"]}
        seen = set()
        for rule in MasterAPI.app.url_map.iter_rules():
            if rule.endpoint.endswith("_branch"):
                continue  # the files below a branch route such as /docs
            shape = rule_to_openapi(rule.rule)
            if shape not in documented and shape.endswith("/") and shape + "{}" in documented:
                shape = shape + "{}"  # the same route with an empty id
            with self.subTest(rule=rule.rule):
                self.assertIn(shape, documented)
            seen.add(documented.get(shape))
            if rule.methods is not None:
                expected = {m.upper() for m in METHODS if m in self.doc["paths"][documented[shape]]}
                self.assertEqual(set(rule.methods) - {"HEAD", "OPTIONS"}, expected, rule.rule)
        self.assertEqual(seen, set(self.doc["paths"]))

    @inlineCallbacks
    def test_methods_match_behaviour(self) -> Any:
        """Documented methods are served; every other method is refused with 405."""
        samples = {"/instances/{id}": "/instances/********", "/tcping": "/tcping"}
        bodies = {
            ("/instances", "post"): {"url": ""},
            ("/instances/{id}", "patch"): {},
            ("/instances/{id}", "put"): {"url": "server://127.0.0.1:1/127.0.0.1:2"},
            ("/info", "post"): {"alias": ""},
        }
        for path, item in self.doc["paths"].items():
            for method in METHODS:
                if path == "/events" and method == "get":
                    continue  # an endless stream; covered by the events tests
                url = samples.get(path, path)
                response = yield self.master.request(
                    method.upper(), url, body=bodies.get((path, method))
                )
                with self.subTest(path=path, method=method):
                    if method in item:
                        self.assertNotEqual(response.code, 405)
                        self.assertIn(str(response.code), item[method]["responses"])
                    else:
                        self.assertEqual(response.code, 405)
                        schema_validator(self.doc, "Error").validate(response.json())
                        allowed = response.header("Allow").split(", ")
                        documented = [m.upper() for m in METHODS if m in item]
                        self.assertEqual(set(allowed) - {"HEAD", "OPTIONS"}, set(documented))
                        self.assertEqual(allowed[-1], "OPTIONS")

    @inlineCallbacks
    def test_openapi_json_served_without_key(self) -> Any:
        response = yield self.master.request("GET", "/openapi.json", key=None)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.header("Content-Type"), "application/json")
        self.assertEqual(response.json(), self.doc)
        validate(response.json(), cls=OpenAPIV31SpecValidator)

    @inlineCallbacks
    def test_docs_served_without_key(self) -> Any:
        response = yield self.master.request("GET", "/docs", key=None)
        self.assertEqual(response.code, 200)
        self.assertIn(b'<div id="swagger-ui"></div>', response.body)
        self.assertIn(f'url: "{self.master.config.base}/openapi.json"'.encode(), response.body)
        response = yield self.master.request("GET", "/docs/swagger-ui.css", key=None)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.body, (swagger_ui_directory() / "swagger-ui.css").read_bytes())

    @inlineCallbacks
    def test_replies_match_schemas(self) -> Any:
        response = yield self.master.request("GET", "/info")
        self.assertEqual(response.code, 200)
        schema_validator(self.doc, "Info").validate(response.json())
        response = yield self.master.request("GET", "/instances")
        self.assertEqual(response.code, 200)
        for instance in response.json():
            schema_validator(self.doc, "Instance").validate(instance)
        host, port = self.master.service.address
        response = yield self.master.request("GET", f"/tcping?target={host}:{port}")
        self.assertEqual(response.code, 200)
        schema_validator(self.doc, "Tcping").validate(response.json())
        self.assertIs(response.json()["connected"], True)
        response = yield self.master.request("GET", "/tcping?target=nohost")
        self.assertEqual(response.code, 400)
        schema_validator(self.doc, "Error").validate(response.json())
        response = yield self.master.request("GET", "/info", key=None)
        self.assertEqual(response.code, 401)
        schema_validator(self.doc, "Error").validate(response.json())

    @inlineCallbacks
    def test_busy_tcping_is_429(self) -> Any:
        # Every probe slot is held by a connection attempt that never completes.
        held = Tcping(MemoryReactorClock(), limit=1, timeout=5.0)
        held.probe("10.0.0.1:80")
        api = self.master.service.api
        assert api is not None
        self.patch(api, "tcping", held)
        response = yield self.master.request("GET", "/tcping?target=127.0.0.1:1")
        self.assertEqual(response.code, 429)
        schema_validator(self.doc, "Error").validate(response.json())
        self.assertIn("too many requests", response.json()["error"])
