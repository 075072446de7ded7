"""TLS fingerprint ``verify`` (tls=1) when signals and connection closes race.

Each side of a tls=1 session takes an idle pool connection, sends ``verify``
naming it on the control connection, and closes it (Go NodePass closes it
as soon as the signal is queued).  The signal and the close travel on two
different TCP connections, so the receiver may see the close first, when the
connection has already left its idle set.  Both sides must still find the
named connection, check the fingerprint and open the ingress; otherwise the
session fails with ``outgoingVerify: OutgoingGet: pool connection not
found`` and, as both ends restart in step, the same order tends to come back
every time and the tunnel never becomes ready.

The first tests drive two real :class:`ControlChannel` objects over real
:class:`TcpServerPool`/:class:`TcpClientPool` instances whose connections sit on
in-memory transports, and deliver IDs, signals and closes in a chosen order
(including every possible order of the two exchanges).  The last one runs a
tls=1 server and client on real sockets a few times in a row.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

from OpenSSL import crypto
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from nodepass.env import Settings
from nodepass.log import Level, NodePassLogger
from nodepass.pool.base import CONTROL_ID, PoolConnection
from nodepass.pool.tcp import TcpClientPool, TcpServerPool
from nodepass.stats import TunnelStats
from nodepass.tls import fingerprint, self_signed_pem
from nodepass.tunnel.health import ControlChannel
from tests.test_tunnel_tcp import Tunnel, echo_through

INTERVAL = 10.0
GET_TIMEOUT = 5.0
SETTINGS = Settings(report_interval=INTERVAL, pool_get_timeout=GET_TIMEOUT)
CERT = crypto.load_certificate(crypto.FILETYPE_PEM, self_signed_pem()[0])
SERVER_FP = fingerprint(crypto.dump_certificate(crypto.FILETYPE_ASN1, CERT))


class _Wire(StringTransport):
    """One end of a pool connection in memory.

    Bytes written stay in the buffer until the test delivers them; a close
    is only recorded (``closed``) and reaches the other end when the test
    delivers it.  The client end shows the server certificate, as its TLS
    session would."""

    def __init__(self, on_close: Callable[[_Wire], None]) -> None:
        super().__init__()
        self.on_close = on_close
        self.closed = False
        self.conn: PoolConnection | None = None

    def loseConnection(self) -> None:
        if not self.closed:
            self.closed = True
            self.on_close(self)

    def abortConnection(self) -> None:
        self.loseConnection()

    def getPeerCertificate(self) -> Any:
        return CERT


class _End:
    """One side (server or client) of a dual-end session in memory."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.clock = Clock()
        self.logs: list[str] = []
        logger = NodePassLogger("debug", stream=None)
        logger.add_observer(lambda r: self.logs.append(r.text))
        self.logger = logger
        self.pool: TcpServerPool | TcpClientPool
        if role == "server":
            self.pool = TcpServerPool(self.clock, logger, max_cap=64, client_ip="")
        else:
            self.pool = TcpClientPool(
                self.clock, logger, min_cap=1, max_cap=64, min_interval=1.0, max_interval=1.0,
                keepalive=INTERVAL, connect=lambda factory: None,
            )
        #: Closes made on this side that the peer has not seen yet.
        self.pending_closes: list[_Wire] = []
        self.failures: list[str] = []
        self.verified = 0
        self.channel: ControlChannel | None = None

    def new_conn(self) -> tuple[PoolConnection, _Wire]:
        conn = PoolConnection(self.pool, self.role == "server", False)
        wire = _Wire(self.pending_closes.append)
        wire.conn = conn
        conn.makeConnection(wire)
        return conn, wire

    def start_channel(self, control: PoolConnection) -> None:
        def on_verified() -> None:
            self.verified += 1

        self.channel = ControlChannel(
            reactor=self.clock, logger=self.logger, settings=SETTINGS, stats=TunnelStats(),
            key="secret", conn=control, pool=self.pool, role=self.role, tls_code=1,
            own_fingerprint=lambda: SERVER_FP, on_launch=lambda signal: None,
            on_failure=self.failures.append, on_verified=on_verified,
        )
        self.channel.start()


