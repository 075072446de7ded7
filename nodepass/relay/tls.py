"""A lean TLS layer for pool connections, on the standard library's ``ssl`` module.

Twisted's TLS transport (pyOpenSSL through cffi) pays, for every 16 kB
record, a slice copy, an allocation in the BIO read, one write into the TCP
transport's queue and a join before the next send.  Pool connections carry
all of a tunnel's traffic, so :class:`TLSProtocol` drives an
:class:`ssl.SSLObject` over memory BIOs instead, with:

* writes: one ``SSLObject.write`` per relay chunk (OpenSSL cuts the records),
  one read of the outgoing BIO, handed to the socket at once when nothing is
  queued (:func:`~nodepass.relay.write.write_at_once`);
* reads: every record available from one socket read is decrypted into one
  buffer (shared by all connections) and delivered as a single chunk (one copy), so the relay
  makes one write per socket read instead of one per record; once someone
  sets ``bufferSize`` (a UDP session does, see
  :class:`nodepass.tunnel.udp.PoolLink`) every record is delivered on its
  own instead, because each carries one datagram;
* the TCP transport's own buffer and producer for back-pressure (a
  registered producer is passed through).

Behaviour for the protocol it wraps: ``makeConnection`` at once;
``handshakeCompleted()`` (when it provides ``IHandshakeListener``) once the
handshake is done; ``dataReceived`` with application bytes; ``loseConnection``
sends ``close_notify`` and closes after the queued bytes; a received
``close_notify`` ends the connection like a FIN; a TLS error aborts it.  The
transport offers ``getPeerCertificate()`` (the peer's certificate in DER form,
for the fingerprint check), ``negotiatedProtocol`` and the TCP transport's
addresses.

It carries the pool connections of type 0 (:mod:`nodepass.pool.tcp`), the
WebSocket pool over TLS (:mod:`nodepass.pool.ws`) and the HTTP/2 pool
(:mod:`nodepass.pool.h2`, ALPN ``h2``); contexts come from :mod:`nodepass.tls`.
"""

from __future__ import annotations

import ssl
from typing import Any

from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    ITransport,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from nodepass.relay.write import is_plain_tcp, write_at_once

__all__ = ["TLSProtocol", "TLSFactory", "READ_BUFFER"]

#: Bytes decrypted per delivery at most (and the TCP read size of TLS sockets).
READ_BUFFER = 256 * 1024
#: One decryption buffer for the whole process: the reactor runs one
#: connection at a time, and what is decrypted is copied out before the
#: wrapped protocol sees it, so no connection needs a buffer of its own.
_SHARED = memoryview(bytearray(READ_BUFFER))
#: The largest plaintext of one TLS record.
MAX_RECORD = 16384


#: What a closed TLSProtocol wraps from then on (it delivers nothing more).
_GONE = Protocol()


def _failure(exc: BaseException) -> Failure:
    return Failure(exc)  # type: ignore[no-untyped-call]


