"""One TCP exchange of a dual-end session, from its first event to its end.

:class:`IngressTCP` runs on the side that accepts users: once the user's
connection is admitted (a slot is taken), it sniffs when ``block`` is set,
takes an idle pool connection (waiting up to ``pool_get_timeout``), sends the
``tcp`` signal with the user's address and the connection's ID, and relays
the two.  :class:`EgressTCP` runs on the side that dials targets, for a
``tcp`` signal whose pool connection was found and admitted: it dials a
target through the data policy, writes the PROXY header when configured, and
relays.  Both give the slot back exactly once, log ``Exchange complete`` when
the relay ends, and never let an error in one exchange reach the others.

They are plain objects driven by callbacks rather than generator coroutines:
when the pool has an idle connection and the target answers, a connection
costs no Deferred of its own apart from the dial and the relay, which is what
the per-connection rate of the tunnel depends on.  Anything that has to wait
(ingress not yet open, sniffing, an empty pool, a signal ahead of its
connection) takes the Deferred path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from nodepass.log import Level
from nodepass.net import addr_text, join_host_port
from nodepass.pool import PoolError
from nodepass.relay import RelayProtocol, join
from nodepass.tunnel.signals import Signal

if TYPE_CHECKING:
    from nodepass.tunnel.server import DualEndSession

__all__ = ["IngressTCP", "EgressTCP", "peer_text", "err_text", "TARGET_FACTORY"]

#: Builds the target side of every egress exchange (one factory for all of them).
TARGET_FACTORY = Factory.forProtocol(RelayProtocol)
TARGET_FACTORY.noisy = False


def peer_text(transport: Any) -> str:
    """``ip:port`` of the peer of a TCP transport (IPv4-mapped IPv6 shown as IPv4).

    A Twisted TCP connection keeps its peer's address tuple (``client`` when
    accepted, ``realAddress`` when dialled); reading it directly spares
    building an address object per connection."""
    address = getattr(transport, "client", None)
    if type(address) is not tuple:
        address = getattr(transport, "realAddress", None)
    if type(address) is tuple:
        return join_host_port(str(address[0]), int(address[1]), unmap=True)
    return addr_text(transport.getPeer(), unmap=True)


def err_text(exc: Any) -> str:
    """The text of an exception or Failure (its type name when it has none)."""
    if isinstance(exc, Failure):
        exc = exc.value
    text = str(exc)
    return text or type(exc).__name__


class _Exchange:
    """What both kinds share: the session, and the slot given back once."""

    __slots__ = ("session", "released")

    def __init__(self, session: DualEndSession) -> None:
        self.session = session
        self.released = False

    def _end(self, reason: str | None) -> None:
        """Give the slot back (once); log the relay's end reason, if it ran."""
        if self.released:
            return
        self.released = True
        s = self.session
        s.policy.release("tcp")
        if reason is not None:
            s.logger.info("Exchange complete: %s", reason)


