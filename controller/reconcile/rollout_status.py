"""The EdgeRollout status: counters, waves, devices, phase, conditions and history.

Built by controller.reconcile.rollouts from the per-device views of the current release
(desired vs observed) and the gate results. Counters count devices of the current release
only, so ``updated/targeted`` never exceeds the fleet; earlier releases are listed in
``history`` (and ``previousVersion`` is what ``edgefleet rollout undo`` goes back to).
Messages say what is true: a paused rollout counts offers in flight apart from devices
that were never offered; the word "rollback" is used only for rollbacks.

Big fleets: the per-device map ``devices`` lists at most :data:`DEVICE_DETAIL_LIMIT`
devices, the ones that need attention first (failed, stalled, in progress, ...; then by id),
and ``deviceDetail`` says how many were left out with exact per-state counts; the counters
are always exact. ``unsupported`` is capped the same way (``unsupportedCount`` exact). So
the status document stays small (the core copies and compares it on every pass) however
many devices the rollout covers.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func
from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import select

from controller.fleet.db import session_scope
from controller.fleet.models import DeviceRollout, ResourcePhase, WaveGate
from controller.reconcile.common import condition
from controller.reconcile.gates import GateResult
from controller.reconcile.spec import RolloutSpec
from controller.reconcile.targets import DeviceView

IN_PROGRESS = {"offered", "downloading", "verifying", "patching", "staged", "activating"}
FAILED = {"failed", "rolled_back"}
MAX_HISTORY = 20
ABORTED = "Aborted"
DEVICE_DETAIL_LIMIT = 200
# which devices the capped ``devices`` map keeps first
_ATTENTION = ["failed", "rolled_back", "stalled", "activating", "staged", "patching",
              "verifying", "downloading", "offered", "backed_out", "pending", "superseded",
              "updated"]


def cap_devices(devices: dict[str, dict[str, Any]], limit: int = DEVICE_DETAIL_LIMIT
                ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The per-device map cut to ``limit`` entries (attention first, then by id) and the
    ``deviceDetail`` summary: total, shown, omitted and exact counts per state."""
    by_state: dict[str, int] = {}
    for v in devices.values():
        st = str(v.get("state") or "")
        by_state[st] = by_state.get(st, 0) + 1
    detail: dict[str, Any] = {"total": len(devices), "limit": limit,
                              "byState": dict(sorted(by_state.items()))}
    if len(devices) <= limit:
        detail.update(shown=len(devices), omitted=0)
        return devices, detail
    rank = {st: i for i, st in enumerate(_ATTENTION)}
    keep = sorted(devices, key=lambda d: (rank.get(str(devices[d].get("state")), -1), d))
    shown = {d: devices[d] for d in sorted(keep[:limit])}
    detail.update(shown=len(shown), omitted=len(devices) - len(shown))
    return shown, detail


def cap_list(items: list[str], limit: int = DEVICE_DETAIL_LIMIT) -> list[str]:
    return items if len(items) <= limit else items[:limit]


def pending_status(spec: RolloutSpec, prev: dict[str, Any], now: int, reason: str, msg: str,
                   *, superseded: dict[str, str] | None = None,
                   unsupported: list[str] | None = None) -> dict[str, Any]:
    """Status of a rollout that cannot ship anything yet (model missing, compiling...)."""
    devices, detail = cap_devices({d: {"state": "superseded", "reason": f"owned by {o}"}
                                   for d, o in sorted((superseded or {}).items())})
    out: dict[str, Any] = {
        "observedGeneration": spec.generation, "phase": ResourcePhase.PENDING.value,
        "message": msg, "targeted": 0, "updated": 0, "failed": 0, "stalled": 0,
        "superseded": len(superseded or {}), "devices": devices, "deviceDetail": detail,
        "unsupported": cap_list(unsupported or []),
        "unsupportedCount": len(unsupported or []), "observedRetry": spec.retry,
        "history": list(prev.get("history") or []),
        "conditions": [condition(prev, "Progressing", False, reason, msg,
                                 generation=spec.generation, now_ms=now)]}
    for k in ("version", "previousVersion", "revision"):
        if k in prev:
            out[k] = prev[k]
    return out


def _history(prev: dict[str, Any], version: int, engine_version: int,
             now: int) -> tuple[list[dict[str, Any]], int | None]:
    hist = [h for h in prev.get("history") or [] if isinstance(h, dict)]
    cur = {"version": version, "engineVersion": engine_version}
    if not hist or {k: hist[-1].get(k) for k in cur} != cur:
        hist.append({**cur, "at": now})
    hist = hist[-MAX_HISTORY:]
    previous = next((int(h["engineVersion"]) for h in reversed(hist[:-1])
                     if int(h.get("engineVersion") or 0) != engine_version), None)
    return hist, previous


