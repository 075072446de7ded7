"""Hostname resolution with a per-tunnel cache whose TTL is the ``dns`` parameter.

IP literals are used as they are, and an empty host (a target written as
``:port``) means the local system (``127.0.0.1``).  A hostname is resolved through the
injected :class:`~twisted.internet.interfaces.IHostnameResolver` (normally
``reactor.nameResolver``) and the answer is cached for ``ttl`` seconds
(``dns``, default 5 minutes; ``0`` disables caching, so every use resolves
again).  Of the addresses returned, the first IPv4 address is chosen if there
is one, otherwise the first address, as NodePass does.

A failed resolution is never fatal and never cached: it is logged at WARN and
the next use tries again.  When a previous answer for that host exists (even
an expired one, or one from before :meth:`DNSCache.clear`), it is used instead,
matching NodePass's use of the start-up resolution when re-resolving a target
fails; only a host that has never resolved makes the lookup fail.  Concurrent
lookups of the same host share one query.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IReactorTime,
    IResolutionReceiver,
)
from zope.interface import implementer

from nodepass.log import NodePassLogger

__all__ = ["DEFAULT_DNS_TTL", "LOCAL_HOST", "DNSCache", "is_ip_literal", "pick_address"]

DEFAULT_DNS_TTL = 300.0
"""NodePass's default ``dns`` value (5 minutes)."""

LOCAL_HOST = "127.0.0.1"
"""Where an empty host (``:port``) is dialed: the local system."""


def is_ip_literal(host: str) -> bool:
    """Whether *host* is an IPv4 or IPv6 literal (brackets and zone allowed)."""
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    return True


def pick_address(hosts: list[str]) -> str:
    """The first IPv4 address of *hosts*, else the first one (*hosts* must not be empty)."""
    for host in hosts:
        if ":" not in host:
            return host
    return hosts[0]


@dataclass
class _Entry:
    ip: str
    expires: float


@implementer(IResolutionReceiver)
class _Collector:
    """Gathers the addresses of one ``resolveHostName`` call."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        host = getattr(address, "host", None)
        if isinstance(host, str):
            self.hosts.append(host)

    def resolutionComplete(self) -> None:
        if not self.done.called:
            self.done.callback(self.hosts)


class DNSCache:
    """Resolve hostnames to one IP each, caching answers for ``ttl`` seconds."""

    def __init__(
        self,
        resolver: IHostnameResolver,
        clock: IReactorTime,
        ttl: float = DEFAULT_DNS_TTL,
        logger: NodePassLogger | None = None,
    ) -> None:
        self._resolver = resolver
        self._clock = clock
        self.ttl = max(0.0, float(ttl))
        self._logger = logger
        self._entries: dict[str, _Entry] = {}
        self._last_good: dict[str, str] = {}
        self._pending: dict[str, list[Deferred[str]]] = {}
        #: host -> the IP when it is a literal (or the local system), "" when it is a name.
        self._literals: dict[str, str] = {}

    def cached(self, host: str) -> str | None:
        """The unexpired cached IP of *host*, or ``None``."""
        entry = self._entries.get(host)
        if entry is None:
            return None
        if self._clock.seconds() >= entry.expires:
            del self._entries[host]
            return None
        return entry.ip

    def clear(self) -> None:
        """Drop every cached answer (the tunnel restarts); fallbacks are kept."""
        self._entries.clear()

    def known(self, host: str) -> str | None:
        """The IP for *host* without a lookup: the local system for an empty
        host, the literal itself, or an unexpired cached answer; else None."""
        literal = self._literals.get(host)
        if literal is None:
            bare = host.strip("[]")
            if bare == "":
                literal = LOCAL_HOST
            elif is_ip_literal(bare):
                literal = bare
            else:
                literal = ""
            if len(self._literals) < 1024:
                self._literals[host] = literal
        if literal:
            return literal
        return self.cached(host)

    def resolve_host(self, host: str) -> Deferred[str]:
        """Deferred IP for *host*; fails with ``DNSLookupError`` only if it never resolved."""
        hit = self.known(host)
        if hit is not None:
            return succeed(hit)
        waiter: Deferred[str] = Deferred()
        pending = self._pending.get(host)
        if pending is not None:
            pending.append(waiter)
            return waiter
        self._pending[host] = [waiter]
        self._query(host)
        return waiter

    def resolve(self, host: str, port: int) -> Deferred[tuple[str, int]]:
        """Deferred ``(ip, port)`` for ``host:port``."""
        def with_port(ip: str) -> tuple[str, int]:
            return (ip, port)

        return self.resolve_host(host).addCallback(with_port)

    def _query(self, host: str) -> None:
        collector = _Collector()
        try:
            self._resolver.resolveHostName(collector, host, 0)
        except Exception as exc:  # a broken resolver is a failed lookup, not a crash
            self._finish(host, None, repr(exc))
            return
        collector.done.addCallbacks(
            lambda hosts: self._finish(host, hosts, "no addresses"),
            lambda failure: self._finish(host, None, failure.getErrorMessage()),
        )

    def _finish(self, host: str, hosts: list[str] | None, reason: str) -> None:
        waiters = self._pending.pop(host, [])
        if hosts:
            ip = pick_address(hosts)
            self._last_good[host] = ip
            if self.ttl > 0:
                self._entries[host] = _Entry(ip, self._clock.seconds() + self.ttl)
            for w in waiters:
                w.callback(ip)
            return
        fallback = self._last_good.get(host)
        if self._logger is not None:
            if fallback is not None:
                self._logger.warn(
                    "DNS resolution failed for %s: %s; using previous address %s",
                    host,
                    reason,
                    fallback,
                )
            else:
                self._logger.warn("DNS resolution failed for %s: %s; will retry", host, reason)
        for w in waiters:
            if fallback is not None:
                w.callback(fallback)
            else:
                w.errback(DNSLookupError(f"cannot resolve {host}: {reason}"))
