"""Prometheus metrics: scraped with treq and parsed with ``prometheus_client.parser``.

* a real master on a real port running a real server + client pair that
  carries TCP and UDP traffic: the scraped numbers equal ``GET /instances``;
* the key as ``X-API-Key`` or ``Authorization: Bearer``, 401 without it;
* ``NP_METRICS_ADDR`` on standalone ``python -m nodepass`` processes and on a master;
* ``contrib/grafana/nodepass.json`` and ``contrib/prometheus.yml`` use only what we export.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import HTTPConnectionPool

from nodepass.env import Settings
from nodepass.master.metrics import MASTER_METRICS
from nodepass.metrics import STATES, TUNNEL_METRICS
from tests.support import (
    UdpEcho,
    echo_roundtrip,
    echo_server,
    free_port,
    free_ports,
    new_dir,
    reactor,
    sleep,
    udp_user,
    wait_for,
)
from tests.test_master_support import FakeTunnel, MasterFixture, reset_fake_tunnels, start_master
from tests.test_master_tunnel import real_master
from tests.test_process import spawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTERS = ("tcprx", "tcptx", "udprx", "udptx")


def parse(body: bytes) -> dict[tuple[str, str], dict[str, float]]:
    """``{(sample name, instance id): {state or "": value}}`` from a text-format scrape."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            key = (sample.name, sample.labels.get("id", ""))
            out.setdefault(key, {})[sample.labels.get("nodepass_status", "")] = sample.value
    return out


def names(body: bytes) -> set[str]:
    """Every sample name of a text-format scrape."""
    return {s.name for f in text_string_to_metric_families(body.decode("utf-8")) for s in f.samples}


def expected_samples(item: dict[str, Any]) -> dict[str, float]:
    """What the metrics of an API instance object must be."""
    return {
        "nodepass_tcp_rx_bytes_total": item["tcprx"],
        "nodepass_tcp_tx_bytes_total": item["tcptx"],
        "nodepass_udp_rx_bytes_total": item["udprx"],
        "nodepass_udp_tx_bytes_total": item["udptx"],
        "nodepass_tcp_connections": item["tcps"],
        "nodepass_udp_sessions": item["udps"],
        "nodepass_pool_connections": item["pool"],
        "nodepass_mode": item["mode"],
        "nodepass_ping_seconds": item["ping"] / 1000.0,
    }


def scraped_samples(parsed: dict[tuple[str, str], dict[str, float]], iid: str) -> dict[str, float]:
    return {name: parsed[(name, iid)][""] for name in expected_samples({k: 0 for k in (
        "tcprx", "tcptx", "udprx", "udptx", "tcps", "udps", "pool", "mode", "ping")})}


@inlineCallbacks
def scrape(m: MasterFixture, headers: dict[str, str] | None = None, key: Any = True) -> Any:
    r = yield m.request("GET", "/metrics", key=key, headers=headers)
    return r


