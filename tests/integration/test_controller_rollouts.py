"""EdgeRollout through ControllerCore over a real Mosquitto, with paho stand-in devices.

Covers: signed offers verified against the pinned root, chunks answered exactly as
requested and matching the signed per-chunk hashes, bad requests ignored, bytes accounting
under the fleet-wide token bucket, a failing canary stopping the rollout at its health gate,
and a restarted controller resuming without offering a device twice.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers.controller import (
    FakeDevice,
    edge_rollout,
    ready_model,
    registered_devices,
    rollout_rows,
    rollout_status,
    started_core,
    wait_until,
)

FAST = {"chunk_size_bytes": 4096, "ota_max_bytes_per_second": 256 * 1024}


async def test_one_wave_rollout_and_byte_accounting(tmp_path: Path, mosquitto) -> None:
    async with started_core(tmp_path / "c", mosquitto, **FAST) as core:
        engine_sha = await ready_model(core, tmp_path)
        devs = await registered_devices(core, mosquitto.port, ["dev-a", "dev-b"])
        core.apply([edge_rollout("r", "m", [{"name": "all", "percent": 100}])])
        st = await wait_until(lambda: (x := rollout_status(core)).get("phase") == "Complete" and x,
                              timeout_s=60, what="rollout complete")
        engine = core.store.path(engine_sha).read_bytes()
        rows = rollout_rows(core)
        for d in devs.values():
            [uid] = d.committed
            assert d.offer_messages == 1
            m = d.offers[0]
            assert m.target_sha256 == engine_sha and m.version == 1 and m.chunk_size == 4096
            assert m.codec == "full"
            payload = d.payloads[uid]
            assert rows[d.device_id].bytes_sent == len(payload) == m.payload_size
            if m.payload_sha256 == engine_sha:
                assert payload == engine
        assert st["targeted"] == 2 and st["updated"] == 2 and st["failed"] == 0
        assert st["bytesSent"] == sum(r.bytes_sent for r in rows.values())
        # every byte went through the fleet-wide token bucket
        assert core.publisher.bucket.taken_total == core.publisher.bytes_sent == st["bytesSent"]
        for d in devs.values():
            d.close()


async def test_chunk_requests_answered_exactly_and_bad_ones_ignored(tmp_path: Path,
                                                                    mosquitto) -> None:
    async with started_core(tmp_path / "c", mosquitto, **FAST) as core:
        await ready_model(core, tmp_path)
        [dev] = (await registered_devices(core, mosquitto.port, ["dev-m"], auto_fetch=False)).values()
        other = FakeDevice("dev-x", mosquitto.port, core.keys.root_public_raw(),
                           device_class="other-class")
        core.apply([edge_rollout("r", "m", [{"name": "all", "percent": 100}])])
        await wait_until(lambda: dev.offers, timeout_s=30, what="offer")
        m = dev.offers[0]
        n = len(m.chunk_sha256)
        assert n >= 4
        dev.request(m, [3, 0, 3])
        await wait_until(lambda: len(dev.chunks_seen) == 2, what="two chunks")
        rejected = core.publisher.rejected_requests
        dev.request(m, [n])                                   # out of range
        bad = type(m)(update_id="u-unknown")
        dev.request(bad, [0])                                 # unknown update id
        other.client.publish(other.topic("update/request"),   # someone else's update
                             __import__("protos.edgefleet.v1.update_pb2", fromlist=["x"])
                             .ChunkRequest(device_id="dev-x", update_id=m.update_id,
                                           indices=[1]).SerializeToString(), qos=1)
        dev.request(m, list(range(65)))                       # more than max per request
        await wait_until(lambda: core.publisher.rejected_requests == rejected + 4,
                         what="4 rejected requests")
        dev.request(m, [1])
        await wait_until(lambda: len(dev.chunks_seen) == 3, what="third chunk")
        assert dev.chunks_seen == [(m.update_id, 3), (m.update_id, 0), (m.update_id, 1)]
        assert other.chunks_seen == []
        assert rollout_rows(core)["dev-m"].bytes_sent == 3 * 4096
        dev.close()
        other.close()


async def test_failed_canary_stops_the_rollout(tmp_path: Path, mosquitto) -> None:
    async with started_core(tmp_path / "c", mosquitto, **FAST) as core:
        await ready_model(core, tmp_path)
        devs = await registered_devices(core, mosquitto.port, ["a-canary", "b-dev", "c-dev"])
        devs["a-canary"].fail_updates = True
        core.apply([edge_rollout("r", "m", [
            {"name": "canary", "count": 1, "healthGate": {"maxFailed": 0}},
            {"name": "rest", "percent": 100}])])
        st = await wait_until(lambda: (x := rollout_status(core)).get("phase") == "Paused" and x,
                              timeout_s=60, what="rollout stopped at its gate")
        assert st["currentWave"] == "canary" and st["failed"] == 1 and st["updated"] == 0
        assert "maxFailed" in st["message"] and "gate failed" in st["message"]
        degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
        assert degraded["status"] == "True" and degraded["reason"] == "GateFailed"
        assert st["devices"]["a-canary"]["state"] == "failed"
        n = core.reconcile_count
        await wait_until(lambda: core.reconcile_count >= n + 3, what="more reconciles")
        st = rollout_status(core)
        assert st["devices"]["b-dev"]["state"] == "pending"
        assert st["devices"]["c-dev"]["state"] == "pending"
        assert "b-dev" not in rollout_rows(core) and "c-dev" not in rollout_rows(core)
        assert devs["b-dev"].offer_messages == 0 and devs["c-dev"].offer_messages == 0
        for d in devs.values():
            d.close()


async def test_restart_mid_rollout_does_not_reoffer(tmp_path: Path, mosquitto) -> None:
    waves = [{"name": "canary", "count": 1, "healthGate": {"soakSeconds": 3600}},
             {"name": "rest", "percent": 100}]
    async with started_core(tmp_path / "c", mosquitto, **FAST) as core:
        await ready_model(core, tmp_path)
        devs = await registered_devices(core, mosquitto.port, ["a-canary", "b-dev", "c-dev"])
        core.apply([edge_rollout("r", "m", waves)])
        await wait_until(lambda: "observing" in rollout_status(core).get("message", ""),
                         timeout_s=60, what="canary soaking")
    assert devs["a-canary"].offer_messages == 1 and len(devs["a-canary"].committed) == 1
    async with started_core(tmp_path / "c", mosquitto, **FAST) as core:
        n = core.reconcile_count
        await wait_until(lambda: core.reconcile_count >= n + 4, what="reconciles after restart")
        st = rollout_status(core)
        assert st["phase"] == "Progressing" and st["currentWave"] == "canary"
        assert st["devices"]["a-canary"]["state"] == "updated"
        assert devs["a-canary"].offer_messages == 1
        assert devs["b-dev"].offer_messages == 0
        # end the soak: the rest goes on, the canary is not offered again
        waves[0]["healthGate"] = {"soakSeconds": 0}
        assert core.apply([edge_rollout("r", "m", waves)])[0].action == "configured"
        st = await wait_until(lambda: (x := rollout_status(core)).get("phase") == "Complete" and x,
                              timeout_s=60, what="rollout complete")
        assert st["updated"] == 3
        assert [d.offer_messages for d in devs.values()] == [1, 1, 1]
    for d in devs.values():
        d.close()


async def test_second_version_ships_a_delta_from_the_served_engine(tmp_path: Path,
                                                                   mosquitto) -> None:
    async with started_core(tmp_path / "c", mosquitto, **FAST) as core:
        v1 = await ready_model(core, tmp_path, version=1)
        devs = await registered_devices(core, mosquitto.port, ["d1", "d2"])
        core.apply([edge_rollout("r", "m", [{"name": "all", "percent": 100}])])
        await wait_until(lambda: rollout_status(core).get("phase") == "Complete", timeout_s=60,
                         what="v1 complete")
        assert all(d.served[0].sha256 == v1 for d in devs.values())
        v2 = await ready_model(core, tmp_path, marker=1.5, version=2)
        st = await wait_until(lambda: (x := rollout_status(core)).get("phase") == "Complete"
                              and x.get("version") == 2 and x, timeout_s=60, what="v2 complete")
        offers = [d.offers[-1] for d in devs.values()]
        assert all(o.target_sha256 == v2 and o.version == 2 for o in offers)
        assert {o.update_id for o in offers} == {r["updateId"] for r in st["devices"].values()}
        # both devices share one base, so they share one planned payload
        assert len({o.payload_sha256 for o in offers}) == 1
        # same weights, new bias: a delta far smaller than the engine
        assert offers[0].codec in ("bsdiff4", "tensor-xor") and offers[0].base_sha256 == v1
        assert offers[0].payload_size * 10 < core.store.size(v2)
        assert st["bytesSent"] == 2 * offers[0].payload_size
        for d in devs.values():
            d.close()
