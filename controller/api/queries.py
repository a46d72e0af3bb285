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

from sqlalchemy import and_, func
from sqlmodel import Session, col, select

from controller.fleet import windows
from controller.fleet.models import (
    Device,
    DeviceRollout,
    DeviceRolloutState,
    DeviceTarget,
    Engine,
    Event,
    MetricSample,
    Resource,
)
from controller.reconcile.targets import device_updates, reached, served

EDGE_MODEL = "EdgeModel"
EDGE_ROLLOUT = "EdgeRollout"
DEVICE_CLASS = "DeviceClass"
KINDS = (EDGE_MODEL, EDGE_ROLLOUT, DEVICE_CLASS)
DEFAULT_WINDOW_S = 60          # the window of the "live" metrics (requests/s, errors, quantiles)
DEFAULT_STALE_AFTER_S = 30.0   # controller.settings.Settings.stale_after_s


def now_ms() -> int:
    return int(time.time() * 1000)


class ResourceReader(Protocol):
    """Where resources come from when not from the Resource table (cluster mode: the watch
    cache). Objects are Kubernetes-shaped dicts (apiVersion, kind, metadata, spec, status)."""

    def list(self, kind: str) -> list[dict[str, Any]]: ...

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...


def stale_after_of(core: Any) -> float:
    """The core's ``settings.stale_after_s`` (DEFAULT_STALE_AFTER_S without one)."""
    value = getattr(getattr(core, "settings", None), "stale_after_s", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return DEFAULT_STALE_AFTER_S


def staleness(d: Device, *, at_ms: int, stale_after_s: float) -> str:
    """Why what ``d`` reported is stale ("" when fresh): offline, or silent for longer than
    ``stale_after_s`` (its last message of any kind)."""
    if not d.online:
        return f"offline ({d.offline_reason})" if d.offline_reason else "offline"
    last = d.last_seen_ms or d.last_heartbeat_ms
    if last is None:
        return "no message yet"
    silent_s = (at_ms - last) / 1000
    if silent_s > stale_after_s:
        return f"no message for {silent_s:.0f} s (stale after {stale_after_s:g} s)"
    return ""


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


def _targets_by_device(s: Session, ids: list[str] | None
                       ) -> tuple[dict[str, list[DeviceTarget]], dict[str, DeviceRollout]]:
    """Desired targets per device and the offers carrying them (two queries)."""
    q = select(DeviceTarget)
    if ids is not None:
        q = q.where(col(DeviceTarget.device_id).in_(ids))
    by: dict[str, list[DeviceTarget]] = {}
    for t in s.exec(q).all():
        by.setdefault(t.device_id, []).append(t)
    uids = [t.update_id for ts in by.values() for t in ts if t.update_id]
    attempts = {a.update_id: a for a in s.exec(select(DeviceRollout).where(
        col(DeviceRollout.update_id).in_(uids))).all()} if uids else {}
    return by, attempts


def device_view(d: Device, *, at_ms: int,
                stale_after_s: float = DEFAULT_STALE_AFTER_S,
                targets: list[DeviceTarget] | None = None,
                attempts: dict[str, DeviceRollout] | None = None) -> dict[str, Any]:
    """A device row; ``health`` is "stale" (and ``stale`` true, ``stale_reason`` why) when the
    device is offline or silent for longer than ``stale_after_s``; what it last reported stays
    in ``reported_health``."""
    model = _active_model(d.models)
    stale = staleness(d, at_ms=at_ms, stale_after_s=stale_after_s)
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
        "health": "stale" if stale else d.health,
        "health_reason": stale or d.health_reason,
        "stale": bool(stale),
        "stale_reason": stale,
        "reported_health": d.health,
        "reported_health_reason": d.health_reason,
        # desired vs observed for the device's targets (never the history of offers)
        "update_state": device_updates(d, targets or [], attempts or {})[0],
        "agent_version": d.agent_version,
        "serve_url": d.serve_url,
    }


def list_devices(s: Session, *, at_ms: int | None = None,
                 stale_after_s: float = DEFAULT_STALE_AFTER_S) -> list[dict[str, Any]]:
    at = at_ms or now_ms()
    rows = s.exec(select(Device).order_by(col(Device.device_id))).all()
    by, attempts = _targets_by_device(s, None)
    return [device_view(d, at_ms=at, stale_after_s=stale_after_s,
                        targets=by.get(d.device_id), attempts=attempts) for d in rows]


