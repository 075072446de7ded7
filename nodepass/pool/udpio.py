"""UDP socket input and output for the QUIC pool (type 1).

* :func:`listen_udp` binds a UDP port on the injected reactor; on Linux with
  a real reactor it is a :class:`BatchReadPort`, which asks the kernel to
  coalesce consecutive datagrams of one size from one sender (``UDP_GRO``)
  and hands them to the protocol one datagram at a time again, so a burst
  costs one system call instead of one per datagram.
* :func:`tune_socket` asks for large socket buffers and sets "don't
  fragment" (the QUIC datagram size probes rely on a datagram larger than
  the path being refused or lost, never fragmented).
* :class:`DatagramSender` sends through the socket directly, and a run of
  datagrams of one size in one system call (``UDP_SEGMENT``).

Every option is best effort: where the kernel refuses it, datagrams go one
at a time as before.  Ports without a socket (in-memory test networks) get
plain ``write`` calls.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import udp
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import DatagramProtocol
from twisted.python import log

__all__ = [
    "SOCKET_BUFFER",
    "GSO_SEGMENTS",
    "BatchReadPort",
    "DatagramSender",
    "listen_udp",
    "segments",
    "tune_socket",
]

NetworkAddress = Any

#: Receive and send buffer asked for on every QUIC socket (the kernel caps it at
#: net.core.rmem_max / wmem_max): a burst that overflows the receive buffer is
#: lost and costs a retransmission and a halved congestion window.
SOCKET_BUFFER = 4 << 20
#: Most datagrams handed to the kernel in one system call (see :class:`DatagramSender`).
GSO_SEGMENTS = 32

_LINUX = sys.platform.startswith("linux")
# Linux socket options that Python's socket module does not name.
#: SOL_UDP level, UDP_SEGMENT (send a run) and UDP_GRO (receive a run).
_SOL_UDP, _UDP_SEGMENT, _UDP_GRO = 17, 103, 104
#: IP(V6)_MTU_DISCOVER = IP(V6)_PMTUDISC_DO: never fragment.
_DONT_FRAGMENT = ((socket.IPPROTO_IP, 10, 2), (socket.IPPROTO_IPV6, 23, 2)) if _LINUX else ()
#: Room for the UDP_GRO control message (an int).
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4) if _LINUX else 0
#: Largest coalesced read.
_GRO_BUFFER = 65535


def _socket_of(port: Any) -> socket.socket | None:
    handle = getattr(port, "getHandle", None)
    sock = handle() if handle is not None else None
    return sock if isinstance(sock, socket.socket) else None


class BatchReadPort(udp.Port):
    """A Twisted UDP port that reads coalesced datagrams (``UDP_GRO``).

    The kernel joins consecutive datagrams of one size from one sender into
    one read and says the size in a control message; they are handed to the
    protocol one by one, in order, exactly as separate reads would be.
    """

    gro = False

    def startListening(self) -> None:
        super().startListening()  # type: ignore[no-untyped-call]
        try:
            self.socket.setsockopt(_SOL_UDP, _UDP_GRO, 1)
            self.gro = True
        except OSError:
            self.gro = False  # an older kernel: plain reads

    def doRead(self) -> None:
        if not self.gro:
            super().doRead()  # type: ignore[no-untyped-call]
            return
        read = 0
        sock, proto = self.socket, self.protocol
        v6 = self.addressFamily == socket.AF_INET6
        while read < self.maxThroughput:
            try:
                data, ancdata, _flags, addr = sock.recvmsg(_GRO_BUFFER, _GRO_CMSG_SPACE)
            except OSError as se:
                no = se.args[0]
                if no in udp._sockErrReadIgnore:
                    return
                if no in udp._sockErrReadRefuse:
                    if self._connectedAddr:
                        proto.connectionRefused()
                    return
                raise
            read += len(data)
            if v6:
                addr = addr[:2]
            try:
                if ancdata:
                    for datagram in segments(data, ancdata):
                        proto.datagramReceived(datagram, addr)
                else:
                    proto.datagramReceived(data, addr)
            except BaseException:
                log.err()  # type: ignore[no-untyped-call]


def segments(data: bytes, ancdata: list[tuple[int, int, bytes]]) -> list[bytes]:
    """The datagrams of one coalesced read: ``data`` cut at the size the
    ``UDP_GRO`` control message gives (the last may be shorter)."""
    size = 0
    for level, kind, cdata in ancdata:
        if level == _SOL_UDP and kind == _UDP_GRO:
            size = int.from_bytes(cdata[:4], sys.byteorder)
    if 0 < size < len(data):
        return [data[i : i + size] for i in range(0, len(data), size)]
    return [data]


def listen_udp(reactor: Any, port: int, protocol: DatagramProtocol, interface: str = "") -> Any:
    """``reactor.listenUDP(port, protocol, interface=interface)``, as a
    :class:`BatchReadPort` on Linux with a real (posix) reactor."""
    if _LINUX and isinstance(reactor, PosixReactorBase):
        p = BatchReadPort(port, protocol, interface, 8192, reactor)  # type: ignore[no-untyped-call]
        p.startListening()
        return p
    return reactor.listenUDP(port, protocol, interface=interface)


def tune_socket(port: Any) -> None:
    """Ask for :data:`SOCKET_BUFFER`-sized socket buffers on a listening UDP
    port and set "don't fragment" (best effort; ports without a socket, as in
    tests, are left alone)."""
    sock = _socket_of(port)
    if sock is None:
        return
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            if sock.getsockopt(socket.SOL_SOCKET, option) < SOCKET_BUFFER:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass
    for level, option, value in _DONT_FRAGMENT:
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            pass  # e.g. the IPv6 option on an IPv4 socket


class DatagramSender:
    """Sends datagrams on a listening UDP port.

    On a Twisted UDP port the socket is used directly: the port's ``write``
    checks the address text three times per datagram, which is a large part
    of the cost of a small datagram.  :meth:`send_run` hands a run of
    datagrams of one size (the last may be shorter) to the kernel in one
    system call with UDP generic segmentation offload (Linux ``UDP_SEGMENT``),
    falling back to one ``sendto`` each where the kernel or device refuses
    it.  A datagram the kernel refuses (full buffer, an ICMP error pending)
    is dropped; QUIC's loss recovery sends its frames again.  One too large
    for the path raises ``OSError(EMSGSIZE)`` (``MessageLengthError`` from a
    port without a socket) so that the caller lowers its datagram size.
    """

    def __init__(self, port: Any) -> None:
        self._sock = _socket_of(port)
        self._write: Callable[[bytes, NetworkAddress], None] = (
            self._sock.sendto if self._sock is not None else port.write  # type: ignore[assignment]
        )
        #: Whether runs go out with UDP_SEGMENT (cleared when the kernel refuses it).
        self.gso = self._sock is not None and _LINUX

    def send(self, datagram: bytes, addr: NetworkAddress) -> None:
        """Send one datagram."""
        try:
            self._write(datagram, addr)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                raise

    def send_run(self, datagrams: list[bytes], addr: NetworkAddress) -> None:
        """Send datagrams of ``len(datagrams[0])`` bytes each (the last may be
        shorter) to ``addr``; at most :data:`GSO_SEGMENTS` and 65,000 bytes."""
        if len(datagrams) == 1 or not self.gso:
            for datagram in datagrams:
                self.send(datagram, addr)
            return
        assert self._sock is not None
        try:
            self._sock.sendmsg(datagrams, [(_SOL_UDP, _UDP_SEGMENT, struct.pack("=H", len(datagrams[0])))], 0, addr)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                raise
            if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                self.gso = False  # not on this socket or device: one at a time from now on
                for datagram in datagrams:
                    self.send(datagram, addr)
