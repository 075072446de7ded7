"""Instances of the master: records, validation, and running them in-process.

An instance is a server or client tunnel described by its URL.  Each running
instance is a :class:`~nodepass.tunnel.TunnelService` added at run time as a
child of :class:`InstanceManager` (a ``MultiService``) and removed again when
it stops, so the master's service tree always mirrors what runs.

Status state machine (``status`` in the API):

* ``stopped`` → ``running`` when a start succeeds; → ``error`` when the
  tunnel cannot even be built or started (bad stored URL, unexpected failure).
* ``running`` → ``error`` when the instance logs an ERROR line containing
  ``Server error:`` or ``Client error:`` (the tunnel then restarts itself after
  ``NP_SERVICE_COOLDOWN``); ``error`` → ``running`` at its next ``CHECK_POINT``.
* any → ``stopped`` on stop (PATCH stop/restart, PUT, DELETE, master
  shutdown).  Every ``NP_RELOAD_INTERVAL`` instances still in ``error`` are
  restarted.

Events: every change of an instance raises an SSE ``update``; so does every
``CHECK_POINT`` of a running instance (stats are read from ``service.stats``,
the line itself is not relayed), and a watchdog raises one with fresh stats
whenever an instance that has a running tunnel stayed silent for
``NP_REPORT_INTERVAL``.  Other log lines of an instance become ``log`` events
(and are echoed to the master's output with `` [<id>]`` appended;
``CHECK_POINT`` lines are not echoed).

Traffic counters are cumulative across restarts: a running tunnel's counters
start at zero, so ``total = base + live - at_reset`` where ``base`` is the
total when the tunnel started and ``at_reset`` the live value at the last
``reset`` (0 otherwise).  ``reset`` zeroes the totals.  While instances run
the state is saved every minute, so a crash loses at most a minute of counts.

Every call into an instance's tunnel is guarded: a failing instance ends in
``error`` and never takes the master or other instances down.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TextIO

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, DeferredLock, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall, deferLater

from nodepass.env import Settings
from nodepass.log import Level, LogRecord, NodePassLogger
from nodepass.master.events import EventHub, dumps
from nodepass.url import MasterURL, URLError, parse_tunnel_url

__all__ = [
    "PSEUDO_ID",
    "TEXT_LIMIT",
    "ApiError",
    "InstanceRecord",
    "InstanceManager",
    "TunnelFactory",
    "validate_patch",
    "PatchRequest",
]

PSEUDO_ID = "********"
"""Id of the API-key pseudo-instance (``url`` = API key, ``config`` = master id)."""

TEXT_LIMIT = 256
"""Maximum length (characters) of aliases, peer fields, tag keys and tag values."""

URL_LIMIT = 8192
"""Maximum length (characters) of an instance URL."""

META_LIMIT = 32768
"""Maximum size (bytes of compact JSON) of an instance's meta (keeps SSE events < 64 KiB)."""

URL_BYTES_LIMIT = 24576
"""Maximum size (bytes, as JSON strings) of the stored ``url`` plus ``config`` together.

Non-ASCII text in a URL is stored percent-encoded (up to 9 bytes per character),
so the character limit alone does not bound an instance object.  With this
budget, the meta limit and the 256-character text fields, one instance still
fits in one SSE event below 64 KiB, the size dashboards' stream readers accept.
"""

COUNTER_SAVE_INTERVAL = 60.0
"""While instances run, the state (with their traffic counters) is saved this often (seconds)."""

ACTIONS = ("start", "stop", "restart", "reset")
COUNTERS = ("tcprx", "tcptx", "udprx", "udptx")
GAUGES = ("ping", "pool", "tcps", "udps")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
"""An instance URL starts with its scheme and ``://``, nothing before (not even a space)."""

_UUID4 = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-4[0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}$"
)

TunnelFactory = Callable[..., IService]
"""``factory(config: TunnelURL, *, reactor, logger, settings) -> TunnelService``."""


