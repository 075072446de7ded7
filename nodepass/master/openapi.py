"""The OpenAPI 3.1 description of the master API, served at ``<base>/openapi.json``.

:func:`openapi_document` builds the document for one route base (such as
``/api/v1``): every route, every method, every request and response body,
and the error statuses each route can answer.  All routes except
``/openapi.json`` and ``/docs`` need the ``X-API-Key`` header.
"""

from __future__ import annotations

import copy
from typing import Any

from nodepass.master.instances import TEXT_LIMIT as _TEXT_LIMIT
from nodepass.master.instances import URL_LIMIT as _URL_LIMIT

__all__ = ["OPENAPI_VERSION", "API_VERSION", "ID_PATTERN", "URL_PATTERN", "TARGET_PATTERN", "openapi_document"]

OPENAPI_VERSION = "3.1.1"
API_VERSION = "v1"

JSON = "application/json"
Schema = dict[str, Any]



def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _error(name: str) -> Schema:
    return {"$ref": f"#/components/responses/{name}"}


def _counter(description: str) -> Schema:
    return {"type": "integer", "format": "int64", "minimum": 0, "description": description}


def _nullable(schema: Schema) -> Schema:
    """*schema* that also accepts ``null`` (which the server reads as "field left out")."""
    out = dict(schema)
    out["type"] = [schema["type"], "null"]
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


ID_PATTERN = "^([0-9a-f]{8}|\\*{8})$"
"""Instance ids: 8 lowercase hex characters, or ``********`` for the API key."""

URL_PATTERN = "^([Ss][Ee][Rr][Vv][Ee][Rr]|[Cc][Ll][Ii][Ee][Nn][Tt])://[^\\x00-\\x1f\\x7f]*$"
"""Instance URLs: ``server://`` or ``client://`` (any case) first, no ASCII control character."""

TARGET_PATTERN = "^(\\[[^\\[\\]]*\\]|[^:\\[\\]]*):([0-9]+|[A-Za-z0-9][A-Za-z0-9._+*/-]*)$"
"""``/tcping`` targets: ``host:port`` or ``[IPv6]:port`` (Go's host:port rules), the port a
number or a service name."""

_UUID4_OR_EMPTY = (
    "^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-4[0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12})?$"
)

_URL: Schema = {
    "type": "string",
    "minLength": 1,
    "maxLength": _URL_LIMIT,
    "pattern": URL_PATTERN,
    "description": (
        "Instance URL, `server://...` or `client://...` (scheme in any case; no control "
        "characters; checked in full by the URL grammar, a URL that does not parse is a 400)."
    ),
    "examples": ["server://:10101/127.0.0.1:8080", "client://server.example:10101/127.0.0.1:8080"],
}

_NULL_NOTE = " `null` is the same as leaving the field out."


_PEER: Schema = {
    "type": "object",
    "description": "The peer this instance belongs to, as recorded by a dashboard.",
    "required": ["sid", "type", "alias"],
    "properties": {
        "sid": {"type": "string", "description": "Service id (UUID v4), or empty."},
        "type": {"type": "string", "description": 'Service type (dashboards use "0" to "7"), or empty.'},
        "alias": {"type": "string", "description": "Service alias."},
    },
}

_TAGS: Schema = {
    "type": "object",
    "description": "Free-form string tags.",
    "propertyNames": {"maxLength": _TEXT_LIMIT},
    "additionalProperties": {"type": "string", "maxLength": _TEXT_LIMIT},
}

_META: Schema = {
    "type": "object",
    "description": "Dashboard metadata of an instance.",
    "required": ["peer", "tags"],
    "properties": {"peer": _ref("Peer"), "tags": _ref("Tags")},
}

