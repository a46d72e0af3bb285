"""Events: notable steps and errors of resources and devices (`edgefleet get events`).

``emit`` is called by the reconcilers (rollout gates, supersede, stall, back-out), the
finalizers and the ingest (device online/offline, failed updates). Writing the same
(reason, message) twice in a row for one object is a no-op, so level-triggered passes that
notice the same fact again do not flood the list.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import func
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import Session, col, select

from controller.fleet.db import session_scope
from controller.fleet.models import Event

log = logging.getLogger(__name__)

#: reasons used by the fleet-state layer (kubectl-style CamelCase)
DEVICE_OFFLINE = "DeviceOffline"
DEVICE_ONLINE = "DeviceOnline"
UPDATE_FAILED = "UpdateFailed"
STALLED = "Stalled"
GATE_FAILED = "GateFailed"
GATE_PASSED = "GatePassed"
ROLLED_BACK = "RolledBack"
SUPERSEDED = "Superseded"
DEVICE_FAULT = "DeviceFault"


def emit(db: DbEngine, *, kind: str, name: str, reason: str, message: str,
         type_: str = "Normal", now_ms: int) -> bool:
    """Write an Event unless the latest one of this object says the same; True if written."""
    with session_scope(db) as s:
        last = s.exec(select(Event).where(Event.kind == kind, Event.name == name)
                      .order_by(col(Event.id).desc())).first()
        if last is not None and (last.reason, last.message) == (reason, message[:2000]):
            return False
        s.add(Event(at_ms=now_ms, kind=kind, name=name, type=type_, reason=reason,
                    message=message[:2000]))
    log.info("event %s %s %s: %s", kind, name, reason, message[:300])
    return True


def emit_many(s: Session, items: list[dict[str, Any]], *, now_ms: int) -> int:
    """Many events in the caller's transaction with the same dedupe as ``emit`` (against
    each object's latest stored event and within ``items``): one query per 500 objects and
    one executemany INSERT. ``items``: dicts with kind, name, reason, message[, type_].
    Returns how many were written (the ingest writes a reconnect storm's online events so)."""
    if not items:
        return 0
    t = Event.__table__  # type: ignore[attr-defined]
    last: dict[tuple[str, str], tuple[str, str]] = {}
    keys = sorted({(str(i["kind"]), str(i["name"])) for i in items})
    for kind in sorted({k for k, _n in keys}):
        names = [n for k, n in keys if k == kind]
        for j in range(0, len(names), 500):
            part = names[j:j + 500]
            newest = (sa_select(func.max(t.c.id)).where(t.c.kind == kind, t.c.name.in_(part))
                      .group_by(t.c.name))
            for r in s.connection().execute(
                    sa_select(t.c.kind, t.c.name, t.c.reason, t.c.message)
                    .where(t.c.id.in_(newest))).all():
                last[(r.kind, r.name)] = (r.reason, r.message)
    rows = []
    for i in items:
        key, said = (str(i["kind"]), str(i["name"])), (str(i["reason"]), str(i["message"])[:2000])
        if last.get(key) == said:
            continue
        last[key] = said
        rows.append({"at_ms": now_ms, "kind": key[0], "name": key[1],
                     "type": i.get("type_", "Normal"), "reason": said[0], "message": said[1]})
    if rows:
        s.connection().execute(t.insert(), rows)
        log.info("%d events (%s ...)", len(rows), rows[0]["reason"])
    return len(rows)
