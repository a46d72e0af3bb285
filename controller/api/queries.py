"""Read-only views of the fleet database, shaped as JSON-ready dicts.

Called by controller/api/app.py (JSON API) and controller/dashboard/pages.py (HTML pages), so
both show the same numbers. Every function takes an open SQLModel ``Session``; timestamps are
UTC epoch milliseconds, ages are seconds relative to ``now_ms``.

Resources (EdgeModels, EdgeRollouts, DeviceClasses) come from the embedded Resource table,
or from a ``ResourceReader`` when the core has one (``resources_of(core)``): cluster mode
(controller/cluster.py) backs it with its watch cache, so the pages show the cluster's
objects and the status the controller wrote to them. Devices, engines, rollout progress
per device, events and metrics always come from the database.
"""

from __future__ import annotations

import datetime
import time
from typing import Any, Protocol

from sqlmodel import Session, col, select

from controller.fleet.models import (
    Device,
    DeviceRollout,
    DeviceRolloutState,
    Engine,
    Event,
    MetricSample,
    Resource,
)

EDGE_MODEL = "EdgeModel"
EDGE_ROLLOUT = "EdgeRollout"
DEVICE_CLASS = "DeviceClass"
KINDS = (EDGE_MODEL, EDGE_ROLLOUT, DEVICE_CLASS)


def now_ms() -> int:
    return int(time.time() * 1000)


class ResourceReader(Protocol):
    """Where resources come from when not from the Resource table (cluster mode: the watch
    cache). Objects are Kubernetes-shaped dicts (apiVersion, kind, metadata, spec, status)."""

    def list(self, kind: str) -> list[dict[str, Any]]: ...

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...


def resources_of(core: Any) -> ResourceReader | None:
    """The core's ResourceReader (attribute ``resources``), or None: read the Resource table."""
    r = getattr(core, "resources", None)
    return r if callable(getattr(r, "list", None)) and callable(getattr(r, "get", None)) else None


def _rfc3339_ms(value: Any) -> int | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        dt = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return int(dt.timestamp() * 1000)


