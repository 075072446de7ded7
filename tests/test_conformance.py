"""Wire conformance against a scripted NodePass v1.14.0 peer (:mod:`tests.gopeer`).

The peer encodes the protocol on its own (standard library only), so these
tests pin the bytes a Go client or server would see from our server or
client: the handshake request/response, the 4-byte pool IDs, the signal
lines, ping/pong, the TLS ``verify`` exchange, TCP and UDP data on pool
connections, and that bad input from a peer is logged without stopping the
tunnel.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import defer, threads
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from nodepass.env import Settings
from nodepass.log import Level, LogRecord
from nodepass.tunnel import TunnelService, make_tunnel_service
from nodepass.url import parse_tunnel_url
from tests import gopeer
from tests.support import Echo as _PlainEcho
from tests.support import UdpEcho as _PlainUdpEcho
from tests.support import free_port, free_ports, make_cert_files, new_dir, quiet_logger, sleep

reactor: Any = _reactor

SETTINGS = Settings(report_interval=1.0, service_cooldown=0.5, handshake_timeout=5.0, pool_get_timeout=5.0)
FP_RE = re.compile(r"^sha256:([0-9A-F]{2}:){31}[0-9A-F]{2}$")
KEY = "secret"


class Echo(_PlainEcho):
    prefix = b"echo:"


class UDPEcho(_PlainUdpEcho):
    prefix = b"echo:"


def user_connect(port: int, timeout: float = gopeer.TIMEOUT, host: str = "127.0.0.1") -> socket.socket:
    """Connect a user to a listener that may not be open yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return gopeer.connect(port, host)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def user_retry(fn: Callable[[], Any], timeout: float = gopeer.TIMEOUT) -> Any:
    """Run a connecting step until the listener accepts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except (ConnectionRefusedError, ConnectionResetError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def open_session(peer: gopeer.GoClient, pool: int) -> gopeer.Control:
    """Handshake (retried until our server listens), dial *pool* pool connections, open the control."""
    user_retry(peer.handshake)
    for _ in range(pool):
        peer.dial_pool()
    return peer.start_control()


def user_to_peer(peer: gopeer.GoClient, ctl: gopeer.Control, uport: int, payload: bytes) -> bytes:
    """A user sends *payload* to our ingress *uport*; return what the peer reads on the announced pool connection."""
    user = user_connect(uport)
    user.sendall(payload)
    sig = ctl.expect("tcp")
    conn = peer.take(sig["id"])
    data = gopeer.recv_exact(conn, len(payload))
    conn.close()
    user.close()
    return data


def udp_user() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(gopeer.TIMEOUT)
    return sock


class Base(unittest.TestCase):
    timeout = 40

    def setUp(self) -> None:
        self.records: list[LogRecord] = []
        self.mark: int | None = None  # log lines before the peer hung up on purpose

    def service(self, url: str, settings: Settings = SETTINGS) -> TunnelService:
        logger = quiet_logger("debug", self.records)
        svc = make_tunnel_service(parse_tunnel_url(url), reactor=reactor, logger=logger, settings=settings)
        self.addCleanup(lambda: svc.running and svc.stopService())
        svc.startService()
        return svc

    def texts(self, level: Level | None = None) -> list[str]:
        return [r.text for r in self.records if level is None or r.level == level]

    def assertLogged(self, fragment: str, level: Level | None = None) -> None:
        if not any(fragment in t for t in self.texts(level)):
            self.fail(f"no log line with {fragment!r}: {self.texts()}")

    def assertNoRestart(self) -> None:
        texts = [r.text for r in self.records[: self.mark]]
        bad = [t for t in texts if " error:" in t and t.split(" error:")[0] in ("Server", "Client")]
        self.assertEqual(bad, [])

    def run_peer(self, fn: Callable[[], Any]) -> defer.Deferred[Any]:
        return threads.deferToThread(fn)

    @contextlib.contextmanager
    def hanging_up(self, peer: Any) -> Iterator[Any]:
        """Use *peer* in the block; on leaving it, mark the log (what follows may be caused by
        the peer hanging up on purpose, see :meth:`assertNoRestart`) and close the peer."""
        try:
            yield peer
        finally:
            self.mark = len(self.records)
            peer.close()

    def reverse_server(self, query: str = "") -> tuple[int, int]:
        """Start our server in mode 1 (key ``KEY``, extra *query*); return (tunnel port, ingress port)."""
        tport, uport = free_ports(2)
        self.service(f"server://{KEY}@127.0.0.1:{tport}/127.0.0.1:{uport}?mode=1{query}")
        return tport, uport

    def echo_targets(self) -> int:
        """A TCP and a UDP echo on one free port (the egress target)."""
        port = free_port()
        tcp = reactor.listenTCP(port, Factory.forProtocol(Echo), interface="127.0.0.1")
        udp = reactor.listenUDP(port, UDPEcho(), interface="127.0.0.1")
        self.addCleanup(tcp.stopListening)
        self.addCleanup(udp.stopListening)
        return port


# ---------------------------------------------------------------------------------------------
class GoClientToOurServer(Base):
    """A Go client (scripted) against our ``server://``."""

    def check_pool_ids(self, peer: gopeer.GoClient, n: int) -> list[str]:
        ids = [peer.dial_pool() for _ in range(n)]
        assert ids[0] == "00000000", ids
        for cid in ids[1:]:
            assert re.fullmatch(r"[0-9a-f]{8}", cid) and cid != "00000000", cid
        assert len(set(ids)) == n, ids
        return ids

    @defer.inlineCallbacks
    def test_reverse_handshake_ping_tcp_udp(self) -> Any:
        """Handshake bytes, pool IDs, ping/pong lines, `tcp` and `udp` sessions (flow -)."""
        tport, uport = self.reverse_server("&max=7&tls=0")
        result: dict[str, Any] = {}

        def script() -> None:
            with self.hanging_up(gopeer.GoClient(tport, KEY)) as peer:
                status, headers, body = user_retry(peer.handshake)
                result["status"], result["headers"], result["body"] = status, headers, body
                result["ids"] = self.check_pool_ids(peer, 4)
                ctl = peer.start_control()
                ctl.wait_pongs(1)
                # TCP: the user's bytes arrive raw on the signalled pool connection.
                user = user_connect(uport)
                user.sendall(b"hello from user")
                sig = ctl.expect("tcp")
                result["tcp_sig"] = sig
                result["tcp_line"] = next(x for x in ctl.lines if b'"tcp"' in x)
                result["user_port"] = user.getsockname()[1]
                result["oldest"] = peer.order[0]
                conn = peer.take(sig["id"])
                result["tcp_in"] = gopeer.recv_exact(conn, 15)
                conn.sendall(b"reply from target")
                result["tcp_out"] = gopeer.recv_exact(user, 17)
                conn.close()
                result["user_eof"] = gopeer.recv_until_close(user)
                user.close()
                # UDP: one datagram = one raw write, no framing.
                udp = udp_user()
                udp.sendto(b"datagram-1", ("127.0.0.1", uport))
                usig = ctl.expect("udp")
                result["udp_sig"] = usig
                result["udp_port"] = udp.getsockname()[1]
                uconn = peer.take(usig["id"])
                result["udp_in"] = uconn.recv(16384)
                uconn.sendall(b"datagram-reply")
                result["udp_out"] = udp.recvfrom(16384)[0]
                # A later datagram of the same peer rides the same pool connection, no new signal.
                udp.sendto(b"datagram-2", ("127.0.0.1", uport))
                result["udp_in2"] = uconn.recv(16384)
                result["udp_sigs"] = sum(1 for x in ctl.lines if b'"udp"' in x)
                udp.close()
                uconn.close()
                result["lines"] = list(ctl.lines)
                result["errors"] = list(ctl.errors)

        yield self.run_peer(script)
        self.assertEqual(result["status"], "HTTP/1.1 200 OK")
        self.assertEqual(result["headers"]["content-type"], "application/json")
        self.assertEqual(result["headers"]["connection"], "close")
        self.assertEqual(result["body"], b'{"flow":"-","max":7,"tls":"0","type":"0"}\n')
        self.assertEqual(result["headers"]["content-length"], str(len(result["body"])))
        decoded = json.loads(result["body"])
        self.assertIsInstance(decoded["max"], int)
        for k in ("flow", "tls", "type"):
            self.assertIsInstance(decoded[k], str)
        self.assertIn(b'{"action":"ping"}', result["lines"])
        self.assertIn(b'{"action":"pong"}', result["lines"])
        self.assertEqual(result["errors"], [])
        self.assertEqual(result["tcp_sig"]["id"], result["oldest"])  # ingress takes the oldest idle
        self.assertEqual(
            result["tcp_line"],
            b'{"action":"tcp","remote":"127.0.0.1:%d","id":"%s"}' % (result["user_port"],
                                                                     result["tcp_sig"]["id"].encode()),
        )
        self.assertEqual(result["tcp_in"], b"hello from user")
        self.assertEqual(result["tcp_out"], b"reply from target")
        self.assertEqual(result["user_eof"], b"")
        self.assertEqual(result["udp_sig"]["remote"], f"127.0.0.1:{result['udp_port']}")
        self.assertEqual(set(result["udp_sig"]), {"action", "remote", "id"})
        self.assertEqual(result["udp_in"], b"datagram-1")
        self.assertEqual(result["udp_out"], b"datagram-reply")
        self.assertEqual(result["udp_in2"], b"datagram-2")
        self.assertEqual(result["udp_sigs"], 1)
        self.assertLogged("CHECK_POINT|MODE=1|", Level.EVENT)
        self.assertNoRestart()

    @defer.inlineCallbacks
    def test_tls1_verify_then_tcp(self) -> Any:
        """tls=1: TLS 1.3 pool, `verify` both ways, ingress opens after our verify."""
        tport, uport = self.reverse_server("&tls=1")
        result: dict[str, Any] = {}

        def script() -> None:
            with self.hanging_up(gopeer.GoClient(tport, KEY, tls=True)) as peer:
                _, _, body = user_retry(peer.handshake)
                result["body"] = body
                self.check_pool_ids(peer, 6)  # verify (newest), tcp and udp each take one
                result["fps"] = set(peer.fps.values())
                result["tls_version"] = peer.pool[peer.order[0]].version()
                ctl = peer.start_control()
                ctl.wait_pongs(1)
                # Before our verify the ingress must not take users (refused, or held unsignalled).
                early: socket.socket | None = None
                try:
                    early = gopeer.connect(uport)
                    early.sendall(b"too early")
                except ConnectionRefusedError:
                    pass
                time.sleep(1.5)
                result["early_signals"] = [x for x in ctl.lines if b'"tcp"' in x]
                # Go's client sends its verify on its oldest idle connection and closes it.
                cid, conn = peer.take_oldest()
                ctl.send("verify", id=cid, fp=peer.fps[cid])
                conn.close()
                theirs = ctl.expect("verify")
                result["verify"] = theirs
                result["verify_line"] = next(x for x in ctl.lines if b'"verify"' in x)
                result["expected_fp"] = peer.fps[theirs["id"]]
                if theirs["id"] in peer.pool:
                    peer.take(theirs["id"]).close()
                if early is not None:
                    # Like a user waiting in Go's listen backlog: served once verified.
                    esig = ctl.expect("tcp")
                    econn = peer.take(esig["id"])
                    result["early_in"] = gopeer.recv_exact(econn, 9)
                    econn.close()
                    early.close()
                user = user_connect(uport)
                user.sendall(b"over tls")
                sig = ctl.expect("tcp")
                data_conn = peer.take(sig["id"])
                result["tcp_in"] = gopeer.recv_exact(data_conn, 8)
                data_conn.sendall(b"back over tls")
                result["tcp_out"] = gopeer.recv_exact(user, 13)
                user.close()
                data_conn.close()
                # UDP over a TLS pool connection: one record per datagram.
                udp = udp_user()
                udp.sendto(b"tls-dgram", ("127.0.0.1", uport))
                usig = ctl.expect("udp")
                uconn = peer.take(usig["id"])
                result["udp_in"] = uconn.recv(16384)
                uconn.sendall(b"tls-dgram-reply")
                result["udp_out"] = udp.recvfrom(16384)[0]
                udp.close()
                uconn.close()

        yield self.run_peer(script)
        self.assertEqual(result["body"], b'{"flow":"-","max":1024,"tls":"1","type":"0"}\n')
        self.assertEqual(result["tls_version"], "TLSv1.3")
        self.assertEqual(len(result["fps"]), 1)
        fp = next(iter(result["fps"]))
        self.assertRegex(fp, FP_RE)
        self.assertEqual(result["verify"]["fp"], fp)
        self.assertEqual(result["verify"]["fp"], result["expected_fp"])
        self.assertEqual(result["verify_line"],
                         b'{"action":"verify","id":"%s","fp":"%s"}' % (result["verify"]["id"].encode(),
                                                                        fp.encode()))
        self.assertEqual(result["early_signals"], [])
        # The target listener is bound from the start (as Go's is), so the early user waits, then flows.
        self.assertEqual(result.get("early_in"), b"too early")
        self.assertEqual(result["tcp_in"], b"over tls")
        self.assertEqual(result["tcp_out"], b"back over tls")
        self.assertEqual((result["udp_in"], result["udp_out"]), (b"tls-dgram", b"tls-dgram-reply"))
        self.assertLogged("TLS certificate fingerprint verified: " + fp, Level.INFO)
        self.assertNoRestart()

    @defer.inlineCallbacks
    def test_ipv6_user_remote_is_bracketed(self) -> Any:
        """The `remote` of a user on an IPv6 target listener reads `[::1]:port`."""
        tport, uport = free_port(), free_port("::1")
        self.service(f"server://{KEY}@127.0.0.1:{tport}/[::1]:{uport}?mode=1")
        result: dict[str, Any] = {}

        def script() -> None:
            with self.hanging_up(gopeer.GoClient(tport, KEY)) as peer:
                ctl = open_session(peer, 3)
                user = user_connect(uport, host="::1")
                user.sendall(b"v6")
                sig = ctl.expect("tcp")
                result["remote"], result["port"] = sig["remote"], user.getsockname()[1]
                conn = peer.take(sig["id"])
                result["in"] = gopeer.recv_exact(conn, 2)
                conn.close()
                user.close()

        yield self.run_peer(script)
        self.assertEqual(result["remote"], f"[::1]:{result['port']}")
        self.assertEqual(result["in"], b"v6")
        self.assertNoRestart()

    @defer.inlineCallbacks
    def test_forward_go_client_is_ingress(self) -> Any:
        """flow +: the Go client signals `tcp`/`udp`, our server dials its target."""
        target = self.echo_targets()
        tport = free_port()
        assert tport != target  # the echo listeners hold their port
        self.service(f"server://{KEY}@127.0.0.1:{tport}/127.0.0.1:{target}?mode=2")
        result: dict[str, Any] = {}

        def script() -> None:
            with self.hanging_up(gopeer.GoClient(tport, KEY)) as peer:
                _, _, body = user_retry(peer.handshake)
                result["body"] = body
                self.check_pool_ids(peer, 4)
                ctl = peer.start_control()
                cid, conn = peer.take_oldest()
                ctl.send("tcp", remote="203.0.113.7:51234", id=cid)
                conn.sendall(b"forward-tcp")  # Go writes at once, before the peer read the signal
                result["tcp"] = gopeer.recv_exact(conn, 16)
                conn.close()
                cid, conn = peer.take_oldest()
                ctl.send("udp", remote="203.0.113.7:5353", id=cid)
                conn.sendall(b"forward-udp")
                result["udp"] = conn.recv(16384)
                conn.close()
                ctl.wait_pongs(1)

        yield self.run_peer(script)
        self.assertEqual(result["body"], b'{"flow":"+","max":1024,"tls":"0","type":"0"}\n')
        self.assertEqual(result["tcp"], b"echo:forward-tcp")
        self.assertEqual(result["udp"], b"echo:forward-udp")
        self.assertLogged("CHECK_POINT|MODE=2|", Level.EVENT)
        self.assertNoRestart()


