"""The tunnel set-ups a run measures.

* ``dual``: a server in reverse mode (users connect to it) and a client that
  dials the target, with a pool of the chosen transport ``type`` and ``tls``;
* ``single``: a client in single-end mode, forwarding straight to the target.

The direct path (no tunnel) is measured in every round as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

TYPE_NAMES = {0: "TCP", 1: "QUIC", 2: "WebSocket", 3: "HTTP/2"}
FORCED_TLS = (1, 3)
"""Pool types that always run with TLS: ``tls=0`` becomes ``tls=1`` for them."""


@dataclass(frozen=True)
class Scenario:
    kind: str  # "dual" or "single"
    type: int = 0
    tls: int = 0
    note: str = ""

    @property
    def key(self) -> str:
        return f"dual-type{self.type}-tls{self.tls}" if self.kind == "dual" else "single"

    @property
    def short(self) -> str:
        """A column heading: ``TCP tls=0``, ``QUIC tls=1``, ``single-end``."""
        return f"{TYPE_NAMES.get(self.type, '?')} tls={self.tls}" if self.kind == "dual" else "single-end"

    @property
    def title(self) -> str:
        if self.kind == "single":
            return "single-end (client mode=1, straight to the target)"
        return f"dual-end, type={self.type} ({TYPE_NAMES.get(self.type, '?')}), tls={self.tls}"


def parse_list(text: str, allowed: tuple[int, ...], what: str) -> list[int]:
    """``"0,1"`` as ``[0, 1]``; anything outside *allowed* is refused with a clear message."""
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) not in allowed:
            raise ValueError(f"--{what}: {part!r} is not one of {', '.join(map(str, allowed))}")
        if int(part) not in values:
            values.append(int(part))
    if not values:
        raise ValueError(f"--{what}: nothing selected")
    return values


def scenarios(paths: list[str], types: list[int], tls: list[int]) -> list[Scenario]:
    """Dual-end set-ups for every type x tls asked for (types 1 and 3 only with TLS), then single-end."""
    found: list[Scenario] = []
    if "dual" in paths:
        for t in types:
            for want in tls:
                eff = 1 if t in FORCED_TLS else want
                if any(s.type == t and s.tls == eff for s in found):
                    continue
                note = ""
                if eff != want:
                    note = f"tls={want} was asked for; type {t} ({TYPE_NAMES[t]}) always uses TLS, so it runs as tls=1"
                found.append(Scenario("dual", t, eff, note))
    if "single" in paths:
        found.append(Scenario("single"))
    return found
