"""Fleet state as desired vs observed: operator sequences over a real Mosquitto.

ControllerCore (embedded mode) with paho stand-in devices (tests.helpers.controller
FakeDevice) that verify signed offers and report what they serve. Each test is a sequence an
operator runs (apply, re-apply, downgrade, a second rollout, a lost board, a new board) and
checks that every status is still the comparison of desired and observed afterwards:
counters per target version, Superseded (never Failed) for a newer rollout's devices, two
models on one device each with their own retained offer, an offline straggler marked
Stalled that continues when it returns, late devices joining the passed wave, a paused
rollout that does not call unoffered devices "in progress".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from controller.fleet.models import Device, DeviceTarget, Event
from protos import topics
from protos.edgefleet.v1 import device_pb2
from tests.helpers.controller import (
    FakeDevice,
    edge_model,
    edge_rollout,
    mqtt_client,
    ready_model,
    registered_devices,
    rollout_status,
    started_core,
    wait_until,
)
from tests.helpers.models import build_affine

FAST = {"chunk_size_bytes": 4096, "ota_max_bytes_per_second": 1024 * 1024}
ALL = [{"name": "all", "percent": 100}]


def complete(core: Any, name: str = "r", *, version: int | None = None) -> Any:
    st = rollout_status(core, name)
    if st.get("phase") == "Complete" and (version is None or st.get("version") == version):
        return st
    return None


def events(core: Any, reason: str) -> list[Event]:
    with Session(core.db) as s:
        return list(s.exec(select(Event).where(Event.reason == reason)
                           .order_by(col(Event.id))).all())


def device_row(core: Any, device_id: str) -> dict[str, Any]:
    with Session(core.db) as s:
        d = s.get(Device, device_id)
        assert d is not None
        return {"online": d.online, "health": d.health}


def go_offline(dev: FakeDevice, port: int) -> None:
    """The device drops off: its last will (offline presence) and no more heartbeats."""
    dev.close()
    c = mqtt_client(port, f"will-{dev.device_id}")
    p = device_pb2.Presence(device_id=dev.device_id, online=False, reason="lwt")
    c.publish(topics.device_topic(dev.device_id, topics.PRESENCE), p.SerializeToString(),
              qos=1, retain=True).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()


async def test_downgrade_refused_identical_bump_truthful_counters_per_version(
        tmp_path: Path, mosquitto) -> None:
    async with started_core(tmp_path / "c", mosquitto, **FAST) as core:
        v1 = await ready_model(core, tmp_path, version=1)
        devs = await registered_devices(core, mosquitto.port, ["d1", "d2", "d3"])
        core.apply([edge_rollout("r", "m", ALL)])
        st = await wait_until(lambda: complete(core, version=1), timeout_s=60, what="v1")
        assert (st["targeted"], st["updated"]) == (3, 3)
        # identical bytes as version 2: a signed version-only update, no bytes, no download
        same = await ready_model(core, tmp_path, version=2, marker=1.0)
        assert same == v1
        st = await wait_until(lambda: complete(core, version=2), timeout_s=60, what="v2")
        assert (st["targeted"], st["updated"], st["bytesSent"]) == (3, 3, 0)
        for d in devs.values():
            last = d.offers[-1]
            assert last.version == 2 and last.codec == "slot" and last.payload_size == 0
            assert not last.chunk_sha256
            assert [(m.name, m.version, m.sha256) for m in d.served] == [("m", 2, v1)]
        # a real change as version 3: a delta; counters stay per version (3/3, never 6/6)
        v3 = await ready_model(core, tmp_path, version=3, marker=1.5)
        st = await wait_until(lambda: complete(core, version=3), timeout_s=60, what="v3")
        assert (st["targeted"], st["updated"], st["failed"]) == (3, 3, 0)
        assert all(d.served[0].sha256 == v3 for d in devs.values())
        assert [h["version"] for h in st["history"]] == [1, 2, 3]
        assert st["previousVersion"] == 2
        # downgrade: refused at apply, naming both versions; nothing moves
        v2src = build_affine(tmp_path / "low.onnx", marker=9.0, n_in=96, n_out=64, seed=1)
        low = edge_model("m", sha256=core.upload_artifact(v2src), version=2)
        [res] = core.apply([low])
        assert res.action == "rejected" and "2" in res.message and "3" in res.message
        assert "only go up" in res.message
        # same version, other bytes: refused too
        [res] = core.apply([edge_model("m", sha256=core.upload_artifact(v2src), version=3)])
        assert res.action == "rejected" and "version 3" in res.message
        n = core.reconcile_count
        await wait_until(lambda: core.reconcile_count >= n + 3, what="more passes")
        st = rollout_status(core)
        assert st["version"] == 3 and (st["targeted"], st["updated"]) == (3, 3)
        assert all(d.served[0].sha256 == v3 for d in devs.values())
        for d in devs.values():
            d.close()


async def test_second_rollout_supersedes_first_on_shared_devices(tmp_path: Path,
                                                                mosquitto) -> None:
    async with started_core(tmp_path / "c", mosquitto, **FAST) as core:
        await ready_model(core, tmp_path)
        devs = await registered_devices(core, mosquitto.port, ["d1", "d2", "d3"])
        core.apply([edge_rollout("old", "m", ALL)])
        core.apply([edge_rollout("new", "m", ALL, selector={"devices": ["d2", "d3"]})])
        await wait_until(lambda: complete(core, "new") and complete(core, "old"),
                         timeout_s=60, what="both rollouts complete")
        old, new = rollout_status(core, "old"), rollout_status(core, "new")
        assert (new["targeted"], new["updated"], new["failed"]) == (2, 2, 0)
        assert (old["targeted"], old["updated"], old["failed"]) == (1, 1, 0)
        assert old["superseded"] == 2
        assert old["devices"]["d2"]["state"] == "superseded"
        assert old["devices"]["d3"]["state"] == "superseded"
        assert all(len(d.committed) == 1 for d in devs.values())    # one offer each
        assert all(d.offer_messages == 1 for d in devs.values())
        assert events(core, "Superseded")
        assert not events(core, "UpdateFailed")
        with Session(core.db) as s:
            owners = {t.device_id: t.rollout for t in s.exec(select(DeviceTarget)).all()}
        assert owners == {"d1": "default/old", "d2": "default/new", "d3": "default/new"}
        for d in devs.values():
            d.close()


async def test_two_models_on_one_device_one_offline_during_offers(tmp_path: Path,
                                                                  mosquitto) -> None:
    async with started_core(tmp_path / "c", mosquitto, **FAST) as core:
        await ready_model(core, tmp_path)
        src = build_affine(tmp_path / "n.onnx", marker=3.0, n_in=32, n_out=8, seed=2)
        core.apply([edge_model("n", sha256=core.upload_artifact(src))])
        await wait_until(lambda: (core.get("EdgeModel", "default", "n")["status"]
                                  .get("phase") == "Ready"), timeout_s=60, what="n ready")
        devs = await registered_devices(core, mosquitto.port, ["d1", "d2"])
        go_offline(devs["d2"], mosquitto.port)
        await wait_until(lambda: not device_row(core, "d2")["online"], what="d2 offline")
        core.apply([edge_rollout("rm", "m", ALL), edge_rollout("rn", "n", ALL)])
        await wait_until(lambda: rollout_status(core, "rm").get("updated") == 1
                         and rollout_status(core, "rn").get("updated") == 1,
                         timeout_s=60, what="d1 has both models")
        assert rollout_status(core, "rm")["devices"]["d2"]["online"] is False
        # d2 comes back: both retained offers (one topic per model) are there for it
        devs["d2"].reconnect()
        devs["d2"].heartbeat()
        await wait_until(lambda: complete(core, "rm") and complete(core, "rn"), timeout_s=60,
                         what="both rollouts complete")
        assert sorted(m.name for m in devs["d2"].served) == ["m", "n"]
        assert sorted(m.name for m in devs["d1"].served) == ["m", "n"]
        for d in devs.values():
            d.close()


async def test_offline_straggler_stalls_wave_passes_and_it_continues(tmp_path: Path,
                                                                     mosquitto) -> None:
    waves = [{"name": "canary", "count": 1},
             {"name": "rest", "percent": 100, "healthGate": {"minSuccessPercent": 60}}]
    async with started_core(tmp_path / "c", mosquitto, **FAST) as core:
        await ready_model(core, tmp_path)
        devs = await registered_devices(core, mosquitto.port, ["a1", "b2", "c3", "d4"])
        go_offline(devs["d4"], mosquitto.port)
        core.apply([edge_rollout("r", "m", waves, progressDeadlineSeconds=10)])
        st = await wait_until(lambda: complete(core), timeout_s=90,
                              what="complete with a straggler")
        assert st["devices"]["d4"]["state"] == "stalled"
        assert "offline" in st["devices"]["d4"]["reason"]
        assert (st["targeted"], st["updated"], st["stalled"]) == (4, 3, 1)
        assert any("d4" in e.message for e in events(core, "Stalled"))
        assert any(e.name == "d4" for e in events(core, "DeviceOffline"))
        dev = device_row(core, "d4")
        assert dev["health"] == "stale" or dev["online"] is False
        # it comes back: the retained offer is still there, it installs, the fleet converges
        devs["d4"].reconnect()
        devs["d4"].heartbeat()
        st = await wait_until(lambda: (x := complete(core)) and x["updated"] == 4 and x,
                              timeout_s=60, what="straggler converged")
        assert st["stalled"] == 0
        for d in devs.values():
            d.close()


async def test_late_devices_join_passed_wave_never_failed_one(tmp_path: Path,
                                                              mosquitto) -> None:
    waves = [{"name": "canary", "count": 1, "healthGate": {"maxFailed": 0}},
             {"name": "rest", "percent": 100}]
    async with started_core(tmp_path / "c", mosquitto, **FAST) as core:
        await ready_model(core, tmp_path)
        devs = await registered_devices(core, mosquitto.port, ["b1", "c1"])
        devs["b1"].fail_updates = True
        core.apply([edge_rollout("r", "m", waves)])
        st = await wait_until(lambda: (x := rollout_status(core)).get("phase") == "Paused"
                              and x, timeout_s=60, what="canary gate failed")
        # a late device whose id sorts before the failed canary: not offered the failed
        # version (the canary wave failed, so it waits in the last wave)
        late = await registered_devices(core, mosquitto.port, ["a0"])
        n = core.reconcile_count
        await wait_until(lambda: core.reconcile_count >= n + 3, what="passes")
        st = rollout_status(core)
        assert st["devices"]["a0"]["state"] == "pending" and st["devices"]["a0"]["wave"] == "rest"
        assert late["a0"].offer_messages == 0 and devs["c1"].offer_messages == 0
        # a new version passes the canary; devices that appear after Complete get it at once
        devs["b1"].fail_updates = False
        await ready_model(core, tmp_path, version=2, marker=2.0)
        await wait_until(lambda: complete(core, version=2), timeout_s=60, what="v2 complete")
        more = await registered_devices(core, mosquitto.port, ["a00"])
        st = await wait_until(lambda: (x := complete(core, version=2)) and x["updated"] == 4
                              and x, timeout_s=60, what="late device converged")
        assert more["a00"].served[0].version == 2
        assert all(o.version == 2 for o in more["a00"].offers)
        for d in [*devs.values(), *late.values(), *more.values()]:
            d.close()


async def test_paused_rollout_tells_the_truth(tmp_path: Path, mosquitto) -> None:
    async with started_core(tmp_path / "c", mosquitto, **FAST) as core:
        await ready_model(core, tmp_path)
        devs = await registered_devices(core, mosquitto.port, ["d1", "d2"])
        core.apply([edge_rollout("r", "m", ALL, paused=True)])
        st = await wait_until(lambda: (x := rollout_status(core)).get("phase") == "Paused"
                              and x, timeout_s=30, what="paused")
        assert "in progress" not in st["message"] and "2 not offered" in st["message"]
        assert all(d.offer_messages == 0 for d in devs.values())
        core.apply([edge_rollout("r", "m", ALL, paused=False)])
        await wait_until(lambda: complete(core), timeout_s=60, what="resumed and complete")
        for d in devs.values():
            d.close()


GATED = [{"name": "canary", "count": 1,
          "healthGate": {"minRequests": 20, "maxErrorRatePercent": 5, "maxLatencyRatio": 2,
                         "soakSeconds": 3600}},
         {"name": "rest", "percent": 100}]


async def _v1_everywhere_then_v2(core: Any, tmp_path: Path, port: int) -> dict[str, FakeDevice]:
    await ready_model(core, tmp_path)
    devs = await registered_devices(core, port, ["a-canary", "b-dev", "c-dev"])
    core.apply([edge_rollout("r", "m", ALL)])
    await wait_until(lambda: complete(core, version=1), timeout_s=60, what="v1 everywhere")
    for d in devs.values():                      # baseline: v1 answers in ~4 ms
        d.metrics("m", 1, requests=0)
    await wait_until(lambda: core.reconcile_count > 0, what="a pass")
    for d in devs.values():
        d.metrics("m", 1, requests=200, latency_ms=4.0)
    core.apply([edge_rollout("r", "m", GATED)])
    await ready_model(core, tmp_path, version=2, marker=2.5)
    await wait_until(lambda: devs["a-canary"].served[0].version == 2, timeout_s=60,
                     what="canary on v2")
    return devs


async def test_slow_canary_fails_the_gate_and_returns_to_v1(tmp_path: Path, mosquitto) -> None:
    async with started_core(tmp_path / "c", mosquitto, **FAST) as core:
        devs = await _v1_everywhere_then_v2(core, tmp_path, mosquitto.port)
        v1 = devs["b-dev"].served[0].sha256
        canary = devs["a-canary"]
        canary.metrics("m", 2, requests=0)
        await wait_until(lambda: "observing" in rollout_status(core).get("message", ""),
                         timeout_s=30, what="canary observed")
        canary.metrics("m", 2, requests=50, latency_ms=45.0)     # 10x slower
        st = await wait_until(lambda: (x := rollout_status(core)).get("phase") == "Paused"
                              and x, timeout_s=30, what="gate failed")
        assert "p99" in st["message"] and "baseline" in st["message"]
        gate = st["waves"][0]["gate"]
        assert gate["verdict"] == "failed" and gate["signals"]["latencyRatio"] > 2
        degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
        assert degraded["status"] == "True" and degraded["reason"] == "GateFailed"
        # the canary serves the v1 engine again, as a higher revision of version 2
        await wait_until(lambda: canary.served[0].sha256 == v1, timeout_s=30,
                         what="canary back on v1")
        m = canary.served[0]
        assert (m.version, m.revision, m.engine_version) == (2, 1, 1)
        st = await wait_until(lambda: (x := rollout_status(core))["backedOut"] == 1 and x,
                              timeout_s=30, what="backed out")
        assert st["devices"]["a-canary"]["state"] == "backed_out"
        assert [e.message for e in events(core, "GateFailed")][-1].count("p99") == 1
        assert events(core, "RolledBack")
        # later waves never offered v2
        assert all(o.version == 1 for d in ("b-dev", "c-dev") for o in devs[d].offers)
        # the backed-out canary reports its v1 engine as version 2: its windows are the
        # baseline of the next version's latency gate (a slow v3 must not pass for want of it)
        canary.metrics("m", 2, requests=0)
        await wait_until(lambda: core.reconcile_count > 0, what="a pass")
        canary.metrics("m", 2, requests=100, latency_ms=4.0)
        await ready_model(core, tmp_path, version=3, marker=3.5)
        await wait_until(lambda: canary.served[0].version == 3, timeout_s=60,
                         what="canary on v3")
        canary.metrics("m", 3, requests=0)
        await wait_until(lambda: rollout_status(core).get("version") == 3
                         and "observing" in rollout_status(core).get("message", ""),
                         timeout_s=30, what="v3 canary observed")
        canary.metrics("m", 3, requests=50, latency_ms=45.0)
        st = await wait_until(lambda: (x := rollout_status(core)).get("phase") == "Paused"
                              and x.get("version") == 3 and x, timeout_s=30,
                              what="v3 gate failed")
        assert st["waves"][0]["gate"]["signals"]["baselineP99Ms"] < 10
        for d in devs.values():
            d.close()


async def test_erroring_canary_fails_the_gate(tmp_path: Path, mosquitto) -> None:
    async with started_core(tmp_path / "c", mosquitto, **FAST) as core:
        devs = await _v1_everywhere_then_v2(core, tmp_path, mosquitto.port)
        canary = devs["a-canary"]
        canary.metrics("m", 2, requests=0)
        await wait_until(lambda: "observing" in rollout_status(core).get("message", ""),
                         timeout_s=30, what="canary observed")
        canary.metrics("m", 2, requests=40, errors=12, latency_ms=4.0)
        st = await wait_until(lambda: (x := rollout_status(core)).get("phase") == "Paused"
                              and x, timeout_s=30, what="gate failed")
        assert "error rate 30.0%" in st["message"]
        # retry: the failed wave is re-run (the canary is offered v2 again)
        n = len(canary.offers)
        await wait_until(lambda: rollout_status(core)["backedOut"] == 1, timeout_s=30,
                         what="backed out")
        spec = core.get("EdgeRollout", "default", "r")["spec"]
        core.apply([edge_rollout("r", "m", GATED, retry=int(spec.get("retry") or 0) + 1)])
        await wait_until(lambda: len(canary.offers) > n + 1 or (
            canary.served[0].version == 2 and canary.served[0].engine_version in (0, 2)
            and canary.served[0].revision >= 2), timeout_s=30, what="re-offered after retry")
        for d in devs.values():
            d.close()


async def test_wave_shadow_check_travels_in_the_offer(tmp_path: Path, mosquitto) -> None:
    shadow = {"seconds": 30, "minSamples": 10, "minAgreement": 0.98, "maxLatencyRatio": 1.5}
    waves = [{"name": "canary", "count": 1, "healthGate": {"shadow": shadow}},
             {"name": "rest", "percent": 100}]
    async with started_core(tmp_path / "c", mosquitto, **FAST) as core:
        await ready_model(core, tmp_path)
        devs = await registered_devices(core, mosquitto.port, ["a1", "b2"])
        core.apply([edge_rollout("r", "m", waves)])
        await wait_until(lambda: complete(core), timeout_s=60, what="v1")
        # a first install has nothing to compare with: no shadow check in its offer
        assert not any(o.HasField("shadow") for d in devs.values() for o in d.offers)
        await ready_model(core, tmp_path, version=2, marker=2.0)
        await wait_until(lambda: complete(core, version=2), timeout_s=60, what="v2")
        canary, rest = devs["a1"].offers[-1], devs["b2"].offers[-1]
        assert canary.HasField("shadow") and not rest.HasField("shadow")
        s = canary.shadow
        assert (s.seconds, s.min_samples, s.sample_percent, s.max_cpu_percent) == (30, 10, 20, 25)
        assert abs(s.min_agreement - 0.98) < 1e-9 and abs(s.max_latency_ratio - 1.5) < 1e-9
        for d in devs.values():
            d.close()


async def test_undo_and_abort_roll_forward_from_the_other_slot(tmp_path: Path,
                                                              mosquitto) -> None:
    soak = [{"name": "canary", "count": 1, "healthGate": {"soakSeconds": 3600}},
            {"name": "rest", "percent": 100}]
    async with started_core(tmp_path / "c", mosquitto, **FAST) as core:
        v1 = await ready_model(core, tmp_path)
        devs = await registered_devices(core, mosquitto.port, ["a1", "b2"])
        core.apply([edge_rollout("r", "m", ALL)])
        await wait_until(lambda: complete(core, version=1), timeout_s=60, what="v1")
        v2 = await ready_model(core, tmp_path, version=2, marker=2.0)
        await wait_until(lambda: complete(core, version=2), timeout_s=60, what="v2")
        # undo: the v1 engine again, as revision 1 of version 2, from the other slot
        core.apply([edge_rollout("r", "m", ALL, rollbackTo={"version": 1})])
        st = await wait_until(lambda: (x := complete(core)) and x.get("engineVersion") == 1
                              and x["updated"] == 2 and x, timeout_s=60, what="undone")
        for d in devs.values():
            o = d.offers[-1]
            assert (o.version, o.revision, o.engine_version, o.codec) == (2, 1, 1, "slot")
            assert o.payload_size == 0 and d.served[0].sha256 == v1
        assert st["bytesSent"] == 0
        # redo (rollbackTo removed): the v2 engine as revision 2, again without bytes
        core.apply([edge_rollout("r", "m", soak)])
        await wait_until(lambda: devs["a1"].served[0].sha256 == v2, timeout_s=60,
                         what="canary on v2 again")
        assert devs["a1"].offers[-1].codec == "slot" and devs["a1"].offers[-1].revision == 2
        # abort while the canary soaks: it returns to the v1 engine; the rest never moved
        core.apply([edge_rollout("r", "m", soak, aborted=True)])
        st = await wait_until(lambda: (x := rollout_status(core)).get("phase") == "Aborted"
                              and x["backedOut"] == 2 and x, timeout_s=60, what="aborted")
        assert devs["a1"].served[0].sha256 == v1 and devs["a1"].served[0].revision == 3
        assert devs["b2"].served[0].sha256 == v1 and devs["b2"].served[0].revision == 1
        assert events(core, "RolledBack")
        for d in devs.values():
            d.close()


async def test_unhealthy_canary_fails_the_gate(tmp_path: Path, mosquitto) -> None:
    waves = [{"name": "canary", "count": 1,
              "healthGate": {"maxUnhealthyPercent": 0, "soakSeconds": 3600}},
             {"name": "rest", "percent": 100}]
    async with started_core(tmp_path / "c", mosquitto, **FAST) as core:
        await ready_model(core, tmp_path)
        devs = await registered_devices(core, mosquitto.port, ["a1", "b2"])
        core.apply([edge_rollout("r", "m", waves)])
        await wait_until(lambda: "observing" in rollout_status(core).get("message", ""),
                         timeout_s=60, what="canary observed")
        devs["a1"].health = "degraded"            # e.g. the agent reports a failing engine
        devs["a1"].heartbeat()
        st = await wait_until(lambda: (x := rollout_status(core)).get("phase") == "Paused"
                              and x, timeout_s=30, what="gate failed on device health")
        assert "degraded" in st["message"] and "a1" in st["message"]
        assert devs["b2"].offer_messages == 0
        for d in devs.values():
            d.close()


async def test_controller_refuses_a_lower_version_it_did_not_apply(tmp_path: Path,
                                                                   mosquitto) -> None:
    """Cluster mode: kubectl may write a lower version (no transition rule enforced by an
    older API server); the model reconcile refuses it with a condition naming both."""
    from controller.reconcile.models import reconcile_model

    async with started_core(tmp_path / "c", mosquitto, **FAST) as core:
        await ready_model(core, tmp_path, version=3)
        res = core.get("EdgeModel", "default", "m")
        res["spec"]["version"] = 2
        res["metadata"]["generation"] += 1
        st = await reconcile_model(res, core.model_context())
        ready = next(c for c in st["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "False" and ready["reason"] == "VersionNotIncreasing"
        assert "2" in ready["message"] and "3" in ready["message"]
        assert st["engines"] == []


async def test_a_device_that_fell_back_from_a_damaged_engine_shows_it(tmp_path: Path,
                                                                      mosquitto) -> None:
    """The agent found its committed v2 engine damaged and serves v1 from the other slot: it
    reports the fault; the controller shows the device rolled back (not updated), why, and
    the device's desired-vs-observed row and faults in the API."""
    from controller.api import queries

    async with started_core(tmp_path / "c", mosquitto, **FAST) as core:
        v1 = await ready_model(core, tmp_path)
        devs = await registered_devices(core, mosquitto.port, ["d1"])
        d = devs["d1"]
        core.apply([edge_rollout("r", "m", ALL)])
        await wait_until(lambda: complete(core, version=1), timeout_s=60, what="v1")
        v2 = await ready_model(core, tmp_path, version=2, marker=2.0)
        await wait_until(lambda: complete(core, version=2), timeout_s=60, what="v2")
        import time as _t
        d.faults = [device_pb2.ModelFault(name="m", version=2, sha256=v2, reason="integrity",
                                          message="engine sha256 differs on disk",
                                          at_ms=int(_t.time() * 1000))]
        d.served = [device_pb2.ServedModel(name="m", version=1, sha256=v1, active=True)]
        d.heartbeat()
        st = await wait_until(lambda: (x := rollout_status(core))["devices"]["d1"]["state"]
                              == "rolled_back" and x, timeout_s=30, what="fallback shown")
        assert "integrity" in st["devices"]["d1"]["reason"] and st["updated"] == 0
        with Session(core.db) as s:
            one = queries.get_device(s, "d1")
        assert one is not None and one["update_state"] == "rolled_back"
        assert one["faults"][0]["reason"] == "integrity"
        assert [(r["model"], r["state"], r["serving"]) for r in one["desired"]] == [
            ("m", "rolled_back", "v1")]
        d.close()
