"""Taking over the state of a Go NodePass master (``gob/nodepass.gob``).

A Go master keeps its instances in ``<directory of its binary>/gob/nodepass.gob``:
a Go ``encoding/gob`` map from instance id to instance (read with
:mod:`nodepass.master.gob`).  :func:`import_go_state` turns that map into the
instance records this master stores (see
:meth:`~nodepass.master.instances.InstanceRecord.from_state`):

* ids, aliases, types, URLs, ``config`` strings and restart flags as they were;
* ``meta``: the peer (sid, type, alias) and the tags;
* the traffic counters (``tcprx``, ``tcptx``, ``udprx``, ``udptx``) and the
  last run mode; every instance starts ``stopped`` (those with ``restart``
  are started by the master, as the Go master does at boot);
* the API-key instance ``********``: the API key, the master id and the
  master alias, so dashboards keep working with the key they have.

The Go file is only read, never changed, moved or removed.  Every imported
instance is logged at INFO, followed by a summary line.  A file that cannot be
decoded, or that decodes to something other than a Go master's state, gives
one ERROR line and no records.

When the master imports (see :mod:`nodepass.master.service`): only when its
state directory holds no state of its own (``nodepass.json`` or its backup);
then the file named by ``--import-gob``/``NP_IMPORT_GOB`` or, without one, the
first of :data:`GO_STATE_NAMES` found in the state directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from nodepass.log import NodePassLogger
from nodepass.master.gob import GobError, decode_file
from nodepass.master.instances import COUNTERS, PSEUDO_ID
from nodepass.url import URLError, parse_tunnel_url

__all__ = ["GO_STATE_NAMES", "GoStateNotFound", "find_go_state", "resolve_go_state", "go_records", "import_go_state"]

GO_STATE_NAMES = (os.path.join("gob", "nodepass.gob"), "nodepass.gob")
"""Where a Go master's state file is looked for, relative to a directory."""

_ID = re.compile(r"^[0-9a-f]{8}$")


class GoStateNotFound(FileNotFoundError):
    """An explicitly named Go state file (or directory holding one) does not exist."""


def find_go_state(directory: str) -> str | None:
    """The first of :data:`GO_STATE_NAMES` that is a file under *directory*, or ``None``."""
    for name in GO_STATE_NAMES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def resolve_go_state(path: str) -> str:
    """*path* itself if it is a file; a Go state file inside it if it is a directory.

    Raises :class:`GoStateNotFound` otherwise.
    """
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        found = find_go_state(path)
        if found is not None:
            return found
        names = " or ".join(GO_STATE_NAMES)
        raise GoStateNotFound(f"Go state file not found: no {names} in {path}")
    raise GoStateNotFound(f"Go state file not found: {path}")


def _text(item: Mapping[str, Any], name: str) -> str:
    value = item.get(name, "")
    return value if isinstance(value, str) else ""


def _number(item: Mapping[str, Any], name: str) -> int:
    value = item.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return value


def _struct(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _convert(key: Any, item: dict[str, Any]) -> dict[str, Any]:
    """One Go instance (a decoded ``Instance`` struct) as a state record."""
    meta = _struct(item.get("Meta"))
    peer = _struct(meta.get("Peer"))
    tags = _struct(meta.get("Tags"))
    record: dict[str, Any] = {
        "id": _text(item, "ID") or (key if isinstance(key, str) else ""),
        "alias": _text(item, "Alias"),
        "type": _text(item, "Type"),
        "status": "stopped",
        "url": _text(item, "URL"),
        "config": _text(item, "Config"),
        "restart": item.get("Restart") is True,
        "meta": {
            "peer": {"sid": _text(peer, "SID"), "type": _text(peer, "Type"), "alias": _text(peer, "Alias")},
            "tags": {str(k): v for k, v in tags.items() if isinstance(v, str)},
        },
        "mode": _number(item, "Mode"),
    }
    for name in COUNTERS:
        record[name] = _number(item, name.upper())
    return record


def go_records(state: Any) -> list[dict[str, Any]]:
    """Convert a decoded Go master state (map of id → instance) to state records.

    The API-key instance comes first, then the others by id.  Raises
    :class:`GobError` when *state* does not have that shape.
    """
    if not isinstance(state, dict):
        raise GobError(f"not a NodePass master state: the value is a {type(state).__name__}, not a map")
    records = []
    for key, item in state.items():
        if not isinstance(item, dict) or not any(name in item for name in ("ID", "URL", "Config")):
            raise GobError(f"not a NodePass master state: entry {key!r} is not an instance")
        records.append(_convert(key, item))
    records.sort(key=lambda r: (r["id"] != PSEUDO_ID, r["id"]))
    return records


def import_go_state(path: str, logger: NodePassLogger) -> list[dict[str, Any]] | None:
    """Read the Go state file *path*; return its instances as state records.

    Returns ``None`` (after one ERROR line naming the file and the problem)
    when the file cannot be read or decoded.  Instances with an id this
    master cannot serve are skipped with a WARN line; URLs this master
    would refuse are kept (the instance ends in ``error`` when started) and
    reported with a WARN line.
    """
    try:
        records = go_records(decode_file(path))
    except (GobError, OSError) as exc:
        logger.error(
            "Go state file %s not imported: %s; starting without it (the file is left as it is)", path, exc
        )
        backup = path + ".backup"
        if os.path.isfile(backup):
            logger.error("A Go state backup exists: %s (import it with --import-gob or NP_IMPORT_GOB)", backup)
        return None
    imported: list[dict[str, Any]] = []
    key_found = False
    for record in records:
        rid = record["id"]
        if rid == PSEUDO_ID:
            if not record["url"]:
                logger.warn("Go API key instance has no key; a new key is created")
                continue
            key_found = True
            logger.info(
                "Imported API key, master id %s and master alias %r [%s]", record["config"], record["alias"], rid
            )
            imported.append(record)
            continue
        if not _ID.match(rid):
            logger.warn("Skipped Go instance with an id this master cannot serve: %r", rid)
            continue
        try:
            parse_tunnel_url(record["url"])
        except (URLError, ValueError) as exc:
            logger.warn("Imported instance URL will not run here: %s [%s]", exc, rid)
        logger.info(
            "Imported instance: %s %r %s restart=%s tcprx=%d tcptx=%d udprx=%d udptx=%d [%s]",
            record["type"] or "?", record["alias"], record["url"], str(record["restart"]).lower(),
            record["tcprx"], record["tcptx"], record["udprx"], record["udptx"], rid,
        )
        imported.append(record)
    count = sum(1 for r in imported if r["id"] != PSEUDO_ID)
    logger.info(
        "Imported %d instances%s from Go state file %s (left unchanged)",
        count, " and the API key" if key_found else "", path,
    )
    return imported