class _Pair:
    """A server and a client end joined by in-memory pool connections."""

    def __init__(self, count: int = 4, *, swap: bool = False) -> None:
        self.server = _End("server")
        self.client = _End("client")
        #: (server conn, server wire, client conn, client wire) per connection.
        self.links: list[tuple[PoolConnection, _Wire, PoolConnection, _Wire]] = []
        self.add_link(deliver_id=True)
        for _ in range(count):
            self.add_link(deliver_id=False)
        if swap and count >= 2:
            # The client reads the IDs of the two oldest connections in the
            # other order, so the two idle queues differ.
            self._deliver_id(self.links[2])
            self._deliver_id(self.links[1])
        self.deliver_ids()
        s_ctl, s_wire, c_ctl, c_wire = self.links[0]
        assert s_ctl.id == c_ctl.id == CONTROL_ID
        self.s_ctl_wire, self.c_ctl_wire = s_wire, c_wire
        got_s = self._take_control(self.server)
        got_c = self._take_control(self.client)
        self.server.start_channel(got_s)
        self.client.start_channel(got_c)

    @staticmethod
    def _take_control(end: _End) -> PoolConnection:
        taken: list[PoolConnection] = []
        end.pool.outgoing_get(CONTROL_ID, GET_TIMEOUT).addCallback(taken.append)
        assert taken, "control connection not in the pool"
        return taken[0]

    def add_link(self, *, deliver_id: bool) -> tuple[PoolConnection, _Wire, PoolConnection, _Wire]:
        """A new pool connection: the server assigns (and writes) its ID; the
        client reads the ID now or when :meth:`deliver_ids` is called."""
        c_conn, c_wire = self.client.new_conn()
        c_conn.handshakeCompleted()
        s_conn, s_wire = self.server.new_conn()
        link = (s_conn, s_wire, c_conn, c_wire)
        self.links.append(link)
        if deliver_id:
            self.deliver_ids()
        return link

    def deliver_ids(self) -> None:
        """Every ID the server wrote reaches the client, oldest first."""
        for link in self.links:
            self._deliver_id(link)

    @staticmethod
    def _deliver_id(link: tuple[PoolConnection, _Wire, PoolConnection, _Wire]) -> None:
        s_conn, s_wire, c_conn, _c_wire = link
        if not c_conn.id and not c_conn.lost and len(s_wire.value()) >= 4:
            raw, rest = s_wire.value()[:4], s_wire.value()[4:]
            s_wire.clear()
            s_wire.write(rest)
            c_conn.dataReceived(raw)
            assert c_conn.id == s_conn.id

    # -- delivery of what each side sent -------------------------------------------
    def deliver_signals(self, src: _End) -> None:
        """Control bytes written by ``src`` reach its peer."""
        wire, dst_wire = (
            (self.s_ctl_wire, self.c_ctl_wire) if src is self.server else (self.c_ctl_wire, self.s_ctl_wire)
        )
        data = wire.value()
        wire.clear()
        if data and dst_wire.conn is not None and not dst_wire.conn.lost:
            dst_wire.conn.dataReceived(data)

    def deliver_closes(self, src: _End) -> None:
        """Closes made by ``src`` reach its peer (then both ends are gone)."""
        closes, src.pending_closes[:] = list(src.pending_closes), []
        for wire in closes:
            for link in self.links:
                s_conn, s_wire, c_conn, c_wire = link
                if wire is s_wire:
                    # The ID bytes come before the close on the same stream.
                    self._deliver_id(link)
                    pair = (s_conn, c_conn)
                elif wire is c_wire:
                    pair = (c_conn, s_conn)
                else:
                    continue
                for conn in (pair[1], pair[0]):
                    if not conn.lost:
                        conn.connectionLost(Failure(ConnectionDone()))

    def fire_verify(self, end: _End) -> None:
        """The report interval passes on ``end``: its verify goes out."""
        end.clock.advance(INTERVAL)

    def play(self, *events: str) -> None:
        """Apply *events* in order, then :meth:`settle`.

        An event is ``"ids"`` (every pool ID still in flight arrives) or
        ``"<side>-<what>"`` with side ``server``/``client`` and what ``timer``
        (:meth:`fire_verify`), ``signal`` (:meth:`deliver_signals`) or
        ``close`` (:meth:`deliver_closes`).
        """
        for event in events:
            if event == "ids":
                self.deliver_ids()
                continue
            side_name, what = event.split("-")
            side = self.server if side_name == "server" else self.client
            if what == "timer":
                self.fire_verify(side)
            elif what == "signal":
                self.deliver_signals(side)
            elif what == "close":
                self.deliver_closes(side)
            else:
                raise ValueError(f"unknown event {event!r}")
        self.settle()

    def settle(self) -> None:
        """Deliver everything, then let every pool wait run out."""
        for _ in range(3):
            self.deliver_ids()
            for end in (self.server, self.client):
                self.deliver_signals(end)
                self.deliver_closes(end)
        for end in (self.server, self.client):
            end.clock.advance(GET_TIMEOUT + 1)
        for end in (self.server, self.client):
            self.deliver_signals(end)

    def outcome(self) -> tuple[int, list[str], int, list[str]]:
        return self.server.verified, self.server.failures, self.client.verified, self.client.failures


