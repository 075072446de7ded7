"""Durations written the way NodePass writes them (Go's ``time.Duration`` syntax).

``parse_duration`` accepts a sequence of decimal numbers, each with an optional
fraction and a unit (``ns``, ``us``/``µs``, ``ms``, ``s``, ``m``, ``h``), for
example ``1h30m``, ``500ms`` or ``1.5s``.  A bare ``0`` is accepted; any other
bare number is rejected, as NodePass rejects it.  ``format_duration`` prints a
number of seconds in the same canonical form NodePass prints (``5m0s``,
``0s``, ``1h30m0s``, ``500ms``).
"""

from __future__ import annotations

import re

__all__ = ["parse_duration", "format_duration"]

_UNIT_NS: dict[str, int] = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}

_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Return the duration *text* in seconds.

    Raises ``ValueError`` naming the text when it is not a duration.  A
    leading ``-`` is accepted (the caller decides whether negative values are
    allowed); ``+`` is accepted too.
    """
    original = text
    s = text.strip()
    sign = 1
    if s[:1] in ("+", "-"):
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {original!r}")
    total_ns = 0.0
    pos = 0
    while pos < len(s):
        match = _PART.match(s, pos)
        if match is None:
            if re.fullmatch(r"[\d.]+", s[pos:]):
                raise ValueError(f"invalid duration {original!r}: missing unit")
            raise ValueError(f"invalid duration {original!r}")
        total_ns += float(match.group(1)) * _UNIT_NS[match.group(2)]
        pos = match.end()
    return sign * total_ns / 1e9


def _fraction(value: int, scale: int) -> str:
    """Format ``value / scale`` with trailing zeros (and a bare point) removed."""
    whole, frac = divmod(value, scale)
    if frac == 0:
        return str(whole)
    digits = len(str(scale)) - 1
    return f"{whole}.{frac:0{digits}d}".rstrip("0")


def format_duration(seconds: float) -> str:
    """Format *seconds* as Go's ``time.Duration.String`` does (``5m0s``)."""
    ns = int(round(seconds * 1e9))
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_fraction(ns, 1_000)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{_fraction(ns, 1_000_000)}ms"
    hours, rest = divmod(ns, 3600 * 1_000_000_000)
    minutes, rest = divmod(rest, 60 * 1_000_000_000)
    secs = _fraction(rest, 1_000_000_000) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}"
    if minutes:
        return f"{sign}{minutes}m{secs}"
    return f"{sign}{secs}"
