"""Liveness sweep: devices whose heartbeats stopped without a last will are marked offline.

A board that loses power behind a NAT, or whose broker session hangs, may never get its last
will published; its row would read "online" forever. ``Sweeper.sweep()`` (run by the ingest's
writer task every ``settings.offline_check_s``) marks offline, with reason
``missed-heartbeats`` and a DeviceOffline Event, every online device whose last heartbeat is
older than ``offline_after_missed`` of its heartbeat periods (the period the agent reports in
``Heartbeat.heartbeat_interval_ms``, else ``settings.heartbeat_interval_s``).

The clock starts no earlier than the sweeper itself: after a controller restart every device
gets a full allowance before it is judged, so a restart does not flap the whole fleet.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import BigInteger, and_, func, literal
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from controller.fleet import events
from controller.fleet.db import session_scope
from controller.fleet.models import Device
from controller.settings import Settings

log = logging.getLogger(__name__)

REASON = "missed-heartbeats"


def _big(v: int) -> Any:
    return literal(v, BigInteger)


def _now_ms() -> int:
    return int(time.time() * 1000)


class Sweeper:
    """Marks silent devices offline; ``marked`` counts them since start."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.started_ms = _now_ms()
        self.marked = 0

    def sweep(self, *, now_ms: int | None = None) -> bool:
        """One pass; True when a device was marked offline."""
        missed = self.settings.offline_after_missed
        if missed <= 0:
            return False
        now = now_ms if now_ms is not None else _now_ms()
        # epoch milliseconds overflow a 32-bit INTEGER parameter (PostgreSQL): BIGINT binds
        default_ms = _big(int(self.settings.heartbeat_interval_s * 1000))
        period = func.coalesce(func.nullif(col(Device.heartbeat_interval_ms), 0), default_ms)
        last = func.coalesce(col(Device.last_heartbeat_ms), col(Device.last_seen_ms), _big(0))
        allowance = period * _big(missed)
        # silence is counted from max(last heartbeat, sweeper start): nothing is judged on
        # silence from before this controller started
        cond = and_(col(Device.online).is_(True), last + allowance < _big(now),
                    _big(self.started_ms) + allowance < _big(now))
        with session_scope(self.engine) as s:
            rows = s.exec(select(Device).where(cond)).all()
            if not rows:
                return False
            said = []
            for d in rows:
                silent_s = (now - (d.last_heartbeat_ms or d.last_seen_ms or now)) / 1000
                d.online, d.offline_since_ms, d.offline_reason = False, now, REASON
                s.add(d)
                said.append({"kind": "Device", "name": d.device_id, "type_": "Warning",
                             "reason": events.DEVICE_OFFLINE,
                             "message": f"device {d.device_id} is offline ({REASON}: no "
                                        f"heartbeat for {silent_s:.0f} s)"})
            events.emit_many(s, said, now_ms=now)
            self.marked += len(rows)
        log.warning("%d device(s) marked offline: no heartbeat for %d periods", len(rows), missed)
        return True


__all__ = ["REASON", "Sweeper"]
