"""The agent's idle footprint: ``edgefleet-agent run`` without a model does not load numpy
or onnxruntime (checked in the real process's memory map), yet reports onnxruntime with its
version in the heartbeat's device facts and answers health, metadata and ``/metrics``; the
first OTA update loads both while activating, and the model serves right away.
``probe_runtime`` (device facts without importing onnxruntime) agrees with the backend."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import onnxruntime
import pytest

from agent.runtime.base import BackendUnavailable
from agent.runtime.onnxruntime import OnnxRuntimeCpuBackend, OnnxRuntimeCudaBackend
from protos.edgefleet.v1 import common_pb2 as C
from tests.helpers.broker import Broker, free_port, mosquitto_path, start_mosquitto
from tests.helpers.models import build_affine
from tests.helpers.ota import OtaDriver, agent_config, infer, stop_agent, write_config

#: shared libraries that show numpy / onnxruntime are loaded in a process
NUMPY_LIB = "_multiarray_umath"
ORT_LIB = "onnxruntime_pybind11_state"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    if not mosquitto_path():
        pytest.skip("mosquitto is not installed")
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc/PID/maps (Linux)")
    b = start_mosquitto(tmp_path / "broker")
    yield b
    b.stop()


def _mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_idle_agent_loads_numpy_and_onnxruntime_only_with_the_first_model(
        broker: Broker, tmp_path: Path) -> None:
    d = OtaDriver(broker.host, broker.port, device_id="lazy-1", device_class="cpu-x86")
    port = free_port()
    cfg = write_config(tmp_path / "agent.yaml", agent_config(
        tmp_path, host=broker.host, port=broker.port, driver=d,
        serve_port=port))
    exe = Path(sys.executable).parent / "edgefleet-agent"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "agent.cli"]
    log = tmp_path / "agent.log"
    proc = subprocess.Popen([*cmd, "run", "--config", str(cfg)],
                            cwd=Path(__file__).resolve().parents[2],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)
    try:
        d.publish_keys()
        hb = d.last_heartbeat(timeout_s=30)
        runtimes = {r.engine_kind: r for r in hb.facts.runtimes}
        assert runtimes["onnxruntime-cpu"].version == onnxruntime.__version__
        assert ("onnxruntime-cuda" in runtimes) == (
            "CUDAExecutionProvider" in onnxruntime.get_available_providers())
        # serving without a model needs neither library
        assert _get(port, "/v2/health/ready")[0] == 200
        assert _get(port, "/v2/models/affine")[0] == 404
        status, text = _get(port, "/metrics")
        assert status == 200 and b"# TYPE edgefleet_batch_size_total counter" in text
        maps = _mapped(proc.pid)
        assert NUMPY_LIB not in maps and ORT_LIB not in maps, "loaded before any model"

        model = build_affine(tmp_path / "affine.onnx", marker=3.0)
        offer = d.offer("affine", 1, model.read_bytes())
        d.wait_status(offer.update_id, C.UPDATE_STATE_COMMITTED, timeout_s=60)
        maps = _mapped(proc.pid)
        assert NUMPY_LIB in maps and ORT_LIB in maps
        assert infer(f"http://127.0.0.1:{port}", "affine", [[0.0] * 4]) == [3.0, 3.0, 3.0]
        status, meta = _get(port, "/v2/models/affine")
        assert status == 200 and json.loads(meta)["inputs"][0]["datatype"] == "FP32"
    finally:
        stop_agent(proc)
        d.close()


def test_probe_runtime_agrees_with_the_backend() -> None:
    assert OnnxRuntimeCpuBackend.probe_runtime() == OnnxRuntimeCpuBackend().runtime_info()
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert OnnxRuntimeCudaBackend.probe_runtime() == OnnxRuntimeCudaBackend().runtime_info()
    else:
        with pytest.raises(BackendUnavailable):
            OnnxRuntimeCudaBackend()
        # onnxruntime is imported in this process: the probe asks the real backend
        with pytest.raises(BackendUnavailable):
            OnnxRuntimeCudaBackend.probe_runtime()


def test_probe_runtime_without_importing_onnxruntime() -> None:
    code = ("import sys, json; from agent.runtime.base import available_runtimes; "
            "r = available_runtimes(); "
            "print(json.dumps({'kinds': {i.engine_kind: i.version for i in r}, "
            "'loaded': [m for m in ('numpy', 'onnxruntime') if m in sys.modules]}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[2], check=True)
    result = json.loads(out.stdout)
    assert result["loaded"] == []
    assert result["kinds"]["onnxruntime-cpu"] == onnxruntime.__version__
    assert ("onnxruntime-cuda" in result["kinds"]) == (
        "CUDAExecutionProvider" in onnxruntime.get_available_providers())
