"""A pool member carried inside another connection, presented as a Twisted transport.

QUIC streams (type 1), WebSockets (type 2) and HTTP/2 streams (type 3) are
byte pipes inside a connection that a transport module drives (aioquic, our own
WebSocket framing or h2 glue).  :class:`StreamTransport` turns one such pipe into an ordinary
Twisted transport, so that a :class:`~nodepass.pool.base.PoolConnection` runs
on it exactly as it runs on a TCP socket:

* ``write`` / ``writeSequence`` queue bytes on the pipe; a registered
  producer (the relay's other side) is paused while more than
  :attr:`StreamTransport.high_water` bytes wait to be sent and resumed below
  :attr:`StreamTransport.low_water` (back-pressure towards our reader);
* ``pauseProducing`` stops delivering received bytes; they wait here, and a
  transport with flow control gives the peer credit only for bytes delivered
  (:meth:`StreamTransport._consumed`), so a slow target slows the peer's
  writer (back-pressure towards the peer);
* ``loseWriteConnection`` ends our direction (QUIC FIN, HTTP/2 END_STREAM)
  after the queued bytes; ``loseConnection`` does that and stops reading
  (the protocol's ``connectionLost`` follows on the next reactor turn, as
  on TCP; the carrying connection still sends what was queued);
  ``abortConnection`` resets the pipe;
* the peer's end of stream reaches a half-closeable protocol as
  ``readConnectionLost`` (the relay's half-close), any other protocol as a
  full close;
* ``getPeer``/``getHost`` give the carrying connection's addresses and
  ``getPeerCertificate`` its peer certificate (for the fingerprint check).

A transport module subclasses it and implements :meth:`_send`,
:meth:`_send_eof`, :meth:`_send_reset` and :meth:`_buffered` (and, with flow
control, :meth:`_consumed`); it reports what happens on the pipe with
:meth:`data_received`, :meth:`eof_received`, :meth:`terminated` and
:meth:`drained`.  It must not merge two receptions into one
:meth:`data_received` call: a UDP datagram carried over a member is one write
on one side and one read on the other.  (A transport module may offer a
``bufferSize`` attribute, as the WebSocket stream does: until a reader sets
it, which a UDP session does first, the module may hand over what one read
of its carrying connection brought as one chunk, as a TCP member does.)
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHalfCloseableProtocol,
    IProtocol,
    IPushProducer,
    ITransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["StreamTransport"]


def _failure(exc: BaseException) -> Failure:
    return Failure(exc)  # type: ignore[no-untyped-call]


@implementer(ITransport, IConsumer, IPushProducer)
class StreamTransport:
    """One member's pipe as a transport (see the module docstring)."""

    #: Queued outgoing bytes above which a registered producer is paused.
    high_water = 256 * 1024
    #: Queued outgoing bytes at or below which it is resumed.
    low_water = 64 * 1024
    #: True when received bytes come as many small chunks per reactor turn
    #: (one per packet); the relay then gathers what it writes to the other
    #: side into one write per turn (see :func:`nodepass.relay.join`).
    delivers_bursts = False

    def __init__(self, reactor: Any, peer: IAddress, host: IAddress) -> None:
        self.reactor = reactor
        self.protocol: IProtocol | None = None
        self.connected = False
        self.disconnecting = False
        self.disconnected = False
        self._peer = peer
        self._host = host
        self._read_paused = False
        self._inbox: deque[bytes] = deque()
        self._eof_pending = False
        self._read_closed = False
        self._write_closed = False
        self._producer: IPushProducer | None = None
        self._producer_paused = False

    # -- what a transport module provides --------------------------------------------
    def _send(self, data: bytes) -> None:
        """Queue ``data`` on the pipe."""
        raise NotImplementedError

    def _send_eof(self) -> None:
        """End our direction after the queued bytes."""
        raise NotImplementedError

    def _send_reset(self) -> None:
        """Abort the pipe in both directions, dropping queued bytes."""
        raise NotImplementedError

    def _buffered(self) -> int:
        """Bytes queued on the pipe and not yet handed to the connection."""
        return 0

    def _consumed(self, nbytes: int) -> None:
        """The protocol took ``nbytes`` received bytes (give the peer credit)."""

    def _reading_changed(self, paused: bool) -> None:
        """Delivery was paused or resumed (for transports that can stop reading)."""

    def getPeerCertificate(self) -> Any:
        """The peer's certificate on the carrying connection, or None."""
        return None

    # -- connecting a protocol ---------------------------------------------------------
    def attach(self, protocol: IProtocol) -> None:
        """Run ``protocol`` on this pipe (``makeConnection``)."""
        self.protocol = protocol
        self.connected = True
        protocol.makeConnection(self)

    # -- events from the transport module -----------------------------------------------
    def data_received(self, data: bytes) -> None:
        """Bytes arrived on the pipe."""
        if self.disconnected or self.disconnecting or self._read_closed:
            self._consumed(len(data))
            return
        if self._read_paused or self._inbox:
            self._inbox.append(data)
            return
        self._deliver(data)

    def eof_received(self) -> None:
        """The peer ended its direction."""
        if self.disconnected or self.disconnecting or self._read_closed:
            return
        if self._read_paused or self._inbox:
            self._eof_pending = True
            return
        self._deliver_eof()

    def terminated(self, reason: Failure | None = None) -> None:
        """The pipe is gone (reset by the peer, or its connection ended)."""
        self._finish(reason or _failure(ConnectionDone()))

    def drained(self) -> None:
        """Queued bytes were sent: resume a paused producer once below low water."""
        if self._producer is not None and self._producer_paused and self._buffered() <= self.low_water:
            self._producer_paused = False
            self._producer.resumeProducing()

    # -- delivery -----------------------------------------------------------------------
    def _deliver(self, data: bytes) -> None:
        assert self.protocol is not None
        self.protocol.dataReceived(data)
        self._consumed(len(data))

    def _deliver_eof(self) -> None:
        self._read_closed = True
        self._eof_pending = False
        protocol = self.protocol
        if protocol is not None and IHalfCloseableProtocol.providedBy(protocol):
            protocol.readConnectionLost()  # type: ignore[attr-defined]
            if self._write_closed and not self.disconnected:
                self._finish(_failure(ConnectionDone()))
        else:
            self.loseConnection()

    def _drain_inbox(self) -> None:
        while self._inbox and not self._read_paused and not self.disconnected:
            self._deliver(self._inbox.popleft())
        if self._eof_pending and not self._inbox and not self._read_paused and not self.disconnected:
            self._deliver_eof()

    # -- ITransport ---------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.disconnected or self.disconnecting or self._write_closed or not data:
            return
        self._send(bytes(data))
        if self._producer is not None and not self._producer_paused and self._buffered() > self.high_water:
            self._producer_paused = True
            self._producer.pauseProducing()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:
        """Half-close: end our direction after the queued bytes, keep reading."""
        if self.disconnected or self._write_closed:
            return
        self._write_closed = True
        self._send_eof()
        protocol = self.protocol
        if protocol is not None and IHalfCloseableProtocol.providedBy(protocol):
            protocol.writeConnectionLost()  # type: ignore[attr-defined]
        if self._read_closed and not self.disconnected:
            self._finish_soon(_failure(ConnectionDone()))

    def loseConnection(self) -> None:
        """End our direction after the queued bytes and stop reading."""
        if self.disconnected or self.disconnecting:
            return
        self.disconnecting = True
        if not self._write_closed:
            self._write_closed = True
            self._send_eof()
        self._finish_soon(_failure(ConnectionDone()))

    def abortConnection(self) -> None:
        """Reset the pipe at once, dropping queued bytes."""
        if self.disconnected:
            return
        self.disconnecting = True
        self._send_reset()
        self._finish_soon(_failure(ConnectionAborted()))

    def getPeer(self) -> IAddress:
        return self._peer

    def getHost(self) -> IAddress:
        return self._host

    def setTcpNoDelay(self, enabled: bool) -> None:
        """No socket of its own: nothing to set."""

    def getTcpNoDelay(self) -> bool:
        return True

    # -- IConsumer ------------------------------------------------------------------------
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError(f"Cannot register producer {producer!r}: {self._producer!r} is registered")
        self._producer = producer
        self._producer_paused = False
        if self._buffered() > self.high_water:
            self._producer_paused = True
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self._producer = None
        self._producer_paused = False

    # -- IPushProducer (reading) --------------------------------------------------------------
    def pauseProducing(self) -> None:
        if not self._read_paused:
            self._read_paused = True
            self._reading_changed(True)

    def resumeProducing(self) -> None:
        if self._read_paused:
            self._read_paused = False
            self._reading_changed(False)
            self._drain_inbox()

    def stopProducing(self) -> None:
        self.loseConnection()

    # -- the end ----------------------------------------------------------------------------
    def _finish_soon(self, reason: Failure) -> None:
        """Report the end to the protocol on the next reactor turn, as TCP does."""
        self.reactor.callLater(0, self._finish, reason)

    def _finish(self, reason: Failure) -> None:
        if self.disconnected:
            return
        self.disconnected = True
        self.connected = False
        self.disconnecting = False
        pending = sum(len(b) for b in self._inbox)
        self._inbox.clear()
        if pending:
            self._consumed(pending)
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.stopProducing()
            except Exception:
                pass
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.connectionLost(reason)
