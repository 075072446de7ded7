"""NodePass-style logging on top of ``twisted.logger``.

Levels, in order: ``debug < info < warn < error < event``; ``none`` prints
nothing.  A record is emitted when its level is at or above the configured
level, so ``log=error`` still shows ERROR and EVENT (``CHECK_POINT``) lines.

Each :class:`NodePassLogger` owns a ``twisted.logger.Logger`` whose events go
to a private :class:`~twisted.logger.LogPublisher`.  That publisher feeds the
line writer (stdout by default, in NodePass's format
``2026-01-02 10:00:00.123  INFO  message`` with the level word coloured) and
any observers added with :meth:`NodePassLogger.add_observer` (the master uses
one per instance to relay lines as SSE ``log`` events).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TextIO

from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher
from zope.interface import implementer

__all__ = [
    "Level",
    "LEVEL_NAMES",
    "parse_level",
    "LogRecord",
    "format_line",
    "NodePassLogger",
]


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


@dataclass(frozen=True)
class LogRecord:
    """One emitted NodePass log line."""

    level: Level
    text: str
    time: float

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


class NodePassLogger:
    """A leveled logger that writes NodePass lines and fans records out to observers.

    ``stream`` receives the formatted lines (``None`` writes nowhere, for
    instances whose output only goes to observers); ``clock`` gives the
    timestamps.  Messages use printf-style ``%`` formatting with *args*.
    """

    def __init__(
        self,
        level: Level | str = "info",
        *,
        namespace: str = "nodepass",
        stream: TextIO | None = sys.stdout,
        clock: Callable[[], float] = time.time,
        colour: bool | None = None,
    ) -> None:
        self.level = parse_level(level)
        self._clock = clock
        self._stream = stream
        if colour is None:
            colour = True
        self._colour = colour
        self._fanout = _RecordFanout()
        self._publisher = LogPublisher(self._fanout)
        self._logger = Logger(namespace=namespace, observer=self._publisher)
        if stream is not None:
            self._fanout.observers.append(self._write)

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
        record = LogRecord(level, text, self._clock())
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

    def __init__(self, stream: TextIO, level: Level = Level.INFO, colour: bool = True) -> None:
        self._stream = stream
        self._level = level
        self._colour = colour

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

    The level word is coloured only when standard output is a terminal, so a
    journal or log file gets plain text.
    """
    stream = sys.__stdout__ or sys.stdout
    try:
        colour = stream.isatty()
    except (AttributeError, ValueError):
        colour = False
    return LineObserver(stream, colour=colour)
