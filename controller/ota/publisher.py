"""MQTT side of OTA: retained signed offers and key list, chunks answered on request.

ControllerCore owns the aiomqtt (MQTT 5) connection and calls ``attach(client)`` on every
(re)connect; the rollout reconciler calls ``publish_offer``; the ingest hands every
``.../update/request`` payload to ``handle_chunk_request``. Requests are validated (size,
device id matches the topic and the offer, known update id, indices in range, at most
``max_chunks_per_request``), queued, and answered by worker tasks with UpdateChunks
(QoS 1) paced by one fleet-wide token bucket of ``ota_max_bytes_per_second``; a rollout
with ``spec.maxBytesPerSecond`` also has its own bucket, queue and sender task (a "lane").
Bytes sent are added to DeviceRollout.bytes_sent (batched: one transaction when the queue
drains or every :data:`ACCOUNT_EVERY_S`). Bad requests are dropped with a log line naming
the device and the reason.

Many downloaders at once (controller.ota.chunkqueue): a request merges into its update's
entry, so the queue holds one entry per downloading device, not one per request; workers
serve one chunk per device per turn (round robin), so each of N concurrent transfers gets
a chunk every N chunks and none stalls while the fleet shares the bandwidth. A device can
only queue work for an offer made to it, so the queue is sized by the live offers
(at least ``chunk_queue_depth`` entries) and a valid request is never refused for room.
Payload bytes are served from an in-memory cache (devices sharing a base share the
cached delta, and now its bytes too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from controller.fleet.db import session_scope
from controller.fleet.models import Delta, DeviceRollout, DeviceRolloutState
from controller.ota.chunkqueue import ChunkQueue, PayloadCache
from controller.settings import Settings
from controller.store import ArtifactStore
from protos import topics
from protos.edgefleet.v1 import update_pb2
from protos.errors import RetryLater

log = logging.getLogger(__name__)

ACCOUNT_EVERY_S = 1.0          # bytes_sent written at least this often while chunks flow


class TokenBucket:
    """A byte budget: ``rate`` bytes per second, bursts up to ``burst`` bytes.

    ``taken_total`` counts every byte granted and ``waiting`` the callers blocked for tokens
    (tests check the accounting, not wall time). ``set_rate`` applies at once, also to a
    caller already waiting.
    """

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = time.monotonic()
        self.taken_total = 0
        self.waiting = 0
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()

    def set_rate(self, rate: float, burst: float) -> None:
        if (float(rate), float(burst)) == (self.rate, self.burst):
            return
        self._refill()
        self.rate, self.burst = float(rate), float(burst)
        self.tokens = min(self.tokens, self.burst)
        self._changed.set()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now

    async def take(self, n: int) -> None:
        async with self._lock:           # FIFO: one waiter refills at a time
            while True:
                self._refill()
                need = min(float(n), self.burst)
                if self.tokens >= need:
                    self.tokens -= need
                    self.taken_total += n
                    return
                self._changed.clear()
                self.waiting += 1
                try:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._changed.wait(),
                                               (need - self.tokens) / self.rate)
                finally:
                    self.waiting -= 1


@dataclass(frozen=True)
class OfferInfo:
    """What is needed to answer chunk requests for one update id."""

    update_id: str
    device_id: str
    payload_path: Path
    payload_size: int
    chunk_size: int
    rollout: str = ""                  # namespace/name
    max_bytes_per_second: int = 0      # the rollout's own cap (0 = only the fleet-wide one)

    @property
    def total(self) -> int:
        return max(1, -(-self.payload_size // self.chunk_size))


@dataclass
class _Lane:
    """Chunk traffic of one rate-capped rollout: its bucket, queue and sender task."""

    rollout: str
    rate: int
    bucket: TokenBucket
    queue: ChunkQueue
    task: asyncio.Task[None] | None = None


class Publisher:
    """Publishes offers/key lists and serves chunks over the attached MQTT client."""

    def __init__(self, settings: Settings, store: ArtifactStore, engine: Engine) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.client: Any = None
        self.bucket = TokenBucket(settings.ota_max_bytes_per_second,
                                  max(settings.ota_max_bytes_per_second,
                                      settings.chunk_size_bytes))
        self.offers: dict[str, OfferInfo] = {}
        self.queue = ChunkQueue(settings.chunk_queue_depth)
        self.cache = PayloadCache()
        self._unaccounted: dict[str, int] = {}     # update id -> bytes sent, not yet written
        self._accounted_at = time.monotonic()
        self.chunks_sent = 0
        self.bytes_sent = 0
        self.rejected_requests = 0
        self._workers: list[asyncio.Task[None]] = []
        # rollouts with spec.maxBytesPerSecond: their own bucket, queue and sender task, so a
        # slow rollout never holds the shared workers
        self.lanes: dict[str, _Lane] = {}
        # update ids of deleted rollouts: their ChunkRequests are refused
        self.cancelled: set[str] = set()

    # -- lifecycle ------------------------------------------------------------------------------
    def attach(self, client: Any) -> None:
        self.client = client

    def start(self, *, workers: int = 2) -> None:
        for i in range(workers):
            self._workers.append(asyncio.create_task(self._worker(), name=f"ota-chunks-{i}"))

    async def stop(self) -> None:
        tasks = self._workers + [lane.task for lane in self.lanes.values()
                                 if lane.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._workers.clear()
        self.lanes.clear()
        self._flush_accounting()

    def set_rollout_rate(self, rollout: str, max_bytes_per_second: int, *,
                         chunk_size: int) -> None:
        """Cap ``rollout``'s chunk traffic (on top of the fleet-wide bucket); 0 = no own cap.
        Called by the rollout reconciler on every pass, so a spec change applies at once."""
        rate = int(max_bytes_per_second or 0)
        lane = self.lanes.get(rollout)
        if rate <= 0:
            if lane is not None:    # jobs already queued there drain at the fleet rate
                fleet = self.settings.ota_max_bytes_per_second
                lane.rate = 0
                lane.bucket.set_rate(fleet, max(fleet, chunk_size))
            return
        burst = max(rate, chunk_size)
        if lane is None:
            lane = self.lanes[rollout] = _Lane(rollout, rate, TokenBucket(rate, burst),
                                               ChunkQueue(self.settings.chunk_queue_depth))
        else:
            lane.rate = rate
            lane.bucket.set_rate(rate, burst)

    def forget_rollout(self, rollout: str, update_ids: set[str]) -> None:
        """The rollout was deleted: refuse chunks for its update ids and drop its lane
        (queued jobs are dropped too). Called by controller.reconcile.cleanup."""
        ids = set(update_ids) | {u for u, i in self.offers.items() if i.rollout == rollout}
        for u in ids:
            self.offers.pop(u, None)
        self.cancelled |= ids
        self.queue.drop(ids)
        lane = self.lanes.pop(rollout, None)
        if lane is not None and lane.task is not None:
            lane.task.cancel()

    def rollout_bucket(self, rollout: str) -> TokenBucket | None:
        """The per-rollout bucket of ``rollout`` (None when it has no maxBytesPerSecond)."""
        lane = self.lanes.get(rollout)
        return lane.bucket if lane is not None and lane.rate > 0 else None

    # -- publishing -----------------------------------------------------------------------------
    async def _publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        client = self.client
        if client is None:
            raise RetryLater("not connected to the MQTT broker", reason="disconnected")
        try:
            await client.publish(topic, payload, qos=1, retain=retain)
        except Exception as e:
            raise RetryLater(f"publish to {topic} failed: {e}", reason="publish_failed") from e

    async def publish_key_list(self, env: update_pb2.SignedEnvelope) -> None:
        await self._publish(topics.TRUST_KEYS, env.SerializeToString(deterministic=True),
                            retain=True)

    async def publish_offer(self, device_id: str, env: update_pb2.SignedEnvelope,
                            info: OfferInfo, *, model_key: str = "") -> None:
        """Publish a signed offer retained on the device's offer topic of ``model_key``
        (``update/offer/{model_key}``; the legacy single ``update/offer`` when empty)."""
        if info.payload_size > 0:                   # a slot update has no chunks
            self.offers[info.update_id] = info
        self.cancelled.discard(info.update_id)      # a re-applied rollout offers it again
        leaf = topics.offer_leaf(model_key) if model_key else topics.OFFER
        await self._publish(topics.device_topic(device_id, leaf),
                            env.SerializeToString(deterministic=True), retain=True)

    async def clear_offer(self, device_id: str, model_key: str = "") -> None:
        """Remove a retained offer (an empty retained message)."""
        leaf = topics.offer_leaf(model_key) if model_key else topics.OFFER
        await self._publish(topics.device_topic(device_id, leaf), b"", retain=True)

    async def publish_desired(self, device_id: str, env: update_pb2.SignedEnvelope) -> None:
        """Publish a signed DesiredState retained on the device's desired topic."""
        await self._publish(topics.device_topic(device_id, topics.DESIRED),
                            env.SerializeToString(deterministic=True), retain=True)

    # -- chunk requests -------------------------------------------------------------------------
    def handle_chunk_request(self, device_id: str, payload: bytes) -> None:
        """Validate a ChunkRequest and queue it; never raises."""
        req = update_pb2.ChunkRequest()
        try:
            req.ParseFromString(payload)
        except (DecodeError, ValueError, RuntimeError) as e:
            return self._reject(device_id, f"malformed ChunkRequest: {e}")
        if req.device_id != device_id:
            return self._reject(device_id, f"request names device {req.device_id[:64]!r}")
        info = self._offer(req.update_id)
        if info is None:
            if req.update_id in self.cancelled:
                return self._reject(device_id, f"update {req.update_id} was cancelled "
                                               "(its rollout was deleted)")
            return self._reject(device_id, f"unknown update_id {req.update_id[:64]!r}")
        if info.device_id != device_id:
            return self._reject(device_id, f"update {req.update_id} was offered to another "
                                           "device")
        if not req.indices:
            return self._reject(device_id, "request without indices")
        if len(req.indices) > self.settings.max_chunks_per_request:
            return self._reject(device_id, f"{len(req.indices)} indices exceeds "
                                           f"max_chunks_per_request="
                                           f"{self.settings.max_chunks_per_request}")
        bad = [i for i in req.indices if i >= info.total]
        if bad:
            return self._reject(device_id, f"chunk index {bad[0]} out of range "
                                           f"(update has {info.total} chunks)")
        indices = list(dict.fromkeys(req.indices))
        queue = self.queue
        if info.rollout and (info.max_bytes_per_second > 0 or info.rollout in self.lanes):
            if info.rollout not in self.lanes:       # after a restart, before a reconcile
                self.set_rollout_rate(info.rollout, info.max_bytes_per_second,
                                      chunk_size=info.chunk_size)
            lane = self.lanes[info.rollout]
            if lane.rate > 0:
                queue = lane.queue
                if lane.task is None or lane.task.done():
                    lane.task = asyncio.create_task(self._worker(lane.queue, lane.bucket),
                                                    name=f"ota-lane-{info.rollout}")
        # one entry per download; a device only queues for its own live offer, so the room
        # grows with the offers and a valid request is never refused (see module docstring)
        if not queue.put(info.update_id, info, indices, capacity=len(self.offers)):
            self._reject(device_id, "chunk queue full; the agent will re-request")

    def _reject(self, device_id: str, reason: str) -> None:
        self.rejected_requests += 1
        log.warning("ignored chunk request from device %s: %s", device_id, reason)

    def _offer(self, update_id: str) -> OfferInfo | None:
        if not update_id or len(update_id) > 128 or update_id in self.cancelled:
            return None
        info = self.offers.get(update_id)
        if info is not None:
            return info
        # after a restart: rebuild from the DeviceRollout row and the Delta cache
        with session_scope(self.engine) as s:
            row = s.exec(select(DeviceRollout).where(
                DeviceRollout.update_id == update_id)).first()
            if row is None or not row.target_sha256:
                return None
            if row.state == DeviceRolloutState.CANCELLED:
                self.cancelled.add(update_id)
                return None
            payload_sha = ""
            for d in s.exec(select(Delta).where(Delta.target_sha256 == row.target_sha256,
                                                Delta.codec == row.codec)).all():
                if d.payload_size == row.payload_size and d.base_sha256 in ("",
                                                                            row.base_sha256):
                    payload_sha = d.payload_sha256
                    break
            if not payload_sha and row.codec in ("", "full"):
                payload_sha = row.target_sha256
        if not self.store.has(payload_sha):
            return None
        info = OfferInfo(update_id, row.device_id, self.store.path(payload_sha),
                         self.store.size(payload_sha),
                         row.chunk_size or self.settings.chunk_size_bytes,
                         rollout=row.rollout, max_bytes_per_second=row.max_bytes_per_second)
        self.offers[update_id] = info
        return info

    async def _worker(self, queue: ChunkQueue | None = None,
                      bucket: TokenBucket | None = None) -> None:
        queue = queue or self.queue
        while True:
            info, idx = await queue.get()
            try:
                await self._send(info, idx, bucket)
            except RetryLater as e:
                log.warning("chunk %d for device %s update %s not sent: %s", idx,
                            info.device_id, info.update_id, e)
            except Exception:
                log.exception("chunk worker error for device %s", info.device_id)
            if queue.empty() or time.monotonic() - self._accounted_at > ACCOUNT_EVERY_S:
                try:
                    self._flush_accounting()
                except Exception:
                    log.exception("bytes sent not recorded (retried)")

    async def _send(self, info: OfferInfo, idx: int,
                    rollout_bucket: TokenBucket | None = None) -> None:
        """One chunk, paced by the rollout's bucket (if any) and the fleet-wide one."""
        if info.update_id in self.cancelled:
            return                  # queued before its rollout was deleted
        topic = topics.device_topic(info.device_id, topics.CHUNK)
        data = self.cache.chunk(info.payload_path, idx * info.chunk_size, info.chunk_size)
        if rollout_bucket is not None:
            await rollout_bucket.take(len(data))   # the rollout's own cap first
        await self.bucket.take(len(data))
        msg = update_pb2.UpdateChunk(update_id=info.update_id, index=idx, total=info.total,
                                     data=data)
        await self._publish(topic, msg.SerializeToString(), retain=False)
        self.chunks_sent += 1
        self.bytes_sent += len(data)
        self._unaccounted[info.update_id] = self._unaccounted.get(info.update_id, 0) + len(data)

    def _flush_accounting(self) -> None:
        """Add the bytes sent since the last flush to their DeviceRollout rows (one
        transaction, an increment per update: the ingest's writes to the rows stay)."""
        self._accounted_at = time.monotonic()
        if not self._unaccounted:
            return
        todo, self._unaccounted = self._unaccounted, {}
        try:
            with session_scope(self.engine) as s:
                conn = s.connection()
                for uid, n in todo.items():
                    conn.execute(update(DeviceRollout).where(col(DeviceRollout.update_id) == uid)
                              .values(bytes_sent=col(DeviceRollout.bytes_sent) + n))
        except Exception:
            for uid, n in todo.items():          # keep them for the next flush
                self._unaccounted[uid] = self._unaccounted.get(uid, 0) + n
            raise
