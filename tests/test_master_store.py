"""Persistence of the master: restarts, the backup, corrupt files."""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from nodepass.env import Settings
from nodepass.log import NodePassLogger
from nodepass.master.store import STATE_FILE, StateStore
from tests.test_master_support import FakeTunnel, MasterFixture, reactor, reset_fake_tunnels, start_master, wait_for

SID = "550e8400-e29b-41d4-a716-446655440000"


class PersistenceTests(TestCase):
    def setUp(self) -> None:
        reset_fake_tunnels()
        self.state_dir = self.mktemp()

    def master(self, **kwargs: Any) -> MasterFixture:
        return start_master(self, self.state_dir, **kwargs)

    @inlineCallbacks
    def populate(self) -> Any:
        m = self.master()
        r = yield m.request("POST", "/instances", body={"url": "server://127.0.0.1:10301/127.0.0.1:10302", "alias": "auto"})
        auto = r.json()["id"]
        r = yield m.request("POST", "/instances", body={"url": "client://127.0.0.1:10301/127.0.0.1:10303", "alias": "manual"})
        manual = r.json()["id"]
        yield m.request("PATCH", f"/instances/{manual}", body={
            "restart": False, "meta": {"peer": {"sid": SID, "type": "2", "alias": "p"}, "tags": {"env": "prod"}}})
        yield m.request("POST", "/info", body={"alias": "boss"})
        tunnel = m.service.manager.records[auto].service
        tunnel.stats.tcprx, tunnel.stats.udptx = 1000, 20  # type: ignore[union-attr]
        key, mid = m.key, m.service.manager.master_id
        yield m.stop()
        return m, auto, manual, key, mid

    @inlineCallbacks
    def test_state_survives_restart(self) -> Any:
        first, auto, manual, key, mid = yield self.populate()
        self.assertIn("Instances saved:", first.output.getvalue())
        path = os.path.join(self.state_dir, STATE_FILE)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual([n for n in os.listdir(self.state_dir) if n.endswith(".tmp")], [])
        FakeTunnel.instances = []
        m = self.master()
        self.assertEqual(m.key, key)
        self.assertIn(f"API Key loaded: {key}", m.output.getvalue())
        r = yield m.request("GET", "/instances")
        items = {i["id"]: i for i in r.json()}
        self.assertEqual(set(items), {"********", auto, manual})
        self.assertEqual(items["********"]["config"], mid)
        self.assertEqual(items["********"]["alias"], "boss")
        a, b = items[auto], items[manual]
        self.assertEqual((a["alias"], a["restart"], a["status"], a["tcprx"], a["udptx"]),
                         ("auto", True, "running", 1000, 20))
        self.assertEqual((b["alias"], b["restart"], b["status"]), ("manual", False, "stopped"))
        self.assertEqual(b["meta"], {"peer": {"sid": SID, "type": "2", "alias": "p"}, "tags": {"env": "prod"}})
        self.assertEqual(len(FakeTunnel.instances), 1)
        r = yield m.request("GET", "/info")
        self.assertEqual((r.json()["mid"], r.json()["alias"]), (mid, "boss"))
        # counters keep growing on top of the saved totals
        FakeTunnel.instances[0].stats.tcprx = 5
        r = yield m.request("GET", f"/instances/{auto}")
        self.assertEqual(r.json()["tcprx"], 1005)

    @inlineCallbacks
    def test_changes_are_saved_without_shutdown(self) -> Any:
        m = self.master()
        r = yield m.request("POST", "/instances", body={"url": "server://127.0.0.1:10311/127.0.0.1:10312"})
        iid = r.json()["id"]
        path = os.path.join(self.state_dir, STATE_FILE)

        def saved() -> bool:
            with open(path) as handle:
                return any(i["id"] == iid for i in json.load(handle)["instances"])

        yield wait_for(saved)

    @inlineCallbacks
    def test_corrupt_state_falls_back_to_backup(self) -> Any:
        _, auto, manual, key, mid = yield self.populate()
        # one more start writes the backup of the good state
        m2 = self.master()
        yield m2.stop()
        path = os.path.join(self.state_dir, STATE_FILE)
        self.assertTrue(os.path.exists(path + ".backup"))
        with open(path, "wb") as handle:
            handle.write(b"\x00garbage{")
        m3 = self.master()
        out = m3.output.getvalue()
        self.assertIn("State file unreadable", out)
        self.assertIn("State restored from backup", out)
        self.assertEqual(m3.key, key)
        r = yield m3.request("GET", "/instances")
        self.assertEqual({i["id"] for i in r.json()}, {"********", auto, manual})
        with open(path + ".corrupt", "rb") as handle:
            self.assertEqual(handle.read(), b"\x00garbage{")
        # the main file is good again after the next save
        yield m3.stop()
        with open(path) as handle:
            self.assertEqual(len(json.load(handle)["instances"]), 3)

    @inlineCallbacks
    def test_both_corrupt_starts_fresh_loudly(self) -> Any:
        os.makedirs(self.state_dir)
        path = os.path.join(self.state_dir, STATE_FILE)
        for name in (path, path + ".backup"):
            with open(name, "w") as handle:
                handle.write('{"format": "something else"}')
        m = self.master()
        out = m.output.getvalue()
        self.assertIn("State file unreadable", out)
        self.assertIn("State backup unreadable", out)
        self.assertIn(f"API Key created: {m.key}", out)
        r = yield m.request("GET", "/instances")
        self.assertEqual(len(r.json()), 1)

    @inlineCallbacks
    def test_periodic_backup(self) -> Any:
        m = self.master(settings=Settings(reload_interval=0.1, shutdown_timeout=2.0))
        r = yield m.request("POST", "/instances", body={"url": "server://127.0.0.1:10321/127.0.0.1:10322"})
        iid = r.json()["id"]
        backup = os.path.join(self.state_dir, STATE_FILE + ".backup")

        def backed_up() -> bool:
            try:
                with open(backup) as handle:
                    return any(i["id"] == iid for i in json.load(handle)["instances"])
            except (OSError, ValueError):
                return False

        yield wait_for(backed_up)


class StoreUnitTests(TestCase):
    def test_save_and_load_roundtrip(self) -> None:
        d = self.mktemp()
        os.makedirs(d)
        store = StateStore(d, reactor=reactor, logger=NodePassLogger("none", stream=None), settings=Settings())
        self.assertIsNone(store.load())
        store.set_source(lambda: {"instances": [{"id": "abc"}]})
        self.assertTrue(store.save_now())
        self.assertEqual(store.load(), [{"id": "abc"}])
        with open(os.path.join(d, ".np-state-x.tmp"), "w") as handle:
            handle.write("stale")
        store.load()
        self.assertFalse(os.path.exists(os.path.join(d, ".np-state-x.tmp")))

    def test_missing_main_uses_backup(self) -> None:
        d = self.mktemp()
        os.makedirs(d)
        store = StateStore(d, reactor=reactor, logger=NodePassLogger("none", stream=None), settings=Settings())
        store.set_source(lambda: {"instances": [{"id": "b"}]})
        self.assertTrue(store.write_backup())
        self.assertEqual(store.load(), [{"id": "b"}])
