"""What happens when an EdgeRollout or EdgeModel is deleted (the finalizer's work).

Called in both modes with the resource dict of the deleted object:

* embedded: ControllerCore's reconcile loop runs ``finalize_*`` for Resource rows whose
  ``deleted_ms`` is set, then removes the row (a crash in between just finalizes again);
* cluster: controller.cluster wires them into ``LoopReconciler(finalizers=...)``;
  controller.crd.source calls them before removing the ``edgefleet.io/cleanup`` finalizer.

``finalize_rollout`` stops offering: every DeviceRollout row of the rollout that is not
finished is marked ``cancelled``; the publisher forgets the rollout's offers (later
ChunkRequests for its update ids are refused with a log line) and drops its rate lane;
the targets it set are removed where the device had not reached them yet (kept, without an
owner, where it had); ``sync_devices`` republishes each affected device's DesiredState
without the withdrawn target and clears its retained per-model offer. Devices that
committed keep serving what they serve: deleting a rollout never uninstalls a model from a
board (their DesiredState still names the model).

``finalize_model`` keeps the model's engines as rows of the engine cache (content-addressed;
re-applying the same model reuses them) and reports the rollouts that reference it: they
are requeued and report ``ModelNotFound`` in their status; retained offers of those
rollouts are left alone (delete the rollout to stop them).

Both are idempotent (a finalizer may run twice after a crash) and write an Event. A
RetryLater (MQTT not connected, an offer not cleared) makes the caller try again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import col, select

from controller.fleet.db import session_scope
from controller.fleet.models import (
    Device,
    DeviceDesired,
    DeviceOffer,
    DeviceRollout,
    DeviceRolloutState,
    DeviceTarget,
    Event,
    RolloutMember,
    WaveGate,
)
from controller.ota.keys import KeyStore
from controller.ota.publisher import Publisher
from controller.reconcile.common import meta
from controller.reconcile.desired import sync_devices
from controller.reconcile.targets import reached, served
from protos.errors import RetryLater

KEEP_STATES = {DeviceRolloutState.COMMITTED, DeviceRolloutState.FAILED,
               DeviceRolloutState.ROLLED_BACK, DeviceRolloutState.CANCELLED}


@dataclass
class CleanupContext:
    """What the finalizers need; built by their caller (core or cluster)."""

    db: DbEngine
    keys: KeyStore
    publisher: Publisher
    # live (not deleted) EdgeRollout resource dicts
    list_rollouts: Callable[[], list[dict[str, Any]]] = field(default=lambda: [])
    # reconcile the rollouts again (they report a deleted model); None: periodic resync
    requeue_rollouts: Callable[[], None] | None = None
    now_ms: Callable[[], int] = field(default=lambda: int(time.time() * 1000))


def _event(db: DbEngine, *, kind: str, name: str, reason: str, message: str, type_: str,
           now_ms: int) -> None:
    """Write an Event unless the latest one of this object says the same (a re-run)."""
    with session_scope(db) as s:
        last = s.exec(select(Event).where(Event.kind == kind, Event.name == name)
                      .order_by(col(Event.id).desc())).first()
        if last is not None and (last.reason, last.message) == (reason, message):
            return
        s.add(Event(at_ms=now_ms, kind=kind, name=name, type=type_, reason=reason,
                    message=message[:2000]))


async def finalize_rollout(resource: dict[str, Any], ctx: CleanupContext) -> dict[str, int]:
    """Stop the deleted rollout's offers; returns counts (cancelled, committed, devices)."""
    ns, name, _ = meta(resource)
    key = f"{ns}/{name}"
    now = ctx.now_ms()
    with session_scope(ctx.db) as s:
        rows = s.exec(select(DeviceRollout).where(DeviceRollout.rollout == key)).all()
        cancelled = 0
        for r in rows:
            if r.state in KEEP_STATES:
                continue
            r.state, r.reason, r.updated_ms = (DeviceRolloutState.CANCELLED,
                                               "rollout deleted", now)
            s.add(r)
            cancelled += 1
        update_ids = {r.update_id for r in rows if r.update_id}
        targets = s.exec(select(DeviceTarget).where(DeviceTarget.rollout == key)).all()
        devices = {r.device_id for r in rows} | {t.device_id for t in targets}
        committed = len({r.device_id for r in rows if r.state == DeviceRolloutState.COMMITTED
                         and not r.variant})
        # the devices' desired state no longer names what this rollout asked for; what
        # they serve stays (deleting a rollout never uninstalls a model from a board)
        devs = {d.device_id: d for d in s.exec(select(Device).where(
            col(Device.device_id).in_([t.device_id for t in targets]))).all()} if targets else {}
        for t in targets:
            if t.reached_ms or reached(t, served(devs.get(t.device_id), t.model_name,
                                                 t.variant)):
                t.rollout = ""           # reached: still what the device should serve
                s.add(t)
            else:
                s.delete(t)
        for m in s.exec(select(RolloutMember).where(RolloutMember.rollout == key)).all():
            s.delete(m)
        for g in s.exec(select(WaveGate).where(WaveGate.rollout == key)).all():
            s.delete(g)
    ctx.publisher.forget_rollout(key, update_ids)
    await sync_devices(db=ctx.db, keys=ctx.keys, publisher=ctx.publisher,
                       device_ids=devices, now_ms=now)
    if update_ids:
        with session_scope(ctx.db) as s:
            left = {d.device_id for d in s.exec(select(DeviceDesired).where(
                col(DeviceDesired.offer_update_id).in_(update_ids))).all()}
            left |= {o.device_id for o in s.exec(select(DeviceOffer).where(
                col(DeviceOffer.update_id).in_(update_ids))).all()}
            if left:
                raise RetryLater(f"retained offers of rollout {key} not cleared yet on "
                                 f"{', '.join(sorted(left)[:5])}", reason="offer_not_cleared")
    _event(ctx.db, kind="EdgeRollout", name=key, reason="Deleted", type_="Normal", now_ms=now,
           message=(f"EdgeRollout {name} deleted: offers withdrawn from "
                    f"{len(devices) - committed} device(s), {committed} device(s) that "
                    f"committed keep serving the model"))
    return {"cancelled": cancelled, "committed": committed, "devices": len(devices)}


async def finalize_model(resource: dict[str, Any], ctx: CleanupContext) -> list[str]:
    """Report the rollouts referencing the deleted model; returns their names."""
    ns, name, _ = meta(resource)
    refs = sorted(f"{meta(r)[0]}/{meta(r)[1]}" for r in ctx.list_rollouts()
                  if meta(r)[0] == ns and str((r.get("spec") or {}).get("model")) == name)
    msg = f"EdgeModel {name} deleted; its engines stay in the engine cache"
    if refs:
        msg += f"; rollouts still referencing it (now ModelNotFound): {', '.join(refs)}"
    _event(ctx.db, kind="EdgeModel", name=f"{ns}/{name}", reason="Deleted", message=msg,
           type_="Warning" if refs else "Normal", now_ms=ctx.now_ms())
    if refs and ctx.requeue_rollouts is not None:
        ctx.requeue_rollouts()
    return refs
