"""Thermal policy driven by a fake sysfs thermal zone (the hardware we do not have): throttle,
light variant, hysteresis and recovery, applied to a real registry serving over HTTP."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest

from agent.runtime.registry import ModelRegistry
from agent.serve import start_server
from agent.telemetry.host import HostReader, read_accelerator_load
from agent.telemetry.thermal import ThermalConfig, ThermalPolicy
from tests.helpers.models import activate_file, build_affine

BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                               "data": [0, 0, 0, 0]}]}).encode()


def _zone(root: Path, index: int, kind: str, celsius: float) -> None:
    zone = root / f"thermal_zone{index}"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "type").write_text(kind + "\n")
    (zone / "temp").write_text(f"{int(celsius * 1000)}\n")


def _marker(port: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v2/models/m/infer", body=BODY)
    resp = conn.getresponse()
    payload = json.loads(resp.read())
    conn.close()
    assert resp.status == 200, payload
    return payload["outputs"][0]["data"][0]


def test_fake_zone_drives_throttle_light_variant_and_recovery(tmp_path: Path) -> None:
    zones = tmp_path / "thermal"
    _zone(zones, 0, "cpu-thermal", 45.0)
    _zone(zones, 1, "gpu-thermal", 40.0)
    reg = ModelRegistry()
    activate_file(reg, build_affine(tmp_path / "main.onnx", marker=1.0), name="m", version=1)
    activate_file(reg, build_affine(tmp_path / "light.onnx", marker=5.0, seed=3), name="m",
                  version=1, variant="light")
    cpu = {"value": 10.0}
    policy = ThermalPolicy(ThermalConfig(), zones_root=zones, registry=reg,
                           cpu_percent=lambda: cpu["value"])
    handle = start_server(reg)
    try:
        assert policy.evaluate() == [] and policy.health() == ("ok", "")
        assert _marker(handle.port) == 1.0

        _zone(zones, 1, "gpu-thermal", 81.5)  # over throttle_temp_c (80)
        [event] = policy.evaluate()
        assert event.action == "throttle" and "81.5C" in event.reason and "gpu-thermal" in \
            event.reason
        health, reason = policy.health()
        assert health == "throttled" and "81.5C" in reason
        assert reg.max_concurrency == 1
        assert _marker(handle.port) == 1.0  # still serving, one at a time

        _zone(zones, 1, "gpu-thermal", 86.0)  # over light_variant_temp_c (85)
        assert [e.action for e in policy.evaluate()] == ["light_variant_on"]
        assert _marker(handle.port) == 5.0
        assert {(i.variant, i.active) for i in reg.served()} == {("", False), ("light", True)}

        _zone(zones, 1, "gpu-thermal", 78.0)  # between the thresholds: hysteresis holds
        assert policy.evaluate() == []
        assert policy.health()[0] == "throttled" and _marker(handle.port) == 5.0

        _zone(zones, 1, "gpu-thermal", 74.0)  # light variant off, still throttled (> 72)
        assert [e.action for e in policy.evaluate()] == ["light_variant_off"]
        assert _marker(handle.port) == 1.0 and reg.max_concurrency == 1

        _zone(zones, 1, "gpu-thermal", 60.0)
        assert [e.action for e in policy.evaluate()] == ["recover"]
        assert policy.health() == ("ok", "") and reg.max_concurrency == 0

        cpu["value"] = 99.0  # CPU saturation throttles too
        [event] = policy.evaluate()
        assert event.action == "throttle" and "cpu 99%" in event.reason
        cpu["value"] = 85.0  # above recover_cpu_percent (80): stays throttled
        assert policy.evaluate() == []
        cpu["value"] = 20.0
        assert [e.action for e in policy.evaluate()] == ["recover"]
        assert [e.action for e in policy.events] == [
            "throttle", "light_variant_on", "light_variant_off", "recover", "throttle",
            "recover"]
    finally:
        handle.stop()
        reg.close()


def test_no_light_variant_means_throttle_only(tmp_path: Path) -> None:
    zones = tmp_path / "thermal"
    _zone(zones, 0, "soc", 95.0)
    reg = ModelRegistry()
    activate_file(reg, build_affine(tmp_path / "main.onnx", marker=1.0), name="m", version=1)
    policy = ThermalPolicy(ThermalConfig(throttled_concurrency=2), zones_root=zones,
                           registry=reg, cpu_percent=lambda: None)
    assert [e.action for e in policy.evaluate()] == ["throttle"]
    assert reg.max_concurrency == 2 and reg.preferred_variant == ""


def test_bad_thresholds_are_refused() -> None:
    with pytest.raises(ValueError, match="recover_temp_c"):
        ThermalPolicy(ThermalConfig(throttle_temp_c=70, recover_temp_c=75))


def test_host_readings_from_fake_sysfs(tmp_path: Path) -> None:
    zones = tmp_path / "thermal"
    _zone(zones, 0, "cpu-thermal", 51.25)
    (zones / "thermal_zone1").mkdir()
    (zones / "thermal_zone1" / "temp").write_text("garbage")  # unreadable zone is skipped
    sys_root = tmp_path / "sys"
    (sys_root / "kernel/debug/rknpu").mkdir(parents=True)
    (sys_root / "kernel/debug/rknpu/load").write_text("NPU load:  Core0: 30%, Core1: 10%, "
                                                      "Core2:  2%,\n")
    host = HostReader(thermal_root=zones, sys_root=sys_root).read()
    assert [(t.zone, t.celsius) for t in host.temperatures] == [("thermal_zone0:cpu-thermal",
                                                                 51.25)]
    assert host.accelerator_load_percent == pytest.approx(14.0)
    assert host.HasField("agent_rss_bytes") and host.agent_rss_bytes > 0
    (sys_root / "devices/gpu.0").mkdir(parents=True)
    (sys_root / "devices/gpu.0/load").write_text("734\n")  # Jetson: per-mille
    assert read_accelerator_load(sys_root=sys_root) == (73.4, "")
    bare = HostReader(thermal_root=tmp_path / "none", sys_root=tmp_path / "none").read()
    assert not bare.HasField("accelerator_load_percent") and not bare.temperatures
    assert any(u.startswith("temperatures:") for u in bare.unavailable)
    assert any(u.startswith("accelerator_load_percent:") for u in bare.unavailable)
