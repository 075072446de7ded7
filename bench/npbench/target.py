"""Target servers for the benchmark, run as their own process.

One port number serves TCP and UDP on 127.0.0.1:

* TCP: the first byte picks the mode. ``E``: echo everything that follows.
  ``S``: sink; an 8-byte big-endian length, then that many bytes, answered
  with ``OK`` once the last one arrived.
* UDP: every datagram is sent back to its sender.

It runs on asyncio in one thread, so thousands of concurrent connections cost
no threads. An echo connection stops reading while its write buffer is full,
so a client that does not read cannot grow the target's memory.

Usage: ``python -m npbench.target PORT`` (0 picks a free port); the chosen
port is printed on the first line of standard output.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import sys


def raise_fd_limit() -> None:
    """Raise the soft limit of open files to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


class TcpTarget(asyncio.Protocol):
    """One TCP connection: echo or sink, chosen by its first byte."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.mode = b""
        self.header = b""
        self.left = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.mode:
            self.mode, data = data[:1], data[1:]
            if self.mode not in (b"E", b"S"):
                self.transport.close()
                return
        if self.mode == b"E":
            if data:
                self.transport.write(data)
            return
        if self.left < 0:
            self.header += data
            if len(self.header) < 8:
                return
            self.left = int.from_bytes(self.header[:8], "big")
            data = self.header[8:]
            self.header = b""
        self.left -= len(data)
        if self.left <= 0:
            self.transport.write(b"OK")

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()


class UdpEcho(asyncio.DatagramProtocol):
    """Sends every datagram back to where it came from."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(TcpTarget, "127.0.0.1", port, backlog=4096, reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", port))
    print(port, flush=True)
    await server.serve_forever()


def main() -> None:
    raise_fd_limit()
    try:
        asyncio.run(serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
