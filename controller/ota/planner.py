"""Delta planning: which bytes a device downloads to go from its base engine to the target.

Called by the rollout reconciler (in a worker thread: codecs are CPU-bound) for each
device it offers. Per (base sha256, target sha256) the planner asks ``protos.codecs.plan``
for the smallest encoding (bsdiff4, tensor-xor, or full), stores the delta in the artifact
store and caches the choice in the ``Delta`` table, so devices sharing a base share the
delta and a restart plans nothing twice. No base, an unknown base, or no delta worth it:
the full engine is the payload.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import select

from controller.fleet.db import session_scope
from controller.fleet.models import Delta
from controller.ota.offers import Payload
from controller.store import ArtifactStore

log = logging.getLogger(__name__)


class DeltaPlanner:
    """Plans and caches payloads; ``enabled=False`` always ships full engines."""

    def __init__(self, store: ArtifactStore, engine: Engine, *, enabled: bool = True) -> None:
        self.store = store
        self.engine = engine
        self.enabled = enabled
        self._lock = threading.Lock()   # one plan at a time: bounded memory (bsdiff ~17x input)
        # (base as asked, target) -> payload planned in this process: offering 1,000 devices
        # one delta reads the Delta table once
        self._known: dict[tuple[str, str], Payload] = {}

    def known_payload(self, *, base_sha256: str, target_sha256: str) -> Payload | None:
        """The payload already planned for (base, target) in this process, else None (a
        file check only: callable on the event loop)."""
        p = self._known.get((base_sha256, target_sha256)) if self.enabled else None
        if p is not None and (p.path is None or p.path.exists()):
            return p
        return None

    def full(self, target_sha256: str) -> Payload:
        return Payload("full", "", target_sha256, self.store.size(target_sha256),
                       self.store.path(target_sha256))

    def payload_for(self, *, base_sha256: str, target_sha256: str) -> Payload:
        """The payload to go from ``base_sha256`` ("" = nothing) to ``target_sha256``."""
        if not self.enabled:
            return self.full(target_sha256)
        base = base_sha256 if (base_sha256 and base_sha256 != target_sha256
                               and self.store.has(base_sha256)) else ""
        cached = self._cached(base, target_sha256)
        if cached is None:
            with self._lock:
                cached = self._cached(base, target_sha256) or self._plan(base, target_sha256)
        if base == base_sha256 or not base_sha256 or base_sha256 == target_sha256:
            self._known[(base_sha256, target_sha256)] = cached     # not for an unknown base
        return cached

    def _cached(self, base: str, target: str) -> Payload | None:
        with session_scope(self.engine) as s:
            row = s.exec(select(Delta).where(Delta.base_sha256 == base,
                                             Delta.target_sha256 == target)).first()
        if row is None or not self.store.has(row.payload_sha256):
            return None
        return Payload(row.codec, base if row.codec != "full" else "", row.payload_sha256,
                       row.payload_size, self.store.path(row.payload_sha256))

    def _plan(self, base: str, target: str) -> Payload:
        try:
            from protos import codecs  # type: ignore[attr-defined]
        except ImportError:
            log.info("protos.codecs is not available; shipping full engines")
            return self.full(target)
        with tempfile.TemporaryDirectory(dir=self.store.root / "tmp") as tmp:
            try:
                choice = codecs.plan(self.store.path(base) if base else None,
                                     self.store.path(target), Path(tmp))
            except Exception as e:  # a codec failing must not stop the rollout
                log.warning("delta plan %s..->%s.. failed, shipping full: %s",
                            base[:12], target[:12], e)
                return self.full(target)
            codec = str(choice.codec)
            candidates = dict(getattr(choice, "candidates", {}) or {})
            if choice.size >= self.store.size(target) and codec == "full":
                payload = self.full(target)     # compression did not help: raw engine
            else:
                stored = self.store.put_file(Path(choice.path), kind="delta",
                                             meta={"codec": codec, "base": base,
                                                   "target": target})
                payload = Payload(codec, base if codec != "full" else "", stored.sha256,
                                  stored.size, stored.path)
        with session_scope(self.engine) as s:
            s.add(Delta(base_sha256=base, target_sha256=target, codec=payload.codec,
                        payload_sha256=payload.sha256, payload_size=payload.size,
                        candidates=_jsonable(candidates), created_ms=int(time.time() * 1000)))
        log.info("payload %s..->%s..: %s, %d bytes (target %d)", base[:12] or "none",
                 target[:12], payload.codec, payload.size, self.store.size(target))
        return payload


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[str(k)] = {str(a): (b if isinstance(b, (int, float, str, bool)) or b is None
                                    else str(b)) for a, b in v.items()}
        else:
            out[str(k)] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out