_INSTANCE: Schema = {
    "type": "object",
    "description": (
        "A tunnel instance run by the master. The instance with id `********` stands for "
        "the API key: its `url` is the key, its `config` the master id and its `alias` the "
        "master alias."
    ),
    "required": [
        "id", "alias", "type", "status", "url", "config", "restart", "meta",
        "mode", "ping", "pool", "tcps", "udps", "tcprx", "tcptx", "udprx", "udptx",
    ],
    "properties": {
        "id": {
            "type": "string",
            "pattern": ID_PATTERN,
            "description": "8 lowercase hex characters, or `********` for the API key.",
        },
        "alias": {"type": "string", "description": "Instance alias; empty when unset."},
        "type": {
            "type": "string",
            "enum": ["server", "client", ""],
            "description": "Instance type (empty for the API key).",
        },
        "status": {
            "type": "string",
            "enum": ["running", "stopped", "error", ""],
            "description": "Run state (empty for the API key).",
        },
        "url": {
            "type": "string",
            "description": "Instance URL with the master's settings inherited (the API key for `********`).",
        },
        "config": {
            "type": "string",
            "description": "Instance URL with every default filled in (the master id for `********`).",
        },
        "restart": {"type": "boolean", "description": "Start this instance when the master starts."},
        "meta": _ref("Meta"),
        "mode": {"type": "integer", "description": "Run mode the tunnel resolved to."},
        "ping": {"type": "integer", "description": "Last measured latency in milliseconds."},
        "pool": {"type": "integer", "description": "Ready connections in the pool."},
        "tcps": {"type": "integer", "description": "Active TCP connections."},
        "udps": {"type": "integer", "description": "Active UDP sessions."},
        "tcprx": _counter("TCP bytes received (kept across restarts, zeroed by `reset`)."),
        "tcptx": _counter("TCP bytes sent (kept across restarts, zeroed by `reset`)."),
        "udprx": _counter("UDP bytes received (kept across restarts, zeroed by `reset`)."),
        "udptx": _counter("UDP bytes sent (kept across restarts, zeroed by `reset`)."),
    },
}

_INSTANCE_CREATE: Schema = {
    "type": "object",
    "description": (
        "A new instance. It is started at once and restarted with the master. Field names "
        "match in any case; other fields are ignored."
    ),
    "required": ["url"],
    "properties": {
        "url": _URL,
        "alias": _nullable(
            {
                "type": "string",
                "maxLength": _TEXT_LIMIT,
                "description": f"Instance alias (at most {_TEXT_LIMIT} characters)." + _NULL_NOTE,
            }
        ),
    },
}

_PEER_PATCH: Schema = {
    "type": ["object", "null"],
    "description": (
        "New peer fields; a field left out (or `null`) keeps its value, so an empty object "
        "keeps the peer. `null` keeps the whole peer."
    ),
    "properties": {
        "sid": _nullable(
            {
                "type": "string",
                "pattern": _UUID4_OR_EMPTY,
                "description": "Service id: a UUID v4 (either case; stored as sent) or `\"\"`.",
            }
        ),
        "type": _nullable(
            {
                "type": "string",
                "maxLength": _TEXT_LIMIT,
                "description": 'Service type, free text; dashboards use "0" to "7".',
            }
        ),
        "alias": _nullable({"type": "string", "maxLength": _TEXT_LIMIT, "description": "Service alias."}),
    },
}

_INSTANCE_PATCH: Schema = {
    "type": "object",
    "description": (
        "Changes to an instance; any combination of the fields. The whole body is "
        "checked before any change is applied. A field that is `null` is treated as left "
        "out (at every level: `alias`, `action`, `restart`, `meta`, `meta.peer`, its "
        "fields, and `meta.tags`). Field names of the body, of `meta` and of `meta.peer` "
        "match in any case; other fields are ignored. On `********`, `action: restart` "
        "replaces the API key and every other field is ignored."
    ),
    "properties": {
        "alias": _nullable(
            {
                "type": "string",
                "maxLength": _TEXT_LIMIT,
                "description": (
                    f"New alias (at most {_TEXT_LIMIT} characters); an empty string leaves the "
                    "alias unchanged."
                ),
            }
        ),
        "action": _nullable(
            {
                "type": "string",
                "enum": ["start", "stop", "restart", "reset", ""],
                "description": (
                    "`start`, `stop`, `restart` the instance, or `reset` its traffic counters; "
                    "`\"\"` does nothing."
                ),
            }
        ),
        "restart": _nullable({"type": "boolean", "description": "Start this instance when the master starts."}),
        "meta": _nullable(
            {
                "type": "object",
                "description": "Dashboard metadata; a part left out is kept.",
                "properties": {
                    "peer": _ref("PeerPatch"),
                    "tags": {
                        "anyOf": [_ref("Tags"), {"type": "null"}],
                        "description": "Replaces every tag; an empty object removes them all, `null` keeps them.",
                    },
                },
            }
        ),
    },
}

