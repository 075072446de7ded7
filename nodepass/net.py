"""Small network helpers shared by the tunnel and master code.

* :func:`join_host_port` / :func:`addr_text`: the ``ip:port`` text NodePass
  prints (``[v6]:port`` for IPv6), optionally showing an IPv4-mapped IPv6
  address as plain IPv4 and dropping an IPv6 zone suffix.
* :func:`listen_any`: bind on one interface, or on every interface
  (dual-stack ``::`` first, IPv4 when IPv6 is unavailable);
* :func:`listen_tcp`: a TCP listener of the tunnel (user and tunnel ports)
  with a listen backlog of :data:`BACKLOG`, so that a burst of connections
  is queued rather than dropped (a dropped SYN costs the user a second or
  more before it is sent again).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.error import CannotListenError

__all__ = ["join_host_port", "addr_text", "listen_any", "listen_tcp", "BACKLOG"]

_T = TypeVar("_T")


def join_host_port(host: str, port: int | str, *, unmap: bool = False, zone: bool = True) -> str:
    """``host:port``, or ``[host]:port`` when *host* contains a colon (IPv6).

    With *unmap*, an IPv4-mapped IPv6 address (``::ffff:1.2.3.4``) is shown
    as plain IPv4; with ``zone=False`` an IPv6 zone suffix (``%eth0``) is
    dropped.
    """
    if unmap and host.startswith("::ffff:") and "." in host:
        host = host[7:]
    if ":" in host:
        if not zone:
            host = host.split("%", 1)[0]
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def addr_text(addr: Any, *, unmap: bool = False, zone: bool = True) -> str:
    """:func:`join_host_port` of a Twisted address (``host``/``port``; ``?:0`` when absent)."""
    return join_host_port(str(getattr(addr, "host", "?")), int(getattr(addr, "port", 0)), unmap=unmap, zone=zone)


def listen_any(listen: Callable[[str], _T], host: str) -> _T:
    """Call ``listen(interface)`` for *host*; an empty host means every interface.

    For every interface, dual-stack ``::`` is tried first and IPv4 (``""``)
    when that fails with ``CannotListenError``/``OSError``.  Errors of the
    last attempt propagate.
    """
    if host:
        return listen(host)
    try:
        return listen("::")
    except (CannotListenError, OSError):
        return listen("")


#: Listen backlog of the tunnel's TCP listeners (Go listeners use the
#: system maximum; the kernel caps it at ``net.core.somaxconn``).
BACKLOG = 4096


def listen_tcp(reactor: Any, host: str, port: int, factory: Any) -> Any:
    """``listenTCP`` on ``host`` ("" = all interfaces, IPv6 dual-stack when
    possible) with a backlog of :data:`BACKLOG`."""
    return listen_any(lambda interface: reactor.listenTCP(port, factory, backlog=BACKLOG, interface=interface), host)
