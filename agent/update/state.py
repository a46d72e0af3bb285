"""Persisted update state machine of the agent (one JSON file per model slot key).

:class:`UpdateState` uses the names of ``edgefleet.v1.UpdateState``; every transition goes
through :meth:`StateStore.transition`, which writes the state atomically (temp + fsync +
``os.replace``) and then calls :func:`crash_point` so tests can kill the process right there
(env ``EDGEFLEET_CRASH_AT=staged``, ``staged:before``, ``staged:after`` or ``chunk:N``).
Used by :mod:`agent.update.manager` (transitions) and :mod:`agent.telemetry.heartbeat`
(progress in heartbeats).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from protos.edgefleet.v1 import common_pb2, update_pb2
from protos.fsutil import write_atomic

log = logging.getLogger(__name__)

CRASH_ENV = "EDGEFLEET_CRASH_AT"
MAX_DONE_IDS = 64


class UpdateState(str, Enum):
    """Lifecycle of one update; values are the lower-case proto names."""

    IDLE = "idle"
    RECEIVED = "received"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    PATCHING = "patching"
    STAGED = "staged"
    ACTIVATING = "activating"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"

    @property
    def proto(self) -> common_pb2.UpdateState:
        return common_pb2.UpdateState.Value(f"UPDATE_STATE_{self.name}")  # type: ignore[return-value]

    @property
    def terminal(self) -> bool:
        return self in (UpdateState.IDLE, UpdateState.COMMITTED, UpdateState.ROLLED_BACK,
                        UpdateState.FAILED)


#: allowed transitions (anything may go to FAILED before ACTIVATING, ROLLED_BACK after)
_NEXT: dict[UpdateState, tuple[UpdateState, ...]] = {
    UpdateState.IDLE: (UpdateState.RECEIVED,),
    # RECEIVED -> STAGED: codec "slot" (the engine is already in a slot: nothing to fetch)
    UpdateState.RECEIVED: (UpdateState.DOWNLOADING, UpdateState.STAGED, UpdateState.FAILED),
    UpdateState.DOWNLOADING: (UpdateState.VERIFYING, UpdateState.FAILED),
    UpdateState.VERIFYING: (UpdateState.PATCHING, UpdateState.FAILED),
    UpdateState.PATCHING: (UpdateState.STAGED, UpdateState.FAILED),
    UpdateState.STAGED: (UpdateState.ACTIVATING, UpdateState.FAILED),
    UpdateState.ACTIVATING: (UpdateState.COMMITTED, UpdateState.ROLLED_BACK),
    # COMMITTED -> ROLLED_BACK: a local fallback after the commit (the committed engine failed
    # its integrity check or to load, or crash-looped the agent: agent.update.serving)
    UpdateState.COMMITTED: (UpdateState.RECEIVED, UpdateState.ROLLED_BACK),
    UpdateState.ROLLED_BACK: (UpdateState.RECEIVED,),
    UpdateState.FAILED: (UpdateState.RECEIVED,),
}


class IllegalTransition(RuntimeError):
    """A bug: the manager asked for a transition the state machine does not have."""


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL when env EDGEFLEET_CRASH_AT equals ``name`` (tests)."""
    want = os.environ.get(CRASH_ENV)
    if want and want == name:
        log.warning("crash injection: SIGKILL at %s", name)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class UpdateRecord:
    """One update in progress (or finished) for one model slot key."""

    update_id: str
    model_name: str
    variant: str
    version: int
    revision: int = 0                # anti-rollback revision ((version, revision) only go up)
    engine_version: int = 0          # model version the engine was built for (0 = version)
    state: UpdateState = UpdateState.RECEIVED
    reason: str = ""
    action: str = ""                 # protos.errors.Action value when failed
    envelope_b64: str = ""           # the signed offer as received (re-verified on restart)
    source: str = "offer"            # "offer" | "desired" (envelope = signed DesiredState)
    bytes_received: int = 0
    bytes_total: int = 0
    target_sha256: str = ""
    staged_slot: str = ""
    activation_attempts: int = 0
    stalls: int = 0
    updated_at_ms: int = 0
    probe_b64: str = ""              # serialized ProbeReport after the on-device probe ran
    shadow_b64: str = ""             # serialized ShadowReport once the shadow check decided

    @property
    def envelope(self) -> bytes:
        return base64.b64decode(self.envelope_b64)

    @property
    def pair(self) -> tuple[int, int]:
        """The anti-rollback pair (version, revision)."""
        return (self.version, self.revision)

    @property
    def probe(self) -> update_pb2.ProbeReport | None:
        """The on-device probe report kept with this update (None before it ran)."""
        if not self.probe_b64:
            return None
        try:
            return update_pb2.ProbeReport.FromString(base64.b64decode(self.probe_b64))
        except Exception:  # damaged record: report no probe rather than fail a heartbeat
            return None

    @property
    def shadow(self) -> update_pb2.ShadowReport | None:
        """The shadow check's report (None before it decided, or without a shadow check)."""
        if not self.shadow_b64:
            return None
        try:
            return update_pb2.ShadowReport.FromString(base64.b64decode(self.shadow_b64))
        except Exception:  # damaged record: report none rather than fail a heartbeat
            return None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> UpdateRecord:
        d = dict(d)
        d["state"] = UpdateState(d["state"])
        return cls(**d)


