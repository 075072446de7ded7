"""PROXY protocol version 1 headers (``proxy=1``).

The side that dials the target (the egress side, or the client in single-end
mode) writes one header as the very first bytes of the new target
connection, before any payload::

    PROXY TCP4 <src ip> <dst ip> <src port> <dst port>\\r\\n

``src`` is the end user's address (on the egress side the ``remote`` of the
``tcp`` signal; in single-end mode the accepted connection's peer).  ``dst``
is the *remote* address of the target connection that was dialed.  ``TCP4``
is used when both addresses are IPv4 (an IPv4-mapped IPv6 address counts as
IPv4), ``TCP6`` otherwise; in a ``TCP6`` header an IPv4 address is written in
its IPv4-mapped form (``::ffff:a.b.c.d``) so the line stays valid PROXY v1.
Addresses are written in canonical text form and without IPv6 zone.  The
header is never sent for UDP and PROXY v2 is not produced.
"""

from __future__ import annotations

import ipaddress
from typing import Union

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress

__all__ = ["AddressLike", "ProxyHeaderError", "build_v1_header", "split_host_port"]

AddressLike = Union[IAddress, tuple[str, int], str]
"""An address given as a Twisted address, ``(host, port)`` or ``"host:port"`` text."""

_IP = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class ProxyHeaderError(ValueError):
    """An address cannot be expressed in a PROXY v1 header."""


def split_host_port(text: str) -> tuple[str, int]:
    """Split ``"1.2.3.4:80"`` or ``"[::1]:80"`` into host and port.

    Raises :class:`ProxyHeaderError` with the offending text when it is malformed.
    """
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ProxyHeaderError(f"invalid address {text!r}: expected [ipv6]:port")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ProxyHeaderError(f"invalid address {text!r}: expected host:port")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ProxyHeaderError(f"invalid port in address {text!r}")
    return host, int(port_text)


def _host_port(addr: AddressLike) -> tuple[str, int]:
    if isinstance(addr, (IPv4Address, IPv6Address)):
        return addr.host, addr.port
    if isinstance(addr, tuple):
        return str(addr[0]), int(addr[1])
    if isinstance(addr, str):
        return split_host_port(addr)
    raise ProxyHeaderError(f"unsupported address for PROXY header: {addr!r}")


def _ip(host: str) -> _IP:
    bare = host.strip("[]").split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        raise ProxyHeaderError(f"not an IP address: {host!r}") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _as_v6_text(ip: _IP) -> str:
    if isinstance(ip, ipaddress.IPv4Address):
        return f"::ffff:{ip}"
    return str(ip)


def build_v1_header(client: AddressLike, server: AddressLike) -> bytes:
    """Return the PROXY v1 line for a user at *client* reaching the target at *server*.

    Raises :class:`ProxyHeaderError` (a ``ValueError``) when either address is
    not an IP literal with a port; the caller logs it and drops the session.
    """
    src_host, src_port = _host_port(client)
    dst_host, dst_port = _host_port(server)
    src, dst = _ip(src_host), _ip(dst_host)
    if isinstance(src, ipaddress.IPv4Address) and isinstance(dst, ipaddress.IPv4Address):
        family, src_text, dst_text = "TCP4", str(src), str(dst)
    else:
        family, src_text, dst_text = "TCP6", _as_v6_text(src), _as_v6_text(dst)
    return f"PROXY {family} {src_text} {dst_text} {src_port} {dst_port}\r\n".encode("ascii")
