"""Leader election for embedded controller replicas that share one database (DbLease).

Several ``edgefleet up --db-url postgresql+psycopg://...`` replicas ingest telemetry together
(MQTT 5 shared subscriptions) and serve the API, but only one may reconcile: the holder of a
row in the ``leader_lease`` table. ControllerCore checks ``core.leader.is_leader`` before every
reconcile pass (controller/core.py); controller/embedded.py creates the lease and sets it.
Works on PostgreSQL (the multi-machine shape) and SQLite (one machine, tests).

The algorithm:

- acquire or renew = one conditional ``UPDATE leader_lease SET holder=me, expires_ms=now+lease
  WHERE name=:name AND (holder=me OR expires_ms < now)``; when no row exists yet, an INSERT,
  which loses cleanly (IntegrityError -> not leader) when another replica inserted first. The
  row is the only shared state; PostgreSQL re-checks the WHERE clause of a concurrent UPDATE
  after the other commits, so exactly one replica wins a race.
- "now" in the table is the database server's clock (one clock for every replica, so clock
  skew between replica hosts does not matter); ``transitions`` counts holder changes.
- this replica's own belief is judged with ``time.monotonic()`` from the moment *before* its
  last successful renewal was sent: ``is_leader`` is True only until ``lease_s - renew_s``
  after that moment, so it stops believing it leads at least ``renew_s`` before any other
  replica could take the lease over (that margin covers work started right after a check).
  It turns False at once when a renewal fails (error, lost the conditional update, or no
  answer before that deadline).
- database I/O runs in a worker thread (``asyncio.to_thread``) so a busy event loop does not
  block it; renewals are *started* by the event loop, so a stalled loop stops renewing and
  the lease expires in the database for the others (the stalled replica, when it wakes,
  finds its own deadline passed and is no longer the leader). At most one attempt is in
  flight: a hung one is waited for before another starts.
- ``stop()`` (clean shutdown) releases the row (holder "", expired) so a standby takes over
  at once; a replica that is killed (task cancelled, process gone) releases nothing and the
  others take over after ``lease_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import BigInteger, case, or_, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, SQLModel

log = logging.getLogger(__name__)

DEFAULT_LEASE_NAME = "edgefleet-controller"


class LeaderLease(SQLModel, table=True):
    """One named lease: who holds it and until when (database clock, epoch milliseconds)."""

    __tablename__ = "leader_lease"

    name: str = Field(primary_key=True, max_length=128)
    holder: str = Field(default="", max_length=253)
    renewed_at_ms: int = Field(default=0, sa_type=BigInteger)
    expires_ms: int = Field(default=0, sa_type=BigInteger)
    transitions: int = Field(default=0, sa_type=BigInteger)


def db_now_ms(conn: Connection) -> int:
    """The database server's wall clock in epoch milliseconds (local clock if unknown)."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        q = "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
    elif dialect == "sqlite":
        q = "SELECT CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
    else:
        return int(time.time() * 1000)
    return int(conn.execute(text(q)).scalar_one())


