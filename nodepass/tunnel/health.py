"""The control channel of a dual-end session: signals, health rounds and TLS verify.

:class:`ControlChannel` runs on the pool connection with ID ``00000000``:

* reads signal lines; a line that does not decode is logged at ERROR and
  skipped; if no byte arrives for 3 x report interval the session fails;
* writes signals (one write per signal, in order);
* health round every report interval: when the pool's error count exceeds
  half its idle connections it sends ``flush``, flushes its own pool, resets
  the count and waits one interval; then it notes the time and sends
  ``ping`` (the first ping goes out at once);
* answers ``ping`` with ``pong``; on ``pong`` it records PING (ms since the
  last ping) and POOL (idle connections) and logs the CHECK_POINT line at
  EVENT level;
* ``flush`` from the peer flushes the local pool and resets the error count;
* ``tcp``/``udp`` are handed to the session;
* TLS fingerprint verification (codes 1 and 2), following this matrix so that
  Go peers of v1.14.0 and later both work:

  ====  ======  ==============  ====================================  ==============
  tls   role    sends verify    on a received verify                  gates ingress
  ====  ======  ==============  ====================================  ==============
  1     both    yes             check, abort on mismatch              yes
  2     server  yes             check against its own certificate     no
  2     client  no              ignore an empty ``fp``, else check    no
  ====  ======  ==============  ====================================  ==============

  With tls 2, until the peer's ``verify`` arrives (at most two report
  intervals; peers after v1.14.0 send none), the ingress takes idle pool
  connections newest first (:attr:`ControlChannel.newest_first`).  A v1.14.0
  peer sends its one ``verify`` on the *oldest* connection of its pool and
  then closes it; a user paired with that connection before the ``verify``
  arrived would get nothing back, and holding users until then would delay
  every session start.  An ignored ``verify`` (empty ``fp``) still drops the
  named connection from the idle pool, as the peer has closed it.

  The sender starts as soon as the control channel is up (NodePass waits
  for its first report tick, which delays the first user byte by seconds; a
  NodePass peer accepts ``verify`` at any time), takes an idle pool
  connection the ingress way, sends ``verify`` with its ID and the fingerprint (server: its
  own certificate; client: the certificate seen on that connection) and
  closes it.  The receiver takes the named connection (or reuses the one it
  just used for its own ``verify`` when the peer picked the same ID) and
  compares.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from nodepass.env import Settings
from nodepass.log import NodePassLogger
from nodepass.net import addr_text
from nodepass.pool import PoolConnection, PoolError
from nodepass.relay import direct_writer
from nodepass.stats import TunnelStats
from nodepass.tunnel.signals import LineSplitter, Signal, SignalError, decode, encode
from nodepass.tunnel.timers import DelayedCalls

__all__ = ["ControlChannel"]


class ControlChannel:
    """Signals and health on the control connection of one session."""

    def __init__(
        self,
        *,
        reactor: Any,
        logger: NodePassLogger,
        settings: Settings,
        stats: TunnelStats,
        key: str,
        conn: PoolConnection,
        pool: Any,
        role: str,
        tls_code: int,
        own_fingerprint: Callable[[], str] | None,
        on_launch: Callable[[Signal], None],
        on_failure: Callable[[str], None],
        on_verified: Callable[[], None],
    ) -> None:
        self.reactor = reactor
        self.logger = logger
        self.settings = settings
        self.stats = stats
        self.key = key
        self.conn = conn
        self.pool = pool
        self.role = role
        self.tls_code = tls_code
        self.own_fingerprint = own_fingerprint
        self.on_launch = on_launch
        self.on_failure = on_failure
        self.on_verified = on_verified
        self._lines = LineSplitter()
        self._checkpoint = reactor.seconds()
        self._last_read = reactor.seconds()
        self._calls = DelayedCalls(reactor)
        self._stopped = False
        self._recent_verify: dict[str, str] = {}
        self._write: Callable[[bytes], None] | None = None
        self.verified = False
        self._released = False
        #: With tls 2, take idle connections newest first until the peer's verify.
        self.newest_first = tls_code == 2

    # -- lifecycle ---------------------------------------------------------------
    @property
    def interval(self) -> float:
        return self.settings.report_interval

    def start(self) -> None:
        self.conn.when_lost().addCallback(self._conn_lost)
        self.conn.set_sink(self._data)
        self._later(3 * self.interval, self._idle_check)
        if self.sends_verify:
            self._later(0, self._send_verify)
        if self.tls_code == 2:
            self._later(2 * self.interval, self._release_ingress)
        self._tick()

    def stop(self) -> None:
        self._stopped = True
        self._calls.cancel_all()
        self.conn.abort()

    @property
    def sends_verify(self) -> bool:
        return self.tls_code == 1 or (self.tls_code == 2 and self.role == "server")

    @property
    def gates_ingress(self) -> bool:
        """Whether the ingress side must wait for a verified fingerprint."""
        return self.tls_code == 1

    def _release_ingress(self) -> None:
        """The peer's verify was handled (or, with tls 2, its time is over): with
        tls 1 open the ingress once, with tls 2 go back to oldest-first."""
        if self._released or self._stopped:
            return
        self._released = True
        self.newest_first = False
        if self.tls_code == 1:
            self.on_verified()

    def _later(self, delay: float, fn: Callable[[], object]) -> None:
        if self._stopped:
            return
        self._calls.later(delay, fn)

    def _fail(self, reason: str) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._calls.cancel_all()
        self.on_failure(reason)

    def _conn_lost(self, reason: str) -> None:
        self._fail(f"commonQueue: readBytes failed: {reason}")

    def _idle_check(self) -> None:
        limit = 3 * self.interval
        idle = self.reactor.seconds() - self._last_read
        if idle >= limit:
            self._fail(f"commonQueue: readBytes failed: read timeout after {limit:g}s")
            return
        self._later(limit - idle, self._idle_check)

    # -- writing -----------------------------------------------------------------
    def send(self, signal: Signal) -> None:
        """Queue one signal on the control connection."""
        if self._stopped or self.conn.lost or self.conn.transport is None:
            return
        write = self._write
        if write is None:
            # Sent at once rather than on the next reactor pass: a ``tcp``
            # signal is on the critical path of every new connection.
            write = self._write = direct_writer(self.conn.transport)
        write(encode(signal, self.key))

    # -- reading -----------------------------------------------------------------
    def _data(self, data: bytes) -> None:
        self._last_read = self.reactor.seconds()
        try:
            lines = self._lines.feed(data)
        except SignalError as exc:
            self.logger.error("commonQueue: %s", exc)
            return
        for line in lines:
            if self._stopped:
                return
            try:
                signal = decode(line, self.key)
            except SignalError as exc:
                self.logger.error("commonQueue: %s", exc)
                continue
            self._dispatch(signal)

    def _dispatch(self, signal: Signal) -> None:
        action = signal.action
        if action == "ping":
            self.send(Signal("pong"))
        elif action == "pong":
            self._pong()
        elif action in ("tcp", "udp"):
            self.on_launch(signal)
        elif action == "flush":
            self.pool.flush()
            self.pool.reset_error()
            self._later(
                self.interval,
                lambda: self.logger.debug("Tunnel pool flushed: %d active connections", self.pool.active),
            )
        elif action == "verify":
            if self.tls_code in (1, 2):
                self._receive_verify(signal)
        else:
            # Unknown actions are ignored, as Go does; say so for debugging.
            self.logger.debug("commonOnce: unknown signal action ignored: %r", action[:32])

    # -- health --------------------------------------------------------------------
    def _tick(self) -> None:
        if self._stopped:
            return
        if self.pool.error_count() > self.pool.active // 2:
            self.send(Signal("flush"))
            self.pool.flush()
            self.pool.reset_error()

            def after_flush() -> None:
                self.logger.debug("Tunnel pool flushed: %d active connections", self.pool.active)
                self._ping()

            self._later(self.interval, after_flush)
            return
        self._ping()

    def _ping(self) -> None:
        if self._stopped:
            return
        self._checkpoint = self.reactor.seconds()
        self.send(Signal("ping"))
        self._later(self.interval, self._tick)

    def _pong(self) -> None:
        ms = int((self.reactor.seconds() - self._checkpoint) * 1000)
        self.stats.ping = max(0, ms)
        self.stats.pool = self.pool.active
        self.logger.event("%s", self.stats.checkpoint_line())

    # -- verify --------------------------------------------------------------------
    def _fingerprint_for(self, conn: PoolConnection | None) -> str:
        if self.role == "server":
            return self.own_fingerprint() if self.own_fingerprint is not None else ""
        return conn.peer_fingerprint() if conn is not None else ""

    @defer.inlineCallbacks
    def _send_verify(self) -> Any:
        try:
            cid, conn = yield self.pool.incoming_get(self.settings.pool_get_timeout, newest=True)
        except PoolError as exc:
            self.logger.error("incomingVerify: incomingGet failed: %s", exc)
            self._fail(f"incomingVerify: {exc}")
            return
        if self._stopped:
            conn.abort()
            return
        fp = self._fingerprint_for(conn)
        self._recent_verify[cid] = fp
        self.send(Signal("verify", id=cid, fp=fp))
        self.logger.debug("TLS verify signal: cid %s -> %s", cid, self._peer_text())
        conn.close()

    def _peer_text(self) -> str:
        t = self.conn.transport
        return addr_text(t.getPeer() if t is not None else None)

    @defer.inlineCallbacks
    def _receive_verify(self, signal: Signal) -> Any:
        try:
            yield self._check_verify(signal)
        finally:
            if self.tls_code == 2:
                self._release_ingress()

    @defer.inlineCallbacks
    def _check_verify(self, signal: Signal) -> Any:
        abort = self.tls_code == 1
        fp = signal.fp
        if not fp:
            if abort:
                self.logger.error("outgoingVerify: no fingerprint in signal")
                self._fail("outgoingVerify: no fingerprint in signal")
            else:
                self.logger.debug("TLS verify signal without fingerprint ignored")
                if self.pool.has(signal.id):  # the peer closed it after the signal
                    taken = self.pool.outgoing_get(signal.id, 0.0)
                    taken.addCallbacks(lambda conn: conn.close(), lambda _: None)
            return
        cid = signal.id
        self.logger.debug("TLS verify signal: cid %s <- %s", cid, self._peer_text())
        if cid in self._recent_verify and self.role == "client":
            local = self._recent_verify.pop(cid)
        elif self.role == "server":
            local = self._fingerprint_for(None)
            # Consume the named connection as the peer expects; its absence is
            # harmless when we already used it for our own verify.
            if cid in self._recent_verify:
                self._recent_verify.pop(cid)
            else:
                try:
                    conn = yield self.pool.outgoing_get(cid, self.settings.pool_get_timeout)
                    conn.close()
                except PoolError as exc:
                    self.logger.error("outgoingVerify: request timeout: %s", exc)
                    if abort:
                        self._fail(f"outgoingVerify: {exc}")
                    return
            if not local:
                self.logger.error("outgoingVerify: no local certificate")
                if abort:
                    self._fail("outgoingVerify: no local certificate")
                return
        else:
            try:
                conn = yield self.pool.outgoing_get(cid, self.settings.pool_get_timeout)
            except PoolError as exc:
                self.logger.error("outgoingVerify: request timeout: %s", exc)
                if abort:
                    self._fail(f"outgoingVerify: {exc}")
                return
            local = conn.peer_fingerprint()
            conn.close()
            if not local:
                self.logger.error("outgoingVerify: no peer certificates found")
                self._fail("outgoingVerify: no peer certificates found")
                return
        if self._stopped:
            return
        server_fp, client_fp = (local, fp) if self.role == "server" else (fp, local)
        if server_fp != client_fp:
            self.logger.error(
                "outgoingVerify: certificate fingerprint mismatch: server: %s - client: %s",
                server_fp, client_fp,
            )
            self._fail("outgoingVerify: certificate fingerprint mismatch")
            return
        self.logger.info("TLS certificate fingerprint verified: %s", fp)
        self.verified = True
        self._release_ingress()
