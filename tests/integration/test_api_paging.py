"""Paging, filters and the fleet summary of the device list, over real SQLite and PostgreSQL.

The real FastAPI app (controller.api.app.create_app) on a real database, with device rows made
by the real telemetry ingest (controller.fleet.ingest.Ingest, the code the MQTT loop calls)
from protobuf heartbeats and presence messages. Covered: ``GET /api/v1/devices?limit=&continue=``
returns every device exactly once across pages while devices are added and removed between
pages; malformed or mismatched continue tokens and out-of-range limits are 400s that say why;
``online``, ``stale``, ``deviceClass``, ``labelSelector`` and ``fields`` select in SQL what the
full list would show; GET /api/v1/fleet/summary counts what the full list shows after a
sequence (offline, back, new version, silent); ``edgefleet get devices`` pages and prints the
same table; controller.fleet.db.add_missing_indexes adds an index an old database lacks.
The PostgreSQL variants are skipped without the server binaries (tests/helpers/postgres.py).
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from controller import cli_client
from controller.api.app import create_app
from controller.fleet.db import add_missing_indexes, make_engine, session_scope
from controller.fleet.ingest import Ingest
from controller.fleet.models import Device
from controller.settings import Settings
from protos import topics
from protos.edgefleet.v1 import device_pb2
from tests.helpers.postgres import postgres_url  # noqa: F401  (fixture)

CLASSES = ("cpu-x86-64", "jetson-orin", "rpi5-arm64")


@dataclass
class ReadOnlyCore:
    """The part of ControllerCore the read routes use: settings and the DB engine."""

    settings: Settings
    engine: Engine


@dataclass
class Api:
    client: TestClient
    ingest: Ingest
    engine: Engine

    def heartbeat(self, dev: str, *, version: int = 3, cls: str | None = None,
                  labels: dict[str, str] | None = None, health: str = "ok",
                  agent: str = "0.4.2") -> None:
        i = int(dev.rsplit("-", 1)[1])
        hb = device_pb2.Heartbeat(
            device_id=dev, device_class=cls or CLASSES[i % 3], agent_version=agent, seq=1,
            uptime_s=60, sent_at_ms=int(time.time() * 1000), health=health,
            labels=labels if labels is not None else {"site": f"s{i % 4}",
                                                      "ring": "canary" if i % 5 == 0 else "ga"})
        hb.models.add(name="digits", version=version, sha256="ab" * 32, slot="a", active=True)
        hb.models.add(name="digits", version=version - 1, sha256="cd" * 32, slot="b")
        self.ingest.handle(topics.device_topic(dev, topics.HEARTBEAT), hb.SerializeToString())

    def offline(self, dev: str) -> None:
        p = device_pb2.Presence(device_id=dev, online=False, reason="lwt",
                                at_ms=int(time.time() * 1000) + 1000)
        self.ingest.handle(topics.device_topic(dev, topics.PRESENCE), p.SerializeToString())

    def silent(self, dev: str, seconds: int = 600) -> None:
        """As if the device's last message came ``seconds`` ago (online but stale)."""
        with session_scope(self.engine) as s:
            d = s.get(Device, dev)
            assert d is not None
            d.last_seen_ms = d.last_heartbeat_ms = int(time.time() * 1000) - seconds * 1000
            s.add(d)

    def remove(self, dev: str) -> None:
        with session_scope(self.engine) as s:
            d = s.get(Device, dev)
            assert d is not None
            s.delete(d)

    def get(self, path: str, **params: Any) -> Any:
        r = self.client.get(path, params=params)
        assert r.status_code == 200, r.text
        return r.json()

    def full(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.get("/api/v1/devices")["items"]
        return items


def _api(tmp_path: Path, url: str) -> Iterator[Api]:
    settings = Settings(data_dir=tmp_path, db_url=url)
    engine = make_engine(url)
    try:
        with TestClient(create_app(ReadOnlyCore(settings, engine))) as client:
            yield Api(client, Ingest(settings, engine), engine)
    finally:
        engine.dispose()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from _api(tmp_path, f"sqlite:///{tmp_path}/fleet.db")


@pytest.fixture
def pg_api(tmp_path: Path, postgres_url: str) -> Iterator[Api]:  # noqa: F811
    yield from _api(tmp_path, postgres_url)


def still(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The items without the field that moves with the clock (last_heartbeat_age_s)."""
    return [{k: v for k, v in d.items() if k != "last_heartbeat_age_s"} for d in items]


def dev(i: int) -> str:
    return f"board-{i:03d}"


def walk(api: Api, limit: int, between: Any = None, **params: Any) -> list[list[str]]:
    """Every page of ``limit`` devices (ids), calling ``between(page_no, ids)`` between them."""
    pages: list[list[str]] = []
    token = ""
    while True:
        q = {"limit": limit, **params, **({"continue": token} if token else {})}
        page = api.get("/api/v1/devices", **q)
        ids = [d["id"] for d in page["items"]]
        pages.append(ids)
        meta = page["metadata"]
        token = meta["continue"]
        if not token:
            assert "remainingItemCount" not in meta
            return pages
        assert len(ids) == limit and meta["remainingItemCount"] >= 1
        if between is not None:
            between(len(pages), ids)


# -- paging ----------------------------------------------------------------------------------
def _sequence(api: Api) -> None:
    for i in range(0, 120, 2):                   # board-000, 002, ... 118
        api.heartbeat(dev(i))
    ahead: list[str] = []          # added ahead of the cursor: must be listed
    behind: list[str] = []         # added behind it: the walk is past them
    removed: list[str] = []

    def between(n: int, ids: list[str]) -> None:
        cursor = int(ids[-1].rsplit("-", 1)[1])
        for i, where in ((cursor - 1, behind), (cursor + 1, ahead), (cursor + 41, ahead)):
            if 0 <= i < 200 and i % 2 == 1 and dev(i) not in ahead + behind:
                api.heartbeat(dev(i))
                where.append(dev(i))
        # remove one already listed and one not listed yet
        for i in (cursor - 4, cursor + 20):
            if 0 <= i < 120 and i % 2 == 0 and dev(i) not in removed:
                api.remove(dev(i))
                removed.append(dev(i))

    pages = walk(api, 7, between)
    seen = [d for p in pages for d in p]
    assert len(seen) == len(set(seen)), "a device came twice"
    assert seen == sorted(seen)
    stayed = {dev(i) for i in range(0, 120, 2)} - set(removed)
    assert stayed <= set(seen), f"missed {sorted(stayed - set(seen))}"
    gone = [d for d in ahead if d in removed]
    assert ahead and behind and set(ahead) - set(gone) <= set(seen)
    assert not set(behind) & set(seen)
    removed_unseen = [d for d in removed if d not in seen]
    assert removed_unseen, "a device removed before its page is not listed"
    assert set(seen) <= stayed | set(ahead) | set(removed)
    # the walk after all that equals the full list
    assert [d for p in walk(api, 9) for d in p] == [d["id"] for d in api.full()]


def test_pages_list_every_device_once_while_fleet_changes(api: Api) -> None:
    _sequence(api)


@pytest.mark.postgres
def test_pages_on_postgres(pg_api: Api) -> None:
    _sequence(pg_api)
    with session_scope(pg_api.engine) as s:     # the summary sequence starts from no device
        s.execute(text("DELETE FROM device"))
    _summary_sequence(pg_api)


def test_unpaged_shape_unchanged_and_limit_bounds(api: Api) -> None:
    assert api.client.get("/api/v1/devices").json() == {"items": []}
    for i in range(5):
        api.heartbeat(dev(i))
    full = api.client.get("/api/v1/devices").json()
    assert list(full) == ["items"] and len(full["items"]) == 5
    zero = api.get("/api/v1/devices", limit=0)                 # 0 = no limit (Kubernetes)
    assert list(zero) == ["items"] and still(zero["items"]) == still(full["items"])
    one = api.get("/api/v1/devices", limit=5000)
    assert still(one["items"]) == still(full["items"]) and one["metadata"] == {"continue": ""}
    assert api.get("/api/v1/devices", limit=2)["metadata"]["remainingItemCount"] == 3
    for bad in (5001, 100000, -1):
        r = api.client.get("/api/v1/devices", params={"limit": bad})
        assert r.status_code == 400
        assert "limit must be in 1..5000" in r.json()["detail"]
    assert api.client.get("/api/v1/devices", params={"limit": "ten"}).status_code == 422


def test_malformed_continue_tokens_are_400(api: Api) -> None:
    for i in range(4):
        api.heartbeat(dev(i))
    good = api.get("/api/v1/devices", limit=2)["metadata"]["continue"]
    assert good
    bogus = [
        "not-a-token", "%%%", "e30",                                  # e30 = {}
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        base64.urlsafe_b64encode(json.dumps({"v": 2, "after": "x"}).encode()).decode(),
        base64.urlsafe_b64encode(json.dumps({"v": 1, "after": ""}).encode()).decode(),
        base64.urlsafe_b64encode(json.dumps([1, 2]).encode()).decode(),
        good[:-3],
    ]
    for token in bogus:
        r = api.client.get("/api/v1/devices", params={"limit": 2, "continue": token})
        assert r.status_code == 400, token
        assert "invalid continue token" in r.json()["detail"], r.json()
    # a token resumes only the filters it was issued for
    r = api.client.get("/api/v1/devices", params={"limit": 2, "continue": good,
                                                   "online": "true"})
    assert r.status_code == 400 and "other filters" in r.json()["detail"]
    assert api.get("/api/v1/devices", limit=2, **{"continue": good})["items"]


# -- filters ---------------------------------------------------------------------------------
def test_filters_select_what_the_full_list_shows(api: Api) -> None:
    for i in range(30):
        api.heartbeat(dev(i))
    for i in (3, 11, 17):
        api.offline(dev(i))
    for i in (4, 12):
        api.silent(dev(i))
    api.heartbeat(dev(29), labels={"site": "s1", "gpu": "yes"})
    full = api.full()

    def ids(**params: Any) -> list[str]:
        unpaged = [d["id"] for d in api.get("/api/v1/devices", **params)["items"]]
        paged = [d for p in walk(api, 4, **params) for d in p]
        assert paged == unpaged
        return unpaged

    assert ids(online="false") == [d["id"] for d in full if not d["online"]]
    assert ids(online="true") == [d["id"] for d in full if d["online"]]
    assert ids(stale="true") == [d["id"] for d in full if d["stale"]]
    assert ids(stale="false") == [d["id"] for d in full if not d["stale"]]
    assert set(ids(stale="true")) == {dev(i) for i in (3, 4, 11, 12, 17)}
    assert ids(deviceClass="jetson-orin") == [d["id"] for d in full
                                              if d["device_class"] == "jetson-orin"]
    both = [d["id"] for d in full if d["device_class"] in ("jetson-orin", "rpi5-arm64")]
    assert ids(deviceClass="jetson-orin,rpi5-arm64") == both
    r = api.client.get("/api/v1/devices?deviceClass=jetson-orin&deviceClass=rpi5-arm64")
    assert [d["id"] for d in r.json()["items"]] == both
    assert ids(online="true", deviceClass="cpu-x86-64") == [
        d["id"] for d in full if d["online"] and d["device_class"] == "cpu-x86-64"]
    labels = {dev(i): {"site": f"s{i % 4}", "ring": "canary" if i % 5 == 0 else "ga"}
              for i in range(29)}
    labels[dev(29)] = {"site": "s1", "gpu": "yes"}

    def match(pred: Any) -> list[str]:
        return sorted(d for d, lb in labels.items() if pred(lb))

    assert ids(labelSelector="ring=canary") == match(lambda lb: lb.get("ring") == "canary")
    assert ids(labelSelector="ring==canary,site=s0") == match(
        lambda lb: lb.get("ring") == "canary" and lb["site"] == "s0")
    assert ids(labelSelector="ring!=canary") == match(lambda lb: lb.get("ring") != "canary")
    assert ids(labelSelector="gpu") == [dev(29)]
    assert ids(labelSelector="!ring") == [dev(29)]
    assert ids(labelSelector="site in (s1, s2)") == match(lambda lb: lb["site"] in ("s1", "s2"))
    assert ids(labelSelector="site notin (s1,s2),ring") == match(
        lambda lb: lb["site"] not in ("s1", "s2") and "ring" in lb)
    for bad in ("ring=", "=x", "a b", "ring in s1", "!ring=canary", "x" * 70, "ring=a/b"):
        if bad == "ring=":
            continue          # an empty value is valid Kubernetes syntax (matches "")
        r = api.client.get("/api/v1/devices", params={"labelSelector": bad})
        assert r.status_code == 400 and "labelSelector" in r.json()["detail"], bad
    # fields: the keys each item keeps (id always), the values of the full view
    slim = api.get("/api/v1/devices", fields="online,health")["items"]
    assert slim == [{"id": d["id"], "online": d["online"], "health": d["health"]} for d in full]
    r = api.client.get("/api/v1/devices", params={"fields": "id,nope"})
    assert r.status_code == 400 and "nope" in r.json()["detail"]


# -- summary ---------------------------------------------------------------------------------
def _expected(full: list[dict[str, Any]]) -> dict[str, Any]:
    by_class: dict[str, dict[str, int]] = {}
    for d in full:
        c = by_class.setdefault(d["device_class"], {"total": 0, "online": 0, "offline": 0,
                                                    "stale": 0})
        c["total"] += 1
        c["online" if d["online"] else "offline"] += 1
        c["stale"] += d["stale"]
    return {
        "total": len(full), "online": sum(d["online"] for d in full),
        "offline": sum(not d["online"] for d in full), "stale": sum(d["stale"] for d in full),
        "by_class": by_class, "by_health": dict(Counter(d["health"] for d in full)),
        "by_agent_version": dict(Counter(d["agent_version"] for d in full)),
        "by_model_version": dict(Counter(f"{d['model']}@{d['version']}" for d in full
                                         if d["model"])),
        "not_serving": sum(not d["model"] for d in full),
    }


def _check_summary(api: Api) -> dict[str, Any]:
    got = api.get("/api/v1/fleet/summary")
    want = _expected(api.full())
    assert {k: got[k] for k in want} == want
    return got


def _summary_sequence(api: Api) -> None:
    for i in range(200, 224):
        api.heartbeat(dev(i))
    s = _check_summary(api)
    assert s["total"] == 24 and s["online"] == 24 and s["by_model_version"] == {"digits@3": 24}
    for i in (201, 205, 209):                        # go offline
        api.offline(dev(i))
    api.silent(dev(202))                             # online but silent: stale
    s = _check_summary(api)
    assert (s["online"], s["offline"], s["stale"]) == (21, 3, 4)
    assert s["by_health"]["stale"] == 4
    api.heartbeat(dev(205))                          # back
    for i in (200, 203, 206):                        # a new version, a new agent
        api.heartbeat(dev(i), version=4, agent="0.5.0")
    api.heartbeat(dev(207), health="throttled")
    hb = device_pb2.Heartbeat(device_id=dev(223), device_class="cpu-x86-64", seq=2)
    api.ingest.handle(topics.device_topic(dev(223), topics.HEARTBEAT), hb.SerializeToString())
    s = _check_summary(api)                          # board-223 now serves nothing
    assert (s["online"], s["offline"], s["stale"]) == (22, 2, 3)
    assert s["by_model_version"] == {"digits@3": 20, "digits@4": 3}
    assert s["not_serving"] == 1 and s["by_agent_version"]["0.5.0"] == 3
    assert s["by_health"]["throttled"] == 1
    api.remove(dev(201))
    s = _check_summary(api)
    assert s["total"] == 23


def test_summary_counts_equal_the_full_list(api: Api) -> None:
    assert api.get("/api/v1/fleet/summary")["total"] == 0
    _summary_sequence(api)


# -- CLI -------------------------------------------------------------------------------------
def test_cli_get_devices_pages_and_prints_the_same(api: Api,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(11):
        api.heartbeat(dev(i))
    api.offline(dev(4))
    calls: list[dict[str, Any]] = []

    class Recording(TestClient):
        def get(self, url: Any, **kw: Any) -> Any:  # type: ignore[override]
            calls.append(dict(kw.get("params") or {}))
            return super().get(url, **kw)

    monkeypatch.setattr(cli_client, "client",
                        lambda _server: Recording(api.client.app))
    outs = {}
    for chunk in (0, 3, 500):
        for output in ("", "wide", "json"):
            calls.clear()
            buf = io.StringIO()
            cli_client.get("http://x", "devices", output=output, out=buf, chunk_size=chunk)
            outs[(chunk, output)] = buf.getvalue()
            assert len(calls) == (1 if chunk != 3 else 4)
    for output in ("", "wide"):       # the HEARTBEAT column moves with the clock
        same = {re.sub(r" \d+s ", " Ns ", outs[(c, output)]) for c in (0, 3, 500)}
        assert len(same) == 1, same
    docs = [json.loads(outs[(c, "json")]) for c in (0, 3, 500)]
    assert all(list(d) == ["items"] for d in docs)
    assert still(docs[0]["items"]) == still(docs[1]["items"]) == still(docs[2]["items"])
    assert len(docs[1]["items"]) == 11 and "board-004" in outs[(3, "")]
    with pytest.raises(Exception, match="chunk-size"):
        cli_client.get("http://x", "devices", chunk_size=-1, out=io.StringIO())


# -- indexes on an existing database ---------------------------------------------------------
def test_missing_indexes_are_added_to_an_old_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    engine = make_engine(url)
    with engine.begin() as conn:        # as a database made before the index existed
        conn.execute(text("DROP INDEX ix_metricsample_device_at"))
    assert "ix_metricsample_device_at" not in {
        ix["name"] for ix in inspect(engine).get_indexes("metricsample")}
    assert add_missing_indexes(engine) == ["ix_metricsample_device_at"]
    assert add_missing_indexes(engine) == []                  # idempotent
    engine.dispose()
    engine = make_engine(url)                                 # and on start
    assert "ix_metricsample_device_at" in {
        ix["name"] for ix in inspect(engine).get_indexes("metricsample")}
    with Session(engine) as s:
        assert s.get(Device, "none") is None
    engine.dispose()
