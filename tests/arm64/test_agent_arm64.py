"""Runs INSIDE the emulated arm64 chroot (scripts/arm64/run-tests.sh): the real agent process
(``edgefleet-agent run --config``, installed by ``pip install "edgefleet[agent]"``) on aarch64.

The host (x86_64) made the models, signed the key list and the offers, made the v2 delta
and computed the reference outputs (tests/arm64/prepare_fixtures.py). Here the test plays the
controller's MQTT side with ``tests.helpers.ota.OtaDriver`` against the host's Mosquitto:

  presence + heartbeat (arch aarch64) -> offer v1 (full) -> verify, download, stage, activate,
  commit -> inference over the agent's KServe v2 HTTP API == x86_64 outputs -> offer v2 (delta)
  -> patch -> commit -> inference == x86_64 v2 outputs -> heartbeat reports v2 in slot b ->
  SIGTERM -> presence offline, exit 0.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protos import envelope, topics
from protos.edgefleet.v1 import common_pb2, update_pb2
from tests.helpers.ota import Offer, OtaDriver, agent_config, stop_agent, write_config

S = common_pb2
# qemu-user runs the agent roughly 5-20x slower than native: generous deadlines (not timings).
STEP_S = 120.0


def load_offer(fixtures_dir: Path, name: str, payload: str) -> Offer:
    env = envelope.parse_envelope((fixtures_dir / name).read_bytes())
    manifest = update_pb2.UpdateManifest.FromString(env.payload)
    return Offer(manifest=manifest, envelope=env, payload=(fixtures_dir / payload).read_bytes())


def infer(url: str, model: str, *, input_name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """POST one float32 tensor to the agent's OIP (KServe v2) JSON API; outputs by name."""
    body = {"inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}
    req = urllib.request.Request(f"{url}/v2/models/{model}/infer",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=STEP_S) as resp:
        out = json.loads(resp.read())
    assert out["model_name"] == model
    result = {}
    for o in out["outputs"]:
        assert o["datatype"] == "FP32", o["datatype"]
        result[o["name"]] = np.asarray(o["data"], dtype=np.float32).reshape(o["shape"])
    return result


@pytest.fixture
def driver(index: dict[str, Any], fixtures_dir: Path, mqtt_port: int) -> Iterator[OtaDriver]:
    d = OtaDriver("127.0.0.1", mqtt_port, device_id=index["device_id"],
                  device_class=index["device_class"])
    # the key list the x86_64 host root-signed (not the driver's own keys)
    d.publish(topics.TRUST_KEYS, (fixtures_dir / index["key_list"]).read_bytes(), retain=True)
    yield d
    d.close()


def agent_executable() -> str:
    exe = Path(sys.executable).with_name("edgefleet-agent")
    assert exe.is_file(), f"console script missing next to {sys.executable}: pip install failed?"
    return str(exe)


def test_agent_on_arm64_installs_signed_updates_serves_and_heartbeats(
        tmp_path: Path, index: dict[str, Any], fixtures_dir: Path, results_dir: Path,
        mqtt_port: int, driver: OtaDriver) -> None:
    cfg = agent_config(tmp_path, host="127.0.0.1", port=mqtt_port, driver=driver,
                       trust={"root_public_key": index["root_public_key_b64"]})
    assert base64.b64decode(cfg["trust"]["root_public_key"]) != envelope.public_raw(
        driver.root.public_key())
    config = write_config(tmp_path / "agent.yaml", cfg)
    log = results_dir / "agent.log"
    proc = subprocess.Popen([agent_executable(), "run", "--config", str(config)], cwd=tmp_path,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    x = np.load(fixtures_dir / index["inputs"])
    report: dict[str, Any] = {"versions": {}}
    try:
        driver.wait_for(lambda: any(p.online for p in driver.presence) or proc.poll() is not None,
                        timeout_s=STEP_S, what="presence online")
        assert proc.poll() is None, f"agent exited with {proc.returncode}: {log.read_text()}"
        hb = driver.last_heartbeat(timeout_s=STEP_S)
        assert hb.facts.arch == "aarch64"
        assert any(r.engine_kind == "onnxruntime-cpu" for r in hb.facts.runtimes)
        assert hb.serve_url.startswith("http://") and not hb.models
        url = hb.serve_url

        for v in index["versions"]:
            offer = driver.publish_offer(load_offer(fixtures_dir, v["offer"], v["payload"]))
            driver.wait_status(offer.update_id, S.UPDATE_STATE_COMMITTED, timeout_s=STEP_S)
            states = driver.states_of(offer.update_id)
            assert states[-1] == "COMMITTED" and "VERIFYING" in states and "PATCHING" in states
            got = infer(url, index["model"], input_name=index["input_name"], x=x)
            ref = dict(np.load(fixtures_dir / v["reference"]))
            assert sorted(got) == sorted(ref)
            diffs = {}
            for name, r in ref.items():
                np.testing.assert_allclose(got[name], r, rtol=index["rtol"], atol=index["atol"])
                assert (got[name].argmax(-1) == r.argmax(-1)).all()
                diffs[name] = float(np.max(np.abs(got[name].astype(np.float64) - r)))
            np.savez(results_dir / f"arm64-agent-v{v['version']}.npz", **got)  # type: ignore[arg-type]
            report["versions"][str(v["version"])] = {
                "codec": v["codec"], "states": states, "max_abs_diff": diffs,
                "chunks": driver.chunks_sent(offer.update_id)}

        seq = driver.heartbeats[-1].seq
        hb = driver.last_heartbeat(after_seq=seq, timeout_s=STEP_S)
        (served,) = hb.models
        v2 = index["versions"][-1]
        assert (served.name, served.version, served.sha256, served.slot) == (
            index["model"], v2["version"], v2["sha256"], "b")
        assert hb.updates and hb.updates[0].state == S.UPDATE_STATE_COMMITTED
        report["heartbeat"] = {"seq": hb.seq, "arch": hb.facts.arch,
                               "cpu_count": hb.facts.cpu_count, "serve_url": hb.serve_url}
    finally:
        rc = stop_agent(proc, timeout_s=STEP_S)
        (results_dir / "agent-arm64.json").write_text(json.dumps(report, indent=2))
    assert rc == 0, log.read_text()[-4000:]
    driver.wait_for(lambda: driver.presence and not driver.presence[-1].online,
                    timeout_s=STEP_S, what="presence offline")
    assert driver.presence[-1].reason == "shutdown"
    # what the board's persisted state says after the process is gone
    status = subprocess.run([agent_executable(), "status", "--config", str(config)],
                            capture_output=True, text=True, timeout=STEP_S, check=True)
    persisted = json.loads(status.stdout)["models"]
    assert any(m.get("version") == v2["version"] and m.get("sha256") == v2["sha256"]
               for m in persisted.values()), persisted
