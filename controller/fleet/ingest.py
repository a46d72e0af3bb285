"""Telemetry ingest: device MQTT messages -> fleet tables.

ControllerCore subscribes to ``subscriptions()`` (MQTT 5 shared subscriptions
``$share/{group}/...`` so several controller replicas split the load) and hands every
message to ``Ingest.handle(topic, payload)``: heartbeats update the Device row, presence
(online on connect, offline as the device's last will) flips ``online``, update status
moves DeviceRollout.state, metrics become MetricSample rows (p50/p95/p99 from the
histogram), chunk requests go to the OTA publisher. Payloads are untrusted: size limits,
the device id in the payload must match the topic, and garbage is dropped with a log line
naming the device and the reason. ``handle`` never raises.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError, Message
from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlmodel import select

from controller.fleet import events, windows
from controller.fleet.db import session_scope
from controller.fleet.models import Device, DeviceRollout, DeviceRolloutState, MetricSample
from controller.fleet.windows import percentile  # noqa: F401  (re-exported: callers import it here)
from controller.settings import Settings
from protos import topics
from protos.edgefleet.v1 import common_pb2, device_pb2, update_pb2

log = logging.getLogger(__name__)

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


def _now_ms() -> int:
    return int(time.time() * 1000)


def _to_dict(msg: Message) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True)


class Ingest:
    """Turns device messages into rows. ``on_change(kind)`` is called after rollout-relevant
    changes (update status, presence) so the reconcile loop can react at once."""

    LEAVES = (topics.HEARTBEAT, topics.PRESENCE, topics.METRICS, topics.UPDATE_STATUS,
              topics.CHUNK_REQUEST)

    def __init__(self, settings: Settings, engine: Engine, *,
                 chunk_handler: Callable[[str, bytes], None] | None = None,
                 on_change: Callable[[str], None] | None = None,
                 metrics_retention_s: int = 3600) -> None:
        self.settings = settings
        self.engine = engine
        self.chunk_handler = chunk_handler
        self.on_change = on_change or (lambda _kind: None)
        self.metrics_retention_s = metrics_retention_s
        self.dropped = 0
        self._samples = 0
        self._failed_events: list[tuple[str, str]] = []   # written after the transaction

    def subscriptions(self) -> list[str]:
        """Topic filters to subscribe to (presence unshared: retained state reaches us)."""
        group = self.settings.shared_group or None
        subs = []
        for leaf in self.LEAVES:
            shared = None if leaf == topics.PRESENCE else group
            subs.append(topics.device_subscription(leaf, shared_group=shared))
        return subs

    # -- dispatch -------------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes, *, retained: bool = False) -> None:
        """One device message; ``retained``: the broker delivered a stored retained copy."""
        parsed = topics.parse_device_topic(topic)
        if parsed is None:
            return self._drop("?", f"not a device topic: {topic[:120]!r}")
        dev = parsed.device_id
        if len(payload) > self.settings.max_mqtt_payload_bytes:
            return self._drop(dev, f"{parsed.leaf} payload of {len(payload)} bytes exceeds "
                                   f"max_mqtt_payload_bytes={self.settings.max_mqtt_payload_bytes}")
        try:
            if parsed.leaf == topics.HEARTBEAT:
                self._heartbeat(dev, payload)
            elif parsed.leaf == topics.PRESENCE:
                self._presence(dev, payload, retained=retained)
            elif parsed.leaf == topics.METRICS:
                self._metrics(dev, payload)
            elif parsed.leaf == topics.UPDATE_STATUS:
                self._update_status(dev, payload)
            elif parsed.leaf == topics.CHUNK_REQUEST and self.chunk_handler:
                self.chunk_handler(dev, payload)
        except _Garbage as e:
            self._drop(dev, f"{parsed.leaf}: {e}")
        except Exception as e:  # never crash the message loop on one message
            log.exception("ingest of %s from device %s failed: %s", parsed.leaf, dev, e)
            self.dropped += 1

    def _drop(self, device_id: str, reason: str) -> None:
        self.dropped += 1
        log.warning("ignored message from device %s: %s", device_id, reason)

    @staticmethod
    def _parse(cls: type[Any], payload: bytes, device_id: str, *, check_id: bool = True) -> Any:
        msg = cls()
        try:
            msg.ParseFromString(payload)
        except (DecodeError, ValueError, RuntimeError) as e:
            raise _Garbage(f"malformed {cls.__name__}: {e}") from e
        if check_id and msg.device_id != device_id:
            raise _Garbage(f"{cls.__name__} names device {msg.device_id[:64]!r}, "
                           "not the topic's")
        return msg

    # -- handlers -------------------------------------------------------------------------------
    def _heartbeat(self, dev: str, payload: bytes) -> None:
        hb = self._parse(device_pb2.Heartbeat, payload, dev)
        if len(hb.models) > self.settings.max_heartbeat_models:
            raise _Garbage(f"{len(hb.models)} models exceeds max_heartbeat_models")
        labels = self._labels(dev, hb.labels)
        now = _now_ms()
        changed = False
        with session_scope(self.engine) as s:
            d = s.get(Device, dev) or Device(device_id=dev)
            was_online = d.online
            # a new class or new labels can move the device into or out of a rollout
            changed = d.device_class != hb.device_class[:253] or (d.labels or {}) != labels
            d.device_class = hb.device_class[:253]
            d.labels = labels
            d.facts = _to_dict(hb.facts)
            served = [_to_dict(m) for m in hb.models]
            changed |= served != (d.models or [])    # observed state moved: re-compare
            d.models = served
            d.updates = [_to_dict(u) for u in hb.updates[:16]]
            d.health, d.health_reason = hb.health[:32], hb.health_reason[:1024]
            d.agent_version, d.uptime_s = hb.agent_version[:64], int(hb.uptime_s)
            d.serve_url, d.heartbeat_seq = hb.serve_url[:512], int(hb.seq)
            d.slots = [_to_dict(m) for m in hb.slots[: 2 * self.settings.max_heartbeat_models]]
            faults = [_to_dict(f) for f in hb.faults[:16]]
            changed |= faults != (d.faults or [])
            d.faults = faults
            d.restarts, d.desired_generation = int(hb.restarts), int(hb.desired_generation)
            d.last_heartbeat_ms = d.last_seen_ms = now
            d.online, d.offline_since_ms, d.offline_reason = True, None, ""
            s.add(d)
            for u in hb.updates[:16]:
                changed |= self._move_rollout(s, dev, u.update_id, u.state, u.reason,
                                              u.bytes_received)
        self._flush_events()
        if not was_online:
            events.emit(self.engine, kind="Device", name=dev, reason=events.DEVICE_ONLINE,
                        message=f"device {dev} is online (heartbeat)", now_ms=now)
        if changed or not was_online:
            self.on_change("heartbeat")

    def _flush_events(self) -> None:
        while self._failed_events:
            dev, msg = self._failed_events.pop(0)
            events.emit(self.engine, kind="Device", name=dev, reason=events.UPDATE_FAILED,
                        type_="Warning", message=msg, now_ms=_now_ms())

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

    def _presence(self, dev: str, payload: bytes, *, retained: bool = False) -> None:
        if not payload:       # retained message cleared
            return
        p = self._parse(device_pb2.Presence, payload, dev)
        now = _now_ms()
        with session_scope(self.engine) as s:
            d = s.get(Device, dev)
            if d is None:
                if not p.online:
                    return     # never heard of it; nothing to mark offline
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
                    return
                d.online = False
                d.offline_since_ms = now
                d.offline_reason = p.reason[:64] or "offline"
            s.add(d)
        if bool(p.online) != bool(was_online):
            events.emit(self.engine, kind="Device", name=dev,
                        reason=events.DEVICE_ONLINE if p.online else events.DEVICE_OFFLINE,
                        type_="Normal" if p.online else "Warning", now_ms=now,
                        message=f"device {dev} is {'online' if p.online else 'offline'}"
                                + ("" if p.online else f" ({p.reason[:64] or 'offline'})"))
        self.on_change("presence")

    def _update_status(self, dev: str, payload: bytes) -> None:
        st = self._parse(update_pb2.UpdateStatus, payload, dev)
        if not st.update_id:
            raise _Garbage("update status without update_id")
        with session_scope(self.engine) as s:
            d = s.get(Device, dev)
            if d is not None:
                d.last_seen_ms = _now_ms()
                s.add(d)
            changed = self._move_rollout(s, dev, st.update_id, st.state, st.reason,
                                         st.bytes_received, unknown_is_garbage=True,
                                         probe=_to_dict(st.probe) if st.HasField("probe")
                                         else None)
        self._flush_events()
        if changed:
            self.on_change("update_status")

    def _move_rollout(self, s: Any, dev: str, update_id: str, state: int, reason: str,
                      bytes_received: int, *, unknown_is_garbage: bool = False,
                      probe: dict[str, Any] | None = None) -> bool:
        new = rollout_state(state)
        if new is None or not update_id:
            return False
        row = s.exec(select(DeviceRollout).where(DeviceRollout.update_id == update_id,
                                                 DeviceRollout.device_id == dev)).first()
        if row is None:
            if unknown_is_garbage:
                raise _Garbage(f"unknown update_id {update_id[:64]!r}")
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
            self._failed_events.append((dev, f"update {update_id} of {row.model_name} "
                                             f"v{row.version}: {new.value}: {reason[:300]}"))
        return True

    def _metrics(self, dev: str, payload: bytes) -> None:
        """MetricSample rows (cumulative totals; p50/p95/p99 of this message's window, None
        before there is one) and the windows (controller/fleet/windows.py)."""
        m = self._parse(device_pb2.Metrics, payload, dev)
        now = _now_ms()
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
        with session_scope(self.engine) as s:
            made = windows.record(s, device_id=dev, at_ms=at, models=counters,
                                  buffered=m.buffered)
            rows = []
            for mm in reported:
                w = made.get((mm.name[:253], int(mm.version)))
                p50, p95, p99 = windows.window_quantiles(w)
                rows.append(MetricSample(
                    **common, model_name=mm.name[:253], model_version=int(mm.version),
                    requests=int(mm.requests), errors=int(mm.errors),
                    p50_ms=p50, p95_ms=p95, p99_ms=p99,
                    data={"queue_depth": mm.queue_depth, "buffered": m.buffered,
                          "batch_size_counts": list(mm.batch_size_counts)[:64],
                          "window": None if w is None else {
                              "start_ms": w.start_ms, "end_ms": w.end_ms,
                              "requests": w.requests, "errors": w.errors, "reset": w.reset}}))
            if not rows:
                rows.append(MetricSample(**common, data={"buffered": m.buffered}))
            rows[0].data = {**rows[0].data, "host": _to_dict(host)}
            s.add_all(rows)
            d = s.get(Device, dev)
            if d is not None:
                d.last_seen_ms = now
                s.add(d)
        self._samples += 1
        if self._samples % 500 == 0:
            self.prune_metrics()

    def prune_metrics(self) -> None:
        """Delete samples, windows and snapshots older than ``metrics_retention_s``."""
        cutoff = _now_ms() - self.metrics_retention_s * 1000
        with session_scope(self.engine) as s:
            s.exec(delete(MetricSample).where(MetricSample.at_ms < cutoff))  # type: ignore[call-overload,arg-type]
            windows.prune(s, cutoff_ms=cutoff)


class _Garbage(Exception):
    """A payload we refuse; logged with the device id, never raised out of ``handle``."""
