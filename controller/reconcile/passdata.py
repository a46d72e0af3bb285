"""The rows one rollout pass reads, loaded in a few bulk queries.

controller.reconcile.rollouts used to open a session and run two or three queries per
device per pass (its DeviceTarget, the DeviceRollout row of the offer carrying it), so a
pass over 10,000 devices ran tens of thousands of statements even when nothing changed.
:class:`PassData` loads every DeviceTarget of the rollout's model in one query and the
offers they reference in batches of :data:`BATCH` update ids; the pass then looks rows up
in memory and writes only what it changes (targets created or moved, ``reached_ms``),
in one session per step. Rows are detached (sessions do not expire on commit): a changed
one is written by adding it to a session, which updates only the changed columns.

Rows only read (devices, offers) come as plain column rows (:func:`read_rows`, attribute
access like the model's; building ORM objects dominated a pass over a big fleet); targets
are ORM objects, since the pass changes them.

A snapshot: the ingest may move an offer's state while the pass runs; the next pass sees
it (the reconcile is level-triggered). An offer made during the pass is added with
:meth:`PassData.put_attempt`; an update id not in the snapshot is read on demand.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select as columns
from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import SQLModel, col, select

from controller.fleet.db import session_scope
from controller.fleet.models import Device, DeviceRollout, DeviceTarget

BATCH = 500
# Device columns a rollout pass reads (not facts or the updates list)
DEVICE_FIELDS = ("device_id", "device_class", "labels", "online", "health", "uptime_s",
                 "last_heartbeat_ms", "models", "slots", "faults")


def read_rows(db: DbEngine, model: type[SQLModel], *where: Any,
              fields: Iterable[str] | None = None) -> list[Any]:
    """Rows of ``model``'s table (``fields`` only, default all) as read-only column rows."""
    table: Any = model.__table__  # type: ignore[attr-defined]
    cols = [table.c[f] for f in fields] if fields is not None else [table]
    with session_scope(db) as s:
        return list(s.connection().execute(columns(*cols).where(*where)))


def read_devices(db: DbEngine, *where: Any) -> list[Device]:
    """Device rows (the :data:`DEVICE_FIELDS`), read-only, typed as the model for callers."""
    return read_rows(db, Device, *where, fields=DEVICE_FIELDS)


class PassData:
    """DeviceTargets of one model by (device, variant) and their offers by update id."""

    def __init__(self, db: DbEngine, model: str) -> None:
        """Read every target of ``model`` and the offers they reference."""
        self.db = db
        self.model = model
        self.targets: dict[tuple[str, str], DeviceTarget] = {}
        self.attempts: dict[tuple[str, str], Any] = {}     # DeviceRollout rows (read-only)
        self._dirty: dict[int, DeviceTarget] = {}
        with session_scope(db) as s:
            for t in s.exec(select(DeviceTarget).where(DeviceTarget.model_name == model)):
                self.targets[(t.device_id, t.variant)] = t
        self._load_attempts(t for t in self.targets.values())

    def _load_attempts(self, targets: Iterable[DeviceTarget]) -> None:
        want = sorted({t.update_id for t in targets if t.update_id})
        for i in range(0, len(want), BATCH):
            batch = want[i:i + BATCH]
            for r in read_rows(self.db, DeviceRollout, col(DeviceRollout.update_id).in_(batch)):
                self.attempts[(r.update_id, r.device_id)] = r
        for t in self.targets.values():
            if t.update_id:
                self.attempts.setdefault((t.update_id, t.device_id), None)

    def target(self, device_id: str, variant: str = "") -> DeviceTarget | None:
        return self.targets.get((device_id, variant))

    def put_target(self, t: DeviceTarget) -> None:
        self.targets[(t.device_id, t.variant)] = t

    def attempt(self, t: DeviceTarget | None) -> DeviceRollout | None:
        """The offer carrying target ``t`` (None when it has none yet); read-only."""
        if t is None or not t.update_id:
            return None
        key = (t.update_id, t.device_id)
        if key not in self.attempts:              # offered after the snapshot
            with session_scope(self.db) as s:
                self.attempts[key] = s.exec(select(DeviceRollout).where(
                    DeviceRollout.update_id == t.update_id,
                    DeviceRollout.device_id == t.device_id)).first()
        return self.attempts[key]

    def put_attempt(self, row: DeviceRollout | None) -> None:
        if row is not None:
            self.attempts[(row.update_id, row.device_id)] = row

    def mark(self, t: DeviceTarget) -> None:
        """``t`` was changed in memory: :meth:`flush` writes it."""
        if t.id is not None:
            self._dirty[t.id] = t

    def flush(self) -> int:
        """Write the targets marked changed, in one session; returns how many."""
        if not self._dirty:
            return 0
        rows, self._dirty = list(self._dirty.values()), {}
        with session_scope(self.db) as s:
            for t in rows:
                s.add(t)
        return len(rows)
