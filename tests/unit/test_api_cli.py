"""The `edgefleet` CLI and the API's write paths against the real ControllerCore over HTTP.

A real uvicorn server (in a thread) serves create_app(ControllerCore(...)) on a free port with a
real SQLite database and artifact store; the core's MQTT loop is not started (nothing here
needs the broker). The CLI runs in-process through ``controller.cli.main``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml

from controller.api.app import create_app
from controller.broker import free_port
from controller.cli import main
from controller.core import ControllerCore
from controller.settings import Settings

MODEL_YAML = """\
apiVersion: edgefleet.io/v1alpha1
kind: EdgeModel
metadata: {name: digits, namespace: default}
spec:
  version: 1
  source: {path: model.onnx}
  targets: [{deviceClass: cpu-x86-64}]
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, ControllerCore]]:
    core = ControllerCore(Settings(data_dir=tmp_path / "ctl", max_upload_bytes=4096,
                                   compile_in_process_pool=False))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(core), host="127.0.0.1", port=port,
                                        log_level="warning", lifespan="off"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", core
    finally:
        srv.should_exit = True
        t.join(10)
        core.db.dispose()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_apply_get_delete_round_trip(server: tuple[str, ControllerCore], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    url, core = server
    src = tmp_path / "m"
    src.mkdir()
    model_bytes = b"not compiled here, only stored" * 10
    (src / "model.onnx").write_bytes(model_bytes)
    (src / "model.yaml").write_text(MODEL_YAML)

    rc, out, err = run(capsys, "--server", url, "apply", "-f", str(src))
    assert rc == 0, err
    assert "edgemodel.edgefleet.io/digits created" in out
    # the client uploaded the file and pinned its sha256 in place of the local path
    sha = hashlib.sha256(model_bytes).hexdigest()
    stored = core.get("EdgeModel", "default", "digits")
    assert stored is not None
    assert stored["spec"]["source"] == {"sha256": sha}
    assert core.store.has(sha)

    rc, out, _ = run(capsys, "--server", url, "apply", "-f", str(src / "model.yaml"))
    assert rc == 0 and "edgemodel.edgefleet.io/digits unchanged" in out

    rc, out, _ = run(capsys, "--server", url, "get", "models")
    assert rc == 0
    header, row = out.strip().splitlines()
    assert header.split()[:3] == ["NAMESPACE", "NAME", "VERSION"]
    assert row.split()[:3] == ["default", "digits", "1"]
    rc, out, _ = run(capsys, "--server", url, "get", "models", "-o", "json")
    assert json.loads(out)["items"][0]["source_sha256"] == sha
    rc, out, _ = run(capsys, "--server", url, "get", "events")
    assert rc == 0 and "EdgeModel/default/digits" in out

    rc, out, _ = run(capsys, "--server", url, "delete", "edgemodel", "digits")
    assert rc == 0 and "edgemodel.edgefleet.io/digits deleted" in out
    assert core.get("EdgeModel", "default", "digits") is None
    rc, _, err = run(capsys, "--server", url, "delete", "edgemodel", "digits")
    assert rc == 1 and "not found" in err


def test_apply_invalid_names_the_field_and_sends_nothing(
        server: tuple[str, ControllerCore], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    url, core = server
    bad = tmp_path / "bad.yaml"
    doc = yaml.safe_load(MODEL_YAML)
    doc["spec"]["version"] = 0
    bad.write_text(yaml.safe_dump(doc))
    (tmp_path / "model.onnx").write_bytes(b"x")
    rc, _, err = run(capsys, "--server", url, "apply", "-f", str(bad))
    assert rc == 1
    assert err.startswith("error:") and "spec.version" in err
    assert core.list() == []
    missing = tmp_path / "missing.yaml"
    missing.write_text(MODEL_YAML.replace("model.onnx", "nope.onnx"))
    rc, _, err = run(capsys, "--server", url, "apply", "-f", str(missing))
    assert rc == 1 and "nope.onnx" in err and "not found" in err


def test_push_and_upload_limit(server: tuple[str, ControllerCore], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    url, core = server
    f = tmp_path / "blob.bin"
    f.write_bytes(b"a" * 1000)
    rc, out, _ = run(capsys, "--server", url, "push", str(f))
    assert rc == 0 and out.strip() == hashlib.sha256(f.read_bytes()).hexdigest()
    assert core.store.has(out.strip())
    big = tmp_path / "big.bin"
    big.write_bytes(b"b" * 5000)          # max_upload_bytes=4096 in the fixture
    rc, _, err = run(capsys, "--server", url, "push", str(big))
    assert rc == 1 and "413" in err
    r = httpx.post(f"{url}/api/v1/artifacts", content=b"b" * 5000)
    assert r.status_code == 413


def test_api_refuses_server_side_paths(server: tuple[str, ControllerCore]) -> None:
    url, core = server
    doc = yaml.safe_load(MODEL_YAML)
    doc["spec"]["source"] = {"path": "/etc/hostname"}      # a file that exists on the server
    r = httpx.post(f"{url}/api/v1/apply", json=[doc])
    assert r.status_code == 422
    assert "spec.source.path" in r.json()["detail"] and "sha256" in r.json()["detail"]
    assert core.list() == []


def test_unreachable_server_is_one_error_line(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    rc, _, err = run(capsys, "--server", url, "get", "devices")
    assert rc == 1 and err.startswith("error: cannot reach the controller")


def test_keys_init_rotate_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "keys")
    rc, out, _ = run(capsys, "keys", "init", "--keys-dir", d)
    assert rc == 0
    first = json.loads(out[out.index("{"):])
    rc, _, err = run(capsys, "keys", "init", "--keys-dir", d)
    assert rc == 1 and "already exist" in err
    rc, out, _ = run(capsys, "keys", "rotate", "--keys-dir", d)
    rotated = json.loads(out[out.index("{"):])
    assert rotated["current"] != first["current"]
    assert rotated["key_list_version"] > first["key_list_version"]
    rc, out, _ = run(capsys, "keys", "revoke", first["current"], "--keys-dir", d)
    assert rc == 0 and first["current"] in json.loads(out[out.index("{"):])["revoked"]


def test_delta_make_and_apply(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(bytes(range(256)) * 64)
    new.write_bytes(bytes(range(256)) * 60 + b"changed" * 100)
    rc, out, _ = run(capsys, "delta", "make", str(old), str(new), str(tmp_path / "d.delta"))
    assert rc == 0
    made = json.loads(out)
    rc, out, _ = run(capsys, "delta", "apply", str(old), str(tmp_path / "d.delta"),
                     str(tmp_path / "out.bin"), "--expected-sha256", made["target_sha256"])
    assert rc == 0
    assert (tmp_path / "out.bin").read_bytes() == new.read_bytes()
    rc, _, err = run(capsys, "delta", "apply", str(old), str(tmp_path / "d.delta"),
                     str(tmp_path / "x.bin"), "--expected-sha256", "0" * 64)
    assert rc == 1 and err.startswith("error:")