_INSTANCE_PUT: Schema = {
    "type": "object",
    "description": "A new URL for the instance; it restarts with it. Other fields are ignored.",
    "required": ["url"],
    "properties": {"url": _URL},
}

_INFO: Schema = {
    "type": "object",
    "description": "The master and the host it runs on.",
    "required": [
        "mid", "alias", "os", "arch", "cpu", "mem_total", "mem_used", "swap_total",
        "swap_used", "netrx", "nettx", "diskr", "diskw", "sysup", "ver", "name",
        "uptime", "log", "tls", "crt", "key",
    ],
    "properties": {
        "mid": {"type": "string", "description": "Master id, 16 lowercase hex characters."},
        "alias": {"type": "string", "description": "Master alias."},
        "os": {"type": "string", "description": "Operating system (`linux`, `darwin`, `windows`, ...)."},
        "arch": {"type": "string", "description": "CPU architecture (`amd64`, `arm64`, ...)."},
        "cpu": {
            "type": "integer",
            "minimum": -1,
            "maximum": 100,
            "description": "Whole-system CPU use in percent; -1 when unknown.",
        },
        "mem_total": _counter("Total memory in bytes."),
        "mem_used": _counter("Memory in use (total minus available) in bytes."),
        "swap_total": _counter("Total swap in bytes."),
        "swap_used": _counter("Swap in use in bytes."),
        "netrx": _counter("Bytes received by the host's network interfaces since boot."),
        "nettx": _counter("Bytes sent by the host's network interfaces since boot."),
        "diskr": _counter("Bytes read from the host's disks since boot."),
        "diskw": _counter("Bytes written to the host's disks since boot."),
        "sysup": _counter("Host uptime in seconds."),
        "ver": {"type": "string", "description": "NodePass version, e.g. `v1.14.0`."},
        "name": {"type": "string", "description": "Host part of the master URL."},
        "uptime": _counter("Seconds since the API started."),
        "log": {"type": "string", "description": "`log` value of the master URL (empty if not given)."},
        "tls": {
            "type": "string",
            "enum": ["0", "1", "2"],
            "description": "API TLS mode in effect: 0 plain HTTP, 1 self-signed, 2 certificate files.",
        },
        "crt": {"type": "string", "description": "`crt` value of the master URL."},
        "key": {"type": "string", "description": "`key` value of the master URL."},
    },
}

_INFO_PATCH: Schema = {
    "type": "object",
    "description": "New master alias; a missing, `null` or empty alias clears it.",
    "properties": {
        "alias": _nullable(
            {
                "type": "string",
                "maxLength": _TEXT_LIMIT,
                "description": f"Master alias (at most {_TEXT_LIMIT} characters).",
            }
        )
    },
}

_TCPING: Schema = {
    "type": "object",
    "description": "Result of one TCP connection attempt.",
    "required": ["target", "connected", "latency", "error"],
    "properties": {
        "target": {"type": "string", "description": "The target as given."},
        "connected": {"type": "boolean", "description": "Whether the connection was established."},
        "latency": {
            "type": "integer",
            "format": "int64",
            "minimum": 0,
            "description": "Milliseconds to connect (name lookup included); 0 on failure.",
        },
        "error": {
            "type": ["string", "null"],
            "description": "Why the attempt failed, e.g. `dial tcp 127.0.0.1:1: connect: connection refused`; null on success.",
        },
    },
}

