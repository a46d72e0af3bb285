"""EdgeRollout reconcile: a policy that moves desired targets wave by wave.

``reconcile_rollout(resource, ctx)`` is called by ControllerCore's reconcile loop and by
the cluster controller. Everything is derived from the database and recomputed on every
pass (level-triggered), so a restarted controller resumes where it stood without offering
a device twice:

1. the release: the EdgeModel's version and its engines per device class, or with
   ``spec.rollbackTo`` the engines of an earlier version shipped as a new revision;
2. the devices: selector matches, minus those a newer rollout of the same model owns
   (``Superseded``) and those whose class has no engine; each keeps its wave
   (RolloutMember) across versions; a device that appears later joins the newest wave that
   passed its gate for this release (never a failed wave's);
3. the waves in order: a wave whose gate passed (WaveGate row) stays passed; the open
   wave's devices get their DeviceTarget (controller.reconcile.targets) and an offer when
   they do not serve it (controller.reconcile.offering); the gate
   (controller.reconcile.gates) judges installs and serving health; a failed gate backs
   the wave's devices out to their previous engine (``onFailure: rollback``) and pauses;
   later waves are never offered;
4. status: the comparison of desired and observed for the current release only (counters
   never exceed the fleet), history apart; then the devices' DesiredStates and finished
   offers (controller.reconcile.desired).

Cost: a pass reads its rows in a few bulk queries (controller.reconcile.passdata: devices,
members, every target of the model and the offers they reference) and writes only what
changed, so a pass over 10,000 devices with nothing changed runs a few dozen statements;
the status lists at most ``DEVICE_DETAIL_LIMIT`` devices (rollout_status.cap_devices) with
exact counts.
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

from controller.fleet import events
from controller.fleet.db import session_scope
from controller.fleet.models import (
    Device,
    DeviceRolloutState,
    DeviceTarget,
    ModelVersion,
    RolloutMember,
    WaveGate,
)
from controller.ota.keys import KeyStore
from controller.ota.planner import DeltaPlanner
from controller.ota.publisher import Publisher
from controller.reconcile import gates as gating
from controller.reconcile import offering
from controller.reconcile.desired import sync_devices
from controller.reconcile.passdata import PassData, read_devices, read_rows
from controller.reconcile.rollout_status import build_status, pending_status
from controller.reconcile.spec import RolloutSpec, owner_order
from controller.reconcile.targets import DeviceView, reached, served, view
from controller.settings import Settings
from protos.errors import RetryLater

log = logging.getLogger(__name__)


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
    # live EdgeRollout resource dicts (ownership between rollouts of one model)
    list_rollouts: Callable[[], list[dict[str, Any]]] = field(default=lambda: [])
    # (model resource) -> ProbeSpec | None: the on-device accuracy probe shipped with offers
    probe_for: Callable[[dict[str, Any]], Any] | None = None


@dataclass(frozen=True)
class Release:
    """What the rollout ships now."""

    model: str
    version: int                  # anti-rollback major: the EdgeModel's spec.version
    engine_version: int           # the model version whose engines ship (rollbackTo)
    engines: dict[str, dict[str, Any]]   # device class -> engine entry
    variants: dict[str, dict[str, dict[str, Any]]]
    reason: str                   # rollout | undo
    retry: int

    @property
    def key(self) -> str:
        return f"v{self.version}e{self.engine_version}"


def chunk_size_for(spec: RolloutSpec, settings: Settings) -> int:
    """The rollout's ``chunkSizeBytes``, never above the controller's ``chunk_size_bytes``."""
    want = int(spec.chunk_size_bytes or settings.chunk_size_bytes)
    return max(1, min(want, settings.chunk_size_bytes, settings.MAX_CHUNK_SIZE_BYTES))


def select_devices(spec: RolloutSpec, classes: list[str], db: DbEngine) -> list[Device]:
    """Devices matching the selector (fields ANDed), sorted by id."""
    sel = spec.selector
    want_classes = set(sel.device_classes or classes)
    want_ids = set(sel.devices)
    rows = read_devices(db, col(Device.device_class).in_(want_classes))   # read-only rows
    out = [d for d in rows if (not want_ids or d.device_id in want_ids)
           and all(str((d.labels or {}).get(k)) == v for k, v in sel.match_labels.items())]
    return sorted(out, key=lambda d: d.device_id)


def wave_bounds(spec: RolloutSpec, n: int) -> list[int]:
    """Cumulative end index of each wave over ``n`` sorted devices."""
    bounds, prev = [], 0
    for w in spec.waves:
        end = prev + w.count if w.count is not None else math.ceil((w.percent or 100) * n / 100)
        prev = max(prev, min(n, end))
        bounds.append(prev)
    return bounds


def _release(spec: RolloutSpec, model: dict[str, Any], ctx: RolloutContext
             ) -> Release | str:
    """The release to ship, or why there is none yet."""
    mspec, mstatus = model.get("spec") or {}, model.get("status") or {}
    mgen = int((model.get("metadata") or {}).get("generation") or 1)
    version = int(mspec.get("version") or 0)
    if spec.version and spec.version != version:
        return (f"VersionMismatch:EdgeModel {spec.model} is at version {version}, the rollout "
                f"asks for {spec.version}")
    engines = {e["deviceClass"]: e for e in mstatus.get("engines") or [] if e.get("sha256")}
    refused = next((c for c in mstatus.get("conditions") or []
                    if c.get("reason") == "VersionNotIncreasing"), None)
    if refused is not None and mstatus.get("observedGeneration") == mgen:
        return f"ModelVersionRefused:{refused.get('message')}"
    if mstatus.get("observedGeneration") != mgen or not engines:
        return f"WaitingForEngines:EdgeModel {spec.model} has no compiled engines yet"
    variants: dict[str, dict[str, dict[str, Any]]] = {}
    for v in mstatus.get("variants") or []:
        ve = {e["deviceClass"]: e for e in v.get("engines") or [] if e.get("sha256")}
        if v.get("name") and ve:
            variants[str(v["name"])] = ve
    if spec.rollback_to is None or spec.rollback_to == version:
        return Release(spec.model, version, version, engines, variants, "rollout", spec.retry)
    if spec.rollback_to > version:
        return (f"BadRollbackTo:rollbackTo.version {spec.rollback_to} is not older than the "
                f"model's version {version}")
    with session_scope(ctx.db) as s:
        old = s.exec(select(ModelVersion).where(
            ModelVersion.namespace == spec.namespace, ModelVersion.name == spec.model,
            ModelVersion.version == spec.rollback_to)).first()
    if old is None:
        return (f"BadRollbackTo:no engines recorded for {spec.model} version "
                f"{spec.rollback_to}")
    return Release(spec.model, version, spec.rollback_to, dict(old.engines), {}, "undo",
                   spec.retry)


def _newer_rollouts(spec: RolloutSpec, ctx: RolloutContext) -> set[str]:
    """Keys of the live rollouts of the same model that are newer than this one."""
    mine = owner_order(spec)
    out = set()
    for other in ctx.list_rollouts():
        o = RolloutSpec.from_resource(other)
        if (o.namespace, o.model) == (spec.namespace, spec.model) and o.key != spec.key \
                and owner_order(o) > mine:
            out.add(o.key)
    return out


def _superseded(spec: RolloutSpec, devices: dict[str, Device], classes: list[str],
                ctx: RolloutContext) -> dict[str, str]:
    """Device id -> the newer rollout of the same model that owns it."""
    out: dict[str, str] = {}
    mine = owner_order(spec)
    for other in ctx.list_rollouts():
        o = RolloutSpec.from_resource(other)
        if (o.namespace, o.model) != (spec.namespace, spec.model) or o.key == spec.key:
            continue
        if owner_order(o) <= mine:
            continue
        for d in select_devices(o, classes, ctx.db):
            if d.device_id in devices:
                out.setdefault(d.device_id, o.key)
    return out


async def reconcile_rollout(resource: dict[str, Any], ctx: RolloutContext) -> dict[str, Any]:
    """Advance the rollout as far as its gates allow; return its status."""
    spec = RolloutSpec.from_resource(resource)
    prev = resource.get("status") or {}
    now = ctx.now_ms()
    model = ctx.get_model(spec.namespace, spec.model)
    if model is None:
        return pending_status(spec, prev, now, "ModelNotFound",
                              f"EdgeModel {spec.namespace}/{spec.model} does not exist")
    rel = _release(spec, model, ctx)
    if isinstance(rel, str):
        reason, _, msg = rel.partition(":")
        return pending_status(spec, prev, now, reason, msg)
    chunk = chunk_size_for(spec, ctx.settings)
    ctx.publisher.set_rollout_rate(spec.key, spec.max_bytes_per_second, chunk_size=chunk)
    classes = sorted(rel.engines)
    selected = {d.device_id: d for d in select_devices(spec, classes, ctx.db)}
    superseded = _superseded(spec, selected, classes, ctx)
    unsupported = sorted(i for i, d in selected.items() if d.device_class not in rel.engines)
    owned = {i: d for i, d in selected.items() if i not in superseded and i not in unsupported}
    with session_scope(ctx.db) as s:
        gates = {(g.wave): g for g in s.exec(select(WaveGate).where(
            WaveGate.rollout == spec.key, WaveGate.release == _gate_key(spec, rel))).all()
            if g.verdict == "passed" or g.signals.get("retry", 0) == spec.retry}
    members = _members(ctx, spec, owned, gates, now)
    if not owned:
        return pending_status(spec, prev, now, "NoDevices", "no devices match the selector yet"
                              + (f" ({len(superseded)} owned by newer rollouts)"
                                 if superseded else ""),
                              superseded=superseded, unsupported=unsupported)
    deadline = spec.progress_deadline_s
    # the agents' heartbeat interval, as the stale threshold assumes it (3 intervals)
    hb_ms = int(ctx.settings.stale_after_s * 1000 / 3)
    params = offering.OfferParams(
        rollout=spec.key, chunk_size=chunk, max_bytes_per_second=spec.max_bytes_per_second,
        ttl_s=min(ctx.settings.offer_ttl_s, max(deadline * 6, 300)),
        probe=await asyncio.to_thread(_probe, ctx, model) if rel.reason == "rollout" else None)
    active = not spec.paused and not spec.aborted
    pd = await asyncio.to_thread(PassData, ctx.db, rel.model)   # every target, few queries
    views: dict[str, DeviceView] = {}
    wave_results: dict[int, gating.GateResult] = {}
    blocked: tuple[int, str] | None = None          # (wave, why) where the walk stopped
    failed_gate: WaveGate | None = None
    for wi, wave in enumerate(spec.waves):
        wdevs = sorted(d for d, m in members.items() if m.wave == wi)
        g = gates.get(wi)
        if active or g is not None:
            wparams = dataclasses.replace(params, shadow=offering.shadow_spec(wave.gate.shadow))
            await _targets_for(ctx, pd, spec, rel, [owned[d] for d in wdevs], wi, wparams,
                               now, offer=active and (g is None or g.verdict == "passed"))
        for d in wdevs:
            views[d] = _view(pd, spec, rel, d, wi, owned.get(d), now, deadline, hb_ms)
        pd.flush()
        if g is not None and g.verdict == "passed":
            wave_results[wi] = gating.GateResult("passed", g.message, dict(g.signals))
            continue
        if g is not None:                              # failed this round
            wave_results[wi] = gating.GateResult("failed", g.message, dict(g.signals))
            failed_gate, blocked = g, (wi, g.message)
            break
        res = gating.evaluate([views[d] for d in wdevs], wave.gate, wave=wave.name,
                              model=rel.model, version=rel.version, now_ms=now,
                              stats=_stats_fn(ctx))
        wave_results[wi] = res
        if res.verdict == "passed" and not spec.aborted:
            _decide(ctx, spec, rel, wi, res, now)
            continue
        if res.verdict == "failed" and not spec.aborted:
            failed_gate = _decide(ctx, spec, rel, wi, res, now)
            blocked = (wi, res.message)
            break
        if res.wait_ms and ctx.requeue_after is not None:
            ctx.requeue_after(res.wait_ms / 1000)
        blocked = (wi, res.message)
        break
    for d, m in members.items():                      # waves not reached: not offered
        if d not in views:
            views[d] = _view(pd, spec, rel, d, m.wave, owned.get(d), now, deadline, hb_ms,
                             open_=False)
    pd.flush()
    if failed_gate is not None and not failed_gate.acted:
        await _back_out(ctx, pd, spec, rel, failed_gate, members, owned, now)
    if spec.aborted:
        await _abort(ctx, pd, spec, rel, owned, now)
    back = sorted(owned) if spec.aborted else (
        [d for d, m in members.items() if failed_gate is not None and m.wave == failed_gate.wave]
    )
    if back:                        # ship the previous engines (also while paused)
        await _offer_moved_back(ctx, pd, rel, [owned[d] for d in back if d in owned],
                                members, params)
        for d in back:
            if d in members:
                views[d] = _view(pd, spec, rel, d, members[d].wave, owned.get(d), now,
                                 deadline, hb_ms)
        pd.flush()
    if active:
        await _variants(ctx, pd, spec, rel, views, owned, params, now)
    _device_events(ctx, spec, resource, views, superseded, now)
    await sync_devices(db=ctx.db, keys=ctx.keys, publisher=ctx.publisher,
                       device_ids=list(owned), now_ms=ctx.now_ms())
    variants = _variant_views(pd, spec, rel, owned, now, deadline, hb_ms)
    st = build_status(spec, prev, now, rel=rel, views=views, wave_results=wave_results,
                      blocked=blocked, failed_gate=failed_gate, superseded=superseded,
                      unsupported=unsupported, db=ctx.db, variants=variants)
    return st


def _variant_views(pd: PassData, spec: RolloutSpec, rel: Release,
                   owned: dict[str, Device], now: int, deadline: int,
                   hb_ms: int) -> dict[str, dict[str, DeviceView]]:
    """Device id -> variant name -> view, for the release's variant targets."""
    if not rel.variants:
        return {}
    out: dict[str, dict[str, DeviceView]] = {}
    for (dev_id, variant), t in sorted(pd.targets.items()):
        if (not variant or t.rollout != spec.key or t.version != rel.version
                or dev_id not in owned or variant not in rel.variants):
            continue
        out.setdefault(dev_id, {})[variant] = view(
            device_id=dev_id, wave=0, device=owned[dev_id], target=t, attempt=pd.attempt(t),
            model=rel.model, now_ms=now, deadline_s=deadline, heartbeat_ms=hb_ms)
    return out