class ApiError(Exception):
    """A request the API refuses: HTTP *status* with ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------- records


def _str_field(data: Mapping[str, Any], key: str, default: str = "") -> str:
    value = data.get(key, default)
    return value if isinstance(value, str) else default


def _int_field(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return value


class InstanceRecord:
    """One instance: what the API shows, what is persisted, and its live tunnel."""

    def __init__(self, instance_id: str) -> None:
        self.id = instance_id
        self.alias = ""
        self.type = ""
        self.status = "stopped"
        self.url = ""
        self.config = ""
        self.restart = False
        self.peer: dict[str, str] = {"sid": "", "type": "", "alias": ""}
        self.tags: dict[str, str] = {}
        self.mode = 0
        self.gauges: dict[str, int] = {name: 0 for name in GAUGES}
        self.totals: dict[str, int] = {name: 0 for name in COUNTERS}
        self.base: dict[str, int] = {name: 0 for name in COUNTERS}
        self.at_reset: dict[str, int] = {name: 0 for name in COUNTERS}
        # live state (never persisted)
        self.service: IService | None = None
        self.logger: NodePassLogger | None = None
        self.observer: Callable[[LogRecord], None] | None = None
        self.watchdog: IDelayedCall | None = None
        self.deleted = False
        self.lock = DeferredLock()

    @property
    def is_pseudo(self) -> bool:
        """Whether this is the API-key pseudo-instance."""
        return self.id == PSEUDO_ID

    def refresh(self) -> None:
        """Copy the live numbers of the running tunnel (if any) into the record."""
        service = self.service
        if service is None:
            return
        stats = getattr(service, "stats", None)
        if stats is None:
            return
        try:
            self.mode = int(getattr(stats, "mode", self.mode))
            for name in GAUGES:
                self.gauges[name] = int(getattr(stats, name, 0))
            for name in COUNTERS:
                live = int(getattr(stats, name, 0))
                self.totals[name] = self.base[name] + max(live - self.at_reset[name], 0)
        except Exception:
            pass

    def live_counter(self, name: str) -> int:
        """The running tunnel's own value of counter *name* (0 when not running)."""
        stats = getattr(self.service, "stats", None) if self.service is not None else None
        try:
            return int(getattr(stats, name, 0)) if stats is not None else 0
        except Exception:
            return 0

    def to_json(self) -> dict[str, Any]:
        """The API object, keys in NodePass's order (tags sorted)."""
        return {
            "id": self.id,
            "alias": self.alias,
            "type": self.type,
            "status": "" if self.is_pseudo else self.status,
            "url": self.url,
            "config": self.config,
            "restart": self.restart,
            "meta": {
                "peer": dict(self.peer),
                "tags": {key: self.tags[key] for key in sorted(self.tags)},
            },
            "mode": self.mode,
            "ping": self.gauges["ping"],
            "pool": self.gauges["pool"],
            "tcps": self.gauges["tcps"],
            "udps": self.gauges["udps"],
            "tcprx": self.totals["tcprx"],
            "tcptx": self.totals["tcptx"],
            "udprx": self.totals["udprx"],
            "udptx": self.totals["udptx"],
        }

    def to_state(self) -> dict[str, Any]:
        """What the state file keeps of this instance."""
        data = self.to_json()
        data["status"] = self.status if not self.is_pseudo else ""
        return data

    @classmethod
    def from_state(cls, data: Mapping[str, Any]) -> InstanceRecord:
        """Rebuild a record from the state file (tolerant of missing or odd fields)."""
        record = cls(_str_field(data, "id"))
        record.alias = _str_field(data, "alias")
        record.type = _str_field(data, "type")
        record.url = _str_field(data, "url")
        record.config = _str_field(data, "config")
        record.restart = data.get("restart") is True
        meta = data.get("meta")
        if isinstance(meta, dict):
            peer = meta.get("peer")
            if isinstance(peer, dict):
                record.peer = {k: _str_field(peer, k) for k in ("sid", "type", "alias")}
            tags = meta.get("tags")
            if isinstance(tags, dict):
                record.tags = {str(k): str(v) for k, v in tags.items() if isinstance(v, str)}
        record.mode = _int_field(data, "mode")
        for name in COUNTERS:
            record.totals[name] = _int_field(data, name)
        return record


