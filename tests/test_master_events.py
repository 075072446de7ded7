"""The SSE stream, parsed the way dashboards parse it, plus the hub's unit behaviour."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from nodepass.env import Settings
from nodepass.master.events import EVENT_LIMIT, EventHub, encode_events, rfc3339
from tests.support import sleep
from tests.test_master_support import FakeTunnel, raw_request, reset_fake_tunnels, start_master, wait_for

SERVER_URL = "server://127.0.0.1:10201/127.0.0.1:10202"


class SSEStreamTests(TestCase):
    def setUp(self) -> None:
        reset_fake_tunnels()
        self.m = start_master(self)

    @inlineCallbacks
    def test_headers_preamble_and_initial_burst(self) -> Any:
        r = yield self.m.request("POST", "/instances", body={"url": SERVER_URL})
        inst = r.json()
        reader = yield self.m.subscribe()
        self.assertEqual(reader.response.code, 200)
        headers = reader.response.headers
        self.assertEqual(headers.getRawHeaders("Content-Type"), ["text/event-stream"])
        self.assertEqual(headers.getRawHeaders("Cache-Control"), ["no-cache"])
        head = yield raw_request(
            self.m.service.address[1],
            b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\nX-API-Key: " + self.m.key.encode() + b"\r\n\r\n",
            until=b"retry: 3000\n\n",
        )
        self.assertIn(b"\r\nConnection: keep-alive\r\n", head)
        self.assertIn(b"\r\nContent-Type: text/event-stream\r\n", head)
        self.assertEqual(headers.getRawHeaders("Access-Control-Allow-Origin"), ["*"])
        yield wait_for(lambda: len(reader.of_type("initial")) == 2)
        self.assertTrue(reader.raw.startswith(b"retry: 3000\n\nevent: instance\ndata: {"))
        self.assertNotIn(b"\r", reader.raw)
        ids = {e["instance"]["id"] for e in reader.of_type("initial")}
        self.assertEqual(ids, {"********", inst["id"]})
        for event in reader.events:
            self.assertEqual(list(event), ["type", "time", "instance", "logs"])
            self.assertEqual(event["logs"], "")
        pseudo = reader.of_type("initial", "********")[0]["instance"]
        self.assertEqual(pseudo["url"], self.m.key)

    @inlineCallbacks
    def test_lifecycle_create_update_log_delete_shutdown(self) -> Any:
        reader = yield self.m.subscribe()
        yield wait_for(lambda: reader.of_type("initial"))
        r = yield self.m.request("POST", "/instances", body={"url": SERVER_URL, "alias": "x"})
        iid = r.json()["id"]
        yield wait_for(lambda: reader.of_type("update", iid))
        create = reader.of_type("create", iid)
        self.assertEqual(len(create), 1)
        self.assertEqual(create[0]["instance"]["alias"], "x")
        self.assertLess(reader.events.index(create[0]), reader.events.index(reader.of_type("update", iid)[0]))
        self.assertEqual(reader.of_type("update", iid)[-1]["instance"]["status"], "running")
        # the tunnel's own start line became a log event
        yield wait_for(lambda: reader.of_type("log", iid))
        self.assertIn("Server started:", reader.of_type("log", iid)[0]["logs"])
        # a CHECK_POINT is an update with fresh stats, never a log event
        tunnel = FakeTunnel.instances[-1]
        tunnel.stats.tcprx, tunnel.stats.pool, tunnel.stats.mode = 1234, 5, 1
        before = len(reader.of_type("update", iid))
        tunnel.checkpoint()
        yield wait_for(lambda: len(reader.of_type("update", iid)) > before)
        last = reader.of_type("update", iid)[-1]["instance"]
        self.assertEqual((last["tcprx"], last["pool"], last["mode"]), (1234, 5, 1))
        self.assertFalse([e for e in reader.of_type("log", iid) if "CHECK_POINT" in e["logs"]])
        # an error line: a log event already showing status error
        tunnel.fail("listen tcp: address already in use")
        yield wait_for(lambda: [e for e in reader.of_type("log", iid) if "Server error:" in e["logs"]])
        err = [e for e in reader.of_type("log", iid) if "Server error:" in e["logs"]][0]
        self.assertEqual(err["instance"]["status"], "error")
        yield wait_for(lambda: reader.of_type("update", iid)[-1]["instance"]["status"] == "error")
        tunnel.checkpoint()
        yield wait_for(lambda: reader.of_type("update", iid)[-1]["instance"]["status"] == "running")
        # PATCH → update
        yield self.m.request("PATCH", f"/instances/{iid}", body={"alias": "y"})
        yield wait_for(lambda: reader.of_type("update", iid)[-1]["instance"]["alias"] == "y")
        # DELETE → update (stopped) then delete
        yield self.m.request("DELETE", f"/instances/{iid}")
        yield wait_for(lambda: reader.of_type("delete", iid))
        stopped = [e for e in reader.of_type("update", iid) if e["instance"]["status"] == "stopped"]
        self.assertTrue(stopped)
        self.assertLess(reader.events.index(stopped[-1]), reader.events.index(reader.of_type("delete", iid)[0]))
        # shutdown ends the stream
        yield self.m.service.stopService()
        yield wait_for(lambda: reader.ended)
        self.assertEqual(reader.events[-1]["type"], "shutdown")
        self.assertIsNone(reader.events[-1]["instance"])
        for event in reader.events:
            self.assertRegex(event["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")

    @inlineCallbacks
    def test_long_log_is_split(self) -> Any:
        reader = yield self.m.subscribe()
        r = yield self.m.request("POST", "/instances", body={"url": SERVER_URL})
        iid = r.json()["id"]
        tunnel = FakeTunnel.instances[-1]
        text = "x\x1b" * 60000 + "END"
        tunnel.logger.info("%s", text)
        yield wait_for(lambda: any("END" in e["logs"] for e in reader.of_type("log", iid)))
        parts = [e["logs"] for e in reader.of_type("log", iid) if "x\x1b" in e["logs"]]
        self.assertGreater(len(parts), 1)
        self.assertIn(text, "".join(parts))
        for block in reader.raw.split(b"\n\n"):
            self.assertLess(len(block) + 2, EVENT_LIMIT)

    @inlineCallbacks
    def test_client_disconnect_is_noticed(self) -> Any:
        yield raw_request(
            self.m.service.address[1],
            b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\nX-API-Key: " + self.m.key.encode() + b"\r\n\r\n",
            until=b"retry: 3000\n\n",
        )
        yield wait_for(lambda: not self.m.service.events.subscribers)
        self.m.service.events.publish("update", {"id": "x"})

    @inlineCallbacks
    def test_key_rotation_disconnects(self) -> Any:
        reader = yield self.m.subscribe()
        yield wait_for(lambda: reader.of_type("initial"))
        r = yield self.m.request("PATCH", "/instances/********", body={"action": "restart"})
        new = r.json()["url"]
        yield wait_for(lambda: reader.ended)
        self.assertEqual(reader.events[-2]["type"], "update")
        self.assertEqual(reader.events[-2]["instance"]["url"], new)
        self.assertEqual(reader.events[-1]["type"], "shutdown")
        # reconnecting with the new key works
        again = yield self.m.subscribe(key=new)
        yield wait_for(lambda: again.of_type("initial"))


class SlowSubscriberTests(TestCase):
    @inlineCallbacks
    def test_stalled_reader_is_dropped_others_unaffected(self) -> Any:
        import socket


        m = start_master(self)
        hub = m.service.events
        hub.max_pending = 256 * 1024
        healthy = yield m.subscribe()
        yield wait_for(lambda: healthy.of_type("initial"))
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.setblocking(False)
        self.addCleanup(stalled.close)
        try:
            stalled.connect(("127.0.0.1", m.service.address[1]))
        except BlockingIOError:
            pass
        yield wait_for(lambda: stalled.fileno() >= 0)
        yield sleep(0.05)
        stalled.send(b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\nX-API-Key: " + m.key.encode() + b"\r\n\r\n")
        yield wait_for(lambda: len(hub.subscribers) == 2)
        line = "y" * 30000
        sent = 0
        while len(hub.subscribers) == 2 and sent < 2000:
            for _ in range(4):
                hub.publish("log", {"id": "flood"}, line)
                sent += 1
            # a healthy reader keeps up with the stream
            yield wait_for(lambda n=sent: len(healthy.of_type("log")) == n)  # type: ignore[misc]
        self.assertEqual(len(hub.subscribers), 1, "the stalled reader was not dropped")
        hub.publish("log", {"id": "flood"}, "last")
        yield wait_for(lambda: healthy.events and healthy.events[-1]["logs"] == "last", timeout=30)
        self.assertFalse(healthy.ended)
        r = yield m.request("GET", "/info")
        self.assertEqual(r.code, 200)


class WatchdogTests(TestCase):
    @inlineCallbacks
    def test_updates_keep_flowing_without_checkpoints(self) -> Any:
        FakeTunnel.instances = []
        m = start_master(self, settings=Settings(report_interval=0.1, shutdown_timeout=2.0))
        reader = yield m.subscribe()
        r = yield m.request("POST", "/instances", body={"url": SERVER_URL})
        iid = r.json()["id"]
        FakeTunnel.instances[-1].stats.tcptx = 77
        yield wait_for(lambda: len(reader.of_type("update", iid)) >= 4)
        self.assertEqual(reader.of_type("update", iid)[-1]["instance"]["tcptx"], 77)
        # a stopped instance is quiet
        yield m.request("PATCH", f"/instances/{iid}", body={"action": "stop"})
        yield wait_for(lambda: reader.of_type("update", iid)[-1]["instance"]["status"] == "stopped")
        count = len(reader.of_type("update", iid))
        d: Deferred[None] = Deferred()
        from twisted.internet import reactor

        reactor.callLater(0.4, d.callback, None)  # type: ignore[attr-defined]
        yield d
        self.assertEqual(len(reader.of_type("update", iid)), count,
                         [(e["time"], e["instance"]["status"]) for e in reader.of_type("update", iid)])


class _FakeRequest:
    """Just enough of a request for a subscriber."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None
        self.aborted = False
        self.finish_d: Deferred[None] = Deferred()
        self.channel = self
        self.transport = self

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def notifyFinish(self) -> Deferred[None]:
        return self.finish_d

    def abortConnection(self) -> None:
        self.aborted = True


