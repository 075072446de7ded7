"""The master's REST + SSE API as a Klein application.

Routes (relative to the route base, e.g. ``/api/v1``; the base is mounted by
:meth:`MasterAPI.resource`):

=========================  =======================  ==========
path                       methods                  auth
=========================  =======================  ==========
``/instances``             GET, POST                X-API-Key
``/instances/{id}``        GET, PATCH, PUT, DELETE  X-API-Key
``/events``                GET (SSE)                X-API-Key
``/info``                  GET, POST                X-API-Key
``/tcping?target=h:p``     GET                      X-API-Key
``/openapi.json``          GET                      none
``/docs`` and its files    GET                      none
=========================  =======================  ==========

Every response carries the CORS headers; ``OPTIONS`` on any route answers
200 with an empty body before the key is checked.  ``HEAD`` is answered
wherever ``GET`` is, with the same status and headers and no body (``HEAD``
on ``/events`` does not subscribe).  Any other method a route does not serve
is a JSON 405 with an ``Allow`` header naming the methods it does serve
(after the key check on protected routes, and after the id lookup on
``/instances/{id}``, as NodePass orders them).  The key is compared in
constant time.  Errors, 404 and 500 included, are ``{"error": "<message>"}``;
JSON bodies end with a newline.  Request bodies are JSON objects; duplicate
keys are detected (a duplicate tag key is a 400, as is any other duplicate),
and top-level field names match case-insensitively.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import NotFound

from nodepass import __version__
from nodepass.log import NodePassLogger
from nodepass.master.docs import docs_resource
from nodepass.master.events import EventHub, dumps
from nodepass.master.info import SystemInfo
from nodepass.master.instances import (
    PSEUDO_ID,
    TEXT_LIMIT,
    ApiError,
    InstanceManager,
    validate_patch,
)
from nodepass.master.openapi import openapi_document
from nodepass.master.tcping import Tcping, TcpingBusy
from nodepass.url import MasterURL

__all__ = ["MasterAPI", "CORS_HEADERS", "MAX_BODY", "ROUTE_METHODS", "allow_header", "decode_body"]

CORS_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"Access-Control-Allow-Origin", b"*"),
    (b"Access-Control-Allow-Methods", b"GET, PATCH, POST, PUT, DELETE, OPTIONS"),
    (b"Access-Control-Allow-Headers", b"Content-Type, Authorization, X-API-Key, Cache-Control"),
)

MAX_BODY = 1 << 20
"""Largest accepted request body (bytes)."""

ROUTE_METHODS: dict[str, tuple[bytes, ...]] = {
    "/instances": (b"GET", b"POST"),
    "/instances/{id}": (b"GET", b"PATCH", b"PUT", b"DELETE"),
    "/events": (b"GET",),
    "/info": (b"GET", b"POST"),
    "/tcping": (b"GET",),
    "/openapi.json": (b"GET",),
    "/docs": (b"GET",),
}
"""The methods each route serves (besides ``HEAD`` where ``GET`` is, and ``OPTIONS``)."""


def allow_header(methods: tuple[bytes, ...]) -> bytes:
    """The ``Allow`` value for a route serving *methods*: ``HEAD`` after ``GET``, ``OPTIONS`` last."""
    names: list[bytes] = []
    for method in methods:
        names.append(method)
        if method == b"GET":
            names.append(b"HEAD")
    names.append(b"OPTIONS")
    return b", ".join(names)


def _serves(methods: tuple[bytes, ...], method: bytes) -> bool:
    return method in methods or (method == b"HEAD" and b"GET" in methods)


class _Object(dict):  # type: ignore[type-arg]
    """A decoded JSON object that remembers keys it saw more than once."""

    duplicates: list[str]


def _pairs(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def _fold(obj: _Object) -> dict[str, Any]:
    """Lower-case the field names of a request object; a name given twice is a 400."""
    if obj.duplicates:
        raise ApiError(400, f"Invalid request body: duplicate key {obj.duplicates[0]!r}")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        folded = key.lower()
        if folded in out:
            raise ApiError(400, f"Invalid request body: duplicate key {key!r}")
        out[folded] = value
    return out


def decode_body(raw: bytes) -> _Object:
    """Decode a request body that must be one JSON object; raises :class:`ApiError` 400."""
    if len(raw) > MAX_BODY:
        raise ApiError(400, "Invalid request body: larger than 1 MiB")
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_pairs)
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise ApiError(400, "Invalid request body") from None
    if not isinstance(value, _Object):
        raise ApiError(400, "Invalid request body")
    return value


def _read(request: Any) -> bytes:
    content = request.content  # type: ignore[attr-defined]
    if content is None:
        return b""
    content.seek(0)
    data: bytes = content.read(MAX_BODY + 1)
    return data


def _set_cors(request: Any) -> None:
    for name, value in CORS_HEADERS:
        request.setHeader(name, value)


def _json(request: Any, status: int, value: Any) -> bytes:
    body = (dumps(value) + "\n").encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
    return body


def _error(request: Any, status: int, message: str) -> bytes:
    return _json(request, status, {"error": message})


def _refuse_method(request: Any, route: str) -> bytes | None:
    """A JSON 405 with ``Allow`` unless *route* serves the request's method (``None`` then)."""
    methods = ROUTE_METHODS[route]
    if _serves(methods, request.method):
        return None
    request.setHeader(b"Allow", allow_header(methods))
    return _error(request, 405, "Method not allowed")


