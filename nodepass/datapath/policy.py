"""The data-path policy of one tunnel: every per-session rule from the URL in one object.

:class:`DataPolicy` turns the data-path parameters of a :class:`TunnelURL`
into hooks the tunnel core calls.  Each side applies its own parameters; none
of them is exchanged in the handshake.  Where each hook belongs (*ingress* =
the side that accepts user connections: a server with flow ``-``, a client
with flow ``+``, a single-end client; *egress* = the side that dials targets:
a client with flow ``-``, a server with flow ``+``, a single-end client):

``tcp_enabled`` / ``udp_enabled`` (``notcp`` / ``noudp``)
    Ingress: do not open the TCP (UDP) user listener.  Egress: ignore
    ``tcp`` (``udp``) launch signals.
``admit(kind, peer)`` / ``release(kind)`` (``slot``)
    Both sides.  Ingress: per accepted TCP connection (right after accept,
    before sniffing) and per new UDP peer.  Egress: per ``tcp`` signal
    (before dialing) and per new UDP target session.  Refusal: close the
    connection / drop the datagram; ``admit`` already logged the ERROR.
``sniff(first, peer)`` with ``sniff_timeout`` (``block``)
    Ingress, TCP only, after ``admit`` and before a pool connection is taken
    or a signal sent.  Only when ``blocking`` is true: wait for
    :data:`~nodepass.datapath.sniff.SNIFF_BYTES` bytes or ``sniff_timeout``
    seconds (e.g. ``RelayProtocol.peek``), call ``sniff``; a non-``None``
    result means close the connection (``sniff`` logged the WARN when given
    the peer).  The peeked bytes are then forwarded as usual.
``throttle`` (``rate``)
    Both sides, on the *shaped* sockets only: user sockets on the ingress
    side, target sockets on the egress side, the UDP listener of the ingress
    side and, in single-end mode, accepted connections and the listening UDP
    socket.  Never on pool or control connections.  Charge every chunk read
    from a shaped socket with ``throttle.consume(n, producer)`` and every
    chunk written to one with ``throttle.consume(n, producer, "write")``,
    where *producer* is the transport the chunk was read from.
``read_timeout`` (``read``)
    Both sides, TCP exchanges: close an exchange once it has been idle that long.
``proxy_header(client, server)`` (``proxy``)
    Egress (and single-end), TCP only: write the returned bytes to the new
    target connection before anything else.  *client* is the user's address
    (the signal's ``remote``, or the accepted peer in single-end mode),
    *server* is ``transport.getPeer()`` of the target connection.
``connect_tcp(factory)`` / ``udp_target()`` / ``bind_ip`` (``dial``, ``dns``, ``lbs``)
    Egress (and single-end): dial targets with failover, the source address
    and the DNS cache; UDP session sockets listen on
    ``udp_interface(target_ip)``.
``probe_latency()`` (``lbs=1``, single-end PING)
    Every report tick: concurrent TCP probes of all targets.
``reset()``
    On every internal restart (cache cleared, rate limiter refilled).
"""

from __future__ import annotations

from typing import Any, Literal

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import (
    IHostnameResolver,
    IProtocol,
    IProtocolFactory,
)

from nodepass.datapath.dial import SourceAddress
from nodepass.datapath.proxyproto import AddressLike, build_v1_header
from nodepass.datapath.ratelimit import Throttle
from nodepass.datapath.resolve import DNSCache
from nodepass.datapath.slots import SlotLimiter
from nodepass.datapath.sniff import (
    DEFAULT_SNIFF_TIMEOUT,
    SNIFF_BYTES,
    detect,
    parse_block,
)
from nodepass.datapath.targets import TargetDialer, TargetSelector
from nodepass.env import Settings
from nodepass.log import NodePassLogger
from nodepass.stats import TunnelStats

__all__ = ["DataPolicy"]

Kind = Literal["tcp", "udp"]