_ERROR: Schema = {
    "type": "object",
    "description": "Error reply.",
    "required": ["error"],
    "properties": {"error": {"type": "string", "description": "What went wrong."}},
}

_EVENT: Schema = {
    "type": "object",
    "description": (
        "One server-sent event of `GET /events`, sent as `event: instance` with this "
        "object as a one-line JSON `data:` field."
    ),
    "required": ["type", "time", "instance", "logs"],
    "properties": {
        "type": {
            "type": "string",
            "enum": ["initial", "create", "update", "delete", "log", "shutdown"],
            "description": (
                "`initial`: one per instance on connect; `create`/`update`/`delete`: instance "
                "changes (and `update` at every statistics report); `log`: a log line of the "
                "instance; `shutdown`: the master is stopping or the API key was replaced."
            ),
        },
        "time": {"type": "string", "format": "date-time", "description": "When the event was raised (RFC 3339)."},
        "instance": {
            "anyOf": [_ref("Instance"), {"type": "null"}],
            "description": "The instance concerned; null for `shutdown`.",
        },
        "logs": {"type": "string", "description": "The log line for `log` events; empty otherwise."},
    },
}

_RESPONSES: Schema = {
    "BadRequest": _json_body(_ref("Error"), "Invalid request (bad JSON, field or parameter)."),
    "Unauthorized": _json_body(_ref("Error"), "Missing or wrong X-API-Key header."),
    "Forbidden": _json_body(_ref("Error"), "Not allowed on the API key instance `********`."),
    "NotFound": _json_body(_ref("Error"), "No instance with this id."),
    "MethodNotAllowed": {
        **_json_body(_ref("Error"), "Method not allowed on this route."),
        "headers": {
            "Allow": {
                "description": "The methods the route serves, e.g. `GET, HEAD, POST, OPTIONS`.",
                "required": True,
                "schema": {"type": "string"},
            }
        },
    },
    "TooManyRequests": _json_body(_ref("Error"), "Too many probes are running; retry later."),
}

_ID_PARAMETER: Schema = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "Instance id (8 hex characters, or `********` for the API key).",
    "schema": {"type": "string", "pattern": ID_PATTERN},
    "examples": {
        "instance": {"summary": "A tunnel instance", "value": "1a2b3c4d"},
        "apiKey": {"summary": "The API key instance", "value": "********"},
    },
}

_BODY_EXAMPLES: dict[str, dict[str, Schema]] = {
    "InstanceCreate": {
        "server": {
            "summary": "A server, its tunnel on port 10101",
            "value": {"url": "server://:10101/127.0.0.1:8080?tls=1", "alias": "web"},
        },
        "client": {
            "summary": "A client, its users on local port 8080",
            "value": {"url": "client://server.example:10101/127.0.0.1:8080"},
        },
    },
    "InstancePatch": {
        "rename": {"summary": "Rename", "value": {"alias": "web"}},
        "restart": {
            "summary": "Restart (on `********`: replace the API key)",
            "value": {"action": "restart"},
        },
        "meta": {
            "summary": "Dashboard metadata",
            "value": {
                "restart": False,
                "meta": {
                    "peer": {"sid": "550e8400-e29b-41d4-a716-446655440000", "type": "1", "alias": "edge"},
                    "tags": {"env": "prod"},
                },
            },
        },
    },
    "InstancePut": {"url": {"summary": "A new URL", "value": {"url": "server://:10102/127.0.0.1:8080"}}},
    "InfoPatch": {"alias": {"summary": "Name the master", "value": {"alias": "edge-1"}}},
}


def _operation(
    operation_id: str,
    summary: str,
    responses: dict[str, Any],
    *,
    tag: str,
    description: str | None = None,
    body: tuple[str, str] | None = None,
    parameters: list[Schema] | None = None,
    public: bool = False,
) -> Schema:
    operation: Schema = {"tags": [tag], "operationId": operation_id, "summary": summary}
    if description:
        operation["description"] = description
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        schema_name, body_description = body
        operation["requestBody"] = {
            "required": True,
            "description": body_description,
            "content": {JSON: {"schema": _ref(schema_name), "examples": _BODY_EXAMPLES[schema_name]}},
        }
    all_responses = dict(responses)
    if public:
        operation["security"] = []
    else:
        all_responses.setdefault("401", _error("Unauthorized"))
        all_responses.setdefault("405", _error("MethodNotAllowed"))
    operation["responses"] = dict(sorted(all_responses.items()))
    return operation