# ---------------------------------------------------------------------------------------------
class GoServerToOurClient(Base):
    """Our dual-end ``client://`` against a scripted Go server."""

    @defer.inlineCallbacks
    def test_reverse_flow_go_server_signals(self) -> Any:
        """flow -: request bytes, pool IDs, ping/pong, the Go server's `tcp`/`udp` reach our target."""
        target = self.echo_targets()
        peer = gopeer.GoServer(KEY, "-")
        self.addCleanup(peer.close)
        self.service(f"client://{KEY}@127.0.0.1:{peer.port}/127.0.0.1:{target}?mode=2&min=4")
        result: dict[str, Any] = {}

        def script() -> None:
            ctl = peer.start_control()
            ctl.wait_pongs(1)
            peer.wait_for(count=2)
            cid, conn = peer.take_oldest()
            ctl.send("tcp", remote="203.0.113.7:51234", id=cid)
            conn.sendall(b"to-client-target")
            result["tcp"] = gopeer.recv_exact(conn, 21)
            conn.close()
            peer.wait_for(count=1)
            cid, conn = peer.take_oldest()
            ctl.send("udp", remote="203.0.113.7:5353", id=cid)
            conn.sendall(b"dgram")
            result["udp"] = conn.recv(16384)
            conn.close()
            result["lines"] = list(ctl.lines)
            # Idle pool connections carry nothing from the client before use.
            with peer._cond:
                idle = list(peer.pool.values())
            early = []
            for sock in idle:
                sock.settimeout(0.2)
                try:
                    early.append(sock.recv(1))
                except (TimeoutError, ssl.SSLWantReadError):
                    pass
            result["idle"], result["early"] = len(idle), early

        yield self.run_peer(script)
        self.assertGreater(result["idle"], 0)
        self.assertEqual(result["early"], [])
        self.assertEqual(peer.request, gopeer.go_request(KEY, host="none"))
        self.assertIn(b'{"action":"ping"}', result["lines"])
        self.assertIn(b'{"action":"pong"}', result["lines"])
        self.assertEqual(result["tcp"], b"echo:to-client-target")
        self.assertEqual(result["udp"], b"echo:dgram")
        self.assertLogged("Loading tunnel config: FLOW=-|MAX=16|TLS=0|TYPE=0")
        self.assertLogged("CHECK_POINT|MODE=2|", Level.EVENT)
        self.assertNoRestart()

    @defer.inlineCallbacks
    def test_flush_from_go_server_then_refill(self) -> Any:
        """A `flush` closes our client's idle connections (EOF); it refills and serves."""
        target = self.echo_targets()
        peer = gopeer.GoServer(KEY, "-")
        self.addCleanup(peer.close)
        svc = self.service(f"client://{KEY}@127.0.0.1:{peer.port}/127.0.0.1:{target}?mode=2&min=3")
        result: dict[str, Any] = {}

        def idle_on_our_side() -> int:
            pool = svc.session.pool if svc.session is not None else None
            return pool.active if pool is not None else 0

        def script() -> None:
            ctl = peer.start_control()
            peer.wait_for(count=3)
            # A flush closes idle connections only: wait until our client has read
            # the IDs of the three the peer handed out (a loaded machine is slow).
            deadline = time.monotonic() + gopeer.TIMEOUT
            while idle_on_our_side() < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
            with peer._cond:
                old = [peer.pool.pop(c) for c in peer.order]
                peer.order.clear()
            ctl.send("flush")
            result["eofs"] = [gopeer.recv_until_close(sock) for sock in old]
            for sock in old:
                sock.close()
            # A connection dialled just before our client read the flush was closed
            # too (the same race exists between Go peers): skip closed ones.
            while True:
                cid, conn = peer.take_oldest()  # refilled with new IDs
                conn.settimeout(0.3)
                try:
                    closed = conn.recv(1) == b""
                except (TimeoutError, ssl.SSLWantReadError):
                    closed = False
                conn.settimeout(gopeer.TIMEOUT)
                if not closed:
                    break
                conn.close()
            result["cid"] = cid
            ctl.send("tcp", remote="203.0.113.7:51234", id=cid)
            conn.sendall(b"refilled")
            result["tcp"] = gopeer.recv_exact(conn, 13)
            conn.close()

        yield self.run_peer(script)
        self.assertGreaterEqual(len(result["eofs"]), 3)
        self.assertEqual(set(result["eofs"]), {b""})
        self.assertNotEqual(result["cid"], "00000000")
        self.assertEqual(result["tcp"], b"echo:refilled")
        self.assertNoRestart()

    @defer.inlineCallbacks
    def test_forward_flow_our_client_is_ingress(self) -> Any:
        """flow +: our client listens on its target and sends `tcp` with a Go-issued ID."""
        uport = free_port()
        peer = gopeer.GoServer(KEY, "+")
        self.addCleanup(peer.close)
        self.service(f"client://{KEY}@127.0.0.1:{peer.port}/127.0.0.1:{uport}?mode=2&min=4")
        result: dict[str, Any] = {}

        def script() -> None:
            ctl = peer.start_control()
            peer.wait_for(count=2)
            user = user_connect(uport)
            user.sendall(b"user->go")
            sig = ctl.expect("tcp")
            result["sig"] = sig
            result["line"] = next(x for x in ctl.lines if b'"tcp"' in x)
            result["user_port"] = user.getsockname()[1]
            conn = peer.take(sig["id"])
            result["in"] = gopeer.recv_exact(conn, 8)
            conn.sendall(b"go->user")
            result["out"] = gopeer.recv_exact(user, 8)
            conn.close()
            result["eof"] = gopeer.recv_until_close(user)
            user.close()

        yield self.run_peer(script)
        self.assertEqual(result["sig"], {"action": "tcp", "remote": f"127.0.0.1:{result['user_port']}",
                                         "id": result["sig"]["id"]})
        self.assertNotEqual(result["sig"]["id"], "00000000")
        self.assertEqual(result["line"], b'{"action":"tcp","remote":"127.0.0.1:%d","id":"%s"}'
                         % (result["user_port"], result["sig"]["id"].encode()))
        self.assertEqual(result["in"], b"user->go")
        self.assertEqual(result["out"], b"go->user")
        self.assertEqual(result["eof"], b"")
        self.assertNoRestart()


