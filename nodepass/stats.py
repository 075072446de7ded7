"""Live numbers of one tunnel: what the CHECK_POINT line reports and the master reads."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TunnelStats"]


@dataclass
class TunnelStats:
    """Counters and gauges of a running tunnel.

    ``tcprx``/``tcptx``/``udprx``/``udptx`` are cumulative byte counts since
    the tunnel service was created; ``tcps``/``udps`` are the live TCP
    connections and UDP sessions; ``pool`` the idle pool connections; ``ping``
    the last control-channel round trip in milliseconds; ``mode`` the run mode
    that was chosen (1 or 2, 0 before it is known); ``restarts`` how often the
    tunnel restarted itself after an error (not part of the ``CHECK_POINT`` line).
    """

    mode: int = 0
    ping: int = 0
    pool: int = 0
    tcps: int = 0
    udps: int = 0
    tcprx: int = 0
    tcptx: int = 0
    udprx: int = 0
    udptx: int = 0
    restarts: int = 0

    def checkpoint_line(self) -> str:
        """The NodePass ``CHECK_POINT|MODE=..|PING=..ms|...`` log line for these numbers."""
        return (
            f"CHECK_POINT|MODE={self.mode}|PING={self.ping}ms|POOL={self.pool}"
            f"|TCPS={self.tcps}|UDPS={self.udps}|TCPRX={self.tcprx}|TCPTX={self.tcptx}"
            f"|UDPRX={self.udprx}|UDPTX={self.udptx}"
        )

    def reset_traffic(self) -> None:
        """Zero the four cumulative byte counters."""
        self.tcprx = self.tcptx = self.udprx = self.udptx = 0
