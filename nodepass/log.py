"""NodePass-style logging on top of ``twisted.logger``.

Levels, in order: ``debug < info < warn < error < event``; ``none`` prints
nothing.  A record is emitted when its level is at or above the configured
level, so ``log=error`` still shows ERROR and EVENT (``CHECK_POINT``) lines.

Each :class:`NodePassLogger` owns a ``twisted.logger.Logger`` whose events go
to a private :class:`~twisted.logger.LogPublisher`.  That publisher feeds the
line writer (stdout by default, in NodePass's format
``2026-01-02 10:00:00.123  INFO  message``) and any observers added with
:meth:`NodePassLogger.add_observer` (the master uses one per instance to relay
lines as SSE ``log`` events).

The level word is coloured with ANSI escape codes only when the line writer's
stream is a terminal and the ``NO_COLOR`` environment variable is unset or
empty (:func:`colour_wanted`), so journals, pipes and log files get plain text.

Repeated lines are summarised (:class:`RepeatSummary`, enabled when the logger
is given a reactor): the first line of a kind is written at once; further
lines of the same level and message template (``"Tunnel handshake from %s:
..."``, whatever its arguments) within the repeat interval are only counted,
and when the interval ends one line ``<latest text> (repeated N times in the
last 10s)`` stands for them.  Observers see exactly what is written.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import TextIO

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher
from zope.interface import implementer

from nodepass.durations import format_duration

__all__ = [
    "Level",
    "LEVEL_NAMES",
    "parse_level",
    "LogRecord",
    "format_line",
    "colour_wanted",
    "RepeatSummary",
    "NodePassLogger",
    "DEFAULT_REPEAT_INTERVAL",
]

DEFAULT_REPEAT_INTERVAL = 10.0
"""Seconds over which repeated log lines are summarised (``NP_LOG_REPEAT_INTERVAL``)."""


class Level(IntEnum):
    """NodePass log levels, ordered by severity (``NONE`` silences everything)."""

    DEBUG = 0
    INFO = 1
    WARN = 2
    ERROR = 3
    EVENT = 4
    NONE = 5


LEVEL_NAMES: tuple[str, ...] = ("none", "debug", "info", "warn", "error", "event")

_COLOURS = {
    Level.DEBUG: "\x1b[34m",
    Level.INFO: "\x1b[32m",
    Level.WARN: "\x1b[33m",
    Level.ERROR: "\x1b[31m",
    Level.EVENT: "\x1b[36m",
}

_TWISTED_LEVEL = {
    Level.DEBUG: LogLevel.debug,
    Level.INFO: LogLevel.info,
    Level.WARN: LogLevel.warn,
    Level.ERROR: LogLevel.error,
    Level.EVENT: LogLevel.info,
}


def parse_level(text: str | Level) -> Level:
    """Return the level named by *text*; anything unknown means ``INFO`` (as NodePass)."""
    if isinstance(text, Level):
        return text
    try:
        return Level[text.strip().upper()]
    except KeyError:
        return Level.INFO


def format_line(level: Level, text: str, when: float, colour: bool = True) -> str:
    """Format one NodePass log line (without the trailing newline).

    ``when`` is a POSIX timestamp printed in local time with milliseconds.
    """
    total_ms = int(round(when * 1000))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(total_ms // 1000))
    millis = total_ms % 1000
    name = level.name
    if colour:
        name = f"{_COLOURS[level]}{name}\x1b[0m"
    return f"{stamp}.{millis:03d}  {name}  {text}"


def colour_wanted(stream: object, environ: Mapping[str, str] | None = None) -> bool:
    """Whether lines written to *stream* should carry ANSI colour codes.

    Only for a terminal, and never when ``NO_COLOR`` is set to a non-empty
    value (https://no-color.org).
    """
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    if isatty is None:
        return False
    try:
        return bool(isatty())
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class LogRecord:
    """One emitted NodePass log line.

    ``repeats`` is 0 for an ordinary line; a summary line (see
    :class:`RepeatSummary`) stands for that many suppressed lines.
    """

    level: Level
    text: str
    time: float
    repeats: int = 0

    def line(self, colour: bool = True) -> str:
        """The formatted line, as NodePass prints it."""
        return format_line(self.level, self.text, self.time, colour)


@implementer(ILogObserver)
class _RecordFanout:
    """Turns twisted.logger events carrying a NodePass record into observer calls."""

    def __init__(self) -> None:
        self.observers: list[Callable[[LogRecord], None]] = []

    def __call__(self, event: dict[str, object]) -> None:
        record = event.get("np_record")
        if not isinstance(record, LogRecord):
            return
        for observer in list(self.observers):
            try:
                observer(record)
            except Exception as exc:  # an observer must never break logging
                sys.stderr.write(f"log observer failed: {exc!r}\n")


_CONVERSION = re.compile(r"%[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?[diouxXeEfFgGcrsa%]")


class _Window:
    """One kind of line seen recently: until ``end``, lines of its kind are counted."""

    __slots__ = ("end", "count", "latest", "timer")

    def __init__(self, end: float) -> None:
        self.end = end
        self.count = 0
        self.latest = ""
        self.timer: IDelayedCall | None = None


class RepeatSummary:
    """Decides which log lines are written and writes the summaries of the rest.

    A line's kind is its level and its message template (the format string
    before ``%`` formatting); a template that is nothing but conversions, such
    as ``"%s"``, has no fixed text, so there the formatted text is the kind.
    The first line of a kind is written and opens a window of *interval*
    seconds; lines of that kind inside the window are counted instead of
    written.  When a window that counted lines ends, a summary line (level of
    the kind, text ``<latest line> (repeated N times in the last <interval>)``)
    is written at once and opens the next window, so a steady flood gives one
    summary per interval and no more.  The statistics report (``CHECK_POINT|…``)
    is never summarised: the master reads every one of them.

    *reactor* schedules the summaries; *emit* writes a line
    ``(level, text, repeats)``.
    """

    #: Windows kept before expired ones are dropped (bounds memory).
    MAX_WINDOWS = 512

    def __init__(
        self,
        reactor: IReactorTime,
        interval: float,
        emit: Callable[[Level, str, int], None],
    ) -> None:
        self.reactor = reactor
        self.interval = interval
        self._emit = emit
        self._windows: dict[tuple[Level, str], _Window] = {}
        self._has_words: dict[str, bool] = {}  # template -> whether it has fixed words

    def admit(self, level: Level, template: str, text: str) -> bool:
        """Whether to write this line now (``False``: it is counted for a summary)."""
        if text.startswith("CHECK_POINT|"):
            return True
        has_words = self._has_words.get(template)
        if has_words is None:
            has_words = any(c.isalnum() for c in _CONVERSION.sub("", template))
            if len(self._has_words) < self.MAX_WINDOWS:
                self._has_words[template] = has_words
        key = (level, template if has_words else text)
        now = self.reactor.seconds()
        window = self._windows.get(key)
        # a window whose summary is due but not yet written (a busy reactor) still counts
        if window is not None and (now < window.end or window.timer is not None):
            window.count += 1
            window.latest = text
            if window.timer is None:
                window.timer = self.reactor.callLater(window.end - now, self._close, key, window)
            return False
        if len(self._windows) >= self.MAX_WINDOWS:
            self._drop_expired(now)
        if len(self._windows) < self.MAX_WINDOWS:
            self._windows[key] = _Window(now + self.interval)
        return True

    def _drop_expired(self, now: float) -> None:
        for key, window in list(self._windows.items()):
            if window.timer is None and window.end <= now:
                del self._windows[key]

    def _close(self, key: tuple[Level, str], window: _Window) -> None:
        window.timer = None
        if self._windows.get(key) is not window:
            return
        self._summarise(key[0], window)
        self._windows[key] = _Window(self.reactor.seconds() + self.interval)

    def _summarise(self, level: Level, window: _Window) -> None:
        times = "time" if window.count == 1 else "times"
        text = (
            f"{window.latest} (repeated {window.count} {times} in the last "
            f"{format_duration(self.interval)})"
        )
        self._emit(level, text, window.count)

    def flush(self) -> None:
        """Write every pending summary now and forget all windows (no timer stays behind)."""
        windows, self._windows = self._windows, {}
        for (level, _), window in windows.items():
            if window.timer is not None:
                if window.timer.active():
                    window.timer.cancel()
                window.timer = None
                self._summarise(level, window)


class NodePassLogger:
    """A leveled logger that writes NodePass lines and fans records out to observers.

    ``stream`` receives the formatted lines (``None`` writes nowhere, for
    instances whose output only goes to observers); ``clock`` gives the
    timestamps.  Messages use printf-style ``%`` formatting with *args*.
    ``colour`` forces the level colours on or off; by default they are used
    when ``stream`` is a terminal and ``NO_COLOR`` is not set
    (:func:`colour_wanted`).

    With a *reactor*, repeated lines are summarised over *repeat_interval*
    seconds (see :class:`RepeatSummary`; ``0`` writes every line).  Call
    :meth:`flush` when done to write pending summaries and cancel their timers.
    """

    def __init__(
        self,
        level: Level | str = "info",
        *,
        namespace: str = "nodepass",
        stream: TextIO | None = sys.stdout,
        clock: Callable[[], float] = time.time,
        colour: bool | None = None,
        reactor: IReactorTime | None = None,
        repeat_interval: float = DEFAULT_REPEAT_INTERVAL,
    ) -> None:
        self.level = parse_level(level)
        self._clock = clock
        self._stream = stream
        if colour is None:
            colour = colour_wanted(stream)
        self._colour = colour
        self._fanout = _RecordFanout()
        self._publisher = LogPublisher(self._fanout)
        self._logger = Logger(namespace=namespace, observer=self._publisher)
        self._repeats: RepeatSummary | None = None
        if reactor is not None and repeat_interval > 0:
            self._repeats = RepeatSummary(reactor, repeat_interval, self._emit)
        if stream is not None:
            self._fanout.observers.append(self._write)

    @property
    def colour(self) -> bool:
        """Whether written lines carry ANSI colour codes."""
        return self._colour

    def flush(self) -> None:
        """Write the summaries of lines still being counted; cancels their timers."""
        if self._repeats is not None:
            self._repeats.flush()

    # observers -------------------------------------------------------------
    def add_observer(self, observer: Callable[[LogRecord], None]) -> None:
        """Call *observer* with every record at or above the configured level."""
        self._fanout.observers.append(observer)

    def remove_observer(self, observer: Callable[[LogRecord], None]) -> None:
        """Stop calling *observer*; unknown observers are ignored."""
        if observer in self._fanout.observers:
            self._fanout.observers.remove(observer)

    def add_twisted_observer(self, observer: ILogObserver) -> None:
        """Also publish the raw ``twisted.logger`` events to *observer*."""
        self._publisher.addObserver(observer)

    def _write(self, record: LogRecord) -> None:
        assert self._stream is not None
        try:
            self._stream.write(record.line(self._colour) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass

    # emitting --------------------------------------------------------------
    def enabled(self, level: Level) -> bool:
        """Whether a record at *level* would be emitted."""
        return self.level != Level.NONE and level >= self.level

    def log(self, level: Level, msg: str, *args: object) -> None:
        """Emit *msg* % *args* at *level* if the level lets it through."""
        if not self.enabled(level):
            return
        text = msg % args if args else msg
        if self._repeats is not None and not self._repeats.admit(level, msg, text):
            return
        self._emit(level, text, 0)

    def _emit(self, level: Level, text: str, repeats: int) -> None:
        record = LogRecord(level, text, self._clock(), repeats)
        self._logger.emit(
            _TWISTED_LEVEL[level], "{np_text}", np_text=text, np_level=level.name, np_record=record
        )

    def debug(self, msg: str, *args: object) -> None:
        """Emit at DEBUG."""
        self.log(Level.DEBUG, msg, *args)

    def info(self, msg: str, *args: object) -> None:
        """Emit at INFO."""
        self.log(Level.INFO, msg, *args)

    def warn(self, msg: str, *args: object) -> None:
        """Emit at WARN."""
        self.log(Level.WARN, msg, *args)

    def error(self, msg: str, *args: object) -> None:
        """Emit at ERROR."""
        self.log(Level.ERROR, msg, *args)

    def event(self, msg: str, *args: object) -> None:
        """Emit at EVENT (CHECK_POINT lines and other always-wanted events)."""
        self.log(Level.EVENT, msg, *args)


@implementer(ILogObserver)
class LineObserver:
    """A ``twisted.logger`` observer that prints events as NodePass lines.

    Events from a :class:`NodePassLogger` keep their own level and text;
    other Twisted events are printed with the nearest NodePass level.  Used as
    the observer under ``twistd`` (``twistd --logger nodepass.log.twistd_observer``)
    so that every line has NodePass's format.
    """

    _FROM_TWISTED = {
        LogLevel.debug: Level.DEBUG,
        LogLevel.info: Level.INFO,
        LogLevel.warn: Level.WARN,
        LogLevel.error: Level.ERROR,
        LogLevel.critical: Level.ERROR,
    }

    def __init__(self, stream: TextIO, level: Level = Level.INFO, colour: bool | None = None) -> None:
        self._stream = stream
        self._level = level
        self._colour = colour_wanted(stream) if colour is None else colour

    def __call__(self, event: dict[str, object]) -> None:
        from twisted.logger import formatEvent

        record = event.get("np_record")
        if isinstance(record, LogRecord):
            line = record.line(self._colour)
        else:
            level = self._FROM_TWISTED.get(event.get("log_level"), Level.INFO)  # type: ignore[call-overload]
            if level < self._level:
                return
            when = event.get("log_time")
            text = formatEvent(event)
            failure = event.get("log_failure")
            if failure is not None:
                text += "\n" + str(getattr(failure, "getTraceback", lambda: failure)())
            line = format_line(level, text, float(when) if isinstance(when, (int, float)) else time.time(), self._colour)
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass


def twistd_observer() -> LineObserver:
    """Observer factory for ``twistd --logger``: NodePass lines on standard output.

    The level word is coloured only when standard output is a terminal and
    ``NO_COLOR`` is not set, so a journal or log file gets plain text.
    """
    stream = sys.__stdout__ or sys.stdout
    return LineObserver(stream, colour=colour_wanted(stream))
