"""One batch of device messages written in one transaction (called by controller.fleet.ingest).

``BatchWriter.apply(batch)`` parses and writes a whole batch:

- heartbeats: existing rows' online flags read in one query; a heartbeat whose slow-moving
  part (class, labels, facts, models, slots, faults, updates, health...) has the fingerprint
  last written for that device is one executemany UPDATE of the volatile columns (seq,
  uptime, timestamps, online); the others load their rows in one query and rewrite them,
  and their update progress moves DeviceRollout rows;
- presence: the later of a device's heartbeat and presence in the batch decides ``online``;
- metrics: every device's snapshots loaded in one query, then windows and samples added;
- update statuses: in arrival order;
- Events (online/offline, failed updates) in the same transaction as the rows.

The fingerprint cache is only updated after the commit, and entries expire after
``FINGERPRINT_TTL_S``: with several replicas sharing ingest a device's heartbeats alternate
between them, so a replica rewrites the full row at least that often.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError, Message
from sqlalchemy import bindparam, delete, update
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from controller.fleet import events, windows
from controller.fleet.db import session_scope
from controller.fleet.models import Device, DeviceRollout, DeviceRolloutState, MetricSample
from controller.settings import Settings
from protos.edgefleet.v1 import common_pb2, device_pb2, update_pb2

log = logging.getLogger(__name__)

FINGERPRINT_TTL_S = 60.0
TERMINAL = {DeviceRolloutState.COMMITTED, DeviceRolloutState.FAILED,
            DeviceRolloutState.ROLLED_BACK}
_STATE_MAP = {
    common_pb2.UPDATE_STATE_RECEIVED: DeviceRolloutState.OFFERED,
    common_pb2.UPDATE_STATE_DOWNLOADING: DeviceRolloutState.DOWNLOADING,
    common_pb2.UPDATE_STATE_VERIFYING: DeviceRolloutState.VERIFYING,
    common_pb2.UPDATE_STATE_PATCHING: DeviceRolloutState.PATCHING,
    common_pb2.UPDATE_STATE_STAGED: DeviceRolloutState.STAGED,
    common_pb2.UPDATE_STATE_ACTIVATING: DeviceRolloutState.ACTIVATING,
    common_pb2.UPDATE_STATE_COMMITTED: DeviceRolloutState.COMMITTED,
    common_pb2.UPDATE_STATE_ROLLED_BACK: DeviceRolloutState.ROLLED_BACK,
    common_pb2.UPDATE_STATE_FAILED: DeviceRolloutState.FAILED,
}


def rollout_state(state: int) -> DeviceRolloutState | None:
    """DeviceRolloutState for an agent UpdateState (None for idle/unspecified)."""
    return _STATE_MAP.get(state)  # type: ignore[call-overload]


def allowed_transition(old: DeviceRolloutState, new: DeviceRolloutState) -> bool:
    """Terminal failures stay; a commit may still roll back; everything else moves freely.

    committed -> failed is refused: an agent that sees the retained offer again after a
    reconnect may refuse it as "not newer", which says nothing about the engine it serves.
    """
    if old in (DeviceRolloutState.FAILED, DeviceRolloutState.ROLLED_BACK):
        return False
    if old == DeviceRolloutState.CANCELLED:   # rollout deleted: only a final word counts
        return new in TERMINAL
    if old == DeviceRolloutState.COMMITTED:
        return new == DeviceRolloutState.ROLLED_BACK
    return True


class Garbage(Exception):
    """A payload we refuse; logged with the device id, never raised out of the ingest."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _to_dict(msg: Message) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True)


