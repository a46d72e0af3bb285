"""Dynamic batching per model through the HTTP API: concurrent requests are coalesced into
one inference (the batch-size histogram shows executions of more than one row), every
client gets exactly its own rows (same numbers as onnxruntime run on that request alone),
batching survives a hot swap, and a model without a dynamic batch dimension refuses it."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families

from agent.runtime.registry import ModelRegistry
from agent.serve import ServerHandle, start_server
from protos.errors import Rejected
from tests.helpers.concurrency import run_together
from tests.helpers.models import _save, activate_file, build_affine, build_mlp

CLIENTS = 8


def _infer(port: int, x: np.ndarray) -> tuple[int, dict]:
    body = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v2/models/m/infer", body=body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _concurrent(reg: ModelRegistry, handle: ServerHandle, inputs: list[np.ndarray]
                ) -> list[tuple[int, dict]]:
    """Send every input from its own thread, all released at once. A lease held meanwhile
    counts as a request on its way, so no batch leaves before it is full or its queue delay
    is over: the coalescing does not depend on how the threads happen to be scheduled."""
    with reg.get("m"):
        return _send_all(handle, inputs)


def _send_all(handle: ServerHandle, inputs: list[np.ndarray]) -> list[tuple[int, dict]]:
    return run_together([lambda x=x: _infer(handle.port, x) for x in inputs])


def _batch_counts(handle: ServerHandle) -> dict[int, float]:
    conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    counts: dict[int, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "edgefleet_batch_size":
            for sample in family.samples:
                counts[int(sample.labels["size"])] = sample.value
    return counts


def _check_answers(results: list[tuple[int, dict]], inputs: list[np.ndarray],
                   session: ort.InferenceSession, *, version: int) -> None:
    for (status, payload), x in zip(results, inputs, strict=True):
        assert status == 200, payload
        assert payload["model_version"] == str(version)
        out = payload["outputs"][0]
        assert out["shape"] == [x.shape[0], 16]
        expected = session.run(None, {"x": x})[0]  # this request alone, no batching
        np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(out["shape"]),
                                   expected, rtol=1e-5, atol=1e-5)


def test_concurrent_requests_are_batched_and_answered_correctly(tmp_path: Path) -> None:
    files = [build_mlp(tmp_path / "a.onnx", size_mb=0.25, n_in=8, marker=1.0, seed=1),
             build_mlp(tmp_path / "b.onnx", size_mb=0.25, n_in=8, marker=2.0, seed=2)]
    reg = ModelRegistry()
    activate_file(reg, files[0], name="m", version=1)
    reg.configure_batching("m", max_batch_size=CLIENTS, max_queue_delay_ms=1000)
    handle = start_server(reg)
    rng = np.random.default_rng(0)
    try:
        # 1. single-row requests: any count above 1 row comes from coalescing
        inputs = [rng.standard_normal((1, 8)).astype(np.float32) for _ in range(CLIENTS)]
        results = _concurrent(reg, handle, inputs)
        _check_answers(results, inputs, ort.InferenceSession(str(files[0])), version=1)
        counts = _batch_counts(handle)
        assert max(counts) > 1, counts
        assert sum(size * n for size, n in counts.items()) == CLIENTS  # every row ran once

        # 2. requests of 1-3 rows: each client gets exactly its own rows back
        inputs = [rng.standard_normal((1 + i % 3, 8)).astype(np.float32) for i in range(CLIENTS)]
        _check_answers(_concurrent(reg, handle, inputs), inputs,
                       ort.InferenceSession(str(files[0])), version=1)

        # 3. a hot swap keeps the batching settings; answers come from the new version
        activate_file(reg, files[1], name="m", version=2)
        assert reg.batching("m") is not None
        inputs = [rng.standard_normal((1, 8)).astype(np.float32) for _ in range(CLIENTS)]
        _check_answers(_concurrent(reg, handle, inputs), inputs,
                       ort.InferenceSession(str(files[1])), version=2)

        # 4. a lone request runs as a batch of its own rows (nobody else is on the way)
        before = _batch_counts(handle).get(1, 0)
        status, payload = _infer(handle.port, inputs[0])
        assert status == 200
        assert _batch_counts(handle).get(1, 0) == before + 1

        # 5. turned off: requests run one by one again
        reg.configure_batching("m", max_batch_size=0, max_queue_delay_ms=0)
        assert reg.batching("m") is None
        status, payload = _infer(handle.port, inputs[0])
        assert status == 200 and payload["model_version"] == "2"
    finally:
        handle.stop()
        reg.close()


def _build_static(out: Path) -> Path:
    """x [1, 4] -> y [1, 3]: a fixed batch of one."""
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "static",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], initializer=[w])
    return _save(graph, out)


def test_model_without_dynamic_batch_dim_refuses_batching(tmp_path: Path) -> None:
    reg = ModelRegistry()
    activate_file(reg, _build_static(tmp_path / "static.onnx"), name="s", version=1)
    with pytest.raises(Rejected) as err:
        reg.configure_batching("s", max_batch_size=4, max_queue_delay_ms=5)
    assert err.value.reason == "batching_unsupported"
    assert "dynamic first (batch) dimension" in str(err.value)
    assert "input x [1, 4]" in str(err.value)
    assert reg.batching("s") is None

    activate_file(reg, build_affine(tmp_path / "m.onnx", marker=1.0), name="m", version=1)
    for size, delay_ms in ((4, -1.0), (100_000, 1.0), (4, 60_000.0)):
        with pytest.raises(ValueError):
            reg.configure_batching("m", max_batch_size=size, max_queue_delay_ms=delay_ms)
    assert reg.batching("m") is None
    reg.close()