def _probe(ctx: RolloutContext, model: dict[str, Any]) -> Any:
    if ctx.probe_for is None:
        return None
    try:
        return ctx.probe_for(model)
    except Exception as e:   # a probe must never block a rollout
        log.warning("accuracy probe for %s not built: %s", (model.get("metadata") or {})
                    .get("name"), e)
        return None


def _stats_fn(ctx: RolloutContext) -> gating.StatsFn | None:
    try:
        from controller.fleet import windows
    except ImportError:
        return None

    def stats(model: str, version: int, ids: list[str], since: int, until: int | None) -> Any:
        return windows.window_stats(ctx.db, model=model, version=version, device_ids=ids,
                                    since_ms=since, until_ms=until)
    return stats


def _members(ctx: RolloutContext, spec: RolloutSpec, owned: dict[str, Device],
             gates: dict[int, WaveGate], now: int) -> dict[str, RolloutMember]:
    """Wave of every owned device; new devices get one (initial split, or a late join)."""
    plan = ",".join(f"{w.count}/{w.percent}" for w in spec.waves)
    rows: list[Any] = read_rows(ctx.db, RolloutMember, RolloutMember.rollout == spec.key,
                                fields=("device_id", "wave", "plan"))
    have: dict[str, Any] = {m.device_id: m for m in rows}
    if any(m.plan != plan for m in rows):          # the waves changed: split again
        with session_scope(ctx.db) as s:
            for m in s.exec(select(RolloutMember).where(RolloutMember.rollout == spec.key)):
                s.delete(m)
        have = {}
    new = [d for d in sorted(owned) if d not in have]
    if new:
        with session_scope(ctx.db) as s:
            if not have:
                bounds = wave_bounds(spec, len(new))
                for pos, d in enumerate(new):
                    w = next((i for i, b in enumerate(bounds) if pos < b), len(bounds) - 1)
                    have[d] = RolloutMember(rollout=spec.key, device_id=d, wave=w,
                                            joined_ms=now, plan=plan)
                    s.add(have[d])
            else:
                passed = [w for w, g in gates.items() if g.verdict == "passed"]
                failed = [w for w, g in gates.items() if g.verdict != "passed"]
                w = max(passed) if passed and not failed else len(spec.waves) - 1
                for d in new:
                    have[d] = RolloutMember(rollout=spec.key, device_id=d, wave=w,
                                            joined_ms=now, late=True, plan=plan)
                    s.add(have[d])
                log.info("rollout %s: %d late device(s) join wave %s", spec.key, len(new),
                         spec.waves[min(w, len(spec.waves) - 1)].name)
    return {d: m for d, m in have.items() if d in owned}