# ---------------------------------------------------------------------------------------------
class BadPeers(Base):
    """Bad input from a peer is logged; the tunnel keeps serving."""

    @defer.inlineCallbacks
    def test_wrong_token_then_good_handshake(self) -> Any:
        tport, uport = free_ports(2)
        # No key in the URL: both ends derive it from the port text.
        self.service(f"server://127.0.0.1:{tport}/127.0.0.1:{uport}?mode=1")
        result: dict[str, Any] = {}

        def script() -> None:
            with self.hanging_up(gopeer.GoClient(tport, gopeer.fnv_key(str(tport)))) as peer:
                result["bad"] = user_retry(lambda: peer.handshake(bearer=gopeer.token("other")))
                result["good"] = peer.handshake()
                assert peer.dial_pool() == "00000000"
                ctl = peer.start_control()
                ctl.wait_pongs(1)  # signals XORed with the derived key decode both ways
                result["errors"] = list(ctl.errors)
                # Single client only: a second handshake now gets raw pool ID bytes.
                late = gopeer.connect(tport)
                late.sendall(gopeer.go_request(peer.key))
                data = b""
                try:
                    while chunk := late.recv(4096):
                        data += chunk
                except ConnectionResetError:
                    pass  # we drop a pool connection that talks before use
                result["late"] = data
                late.close()
                before = ctl.pongs
                ctl.wait_pongs(before + 1)  # the running session is unaffected

        yield self.run_peer(script)
        status, headers, body = result["bad"]
        self.assertEqual(status, "HTTP/1.1 401 Unauthorized")
        self.assertEqual(headers["connection"], "close")
        self.assertEqual(body, b"Unauthorized\n")
        self.assertEqual(headers["content-type"], "text/plain; charset=utf-8")
        self.assertEqual(headers["x-content-type-options"], "nosniff")
        self.assertEqual(result["good"][0], "HTTP/1.1 200 OK")
        self.assertEqual(result["errors"], [])
        self.assertIn(len(result["late"]), (0, 4))  # an ID or nothing, never an HTTP answer
        self.assertNotEqual(result["late"], b"\0\0\0\0")
        self.assertNoRestart()
        self.assertLogged("unauthorized", Level.WARN)

    @defer.inlineCallbacks
    def test_bad_control_lines_are_skipped(self) -> Any:
        tport, uport = self.reverse_server()
        result: dict[str, Any] = {}

        def script() -> None:
            with self.hanging_up(gopeer.GoClient(tport, KEY)) as peer:
                ctl = open_session(peer, 3)
                ctl.wait_pongs(1)
                ctl.send_raw(b"!!not base64!!\n")
                ctl.send_raw(gopeer.encode_line(b"not json", KEY))
                ctl.send("dance", id="12345678")
                ctl.send_raw(b"A" * 300000 + b"\n")
                before = ctl.pongs
                ctl.send("ping")
                ctl.wait_pongs(before + 1)
                result["in"] = user_to_peer(peer, ctl, uport, b"still alive")

        yield self.run_peer(script)
        self.assertEqual(result["in"], b"still alive")
        errors = self.texts(Level.ERROR)
        self.assertTrue(any("base64" in t for t in errors), errors)
        self.assertTrue(any("unmarshal signal failed" in t for t in errors), errors)
        self.assertTrue(any("longer than" in t for t in errors), errors)
        self.assertLogged("dance")
        self.assertNoRestart()


