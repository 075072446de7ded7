"""Interop with the real Go NodePass v1.14.0 binary over the TCP pool (type 0).

Every test skips, naming the missing file, when the binary is not there (see
:mod:`tests.goharness`).  Each test runs its independent pairs at once, and
every pair carries: a first echo (retried within the harness budget, since Go
holds user traffic until its certificate check passes), 1 MiB echoed and
compared by SHA-256, 50 concurrent echoes, UDP datagrams both ways, and the
traffic counters of both ends must grow by exactly the bytes moved.

Our end runs in this process for the plain (tls=0) pairs, so its live
counters are read, and as ``python -m nodepass`` for the others, so its
CHECK_POINT lines are read, as Go's always are.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from tests.goharness import (
    GO_PEER_ENV,
    CheckPoint,
    EchoUser,
    MasterAPI,
    MasterInstance,
    Peer,
    Traffic,
    TunnelPair,
    _main_checkout,
    exercise,
    go_peer_path,
    go_peer_problem,
    probe,
    record,
    run_master,
    skip_unless_go,
)
from tests.support import connect, make_cert_files, new_dir, reactor, sleep

VERIFIED = re.compile(r"TLS certificate fingerprint verified: (sha256:[0-9A-F:]+)")


def gather(ds: list[defer.Deferred[Any]]) -> defer.Deferred[list[Any]]:
    """All results of *ds*; the first failure is raised as itself (not wrapped in FirstError)."""

    def unwrap(failure: Failure) -> Failure:
        sub: Failure = failure.value.subFailure
        return sub

    return defer.gatherResults(ds, consumeErrors=True).addErrback(unwrap)


class InteropCase(TestCase):
    timeout = 180

    def setUp(self) -> None:
        skip_unless_go()

    def assertHealthy(self, peer: Peer) -> None:
        """*peer* still runs and never printed a Python traceback."""
        self.assertTrue(peer.alive, f"{peer.describe()} ended:\n{peer.tail()}")
        self.assertEqual(peer.grep("Traceback"), [], f"{peer.describe()} printed a traceback:\n{peer.tail()}")

    def ours(self, pair: TunnelPair) -> Peer:
        peer = pair.server if pair.server_kind != "go" else pair.client
        assert peer is not None
        return peer

    def go(self, pair: TunnelPair) -> Peer:
        peer = pair.server if pair.server_kind == "go" else pair.client
        assert peer is not None
        return peer


class TCPPoolTests(InteropCase):
    """Our server with the Go client and the Go server with our client, both flows, tls 0 and 1."""

    @defer.inlineCallbacks
    def both_flows(self, server: str, client: str, tls: int) -> Any:
        pairs = [TunnelPair(self, server=server, client=client, flow=flow, tls=tls) for flow in "-+"]
        results = yield gather([exercise(p) for p in pairs])
        for pair, result in zip(pairs, results, strict=True):
            self.assertEqual(result.tcp_bytes, (1 << 20) + 50 * 8192)
            for peer in pair.peers:
                self.assertHealthy(peer)
            if tls:
                # Both ends checked the one server certificate.
                seen = {m.group(1) for p in pair.peers for line in p.grep(VERIFIED)
                        if (m := VERIFIED.search(line))}
                self.assertEqual(len(seen), 1, f"{pair.label}: fingerprints verified: {seen}\n{pair.logs()}")
                for peer in pair.peers:
                    self.assertTrue(peer.grep(VERIFIED), f"{peer.describe()} never verified:\n{peer.tail()}")

    def test_our_server_go_client_tls0(self) -> Any:
        return self.both_flows("inproc", "go", 0)

    def test_our_server_go_client_tls1(self) -> Any:
        return self.both_flows("ours", "go", 1)

    def test_go_server_our_client_tls0(self) -> Any:
        return self.both_flows("go", "inproc", 0)

    def test_go_server_our_client_tls1(self) -> Any:
        return self.both_flows("go", "ours", 1)


class RestartTests(InteropCase):
    """One end stops (SIGTERM) and starts again; the other end reconnects by itself."""

    @defer.inlineCallbacks
    def restart_and_reconnect(self, pair: TunnelPair, which: str) -> Any:
        yield exercise(pair, big=65536, concurrent=5, each=1024, counters=False)
        survivor = pair.client if which == "server" else pair.server
        assert survivor is not None
        mark = survivor.mark()
        status = yield pair.restart(which)
        if status is not None:  # a process (in-process ends have no exit status)
            self.assertEqual(status, (0, None), f"{which} did not exit cleanly on SIGTERM:\n{pair.logs()}")
        since = reactor.seconds()
        # The survivor notices the loss and starts a new session (Go and we log alike).
        word = "Client" if which == "server" else "Server"
        yield survivor.wait_line(rf"{word} error:", start=mark)
        again = yield probe(pair.user_port, b"after restart " + os.urandom(8), since=since)
        yield survivor.wait_line(r"Marking tunnel handshake as complete", start=mark)
        self.assertHealthy(survivor)
        record(self, "restart", label=pair.label, restarted=which, first_byte=again.first_byte,
               attempts=again.attempts)

    def test_go_client_reconnects_to_restarted_our_server(self) -> Any:
        """Our server (a process, stopped by SIGTERM) restarts under a Go client; our server also
        takes a restarted Go client."""
        server_restarts = TunnelPair(self, server="ours", client="go", tls=1)
        client_restarts = TunnelPair(self, server="inproc", client="go", tls=1)
        return gather([self.restart_and_reconnect(server_restarts, "server"),
                       self.restart_and_reconnect(client_restarts, "client")])

    def test_our_client_reconnects_to_restarted_go_server(self) -> Any:
        """A Go server restarts under our client; a Go server also takes our restarted client (a
        process, stopped by SIGTERM)."""
        server_restarts = TunnelPair(self, server="go", client="inproc", tls=1)
        client_restarts = TunnelPair(self, server="go", client="ours", tls=1)
        return gather([self.restart_and_reconnect(server_restarts, "server"),
                       self.restart_and_reconnect(client_restarts, "client")])


@defer.inlineCallbacks
def no_echo(port: int, seconds: float) -> Any:
    """Fires with the bytes a user got back within *seconds* through *port* (b"" when refused)."""
    user = EchoUser(b"anyone there?")
    try:
        yield connect(port, user, timeout=5.0)
    except Exception:
        return b""
    yield sleep(seconds)
    user.close()
    return user.data


class TLS2Tests(InteropCase):
    """tls=2 with a certificate of our own (SAN ``localhost``) against the Go binary.

    Go's client verifies the chain (system roots, or ``SSL_CERT_FILE``) and
    the name given by ``sni``; so does ours.  Go's tls=2 server sends its
    ``verify`` without a fingerprint, so in reverse flow it never lets users
    in.  The handshake timeout is 2 s here so failing pairs retry quickly.
    """

    env = {"NP_HANDSHAKE_TIMEOUT": "2s"}

    def pair(self, server: str, client: str, flow: str, trusted: bool) -> TunnelPair:
        crt, key, _ = make_cert_files(new_dir(self))
        return TunnelPair(self, server=server, client=client, flow=flow, tls=2,
                          server_params=f"&crt={crt}&key={key}", client_params="&sni=localhost", env=self.env,
                          client_env={"SSL_CERT_FILE": crt} if trusted else {},
                          label=f"{server} server tls=2 + {client} client {'trusting' if trusted else 'not trusting'}"
                                f" the certificate, {'reverse' if flow == '-' else 'forward'}")

    @defer.inlineCallbacks
    def fails_cleanly(self, pair: TunnelPair, who: str) -> Any:
        """The pair never carries traffic; *who* (our end, ``"Server"``/``"Client"``) logs each failed
        session at ERROR and starts a new one, and neither process dies."""
        yield pair.start()
        ours, go = self.ours(pair), self.go(pair)
        yield ours.wait_count(rf"ERROR  {who} error: .*handshake timeout", 2)
        yield ours.wait_line(rf"INFO  {who} restart:")
        got = yield no_echo(pair.user_port, 2.0)
        self.assertEqual(got, b"", pair.logs())
        self.assertHealthy(ours)
        self.assertTrue(go.alive, pair.logs())
        self.assertTrue(go.grep(r"ERROR  (Server|Client) error:"), pair.logs())
        record(self, "tls2-fails", label=pair.label, errors=sorted(set(
            re.sub(r"\d+\.\d+\.\d+\.\d+:\d+", "ADDR", line.split("  ", 2)[-1])
            for line in ours.grep(r"ERROR  "))))

    @defer.inlineCallbacks
    def never_lets_users_in(self, pair: TunnelPair) -> Any:
        """Go server tls=2, reverse: the session stays up, our client ignores the empty verify,
        and users are held (never answered)."""
        yield pair.start()
        ours, go = self.ours(pair), self.go(pair)
        yield go.wait_line(r"TLS verify signal: cid \w+ ->")
        yield ours.wait_line(r"TLS verify signal without fingerprint ignored")
        got = yield no_echo(pair.user_port, 3 * 1.0 + 1.0)
        self.assertEqual(got, b"", pair.logs())
        for peer in pair.peers:
            self.assertHealthy(peer)
            self.assertEqual(peer.grep(r"ERROR  "), [], pair.logs())
        record(self, "tls2-held", label=pair.label)

    def test_our_tls2_server_with_go_client(self) -> Any:
        """Trusted: a Go client carries traffic with our tls=2 server.  Untrusted: Go's TLS handshakes
        fail, both ends time out the handshake and retry, and our server keeps running."""
        return gather([
            exercise(self.pair("inproc", "go", "-", trusted=True)),
            self.fails_cleanly(self.pair("inproc", "go", "-", trusted=False), "Server"),
        ])

    def test_go_tls2_server_with_our_client(self) -> Any:
        """Forward flow works (our ingress is not held for tls=2); reverse flow never admits users
        (Go's ingress waits for a verify that cannot pass); untrusted, our client retries cleanly."""
        return gather([
            exercise(self.pair("go", "ours", "+", trusted=True)),
            self.never_lets_users_in(self.pair("go", "ours", "-", trusted=True)),
            self.fails_cleanly(self.pair("go", "ours", "+", trusted=False), "Client"),
        ])


class MasterTests(InteropCase):
    """The Go master and ours each run the same server instance for a Go client."""

    @defer.inlineCallbacks
    def through_master(self, kind: str) -> Any:
        api = yield MasterAPI.connect(self, run_master(self, kind))
        pair = TunnelPair(self, server=api, client="go", tls=1)
        yield exercise(pair, big=1 << 18, concurrent=10, each=4096)
        server = pair.server
        assert isinstance(server, MasterInstance)
        code, instance = yield api.call("GET", f"/instances/{server.id}")
        self.assertEqual(code, 200, instance)
        return pair, instance

    @defer.inlineCallbacks
    def test_masters_report_the_same_instance(self) -> Any:
        """Through both masters the tunnel carries traffic; the counters each master reports (in its
        ``update`` events and GET /instances/{id}) equal the bytes moved; the instance objects have
        the same keys and the same status, type and mode."""
        (go_pair, go), (our_pair, ours) = yield gather([self.through_master("go"), self.through_master("ours")])
        self.assertEqual(sorted(ours), sorted(go))
        for field in ("status", "type", "mode"):
            self.assertEqual(ours[field], go[field], field)
        for pair, instance in ((go_pair, go), (our_pair, ours)):
            reported = Traffic(instance["tcprx"], instance["tcptx"], instance["udprx"], instance["udptx"])
            self.assertEqual(reported, pair.ingress.traffic(), pair.logs())


class HarnessTests(TestCase):
    """The harness's own parsing and lookup (no Go binary needed)."""

    def test_checkpoint_parse(self) -> None:
        line = ("2026-12-01 11:09:49.086  EVENT  CHECK_POINT|MODE=1|PING=47ms|POOL=62|TCPS=3|UDPS=1"
                "|TCPRX=10|TCPTX=20|UDPRX=30|UDPTX=40")
        cp = CheckPoint.parse(line)
        assert cp is not None
        self.assertEqual((cp.mode, cp.ping, cp.pool, cp.tcps, cp.udps), (1, 47, 62, 3, 1))
        self.assertEqual(cp.traffic, Traffic(10, 20, 30, 40))
        self.assertEqual(cp.traffic.mirrored(), Traffic(20, 10, 40, 30))
        self.assertEqual(cp.traffic + Traffic(1, 1, 1, 1) - Traffic(10, 20, 30, 40), Traffic(1, 1, 1, 1))
        self.assertIsNone(CheckPoint.parse("2026-12-01 11:09:49.086  INFO  Server started: ..."))

    def test_peer_lookup(self) -> None:
        directory = new_dir(self)
        old = os.environ.get(GO_PEER_ENV)
        self.addCleanup(lambda: os.environ.__setitem__(GO_PEER_ENV, old) if old is not None
                        else os.environ.pop(GO_PEER_ENV, None))
        os.environ[GO_PEER_ENV] = os.path.join(directory, "missing")
        self.assertEqual(go_peer_path(), os.path.join(directory, "missing"))
        self.assertIn("not found", go_peer_problem() or "")
        self.assertRaises(SkipTest, skip_unless_go)
        plain = os.path.join(directory, "plain")
        with open(plain, "w", encoding="utf-8") as handle:
            handle.write("not a program")
        os.environ[GO_PEER_ENV] = plain
        self.assertIn("not an executable", go_peer_problem() or "")

    def test_main_checkout_of_a_worktree(self) -> None:
        directory = new_dir(self)
        with open(os.path.join(directory, ".git"), "w", encoding="utf-8") as handle:
            handle.write("gitdir: /srv/repo/.git/worktrees/feature\n")
        self.assertEqual(_main_checkout(directory), "/srv/repo")
        os.remove(os.path.join(directory, ".git"))
        os.mkdir(os.path.join(directory, ".git"))
        self.assertIsNone(_main_checkout(directory))