def _new_pair(t: DeviceTarget | None, dev: Device, model: str, variant: str,
              version: int) -> tuple[int, int]:
    srv = served(dev, model, variant)
    base = max((t.version, t.revision) if t is not None else (0, 0), srv.pair)
    return (version, 0) if version > base[0] else (base[0], base[1] + 1)


async def _targets_for(ctx: RolloutContext, pd: PassData, spec: RolloutSpec, rel: Release,
                       devs: list[Device], wave: int, params: offering.OfferParams,
                       now: int, *, offer: bool) -> None:
    """Set the release's target on each device of an open wave and offer what is missing."""
    todo: list[tuple[DeviceTarget, Device]] = []
    newer = _newer_rollouts(spec, ctx)       # listed now: one may have appeared this pass
    with session_scope(ctx.db) as s:         # written to only for targets that change
        for dev in devs:
            eng = rel.engines.get(dev.device_class)
            if eng is None:
                continue
            t = pd.target(dev.device_id)
            if t is not None and t.rollout in newer:
                continue                       # a newer rollout owns it now
            t = _want(s, pd, t, dev, rel, spec, str(eng["sha256"]), now)
            if t is not None:
                pd.put_target(t)
                todo.append((t, dev))
    if not offer:
        return
    for t, dev in todo:
        try:
            await _offer_if_needed(ctx, pd, t, dev, params, wave=wave)
        except RetryLater as e:
            log.info("offer to %s deferred: %s", dev.device_id, e)
            return