_INSTANCE_OPERATIONS = {
    "GetInstance": "getInstance",
    "UpdateInstance": "updateInstance",
    "ReplaceInstanceUrl": "replaceInstanceUrl",
    "DeleteInstance": "deleteInstance",
}


def _links(source: str) -> Schema:
    """OpenAPI links from a response to the operations on the same instance.

    *source* is the runtime expression of the id, e.g. ``$response.body#/id``.
    """
    return {
        name: {
            "operationId": operation_id,
            "parameters": {"id": source},
            "description": f"The same instance ({operation_id}).",
        }
        for name, operation_id in _INSTANCE_OPERATIONS.items()
    }


def _paths() -> dict[str, Any]:
    instance = {**_json_body(_ref("Instance"), "The instance."), "links": _links("$response.body#/id")}
    return {
        "/instances": {
            "get": _operation(
                "listInstances",
                "List every instance",
                {
                    "200": _json_body(
                        {"type": "array", "items": _ref("Instance")},
                        "Every instance, the API key instance `********` included (in no set order).",
                    )
                },
                tag="instances",
            ),
            "post": _operation(
                "createInstance",
                "Create and start an instance",
                {
                    "201": {
                        **_json_body(_ref("Instance"), "The new instance."),
                        "links": _links("$response.body#/id"),
                    },
                    "400": _error("BadRequest"),
                    "409": _json_body(_ref("Error"), "The generated instance id is taken."),
                },
                tag="instances",
                body=("InstanceCreate", "The new instance."),
            ),
        },
        "/instances/{id}": {
            "parameters": [_ID_PARAMETER],
            "get": _operation(
                "getInstance",
                "Get one instance",
                {"200": instance, "400": _error("BadRequest"), "404": _error("NotFound")},
                tag="instances",
            ),
            "patch": _operation(
                "updateInstance",
                "Change alias, run state, restart policy or metadata of an instance",
                {"200": instance, "400": _error("BadRequest"), "404": _error("NotFound")},
                tag="instances",
                description=(
                    "Start/stop/restart are carried out after the reply, which still shows the "
                    "previous status. `action: restart` on `********` replaces the API key: the "
                    "reply holds the new key and every event stream is closed."
                ),
                body=("InstancePatch", "The changes."),
            ),
            "put": _operation(
                "replaceInstanceUrl",
                "Replace the URL of an instance and restart it",
                {
                    "200": instance,
                    "400": _error("BadRequest"),
                    "403": _error("Forbidden"),
                    "404": _error("NotFound"),
                    "409": _json_body(_ref("Error"), "The new URL is the current one."),
                },
                tag="instances",
                body=("InstancePut", "The new URL."),
            ),
            "delete": _operation(
                "deleteInstance",
                "Stop and delete an instance",
                {
                    "204": {
                        "description": "Deleted; empty body.",
                        "links": {
                            "GetDeletedInstance": {
                                "operationId": "getInstance",
                                "parameters": {"id": "$request.path.id"},
                                "description": "The deleted instance is gone (404).",
                            }
                        },
                    },
                    "400": _error("BadRequest"),
                    "403": _error("Forbidden"),
                    "404": _error("NotFound"),
                },
                tag="instances",
            ),
        },
        "/events": {
            "get": _operation(
                "streamEvents",
                "Stream instance events (server-sent events)",
                {
                    "200": {
                        "description": (
                            "An endless `text/event-stream`: first `retry: 3000`, then "
                            "`event: instance` messages whose `data` is an Event object."
                        ),
                        "content": {
                            "text/event-stream": {
                                "schema": {
                                    "type": "string",
                                    "description": "Each `data:` line holds one Event (see components/schemas/Event).",
                                }
                            }
                        },
                    }
                },
                tag="events",
            )
        },
        "/info": {
            "get": _operation(
                "getInfo",
                "Describe the master and its host",
                {"200": _json_body(_ref("Info"), "Master information.")},
                tag="master",
            ),
            "post": _operation(
                "setMasterAlias",
                "Set the master alias",
                {"200": _json_body(_ref("Info"), "Master information."), "400": _error("BadRequest")},
                tag="master",
                body=("InfoPatch", "The new alias."),
            ),
        },
        "/tcping": {
            "get": _operation(
                "tcping",
                "Test whether a TCP address accepts connections",
                {
                    "200": _json_body(_ref("Tcping"), "The probe result, connected or not."),
                    "400": _error("BadRequest"),
                    "429": _error("TooManyRequests"),
                },
                tag="master",
                description="One connection attempt with a 5 s limit; at most 10 probes run at once.",
                parameters=[
                    {
                        "name": "target",
                        "in": "query",
                        "required": True,
                        "description": (
                            "Address to probe, `host:port` or `[IPv6]:port`; the port is a "
                            "number (0-65535) or a TCP service name such as `http`."
                        ),
                        "schema": {"type": "string", "minLength": 1, "pattern": TARGET_PATTERN},
                    }
                ],
            )
        },
        "/openapi.json": {
            "get": _operation(
                "getOpenApi",
                "This OpenAPI document",
                {"200": {"description": "The document.", "content": {JSON: {"schema": {"type": "object"}}}}},
                tag="documentation",
                public=True,
            )
        },
        "/docs": {
            "get": _operation(
                "getDocs",
                "Interactive API documentation (Swagger UI)",
                {"200": {"description": "HTML page.", "content": {"text/html": {"schema": {"type": "string"}}}}},
                tag="documentation",
                public=True,
            )
        },
    }


