"""Control signal encoding (JSON -> XOR key -> base64 -> line) against NodePass vectors."""

from __future__ import annotations

import base64

from twisted.trial import unittest

from nodepass.tunnel.signals import LineSplitter, Signal, SignalError, decode, encode, xor
from tests.support import quiet_logger


class VectorTests(unittest.TestCase):
    """Lines a Go NodePass v1.14 peer writes for the same signals."""

    def test_ping_secret(self) -> None:
        self.assertEqual(encode(Signal("ping"), "secret"), b"CEcCEREdHAtBSEcEGgsEUBg=\n")

    def test_flush_secret(self) -> None:
        self.assertEqual(encode(Signal("flush"), "secret"), b"CEcCEREdHAtBSEcSHxAQGkcJ\n")

    def test_tcp_secret(self) -> None:
        line = encode(Signal("tcp", remote="203.0.113.7:51234", id="9f86d081"), "secret")
        self.assertEqual(
            line,
            b"CEcCEREdHAtBSEcAEBVBXkcGFggMBgBWSUdRQlZaQ0tSQ1ZaRF9WQ1dHR0dPUAwQUV9BSwNMRQFTSlRWDg==\n",
        )

    def test_pong_default_key(self) -> None:
        self.assertEqual(encode(Signal("pong"), "e68be2b4"), b"HhRZARFbDVpHDBoSClwFFhg=\n")

    def test_decode_vectors(self) -> None:
        self.assertEqual(decode(b"CEcCEREdHAtBSEcEGgsEUBg=\n", "secret"), Signal("ping"))
        sig = decode(
            b"CEcCEREdHAtBSEcAEBVBXkcGFggMBgBWSUdRQlZaQ0tSQ1ZaRF9WQ1dHR0dPUAwQUV9BSwNMRQFTSlRWDg==\n",
            "secret",
        )
        self.assertEqual(sig, Signal("tcp", remote="203.0.113.7:51234", id="9f86d081"))


class CodecTests(unittest.TestCase):
    def test_field_order_and_omission(self) -> None:
        sig = Signal("verify", id="00ab12cd", fp="sha256:AA")
        self.assertEqual(sig.to_json(), b'{"action":"verify","id":"00ab12cd","fp":"sha256:AA"}')
        self.assertEqual(Signal("udp", remote="[::1]:5").to_json(), b'{"action":"udp","remote":"[::1]:5"}')

    def test_roundtrip(self) -> None:
        for sig in (Signal("ping"), Signal("udp", remote="[2001:db8::1]:53", id="ffffffff"),
                    Signal("verify", id="01020304", fp="sha256:" + ":".join(["AB"] * 32))):
            self.assertEqual(decode(encode(sig, "k3y"), "k3y"), sig)

    def test_xor_restarts_per_signal_and_is_involution(self) -> None:
        data = b"0123456789"
        self.assertEqual(xor(xor(data, "ab"), "ab"), data)
        self.assertEqual(xor(b"\x00\x00\x00", "ab"), b"aba")

    def test_wrong_key_fails_cleanly(self) -> None:
        line = encode(Signal("ping"), "secret")
        self.assertRaises(SignalError, decode, line, "other")

    def test_garbage(self) -> None:
        self.assertRaises(SignalError, decode, b"%%%not base64%%%\n", "secret")
        self.assertRaises(SignalError, decode, base64.b64encode(xor(b"[1,2]", "k")) + b"\n", "k")
        self.assertRaises(SignalError, decode, base64.b64encode(xor(b'{"action":5}', "k")) + b"\n", "k")

    def test_case_insensitive_and_unknown_keys(self) -> None:
        raw = b'{"ACTION":"tcp","Remote":"1.2.3.4:5","iD":"0badf00d","extra":1}'
        sig = decode(base64.b64encode(xor(raw, "k")) + b"\n", "k")
        self.assertEqual(sig, Signal("tcp", remote="1.2.3.4:5", id="0badf00d"))

    def test_line_splitter(self) -> None:
        s = LineSplitter(max_line=16)
        self.assertEqual(s.feed(b"ab"), [])
        self.assertEqual(s.feed(b"c\nde\nf"), [b"abc", b"de"])
        self.assertEqual(s.feed(b"\n"), [b"f"])
        self.assertRaises(SignalError, s.feed, b"x" * 40)


