"""EdgeRollout options through ControllerCore over a real Mosquitto and SQLite.

Covers: per-rollout ``chunkSizeBytes`` (manifest and chunks, capped by the controller,
kept across a restart), per-rollout ``maxBytesPerSecond`` (its own bucket, checked through
the bucket's accounting), the soak wake-up (next wave without a periodic resync), device
labels selecting devices, and the retained per-device state after a commit (offer cleared,
signed DesiredState published), including the real agent on reconnect.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlmodel import Session, select

from agent.app import Agent
from agent.config import config_from_dict
from agent.telemetry.heartbeat import HeartbeatBuilder
from controller.fleet.models import Device, DeviceDesired
from protos.edgefleet.v1 import device_pb2
from tests.helpers.controller import (
    edge_rollout,
    ready_model,
    registered_devices,
    rollout_rows,
    rollout_status,
    started_core,
    wait_until,
)
from tests.helpers.ota import agent_config

ALL = [{"name": "all", "percent": 100}]


async def test_rollout_chunk_size_capped_and_kept_across_restart(tmp_path: Path,
                                                                 mosquitto) -> None:
    # the controller's chunk size is 8192: one rollout asks for 4096, one for 65536 (capped)
    opts = {"chunk_size_bytes": 8192}
    async with started_core(tmp_path / "c", mosquitto, **opts) as core:
        await ready_model(core, tmp_path)
        devs = await registered_devices(core, mosquitto.port, ["small", "big"], auto_fetch=False)
        core.apply([
            edge_rollout("r4k", "m", ALL, selector={"devices": ["small"]},
                         chunkSizeBytes=4096),
            edge_rollout("r64k", "m", ALL, selector={"devices": ["big"]},
                         chunkSizeBytes=65536)])
        await wait_until(lambda: all(d.offers for d in devs.values()), what="offers")
        small, big = devs["small"].offers[0], devs["big"].offers[0]
        assert small.chunk_size == 4096 and big.chunk_size == 8192
        assert len(small.chunk_sha256) == -(-small.payload_size // 4096) >= 4
        rows = rollout_rows(core)
        assert rows["small"].chunk_size == 4096 and rows["big"].chunk_size == 8192
    # a restarted controller answers from the row: still 4096-byte chunks
    async with started_core(tmp_path / "c", mosquitto, **opts) as core:
        assert not core.publisher.offers
        d = devs["small"]
        d.auto_fetch = True
        d.request(small, list(range(min(8, len(small.chunk_sha256)))))
        st = await wait_until(lambda: (x := rollout_status(core, "r4k")).get("phase") == "Complete"
                              and x, timeout_s=60, what="r4k complete")
        assert st["updated"] == 1
        last = len(small.chunk_sha256) - 1
        assert d.payloads[small.update_id] and len(d.payloads[small.update_id]) == \
            small.payload_size
        assert core.publisher.offers[small.update_id].chunk_size == 4096
        assert last * 4096 < small.payload_size <= (last + 1) * 4096
    for dv in devs.values():
        dv.close()


async def test_rollout_max_bytes_per_second_has_its_own_bucket(tmp_path: Path,
                                                              mosquitto) -> None:
    async with started_core(tmp_path / "c", mosquitto) as core:
        await ready_model(core, tmp_path)
        [dev] = (await registered_devices(core, mosquitto.port, ["slow"])).values()
        # 1 byte per second: the first 4096-byte chunk is the burst, the second must wait
        core.apply([edge_rollout("r", "m", ALL, chunkSizeBytes=4096, maxBytesPerSecond=1)])
        bucket = await wait_until(lambda: core.publisher.rollout_bucket("default/r"),
                                  what="rollout bucket")
        await wait_until(lambda: bucket.waiting == 1 and dev.chunks_seen, what="throttled")
        assert bucket.rate == 1 and bucket.taken_total == 4096
        assert len(dev.chunks_seen) == 1 and core.publisher.bucket.taken_total == 4096
        assert rollout_status(core)["phase"] == "Progressing"
        # lifting the cap applies to the transfer already waiting
        core.apply([edge_rollout("r", "m", ALL, chunkSizeBytes=4096,
                                 maxBytesPerSecond=64 * 1024 * 1024)])
        st = await wait_until(lambda: (x := rollout_status(core)).get("phase") == "Complete" and x,
                              timeout_s=60, what="rollout complete")
        size = dev.offers[0].payload_size
        assert bucket.rate == 64 * 1024 * 1024 and bucket.waiting == 0
        assert bucket.taken_total == size == st["bytesSent"]
        assert core.publisher.bucket.taken_total == size       # the fleet-wide one as well
        dev.close()


async def test_soak_end_starts_next_wave_without_a_resync(tmp_path: Path, mosquitto) -> None:
    # no periodic resync: only the soak timer can start the second wave
    async with started_core(tmp_path / "c", mosquitto, resync_s=3600,
                            chunk_size_bytes=8192) as core:
        await ready_model(core, tmp_path)
        devs = await registered_devices(core, mosquitto.port, ["a-canary", "b-dev"])
        core.apply([edge_rollout("r", "m", [
            {"name": "canary", "count": 1, "healthGate": {"soakSeconds": 2}},
            {"name": "rest", "percent": 100}])])
        await wait_until(lambda: "observing" in rollout_status(core).get("message", ""),
                         timeout_s=60, what="canary soaking")
        assert devs["b-dev"].offer_messages == 0
        st = await wait_until(lambda: (x := rollout_status(core)).get("phase") == "Complete" and x,
                              timeout_s=30, what="second wave after the soak")
        assert st["updated"] == 2 and devs["b-dev"].committed
        for d in devs.values():
            d.close()


def test_heartbeat_builder_sends_labels() -> None:
    hb = HeartbeatBuilder(device_id="d", device_class="c", facts=device_pb2.DeviceFacts(),
                          served=list, progress=list, labels={"site": "berlin"}).build()
    assert dict(hb.labels) == {"site": "berlin"}


async def test_match_labels_selects_by_heartbeat_labels(tmp_path: Path, mosquitto) -> None:
    async with started_core(tmp_path / "c", mosquitto, chunk_size_bytes=8192) as core:
        await ready_model(core, tmp_path)
        devs = await registered_devices(core, mosquitto.port, ["berlin-1", "paris-1"])
        devs["berlin-1"].labels = {"site": "berlin", "tier": "edge"}
        devs["paris-1"].labels = {"site": "paris", "tier": "edge"}
        for d in devs.values():
            d.heartbeat()
        with Session(core.db) as s:
            await wait_until(lambda: s.get(Device, "paris-1", populate_existing=True)
                             .labels.get("site") == "paris", what="labels stored")
        core.apply([edge_rollout("r", "m", ALL, selector={"matchLabels": {"site": "berlin"}})])
        st = await wait_until(lambda: (x := rollout_status(core)).get("phase") == "Complete" and x,
                              timeout_s=60, what="rollout complete")
        assert st["targeted"] == 1 and list(st["devices"]) == ["berlin-1"]
        assert devs["paris-1"].offer_messages == 0 and set(rollout_rows(core)) == {"berlin-1"}
        # a device whose labels start to match joins the rollout
        devs["paris-1"].labels = {"site": "berlin"}
        devs["paris-1"].heartbeat()
        st = await wait_until(lambda: (x := rollout_status(core)).get("updated") == 2 and x,
                              timeout_s=60, what="relabelled device updated")
        assert st["phase"] == "Complete" and devs["paris-1"].committed
        for d in devs.values():
            d.close()


async def test_commit_clears_offer_and_publishes_desired_state(tmp_path: Path,
                                                               mosquitto) -> None:
    async with started_core(tmp_path / "c", mosquitto, chunk_size_bytes=8192) as core:
        v1 = await ready_model(core, tmp_path)
        devs = await registered_devices(core, mosquitto.port, ["d1", "d2"])
        core.apply([edge_rollout("r", "m", ALL)])
        await wait_until(lambda: rollout_status(core).get("phase") == "Complete", timeout_s=60,
                         what="rollout complete")
        for d in devs.values():
            await wait_until(lambda d=d: d.empty_offers >= 1 and d.desired, what="cleared")
            [ds] = d.desired
            assert ds.generation == 1 and [(m.name, m.version, m.target_sha256, m.update_id)
                                           for m in ds.models] == [
                ("m", 1, v1, d.committed[0])]
        with Session(core.db) as s:
            rows = s.exec(select(DeviceDesired)).all()
        assert {(r.device_id, r.generation, r.offer_update_id) for r in rows} == {
            ("d1", 1, ""), ("d2", 1, "")}
        # a reconnecting device gets the desired state and no old offer
        d1 = devs["d1"]
        d1.reconnect()
        await wait_until(lambda: d1.desired, what="retained desired state")
        assert d1.offer_messages == 0 and d1.empty_offers == 0
        # more passes publish nothing new
        n = core.reconcile_count
        await wait_until(lambda: core.reconcile_count >= n + 3, what="more reconciles")
        assert len(devs["d2"].desired) == 1 and d1.desired[0].generation == 1
        # a new version: a new offer, then generation 2 once committed
        v2 = await ready_model(core, tmp_path, version=2, marker=1.5)
        await wait_until(lambda: rollout_status(core).get("version") == 2
                         and rollout_status(core).get("phase") == "Complete", timeout_s=60,
                         what="v2 complete")
        await wait_until(lambda: d1.desired and d1.desired[-1].generation >= 2
                         and d1.desired[-1].models[0].target_sha256 == v2, what="desired v2")
        for d in devs.values():
            d.close()


async def test_real_agent_labels_cleared_offer_and_desired_state(tmp_path: Path, mosquitto,
                                                                 caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="agent")
    async with started_core(tmp_path / "c", mosquitto, chunk_size_bytes=8192) as core:
        await ready_model(core, tmp_path)
        who = SimpleNamespace(device_id="agent-1", device_class="cpu-x86-64",
                              root_public_b64=core.keys.root_public_b64())
        cfg = agent_config(tmp_path, host=mosquitto.host, port=mosquitto.port, driver=who,
                           labels={"site": "lab"})
        agent = Agent(config_from_dict(cfg))
        agent.start()
        try:
            def labelled() -> bool:
                with Session(core.db) as s:
                    d = s.get(Device, "agent-1")
                    return d is not None and d.labels == {"site": "lab"}

            await wait_until(labelled, what="agent heartbeat with labels")
            core.apply([edge_rollout("r", "m", ALL, selector={"matchLabels": {"site": "lab"}})])
            await wait_until(lambda: rollout_status(core).get("phase") == "Complete", timeout_s=60,
                             what="agent committed")
            await wait_until(lambda: agent.desired_generation == 1, what="desired state")
            await wait_until(lambda: _desired(core) and all(
                not r.offer_update_id for r in _desired(core)), what="offer cleared")
            # the live agent got the zero-length retained offer and took it silently
            await wait_until(lambda: any("retained offer cleared" in r.getMessage()
                                         for r in caplog.records), what="empty offer seen")
            assert not [r for r in caplog.records if "offer" in r.getMessage()
                        and r.levelno >= logging.WARNING]
        finally:
            agent.stop()
        # the agent comes back: no offer is redelivered, nothing is logged as refused
        caplog.clear()
        agent = Agent(config_from_dict(cfg))
        agent.start()
        try:
            await wait_until(lambda: agent.desired_generation == 1, what="desired on restart")
            assert not [r for r in caplog.records if "offer" in r.getMessage()
                        and r.levelno >= logging.WARNING]
            assert agent.updates.highest_committed("m") == 1
        finally:
            agent.stop()


def _desired(core: Any) -> list[DeviceDesired]:
    with Session(core.db) as s:
        return list(s.exec(select(DeviceDesired)).all())