class DataPolicy:
    """Per-session hooks for one tunnel instance (see the module docstring for placement)."""

    sniff_bytes: int = SNIFF_BYTES

    def __init__(
        self,
        *,
        reactor: Any,
        logger: NodePassLogger,
        settings: Settings,
        stats: TunnelStats,
        targets: list[tuple[str, int]],
        lbs: int = 0,
        dns_ttl: float = 300.0,
        dial: str = "auto",
        read: float = 0.0,
        rate: int = 0,
        slot: int = 65536,
        proxy: int = 0,
        block: Any = frozenset(),
        notcp: bool = False,
        noudp: bool = False,
        resolver: IHostnameResolver | None = None,
        sniff_timeout: float = DEFAULT_SNIFF_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.logger = logger
        self.settings = settings
        self.stats = stats
        self.tcp_enabled: bool = not notcp
        self.udp_enabled: bool = not noudp
        self.slots = SlotLimiter(slot, stats)
        self.blocked: frozenset[int] = parse_block(block)
        self.blocking: bool = bool(self.blocked)
        self.sniff_timeout: float = sniff_timeout
        self.throttle: Throttle | None = Throttle.from_rate(reactor, rate)
        self.read_timeout: float = max(0.0, float(read))
        self.proxy: bool = proxy == 1
        self.source = SourceAddress(dial, logger)
        if resolver is None:
            resolver = reactor.nameResolver
        self.dns = DNSCache(resolver, reactor, dns_ttl, logger)
        self.selector = TargetSelector(
            len(targets), lbs, reactor, fallback_interval=settings.fallback_interval
        )
        self.dialer = TargetDialer(
            reactor,
            targets,
            self.selector,
            self.dns,
            self.source,
            tcp_timeout=settings.tcp_dial_timeout,
            probe_timeout=settings.report_interval,
            logger=logger,
        )

    @classmethod
    def from_config(
        cls,
        config: Any,
        *,
        reactor: Any,
        logger: NodePassLogger,
        settings: Settings,
        stats: TunnelStats,
        resolver: IHostnameResolver | None = None,
        sniff_timeout: float = DEFAULT_SNIFF_TIMEOUT,
    ) -> DataPolicy:
        """Build the policy from a parsed :class:`~nodepass.url.TunnelURL`.

        *reactor* must provide TCP, time and (unless *resolver* is given)
        ``nameResolver``.  Raises :class:`~nodepass.datapath.dial.DialAddressError`
        for a ``dial`` value that is neither ``auto`` nor an IP address.
        """
        return cls(
            reactor=reactor,
            logger=logger,
            settings=settings,
            stats=stats,
            targets=[(t.host, t.port) for t in config.targets],
            lbs=config.lbs,
            dns_ttl=config.dns,
            dial=config.dial,
            read=config.read,
            rate=config.rate,
            slot=config.slot,
            proxy=config.proxy,
            block=config.block,
            notcp=config.notcp,
            noudp=config.noudp,
            resolver=resolver,
            sniff_timeout=sniff_timeout,
        )

    # -- slot ----------------------------------------------------------------
    def admit(self, kind: Kind, peer: str = "") -> bool:
        """Take a slot for a new *kind* session from *peer*; False (and ERROR logged) when full."""
        if self.slots.try_acquire(kind):
            return True
        suffix = f" ({peer})" if peer else ""
        self.logger.error(
            "%s slot limit reached: %d/%d%s",
            kind.upper(),
            self.slots.count(kind),
            self.slots.limit,
            suffix,
        )
        return False

    def release(self, kind: Kind) -> None:
        """Give back the slot of a session that :meth:`admit` let in; call once when it ends."""
        self.slots.release(kind)

    # -- block ---------------------------------------------------------------
    def sniff(self, first: bytes, peer: str | None = None) -> str | None:
        """The blocked protocol that *first* starts with (``SOCKS4``/``SOCKS5``/``HTTP``/``TLS``)
        or ``None``.  With *peer*, a match is logged at WARN as NodePass does."""
        name = detect(first, self.blocked)
        if name is not None and peer is not None:
            self.logger.warn("blocked %s protocol from %s", name, peer)
        return name

    # -- proxy ---------------------------------------------------------------
    def proxy_header(self, client: AddressLike, server: AddressLike) -> bytes:
        """The PROXY v1 line to send first on a new target connection, ``b""`` when ``proxy=0``.

        Raises ``ValueError`` when an address is not ``ip:port``; the caller
        logs it and drops the session.
        """
        if not self.proxy:
            return b""
        return build_v1_header(client, server)

    # -- dialing ---------------------------------------------------------------
    @property
    def bind_ip(self) -> str:
        """The source IP for target dials, ``""`` for auto (also after a bind failure)."""
        return self.source.active_ip

    def udp_interface(self, target_ip: str) -> str:
        """The ``listenUDP`` interface for a session socket that sends to *target_ip*."""
        return self.source.udp_interface(target_ip)

    def connect_tcp(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        """Connect to a target (``lbs`` order, failover, ``dial``, DNS cache, tcp_dial_timeout).

        Fires with the protocol *factory* built for the one successful
        connection, or fails with ``AllTargetsFailed``.
        """
        if getattr(factory, "noisy", False):
            factory.noisy = False  # type: ignore[attr-defined]  # one per connection: no log lines
        try:
            return self.dialer.connect_tcp(factory)
        except Exception:
            return fail()

    def udp_target(self) -> Deferred[tuple[str, int]]:
        """The resolved ``(ip, port)`` for a new UDP target session (``lbs`` applied)."""
        try:
            return self.dialer.udp_target()
        except Exception:
            return fail()

    def probe_latency(self) -> Deferred[int]:
        """Probe every target concurrently; best connect time in ms, 0 when none answered."""
        try:
            return self.dialer.probe()
        except Exception:
            return fail()

    # -- lifecycle -------------------------------------------------------------
    def reset(self) -> None:
        """Restart hygiene: clear the DNS cache and refill the rate limiter.

        Slot counters, traffic counters and the ``dial`` fallback persist.
        """
        self.dns.clear()
        if self.throttle is not None:
            self.throttle.reset()

    def stop(self) -> None:
        """Cancel the rate limiter's timers (tunnel stopping)."""
        if self.throttle is not None:
            self.throttle.stop()
