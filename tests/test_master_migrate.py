"""Taking over a Go master's state file: in-process masters and real ``nodepass`` processes.

The state files are the ones the Go NodePass v1.14.0 master wrote
(``tests/fixtures/gob``).  When the Go binary is there (see
:func:`tests.goharness.go_peer_path`), one more test makes a fresh file with
it and imports that.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest, TestCase

from nodepass.master.migrate import GoStateNotFound
from tests.goharness import skip_unless_go
from tests.support import free_port, new_dir
from tests.test_master_support import FakeTunnel, MasterFixture, reset_fake_tunnels, start_master
from tests.test_process import MasterClient, plugin_installed, spawn, state_instances, terminated_cleanly

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "gob")


def expected(name: str = "go-master") -> dict[str, Any]:
    with open(os.path.join(FIXTURES, f"{name}.expected.json"), encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data


def install(directory: str, relative: str, fixture: str = "go-master.gob") -> str:
    """Copy a fixture to *directory*/*relative* (e.g. ``gob/nodepass.gob``); returns the path."""
    path = os.path.join(directory, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shutil.copyfile(os.path.join(FIXTURES, fixture), path)
    return path


def fingerprint(path: str) -> tuple[str, float, int]:
    """Content hash, modification time and mode: what must not change on import."""
    st = os.stat(path)
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest(), st.st_mtime, st.st_mode


def comparable(item: dict[str, Any]) -> dict[str, Any]:
    """An instance object without what a (re)start legitimately changes (status, mode, live gauges)."""
    return {k: v for k, v in item.items() if k not in ("status", "mode", "ping", "pool", "tcps", "udps")}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def log_text(m: MasterFixture) -> str:
    """What the master logged, without colours."""
    return _ANSI.sub("", m.output.getvalue())


class ImportTests(TestCase):
    """A master whose state directory holds a Go state file and no state of its own."""

    timeout = 60

    def setUp(self) -> None:
        reset_fake_tunnels()

    @inlineCallbacks
    def check_imported(self, m: MasterFixture, name: str = "go-master") -> Any:
        """GET /instances and /info show exactly what the Go master had."""
        want = expected(name)
        pseudo = want["instances"][0]
        self.assertEqual(pseudo["id"], "********")
        self.assertEqual(m.key, pseudo["url"])  # the Go API key keeps working
        r = yield m.request("GET", "/instances")
        self.assertEqual(r.code, 200, r.body)
        got = {item["id"]: item for item in r.json()}
        self.assertEqual(sorted(got), sorted(item["id"] for item in want["instances"]))
        for item in want["instances"]:
            self.assertEqual(comparable(got[item["id"]]), comparable(item), item["id"])
        r = yield m.request("GET", "/info")
        self.assertEqual((r.json()["mid"], r.json()["alias"]), (pseudo["config"], want["master_alias"]))
        return got

    @inlineCallbacks
    def test_state_dir_gob_subdirectory(self) -> Any:
        """``<state dir>/gob/nodepass.gob`` (where a Go master writes it) is imported and left alone."""
        state_dir = new_dir(self)
        path = install(state_dir, os.path.join("gob", "nodepass.gob"))
        before = fingerprint(path)
        m = start_master(self, state_dir)
        got = yield self.check_imported(m)
        want = {i["alias"]: i for i in expected()["instances"]}
        # restart:true instances start, the others stay stopped
        started = {t.config.raw for t in FakeTunnel.instances}
        self.assertEqual(started, {want["web server"]["url"]})
        self.assertEqual(got[want["web server"]["id"]]["status"], "running")
        self.assertEqual(got[want["web client"]["id"]]["status"], "stopped")
        self.assertEqual(got[want["web client"]["id"]]["mode"], 2)  # kept while stopped, as Go does
        log = log_text(m)
        for item in expected()["instances"][1:]:
            self.assertRegex(log, rf"INFO .*Imported instance: .* \[{item['id']}\]")
        self.assertIn(f"Imported 3 instances and the API key from Go state file {path}", log)
        self.assertIn("API Key loaded: " + m.key, log)
        # our own state is written at once; the Go file is untouched
        yield m.stop()
        self.assertEqual(fingerprint(path), before)
        with open(os.path.join(state_dir, "nodepass.json"), encoding="utf-8") as handle:
            saved = {i["id"]: i for i in json.load(handle)["instances"]}
        self.assertEqual(saved[want["web client"]["id"]]["tcprx"], 65536)
        self.assertEqual(saved[want["web client"]["id"]]["meta"]["tags"], {"env": "prod", "owner": "ops"})

    @inlineCallbacks
    def test_imported_once(self) -> Any:
        """Later starts use the master's own state: changes made after the import are kept."""
        state_dir = new_dir(self)
        install(state_dir, "nodepass.gob")
        client_id = {i["alias"]: i["id"] for i in expected()["instances"]}["web client"]
        m = start_master(self, state_dir)
        r = yield m.request("PATCH", f"/instances/{client_id}", body={"alias": "renamed", "action": "reset"})
        self.assertEqual(r.code, 200, r.body)
        yield m.stop()
        again = MasterFixture(state_dir, factory=FakeTunnel)
        again.service.import_gob = os.path.join(state_dir, "nodepass.gob")  # even when named explicitly
        again.start()
        self.addCleanup(again.stop)
        r = yield again.request("GET", f"/instances/{client_id}")
        self.assertEqual((r.json()["alias"], r.json()["tcprx"]), ("renamed", 0))
        log = log_text(again)
        self.assertNotIn("Imported instance", log)
        self.assertIn("Go state file not imported: " + os.path.join(state_dir, "nodepass.json"), log)

    @inlineCallbacks
    def test_explicit_file_and_directory(self) -> Any:
        """``import_gob`` names a file anywhere, or the directory of a Go binary (holding ``gob/``)."""
        go_dir = new_dir(self)
        path = install(go_dir, os.path.join("gob", "nodepass.gob"))
        for named in (path, go_dir):
            m = MasterFixture(new_dir(self), factory=FakeTunnel)
            m.service.import_gob = named
            m.start()
            self.addCleanup(m.stop)
            yield self.check_imported(m)

    @inlineCallbacks
    def test_fresh_go_master(self) -> Any:
        state_dir = new_dir(self)
        install(state_dir, "nodepass.gob", "go-master-fresh.gob")
        m = start_master(self, state_dir)
        yield self.check_imported(m, "go-master-fresh")
        self.assertIn("Imported 0 instances and the API key", log_text(m))

    def test_explicit_file_missing(self) -> None:
        """A named file that does not exist stops the start (nothing is created)."""
        state_dir = new_dir(self)
        m = MasterFixture(state_dir, factory=FakeTunnel)
        m.service.import_gob = os.path.join(state_dir, "missing.gob")
        with self.assertRaisesRegex(GoStateNotFound, "Go state file not found: .*missing.gob"):
            m.start()
        self.assertFalse(os.path.exists(os.path.join(state_dir, "nodepass.json")))

    @inlineCallbacks
    def test_damaged_files_start_empty_and_are_kept(self) -> Any:
        """Truncated, corrupted or foreign gob: one ERROR line, a new empty state, the file as it was."""
        with open(os.path.join(FIXTURES, "go-master.gob"), "rb") as handle:
            good = handle.read()
        with open(os.path.join(FIXTURES, "vectors", "point.gob"), "rb") as handle:
            foreign = handle.read()
        corrupt = bytearray(good)
        corrupt[1] = 0  # the first message's type id
        cases = {
            "truncated": (good[: len(good) // 2], "truncated"),
            "corrupt": (bytes(corrupt), "value of type id 0"),
            "foreign": (foreign, "not a NodePass master state"),
            "empty": (b"", "empty gob stream"),
        }
        for label, (data, reason) in cases.items():
            state_dir = new_dir(self)
            path = os.path.join(state_dir, "gob", "nodepass.gob")
            os.makedirs(os.path.dirname(path))
            with open(path, "wb") as handle:
                handle.write(data)
            with open(path + ".backup", "wb") as handle:
                handle.write(good)
            before = fingerprint(path)
            m = MasterFixture(state_dir, factory=FakeTunnel)
            m.start()
            self.addCleanup(m.stop)
            log = log_text(m)
            self.assertRegex(log, rf"ERROR .*Go state file {re.escape(path)} not imported: .*{reason}", label)
            self.assertIn(f"A Go state backup exists: {path}.backup", log)
            self.assertIn("API Key created: ", log)
            r = yield m.request("GET", "/instances")
            self.assertEqual([i["id"] for i in r.json()], ["********"], label)
            yield m.stop()
            self.assertEqual(fingerprint(path), before, label)


class ImportProcessTests(TestCase):
    """``nodepass master://...`` and ``twistd nodepass --import-gob`` as an operator runs them."""

    timeout = 120

    @inlineCallbacks
    def check(self, proc: Any, state_dir: str) -> Any:
        api = yield MasterClient(self, proc).connect()
        want = expected()
        self.assertEqual(api.key, want["instances"][0]["url"])
        self.assertEqual(api.key_word, "loaded")
        items = yield api.instances()
        for item in want["instances"][1:]:
            self.assertEqual(comparable(items[item["id"]]), comparable(item))
        self.assertIn("Imported 3 instances and the API key", proc.text)
        yield terminated_cleanly(self, proc)
        saved = state_instances(state_dir)
        self.assertEqual(sorted(saved), sorted(i["id"] for i in want["instances"][1:]))

    @inlineCallbacks
    def test_environment_variable(self) -> Any:
        state_dir = new_dir(self)
        path = install(new_dir(self), "nodepass.gob")
        before = fingerprint(path)
        proc = spawn(self, ["-m", "nodepass", "master://127.0.0.1:0?log=info"], state_dir, NP_IMPORT_GOB=path)
        yield self.check(proc, state_dir)
        self.assertEqual(fingerprint(path), before)

    @inlineCallbacks
    def test_missing_named_file_fails_the_start(self) -> Any:
        state_dir = new_dir(self)
        missing = os.path.join(state_dir, "nope.gob")
        proc = spawn(self, ["-m", "nodepass", "master://127.0.0.1:0?log=info"], state_dir, NP_IMPORT_GOB=missing)
        status = yield proc.wait_exit()
        self.assertEqual(status, (1, None), proc.text)
        self.assertIn(f"Go state file not found: {missing}", proc.text)

    @inlineCallbacks
    def test_twistd_option(self) -> Any:
        if not plugin_installed():
            raise SkipTest("the nodepass twistd plugin is not installed")
        state_dir = new_dir(self)
        path = install(new_dir(self), os.path.join("gob", "nodepass.gob"))
        proc = spawn(
            self,
            [
                "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
                "--nodaemon", "--pidfile=", "--logger", "nodepass.log.twistd_observer",
                "nodepass", "--master", "master://127.0.0.1:0?log=info", "--import-gob", path,
            ],
            state_dir,
        )
        api = yield MasterClient(self, proc).connect()
        items = yield api.instances()
        self.assertEqual(sorted(items), sorted(i["id"] for i in expected()["instances"][1:]))
        proc.signal("TERM")
        status = yield proc.wait_exit()
        self.assertIn(status, [(0, None), (None, signal.SIGTERM)])


class LiveGoMasterTests(TestCase):
    """A state file the Go binary writes now, imported by a real ``nodepass`` master."""

    timeout = 120

    @inlineCallbacks
    def test_fresh_file_from_the_go_binary(self) -> Any:
        binary = skip_unless_go()
        go_dir = new_dir(self)
        exe = os.path.join(go_dir, "nodepass")
        shutil.copy2(binary, exe)
        port = free_port()
        go = subprocess.Popen(
            [exe, f"master://127.0.0.1:{port}/api?log=info"], cwd=go_dir,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.addCleanup(lambda: go.poll() is None and go.kill())
        key = ""
        assert go.stdout is not None
        deadline = time.monotonic() + 30
        while not key and time.monotonic() < deadline:
            match = re.search(rb"API Key created: ([0-9a-f]{32})", go.stdout.readline())
            key = match.group(1).decode() if match else ""
        self.assertTrue(key, "the Go master printed no API key")

        def call(method: str, path: str, body: Any) -> Any:
            for _ in range(100):
                try:
                    request = urllib.request.Request(
                        f"http://127.0.0.1:{port}/api/v1{path}", data=json.dumps(body).encode(),
                        method=method, headers={"X-API-Key": key},
                    )
                    with urllib.request.urlopen(request, timeout=10) as response:
                        return json.loads(response.read())
                except OSError:
                    time.sleep(0.1)
            raise AssertionError(f"the Go master did not answer {method} {path}")

        # a client whose server never comes: it stays in its retry loop, nothing binds
        created = call("POST", "/instances", {"url": f"client://127.0.0.1:{free_port()}/127.0.0.1:9?mode=2",
                                             "alias": "from go"})
        call("PATCH", f"/instances/{created['id']}", {"restart": False, "meta": {"tags": {"made": "now"}}})
        go.send_signal(signal.SIGTERM)
        go.wait(timeout=30)
        path = os.path.join(go_dir, "gob", "nodepass.gob")
        self.assertTrue(os.path.exists(path))

        state_dir = new_dir(self)
        proc = spawn(self, ["-m", "nodepass", "master://127.0.0.1:0?log=info"], state_dir, NP_IMPORT_GOB=go_dir)
        api = yield MasterClient(self, proc).connect()
        self.assertEqual(api.key, key)
        items = yield api.instances()
        self.assertEqual(
            {k: (v["alias"], v["url"], v["restart"], v["meta"]["tags"]) for k, v in items.items()},
            {created["id"]: ("from go", created["url"], False, {"made": "now"})},
        )
        yield terminated_cleanly(self, proc)


class OptionTests(TestCase):
    """``twistd nodepass --import-gob`` and ``NP_IMPORT_GOB`` reach the master."""

    def test_twistd_option(self) -> None:
        from twisted.python import usage

        from nodepass.tap import Options

        options = Options()
        options.parseOptions(["--master", "master://127.0.0.1:0", "--import-gob", "/srv/go/gob/nodepass.gob"])
        self.assertEqual(options["import-gob"], "/srv/go/gob/nodepass.gob")
        with self.assertRaisesRegex(usage.UsageError, "master:// URL only"):
            Options().parseOptions(["--server", "server://:10101/127.0.0.1:8080", "--import-gob", "x.gob"])

    def test_environment(self) -> None:
        from nodepass.service import default_import_gob

        self.assertEqual(default_import_gob({"NP_IMPORT_GOB": "/srv/go"}), "/srv/go")
        self.assertIsNone(default_import_gob({"NP_IMPORT_GOB": ""}))
        self.assertIsNone(default_import_gob({}))
