"""Chunk serving to many concurrent downloaders (controller.ota.chunkqueue, publisher).

The queue merges requests per update (one entry per downloading device, re-asks add
nothing), serves one chunk per device per turn, and is sized by the live offers: 150
stand-in devices asking at once against ``chunk_queue_depth=16`` all complete, none refused,
and the payload they share is read from disk once. A real ControllerCore and Mosquitto.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlmodel import Session, select

from controller.fleet.models import Delta, Device
from controller.ota.chunkqueue import ChunkQueue, PayloadCache
from tests.helpers.controller import (
    FakeDevice,
    edge_rollout,
    ready_model,
    rollout_rows,
    rollout_status,
    started_core,
    wait_until,
)

N_DEVICES = 150


async def test_queue_merges_per_update_and_serves_round_robin() -> None:
    q = ChunkQueue(2)
    assert q.put("u1", "a", [0, 1, 2]) and q.put("u2", "b", [5])
    assert q.put("u1", "a", [1, 2, 3])             # a re-ask merges: only 3 is new
    assert q.merged == 2 and len(q) == 2 and q.chunks == 5
    assert not q.put("u3", "c", [0])               # a third download: over the room...
    assert q.put("u3", "c", [0], capacity=3)       # ...unless the live offers need it
    got = [await q.get() for _ in range(6)]
    assert got == [("a", 0), ("b", 5), ("c", 0), ("a", 1), ("a", 2), ("a", 3)]
    assert q.empty() and q.peak == 3
    q.put("u1", "a", [7])
    q.put("u2", "b", [8])
    assert q.drop(["u1"]) == 1 and await q.get() == ("b", 8) and q.empty()
    waiter = asyncio.ensure_future(q.get())
    await asyncio.sleep(0)
    q.put("u4", "d", [1])
    assert await asyncio.wait_for(waiter, 5) == ("d", 1)


def test_payload_cache_reads_a_file_once(tmp_path: Path) -> None:
    f = tmp_path / "p"
    f.write_bytes(bytes(range(256)) * 4)
    cache = PayloadCache(max_bytes=4096, max_file_bytes=2048)
    assert [cache.chunk(f, i * 100, 100) for i in range(3)] == [
        (bytes(range(256)) * 4)[i * 100:(i + 1) * 100] for i in range(3)]
    assert cache.reads == 1 and cache.hits == 2
    big = tmp_path / "big"
    big.write_bytes(b"x" * 3000)                   # over max_file_bytes: read per chunk
    assert cache.chunk(big, 2990, 100) == b"x" * 10 and cache.reads == 2


async def test_150_downloaders_at_once_against_a_queue_of_16(tmp_path: Path,
                                                             mosquitto) -> None:
    opts = {"chunk_size_bytes": 4096, "ota_max_bytes_per_second": 8 * 1024 * 1024,
            "chunk_queue_depth": 16}
    async with started_core(tmp_path / "c", mosquitto, **opts) as core:
        engine_sha = await ready_model(core, tmp_path)
        root = core.keys.root_public_raw()
        ids = [f"d{i:03d}" for i in range(N_DEVICES)]
        with ThreadPoolExecutor(16) as pool:          # paho clients connect in parallel
            devs = list(pool.map(lambda i: FakeDevice(i, mosquitto.port, root,
                                                      auto_fetch=False), ids))
            list(pool.map(lambda d: d.heartbeat(), devs))
        try:
            await wait_until(lambda: _known(core) >= N_DEVICES, timeout_s=60,
                             what="devices registered")
            core.apply([edge_rollout("r", "m", [{"name": "all", "percent": 100}])])
            await wait_until(lambda: all(d.offers for d in devs), timeout_s=120,
                             what="every device offered")
            # every device asks for its first window at once: 150 downloads queued together
            for d in devs:
                d.auto_fetch = True
                m = d.offers[0]
                d.request(m, list(range(min(d.window, len(m.chunk_sha256)))))
            st = await wait_until(lambda: (x := rollout_status(core)).get("phase")
                                  == "Complete" and x, timeout_s=120, what="rollout complete")
            pub = core.publisher
            assert st["updated"] == N_DEVICES and st["failed"] == 0
            assert pub.rejected_requests == 0
            assert pub.queue.peak > opts["chunk_queue_depth"]   # more than the old limit
            rows = rollout_rows(core)
            size = devs[0].offers[0].payload_size
            for d in devs:
                assert len(d.committed) == 1 and d.offer_messages == 1
                assert rows[d.device_id].bytes_sent == size
            assert pub.bytes_sent == pub.bucket.taken_total == size * N_DEVICES
            # one payload for every device sharing the base, read from disk once
            assert len({d.offers[0].payload_sha256 for d in devs}) == 1
            assert pub.cache.reads == 1
            with Session(core.db) as s:
                assert len(s.exec(select(Delta).where(
                    Delta.target_sha256 == engine_sha)).all()) == 1
        finally:
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda d: d.close(), devs))


def _known(core: Any) -> int:
    with Session(core.db) as s:
        return len(s.exec(select(Device.device_id)).all())