class IngressTCP(_Exchange):
    """An admitted user connection: sniff, take a pool connection, signal, relay."""

    __slots__ = ("user", "peer", "conn")

    def __init__(self, session: DualEndSession, user: RelayProtocol, peer: str) -> None:
        super().__init__(session)
        self.user = user
        self.peer = peer
        self.conn: Any = None

    def start(self) -> None:
        s = self.session
        try:
            policy = s.policy
            if policy.blocking:
                d = self.user.peek(policy.sniff_bytes, policy.sniff_timeout, s.reactor)
                d.addCallback(self._sniffed).addErrback(self._crashed)
                return
            self._take()
        except Exception as exc:  # never let one connection hurt the others
            self._crashed(exc)

    def _sniffed(self, first: bytes) -> None:
        if self.session.policy.sniff(first, self.peer) is not None:
            self.user.abort()
            self._end(None)
            return
        self._take()

    def _take(self) -> None:
        s = self.session
        if self.user.lost or s.stopped:
            self._end(None)
            return
        newest = s.control is not None and s.control.newest_first
        got = s.pool.take_idle(newest=newest)
        if got is not None:
            self._got(got)
            return
        d = s.pool.incoming_get(s.settings.pool_get_timeout, newest=newest)
        # A user who leaves while waiting gives up its turn: the next pool
        # connection goes to a user still there (or stays idle).
        self.user.when_lost().addCallback(lambda _reason: d.cancel())
        d.addCallbacks(self._got, self._no_connection).addErrback(self._crashed)

    def _no_connection(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError):  # type: ignore[no-untyped-call]
            self._end(None)
            return
        if not failure.check(PoolError):  # type: ignore[no-untyped-call]
            failure.raiseException()
        self.session.logger.warn("commonTCPLoop: request timeout: %s", failure.value)
        self.user.abort()
        self._end(None)

    def _got(self, got: tuple[str, Any]) -> None:
        cid, conn = got
        s = self.session
        user = self.user
        if user.lost:
            conn.close()
            self._end(None)
            return
        logger = s.logger
        debug = logger.enabled(Level.DEBUG)
        if debug:
            logger.debug("Tunnel connection: get %s <- pool active %d", cid, s.pool.active)
        s._send(Signal("tcp", remote=self.peer, id=cid))
        if debug:
            logger.debug("TCP launch signal: cid %s -> control", cid)
        self.conn = conn
        s.exchanges.add(conn)
        if logger.enabled(Level.INFO):
            logger.info("Starting exchange: %s <-> %s", self.peer, peer_text(conn.transport))
        policy = s.policy
        join(
            user, conn,
            reactor=s.reactor,
            stats=s.stats,
            counted=user,
            throttle=policy.throttle,
            read_timeout=policy.read_timeout,
        ).addCallback(self._joined)

    def _joined(self, reason: str) -> None:
        self.session.exchanges.discard(self.conn)
        self._end(reason)

    def _crashed(self, failure: Any) -> None:
        self.session.logger.error("commonTCPLoop: %s", err_text(failure))
        self.user.abort()
        self._end(None)


class EgressTCP(_Exchange):
    """An admitted pool connection named by a ``tcp`` signal: dial, PROXY header, relay."""

    __slots__ = ("conn", "remote", "target")

    def __init__(self, session: DualEndSession, conn: Any, remote: str) -> None:
        super().__init__(session)
        self.conn = conn
        self.remote = remote
        self.target: Any = None

    def start(self) -> None:
        s = self.session
        conn = self.conn
        exchanges = s.exchanges
        exchanges.add(conn)
        conn.on_lost(lambda _reason: exchanges.discard(conn))
        try:
            d = s.policy.connect_tcp(TARGET_FACTORY)
        except Exception as exc:
            self._dial_failed(exc)
            return
        d.addCallbacks(self._connected, self._dial_failed).addErrback(self._crashed)

    def _dial_failed(self, failure: Any) -> None:
        self.session.logger.error("commonTCPOnce: dialWithRotation failed: %s", err_text(failure))
        self.conn.close()
        self._end(None)

    def _connected(self, target: Any) -> None:
        s = self.session
        conn = self.conn
        self.target = target
        exchanges = s.exchanges
        exchanges.add(target)
        target.on_lost(lambda _reason: exchanges.discard(target))
        if conn.lost:
            target.close()
            self._end(None)
            return
        policy = s.policy
        if policy.proxy:
            try:
                header = policy.proxy_header(self.remote, target.transport.getPeer())
            except ValueError as exc:
                s.logger.error("commonTCPOnce: sendProxyV1Header failed: %s", exc)
                target.close()
                conn.close()
                self._end(None)
                return
            if header:
                target.transport.write(header)
                s.stats.tcptx += len(header)
        if s.logger.enabled(Level.INFO):
            s.logger.info(
                "Starting exchange: %s <-> %s", peer_text(conn.transport), peer_text(target.transport)
            )
        join(
            conn, target,
            reactor=s.reactor,
            stats=s.stats,
            counted=target,
            throttle=policy.throttle,
            read_timeout=policy.read_timeout,
        ).addCallback(self._end)

    def _crashed(self, failure: Failure) -> None:
        self.session.logger.error("commonTCPOnce: %s", err_text(failure))
        self.conn.close()
        if self.target is not None:
            self.target.close()
        self._end(None)