@implementer(ITransport, IConsumer, IPushProducer)
class TLSProtocol(Protocol):
    """TLS over one TCP connection, as a transport for ``wrapped`` (see the module docstring)."""

    def __init__(self, context: ssl.SSLContext, server_side: bool, wrapped: IProtocol,
                 server_hostname: str | None = None) -> None:
        self.wrapped = wrapped
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._in, self._out, server_side=server_side,
                                     server_hostname=server_hostname)
        self._handshake_done = False
        self._per_record = False
        self._early: list[bytes] = []
        self._direct = False
        self.disconnecting = False
        self.disconnected = False
        self._reason: Failure | None = None

    # -- the TCP side ------------------------------------------------------------------
    def connectionMade(self) -> None:
        t: Any = self.transport
        self._direct = is_plain_tcp(t)
        if hasattr(t, "bufferSize"):
            t.bufferSize = READ_BUFFER
        self.wrapped.makeConnection(self)
        self._handshake()

    def dataReceived(self, data: bytes) -> None:
        if self.disconnected:
            return
        self._in.write(data)
        if not self._handshake_done:
            self._handshake()
            if not self._handshake_done:
                return
        self._decrypt()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.disconnected = True
        self._in.write_eof()
        wrapped = self.wrapped
        # The wrapped protocol and this transport refer to each other: let go
        # of it, so both are freed at once rather than by the cycle collector.
        self.wrapped = _GONE
        wrapped.connectionLost(self._reason or reason)

    # -- TLS ---------------------------------------------------------------------------
    def _handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush()
            self._fail(exc)
            return
        self._handshake_done = True
        early, self._early = self._early, []
        for data in early:
            self.write(data)
        self._flush()
        if IHandshakeListener.providedBy(self.wrapped):
            self.wrapped.handshakeCompleted()  # type: ignore[attr-defined]

    def _decrypt(self) -> None:
        view = _SHARED
        size = len(view)
        sslobj = self._ssl
        got = 0
        end = False
        while got < size:
            try:
                n = int(sslobj.read(size - got, view[got:]))  # type: ignore[call-overload]
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                end = True
                break
            except (ssl.SSLError, OSError) as exc:
                self._deliver(got)
                self._fail(exc)
                return
            if n == 0:
                end = True
                break
            got += n
            if got == size or self._per_record or (n < MAX_RECORD and self._awaiting()):
                self._deliver(got)
                got = 0
        self._deliver(got)
        if self._out.pending:
            self._flush()  # post-handshake messages, key updates
        if end and not self.disconnected:
            self.loseConnection()
            return
        if got == size and self._in.pending:
            self._decrypt()

    def _awaiting(self) -> bool:
        # An unclaimed member keeps its reads apart until its user comes (a
        # UDP session takes each one as a datagram): a record shorter than
        # the largest ends a read then.  Full records are one message only
        # together with the short one that ends it.
        return bool(getattr(self.wrapped, "awaiting_sink", False))

    def _deliver(self, n: int) -> None:
        if n and not self.disconnected:
            self.wrapped.dataReceived(bytes(_SHARED[:n]))

    def _flush(self) -> None:
        out = self._out
        if not out.pending:
            return
        data = out.read()
        t: Any = self.transport
        if t is None:
            return
        if self._direct:
            rest = write_at_once(t, data)
            if rest is not None:
                t.write(rest)
        else:
            t.write(data)

    def _fail(self, exc: BaseException) -> None:
        if self._reason is None:
            self._reason = _failure(exc)
        t: Any = self.transport
        if t is not None:
            t.abortConnection()

    # -- ITransport for the wrapped protocol --------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.disconnecting or self.disconnected or not data:
            return
        if not self._handshake_done:
            self._early.append(bytes(data))
            return
        try:
            self._ssl.write(data)
        except (ssl.SSLError, OSError) as exc:
            self._fail(exc)
            return
        self._flush()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Send close_notify after the queued bytes, then close the TCP connection."""
        if self.disconnecting or self.disconnected:
            return
        self.disconnecting = True
        if self._handshake_done:
            try:
                self._ssl.unwrap()
            except (ssl.SSLError, OSError):
                pass
            self._flush()
        t: Any = self.transport
        if t is not None:
            unregister = getattr(t, "unregisterProducer", None)
            if unregister is not None:
                unregister()
            t.loseConnection()

    def abortConnection(self) -> None:
        t: Any = self.transport
        if t is not None and not self.disconnected:
            t.abortConnection()

    def getPeer(self) -> IAddress:
        return self.transport.getPeer()  # type: ignore[union-attr]

    def getHost(self) -> IAddress:
        return self.transport.getHost()  # type: ignore[union-attr]

    def getPeerCertificate(self) -> bytes | None:
        """The peer's certificate in DER form (None before the handshake or without one)."""
        try:
            return self._ssl.getpeercert(binary_form=True)
        except (ValueError, ssl.SSLError):
            return None

    @property
    def server_name(self) -> str | None:
        """The SNI name: what the client sent (server side) or sends (client side)."""
        if self._ssl.server_side:
            return getattr(self._ssl, "sni_name", None)
        return self._ssl.server_hostname

    @property
    def negotiatedProtocol(self) -> bytes | None:
        proto = self._ssl.selected_alpn_protocol()
        return proto.encode("ascii") if proto else None

    def setTcpNoDelay(self, enabled: bool) -> None:
        t: Any = self.transport
        fn = getattr(t, "setTcpNoDelay", None)
        if fn is not None:
            fn(enabled)

    @property
    def bufferSize(self) -> int:
        """Bytes delivered per ``dataReceived`` at most."""
        return len(_SHARED)

    @bufferSize.setter
    def bufferSize(self, size: int) -> None:
        # Someone reads messages (UDP datagrams, one per record): deliver
        # record by record from now on.
        self._per_record = True

    def getHandle(self) -> Any:
        """The TCP transport's socket (None when it has none, e.g. an in-memory transport)."""
        get = getattr(self.transport, "getHandle", None)
        return get() if get is not None else None

    # -- IConsumer / IPushProducer: the TCP transport's own ---------------------------------
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)  # type: ignore[union-attr]

    def unregisterProducer(self) -> None:
        t: Any = self.transport
        if t is not None:
            t.unregisterProducer()

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        self.loseConnection()


class TLSFactory(ClientFactory):
    """Wraps every protocol ``wrapped_factory`` builds in :class:`TLSProtocol`.

    ``context`` is an :class:`ssl.SSLContext`, or a callable returning the
    current one (certificates that are reloaded)."""

    noisy = False

    def __init__(self, context: Any, server_side: bool, wrapped_factory: IProtocolFactory,
                 server_hostname: str | None = None) -> None:
        self.context = context
        self.server_side = server_side
        self.wrapped_factory = wrapped_factory
        self.server_hostname = server_hostname

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        wrapped = self.wrapped_factory.buildProtocol(addr)  # type: ignore[arg-type]
        if wrapped is None:
            return None
        ctx = self.context() if callable(self.context) else self.context
        p = TLSProtocol(ctx, self.server_side, wrapped, self.server_hostname)
        p.factory = self
        return p

    def startedConnecting(self, connector: Any) -> None:
        started = getattr(self.wrapped_factory, "startedConnecting", None)
        if started is not None:
            started(connector)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        failed = getattr(self.wrapped_factory, "clientConnectionFailed", None)
        if failed is not None:
            failed(connector, reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        lost = getattr(self.wrapped_factory, "clientConnectionLost", None)
        if lost is not None:
            lost(connector, reason)