def _want(s: Any, pd: PassData, t: DeviceTarget | None, dev: Device, rel: Release,
          spec: RolloutSpec, sha: str, now: int) -> DeviceTarget | None:
    """The device's target for this release (created or moved as the policy says)."""
    ev = rel.engine_version
    if t is not None and t.rollout == spec.key and t.version == rel.version:
        if t.reason in ("backout", "abort"):
            if (t.reason == "abort" and not spec.aborted) or spec.retry > t.retry:
                pass                                   # resumed / retried: ship again
            else:
                return t
        elif t.target_sha256 == sha and (t.engine_version or t.version) == ev:
            if spec.retry > t.retry:                   # retry: re-offer a failed attempt
                t.retry, t.progress_ms = spec.retry, now
                a = pd.attempt(t)
                if a is not None and a.state in (DeviceRolloutState.FAILED,
                                                 DeviceRolloutState.ROLLED_BACK):
                    t.update_id = ""
                s.add(t)
            return t
    if (t is not None and t.rollout != spec.key and t.version == rel.version
            and t.target_sha256 == sha and t.reason == "rollout"):
        t.rollout = spec.key                           # a newer rollout takes it over
        s.add(t)
        return t
    if t is not None and t.version > rel.version:
        return None                                    # someone shipped a newer version
    srv = served(dev, rel.model)
    keep_prev = t is not None and t.rollout == spec.key and t.version == rel.version
    if t is None:
        t = DeviceTarget(device_id=dev.device_id, model_name=rel.model, variant="")
    version, revision = _new_pair(t if t.id is not None else None, dev, rel.model, "",
                                  rel.version)
    if not keep_prev:
        t.prev_since_ms = (t.reached_ms or 0) if (
            t.id is not None and t.target_sha256 == srv.sha256) else 0
        # prev_version is the version label the device reports (its metrics windows are
        # keyed by it: the latency gate's baseline); prev_engine_version the engine's own
        t.prev_sha256, t.prev_version = srv.sha256, srv.version
        t.prev_revision, t.prev_engine_version = srv.revision, srv.engine_version or srv.version
    t.version, t.revision, t.engine_version = version, revision, ev
    t.target_sha256, t.rollout, t.reason = sha, spec.key, rel.reason
    t.set_ms = t.progress_ms = now
    t.reached_ms, t.update_id, t.retry = None, "", spec.retry
    s.add(t)
    s.flush()
    return t


