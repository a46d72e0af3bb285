"""End to end: the whole spine with a real Mosquitto, real SQLite and three real agent processes.

apply (CLI) -> compile -> signed offers and chunks over Mosquitto -> 3 agents serve -> an
inference through each agent's KServe v2 API matches onnxruntime on the source model;
heartbeats update the device row; SIGKILL of an agent marks it offline through its MQTT last
will; invalid YAML is refused naming the field (CLI and API 422); a broken ONNX file fails its
compile with a clear status while the good model still rolls out.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from controller.demo_agents import infer
from controller.models.digits import build_digits_cnn, load_digits_split
from tests.e2e.fleet import Fleet, edgefleet_cli, start_fleet, wait_for, write_manifests
from tests.helpers.broker import Broker

pytestmark = pytest.mark.timeout(240)

INVALID_MODEL = """\
apiVersion: edgefleet.io/v1alpha1
kind: EdgeModel
metadata: {name: bad, namespace: default}
spec:
  version: 1
  source: {sha256: "%s"}
  targets:
    - deviceClass: cpu-x86-64
      precisions: [fp64]
"""


async def _serving(fleet: Fleet, version: int) -> dict[str, dict[str, Any]] | None:
    devs = await fleet.devices()
    ok = {a.device_id: devs[a.device_id] for a in fleet.agents
          if devs.get(a.device_id, {}).get("model") == "digits"
          and devs[a.device_id]["version"] == version and devs[a.device_id]["online"]}
    return ok if len(ok) == len(fleet.agents) else None


async def test_spine(mosquitto: Broker, tmp_path: Path) -> None:
    model = build_digits_cnn(tmp_path / "models" / "digits-cnn.onnx")
    broken = tmp_path / "models" / "broken.onnx"
    broken.write_bytes(b"\x08\x07this is not an ONNX protobuf" * 50)
    manifests = tmp_path / "manifests"
    write_manifests(manifests, model=model, waves=[
        {"name": "canary", "count": 1, "healthGate": {"soakSeconds": 0}},
        {"name": "rest", "percent": 100}])
    write_manifests(manifests, model=broken, name="broken", rollout=False)

    fleet = await start_fleet(tmp_path, mosquitto, agents=3)
    try:
        # device classes, then both models and the rollout, through the real CLI
        res = await edgefleet_cli("--server", fleet.url, "apply", "-f",
                            str(Path(__file__).resolve().parents[2] / "manifests" /
                                "deviceclasses"))
        assert res.returncode == 0, res.stderr
        res = await edgefleet_cli("--server", fleet.url, "apply", "-f", str(manifests))
        assert res.returncode == 0, res.stderr
        assert "edgemodel.edgefleet.io/digits created" in res.stdout
        assert "edgemodel.edgefleet.io/broken created" in res.stdout
        assert "edgerollout.edgefleet.io/digits created" in res.stdout

        serving = await wait_for(lambda: _serving(fleet, 1), timeout_s=120,
                                 what="3/3 agents serving digits@1", on_timeout=fleet.logs)
        assert set(serving) == {"board-1", "board-2", "board-3"}

        # the rollout records per-device state and bytes sent (its status is the reconcile's
        # comparison of desired and observed: it follows the heartbeats by one pass)
        async def rollout_done() -> dict[str, Any] | None:
            r: dict[str, Any] = await fleet.get("/api/v1/rollouts/default/digits")
            return r if r["devices_committed"] == 3 else None

        ro = await wait_for(rollout_done, timeout_s=30, what="the rollout counts 3 committed",
                            on_timeout=fleet.logs)
        assert ro["devices_committed"] == 3 and len(ro["devices"]) == 3 == len(ro["history"])
        assert {d["wave"] for d in ro["history"]} == {0, 1}       # canary, then the rest
        assert all(d["bytes_sent"] > 0 for d in ro["history"])
        assert ro["bytes_sent_total"] == sum(d["bytes_sent"] for d in ro["history"])

        # each agent's answer equals onnxruntime on the source model
        x = load_digits_split()[2][:4]
        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        expected = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        for a in fleet.agents:
            out = await asyncio.to_thread(infer, a.serve_url, "digits", x)
            got = next(iter(out.values()))
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
            assert got.argmax(axis=1).tolist() == expected.argmax(axis=1).tolist()

        # the broken model failed its compile with a clear status; the good one is Ready
        models = {m["name"]: m for m in (await fleet.get("/api/v1/models"))["items"]}
        assert models["digits"]["phase"] == "Ready"
        assert models["broken"]["phase"] == "Failed", models["broken"]
        assert "onnx" in models["broken"]["message"].lower(), models["broken"]["message"]

        # a heartbeat updates the device row
        before = (await fleet.get("/api/v1/devices/board-1"))

        async def newer_heartbeat() -> bool:
            now = await fleet.get("/api/v1/devices/board-1")
            return bool(now["heartbeat_seq"] > before["heartbeat_seq"]
                        and now["last_heartbeat_ms"] > before["last_heartbeat_ms"])

        await wait_for(newer_heartbeat, timeout_s=30, what="a newer heartbeat of board-1")

        # invalid EdgeModel: refused by the CLI (local validation) and by the API (422)
        bad = tmp_path / "bad.yaml"
        bad.write_text(INVALID_MODEL % ("a" * 64))
        res = await edgefleet_cli("--server", fleet.url, "apply", "-f", str(bad))
        assert res.returncode != 0
        assert "spec.targets[0].precisions[0]" in res.stderr, res.stderr
        async with httpx.AsyncClient(base_url=fleet.url) as c:
            r = await c.post("/api/v1/apply", content=bad.read_text(),
                             headers={"content-type": "application/yaml"})
        assert r.status_code == 422
        assert "spec.targets[0].precisions[0]" in r.json()["detail"]
        assert "bad" not in {m["name"] for m in (await fleet.get("/api/v1/models"))["items"]}

        # SIGKILL: the broker publishes the agent's last will; the device goes offline
        victim = fleet.agents[2]
        victim.kill()

        async def victim_offline() -> dict[str, Any] | None:
            d = (await fleet.devices())[victim.device_id]
            return d if not d["online"] else None

        gone = await wait_for(victim_offline, timeout_s=30, what="board-3 offline after SIGKILL")
        assert gone["status"] == "offline"
        devs = await fleet.devices()
        assert devs["board-1"]["online"] and devs["board-2"]["online"]
    finally:
        await fleet.stop()
