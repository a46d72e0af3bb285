"""The JSON API and dashboard over a real SQLite database filled by the real telemetry ingest.

Device rows come from real protobuf heartbeats/metrics/presence passed through
controller.fleet.ingest.Ingest (the same code the MQTT loop calls). Write paths that need the
ControllerCore are covered in tests/unit/test_api_core.py and tests/e2e.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from controller.api.app import create_app, parse_documents
from controller.fleet.db import make_engine
from controller.fleet.ingest import Ingest
from controller.settings import Settings
from protos import topics
from protos.edgefleet.v1 import common_pb2, device_pb2
from protos.errors import Rejected


@dataclass
class ReadOnlyCore:
    """The part of ControllerCore the read endpoints use: settings and the DB engine."""

    settings: Settings
    engine: Engine

    def apply(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        raise AssertionError("apply must not be reached by invalid documents")


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[TestClient, Ingest, ReadOnlyCore]]:
    settings = Settings(data_dir=tmp_path, max_upload_bytes=1024)
    engine = make_engine(settings.resolved_db_url)
    core = ReadOnlyCore(settings, engine)
    with TestClient(create_app(core)) as client:
        yield client, Ingest(settings, engine), core
    engine.dispose()


def heartbeat(dev: str, *, version: int = 3, health: str = "ok") -> bytes:
    hb = device_pb2.Heartbeat(device_id=dev, device_class="cpu-x86-64", agent_version="0.1.0",
                              uptime_s=12, sent_at_ms=int(time.time() * 1000), seq=1,
                              health=health, serve_url="http://127.0.0.1:9001")
    hb.models.add(name="digits", version=version, sha256="ab" * 32, slot="a", active=True,
                  engine_kind="onnxruntime-cpu", precision="fp32")
    hb.models.add(name="digits", version=version - 1, sha256="cd" * 32, slot="b", active=False)
    hb.updates.add(update_id="u1", model_name="digits", version=version,
                   state=common_pb2.UPDATE_STATE_COMMITTED)
    return hb.SerializeToString()


def metrics(dev: str, *, requests: int) -> bytes:
    m = device_pb2.Metrics(device_id=dev, at_ms=int(time.time() * 1000), seq=1)
    mm = m.models.add(name="digits", version=3, requests=requests, errors=0)
    mm.latency.bounds_ms.extend([1.0, 5.0, 10.0])
    mm.latency.counts.extend([requests, 0, 0, 0])
    m.host.cpu_percent = 12.5
    return m.SerializeToString()


def test_devices_list_detail_and_metrics(setup: tuple[TestClient, Ingest, ReadOnlyCore]) -> None:
    client, ingest, _ = setup
    assert client.get("/api/v1/devices").json() == {"items": []}
    ingest.handle(topics.device_topic("board-1", topics.HEARTBEAT), heartbeat("board-1"))
    ingest.handle(topics.device_topic("board-2", topics.HEARTBEAT),
                  heartbeat("board-2", version=4, health="throttled"))
    ingest.handle(topics.device_topic("board-1", topics.METRICS), metrics("board-1", requests=7))
    ingest.handle(topics.device_topic("board-1", topics.METRICS), metrics("board-1", requests=9))

    items = client.get("/api/v1/devices").json()["items"]
    assert [d["id"] for d in items] == ["board-1", "board-2"]
    b1, b2 = items
    assert b1["online"] is True and b1["status"] == "online"
    assert (b1["model"], b1["version"]) == ("digits", 3)      # the active slot, not slot b
    assert b2["version"] == 4 and b2["health"] == "throttled"
    assert b1["update_state"] == ""          # no desired target: an offer history is not a status
    assert b1["last_heartbeat_age_s"] is not None and b1["last_heartbeat_age_s"] < 3600

    one = client.get("/api/v1/devices/board-1").json()
    assert one["serve_url"] == "http://127.0.0.1:9001"
    assert [m["requests"] for m in one["metrics"]] == [9]      # latest sample only
    latest = client.get("/api/v1/metrics").json()["items"]
    assert {(m["device_id"], m["requests"]) for m in latest} == {("board-1", 9)}
    history = client.get("/api/v1/devices/board-1/metrics").json()["items"]
    assert [m["requests"] for m in history] == [7, 9]
    assert client.get("/api/v1/devices/nope").status_code == 404


def test_presence_offline_shows_in_api_and_dashboard(
        setup: tuple[TestClient, Ingest, ReadOnlyCore]) -> None:
    client, ingest, _ = setup
    ingest.handle(topics.device_topic("board-1", topics.HEARTBEAT), heartbeat("board-1"))
    offline = device_pb2.Presence(device_id="board-1", online=False, reason="lwt",
                                  at_ms=int(time.time() * 1000) + 1000)
    ingest.handle(topics.device_topic("board-1", topics.PRESENCE), offline.SerializeToString())
    d = client.get("/api/v1/devices/board-1").json()
    assert d["online"] is False and d["status"] == "offline"
    html = client.get("/").text
    assert 'data-device="board-1"' in html and "badge offline" in html
    assert "digits@3" in html
    page = client.get("/devices/board-1")
    assert page.status_code == 200 and "Device board-1" in page.text
    assert "/static/dashboard.js" in page.text


def test_dashboard_escapes_device_values(setup: tuple[TestClient, Ingest, ReadOnlyCore]) -> None:
    client, ingest, _ = setup
    hb = device_pb2.Heartbeat(device_id="board-x", device_class="<script>x</script>",
                              health="ok")
    ingest.handle(topics.device_topic("board-x", topics.HEARTBEAT), hb.SerializeToString())
    html = client.get("/").text
    assert "<script>x</script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html


def test_static_assets_are_local(setup: tuple[TestClient, Ingest, ReadOnlyCore]) -> None:
    client, _, _ = setup
    js = client.get("/static/dashboard.js")
    assert js.status_code == 200 and "setInterval" in js.text and "http" not in js.text
    assert client.get("/static/dashboard.css").status_code == 200
    assert client.get("/static/../app.py").status_code == 404
    assert client.get("/static/secrets.txt").status_code == 404


def test_probes(setup: tuple[TestClient, Ingest, ReadOnlyCore]) -> None:
    client, _, _ = setup
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200


BAD_MODEL = """\
apiVersion: edgefleet.io/v1alpha1
kind: EdgeModel
metadata: {name: digits, namespace: default}
spec:
  version: 1
  source: {path: digits.onnx}
  targets:
    - deviceClass: cpu-x86-64
      precisions: [fp64]