@dataclass
class ModelUpdateState:
    """Everything persisted about updates of one model slot key."""

    key: str
    highest_committed: int = 0
    highest_revision: int = 0      # revision of highest_committed (files without it: 0)
    current: UpdateRecord | None = None
    done_ids: list[str] = field(default_factory=list)  # finished update ids (ignore replays)

    @property
    def highest(self) -> tuple[int, int]:
        """Highest committed (version, revision): offers must be above it."""
        return (self.highest_committed, self.highest_revision)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "highest_committed": self.highest_committed,
                "highest_revision": self.highest_revision,
                "current": self.current.to_json() if self.current else None,
                "done_ids": self.done_ids}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelUpdateState:
        cur = d.get("current")
        return cls(key=d["key"], highest_committed=int(d.get("highest_committed", 0)),
                   highest_revision=int(d.get("highest_revision", 0)),
                   current=UpdateRecord.from_json(cur) if cur else None,
                   done_ids=list(d.get("done_ids", [])))


class StateStore:
    """Reads and atomically writes ``{root}/{key}.json``; the single transition function."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def load_all(self) -> dict[str, ModelUpdateState]:
        out: dict[str, ModelUpdateState] = {}
        for p in sorted(self.root.glob("*.json")):
            try:
                ms = ModelUpdateState.from_json(json.loads(p.read_text()))
            except (OSError, ValueError, KeyError, TypeError) as e:
                # atomic writes make this a bug or disk damage; keep going without it
                log.error("update state %s unreadable (%s); ignoring it", p, e)
                continue
            out[ms.key] = ms
        return out

    def save(self, ms: ModelUpdateState) -> None:
        data = json.dumps(ms.to_json(), sort_keys=True).encode()
        write_atomic(self._path(ms.key), data, mode=0o600)

    def transition(self, ms: ModelUpdateState, state: UpdateState, *, reason: str = "",
                   action: str = "") -> UpdateRecord:
        """Move ``ms.current`` to ``state``, persist, then run the crash injection hook."""
        rec = ms.current
        if rec is None:
            raise IllegalTransition(f"{ms.key}: no update in progress")
        if state not in _NEXT[rec.state] and state != rec.state:
            raise IllegalTransition(f"{ms.key}: {rec.state.value} -> {state.value}")
        crash_point(f"{state.value}:before")
        rec.state = state
        rec.reason = reason
        rec.action = action
        rec.updated_at_ms = int(time.time() * 1000)
        if state.terminal:
            if rec.update_id not in ms.done_ids:
                ms.done_ids = (ms.done_ids + [rec.update_id])[-MAX_DONE_IDS:]
            if state == UpdateState.COMMITTED and rec.pair > ms.highest:
                ms.highest_committed, ms.highest_revision = rec.pair
        self.save(ms)
        log.info("update %s (%s v%d): %s%s", rec.update_id, rec.model_name, rec.version,
                 state.value, f" ({reason})" if reason else "")
        crash_point(state.value)
        crash_point(f"{state.value}:after")
        return rec
