"""Unit-level regression tests for faults the end-to-end fault tests and the soak exposed."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from nodepass.env import Settings
from nodepass.pool.base import PoolConnection
from nodepass.pool.tcp import TcpServerPool
from nodepass.relay import RelayProtocol
from nodepass.stats import TunnelStats
from nodepass.tunnel.exchange import IngressTCP
from nodepass.tunnel.server import DualEndSession
from tests.support import quiet_logger


class _Config:
    key = "k"
    targets: list[Any] = []
    lbs = 0


class _Policy:
    blocking = False
    throttle = None
    read_timeout = 0.0

    def __init__(self) -> None:
        self.released: list[str] = []

    def release(self, kind: str) -> None:
        self.released.append(kind)


class GoneWhileWaitingTests(TestCase):
    """A user connection that closes while it waits for a pool connection (the pool is empty)."""

    def test_gone_user_does_not_take_the_next_pool_connection(self) -> None:
        clock = Clock()
        pool = TcpServerPool(clock, quiet_logger(), max_cap=8, client_ip="")
        policy = _Policy()
        session = DualEndSession(
            config=_Config(), reactor=clock, logger=quiet_logger(), settings=Settings(pool_get_timeout=5.0),
            stats=TunnelStats(), policy=policy, exchanges=set(),
        )
        session.pool = pool
        user = RelayProtocol()
        user.makeConnection(StringTransport())
        IngressTCP(session, user, "192.0.2.7:5000").start()  # waits: the pool is empty
        self.assertEqual(policy.released, [])
        self.assertEqual(len(pool._any_waiters), 1)
        user.connectionLost()
        self.assertEqual(policy.released, ["tcp"])  # its slot given back once
        self.assertEqual(len(pool._any_waiters), 0)  # and its place in the queue

        pool._first = False  # (the first connection would become the control channel)
        conn = PoolConnection(pool, True, False)
        conn.makeConnection(StringTransport())  # a pool connection arrives after the user left
        self.assertEqual(pool.active, 1)  # kept for the next user, not taken and closed
        self.assertFalse(conn.in_use)
        clock.advance(10)
        self.assertEqual(clock.getDelayedCalls(), [])


class StateEncodingTests(TestCase):
    """The master's state file: one instance per line, written by json's C encoder."""

    def test_round_trip_one_instance_per_line(self) -> None:
        import json

        from nodepass.master.store import encode_state

        instances = [{"id": f"{i:08x}", "alias": "ä \" \n", "meta": {"tags": {"k": str(i)}}} for i in range(3)]
        document = {"format": "nodepass-master", "version": 1, "instances": instances}
        text = encode_state(document)
        self.assertEqual(json.loads(text), document)
        lines = text.splitlines()
        self.assertEqual([json.loads(line.rstrip(",")) for line in lines[1:-1]], instances)
        self.assertEqual(json.loads(encode_state({"instances": []})), {"instances": []})
