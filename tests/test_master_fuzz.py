"""Schemathesis against a real master on a real port: the server must agree with its document.

The master runs in this process (tunnels faked, so generated URLs open no
sockets); schemathesis runs in a worker thread with its own HTTP client and
drives every operation of ``/openapi.json`` except ``/events`` (an endless
stream) through all its phases: the document's examples, the coverage
scenarios (boundaries, wrong types, unsupported methods, missing or wrong
headers), property-based fuzzing with positive and negative data, and
stateful sequences that follow the document's links (create, then get,
patch, replace and delete the created instance).  Any 5xx, any response the
document does not describe, and any accepted request the document calls
invalid fails the test with schemathesis' report.

The API key is sent by an auth provider that reads the current key; a hook
follows rotation (``PATCH /instances/********`` with ``action: restart``
answers with the new key in ``url``), as a dashboard does.

Bounded for the suite: ``NODEPASS_FUZZ_EXAMPLES`` examples per operation and phase
(default 8), a fixed seed (``NODEPASS_FUZZ_SEED``, default 1) so a run is
reproducible; raise both for a deeper local run.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from nodepass.env import Settings
from nodepass.master.instances import PSEUDO_ID
from tests.test_master_support import reset_fake_tunnels, start_master

try:
    import schemathesis
    from schemathesis.config import SchemathesisConfig
    from schemathesis.engine import events, from_schema
except ImportError:  # pragma: no cover - the test extra is not installed
    schemathesis = None

EXAMPLES = int(os.environ.get("NODEPASS_FUZZ_EXAMPLES", "8"))
SEED = int(os.environ.get("NODEPASS_FUZZ_SEED", "1"))


class KeyHolder:
    """The API key as a client knows it; updated when the key is rotated."""

    def __init__(self, key: str) -> None:
        self.lock = threading.Lock()
        self.key = key
        self.rotations = 0

    def follow(self, case: Any, response: Any) -> None:
        """After a call: an answer showing the key instance (``PATCH`` with ``action: restart``
        returns it with the new key) tells the current key."""
        if response.status_code != 200 or case.operation.path != "/instances/{id}":
            return
        try:
            answer = response.json()
        except ValueError:
            return
        if isinstance(answer, dict) and answer.get("id") == PSEUDO_ID:
            with self.lock:
                if answer["url"] != self.key:
                    self.key = answer["url"]
                    self.rotations += 1


def run_schemathesis(schema_url: str, base_url: str, holder: KeyHolder) -> tuple[list[str], dict[str, Any]]:
    """Run every phase; return (problems, statistics). Runs in a worker thread."""
    config = SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "color": False,
            "base-url": base_url,
            "workers": 1,
            "request-timeout": 30,
            # no idle keep-alive connection may outlive the run (the reactor must end clean)
            "headers": {"Connection": "close"},
            "generation": {"max-examples": EXAMPLES, "mode": "all", "database": "none"},
            "phases": {"stateful": {"max-steps": 20}},
            # Every check but positive_data_acceptance: the URL grammar (hosts, ports,
            # parameter values) and the system's service names cannot be written as
            # JSON Schema, so the document states them in words and a schema-valid
            # URL may still be a 400.
            "checks": {"enabled": True, "positive_data_acceptance": {"enabled": False}},
            "suppress-health-check": ["all"],
            "warnings": False,
        }
    )
    schema = schemathesis.openapi.from_url(schema_url, config=config)
    schema = schema.exclude(path="/events")

    class ApiKey:
        def get(self, case: Any, ctx: Any) -> str:
            with holder.lock:
                return holder.key

        def set(self, case: Any, data: str, ctx: Any) -> None:
            case.headers = {**(case.headers or {}), "X-API-Key": data}

    schema.auth(refresh_interval=None)(ApiKey)

    @schema.hook
    def after_call(context: Any, case: Any, response: Any) -> None:
        holder.follow(case, response)

    problems: list[str] = []
    stats: dict[str, Any] = {"scenarios": 0, "phases": {}, "checks": {}}
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            stats["scenarios"] += 1
            phase = str(event.phase)
            stats["phases"][phase] = stats["phases"].get(phase, 0) + 1
            for checks in event.recorder.checks.values():
                for check in checks:
                    stats["checks"][check.name] = stats["checks"].get(check.name, 0) + 1
                    if check.failure_info is not None:
                        failure = check.failure_info.failure
                        problems.append(
                            f"[{phase}] {failure.operation}: {failure.title}\n{failure.message}\n"
                            f"{check.failure_info.code_sample}"
                        )
        elif isinstance(event, events.NonFatalError):
            problems.append(f"error in {event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            problems.append(f"fatal: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            stats["stop_reason"] = str(event.stop_reason)
            stats["running_time"] = event.running_time
            for failure in event.failures:
                problems.append(f"{failure.operation}: {failure.title}\n{failure.message}")
    return problems, stats


class SchemathesisTests(TestCase):
    """The schemathesis run of issue 10: clean means the server and the document agree."""

    timeout = 600

    def setUp(self) -> None:
        if schemathesis is None:
            raise SkipTest("schemathesis is not installed (pip install '.[test]')")
        reset_fake_tunnels()
        # tcping probes of generated host names (name lookups included) end within a second
        settings = Settings(report_interval=1.0, reload_interval=3600.0, shutdown_timeout=2.0)
        self.m = start_master(self, settings=settings)

    @inlineCallbacks
    def test_every_operation_conforms(self) -> Any:
        holder = KeyHolder(self.m.key)
        problems, stats = yield deferToThread(
            run_schemathesis, self.m.base + "/openapi.json", self.m.base, holder
        )
        self.assertEqual(problems, [], "\n\n".join(problems))
        self.assertEqual(stats.get("stop_reason"), "completed", stats)
        self.assertGreater(stats["scenarios"], 0, stats)
        # every phase ran; the key followed through the rotations is the master's current key
        self.assertEqual(set(stats["phases"]), {"examples", "coverage", "fuzzing", "stateful"}, stats)
        self.assertGreater(holder.rotations, 0, stats)
        self.assertEqual(holder.key, self.m.key)