class MasterMetricsTests(TestCase):
    """``<base>/metrics`` of a master running real tunnels."""

    timeout = 180

    @inlineCallbacks
    def test_scrape_equals_api_after_real_traffic(self) -> Any:
        echo_port = free_port()
        echo_server(self, port=echo_port)
        udp_echo = reactor.listenUDP(echo_port, UdpEcho(), interface="127.0.0.1")
        self.addCleanup(udp_echo.stopListening)
        tunnel_port, user_port = free_ports(2)
        m = real_master(self)
        r = yield m.request("POST", "/instances", body={
            "url": f"server://127.0.0.1:{tunnel_port}/127.0.0.1:{user_port}", "alias": "edge server"})
        server_id = r.json()["id"]
        r = yield m.request("POST", "/instances", body={
            "url": f"client://127.0.0.1:{tunnel_port}/127.0.0.1:{echo_port}?mode=2", "alias": "edge client"})
        client_id = r.json()["id"]

        def paired() -> bool:
            records = m.service.manager.records
            return all(records[i].status == "running" and records[i].mode != 0 for i in (server_id, client_id))

        yield wait_for(paired, timeout=60, what="tunnel handshake")
        payload = b"scrape me " * 6000
        got = yield echo_roundtrip(user_port, payload, timeout=60)
        self.assertEqual(got, payload)
        user = udp_user(self)
        for i in range(5):
            datagram = bytes([65 + i]) * 700
            for attempt in range(3):
                try:
                    reply = yield user.ask(datagram, user_port, timeout=10)
                    break
                except Exception:
                    if attempt == 2:
                        raise
            self.assertEqual(reply, datagram)

        # Both ends count what went through; read the API, scrape, read the API again, and
        # compare once the two API reads agree (the tunnels keep reporting ping and pool).
        matched: dict[str, Any] = {}
        for _attempt in range(100):
            before = yield m.request("GET", "/instances")
            r = yield scrape(m)
            after = yield m.request("GET", "/instances")
            self.assertEqual(r.code, 200, r.body)
            self.assertTrue(r.header("Content-Type").startswith("text/plain; version=0.0.4"))
            if before.json() != after.json():
                yield sleep(0.05)
                continue
            items = {i["id"]: i for i in after.json()}
            parsed = parse(r.body)
            if all(items[i]["udprx"] >= 5 * 700 and items[i]["tcprx"] >= len(payload) for i in (server_id, client_id)):
                matched = {"items": items, "parsed": parsed, "body": r.body}
                break
            yield sleep(0.1)
        self.assertTrue(matched, "the API and the scrape never agreed after the traffic")
        items, parsed = matched["items"], matched["parsed"]
        for iid, alias, kind in ((server_id, "edge server", "server"), (client_id, "edge client", "client")):
            item = items[iid]
            self.assertEqual(scraped_samples(parsed, iid), expected_samples(item))
            self.assertEqual(parsed[("nodepass_status", iid)], {s: float(s == item["status"]) for s in STATES})
            self.assertEqual(item["status"], "running")
            self.assertEqual(parsed[("nodepass_restarts_total", iid)][""], 0)
            self.assertIn(f'alias="{alias}",id="{iid}",type="{kind}"'.encode(), matched["body"])
        self.assertNotIn(("nodepass_tcp_rx_bytes_total", "********"), parsed)  # the API key is no tunnel
        info = (yield m.request("GET", "/info")).json()
        uptime = parsed[("nodepass_master_uptime_seconds", "")][""]
        self.assertTrue(0 <= uptime <= info["uptime"] + 1, (uptime, info["uptime"]))
        self.assertIn(f'nodepass_master_info{{alias="",mid="{info["mid"]}"}} 1.0'.encode(), matched["body"])
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_info",
                     "nodepass_build_info"):
            self.assertIn(name, names(matched["body"]))

    @inlineCallbacks
    def test_status_and_restarts(self) -> Any:
        """``nodepass_status`` follows the instance; restarts of earlier tunnels are kept."""
        reset_fake_tunnels()
        m = start_master(self)
        r = yield m.request("POST", "/instances", body={"url": "server://127.0.0.1:10101/127.0.0.1:8080"})
        iid = r.json()["id"]
        tunnel = FakeTunnel.instances[-1]
        tunnel.stats.restarts = 2
        tunnel.fail("lost")
        r = yield scrape(m)
        parsed = parse(r.body)
        self.assertEqual(parsed[("nodepass_status", iid)], {"running": 0.0, "stopped": 0.0, "error": 1.0})
        self.assertEqual(parsed[("nodepass_restarts_total", iid)][""], 2)
        r = yield m.request("PATCH", f"/instances/{iid}", body={"action": "restart"})
        self.assertEqual(r.code, 200)
        FakeTunnel.instances[-1].stats.restarts = 1
        parsed = parse((yield scrape(m)).body)
        self.assertEqual(parsed[("nodepass_status", iid)]["running"], 1.0)
        self.assertEqual(parsed[("nodepass_restarts_total", iid)][""], 3)
        yield m.request("PATCH", f"/instances/{iid}", body={"action": "stop"})
        parsed = parse((yield scrape(m)).body)
        self.assertEqual(parsed[("nodepass_status", iid)]["stopped"], 1.0)
        self.assertEqual(parsed[("nodepass_restarts_total", iid)][""], 3)

    @inlineCallbacks
    def test_key_header_bearer_and_refusals(self) -> Any:
        m = start_master(self)
        ok = yield scrape(m)
        self.assertEqual(ok.code, 200)
        for headers in ({"Authorization": f"Bearer {m.key}"}, {"Authorization": f"bearer  {m.key} "}):
            r = yield scrape(m, headers=headers, key=None)
            self.assertEqual(r.code, 200, headers)
            self.assertIn(b"nodepass_master_uptime_seconds", r.body)
        # the Bearer form works on every route, not only /metrics
        r = yield m.request("GET", "/instances", key=None, headers={"Authorization": f"Bearer {m.key}"})
        self.assertEqual(r.code, 200)
        refused = {
            "none": ({}, None, "Unauthorized: API key required"),
            "basic": ({"Authorization": f"Basic {m.key}"}, None, "Unauthorized: API key required"),
            "empty bearer": ({"Authorization": "Bearer "}, None, "Unauthorized: API key required"),
            "wrong bearer": ({"Authorization": "Bearer " + "0" * 32}, None, "Unauthorized: Invalid API key"),
            "X-API-Key wins": ({"Authorization": f"Bearer {m.key}"}, "0" * 32, "Unauthorized: Invalid API key"),
        }
        for label, (headers, key, message) in refused.items():
            r = yield scrape(m, headers=headers, key=key)
            self.assertEqual((r.code, r.json()), (401, {"error": message}), label)
            self.assertEqual(r.header("Access-Control-Allow-Origin"), "*")
        r = yield m.request("POST", "/metrics")
        self.assertEqual((r.code, r.json()), (405, {"error": "Method not allowed"}))
        r = yield m.request("OPTIONS", "/metrics", key=None)
        self.assertEqual((r.code, r.body), (200, b""))
        r = yield m.request("HEAD", "/metrics")
        self.assertEqual((r.code, r.body), (200, b""))

    @inlineCallbacks
    def test_openmetrics_when_asked(self) -> Any:
        m = start_master(self)
        accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        r = yield scrape(m, headers={"Accept": accept})
        self.assertTrue(r.header("Content-Type").startswith("application/openmetrics-text"))
        self.assertTrue(r.body.endswith(b"# EOF\n"))
        self.assertIn(b"# TYPE nodepass_status stateset", r.body)

    @inlineCallbacks
    def test_master_metrics_address(self) -> Any:
        """With ``NP_METRICS_ADDR`` the master also serves its metrics without a key."""
        m = start_master(self, settings=Settings(report_interval=5.0, shutdown_timeout=2.0,
                                                  metrics_addr="127.0.0.1:0"))
        server = m.service._metrics_server
        assert server is not None and server.port is not None
        port = server.port.getHost().port  # type: ignore[attr-defined]
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield treq.get(f"http://127.0.0.1:{port}/metrics", pool=pool)
        body = yield treq.content(response)
        self.assertEqual(response.code, 200)
        self.assertIn(b"nodepass_master_uptime_seconds", body)
        response = yield treq.get(f"http://127.0.0.1:{port}/other", pool=pool)
        yield treq.content(response)
        self.assertEqual(response.code, 404)

    @inlineCallbacks
    def test_listed_in_openapi(self) -> Any:
        m = start_master(self)
        r = yield m.request("GET", "/openapi.json", key=None)
        operation = r.json()["paths"]["/metrics"]["get"]
        self.assertIn("text/plain", operation["responses"]["200"]["content"])
        self.assertIn("BearerKey", r.json()["components"]["securitySchemes"])
        self.assertIn({"BearerKey": []}, r.json()["security"])
        self.assertNotIn("security", operation)  # the document-wide key schemes apply