# ---------------------------------------------------------------------------------------------
class ServerPoolAndHealth(Base):
    """Pool and health rules of our server as a Go client sees them."""

    @defer.inlineCallbacks
    def test_tls2_server_verify_carries_its_certificate_and_holds_users_briefly(self) -> Any:
        crt, key, der = make_cert_files(new_dir(self))
        tport, uport = self.reverse_server(f"&tls=2&crt={crt}&key={key}")
        result: dict[str, Any] = {}

        def script() -> None:
            with self.hanging_up(gopeer.GoClient(tport, KEY, tls=True)) as peer:
                _, _, result["body"] = user_retry(peer.handshake)
                for _ in range(4):
                    peer.dial_pool()
                result["fps"] = set(peer.fps.values())
                ctl = peer.start_control()
                # No verify from the peer (as after v1.14.0): the ingress opens anyway, after
                # at most two report intervals.
                result["in"] = user_to_peer(peer, ctl, uport, b"tls2")
                result["verify"] = ctl.expect("verify")

        yield self.run_peer(script)
        self.assertEqual(result["body"], b'{"flow":"-","max":1024,"tls":"2","type":"0"}\n')
        self.assertEqual(result["fps"], {gopeer.fingerprint(der)})
        self.assertEqual(result["in"], b"tls2")
        self.assertEqual(result["verify"]["fp"], gopeer.fingerprint(der))
        self.assertNoRestart()

    @defer.inlineCallbacks
    def test_tls2_ingress_waits_for_the_peers_verify(self) -> Any:
        """Regression: a v1.14.0 client sends one `verify`, at its first report tick, on the idle pool
        connection it takes the ingress way (its oldest) and then closes it.  tls=2 used to let our
        ingress pair an early user with that very connection, and the user got nothing back.  Now,
        until the peer's `verify`, the ingress takes the newest idle connection: the early user is
        served at once, on another connection."""
        crt, key, _der = make_cert_files(new_dir(self))
        tport, uport = free_ports(2)
        self.service(f"server://{KEY}@127.0.0.1:{tport}/127.0.0.1:{uport}?mode=1&tls=2&crt={crt}&key={key}",
                     settings=SLOW_REPORTS)
        result: dict[str, Any] = {}

        def script() -> None:
            with self.hanging_up(gopeer.GoClient(tport, KEY, tls=True)) as peer:
                result["in"], result["early"], result["sig"], result["verify_id"] = early_user_around_verify(
                    peer.start_control, peer, uport, fp=lambda cid: peer.fps[cid], prepare=lambda: [
                        user_retry(peer.handshake), *[peer.dial_pool() for _ in range(4)]])

        yield self.run_peer(script)
        self.assertEqual(len(result["early"]), 1)  # not held back
        self.assertNotEqual(result["sig"]["id"], result["verify_id"])
        self.assertEqual(result["in"], (b"early user", b"served"))
        self.assertNoRestart()

    @defer.inlineCallbacks
    def test_flush_closes_idle_connections_and_ids_stay_random(self) -> Any:
        tport, uport = self.reverse_server()
        result: dict[str, Any] = {}

        def script() -> None:
            with self.hanging_up(gopeer.GoClient(tport, KEY)) as peer:
                ctl = open_session(peer, 4)
                ctl.wait_pongs(1)
                ctl.send("flush")
                result["eofs"] = [gopeer.recv_until_close(peer.take(c)) for c in list(peer.order)]
                # The pool lives on: new connections get random IDs, never 00000000 again.
                result["new_ids"] = [peer.dial_pool() for _ in range(2)]
                result["in"] = user_to_peer(peer, ctl, uport, b"after flush")

        yield self.run_peer(script)
        self.assertEqual(result["eofs"], [b"", b"", b""])
        self.assertNotIn("00000000", result["new_ids"])
        self.assertEqual(result["in"], b"after flush")
        self.assertNoRestart()

    @defer.inlineCallbacks
    def test_unknown_id_counts_an_error_and_triggers_flush(self) -> Any:
        target = self.echo_targets()
        tport = free_port()
        assert tport != target  # the echo listeners hold their port
        fast_get = Settings(report_interval=1.0, service_cooldown=0.5, handshake_timeout=5.0, pool_get_timeout=0.5)
        self.service(f"server://{KEY}@127.0.0.1:{tport}/127.0.0.1:{target}?mode=2", fast_get)
        result: dict[str, Any] = {}

        def script() -> None:
            with self.hanging_up(gopeer.GoClient(tport, KEY)) as peer:
                ctl = open_session(peer, 2)
                ctl.send("tcp", remote="203.0.113.7:51234", id="deadbeef")
                result["flush"] = ctl.expect("flush")
                result["flush_line"] = next(x for x in ctl.lines if b"flush" in x)
                # Our idle connection was flushed too.
                result["eof"] = gopeer.recv_until_close(peer.take(peer.order[0]))

        yield self.run_peer(script)
        self.assertEqual(result["flush_line"], b'{"action":"flush"}')
        self.assertEqual(result["eof"], b"")
        self.assertNoRestart()

    @defer.inlineCallbacks
    def test_silent_control_restarts_and_serves_a_new_handshake(self) -> Any:
        tport, uport = self.reverse_server()
        result: dict[str, Any] = {}

        def script() -> None:
            peer = gopeer.GoClient(tport, KEY)
            try:
                user_retry(peer.handshake)
                peer.dial_pool()
                control = peer.pool["00000000"]
                # Never write: after 3 report intervals the server gives up on us.
                control.settimeout(gopeer.TIMEOUT)
                received = b""
                try:
                    while chunk := control.recv(4096):
                        received += chunk
                except ConnectionResetError:
                    pass  # the server may reset rather than close; both end the session
                result["pings"] = [gopeer.decode_line(x, KEY) for x in received.splitlines()]
                again = gopeer.GoClient(tport, KEY)
                try:
                    result["status"] = user_retry(again.handshake)[0]
                    result["first"] = again.dial_pool()
                finally:
                    again.close()
            finally:
                peer.close()

        yield self.run_peer(script)
        self.assertTrue(result["pings"])
        self.assertEqual(set(result["pings"]), {b'{"action":"ping"}'})
        self.assertEqual(result["status"], "HTTP/1.1 200 OK")
        self.assertEqual(result["first"], "00000000")
        self.assertLogged("read timeout", Level.ERROR)
        self.assertLogged("Server restart: ", Level.INFO)


