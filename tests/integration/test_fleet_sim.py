"""bench.fleet_sim against a real Mosquitto and the real ControllerCore (ingest, reconcile,
OTA publisher): simulated devices register with their class, labels and served models,
heartbeats and metrics land in the fleet tables, an abrupt drop marks devices offline through
their last will, a silenced device keeps its connection (no will), a reconnect brings dropped
ones back, and a real rollout ships a delta from the engine the simulated devices report to all
of them, fetched chunk by chunk and committed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlmodel import Session, select

from bench.fleet_sim import Fleet, FleetConfig, ServedSpec
from controller.fleet.models import Device, DeviceRolloutState, MetricSample
from tests.helpers.controller import (
    edge_rollout,
    ready_model,
    rollout_rows,
    rollout_status,
    started_core,
    wait_until,
)

FAST = {"chunk_size_bytes": 4096, "ota_max_bytes_per_second": 512 * 1024}


def _devices(core: object, ids: list[str]) -> dict[str, Device]:
    with Session(core.db) as s:  # type: ignore[attr-defined]
        rows = [s.get(Device, i) for i in ids]
    return {r.device_id: r for r in rows if r is not None}


async def test_sim_devices_telemetry_last_will_silence_reconnect(tmp_path: Path,
                                                                  mosquitto) -> None:
    sha = "ab" * 32
    async with started_core(tmp_path / "c", mosquitto) as core:
        fleet = Fleet(FleetConfig(
            port=mosquitto.port, devices=20, heartbeat_s=1.0, metrics_s=1.0,
            labels={"site": "lab"}, labels_fn=lambda i: {"rack": str(i % 2)},
            models=(ServedSpec("m", 3, sha),), root_public_key=core.keys.root_public_raw()))
        ids = fleet.ids
        assert ids[0] == "sim-00001" and len(ids) == 20
        await fleet.start()
        try:
            assert fleet.online_count == 20 and fleet.stats.connect_failures == 0

            def registered() -> bool:
                rows = _devices(core, ids)
                return len(rows) == 20 and all(
                    r.online and r.device_class == "cpu-x86-64" and r.models
                    and r.models[0]["name"] == "m" and r.models[0]["version"] == "3"
                    and r.models[0]["sha256"] == sha for r in rows.values())

            await wait_until(registered, timeout_s=20, what="sim devices registered")
            rows = _devices(core, ids)
            assert rows["sim-00002"].labels == {"site": "lab", "rack": "1"}
            assert rows["sim-00002"].slots[0]["slot"] == "a"
            first = {i: r.heartbeat_seq for i, r in rows.items()}
            await wait_until(lambda: all(r.heartbeat_seq >= first[i] + 2
                                         for i, r in _devices(core, ids).items()),
                             timeout_s=20, what="heartbeats advance")
            # every seq the controller stored was recorded with its send time
            for i, r in _devices(core, ids).items():
                sent = fleet.heartbeats.sent_ms(i, r.heartbeat_seq)
                assert sent is not None and sent <= (r.last_heartbeat_ms or 0) + 1000

            def metrics_stored() -> bool:
                with Session(core.db) as s:
                    got = {x.device_id for x in s.exec(select(MetricSample).where(
                        MetricSample.model_name == "m", MetricSample.model_version == 3,
                        MetricSample.requests > 0)).all()}
                return set(ids) <= got

            await wait_until(metrics_stored, timeout_s=20, what="metrics rows")

            dropped, silenced = ids[:4], ids[4:7]
            assert fleet.drop(dropped) == 4
            fleet.silence(silenced)
            await wait_until(lambda: all(not r.online and r.offline_reason == "lwt"
                                         for r in _devices(core, dropped).values()),
                             timeout_s=20, what="last wills mark dropped devices offline")
            await asyncio.sleep(0.5)      # a heartbeat already on its way may still land
            quiet = {i: r.heartbeat_seq for i, r in _devices(core, silenced).items()}
            await asyncio.sleep(2.5)
            rows = _devices(core, ids)
            for i in silenced:            # connected, no heartbeat, no will
                assert rows[i].heartbeat_seq == quiet[i] and fleet.device(i).online
                # online, unless the controller's liveness sweep judged the silence
                assert rows[i].online or rows[i].offline_reason == "missed-heartbeats"
            assert all(rows[i].online for i in ids[7:])
            fleet.unsilence(silenced)

            assert await fleet.reconnect(dropped) == 4
            await wait_until(lambda: all(r.online and r.heartbeat_seq > first[i] + 2
                                         for i, r in _devices(core, dropped + silenced
                                                              ).items()),
                             timeout_s=20, what="dropped devices back, silenced ones talking")
            st = fleet.stats
            assert st.puback_failures == 0 and st.subscribe_failures == 0
            assert st.drops == 4 and st.connects == 24 and st.lost == 0
            assert st.sent["heartbeat"] == fleet.heartbeats.total
            assert st.sent["presence"] == 24 and st.sent["metrics"] > 20
        finally:
            await fleet.stop()


async def test_rollout_to_sim_devices_ships_a_delta_from_their_engine(tmp_path: Path,
                                                                      mosquitto) -> None:
    async with started_core(tmp_path / "c", mosquitto, **FAST) as core:
        v1 = await ready_model(core, tmp_path, version=1)
        fleet = Fleet(FleetConfig(
            port=mosquitto.port, devices=20, heartbeat_s=1.0, metrics_s=5.0,
            models=(ServedSpec("m", 1, v1),), root_public_key=core.keys.root_public_raw(),
            request_window=4))
        await fleet.start()
        try:
            await wait_until(lambda: len([r for r in _devices(core, fleet.ids).values()
                                          if r.models and r.models[0]["sha256"] == v1]) == 20,
                             timeout_s=20, what="sim devices serving v1 registered")
            v2 = await ready_model(core, tmp_path, marker=1.5, version=2)
            core.apply([edge_rollout("r", "m", [{"name": "all", "percent": 100}])])
            st = await wait_until(lambda: (x := rollout_status(core)).get("phase") == "Complete"
                                  and x.get("version") == 2 and x, timeout_s=60,
                                  what="rollout to the sim devices complete")
            assert st["updated"] == 20 and st["failed"] == 0
            rows = rollout_rows(core)
            assert len(rows) == 20
            for i, d in fleet.devices.items():
                row = rows[i]
                assert row.state == DeviceRolloutState.COMMITTED
                # the controller planned a delta from the engine the device reported
                assert row.base_sha256 == v1 and row.codec in ("bsdiff4", "tensor-xor")
                [served] = d.served()
                assert (served.sha256, served.version, served.slot) == (v2, 2, "b")
            assert len({r.payload_size for r in rows.values()}) == 1   # one shared delta
            s = fleet.stats
            assert s.updates_committed == 20 and s.updates_failed == s.offers_rejected == 0
            assert s.chunk_bytes == sum(r.payload_size for r in rows.values())
            assert s.sent["chunk_request"] >= 20 and s.puback_failures == 0
            assert {t.state for t in fleet.update_timings} == {"committed"}
            assert all(t.done_ms >= t.offer_ms for t in fleet.update_timings)
            # the controller sees the new engine in heartbeats: v1 now in the other slot
            dev = _devices(core, ["sim-00001"])["sim-00001"]
            assert dev.models[0]["sha256"] == v2
            assert {x["sha256"] for x in dev.slots} == {v1, v2}
        finally:
            await fleet.stop()
