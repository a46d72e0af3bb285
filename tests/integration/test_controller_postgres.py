"""The controller on PostgreSQL: ingest, a one-wave rollout, JSON columns, big integers.

A throwaway PostgreSQL server (tests/helpers/postgres.py), the real Mosquitto fixture and
paho stand-in devices (tests/helpers/controller.py). Skipped when the PostgreSQL server
binaries are not installed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlmodel import Session, select

from controller.fleet.db import make_engine, session_scope
from controller.fleet.models import Device, DeviceRollout, Event, MetricSample, Resource
from protos import topics
from protos.edgefleet.v1 import device_pb2
from tests.helpers.controller import (
    FakeDevice,
    device_class,
    edge_model,
    edge_rollout,
    mqtt_client,
    started_core,
    wait_until,
)
from tests.helpers.models import build_affine
from tests.helpers.postgres import postgres_url  # noqa: F401  (fixture)

pytestmark = pytest.mark.postgres
FAST = {"chunk_size_bytes": 4096, "ota_max_bytes_per_second": 1024 * 1024}


def _device(core, dev_id):
    with Session(core.db) as s:
        return s.get(Device, dev_id)


async def test_ingest_and_rollout_on_postgres(tmp_path: Path, mosquitto,
                                              postgres_url: str) -> None:  # noqa: F811
    assert postgres_url.startswith("postgresql+psycopg://")
    async with started_core(tmp_path / "c", mosquitto, db_url=postgres_url, **FAST) as core:
        assert core.db.dialect.name == "postgresql"
        # ingest: a heartbeat with nested JSON (facts, models) and labels lands in the row
        c = mqtt_client(mosquitto.port, "pg-hb")
        hb = device_pb2.Heartbeat(
            device_id="board-1", device_class="cpu-x86-64", agent_version="0.1", seq=3,
            uptime_s=5_000_000_000, labels={"site": "berlin"},
            facts=device_pb2.DeviceFacts(arch="x86_64", cpu_flags=["avx2"],
                                         memory_bytes=64 * 2**30),
            models=[device_pb2.ServedModel(name="digits", version=2, sha256="cd" * 32,
                                           active=True, slot="b")])
        c.publish(topics.device_topic("board-1", topics.HEARTBEAT), hb.SerializeToString(),
                  qos=1)
        d = await wait_until(lambda: _device(core, "board-1"), what="device row")
        assert d.online and d.heartbeat_seq == 3 and d.uptime_s == 5_000_000_000
        assert d.last_heartbeat_ms > 2**31          # epoch ms: needs a 64-bit column
        assert d.facts["cpu_flags"] == ["avx2"] and d.facts["memory_bytes"] == str(64 * 2**30)
        assert d.models[0]["sha256"] == "cd" * 32 and d.labels == {"site": "berlin"}
        # a second heartbeat replaces the JSON documents (not only mutates them in place)
        hb.seq, hb.models[0].version, hb.labels["site"] = 4, 3, "paris"
        c.publish(topics.device_topic("board-1", topics.HEARTBEAT), hb.SerializeToString(),
                  qos=1)
        d = await wait_until(lambda: (x := _device(core, "board-1")).heartbeat_seq == 4 and x,
                             what="second heartbeat")
        assert d.models[0]["version"] == "3" and d.labels == {"site": "paris"}
        m = device_pb2.Metrics(device_id="board-1", at_ms=int(time.time() * 1000),
                               host=device_pb2.HostMetrics(agent_rss_bytes=5 * 2**30))
        c.publish(topics.device_topic("board-1", topics.METRICS), m.SerializeToString(), qos=1)

        def sample():
            with Session(core.db) as s:
                return s.exec(select(MetricSample).where(
                    MetricSample.device_id == "board-1")).first()

        row = await wait_until(sample, what="metric sample")
        assert row.agent_rss_bytes == 5 * 2**30 and row.data["host"]["agent_rss_bytes"]
        c.loop_stop()
        c.disconnect()

        # a one-wave rollout to two stand-in devices completes
        src = build_affine(tmp_path / "m.onnx", marker=1.0, n_in=96, n_out=64, seed=1)
        core.apply([device_class(), edge_model("m", sha256=core.upload_artifact(src))])
        mst = await wait_until(lambda: (x := core.get("EdgeModel", "default", "m")["status"])
                               .get("phase") == "Ready" and x, timeout_s=60, what="compiled")
        engine_sha = mst["engines"][0]["sha256"]
        root = core.keys.root_public_raw()
        devs = [FakeDevice(i, mosquitto.port, root) for i in ("pg-a", "pg-b")]
        for dv in devs:
            dv.heartbeat()
        await wait_until(lambda: all(_device(core, dv.device_id) for dv in devs),
                         what="devices registered")
        core.apply([edge_rollout("r", "m", [{"name": "all", "percent": 100}],
                                 selector={"devices": ["pg-a", "pg-b"]})])
        st = await wait_until(lambda: (x := core.get("EdgeRollout", "default", "r")["status"])
                              .get("phase") == "Complete" and x, timeout_s=60,
                              what="rollout complete")
        assert st["updated"] == 2 and st["targeted"] == 2
        assert all(dv.committed and dv.served[0].sha256 == engine_sha for dv in devs)
        with Session(core.db) as s:
            rows = s.exec(select(DeviceRollout)).all()
            assert {r.device_id for r in rows} == {"pg-a", "pg-b"}
            assert all(r.state == "committed" and r.bytes_sent == r.payload_size > 0
                       and r.offered_ms and r.offered_ms > 2**31 for r in rows)
            assert sum(r.bytes_sent for r in rows) == st["bytesSent"]
            events = s.exec(select(Event).where(Event.kind == "EdgeRollout")).all()
            assert any(e.reason == "Complete" for e in events)
        for dv in devs:
            dv.close()


def test_json_columns_round_trip_on_postgres(postgres_url: str) -> None:  # noqa: F811
    engine = make_engine(postgres_url)
    try:
        doc = {"waves": [{"name": "a", "percent": 10, "healthGate": {"soakSeconds": 5}}],
               "selector": {"matchLabels": {"site": "berlin"}}, "paused": False,
               "unicode": "Zürich ✓", "big": 2**53}
        with session_scope(engine) as s:
            s.add(Resource(kind="EdgeRollout", namespace="default", name="r", uid="u1",
                           spec=doc, labels={"team": "vision"}, created_ms=2**41,
                           updated_ms=2**41))
        with session_scope(engine) as s:
            r = s.exec(select(Resource).where(Resource.uid == "u1")).one()
            assert r.spec == doc and r.labels == {"team": "vision"} and r.created_ms == 2**41
            # replace a nested document (the controller assigns new dicts; never mutates)
            r.status = {"phase": "Progressing", "devices": {"d1": {"bytesSent": 2**40}}}
            s.add(r)
        with session_scope(engine) as s:
            r = s.exec(select(Resource).where(Resource.uid == "u1")).one()
            assert r.status["devices"]["d1"]["bytesSent"] == 2**40
    finally:
        engine.dispose()