async def _offer_if_needed(ctx: RolloutContext, pd: PassData, t: DeviceTarget, dev: Device,
                           params: offering.OfferParams, *, wave: int) -> None:
    srv = served(dev, t.model_name, t.variant)
    if srv.sha256 == t.target_sha256 and srv.pair == (t.version, t.revision):
        return
    a = pd.attempt(t)
    now = ctx.now_ms()
    if a is not None and a.state == DeviceRolloutState.OFFERED and a.offered_ms and (
            now > a.offered_ms + params.ttl_s * 1000):
        a = None                                       # expired: offer again, fresh expiry
    elif a is not None and a.state not in (DeviceRolloutState.PENDING,
                                           DeviceRolloutState.CANCELLED):
        return
    try:
        pd.put_attempt(await offering.offer(ctx, t, dev, params, wave=wave))
    except RetryLater:
        raise
    except Exception as e:
        log.exception("offer to device %s failed", dev.device_id)
        events.emit(ctx.db, kind="Device", name=dev.device_id, reason=events.UPDATE_FAILED,
                    type_="Warning", message=f"offer of {t.model_name} v{t.version} could not "
                                             f"be built: {e}", now_ms=now)


def _view(pd: PassData, spec: RolloutSpec, rel: Release, dev_id: str, wave: int,
          dev: Device | None, now: int, deadline: int, hb_ms: int, *,
          open_: bool = True) -> DeviceView:
    """The device's view; a changed ``reached_ms`` is marked for ``pd.flush()``."""
    t = pd.target(dev_id)
    if t is not None and (t.rollout != spec.key or t.version != rel.version
                          or not open_ and t.reason == "rollout"
                          and (t.engine_version or t.version) != rel.engine_version):
        t = None
    if t is not None:
        v = view(device_id=dev_id, wave=wave, device=dev, target=t, attempt=pd.attempt(t),
                 model=rel.model, now_ms=now, deadline_s=deadline, heartbeat_ms=hb_ms)
        if v.state in ("updated", "backed_out") and not t.reached_ms:
            t.reached_ms = now
            pd.mark(t)
            v.reached_ms = now
        elif v.state not in ("updated", "backed_out") and t.reached_ms:
            t.reached_ms = None
            pd.mark(t)
        return v
    return view(device_id=dev_id, wave=wave, device=dev, target=None, attempt=None,
                model=rel.model, now_ms=now, deadline_s=deadline, heartbeat_ms=hb_ms)