# --------------------------------------------------------------------------- validation


class PatchRequest:
    """A validated PATCH body (``None`` = field absent)."""

    def __init__(self) -> None:
        self.alias: str | None = None
        self.action: str | None = None
        self.restart: bool | None = None
        self.peer: dict[str, str] | None = None
        self.tags: dict[str, str] | None = None
        self.meta_given = False


def _check_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"Invalid request body: {what} must be a string")
    if len(value) > TEXT_LIMIT:
        raise ApiError(400, f"{what} exceeds maximum length {TEXT_LIMIT}")
    return value


def validate_patch(body: Mapping[str, Any], duplicate_tags: Iterable[str] = ()) -> PatchRequest:
    """Validate a whole PATCH body before anything is applied; raises :class:`ApiError` (400).

    * ``alias``: string ≤ 256 characters (``""`` leaves the alias unchanged);
    * ``action``: one of start, stop, restart, reset;
    * ``restart``: boolean;
    * ``meta.peer``: ``sid`` "" or a UUID v4 (stored as sent, case kept), ``type``
      any string ≤ 256 (dashboards use "0".."7"), ``alias`` ≤ 256; fields left out
      keep their value (so ``{}`` keeps the peer);
    * ``meta.tags``: object of string → string, keys and values ≤ 256, no key
      twice; it replaces the whole tag set (``{}`` clears it).
    """
    request = PatchRequest()
    alias = body.get("alias")
    if alias is not None:
        request.alias = _check_text(alias, "Instance alias")
    action = body.get("action")
    if action is not None:
        if not isinstance(action, str):
            raise ApiError(400, "Invalid request body: action must be a string")
        if action != "":
            if action not in ACTIONS:
                raise ApiError(400, f"Invalid action: {action}")
            request.action = action
    restart = body.get("restart")
    if restart is not None:
        if not isinstance(restart, bool):
            raise ApiError(400, "Invalid request body: restart must be a boolean")
        request.restart = restart
    meta = body.get("meta")
    if meta is None:
        return request
    if not isinstance(meta, dict):
        raise ApiError(400, "Invalid request body: meta must be an object")
    request.meta_given = True
    peer = meta.get("peer")
    if peer is not None:
        if not isinstance(peer, dict):
            raise ApiError(400, "Invalid request body: meta.peer must be an object")
        checked: dict[str, str] = {}
        if peer.get("sid") is not None:
            sid = _check_text(peer["sid"], "Meta peer.sid")
            if sid and not _UUID4.match(sid):
                raise ApiError(400, "Meta peer.sid must be a UUID v4")
            checked["sid"] = sid  # kept as sent: clients compare it with their own spelling
        if peer.get("type") is not None:
            # Free text: dashboards use "0".."7" (3/4 = external targets) and more may come.
            checked["type"] = _check_text(peer["type"], "Meta peer.type")
        if peer.get("alias") is not None:
            checked["alias"] = _check_text(peer["alias"], "Meta peer.alias")
        request.peer = checked
    tags = meta.get("tags")
    if tags is not None:
        if not isinstance(tags, dict):
            raise ApiError(400, "Invalid request body: meta.tags must be an object")
        for key in duplicate_tags:
            raise ApiError(400, f"Meta tag key duplicated: {key}")
        checked_tags: dict[str, str] = {}
        for key, value in tags.items():
            if len(key) > TEXT_LIMIT:
                raise ApiError(400, f"Meta tag key exceeds maximum length {TEXT_LIMIT}")
            if not isinstance(value, str):
                raise ApiError(400, "Invalid request body: meta.tags values must be strings")
            if len(value) > TEXT_LIMIT:
                raise ApiError(400, f"Meta tag value exceeds maximum length {TEXT_LIMIT}")
            checked_tags[key] = value
        # measured as it is sent (JSON escapes can make a character take 6 bytes)
        size = len(dumps(checked_tags).encode("utf-8"))
        if size > META_LIMIT:
            raise ApiError(400, f"Meta tags exceed maximum size {META_LIMIT} bytes")
        request.tags = checked_tags
    return request


