"""A master running real tunnel instances: a server + client pair carries traffic."""

from __future__ import annotations

from typing import Any

from twisted.internet import endpoints
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from nodepass.env import Settings
from tests.support import RawClient, echo_server, free_port, free_ports
from tests.test_master_support import MasterFixture, reactor, start_master, wait_for

try:
    import nodepass.tunnel  # noqa: F401
    from nodepass.master.service import _default_tunnel_factory
except ImportError:  # pragma: no cover - the tunnel core is part of the package
    _default_tunnel_factory = None  # type: ignore[assignment]


def real_master(test: TestCase) -> MasterFixture:
    """A started master (log=info, quick reports and restarts) running real tunnel services."""
    return start_master(
        test,
        url="master://127.0.0.1:0/api?log=info",
        settings=Settings(report_interval=0.2, shutdown_timeout=3.0, service_cooldown=0.2),
        factory=_default_tunnel_factory,
    )


class RealTunnelTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_server_client_pair_carries_traffic(self) -> Any:
        if _default_tunnel_factory is None:
            self.skipTest("tunnel core not available")
        echo_port = echo_server(self)
        tunnel_port, listen_port = free_ports(2)
        m = real_master(self)
        reader = yield m.subscribe()
        r = yield m.request("POST", "/instances", body={
            "url": f"server://127.0.0.1:{tunnel_port}/127.0.0.1:{listen_port}", "alias": "srv"})
        self.assertEqual(r.code, 201, r.body)
        server_id = r.json()["id"]
        r = yield m.request("POST", "/instances", body={
            "url": f"client://127.0.0.1:{tunnel_port}/127.0.0.1:{echo_port}", "alias": "cli"})
        self.assertEqual(r.code, 201, r.body)
        client_id = r.json()["id"]

        # both report through CHECK_POINT once the handshake is done
        def checked(iid: str) -> Any:
            return [e for e in reader.of_type("update", iid) if e["instance"]["mode"] != 0]

        yield wait_for(lambda: checked(server_id) and checked(client_id), timeout=20)

        payload = b"nodepass-master " * 4096
        sink = RawClient()
        ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", listen_port)
        proto = yield endpoints.connectProtocol(ep, sink)
        proto.transport.write(payload)
        yield wait_for(lambda: len(sink.data) >= len(payload), timeout=20)
        self.assertEqual(sink.data, payload)
        proto.transport.loseConnection()

        @inlineCallbacks
        def traffic(iid: str) -> Any:
            r = yield m.request("GET", f"/instances/{iid}")
            got = r.json()
            return got["tcprx"] >= len(payload) and got["tcptx"] >= len(payload) and got

        for iid in (server_id, client_id):
            deadline = 0
            while True:
                got = yield traffic(iid)
                if got:
                    break
                deadline += 1
                self.assertLess(deadline, 400, "counters did not rise")
                d: Deferred[None] = Deferred()
                reactor.callLater(0.05, d.callback, None)
                yield d
            self.assertEqual(got["status"], "running")
        # counters survive a restart of the instance
        before = got["tcprx"]
        r = yield m.request("PATCH", f"/instances/{client_id}", body={"action": "restart"})
        self.assertEqual(r.json()["status"], "running")
        self.assertGreaterEqual(r.json()["tcprx"], before)
        logs = "".join(e["logs"] for e in reader.of_type("log"))
        self.assertNotIn("CHECK_POINT", logs)
        self.assertIn("started", logs)
        # stopping both (client first) leaves the master serving
        for iid in (client_id, server_id):
            r = yield m.request("PATCH", f"/instances/{iid}", body={"action": "stop"})
            self.assertEqual(r.json()["status"], "stopped")
        self.assertEqual(m.service.manager.services, [])
        yield m.stop()
        from twisted.internet import tcp

        def settled() -> bool:
            selectables = list(reactor.getReaders()) + list(reactor.getWriters())
            return not [s for s in selectables if isinstance(s, tcp.Client)
                        and getattr(s, "addr", ("", 0))[1] == tunnel_port]

        yield wait_for(settled, timeout=15)

    @inlineCallbacks
    def test_port_clash_shows_error_and_master_survives(self) -> Any:
        if _default_tunnel_factory is None:
            self.skipTest("tunnel core not available")
        taken = echo_server(self)
        m = real_master(self)
        reader = yield m.subscribe()
        r = yield m.request("POST", "/instances", body={
            "url": f"server://127.0.0.1:{taken}/127.0.0.1:{free_port()}"})
        self.assertEqual(r.code, 201, r.body)
        iid = r.json()["id"]
        yield wait_for(lambda: m.service.manager.records[iid].status == "error", timeout=20)
        yield wait_for(lambda: [e for e in reader.of_type("log", iid) if "Server error:" in e["logs"]])
        r = yield m.request("GET", f"/instances/{iid}")
        self.assertEqual(r.json()["status"], "error")
        r = yield m.request("DELETE", f"/instances/{iid}")
        self.assertEqual(r.code, 204)
        r = yield m.request("GET", "/info")
        self.assertEqual(r.code, 200)