class DbLease:
    """Acquire and renew one row of ``leader_lease``; callbacks on gaining and losing it.

    ``run()`` is the campaign task (``asyncio.create_task(lease.run())``); ``stop()`` ends it
    and releases the lease. ``on_gained`` / ``on_lost(reason)`` are called in the event loop.
    """

    def __init__(self, engine: Engine, name: str = DEFAULT_LEASE_NAME, identity: str = "", *,
                 lease_s: float = 15.0, renew_s: float = 5.0,
                 on_gained: Callable[[], None] | None = None,
                 on_lost: Callable[[str], None] | None = None) -> None:
        if not identity:
            raise ValueError("DbLease needs an identity (the replica id)")
        if not 0 < 2 * renew_s < lease_s:
            raise ValueError(f"need 0 < 2 * renew_s < lease_s, got renew_s={renew_s} "
                             f"lease_s={lease_s}")
        self.engine = engine
        self.name, self.identity = name, identity
        self.lease_s, self.renew_s = float(lease_s), float(renew_s)
        self.deadline_s = self.lease_s - self.renew_s   # local belief ends this long after t0
        self.on_gained = on_gained
        self.on_lost = on_lost
        self.holder = ""               # the holder this replica last saw ("" = none / unknown)
        self.gained = 0                # times this replica became leader
        self.lost = 0                  # times it stopped being leader
        self.last_error = ""
        self._held = False
        self._deadline = 0.0           # monotonic time until which we may believe we lead
        self._stop = asyncio.Event()
        self._pending: asyncio.Future[bool] | None = None
        self._created = False          # the table exists (create_all ran once)

    # -- state ----------------------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        """True while this replica holds the lease and its local deadline has not passed."""
        return self._held and not self._stop.is_set() and time.monotonic() < self._deadline

    # -- lifecycle ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Campaign until ``stop()``: acquire, renew every ``renew_s``, retry when lost.

        Cancelling the task (a crash) steps down locally and releases nothing."""
        try:
            while not self._stop.is_set():
                await self._attempt_once()
                wait = self.renew_s
                if self._held:       # wake at the deadline at the latest
                    wait = max(0.0, min(wait, self._deadline - time.monotonic()))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=wait)
                if self._held and time.monotonic() >= self._deadline:
                    self._step_down("renew deadline passed")
        except asyncio.CancelledError:
            self._step_down("cancelled")
            raise
        held = self._held
        self._step_down("stopped")
        if held:
            await self._release()

    async def stop(self, task: asyncio.Task[None] | None = None) -> None:
        """End the campaign and (if held) release the lease; ``task``: the ``run()`` task."""
        self._stop.set()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- one attempt ----------------------------------------------------------------------------
    async def _attempt_once(self) -> None:
        if self._pending is not None and not self._pending.done():
            # the previous attempt hangs (DB unreachable): never more than one in flight
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._pending), timeout=self.renew_s)
            if not self._pending.done():
                self._fail("previous attempt still has no answer")
                return
        t0 = time.monotonic()
        fut: asyncio.Future[bool] = asyncio.ensure_future(
            asyncio.to_thread(self._acquire_or_renew))
        fut.add_done_callback(_consume)
        self._pending = fut
        budget = (self._deadline - t0) if self._held else self.lease_s
        try:
            ok = await asyncio.wait_for(asyncio.shield(fut), timeout=max(0.01, budget))
        except asyncio.TimeoutError:
            self._fail("no answer from the database before the renew deadline")
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._fail(f"{type(e).__name__}: {e}")
            return
        if not ok:
            if self._held:
                self._step_down(f"lease taken by {self.holder or 'another replica'}")
            return
        self.last_error = ""
        self._deadline = t0 + self.deadline_s
        if not self._held:
            if self._stop.is_set():
                return           # stop() raced the win; run() releases nothing then
            self._held = True
            self.gained += 1
            log.info("replica %s is now the leader (lease %s)", self.identity, self.name)
            self._call(self.on_gained)

    def _fail(self, reason: str) -> None:
        self.last_error = reason
        if self._held:
            self._step_down(f"renewal failed: {reason}")
        else:
            log.debug("lease %s: attempt by %s failed: %s", self.name, self.identity, reason)

    def _step_down(self, reason: str) -> None:
        if not self._held:
            return
        self._held = False
        self._deadline = 0.0
        self.lost += 1
        log.log(logging.INFO if reason == "stopped" else logging.WARNING,
                "replica %s is no longer the leader (lease %s): %s", self.identity, self.name,
                reason)
        self._call(self.on_lost, reason)

    def _call(self, cb: Callable[..., None] | None, *args: Any) -> None:
        if cb is None:
            return
        try:
            cb(*args)
        except Exception:
            log.exception("lease %s callback failed", self.name)

    async def _release(self) -> None:
        try:
            await asyncio.wait_for(asyncio.to_thread(self._release_sync), timeout=self.renew_s)
        except Exception as e:  # the lease then simply expires
            log.warning("lease %s: release by %s failed: %s", self.name, self.identity, e)

    # -- database (worker thread) ---------------------------------------------------------------
    def _timeouts(self, conn: Connection) -> None:
        if conn.dialect.name == "postgresql":
            ms = max(1, int(self.renew_s * 1000))
            conn.execute(text(f"SET LOCAL statement_timeout = {ms}"))
            conn.execute(text(f"SET LOCAL lock_timeout = {ms}"))

    def _acquire_or_renew(self) -> bool:
        """True when this replica holds the lease now (acquired, renewed or inserted)."""
        if not self._created:
            LeaderLease.__table__.create(self.engine, checkfirst=True)  # type: ignore[attr-defined]
            self._created = True
        t = LeaderLease.__table__  # type: ignore[attr-defined]
        lease_ms = int(self.lease_s * 1000)
        with self.engine.begin() as conn:
            self._timeouts(conn)
            now = db_now_ms(conn)
            res = conn.execute(
                update(t)
                .where(t.c.name == self.name,
                       or_(t.c.holder == self.identity, t.c.expires_ms < now))
                .values(holder=self.identity, renewed_at_ms=now, expires_ms=now + lease_ms,
                        transitions=case((t.c.holder == self.identity, t.c.transitions),
                                         else_=t.c.transitions + 1)))
            if res.rowcount == 1:
                self.holder = self.identity
                return True
            row = conn.execute(select(t.c.holder).where(t.c.name == self.name)).first()
            if row is not None:
                self.holder = str(row[0])
                return False
        try:
            with self.engine.begin() as conn:
                self._timeouts(conn)
                now = db_now_ms(conn)
                conn.execute(t.insert().values(name=self.name, holder=self.identity,
                                               renewed_at_ms=now, expires_ms=now + lease_ms,
                                               transitions=1))
        except IntegrityError:
            self.holder = ""             # another replica inserted first: it leads
            return False
        self.holder = self.identity
        return True

    def _release_sync(self) -> None:
        t = LeaderLease.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as conn:
            self._timeouts(conn)
            now = db_now_ms(conn)
            conn.execute(update(t).where(t.c.name == self.name, t.c.holder == self.identity)
                         .values(holder="", renewed_at_ms=now, expires_ms=0))
        self.holder = ""
        log.info("replica %s released lease %s", self.identity, self.name)


SCHEMA_LOCK_KEY = 0x65646765666C74   # PostgreSQL advisory lock id for schema creation


def make_engine_serialized(url: str) -> Engine:
    """``controller.fleet.db.make_engine`` (create_all + added columns), one replica at a time.

    Replicas starting together on an empty PostgreSQL database would race in ``create_all``
    (``CREATE TYPE ...`` / ``CREATE TABLE`` fail with a unique violation in the loser); a
    session-level advisory lock makes them take turns. Other databases: plain make_engine."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from controller.fleet.db import make_engine

    if not url.startswith("postgresql"):
        return make_engine(url)
    lock_engine = create_engine(url, poolclass=NullPool)
    try:
        with lock_engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": SCHEMA_LOCK_KEY})
            try:
                return make_engine(url)
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": SCHEMA_LOCK_KEY})
    finally:
        lock_engine.dispose()


def read_lease(engine: Engine, name: str = DEFAULT_LEASE_NAME) -> LeaderLease | None:
    """The lease row ``name`` as stored (for status pages and tests); None when absent."""
    from sqlmodel import Session

    with Session(engine) as s:
        row = s.get(LeaderLease, name)
        if row is not None:
            s.expunge(row)
        return row


def _consume(fut: asyncio.Future[bool]) -> None:
    """Retrieve an abandoned attempt's exception so asyncio does not warn about it."""
    if not fut.cancelled():
        fut.exception()
