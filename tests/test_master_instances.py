"""Instance running rules: recovery sweep, stuck stops, log echo, validation helpers."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from nodepass.env import Settings
from nodepass.master.instances import ApiError, InstanceRecord, validate_patch
from tests.test_master_support import FakeTunnel, MasterFixture, reset_fake_tunnels, start_master, wait_for

URL = "server://127.0.0.1:10501/127.0.0.1:10502"


class _StuckTunnel(FakeTunnel):
    def stopService(self) -> Any:
        super().stopService()
        return Deferred()  # never fires


class RunningRulesTests(TestCase):
    def setUp(self) -> None:
        reset_fake_tunnels()

    @inlineCallbacks
    def test_error_instances_are_restarted_by_the_sweep(self) -> Any:
        m = start_master(self, settings=Settings(reload_interval=0.2, shutdown_timeout=2.0))
        r = yield m.request("POST", "/instances", body={"url": URL})
        iid = r.json()["id"]
        FakeTunnel.instances[-1].fail("lost")
        record = m.service.manager.records[iid]
        self.assertEqual(record.status, "error")
        yield wait_for(lambda: len(FakeTunnel.instances) >= 2 and record.status == "running")
        self.assertTrue(FakeTunnel.instances[0].stopped)
        self.assertIn(f"Restarting instance in error [{iid}]", m.output.getvalue())

    @inlineCallbacks
    def test_stuck_stop_is_bounded(self) -> Any:
        m = start_master(self, settings=Settings(shutdown_timeout=0.2),
                         factory=lambda config, **kw: _StuckTunnel(config, **kw))
        r = yield m.request("POST", "/instances", body={"url": URL})
        iid = r.json()["id"]
        r = yield m.request("PATCH", f"/instances/{iid}", body={"action": "stop"})
        self.assertEqual(r.json()["status"], "stopped")
        self.assertIn("Instance force stopped", m.output.getvalue())
        r = yield m.request("GET", "/info")
        self.assertEqual(r.code, 200)

    @inlineCallbacks
    def test_shutdown_with_stuck_instance_still_saves(self) -> Any:
        m = MasterFixture(
            self.mktemp(),
            settings=Settings(shutdown_timeout=0.3),
            factory=lambda config, **kw: _StuckTunnel(config, **kw),
        )
        m.start()
        r = yield m.request("POST", "/instances", body={"url": URL, "alias": "stuck"})
        iid = r.json()["id"]
        yield m.stop()
        self.assertIn("Instances saved:", m.output.getvalue())
        self.assertIn("Master shutdown complete", m.output.getvalue())
        with open(m.service.store.path) as handle:
            self.assertIn(iid, handle.read())

    @inlineCallbacks
    def test_instance_lines_echoed_with_id(self) -> Any:
        m = start_master(self)
        r = yield m.request("POST", "/instances", body={"url": URL})
        iid = r.json()["id"]
        FakeTunnel.instances[-1].checkpoint()
        out = m.output.getvalue()
        self.assertRegex(out, r"Server started: server://\S+ \[" + iid + r"\]\n")
        # CHECK_POINT lines only feed the statistics
        self.assertNotIn("CHECK_POINT", out)

    @inlineCallbacks
    def test_shutdown_stops_instances_and_keeps_restart_flags(self) -> Any:
        state = self.mktemp()
        m = MasterFixture(state)
        m.start()
        r = yield m.request("POST", "/instances", body={"url": URL})
        iid = r.json()["id"]
        yield m.stop()
        self.assertTrue(FakeTunnel.instances[0].stopped)
        self.assertEqual(m.service.manager.records[iid].status, "stopped")
        self.assertTrue(m.service.manager.records[iid].restart)
        self.assertIn("Master shutdown complete", m.output.getvalue())


class ValidationTests(TestCase):
    def test_patch_accepts_good_meta(self) -> None:
        req = validate_patch({"meta": {"peer": {"sid": "", "type": "", "alias": ""}, "tags": {}}})
        self.assertEqual(req.peer, {"sid": "", "type": "", "alias": ""})
        self.assertEqual(req.tags, {})

    def test_patch_rejects_duplicates(self) -> None:
        with self.assertRaises(ApiError) as caught:
            validate_patch({"meta": {"tags": {"a": "1"}}}, duplicate_tags=["a"])
        self.assertEqual((caught.exception.status, caught.exception.message), (400, "Meta tag key duplicated: a"))

    def test_record_roundtrip(self) -> None:
        record = InstanceRecord("abcd0123")
        record.alias, record.type, record.url, record.config, record.restart = "a", "server", "u", "c", True
        record.tags = {"z": "1", "a": "2"}
        record.totals["tcprx"] = 9
        again = InstanceRecord.from_state(record.to_state())
        self.assertEqual(again.to_json(), record.to_json())
        self.assertEqual(list(again.to_json()["meta"]["tags"]), ["a", "z"])
