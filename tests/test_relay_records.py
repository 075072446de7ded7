"""TLS records and WebSocket messages read before a member is claimed stay apart.

A pool member can receive its first datagrams before the UDP session that
will own it takes it (the datagrams overtake the ``udp`` signal).  Those reads
are kept by the member until its sink is set, and each must still reach the
session as one datagram: the TLS layer ends a read at every short record
while the member waits for its sink, and the member hands its kept reads on
one by one.  Once a sink is set, records that arrive together are delivered
together again (bulk transfers keep their large reads).
"""

from __future__ import annotations

from typing import Any

from twisted.test import iosim
from twisted.trial import unittest

from nodepass.relay import RelayProtocol
from nodepass.relay.tls import MAX_RECORD, TLSProtocol
from nodepass.tls import client_ssl_context, server_tls
from tests.support import quiet_logger


def _pair() -> tuple[TLSProtocol, TLSProtocol, RelayProtocol, RelayProtocol, iosim.IOPump]:
    tls = server_tls(1, "", "", logger=quiet_logger())
    assert tls is not None
    receiver, sender = RelayProtocol(), RelayProtocol()
    server = TLSProtocol(tls.ssl_context(), True, receiver)
    client_ctx = client_ssl_context(1, "")
    client = TLSProtocol(client_ctx, False, sender)
    pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client))
    pump.flush()
    return server, client, receiver, sender, pump


class RecordsBeforeClaimTests(unittest.TestCase):
    def _send(self, sender: RelayProtocol, pump: iosim.IOPump, *datagrams: bytes) -> None:
        assert sender.transport is not None
        for d in datagrams:
            sender.transport.write(d)
        pump.pump()  # every record in one read of the receiving side

    def test_datagrams_before_the_sink_stay_apart(self) -> None:
        _server, _client, receiver, sender, pump = _pair()
        self.assertTrue(receiver.awaiting_sink)
        big = bytes(range(256)) * 160  # 40,960 bytes: two full records and a short one
        self.assertGreater(len(big), 2 * MAX_RECORD)
        datagrams = [b"one", b"two" * 100, big, b"four"]
        self._send(sender, pump, *datagrams)
        got: list[bytes] = []
        receiver.set_sink(got.append)
        # (lengths first: a failing comparison of the whole lists would be slow to print)
        self.assertEqual([len(g) for g in got], [len(d) for d in datagrams])
        self.assertEqual(b"|".join(got), b"|".join(datagrams))

    def test_with_a_sink_records_of_one_read_are_delivered_together(self) -> None:
        _server, _client, receiver, sender, pump = _pair()
        got: list[bytes] = []
        receiver.set_sink(got.append)
        self.assertFalse(receiver.awaiting_sink)
        self._send(sender, pump, b"a" * 1000, b"b" * 1000, b"c" * 1000)
        self.assertEqual(got, [b"a" * 1000 + b"b" * 1000 + b"c" * 1000])

    def test_after_a_reader_asks_for_messages_each_record_alone(self) -> None:
        server, _client, receiver, sender, pump = _pair()
        got: list[bytes] = []
        receiver.set_sink(got.append)
        server.bufferSize = 65536  # what a UDP session does
        self._send(sender, pump, b"x" * 10, b"y" * 20)
        self.assertEqual(got, [b"x" * 10, b"y" * 20])


class KeptReadsTests(unittest.TestCase):
    def test_kept_reads_are_handed_on_one_by_one(self) -> None:
        from twisted.internet.testing import StringTransport

        p = RelayProtocol()
        p.makeConnection(StringTransport())
        for chunk in (b"1", b"22", b"333"):
            p.dataReceived(chunk)
        got: list[bytes] = []
        p.set_sink(got.append)
        self.assertEqual(got, [b"1", b"22", b"333"])
        p.dataReceived(b"4444")
        self.assertEqual(got[-1], b"4444")

    def test_a_sink_that_hands_over_to_another_keeps_the_order(self) -> None:
        from twisted.internet.testing import StringTransport

        p = RelayProtocol()
        p.makeConnection(StringTransport())
        for chunk in (b"1", b"2", b"3"):
            p.dataReceived(chunk)
        first: list[bytes] = []
        second: list[bytes] = []

        def handing_over(data: bytes) -> None:
            first.append(data)
            p.set_sink(second.append)

        p.set_sink(handing_over)
        self.assertEqual((first, second), ([b"1"], [b"2", b"3"]))

    def test_lost_member_is_not_awaiting(self) -> None:
        from twisted.internet.testing import StringTransport

        p: Any = RelayProtocol()
        p.makeConnection(StringTransport())
        self.assertTrue(p.awaiting_sink)
        p.connectionLost(None)
        self.assertFalse(p.awaiting_sink)
