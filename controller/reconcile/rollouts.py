"""EdgeRollout reconcile: ship one EdgeModel version to selected devices, wave by wave.

``reconcile_rollout(resource, ctx)`` is called by ControllerCore's reconcile loop and by
controller.crd.source. Everything is derived from the database, so it is level-triggered
and a restart resumes where it stood without offering a device twice:

1. select devices (Device table) by ``spec.selector`` (deviceClasses, devices,
   matchLabels; empty = every device of the model's target classes with an engine);
2. assign each new device a wave (``count`` or cumulative ``percent``), as a
   DeviceRollout row keyed by (rollout, device, version);
3. walk the waves in order: offer the open wave's pending devices (delta planned by
   controller.ota.planner, manifest by controller.ota.offers, signed, published retained by
   controller.ota.publisher); a wave passes its health gate when minSuccessPercent of its
   devices committed, at most maxFailed failed, and soakSeconds passed since its last
   commit; a gate that can no longer pass fails the rollout and stops it;
4. lighter variants (EdgeModel ``spec.variants``, compiled per class in
   ``status.variants``): once a device committed the main engine, each variant with an
   engine for its class is offered to it as its own update (manifest ``variant`` set, the
   model's version, its own DeviceRollout row with ``variant``), one update in flight per
   device at a time because a device has one retained offer topic. Variants do not take
   part in the health gates; the rollout is Complete once they are finished too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import col, select

from controller.fleet.db import session_scope
from controller.fleet.models import (
    Device,
    DeviceRollout,
    DeviceRolloutState,
    Engine,
    ResourcePhase,
)
from controller.ota import offers
from controller.ota.keys import KeyStore
from controller.ota.planner import DeltaPlanner
from controller.ota.publisher import OfferInfo, Publisher
from controller.reconcile.common import condition, meta
from controller.reconcile.desired import note_offer, sync_devices
from controller.settings import Settings
from protos.errors import RetryLater

log = logging.getLogger(__name__)
FAILED_STATES = {DeviceRolloutState.FAILED, DeviceRolloutState.ROLLED_BACK}
FINISHED_STATES = FAILED_STATES | {DeviceRolloutState.COMMITTED}


@dataclass
class RolloutContext:
    """What reconcile_rollout needs; built once by its caller."""

    db: DbEngine
    settings: Settings
    planner: DeltaPlanner
    keys: KeyStore
    publisher: Publisher
    # the EdgeModel resource dict (with status) by (namespace, name), or None
    get_model: Callable[[str, str], dict[str, Any] | None]
    now_ms: Callable[[], int] = field(default=lambda: int(time.time() * 1000))
    # ask the caller to reconcile again after this many seconds (a soak ends); level-
    # triggered, so the timer only kicks the loop. None: the caller's periodic resync only
    requeue_after: Callable[[float], None] | None = None


def chunk_size_for(spec: dict[str, Any], settings: Settings) -> int:
    """The rollout's ``chunkSizeBytes``, never above the controller's ``chunk_size_bytes``."""
    want = int(spec.get("chunkSizeBytes") or settings.chunk_size_bytes)
    return max(1, min(want, settings.chunk_size_bytes, settings.MAX_CHUNK_SIZE_BYTES))


def _served_sha(device: Device, model_name: str, variant: str = "") -> str:
    """sha256 of the engine the device has loaded for (model, variant); "" when none.

    ``active`` is not required: while the thermal policy serves a variant, the main engine
    is loaded but not active, and it is still what the device has installed."""
    for m in device.models or []:
        if m.get("name") == model_name and str(m.get("variant") or "") == variant:
            return str(m.get("sha256") or "")
    return ""


def select_devices(spec: dict[str, Any], classes: list[str], db: DbEngine) -> list[Device]:
    """Devices matching the selector (fields ANDed), sorted by id."""
    sel = spec.get("selector") or {}
    want_classes = set(sel.get("deviceClasses") or classes)
    want_ids = set(sel.get("devices") or [])
    labels = sel.get("matchLabels") or {}
    with session_scope(db) as s:
        rows = s.exec(select(Device).where(col(Device.device_class).in_(want_classes))).all()
    out = []
    for d in rows:
        if want_ids and d.device_id not in want_ids:
            continue
        if any(str((d.labels or {}).get(k)) != str(v) for k, v in labels.items()):
            continue
        out.append(d)
    return sorted(out, key=lambda d: d.device_id)


def wave_bounds(waves: list[dict[str, Any]], n: int) -> list[int]:
    """Cumulative end index of each wave over ``n`` sorted devices."""
    bounds, prev = [], 0
    for w in waves:
        if "count" in w:
            end = prev + int(w["count"])
        else:
            end = math.ceil(int(w.get("percent", 100)) * n / 100)
        prev = max(prev, min(n, end))
        bounds.append(prev)
    return bounds


async def reconcile_rollout(resource: dict[str, Any], ctx: RolloutContext) -> dict[str, Any]:
    """Advance the rollout as far as the gates allow; return its status."""
    ns, name, gen = meta(resource)
    key = f"{ns}/{name}"
    spec = resource.get("spec") or {}
    prev = resource.get("status") or {}
    now = ctx.now_ms()
    waves = list(spec.get("waves") or [{"name": "all", "percent": 100}])

    def pending(reason: str, msg: str, **extra: Any) -> dict[str, Any]:
        return {"observedGeneration": gen, "phase": ResourcePhase.PENDING.value,
                "message": msg, **extra, "conditions": [
                    condition(prev, "Progressing", False, reason, msg, generation=gen,
                              now_ms=now)]}

    model = ctx.get_model(ns, str(spec.get("model", "")))
    if model is None:
        return pending("ModelNotFound", f"EdgeModel {ns}/{spec.get('model')} does not exist")
    mstatus = model.get("status") or {}
    mgen = int((model.get("metadata") or {}).get("generation") or 1)
    version = int((model.get("spec") or {}).get("version") or 0)
    if spec.get("version") and int(spec["version"]) != version:
        return pending("VersionMismatch", f"EdgeModel {spec['model']} is at version {version}, "
                                          f"the rollout asks for {spec['version']}")
    engines = {e["deviceClass"]: e for e in mstatus.get("engines") or []}
    if mstatus.get("observedGeneration") != mgen or not engines:
        return pending("WaitingForEngines",
                       f"EdgeModel {spec['model']} has no compiled engines yet", version=version)
    model_name = str(spec["model"])
    chunk = chunk_size_for(spec, ctx.settings)
    rate = int(spec.get("maxBytesPerSecond") or 0)
    ctx.publisher.set_rollout_rate(key, rate, chunk_size=chunk)

    # 1-2. select devices, create rows for new ones
    devices = {d.device_id: d for d in
               select_devices(spec, list(engines), ctx.db)}
    unsupported = sorted(i for i, d in devices.items() if d.device_class not in engines)
    targets = [i for i in sorted(devices) if i not in unsupported]
    bounds = wave_bounds(waves, len(targets))
    with session_scope(ctx.db) as s:
        rows = {r.device_id: r for r in s.exec(select(DeviceRollout).where(
            DeviceRollout.rollout == key, DeviceRollout.version == version,
            DeviceRollout.variant == "")).all()}
        _restart_cancelled(s, rows.values(), now)
        current = _first_open_wave(rows, waves, now) if rows else 0
        for pos, dev_id in enumerate(targets):
            if dev_id in rows:
                continue
            w = next((i for i, b in enumerate(bounds) if pos < b), None)
            if w is None:
                continue
            row = DeviceRollout(rollout=key, device_id=dev_id, model_name=model_name,
                                wave=max(w, current), version=version,
                                target_sha256=engines[devices[dev_id].device_class]["sha256"],
                                updated_ms=now)
            s.add(row)
            rows[dev_id] = row

    if not rows:
        return pending("NoDevices", "no devices match the selector yet", version=version,
                       targeted=0, updated=0, failed=0, bytesSent=0, devices={},
                       unsupported=unsupported)

    # 3. walk the waves
    paused = bool(spec.get("paused"))
    phase, message, current_wave, blocked = ResourcePhase.COMPLETE.value, "", "", False
    offer = _OfferParams(key=key, version=version, model_name=model_name, chunk_size=chunk,
                         max_bytes_per_second=rate)
    for wi, wave in enumerate(waves):
        wrows = [r for r in rows.values() if r.wave == wi]
        gate = {"minSuccessPercent": 100, "soakSeconds": 0, "maxFailed": 0,
                **(wave.get("healthGate") or {})}
        if not paused:
            await _offer_pending(ctx, wrows, devices, engines, offer)
        verdict, why, wait_ms = _gate(wrows, gate, now)
        if verdict == "passed":
            continue
        if wait_ms and ctx.requeue_after is not None:
            ctx.requeue_after(wait_ms / 1000)   # the soak ends: look again then
        current_wave = str(wave.get("name", wi))
        if verdict == "failed":
            phase, message = ResourcePhase.FAILED.value, f"wave {current_wave}: {why}"
        else:
            phase = ResourcePhase.PAUSED.value if paused else ResourcePhase.PROGRESSING.value
            message = f"wave {current_wave}: {why}"
        blocked = True
        break
    # 4. lighter variants, for the devices that committed the main engine
    vrows = await _sync_variants(ctx, rows, devices, _variant_engines(mstatus), offer,
                                 paused=paused)
    if not blocked:
        current_wave = str(waves[-1].get("name", "")) if waves else ""
        message = f"all {len(rows)} devices updated"
        open_v = sorted({r.device_id for r in vrows if r.state not in FINISHED_STATES})
        if open_v:
            phase = ResourcePhase.PAUSED.value if paused else ResourcePhase.PROGRESSING.value
            message = (f"all {len(rows)} devices updated; variants in progress on "
                       f"{', '.join(open_v[:5])}{' ...' if len(open_v) > 5 else ''}")

    # retained per-device state: DesiredState when it changed, finished offers cleared
    await sync_devices(db=ctx.db, keys=ctx.keys, publisher=ctx.publisher,
                       device_ids=rows.keys(), now_ms=ctx.now_ms())
    return _status(rows, waves, gen=gen, prev=prev, now=now, phase=phase, message=message,
                   current_wave=current_wave, version=version, unsupported=unsupported,
                   variant_rows=vrows)


def _restart_cancelled(s: Any, rows: Any, now: int) -> None:
    """Rows cancelled when a rollout of this name was deleted start over (re-applied)."""
    for r in rows:
        if r.state == DeviceRolloutState.CANCELLED:
            r.state, r.reason, r.updated_ms = DeviceRolloutState.PENDING, "rollout re-applied", now
            s.add(r)


def _first_open_wave(rows: dict[str, DeviceRollout], waves: list[dict[str, Any]],
                     now: int) -> int:
    for wi, wave in enumerate(waves):
        wrows = [r for r in rows.values() if r.wave == wi]
        gate = {"minSuccessPercent": 100, "soakSeconds": 0, "maxFailed": 0,
                **(wave.get("healthGate") or {})}
        if _gate(wrows, gate, now)[0] != "passed":
            return wi
    return max(0, len(waves) - 1)


def _gate(rows: list[DeviceRollout], gate: dict[str, Any],
          now: int) -> tuple[str, str, int]:
    """("passed" | "waiting" | "failed", why, ms until the soak ends (0 = not soaking))."""
    n = len(rows)
    if n == 0:
        return "passed", "no devices", 0
    ok = sum(r.state == DeviceRolloutState.COMMITTED for r in rows)
    bad = sum(r.state in FAILED_STATES for r in rows)
    open_ = n - ok - bad
    need = float(gate["minSuccessPercent"])
    if bad > int(gate["maxFailed"]):
        return "failed", f"{bad} device(s) failed, maxFailed is {gate['maxFailed']}", 0
    if (ok + open_) * 100.0 / n < need:
        return "failed", (f"{ok}/{n} committed can no longer reach minSuccessPercent "
                          f"{gate['minSuccessPercent']}"), 0
    if open_:
        return "waiting", f"{ok}/{n} committed, {open_} in progress", 0
    if ok * 100.0 / n < need:
        return "failed", f"{ok}/{n} committed, below minSuccessPercent {need:g}", 0
    last = max((r.updated_ms for r in rows if r.state == DeviceRolloutState.COMMITTED),
               default=0)
    soak_ms = int(gate["soakSeconds"]) * 1000
    if now < last + soak_ms:
        return ("waiting", f"soaking for {(last + soak_ms - now) // 1000 + 1}s",
                last + soak_ms - now)
    return "passed", "gate passed", 0


@dataclass(frozen=True)
class _OfferParams:
    key: str                   # namespace/name of the rollout
    version: int
    model_name: str
    chunk_size: int
    max_bytes_per_second: int
    variant: str = ""          # "" = the main engine


async def _offer_pending(ctx: RolloutContext, rows: list[DeviceRollout],
                         devices: dict[str, Device], engines: dict[str, dict[str, Any]],
                         p: _OfferParams) -> None:
    now = ctx.now_ms()
    for row in rows:
        # expire offers nobody acted on; a later reconcile re-offers with a fresh expiry
        if (row.state == DeviceRolloutState.OFFERED and row.offered_ms
                and now > row.offered_ms + ctx.settings.offer_ttl_s * 1000):
            _save(ctx, row, state=DeviceRolloutState.PENDING, reason="offer expired")
        if row.state != DeviceRolloutState.PENDING:
            continue
        dev = devices.get(row.device_id)
        if dev is None:
            continue            # no longer selected: leave it pending
        served = _served_sha(dev, p.model_name, p.variant)
        if served == row.target_sha256:
            _save(ctx, row, state=DeviceRolloutState.COMMITTED, reason="already serving target")
            continue
        eng = engines.get(dev.device_class)
        if eng is None:
            continue
        try:
            await _offer_one(ctx, row, dev, eng, p, base=served)
        except RetryLater as e:
            log.info("offer to %s deferred: %s", row.device_id, e)
            return
        except Exception as e:
            log.exception("offer to device %s failed", row.device_id)
            _save(ctx, row, state=DeviceRolloutState.FAILED, reason=f"offer failed: {e}")


async def _offer_one(ctx: RolloutContext, row: DeviceRollout, dev: Device,
                     eng: dict[str, Any], p: _OfferParams, *, base: str) -> None:
    target = str(eng["sha256"])
    with session_scope(ctx.db) as s:
        erow = s.exec(select(Engine).where(Engine.engine_sha256 == target)).first()
    fp = dict(erow.fingerprint) if erow else {}
    sig = dict(erow.signature) if erow else {}
    payload = await asyncio.to_thread(ctx.planner.payload_for, base_sha256=base,
                                      target_sha256=target)
    chunk = p.chunk_size
    update_id = offers.make_update_id(p.key, dev.device_id, p.version, payload.sha256,
                                      chunk, variant=p.variant)
    manifest = await asyncio.to_thread(
        offers.build_manifest, update_id=update_id, device_id=dev.device_id,
        device_class=dev.device_class, model_name=p.model_name, version=p.version,
        target_sha256=target, target_size=ctx.planner.store.size(target), payload=payload,
        chunk_size=chunk, ttl_s=ctx.settings.offer_ttl_s, fingerprint=fp, signature=sig,
        rollout=p.key, variant=p.variant)
    env = ctx.keys.sign(manifest)
    info = OfferInfo(update_id, dev.device_id, payload.path, payload.size, chunk,
                     rollout=p.key, max_bytes_per_second=p.max_bytes_per_second)
    # the row first: a restarted publisher rebuilds the offer (chunk size, cap) from it
    _save(ctx, row, update_id=update_id, chunk_size=chunk,
          max_bytes_per_second=p.max_bytes_per_second, target_sha256=target,
          base_sha256=payload.base_sha256, codec=payload.codec, payload_size=payload.size)
    await ctx.publisher.publish_offer(dev.device_id, env, info)
    note_offer(ctx.db, dev.device_id, update_id)
    _save(ctx, row, state=DeviceRolloutState.OFFERED, reason="", offered_ms=ctx.now_ms())
    log.info("offered %s%s v%d to %s: %s %d bytes, %d-byte chunks (update %s)", p.model_name,
             f" variant {p.variant}" if p.variant else "", p.version, dev.device_id,
             payload.codec, payload.size, chunk, update_id)


def _variant_engines(mstatus: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """{variant name: {device class: engine entry}} from the EdgeModel status."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for v in mstatus.get("variants") or []:
        engines = {e["deviceClass"]: e for e in v.get("engines") or [] if e.get("sha256")}
        if v.get("name") and engines:
            out[str(v["name"])] = engines
    return out