class FakePool:
    def __init__(self) -> None:
        self.active = 4
        self.errors = 0
        self.flushed = 0
        self.conns: dict[str, object] = {}

    def error_count(self) -> int:
        return self.errors

    def reset_error(self) -> None:
        self.errors = 0

    def flush(self) -> None:
        self.flushed += 1

    def has(self, cid: str) -> bool:
        return cid in self.conns

    def incoming_get(self, timeout: float, newest: bool = False) -> object:
        from twisted.internet import defer

        return defer.Deferred()  # no idle connection: our own verify waits

    def outgoing_get(self, cid: str, timeout: float) -> object:
        from twisted.internet import defer

        from nodepass.pool import PoolError

        if cid in self.conns:
            return defer.succeed(self.conns.pop(cid))
        return defer.fail(PoolError("OutgoingGet: pool connection not found"))


class FakeConn:
    def __init__(self, fp: str) -> None:
        self.fp = fp
        self.closed = False

    def peer_fingerprint(self) -> str:
        return self.fp

    def close(self) -> None:
        self.closed = True


class ControlChannelTests(unittest.TestCase):
    """The control channel on an in-memory transport with a fake clock."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from nodepass.env import Settings
        from nodepass.relay import RelayProtocol
        from nodepass.stats import TunnelStats
        from nodepass.tunnel.health import ControlChannel

        self.clock = Clock()
        self.records: list = []
        logger = quiet_logger("debug", self.records)
        self.conn = RelayProtocol()
        self.transport = StringTransport()
        self.conn.makeConnection(self.transport)
        self.pool = FakePool()
        self.stats = TunnelStats(mode=1)
        self.launched: list[Signal] = []
        self.failures: list[str] = []
        self.verified: list[bool] = []
        self.make = lambda tls=0, role="client": ControlChannel(
            reactor=self.clock, logger=logger, settings=Settings(report_interval=1.0, pool_get_timeout=1.0),
            stats=self.stats, key="secret", conn=self.conn, pool=self.pool, role=role, tls_code=tls,
            own_fingerprint=lambda: "sha256:SERVER", on_launch=self.launched.append,
            on_failure=self.failures.append, on_verified=lambda: self.verified.append(True),
        )

    def sent(self) -> list[Signal]:
        lines = self.transport.value().split(b"\n")[:-1]
        self.transport.clear()
        return [decode(line, "secret") for line in lines]

    def feed(self, *signals: Signal) -> None:
        self.conn.dataReceived(b"".join(encode(s, "secret") for s in signals))

    def test_ping_pong_checkpoint(self) -> None:
        ch = self.make()
        ch.start()
        self.assertEqual(self.sent(), [Signal("ping")])
        self.feed(Signal("ping"))
        self.assertEqual(self.sent(), [Signal("pong")])
        self.clock.advance(0.05)
        self.feed(Signal("pong"))
        events = [r.text for r in self.records if r.level.name == "EVENT"]
        self.assertEqual(events, ["CHECK_POINT|MODE=1|PING=50ms|POOL=4|TCPS=0|UDPS=0|TCPRX=0|TCPTX=0|UDPRX=0|UDPTX=0"])
        self.clock.advance(0.95)
        self.assertEqual(self.sent(), [Signal("ping")])
        ch.stop()

    def test_launch_and_garbage(self) -> None:
        ch = self.make()
        ch.start()
        self.sent()
        self.conn.dataReceived(b"!!not-a-signal!!\n")
        self.feed(Signal("tcp", remote="1.2.3.4:5", id="0a0b0c0d"), Signal("bogus"))
        self.assertEqual(self.launched, [Signal("tcp", remote="1.2.3.4:5", id="0a0b0c0d")])
        self.assertTrue(any(r.level.name == "ERROR" for r in self.records))
        self.assertEqual(self.failures, [])
        ch.stop()

    def test_flush_rule(self) -> None:
        ch = self.make()
        ch.start()
        self.sent()
        self.pool.errors = 3  # > 4 // 2
        self.clock.advance(1.0)
        self.assertEqual(self.sent(), [Signal("flush")])
        self.assertEqual((self.pool.flushed, self.pool.errors), (1, 0))
        self.clock.advance(1.0)  # one interval later the ping round resumes
        self.assertEqual(self.sent(), [Signal("ping")])
        self.feed(Signal("flush"))
        self.assertEqual(self.pool.flushed, 2)
        ch.stop()

    def test_silence_fails_after_three_intervals(self) -> None:
        ch = self.make()
        ch.start()
        self.clock.advance(2.9)
        self.assertEqual(self.failures, [])
        self.clock.advance(0.2)
        self.assertEqual(len(self.failures), 1)
        self.assertIn("read timeout", self.failures[0])
        ch.stop()

    def test_peer_close_fails(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        ch = self.make()
        ch.start()
        self.conn.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.failures, ["commonQueue: readBytes failed: EOF"])

    def test_verify_client_tls1(self) -> None:
        ch = self.make(tls=1, role="client")
        ch.start()
        self.pool.conns["00aa00aa"] = FakeConn("sha256:SERVER")
        self.feed(Signal("verify", id="00aa00aa", fp="sha256:SERVER"))
        self.assertEqual(self.verified, [True])
        self.pool.conns["00bb00bb"] = FakeConn("sha256:SERVER")
        self.feed(Signal("verify", id="00bb00bb", fp="sha256:EVIL"))
        self.assertEqual(len(self.failures), 1)
        self.assertIn("fingerprint mismatch", self.failures[0])

    def test_verify_tls2_client_ignores_empty_fp_and_does_not_send(self) -> None:
        """A v1.14.0 tls=2 server's verify (no fp): ignored, but the ingress goes back to
        oldest-first and the connection it named (closed by the peer) leaves the idle pool."""
        ch = self.make(tls=2, role="client")
        self.assertFalse(ch.sends_verify)
        self.assertFalse(ch.gates_ingress)
        ch.start()
        self.assertTrue(ch.newest_first)
        named = FakeConn("")
        self.pool.conns["00aa00aa"] = named
        self.feed(Signal("verify", id="00aa00aa"))
        self.assertEqual(self.failures, [])
        self.assertFalse(ch.newest_first)
        self.assertTrue(named.closed)
        self.assertNotIn("00aa00aa", self.pool.conns)
        self.assertEqual(self.verified, [])  # tls 2 never gated the ingress
        self.assertNotIn(Signal("verify"), [Signal(s.action) for s in self.sent()])
        ch.stop()

    def test_tls2_newest_first_ends_after_two_intervals_without_a_verify(self) -> None:
        for role in ("server", "client"):
            ch = self.make(tls=2, role=role)
            ch.start()
            self.clock.advance(1.9)
            self.assertTrue(ch.newest_first, role)
            self.clock.advance(0.2)
            self.assertFalse(ch.newest_first, role)
            self.assertEqual(self.verified, [], role)
            ch.stop()

    def test_tls2_server_back_to_oldest_first_after_a_matching_verify(self) -> None:
        ch = self.make(tls=2, role="server")
        ch.start()
        self.pool.conns["00cc00cc"] = FakeConn("")
        self.feed(Signal("verify", id="00cc00cc", fp="sha256:SERVER"))
        self.assertFalse(ch.newest_first)
        self.assertEqual(self.failures, [])
        ch.stop()