def build_status(spec: RolloutSpec, prev: dict[str, Any], now: int, *, rel: Any,
                 views: dict[str, DeviceView], wave_results: dict[int, GateResult],
                 blocked: tuple[int, str] | None, failed_gate: WaveGate | None,
                 superseded: dict[str, str], unsupported: list[str],
                 db: DbEngine,
                 variants: dict[str, dict[str, DeviceView]] | None = None) -> dict[str, Any]:
    vals = list(views.values())
    count = {k: sum(v.state == k for v in vals) for k in
             ("updated", "stalled", "superseded", "backed_out", "pending")}
    failed = sum(v.state in FAILED for v in vals)
    moving = sum(v.state in IN_PROGRESS for v in vals)
    n = len(vals)
    devices: dict[str, dict[str, Any]] = {}
    for d, v in sorted(views.items()):
        wname = spec.waves[v.wave].name if v.wave < len(spec.waves) else str(v.wave)
        devices[d] = v.to_status(wname)
    vviews = [v for per in (variants or {}).values() for v in per.values()]
    for d, per in sorted((variants or {}).items()):
        if d in devices:
            devices[d]["variants"] = {name: v.to_status(devices[d].get("wave", ""))
                                      for name, v in sorted(per.items())}
    for d, owner in sorted(superseded.items()):
        devices[d] = {"state": "superseded", "reason": f"owned by the newer rollout {owner}"}
    devices, detail = cap_devices(devices)
    waves = []
    for wi, w in enumerate(spec.waves):
        wv = [v for v in vals if v.wave == wi]
        entry: dict[str, Any] = {
            "name": w.name, "devices": len(wv),
            "updated": sum(v.state == "updated" for v in wv),
            "failed": sum(v.state in FAILED for v in wv),
            "stalled": sum(v.state == "stalled" for v in wv),
            "committed": sum(v.state == "updated" for v in wv)}
        r = wave_results.get(wi)
        if r is not None:
            entry["gate"] = r.to_status()
        waves.append(entry)
    hist, previous = _history(prev, rel.version, rel.engine_version, now)
    current_wave = spec.waves[blocked[0]].name if blocked else spec.waves[-1].name
    gate_failed = failed_gate is not None
    counts = f"{count['updated']}/{n} updated"
    if failed:
        counts += f", {failed} failed"
    if count["stalled"]:
        counts += f", {count['stalled']} stalled"
    if spec.aborted:
        left = sum(v.state not in ("backed_out", "pending") for v in vals
                   if v.target is not None)
        phase = ABORTED
        message = (f"aborted: {count['backed_out']} device(s) back on their previous engine"
                   + (f", {left} returning" if left else ""))
    elif failed_gate is not None:
        phase = ResourcePhase.PAUSED.value
        acted = "devices returned to the previous engine" if spec.on_failure == "rollback" \
            else "onFailure is pause"
        message = (f"wave {current_wave}: gate failed: {failed_gate.message}; {acted}; "
                   "later waves not offered (edgefleet rollout retry, or apply a new version)")
    elif spec.paused:
        phase = ResourcePhase.PAUSED.value
        waiting = sum(v.state == "pending" for v in vals)
        message = (f"paused at wave {current_wave}: {counts}"
                   + (f", {moving} offer(s) in flight" if moving else "")
                   + (f", {waiting} not offered" if waiting else ""))
    elif blocked is None and any(v.state not in ("updated", "stalled") for v in vviews):
        phase = ResourcePhase.PROGRESSING.value
        busy = sorted({v.device_id for v in vviews if v.state not in ("updated", "stalled")})
        message = (f"all waves passed: {counts}; variants in progress on "
                   f"{', '.join(busy[:5])}{' ...' if len(busy) > 5 else ''}")
        blocked = (len(spec.waves) - 1, message)
    elif blocked is None:
        phase = ResourcePhase.COMPLETE.value
        message = f"all waves passed: {counts}"
    else:
        phase = ResourcePhase.PROGRESSING.value
        message = f"wave {current_wave}: {blocked[1]}"
    complete = phase == ResourcePhase.COMPLETE.value
    gen, pr = spec.generation, prev
    conds = [
        condition(pr, "Progressing", phase == ResourcePhase.PROGRESSING.value,
                  "GateFailed" if gate_failed else
                  ("RolloutComplete" if complete else
                   ("RolloutAborted" if spec.aborted else
                    ("RolloutPaused" if spec.paused else "WaveInProgress"))),
                  message, generation=gen, now_ms=now),
        condition(pr, "Complete", complete, "AllWavesPassed" if complete else "NotYet",
                  message, generation=gen, now_ms=now),
        condition(pr, "Degraded", gate_failed or failed > 0 or count["stalled"] > 0,
                  "GateFailed" if gate_failed else ("DevicesFailed" if failed else
                                                    ("DevicesStalled" if count["stalled"]
                                                     else "AsExpected")),
                  message, generation=gen, now_ms=now),
    ]
    out: dict[str, Any] = {
        "observedGeneration": gen, "phase": phase, "version": rel.version,
        "engineVersion": rel.engine_version, "currentWave": current_wave, "targeted": n,
        "updated": count["updated"], "failed": failed, "stalled": count["stalled"],
        "inProgress": moving, "pending": count["pending"], "backedOut": count["backed_out"],
        "superseded": len(superseded), "bytesSent": sum(v.attempt.bytes_sent for v in vals if v.attempt is not None),
        "bytesSentTotal": _bytes(db, spec.key),
        "devices": devices, "deviceDetail": detail, "waves": waves,
        "unsupported": cap_list(unsupported), "unsupportedCount": len(unsupported),
        "history": hist, "observedRetry": spec.retry, "message": message,
        "variants": {"targeted": len(vviews),
                     "updated": sum(v.state == "updated" for v in vviews),
                     "failed": sum(v.state in FAILED for v in vviews)},
        "conditions": conds}
    if previous is not None:
        out["previousVersion"] = previous
    return out


def _bytes(db: DbEngine, rollout: str) -> int:
    """Every byte this rollout sent (all its offers, every release)."""
    with session_scope(db) as s:
        total = s.exec(select(func.sum(DeviceRollout.bytes_sent)).where(
            DeviceRollout.rollout == rollout)).one()
    return int(total or 0)