def _empty(request: Any, status: int) -> bytes:
    request.setResponseCode(status)
    request.defaultContentType = None  # type: ignore[attr-defined]
    if status != 204:
        request.setHeader(b"Content-Length", b"0")
    return b""


class _JsonNotFound(Resource):
    """404 for paths outside the API (JSON body, CORS headers)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def render(self, request: Any) -> bytes:  # type: ignore[override]
        _set_cors(request)
        return _error(request, 404, "Not found")


class _Branch(Resource):
    """One fixed path segment of the route base; anything else is a JSON 404."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def getChild(self, path: bytes, request: Any) -> IResource:  # type: ignore[override]
        return _JsonNotFound()

    def render(self, request: Any) -> bytes:  # type: ignore[override]
        _set_cors(request)
        return _error(request, 404, "Not found")


class _Utf8Paths(Resource):
    """Answers a JSON 400 for a path that is not UTF-8 (percent-decoded); delegates the rest."""

    isLeaf = True

    def __init__(self, inner: IResource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.inner = inner

    def render(self, request: Any) -> Any:  # type: ignore[override]
        try:
            b"/".join(request.prepath + request.postpath).decode("utf-8")
        except UnicodeDecodeError:
            _set_cors(request)
            return _error(request, 400, "Invalid request path: not UTF-8")
        return self.inner.render(request)  # type: ignore[no-untyped-call]


class MasterAPI:
    """The API handlers; one per master.

    *clock* gives POSIX seconds (uptime); *started* is when the API started;
    *tls_code* is the effective TLS code of the API listener (0/1/2).
    """

    app = Klein()

    def __init__(
        self,
        *,
        master: MasterURL,
        manager: InstanceManager,
        events: EventHub,
        sysinfo: SystemInfo,
        tcping: Tcping,
        logger: NodePassLogger,
        clock: Callable[[], float],
        started: float,
        tls_code: int,
    ) -> None:
        self.master = master
        self.manager = manager
        self.events = events
        self.sysinfo = sysinfo
        self.tcping = tcping
        self.logger = logger
        self.clock = clock
        self.started = started
        self.tls_code = tls_code
        self._docs: IResource | None = None

    # ------------------------------------------------------------------ mounting
    def resource(self) -> IResource:
        """The site root: the Klein app mounted at the route base (JSON 404 elsewhere)."""
        segments = [s.encode("utf-8") for s in self.master.base.split("/") if s]
        klein_resource = _Utf8Paths(self.app.resource())
        root = _Branch()
        node: Resource = root
        for segment in segments[:-1]:
            child = _Branch()
            node.putChild(segment, child)
            node = child
        node.putChild(segments[-1], klein_resource)
        return root

    # ------------------------------------------------------------------ plumbing
    def _guard(self, request: Any, protected: bool) -> bytes | None:
        """CORS headers, OPTIONS preflight and the key check; a response ends the request."""
        _set_cors(request)
        if request.method == b"OPTIONS":
            return _empty(request, 200)
        if not protected:
            return None
        key = self.manager.api_key
        if not key:
            return None
        given = request.getHeader(b"X-API-Key")
        if not given:
            return _error(request, 401, "Unauthorized: API key required")
        if not hmac.compare_digest(bytes(given), key.encode("utf-8")):
            return _error(request, 401, "Unauthorized: Invalid API key")
        return None

    def _admit(self, request: Any, protected: bool, route: str) -> bytes | None:
        """:meth:`_guard`, then the method check of *route*; a response ends the request."""
        early = self._guard(request, protected)
        return early if early is not None else _refuse_method(request, route)

    def _fail(self, request: Any, failure: Failure) -> bytes:
        if failure.check(ApiError):  # type: ignore[no-untyped-call]
            error: ApiError = failure.value  # type: ignore[assignment]
            return _error(request, error.status, error.message)
        self.logger.error("API request failed: %s", failure.getErrorMessage())
        return _error(request, 500, "Internal server error")

    @app.handle_errors(NotFound)
    def not_found(self, request: Any, failure: Failure) -> bytes:
        """Unknown path under the route base."""
        _set_cors(request)
        return _error(request, 404, "Not found")

    @app.handle_errors(Exception)
    def internal_error(self, request: Any, failure: Failure) -> bytes:
        """Anything unexpected: logged, answered with a JSON 500 (never crashes the master)."""
        _set_cors(request)
        return self._fail(request, failure)

    # ------------------------------------------------------------------ /instances
    @app.route("/instances")
    def instances(self, request: Any) -> Any:
        """GET: every instance (pseudo-instance included); POST: create one (201)."""
        early = self._admit(request, True, "/instances")
        if early is not None:
            return early
        try:
            if request.method == b"POST":
                body = _fold(decode_body(_read(request)))
                record = self.manager.create(body.get("url"), body.get("alias"))
                return _json(request, 201, record.to_json())
            return _json(request, 200, self.manager.list())
        except ApiError as exc:
            return _error(request, exc.status, exc.message)

    @app.route("/instances/")
    def instance_missing(self, request: Any) -> Any:
        """``/instances/`` without an id."""
        early = self._guard(request, True)
        if early is not None:
            return early
        return _error(request, 400, "Instance ID is required")

    @app.route("/instances/<path:instance_id>")
    def instance(self, request: Any, instance_id: str) -> Any:
        """GET/PATCH/PUT/DELETE one instance."""
        early = self._guard(request, True)
        if early is not None:
            return early
        record = self.manager.get(instance_id)
        if record is None:
            return _error(request, 404, "Instance not found")
        refused = _refuse_method(request, "/instances/{id}")
        if refused is not None:
            return refused
        method = request.method
        try:
            if method in (b"GET", b"HEAD"):
                return _json(request, 200, record.to_json())
            if method == b"PATCH":
                body = _fold(decode_body(_read(request)))
                meta = body.get("meta")
                duplicate_tags: list[str] = []
                if isinstance(meta, _Object):
                    folded_meta = _fold(meta)
                    peer = folded_meta.get("peer")
                    if isinstance(peer, _Object):
                        folded_meta["peer"] = _fold(peer)
                    tags = folded_meta.get("tags")
                    if isinstance(tags, _Object):
                        duplicate_tags = list(tags.duplicates)
                    body["meta"] = folded_meta
                patch = validate_patch(body, duplicate_tags)
                d = self.manager.patch(record, patch)
            elif method == b"PUT":
                if record.id == PSEUDO_ID:
                    raise ApiError(403, "Forbidden: API Key")
                body = _fold(decode_body(_read(request)))
                d = self.manager.replace_url(record, body.get("url"))
            else:  # DELETE
                if record.id == PSEUDO_ID:
                    raise ApiError(403, "Forbidden: API Key")
                d = self.manager.delete(record)
                d.addCallback(lambda _: _empty(request, 204))
                d.addErrback(lambda f: self._fail(request, f))
                return d
        except ApiError as exc:
            return _error(request, exc.status, exc.message)

        def done(_: object) -> bytes:
            record.refresh()
            return _json(request, 200, record.to_json())

        d.addCallback(done)
        d.addErrback(lambda f: self._fail(request, f))
        return d

    # ------------------------------------------------------------------ /events
    @app.route("/events")
    def events_stream(self, request: Any) -> Any:
        """The SSE stream (see :mod:`nodepass.master.events`)."""
        early = self._admit(request, True, "/events")
        if early is not None:
            return early
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"Connection", b"keep-alive")
        request.setHeader(b"X-Accel-Buffering", b"no")
        if request.method == b"HEAD":
            return b""  # the headers of the stream, without subscribing
        subscriber = self.events.subscribe(request, self.manager.list())
        return subscriber.done

    # ------------------------------------------------------------------ /info
    def info(self) -> dict[str, Any]:
        """The ``/info`` object (keys sorted)."""
        try:
            data: dict[str, Any] = dict(self.sysinfo.snapshot())
        except Exception as exc:
            self.logger.warn("System information unavailable: %s", exc)
            data = {}
        defaults: dict[str, Any] = {
            "os": "", "arch": "", "cpu": -1, "mem_total": 0, "mem_used": 0, "swap_total": 0,
            "swap_used": 0, "netrx": 0, "nettx": 0, "diskr": 0, "diskw": 0, "sysup": 0,
        }
        for key, value in defaults.items():
            data.setdefault(key, value)
        data.update(
            mid=self.manager.master_id,
            alias=self.manager.pseudo.alias,
            ver=f"v{__version__}",  # release tag form, as NodePass reports it
            name=self.master.host,
            uptime=max(int(self.clock() - self.started), 0),
            log=self.master.log,
            tls=str(self.tls_code),
            crt=self.master.crt,
            key=self.master.key_file,
        )
        return {key: data[key] for key in sorted(data)}

    @app.route("/info")
    def info_route(self, request: Any) -> Any:
        """GET: master information; POST ``{"alias"}``: set the master alias."""
        early = self._admit(request, True, "/info")
        if early is not None:
            return early
        try:
            if request.method == b"POST":
                body = _fold(decode_body(_read(request)))
                alias = body.get("alias")
                if alias is None:
                    alias = ""
                if not isinstance(alias, str):
                    raise ApiError(400, "Invalid request body: alias must be a string")
                if len(alias) > TEXT_LIMIT:
                    raise ApiError(400, f"Master alias exceeds maximum length {TEXT_LIMIT}")
                self.manager.set_master_alias(alias)
            return _json(request, 200, self.info())
        except ApiError as exc:
            return _error(request, exc.status, exc.message)

    # ------------------------------------------------------------------ /tcping
    @app.route("/tcping")
    def tcping_route(self, request: Any) -> Any:
        """Probe ``target`` once: ``{"target","connected","latency","error"}``."""
        early = self._admit(request, True, "/tcping")
        if early is not None:
            return early
        args = request.args.get(b"target") or [b""]  # type: ignore[attr-defined]
        target = args[0].decode("utf-8", "replace")
        if not target:
            return _error(request, 400, "Target address required")
        try:
            d: Deferred[Any] = self.tcping.probe(target)
        except TcpingBusy as exc:
            return _error(request, 429, str(exc))
        except ValueError as exc:
            return _error(request, 400, f"Invalid target: {exc}")
        d.addCallback(lambda result: _json(request, 200, result))
        d.addErrback(lambda f: self._fail(request, f))
        return d

    # ------------------------------------------------------------------ public
    @app.route("/openapi.json")
    def openapi(self, request: Any) -> Any:
        """The OpenAPI 3.1 document (no key needed)."""
        early = self._admit(request, False, "/openapi.json")
        if early is not None:
            return early
        body = json.dumps(openapi_document(self.master.base), indent="\t").encode("utf-8")
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
        return body

    @app.route("/docs", branch=True)
    def docs(self, request: Any) -> Any:
        """Swagger UI (no key needed), served from packaged assets."""
        early = self._admit(request, False, "/docs")
        if early is not None:
            return early
        if self._docs is None:
            self._docs = docs_resource(self.master.base, not_found=_JsonNotFound())
        return self._docs