@dataclass
class Batch:
    """Pending messages. Heartbeats/presence: the latest valid one per device, parsed at
    intake (a garbage message never displaces a good one), with [retained,] received_ms and
    arrival order; metrics/statuses: (device, payload, received_ms) in order, parsed later."""

    heartbeats: dict[str, tuple[Any, int, int]] = field(default_factory=dict)
    presence: dict[str, tuple[Any, bool, int, int]] = field(default_factory=dict)
    metrics: list[tuple[str, bytes, int]] = field(default_factory=list)
    statuses: list[tuple[str, bytes, int]] = field(default_factory=list)

    def size(self) -> int:
        return len(self.heartbeats) + len(self.presence) + len(self.metrics) + len(self.statuses)

    def received_ms(self) -> Iterator[int]:
        for _p, t, _o in self.heartbeats.values():
            yield t
        for _p, _r, t, _o in self.presence.values():
            yield t
        for _d, _p, t in self.metrics:
            yield t
        for _d, _p, t in self.statuses:
            yield t

    def split(self) -> Iterator[Batch]:
        """One batch per message (the fallback after repeated failures)."""
        for dev, hb in self.heartbeats.items():
            yield Batch(heartbeats={dev: hb})
        for dev, p in self.presence.items():
            yield Batch(presence={dev: p})
        for m in self.metrics:
            yield Batch(metrics=[m])
        for st in self.statuses:
            yield Batch(statuses=[st])

    def first_device(self) -> str:
        for d in (*self.heartbeats, *self.presence):
            return d
        for d, _p, _t in (*self.metrics, *self.statuses):
            return d
        return "?"


@dataclass
class Result:
    """What one write did: whether rollout-relevant state moved, and refused messages."""

    changed: bool = False
    garbage: list[tuple[str, str, str]] = field(default_factory=list)  # device, reason, why
    events: list[dict[str, Any]] = field(default_factory=list)         # written with the rows


def parse_heartbeat(payload: bytes, device_id: str, max_models: int) -> Any:
    """A Heartbeat from an untrusted payload, or Garbage."""
    hb = _parse(device_pb2.Heartbeat, payload, device_id)
    if len(hb.models) > max_models:
        raise Garbage(f"{len(hb.models)} models exceeds max_heartbeat_models")
    return hb


def parse_presence(payload: bytes, device_id: str) -> Any:
    """A Presence from an untrusted payload, or Garbage."""
    return _parse(device_pb2.Presence, payload, device_id)


def _parse(cls: type[Any], payload: bytes, device_id: str) -> Any:
    msg = cls()
    try:
        msg.ParseFromString(payload)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise Garbage(f"malformed {cls.__name__}: {e}") from e
    if msg.device_id != device_id:
        raise Garbage(f"{cls.__name__} names device {msg.device_id[:64]!r}, not the topic's")
    return msg


_VOLATILE = update(Device).where(col(Device.device_id) == bindparam("b_id")).values(
    uptime_s=bindparam("b_uptime"), heartbeat_seq=bindparam("b_seq"),
    last_heartbeat_ms=bindparam("b_now"), last_seen_ms=bindparam("b_now"), online=True,
    offline_since_ms=None, offline_reason="")
_SAMPLES = MetricSample.__table__.insert()  # type: ignore[attr-defined]
_SEEN = update(Device).where(col(Device.device_id) == bindparam("b_id")).values(
    last_seen_ms=bindparam("b_now"))


