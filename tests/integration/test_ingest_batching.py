"""The batched ingest over a real SQLite database: sequences of messages written as batches.

Batches are composed by hand (``submit`` several messages, then ``flush_now``) so the test
knows which messages share a transaction: heartbeats coalesce to the latest valid one,
presence and heartbeats of one device in one batch resolve in arrival order, a steady
heartbeat is a narrow update that still tells the truth after the row changed under it, two
metrics of one device in one batch difference against each other, and the liveness sweep
marks silent devices offline (and only those). The last tests run the real ControllerCore
with Mosquitto: its writer task, the ``GET /api/v1/ingest`` counters, and a stop that writes
what was received.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from controller.api.app import create_app
from controller.fleet.db import make_engine
from controller.fleet.ingest import Ingest
from controller.fleet.liveness import REASON, Sweeper
from controller.fleet.models import Device, Event, MetricSample
from controller.settings import Settings
from protos import topics
from protos.edgefleet.v1 import device_pb2
from tests.helpers.controller import mqtt_client, started_core, wait_until
from tests.helpers.postgres import postgres_url  # noqa: F401  (fixture)

HB, PR, MT = topics.HEARTBEAT, topics.PRESENCE, topics.METRICS


@pytest.fixture
def ing(tmp_path: Path) -> Iterator[Ingest]:
    settings = Settings(data_dir=tmp_path)
    engine = make_engine(settings.resolved_db_url)
    yield Ingest(settings, engine)
    engine.dispose()


def _hb(dev: str, seq: int, *, version: int = 1, labels: dict[str, str] | None = None,
        interval_ms: int = 0) -> bytes:
    hb = device_pb2.Heartbeat(device_id=dev, device_class="cpu-x86-64", seq=seq, uptime_s=seq,
                              sent_at_ms=int(time.time() * 1000), health="ok",
                              heartbeat_interval_ms=interval_ms)
    hb.labels.update(labels or {"site": "a"})
    hb.models.add(name="digits", version=version, sha256=f"{version:064x}", slot="a",
                  active=True)
    return hb.SerializeToString()


def _presence(dev: str, online: bool) -> bytes:
    return device_pb2.Presence(device_id=dev, online=online, reason="connect" if online else
                               "lwt", at_ms=int(time.time() * 1000)).SerializeToString()


def _metrics(dev: str, requests: int, at_ms: int) -> bytes:
    m = device_pb2.Metrics(device_id=dev, at_ms=at_ms, seq=requests)
    mm = m.models.add(name="digits", version=1, requests=requests, errors=0)
    mm.latency.bounds_ms.extend([1.0, 5.0])
    mm.latency.counts.extend([requests, 0, 0])
    return m.SerializeToString()


def _send(ing: Ingest, dev: str, leaf: str, payload: bytes) -> None:
    ing.submit(topics.device_topic(dev, leaf), payload)


def _dev(engine: Engine, dev: str) -> Device | None:
    with Session(engine) as s:
        return s.get(Device, dev)


def _events(engine: Engine, dev: str) -> list[str]:
    with Session(engine) as s:
        return [e.reason for e in s.exec(select(Event).where(Event.name == dev)
                                         .order_by(Event.id)).all()]


def test_heartbeats_coalesce_and_garbage_never_displaces_a_good_one(ing: Ingest) -> None:
    for seq in (1, 2, 3):
        _send(ing, "b1", HB, _hb("b1", seq))
    _send(ing, "b1", HB, b"\xff\xfe not a heartbeat")          # after the good ones
    _send(ing, "b1", HB, device_pb2.Heartbeat(device_id="b2").SerializeToString())
    assert ing.coalesced == 2 and ing.drops["garbage"] == 2
    ing.flush_now()
    d = _dev(ing.engine, "b1")
    assert d is not None and d.online and d.heartbeat_seq == 3
    assert d.models[0]["version"] == "1" or d.models[0]["version"] == 1
    assert _events(ing.engine, "b1") == ["DeviceOnline"]
    assert _dev(ing.engine, "b2") is None
    assert ing.stats()["received"][HB] == 5


def test_presence_and_heartbeat_in_one_batch_resolve_in_arrival_order(ing: Ingest) -> None:
    _send(ing, "b1", HB, _hb("b1", 1))
    _send(ing, "b2", HB, _hb("b2", 1))
    ing.flush_now()
    # b1: heartbeat, then its last will (it died): offline. b2: will, then back: online.
    _send(ing, "b1", HB, _hb("b1", 2))
    _send(ing, "b1", PR, _presence("b1", False))
    _send(ing, "b2", PR, _presence("b2", False))
    _send(ing, "b2", HB, _hb("b2", 2))
    ing.flush_now()
    d1, d2 = _dev(ing.engine, "b1"), _dev(ing.engine, "b2")
    assert d1 is not None and not d1.online and d1.offline_reason == "lwt"
    assert d1.heartbeat_seq == 2                      # its last heartbeat is still written
    assert d2 is not None and d2.online and d2.heartbeat_seq == 2
    assert _events(ing.engine, "b1") == ["DeviceOnline", "DeviceOffline"]
    assert _events(ing.engine, "b2") == ["DeviceOnline"]     # no flap for a blip
    # the next batch: b1 comes back
    _send(ing, "b1", HB, _hb("b1", 3))
    ing.flush_now()
    d1 = _dev(ing.engine, "b1")
    assert d1 is not None and d1.online and d1.offline_reason == ""
    assert _events(ing.engine, "b1") == ["DeviceOnline", "DeviceOffline", "DeviceOnline"]


def test_steady_heartbeats_are_narrow_but_changes_and_outside_writes_land(ing: Ingest) -> None:
    _send(ing, "b1", HB, _hb("b1", 1))
    ing.flush_now()
    full = ing.writer.full_writes
    for seq in (2, 3):
        _send(ing, "b1", HB, _hb("b1", seq))
        ing.flush_now()
    assert ing.writer.full_writes == full and ing.writer.narrow_writes == 2
    d = _dev(ing.engine, "b1")
    assert d is not None and d.heartbeat_seq == 3 and d.uptime_s == 3
    # a new version and new labels: the full row is rewritten
    _send(ing, "b1", HB, _hb("b1", 4, version=2, labels={"site": "b"}))
    assert ing.flush_now() is True               # rollout-relevant: the reconcile is kicked
    d = _dev(ing.engine, "b1")
    assert d is not None and d.labels == {"site": "b"} and int(d.models[0]["version"]) == 2
    # the row marked offline outside the ingest (the sweep): a steady heartbeat revives it
    with Session(ing.engine) as s:
        row = s.get(Device, "b1")
        assert row is not None
        row.online, row.offline_reason = False, REASON
        s.add(row)
        s.commit()
    _send(ing, "b1", HB, _hb("b1", 5, version=2, labels={"site": "b"}))
    assert ing.flush_now() is True
    d = _dev(ing.engine, "b1")
    assert d is not None and d.online and d.offline_reason == "" and d.heartbeat_seq == 5
    # the row deleted (decommissioned): the next heartbeat registers it again, fully
    with Session(ing.engine) as s:
        row = s.get(Device, "b1")
        s.delete(row)
        s.commit()
    _send(ing, "b1", HB, _hb("b1", 6, version=2, labels={"site": "b"}))
    ing.flush_now()
    d = _dev(ing.engine, "b1")
    assert d is not None and d.labels == {"site": "b"} and d.models


def test_two_metrics_of_one_device_in_one_batch(ing: Ingest) -> None:
    now = int(time.time() * 1000)
    _send(ing, "b1", HB, _hb("b1", 1))
    _send(ing, "b1", MT, _metrics("b1", 10, now - 2000))
    _send(ing, "b1", MT, _metrics("b1", 25, now - 1000))
    _send(ing, "b2", MT, _metrics("b2", 5, now - 1000))
    ing.flush_now()
    with Session(ing.engine) as s:
        rows = s.exec(select(MetricSample).order_by(MetricSample.id)).all()
    assert [(r.device_id, r.requests) for r in rows] == [("b1", 10), ("b1", 25), ("b2", 5)]
    w = rows[1].data["window"]
    assert w is not None and w["requests"] == 15          # differenced within the batch
    assert rows[0].data["window"] is None and rows[2].data["window"] is None
    assert ing.dropped == 0


def test_liveness_sweep_marks_silent_devices_offline_once(ing: Ingest) -> None:
    sweeper = Sweeper(ing.settings, ing.engine)       # offline after 3 missed periods
    _send(ing, "fast", HB, _hb("fast", 1, interval_ms=1000))
    _send(ing, "slow", HB, _hb("slow", 1, interval_ms=60_000))
    _send(ing, "dflt", HB, _hb("dflt", 1))            # no period reported: 10 s default
    ing.flush_now()
    now = int(time.time() * 1000)
    assert sweeper.sweep(now_ms=now + 2000) is False  # 2 periods of "fast": not yet
    assert sweeper.sweep(now_ms=now + 5000) is True   # 5 periods: offline
    assert sweeper.sweep(now_ms=now + 5000) is False  # once
    fast, slow, dflt = (_dev(ing.engine, d) for d in ("fast", "slow", "dflt"))
    assert fast is not None and not fast.online and fast.offline_reason == REASON
    assert slow is not None and slow.online and dflt is not None and dflt.online
    assert _events(ing.engine, "fast")[-1] == "DeviceOffline"
    sweeper.sweep(now_ms=now + 31_000)                # 3.1 default periods: dflt too
    dflt = _dev(ing.engine, "dflt")
    assert dflt is not None and not dflt.online
    slow = _dev(ing.engine, "slow")
    assert slow is not None and slow.online          # 60 s period: still within allowance
    assert sweeper.marked == 2
    # it heartbeats again: online, with an event
    _send(ing, "fast", HB, _hb("fast", 2, interval_ms=1000))
    ing.flush_now()
    fast = _dev(ing.engine, "fast")
    assert fast is not None and fast.online
    assert _events(ing.engine, "fast")[-1] == "DeviceOnline"


def test_sweep_gives_every_device_a_full_allowance_after_a_restart(ing: Ingest) -> None:
    _send(ing, "old", HB, _hb("old", 1))
    ing.flush_now()
    with Session(ing.engine) as s:           # its last heartbeat was long before a restart
        row = s.get(Device, "old")
        assert row is not None
        row.last_heartbeat_ms = row.last_seen_ms = int(time.time() * 1000) - 3_600_000
        s.add(row)
        s.commit()
    restarted = Sweeper(ing.settings, ing.engine)
    assert restarted.sweep() is False                          # not judged yet
    assert restarted.sweep(now_ms=restarted.started_ms + 31_000) is True


async def test_core_writes_batches_and_reports_counters(tmp_path: Path, mosquitto: Any) -> None:
    async with started_core(tmp_path / "c", mosquitto, offline_check_s=0.2,
                            heartbeat_interval_s=0.3) as core:
        c = mqtt_client(mosquitto.port, "sim")
        for i in range(20):
            c.publish(topics.device_topic(f"d{i}", HB), _hb(f"d{i}", 1), qos=1)
        c.publish(topics.device_topic("d0", HB), b"\x00garbage", qos=1)

        def online() -> int:
            with Session(core.db) as s:
                return sum(1 for d in s.exec(select(Device)).all() if d.online)

        await wait_until(lambda: online() == 20, what="20 devices online")
        # silent from now on: the sweep takes them offline (0.9 s without a heartbeat)
        await wait_until(lambda: online() == 0, timeout_s=30, what="silent devices offline")
        with TestClient(create_app(core)) as api:
            st = api.get("/api/v1/ingest").json()
        assert st["received"][HB] == 21 and st["dropped"] == {"garbage": 1}
        assert st["offlineMarked"] == 20 and st["lagMs"]["samples"] >= 20
        assert st["batches"] >= 1 and st["pending"] == 0
        # messages received right before a stop are written by the stop
        for i in range(5):
            c.publish(topics.device_topic(f"late{i}", HB), _hb(f"late{i}", 1), qos=1)
        await wait_until(lambda: core.ingest.received[HB] >= 26, what="late heartbeats in")
        await core.stop()
        c.disconnect()
    with Session(make_engine(core.settings.resolved_db_url)) as s:
        assert all(s.get(Device, f"late{i}") is not None for i in range(5))


def test_batches_and_sweep_on_postgres(tmp_path: Path, postgres_url: str) -> None:  # noqa: F811
    """The same statements on PostgreSQL: executemany updates, snapshot upserts, the sweep's
    millisecond arithmetic (BIGINT, not INTEGER parameters)."""
    settings = Settings(data_dir=tmp_path, db_url=postgres_url)
    engine = make_engine(settings.resolved_db_url)
    try:
        ing = Ingest(settings, engine)
        now = int(time.time() * 1000)
        for seq in (1, 2):
            _send(ing, "pg1", HB, _hb("pg1", seq, interval_ms=1000))
            _send(ing, "pg1", MT, _metrics("pg1", 10 * seq, now - 5000 + seq * 1000))
            ing.flush_now()
        assert ing.writer.narrow_writes == 1
        with Session(engine) as s:
            rows = s.exec(select(MetricSample).order_by(MetricSample.id)).all()
        assert [r.requests for r in rows] == [10, 20] and rows[1].data["window"]["requests"] == 10
        sweeper = Sweeper(settings, engine)
        assert sweeper.sweep(now_ms=now + 10_000) is True
        d = _dev(engine, "pg1")
        assert d is not None and not d.online and d.offline_reason == REASON
    finally:
        engine.dispose()


def test_emit_many_dedupes_against_stored_and_within_the_batch(ing: Ingest) -> None:
    from controller.fleet import events

    def ev(name: str, reason: str) -> dict[str, Any]:
        return {"kind": "Device", "name": name, "reason": reason, "message": f"{name} {reason}"}

    with Session(ing.engine) as s:
        assert events.emit_many(s, [ev("a", "DeviceOnline"), ev("a", "DeviceOnline"),
                                    ev("b", "DeviceOnline")], now_ms=1) == 2
        s.commit()
    with Session(ing.engine) as s:
        # a's latest already says it; b goes offline; then a flaps off and on within one batch
        assert events.emit_many(s, [ev("a", "DeviceOnline"), ev("b", "DeviceOffline"),
                                    ev("a", "DeviceOffline"), ev("a", "DeviceOnline")],
                                now_ms=2) == 3
        s.commit()
    assert _events(ing.engine, "a") == ["DeviceOnline", "DeviceOffline", "DeviceOnline"]
    assert _events(ing.engine, "b") == ["DeviceOnline", "DeviceOffline"]
