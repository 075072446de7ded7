"""Writing to TCP and TLS transports without an extra reactor pass, and socket options.

* :func:`direct_writer` gives a ``write`` for a transport that hands a chunk
  straight to the socket when nothing is queued (plain TCP) or straight to
  the TLS layer (TLS), instead of waiting for the next reactor pass;
* :func:`write_at_once` is its plain-TCP core, also used for UDP datagrams
  carried over a pool connection;
* :func:`is_plain_tcp` tells whether a transport is a Twisted TCP socket with
  no TLS on it (the only kind the zero-copy path can take over);
* :func:`set_nodelay` / :func:`set_keepalive` set socket options through any
  wrapper (TLS, or a multiplexed stream, which ignores them).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp

from nodepass.relay.connect import LeanClient

__all__ = ["direct_writer", "TurnWriter", "write_at_once", "is_plain_tcp", "set_nodelay", "set_keepalive"]

#: Twisted's TCP transports, and the one of :mod:`nodepass.relay.connect`.
_PLAIN_TCP: tuple[type, ...] = (tcp.Server, tcp.Client, LeanClient)


def set_nodelay(transport: Any) -> None:
    """Set TCP_NODELAY on a transport (also through a TLS wrapper); best effort.

    Done once per transport: a pool member already has it when it is joined."""
    seen = 0
    while transport is not None and seen < 4:
        fn = getattr(transport, "setTcpNoDelay", None)
        if fn is not None:
            if getattr(transport, "_np_nodelay", False):
                return
            try:
                fn(True)
                transport._np_nodelay = True
            except Exception:
                pass
            return
        transport = getattr(transport, "transport", None)
        seen += 1


def direct_writer(transport: Any) -> Callable[[bytes], None]:
    """A ``write`` for ``transport`` that sends at once when nothing is queued.

    Twisted's ``write`` always queues and sends on the next reactor pass,
    which costs a writer registration, a poll round and an unregistration
    per chunk.  For a plain TCP transport whose queue is empty this hands the
    chunk straight to the socket (``writeSomeData``) and queues only what the
    kernel did not take, so ordering, back-pressure (the queue still pauses a
    registered producer) and error handling stay Twisted's.

    A TLS transport normally holds every write smaller than 64 kB back
    until the next reactor pass (and copies each one) to batch small
    writes; a relay chunk is already one read's worth, so it goes to the TLS
    layer at once, after anything the batcher still holds.  Any other
    transport (test transports) gets its own ``write``.
    """
    batcher = getattr(transport, "_aggregator", None)
    if batcher is not None and type(transport).__module__ == "twisted.protocols.tls":
        # Only then is Twisted's TLS module (and pyOpenSSL) loaded for sure.
        from twisted.protocols.tls import TLSMemoryBIOProtocol, _AggregateSmallWrites

        if not isinstance(transport, TLSMemoryBIOProtocol) or not isinstance(batcher, _AggregateSmallWrites):
            return transport.write  # type: ignore[no-any-return]
        tls_t: Any = transport
        tls_write: Any = TLSMemoryBIOProtocol.write
        agg: Any = batcher

        def write_tls(data: bytes) -> None:
            if agg._buffer:
                agg.flush()
            tls_write(tls_t, data)

        return write_tls
    if not is_plain_tcp(transport):
        return transport.write  # type: ignore[no-any-return]
    t: Any = transport

    def write(data: bytes) -> None:
        rest = write_at_once(t, data)
        if rest is not None:
            t.write(rest)

    return write


class TurnWriter:
    """Gathers the chunks written during one reactor turn and passes them on as one.

    For a source that delivers many small chunks at once (a QUIC member gets
    one per received packet, and a socket read brings dozens of packets),
    a write per chunk would cost a system call each.  The first chunk of a
    turn schedules :meth:`flush` for the end of the turn (``callLater(0)``
    runs once the reactor has handled the events of its current poll), which
    hands everything written meanwhile to ``write`` in one call.  The owner
    calls :meth:`flush` itself before anything that must come after the data
    (closing or half-closing the destination).
    """

    def __init__(self, reactor: Any, write: Callable[[bytes], None]) -> None:
        self._reactor = reactor
        self._write = write
        self._chunks: list[bytes] = []
        self._call: Any = None

    def write(self, data: bytes) -> None:
        if not self._chunks:
            self._call = self._reactor.callLater(0, self.flush)
        self._chunks.append(data)

    def flush(self) -> None:
        """Pass on what was gathered (nothing when nothing is pending)."""
        chunks = self.discard()
        if chunks:
            self._write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def discard(self) -> list[bytes]:
        """Stop the pending flush and return (forget) what was gathered;
        for a destination that is gone."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        chunks, self._chunks = self._chunks, []
        return chunks


def is_plain_tcp(transport: Any) -> bool:
    """True for a Twisted TCP transport with no TLS started on it."""
    return type(transport) in _PLAIN_TCP and not getattr(transport, "TLS", False)


def write_at_once(t: Any, data: bytes) -> bytes | None:
    """Hand *data* to the socket of plain TCP transport *t* (see :func:`is_plain_tcp`)
    now when the transport is open and nothing is queued.

    Returns ``None`` when the socket took everything, else the bytes still to
    ``write`` (all of *data* when nothing was sent at once).
    """
    if (
        t.connected
        and not t.disconnecting
        and not t._writeDisconnecting
        and not t._tempDataLen
        and t.offset == len(t.dataBuffer)
    ):
        sent = t.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            if sent >= len(data):
                return None
            return data[sent:]
    return data


def set_keepalive(transport: Any, period: float) -> None:
    """Enable TCP keep-alive with the given period on a (possibly TLS) transport."""
    t = transport
    for _ in range(4):
        if t is None:
            return
        handle = getattr(t, "getHandle", None)
        sock = handle() if handle is not None else None
        if isinstance(sock, socket.socket):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                secs = max(1, int(period))
                if hasattr(socket, "TCP_KEEPIDLE"):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, secs)
                if hasattr(socket, "TCP_KEEPINTVL"):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, secs)
            except OSError:
                pass
            return
        t = getattr(t, "transport", None)
