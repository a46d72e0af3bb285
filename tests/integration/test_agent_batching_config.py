"""``serve.batching`` in the agent config, end to end with the real agent process
(``edgefleet-agent run --config``): models installed by signed OTA updates (the test driver
plays the controller on a real Mosquitto) are served with dynamic batching — concurrent HTTP
requests get their own correct answers and ``/metrics`` counts executions of more than one
row — after the update, after a restart (models loaded from their slots) and after a second
update; a configured model that cannot be batched (static batch dimension) is logged with
its name and reason and keeps serving unbatched. Bad ``serve.batching`` values are config
errors that name the key."""

from __future__ import annotations

import base64
import http.client
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families

from agent.config import ConfigError, config_from_dict
from protos.edgefleet.v1 import common_pb2 as C
from tests.helpers.broker import Broker, free_port, mosquitto_path, start_mosquitto
from tests.helpers.concurrency import run_together
from tests.helpers.models import _save, build_mlp
from tests.helpers.ota import OtaDriver, agent_config, stop_agent, write_config

CLIENTS = 8
ROUNDS_DEADLINE_S = 60.0
BATCHING = {"mlp": {"max_batch_size": CLIENTS, "max_queue_delay_ms": 20,
                    "max_concurrent_batches": 1},
            "fixed": {"max_batch_size": 4}}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    if not mosquitto_path():
        pytest.skip("mosquitto is not installed")
    b = start_mosquitto(tmp_path / "broker")
    yield b
    b.stop()


def _spawn(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``edgefleet-agent run --config FILE`` (the console script of this venv)."""
    exe = Path(sys.executable).parent / "edgefleet-agent"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "agent.cli"]
    return subprocess.Popen([*cmd, "run", "--config", str(config)],
                            cwd=Path(__file__).resolve().parents[2],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _build_fixed(out: Path) -> Path:
    """x [1, 4] -> y [1, 3]: a static batch of one (cannot be batched)."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], initializer=[w])
    return _save(graph, out)


def _request(port: int, method: str, path: str, body: bytes | None = None
             ) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _infer(port: int, model: str, x: np.ndarray) -> tuple[int, dict]:
    body = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    status, data = _request(port, "POST", f"/v2/models/{model}/infer", body)
    return status, json.loads(data)


def _batch_counts(port: int, model: str, version: int) -> dict[int, float]:
    """Executions per batch size (rows) of one model version, from ``GET /metrics``."""
    status, data = _request(port, "GET", "/metrics")
    assert status == 200
    counts: dict[int, float] = {}
    for family in text_string_to_metric_families(data.decode()):
        if family.name == "edgefleet_batch_size":
            for sample in family.samples:
                if sample.labels["model"] == model and sample.labels["version"] == str(version):
                    counts[int(sample.labels["size"])] = sample.value
    return counts


def _concurrent_round(port: int, session: ort.InferenceSession, inputs: list[np.ndarray], *,
                      version: int) -> int:
    """One request per input, all released at once; every answer is checked against
    onnxruntime run on that request alone. Returns the rows sent."""
    results = run_together([lambda x=x: _infer(port, "mlp", x) for x in inputs])
    for (status, payload), x in zip(results, inputs, strict=True):
        assert status == 200, payload
        assert payload["model_version"] == str(version)
        out = payload["outputs"][0]
        assert out["shape"] == [x.shape[0], 16]
        expected = session.run(None, {"x": x})[0]
        np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(out["shape"]),
                                   expected, rtol=1e-5, atol=1e-5)
    return sum(x.shape[0] for x in inputs)