def get_device(s: Session, device_id: str, *, at_ms: int | None = None,
               stale_after_s: float = DEFAULT_STALE_AFTER_S,
               window_s: float = DEFAULT_WINDOW_S) -> dict[str, Any] | None:
    """One device with its served models, updates and windowed metrics (``metrics``: per
    model@version over the last ``window_s`` seconds, see latest_metrics)."""
    d = s.get(Device, device_id)
    if d is None:
        return None
    at = at_ms or now_ms()
    by, attempts = _targets_by_device(s, [device_id])
    targets = by.get(device_id, [])
    view = device_view(d, at_ms=at, stale_after_s=stale_after_s, targets=targets,
                       attempts=attempts)
    view.update({
        # per model: what the device should serve, what it serves, the offer's state
        "desired": device_updates(d, targets, attempts)[1],
        "slots": d.slots, "faults": d.faults, "restarts": d.restarts,
        "models": d.models, "updates": d.updates, "facts": d.facts, "labels": d.labels,
        "uptime_s": d.uptime_s, "heartbeat_seq": d.heartbeat_seq,
        "last_seen_ms": d.last_seen_ms, "offline_since_ms": d.offline_since_ms,
        "metrics": latest_metrics(s, device_id=device_id, at_ms=at, window_s=window_s,
                                  stale_after_s=stale_after_s),
        "metrics_window_s": window_s,
        # the history of offers, shown apart and never counted
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
    view["serving"] = _serving_count(s, str(view.get("name") or ""), spec.get("version"))
    view["message"] = status_message(status)
    if full and view["source_sha256"]:
        engines = s.exec(select(Engine).where(Engine.model_sha256 == view["source_sha256"])).all()
        view["engines"] = [{
            "device_class": e.device_class, "precision": e.precision,
            "engine_kind": e.engine_kind, "engine_sha256": e.engine_sha256, "size": e.size,
            "toolchain_version": e.toolchain_version, "report": e.report,
        } for e in engines]
    return view


def _serving_count(s: Session, model: str, version: Any) -> str:
    """"N/M": devices that serve exactly their desired target of ``model`` at its current
    version, of the devices whose desired target is that version (desired vs observed)."""
    want = int(version or 0)
    targets = s.exec(select(DeviceTarget).where(DeviceTarget.model_name == model,
                                                DeviceTarget.variant == "",
                                                DeviceTarget.version == want)).all()
    if not targets:
        return "0/0"
    devs = {d.device_id: d for d in s.exec(select(Device).where(
        col(Device.device_id).in_([t.device_id for t in targets]))).all()}
    n = sum(reached(t, served(devs.get(t.device_id), model)) for t in targets)
    return f"{n}/{len(targets)}"


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
        "variant": r.variant, "revision": r.revision, "engine_version": r.engine_version,
    }


def _rollout_view(s: Session, view: dict[str, Any], *, full: bool) -> dict[str, Any]:
    view = dict(view)
    key = f"{view['namespace']}/{view['name']}"
    rows = s.exec(select(DeviceRollout).where(DeviceRollout.rollout == key)
                  .order_by(col(DeviceRollout.wave), col(DeviceRollout.device_id))).all()
    every = [_device_rollout_view(x) for x in rows]
    spec = view["spec"] or {}
    status = view["status"] or {}
    # the counters are the controller's comparison of desired and observed for the current
    # release (status.updated/targeted); the offer rows are history, listed apart
    done, total = int(status.get("updated") or 0), int(status.get("targeted") or 0)
    view.update({
        "model": spec.get("modelRef", {}).get("name", "")
        if isinstance(spec.get("modelRef"), dict) else spec.get("model", ""),
        "devices_total": total, "devices_committed": done,
        "devices_failed": int(status.get("failed") or 0),
        "devices_stalled": int(status.get("stalled") or 0),
        "progress": f"{done}/{total}", "wave": status.get("currentWave", status.get("wave")),
        "bytes_sent_total": sum(x["bytes_sent"] for x in every),
        "message": status_message(status),
    })
    if full:
        view["devices"] = [{"device_id": d, **v} for d, v in
                           sorted((status.get("devices") or {}).items())]
        view["history"] = [x for x in every if not x["variant"]]
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


def _host_view(m: MetricSample) -> dict[str, Any]:
    return {"cpu_percent": m.cpu_percent, "agent_rss_bytes": m.agent_rss_bytes,
            "temperature_c": m.temperature_c}


def _rate(n: int, span_ms: int) -> float | None:
    return n * 1000.0 / span_ms if span_ms > 0 else None


def _metric_view(m: MetricSample, *, stats: windows.WindowStats | None, window_s: float,
                 at_ms: int, stale: bool) -> dict[str, Any]:
    """The live view of one (device, model, version): cumulative totals since the agent
    started, and requests/s, error rate and quantiles over the last ``window_s`` seconds."""
    st = stats or windows.stats_of([])
    return {
        "device_id": m.device_id, "at_ms": m.at_ms, "model": m.model_name,
        "version": m.model_version,
        # cumulative since the agent started (what the agent reports)
        "requests": m.requests, "errors": m.errors,
        "requests_total": m.requests, "errors_total": m.errors,
        # windowed: the windows that ended in [at_ms - window_s, at_ms]
        "window_s": window_s,
        "window": {"since_ms": at_ms - int(window_s * 1000), "until_ms": at_ms,
                   "first_ms": st.first_ms, "last_ms": st.last_ms, "covered_s": st.covered_s,
                   "windows": st.windows},
        "window_requests": st.requests, "window_errors": st.errors,
        "requests_per_s": st.requests_per_s, "error_rate": st.error_rate,
        "p50_ms": st.p50_ms, "p95_ms": st.p95_ms, "p99_ms": st.p99_ms,
        **_host_view(m),
        "buffered": bool((m.data or {}).get("buffered", False)),
        "stale": stale,
    }


def latest_metrics(s: Session, *, device_id: str | None = None, at_ms: int | None = None,
                   window_s: float = DEFAULT_WINDOW_S,
                   stale_after_s: float = DEFAULT_STALE_AFTER_S) -> list[dict[str, Any]]:
    """Per (device, model, version) in each device's newest Metrics message: the cumulative
    totals and host readings of that message, and the windowed values over the last
    ``window_s`` seconds; ``stale`` when the device is offline or silent (then no window is
    recent and the windowed values are None)."""
    at = at_ms or now_ms()
    newest = select(MetricSample.device_id, func.max(MetricSample.at_ms).label("at"))
    if device_id is not None:
        newest = newest.where(MetricSample.device_id == device_id)
    sub = newest.group_by(col(MetricSample.device_id)).subquery()
    q = (select(MetricSample)
         .join(sub, and_(col(MetricSample.device_id) == sub.c.device_id,
                         col(MetricSample.at_ms) == sub.c.at))
         .order_by(col(MetricSample.id).desc()))
    rows: dict[tuple[str, str, int], MetricSample] = {}
    for m in s.exec(q).all():
        rows.setdefault((m.device_id, m.model_name, m.model_version), m)
    stats = windows.recent_stats_all(s, window_s=window_s, now_ms=at, device_id=device_id)
    devices = {d.device_id: d for d in s.exec(select(Device).where(
        col(Device.device_id).in_(sorted({k[0] for k in rows})))).all()} if rows else {}
    out = []
    for key, m in sorted(rows.items()):
        d = devices.get(key[0])
        stale = (bool(staleness(d, at_ms=at, stale_after_s=stale_after_s)) if d is not None
                 else at - m.at_ms > stale_after_s * 1000)
        out.append(_metric_view(m, stats=stats.get(key), window_s=window_s, at_ms=at,
                                stale=stale))
    return out


def _sample_view(m: MetricSample) -> dict[str, Any]:
    """One Metrics message of one model: cumulative totals, and the rate, error rate and
    quantiles of its own window (since the device's previous message; None before one)."""
    w = (m.data or {}).get("window") or None
    span = int(w["end_ms"]) - int(w["start_ms"]) if w else 0
    return {
        "device_id": m.device_id, "at_ms": m.at_ms, "model": m.model_name,
        "version": m.model_version, "requests": m.requests, "errors": m.errors,
        "window": w,
        "window_s": span / 1000 if w else None,
        "requests_per_s": _rate(int(w["requests"]), span) if w else None,
        "error_rate": (int(w["errors"]) / int(w["requests"])
                       if w and int(w["requests"]) > 0 else None),
        "p50_ms": m.p50_ms, "p95_ms": m.p95_ms, "p99_ms": m.p99_ms,
        **_host_view(m),
    }


def metric_history(s: Session, device_id: str, *, limit: int = 60) -> list[dict[str, Any]]:
    """The last ``limit`` samples of one device, oldest first (the device page's chart); each
    with the values of its own window."""
    rows = s.exec(select(MetricSample).where(MetricSample.device_id == device_id)
                  .order_by(col(MetricSample.at_ms).desc(), col(MetricSample.id).desc())
                  .limit(limit)).all()
    return [_sample_view(m) for m in reversed(rows)]


def metric_windows(s: Session, device_id: str, *, model: str | None = None,
                   version: int | None = None, since_ms: int = 0, until_ms: int | None = None,
                   limit: int = 500) -> dict[str, Any]:
    """The windows of one device ending in [since_ms, until_ms] (newest ``limit``, oldest
    first) and, per model@version, their merged stats."""
    found = windows.list_windows(s, device_id=device_id, model=model, version=version,
                                 since_ms=since_ms, until_ms=until_ms, limit=limit)
    groups: dict[tuple[str, int], list[windows.MetricWindow]] = {}
    for w in found:
        groups.setdefault((w.model_name, w.model_version), []).append(w)
    return {
        "device_id": device_id, "model": model, "version": version, "since_ms": since_ms,
        "until_ms": until_ms,
        "items": [windows.window_view(w) for w in found],
        "stats": [{"model": m, "version": v, **windows.stats_of(ws).as_dict()}
                  for (m, v), ws in sorted(groups.items())],
    }