IN_FLIGHT_STATES = {DeviceRolloutState.OFFERED, DeviceRolloutState.DOWNLOADING,
                    DeviceRolloutState.VERIFYING, DeviceRolloutState.PATCHING,
                    DeviceRolloutState.STAGED, DeviceRolloutState.ACTIVATING}


async def _sync_variants(ctx: RolloutContext, rows: dict[str, DeviceRollout],
                         devices: dict[str, Device],
                         variant_engines: dict[str, dict[str, dict[str, Any]]],
                         p: _OfferParams, *, paused: bool) -> list[DeviceRollout]:
    """Create and offer the variant rows of devices that committed the main engine; returns
    every variant row of this rollout version."""
    now = ctx.now_ms()
    with session_scope(ctx.db) as s:
        have = {(r.device_id, r.variant): r for r in s.exec(select(DeviceRollout).where(
            DeviceRollout.rollout == p.key, DeviceRollout.version == p.version,
            DeviceRollout.variant != "")).all()}
        _restart_cancelled(s, have.values(), now)
        for dev_id, main in rows.items():
            dev = devices.get(dev_id)
            if main.state != DeviceRolloutState.COMMITTED or dev is None:
                continue
            for vname, engines in sorted(variant_engines.items()):
                eng = engines.get(dev.device_class)
                if eng is None or (dev_id, vname) in have:
                    continue
                row = DeviceRollout(rollout=p.key, device_id=dev_id, model_name=p.model_name,
                                    variant=vname, wave=main.wave, version=p.version,
                                    target_sha256=str(eng["sha256"]), updated_ms=now)
                s.add(row)
                have[(dev_id, vname)] = row
    if paused:
        return list(have.values())
    by_dev: dict[str, list[DeviceRollout]] = {}
    for (dev_id, _v), row in sorted(have.items()):
        by_dev.setdefault(dev_id, []).append(row)
    for dev_id, vrows in by_dev.items():
        dev = devices.get(dev_id)
        if dev is None:
            continue
        # one update in flight per device: the device has one retained offer topic
        busy = [r for r in vrows if r.state in IN_FLIGHT_STATES]
        todo = busy or [r for r in vrows if r.state == DeviceRolloutState.PENDING][:1]
        for row in todo:
            engines = variant_engines.get(row.variant, {})
            await _offer_pending(ctx, [row], devices, engines,
                                 dataclasses.replace(p, variant=row.variant))
    return list(have.values())


