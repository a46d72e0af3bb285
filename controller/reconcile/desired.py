"""Per-device retained state after a rollout pass: DesiredState and finished offers.

Called by controller.reconcile.rollouts at the end of every pass with the rollout's devices.
For each device it

* publishes a signed ``DesiredState`` (protos update.proto) retained on
  ``.../{device}/desired`` when the device's desired models changed: per model name, the
  highest version it was offered and did not fail (committed or on its way), so a device
  that reconnects learns what it should run;
* clears the retained offer on ``.../{device}/update/offer`` (an empty retained message)
  once the update it carries is finished (committed, failed, rolled back) or no longer
  exists, so a reconnecting device does not receive an old offer forever.

State lives in the ``DeviceDesired`` table (generation, digest of the last published
models, update id of the retained offer), so a restart neither republishes nor forgets.
Everything is level-triggered: a publish that fails (not connected) is retried next pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from typing import Any

from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import col, select

from controller.fleet.db import session_scope
from controller.fleet.models import DeviceDesired, DeviceRollout, DeviceRolloutState
from controller.ota.keys import KeyStore
from controller.ota.publisher import Publisher
from protos.edgefleet.v1 import update_pb2
from protos.errors import RetryLater

log = logging.getLogger(__name__)

FINISHED = {DeviceRolloutState.COMMITTED, DeviceRolloutState.FAILED,
            DeviceRolloutState.ROLLED_BACK, DeviceRolloutState.CANCELLED}
NOT_DESIRED = {DeviceRolloutState.PENDING, DeviceRolloutState.FAILED,
               DeviceRolloutState.ROLLED_BACK, DeviceRolloutState.CANCELLED}
_BATCH = 500


def note_offer(db: DbEngine, device_id: str, update_id: str) -> None:
    """Remember that ``update_id`` is the offer retained for ``device_id`` now."""
    with session_scope(db) as s:
        d = s.get(DeviceDesired, device_id) or DeviceDesired(device_id=device_id)
        d.offer_update_id = update_id
        s.add(d)


def desired_models(rows: Iterable[DeviceRollout]) -> list[dict[str, Any]]:
    """Per model name, the highest version offered and not failed; sorted by name. Variant
    rows (lighter engines shipped beside the main one) are not listed: DesiredModel names
    the main engine."""
    best: dict[str, DeviceRollout] = {}
    for r in rows:
        if r.state in NOT_DESIRED or not r.update_id or not r.model_name or r.variant:
            continue
        cur = best.get(r.model_name)
        if cur is None or (r.version, r.updated_ms) > (cur.version, cur.updated_ms):
            best[r.model_name] = r
    return [{"name": n, "version": int(r.version), "target_sha256": r.target_sha256,
             "update_id": r.update_id} for n, r in sorted(best.items())]


def _digest(models: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(models, sort_keys=True).encode()).hexdigest()


async def sync_devices(*, db: DbEngine, keys: KeyStore, publisher: Publisher,
                       device_ids: Iterable[str], now_ms: int) -> int:
    """Publish changed DesiredStates and clear finished offers; returns messages published."""
    ids = sorted(set(device_ids))
    published = 0
    for i in range(0, len(ids), _BATCH):
        batch = ids[i:i + _BATCH]
        with session_scope(db) as s:
            rows = s.exec(select(DeviceRollout).where(
                col(DeviceRollout.device_id).in_(batch))).all()
            known = {d.device_id: d for d in s.exec(select(DeviceDesired).where(
                col(DeviceDesired.device_id).in_(batch))).all()}
        by_dev: dict[str, list[DeviceRollout]] = {}
        for r in rows:
            by_dev.setdefault(r.device_id, []).append(r)
        for dev in batch:
            try:
                published += await _sync_one(db, keys, publisher, dev, by_dev.get(dev, []),
                                              known.get(dev), now_ms)
            except RetryLater as e:
                log.info("desired state of device %s not published: %s", dev, e)
                return published
    return published


async def _sync_one(db: DbEngine, keys: KeyStore, publisher: Publisher, dev: str,
                    rows: list[DeviceRollout], known: DeviceDesired | None,
                    now_ms: int) -> int:
    n = 0
    models = desired_models(rows)
    digest = _digest(models)
    if (known.digest if known else "") != digest and (models or known is not None):
        gen = (known.generation if known else 0) + 1
        msg = update_pb2.DesiredState(device_id=dev, generation=gen, issued_at_ms=now_ms)
        for m in models:
            msg.models.add(**m)
        await publisher.publish_desired(dev, keys.sign(msg))
        with session_scope(db) as s:
            d = s.get(DeviceDesired, dev) or DeviceDesired(device_id=dev)
            d.generation, d.digest, d.models, d.published_ms = gen, digest, models, now_ms
            s.add(d)
        log.info("device %s: desired state generation %d: %s", dev, gen,
                 ", ".join(f"{m['name']} v{m['version']}" for m in models) or "nothing")
        n += 1
    if known is None or not known.offer_update_id:
        return n
    by_id = {r.update_id: r for r in rows}
    # re-read right before clearing: another rollout may have offered since the batch read;
    # no await between this check and the publish call keeps their order on the wire
    with session_scope(db) as s:
        cur = s.get(DeviceDesired, dev)
        uid = cur.offer_update_id if cur is not None else ""
        row = by_id.get(uid) if uid else None
        if cur is None or not uid or (row is not None and row.state not in FINISHED):
            return n
        cur.offer_update_id = ""
        s.add(cur)
    try:
        await publisher.clear_offer(dev)
    except RetryLater:
        note_offer(db, dev, uid)       # not cleared: try again next pass
        raise
    log.info("device %s: retained offer %s cleared (%s)", dev, uid,
             row.state.value if row is not None else "update gone")
    return n + 1