def _gate_key(spec: RolloutSpec, rel: Release) -> str:
    """Gate decisions hold for one release under one wave plan (changed waves: decide again)."""
    plan = ",".join(f"{w.count}/{w.percent}" for w in spec.waves)
    return f"{rel.key}:{plan}"


def _decide(ctx: RolloutContext, spec: RolloutSpec, rel: Release, wave: int,
            res: gating.GateResult, now: int) -> WaveGate:
    """Persist a gate decision (once per release, wave and retry round) with an Event."""
    name = spec.waves[wave].name
    with session_scope(ctx.db) as s:
        g = s.exec(select(WaveGate).where(WaveGate.rollout == spec.key,
                                          WaveGate.release == _gate_key(spec, rel),
                                          WaveGate.wave == wave)).first()
        g = g or WaveGate(rollout=spec.key, release=_gate_key(spec, rel), wave=wave)
        g.verdict, g.message, g.decided_ms = res.verdict, res.message, now
        g.signals, g.acted = {**res.signals, "retry": spec.retry}, res.verdict == "passed"
        s.add(g)
    failed = res.verdict == "failed"
    events.emit(ctx.db, kind="EdgeRollout", name=spec.key,
                reason=events.GATE_FAILED if failed else events.GATE_PASSED,
                type_="Warning" if failed else "Normal", now_ms=now,
                message=f"wave {name} of v{rel.version}: {res.message}")
    return g