def check_instance_url(url: Any, master: MasterURL) -> tuple[str, str, str]:
    """Validate an instance URL from a request; return ``(type, stored url, config)``.

    Raises :class:`ApiError` 400 with ``Invalid request body`` (missing/empty),
    ``Invalid URL scheme`` (not starting with ``server://`` or ``client://``, in
    any case) or ``Invalid URL format: …`` (an ASCII control character anywhere,
    a URL that does not parse, or one whose stored and canonical forms together
    exceed :data:`URL_BYTES_LIMIT` bytes once percent-encoded).
    """
    if not isinstance(url, str) or not url:
        raise ApiError(400, "Invalid request body")
    if len(url) > URL_LIMIT:
        raise ApiError(400, f"Invalid URL format: longer than {URL_LIMIT} characters")
    if _CONTROL.search(url):
        raise ApiError(400, "Invalid URL format: control character in URL")
    scheme = _SCHEME.match(url)
    if scheme is None or scheme.group(1).lower() not in ("server", "client"):
        raise ApiError(400, "Invalid URL scheme")
    try:
        parsed = parse_tunnel_url(url)
        stored = parsed.with_inheritance(master)
        config = parsed.canonical(master)
    except URLError as exc:
        raise ApiError(400, f"Invalid URL format: {exc}") from None
    except ValueError as exc:
        raise ApiError(400, f"Invalid URL format: {exc}") from None
    size = len(dumps(stored).encode("utf-8")) + len(dumps(config).encode("utf-8"))
    if size > URL_BYTES_LIMIT:
        raise ApiError(
            400,
            f"Invalid URL format: too long once encoded ({size} bytes for url and config,"
            f" at most {URL_BYTES_LIMIT})",
        )
    return parsed.scheme, stored, config


# --------------------------------------------------------------------------- output echo


class _EchoStream:
    """A text stream that forwards each line to *target* with `` [<id>]`` appended.

    ``CHECK_POINT`` lines are not forwarded (they only feed the statistics).
    """

    def __init__(self, target: TextIO, instance_id: str) -> None:
        self.target = target
        self.suffix = f" [{instance_id}]"

    def write(self, text: str) -> int:
        lines = text.split("\n")
        if lines[-1]:
            lines.append("")
        out = [line + self.suffix for line in lines[:-1] if "CHECK_POINT|" not in line]
        if out:
            self.target.write("\n".join(out) + "\n")
        return len(text)

    def flush(self) -> None:
        try:
            self.target.flush()
        except Exception:
            pass


def _logger_stream(logger: NodePassLogger) -> TextIO | None:
    stream = getattr(logger, "stream", None)
    if stream is None:
        stream = getattr(logger, "_stream", None)
    return stream  # type: ignore[no-any-return]


def _new_hex(nbytes: int) -> str:
    return secrets.token_hex(nbytes)


# --------------------------------------------------------------------------- manager