# ---------------------------------------------------------------------------------------------
class ClientTLSVerify(Base):
    """Our client with a tls=1 Go server: `verify` both ways, mismatch aborts."""

    def go_server(self, flow: str) -> tuple[gopeer.GoServer, str]:
        crt, key, der = make_cert_files(new_dir(self))
        peer = gopeer.GoServer(KEY, flow, tls=(crt, key))
        self.addCleanup(peer.close)
        return peer, gopeer.fingerprint(der)

    @defer.inlineCallbacks
    def test_verify_exchange_opens_ingress(self) -> Any:
        uport = free_port()
        peer, fp = self.go_server("+")
        self.service(f"client://{KEY}@127.0.0.1:{peer.port}/127.0.0.1:{uport}?mode=2&min=4")
        result: dict[str, Any] = {}

        def script() -> None:
            ctl = peer.start_control()
            peer.wait_for(count=3)
            cid, conn = peer.take_oldest()
            ctl.send("verify", id=cid, fp=fp)  # Go's server: its own certificate
            conn.close()
            result["verify"] = ctl.expect("verify")
            result["verify_line"] = next(x for x in ctl.lines if b'"verify"' in x)
            user = user_connect(uport)
            user.sendall(b"tls1 user")
            sig = ctl.expect("tcp")
            conn = peer.take(sig["id"])
            result["in"] = gopeer.recv_exact(conn, 9)
            conn.sendall(b"ok")
            result["out"] = gopeer.recv_exact(user, 2)
            user.close()
            conn.close()

        yield self.run_peer(script)
        v = result["verify"]
        self.assertEqual(v["fp"], fp)
        self.assertEqual(result["verify_line"], b'{"action":"verify","id":"%s","fp":"%s"}' % (v["id"].encode(),
                                                                                          fp.encode()))
        self.assertEqual((result["in"], result["out"]), (b"tls1 user", b"ok"))
        self.assertEqual(set(peer.sni), {None})  # tls=1: no SNI
        self.assertEqual(set(peer.versions), {"TLSv1.3"})
        self.assertLogged("TLS certificate fingerprint verified: " + fp, Level.INFO)
        self.assertNoRestart()

    @defer.inlineCallbacks
    def test_fingerprint_mismatch_aborts_the_session(self) -> Any:
        uport = free_port()
        peer, fp = self.go_server("+")
        self.service(f"client://{KEY}@127.0.0.1:{peer.port}/127.0.0.1:{uport}?mode=2&min=4")
        wrong = "sha256:" + ":".join(["00"] * 32)

        def script() -> None:
            ctl = peer.start_control()
            peer.wait_for(count=2)
            cid, conn = peer.take_oldest()
            ctl.send("verify", id=cid, fp=wrong)
            conn.close()

        yield self.run_peer(script)
        yield wait_until(lambda: any("Client error:" in t for t in self.texts(Level.ERROR)))
        self.assertLogged("certificate fingerprint mismatch", Level.ERROR)


    @defer.inlineCallbacks
    def test_tls2_ingress_waits_for_the_go_servers_verify(self) -> Any:
        """Regression (forward flow, our client is the ingress): a v1.14.0 tls=2 server sends its
        `verify` without a fingerprint on its oldest idle connection and closes it; our client
        serves early users on its newest connection meanwhile, ignores the missing fingerprint
        and drops the named connection."""
        crt, key, _der = make_cert_files(new_dir(self))
        old = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = crt
        self.addCleanup(lambda: os.environ.__setitem__("SSL_CERT_FILE", old) if old is not None
                        else os.environ.pop("SSL_CERT_FILE", None))
        uport = free_port()
        peer = gopeer.GoServer(KEY, "+", tls=(crt, key), tls_code="2")
        self.addCleanup(peer.close)
        svc = self.service(f"client://{KEY}@127.0.0.1:{peer.port}/127.0.0.1:{uport}?mode=2&min=4&sni=localhost",
                           settings=SLOW_REPORTS)
        result: dict[str, Any] = {}

        def prepare() -> None:
            peer.wait_for(count=4)  # the control connection and three members
            # Our client must have read those members' IDs too: with a single idle
            # member its newest is the peer's oldest (a loaded machine is slow).
            deadline = time.monotonic() + gopeer.TIMEOUT
            while time.monotonic() < deadline:
                pool = svc.session.pool if svc.session is not None else None
                if pool is not None and pool.active >= 3:
                    break
                time.sleep(0.02)

        def script() -> None:
            result["in"], result["early"], result["sig"], result["verify_id"] = early_user_around_verify(
                peer.start_control, peer, uport, fp=lambda cid: "", prepare=prepare)

        yield self.run_peer(script)
        self.assertEqual(len(result["early"]), 1)  # not held back
        self.assertNotEqual(result["sig"]["id"], result["verify_id"])
        self.assertEqual(result["in"], (b"early user", b"served"))
        self.assertLogged("TLS verify signal without fingerprint ignored", Level.DEBUG)
        self.assertNoRestart()


