"""Protocol blocking (``block``): recognise SOCKS, HTTP and TLS from the first bytes.

``block`` is a string of digits; each digit present switches one rule on:
``1`` SOCKS, ``2`` HTTP, ``3`` TLS (``block=123`` blocks all three, ``0`` or an
empty value blocks nothing).  Blocking applies only to TCP and only where user
connections are accepted: the ingress side in dual-end mode and the client in
single-end mode, before any pool connection is taken or signal sent.

The rules look at the first (up to) :data:`SNIFF_BYTES` bytes ``b`` of the
connection, in this order:

* SOCKS: ``b[0] == 0x04`` and ``b[1]`` is ``0x01`` or ``0x02`` -> ``SOCKS4``;
  ``b[0] == 0x05`` and ``0x01 <= b[1] <= 0x03`` -> ``SOCKS5``;
* HTTP: at least 4 bytes, ``b[0]`` an ASCII capital and the method, 1 to 7
  capitals, followed by a space inside the first 8 bytes -> ``HTTP``;
* TLS: ``b[0] == 0x16`` (handshake record, i.e. a ClientHello) -> ``TLS``.

NodePass waits without limit until 8 bytes can be peeked.  Here the ingress
side waits for 8 bytes **or** ``sniff_timeout`` seconds, whichever comes
first (:class:`FirstBytesGate`), and then applies the rules to what it has:
short greetings such as a 3-byte SOCKS5 hello are still recognised, and
protocols where the server speaks first (SSH, SMTP, ...) go through after the
timeout instead of stalling.  The inspected bytes are not consumed; the
caller forwards them once the connection is allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = [
    "BLOCK_HTTP",
    "BLOCK_SOCKS",
    "BLOCK_TLS",
    "DEFAULT_SNIFF_TIMEOUT",
    "SNIFF_BYTES",
    "FirstBytesGate",
    "detect",
    "parse_block",
]

SNIFF_BYTES = 8
"""How many leading bytes the rules need at most."""

DEFAULT_SNIFF_TIMEOUT = 0.5
"""Seconds the ingress side waits for :data:`SNIFF_BYTES` bytes before deciding."""

BLOCK_SOCKS = 1
BLOCK_HTTP = 2
BLOCK_TLS = 3


def parse_block(value: str | int | Iterable[int] | None) -> frozenset[int]:
    """Return the set of enabled rules for a ``block`` value.

    Accepts the URL text (``"13"``), an int (``13``) or an iterable of rule
    numbers.  Digits other than 1, 2 and 3 are ignored, as NodePass ignores
    them; ``0``, ``""`` and ``None`` give the empty set.
    """
    if value is None:
        return frozenset()
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, str):
        return frozenset(int(ch) for ch in value if ch in "123")
    return frozenset(int(v) for v in value if int(v) in (1, 2, 3))


def _is_capital(byte: int) -> bool:
    return 0x41 <= byte <= 0x5A


def detect(first: bytes, blocked: Iterable[int]) -> str | None:
    """Name of the blocked protocol that *first* starts with, or ``None``.

    *first* may be shorter than :data:`SNIFF_BYTES`; only its first 8 bytes
    are looked at.  Returns ``"SOCKS4"``, ``"SOCKS5"``, ``"HTTP"`` or ``"TLS"``.
    """
    rules = frozenset(blocked)
    b = first[:SNIFF_BYTES]
    if not rules or not b:
        return None
    if BLOCK_SOCKS in rules and len(b) >= 2:
        if b[0] == 0x04 and b[1] in (0x01, 0x02):
            return "SOCKS4"
        if b[0] == 0x05 and 0x01 <= b[1] <= 0x03:
            return "SOCKS5"
    if BLOCK_HTTP in rules and len(b) >= 4 and _is_capital(b[0]):
        for byte in b[1:]:
            if byte == 0x20:
                return "HTTP"
            if not _is_capital(byte):
                break
    if BLOCK_TLS in rules and b[0] == 0x16:
        return "TLS"
    return None


class FirstBytesGate:
    """Collects the first bytes of an accepted connection for :func:`detect`.

    Feed every received chunk to :meth:`feed` until :attr:`decided` is true.
    ``on_ready(buffered)`` is called exactly once, with everything buffered so
    far, as soon as :data:`SNIFF_BYTES` bytes arrived or ``timeout`` seconds
    passed (possibly with ``b""``).  After that, :meth:`feed` returns its
    argument unchanged so the caller can pass later chunks straight on.
    Call :meth:`cancel` when the connection is lost before the decision.
    """

    def __init__(
        self,
        clock: IReactorTime,
        timeout: float,
        on_ready: Callable[[bytes], None],
        needed: int = SNIFF_BYTES,
    ) -> None:
        self._on_ready = on_ready
        self._needed = needed
        self._chunks: list[bytes] = []
        self._size = 0
        self.decided = False
        self._timer: IDelayedCall | None = clock.callLater(max(0.0, timeout), self._fire)

    def feed(self, data: bytes) -> bytes:
        """Buffer *data*; returns ``b""`` while undecided, else *data* unchanged."""
        if self.decided:
            return data
        self._chunks.append(data)
        self._size += len(data)
        if self._size >= self._needed:
            self._fire()
        return b""

    def _fire(self) -> None:
        if self.decided:
            return
        self.decided = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        buffered = b"".join(self._chunks)
        self._chunks = []
        self._on_ready(buffered)

    def cancel(self) -> None:
        """Stop waiting without calling ``on_ready`` (the connection went away)."""
        self.decided = True
        self._chunks = []
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
