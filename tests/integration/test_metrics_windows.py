"""Windowed metrics end to end: real Metrics messages over a real Mosquitto into a started
ControllerCore (SQLite), then controller.fleet.windows, the JSON API and the dashboard.

A paho stand-in device (tests/helpers/controller.py) reports cumulative counters the way the
agent does (agent/telemetry/metrics.py bounds): a long steady history at ~2 ms, then a slow
period at ~40 ms, then an agent restart (counters start over). Message timestamps are set
by the test (the recent past), so every window is known exactly; nothing waits on time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session, func, select

from controller.api import queries
from controller.api.app import create_app
from controller.fleet import windows
from controller.fleet.db import make_engine, session_scope
from controller.fleet.ingest import percentile
from controller.fleet.models import Device, MetricSample
from protos import topics
from protos.edgefleet.v1 import device_pb2
from tests.helpers.controller import FakeDevice, registered_devices, started_core, wait_until
from tests.helpers.postgres import postgres_url  # noqa: F401  (fixture)

BOUNDS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
          5000.0)
FAST, SLOW = BOUNDS.index(2.5), BOUNDS.index(50.0)     # buckets (1, 2.5] and (25, 50] ms
STEP_MS = 10_000
STEADY, SLOW_AT, RESTART_AT = range(1, 30), (30, 31, 32), (33, 34)


class Agent:
    """Cumulative counters of one model, as an agent keeps them since it started."""

    def __init__(self, requests: int = 0) -> None:
        self.requests, self.errors, self.sum_ms = requests, 0, requests * 2.0
        self.counts = [0] * (len(BOUNDS) + 1)
        self.counts[FAST] = requests

    def serve(self, n: int, *, bucket: int, ms: float, errors: int = 0) -> None:
        self.requests += n
        self.errors += errors
        self.counts[bucket] += n
        self.sum_ms += n * ms

    def message(self, dev: str, at_ms: int) -> bytes:
        m = device_pb2.Metrics(device_id=dev, at_ms=at_ms, host=device_pb2.HostMetrics(
            cpu_percent=20.0))
        mm = m.models.add(name="digits", version=1, requests=self.requests, errors=self.errors)
        mm.latency.bounds_ms.extend(BOUNDS)
        mm.latency.counts.extend(self.counts)
        mm.latency.sum_ms = self.sum_ms
        return m.SerializeToString()


def publish(dev: FakeDevice, payload: bytes) -> None:
    dev.client.publish(dev.topic(topics.METRICS), payload, qos=1).wait_for_publish(5)


def samples(core: Any, dev: str) -> int:
    with Session(core.db) as s:
        return int(s.exec(select(func.count()).select_from(MetricSample)
                          .where(MetricSample.device_id == dev)).one())


def sample_at(core: Any, dev: str, at_ms: int) -> MetricSample:
    with Session(core.db) as s:
        return s.exec(select(MetricSample).where(MetricSample.device_id == dev,
                                                 MetricSample.at_ms == at_ms)).one()


async def test_windows_slow_period_restart_api_and_stale(tmp_path: Path, mosquitto) -> None:
    # stale_after_s well above the test's run time: board-2 must stay fresh until the end
    async with started_core(tmp_path / "c", mosquitto, stale_after_s=600.0) as core:
        devs = await registered_devices(core, mosquitto.port, ["board-1", "board-2"])
        dev = devs["board-1"]
        base = int(time.time() * 1000) - RESTART_AT[-1] * STEP_MS - 2000
        at = [base + i * STEP_MS for i in range(RESTART_AT[-1] + 1)]
        agent = Agent(requests=100_000)      # served a long time before the controller saw it
        lifetime: list[int] = []
        for i in range(len(at)):
            if i in STEADY:
                agent.serve(100, bucket=FAST, ms=2.0)
            elif i in SLOW_AT:
                agent.serve(100, bucket=SLOW, ms=40.0, errors=2)
            elif i == RESTART_AT[0]:
                agent = Agent()              # the agent restarted: counters start over
                agent.serve(20, bucket=FAST, ms=2.0)
            elif i > RESTART_AT[0]:
                agent.serve(20, bucket=FAST, ms=2.0)
            if i == SLOW_AT[-1]:
                lifetime = list(agent.counts)
            publish(dev, agent.message("board-1", at[i]))
        await wait_until(lambda: samples(core, "board-1") == len(at), what="all metrics stored")
        assert core.ingest.dropped == 0

        # the first message made no window (no snapshot yet); every later one made one
        all_windows = windows.list_windows(core.db, device_id="board-1", limit=1000)
        assert len(all_windows) == len(at) - 1
        assert sample_at(core, "board-1", at[0]).p99_ms is None
        assert all(w.requests >= 0 and all(c >= 0 for c in w.counts) for w in all_windows)

        # the slow period: the window quantiles see it; the lifetime histogram would not
        slow = windows.window_stats(core.db, model="digits", version=1, device_ids=["board-1"],
                                    since_ms=at[SLOW_AT[0]], until_ms=at[SLOW_AT[-1]])
        assert (slow.requests, slow.errors, slow.windows) == (300, 6, 3)
        assert slow.error_rate == 0.02 and slow.devices == ("board-1",)
        assert slow.p50_ms is not None and 25.0 < slow.p50_ms <= 50.0
        assert slow.p99_ms is not None and 25.0 < slow.p99_ms <= 50.0
        assert slow.covered_s == 30.0 and slow.requests_per_s == 10.0
        life_p99 = percentile(BOUNDS, lifetime, 0.99)
        assert life_p99 is not None and life_p99 <= 2.5
        row = sample_at(core, "board-1", at[SLOW_AT[-1]])
        assert row.requests == 100_000 + 2900 + 300          # the cumulative total stays
        assert row.p99_ms is not None and 25.0 < row.p99_ms <= 50.0
        steady = windows.window_stats(core.db, model="digits", version=1, device_ids=None,
                                      since_ms=at[1], until_ms=at[STEADY[-1]])
        assert steady.requests == 2900 and steady.p99_ms is not None and steady.p99_ms <= 2.5

        # the agent restart: the new counts are the window, not a negative or huge one
        first, second = (w for w in all_windows if w.end_ms in (at[33], at[34]))
        assert first.reset and (first.requests, first.errors) == (20, 0)
        assert sum(first.counts) == 20 and first.start_ms == at[32]
        assert not second.reset and second.requests == 20

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(core)),
                                     base_url="http://controller") as http:
            r = await http.get("/api/v1/devices/board-1/metrics/windows",
                               params={"model": "digits", "version": 1,
                                       "since_ms": at[SLOW_AT[0]]})
            assert r.status_code == 200, r.text
            body = r.json()
            assert [x["end_ms"] for x in body["items"]] == at[SLOW_AT[0]:]
            assert 25.0 < body["items"][0]["p99_ms"] <= 50.0
            assert body["items"][0]["requests_per_s"] == 10.0
            assert body["items"][0]["error_rate"] == 0.02
            assert body["items"][3]["reset"] is True and body["items"][3]["requests"] == 20
            assert len(body["items"][0]["latency"]["counts"]) == len(BOUNDS) + 1
            (st,) = body["stats"]
            assert (st["model"], st["version"], st["requests"]) == ("digits", 1, 340)
            assert st["devices"] == ["board-1"]
            r = await http.get("/api/v1/devices/board-1/metrics/windows",
                               params={"model": "digits", "version": 2})
            assert r.status_code == 200 and r.json()["items"] == []
            assert (await http.get("/api/v1/devices/nope/metrics/windows")).status_code == 404

            # the device view: windowed values over a stated window (in process, at a fixed
            # time: the windows that ended in the 60 s before it)
            with Session(core.db) as s:
                d = queries.get_device(s, "board-1", at_ms=at[-1] + 1000)
            assert d is not None and d["health"] == "ok" and d["stale"] is False
            (m,) = d["metrics"]
            assert (m["model"], m["version"], m["window_s"]) == ("digits", 1, 60)
            assert m["requests_total"] == 40 and m["window_requests"] == 100 + 300 + 40
            assert m["window"]["windows"] == 6 and m["window"]["covered_s"] == 60.0
            assert 25.0 < m["p99_ms"] <= 50.0 and m["stale"] is False
            assert m["error_rate"] == 6 / 440

            # offline: health "stale" (not "ok") and the metrics marked stale
            off = device_pb2.Presence(device_id="board-1", online=False, reason="lwt",
                                      at_ms=int(time.time() * 1000))
            dev.client.publish(dev.topic(topics.PRESENCE), off.SerializeToString(),
                               qos=1).wait_for_publish(5)

            def offline() -> bool:
                with Session(core.db) as s:
                    row = s.get(Device, "board-1")
                    return row is not None and not row.online

            await wait_until(offline, what="board-1 offline")
            d = (await http.get("/api/v1/devices/board-1")).json()
            assert d["health"] == "stale" and d["stale"] is True
            assert d["reported_health"] == "ok" and "offline" in d["stale_reason"]
            assert d["metrics"] and all(x["stale"] for x in d["metrics"])
            items = {x["id"]: x for x in (await http.get("/api/v1/devices")).json()["items"]}
            assert items["board-1"]["health"] == "stale" and items["board-2"]["health"] == "ok"
            fleet = (await http.get("/api/v1/metrics")).json()
            assert fleet["window_s"] == 60
            assert all(x["stale"] for x in fleet["items"] if x["device_id"] == "board-1")
            page = (await http.get("/devices/board-1")).text
            assert "over the last 60 s" in page and 'id="dev-health" class="stale"' in page
            overview = (await http.get("/")).text
            assert 'class="health stale"' in overview

        # silent (online, but no message for longer than stale_after_s): stale as well
        with Session(core.db) as s:
            b2 = s.get(Device, "board-2")
            assert b2 is not None and b2.online and b2.last_seen_ms
            later = b2.last_seen_ms + int(core.settings.stale_after_s * 1000) + 1
            silent = queries.device_view(b2, at_ms=later,
                                         stale_after_s=core.settings.stale_after_s)
            fresh = queries.device_view(b2, at_ms=b2.last_seen_ms,
                                        stale_after_s=core.settings.stale_after_s)
        assert silent["health"] == "stale" and "no message for" in silent["stale_reason"]
        assert fresh["health"] == "ok" and fresh["stale"] is False
        for d2 in devs.values():
            d2.close()


@pytest.mark.postgres
def test_windows_on_postgres(postgres_url: str) -> None:  # noqa: F811
    """The window and snapshot tables on PostgreSQL: 64-bit ms and counts, JSON histograms,
    the row lock on the snapshots."""
    engine = make_engine(postgres_url)
    try:
        big, t0 = 5 * 2**31, 1_700_000_000_000
        first = windows.Counters(big, 7, windows.Histogram((1.0, 2.0), (0, big, 0), 1e9))
        later = windows.Counters(big + 10, 8, windows.Histogram((1.0, 2.0), (0, big, 10), 2e9))
        for at, counters in ((t0, first), (t0 + 10_000, later)):
            with session_scope(engine) as s:
                windows.record(s, device_id="pg-1", at_ms=at, models={("m", 2**40): counters})
        st = windows.window_stats(engine, model="m", version=2**40, device_ids=["pg-1"],
                                  since_ms=t0)
        assert (st.requests, st.errors, st.windows, st.p99_ms) == (10, 1, 1, 2.0)
        assert st.last_ms == t0 + 10_000 and st.covered_s == 10.0
        with session_scope(engine) as s:
            windows.prune(s, cutoff_ms=t0 + 20_000)
        assert windows.list_windows(engine, device_id="pg-1") == []
    finally:
        engine.dispose()