SLOW_REPORTS = Settings(report_interval=5.0, service_cooldown=0.5, handshake_timeout=5.0, pool_get_timeout=5.0)
"""Settings whose first report tick (and the end of tls=2 newest-first) comes well after a test's early user."""


def early_user_around_verify(start_control: Callable[[], gopeer.Control], peer: Any, uport: int, *,
                             fp: Callable[[str], str], prepare: Callable[[], Any]) -> tuple[Any, ...]:
    """A user connects before the peer's `verify`; the peer then sends that `verify` the v1.14.0 way
    (its oldest idle connection, fingerprint from *fp*, connection closed) and serves the user.

    Returns ((bytes the peer read, bytes the user got back), the `tcp` lines seen before the
    verify, the `tcp` signal, the ID the verify named)."""
    prepare()
    ctl = start_control()
    user = user_connect(uport)
    user.sendall(b"early user")
    time.sleep(1.0)
    early = [x for x in ctl.lines if b'"tcp"' in x]
    cid, conn = peer.take_oldest()
    ctl.send("verify", id=cid, fp=fp(cid))
    conn.close()
    sig = ctl.expect("tcp")
    if sig["id"] == cid:  # the user was paired with the connection the verify used up
        user.close()
        return (b"", b""), early, sig, cid
    data_conn = peer.take(sig["id"])
    got = gopeer.recv_exact(data_conn, 10)
    data_conn.sendall(b"served")
    back = gopeer.recv_exact(user, 6)
    data_conn.close()
    user.close()
    return (got, back), early, sig, cid


