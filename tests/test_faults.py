"""Faults a deployment meets, with real ``python -m nodepass`` processes and real sockets.

* between the ends, through the fault relay (:mod:`tests.faultrelay`): delay
  with jitter and datagram loss, a connection reset after N bytes, a stalled
  direction;
* kill -9 of either end, and its restart;
* a target that refuses connections;
* connections from the client's own address that never speak or send garbage.

The partition and name-resolution faults need network namespaces and live in
:mod:`tests.test_faults_netns`.  Recovery times are printed (``measured: ...``)
and collected in docs/reliability.md; the tests bound them only generously.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.error import ConnectError
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.faultrelay import start_relay
from tests.netns import process_fds
from tests.support import (
    RawClient,
    UdpEcho,
    connect,
    echo_roundtrip,
    echo_server,
    free_port,
    free_ports,
    new_dir,
    reactor,
    silent_listener,
    sleep,
    udp_user,
    wait_for,
)
from tests.test_process import NodePassProcess, spawn

FAST_ENV = {
    "NP_REPORT_INTERVAL": "1s",
    "NP_SERVICE_COOLDOWN": "1s",
    "NP_HANDSHAKE_TIMEOUT": "3s",
    "NP_POOL_GET_TIMEOUT": "3s",
}
"""Quick health rounds and restarts, so that recoveries take seconds.  With
``NODEPASS_FAULT_DEFAULTS=1`` in the environment the ends run with NodePass's
defaults instead (to measure the default recovery bounds; slower)."""
if os.environ.get("NODEPASS_FAULT_DEFAULTS"):
    FAST_ENV = {name: "" for name in FAST_ENV}  # an empty value means the default
RECOVERY_BOUND = 90.0
"""Generous upper bound for any recovery in these tests (measured values are a few seconds)."""
ERROR_LINE = re.compile(r"(Server|Client) error:")


def measured(what: str, seconds: float) -> None:
    """Print one measured figure (collected for docs/reliability.md)."""
    print(f"\n  measured: {what}: {seconds:.2f} s")


def start_end(test: TestCase, url: str, work: str, prefix: list[str] | None = None, **env: str) -> NodePassProcess:
    """``python -m nodepass URL`` with :data:`FAST_ENV` (and *env*); killed at cleanup."""
    return spawn(test, ["-m", "nodepass", url], work, prefix=prefix, **{**FAST_ENV, **env})


def errors_since(proc: NodePassProcess, mark: int) -> list[str]:
    """``Server error:`` / ``Client error:`` lines logged after line *mark*."""
    return [line for line in proc.lines[mark:] if ERROR_LINE.search(line)]


def pid_of(proc: NodePassProcess) -> int:
    return int(proc.transport.pid)  # type: ignore[union-attr]


def echo_target(test: TestCase, port: int = 0, interface: str = "127.0.0.1") -> int:
    """TCP and UDP echo on the same *interface*:*port* (a free one when 0); stopped at cleanup."""
    port = port or free_port(interface)
    echo_server(test, port, interface=interface)
    udp = reactor.listenUDP(port, UdpEcho(), interface=interface, maxPacketSize=65536)
    test.addCleanup(udp.stopListening)
    return port


class Bulk(protocol.Protocol):
    """Sends *size* random bytes once connected; hashes what comes back."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = os.urandom(size)
        self.sent_sha = hashlib.sha256(self.data).hexdigest()
        self.got = hashlib.sha256()
        self.received = 0
        self.lost = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.data)
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.got.update(data)
        self.received += len(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = True


@inlineCallbacks
def bulk_echo(port: int, size: int, timeout: float = 180.0, host: str = "127.0.0.1") -> Any:
    """Echo *size* random bytes through *port*; the :class:`Bulk` once all came back or the
    connection closed (it is closed by us afterwards)."""
    proto = Bulk(size)
    yield connect(port, proto)
    try:
        yield wait_for(lambda: proto.received >= size or proto.lost, timeout=timeout, what="bulk echo", step=0.05)
    finally:
        if not proto.lost:
            proto.transport.loseConnection()  # type: ignore[union-attr]
    return proto


@inlineCallbacks
def until_echo(port: int, limit: float = RECOVERY_BOUND, attempt: float = 2.0) -> Any:
    """Seconds until a short echo through *port* succeeds (each attempt gets *attempt* s)."""
    start = time.monotonic()
    while True:
        try:
            got = yield echo_roundtrip(port, b"are you there?", timeout=attempt)
            if got == b"are you there?":
                return time.monotonic() - start
        except Exception:
            pass
        if time.monotonic() - start > limit:
            raise AssertionError(f"no echo through port {port} within {limit}s")
        yield sleep(0.1)


class RelayHarnessTests(TestCase):
    """The fault relay itself does what the fault tests rely on."""

    timeout = 60

    @inlineCallbacks
    def test_toxics(self) -> Any:
        """Delay, reset after N bytes, a stalled direction (TCP); loss (UDP)."""
        port = echo_target(self)
        relay = yield start_relay(self, tcp=[("127.0.0.1", port)], udp=[("127.0.0.1", port)],
                                  faults={"latency": 100, "jitter": 0})
        tcp_port, udp_port = relay.tcp_ports[0], relay.udp_ports[0]
        start = time.monotonic()
        got = yield echo_roundtrip(tcp_port, b"x" * 1000)
        self.assertEqual(got, b"x" * 1000)
        self.assertGreaterEqual(time.monotonic() - start, 0.2)  # two delayed directions, never faster

        yield relay.set(latency=0, reset_after=100_000)
        proto = yield bulk_echo(tcp_port, 1_000_000)
        self.assertTrue(proto.lost)
        self.assertLess(proto.received, 1_000_000)
        yield relay.set(reset_after=None, stall="down")
        client = RawClient(b"held back")
        yield connect(tcp_port, client)
        yield sleep(0.5)
        self.assertEqual(client.data, b"")
        yield relay.set(stall=None)
        yield wait_for(lambda: client.data == b"held back")
        client.transport.loseConnection()  # type: ignore[union-attr]

        user = udp_user(self)
        yield relay.set(loss=1.0)
        for _ in range(5):
            user.transport.write(b"lost", ("127.0.0.1", udp_port))  # type: ignore[union-attr]
        yield sleep(0.5)  # the relay reads those datagrams before the next change
        yield relay.set(loss=0.0)
        reply = yield user.ask(b"kept", udp_port)
        self.assertEqual(reply, b"kept")
        stats = yield relay.stats()
        self.assertGreaterEqual(stats["udp_dropped"], 5)
        self.assertEqual(stats["resets"], 1)


class RelayFaultTests(TestCase):
    """A server + client pair whose tunnel connections run through the fault relay."""

    timeout = 300

    @inlineCallbacks
    def start_pair(self, faults: dict[str, Any], *, udp: bool = False, tls: int = 0) -> Any:
        """Server (reverse mode: users connect to it) and client (dials the echo target); the
        client reaches the server through the relay, and with *udp* users reach the server's
        UDP port through it too.  Returns ``(server, client, relay, user TCP port, user UDP port)``."""
        work = new_dir(self)
        target = echo_target(self)
        tunnel, user = free_ports(2)
        server = start_end(self, f"server://fault@127.0.0.1:{tunnel}/127.0.0.1:{user}?mode=1&tls={tls}&log=info", work)
        yield server.wait_line("Pending tunnel handshake")
        relay = yield start_relay(
            self, tcp=[("127.0.0.1", tunnel)], udp=[("127.0.0.1", user)] if udp else [], faults=faults
        )
        client = start_end(
            self, f"client://fault@127.0.0.1:{relay.tcp_ports[0]}/127.0.0.1:{target}?mode=2&min=8&log=info", work
        )
        yield until_echo(user)
        return server, client, relay, user, relay.udp_ports[0] if udp else 0

    @inlineCallbacks
    def delay_and_loss(self, tls: int) -> Any:
        """50 ms ± 10 ms each way between the ends, 5 % loss each way on the users' datagrams:
        20 MiB echoed intact while datagrams flow; no restart.  Returns (datagrams sent, replies)."""
        faults = {"latency": 50, "jitter": 10, "loss": 0.05}
        server, client, relay, user, udp_port = yield self.start_pair(faults, udp=True, tls=tls)
        marks = len(server.lines), len(client.lines)

        udp = udp_user(self)
        sent = [b"%06d" % i + os.urandom(200) for i in range(300)]

        @inlineCallbacks
        def datagrams() -> Any:
            for data in sent:
                udp.transport.write(data, ("127.0.0.1", udp_port))  # type: ignore[union-attr]
                yield sleep(0.02)
            yield sleep(2.0)  # the last replies are on their way

        start = time.monotonic()
        streams, _ = yield DeferredList([bulk_echo(user, 20 * 2**20), datagrams()], fireOnOneErrback=True)
        bulk = streams[1]
        measured(f"tls={tls}: 20 MiB echoed through 50±10 ms each way", time.monotonic() - start)
        self.assertEqual((bulk.received, bulk.got.hexdigest()), (20 * 2**20, bulk.sent_sha))
        stats = yield relay.stats()
        self.assertGreater(stats["udp_dropped"], 0)
        self.assertEqual(errors_since(server, marks[0]) + errors_since(client, marks[1]), [])
        self.assertTrue(server.running and client.running)
        pings = [int(m) for m in re.findall(r"CHECK_POINT\|MODE=\d\|PING=(\d+)ms", client.text)]
        print(f"  measured: control round trips {pings[-5:]} ms")
        return sent, udp.replies

    @inlineCallbacks
    def test_delay_jitter_and_datagram_loss(self) -> Any:
        """Plain pool (tls=0): no datagram is altered or lost beyond the injected loss, but
        datagrams carried back to back may arrive merged (the protocol has no UDP framing)."""
        sent, replies = yield self.delay_and_loss(tls=0)
        size = len(sent[0])
        pieces = [r[i : i + size] for r in replies for i in range(0, len(r), size)]
        self.assertTrue(set(pieces) <= set(sent), "a datagram came back altered")
        self.assertTrue(all(len(r) % size == 0 for r in replies), "a datagram came back cut")
        merged = sum(1 for r in replies if len(r) > size)
        print(f"  measured: tls=0: {len(set(pieces))}/{len(sent)} datagrams came back, "
              f"{merged} replies held more than one")
        self.assertGreater(len(set(pieces)), len(sent) // 2)

    @inlineCallbacks
    def test_delay_jitter_and_datagram_loss_tls(self) -> Any:
        """TLS pool (tls=1): every datagram that is not lost comes back whole and alone."""
        sent, replies = yield self.delay_and_loss(tls=1)
        self.assertTrue(set(replies) <= set(sent), [(len(r), r[:8]) for r in set(replies) - set(sent)][:5])
        print(f"  measured: tls=1: {len(set(replies))}/{len(sent)} datagrams came back")
        self.assertGreater(len(set(replies)), len(sent) // 2)

    @inlineCallbacks
    def test_reset_after_bytes(self) -> Any:
        """A tunnel connection reset mid-transfer ends that user connection; the tunnel stays up."""
        server, client, relay, user, _ = yield self.start_pair({})
        marks = len(server.lines), len(client.lines)
        yield relay.set(reset_after=2 * 2**20)
        proto = yield bulk_echo(user, 16 * 2**20, timeout=60)
        self.assertTrue(proto.lost, "the user connection stays open after its tunnel connection was reset")
        self.assertLess(proto.received, 16 * 2**20)
        yield relay.set(reset_after=None)
        proto = yield bulk_echo(user, 4 * 2**20)
        self.assertEqual((proto.received, proto.got.hexdigest()), (4 * 2**20, proto.sent_sha))
        self.assertEqual(errors_since(server, marks[0]) + errors_since(client, marks[1]), [])
        stats = yield relay.stats()
        self.assertGreaterEqual(stats["resets"], 1)

    @inlineCallbacks
    def test_stalled_direction(self) -> Any:
        """Client-to-server bytes stall: the health check ends the session; after the stall the
        pair is back by itself."""
        server, client, relay, user, _ = yield self.start_pair({})
        marks = len(server.lines), len(client.lines)
        yield relay.set(stall="up")
        start = time.monotonic()
        yield wait_for(lambda: errors_since(server, marks[0]), timeout=RECOVERY_BOUND, what="server notices")
        measured("stalled direction noticed by the server", time.monotonic() - start)
        yield wait_for(lambda: errors_since(client, marks[1]), timeout=RECOVERY_BOUND, what="client notices")
        measured("stalled direction noticed by the client", time.monotonic() - start)
        yield sleep(3.0)
        yield relay.set(stall=None)
        took = yield until_echo(user)
        measured("traffic again after the stall ended", took)
        self.assertTrue(server.running and client.running)


class KillTests(TestCase):
    """kill -9 of one end; the other end copes, and the restarted end is taken back."""

    timeout = 300

    @inlineCallbacks
    def test_kill_server_mid_transfer(self) -> Any:
        """The server dies during a transfer: the user connection ends; the client reconnects by
        itself to the restarted server."""
        work = new_dir(self)
        target = echo_target(self)
        tunnel, user = free_ports(2)
        url = f"server://kill@127.0.0.1:{tunnel}/127.0.0.1:{user}?mode=1&log=info"
        server = start_end(self, url, work)
        yield server.wait_line("Pending tunnel handshake")
        client = start_end(self, f"client://kill@127.0.0.1:{tunnel}/127.0.0.1:{target}?mode=2&min=8&log=info", work)
        yield until_echo(user)
        mark = len(client.lines)

        proto = Bulk(256 * 2**20)
        yield connect(user, proto)
        yield wait_for(lambda: proto.received > 4 * 2**20, timeout=60, what="transfer under way")
        server.signal("KILL")
        yield server.wait_exit()
        yield wait_for(lambda: proto.lost, timeout=30, what="user connection closed")
        self.assertLess(proto.received, 256 * 2**20)
        yield wait_for(lambda: errors_since(client, mark), timeout=RECOVERY_BOUND, what="client notices")

        yield sleep(2.0)  # the client retries against a closed port meanwhile
        server2 = start_end(self, url, work)
        took = yield until_echo(user)
        measured("kill -9 server: new server process started to traffic (client reconnects alone)", took)
        self.assertTrue(client.running and server2.running)
        self.assertTrue(any("Client restart" in line for line in client.lines[mark:]))

    @inlineCallbacks
    def test_kill_client(self) -> Any:
        """The client dies: the server frees its pool and takes the restarted client."""
        work = new_dir(self)
        target = echo_target(self)
        tunnel, user = free_ports(2)
        server = start_end(self, f"server://kill@127.0.0.1:{tunnel}/127.0.0.1:{user}?mode=1&log=info", work)
        yield server.wait_line("Pending tunnel handshake")
        yield sleep(1.0)
        base = process_fds(pid_of(server))
        client_url = f"client://kill@127.0.0.1:{tunnel}/127.0.0.1:{target}?mode=2&min=16&log=info"
        client = start_end(self, client_url, work)
        yield until_echo(user)
        yield wait_for(lambda: process_fds(pid_of(server)) >= base + 16, timeout=30, what="pool filled")
        with_pool = process_fds(pid_of(server))
        mark = len(server.lines)

        client.signal("KILL")
        yield client.wait_exit()
        start = time.monotonic()
        yield wait_for(lambda: errors_since(server, mark), timeout=RECOVERY_BOUND, what="server notices")
        measured("kill -9 client: noticed by the server", time.monotonic() - start)
        yield wait_for(lambda: process_fds(pid_of(server)) <= base + 2, timeout=RECOVERY_BOUND,
                       what=f"server descriptors back to {base} (+2)")
        print(f"\n  measured: server descriptors {base} idle, {with_pool} with the pool, "
              f"{process_fds(pid_of(server))} after the client died")

        client2 = start_end(self, client_url, work)
        took = yield until_echo(user)
        measured("kill -9 client: restarted client to traffic", took)
        self.assertTrue(server.running and client2.running)


class TargetFaultTests(TestCase):
    """The target (what the egress end dials) misbehaves; the tunnel does not."""

    timeout = 180

    @inlineCallbacks
    def test_target_refusing(self) -> Any:
        """Nothing listens on the target: each user connection is closed, the failure logged, the
        tunnel stays up, and traffic flows once the target is back."""
        work = new_dir(self)
        target = free_port()
        tunnel, user = free_ports(2)
        server = start_end(self, f"server://tgt@127.0.0.1:{tunnel}/127.0.0.1:{user}?mode=1&log=info", work)
        yield server.wait_line("Pending tunnel handshake")
        client = start_end(self, f"client://tgt@127.0.0.1:{tunnel}/127.0.0.1:{target}?mode=2&min=4&log=info", work)
        yield client.wait_line("Marking tunnel handshake as complete")
        yield server.wait_line("Marking tunnel handshake as complete")
        marks = len(server.lines), len(client.lines)

        users = [RawClient(b"hello %d" % i) for i in range(5)]
        for u in users:
            yield connect(user, u)
        yield wait_for(lambda: all(u.lost for u in users), timeout=60, what="user connections closed")
        self.assertEqual([u.data for u in users], [b""] * 5)
        yield client.wait_line(r"dialWithRotation failed: .*refused")
        self.assertEqual(errors_since(server, marks[0]) + errors_since(client, marks[1]), [])

        echo_target(self, target)
        took = yield until_echo(user)
        measured("target back to traffic", took)
        self.assertEqual(errors_since(server, marks[0]) + errors_since(client, marks[1]), [])
        self.assertTrue(server.running and client.running)


    @inlineCallbacks
    def test_target_not_answering(self) -> Any:
        """The target takes no connection (its accept queue is full, SYNs go unanswered): each user
        connection is closed after the dial timeout, logged; the tunnel stays up."""
        work = new_dir(self)
        full = silent_listener(self, backlog=0)
        target = full.getsockname()[1]
        fillers = []
        for _ in range(4):  # fill the accept queue; later SYNs are dropped
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", target))
            fillers.append(sock)
            self.addCleanup(sock.close)
        tunnel, user = free_ports(2)
        server = start_end(self, f"server://tgt@127.0.0.1:{tunnel}/127.0.0.1:{user}?mode=1&log=info", work)
        yield server.wait_line("Pending tunnel handshake")
        client = start_end(self, f"client://tgt@127.0.0.1:{tunnel}/127.0.0.1:{target}?mode=2&min=4&log=info", work,
                           NP_TCP_DIAL_TIMEOUT="2s")
        yield client.wait_line("Marking tunnel handshake as complete")
        yield server.wait_line("Marking tunnel handshake as complete")
        marks = len(server.lines), len(client.lines)
        users = [RawClient(b"hello %d" % i) for i in range(3)]
        start = time.monotonic()
        for u in users:
            yield connect(user, u)
        yield wait_for(lambda: all(u.lost for u in users), timeout=RECOVERY_BOUND, what="user connections closed")
        measured("target not answering: user closed (NP_TCP_DIAL_TIMEOUT=2s)", time.monotonic() - start)
        self.assertEqual([u.data for u in users], [b""] * 3)
        yield client.wait_line(r"ERROR.*dialWithRotation failed")
        self.assertEqual(errors_since(server, marks[0]) + errors_since(client, marks[1]), [])
        self.assertTrue(server.running and client.running)


class Intruder(protocol.Protocol):
    """A connection to the tunnel port that sends *junk* (or nothing) and keeps what it gets."""

    def __init__(self, junk: bytes = b"") -> None:
        self.junk = junk
        self.got = b""
        self.lost = False

    def connectionMade(self) -> None:
        if self.junk:
            self.transport.write(self.junk)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.got += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = True


class IntruderTests(TestCase):
    """Connections from the handshaken client's own address that are not the client's."""

    timeout = 240

    @inlineCallbacks
    def start_pair(self, mode: int, max_cap: int = 8, min_cap: int = 2) -> Any:
        work = new_dir(self)
        target = echo_target(self)
        tunnel, user = free_ports(2)
        server = start_end(
            self, f"server://intr@127.0.0.1:{tunnel}/127.0.0.1:{target if mode == 2 else user}"
            f"?mode={mode}&max={max_cap}&log=info", work
        )
        yield server.wait_line("Pending tunnel handshake")
        client_target = user if mode == 2 else target
        client = start_end(
            self, f"client://intr@127.0.0.1:{tunnel}/127.0.0.1:{client_target}?mode=2&min={min_cap}&log=info", work
        )
        yield until_echo(user)
        return server, client, tunnel, user

    @inlineCallbacks
    def intruders(self, tunnel: int, junks: list[bytes]) -> Any:
        conns = [Intruder(junk) for junk in junks]
        for conn in conns:
            try:
                yield connect(tunnel, conn)
            except ConnectError:  # refused at once (the server's idle slots are full)
                conn.lost = True
        self.addCleanup(lambda: [c.transport.abortConnection() for c in conns if not c.lost])  # type: ignore[union-attr]
        return conns

    @inlineCallbacks
    def echoes(self, user: int, count: int, attempt: float = 5.0) -> Any:
        """*count* echoes one after another; how many came back intact."""
        good = 0
        for i in range(count):
            payload = b"user %d " % i * 100
            try:
                got = yield echo_roundtrip(user, payload, timeout=attempt)
            except Exception:
                continue
            good += got == payload
        return good

    @inlineCallbacks
    def test_garbage_senders_reverse(self) -> Any:
        """Reverse mode (the server hands out pool connections): garbage senders are closed before
        use and never see user bytes; every user connection works."""
        server, client, tunnel, user = yield self.start_pair(mode=1)
        junks = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(64), b"\x00" * 4, b"\r\n"] * 3
        conns = yield self.intruders(tunnel, junks)
        yield wait_for(lambda: all(c.lost for c in conns), timeout=30, what="garbage senders closed")
        self.assertTrue(all(len(c.got) <= 4 for c in conns), [c.got for c in conns])
        good = yield self.echoes(user, 20)
        self.assertEqual(good, 20)
        self.assertTrue(server.running and client.running)

    @inlineCallbacks
    def test_silent_and_garbage_forward(self) -> Any:
        """Forward mode (the client names the pool connection): as many silent intruders as the
        pool holds, plus garbage senders, get no user byte and do not starve the pool."""
        server, client, tunnel, user = yield self.start_pair(mode=2, max_cap=8)
        conns = yield self.intruders(tunnel, [b""] * 8 + [os.urandom(100), b"GET / HTTP/1.0\r\n\r\n"])
        yield sleep(1.0)
        good = yield self.echoes(user, 40)
        self.assertEqual(good, 40)
        self.assertTrue(all(len(c.got) <= 4 for c in conns), [c.got[:16] for c in conns])
        self.assertTrue(server.running and client.running)

    @inlineCallbacks
    def test_silent_reverse(self) -> Any:
        """Reverse mode with silent intruders: what they can take, and that the tunnel heals."""
        server, client, tunnel, user = yield self.start_pair(mode=1, max_cap=8)
        conns = yield self.intruders(tunnel, [b""] * 3)
        yield sleep(1.0)
        good = yield self.echoes(user, 20, attempt=5.0)
        leaked = [c for c in conns if len(c.got) > 4]
        print(f"\n  measured: silent intruders in reverse mode: {len(leaked)} of {len(conns)} were handed a "
              f"user connection; {good}/20 user echoes came back")
        self.assertGreaterEqual(good, 20 - len(conns))
        good = yield self.echoes(user, 10)
        self.assertEqual(good, 10)
        self.assertTrue(server.running and client.running)
