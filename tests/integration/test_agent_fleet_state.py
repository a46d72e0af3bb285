"""Fleet-state contract on the real agent (in-process or spawned) against a real Mosquitto.

Covers: per-model retained offer topics beside the legacy one; anti-rollback on
(version, revision); codec "slot" updates (activate the other slot, relabel the active one,
no chunk ever requested); heartbeats reporting slots, revisions, engine versions, update ids,
faults, restarts and the DesiredState generation; acting on the signed DesiredState (abandon
a withdrawn download, activate from a slot, never go back a generation); fallbacks to the
previous slot on a damaged or unloadable engine (at start and while serving, without
dropping requests) and after a crash loop (spawned agents SIGKILLed); the accuracy probe
report after a commit.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest

from agent.app import Agent
from agent.config import config_from_dict
from agent.update.slots import SlotInfo
from agent.update.state import StateStore
from protos.edgefleet.v1 import common_pb2, device_pb2, update_pb2
from tests.helpers.broker import Broker, free_port
from tests.helpers.models import build_affine
from tests.helpers.ota import (
    Offer,
    OtaDriver,
    agent_config,
    infer,
    sha256,
    spawn_agent,
    stop_agent,
    write_config,
)

S = common_pb2
ZERO = [[0.0, 0.0, 0.0, 0.0]]


@pytest.fixture
def driver(mosquitto: Broker) -> Iterator[OtaDriver]:
    d = OtaDriver(mosquitto.host, mosquitto.port, device_id="dev-fs", device_class="cpu-x86")
    d.publish_keys()
    yield d
    d.close()


def start_agent(tmp_path: Path, mosquitto: Broker, driver: OtaDriver, **kw: Any) -> Agent:
    agent = Agent(config_from_dict(agent_config(tmp_path, host=mosquitto.host,
                                                port=mosquitto.port, driver=driver, **kw)))
    agent.start()
    return agent


def model_bytes(tmp_path: Path, marker: float) -> bytes:
    return build_affine(tmp_path / f"m{marker}.onnx", marker=marker).read_bytes()


def served(agent: Agent, model: str = "affine") -> float:
    return infer(agent.server.url, model, ZERO)[0]


def install(driver: OtaDriver, name: str, version: int, payload: bytes, **kw: object) -> Offer:
    o = driver.offer(name, version, payload, **kw)
    driver.wait_status(o.update_id, S.UPDATE_STATE_COMMITTED)
    return o


def heartbeat(driver: OtaDriver, pred: Callable[[device_pb2.Heartbeat], bool],
              what: str) -> device_pb2.Heartbeat:
    """The first heartbeat received from now on that satisfies ``pred``."""
    start = len(driver.heartbeats)
    return driver.wait_for(lambda: next((h for h in driver.heartbeats[start:] if pred(h)),
                                        None), what=what)


def active(agent: Agent, key: str = "affine") -> SlotInfo:
    info = agent.slots.active(key)
    assert info is not None, f"no committed engine for {key}"
    return info


def reason_of(driver: OtaDriver, update_id: str, state: int) -> str:
    return driver.wait_status(update_id, state).reason


def damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 16] = b"\xa5" * 16
    path.write_bytes(bytes(data))


# ---- 1. offers on per-model topics -------------------------------------------------------
def test_offers_retained_on_per_model_topics_install_side_by_side(
        tmp_path: Path, mosquitto: Broker, driver: OtaDriver) -> None:
    a1 = driver.publish_offer(driver.make_offer("affine", 1, model_bytes(tmp_path, 1.0)),
                              per_model=True)
    o1 = driver.publish_offer(driver.make_offer("other", 1, model_bytes(tmp_path, 5.0)),
                              per_model=True)
    agent = start_agent(tmp_path, mosquitto, driver)  # both arrive as retained messages
    try:
        driver.wait_status(a1.update_id, S.UPDATE_STATE_COMMITTED)
        driver.wait_status(o1.update_id, S.UPDATE_STATE_COMMITTED)
        assert served(agent) == 1.0 and served(agent, "other") == 5.0
        driver.clear_offer("other")            # cleared per-model topic: ignored
        a2 = install(driver, "affine", 2, model_bytes(tmp_path, 2.0))  # legacy topic
        o2 = driver.publish_offer(driver.make_offer("other", 2, model_bytes(tmp_path, 6.0)),
                                  per_model=True)
        driver.wait_status(o2.update_id, S.UPDATE_STATE_COMMITTED)
        hb = heartbeat(driver, lambda h: len(h.models) == 2 and
                       {m.version for m in h.models} == {2}, "both models at v2")
        assert {m.name: m.update_id for m in hb.models} == {"affine": a2.update_id,
                                                            "other": o2.update_id}
        assert served(agent) == 2.0 and served(agent, "other") == 6.0
        assert sorted(driver.states_of(o2.update_id)).count("COMMITTED") == 1
    finally:
        agent.stop()


# ---- 2. anti-rollback on (version, revision) ---------------------------------------------
def test_anti_rollback_compares_version_revision_pairs(tmp_path: Path, mosquitto: Broker,
                                                       driver: OtaDriver) -> None:
    agent = start_agent(tmp_path, mosquitto, driver, update={"stall_timeout_s": 30.0})
    try:
        install(driver, "affine", 1, model_bytes(tmp_path, 1.0))
        install(driver, "affine", 1, model_bytes(tmp_path, 2.0), revision=1)  # (1, 1) > (1, 0)
        for version, revision in ((1, 1), (1, 0), (0, 7)):
            o = driver.offer("affine", version, model_bytes(tmp_path, 3.0), revision=revision)
            reason = reason_of(driver, o.update_id, S.UPDATE_STATE_FAILED)
            assert reason.startswith("rollback:"), reason
            assert f"({version}, {revision})" in reason and "(1, 1)" in reason, reason
        state = json.loads((tmp_path / "agent-data/update/affine.json").read_text())
        assert (state["highest_committed"], state["highest_revision"]) == (1, 1)

        # an update in progress: an equal pair is refused, a higher one supersedes it
        slow = driver.make_offer("affine", 3, model_bytes(tmp_path, 3.0), chunk_size=256)
        slow.withhold_all = True
        driver.publish_offer(slow)
        driver.wait_status(slow.update_id, S.UPDATE_STATE_DOWNLOADING)
        same = driver.offer("affine", 3, model_bytes(tmp_path, 4.0))
        reason = reason_of(driver, same.update_id, S.UPDATE_STATE_FAILED)
        assert reason.startswith("rollback:") and "in progress" in reason, reason
        newer = install(driver, "affine", 3, model_bytes(tmp_path, 4.0), revision=1)
        assert reason_of(driver, slow.update_id, S.UPDATE_STATE_FAILED).startswith(
            "superseded:")
        assert served(agent) == 4.0
        assert agent.updates.highest_pair("affine") == (3, 1)
        assert driver.wait_status(newer.update_id, S.UPDATE_STATE_COMMITTED).revision == 1
    finally:
        agent.stop()


def test_state_and_slot_files_without_revisions_load_as_revision_zero(tmp_path: Path) -> None:
    root = tmp_path / "update"
    root.mkdir()
    (root / "m.json").write_text(json.dumps({"key": "m", "highest_committed": 4,
                                             "current": None, "done_ids": []}))
    assert StateStore(root).load_all()["m"].highest == (4, 0)
    info = SlotInfo.from_json({"key": "m", "slot": "a", "name": "m", "variant": "",
                               "version": 4, "sha256": "0" * 64, "size": 1, "file": "e.onnx",
                               "engine_kind": "onnxruntime-cpu", "precision": "fp32",
                               "update_id": "u", "fingerprint_b64": "", "signature_b64": ""})
    assert (info.revision, info.engine_version, info.built_for) == (0, 0, 4)


# ---- 3. codec "slot" ---------------------------------------------------------------------
def test_slot_offers_activate_the_other_slot_or_relabel_the_active_one_without_bytes(
        tmp_path: Path, mosquitto: Broker, driver: OtaDriver) -> None:
    agent = start_agent(tmp_path, mosquitto, driver)
    try:
        v1, v2 = model_bytes(tmp_path, 1.0), model_bytes(tmp_path, 2.0)
        install(driver, "affine", 1, v1)
        o2 = install(driver, "affine", 2, v2)
        assert served(agent) == 2.0

        # back-out: v1's engine (slot a) re-shipped as (2, 1), built for version 1
        back = driver.publish_offer(driver.make_offer(
            "affine", 2, b"", codec="slot", target=v1, revision=1, engine_version=1),
            per_model=True)
        st = driver.wait_status(back.update_id, S.UPDATE_STATE_COMMITTED)
        assert driver.states_of(back.update_id) == ["RECEIVED", "STAGED", "ACTIVATING",
                                                    "COMMITTED"]
        assert (st.revision, st.variant, st.target_sha256) == (1, "", sha256(v1))
        assert driver.requests_for(back.update_id) == []
        assert driver.chunks_sent(back.update_id) == 0
        assert served(agent) == 1.0
        hb = heartbeat(driver, lambda h: any(m.update_id == back.update_id for m in h.models),
                       "heartbeat serving the back-out")
        (m,) = hb.models
        assert (m.version, m.revision, m.engine_version, m.slot, m.sha256) == (
            2, 1, 1, "a", sha256(v1))
        slots = {s.slot: s for s in hb.slots}
        assert (slots["a"].active, slots["a"].revision, slots["a"].engine_version,
                slots["a"].update_id) == (True, 1, 1, back.update_id)
        assert (slots["b"].active, slots["b"].version, slots["b"].engine_version,
                slots["b"].update_id) == (False, 2, 2, o2.update_id)
        (p,) = [u for u in hb.updates if u.update_id == back.update_id]
        assert (p.revision, p.target_sha256, p.state) == (1, sha256(v1),
                                                          S.UPDATE_STATE_COMMITTED)

        # identical-bytes version bump of the ACTIVE slot: relabelled (v3, still engine 1)
        bump = driver.offer("affine", 3, b"", codec="slot", target=v1)
        driver.wait_status(bump.update_id, S.UPDATE_STATE_COMMITTED)
        assert driver.states_of(bump.update_id) == ["RECEIVED", "STAGED", "ACTIVATING",
                                                    "COMMITTED"]
        assert driver.requests_for(bump.update_id) == []
        assert served(agent) == 1.0
        meta = active(agent)
        assert (meta.slot, meta.version, meta.revision, meta.engine_version,
                meta.update_id) == ("a", 3, 0, 1, bump.update_id)
        assert agent.registry.describe("affine")[0].version == 3

        # an engine the board does not hold, and an older pair, are refused
        missing = driver.offer("affine", 4, b"", codec="slot",
                               target=model_bytes(tmp_path, 9.0))
        assert reason_of(driver, missing.update_id, S.UPDATE_STATE_FAILED).startswith(
            "slot_missing:")
        old = driver.offer("affine", 2, b"", codec="slot", target=v2, revision=5)
        assert reason_of(driver, old.update_id, S.UPDATE_STATE_FAILED).startswith("rollback:")
        assert served(agent) == 1.0
    finally:
        agent.stop()


# ---- 5. the signed DesiredState ----------------------------------------------------------
def test_desired_state_abandons_withdrawn_download_activates_from_slot_and_never_goes_back(
        tmp_path: Path, mosquitto: Broker, driver: OtaDriver) -> None:
    cfg = {"update": {"stall_timeout_s": 30.0}}
    agent = start_agent(tmp_path, mosquitto, driver, **cfg)
    v1, v2 = model_bytes(tmp_path, 1.0), model_bytes(tmp_path, 2.0)
    try:
        install(driver, "affine", 1, v1)
        install(driver, "affine", 2, v2)
        install(driver, "other", 1, model_bytes(tmp_path, 5.0))
        withdrawn = driver.make_offer("affine", 3, model_bytes(tmp_path, 3.0), chunk_size=256)
        withdrawn.withhold_all = True
        driver.publish_offer(withdrawn)
        driver.wait_status(withdrawn.update_id, S.UPDATE_STATE_DOWNLOADING)

        # generation 5 wants v1's engine back as (2, 1), and says nothing about "other"
        driver.publish_desired([{"name": "affine", "version": 2, "revision": 1,
                                 "engine_version": 1, "target_sha256": sha256(v1)}],
                               generation=5)
        reason = reason_of(driver, withdrawn.update_id, S.UPDATE_STATE_FAILED)
        assert reason.startswith("superseded: not in the desired state"), reason
        driver.wait_status("desired-5-affine", S.UPDATE_STATE_COMMITTED)
        assert driver.states_of("desired-5-affine") == ["RECEIVED", "STAGED", "ACTIVATING",
                                                        "COMMITTED"]
        assert driver.requests_for("desired-5-affine") == []
        assert served(agent) == 1.0 and served(agent, "other") == 5.0  # "other" left alone
        hb = heartbeat(driver, lambda h: h.desired_generation == 5, "generation 5 reported")
        assert {m.name: (m.version, m.revision) for m in hb.models} == {
            "affine": (2, 1), "other": (1, 0)}
    finally:
        agent.stop()

    driver.clear_desired()
    agent = start_agent(tmp_path, mosquitto, driver, **cfg)
    try:
        heartbeat(driver, lambda h: h.desired_generation == 5, "generation 5 after a restart")
        # an older generation is ignored; the next newer one is acted on (in that order)
        driver.publish_desired([{"name": "affine", "version": 4, "target_sha256": sha256(v2)}],
                               generation=4)
        driver.publish_desired([{"name": "affine", "version": 5, "target_sha256": sha256(v2),
                                 "update_id": "back-to-v2"}], generation=6)
        driver.wait_status("back-to-v2", S.UPDATE_STATE_COMMITTED)
        assert driver.states_of("desired-4-affine") == []
        assert served(agent) == 2.0 and served(agent, "other") == 5.0
        heartbeat(driver, lambda h: h.desired_generation == 6, "generation 6 reported")
    finally:
        agent.stop()


# ---- 6. faults and local fallbacks -------------------------------------------------------
def test_damaged_active_engine_falls_back_while_serving_without_dropping_requests(
        tmp_path: Path, mosquitto: Broker, driver: OtaDriver) -> None:
    agent = start_agent(tmp_path, mosquitto, driver, update={"integrity_check_s": 0.5})
    stop = threading.Event()
    outputs: list[float] = []
    errors: list[BaseException] = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                outputs.append(served(agent))
            except BaseException as e:  # every failure counts
                errors.append(e)

    try:
        v2 = model_bytes(tmp_path, 2.0)
        install(driver, "affine", 1, model_bytes(tmp_path, 1.0))
        o2 = install(driver, "affine", 2, v2)
        clients = [threading.Thread(target=hammer) for _ in range(3)]
        for t in clients:
            t.start()
        driver.wait_for(lambda: len(outputs) > 20, what="requests served")
        damage(agent.slots.engine_path(active(agent)))
        reason = reason_of(driver, o2.update_id, S.UPDATE_STATE_ROLLED_BACK)
        assert reason.startswith("integrity:"), reason
        driver.wait_for(lambda: outputs and outputs[-1] == 1.0, what="v1 served")
        n = len(outputs)
        driver.wait_for(lambda: len(outputs) > n + 20, what="more requests after the swap")
        stop.set()
        for t in clients:
            t.join(10)
        assert errors == [] and set(outputs) <= {1.0, 2.0}
        assert agent.slots.active_slot("affine") == "a"
        hb = heartbeat(driver, lambda h: len(h.faults) > 0, "fault in a heartbeat")
        (f,) = hb.faults
        assert (f.name, f.version, f.sha256, f.reason) == ("affine", 2, sha256(v2),
                                                           "integrity")
        assert any(u.update_id == o2.update_id and u.state == S.UPDATE_STATE_ROLLED_BACK
                   for u in hb.updates)
    finally:
        stop.set()
        agent.stop()


def test_startup_falls_back_from_a_damaged_or_unloadable_engine_and_keeps_the_faults(
        tmp_path: Path, mosquitto: Broker, driver: OtaDriver) -> None:
    v2, v3 = model_bytes(tmp_path, 2.0), model_bytes(tmp_path, 3.0)
    agent = start_agent(tmp_path, mosquitto, driver)
    try:
        install(driver, "affine", 1, model_bytes(tmp_path, 1.0))
        o2 = install(driver, "affine", 2, v2)
        engine = agent.slots.engine_path(active(agent))
        assert heartbeat(driver, lambda h: bool(h.models), "serving").restarts == 1
    finally:
        agent.stop()
    damage(engine)
    agent = start_agent(tmp_path, mosquitto, driver)
    try:
        assert served(agent) == 1.0  # before connecting: the previous slot
        reason = reason_of(driver, o2.update_id, S.UPDATE_STATE_ROLLED_BACK)
        assert reason.startswith("integrity:"), reason
        hb = heartbeat(driver, lambda h: h.restarts == 2 and bool(h.faults), "fault reported")
        assert [(f.version, f.reason, f.sha256) for f in hb.faults] == [
            (2, "integrity", sha256(v2))]
        assert [(m.version, m.slot) for m in hb.models] == [(1, "a")]
        o3 = install(driver, "affine", 3, v3)   # installs into slot b (v2's damaged file)
        info = active(agent)
    finally:
        agent.stop()
    # v3's file changes into bytes that pass the sha256 check but do not load
    garbage = b"not an onnx model" * 64
    Path(agent.slots.engine_path(info)).write_bytes(garbage)
    meta_path = agent.slots.slot_dir("affine", info.slot) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.update(sha256=sha256(garbage), size=len(garbage))
    meta_path.write_text(json.dumps(meta))
    agent = start_agent(tmp_path, mosquitto, driver)
    try:
        assert served(agent) == 1.0
        reason = reason_of(driver, o3.update_id, S.UPDATE_STATE_ROLLED_BACK)
        assert reason.startswith("load_failed:"), reason
        hb = heartbeat(driver, lambda h: h.restarts == 3 and len(h.faults) == 2,
                       "both faults (persisted) reported")
        assert [(f.version, f.reason) for f in hb.faults] == [(2, "integrity"),
                                                              (3, "load_failed")]
    finally:
        agent.stop()


# ---- 7. crash-loop protection ------------------------------------------------------------
def test_boot_marker_is_cleared_once_the_engine_served_long_enough(
        tmp_path: Path, mosquitto: Broker, driver: OtaDriver) -> None:
    agent = start_agent(tmp_path, mosquitto, driver, update={"stable_after_s": 3.0})
    marker = tmp_path / "agent-data/health/boot/affine.json"
    try:
        o1 = install(driver, "affine", 1, model_bytes(tmp_path, 1.0))
        assert json.loads(marker.read_text())["update_id"] == o1.update_id
        driver.wait_for(lambda: not marker.exists(), what="boot marker cleared")
    finally:
        agent.stop()


def test_crash_loop_after_commit_falls_back_to_the_previous_slot(
        tmp_path: Path, mosquitto: Broker, driver: OtaDriver) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "agent.yaml", agent_config(
        tmp_path, host=mosquitto.host, port=mosquitto.port, driver=driver, serve_port=port,
        update={"stable_after_s": 600.0, "crash_loop_restarts": 3}))
    log = tmp_path / "agent.log"
    v2 = model_bytes(tmp_path, 2.0)
    proc = spawn_agent(cfg, log=log)
    try:
        install(driver, "affine", 1, model_bytes(tmp_path, 1.0))
        o2 = install(driver, "affine", 2, v2)
        for start in (2, 3, 4):  # killed each time soon after it serves v2
            proc.kill()
            proc.wait(10)
            proc = spawn_agent(cfg, log=log)

            def serving_v2(h: device_pb2.Heartbeat, n: int = start) -> bool:
                return h.restarts == n and [m.version for m in h.models] == [2]

            heartbeat(driver, serving_v2, f"start {start} serving v2")
        proc.kill()
        proc.wait(10)
        proc = spawn_agent(cfg, log=log)   # start 5: v2 was counted 3 times -> fall back
        reason = reason_of(driver, o2.update_id, S.UPDATE_STATE_ROLLED_BACK)
        assert reason.startswith("crash_loop:"), reason
        assert infer(f"http://127.0.0.1:{port}", "affine", ZERO)[0] == 1.0
        hb = heartbeat(driver, lambda h: h.restarts == 5 and bool(h.models), "start 5")
        assert [(m.version, m.slot) for m in hb.models] == [(1, "a")]
        assert [(f.reason, f.version, f.sha256) for f in hb.faults] == [
            ("crash_loop", 2, sha256(v2))]
    finally:
        stop_agent(proc)


# ---- 9. accuracy probe -------------------------------------------------------------------
def test_probe_report_follows_the_commit(tmp_path: Path, mosquitto: Broker,
                                         driver: OtaDriver) -> None:
    from protos import probe as P
    path = build_affine(tmp_path / "v1.onnx", marker=1.0)
    x = np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32)
    (ref,) = onnxruntime.InferenceSession(str(path)).run(None, {"x": x})
    spec = update_pb2.ProbeSpec(
        samples_npz=P.encode_probe_set(P.ProbeSet(inputs={"x": x}, references={"y": ref})),
        metric="max-abs", threshold=1e-4)
    agent = start_agent(tmp_path, mosquitto, driver)
    try:
        o = driver.offer("affine", 1, path.read_bytes(), probe=spec)
        st = driver.wait_for(lambda: next((s for s in driver.statuses
                                           if s.update_id == o.update_id and
                                           s.HasField("probe")), None), what="probe status")
        assert st.state == S.UPDATE_STATE_COMMITTED
        assert st.probe.passed and st.probe.samples == 4 and st.probe.metric == "max-abs"
        hb = heartbeat(driver, lambda h: any(u.HasField("probe") for u in h.updates),
                       "probe in a heartbeat")
        assert hb.updates[0].probe.passed
        state = json.loads((tmp_path / "agent-data/update/affine.json").read_text())
        assert state["current"]["probe_b64"]
    finally:
        agent.stop()
