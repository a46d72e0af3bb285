"""Telemetry ingest: device MQTT messages -> fleet tables, one transaction per batch.

ControllerCore subscribes to ``subscriptions()`` (MQTT 5 shared subscriptions
``$share/{group}/...`` so several controller replicas split the load) and hands every
message to ``Ingest.submit(topic, payload)``, which only sorts it into the pending batch:

- heartbeats and presence are *state*: the latest per device wins (a newer one replaces the
  queued one; counted as ``coalesced``, never as lost);
- metrics and update statuses are *events*: all kept, in arrival order;
- chunk requests go straight to the OTA publisher (it has its own queue).

``run()`` (a task of the core) writes the pending batch every ``ingest_flush_s``, or at once
when ``ingest_max_batch`` messages wait, in ONE database transaction
(controller/fleet/ingest_batch.py), on the event loop between reads (``ingest_writer_thread``:
on a worker thread; slower, see ``_off_or_on_loop``). A steady heartbeat (same models, slots, labels as the last one written)
is a narrow UPDATE of the volatile columns; only a changed one rewrites the JSON columns.
The same task runs the liveness sweep (controller/fleet/liveness.py): a device whose
heartbeats stop without a last will is marked offline after missed periods.

Nothing is dropped silently. Messages wait in memory while the database is behind; beyond
``ingest_max_pending`` events (metrics + statuses) the oldest are dropped and counted by
reason, with a log line. A failed transaction is retried; after three failures the batch is
written one message per transaction, so one poisonous message cannot hold back the rest.
``stats()`` has the counters, batch sizes and the ingest lag (receive -> commit) p50/p99.

Payloads are untrusted: size limits, the device id in the payload must match the topic, and
garbage is dropped with a log line naming the device and the reason. ``handle`` (submit +
write now, synchronously) never raises; tests and single-message callers use it.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Engine

from controller.fleet import ingest_batch, liveness
from controller.fleet.ingest_batch import Batch, Garbage
from controller.fleet.ingest_batch import allowed_transition as allowed_transition
from controller.fleet.ingest_batch import rollout_state as rollout_state
from controller.fleet.windows import percentile  # noqa: F401  (re-exported: callers import it here)
from controller.settings import Settings
from protos import topics

log = logging.getLogger(__name__)

TERMINAL = ingest_batch.TERMINAL
_LAG_SAMPLES = 4096
#: upper bounds (ms) of the cumulative ingest-lag histogram (last bucket: above)
LAG_BOUNDS_MS = (50, 100, 200, 500, 1000, 2000, 5000, 10_000, 30_000)


def _now_ms() -> int:
    return int(time.time() * 1000)


class Ingest:
    """Turns device messages into rows. ``on_change(kind)`` is called (on the event loop,
    once per batch) after rollout-relevant changes so the reconcile loop can react at once."""

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
        self.writer = ingest_batch.BatchWriter(settings, engine)
        self.sweeper = liveness.Sweeper(settings, engine)
        self._batch = Batch()
        self._order = 0
        self._wake = asyncio.Event()
        self._lock = threading.Lock()      # one writer at a time (the task, drain, handle)
        self.received: Counter[str] = Counter()
        self.coalesced = 0
        self.drops: Counter[str] = Counter()      # reason -> messages dropped
        self.batches = 0
        self.batch_sizes: deque[int] = deque(maxlen=256)
        self.flush_ms: deque[float] = deque(maxlen=256)
        self.lags_ms: deque[int] = deque(maxlen=_LAG_SAMPLES)
        self.lag_counts = [0] * (len(LAG_BOUNDS_MS) + 1)   # every message since start
        self.failed_batches = 0
        self._samples = 0
        self._last_drop_log = 0.0

    @property
    def dropped(self) -> int:
        """Messages refused or lost, all reasons (garbage, oversize, overflow, write error)."""
        return sum(self.drops.values())

    def subscriptions(self) -> list[str]:
        """Topic filters to subscribe to (presence unshared: retained state reaches us)."""
        group = self.settings.shared_group or None
        subs = []
        for leaf in self.LEAVES:
            shared = None if leaf == topics.PRESENCE else group
            subs.append(topics.device_subscription(leaf, shared_group=shared))
        return subs

    # -- intake (event loop) ----------------------------------------------------------------------
    def submit(self, topic: str, payload: bytes, *, retained: bool = False) -> None:
        """Sort one message into the pending batch (cheap; never touches the database)."""
        parsed = topics.parse_device_topic(topic)
        if parsed is None:
            return self._drop("?", "bad_topic", f"not a device topic: {topic[:120]!r}")
        dev, leaf = parsed.device_id, parsed.leaf
        if len(payload) > self.settings.max_mqtt_payload_bytes:
            return self._drop(dev, "oversize",
                              f"{leaf} payload of {len(payload)} bytes exceeds "
                              f"max_mqtt_payload_bytes={self.settings.max_mqtt_payload_bytes}")
        self.received[leaf] += 1
        now = _now_ms()
        self._order += 1
        b = self._batch
        if leaf in (topics.HEARTBEAT, topics.PRESENCE):
            if leaf == topics.PRESENCE and not payload:
                return              # a retained presence cleared
            try:
                msg = (ingest_batch.parse_heartbeat(payload, dev,
                                                    self.settings.max_heartbeat_models)
                       if leaf == topics.HEARTBEAT else ingest_batch.parse_presence(payload, dev))
            except Garbage as e:
                return self._drop(dev, "garbage", f"{leaf}: {e}")
            if leaf == topics.HEARTBEAT:
                if dev in b.heartbeats:
                    self.coalesced += 1
                b.heartbeats[dev] = (msg, now, self._order)
            else:
                if dev in b.presence:
                    self.coalesced += 1
                b.presence[dev] = (msg, retained, now, self._order)
        elif leaf in (topics.METRICS, topics.UPDATE_STATUS):
            if len(b.metrics) + len(b.statuses) >= self.settings.ingest_max_pending:
                self._overflow(b)
            (b.metrics if leaf == topics.METRICS else b.statuses).append((dev, payload, now))
        elif leaf == topics.CHUNK_REQUEST:
            if self.chunk_handler is not None:
                try:
                    self.chunk_handler(dev, payload)
                except Exception as e:  # the publisher validates; never crash the loop
                    log.exception("chunk request from device %s failed: %s", dev, e)
            return
        else:
            return
        if b.size() >= self.settings.ingest_max_batch:
            self._wake.set()

    def _overflow(self, b: Batch) -> None:
        """The database is far behind: drop the oldest metrics first (statuses last)."""
        if b.metrics:
            dev, _p, _t = b.metrics.pop(0)
            self._drop(dev, "backlog_full", "metrics dropped: ingest backlog full "
                                            f"(ingest_max_pending={self.settings.ingest_max_pending})",
                       quiet=True)
        elif b.statuses:
            dev, _p, _t = b.statuses.pop(0)
            self._drop(dev, "backlog_full", "update status dropped: ingest backlog full",
                       quiet=True)

    def _drop(self, device_id: str, reason: str, detail: str, *, quiet: bool = False) -> None:
        self.drops[reason] += 1
        now = time.monotonic()
        if not quiet or now - self._last_drop_log > 5.0:
            self._last_drop_log = now
            log.warning("ignored message from device %s: %s (%d dropped for %s so far)",
                        device_id, detail, self.drops[reason], reason)

    # -- writing ---------------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes, *, retained: bool = False) -> None:
        """One message, written now (synchronously); never raises."""
        self.submit(topic, payload, retained=retained)
        self.flush_now()

    def flush_now(self) -> bool:
        """Write whatever is pending in this thread; True when rollout-relevant state moved."""
        batch = self._take()
        if batch is None:
            return False
        changed = self._write(batch)
        if changed:
            self.on_change("batch")
        return changed

    def _take(self) -> Batch | None:
        if self._batch.size() == 0:
            return None
        batch, self._batch = self._batch, Batch()
        return batch

    def _write(self, batch: Batch) -> bool:
        """Apply one batch (any thread); retried, then split, so nothing is lost to one error."""
        with self._lock:
            return self._write_locked(batch)

    def _write_locked(self, batch: Batch) -> bool:
        t0 = time.perf_counter()
        for attempt in range(3):
            try:
                result = self.writer.apply(batch)
                break
            except Exception as e:
                self.failed_batches += 1
                log.warning("ingest batch of %d messages failed (attempt %d): %s",
                            batch.size(), attempt + 1, e)
                time.sleep(0.2 * (attempt + 1))
        else:
            result = self._write_singly(batch)
        self.batches += 1
        self.batch_sizes.append(batch.size())
        self.flush_ms.append((time.perf_counter() - t0) * 1000)
        done = _now_ms()
        lags = [done - t for t in batch.received_ms()]
        self.lags_ms.extend(lags)
        for lag in lags:
            self.lag_counts[bisect.bisect_left(LAG_BOUNDS_MS, lag)] += 1
        for dev, reason, detail in result.garbage:
            self._drop(dev, reason, detail)
        self._samples += len(batch.metrics)
        if self._samples >= 5000:
            self._samples = 0
            self.prune_metrics()
        return result.changed

    def _write_singly(self, batch: Batch) -> ingest_batch.Result:
        """Last resort after repeated batch failures: one message per transaction."""
        out = ingest_batch.Result()
        for one in batch.split():
            try:
                r = self.writer.apply(one)
                out.changed |= r.changed
                out.garbage.extend(r.garbage)
            except Exception as e:
                dev = one.first_device()
                log.exception("ingest of a message from device %s failed: %s", dev, e)
                out.garbage.append((dev, "write_error", f"{type(e).__name__}: {e}"))
        return out

    async def run(self) -> None:
        """The writer task: a batch every ``ingest_flush_s`` (sooner when full) on a worker
        thread, and the liveness sweep every ``offline_check_s``."""
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + self.settings.offline_check_s
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.ingest_flush_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            changed = False
            batch = self._take()
            if batch is not None:
                changed = await self._off_or_on_loop(self._write, batch)
            if self.settings.offline_after_missed > 0 and loop.time() >= next_sweep:
                next_sweep = loop.time() + self.settings.offline_check_s
                try:
                    changed |= await self._off_or_on_loop(self.sweeper.sweep)
                except Exception as e:
                    log.warning("liveness sweep failed (retried): %s", e)
            if changed:
                self.on_change("batch")

    async def _off_or_on_loop(self, fn: Callable[..., bool], *args: Any) -> bool:
        """Run a write on the event loop (default) or on a worker thread.

        On the loop is faster: paho reads each MQTT packet with several recv() calls, and an
        event-loop thread competing for the GIL with a busy writer thread waits a switch
        interval (5 ms) after every one of them, so reading falls to ~100 packets/s while a
        batch is written. Written on the loop, a batch holds reading back for its duration
        (the bytes wait in the socket buffer), then paho drains them at full speed.
        """
        if self.settings.ingest_writer_thread:
            return await asyncio.to_thread(fn, *args)
        result = fn(*args)
        await asyncio.sleep(0)
        return result

    async def drain(self) -> None:
        """Write what is pending now (on stop, and by tests that need rows at once)."""
        batch = self._take()
        if batch is not None:
            changed = await asyncio.to_thread(self._write, batch)
            if changed:
                self.on_change("batch")

    def stats(self) -> dict[str, Any]:
        """Counters for the API (``GET /api/v1/ingest``) and benchmarks."""
        lags = sorted(self.lags_ms)
        sizes = list(self.batch_sizes)
        flush = sorted(self.flush_ms)
        return {
            "received": dict(self.received), "coalesced": self.coalesced,
            "dropped": dict(self.drops), "droppedTotal": self.dropped,
            "pending": self._batch.size(), "batches": self.batches,
            "failedBatches": self.failed_batches,
            "batchSize": {"mean": (sum(sizes) / len(sizes)) if sizes else 0,
                          "max": max(sizes) if sizes else 0},
            "flushMs": {"p50": _q(flush, 0.5), "p99": _q(flush, 0.99)},
            "lagMs": {"p50": _q(lags, 0.5), "p99": _q(lags, 0.99),
                      "max": lags[-1] if lags else None, "samples": len(lags)},
            "lagHistogramMs": {"bounds": list(LAG_BOUNDS_MS), "counts": list(self.lag_counts)},
            "offlineMarked": self.sweeper.marked,
        }

    def prune_metrics(self) -> None:
        """Delete samples, windows and snapshots older than ``metrics_retention_s``."""
        self.writer.prune(cutoff_ms=_now_ms() - self.metrics_retention_s * 1000)


def _q(values: list[Any], q: float) -> Any:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


__all__ = ["Garbage", "Ingest", "TERMINAL", "allowed_transition", "rollout_state"]
