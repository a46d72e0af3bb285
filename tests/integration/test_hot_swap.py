"""Hot swap under load: client threads hammer the HTTP API while the update thread swaps
between two model versions (and tries broken ones); no request may fail, and every
response must come wholly from one version, with the marker that version's file carries."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

import pytest

from agent.runtime.registry import ModelRegistry
from agent.serve import start_server
from protos.errors import Rejected
from tests.helpers.models import activate_file, build_affine, build_nan, fingerprint

BODY = json.dumps({"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32",
                               "data": [0.0] * 12}]}).encode()
CLIENTS = 4
SWAPS = 12


def _wait_for(predicate, *, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.002)


def test_swaps_under_load_drop_nothing(tmp_path: Path) -> None:
    files = {1.0: build_affine(tmp_path / "a.onnx", marker=1.0, seed=1),
             2.0: build_affine(tmp_path / "b.onnx", marker=2.0, seed=2)}
    nan = build_nan(tmp_path / "nan.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(files[2.0].read_bytes()[:60])
    reg = ModelRegistry()
    activate_file(reg, files[1.0], name="m", version=1)
    marker_of_version = {1: 1.0}
    handle = start_server(reg)
    stop = threading.Event()
    failures: list[str] = []
    seen: dict[int, int] = {}  # version -> responses
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=30)
        try:
            while not stop.is_set():
                conn.request("POST", "/v2/models/m/infer", body=BODY)
                resp = conn.getresponse()
                payload = json.loads(resp.read())
                if resp.status != 200:
                    failures.append(f"{resp.status}: {payload}")
                    continue
                version = int(payload["model_version"])
                data = payload["outputs"][0]["data"]
                with lock:
                    expected = marker_of_version.get(version)
                    seen[version] = seen.get(version, 0) + 1
                if expected is None or any(v != expected for v in data):
                    failures.append(f"version {version} answered {data}, expected {expected}")
        except Exception as e:  # collected and asserted below
            failures.append(repr(e))
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        _wait_for(lambda: seen.get(1, 0) >= 20)
        for version in range(2, SWAPS + 2):
            marker = 2.0 if version % 2 == 0 else 1.0
            with lock:
                marker_of_version[version] = marker
            activate_file(reg, files[marker], name="m", version=version)
            _wait_for(lambda v=version: seen.get(v, 0) >= 20)
            if version % 4 == 0:  # broken updates in between: rejected, old keeps serving
                for bad in (nan, corrupt):
                    with pytest.raises(Rejected):
                        activate_file(reg, bad, name="m", version=version + 100)
                with pytest.raises(Rejected):
                    activate_file(reg, files[marker], name="m", version=version + 100,
                                  fp=fingerprint(arch="riscv64"))
                before = seen[version]
                _wait_for(lambda v=version, b=before: seen.get(v, 0) >= b + 20)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        handle.stop()
    assert failures == []
    assert set(seen) == set(range(1, SWAPS + 2))
    assert not any(v >= 100 for v in seen)
    assert [(i.version, i.active) for i in reg.served()] == [(SWAPS + 1, True)]
    reg.close()
