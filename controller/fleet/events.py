"""Events: notable steps and errors of resources and devices (`edgefleet get events`).

``emit`` is called by the reconcilers (rollout gates, supersede, stall, back-out), the
finalizers and the ingest (device online/offline, failed updates). Writing the same
(reason, message) twice in a row for one object is a no-op, so level-triggered passes that
notice the same fact again do not flood the list.
"""

from __future__ import annotations

import logging

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
        return emit_in(s, kind=kind, name=name, reason=reason, message=message, type_=type_,
                       now_ms=now_ms)


def emit_in(s: Session, *, kind: str, name: str, reason: str, message: str,
            type_: str = "Normal", now_ms: int) -> bool:
    """``emit`` inside the caller's transaction (the batched ingest writes its events with
    the rows that caused them: both land or neither)."""
    s.flush()      # an event added earlier in this transaction counts for the dedupe
    last = s.exec(select(Event).where(Event.kind == kind, Event.name == name)
                  .order_by(col(Event.id).desc())).first()
    if last is not None and (last.reason, last.message) == (reason, message[:2000]):
        return False
    s.add(Event(at_ms=now_ms, kind=kind, name=name, type=type_, reason=reason,
                message=message[:2000]))
    log.info("event %s %s %s: %s", kind, name, reason, message[:300])
    return True