"""


def test_apply_invalid_yaml_is_422_naming_the_field(
        setup: tuple[TestClient, Ingest, ReadOnlyCore]) -> None:
    client, _, _ = setup
    r = client.post("/api/v1/apply", content=BAD_MODEL,
                    headers={"content-type": "application/yaml"})
    assert r.status_code == 422
    assert "spec.targets[0].precisions[0]" in r.json()["detail"]
    assert "fp64" in r.json()["detail"]
    missing = BAD_MODEL.replace("  version: 1\n", "")
    r = client.post("/api/v1/apply", content=missing, headers={"content-type": "text/yaml"})
    assert r.status_code == 422 and "version" in r.json()["detail"]
    r = client.post("/api/v1/apply", content="{not json", headers={"content-type":
                                                                     "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    r = client.post("/api/v1/apply", content="- 1\n- 2\n", headers={"content-type": "text/yaml"})
    assert r.status_code == 422


def test_apply_body_over_limit_is_413(setup: tuple[TestClient, Ingest, ReadOnlyCore]) -> None:
    client, _, _ = setup
    r = client.post("/api/v1/apply", content=b"#" * (1024 * 1024 + 1),
                    headers={"content-type": "text/yaml"})
    assert r.status_code == 413


def test_artifact_over_limit_is_413(setup: tuple[TestClient, Ingest, ReadOnlyCore],
                                    tmp_path: Path) -> None:
    client, _, _ = setup          # max_upload_bytes=1024 in this fixture
    r = client.post("/api/v1/artifacts", content=b"x" * 1025,
                    headers={"content-type": "application/octet-stream"})
    assert r.status_code == 413 and "max_upload_bytes" in r.json()["detail"]
    # streamed without a length header: refused while reading
    r = client.post("/api/v1/artifacts", content=iter([b"x" * 600, b"y" * 600]))
    assert r.status_code == 413
    assert not any((tmp_path / "uploads").glob("*"))       # no temp file left behind


def test_parse_documents_shapes() -> None:
    docs = parse_documents(b'{"kind": "List", "items": [{"kind": "EdgeModel"}]}', "text/yaml")
    assert docs == [{"kind": "EdgeModel"}]
    assert len(parse_documents(b'[{"kind": "A"}, {"kind": "B"}]', "application/json")) == 2
    assert len(parse_documents(b"kind: A\n---\nkind: B\n---\n", "text/yaml")) == 2
    with pytest.raises(Rejected):
        parse_documents(b"\xff\xfe", "text/yaml")
    with pytest.raises(Rejected):
        parse_documents(b"", "text/yaml")