async def _back_out(ctx: RolloutContext, pd: PassData, spec: RolloutSpec, rel: Release,
                    g: WaveGate, members: dict[str, RolloutMember], owned: dict[str, Device],
                    now: int) -> None:
    """A failed gate: the wave's devices return to their previous engine (onFailure
    rollback) as a higher revision; then the decision is marked acted on."""
    wave_devs = [d for d, m in members.items() if m.wave == g.wave and d in owned]
    n = 0
    if spec.on_failure == "rollback":
        n = _move_back(ctx, pd, spec, rel, wave_devs, owned, now, reason="backout")
    with session_scope(ctx.db) as s:
        fresh = s.get(WaveGate, g.id)
        if fresh is not None:
            fresh.acted = True
            s.add(fresh)
    g.acted = True
    if n:
        events.emit(ctx.db, kind="EdgeRollout", name=spec.key, reason=events.ROLLED_BACK,
                    type_="Warning", now_ms=now,
                    message=f"wave {spec.waves[g.wave].name}: {n} device(s) return to their "
                            f"previous engine after the gate failed ({g.message}); the "
                            "remaining waves are not offered")


async def _offer_moved_back(ctx: RolloutContext, pd: PassData, rel: Release,
                            devs: list[Device], members: dict[str, RolloutMember],
                            params: offering.OfferParams) -> None:
    """Offer the previous engine to devices whose target was moved back (no probe)."""
    back = dataclasses.replace(params, probe=None)
    for dev in devs:
        t = pd.target(dev.device_id)
        if t is None or t.reason not in ("backout", "abort"):
            continue
        try:
            await _offer_if_needed(ctx, pd, t, dev, back, wave=members[dev.device_id].wave)
        except RetryLater as e:
            log.info("offer of the previous engine to %s deferred: %s", dev.device_id, e)
            return


async def _abort(ctx: RolloutContext, pd: PassData, spec: RolloutSpec, rel: Release,
                 owned: dict[str, Device], now: int) -> None:
    n = _move_back(ctx, pd, spec, rel, sorted(owned), owned, now, reason="abort")
    if n:
        events.emit(ctx.db, kind="EdgeRollout", name=spec.key, reason=events.ROLLED_BACK,
                    type_="Warning", now_ms=now,
                    message=f"aborted: {n} device(s) return to their previous engine")


def _move_back(ctx: RolloutContext, pd: PassData, spec: RolloutSpec, rel: Release,
               devs: list[str], owned: dict[str, Device], now: int, *, reason: str) -> int:
    """Targets of ``devs`` set by this release go back to the previous engine."""
    n = 0
    with session_scope(ctx.db) as s:
        for d in devs:
            t = pd.target(d)
            if (t is None or t.rollout != spec.key or t.reason in ("backout", "abort")
                    or t.version != rel.version or not t.prev_sha256):
                continue
            srv = served(owned.get(d), rel.model)
            a = pd.attempt(t)
            offered = a is not None and a.state not in (DeviceRolloutState.PENDING,
                                                         DeviceRolloutState.CANCELLED)
            if t.target_sha256 == t.prev_sha256 and reached(t, srv):
                t.reason = reason                     # already on the previous engine
            elif srv.sha256 == t.prev_sha256 and not offered:   # never left it: no bytes
                t.version, t.revision = srv.pair
                t.engine_version = srv.engine_version or srv.version
            else:
                base = max((t.version, t.revision), srv.pair)
                t.version, t.revision = base[0], base[1] + 1
                t.engine_version = t.prev_engine_version or t.prev_version
            if t.reason == reason:
                s.add(t)
                n += 1
                continue
            t.target_sha256, t.reason, t.retry = t.prev_sha256, reason, spec.retry
            t.set_ms = t.progress_ms = now
            t.reached_ms, t.update_id = None, ""
            s.add(t)
            n += 1
    return n