class BatchWriter:
    """Writes batches; keeps the per-device fingerprint of the last full heartbeat written.
    Used from one thread at a time (the ingest's writer)."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self._fp: dict[str, tuple[tuple[Any, ...], float]] = {}
        self.full_writes = 0
        self.narrow_writes = 0

    def apply(self, batch: Batch) -> Result:
        res = Result()
        pending_fp: dict[str, tuple[Any, ...]] = {}
        failed: list[tuple[str, str]] = []
        now = _now_ms()
        with session_scope(self.engine) as s:
            self._lock_devices(s, batch)
            hb_order = self._heartbeats(s, batch, res, pending_fp, failed, now)
            self._presence(s, batch, res, hb_order, now)
            self._metrics(s, batch, res, now)
            self._statuses(s, batch, res, failed, now)
            for dev, msg in failed:
                res.events.append({"kind": "Device", "name": dev, "type_": "Warning",
                                   "reason": events.UPDATE_FAILED, "message": msg})
            events.emit_many(s, res.events, now_ms=now)
        t = time.monotonic()
        for dev, fp in pending_fp.items():
            self._fp[dev] = (fp, t)
        return res

    def _lock_devices(self, s: Session, batch: Batch) -> None:
        """PostgreSQL: lock the batch's device rows first, in device-id order. Replicas sharing
        ingest write the same devices (shared subscriptions deal each message to any of
        them); taking every row lock up front in one order means they wait for each other
        instead of deadlocking (device rows, then metric snapshots, both sorted)."""
        if s.connection().dialect.name != "postgresql":
            return
        ids = sorted({*batch.heartbeats, *batch.presence, *(d for d, _p, _t in batch.metrics),
                      *(d for d, _p, _t in batch.statuses)})
        t = Device.__table__  # type: ignore[attr-defined]
        for part in _chunks(ids):
            s.connection().execute(sa_select(t.c.device_id).where(t.c.device_id.in_(part))
                                   .order_by(t.c.device_id).with_for_update())

    # -- heartbeats --------------------------------------------------------------------------------
    def _fingerprint(self, hb: Any, labels: dict[str, str]) -> tuple[Any, ...]:
        ser = [b"".join(m.SerializeToString(deterministic=True) for m in part)
               for part in (hb.models, hb.slots, hb.faults, hb.updates)]
        return (hb.device_class, tuple(sorted(labels.items())),
                hb.facts.SerializeToString(deterministic=True), *ser, hb.health,
                hb.health_reason, hb.agent_version, hb.serve_url, hb.restarts,
                hb.desired_generation, hb.heartbeat_interval_ms)

    def _heartbeats(self, s: Session, batch: Batch, res: Result,
                    pending_fp: dict[str, tuple[Any, ...]], failed: list[tuple[str, str]],
                    now: int) -> dict[str, int]:
        """Write the batch's heartbeats; returns device -> arrival order of those written."""
        parsed: dict[str, tuple[Any, dict[str, str], int]] = {}
        for dev, (hb, _t, order) in batch.heartbeats.items():
            parsed[dev] = (hb, self._labels(dev, hb.labels), order)
        if not parsed:
            return {}
        online: dict[str, bool] = {}
        for part in _chunks(list(parsed)):
            for dev_id, on in s.exec(select(Device.device_id, Device.online)
                                     .where(col(Device.device_id).in_(part))).all():
                online[dev_id] = bool(on)
        ttl_now = time.monotonic()
        narrow: list[dict[str, Any]] = []
        full: dict[str, tuple[Any, dict[str, str], tuple[Any, ...]]] = {}
        for dev, (hb, labels, _o) in parsed.items():
            fp = self._fingerprint(hb, labels)
            cached = self._fp.get(dev)
            if (dev in online and cached is not None and cached[0] == fp
                    and ttl_now - cached[1] < FINGERPRINT_TTL_S):
                narrow.append({"b_id": dev, "b_uptime": int(hb.uptime_s), "b_seq": int(hb.seq),
                               "b_now": now})
            else:
                full[dev] = (hb, labels, fp)
        if narrow:
            narrow.sort(key=lambda p: str(p["b_id"]))
            s.connection().execute(_VOLATILE, narrow)
            self.narrow_writes += len(narrow)
        if full:
            res.changed |= self._full_heartbeats(s, full, failed, now)
            pending_fp.update((dev, fp) for dev, (_hb, _l, fp) in full.items())
            self.full_writes += len(full)
        for dev in parsed:
            if not online.get(dev, False):
                res.changed = True
                if batch.presence.get(dev, (None, False, 0, -1))[3] > parsed[dev][2]:
                    continue     # an offline after this heartbeat wins; no online flap
                res.events.append({"kind": "Device", "name": dev, "reason": events.DEVICE_ONLINE,
                                   "message": f"device {dev} is online (heartbeat)"})
        return {dev: order for dev, (_hb, _l, order) in parsed.items()}

    def _full_heartbeats(self, s: Session, full: dict[str, tuple[Any, dict[str, str], Any]],
                         failed: list[tuple[str, str]], now: int) -> bool:
        """Rewrite the rows of heartbeats that changed (or are not cached): the old class,
        labels, models and faults read in one query per 500 devices, then one executemany
        UPDATE (INSERT for new devices). True when rollout-relevant state moved."""
        t = Device.__table__  # type: ignore[attr-defined]
        old: dict[str, tuple[Any, ...]] = {}
        for part in _chunks(list(full)):
            for r in s.connection().execute(
                    sa_select(t.c.device_id, t.c.device_class, t.c.labels, t.c.models,
                              t.c.faults).where(t.c.device_id.in_(part))).all():
                old[r[0]] = tuple(r[1:])
        changed = False
        updates: list[dict[str, Any]] = []
        inserts: list[dict[str, Any]] = []
        for dev, (hb, labels, _fp) in full.items():
            vals = {
                "device_class": hb.device_class[:253], "labels": labels,
                "facts": _to_dict(hb.facts), "models": [_to_dict(m) for m in hb.models],
                "updates": [_to_dict(u) for u in hb.updates[:16]],
                "health": hb.health[:32], "health_reason": hb.health_reason[:1024],
                "agent_version": hb.agent_version[:64], "uptime_s": int(hb.uptime_s),
                "serve_url": hb.serve_url[:512], "heartbeat_seq": int(hb.seq),
                "slots": [_to_dict(m) for m in hb.slots[: 2 * self.settings.max_heartbeat_models]],
                "faults": [_to_dict(f) for f in hb.faults[:16]],
                "restarts": int(hb.restarts), "desired_generation": int(hb.desired_generation),
                "heartbeat_interval_ms": int(hb.heartbeat_interval_ms),
                "last_heartbeat_ms": now, "last_seen_ms": now, "online": True,
                "offline_since_ms": None, "offline_reason": ""}
            prev = old.get(dev)
            if prev is None:
                inserts.append({**self._template(), **vals, "device_id": dev})
                changed = True
            else:
                cls, lab, models, faults = prev
                # a new class or new labels can move the device into or out of a rollout;
                # new models or faults: observed state moved, the rollouts re-compare
                changed |= (cls != vals["device_class"] or (lab or {}) != labels
                            or (models or []) != vals["models"]
                            or (faults or []) != vals["faults"])
                updates.append({"k_id": dev, **{f"p_{k}": v for k, v in vals.items()}})
        conn = s.connection()
        if inserts:
            conn.execute(t.insert(), inserts)
        if updates:
            updates.sort(key=lambda p: str(p["k_id"]))
            conn.execute(self._full_update(tuple(k[2:] for k in updates[0] if k != "k_id")),
                         updates)
        for dev, (hb, _labels, _fp) in full.items():
            for u in hb.updates[:16]:
                changed |= move_rollout(s, dev, u.update_id, u.state, u.reason,
                                        u.bytes_received, failed=failed)
        return changed

    _TEMPLATE: dict[str, Any] | None = None
    _UPDATES: dict[tuple[str, ...], Any] = {}

    @classmethod
    def _template(cls) -> dict[str, Any]:
        """Every Device column with its default (an INSERT names them all)."""
        if cls._TEMPLATE is None:
            cls._TEMPLATE = Device(device_id="").model_dump()
        return cls._TEMPLATE

    @classmethod
    def _full_update(cls, cols: tuple[str, ...]) -> Any:
        """UPDATE of these columns (bound as p_{column}) by device id (k_id)."""
        stmt = cls._UPDATES.get(cols)
        if stmt is None:
            stmt = cls._UPDATES[cols] = update(Device).where(
                col(Device.device_id) == bindparam("k_id")).values(
                **{k: bindparam(f"p_{k}") for k in cols})
        return stmt

    def _labels(self, dev: str, labels: Any) -> dict[str, str]:
        """The heartbeat's labels within limits; over-long or excess ones dropped, logged."""
        out: dict[str, str] = {}
        for k, v in sorted(labels.items()):
            if len(out) >= self.settings.max_device_labels:
                log.warning("device %s: more than %d labels; the rest ignored", dev,
                            self.settings.max_device_labels)
                break
            if not k or len(k) > 317 or len(v) > 253:
                log.warning("device %s: label %r ignored (key 1..317, value <= 253 chars)",
                            dev, k[:64])
                continue
            out[k] = v
        return out

    # -- presence ----------------------------------------------------------------------------------
    def _presence(self, s: Session, batch: Batch, res: Result, hb_order: dict[str, int],
                  now: int) -> None:
        todo: dict[str, tuple[Any, bool]] = {}
        for dev, (p, retained, _t, order) in batch.presence.items():
            if hb_order.get(dev, -1) > order:
                continue          # a heartbeat after it already said "online"
            todo[dev] = (p, retained)
        if not todo:
            return
        rows: dict[str, Device] = {}
        for part in _chunks(list(todo)):
            for d in s.exec(select(Device).where(col(Device.device_id).in_(part))).all():
                rows[d.device_id] = d
        for dev, (p, retained) in todo.items():
            d = rows.get(dev)
            if d is None:
                if not p.online:
                    continue     # never heard of it; nothing to mark offline
                d = Device(device_id=dev)
            was_online = d.online
            if p.online:
                d.online, d.offline_since_ms, d.offline_reason = True, None, ""
                d.last_seen_ms = now
            else:
                # a stale retained offline must not override a newer heartbeat; a live one (the
                # last will, stamped when the agent connected) always counts
                if (retained and d.last_seen_ms and p.at_ms and p.at_ms < d.last_seen_ms - 5000
                        and d.online):
                    continue
                d.online = False
                d.offline_since_ms = now
                d.offline_reason = p.reason[:64] or "offline"
            s.add(d)
            res.changed = True
            if bool(p.online) != bool(was_online):
                res.events.append({
                    "kind": "Device", "name": dev,
                    "reason": events.DEVICE_ONLINE if p.online else events.DEVICE_OFFLINE,
                    "type_": "Normal" if p.online else "Warning",
                    "message": f"device {dev} is {'online' if p.online else 'offline'}"
                               + ("" if p.online else f" ({p.reason[:64] or 'offline'})")})

    # -- update statuses ---------------------------------------------------------------------------
    def _statuses(self, s: Session, batch: Batch, res: Result, failed: list[tuple[str, str]],
                  now: int) -> None:
        seen: set[str] = set()
        for dev, payload, _t in batch.statuses:
            try:
                st = _parse(update_pb2.UpdateStatus, payload, dev)
                if not st.update_id:
                    raise Garbage("update status without update_id")
                res.changed |= move_rollout(
                    s, dev, st.update_id, st.state, st.reason, st.bytes_received,
                    unknown_is_garbage=True, failed=failed,
                    probe=_to_dict(st.probe) if st.HasField("probe") else None)
                seen.add(dev)
            except Garbage as e:
                res.garbage.append((dev, "garbage", f"update/status: {e}"))
        if seen:
            s.connection().execute(_SEEN, [{"b_id": d, "b_now": now} for d in sorted(seen)])

    # -- metrics -----------------------------------------------------------------------------------
    def _metrics(self, s: Session, batch: Batch, res: Result, now: int) -> None:
        """MetricSample rows (cumulative totals; p50/p95/p99 of this message's window, None
        before there is one) and the windows (controller/fleet/windows.py)."""
        parsed: list[tuple[str, Any]] = []
        for dev, payload, _t in batch.metrics:
            try:
                parsed.append((dev, _parse(device_pb2.Metrics, payload, dev)))
            except Garbage as e:
                res.garbage.append((dev, "garbage", f"metrics: {e}"))
        if not parsed:
            return
        conn = s.connection()
        plain = windows.PlainBatch(conn, (dev for dev, _m in parsed))
        rows: list[dict[str, Any]] = []
        for dev, m in parsed:
            rows.extend(self._metric_rows(plain, dev, m, now))
        plain.write()
        conn.execute(_SAMPLES, rows)
        conn.execute(_SEEN, [{"b_id": d, "b_now": now}
                             for d in sorted({dev for dev, _m in parsed})])

    def _metric_rows(self, plain: windows.PlainBatch, dev: str, m: Any, now: int
                     ) -> list[dict[str, Any]]:
        """MetricSample rows (as INSERT parameters) of one Metrics message."""
        at = m.at_ms if 0 < m.at_ms <= now + 60_000 else now
        host = m.host
        temps = [t.celsius for t in host.temperatures]
        common: dict[str, Any] = {
            "device_id": dev, "at_ms": at,
            "cpu_percent": host.cpu_percent if host.HasField("cpu_percent") else None,
            "agent_rss_bytes": host.agent_rss_bytes if host.HasField("agent_rss_bytes") else None,
            "temperature_c": max(temps) if temps else None,
        }
        reported = list(m.models[: self.settings.max_heartbeat_models])
        counters: dict[tuple[str, int], windows.Counters] = {}
        for mm in reported:
            hist, problem = windows.checked_histogram(
                list(mm.latency.bounds_ms), list(mm.latency.counts), mm.latency.sum_ms)
            if problem:
                log.warning("device %s model %s: latency histogram ignored: %s", dev,
                            mm.name[:64], problem)
            counters[(mm.name[:253], int(mm.version))] = windows.Counters(
                min(int(mm.requests), windows.MAX_COUNT), min(int(mm.errors), windows.MAX_COUNT),
                hist)
        made = plain.record(device_id=dev, at_ms=at, models=counters, buffered=m.buffered)
        rows = []
        for mm in reported:
            w = made.get((mm.name[:253], int(mm.version)))
            p50, p95, p99 = windows.window_quantiles(w)
            rows.append({
                **common, "model_name": mm.name[:253], "model_version": int(mm.version),
                "requests": int(mm.requests), "errors": int(mm.errors),
                "p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
                "data": {"queue_depth": mm.queue_depth, "buffered": m.buffered,
                         "batch_size_counts": list(mm.batch_size_counts)[:64],
                         "window": None if w is None else {
                             "start_ms": w.start_ms, "end_ms": w.end_ms,
                             "requests": w.requests, "errors": w.errors, "reset": w.reset}}})
        if not rows:
            rows.append({**common, "model_name": "", "model_version": 0, "requests": 0,
                         "errors": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None,
                         "data": {"buffered": m.buffered}})
        rows[0]["data"] = {**rows[0]["data"], "host": _to_dict(host)}
        return rows

    def prune(self, *, cutoff_ms: int) -> None:
        """Delete samples, windows and snapshots older than ``cutoff_ms``."""
        with session_scope(self.engine) as s:
            s.exec(delete(MetricSample).where(MetricSample.at_ms < cutoff_ms))  # type: ignore[call-overload,arg-type]
            windows.prune(s, cutoff_ms=cutoff_ms)


