"""Persistence of the master's instances (a Twisted service).

The state lives in ``<state dir>/nodepass.json`` (JSON, UTF-8)::

    {"format": "nodepass-master", "version": 1, "instances": [ {...}, ... ]}

Each element is an instance record as :meth:`InstanceRecord.to_state`
produces it (the API-key pseudo-instance included: it carries the API key,
the master id and the master alias).

* Writes are atomic: a temporary file in the same directory is written,
  flushed, ``fsync``-ed, given mode 0600 and renamed over the target; the
  directory is then ``fsync``-ed.
* :meth:`StateStore.request_save` debounces bursts of changes into one write
  shortly afterwards; :meth:`StateStore.save_now` writes at once.  Stopping
  the service performs a final save.
* Every ``reload_interval``, once at start (after a good load) and once at a
  graceful stop the current state is written to ``nodepass.json.backup``.
* :meth:`StateStore.load` reads the main file; when it is unreadable or
  corrupt the corrupt file is kept as ``nodepass.json.corrupt`` and the backup
  is read instead, with a clear ERROR line.  Only when neither can be read does
  the master start from an empty state (also logged as an ERROR).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall

from nodepass.env import Settings
from nodepass.log import NodePassLogger

__all__ = ["StateStore", "StateError", "STATE_FILE", "STATE_FORMAT", "STATE_VERSION"]

STATE_FILE = "nodepass.json"
STATE_FORMAT = "nodepass-master"
STATE_VERSION = 1
_TEMP_PREFIX = ".np-state-"
_TEMP_SUFFIX = ".tmp"


class StateError(ValueError):
    """A state file exists but cannot be used."""


def _parse_state(raw: bytes, path: str) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise StateError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        raise StateError(f"{path}: not a nodepass master state file")
    instances = data.get("instances")
    if not isinstance(instances, list) or not all(isinstance(i, dict) for i in instances):
        raise StateError(f"{path}: 'instances' is not a list of objects")
    return data


def encode_state(document: dict[str, Any]) -> str:
    """The state file's text: the document's other keys, then ``instances`` with one instance per
    line, so the file stays readable.  Every part goes through json's C encoder: an indented dump
    takes the pure-Python one, about ten times slower, and a save runs on the reactor (with 1,000
    instances that was 0.1-0.4 s during which no tunnel of the master moved a byte)."""
    head = json.dumps({k: v for k, v in document.items() if k != "instances"}, ensure_ascii=False)
    rows = ",\n".join(json.dumps(item, ensure_ascii=False) for item in document.get("instances", []))
    return head[:-1] + (", " if head != "{}" else "") + '"instances": [\n' + rows + "\n]}\n"


class StateStore(Service):
    """Reads and writes the master state file; see the module docstring.

    *snapshot* returns the JSON-ready state to write (set later with
    :meth:`set_source` when the owner is built after the store).
    """

    name = "state"

    def __init__(
        self,
        state_dir: str,
        *,
        reactor: IReactorTime,
        logger: NodePassLogger,
        settings: Settings,
        snapshot: Callable[[], dict[str, Any]] | None = None,
        debounce: float = 0.1,
    ) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.path = os.path.join(self.state_dir, STATE_FILE)
        self.backup_path = self.path + ".backup"
        self.corrupt_path = self.path + ".corrupt"
        self.reactor = reactor
        self.logger = logger
        self.settings = settings
        self.debounce = debounce
        self._snapshot = snapshot
        self._pending: IDelayedCall | None = None
        self._backup_loop: LoopingCall | None = None
        self.saves = 0

    def set_source(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Use *snapshot* to obtain the state for later saves."""
        self._snapshot = snapshot

    # loading ---------------------------------------------------------------
    def exists(self) -> bool:
        """Whether this master has state of its own here (the main file or its backup)."""
        return os.path.exists(self.path) or os.path.exists(self.backup_path)

    def _read(self, path: str) -> dict[str, Any]:
        with open(path, "rb") as handle:
            return _parse_state(handle.read(), path)

    def _clean_temporaries(self) -> None:
        try:
            names = os.listdir(self.state_dir)
        except OSError:
            return
        for name in names:
            if name.startswith(_TEMP_PREFIX) and name.endswith(_TEMP_SUFFIX):
                try:
                    os.unlink(os.path.join(self.state_dir, name))
                except OSError:
                    pass

    def load(self) -> list[dict[str, Any]] | None:
        """Return the stored instance records, or ``None`` when there is no usable state.

        Falls back to the backup when the main file is missing or corrupt.
        """
        self._clean_temporaries()
        main_error: str | None = None
        if os.path.exists(self.path):
            try:
                data = self._read(self.path)
                self.logger.info("Loaded %d instances from %s", len(data["instances"]), self.path)
                return list(data["instances"])
            except (OSError, StateError) as exc:
                main_error = str(exc)
                self.logger.error("State file unreadable: %s", main_error)
                try:
                    os.replace(self.path, self.corrupt_path)
                    self.logger.error("Corrupt state file kept as %s", self.corrupt_path)
                except OSError:
                    pass
        if not os.path.exists(self.backup_path):
            if main_error is not None:
                self.logger.error(
                    "No state backup at %s: starting with an empty state", self.backup_path
                )
            return None
        try:
            data = self._read(self.backup_path)
        except (OSError, StateError) as exc:
            self.logger.error(
                "State backup unreadable: %s: starting with an empty state", exc
            )
            try:
                os.replace(self.backup_path, self.backup_path + ".corrupt")
                self.logger.error("Corrupt state backup kept as %s", self.backup_path + ".corrupt")
            except OSError:
                pass
            return None
        self.logger.error(
            "State restored from backup %s (%d instances)", self.backup_path, len(data["instances"])
        )
        return list(data["instances"])

    # saving ----------------------------------------------------------------
    def _document(self) -> dict[str, Any] | None:
        if self._snapshot is None:
            return None
        return {"format": STATE_FORMAT, "version": STATE_VERSION, **self._snapshot()}

    def _atomic_write(self, path: str, document: dict[str, Any]) -> None:
        os.makedirs(self.state_dir, exist_ok=True)
        data = encode_state(document).encode("utf-8")
        fd, temp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX, dir=self.state_dir)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temp, 0o600)
            os.replace(temp, path)
        except BaseException:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise
        try:
            dir_fd = os.open(self.state_dir, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)

    def save_now(self) -> bool:
        """Write the state file at once; returns whether it was written (errors are logged)."""
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        document = self._document()
        if document is None:
            return False
        try:
            self._atomic_write(self.path, document)
        except OSError as exc:
            self.logger.error("State save failed: %s: %s", self.path, exc)
            return False
        self.saves += 1
        return True

    def request_save(self) -> None:
        """Save soon; changes arriving before then are written together.

        Before the service starts and after it stopped this does nothing (the
        owner saves explicitly then).
        """
        if not self.running:
            return
        if self._pending is not None and self._pending.active():
            return
        self._pending = self.reactor.callLater(self.debounce, self._debounced)

    def _debounced(self) -> None:
        self._pending = None
        self.save_now()

    def write_backup(self) -> bool:
        """Write the current state to the backup file; returns whether it was written."""
        document = self._document()
        if document is None:
            return False
        try:
            self._atomic_write(self.backup_path, document)
        except OSError as exc:
            self.logger.error("State backup failed: %s: %s", self.backup_path, exc)
            return False
        self.logger.debug("State backup saved: %s", self.backup_path)
        return True

    # service ---------------------------------------------------------------
    def startService(self) -> None:
        """Write a first backup and start the periodic backup."""
        super().startService()  # type: ignore[no-untyped-call]
        self.write_backup()
        if self.settings.reload_interval > 0:
            loop = LoopingCall(self.write_backup)
            loop.clock = self.reactor
            loop.start(self.settings.reload_interval, now=False)
            self._backup_loop = loop

    def stopService(self) -> None:
        """Stop the periodic backup and write the final state (to the main file and the backup).

        The backup gets the final state too, so a main file damaged while the
        master is down falls back to what the master last had, not to the
        state of its previous start.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        if self._backup_loop is not None and self._backup_loop.running:
            self._backup_loop.stop()
        self._backup_loop = None
        if self.save_now():
            self.logger.info("Instances saved: %s", self.path)
            self.write_backup()
