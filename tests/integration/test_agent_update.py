"""End to end: the real agent (in-process) against a real Mosquitto and the OTA test driver.

Covers: presence and heartbeats, signed offer -> download -> stage -> activate -> commit,
inference through the local KServe v2 API, A/B slots, serving the committed model offline
after a restart, and rollback when the new engine fails its smoke check.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.app import Agent
from agent.config import config_from_dict
from protos.edgefleet.v1 import common_pb2
from tests.helpers.broker import Broker, free_port
from tests.helpers.models import build_affine, build_nan
from tests.helpers.ota import OtaDriver, agent_config, infer, sha256

S = common_pb2
ZERO = [[0.0, 0.0, 0.0, 0.0]]


@pytest.fixture
def driver(mosquitto: Broker) -> Iterator[OtaDriver]:
    d = OtaDriver(mosquitto.host, mosquitto.port, device_id="dev-1", device_class="cpu-x86")
    d.publish_keys()
    yield d
    d.close()


def start_agent(tmp_path: Path, mosquitto: Broker, driver: OtaDriver, **kw) -> Agent:
    agent = Agent(config_from_dict(agent_config(tmp_path, host=mosquitto.host,
                                                port=mosquitto.port, driver=driver, **kw)))
    agent.start()
    return agent


def model_bytes(tmp_path: Path, marker: float) -> bytes:
    return build_affine(tmp_path / f"m{marker}.onnx", marker=marker).read_bytes()


def test_agent_installs_update_serves_and_reports(tmp_path: Path, mosquitto: Broker,
                                                  driver: OtaDriver) -> None:
    agent = start_agent(tmp_path, mosquitto, driver)
    try:
        driver.wait_for(lambda: any(p.online for p in driver.presence), what="presence online")
        hb = driver.last_heartbeat()
        assert hb.device_class == "cpu-x86" and hb.facts.arch and hb.facts.cpu_count > 0
        assert any(r.engine_kind == "onnxruntime-cpu" for r in hb.facts.runtimes)
        assert hb.serve_url == agent.server.url and not hb.models

        v1 = model_bytes(tmp_path, 1.0)
        o1 = driver.offer("affine", 1, v1)
        driver.wait_status(o1.update_id, S.UPDATE_STATE_COMMITTED)
        assert driver.states_of(o1.update_id) == [
            "RECEIVED", "DOWNLOADING", "VERIFYING", "PATCHING", "STAGED", "ACTIVATING",
            "COMMITTED"]
        assert infer(agent.server.url, "affine", ZERO) == [1.0, 1.0, 1.0]
        assert driver.chunks_sent(o1.update_id) == len(o1.manifest.chunk_sha256)

        v2 = model_bytes(tmp_path, 2.0)
        o2 = driver.offer("affine", 2, v2)
        driver.wait_status(o2.update_id, S.UPDATE_STATE_COMMITTED)
        assert infer(agent.server.url, "affine", ZERO) == [2.0, 2.0, 2.0]
        seq = driver.heartbeats[-1].seq
        hb = driver.last_heartbeat(after_seq=seq)
        (served,) = hb.models
        assert (served.name, served.version, served.sha256, served.slot) == (
            "affine", 2, sha256(v2), "b")
        assert hb.updates[0].state == S.UPDATE_STATE_COMMITTED
        # slot a keeps v1 as the rollback target
        assert agent.slots.read_meta("affine", "a").sha256 == sha256(v1)
    finally:
        agent.stop()
    driver.wait_for(lambda: driver.presence and not driver.presence[-1].online,
                    what="presence offline")
    assert driver.presence[-1].reason == "shutdown"


def test_agent_serves_committed_model_offline_after_restart(tmp_path: Path, mosquitto: Broker,
                                                            driver: OtaDriver) -> None:
    agent = start_agent(tmp_path, mosquitto, driver)
    try:
        o1 = driver.offer("affine", 1, model_bytes(tmp_path, 1.0))
        driver.wait_status(o1.update_id, S.UPDATE_STATE_COMMITTED)
    finally:
        agent.stop()
    # restart pointed at a port where no broker listens: it must still serve v1
    offline = start_agent(tmp_path, mosquitto, driver, mqtt={"port": free_port()})
    try:
        assert not offline.link.connected.is_set()
        assert infer(offline.server.url, "affine", ZERO) == [1.0, 1.0, 1.0]
    finally:
        offline.stop()


def test_agent_rolls_back_when_new_engine_fails_smoke_check(tmp_path: Path, mosquitto: Broker,
                                                            driver: OtaDriver) -> None:
    agent = start_agent(tmp_path, mosquitto, driver)
    try:
        o1 = driver.offer("affine", 1, model_bytes(tmp_path, 1.0))
        driver.wait_status(o1.update_id, S.UPDATE_STATE_COMMITTED)
        bad = build_nan(tmp_path / "nan.onnx").read_bytes()
        o2 = driver.offer("affine", 2, bad)
        st = driver.wait_status(o2.update_id, S.UPDATE_STATE_ROLLED_BACK)
        assert st.reason and st.action != S.ERROR_ACTION_UNSPECIFIED
        assert infer(agent.server.url, "affine", ZERO) == [1.0, 1.0, 1.0]
        assert agent.slots.active("affine").version == 1
        # a good v3 (a deliberate fix ships as a newer version) still installs afterwards
        o3 = driver.offer("affine", 3, model_bytes(tmp_path, 3.0))
        driver.wait_status(o3.update_id, S.UPDATE_STATE_COMMITTED)
        assert infer(agent.server.url, "affine", ZERO) == [3.0, 3.0, 3.0]
    finally:
        agent.stop()


@pytest.mark.parametrize("codec", ["bsdiff4", "tensor-xor", "full"])
def test_agent_applies_codec_payload_from_protos_codecs(tmp_path: Path, mosquitto: Broker,
                                                        driver: OtaDriver, codec: str) -> None:
    from protos import codecs
    agent = start_agent(tmp_path, mosquitto, driver)
    try:
        v1 = build_affine(tmp_path / "v1.onnx", marker=1.0)
        o1 = driver.offer("affine", 1, v1.read_bytes())
        driver.wait_status(o1.update_id, S.UPDATE_STATE_COMMITTED)
        v2 = build_affine(tmp_path / "v2.onnx", marker=2.0)
        delta = tmp_path / f"v1-v2.{codec}"
        codecs.make(codec, v1 if codec != "full" else None, v2, delta)
        o2 = driver.offer("affine", 2, delta.read_bytes(), codec=codec, target=v2.read_bytes(),
                          base_sha256=sha256(v1.read_bytes()) if codec != "full" else "")
        driver.wait_status(o2.update_id, S.UPDATE_STATE_COMMITTED)
        assert infer(agent.server.url, "affine", ZERO) == [2.0, 2.0, 2.0]
        assert agent.slots.active("affine").sha256 == sha256(v2.read_bytes())
    finally:
        agent.stop()
