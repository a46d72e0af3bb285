"""Per-device retained state: the signed DesiredState and the per-model retained offers.

Called by controller.reconcile.rollouts at the end of every pass and by
controller.reconcile.cleanup with the devices concerned. For each device it

* publishes a signed ``DesiredState`` (protos update.proto) retained on
  ``.../{device}/desired`` when the device's desired targets changed: one DesiredModel per
  DeviceTarget row of the device (every model and variant, from every rollout), with the
  version, revision, engine sha256 and the update id of the offer carrying the bytes. The
  agent treats it as its source of truth (abandons offers it no longer lists, activates a
  listed engine it already holds in a slot);
* clears a retained per-model offer (``update/offer/{model_key}``, an empty retained
  message) once the update it carries is finished (committed, failed, rolled back,
  cancelled) or no target references it any more, so a reconnecting device does not
  receive an old offer forever. The legacy single ``update/offer`` topic is cleared the
  same way (``DeviceDesired.offer_update_id``).

State lives in the ``DeviceDesired`` and ``DeviceOffer`` tables, so a restart neither
republishes nor forgets. Level-triggered: a publish that fails (not connected) is retried
on the next pass. Every pass compares all its devices, so the rows are read as plain
columns in batches of :data:`_BATCH` devices (no ORM objects: a pass over 10,000 devices
that changes nothing builds none) and only what changed is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from typing import Any, Protocol

from sqlalchemy import select as columns
from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import col, select

from controller.fleet.db import session_scope
from controller.fleet.models import (
    DeviceDesired,
    DeviceOffer,
    DeviceRollout,
    DeviceRolloutState,
    DeviceTarget,
)
from controller.ota.keys import KeyStore
from controller.ota.publisher import Publisher
from protos.edgefleet.v1 import update_pb2
from protos.errors import RetryLater

log = logging.getLogger(__name__)

FINISHED = {DeviceRolloutState.COMMITTED, DeviceRolloutState.FAILED,
            DeviceRolloutState.ROLLED_BACK, DeviceRolloutState.CANCELLED,
            DeviceRolloutState.PENDING}
_BATCH = 500


def model_key(name: str, variant: str) -> str:
    """The device-side key of (model, variant): its slots and its offer topic."""
    return f"{name}.{variant}" if variant else name


def note_offer(db: DbEngine, device_id: str, update_id: str, *, key: str = "") -> None:
    """Remember that ``update_id`` is the offer retained for (device, model key) now."""
    with session_scope(db) as s:
        note_offer_in(s, device_id, update_id, key=key)


def note_offer_in(s: Any, device_id: str, update_id: str, *, key: str = "") -> None:
    """:func:`note_offer` within the caller's session ``s``."""
    if not key:
        d = s.get(DeviceDesired, device_id) or DeviceDesired(device_id=device_id)
        d.offer_update_id = update_id
        s.add(d)
        return
    row = s.exec(select(DeviceOffer).where(DeviceOffer.device_id == device_id,
                                           DeviceOffer.model_key == key)).first()
    row = row or DeviceOffer(device_id=device_id, model_key=key)
    row.update_id = update_id
    s.add(row)


class TargetFields(Protocol):
    """What a DesiredModel is built from: a DeviceTarget row (or its columns)."""

    model_name: str
    variant: str
    version: int
    revision: int
    engine_version: int
    target_sha256: str
    update_id: str


_TARGET_COLS = [col(c) for c in (
    DeviceTarget.device_id, DeviceTarget.model_name, DeviceTarget.variant, DeviceTarget.version,
    DeviceTarget.revision, DeviceTarget.engine_version, DeviceTarget.target_sha256,
    DeviceTarget.update_id)]


