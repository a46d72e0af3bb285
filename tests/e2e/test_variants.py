"""End to end: a rollout ships a lighter variant beside the main model; the agent serves it
while its (fake) thermal zone is hot and goes back to the main model when it cools down.

Real Mosquitto, the embedded controller (tests/e2e/fleet.py), one real ``edgefleet-agent
run`` process whose thermal policy reads a fake sysfs thermal zone folder
(``thermal.zones_root``). The EdgeModel has ``spec.variants: [{name: light}]``; the
controller compiles both per class and offers the device the main engine, then the variant
(manifest ``variant: light``). Which model answers is told apart by its outputs: the main
model and the light one have different weights.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from controller.demo_agents import infer, local_device_class, write_agent_config
from controller.models.digits import build_digits_cnn, load_digits_split
from tests.e2e.fleet import Fleet, edgefleet_cli, start_fleet, wait_for
from tests.helpers.broker import Broker

pytestmark = pytest.mark.timeout(240)


def _zone(root: Path, celsius: float) -> None:
    """The fake sysfs zone: thermal_zone0/{type,temp} (millidegrees), written atomically."""
    zone = root / "thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "type").write_text("cpu-thermal\n")
    tmp = zone / "temp.tmp"
    tmp.write_text(f"{int(celsius * 1000)}\n")
    tmp.replace(zone / "temp")


def _manifests(folder: Path, *, main: Path, light: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    docs: list[dict[str, Any]] = [
        {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
         "metadata": {"name": "digits", "namespace": "default"},
         "spec": {"version": 1, "source": {"path": str(main)},
                  "targets": [{"deviceClass": local_device_class(), "precisions": ["fp32"]}],
                  "variants": [{"name": "light", "source": {"path": str(light)}}]}},
        {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeRollout",
         "metadata": {"name": "digits", "namespace": "default"},
         "spec": {"model": "digits", "waves": [{"name": "all", "percent": 100}]}},
    ]
    path = folder / "digits.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def _reference(model: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


async def test_rollout_ships_light_variant_and_thermal_switches(mosquitto: Broker,
                                                                tmp_path: Path) -> None:
    main = build_digits_cnn(tmp_path / "models" / "digits-main.onnx", variant="v1")
    light = build_digits_cnn(tmp_path / "models" / "digits-light.onnx", seed=7)
    x = load_digits_split()[2][:4]
    want_main, want_light = _reference(main, x), _reference(light, x)
    assert not np.allclose(want_main, want_light, atol=1e-3)  # the two can be told apart

    zones = tmp_path / "sys-thermal"
    _zone(zones, 45.0)
    fleet: Fleet = await start_fleet(tmp_path, mosquitto, agents=0)
    try:
        agent = write_agent_config(
            tmp_path / "agents", "board-1", device_class=local_device_class(),
            mqtt_host=mosquitto.host, mqtt_port=mosquitto.port,
            root_public_key_b64=fleet.ctrl.keys.root_public_b64(), heartbeat_interval_s=0.5,
            # CPU never throttles (this machine's CPU is busy with the test itself): only
            # the fake zone drives the policy
            extra={"thermal": {"zones_root": str(zones), "interval_s": 0.2,
                               "throttle_cpu_percent": 101.0, "recover_cpu_percent": 100.0}})
        agent.start()
        fleet.agents.append(agent)
        await wait_for(lambda: _device(fleet, lambda d: d["online"]), timeout_s=60,
                       what="board-1 online", on_timeout=fleet.logs)

        res = await edgefleet_cli("--server", fleet.url, "apply", "-f",
                                  str(_manifests(tmp_path / "manifests", main=main,
                                                 light=light)))
        assert res.returncode == 0, res.stderr

        # the controller compiled the variant per class like the main model
        model = await wait_for(lambda: _ready_model(fleet), timeout_s=120,
                               what="digits Ready with a light engine", on_timeout=fleet.logs)
        [variant] = model["variants"]
        assert variant["name"] == "light" and variant["failures"] == []
        [v_engine] = variant["engines"]
        [m_engine] = model["engines"]
        assert v_engine["deviceClass"] == m_engine["deviceClass"] == local_device_class()
        assert v_engine["sha256"] != m_engine["sha256"]

        # both installed: the heartbeat lists the main engine (active) and the light variant
        served = await wait_for(lambda: _served(fleet, both=True), timeout_s=120,
                                what="main and light installed on board-1",
                                on_timeout=fleet.logs)
        assert served[""]["sha256"] == m_engine["sha256"] and served[""].get("active")
        assert served["light"]["sha256"] == v_engine["sha256"]
        assert not served["light"].get("active")
        status = await wait_for(lambda: _rollout_complete(fleet), timeout_s=60,
                                what="rollout Complete with its variant",
                                on_timeout=fleet.logs)
        dev = status["devices"]["board-1"]
        assert dev["state"] == "updated"
        assert dev["variants"]["light"]["state"] == "updated"
        assert dev["variants"]["light"]["updateId"] != dev["updateId"]
        assert status["variants"] == {"targeted": 1, "updated": 1, "failed": 0}
        ro = await fleet.get("/api/v1/rollouts/default/digits")
        assert ro["devices_total"] == ro["devices_committed"] == 1
        [vrow] = ro["variants"]
        assert vrow["variant"] == "light" and vrow["state"] == "committed"
        assert vrow["target_sha256"] == v_engine["sha256"] and vrow["bytes_sent"] > 0
        assert ro["bytes_sent_total"] == ro["history"][0]["bytes_sent"] + vrow["bytes_sent"]

        # cool: the main model answers
        assert await _answer(agent.serve_url, x, want_main, want_light) == "main"

        # hot (over throttle 80C and light 85C): the light variant answers, health throttled
        _zone(zones, 90.0)
        await wait_for(lambda: _answers(agent.serve_url, x, want_main, want_light, "light"),
                       timeout_s=30, what="the light variant serving", on_timeout=fleet.logs)
        hot = await wait_for(lambda: _device(fleet, lambda d: d["health"] == "throttled"
                                             and _active(d) == "light"),
                             timeout_s=30, what="heartbeat: throttled, light active",
                             on_timeout=fleet.logs)
        assert "90.0C" in hot["health_reason"], hot["health_reason"]
        for _ in range(3):
            assert await _answer(agent.serve_url, x, want_main, want_light) == "light"

        # between the light thresholds (76 < 80 < 85): hysteresis keeps the light variant
        _zone(zones, 80.0)
        seq = int((await fleet.get("/api/v1/devices/board-1"))["heartbeat_seq"])
        later = await wait_for(lambda: _device(fleet, lambda d: d["heartbeat_seq"] > seq + 2),
                               timeout_s=30, what="heartbeats after writing 80C",
                               on_timeout=fleet.logs)
        assert later["health"] == "throttled" and _active(later) == "light", later
        assert await _answer(agent.serve_url, x, want_main, want_light) == "light"

        # cool again: back to the main model, health ok
        _zone(zones, 50.0)
        await wait_for(lambda: _answers(agent.serve_url, x, want_main, want_light, "main"),
                       timeout_s=30, what="the main model serving again",
                       on_timeout=fleet.logs)
        await wait_for(lambda: _device(fleet, lambda d: d["health"] == "ok"
                                       and _active(d) == ""),
                       timeout_s=30, what="heartbeat: ok, main active", on_timeout=fleet.logs)
        assert await _answer(agent.serve_url, x, want_main, want_light) == "main"
    finally:
        await fleet.stop()


async def test_broken_variant_degrades_without_failing_the_model(mosquitto: Broker,
                                                                 tmp_path: Path) -> None:
    main = build_digits_cnn(tmp_path / "models" / "digits-main.onnx")
    broken = tmp_path / "models" / "broken-light.onnx"
    broken.write_bytes(b"\x08\x07this is not an ONNX protobuf" * 50)
    docs = yaml.safe_load_all(_manifests(tmp_path / "manifests", main=main,
                                         light=broken).read_text())
    only_model = tmp_path / "model-only.yaml"
    only_model.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] == "EdgeModel"]))
    fleet = await start_fleet(tmp_path, mosquitto, agents=0)
    try:
        res = await edgefleet_cli("--server", fleet.url, "apply", "-f", str(only_model))
        assert res.returncode == 0, res.stderr

        async def compiled() -> dict[str, Any] | None:
            st = (fleet.ctrl.core.get("EdgeModel", "default", "digits") or {}).get("status")
            return st if st and st.get("phase") in ("Ready", "Failed") and \
                st.get("variants") else None

        st = await wait_for(compiled, timeout_s=120, what="digits compiled")
        assert st["phase"] == "Ready" and len(st["engines"]) == 1, st
        [variant] = st["variants"]
        assert variant["name"] == "light" and variant["engines"] == []
        assert variant["failures"][0]["deviceClass"] == local_device_class()
        conds = {c["type"]: c for c in st["conditions"]}
        assert conds["Ready"]["status"] == "True"
        assert conds["Degraded"]["status"] == "True"
        assert conds["Degraded"]["reason"] == "VariantCompileFailed"
        assert "variant light" in conds["Degraded"]["message"]
    finally:
        await fleet.stop()


async def _device(fleet: Fleet, pred: Any) -> dict[str, Any] | None:
    try:
        d = await fleet.get("/api/v1/devices/board-1")
    except Exception:  # not registered yet (404)
        return None
    return d if pred(d) else None


def _active(device: dict[str, Any]) -> str | None:
    """Variant of the active digits engine in the device's last heartbeat ("" = main)."""
    for m in device.get("models") or []:
        if m.get("name") == "digits" and m.get("active"):
            return str(m.get("variant") or "")
    return None


