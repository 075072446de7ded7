"""Multi-target selection (``lbs``) and target dialing with failover.

The URL path may list several targets (``host:port,host:port,...``).  Every
target dial (egress TCP and UDP sessions, single-end dials) goes through
:class:`TargetDialer`, which asks :class:`TargetSelector` for the order in
which to try them and then tries each in turn until one connects
(**failover**); when all fail the error is ``all N targets failed``.
Listening always uses only the first target.

Strategies (``lbs``):

``0`` round-robin (default)
    Each dial starts one target further than the previous one and fails
    over in order from there, wrapping around.
``1`` lowest latency
    :meth:`TargetDialer.probe` (called every report interval) connects to all
    targets concurrently; the fastest that answered becomes *preferred*.
    Dials start at the preferred target; a successful failover makes the
    target that worked preferred.
``2`` primary/backup
    Dials start at the preferred target, initially the first (primary);
    a successful failover makes the backup that worked preferred ("sticky").
    When ``fallback_interval`` (``NP_FALLBACK_INTERVAL``, 5 minutes) has passed
    since the last reset, the next dial resets the preference to the primary
    and starts a new interval.

Health: a target whose dial or probe failed is *unhealthy* for
``retry_after`` seconds (or until it answers a probe); unhealthy targets are
moved behind the healthy ones in the dial order, so they are skipped while
another target works and are still tried as a last resort.  With ``lbs=2``
the reset to the primary also clears the primary's unhealthy mark, so the
primary really is tried again.  A single target is always dialed directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ConnectBindError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from nodepass.datapath.dial import SourceAddress
from nodepass.datapath.resolve import DNSCache
from nodepass.log import NodePassLogger
from nodepass.relay.connect import dial, lean_reactor

__all__ = [
    "LBS_LATENCY",
    "LBS_PRIMARY_BACKUP",
    "LBS_ROUND_ROBIN",
    "UNHEALTHY_RETRY",
    "AllTargetsFailed",
    "TargetDialer",
    "TargetSelector",
]

UNHEALTHY_RETRY = 30.0
"""Seconds a failed target is kept behind the healthy ones."""

LBS_ROUND_ROBIN = 0
LBS_LATENCY = 1
LBS_PRIMARY_BACKUP = 2


class AllTargetsFailed(ConnectionError):
    """Every target of the list failed to connect (or resolve)."""

    def __init__(self, count: int, last: str) -> None:
        if count == 1:
            super().__init__(last)
        else:
            super().__init__(f"all {count} targets failed: {last}")
        self.count = count
        self.last = last


def _target_tuple(target: Any) -> tuple[str, int]:
    if isinstance(target, tuple):
        return str(target[0]), int(target[1])
    return str(target.host), int(target.port)


class TargetSelector:
    """Decides the order in which targets are tried, per ``lbs``; pure logic on a clock."""

    def __init__(
        self,
        count: int,
        lbs: int,
        clock: IReactorTime,
        fallback_interval: float = 300.0,
        retry_after: float = UNHEALTHY_RETRY,
    ) -> None:
        if count < 1:
            raise ValueError("at least one target is required")
        if lbs not in (LBS_ROUND_ROBIN, LBS_LATENCY, LBS_PRIMARY_BACKUP):
            raise ValueError(f"invalid lbs={lbs!r}: allowed values are 0, 1, 2")
        self.count = count
        self.lbs = lbs
        self._clock = clock
        self.fallback_interval = fallback_interval
        self.retry_after = retry_after
        self.preferred = 0
        self._counter = 0
        self._last_reset = clock.seconds()
        self._unhealthy_until: dict[int, float] = {}
        self.latency: dict[int, float] = {}

    def healthy(self, idx: int) -> bool:
        """Whether target *idx* is currently considered reachable."""
        until = self._unhealthy_until.get(idx)
        if until is None:
            return True
        if self._clock.seconds() >= until:
            del self._unhealthy_until[idx]
            return True
        return False

    def order(self) -> list[int]:
        """Target indices to try for one dial, best first; advances the strategy state."""
        n = self.count
        if n == 1:
            return [0]
        if self.lbs == LBS_ROUND_ROBIN:
            start = self._counter % n
            self._counter += 1
        else:
            if self.lbs == LBS_PRIMARY_BACKUP:
                now = self._clock.seconds()
                if now - self._last_reset >= self.fallback_interval:
                    self.preferred = 0
                    self._last_reset = now
                    self._unhealthy_until.pop(0, None)
            start = self.preferred
        sequence = [(start + i) % n for i in range(n)]
        good = [i for i in sequence if self.healthy(i)]
        bad = [i for i in sequence if i not in good]
        return good + bad

    def succeeded(self, idx: int) -> None:
        """Target *idx* connected: healthy again, and preferred for ``lbs`` 1 and 2."""
        self._unhealthy_until.pop(idx, None)
        if self.lbs in (LBS_LATENCY, LBS_PRIMARY_BACKUP):
            self.preferred = idx

    def failed(self, idx: int) -> None:
        """Target *idx* did not connect: unhealthy for ``retry_after`` seconds."""
        if self.count > 1:
            self._unhealthy_until[idx] = self._clock.seconds() + self.retry_after

    def probed(self, results: dict[int, float | None]) -> float | None:
        """Record one round of latency probes (seconds, ``None`` = failed).

        Returns the best latency.  With ``lbs=1`` the fastest target becomes
        preferred.
        """
        best: tuple[float, int] | None = None
        for idx, seconds in results.items():
            if seconds is None:
                self.failed(idx)
                self.latency.pop(idx, None)
                continue
            self._unhealthy_until.pop(idx, None)
            self.latency[idx] = seconds
            if best is None or seconds < best[0]:
                best = (seconds, idx)
        if best is None:
            return None
        if self.lbs == LBS_LATENCY:
            self.preferred = best[1]
        return best[0]


class _Closer(Protocol):
    """Closes the connection as soon as it is made (latency probes)."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class TargetDialer:
    """Dials the target list: DNS cache, ``lbs`` order, failover, source address, timeout."""

    def __init__(
        self,
        reactor: Any,
        targets: Sequence[Any],
        selector: TargetSelector,
        cache: DNSCache,
        source: SourceAddress,
        *,
        tcp_timeout: float = 5.0,
        probe_timeout: float = 5.0,
        logger: NodePassLogger | None = None,
    ) -> None:
        self.targets: list[tuple[str, int]] = [_target_tuple(t) for t in targets]
        if not self.targets:
            raise ValueError("at least one target is required")
        if selector.count != len(self.targets):
            raise ValueError("selector and target list differ in length")
        self._reactor = reactor
        self.selector = selector
        self.cache = cache
        self.source = source
        self.tcp_timeout = tcp_timeout
        self.probe_timeout = probe_timeout
        self._logger = logger
        #: Target dials connect at once (not with a TCP client endpoint).
        self._lean = lean_reactor(reactor)

    # -- one connection ------------------------------------------------------
    def _endpoint(self, ip: str, port: int, timeout: float, bind: tuple[str, int] | None) -> Any:
        # Only for reactors that relay.connect cannot drive (test reactors):
        # the endpoints module loads the TLS libraries.
        from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint

        if ":" in ip:
            return TCP6ClientEndpoint(  # type: ignore[no-untyped-call]
                self._reactor, ip, port, timeout=timeout, bindAddress=bind
            )
        return TCP4ClientEndpoint(self._reactor, ip, port, timeout=timeout, bindAddress=bind)

    def _connect_once(
        self, ip: str, port: int, factory: IProtocolFactory, bind: tuple[str, int] | None,
        timeout: float | None = None,
    ) -> Deferred[IProtocol]:
        timeout = self.tcp_timeout if timeout is None else timeout
        if self._lean:
            return dial(self._reactor, ip, port, factory, timeout=timeout, bind=bind)
        return self._endpoint(ip, port, timeout, bind).connect(factory)  # type: ignore[no-any-return]

    def _connect_address(
        self, ip: str, port: int, factory: IProtocolFactory
    ) -> Deferred[IProtocol]:
        bind = self.source.tcp_bind()
        d: Deferred[IProtocol] = self._connect_once(ip, port, factory, bind)
        if bind is None:
            return d

        def retry_unbound(failure: Failure) -> Deferred[IProtocol] | Failure:
            if not failure.check(ConnectBindError):  # type: ignore[no-untyped-call]
                return failure
            # The source address is unusable: switch to auto for good (logged once).
            self.source.fall_back(f"bind {bind[0]}: {failure.getErrorMessage()}")
            return self._connect_once(ip, port, factory, None)

        d.addErrback(retry_unbound)
        return d

    # -- dial with failover ------------------------------------------------
    def connect_tcp(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        """Connect to the first target that answers, in :meth:`TargetSelector.order`.

        Fires with the connected protocol built by *factory* (only the
        successful attempt builds one), or fails with :class:`AllTargetsFailed`.
        Cancelling the Deferred abandons the attempt in progress and tries no
        further target.
        """
        return _Failover(self, factory).start()

    def udp_target(self) -> Deferred[tuple[str, int]]:
        """The resolved ``(ip, port)`` for a new UDP session, in ``lbs`` order.

        UDP has no connect handshake, so the first target that resolves is
        used; unhealthy targets (failed TCP dials or probes) come last.
        """
        order = self.selector.order()
        result: Deferred[tuple[str, int]] = Deferred()
        last: list[str] = ["no target tried"]

        def attempt(pos: int) -> None:
            if pos >= len(order):
                result.errback(AllTargetsFailed(len(order), last[0]))
                return
            host, port = self.targets[order[pos]]

            def bad(failure: Failure) -> None:
                last[0] = f"{host}:{port}: {failure.getErrorMessage()}"
                attempt(pos + 1)

            self.cache.resolve(host, port).addCallbacks(result.callback, bad)

        attempt(0)
        return result

    # -- latency probes --------------------------------------------------------
    def _probe_one(self, idx: int) -> Deferred[float | None]:
        host, port = self.targets[idx]
        clock: IReactorTime = self._reactor
        started = clock.seconds()
        d = self.cache.resolve(host, port)

        def connect(addr: tuple[str, int]) -> Deferred[IProtocol]:
            factory = Factory.forProtocol(_Closer)
            factory.noisy = False
            return self._connect_once(addr[0], addr[1], factory, None, self.probe_timeout)

        d.addCallback(connect)

        def measured(_proto: object) -> float:
            return max(0.0, clock.seconds() - started)

        def failed(_failure: Failure) -> None:
            return None

        out: Deferred[float | None] = d.addCallbacks(measured, failed)
        return out

    def probe(self) -> Deferred[int]:
        """Connect to every target concurrently; fire with the best latency in ms (0 if none).

        The results update target health and, with ``lbs=1``, the preferred target.
        """
        probes = [self._probe_one(i) for i in range(len(self.targets))]
        dl: Deferred[list[tuple[bool, float | None]]] = DeferredList(probes, consumeErrors=True)

        def done(results: list[tuple[bool, float | None]]) -> int:
            latencies = {i: (value if ok else None) for i, (ok, value) in enumerate(results)}
            best = self.selector.probed(latencies)
            return 0 if best is None else int(best * 1000)

        return dl.addCallback(done)


class _Failover:
    """One :meth:`TargetDialer.connect_tcp`: the targets in order until one connects.

    A small object rather than nested closures, so that nothing of a dial
    outlives it in a reference cycle."""

    __slots__ = ("dialer", "factory", "order", "current", "cancelled", "result", "last")

    def __init__(self, dialer: TargetDialer, factory: IProtocolFactory) -> None:
        self.dialer = dialer
        self.factory = factory
        self.order = dialer.selector.order()
        self.current: Deferred[IProtocol] | None = None
        self.cancelled = False
        self.result: Deferred[IProtocol] = Deferred(canceller=self._cancel)
        self.last = "no target tried"

    def start(self) -> Deferred[IProtocol]:
        result = self.result
        self._attempt(0)
        return result

    def _cancel(self, _d: Deferred[IProtocol]) -> None:
        self.cancelled = True
        if self.current is not None:
            self.current.cancel()

    def _attempt(self, pos: int) -> None:
        order = self.order
        if pos >= len(order):
            self.result.errback(AllTargetsFailed(len(order), self.last))
            return
        dialer = self.dialer
        idx = order[pos]
        host, port = dialer.targets[idx]
        known = dialer.cache.known(host)
        d: Deferred[IProtocol]
        if known is not None:
            # An IP literal or a cached answer: no resolver round.
            d = dialer._connect_address(known, port, self.factory)
        else:
            d = dialer.cache.resolve(host, port).addCallback(
                lambda addr: dialer._connect_address(addr[0], addr[1], self.factory)
            )
        self.current = d
        d.addCallbacks(self._ok, self._bad, callbackArgs=(idx,), errbackArgs=(pos, idx))

    def _ok(self, proto: IProtocol, idx: int) -> None:
        self.current = None
        if self.cancelled or self.result.called:  # cancelled: do not leak the connection
            transport = getattr(proto, "transport", None)
            if transport is not None:
                transport.loseConnection()
            return
        self.dialer.selector.succeeded(idx)
        self.result.callback(proto)

    def _bad(self, failure: Failure, pos: int, idx: int) -> None:
        self.current = None
        if self.cancelled or self.result.called:
            return
        dialer = self.dialer
        dialer.selector.failed(idx)
        host, port = dialer.targets[idx]
        self.last = f"{host}:{port}: {failure.getErrorMessage()}"
        if dialer._logger is not None and pos + 1 < len(self.order):
            dialer._logger.debug("Target dial failed, trying next: %s", self.last)
        self._attempt(pos + 1)
