"""The master under load: many concurrent API calls, large states, kill -9 during saves.

A real master process (``python -m nodepass master://...``) with ``NP_STATE_DIR``
for the lifecycle and crash tests; an in-process master for the save-time
measurement (printed, see docs/reliability.md; no timing is asserted).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import statistics
import time
from typing import Any

from twisted.internet.defer import DeferredList, DeferredSemaphore, inlineCallbacks
from twisted.trial.unittest import TestCase

from nodepass.master.instances import InstanceRecord
from nodepass.master.store import STATE_FILE, STATE_FORMAT, STATE_VERSION
from tests.support import free_ports, new_dir, wait_for
from tests.test_master_support import start_master
from tests.test_process import MasterClient, spawn, state_instances, terminated_cleanly

IN_FLIGHT = 40
"""API calls in flight at once."""


def write_state(state_dir: str, count: int) -> list[str]:
    """A state file with *count* stopped server instances (ports never bound); their ids."""
    records = []
    for i in range(count):
        record = InstanceRecord(secrets.token_hex(4))
        record.type = "server"
        record.url = f"server://127.0.0.1:{20000 + i}/127.0.0.1:{40000 + i}?mode=2&log=warn"
        record.alias = f"bulk-{i}"
        record.tags = {"n": str(i), "group": str(i % 7)}
        records.append(record)
    document = {"format": STATE_FORMAT, "version": STATE_VERSION, "instances": [r.to_state() for r in records]}
    with open(os.path.join(state_dir, STATE_FILE), "w", encoding="utf-8") as handle:
        json.dump(document, handle)
    return [r.id for r in records]


class ConcurrentApiTests(TestCase):
    """200 instances driven through their whole life by concurrent API calls."""

    timeout = 300

    @inlineCallbacks
    def test_200_instances_concurrent_lifecycle(self) -> Any:
        """Create, stop, start, flag, rename and delete 200 instances with up to 40 calls in
        flight: every call is answered with success, the list matches, and a restarted master
        loads the same state."""
        state_dir = new_dir(self)
        args = ["-m", "nodepass", "master://127.0.0.1:0/api?log=info"]
        master = spawn(self, args, state_dir)
        api = yield MasterClient(self, master).connect()
        gate = DeferredSemaphore(IN_FLIGHT)
        codes: list[tuple[str, int]] = []

        def call(method: str, path: str, body: Any = None) -> Any:
            def answered(result: Any) -> Any:
                codes.append((f"{method} {path}", result[0]))
                return result

            return gate.run(api.call, method, path, body).addCallback(answered)

        ports = free_ports(200)
        created = yield DeferredList(
            [call("POST", "/instances", {"url": f"server://127.0.0.1:{p}/127.0.0.1:9?mode=2&log=warn"}) for p in ports],
            fireOnOneErrback=True,
        )
        ids = [body["id"] for _, (code, body) in created]
        self.assertEqual([code for _, (code, _) in created], [201] * 200)
        start = time.monotonic()
        # one mixed burst: stop 0-99, clear the restart flag (set at creation) of 50-124, delete
        # 150-199, rename all that stay, list meanwhile
        burst = [call("PATCH", f"/instances/{i}", {"action": "stop"}) for i in ids[:100]]
        burst += [call("PATCH", f"/instances/{i}", {"restart": False}) for i in ids[50:125]]
        burst += [call("DELETE", f"/instances/{i}") for i in ids[150:]]
        burst += [call("PATCH", f"/instances/{i}", {"alias": f"a-{n}"}) for n, i in enumerate(ids[:150])]
        burst += [call("GET", "/instances") for _ in range(10)]
        yield DeferredList(burst, fireOnOneErrback=True)
        # then start 0-49 again and restart 100-119 while running
        burst = [call("PATCH", f"/instances/{i}", {"action": "start"}) for i in ids[:50]]
        burst += [call("PATCH", f"/instances/{i}", {"action": "restart"}) for i in ids[100:120]]
        yield DeferredList(burst, fireOnOneErrback=True)
        print(f"\n  measured: {len(codes) - 200} concurrent lifecycle calls in {time.monotonic() - start:.1f} s")
        refused = [(what, code) for what, code in codes if code >= 300]
        self.assertEqual(refused, [])

        expected = {}
        for n, i in enumerate(ids[:150]):
            status = "stopped" if 50 <= n < 100 else "running"
            expected[i] = (f"a-{n}", status, not 50 <= n < 125)
        listed = yield api.instances()
        self.assertEqual({i: (v["alias"], v["status"], v["restart"]) for i, v in listed.items()}, expected)
        yield wait_for(lambda: set(state_instances(state_dir)) == set(expected), timeout=30, what="state saved")

        yield terminated_cleanly(self, master)
        master2 = spawn(self, args, state_dir)
        api2 = yield MasterClient(self, master2).connect()
        self.assertEqual(api2.key, api.key)
        listed = yield api2.instances()
        # after a restart only the instances flagged restart run again
        restarted = {i: (a, "running" if flag else "stopped", flag) for i, (a, _, flag) in expected.items()}
        self.assertEqual({i: (v["alias"], v["status"], v["restart"]) for i, v in listed.items()}, restarted)
        yield terminated_cleanly(self, master2)


class LargeStateTests(TestCase):
    """1,000 instances in the state."""

    timeout = 300

    @inlineCallbacks
    def test_save_time_1000_instances(self) -> Any:
        """Measure a full save (snapshot, JSON, write, fsync, rename) with 1,000 instances."""
        state_dir = new_dir(self)
        ids = write_state(state_dir, 1000)
        m = start_master(self, state_dir)
        self.assertEqual(len([r for r in m.service.manager.records if r != "********"]), 1000)
        times = []
        for _ in range(20):
            start = time.perf_counter()
            self.assertTrue(m.service.store.save_now())
            times.append(time.perf_counter() - start)
        size = os.path.getsize(os.path.join(state_dir, STATE_FILE))
        print(f"\n  measured: state save with 1000 instances ({size / 1024:.0f} KiB): median "
              f"{statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms (20 saves)")
        self.assertEqual(set(state_instances(state_dir)), set(ids))
        yield m.stop()

    @inlineCallbacks
    def test_sigkill_during_saves_1000_instances(self) -> Any:
        """kill -9 in the middle of a burst of changes to a 1,000-instance state: the file on disk
        loads whole, and a new master serves all 1,000 instances."""
        state_dir = new_dir(self)
        ids = write_state(state_dir, 1000)
        args = ["-m", "nodepass", "master://127.0.0.1:0/api?log=info"]
        master = spawn(self, args, state_dir)
        api = yield MasterClient(self, master).connect()
        gate = DeferredSemaphore(IN_FLIGHT)
        pending = [
            gate.run(api.call, "PATCH", f"/instances/{i}", {"alias": f"renamed-{n}", "meta": {"tags": {"k": str(n)}}})
            for n, i in enumerate(ids)
        ]
        answered: list[int] = []
        for d in pending:
            d.addCallback(lambda r: answered.append(r[0]) or r)
            d.addErrback(lambda _: None)  # calls in flight fail when the process dies
        yield wait_for(lambda: len(answered) >= 200, timeout=120, what="200 changes answered")
        master.signal("KILL")
        status = yield master.wait_exit()
        self.assertEqual(status, (None, signal.SIGKILL))
        yield DeferredList(pending)
        saved = state_instances(state_dir)  # parses: never half-written
        self.assertEqual(set(saved), set(ids))
        renamed = sum(1 for v in saved.values() if v["alias"].startswith("renamed-"))
        print(f"\n  measured: {answered.count(200)} renames answered before kill -9, {renamed} of them on disk")

        master2 = spawn(self, args, state_dir)
        api2 = yield MasterClient(self, master2).connect()
        listed = yield api2.instances()
        self.assertEqual(set(listed), set(ids))
        self.assertEqual({i: v["alias"] for i, v in listed.items()}, {i: v["alias"] for i, v in saved.items()})
        self.assertEqual([n for n in os.listdir(state_dir) if n.endswith(".tmp")], [])
        yield terminated_cleanly(self, master2)