class StandaloneMetricsTests(TestCase):
    """``NP_METRICS_ADDR`` on ``python -m nodepass server://…`` and ``client://…``."""

    timeout = 120

    @inlineCallbacks
    def get(self, port: int) -> Any:
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield treq.get(f"http://127.0.0.1:{port}/metrics", pool=pool)
        body = yield treq.content(response)
        self.assertEqual(response.code, 200)
        return body

    @inlineCallbacks
    def test_two_processes(self) -> Any:
        work = new_dir(self)
        echo_port = echo_server(self)
        tunnel_port, local_port, server_metrics, client_metrics = free_ports(4)
        env = {"NP_REPORT_INTERVAL": "300ms"}
        server = spawn(self, ["-m", "nodepass", f"server://127.0.0.1:{tunnel_port}/127.0.0.1:{echo_port}?log=info"],
                       work, NP_METRICS_ADDR=f"127.0.0.1:{server_metrics}", **env)
        yield server.wait_line("Pending tunnel handshake")
        client = spawn(self, ["-m", "nodepass",
                              f"client://127.0.0.1:{tunnel_port}/127.0.0.1:{local_port}?log=info&mode=2"],
                       work, NP_METRICS_ADDR=f"127.0.0.1:{client_metrics}", **env)
        yield client.wait_line(f"Metrics listening: http://127.0.0.1:{client_metrics}/metrics")
        payload = b"standalone metrics " * 3000
        got = yield echo_roundtrip(local_port, payload, timeout=30)
        self.assertEqual(got, payload)

        checkpoint = re.compile(r"CHECK_POINT\|MODE=(\d+)\|PING=\d+ms\|POOL=\d+\|TCPS=(\d+)\|UDPS=(\d+)"
                                r"\|TCPRX=(\d+)\|TCPTX=(\d+)\|UDPRX=(\d+)\|UDPTX=(\d+)")

        for proc, port, kind in ((server, server_metrics, "server"), (client, client_metrics, "client")):
            # the scrape and the tunnel's own CHECK_POINT report agree once traffic has settled
            agreed: list[bool] = []
            for _attempt in range(200):
                body = yield self.get(port)
                parsed = parse(body)
                reports = [m for m in (checkpoint.search(line) for line in proc.lines) if m]
                if reports:
                    mode, tcps, udps, tcprx, tcptx, udprx, udptx = (int(x) for x in reports[-1].groups())
                    scraped = scraped_samples(parsed, "")
                    want = {"nodepass_mode": mode, "nodepass_tcp_connections": tcps, "nodepass_udp_sessions": udps,
                            "nodepass_tcp_rx_bytes_total": tcprx, "nodepass_tcp_tx_bytes_total": tcptx,
                            "nodepass_udp_rx_bytes_total": udprx, "nodepass_udp_tx_bytes_total": udptx}
                    if tcprx >= len(payload) and {k: scraped[k] for k in want} == want:
                        agreed.append(True)
                        break
                yield sleep(0.1)
            self.assertTrue(agreed, f"{kind}: the scrape never matched its CHECK_POINT report:\n{body.decode()}")
            self.assertIn(f'nodepass_tcp_rx_bytes_total{{alias="",id="",type="{kind}"}}'.encode(), body)
            self.assertEqual(parsed[("nodepass_status", "")]["running"], 1.0)
            self.assertIn("process_cpu_seconds_total", names(body))
        for proc in (client, server):
            proc.signal("TERM")
            status = yield proc.wait_exit()
            self.assertEqual(status, (0, None), proc.text)

    def test_tunnel_process_stays_lean(self) -> None:
        """A tunnel with metrics loads ``prometheus_client`` but no master or Klein code; without, neither."""
        import subprocess
        import sys

        code = (
            "import sys\n"
            "from twisted.internet import reactor\n"
            "from nodepass.env import Settings\n"
            "from nodepass.log import NodePassLogger\n"
            "from nodepass.service import build_service\n"
            "from nodepass.url import parse_url\n"
            "addr = sys.argv[1]\n"
            "build_service(parse_url('server://127.0.0.1:10101/127.0.0.1:8080'), reactor=reactor,\n"
            "              logger=NodePassLogger('info', stream=None), settings=Settings(metrics_addr=addr))\n"
            "print(sorted({m.split('.')[0] if not m.startswith('nodepass.') else '.'.join(m.split('.')[:2])\n"
            "              for m in sys.modules if m.startswith(('klein', 'werkzeug', 'nodepass.master',\n"
            "                                                    'prometheus_client'))}))\n"
        )
        env = dict(os.environ, PYTHONPATH=ROOT)
        for addr, loaded in (("127.0.0.1:0", "['prometheus_client']"), ("", "[]")):
            out = subprocess.run([sys.executable, "-c", code, addr], env=env, capture_output=True, text=True,
                                 timeout=60, check=True)
            self.assertEqual(out.stdout.strip(), loaded, out.stderr)

    @inlineCallbacks
    def test_bad_and_busy_addresses(self) -> Any:
        """An invalid value is a WARN and no listener; a busy port stops the start (exit 1)."""
        work = new_dir(self)
        tunnel_port, target = free_ports(2)
        proc = spawn(self, ["-m", "nodepass", f"server://127.0.0.1:{tunnel_port}/127.0.0.1:{target}?log=info"],
                     work, NP_METRICS_ADDR="nowhere")
        yield proc.wait_line("Server started")
        self.assertIn("NP_METRICS_ADDR='nowhere' is invalid", proc.text)
        self.assertNotIn("Metrics listening", proc.text)
        proc.signal("TERM")
        yield proc.wait_exit()

        busy = echo_server(self)
        tunnel_port, target = free_ports(2)
        proc = spawn(self, ["-m", "nodepass", f"server://127.0.0.1:{tunnel_port}/127.0.0.1:{target}?log=info"],
                     work, NP_METRICS_ADDR=f"127.0.0.1:{busy}")
        status = yield proc.wait_exit()
        self.assertEqual(status, (1, None), proc.text)
        self.assertIn("Start failed", proc.text)