class ControlledOrderTests(unittest.TestCase):
    """Deterministic orders of the two verify exchanges."""

    def assertVerified(self, pair: _Pair) -> None:
        self.assertEqual(pair.outcome(), (1, [], 1, []), "\n".join(pair.server.logs + ["--"] + pair.client.logs))
        self.assertIn(f"TLS certificate fingerprint verified: {SERVER_FP}", pair.server.logs)
        self.assertIn(f"TLS certificate fingerprint verified: {SERVER_FP}", pair.client.logs)

    def test_client_close_overtakes_its_verify(self) -> None:
        """The failure seen on real sockets: the server's exchange completes, then
        the client's close reaches the server before the client's signal."""
        p = _Pair()
        p.play("server-timer", "server-signal", "server-close", "client-timer", "client-close", "client-signal")
        self.assertVerified(p)

    def test_server_close_overtakes_its_verify(self) -> None:
        p = _Pair()
        p.play("client-timer", "client-signal", "client-close", "server-timer", "server-close", "server-signal")
        self.assertVerified(p)

    def test_both_at_once_on_the_same_connection(self) -> None:
        """Both sides pick their oldest idle connection, the same one, and both
        closes arrive before both signals."""
        p = _Pair()
        p.play("server-timer", "client-timer", "server-close", "client-close", "server-signal", "client-signal")
        self.assertVerified(p)

    def test_both_at_once_after_a_close(self) -> None:
        """The server's close reaches the client before the client's own verify,
        so the client picks another connection; every signal comes last."""
        p = _Pair()
        p.play("server-timer", "server-close", "client-timer", "client-close", "client-signal", "server-signal")
        self.assertVerified(p)

    def test_verify_names_a_connection_whose_id_is_still_in_flight(self) -> None:
        """The server names a connection whose ID the client has not read yet:
        the signal arrives first, then the ID, then the close."""
        p = _Pair(count=0)
        p.add_link(deliver_id=False)
        p.add_link(deliver_id=False)
        p.play("server-timer", "server-signal", "ids", "server-close", "client-timer", "client-close", "client-signal")
        self.assertVerified(p)

    def test_every_order(self) -> None:
        """All orders of: each side's verify timer, its signal reaching the peer,
        its close reaching the peer (signal and close after the timer), with the
        two pools holding their connections in the same or a different order."""
        events = ("server-timer", "server-signal", "server-close", "client-timer", "client-signal", "client-close")
        failed: list[tuple[Sequence[str], tuple[int, list[str], int, list[str]]]] = []
        total = 0
        for swap in (False, True):
            for order in itertools.permutations(events):
                if any(order.index(f"{side}-timer") > order.index(f"{side}-{what}")
                       for side in ("server", "client") for what in ("signal", "close")):
                    continue
                total += 1
                p = _Pair(swap=swap)
                p.play(*order)
                if p.outcome() != (1, [], 1, []):
                    failed.append((order, p.outcome()))
        self.assertEqual(total, 160)
        self.assertEqual(failed, [], f"{len(failed)} of {total} orders failed")


class RealSocketTests(unittest.TestCase):
    """tls=1 server and client on real sockets, started several times in a row."""

    ROUNDS = 6
    SETTINGS = Settings(report_interval=0.3, service_cooldown=0.2, handshake_timeout=2.0, pool_get_timeout=1.0)

    @defer.inlineCallbacks
    def test_tls1_pair_becomes_ready_every_time(self) -> Any:
        failures: list[str] = []
        for round_no in range(self.ROUNDS):
            t = Tunnel(self, tls=1, flow="-", settings=self.SETTINGS)
            server = t.start_server()
            client = t.start_client()
            try:
                yield t.ready(timeout=8.0)
                data = yield echo_through(t.user_port, b"through the verified tunnel")
                self.assertEqual(data, b"through the verified tunnel")
            except AssertionError:
                failures.append(f"round {round_no}: not ready")
            errors = [f"round {round_no} {n}: {r.text}" for n, r in t.records
                      if r.level == Level.ERROR and "Verify" in r.text]
            failures.extend(errors)
            yield server.stopService()
            yield client.stopService()
        self.assertEqual(failures, [])