def _active_model(models: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The main model a device serves now (active, no variant), else any active one.

    ``models`` are protobuf ServedModel dicts (MessageToDict), where a false ``active`` is absent.
    """
    active = [m for m in models or [] if m.get("active", False)]
    main = [m for m in active if not m.get("variant")]
    pick = main or active
    return pick[0] if pick else None


def _served(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in models or [] if m.get("active", False)]


def _update_state(updates: list[dict[str, Any]]) -> str:
    """Short text of the device's latest update progress ("" when none)."""
    if not updates:
        return ""
    last = updates[-1]
    state = str(last.get("state", ""))
    return state.removeprefix("UPDATE_STATE_").lower()


def device_view(d: Device, *, at_ms: int) -> dict[str, Any]:
    model = _active_model(d.models)
    age = None if d.last_heartbeat_ms is None else max(0.0, (at_ms - d.last_heartbeat_ms) / 1000)
    return {
        "id": d.device_id,
        "device_class": d.device_class,
        "online": d.online,
        "status": "online" if d.online else "offline",
        "offline_reason": "" if d.online else d.offline_reason,
        "model": model.get("name", "") if model else "",
        "version": int(model.get("version", 0)) if model else None,
        "served": [f"{m.get('name', '')}@{m.get('version', '')}"
                   + (f" ({m['variant']})" if m.get("variant") else "")
                   for m in _served(d.models)],
        "last_heartbeat_ms": d.last_heartbeat_ms,
        "last_heartbeat_age_s": None if age is None else round(age, 1),
        "health": d.health,
        "health_reason": d.health_reason,
        "update_state": _update_state(d.updates),
        "agent_version": d.agent_version,
        "serve_url": d.serve_url,
    }


def list_devices(s: Session, *, at_ms: int | None = None) -> list[dict[str, Any]]:
    at = at_ms or now_ms()
    rows = s.exec(select(Device).order_by(col(Device.device_id))).all()
    return [device_view(d, at_ms=at) for d in rows]


def get_device(s: Session, device_id: str, *, at_ms: int | None = None) -> dict[str, Any] | None:
    d = s.get(Device, device_id)
    if d is None:
        return None
    view = device_view(d, at_ms=at_ms or now_ms())
    view.update({
        "models": d.models, "updates": d.updates, "facts": d.facts, "labels": d.labels,
        "uptime_s": d.uptime_s, "heartbeat_seq": d.heartbeat_seq,
        "last_seen_ms": d.last_seen_ms, "offline_since_ms": d.offline_since_ms,
        "metrics": latest_metrics(s, device_id=device_id),
        "rollouts": [_device_rollout_view(r) for r in s.exec(
            select(DeviceRollout).where(DeviceRollout.device_id == device_id)
            .order_by(col(DeviceRollout.updated_ms).desc())).all()],
    })
    return view


def _resource_view(r: Resource) -> dict[str, Any]:
    return {
        "kind": r.kind, "namespace": r.namespace, "name": r.name, "uid": r.uid,
        "generation": r.generation, "spec": r.spec, "status": r.status, "labels": r.labels,
        "phase": (r.status or {}).get("phase", ""), "created_ms": r.created_ms,
        "updated_ms": r.updated_ms,
    }


def object_view(obj: dict[str, Any]) -> dict[str, Any]:
    """The same view as for a Resource row, from a Kubernetes-shaped object."""
    md = obj.get("metadata") or {}
    status = obj.get("status") or {}
    created = _rfc3339_ms(md.get("creationTimestamp"))
    stamps = [t for t in (_rfc3339_ms(c.get("lastTransitionTime"))
                          for c in status.get("conditions") or [] if isinstance(c, dict))
              if t is not None]
    return {
        "kind": obj.get("kind", ""), "namespace": md.get("namespace") or "",
        "name": md.get("name", ""), "uid": md.get("uid", ""),
        "generation": int(md.get("generation") or 1), "spec": obj.get("spec") or {},
        "status": status, "labels": md.get("labels") or {}, "phase": status.get("phase", ""),
        "created_ms": created, "updated_ms": max(stamps, default=created),
    }


def _views(s: Session, kind: str, resources: ResourceReader | None) -> list[dict[str, Any]]:
    if resources is None:
        return [_resource_view(r) for r in _resources(s, kind)]
    views = [object_view(o) for o in resources.list(kind)]
    return sorted(views, key=lambda v: (v["namespace"], v["name"]))


def _view(s: Session, kind: str, namespace: str, name: str,
          resources: ResourceReader | None) -> dict[str, Any] | None:
    if resources is None:
        r = _resource(s, kind, namespace, name)
        return None if r is None else _resource_view(r)
    obj = resources.get(kind, namespace, name)
    return None if obj is None else object_view(obj)


def _resources(s: Session, kind: str) -> list[Resource]:
    return list(s.exec(select(Resource).where(Resource.kind == kind)
                       .where(col(Resource.deleted_ms).is_(None))
                       .order_by(col(Resource.namespace), col(Resource.name))).all())


def _resource(s: Session, kind: str, namespace: str, name: str) -> Resource | None:
    return s.exec(select(Resource).where(Resource.kind == kind)
                  .where(Resource.namespace == namespace).where(Resource.name == name)
                  .where(col(Resource.deleted_ms).is_(None))).first()


def _is(value: Any, want: bool) -> bool:
    return value is want or str(value).lower() == str(want).lower()


def status_message(status: dict[str, Any]) -> str:
    """The one line that says why a resource is where it is: status.message, else the message
    of a failing Ready condition, a true Degraded one, or the Ready condition."""
    if status.get("message"):
        return str(status["message"])
    conds = [c for c in status.get("conditions") or [] if isinstance(c, dict)]
    for ctype, want in (("Ready", False), ("Degraded", True), ("Ready", True)):
        for c in conds:
            if c.get("type") == ctype and _is(c.get("status"), want) and c.get("message"):
                return str(c["message"])
    return ""


def _model_view(s: Session, view: dict[str, Any], *, full: bool) -> dict[str, Any]:
    view = dict(view)
    spec = view["spec"] or {}
    status = view["status"] or {}
    view["version"] = spec.get("version")
    view["source_sha256"] = (spec.get("source") or {}).get("sha256", "") or status.get(
        "sourceSha256", "")
    view["compiled"] = status.get("compiledClasses", "")
    view["message"] = status_message(status)
    if full and view["source_sha256"]:
        engines = s.exec(select(Engine).where(Engine.model_sha256 == view["source_sha256"])).all()
        view["engines"] = [{
            "device_class": e.device_class, "precision": e.precision,
            "engine_kind": e.engine_kind, "engine_sha256": e.engine_sha256, "size": e.size,
            "toolchain_version": e.toolchain_version, "report": e.report,
        } for e in engines]
    return view


def list_models(s: Session, *, resources: ResourceReader | None = None) -> list[dict[str, Any]]:
    return [_model_view(s, v, full=False) for v in _views(s, EDGE_MODEL, resources)]


def get_model(s: Session, namespace: str, name: str, *,
              resources: ResourceReader | None = None) -> dict[str, Any] | None:
    v = _view(s, EDGE_MODEL, namespace, name, resources)
    return None if v is None else _model_view(s, v, full=True)


def list_device_classes(s: Session, *,
                        resources: ResourceReader | None = None) -> list[dict[str, Any]]:
    return _views(s, DEVICE_CLASS, resources)


def _device_rollout_view(r: DeviceRollout) -> dict[str, Any]:
    state = r.state.value if isinstance(r.state, DeviceRolloutState) else str(r.state)
    return {
        "rollout": r.rollout, "device_id": r.device_id, "model": r.model_name, "wave": r.wave,
        "version": r.version, "update_id": r.update_id, "state": state, "reason": r.reason,
        "codec": r.codec, "payload_size": r.payload_size, "bytes_sent": r.bytes_sent,
        "bytes_received": r.bytes_received, "base_sha256": r.base_sha256,
        "target_sha256": r.target_sha256, "offered_ms": r.offered_ms, "updated_ms": r.updated_ms,
        "variant": r.variant,
    }


def _rollout_view(s: Session, view: dict[str, Any], *, full: bool) -> dict[str, Any]:
    view = dict(view)
    key = f"{view['namespace']}/{view['name']}"
    rows = s.exec(select(DeviceRollout).where(DeviceRollout.rollout == key)
                  .order_by(col(DeviceRollout.wave), col(DeviceRollout.device_id))).all()
    every = [_device_rollout_view(x) for x in rows]
    # lighter variants ride along per device (their own rows); the counts are per device
    states = [x for x in every if not x["variant"]]
    done = sum(1 for x in states if x["state"] == DeviceRolloutState.COMMITTED.value)
    failed = sum(1 for x in states if x["state"] in (DeviceRolloutState.FAILED.value,
                                                     DeviceRolloutState.ROLLED_BACK.value))
    spec = view["spec"] or {}
    status = view["status"] or {}
    view.update({
        "model": spec.get("modelRef", {}).get("name", "")
        if isinstance(spec.get("modelRef"), dict) else spec.get("model", ""),
        "devices_total": len(states), "devices_committed": done, "devices_failed": failed,
        "progress": f"{done}/{len(states)}", "wave": status.get("currentWave", status.get("wave")),
        "bytes_sent_total": sum(x["bytes_sent"] for x in every),
        "message": status_message(status),
    })
    if full:
        view["devices"] = states
        view["variants"] = [x for x in every if x["variant"]]
    return view


def list_rollouts(s: Session, *,
                  resources: ResourceReader | None = None) -> list[dict[str, Any]]:
    return [_rollout_view(s, v, full=False) for v in _views(s, EDGE_ROLLOUT, resources)]


def get_rollout(s: Session, namespace: str, name: str, *,
                resources: ResourceReader | None = None) -> dict[str, Any] | None:
    v = _view(s, EDGE_ROLLOUT, namespace, name, resources)
    return None if v is None else _rollout_view(s, v, full=True)


def list_events(s: Session, *, limit: int = 100, since_ms: int = 0) -> list[dict[str, Any]]:
    rows = s.exec(select(Event).where(Event.at_ms >= since_ms)
                  .order_by(col(Event.at_ms).desc(), col(Event.id).desc()).limit(limit)).all()
    return [{"id": e.id, "at_ms": e.at_ms, "kind": e.kind, "name": e.name, "type": e.type,
             "reason": e.reason, "message": e.message} for e in rows]


def _metric_view(m: MetricSample) -> dict[str, Any]:
    return {
        "device_id": m.device_id, "at_ms": m.at_ms, "model": m.model_name,
        "version": m.model_version, "requests": m.requests, "errors": m.errors,
        "p50_ms": m.p50_ms, "p95_ms": m.p95_ms, "p99_ms": m.p99_ms,
        "cpu_percent": m.cpu_percent, "agent_rss_bytes": m.agent_rss_bytes,
        "temperature_c": m.temperature_c,
    }


def latest_metrics(s: Session, *, device_id: str | None = None) -> list[dict[str, Any]]:
    """The newest sample per (device, model); one device or all."""
    q = select(MetricSample).order_by(col(MetricSample.at_ms).desc(), col(MetricSample.id).desc())
    if device_id is not None:
        q = q.where(MetricSample.device_id == device_id)
    seen: set[tuple[str, str]] = set()
    out: list[dict[str, Any]] = []
    for m in s.exec(q.limit(500)).all():
        key = (m.device_id, m.model_name)
        if key in seen:
            continue
        seen.add(key)
        out.append(_metric_view(m))
    out.sort(key=lambda x: (x["device_id"], x["model"]))
    return out


def metric_history(s: Session, device_id: str, *, limit: int = 60) -> list[dict[str, Any]]:
    """The last ``limit`` samples of one device, oldest first (the device page's chart)."""
    rows = s.exec(select(MetricSample).where(MetricSample.device_id == device_id)
                  .order_by(col(MetricSample.at_ms).desc()).limit(limit)).all()
    return [_metric_view(m) for m in reversed(rows)]
