"""Source address for target dials (``dial``).

``dial=auto`` (the default) lets the system pick the source address.  An IPv4
or IPv6 literal binds every outgoing *target* connection to that address
(port 0, so the system still picks the port): TCP connects get it as
``bindAddress``, UDP session sockets listen on it.  Tunnel and pool
connections are never bound.  Anything else is refused with
:class:`DialAddressError` naming the value.

When the source address cannot be used (binding it fails, e.g. the address
is no longer configured on this host or its family does not match the
target's), the dial logs an ERROR (``fallback to system auto due to dialer
failure``), is retried unbound, and every later dial of this tunnel stays
unbound, as NodePass does.  Unlike NodePass, an ordinary connect failure of a
target that is down does not trigger this fallback: only a bind failure does,
so one refused connection does not silently disable ``dial``.
"""

from __future__ import annotations

import ipaddress

from nodepass.log import NodePassLogger

__all__ = ["DialAddressError", "SourceAddress", "parse_dial"]


class DialAddressError(ValueError):
    """The ``dial`` value is neither ``auto`` nor an IP address."""


def parse_dial(value: str | None) -> str:
    """Normalise a ``dial`` value: ``""`` for auto, else the canonical IP text.

    Raises :class:`DialAddressError` for anything that is not ``auto``, empty
    or an IPv4/IPv6 literal (brackets around IPv6 are accepted).
    """
    if value is None:
        return ""
    text = value.strip()
    if text in ("", "auto"):
        return ""
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        raise DialAddressError(
            f"invalid dial={value!r}: expected 'auto' or an IPv4/IPv6 address such as "
            "192.0.2.10 or 2001:db8::10"
        ) from None
    return str(ip)


def family_of(host: str) -> int:
    """4 or 6 for an IP literal, 0 for anything else."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0]).version
    except ValueError:
        return 0


class SourceAddress:
    """The source-IP policy of one tunnel, including the one-way fallback to auto."""

    def __init__(self, dial: str | None, logger: NodePassLogger | None = None) -> None:
        self.ip = parse_dial(dial)
        self.fell_back = False
        self._logger = logger

    @property
    def active_ip(self) -> str:
        """The address to bind now: ``""`` when auto or after the fallback."""
        return "" if self.fell_back else self.ip

    def tcp_bind(self) -> tuple[str, int] | None:
        """``bindAddress`` for ``connectTCP``/endpoints, or ``None`` for auto."""
        ip = self.active_ip
        return (ip, 0) if ip else None

    def udp_interface(self, target_host: str) -> str:
        """The ``interface`` for ``listenUDP`` when talking to *target_host*.

        The bound source IP when set; otherwise the wildcard of the target's
        family (``"::"`` for an IPv6 target, ``""`` for IPv4).
        """
        ip = self.active_ip
        if ip:
            return ip
        return "::" if family_of(target_host) == 6 else ""

    def fall_back(self, reason: str) -> bool:
        """Switch to auto after a failed bound dial; True if this call switched.

        Only the first call logs the ERROR line and returns True.
        """
        if not self.ip or self.fell_back:
            return False
        self.fell_back = True
        if self._logger is not None:
            self._logger.error(
                "Target dial: fallback to system auto due to dialer failure: %s", reason
            )
        return True