async def _variants(ctx: RolloutContext, pd: PassData, spec: RolloutSpec, rel: Release,
                    views: dict[str, DeviceView], owned: dict[str, Device],
                    params: offering.OfferParams, now: int) -> None:
    """Lighter variants (EdgeModel spec.variants), for devices that run the main engine."""
    for dev_id, v in views.items():
        dev = owned.get(dev_id)
        if v.state != "updated" or dev is None:
            continue
        for vname, engines in sorted(rel.variants.items()):
            eng = engines.get(dev.device_class)
            if eng is None:
                continue
            t = pd.target(dev_id, vname)
            if t is None or t.version < rel.version or t.target_sha256 != eng["sha256"]:
                pair = _new_pair(t, dev, rel.model, vname, rel.version)
                t = t or DeviceTarget(device_id=dev_id, model_name=rel.model, variant=vname)
                t.version, t.revision = pair
                t.engine_version, t.target_sha256 = rel.engine_version, str(eng["sha256"])
                t.rollout, t.reason, t.set_ms, t.progress_ms = spec.key, "rollout", now, now
                t.update_id, t.reached_ms = "", None
                with session_scope(ctx.db) as s:
                    s.add(t)
                pd.put_target(t)
            try:
                await _offer_if_needed(ctx, pd, t, dev, params, wave=v.wave)
            except RetryLater as e:
                log.info("variant offer to %s deferred: %s", dev_id, e)
                return


# rollout uid -> device -> state of the last pass: the status lists only some devices of a
# big fleet (rollout_status.cap_devices); after a restart the status is the memory
_LAST_STATES: dict[str, dict[str, str]] = {}
_MAX_REMEMBERED = 256


def _device_events(ctx: RolloutContext, spec: RolloutSpec, resource: dict[str, Any],
                   views: dict[str, DeviceView], superseded: dict[str, str], now: int) -> None:
    """Events on per-device transitions seen against the previous pass."""
    uid = str((resource.get("metadata") or {}).get("uid") or spec.key)
    before = _LAST_STATES.get(uid)
    if before is None:
        before = {d: str(v.get("state") or "") for d, v in
                  ((resource.get("status") or {}).get("devices") or {}).items()
                  if isinstance(v, dict)}
    _LAST_STATES.pop(uid, None)
    while len(_LAST_STATES) >= _MAX_REMEMBERED:
        _LAST_STATES.pop(next(iter(_LAST_STATES)))
    _LAST_STATES[uid] = {**{d: v.state for d, v in views.items()},
                         **{d: "superseded" for d in superseded}}
    for d, owner in superseded.items():
        if before.get(d) != "superseded":
            events.emit(ctx.db, kind="EdgeRollout", name=spec.key, reason=events.SUPERSEDED,
                        now_ms=now, message=f"device {d} is now owned by the newer rollout "
                                            f"{owner}")
    for d, v in views.items():
        old = before.get(d)
        if v.state == old:
            continue
        if v.state == "stalled":
            events.emit(ctx.db, kind="EdgeRollout", name=spec.key, reason=events.STALLED,
                        type_="Warning", now_ms=now, message=f"device {d}: {v.reason}")
        elif v.state in ("failed", "rolled_back"):
            events.emit(ctx.db, kind="EdgeRollout", name=spec.key, reason=events.UPDATE_FAILED,
                        type_="Warning", now_ms=now, message=f"device {d}: {v.state}: "
                                                             f"{v.reason}"[:500])

