"""Offers: carry the bytes of a DeviceTarget to its device.

Called by controller.reconcile.rollouts for every target of the open waves that the
device does not serve yet and that has no live offer. The payload is the smallest way from
the engine the device serves to the target: codec ``slot`` (no bytes) when the target
engine is already in one of the device's A/B slots (an identical-bytes version bump, a
back-out or undo to the previous engine), else the planner's delta or full engine. The
manifest (controller.ota.offers) binds version, revision, engine version and the optional
on-device accuracy probe; it is signed and published retained on the device's per-model
offer topic. The DeviceRollout row (keyed by update id) is the offer's record: the ingest
moves its state, the publisher answers chunk requests from it; it is history, never a
status. Devices sharing a base share the planned payload (planner.known_payload), its chunk
hashes (offers.chunk_hashes) and the engine row (OfferParams.engines, per pass), so only
the first offer of a pass plans or hashes anything.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import select

from controller.fleet.db import session_scope
from controller.fleet.models import (
    Device,
    DeviceRollout,
    DeviceRolloutState,
    DeviceTarget,
    Engine,
)
from controller.ota import offers
from controller.ota.publisher import OfferInfo
from controller.reconcile.desired import model_key, note_offer_in
from controller.reconcile.targets import in_slots, served
from protos.edgefleet.v1 import update_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfferParams:
    rollout: str                # namespace/name of the rollout making the offer
    chunk_size: int
    max_bytes_per_second: int
    ttl_s: int
    probe: update_pb2.ProbeSpec | None = None
    shadow: update_pb2.ShadowSpec | None = None
    # engine sha256 -> (fingerprint, signature) of its Engine row, read once per pass
    engines: dict[str, tuple[dict[str, Any], dict[str, Any]]] = field(
        default_factory=dict, compare=False, repr=False)


def shadow_spec(gate_shadow: dict[str, Any] | None) -> update_pb2.ShadowSpec | None:
    """The manifest's ShadowSpec from a wave's ``healthGate.shadow`` (CRD defaults)."""
    if not gate_shadow:
        return None
    g = gate_shadow
    return update_pb2.ShadowSpec(
        seconds=int(g.get("seconds", 60)), min_samples=int(g.get("minSamples", 50)),
        sample_percent=int(g.get("samplePercent", 20)),
        max_cpu_percent=int(g.get("maxCpuPercent", 25)),
        min_agreement=float(g.get("minAgreement", 0.99)),
        max_latency_ratio=float(g.get("maxLatencyRatio", 0)))


def attempt_of(s: Any, t: DeviceTarget) -> DeviceRollout | None:
    if not t.update_id:
        return None
    return s.exec(select(DeviceRollout).where(DeviceRollout.update_id == t.update_id,
                                              DeviceRollout.device_id == t.device_id)).first()


async def offer(ctx: Any, t: DeviceTarget, dev: Device, p: OfferParams, *,
                wave: int) -> DeviceRollout | None:
    """Plan, sign, record and publish the offer for target ``t``; returns its row (None
    when the target changed or changed owner while the payload was planned)."""
    target = t.target_sha256
    if target not in p.engines:
        with session_scope(ctx.db) as s:
            erow = s.exec(select(Engine).where(Engine.engine_sha256 == target)).first()
        p.engines[target] = (dict(erow.fingerprint) if erow else {},
                             dict(erow.signature) if erow else {})
    fp, sig = p.engines[target]
    cur = served(dev, t.model_name, t.variant)
    if in_slots(dev, target):
        payload = offers.slot_payload(target)
    else:      # devices sharing a base share the payload: planned (in a thread) once
        payload = ctx.planner.known_payload(base_sha256=cur.sha256, target_sha256=target) \
            or await asyncio.to_thread(ctx.planner.payload_for, base_sha256=cur.sha256,
                                       target_sha256=target)
    update_id = offers.make_update_id(p.rollout, dev.device_id, t.version, payload.sha256,
                                      p.chunk_size, variant=t.variant, revision=t.revision,
                                      target_sha256=target, round_=t.retry)
    kw: dict[str, Any] = dict(
        update_id=update_id, device_id=dev.device_id,
        device_class=dev.device_class, model_name=t.model_name, version=t.version,
        target_sha256=target, target_size=ctx.planner.store.size(target), payload=payload,
        chunk_size=p.chunk_size, ttl_s=p.ttl_s, fingerprint=fp, signature=sig,
        rollout=p.rollout, variant=t.variant, revision=t.revision,
        engine_version=t.engine_version,
        probe=p.probe if not t.variant and t.reason in ("rollout", "undo") else None)
    if offers.hashes_known(payload.path, p.chunk_size):    # the chunk hashes are cached
        manifest = offers.build_manifest(**kw)
    else:                                                   # hashing the payload: a thread
        manifest = await asyncio.to_thread(offers.build_manifest, **kw)
    if p.shadow is not None and not t.variant and t.reason == "rollout" and cur.sha256:
        manifest.shadow.CopyFrom(p.shadow)      # compared with the engine it serves now
    env = ctx.keys.sign(manifest)
    now = ctx.now_ms()
    with session_scope(ctx.db) as s:
        # no await from here to the publish: a pass of another rollout (which may have taken
        # this device over while the payload was planned) cannot interleave
        fresh_t = s.get(DeviceTarget, t.id)
        if fresh_t is None or (fresh_t.rollout, fresh_t.target_sha256, fresh_t.version,
                               fresh_t.revision) != (p.rollout, t.target_sha256, t.version,
                                                     t.revision):
            log.info("offer of %s v%d to %s dropped: its target changed meanwhile "
                     "(now owned by %s)", t.model_name, t.version, dev.device_id,
                     fresh_t.rollout if fresh_t is not None else "nobody")
            return None
        row = s.exec(select(DeviceRollout).where(DeviceRollout.update_id == update_id,
                                                 DeviceRollout.device_id == dev.device_id)
                     ).first()
        if row is None:
            row = DeviceRollout(rollout=p.rollout, device_id=dev.device_id,
                                model_name=t.model_name, variant=t.variant, wave=wave,
                                version=t.version, revision=t.revision,
                                engine_version=t.engine_version, update_id=update_id)
        # the row first: a restarted publisher rebuilds the offer (chunk size, cap) from it
        row.target_sha256, row.base_sha256 = target, payload.base_sha256
        row.codec, row.payload_size, row.chunk_size = payload.codec, payload.size, p.chunk_size
        row.max_bytes_per_second, row.updated_ms = p.max_bytes_per_second, now
        if row.state in (DeviceRolloutState.PENDING, DeviceRolloutState.CANCELLED):
            row.state, row.reason = DeviceRolloutState.PENDING, ""
        s.add(row)
        fresh = s.get(DeviceTarget, t.id)
        if fresh is not None:
            fresh.update_id, fresh.progress_ms = update_id, now
            s.add(fresh)
        t.update_id, t.progress_ms = update_id, now
    key = model_key(t.model_name, t.variant)
    info = OfferInfo(update_id, dev.device_id, payload.path or ctx.planner.store.path(target),
                     payload.size, p.chunk_size, rollout=p.rollout,
                     max_bytes_per_second=p.max_bytes_per_second)
    await ctx.publisher.publish_offer(dev.device_id, env, info, model_key=key)
    with session_scope(ctx.db) as s:
        note_offer_in(s, dev.device_id, update_id, key=key)
        fresh_row = s.exec(select(DeviceRollout).where(
            DeviceRollout.update_id == update_id,
            DeviceRollout.device_id == dev.device_id)).one()
        if fresh_row.state == DeviceRolloutState.PENDING:   # the device may have moved on
            fresh_row.state = DeviceRolloutState.OFFERED
        fresh_row.offered_ms = ctx.now_ms()
        s.add(fresh_row)          # the session does not expire it on commit
    log.info("offered %s v%d%s to %s: %s %d bytes (update %s, %s)", key, t.version,
             f"r{t.revision}" if t.revision else "", dev.device_id, payload.codec,
             payload.size, update_id, t.reason)
    return fresh_row