@defer.inlineCallbacks
def wait_until(cond: Callable[[], bool], timeout: float = gopeer.TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        yield sleep(0.05)


class PeerSelfCheck(unittest.TestCase):
    """The scripted peer's own encoding reproduces the published test vectors."""

    def test_vectors(self) -> None:
        self.assertEqual([gopeer.fnv_key(p) for p in ("10101", "443", "8080")],
                         ["e68be2b4", "2339c1b2", "40c0f1e5"])
        self.assertEqual(gopeer.token("secret"),
                         "f9e66e179b6747ae54108f82f8ade8b3c25d76fd30afde6c395822c530196169")
        self.assertEqual(gopeer.token("e68be2b4"),
                         "8940572756af096447802f92b4c843ac61de93b80af9d37a85ed994508656d7e")
        enc = gopeer.encode_line
        self.assertEqual(enc(gopeer.signal_json("ping"), "secret"), b"CEcCEREdHAtBSEcEGgsEUBg=\n")
        self.assertEqual(enc(gopeer.signal_json("flush"), "secret"), b"CEcCEREdHAtBSEcSHxAQGkcJ\n")
        self.assertEqual(
            enc(gopeer.signal_json("tcp", remote="203.0.113.7:51234", id="9f86d081"), "secret"),
            b"CEcCEREdHAtBSEcAEBVBXkcGFggMBgBWSUdRQlZaQ0tSQ1ZaRF9WQ1dHR0dPUAwQUV9BSwNMRQFTSlRWDg==\n",
        )
        self.assertEqual(enc(gopeer.signal_json("pong"), "e68be2b4"), b"HhRZARFbDVpHDBoSClwFFhg=\n")
        self.assertEqual(gopeer.decode_line(b"HhRZARFbDVpHDBoSClwFFhg=\n", "e68be2b4"), b'{"action":"pong"}')
        self.assertRegex(gopeer.fingerprint(b"x"), FP_RE)