class InstanceManager(MultiService):
    """Holds every instance record and runs the started ones as child services.

    *events* receives the SSE events; *on_change* is called after every change
    that must be persisted (the store debounces it); *tunnel_factory* builds a
    tunnel service for a parsed URL.
    """

    name = "instances"

    def __init__(
        self,
        master: MasterURL,
        *,
        reactor: Any,
        logger: NodePassLogger,
        settings: Settings,
        events: EventHub,
        tunnel_factory: TunnelFactory,
        on_change: Callable[[], None] = lambda: None,
        output: TextIO | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.master = master
        self.reactor = reactor
        self.logger = logger
        self.settings = settings
        self.events = events
        self.tunnel_factory = tunnel_factory
        self.on_change = on_change
        self.output = output if output is not None else _logger_stream(logger)
        self.records: dict[str, InstanceRecord] = {}
        self._sweep: LoopingCall | None = None
        self._persist: LoopingCall | None = None
        self.key_rotated: list[Callable[[], None]] = []

    # ------------------------------------------------------------ pseudo-instance
    @property
    def pseudo(self) -> InstanceRecord:
        """The API-key pseudo-instance (created by :meth:`load`)."""
        return self.records[PSEUDO_ID]

    @property
    def api_key(self) -> str:
        """The current API key."""
        return self.pseudo.url

    @property
    def master_id(self) -> str:
        """The master id (16 hex characters)."""
        return self.pseudo.config

    def _announce(self, message: str, *args: object) -> None:
        level = Level.INFO if self.logger.enabled(Level.INFO) else Level.EVENT
        self.logger.log(level, message, *args)

    def load(self, stored: Iterable[Mapping[str, Any]] | None) -> None:
        """Install the stored records (all ``stopped``) and make sure the pseudo-instance exists."""
        self.records.clear()
        for data in stored or ():
            record = InstanceRecord.from_state(data)
            if not record.id or record.id in self.records:
                continue
            if not record.is_pseudo:
                if record.type not in ("server", "client"):
                    record.type = record.url.split("://", 1)[0].lower()
                if not record.config:
                    try:
                        record.config = parse_tunnel_url(record.url).canonical(self.master)
                    except Exception:
                        record.config = record.url
            record.status = "stopped"
            self.records[record.id] = record
        pseudo = self.records.get(PSEUDO_ID)
        if pseudo is None or not pseudo.url:
            pseudo = pseudo or InstanceRecord(PSEUDO_ID)
            pseudo.url = _new_hex(16)
            if not pseudo.config:
                pseudo.config = _new_hex(8)
            self.records[PSEUDO_ID] = pseudo
            self._announce("API Key created: %s", pseudo.url)
            self.on_change()
        else:
            if not pseudo.config:
                pseudo.config = _new_hex(8)
                self.logger.info("Master ID created: %s", pseudo.config)
                self.on_change()
            self._announce("API Key loaded: %s", pseudo.url)
        pseudo.type = ""
        pseudo.restart = False
        # keep the pseudo-instance first in listings
        self.records = {PSEUDO_ID: pseudo, **{k: v for k, v in self.records.items() if k != PSEUDO_ID}}

    def regenerate_key(self) -> InstanceRecord:
        """Replace the API key, tell every SSE subscriber, and close their streams."""
        pseudo = self.pseudo
        pseudo.url = _new_hex(16)
        self._announce("API Key regenerated: %s", pseudo.url)
        self.on_change()
        self.events.publish("update", pseudo.to_json())
        self.events.close_all()
        return pseudo

    def set_master_alias(self, alias: str) -> None:
        """Set (or clear, with ``""``) the master alias."""
        self.pseudo.alias = alias
        self.on_change()

    def snapshot_state(self) -> dict[str, Any]:
        """The JSON-ready state for the store."""
        out = []
        for record in self.records.values():
            record.refresh()
            out.append(record.to_state())
        return {"instances": out}

    # ------------------------------------------------------------ queries
    def list(self) -> list[dict[str, Any]]:
        """Every instance as an API object (pseudo-instance first)."""
        out = []
        for record in self.records.values():
            record.refresh()
            out.append(record.to_json())
        return out

    def get(self, instance_id: str) -> InstanceRecord | None:
        """The record with *instance_id* (stats refreshed), or ``None``."""
        record = self.records.get(instance_id)
        if record is not None:
            record.refresh()
        return record

    def _changed(self, record: InstanceRecord, save: bool = True) -> None:
        """Raise an ``update`` for *record* (fresh stats) and schedule a save."""
        record.refresh()
        if not record.deleted:
            self.events.publish("update", record.to_json())
        self._arm_watchdog(record)
        if save:
            self.on_change()

    # ------------------------------------------------------------ create / delete
    def create(self, url: Any, alias: Any) -> InstanceRecord:
        """Add and start a new instance; raises :class:`ApiError` for bad input."""
        if alias is None:
            alias = ""
        if not isinstance(alias, str):
            raise ApiError(400, "Invalid request body")
        if len(alias) > TEXT_LIMIT:
            raise ApiError(400, f"Instance alias exceeds maximum length {TEXT_LIMIT}")
        kind, stored, config = check_instance_url(url, self.master)
        instance_id = _new_hex(4)
        while instance_id in self.records:
            instance_id = _new_hex(4)
        record = InstanceRecord(instance_id)
        record.alias = alias
        record.type = kind
        record.url = stored
        record.config = config
        record.restart = True
        self.records[instance_id] = record
        self.logger.info("Instance created: %s [%s]", stored, instance_id)
        self.events.publish("create", record.to_json())
        self.on_change()
        self._start(record)
        return record

    @inlineCallbacks
    def delete(self, record: InstanceRecord) -> Any:
        """Stop (if needed) and remove *record*; raises a ``delete`` event."""
        if record.is_pseudo:
            raise ApiError(403, "Forbidden: API Key")
        yield record.lock.run(self._stop, record)
        record.deleted = True
        self.records.pop(record.id, None)
        self.logger.info("Instance deleted [%s]", record.id)
        self.events.publish("delete", record.to_json())
        self.on_change()

    # ------------------------------------------------------------ lifecycle
    def _instance_logger(self, record: InstanceRecord, level: str) -> NodePassLogger:
        stream: TextIO | None = None
        if self.output is not None:
            stream = _EchoStream(self.output, record.id)  # type: ignore[assignment]
        return NodePassLogger(
            level or "info",
            namespace=f"nodepass.instance.{record.id}",
            stream=stream,
            colour=self.logger.colour,
            reactor=self.reactor,
            repeat_interval=self.settings.log_repeat_interval,
        )

    def _observer(self, record: InstanceRecord, service: IService) -> Callable[[LogRecord], None]:
        def observe(entry: LogRecord) -> None:
            if record.deleted or record.service is not service:
                return
            if entry.level == Level.EVENT and "CHECK_POINT" in entry.text:
                if record.status == "error":
                    record.status = "running"
                self._changed(record, save=False)
                return
            became_error = False
            if entry.level == Level.ERROR and (
                "Server error:" in entry.text or "Client error:" in entry.text
            ):
                became_error = record.status != "error"
                record.status = "error"
            record.refresh()
            if record.status == "error":
                for name in GAUGES:
                    record.gauges[name] = 0
            self.events.publish("log", record.to_json(), entry.line(True))
            if became_error:
                self.events.publish("update", record.to_json())
                self._arm_watchdog(record)

        return observe

    def _arm_watchdog(self, record: InstanceRecord) -> None:
        """Make sure an ``update`` follows within ``report_interval`` while the tunnel runs."""
        if record.watchdog is not None and record.watchdog.active():
            record.watchdog.cancel()
        record.watchdog = None
        if record.service is None or record.deleted or self.settings.report_interval <= 0:
            return
        record.watchdog = self.reactor.callLater(
            self.settings.report_interval, self._watchdog_fired, record
        )

    def _watchdog_fired(self, record: InstanceRecord) -> None:
        record.watchdog = None
        if record.service is None or record.deleted:
            return
        self._changed(record, save=False)

    def _start(self, record: InstanceRecord) -> None:
        """Start *record*'s tunnel now if it is stopped (synchronous; failures → ``error``)."""
        if record.deleted or record.service is not None or record.is_pseudo:
            return
        for name in COUNTERS:
            record.base[name] = record.totals[name]
            record.at_reset[name] = 0
        self.logger.info("Instance starting: %s [%s]", record.url, record.id)
        service: IService | None = None
        try:
            config = parse_tunnel_url(record.url)
            logger = self._instance_logger(record, config.log)
            service = self.tunnel_factory(
                config, reactor=self.reactor, logger=logger, settings=self.settings
            )
            observer = self._observer(record, service)
            logger.add_observer(observer)
            record.logger, record.observer, record.service = logger, observer, service
            record.status = "running"
            service.setServiceParent(self)  # type: ignore[no-untyped-call]
        except Exception as exc:
            self.logger.error("Instance start failed: %s [%s]", exc, record.id)
            if service is not None:
                self._discard(record, service)
            record.status = "error"
            for name in GAUGES:
                record.gauges[name] = 0
        self._changed(record, save=False)

    def _discard(self, record: InstanceRecord, service: IService) -> None:
        logger = record.logger
        if logger is not None:
            logger.flush()
            if record.observer is not None:
                logger.remove_observer(record.observer)
        record.service = record.logger = record.observer = None
        try:
            service.parent = None  # type: ignore[attr-defined]
        except Exception:
            pass
        if service in self.services:
            try:
                self.services.remove(service)
            except ValueError:
                pass
            try:
                if service.running:
                    service.stopService()  # type: ignore[no-untyped-call]
            except Exception:
                pass
        if logger is not None:
            logger.flush()

    @inlineCallbacks
    def _stop(self, record: InstanceRecord) -> Any:
        """Stop *record*'s tunnel (bounded by ``NP_SHUTDOWN_TIMEOUT``); status → ``stopped``."""
        service = record.service
        if record.watchdog is not None and record.watchdog.active():
            record.watchdog.cancel()
        record.watchdog = None
        if service is None:
            if record.status != "stopped":
                record.status = "stopped"
                self._changed(record)
            return
        record.refresh()
        logger = record.logger
        if logger is not None:
            logger.flush()  # summaries of repeated lines still reach the event stream
            if record.observer is not None:
                logger.remove_observer(record.observer)
        record.service = None
        for name in COUNTERS:
            record.base[name] = record.totals[name]
            record.at_reset[name] = 0
        try:
            d = maybeDeferred(service.disownServiceParent)
            d.addTimeout(self.settings.shutdown_timeout, self.reactor)
            yield d
            self.logger.info("Instance stopped [%s]", record.id)
        except Exception as exc:
            self.logger.warn("Instance force stopped: %s [%s]", exc, record.id)
        if logger is not None:
            logger.flush()
        record.logger = record.observer = None
        record.status = "stopped"
        for name in GAUGES:
            record.gauges[name] = 0
        self._changed(record)

    def start(self, record: InstanceRecord) -> Deferred[None]:
        """Start a stopped instance (no-op otherwise)."""
        return record.lock.run(lambda: self._start(record) if record.status == "stopped" else None)

    def stop(self, record: InstanceRecord) -> Deferred[None]:
        """Stop an instance that is not stopped."""
        return record.lock.run(self._stop, record)

    def restart(self, record: InstanceRecord) -> Deferred[None]:
        """Stop (if needed), pause briefly, and start again."""

        @inlineCallbacks
        def run() -> Any:
            yield self._stop(record)
            yield deferLater(self.reactor, 0.1, lambda: None)
            if not record.deleted:
                self._start(record)

        return record.lock.run(run)

    def reset(self, record: InstanceRecord) -> None:
        """Zero the cumulative traffic counters."""
        for name in COUNTERS:
            record.base[name] = 0
            record.at_reset[name] = record.live_counter(name)
            record.totals[name] = 0
        self.logger.info("Traffic stats reset: 0 [%s]", record.id)

    # ------------------------------------------------------------ PATCH / PUT
    @inlineCallbacks
    def patch(self, record: InstanceRecord, request: PatchRequest) -> Any:
        """Apply a validated PATCH; returns the record when the action has completed."""
        if record.is_pseudo:
            if request.action == "restart":
                self.regenerate_key()
            return record
        changed = False
        if request.alias and request.alias != record.alias:
            record.alias = request.alias
            self.logger.info("Alias updated: %s [%s]", record.alias, record.id)
            changed = True
        if request.restart is not None and request.restart != record.restart:
            record.restart = request.restart
            self.logger.info("Restart policy updated: %s [%s]", str(record.restart).lower(), record.id)
            changed = True
        if request.meta_given:
            if request.peer is not None:
                record.peer.update(request.peer)
            if request.tags is not None:
                record.tags = dict(request.tags)
            self.logger.info("Meta updated [%s]", record.id)
            changed = True
        if request.action == "reset":
            self.reset(record)
            changed = True
        if changed:
            self._changed(record)
        if request.action == "start":
            yield self.start(record)
        elif request.action == "stop":
            yield self.stop(record)
        elif request.action == "restart":
            yield self.restart(record)
        return record

    @inlineCallbacks
    def replace_url(self, record: InstanceRecord, url: Any) -> Any:
        """PUT: validate *url*, stop, switch to it, and start again."""
        if record.is_pseudo:
            raise ApiError(403, "Forbidden: API Key")
        kind, stored, config = check_instance_url(url, self.master)
        if stored == record.url:
            raise ApiError(409, "Instance URL conflict")

        def switch() -> Any:
            @inlineCallbacks
            def run() -> Any:
                yield self._stop(record)
                record.url, record.type, record.config = stored, kind, config
                self.logger.info("Instance URL updated: %s [%s]", stored, record.id)
                self.on_change()
                if not record.deleted:
                    self._start(record)

            return run()

        yield record.lock.run(switch)
        return record

    # ------------------------------------------------------------ service
    def _sweep_errors(self) -> None:
        """Restart instances that are still in ``error``."""
        for record in list(self.records.values()):
            if record.status == "error" and not record.deleted:
                self.logger.info("Restarting instance in error [%s]", record.id)
                self.restart(record).addErrback(lambda f: None)

    def startService(self) -> None:
        """Start the instances with ``restart: true`` and the periodic error sweep."""
        super().startService()  # type: ignore[no-untyped-call]
        for record in list(self.records.values()):
            if record.restart and not record.is_pseudo:
                self.logger.info("Auto-starting instance: %s [%s]", record.url, record.id)
                self._start(record)
        if self.settings.reload_interval > 0:
            loop = LoopingCall(self._sweep_errors)
            loop.clock = self.reactor
            loop.start(self.settings.reload_interval, now=False)
            self._sweep = loop
        persist = LoopingCall(self._persist_counters)
        persist.clock = self.reactor
        persist.start(COUNTER_SAVE_INTERVAL, now=False)
        self._persist = persist

    def _persist_counters(self) -> None:
        """Save the state while instances run, so traffic counters survive a crash."""
        if any(record.service is not None for record in self.records.values()):
            self.on_change()

    @inlineCallbacks
    def stop_all(self) -> Any:
        """Stop every running instance concurrently (their ``restart`` flags are kept)."""
        from twisted.internet.defer import DeferredList

        pending = [
            self.stop(record)
            for record in list(self.records.values())
            if record.service is not None or record.status != "stopped"
        ]
        if pending:
            yield DeferredList(pending, consumeErrors=True)

    @inlineCallbacks
    def stopService(self) -> Any:
        """Stop the sweep and every instance."""
        for loop in (self._sweep, self._persist):
            if loop is not None and loop.running:
                loop.stop()
        self._sweep = None
        self._persist = None
        yield self.stop_all()
        yield super().stopService()  # type: ignore[no-untyped-call]
