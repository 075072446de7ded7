"""Connection pools for dual-end tunnels, one module per transport.

==== ========== ======================================= ==========================
type name       members                                 module
==== ========== ======================================= ==========================
0    TCP        one TCP (or TLS) connection each        :mod:`nodepass.pool.tcp`
1    QUIC       streams of one QUIC connection (UDP)    :mod:`nodepass.pool.quic`
2    WebSocket  one WebSocket (ws/wss) each             :mod:`nodepass.pool.ws`
3    HTTP/2     streams of one HTTP/2 connection (TLS)  :mod:`nodepass.pool.h2`
==== ========== ======================================= ==========================

What all of them share (IDs, the idle set, refill rules) is in
:mod:`nodepass.pool.base`; the tunnel sees a pool only through
:mod:`nodepass.pool.interface`.  :func:`server_pool` and :func:`client_pool`
build the pool of a type; a transport's module (and its library) is imported
only when that type is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from nodepass.log import NodePassLogger
from nodepass.pool.base import CONTROL_ID, PoolConnection, PoolError
from nodepass.pool.interface import IClientPool, IPool, IServerPool

__all__ = [
    "CONTROL_ID",
    "PoolConnection",
    "PoolError",
    "IPool",
    "IServerPool",
    "IClientPool",
    "POOL_TYPES",
    "pool_type_name",
    "server_pool",
    "client_pool",
    "probe_server_port",
    "UnknownPoolType",
]

#: type -> (name, module, server class, client class)
POOL_TYPES: dict[int, tuple[str, str, str, str]] = {
    0: ("TCP", "nodepass.pool.tcp", "TcpServerPool", "TcpClientPool"),
    1: ("QUIC", "nodepass.pool.quic", "QuicServerPool", "QuicClientPool"),
    2: ("WebSocket", "nodepass.pool.ws", "WsServerPool", "WsClientPool"),
    3: ("HTTP/2", "nodepass.pool.h2", "H2ServerPool", "H2ClientPool"),
}


class UnknownPoolType(ValueError):
    """A pool type this build does not know."""


def pool_type_name(pool_type: int) -> str:
    """``TCP``/``QUIC``/``WebSocket``/``HTTP/2``, or ``unknown``."""
    entry = POOL_TYPES.get(pool_type)
    return entry[0] if entry is not None else "unknown"


def _class(pool_type: int, server: bool) -> Any:
    entry = POOL_TYPES.get(pool_type)
    if entry is None:
        raise UnknownPoolType(f"unknown pool type {pool_type}")
    module = importlib.import_module(entry[1])
    return getattr(module, entry[2] if server else entry[3])


def probe_server_port(pool_type: int, reactor: Any, host: str, port: int) -> None:
    """Check at session start that the transport's own listener can bind
    (QUIC: the UDP side of the tunnel port); raises CannotListenError."""
    probe = getattr(_class(pool_type, True), "probe", None)
    if probe is not None:
        probe(reactor, host, port)


def server_pool(
    pool_type: int,
    reactor: Any,
    logger: NodePassLogger,
    *,
    max_cap: int,
    client_ip: str,
    tls: Any,
    keepalive: float,
    strict: bool,
    host: str,
    port: int,
) -> IServerPool:
    """The server pool of ``pool_type`` for one session.

    ``tls`` is the session's :class:`~nodepass.tls.ServerTLS` (None for plain
    TCP); ``host``/``port`` the tunnel address (transports with listeners of
    their own bind there in :meth:`IServerPool.start`).
    """
    cls = _class(pool_type, True)
    kwargs: dict[str, Any] = {
        "max_cap": max_cap,
        "client_ip": client_ip,
        "tls": tls,
        "keepalive": keepalive,
        "strict": strict,
    }
    if pool_type != 0:
        kwargs.update(host=host, port=port)
    return cls(reactor, logger, **kwargs)  # type: ignore[no-any-return]


def client_pool(
    pool_type: int,
    reactor: Any,
    logger: NodePassLogger,
    *,
    min_cap: int,
    max_cap: int,
    min_interval: float,
    max_interval: float,
    keepalive: float,
    host: str,
    port: int,
    dial_timeout: float,
    tls_code: int,
    server_name: str,
) -> IClientPool:
    """The client pool of ``pool_type`` for one session.

    ``host``/``port`` is the tunnel address as written in the URL,
    ``tls_code`` the code the server announced, ``server_name`` the ``sni``
    name (used to verify the server with tls 2).
    """
    cls = _class(pool_type, False)
    kwargs: dict[str, Any] = {
        "min_cap": min_cap,
        "max_cap": max_cap,
        "min_interval": min_interval,
        "max_interval": max_interval,
        "keepalive": keepalive,
        "host": host,
        "port": port,
        "dial_timeout": dial_timeout,
    }
    if pool_type == 0:
        from nodepass.tls import client_ssl_context

        kwargs["ssl_context"] = client_ssl_context(tls_code, server_name)
        kwargs["server_hostname"] = server_name if tls_code == 2 else None
    else:
        kwargs.update(tls_code=tls_code, server_name=server_name)
    return cls(reactor, logger, **kwargs)  # type: ignore[no-any-return]
