"""The ``slot`` limit: how many TCP connections and UDP sessions may run at once.

NodePass keeps two counters, TCP and UDP, and admits a new session only while
``tcp + udp < slot``.  The counters are the ``TCPS``/``UDPS`` numbers of the
CHECK_POINT line, so they live in the tunnel's :class:`~nodepass.stats.TunnelStats`
(``tcps``/``udps``) and survive internal restarts together with it.  With
``slot=0`` there is no limit *and no counting*: the counters stay at 0.

A slot is taken per accepted TCP connection or new UDP peer on the ingress
side, per ``tcp`` signal or new UDP target session on the egress side, and per
accepted connection or new UDP peer in single-end mode.
"""

from __future__ import annotations

from typing import Literal

from nodepass.stats import TunnelStats

__all__ = ["Kind", "SlotLimiter"]

Kind = Literal["tcp", "udp"]


def _check_kind(kind: str) -> None:
    if kind not in ("tcp", "udp"):
        raise ValueError(f"session kind must be 'tcp' or 'udp', got {kind!r}")


class SlotLimiter:
    """Counts live sessions in *stats* and enforces ``limit`` (0 = unlimited, uncounted)."""

    def __init__(self, limit: int, stats: TunnelStats) -> None:
        if limit < 0:
            raise ValueError(f"slot must be >= 0, got {limit!r}")
        self.limit = limit
        self.stats = stats

    @property
    def total(self) -> int:
        """Live TCP plus UDP sessions."""
        return self.stats.tcps + self.stats.udps

    def count(self, kind: Kind) -> int:
        """Live sessions of *kind*."""
        _check_kind(kind)
        return self.stats.tcps if kind == "tcp" else self.stats.udps

    def try_acquire(self, kind: Kind) -> bool:
        """Take a slot for a new *kind* session; ``False`` when the limit is reached."""
        _check_kind(kind)
        if self.limit == 0:
            return True
        if self.total >= self.limit:
            return False
        if kind == "tcp":
            self.stats.tcps += 1
        else:
            self.stats.udps += 1
        return True

    def release(self, kind: Kind) -> None:
        """Give back a slot of *kind*; never lets a counter drop below zero."""
        _check_kind(kind)
        if self.limit == 0:
            return
        if kind == "tcp":
            if self.stats.tcps > 0:
                self.stats.tcps -= 1
        elif self.stats.udps > 0:
            self.stats.udps -= 1