async def _ready_model(fleet: Fleet) -> dict[str, Any] | None:
    res = fleet.ctrl.core.get("EdgeModel", "default", "digits")
    st = (res or {}).get("status") or {}
    if st.get("phase") == "Ready" and any(v.get("engines") for v in st.get("variants") or []):
        return dict(st)
    return None


async def _served(fleet: Fleet, *, both: bool) -> dict[str, dict[str, Any]] | None:
    d = await _device(fleet, lambda _d: True)
    got = {str(m.get("variant") or ""): m for m in (d or {}).get("models") or []
           if m.get("name") == "digits"}
    return got if ("" in got and (not both or "light" in got)) else None


async def _rollout_complete(fleet: Fleet) -> dict[str, Any] | None:
    res = fleet.ctrl.core.get("EdgeRollout", "default", "digits")
    st = (res or {}).get("status") or {}
    return dict(st) if st.get("phase") == "Complete" else None


async def _answer(url: str, x: np.ndarray, main: np.ndarray, light: np.ndarray) -> str:
    out = await asyncio.to_thread(infer, url, "digits", x)
    got = next(iter(out.values()))
    if np.allclose(got, main, rtol=1e-4, atol=1e-4):
        return "main"
    if np.allclose(got, light, rtol=1e-4, atol=1e-4):
        return "light"
    return f"neither: {got[:1]}"


async def _answers(url: str, x: np.ndarray, main: np.ndarray, light: np.ndarray,
                   which: str) -> bool:
    return await _answer(url, x, main, light) == which