def desired_models(targets: Iterable[TargetFields]) -> list[dict[str, Any]]:
    """DesiredModel fields of a device's targets, sorted by (name, variant)."""
    out = []
    for t in sorted(targets, key=lambda t: (t.model_name, t.variant)):
        if not t.target_sha256:
            continue
        out.append({"name": t.model_name, "variant": t.variant, "version": int(t.version),
                    "revision": int(t.revision),
                    "engine_version": int(t.engine_version or t.version),
                    "target_sha256": t.target_sha256, "update_id": t.update_id})
    return out


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
            conn = s.connection()               # plain rows: nothing to build per device
            targets: list[Any] = list(conn.execute(columns(*_TARGET_COLS).where(
                col(DeviceTarget.device_id).in_(batch))))
            known: dict[str, Any] = {d.device_id: d for d in conn.execute(columns(
                col(DeviceDesired.device_id), col(DeviceDesired.digest),
                col(DeviceDesired.generation), col(DeviceDesired.offer_update_id)).where(col(DeviceDesired.device_id).in_(batch)))}
            offers: list[Any] = list(conn.execute(columns(
                col(DeviceOffer.id), col(DeviceOffer.device_id), col(DeviceOffer.model_key),
                col(DeviceOffer.update_id)).where(col(DeviceOffer.device_id).in_(batch),
                                             col(DeviceOffer.update_id) != "")))
            uids = sorted({o.update_id for o in offers}
                          | {d.offer_update_id for d in known.values() if d.offer_update_id})
            states: dict[str, DeviceRolloutState] = {}
            for j in range(0, len(uids), _BATCH):
                states.update({r.update_id: r.state for r in conn.execute(columns(
                    col(DeviceRollout.update_id), col(DeviceRollout.state)).where(
                    col(DeviceRollout.update_id).in_(uids[j:j + _BATCH])))})
        by_dev: dict[str, list[Any]] = {}
        for t in targets:
            by_dev.setdefault(t.device_id, []).append(t)
        offers_by: dict[str, list[Any]] = {}
        for o in offers:
            offers_by.setdefault(o.device_id, []).append(o)
        for dev in batch:
            try:
                published += await _sync_one(db, keys, publisher, dev, by_dev.get(dev, []),
                                              known.get(dev), now_ms)
                published += await _clear_finished(db, publisher, dev, offers_by.get(dev, []),
                                                   known.get(dev), by_dev.get(dev, []), states)
            except RetryLater as e:
                log.info("desired state of device %s not published: %s", dev, e)
                return published
    return published


async def _sync_one(db: DbEngine, keys: KeyStore, publisher: Publisher, dev: str,
                    targets: list[Any], known: Any | None, now_ms: int) -> int:
    models = desired_models(targets)
    digest = _digest(models)
    if (known.digest if known else "") == digest or (not models and known is None):
        return 0
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
             ", ".join(f"{model_key(m['name'], m['variant'])} v{m['version']}"
                       f"{'r' + str(m['revision']) if m['revision'] else ''}"
                       for m in models) or "nothing")
    return 1


async def _clear_finished(db: DbEngine, publisher: Publisher, dev: str,
                          offers: list[Any], known: Any | None, targets: list[Any],
                          states: dict[str, DeviceRolloutState]) -> int:
    live = {t.update_id for t in targets if t.update_id}
    n = 0
    for o in offers:
        st = states.get(o.update_id)
        if o.update_id in live and (st is None or st not in FINISHED):
            continue
        # re-read right before clearing: a pass may have offered since the batch read; no
        # await between this check and the publish keeps their order on the wire
        with session_scope(db) as s:
            cur = s.get(DeviceOffer, o.id)
            if cur is None or cur.update_id != o.update_id:
                continue
            cur.update_id = ""
            s.add(cur)
        try:
            await publisher.clear_offer(dev, o.model_key)
        except RetryLater:
            note_offer(db, dev, o.update_id, key=o.model_key)   # try again next pass
            raise
        log.info("device %s: retained offer %s of %s cleared (%s)", dev, o.update_id,
                 o.model_key, st.value if st is not None else "update gone")
        n += 1
    if known is not None and known.offer_update_id:      # the legacy single offer topic
        uid = known.offer_update_id
        st = states.get(uid)
        if st is None or st in FINISHED or uid not in live:
            with session_scope(db) as s:
                desired = s.get(DeviceDesired, dev)
                if desired is not None and desired.offer_update_id == uid:
                    desired.offer_update_id = ""
                    s.add(desired)
            try:
                await publisher.clear_offer(dev)
            except RetryLater:
                note_offer(db, dev, uid)
                raise
            n += 1
    return n
