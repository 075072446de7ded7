"""The seam between the tunnel and its pool, whatever the transport.

The tunnel's server, client and control-channel code use a pool only through
these interfaces; the members they get are
:class:`~nodepass.pool.base.PoolConnection` objects (relay endpoints), so
relaying, counting, rate limiting, UDP and the control channel work the same
on TCP, QUIC, WebSocket and HTTP/2 members.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

__all__ = ["IPool", "IServerPool", "IClientPool"]


class IPool(Interface):
    """Idle members of one tunnel session, found oldest-first or by ID."""

    active = Attribute("Number of idle members (the POOL figure).")
    closed = Attribute("True once close() was called.")
    last_error = Attribute("Why the most recent attempt to open a member failed, or ''.")

    def take_idle(*, newest: bool = False) -> object:
        """``(id, member)``: the oldest (or newest) idle member other than the
        control one, taken at once; None when there is none."""

    def take(conn_id: str) -> object:
        """The member named ``conn_id`` taken at once, or None when it has not arrived."""

    def incoming_get(timeout: float, *, newest: bool = False) -> object:
        """Deferred ``(id, member)``: the oldest (or newest) idle member other than
        the control one, waiting up to ``timeout``; fails with PoolError."""

    def outgoing_get(conn_id: str, timeout: float) -> object:
        """Deferred member named ``conn_id``, waiting up to ``timeout``; fails with PoolError."""

    def has(conn_id: str) -> bool:
        """Whether an idle member has this ID."""

    def when_idle() -> object:
        """A Deferred fired once at least one member is idle."""

    def full() -> bool:
        """Whether ``max`` members are idle."""

    def flush() -> None:
        """Close every idle member (orderly)."""

    def close() -> None:
        """Close idle members, stop opening new ones, fail every waiter."""

    def ready() -> bool:
        """False once closed."""

    def add_error() -> None:
        """Count one failed use (an ID the peer named that never arrived)."""

    def error_count() -> int:
        """Failed uses since the last reset."""

    def reset_error() -> None:
        """Zero the failed-use count."""


class IServerPool(IPool):
    """The accepting side: members arrive from the handshaken client."""

    client_ip = Attribute("The IP that performed the handshake ('' = any).")

    def start() -> None:
        """Open the transport's own listeners, if any (QUIC binds the tunnel
        port's UDP side); raises CannotListenError/OSError when that fails."""

    def factory() -> object:
        """The IProtocolFactory for new connections on the tunnel TCP port once the
        handshake is done, or None when the transport does not use that port."""

    def client_allowed(host: str) -> bool:
        """Whether a member from ``host`` may join."""


class IClientPool(IPool):
    """The dialling side: keeps between ``min`` and ``max`` idle members."""

    def start() -> None:
        """Start opening members (the first round at once)."""
