"""Server-sent events hub of the master API (``GET <base>/events``).

Wire format, as the dashboards read it (LF line endings only)::

    retry: 3000\\n\\n
    event: instance\\n
    data: {"type":"update","time":"...","instance":{...},"logs":""}\\n\\n

* On subscription the stream opens with ``retry: 3000`` followed by one
  ``initial`` event per instance (the API-key pseudo-instance included).
* Live events (``create``, ``update``, ``delete``, ``log``, ``shutdown``) are
  encoded once, when raised (the payload is a snapshot taken at that moment),
  and written to every subscriber.
* Every event stays below :data:`EVENT_LIMIT` bytes: a long ``log`` text is
  split into several ``log`` events on line boundaries (or inside a line when a
  single line is too long).
* Subscribers are push producers registered on their HTTP request.  While the
  peer does not read, events queue in memory, bounded by ``max_pending``
  bytes (4 MiB by default); past the bound the subscriber is disconnected (the dashboard reconnects and
  receives a fresh ``initial`` burst), so a slow reader never stalls the
  master nor makes it buffer without limit.
* :meth:`EventHub.close_all` sends ``shutdown`` to everyone and ends each
  stream cleanly (master shutdown and API-key rotation).
"""

from __future__ import annotations

import datetime
import json
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "EVENT_LIMIT",
    "RETRY_PREAMBLE",
    "EventHub",
    "Subscriber",
    "rfc3339",
    "dumps",
    "encode_event",
    "encode_events",
]

EVENT_LIMIT = 65536
"""Every encoded event (``event:`` line, ``data:`` line, blank line) is shorter than this."""

_SPLIT_AT = EVENT_LIMIT - 1024
"""Frames are kept this small, leaving room for readers that count their own framing."""

RETRY_PREAMBLE = b"retry: 3000\n\n"
_EVENT_HEAD = b"event: instance\ndata: "
_EVENT_TAIL = b"\n\n"


def dumps(value: Any) -> str:
    """Compact single-line JSON (UTF-8 text, U+2028/U+2029 escaped as well)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def rfc3339(when: float) -> str:
    """RFC 3339 time in the local zone with trailing-zero-trimmed fractions (``Z`` for UTC)."""
    moment = datetime.datetime.fromtimestamp(when).astimezone()
    base = moment.strftime("%Y-%m-%dT%H:%M:%S")
    micro = moment.microsecond
    if micro:
        base += ("." + f"{micro:06d}").rstrip("0")
    offset = moment.utcoffset()
    if not offset:
        return base + "Z"
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return f"{base}{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def encode_event(kind: str, when: float, instance: Mapping[str, Any] | None, logs: str = "") -> bytes:
    """One SSE event frame (no size check)."""
    payload = {"type": kind, "time": rfc3339(when), "instance": instance, "logs": logs}
    return _EVENT_HEAD + dumps(payload).encode("utf-8") + _EVENT_TAIL


def _encoded_len(text: str) -> int:
    """Bytes *text* takes inside a JSON string literal (quotes excluded)."""
    return len(dumps(text).encode("utf-8")) - 2


def _split_text(text: str, budget: int) -> list[str]:
    """Split *text* into pieces whose JSON-encoded size is at most *budget* bytes.

    Pieces end on line boundaries where possible; a single line that is too
    long is cut between characters.
    """
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        encoded = _encoded_len(line)
        if encoded > budget:
            if current:
                pieces.append("".join(current))
                current, size = [], 0
            chunk: list[str] = []
            chunk_size = 0
            for ch in line:
                ch_size = _encoded_len(ch)
                if chunk_size + ch_size > budget and chunk:
                    pieces.append("".join(chunk))
                    chunk, chunk_size = [], 0
                chunk.append(ch)
                chunk_size += ch_size
            if chunk:
                current, size = chunk, chunk_size
            continue
        if size + encoded > budget and current:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += encoded
    if current:
        pieces.append("".join(current))
    return pieces or [""]


def encode_events(
    kind: str, when: float, instance: Mapping[str, Any] | None, logs: str = ""
) -> list[bytes]:
    """Encode one logical event as one or more frames, each below :data:`EVENT_LIMIT`.

    Only the ``logs`` text is split; the instance object is repeated in every
    frame.
    """
    frame = encode_event(kind, when, instance, logs)
    if len(frame) <= _SPLIT_AT or not logs:
        return [frame]
    overhead = len(encode_event(kind, when, instance, ""))
    budget = max(_SPLIT_AT - overhead, 1024)
    return [encode_event(kind, when, instance, piece) for piece in _split_text(logs, budget)]


@implementer(IPushProducer)
class Subscriber:
    """One open ``/events`` stream; queues while the peer is slow, bounded by *max_pending* bytes."""

    def __init__(self, hub: EventHub, request: Any, max_pending: int) -> None:
        self.hub = hub
        self.request = request
        self.max_pending = max_pending
        self.paused = False
        self.closed = False
        self.pending: deque[bytes] = deque()
        self.pending_bytes = 0
        self.done: Deferred[None] = Deferred()
        """Fires when the stream was ended cleanly; the web layer then finishes the response."""
        request.registerProducer(self, True)  # type: ignore[attr-defined]

    # IPushProducer --------------------------------------------------------
    def pauseProducing(self) -> None:
        """The peer's buffer is full: queue events from now on."""
        self.paused = True

    def resumeProducing(self) -> None:
        """The peer reads again: write what was queued."""
        self.paused = False
        while self.pending and not self.paused and not self.closed:
            frame = self.pending.popleft()
            self.pending_bytes -= len(frame)
            self._write(frame)

    def stopProducing(self) -> None:
        """The connection is going away."""
        self.closed = True
        self.pending.clear()
        self.hub._forget(self)

    # sending ---------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        try:
            self.request.write(data)
        except Exception:
            self.drop()

    def send(self, frames: Iterable[bytes]) -> None:
        """Write *frames* now, or queue them while paused (dropping the subscriber past the bound)."""
        if self.closed:
            return
        for frame in frames:
            if self.paused or self.pending:
                self.pending.append(frame)
                self.pending_bytes += len(frame)
                if self.pending_bytes > self.max_pending:
                    self.drop()
                    return
            else:
                self._write(frame)
                if self.closed:
                    return

    def drop(self) -> None:
        """Disconnect a subscriber that cannot keep up (or whose writes fail)."""
        if self.closed:
            return
        self.closed = True
        self.pending.clear()
        self.hub._forget(self)
        try:
            self.request.unregisterProducer()  # type: ignore[attr-defined]
        except Exception:
            pass
        transport = getattr(getattr(self.request, "channel", None), "transport", None)
        try:
            if transport is not None and hasattr(transport, "abortConnection"):
                transport.abortConnection()
            else:
                self.request.loseConnection()  # type: ignore[attr-defined]
        except Exception:
            pass

    def finish(self, last: bytes | None) -> None:
        """Write *last* (if it fits the queue) and end the stream cleanly."""
        if self.closed:
            return
        if last is not None:
            self.send([last])
        if self.closed:
            return
        if self.pending:
            # The peer is not reading; there is no point waiting for it.
            self.drop()
            return
        self.closed = True
        self.hub._forget(self)
        try:
            self.request.unregisterProducer()  # type: ignore[attr-defined]
        except Exception:
            pass
        if not self.done.called:
            self.done.callback(None)