def _batched_rounds(port: int, model: Path, *, version: int, seed: int) -> dict[int, float]:
    """Rounds of CLIENTS concurrent one-row requests until ``/metrics`` counts an execution
    of more than one row, i.e. requests that were coalesced (how many rounds that takes
    depends on scheduling), then a round of 1-3-row requests (each gets exactly its own
    rows back). Every answer is checked, and every row sent ran exactly once."""
    session = ort.InferenceSession(str(model))
    rng = np.random.default_rng(seed)
    rows = sum(size * n for size, n in _batch_counts(port, "mlp", version).items())
    deadline = time.monotonic() + ROUNDS_DEADLINE_S
    while True:
        inputs = [rng.standard_normal((1, 64)).astype(np.float32) for _ in range(CLIENTS)]
        rows += _concurrent_round(port, session, inputs, version=version)
        counts = _batch_counts(port, "mlp", version)
        if max(counts) > 1:
            break
        assert time.monotonic() < deadline, f"no batch of several requests: {counts}"
    inputs = [rng.standard_normal((1 + i % 3, 64)).astype(np.float32) for i in range(CLIENTS)]
    rows += _concurrent_round(port, session, inputs, version=version)
    counts = _batch_counts(port, "mlp", version)
    assert sum(size * n for size, n in counts.items()) == rows, counts
    return counts


