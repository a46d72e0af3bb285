"""Small persisted records of the board's own health, under ``data_dir/health/``.

* :class:`FaultLog` (``faults.json``): the last ``keep`` ``ModelFault``s (integrity,
  load_failed, crash_loop ...), reported in every heartbeat and kept across restarts.
* :class:`BootMarkers` (``boot/{model_key}.json``): crash-loop protection after a commit.
  A marker is written when the agent starts serving a newly committed engine and counts
  the agent restarts that served it since; it is removed once that engine has served for
  ``update.stable_after_s`` in one run. A start that finds it already counted
  ``update.crash_loop_restarts`` restarts falls back to the previous slot
  (:mod:`agent.update.serving`).
* :class:`Counter` (``restarts.json``, ``desired.json``): one persisted number (agent
  starts; the newest DesiredState generation acted on).

Every file is written atomically (:func:`protos.fsutil.write_atomic`); an unreadable file is
logged and treated as empty (a board must keep serving). Used by
:mod:`agent.update.serving`, :mod:`agent.update.manager` and :mod:`agent.app`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from protos.edgefleet.v1 import device_pb2
from protos.fsutil import write_atomic

log = logging.getLogger(__name__)

MAX_FAULTS = 16
_FAULT_FIELDS = ("name", "variant", "version", "revision", "sha256", "reason", "message",
                 "at_ms")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.error("%s unreadable (%s); starting it afresh", path, e)
        return None


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(value, sort_keys=True).encode(), mode=0o600)


class FaultLog:
    """The last ``keep`` faults, oldest first, persisted in ``path``. Thread-safe."""

    def __init__(self, path: Path, *, keep: int = MAX_FAULTS) -> None:
        self.path = path
        self.keep = keep
        self._lock = threading.Lock()
        raw = _read_json(path)
        self._faults: list[dict[str, Any]] = []
        if isinstance(raw, list):
            self._faults = [{k: f[k] for k in _FAULT_FIELDS if k in f}
                            for f in raw if isinstance(f, dict)][-keep:]

    def add(self, *, name: str, variant: str, version: int, revision: int, sha256: str,
            reason: str, message: str) -> device_pb2.ModelFault:
        """Record one fault (persisted before returning) and return it as a ModelFault."""
        fault: dict[str, Any] = {"name": name, "variant": variant, "version": int(version),
                 "revision": int(revision), "sha256": sha256, "reason": reason,
                 "message": message[:500], "at_ms": int(time.time() * 1000)}
        with self._lock:
            self._faults = (self._faults + [fault])[-self.keep:]
            _write_json(self.path, self._faults)
        log.warning("fault recorded: %s%s v%d (revision %d): %s: %s", name,
                    f".{variant}" if variant else "", version, revision, reason, message)
        return device_pb2.ModelFault(**fault)

    def faults(self) -> list[device_pb2.ModelFault]:
        with self._lock:
            items = list(self._faults)
        out = []
        for f in items:
            try:
                out.append(device_pb2.ModelFault(**f))
            except (TypeError, ValueError):  # a damaged entry is not worth a heartbeat
                continue
        return out


@dataclass
class BootMarker:
    """An engine committed recently and the agent restarts that served it since."""

    sha256: str
    update_id: str
    version: int
    revision: int
    restarts: int = 0


class BootMarkers:
    """One :class:`BootMarker` per model key, in ``root/{key}.json``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> BootMarker | None:
        raw = _read_json(self._path(key))
        if not isinstance(raw, dict):
            return None
        try:
            return BootMarker(**raw)
        except TypeError as e:
            log.error("boot marker of %s unreadable (%s); ignoring it", key, e)
            return None

    def put(self, key: str, marker: BootMarker) -> None:
        _write_json(self._path(key), asdict(marker))

    def clear(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def keys(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.json"))


class Counter:
    """One non-negative integer persisted in a JSON file (``{"value": N}``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        raw = _read_json(path)
        value = raw.get("value", 0) if isinstance(raw, dict) else 0
        self.value = value if isinstance(value, int) and value >= 0 else 0

    def set(self, value: int) -> None:
        _write_json(self.path, {"value": int(value)})
        self.value = int(value)

    def increment(self) -> int:
        self.set(self.value + 1)
        return self.value