def move_rollout(s: Session, dev: str, update_id: str, state: int, reason: str,
                 bytes_received: int, *, failed: list[tuple[str, str]],
                 unknown_is_garbage: bool = False,
                 probe: dict[str, Any] | None = None) -> bool:
    """Move the device's DeviceRollout row of ``update_id`` (offers history) to the reported
    state when the transition is allowed; True when it moved. Failures go to ``failed``."""
    new = rollout_state(state)
    if new is None or not update_id:
        return False
    row = s.exec(select(DeviceRollout).where(DeviceRollout.update_id == update_id,
                                             DeviceRollout.device_id == dev)).first()
    if row is None:
        if unknown_is_garbage:
            raise Garbage(f"unknown update_id {update_id[:64]!r}")
        return False
    if probe and probe != (row.probe or {}):
        row.probe = probe                 # the on-device accuracy probe's report
        row.updated_ms = _now_ms()
        s.add(row)
        if row.state == new:
            return True
    if row.state == new or not allowed_transition(row.state, new):
        if int(bytes_received) > row.bytes_received and row.state == new:
            row.bytes_received = int(bytes_received)   # progress (the deadline's clock)
            row.updated_ms = _now_ms()
            s.add(row)
        return False
    row.state = new
    row.reason = reason[:1024]
    row.bytes_received = max(row.bytes_received, int(bytes_received))
    row.updated_ms = _now_ms()
    s.add(row)
    log.info("device %s update %s -> %s %s", dev, update_id, new.value, reason[:200])
    if new in (DeviceRolloutState.FAILED, DeviceRolloutState.ROLLED_BACK):
        failed.append((dev, f"update {update_id} of {row.model_name} "
                            f"v{row.version}: {new.value}: {reason[:300]}"))
    return True


def _chunks(ids: list[str], n: int = 500) -> Iterator[list[str]]:
    for i in range(0, len(ids), n):
        yield ids[i:i + n]