class SettingTests(TestCase):
    def test_metrics_address_values(self) -> None:
        for value in ("127.0.0.1:9101", ":9101", "[::1]:9101", "localhost:0", " 0.0.0.0:9101 "):
            settings = Settings.from_environ({"NP_METRICS_ADDR": value})
            self.assertEqual((settings.metrics_addr, settings.warnings), (value.strip(), ()), value)
        for value in ("9101", "host:", "[::1]9101", "127.0.0.1:70000", "a b:1"):
            settings = Settings.from_environ({"NP_METRICS_ADDR": value})
            self.assertEqual(settings.metrics_addr, "", value)
            self.assertEqual(len(settings.warnings), 1, value)
            self.assertIn("NP_METRICS_ADDR", settings.warnings[0])
        self.assertEqual(Settings.from_environ({}).metrics_addr, "")


class ContribTests(TestCase):
    """The scrape example and the dashboard refer only to what nodepass exports."""

    @inlineCallbacks
    def exported(self) -> Any:
        """Every sample name a master with one instance and a standalone tunnel expose."""
        reset_fake_tunnels()
        m = start_master(self)
        yield m.request("POST", "/instances", body={"url": "server://127.0.0.1:10101/127.0.0.1:8080"})
        r = yield scrape(m)
        return names(r.body)

    @inlineCallbacks
    def test_grafana_dashboard(self) -> Any:
        exported = yield self.exported()
        self.assertTrue(set(TUNNEL_METRICS) - {"nodepass_status"} <= exported)
        self.assertTrue({"nodepass_master_uptime_seconds", "nodepass_master_info"} <= exported)
        self.assertEqual(set(MASTER_METRICS) - exported, set())
        with open(os.path.join(ROOT, "contrib", "grafana", "nodepass.json"), encoding="utf-8") as handle:
            dashboard = json.load(handle)
        self.assertEqual(dashboard["title"], "NodePass")
        self.assertIsInstance(dashboard["schemaVersion"], int)
        panels = dashboard["panels"]
        exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
        self.assertGreaterEqual(len(exprs), 6)
        used: set[str] = set()
        for expr in exprs:
            used |= set(re.findall(r"\b((?:nodepass|process|python)_[a-z_]+)\b", expr))
        self.assertTrue(used)
        self.assertEqual(used - exported, set(), "the dashboard uses metrics nodepass does not export")
        titles = " ".join(p["title"].lower() for p in panels)
        for word in ("traffic", "connections", "pool", "ping", "status"):
            self.assertIn(word, titles)
        ids = [p["id"] for p in panels]
        self.assertEqual(len(ids), len(set(ids)))
        for p in panels:
            self.assertEqual(set(p["gridPos"]), {"h", "w", "x", "y"})

    def test_prometheus_example(self) -> None:
        try:
            import yaml
        except ImportError:
            raise SkipTest("PyYAML is not installed") from None
        with open(os.path.join(ROOT, "contrib", "prometheus.yml"), encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        master = jobs["nodepass-master"]
        self.assertEqual(master["metrics_path"], "/api/v1/metrics")
        self.assertEqual(master["authorization"]["type"], "Bearer")
        self.assertIn("credentials_file", master["authorization"])
        tunnels = jobs["nodepass-tunnels"]
        self.assertEqual(tunnels.get("metrics_path", "/metrics"), "/metrics")