def _wait_log(log: Path, *needles: str, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        text = log.read_text(errors="replace")
        line = next((ln for ln in text.splitlines() if all(n in ln for n in needles)), None)
        if line is not None:
            return line
        assert time.monotonic() < deadline, f"no log line with {needles}:\n{text[-3000:]}"
        time.sleep(0.05)


def _wait_served(port: int, model: str, version: int, *, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status, data = _request(port, "GET", f"/v2/models/{model}")
            if status == 200 and str(version) in json.loads(data).get("versions", []):
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{model} v{version} not served"
        time.sleep(0.05)


def test_serve_batching_from_config_survives_updates_and_restarts(
        broker: Broker, tmp_path: Path) -> None:
    d = OtaDriver(broker.host, broker.port, device_id="batching-1", device_class="cpu-x86")
    mlp1 = build_mlp(tmp_path / "mlp1.onnx", size_mb=0.5, n_in=64, marker=1.0, seed=1)
    mlp2 = build_mlp(tmp_path / "mlp2.onnx", size_mb=0.5, n_in=64, marker=2.0, seed=2)
    fixed = _build_fixed(tmp_path / "fixed.onnx")
    port = free_port()
    cfg = write_config(tmp_path / "agent.yaml", agent_config(
        tmp_path, host=broker.host, port=broker.port, driver=d, serve_port=port,
        serve={"batching": BATCHING}))
    log = tmp_path / "agent.log"
    proc = _spawn(cfg, log)
    try:
        d.publish_keys()
        # 1. installed by OTA: batching on, concurrent requests coalesce, answers correct
        for name, version, path in (("mlp", 1, mlp1), ("fixed", 1, fixed)):
            offer = d.offer(name, version, path.read_bytes())
            d.wait_status(offer.update_id, C.UPDATE_STATE_COMMITTED, timeout_s=60)
        _wait_log(log, "model mlp v1: dynamic batching on", f"max_batch_size={CLIENTS}")
        _batched_rounds(port, mlp1, version=1, seed=0)

        # 2. a model that cannot be batched: logged with model and reason, served unbatched
        line = _wait_log(log, "model fixed v1 served without batching")
        assert "batching_unsupported" in line and "input x [1, 4]" in line
        x = np.ones((1, 4), np.float32)
        status, payload = _infer(port, "fixed", x)
        assert status == 200, payload
        assert payload["outputs"][0]["data"] == [18.0, 22.0, 26.0]

        # 3. restart: the models come from their slots and batching applies again
        assert stop_agent(proc) == 0
        log.write_text("")
        proc = _spawn(cfg, log)
        _wait_served(port, "mlp", 1)
        _wait_log(log, "model mlp v1: dynamic batching on")
        _wait_log(log, "model fixed v1 served without batching", "batching_unsupported")
        _batched_rounds(port, mlp1, version=1, seed=1)

        # 4. the next version arrives by OTA: still batched, answers from v2
        offer = d.offer("mlp", 2, mlp2.read_bytes())
        d.wait_status(offer.update_id, C.UPDATE_STATE_COMMITTED, timeout_s=60)
        _wait_served(port, "mlp", 2)
        _batched_rounds(port, mlp2, version=2, seed=2)
        assert "served without batching" not in "".join(
            ln for ln in log.read_text().splitlines() if "model mlp" in ln)
    finally:
        stop_agent(proc)
        d.close()


ROOT_KEY = base64.b64encode(bytes(range(32))).decode()


@pytest.mark.parametrize("batching, message", [
    ({"mlp": {"max_batch_size": 0}}, r"serve\.batching\.mlp\.max_batch_size"),
    ({"mlp": {"max_batch_size": 5000}}, r"serve\.batching\.mlp\.max_batch_size"),
    ({"mlp": {"max_batch_size": "8"}}, r"serve\.batching\.mlp\.max_batch_size must be an int"),
    ({"mlp": {"max_batch_size": True}}, r"serve\.batching\.mlp\.max_batch_size must be an int"),
    ({"mlp": {"max_queue_delay_ms": -1}}, r"serve\.batching\.mlp\.max_queue_delay_ms"),
    ({"mlp": {"max_queue_delay_ms": "2ms"}}, r"serve\.batching\.mlp\.max_queue_delay_ms"),
    ({"mlp": {"max_concurrent_batches": 0}}, r"serve\.batching\.mlp\.max_concurrent_batches"),
    ({"mlp": {"max_batch": 8}}, r"unknown key\(s\) in serve\.batching\.mlp: max_batch"),
    ({"mlp": 8}, r"serve\.batching\.mlp must be a mapping"),
    ({"Bad Name": {}}, r"serve\.batching: 'Bad Name' is not a model name"),
    ([{"mlp": {}}], r"serve\.batching must be a mapping"),
])
def test_bad_batching_config_is_a_clear_error(batching: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"device_id": "dev-1", "device_class": "cpu-x86",
                          "trust": {"root_public_key": ROOT_KEY},
                          "serve": {"batching": batching}})


def test_batching_defaults_fill_in_and_cli_refuses_bad_values(tmp_path: Path) -> None:
    base = {"device_id": "dev-1", "device_class": "cpu-x86",
            "trust": {"root_public_key": ROOT_KEY}}
    assert config_from_dict(base).serve.batching == {}
    # the commented example in docs/agent-config.example.yaml is a valid setting
    example = (Path(__file__).resolve().parents[2] / "docs" / "agent-config.example.yaml")
    lines = example.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("batching:"))
    block: list[str] = []
    for ln in lines[start + 1:]:
        body = ln.lstrip()
        if not body.startswith("#   "):
            if block:
                break
            continue
        block.append(body[1:])
    documented = yaml.safe_load("\n".join(block))
    assert config_from_dict({**base, "serve": {"batching": documented}}).serve.batching == {
        "digits": {"max_batch_size": 16, "max_queue_delay_ms": 2.0, "max_concurrent_batches": 1}}
    cfg = config_from_dict({**base, "serve": {"batching": {"mlp": {"max_batch_size": 8},
                                                           "cnn": None}}})
    assert cfg.serve.batching == {
        "mlp": {"max_batch_size": 8, "max_queue_delay_ms": 2.0, "max_concurrent_batches": 1},
        "cnn": {"max_batch_size": 16, "max_queue_delay_ms": 2.0, "max_concurrent_batches": 1}}
    cfg.validate()  # idempotent (the agent validates again)
    assert cfg.serve.batching["mlp"]["max_batch_size"] == 8
    bad = write_config(tmp_path / "bad.yaml", {**base, "data_dir": str(tmp_path / "d"),
                                               "serve": {"batching": {"m": {"max_batch_size":
                                                                            -3}}}})
    out = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(bad)],
                         cwd=Path(__file__).resolve().parents[2], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert "serve.batching.m.max_batch_size" in out.stderr