class HubUnitTests(TestCase):
    def test_slow_subscriber_is_bounded_and_dropped(self) -> None:
        frame_size = len(encode_events("update", 0.0, {"id": "0"})[0])
        hub = EventHub(clock=lambda: 0.0, max_pending=5 * frame_size - len(b"retry: 3000\n\n"))
        slow, fast = _FakeRequest(), _FakeRequest()
        s_slow = hub.subscribe(slow, [])  # type: ignore[arg-type]
        hub.subscribe(fast, [])  # type: ignore[arg-type]
        s_slow.pauseProducing()
        for n in range(5):
            hub.publish("update", {"id": str(n)})
        self.assertEqual(len(s_slow.pending), 5)
        self.assertEqual(s_slow.pending_bytes, 5 * frame_size)
        self.assertFalse(slow.aborted)
        hub.publish("update", {"id": "overflow"})
        self.assertTrue(slow.aborted)
        self.assertEqual(len(hub.subscribers), 1)
        self.assertEqual(len(fast.written), 1 + 6)

    def test_initial_burst_is_not_bounded(self) -> None:
        hub = EventHub(clock=lambda: 0.0, max_pending=10)
        req = _FakeRequest()
        original = req.write

        def write_then_pause(data: bytes) -> None:
            original(data)
            req.producer.pauseProducing()

        req.write = write_then_pause  # type: ignore[method-assign]
        sub = hub.subscribe(req, [{"id": str(n), "pad": "p" * 1000} for n in range(100)])  # type: ignore[arg-type]
        self.assertFalse(req.aborted)
        self.assertEqual(len(sub.pending), 100)
        hub.publish("update", {"id": "more", "pad": "p" * 100})
        self.assertTrue(req.aborted)

    def test_paused_subscriber_resumes_in_order(self) -> None:
        hub = EventHub(clock=lambda: 0.0)
        req = _FakeRequest()
        sub = hub.subscribe(req, [{"id": "a"}])  # type: ignore[arg-type]
        sub.pauseProducing()
        hub.publish("update", {"id": "b"})
        hub.publish("log", {"id": "c"}, "line")
        self.assertEqual(len(req.written), 2)
        sub.resumeProducing()
        kinds = [json.loads(w.split(b"data: ", 1)[1])["type"] for w in req.written[1:]]
        self.assertEqual(kinds, ["initial", "update", "log"])

    def test_disconnect_forgets_subscriber(self) -> None:
        hub = EventHub(clock=lambda: 0.0)
        req = _FakeRequest()
        hub.subscribe(req, [])  # type: ignore[arg-type]
        req.finish_d.errback(Exception("gone"))
        self.assertEqual(hub.subscribers, [])
        hub.publish("update", {"id": "x"})

    def test_close_all_sends_shutdown(self) -> None:
        hub = EventHub(clock=lambda: 0.0)
        req = _FakeRequest()
        sub = hub.subscribe(req, [])  # type: ignore[arg-type]
        hub.close_all()
        self.assertTrue(sub.done.called)
        self.assertIn(b'"type":"shutdown"', req.written[-1])
        self.assertIn(b'"instance":null', req.written[-1])

    def test_split_frames_are_small_and_complete(self) -> None:
        text = "".join(f"line {n} " + "é" * 300 + "\n" for n in range(600))
        frames = encode_events("log", 0.0, {"id": "abcd1234"}, text)
        self.assertGreater(len(frames), 1)
        joined = ""
        for frame in frames:
            self.assertLess(len(frame), EVENT_LIMIT)
            self.assertTrue(frame.startswith(b"event: instance\ndata: "))
            self.assertTrue(frame.endswith(b"\n\n"))
            payload = frame[len(b"event: instance\ndata: "):-2]
            self.assertNotIn(b"\n", payload)
            joined += json.loads(payload)["logs"]
        self.assertEqual(joined, text)

    def test_rfc3339(self) -> None:
        import os
        import time

        old = os.environ.get("TZ")
        os.environ["TZ"] = "UTC"
        time.tzset()
        try:
            self.assertEqual(rfc3339(0.5), "1970-01-01T00:00:00.5Z")
            self.assertEqual(rfc3339(60.0), "1970-01-01T00:01:00Z")
        finally:
            if old is None:
                del os.environ["TZ"]
            else:
                os.environ["TZ"] = old
            time.tzset()