class EventHub:
    """Fans instance events out to every ``/events`` subscriber.

    *clock* gives the event times (POSIX seconds); *max_pending* bounds the
    bytes queued for one slow subscriber before it is disconnected.
    """

    def __init__(self, *, clock: Callable[[], float], max_pending: int = 4 << 20) -> None:
        self.clock = clock
        self.max_pending = max_pending
        self.subscribers: list[Subscriber] = []

    def subscribe(
        self, request: Any, initial: Iterable[Mapping[str, Any]]
    ) -> Subscriber:
        """Register *request* and write the preamble plus one ``initial`` event per instance.

        The caller sets the response headers before calling this.
        """
        subscriber = Subscriber(self, request, self.max_pending)
        self.subscribers.append(subscriber)
        request.notifyFinish().addErrback(self._lost, subscriber)
        now = self.clock()
        frames = [RETRY_PREAMBLE]
        for instance in initial:
            frames.extend(encode_events("initial", now, instance))
        # the initial burst never counts against the bound, however many instances there are
        subscriber.max_pending += sum(len(frame) for frame in frames)
        subscriber.send(frames)
        return subscriber

    def _lost(self, reason: Failure, subscriber: Subscriber) -> None:
        subscriber.closed = True
        subscriber.pending.clear()
        self._forget(subscriber)

    def _forget(self, subscriber: Subscriber) -> None:
        if subscriber in self.subscribers:
            self.subscribers.remove(subscriber)

    def publish(self, kind: str, instance: Mapping[str, Any] | None, logs: str = "") -> None:
        """Send one event (``create``/``update``/``delete``/``log``) to every subscriber."""
        if not self.subscribers:
            return
        frames = encode_events(kind, self.clock(), instance, logs)
        for subscriber in list(self.subscribers):
            try:
                subscriber.send(frames)
            except Exception:
                subscriber.drop()

    def close_all(self) -> None:
        """Send ``shutdown`` to every subscriber and end their streams."""
        frame = encode_event("shutdown", self.clock(), None, "")
        for subscriber in list(self.subscribers):
            subscriber.finish(frame)
        self.subscribers.clear()
