"""The local inference API (KServe v2 / OIP) against a standard client (tritonclient.http)
and raw HTTP: JSON and binary tensors, metadata, malformed requests, limits, /metrics."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families

from agent.runtime.registry import ModelRegistry
from agent.serve import ServerHandle, start_server
from agent.telemetry.metrics import MetricsCollector
from tests.helpers.models import activate_file, build_affine

MAX_REQUEST_BYTES = 64 * 1024


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ModelRegistry, ServerHandle]]:
    reg = ModelRegistry()
    activate_file(reg, build_affine(tmp_path / "m.onnx", marker=1.0), name="m", version=1)
    handle = start_server(reg, max_request_bytes=MAX_REQUEST_BYTES)
    try:
        yield reg, handle
    finally:
        handle.stop()
        reg.close()


def _client(handle: ServerHandle, **kw: object) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(f"127.0.0.1:{handle.port}", **kw)


def _post(conn: http.client.HTTPConnection, path: str, body: bytes,
          headers: dict[str, str] | None = None) -> tuple[int, dict]:
    conn.request("POST", path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, json.loads(data) if data else {}


def test_health_and_metadata_with_tritonclient(served) -> None:
    _, handle = served
    client = _client(handle)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("m") and client.is_model_ready("m", "1")
    assert not client.is_model_ready("nope")
    assert not client.is_model_ready("m", "2")
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    meta = client.get_model_metadata("m")
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]
    client.close()


@pytest.mark.parametrize("binary", [False, True])
def test_infer_json_and_binary_matches_onnxruntime(served, tmp_path: Path, binary: bool) -> None:
    import onnxruntime as ort

    _, handle = served
    client = _client(handle)
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    inp = triton.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    result = client.infer("m", [inp], model_version="1",
                          outputs=[triton.InferRequestedOutput("y", binary_data=binary)])
    expected = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(result.as_numpy("y"), expected, rtol=1e-6)
    out_meta = result.get_response()["outputs"][0]
    assert ("parameters" in out_meta) == binary
    assert result.get_response()["model_version"] == "1"
    client.close()


def test_digits_model_predictions_through_tritonclient(tmp_path: Path) -> None:
    from controller.models import digits
    model = digits.build_digits_cnn(tmp_path / "digits.onnx", seed=0, variant="v1")
    _, _, x_test, y_test = digits.load_digits_split()
    reg = ModelRegistry()
    activate_file(reg, model, name="digits", version=1)
    handle = start_server(reg)
    client = _client(handle)
    try:
        x = x_test[:64]
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        logits = client.infer("digits", [inp]).as_numpy("logits")
        assert logits.shape == (64, 10)
        assert (logits.argmax(1) == y_test[:64]).mean() > 0.9
    finally:
        client.close()
        handle.stop()
        reg.close()


GOOD = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]}


def _with(**changes: object) -> bytes:
    item = dict(GOOD["inputs"][0], **changes)
    return json.dumps({"inputs": [item]}).encode()


MALFORMED: list[tuple[str, bytes, dict[str, str], int, str]] = [
    ("not json", b"{nope", {}, 400, "not valid JSON"),
    ("json list", b"[1, 2]", {}, 400, "JSON object"),
    ("no inputs", b"{}", {}, 400, "'inputs'"),
    ("unknown input", _with(name="z"), {}, 400, "unknown input"),
    ("wrong dtype", _with(datatype="FP64"), {}, 400, "expects FP32"),
    ("bad datatype", _with(datatype="BYTES"), {}, 400, "unsupported datatype"),
    ("wrong shape", _with(shape=[1, 5], data=[0] * 5), {}, 400, "expects [-1, 4]"),
    ("negative dim", _with(shape=[-1, 4]), {}, 400, "non-negative"),
    ("count mismatch", _with(data=[0, 0, 0]), {}, 400, "3 values"),
    ("strings", _with(data=["a", "b", "c", "d"]), {}, 400, "not a FP32 tensor"),
    ("ragged", _with(data=[[0, 0], [0]]), {}, 400, "not a FP32 tensor"),
    ("no data", _with(data=None), {}, 400, "neither"),
    ("binary too big", _with(data=None, parameters={"binary_data_size": 16}), {}, 400,
     "binary_data_size"),
    ("bad header length", json.dumps(GOOD).encode(),
     {"Inference-Header-Content-Length": "99999"}, 400, "Inference-Header-Content-Length"),
    ("unknown output", json.dumps({**GOOD, "outputs": [{"name": "nope"}]}).encode(), {}, 400,
     "unknown output"),
    ("too big", b"x" * (MAX_REQUEST_BYTES + 1), {}, 413, "max_request_bytes"),
]


@pytest.mark.parametrize(("label", "body", "headers", "status", "message"), MALFORMED,
                         ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_4xx_with_message(served, label: str, body: bytes,
                                                  headers: dict[str, str], status: int,
                                                  message: str) -> None:
    _, handle = served
    conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=10)
    code, payload = _post(conn, "/v2/models/m/infer", body, headers)
    assert code == status, payload
    assert message in payload["error"]
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=10)
    assert _post(conn, "/v2/models/m/infer", json.dumps(GOOD).encode())[0] == 200
    conn.close()


def test_routing_errors(served) -> None:
    _, handle = served
    conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=10)
    good = json.dumps(GOOD).encode()
    assert _post(conn, "/v2/models/nope/infer", good)[0] == 404
    assert _post(conn, "/v2/models/m/versions/9/infer", good)[0] == 404
    code, payload = _post(conn, "/v2/models/m/versions/abc/infer", good)
    assert code == 400 and "integer" in payload["error"]
    conn.request("PUT", "/v2/models/m/infer", body=good)
    resp = conn.getresponse()
    assert resp.status == 405 and json.loads(resp.read())["error"]
    conn.request("GET", "/v2/nothing")
    resp = conn.getresponse()
    assert resp.status == 404 and json.loads(resp.read())["error"]
    # the same keep-alive connection still serves good requests after those errors
    code, payload = _post(conn, "/v2/models/m/versions/1/infer", good)
    assert code == 200 and payload["outputs"][0]["data"] == [1.0, 1.0, 1.0]
    conn.close()


def test_garbage_on_the_socket_gets_400(served) -> None:
    import socket

    _, handle = served
    with socket.create_connection(("127.0.0.1", handle.port), timeout=10) as s:
        s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400") and b'"error"' in reply


def test_chunked_request_body(served) -> None:
    _, handle = served
    conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=10)
    body = json.dumps(GOOD).encode()
    conn.request("POST", "/v2/models/m/infer", body=iter([body[:10], body[10:]]),
                 encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["outputs"][0]["data"] == [1.0] * 3
    conn.close()


def test_concurrent_good_requests_unaffected_by_bad_ones(served) -> None:
    _, handle = served
    failures: list[str] = []
    done = {"good": 0}
    lock = threading.Lock()

    def good_worker(seed: int) -> None:
        client = _client(handle)
        rng = np.random.default_rng(seed)
        try:
            for _ in range(40):
                x = rng.standard_normal((2, 4)).astype(np.float32)
                inp = triton.InferInput("x", [2, 4], "FP32")
                inp.set_data_from_numpy(x, binary_data=bool(seed % 2))
                y = client.infer("m", [inp]).as_numpy("y")
                if y is None or y.shape != (2, 3):
                    failures.append(f"bad output {y!r}")
                with lock:
                    done["good"] += 1
        except Exception as e:  # collected and asserted below
            failures.append(repr(e))
        finally:
            client.close()

    def bad_worker() -> None:
        for i in range(60):
            conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=10)
            _label, body, headers, status, _msg = MALFORMED[i % len(MALFORMED)]
            try:
                code, _ = _post(conn, "/v2/models/m/infer", body, headers)
                if code != status:
                    failures.append(f"malformed request got {code}, expected {status}")
            finally:
                conn.close()

    threads = [threading.Thread(target=good_worker, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=bad_worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert failures == []
    assert done["good"] == 160


def test_prometheus_metrics_endpoint(served) -> None:
    reg, handle = served
    conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=10)
    for _ in range(3):
        assert _post(conn, "/v2/models/m/infer", json.dumps(GOOD).encode())[0] == 200
    assert _post(conn, "/v2/models/m/infer", _with(datatype="FP64"))[0] == 400
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
    conn.close()
    [req] = families["edgefleet_requests"].samples
    assert req.labels == {"model": "m", "version": "1"} and req.value == 4
    [err] = families["edgefleet_request_errors"].samples
    assert err.value == 1
    count = [s for s in families["edgefleet_request_latency_seconds"].samples
             if s.name.endswith("_count")]
    assert count[0].value == 4
    snap = {(m.name, m.version): m for m in MetricsCollector(reg).snapshot("dev-1").models}
    assert snap[("m", 1)].requests == 4 and sum(snap[("m", 1)].latency.counts) == 4
