"""Shared helpers for the master tests: a fake tunnel, a live master, an SSE reader.

This module holds no test cases of its own.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from typing import Any

import treq
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from nodepass.env import Settings
from nodepass.log import NodePassLogger
from nodepass.master.service import MasterService, make_master_service
from nodepass.stats import TunnelStats
from nodepass.url import TunnelURL, parse_master_url
from tests.support import reactor, wait_for


class FakeTunnel(Service):
    """Stands in for a tunnel service: logs like one and exposes ``stats``."""

    instances: list[FakeTunnel] = []
    fail_start = False

    def __init__(self, config: TunnelURL, *, reactor: Any, logger: NodePassLogger, settings: Settings) -> None:
        self.config = config
        self.logger = logger
        self.stats = TunnelStats()
        self.stopped = False
        FakeTunnel.instances.append(self)

    def startService(self) -> None:
        if FakeTunnel.fail_start:
            raise RuntimeError("cannot start")
        super().startService()
        word = "Server" if self.config.scheme == "server" else "Client"
        self.logger.info("%s started: %s", word, self.config.raw)

    def stopService(self) -> Any:
        self.stopped = True
        return super().stopService()

    def checkpoint(self) -> None:
        """Emit a CHECK_POINT line as a tunnel does after each pong."""
        self.logger.event("%s", self.stats.checkpoint_line())

    def fail(self, reason: str = "boom") -> None:
        word = "Server" if self.config.scheme == "server" else "Client"
        self.logger.error("%s error: %s", word, reason)


def fake_factory(config: TunnelURL, **kwargs: Any) -> FakeTunnel:
    return FakeTunnel(config, **kwargs)


def reset_fake_tunnels() -> None:
    """Forget the FakeTunnel instances of earlier tests and let new ones start."""
    FakeTunnel.instances = []
    FakeTunnel.fail_start = False


class Response:
    def __init__(self, code: int, headers: Any, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


class SSEReader:
    """Reads an event stream the way a dashboard does: split on blank lines, take ``data:``."""

    def __init__(self) -> None:
        self.buffer = b""
        self.raw = b""
        self.events: list[dict[str, Any]] = []
        self.retry: str | None = None
        self.ended = False
        self.response: Any = None

    def feed(self, data: bytes) -> None:
        self.raw += data
        self.buffer += data
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            name = None
            payload = None
            for line in block.decode("utf-8").split("\n"):
                if line.startswith("retry: "):
                    self.retry = line[len("retry: "):]
                elif line.startswith("event: "):
                    name = line[len("event: "):]
                elif line.startswith("data: "):
                    payload = line[len("data: "):]
            if payload is not None:
                assert name == "instance", name
                self.events.append(json.loads(payload))

    def of_type(self, kind: str, instance_id: str | None = None) -> list[dict[str, Any]]:
        return [
            e for e in self.events
            if e["type"] == kind and (instance_id is None or (e["instance"] or {}).get("id") == instance_id)
        ]


def raw_request(port: int, request: bytes, until: bytes = b"\r\n\r\n") -> Deferred[bytes]:
    """Send *request* bytes over a plain TCP connection; return what came back up to *until*."""
    from twisted.internet import endpoints, protocol

    got: list[bytes] = []

    class _Raw(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.write(request)  # type: ignore[union-attr]

        def dataReceived(self, data: bytes) -> None:
            got.append(data)

    @inlineCallbacks
    def run() -> Any:
        ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        proto = yield endpoints.connectProtocol(ep, _Raw())
        yield wait_for(lambda: until in b"".join(got))
        proto.transport.abortConnection()
        return b"".join(got)

    return run()


class MasterFixture:
    """A real master on 127.0.0.1 with an ephemeral port, driven with treq."""

    def __init__(
        self,
        state_dir: str,
        *,
        url: str = "master://127.0.0.1:0/api?log=debug",
        settings: Settings | None = None,
        factory: Callable[..., Any] = fake_factory,
        state: MasterService | None = None,
    ) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.state_dir = state_dir
        self.output = io.StringIO()
        self.logger = NodePassLogger("debug", stream=self.output)
        self.settings = settings or Settings(report_interval=5.0, reload_interval=3600.0, shutdown_timeout=2.0)
        self.config = parse_master_url(url)
        self.service = make_master_service(
            self.config,
            reactor=reactor,
            logger=self.logger,
            settings=self.settings,
            state_dir=state_dir,
            tunnel_factory=factory,
        )
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.readers: list[SSEReader] = []

    def start(self) -> None:
        self.service.startService()
        host, port = self.service.address
        self.root = f"http://127.0.0.1:{port}"
        self.base = f"{self.root}{self.config.base}"

    @property
    def key(self) -> str:
        return self.service.manager.api_key

    @inlineCallbacks
    def stop(self) -> Any:
        if self.service.running:
            yield self.service.stopService()
        yield wait_for(lambda: all(r.ended for r in self.readers))

    @inlineCallbacks
    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        raw: bytes | None = None,
        key: Any = True,
        headers: dict[str, str] | None = None,
        absolute: bool = False,
    ) -> Any:
        """Send a request; *key* True sends the right key, a string sends that, None none."""
        hdrs: dict[str, list[str]] = {}
        if key is True:
            hdrs["X-API-Key"] = [self.key]
        elif isinstance(key, str):
            hdrs["X-API-Key"] = [key]
        for name, value in (headers or {}).items():
            hdrs[name] = [value]
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = ["application/json"]
        url = path if absolute else self.base + path
        response = yield treq.request(method, url, data=data, headers=hdrs, pool=self.pool)
        content = yield treq.content(response)
        return Response(response.code, response.headers, content)

    @inlineCallbacks
    def subscribe(self, key: Any = True) -> Any:
        """Open ``/events``; returns an :class:`SSEReader` filled as bytes arrive."""
        reader = SSEReader()
        hdrs = {"X-API-Key": [self.key if key is True else key]}
        response = yield treq.get(self.base + "/events", headers=hdrs, pool=self.pool, unbuffered=True)
        reader.response = response
        self.readers.append(reader)
        d = treq.collect(response, reader.feed)

        def ended(_: object) -> None:
            reader.ended = True

        d.addBoth(ended)
        return reader


def start_master(test: TestCase, state_dir: str | None = None, **kwargs: Any) -> MasterFixture:
    """A started :class:`MasterFixture` in *state_dir* (a fresh ``test.mktemp()`` by default).

    Keyword arguments go to the fixture; it is stopped at the test's cleanup.
    """
    m = MasterFixture(state_dir if state_dir is not None else test.mktemp(), **kwargs)
    m.start()
    test.addCleanup(m.stop)
    return m