_DOCUMENT_TEMPLATE: Schema = {
    "openapi": OPENAPI_VERSION,
    "info": {
        "title": "NodePass API",
        "description": (
            "Manage NodePass server and client tunnel instances run by a NodePass master. "
            "Send the API key in the `X-API-Key` header; the master logs the key when it starts. "
            "`HEAD` is answered wherever `GET` is (same status and headers, no body) and `OPTIONS` "
            "everywhere (CORS preflight, 200 before the key check); any other method a route does "
            "not list is a 405 whose `Allow` header names the methods it serves. In request "
            "bodies `null` is the same as leaving a field out."
        ),
        "version": API_VERSION,
    },
    "servers": [{"url": "/api/v1"}],
    "security": [{"ApiKey": []}],
    "tags": [
        {"name": "instances", "description": "Tunnel instances."},
        {"name": "events", "description": "Live instance events."},
        {"name": "master", "description": "The master itself."},
        {"name": "documentation", "description": "API description."},
    ],
    "paths": _paths(),
    "components": {
        "securitySchemes": {
            "ApiKey": {
                "type": "apiKey",
                "in": "header",
                "name": "X-API-Key",
                "description": "The API key (32 hex characters), also the `url` of instance `********`.",
            }
        },
        "schemas": {
            "Instance": _INSTANCE,
            "InstanceCreate": _INSTANCE_CREATE,
            "InstancePatch": _INSTANCE_PATCH,
            "InstancePut": _INSTANCE_PUT,
            "Meta": _META,
            "Peer": _PEER,
            "PeerPatch": _PEER_PATCH,
            "Tags": _TAGS,
            "Info": _INFO,
            "InfoPatch": _INFO_PATCH,
            "Tcping": _TCPING,
            "Error": _ERROR,
            "Event": _EVENT,
        },
        "responses": _RESPONSES,
    },
}


def openapi_document(base: str) -> dict[str, Any]:
    """Return the OpenAPI 3.1 document with ``base`` (e.g. ``/api/v1``) as its server URL.

    Every call returns a fresh copy that the caller may change.
    """
    document = copy.deepcopy(_DOCUMENT_TEMPLATE)
    document["servers"] = [{"url": base or "/"}]
    return document