def _save(ctx: RolloutContext, row: DeviceRollout, **changes: Any) -> None:
    """Write changes to the row, re-reading it so concurrent ingest updates are kept."""
    with session_scope(ctx.db) as s:
        fresh = s.get(DeviceRollout, row.id)
        if fresh is None:
            return
        if changes.get("state") == DeviceRolloutState.OFFERED and fresh.state != row.state:
            changes.pop("state")   # the device already moved on
        for k, v in changes.items():
            setattr(fresh, k, v)
        fresh.updated_ms = ctx.now_ms()
        s.add(fresh)
    for k, v in changes.items():
        setattr(row, k, v)
    row.updated_ms = fresh.updated_ms


def _state_text(r: DeviceRollout) -> str:
    return str(r.state.value if hasattr(r.state, "value") else r.state)


def _status(rows: dict[str, DeviceRollout], waves: list[dict[str, Any]], *, gen: int,
            prev: dict[str, Any], now: int, phase: str, message: str, current_wave: str,
            version: int, unsupported: list[str],
            variant_rows: list[DeviceRollout] | None = None) -> dict[str, Any]:
    vals = list(rows.values())
    vrows = sorted(variant_rows or [], key=lambda r: (r.device_id, r.variant))
    updated = sum(r.state == DeviceRolloutState.COMMITTED for r in vals)
    failed = sum(r.state in FAILED_STATES for r in vals)
    devices: dict[str, dict[str, Any]] = {r.device_id: {"state": r.state.value if hasattr(r.state, "value") else r.state,
                             "wave": str(waves[r.wave].get("name", r.wave))
                             if r.wave < len(waves) else str(r.wave),
                             "reason": r.reason, "bytesSent": r.bytes_sent,
                             "codec": r.codec, "payloadSize": r.payload_size,
                             "updateId": r.update_id}
               for r in sorted(vals, key=lambda r: r.device_id)}
    for r in vrows:
        if r.device_id in devices:
            devices[r.device_id].setdefault("variants", {})[r.variant] = {
                "state": _state_text(r), "reason": r.reason, "bytesSent": r.bytes_sent,
                "codec": r.codec, "payloadSize": r.payload_size, "updateId": r.update_id}
    wave_status = []
    for wi, w in enumerate(waves):
        wr = [r for r in vals if r.wave == wi]
        wave_status.append({"name": str(w.get("name", wi)), "devices": len(wr),
                            "committed": sum(r.state == DeviceRolloutState.COMMITTED for r in wr),
                            "failed": sum(r.state in FAILED_STATES for r in wr)})
    complete = phase == ResourcePhase.COMPLETE.value
    is_failed = phase == ResourcePhase.FAILED.value
    conds = [
        condition(prev, "Progressing", phase == ResourcePhase.PROGRESSING.value,
                  "WaveInProgress" if not (complete or is_failed) else
                  ("RolloutComplete" if complete else "HealthGateFailed"), message,
                  generation=gen, now_ms=now),
        condition(prev, "Complete", complete, "AllDevicesUpdated" if complete else "NotYet",
                  message, generation=gen, now_ms=now),
        condition(prev, "Degraded", is_failed or failed > 0,
                  "HealthGateFailed" if is_failed else ("DevicesFailed" if failed else
                                                        "AsExpected"),
                  message, generation=gen, now_ms=now),
    ]
    return {"observedGeneration": gen, "phase": phase, "version": version,
            "currentWave": current_wave, "targeted": len(vals), "updated": updated,
            "failed": failed, "bytesSent": sum(r.bytes_sent for r in [*vals, *vrows]),
            "variants": {
                "targeted": len(vrows),
                "updated": sum(r.state == DeviceRolloutState.COMMITTED for r in vrows),
                "failed": sum(r.state in FAILED_STATES for r in vrows)},
            "devices": devices, "waves": wave_status, "unsupported": unsupported,
            "message": message, "conditions": conds}
