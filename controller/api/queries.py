"""Read-only views of the fleet database, shaped as JSON-ready dicts.

Called by controller/api/app.py (JSON API) and controller/dashboard/pages.py (HTML pages), so
both show the same numbers. Every function takes an open SQLModel ``Session``; timestamps are
UTC epoch milliseconds, ages are seconds relative to ``now_ms``.

Resources (EdgeModels, EdgeRollouts, DeviceClasses) come from the embedded Resource table,
or from a ``ResourceReader`` when the core has one (``resources_of(core)``): cluster mode
(controller/cluster.py) backs it with its watch cache, so the pages show the cluster's
objects and the status the controller wrote to them. Devices, engines, rollout progress
per device, events and metrics always come from the database.

Lists that grow with the fleet stay set-based (no query per row): the device list reads only
the columns its view shows, in keyset chunks by device id with each chunk's targets and offers
in two queries; filters (``DeviceFilter``: online, stale, device class, label selector) are
SQL; ``page_devices`` pages with an opaque continue token; ``fleet_summary`` counts in grouped
queries; the models' "serving" counts are one join for every model.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from sqlalchemy import and_, case, func, literal, or_, text
from sqlalchemy.orm import load_only
from sqlalchemy.sql.elements import ColumnElement
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


# -- the device list: filters, keyset pages, the fleet summary ---------------------------------
MAX_DEVICE_PAGE = 5000      # most devices one page of GET /api/v1/devices?limit= holds
_LIST_CHUNK = 1000          # the unpaged list is read in keyset chunks of this many devices
#: the columns the list view reads; the large JSON documents (facts, slots, updates) stay in
#: the database (get_device reads them)
_LIST_COLUMNS: tuple[Any, ...] = (
    Device.device_id, Device.device_class, Device.online, Device.offline_reason, Device.models,
    Device.faults, Device.last_heartbeat_ms, Device.last_seen_ms, Device.health,
    Device.health_reason, Device.agent_version, Device.serve_url)
#: what staleness() reads (the latest metrics' ``stale``)
_STALENESS_COLUMNS: tuple[Any, ...] = (Device.device_id, Device.online, Device.offline_reason,
                                       Device.last_seen_ms, Device.last_heartbeat_ms)
#: the keys of one device_view (what ``fields=`` may name)
DEVICE_FIELDS = ("id", "device_class", "online", "status", "offline_reason", "model",
                 "version", "served", "last_heartbeat_ms", "last_heartbeat_age_s", "health",
                 "health_reason", "stale", "stale_reason", "reported_health",
                 "reported_health_reason", "update_state", "agent_version", "serve_url")
# Kubernetes label syntax: an optional DNS-subdomain prefix and "/", a name of <= 63 chars
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}$")
_LABEL_VALUE = re.compile(rf"^({_LABEL_NAME})?$")
_REQUIREMENT = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[^\s!=()]+)\s*(?:(?P<op>==|!=|=)\s*(?P<value>[^\s,()]*)"
    r"|\s+(?P<set>in|notin)\s*\((?P<values>[^()]*)\))?\s*$")


class BadQuery(ValueError):
    """A filter, limit or continue token the device list refuses (HTTP 400 with the text)."""


@dataclass(frozen=True)
class DeviceFilter:
    """What GET /api/v1/devices selects: ``online``, ``stale`` (as the list's fields),
    ``device_class`` (one or more classes) and a Kubernetes ``label_selector``."""

    online: bool | None = None
    stale: bool | None = None
    device_class: tuple[str, ...] = ()
    label_selector: str = ""
    requirements: tuple[tuple[str, str, tuple[str, ...]], ...] = field(default=(), compare=False)

    @classmethod
    def of(cls, *, online: bool | None = None, stale: bool | None = None,
           device_class: str | Iterable[str] | None = None,
           label_selector: str | None = None) -> DeviceFilter:
        """The filter from query values (``device_class``: comma-separated or a list); raises
        BadQuery naming what is wrong with a label selector."""
        raw = [device_class] if isinstance(device_class, str) else list(device_class or [])
        classes = tuple(sorted({c.strip() for part in raw for c in part.split(",")
                                if c.strip()}))
        sel = (label_selector or "").strip()
        return cls(online=online, stale=stale, device_class=classes, label_selector=sel,
                   requirements=parse_label_selector(sel))

    def fingerprint(self) -> str:
        """Short digest of the filter; a continue token only resumes the same filter."""
        doc = json.dumps([self.online, self.stale, self.device_class, self.label_selector])
        return hashlib.sha256(doc.encode()).hexdigest()[:16]

    def where(self, *, at_ms: int, stale_after_s: float) -> list[ColumnElement[bool]]:
        """The SQL conditions (AND-ed) on the Device table."""
        out: list[ColumnElement[bool]] = []
        if self.online is not None:
            out.append(col(Device.online).is_(True) if self.online
                       else col(Device.online).is_not(True))
        if self.stale is not None:
            stale = stale_condition(at_ms=at_ms, stale_after_s=stale_after_s)
            out.append(stale if self.stale else ~stale)
        if self.device_class:
            out.append(col(Device.device_class).in_(self.device_class))
        for key, op, values in self.requirements:
            value = col(Device.labels)[key].as_string()
            if op == "exists":
                out.append(value.is_not(None))
            elif op == "!exists":
                out.append(value.is_(None))
            elif op == "in":
                out.append(value.in_(values))
            elif op == "notin":
                out.append(or_(value.is_(None), value.not_in(values)))
            elif op == "=":
                out.append(value == values[0])
            else:                                       # "!=": also devices without the key
                out.append(or_(value.is_(None), value != values[0]))
        return out


def parse_label_selector(selector: str) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``, ``k in (a,b)``, ``k notin (a,b)``, comma
    separated (Kubernetes label selector syntax); raises BadQuery for anything else."""
    if not selector:
        return ()
    parts, depth, cur = [], 0, ""
    for ch in selector:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out: list[tuple[str, str, tuple[str, ...]]] = []
    for part in parts:
        m = _REQUIREMENT.match(part)
        if m is None or (m["neg"] and (m["op"] or m["set"])):
            raise BadQuery(f"labelSelector: cannot parse {part.strip()!r} (use key=value, "
                           "key!=value, key, !key, key in (a,b) or key notin (a,b))")
        key = m["key"]
        if not _LABEL_KEY.match(key):
            raise BadQuery(f"labelSelector: {key[:80]!r} is not a valid label key")
        values = ((m["value"],) if m["op"] else
                  tuple(v.strip() for v in m["values"].split(",")) if m["set"] else ())
        for v in values:
            if not _LABEL_VALUE.match(v):
                raise BadQuery(f"labelSelector: {v[:80]!r} is not a valid label value")
        op = ("!exists" if m["neg"] else "exists") if not (m["op"] or m["set"]) else (
            "=" if m["op"] in ("=", "==") else m["op"] or m["set"])
        out.append((key, op, values))
    return tuple(out)


def stale_condition(*, at_ms: int, stale_after_s: float) -> ColumnElement[bool]:
    """SQL for ``staleness(d) != ""``: offline, no message yet, or silent for longer than
    ``stale_after_s`` (the last message of any kind, else the last heartbeat)."""
    last = func.coalesce(func.nullif(col(Device.last_seen_ms), 0), col(Device.last_heartbeat_ms))
    return or_(col(Device.online).is_not(True), last.is_(None),
               literal(at_ms) - last > stale_after_s * 1000)


def encode_continue(last_id: str, flt: DeviceFilter) -> str:
    """The opaque token of the page after device ``last_id`` (base64url JSON)."""
    doc = json.dumps({"v": 1, "after": last_id, "filter": flt.fingerprint()},
                     separators=(",", ":"))
    return base64.urlsafe_b64encode(doc.encode()).decode().rstrip("=")


def decode_continue(token: str, flt: DeviceFilter) -> str:
    """The device id a continue token resumes after; BadQuery for a malformed token or one
    issued for another filter."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        doc = json.loads(raw.decode())
    except (binascii.Error, ValueError, UnicodeDecodeError) as e:
        raise BadQuery(f"invalid continue token {token[:40]!r}: not a token this server "
                       "issued (pass metadata.continue of the previous page unchanged)") from e
    if (not isinstance(doc, dict) or doc.get("v") != 1
            or not isinstance(doc.get("after"), str) or not doc["after"]):
        raise BadQuery(f"invalid continue token {token[:40]!r}: not a token this server "
                       "issued (pass metadata.continue of the previous page unchanged)")
    if doc.get("filter") != flt.fingerprint():
        raise BadQuery("continue token was issued for other filters (online, stale, "
                       "deviceClass, labelSelector); repeat them unchanged or start again "
                       "without continue")
    return str(doc["after"])


def _device_chunk(s: Session, conds: list[ColumnElement[bool]], *, after: str,
                  limit: int | None) -> list[Device]:
    q = select(Device).options(load_only(*_LIST_COLUMNS, raiseload=True))
    for c in conds:
        q = q.where(c)
    if after:
        q = q.where(col(Device.device_id) > after)
    q = q.order_by(col(Device.device_id))
    if limit is not None:
        q = q.limit(limit)
    return list(s.exec(q).all())


def _views_of(s: Session, rows: list[Device], *, at_ms: int, stale_after_s: float,
              fields: tuple[str, ...] | None) -> list[dict[str, Any]]:
    """device_view of each row, with the targets and offers of the chunk in two queries."""
    need_updates = fields is None or "update_state" in fields
    by, attempts = (_targets_by_device(s, [d.device_id for d in rows]) if need_updates and rows
                    else ({}, {}))
    views = [device_view(d, at_ms=at_ms, stale_after_s=stale_after_s,
                         targets=by.get(d.device_id), attempts=attempts) for d in rows]
    if fields is not None:
        views = [{k: v[k] for k in fields} for v in views]
    return views


def parse_fields(fields: str | None) -> tuple[str, ...] | None:
    """``fields=id,online,...`` as the keys to return (``id`` always); None = every field."""
    if not fields:
        return None
    want = [f.strip() for f in fields.split(",") if f.strip()]
    bad = [f for f in want if f not in DEVICE_FIELDS]
    if bad:
        raise BadQuery(f"fields: unknown field(s) {', '.join(bad)[:200]}; known: "
                       f"{', '.join(DEVICE_FIELDS)}")
    return tuple(dict.fromkeys(["id", *want]))


def page_devices(s: Session, *, limit: int | None = None, continue_token: str = "",
                 flt: DeviceFilter | None = None, fields: tuple[str, ...] | None = None,
                 at_ms: int | None = None,
                 stale_after_s: float = DEFAULT_STALE_AFTER_S) -> dict[str, Any]:
    """Devices by id, filtered in SQL; with ``limit`` one page (keyset on the device id) and
    ``metadata.continue`` (the token of the next page, "" on the last one) and
    ``metadata.remainingItemCount``; without, every matching device (``{"items": [...]}``).

    Paging by id never repeats or skips a device that exists for the whole walk, however
    many devices are added or removed meanwhile; one added behind the cursor is not seen."""
    flt = flt or DeviceFilter()
    at = at_ms or now_ms()
    if limit is not None and not 1 <= limit <= MAX_DEVICE_PAGE:
        raise BadQuery(f"limit must be in 1..{MAX_DEVICE_PAGE} (or 0 / absent for every "
                       f"device), got {limit}")
    after = decode_continue(continue_token, flt) if continue_token else ""
    conds = flt.where(at_ms=at, stale_after_s=stale_after_s)
    if limit is None:
        items: list[dict[str, Any]] = []
        while True:
            rows = _device_chunk(s, conds, after=after, limit=_LIST_CHUNK)
            items.extend(_views_of(s, rows, at_ms=at, stale_after_s=stale_after_s,
                                   fields=fields))
            if len(rows) < _LIST_CHUNK:
                return {"items": items}
            after = rows[-1].device_id
    rows = _device_chunk(s, conds, after=after, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    meta: dict[str, Any] = {"continue": encode_continue(rows[-1].device_id, flt) if more else ""}
    if more:
        q = select(func.count()).select_from(Device).where(
            col(Device.device_id) > rows[-1].device_id, *conds)
        meta["remainingItemCount"] = int(s.exec(q).one())
    return {"items": _views_of(s, rows, at_ms=at, stale_after_s=stale_after_s, fields=fields),
            "metadata": meta}


def list_devices(s: Session, *, at_ms: int | None = None,
                 stale_after_s: float = DEFAULT_STALE_AFTER_S) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = page_devices(s, at_ms=at_ms,
                                               stale_after_s=stale_after_s)["items"]
    return items


def _active_versions_sql(s: Session) -> list[tuple[Any, Any, int]] | None:
    """(model, version, devices) of the model each device shows in the list (_active_model:
    its first active main model, else its first active one), grouped in SQL; None on a
    database without JSON table functions here (the caller counts in Python)."""
    dialect = s.get_bind().dialect.name
    if dialect == "sqlite":
        sql = """
            SELECT name, version, count(*) FROM (
              SELECT json_extract(j.value, '$.name') AS name,
                     json_extract(j.value, '$.version') AS version,
                     row_number() OVER (PARTITION BY d.device_id ORDER BY
                       (coalesce(json_extract(j.value, '$.variant'), '') = '') DESC,
                       CAST(j.key AS INTEGER)) AS rn
              FROM device AS d, json_each(d.models) AS j
              WHERE json_type(d.models) = 'array' AND json_extract(j.value, '$.active') = 1
            ) WHERE rn = 1 GROUP BY name, version"""
    elif dialect == "postgresql":
        sql = """
            SELECT name, version, count(*) FROM (
              SELECT j.value ->> 'name' AS name, j.value ->> 'version' AS version,
                     row_number() OVER (PARTITION BY d.device_id ORDER BY
                       (coalesce(j.value ->> 'variant', '') = '') DESC, j.idx) AS rn
              FROM device AS d
              CROSS JOIN LATERAL json_array_elements(
                CASE WHEN json_typeof(d.models) = 'array' THEN d.models ELSE '[]'::json END)
                WITH ORDINALITY AS j(value, idx)
              WHERE j.value ->> 'active' = 'true'
            ) AS picked WHERE rn = 1 GROUP BY name, version"""
    else:
        return None
    return [(r[0], r[1], int(r[2])) for r in s.connection().execute(text(sql)).all()]


def _model_key(name: Any, version: Any) -> str:
    try:
        v = int(version or 0)
    except (TypeError, ValueError):
        v = 0
    return f"{name or ''}@{v}"


def fleet_summary(s: Session, *, at_ms: int | None = None,
                  stale_after_s: float = DEFAULT_STALE_AFTER_S) -> dict[str, Any]:
    """Counts over every device, as the full list's fields would give them, in a few grouped
    queries: ``total``, ``online`` / ``offline`` (``online``), ``stale`` (``stale``),
    ``by_class`` (same four per device class), ``by_health`` (``health``: "stale" for stale
    devices), ``by_agent_version``, ``by_model_version`` ("model@version" of the list's
    ``model``/``version``; devices serving nothing are ``not_serving``)."""
    at = at_ms or now_ms()
    stale = stale_condition(at_ms=at, stale_after_s=stale_after_s)
    online = col(Device.online).is_(True)

    def n(cond: ColumnElement[bool]) -> Any:
        return func.coalesce(func.sum(case((cond, 1), else_=0)), 0)

    by_class: dict[str, dict[str, int]] = {}
    for cls_, total, on, st in s.exec(select(
            Device.device_class, func.count(), n(online), n(stale))
            .group_by(col(Device.device_class)).order_by(col(Device.device_class))).all():
        by_class[cls_] = {"total": int(total), "online": int(on), "offline": int(total - on),
                          "stale": int(st)}
    health = case((stale, "stale"), else_=col(Device.health))
    by_health = {str(h): int(c) for h, c in s.exec(
        select(health, func.count()).group_by(health).order_by(health)).all()}
    by_agent = {str(v): int(c) for v, c in s.exec(
        select(Device.agent_version, func.count()).group_by(col(Device.agent_version))
        .order_by(col(Device.agent_version))).all()}
    grouped = _active_versions_sql(s)
    by_model: dict[str, int] = {}
    if grouped is None:                 # another database: the models column, in Python
        for models in s.exec(select(Device.models)).all():
            m = _active_model(list(models or []))
            if m is not None:
                grouped_key = _model_key(m.get("name"), m.get("version"))
                by_model[grouped_key] = by_model.get(grouped_key, 0) + 1
    else:
        for name, version, c in grouped:
            key = _model_key(name, version)
            by_model[key] = by_model.get(key, 0) + c
    total = sum(v["total"] for v in by_class.values())
    on = sum(v["online"] for v in by_class.values())
    return {
        "at_ms": at, "stale_after_s": stale_after_s, "total": total, "online": on,
        "offline": total - on, "stale": sum(v["stale"] for v in by_class.values()),
        "by_class": by_class, "by_health": by_health, "by_agent_version": by_agent,
        "by_model_version": dict(sorted(by_model.items())),
        "not_serving": total - sum(by_model.values()),
    }


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


def _model_view(s: Session, view: dict[str, Any], *, full: bool,
                serving: dict[tuple[str, int], str] | None = None) -> dict[str, Any]:
    view = dict(view)
    spec = view["spec"] or {}
    status = view["status"] or {}
    view["version"] = spec.get("version")
    view["source_sha256"] = (spec.get("source") or {}).get("sha256", "") or status.get(
        "sourceSha256", "")
    view["compiled"] = status.get("compiledClasses", "")
    key = (str(view.get("name") or ""), int(spec.get("version") or 0))
    view["serving"] = (serving if serving is not None else _serving_counts(s, [key])).get(
        key, "0/0")
    view["message"] = status_message(status)
    if full and view["source_sha256"]:
        engines = s.exec(select(Engine).where(Engine.model_sha256 == view["source_sha256"])).all()
        view["engines"] = [{
            "device_class": e.device_class, "precision": e.precision,
            "engine_kind": e.engine_kind, "engine_sha256": e.engine_sha256, "size": e.size,
            "toolchain_version": e.toolchain_version, "report": e.report,
        } for e in engines]
    return view


class _Served:
    """The one Device attribute controller.reconcile.targets.served reads (``models``), from
    a column-only query instead of whole Device rows."""

    __slots__ = ("models",)

    def __init__(self, models: Any) -> None:
        self.models = models or []


def _serving_counts(s: Session, keys: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """Per (model, version): "N/M", devices that serve exactly their desired target of
    ``model`` at that version, of the devices whose desired target is that version (desired
    vs observed); one query (targets joined to the devices' ``models``) for all of them."""
    want = set(keys)
    names = sorted({k[0] for k in want})
    counts: dict[tuple[str, int], list[int]] = {k: [0, 0] for k in want}
    if not names:
        return {}
    q = (select(DeviceTarget, Device.models)
         .join(Device, col(Device.device_id) == col(DeviceTarget.device_id), isouter=True)
         .where(col(DeviceTarget.model_name).in_(names), DeviceTarget.variant == ""))
    for t, models in s.exec(q).all():
        c = counts.get((t.model_name, int(t.version)))
        if c is None:
            continue
        c[1] += 1
        c[0] += reached(t, served(cast(Device, _Served(models)), t.model_name))
    return {k: f"{n}/{m}" for k, (n, m) in counts.items()}


def list_models(s: Session, *, resources: ResourceReader | None = None) -> list[dict[str, Any]]:
    views = _views(s, EDGE_MODEL, resources)
    serving = _serving_counts(s, [(str(v.get("name") or ""), int((v["spec"] or {}).get(
        "version") or 0)) for v in views])
    return [_model_view(s, v, full=False, serving=serving) for v in views]


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
    every: list[dict[str, Any]] = []
    if full:
        rows = s.exec(select(DeviceRollout).where(DeviceRollout.rollout == key)
                      .order_by(col(DeviceRollout.wave), col(DeviceRollout.device_id))).all()
        every = [_device_rollout_view(x) for x in rows]
        bytes_sent = sum(x["bytes_sent"] for x in every)
    else:               # the list needs only the sum: no row per device
        bytes_sent = int(s.exec(select(func.coalesce(func.sum(DeviceRollout.bytes_sent), 0))
                                .where(DeviceRollout.rollout == key)).one())
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
        "bytes_sent_total": bytes_sent,
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
    devices = {d.device_id: d for d in s.exec(select(Device).options(load_only(
        *_STALENESS_COLUMNS, raiseload=True)).where(
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
