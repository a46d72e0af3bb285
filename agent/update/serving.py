"""What the board serves from its slots, and the local fallbacks that keep it serving.

:class:`Serving` activates slot engines in the registry (``ModelRegistry.activate``: load
beside, warm up, smoke check, atomic swap) and remembers which slot engine is loaded per
model key (``loaded``: heartbeats report its revision, engine_version and update id).
It falls back to the previous engine (the other slot, with a lower (version, revision))
when the committed one

* fails its sha256 check or fails to load at startup (:meth:`load_committed`, reasons
  ``integrity`` / ``load_failed``),
* is found damaged by the periodic integrity check while running (:meth:`check_integrity`,
  every ``update.integrity_check_s``; the swap is atomic, no request is dropped),
* crash-loops the agent: a boot marker (:class:`agent.update.health.BootMarkers`) counts the
  starts that served a newly committed engine until it has served ``update.stable_after_s``;
  at ``update.crash_loop_restarts`` starts the next start falls back (``crash_loop``).

Each fallback is recorded in the fault log and reported to the update manager
(``on_fallback``), which marks the update that installed the failed engine ROLLED_BACK.
Created and called by :class:`agent.update.manager.UpdateManager` (worker thread, and at
startup before connecting).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from agent.config import UpdateConfig
from agent.update.health import BootMarker, BootMarkers, FaultLog
from agent.update.slots import SlotInfo, SlotStore
from protos.errors import EdgefleetError

log = logging.getLogger(__name__)

OnFallback = Callable[[SlotInfo, str, str], None]   # (failed engine, reason, message)


class Serving:
    """Slot engines in the registry, with integrity and crash-loop fallbacks."""

    def __init__(self, cfg: UpdateConfig, *, registry: Any, slots: SlotStore,
                 faults: FaultLog, markers: BootMarkers, on_fallback: OnFallback,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.registry = registry
        self.slots = slots
        self.faults = faults
        self.markers = markers
        self._on_fallback = on_fallback
        self._clock = clock
        self.loaded: dict[str, SlotInfo] = {}      # model key -> slot engine in the registry
        self._since: dict[str, float] = {}         # key -> when this process began serving
        self._reported: set[tuple[str, str]] = set()  # (key, sha256) damaged, no fallback
        self._next_check = clock() + cfg.integrity_check_s

    # ---- activation -----------------------------------------------------------------------
    def activate(self, info: SlotInfo, *, warmup_inputs: Any = None) -> None:
        """Load ``info``'s engine and swap it in (raises EdgefleetError; old one serves).
        ``warmup_inputs``: real inputs for the warm-up (the update's first probe sample)."""
        extra = {"warmup_inputs": warmup_inputs} if warmup_inputs is not None else {}
        self.registry.activate(name=info.name, version=info.version,
                               path=self.slots.engine_path(info), sha256=info.sha256,
                               fingerprint=info.fingerprint, signature=info.signature,
                               variant=info.variant, **extra)
        self.loaded[info.key] = info

    def relabel(self, info: SlotInfo, *, warmup_inputs: Any = None) -> bool:
        """Serve ``info`` (a relabelled slot whose engine is loaded): True when the registry
        needed a reload for the new version label (the registry has no relabel: the same
        file is activated again, swapped atomically like any activation)."""
        cur = self.loaded.get(info.key)
        if cur is not None and cur.sha256 == info.sha256 and cur.version == info.version:
            self.loaded[info.key] = info
            return False
        self.activate(info, warmup_inputs=warmup_inputs)
        return True

    def mark_committed(self, info: SlotInfo, *, previous_sha256: str) -> None:
        """A commit of ``info``: a new engine starts its crash-loop watch (boot marker)."""
        marker = self.markers.get(info.key)
        if info.sha256 == previous_sha256:  # relabel of the engine already serving
            if marker is not None and marker.sha256 == info.sha256:
                marker.update_id, marker.version, marker.revision = (
                    info.update_id, info.version, info.revision)
                self.markers.put(info.key, marker)
            return
        self.markers.put(info.key, BootMarker(sha256=info.sha256, update_id=info.update_id,
                                              version=info.version, revision=info.revision))
        self._since[info.key] = self._clock()

    # ---- startup --------------------------------------------------------------------------
    def load_committed(self) -> list[SlotInfo]:
        """Activate the committed engine of every model, falling back to the previous one
        when it is damaged, does not load or crash-loops (before connecting)."""
        loaded = []
        for key in self.slots.keys():
            active = self.slots.active(key)
            if active is None:
                continue
            problem = self._count_start(active)
            if problem is None:
                problem = self._try(active)
                if problem is None:
                    if self.markers.get(key) is not None:
                        self._since[key] = self._clock()
                    loaded.append(active)
                    continue
            reason, message = problem
            self.faults.add(name=active.name, variant=active.variant, version=active.version,
                            revision=active.revision, sha256=active.sha256, reason=reason,
                            message=message)
            used = self._fall_back(active, reason, message)
            if used is None and reason == "crash_loop" and self._try(active) is None:
                log.error("model %s: crash loop on v%d but no previous engine; serving it",
                          key, active.version)
                used = active
            if used is not None:
                loaded.append(used)
        return loaded

    def _count_start(self, active: SlotInfo) -> tuple[str, str] | None:
        """Count this restart in the boot marker of ``active``; a crash loop when it has
        already counted ``crash_loop_restarts`` restarts."""
        marker = self.markers.get(active.key)
        if marker is None:
            return None
        if marker.sha256 != active.sha256:
            self.markers.clear(active.key)  # left by an engine that is no longer committed
            return None
        if marker.restarts >= self.cfg.crash_loop_restarts:
            self.markers.clear(active.key)
            return ("crash_loop", f"the agent restarted {marker.restarts} time(s) serving "
                    f"{active.update_id or active.sha256[:12]} since its commit and never "
                    f"ran {self.cfg.stable_after_s:g}s")
        marker.restarts += 1
        self.markers.put(active.key, marker)
        return None

    def _try(self, info: SlotInfo) -> tuple[str, str] | None:
        """Activate ``info``; (reason, message) when it is damaged or does not load."""
        if not self.slots.check(info):
            return ("integrity", f"engine file of slot {info.key}/{info.slot} is missing or "
                    f"its sha256 differs from {info.sha256[:12]}")
        try:
            self.activate(info)
        except EdgefleetError as e:
            return ("load_failed", f"{e.reason}: {e}")
        except Exception as e:  # a loader bug must not keep the board from serving
            log.exception("slot %s/%s: activation raised", info.key, info.slot)
            return ("load_failed", repr(e))
        return None

    def _fall_back(self, failed: SlotInfo, reason: str, message: str) -> SlotInfo | None:
        """Activate and commit the previous engine of ``failed.key``; None when there is
        none or it fails too (then the fault says so)."""
        other = self.slots.other(failed.key)
        if other is None or other.pair >= failed.pair:
            log.error("model %s: %s on v%d and no previous engine to fall back to",
                      failed.key, reason, failed.version)
            return None
        problem = self._try(other)
        if problem is not None:
            self.faults.add(name=other.name, variant=other.variant, version=other.version,
                            revision=other.revision, sha256=other.sha256, reason=problem[0],
                            message=f"fallback engine: {problem[1]}")
            return None
        self.slots.commit(other)
        self.markers.clear(failed.key)
        self._since.pop(failed.key, None)
        log.warning("model %s: %s on v%d (revision %d); fell back to slot %s v%d",
                    failed.key, reason, failed.version, failed.revision, other.slot,
                    other.version)
        self._on_fallback(failed, reason, message)
        return other

    # ---- while running (worker thread) ----------------------------------------------------
    def tick(self) -> None:
        """Clear boot markers of engines that served long enough; run the integrity check
        when due."""
        now = self._clock()
        for key, since in list(self._since.items()):
            if now - since >= self.cfg.stable_after_s:
                self.markers.clear(key)
                del self._since[key]
                log.info("model %s: stable after %.0fs; crash-loop watch ended", key,
                         now - since)
        if self.cfg.integrity_check_s > 0 and now >= self._next_check:
            self._next_check = now + self.cfg.integrity_check_s
            self.check_integrity()

    def check_integrity(self) -> None:
        """Re-hash every loaded active engine file; fall back from a damaged one."""
        for key, info in list(self.loaded.items()):
            active = self.slots.active(key)
            if active is None or active.sha256 != info.sha256 or self.slots.check(active):
                continue
            if (key, active.sha256) in self._reported:
                continue
            message = (f"engine file of slot {key}/{active.slot} no longer has sha256 "
                       f"{active.sha256[:12]} (checked while serving)")
            self.faults.add(name=active.name, variant=active.variant, version=active.version,
                            revision=active.revision, sha256=active.sha256,
                            reason="integrity", message=message)
            if self._fall_back(active, "integrity", message) is None:
                self._reported.add((key, active.sha256))
                log.error("model %s: keeps serving the engine loaded in memory", key)
