"""The read API at fleet scale: latency and size of every read route at 1,000 and 10,000 devices.

A fresh database (SQLite in a temporary folder; also PostgreSQL with ``--pg-url``) is filled
with ``--devices`` devices shaped as the ingest stores them (controller/fleet/ingest.py
``_heartbeat``: the Heartbeat's models, slots, facts, updates and faults as protobuf
MessageToDict JSON, labels, health, agent version), 92 % online and fresh, 4 % offline (last
will), 4 % online but silent past ``stale_after_s``; three device classes; 90 % serving
digits v3 (the rest still v2, its rollout in flight), 30 % also serving detector v2. Every
device has its DeviceTarget, DeviceRollout (offer) and RolloutMember rows for the rollouts
``default/digits-v3`` and ``default/detector-v2``, whose status holds one entry per device as
the rollout reconciler writes it (controller/reconcile/rollout_status.py), and an hour of
metrics: a MetricSample and a MetricWindow (controller/fleet/windows.py) per served model
every ``--metrics-interval-s`` (the agent's default 15 s) over ``--metrics-minutes``.

The routes are then measured through the real FastAPI app (controller.api.app.create_app)
served by uvicorn on a loopback socket in a thread, with httpx: the full device list, one page
of 500, a walk through every page, a filtered page, the fleet summary, one device, the
models, the rollouts, the latest metrics of the fleet, one device's history and windows.
Each route runs ``--repeat`` times after one warm-up; p50/p95/max latency and the answer's
size are printed and written under ``--label`` (e.g. ``before`` / ``after``) in
bench/results/api_scale.json, which keeps the other labels' runs. The listening socket is made
with proto IPPROTO_TCP so that asyncio turns Nagle off on its connections; ``healthz_keepalive``
shows what the socket of controller.api.server.bind (proto 0, Nagle on) costs every request on
a kept-alive connection (the response's second write waits for the client's delayed ACK). Routes the server does
not have yet answer 404 and are reported as such; a ``limit`` the server ignores shows as
``unpaged`` (the whole list came back).

With ``--ingest-rate R`` the device list is measured a second time while a thread feeds R
real heartbeats per second through controller.fleet.ingest.Ingest (the code the MQTT loop
calls) into the same database, so the numbers show the list staying responsive under ingest.

    .venv/bin/python -m bench.api_scale [--devices 1000,10000] [--pg-url URL] [--repeat 7]
        [--metrics-minutes 60] [--metrics-interval-s 15] [--ingest-rate 200]
        [--label after] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from google.protobuf.json_format import MessageToDict
from sqlalchemy import insert, update
from sqlalchemy.engine import Engine

from controller.api.app import create_app
from controller.api.server import _QuietServer, bind
from controller.fleet.db import make_engine
from controller.fleet.models import (
    Device,
    DeviceRollout,
    DeviceRolloutState,
    DeviceTarget,
    MetricSample,
    Resource,
    RolloutMember,
)
from controller.fleet.windows import MetricSnapshot, MetricWindow
from controller.settings import Settings
from protos import topics
from protos.edgefleet.v1 import common_pb2, device_pb2

RESULTS = Path(__file__).parent / "results"
CLASSES = [("cpu-x86-64", 0.5), ("jetson-orin", 0.3), ("rpi5-arm64", 0.2)]
SHA = {("digits", 2): "d2" * 32, ("digits", 3): "d3" * 32, ("detector", 2): "e2" * 32,
       ("detector", 1): "e1" * 32}
BOUNDS = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 250.0]


def _dict(msg: Any) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True)


def _class_of(i: int) -> str:
    x, acc = (i * 7919 % 1000) / 1000, 0.0
    for name, share in CLASSES:
        acc += share
        if x < acc:
            return name
    return CLASSES[-1][0]


@dataclass
class Shape:
    """What device ``i`` is: class, what it serves, whether it is online/stale."""

    i: int

    @property
    def id(self) -> str:
        return f"board-{self.i:05d}"

    @property
    def device_class(self) -> str:
        return _class_of(self.i)

    @property
    def digits(self) -> int:
        return 2 if self.i % 10 == 9 else 3

    @property
    def detector(self) -> bool:
        return self.i % 10 in (0, 3, 6)

    @property
    def offline(self) -> bool:
        return self.i % 25 == 7

    @property
    def stale(self) -> bool:
        return self.i % 25 == 13


def heartbeat(sh: Shape, *, now_ms: int, seq: int = 1) -> device_pb2.Heartbeat:
    """The Heartbeat an agent of this shape sends (as agent/app.py builds it)."""
    arch = "aarch64" if sh.device_class != "cpu-x86-64" else "x86_64"
    hb = device_pb2.Heartbeat(device_id=sh.id, device_class=sh.device_class,
                              agent_version="0.4.2" if sh.i % 50 else "0.4.1",
                              uptime_s=3600 + sh.i, sent_at_ms=now_ms, seq=seq,
                              health="throttled" if sh.i % 97 == 5 else "ok",
                              health_reason="soc temperature 81 C" if sh.i % 97 == 5 else "",
                              serve_url=f"http://10.{sh.i // 250 % 256}.{sh.i % 250}.2:9001",
                              desired_generation=4, restarts=1 + sh.i % 3)
    f = hb.facts
    f.arch, f.os, f.python_version = arch, "linux", "3.11.9"
    f.cpu_flags.extend(["avx2", "fma"] if arch == "x86_64" else ["asimd", "asimddp"])
    f.runtimes.add(engine_kind="onnxruntime-cpu", version="1.19.2")
    f.cpu_count, f.memory_bytes = 4 if arch != "x86_64" else 8, 8 << 30
    f.board = {"cpu-x86-64": "NUC13", "jetson-orin": "Jetson Orin Nano",
               "rpi5-arm64": "Raspberry Pi 5 Model B"}[sh.device_class]
    hb.labels.update({"site": f"site-{sh.i % 40:02d}", "ring": "canary" if sh.i % 20 == 0
                      else "ga", "zone": f"z{sh.i % 4}", "fleet": "retail"})
    served = [("digits", sh.digits, "a" if sh.digits == 3 else "b")]
    if sh.detector:
        served.append(("detector", 2, "a"))
    for name, ver, slot in served:
        kw = {"name": name, "sha256": SHA[(name, ver)], "engine_kind": "onnxruntime-cpu",
              "precision": "fp32", "revision": 0, "update_id": f"{name}-v{ver}-{sh.id}"}
        hb.models.add(version=ver, slot=slot, active=True, **kw)
        other = ver - 1 if ver > 1 else ver
        hb.slots.add(version=ver, slot=slot, active=True, **kw)
        hb.slots.add(name=name, version=other, sha256=SHA.get((name, other), "00" * 32),
                     slot="b" if slot == "a" else "a", engine_kind="onnxruntime-cpu",
                     precision="fp32")
    state = (common_pb2.UPDATE_STATE_COMMITTED if sh.digits == 3
             else common_pb2.UPDATE_STATE_DOWNLOADING)
    hb.updates.add(update_id=f"digits-v3-{sh.id}", model_name="digits", version=3, state=state,
                   bytes_received=1_800_000 if sh.digits == 3 else 600_000,
                   bytes_total=1_800_000, target_sha256=SHA[("digits", 3)])
    if sh.i % 100 == 42:
        hb.faults.add(name="digits", version=3, sha256=SHA[("digits", 3)], reason="integrity",
                      message="engine hash mismatch at start; fell back to slot b",
                      at_ms=now_ms - 600_000)
    return hb


def device_row(sh: Shape, now_ms: int) -> dict[str, Any]:
    hb = heartbeat(sh, now_ms=now_ms)
    last = now_ms - (300_000 if sh.stale else 1000 + sh.i % 9000)
    return {
        "device_id": sh.id, "device_class": sh.device_class, "online": not sh.offline,
        "last_heartbeat_ms": last, "last_seen_ms": last,
        "offline_since_ms": last + 2000 if sh.offline else None,
        "offline_reason": "lwt" if sh.offline else "",
        "facts": _dict(hb.facts), "models": [_dict(m) for m in hb.models],
        "updates": [_dict(u) for u in hb.updates], "health": hb.health,
        "health_reason": hb.health_reason, "agent_version": hb.agent_version,
        "uptime_s": hb.uptime_s, "serve_url": hb.serve_url, "labels": dict(hb.labels),
        "heartbeat_seq": 240, "slots": [_dict(m) for m in hb.slots],
        "faults": [_dict(f) for f in hb.faults], "restarts": hb.restarts,
        "desired_generation": hb.desired_generation,
    }


def _resource(kind: str, name: str, spec: dict[str, Any], status: dict[str, Any],
              now_ms: int, namespace: str = "default") -> dict[str, Any]:
    return {"kind": kind, "namespace": namespace, "name": name, "uid": f"uid-{kind}-{name}",
            "generation": 1, "resource_version": 7, "spec": spec, "status": status,
            "labels": {}, "created_ms": now_ms - 7_200_000, "updated_ms": now_ms - 5000}


def _rollout_status(shapes: list[Shape], model: str, version: int,
                    serving: Callable[[Shape], bool]) -> dict[str, Any]:
    devs = {sh.id: {"state": "updated" if serving(sh) else "downloading",
                    "wave": "canary" if sh.i % 20 == 0 else "rest", "reason": "",
                    "serving": f"v{version}" if serving(sh) else f"v{version - 1}",
                    "online": not sh.offline, "desiredVersion": version,
                    "desiredRevision": 0, "desiredEngineVersion": version,
                    "updateId": f"{model}-v{version}-{sh.id}", "bytesSent": 1_800_000,
                    "codec": "bsdiff4", "payloadSize": 1_800_000}
            for sh in shapes}
    done = sum(v["state"] == "updated" for v in devs.values())
    return {"observedGeneration": 1, "phase": "Progressing", "version": version,
            "engineVersion": version, "currentWave": "rest", "targeted": len(devs),
            "updated": done, "failed": 0, "stalled": 0, "devices": devs,
            "message": f"wave rest: {done}/{len(devs)} updated",
            "conditions": [{"type": "Progressing", "status": "True", "reason": "WaveInProgress",
                            "message": f"wave rest: {done}/{len(devs)} updated",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}


def _table(model: Any) -> Any:
    """The SQLAlchemy Table of a SQLModel table class."""
    return model.__table__


def _insert(engine: Engine, table: Any, rows: list[dict[str, Any]], chunk: int = 20_000) -> None:
    with engine.begin() as conn:
        for k in range(0, len(rows), chunk):
            conn.execute(insert(table), rows[k:k + chunk])


def fill(engine: Engine, n: int, *, now_ms: int, minutes: int, interval_s: int) -> dict[str, Any]:
    """Devices, resources, targets, offers, members and an hour of metrics; returns counts."""
    t0 = time.monotonic()
    shapes = [Shape(i) for i in range(n)]
    _insert(engine, _table(Device), [device_row(sh, now_ms) for sh in shapes])
    det = [sh for sh in shapes if sh.detector]
    resources = [
        _resource("DeviceClass", c, {"arch": "x86_64" if c == "cpu-x86-64" else "aarch64"},
                  {}, now_ms, namespace="") for c, _ in CLASSES]
    for name, ver in (("digits", 3), ("detector", 2)):
        resources.append(_resource(
            "EdgeModel", name, {"version": ver, "source": {"sha256": SHA[(name, ver)]}},
            {"phase": "Ready", "compiledClasses": "3/3", "sourceSha256": SHA[(name, ver)]},
            now_ms))
    resources.append(_resource("EdgeRollout", "digits-v3", {"modelRef": {"name": "digits"}},
                               _rollout_status(shapes, "digits", 3, lambda s: s.digits == 3),
                               now_ms))
    resources.append(_resource("EdgeRollout", "detector-v2", {"modelRef": {"name": "detector"}},
                               _rollout_status(det, "detector", 2, lambda s: True), now_ms))
    _insert(engine, _table(Resource), resources)
    targets: list[dict[str, Any]] = []
    offers: list[dict[str, Any]] = []
    members: list[dict[str, Any]] = []
    for name, ver, group in (("digits", 3, shapes), ("detector", 2, det)):
        for sh in group:
            uid = f"{name}-v{ver}-{sh.id}"
            done = name == "detector" or sh.digits == 3
            targets.append({"device_id": sh.id, "model_name": name, "variant": "",
                            "version": ver, "revision": 0, "engine_version": 0,
                            "target_sha256": SHA[(name, ver)], "rollout": f"default/{name}-v{ver}",
                            "reason": "rollout", "prev_sha256": SHA.get((name, ver - 1), ""),
                            "prev_version": ver - 1, "prev_revision": 0,
                            "prev_engine_version": 0, "prev_since_ms": now_ms - 7_000_000,
                            "set_ms": now_ms - 3_000_000, "progress_ms": now_ms - 60_000,
                            "reached_ms": now_ms - 2_000_000 if done else None, "retry": 0,
                            "update_id": uid})
            offers.append({"rollout": f"default/{name}-v{ver}", "device_id": sh.id,
                           "model_name": name, "wave": 0 if sh.i % 20 == 0 else 1,
                           "version": ver, "update_id": uid, "target_sha256": SHA[(name, ver)],
                           "base_sha256": SHA.get((name, ver - 1), ""), "codec": "bsdiff4",
                           "payload_size": 1_800_000,
                           "state": (DeviceRolloutState.COMMITTED if done
                                     else DeviceRolloutState.DOWNLOADING).name,
                           "reason": "", "bytes_sent": 1_800_000,
                           "bytes_received": 1_800_000 if done else 600_000,
                           "offered_ms": now_ms - 2_900_000, "updated_ms": now_ms - 60_000,
                           "chunk_size": 0, "max_bytes_per_second": 0, "variant": "",
                           "revision": 0, "engine_version": 0, "probe": {}})
            members.append({"rollout": f"default/{name}-v{ver}", "device_id": sh.id,
                            "wave": 0 if sh.i % 20 == 0 else 1, "joined_ms": now_ms - 3_000_000,
                            "late": False, "plan": "5%,100%"})
    _insert(engine, _table(DeviceTarget), targets)
    _insert(engine, _table(DeviceRollout), offers)
    _insert(engine, _table(RolloutMember), members)
    n_samples = n_windows = 0
    steps = minutes * 60 // interval_s
    rnd = random.Random(n)
    counts_tpl = [40, 120, 200, 90, 30, 10, 5, 3, 2]
    samples: list[dict[str, Any]] = []
    wins: list[dict[str, Any]] = []
    snaps: list[dict[str, Any]] = []

    def flush() -> None:
        with engine.begin() as conn:
            for table, rows in ((_table(MetricSample), samples),
                                (_table(MetricWindow), wins),
                                (_table(MetricSnapshot), snaps)):
                if rows:
                    conn.execute(insert(table), rows)
                rows.clear()

    for sh in shapes:
        served = [("digits", sh.digits)] + ([("detector", 2)] if sh.detector else [])
        end = now_ms - (300_000 if sh.stale else 0) - sh.i % interval_s * 1000
        for k in range(steps):
            at = end - (steps - 1 - k) * interval_s * 1000
            for j, (name, ver) in enumerate(served):
                req = 500 + rnd.randrange(50)
                samples.append({
                    "device_id": sh.id, "at_ms": at, "model_name": name, "model_version": ver,
                    "requests": req * (k + 1), "errors": k // 40, "p50_ms": 3.2, "p95_ms": 9.1,
                    "p99_ms": 18.0, "cpu_percent": 31.5, "agent_rss_bytes": 96 << 20,
                    "temperature_c": 55.0,
                    "data": {"queue_depth": 0, "buffered": False, "batch_size_counts": [req],
                             "window": {"start_ms": at - interval_s * 1000, "end_ms": at,
                                        "requests": req, "errors": 0, "reset": False},
                             **({"host": {"cpu_percent": 31.5, "agent_rss_bytes": str(96 << 20)}}
                                if j == 0 else {})}})
                wins.append({"device_id": sh.id, "model_name": name, "model_version": ver,
                             "start_ms": at - interval_s * 1000, "end_ms": at, "requests": req,
                             "errors": 0, "bounds_ms": BOUNDS,
                             "counts": [c * req // 500 for c in counts_tpl],
                             "sum_ms": 3.9 * req, "buffered": False, "reset": False})
        for name, ver in served:
            snaps.append({"device_id": sh.id, "model_name": name, "model_version": ver,
                          "at_ms": end, "requests": 500 * steps, "errors": 0,
                          "bounds_ms": BOUNDS, "counts": counts_tpl, "sum_ms": 0.0})
        snaps.append({"device_id": sh.id, "model_name": "", "model_version": 0, "at_ms": end,
                      "requests": 0, "errors": 0, "bounds_ms": [], "counts": [], "sum_ms": 0.0})
        n_samples += len(served) * steps
        n_windows += len(served) * steps
        if len(samples) >= 50_000:
            flush()
    flush()
    # the fill takes minutes at 10,000 devices: move the devices' last messages by that much,
    # so the fresh ones are still fresh (not past stale_after_s) when the routes are measured
    moved = int((time.monotonic() - t0) * 1000)
    with engine.begin() as conn:
        conn.execute(update(_table(Device)).values(
            last_seen_ms=_table(Device).c.last_seen_ms + moved,
            last_heartbeat_ms=_table(Device).c.last_heartbeat_ms + moved))
    return {"devices": n, "targets": len(targets), "offers": len(offers),
            "metric_samples": n_samples, "metric_windows": n_windows,
            "fill_s": round(time.monotonic() - t0, 1)}


@dataclass
class ReadCore:
    """The part of ControllerCore the read routes use (as tests/unit/test_api.py)."""

    settings: Settings
    engine: Engine


def _tcp_socket() -> socket.socket:
    """A listening loopback socket created with proto IPPROTO_TCP, so asyncio sets
    TCP_NODELAY on the connections it accepts (see ``nagle_check``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


@contextmanager
def serve(core: ReadCore, *, server_bind: bool = False) -> Iterator[str]:
    """The real app under uvicorn on a loopback port, in a thread; yields the base URL.
    ``server_bind``: the socket of controller.api.server.bind (what ``edgefleet up`` uses)."""
    sock = bind("127.0.0.1", 0) if server_bind else _tcp_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(core), log_level="warning", lifespan="off",
                            access_log=False)
    server = _QuietServer(config)
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    while not server.started:
        if not th.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(10)
        sock.close()


def _stats(times: list[float], sizes: list[int], status: int, note: str = "") -> dict[str, Any]:
    ts = sorted(times)
    return {"status": status, "p50_ms": round(statistics.median(ts) * 1000, 1),
            "p95_ms": round(ts[min(len(ts) - 1, int(0.95 * len(ts)))] * 1000, 1),
            "max_ms": round(ts[-1] * 1000, 1), "bytes": int(statistics.median(sizes)),
            "runs": len(ts), **({"note": note} if note else {})}


def measure(c: httpx.Client, path: str, repeat: int,
            check: Callable[[httpx.Response], str] | None = None) -> dict[str, Any]:
    r = c.get(path)                                            # warm-up
    if r.status_code != 200:
        return {"status": r.status_code, "note": "route missing" if r.status_code == 404
                else r.text[:200]}
    times, sizes = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        r = c.get(path)
        times.append(time.perf_counter() - t)
        sizes.append(len(r.content))
    return _stats(times, sizes, r.status_code, check(r) if check else "")


def walk(c: httpx.Client, limit: int, repeat: int) -> dict[str, Any]:
    """Every page of ``limit`` devices, following metadata.continue; the whole walk timed."""
    times, sizes, pages, seen = [], [], 0, 0
    for _ in range(repeat):
        t, size, pages, seen, token = time.perf_counter(), 0, 0, 0, ""
        while True:
            params: dict[str, Any] = {"limit": limit}
            if token:
                params["continue"] = token
            r = c.get("/api/v1/devices", params=params)
            size += len(r.content)
            pages += 1
            data = r.json()
            seen += len(data.get("items", []))
            token = (data.get("metadata") or {}).get("continue") or ""
            if not token:
                break
        times.append(time.perf_counter() - t)
        sizes.append(size)
    return _stats(times, sizes, 200, f"{pages} pages, {seen} devices"
                  + (" (unpaged)" if pages == 1 and seen > limit else ""))


def nagle_check(core: ReadCore, repeat: int = 20) -> dict[str, Any]:
    """GET /healthz on a kept-alive connection: on the socket of controller.api.server.bind
    (``socket.socket(AF_INET)``, proto 0: asyncio leaves Nagle on, and the response's second
    write waits for the client's delayed ACK) and on one made with IPPROTO_TCP."""
    out = {}
    for name, server_bind in (("server_bind", True), ("ipproto_tcp", False)):
        with serve(core, server_bind=server_bind) as base, \
                httpx.Client(base_url=base, timeout=30) as c:
            out[name] = measure(c, "/healthz", repeat)
    return out


def _paged(r: httpx.Response) -> str:
    return "" if "metadata" in r.json() else "unpaged"


def run_routes(base: str, n: int, repeat: int) -> dict[str, Any]:
    rnd = random.Random(1)
    one = f"board-{rnd.randrange(n):05d}"
    with httpx.Client(base_url=base, timeout=120) as c:
        out = {
            "devices_full": measure(c, "/api/v1/devices", repeat),
            "devices_page_500": measure(c, "/api/v1/devices?limit=500", repeat, _paged),
            "devices_walk_500": walk(c, 500, max(1, repeat // 2)),
            "devices_offline_page": measure(c, "/api/v1/devices?online=false&limit=500",
                                            repeat, _paged),
            "devices_class_page": measure(c, "/api/v1/devices?deviceClass=jetson-orin&limit=500",
                                          repeat, _paged),
            "fleet_summary": measure(c, "/api/v1/fleet/summary", repeat),
            "device_one": measure(c, f"/api/v1/devices/{one}", repeat),
            "device_metrics": measure(c, f"/api/v1/devices/{one}/metrics", repeat),
            "device_windows": measure(c, f"/api/v1/devices/{one}/metrics/windows", repeat),
            "models": measure(c, "/api/v1/models", repeat),
            "rollouts": measure(c, "/api/v1/rollouts", repeat),
            "rollout_one": measure(c, "/api/v1/rollouts/default/digits-v3", repeat),
            "metrics_latest": measure(c, "/api/v1/metrics", repeat),
        }
    return out


def under_ingest(base: str, core: ReadCore, n: int, rate: float, repeat: int) -> dict[str, Any]:
    """The device list (full and one page) while a thread feeds ``rate`` heartbeats/s."""
    try:
        from controller.fleet.ingest import Ingest
    except ImportError as e:            # the ingest is being reworked: report, don't fail
        return {"ingest": {"skipped": f"controller.fleet.ingest does not import: {e}"}}
    ingest = Ingest(core.settings, core.engine)
    stop = threading.Event()
    sent = [0]

    def feed() -> None:
        i, t0 = 0, time.monotonic()
        while not stop.is_set():
            sh = Shape(i % n)
            hb = heartbeat(sh, now_ms=int(time.time() * 1000), seq=1000 + i)
            ingest.handle(topics.device_topic(sh.id, topics.HEARTBEAT), hb.SerializeToString())
            i += 1
            sent[0] = i
            ahead = i / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)

    th = threading.Thread(target=feed, daemon=True)
    th.start()
    t0 = time.monotonic()
    try:
        with httpx.Client(base_url=base, timeout=120) as c:
            out = {"devices_full": measure(c, "/api/v1/devices", repeat),
                   "devices_page_500": measure(c, "/api/v1/devices?limit=500", repeat * 3,
                                               _paged),
                   "fleet_summary": measure(c, "/api/v1/fleet/summary", repeat * 3)}
    finally:
        stop.set()
        th.join(10)
    took = time.monotonic() - t0
    out["ingest"] = {"target_per_s": rate, "achieved_per_s": round(sent[0] / took, 1),
                     "heartbeats": sent[0]}
    return out


def bench_one(url: str, n: int, args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    engine = make_engine(url)
    now = int(time.time() * 1000)
    filled = fill(engine, n, now_ms=now, minutes=args.metrics_minutes,
                  interval_s=args.metrics_interval_s)
    print(f"  filled {filled}", flush=True)
    core = ReadCore(Settings(data_dir=data_dir), engine)
    nagle = nagle_check(core)
    with serve(core) as base:
        routes = run_routes(base, n, args.repeat)
        ingest = (under_ingest(base, core, n, args.ingest_rate, args.repeat)
                  if args.ingest_rate > 0 else None)
    engine.dispose()
    return {"fill": filled, "routes": routes, "healthz_keepalive": nagle,
            **({"under_ingest": ingest} if ingest else {})}


def _reset_pg(url: str) -> None:
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    with eng.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    eng.dispose()


def print_table(backend: str, n: int, res: dict[str, Any]) -> None:
    print(f"\n{backend}, {n} devices")
    print(f"  {'route':<24}{'status':>7}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}{'bytes':>12}"
          "  note")
    rows = list(res["routes"].items()) + [
        (f"ingest:{k}", v) for k, v in (res.get("under_ingest") or {}).items() if k != "ingest"]
    for name, r in rows:
        print(f"  {name:<24}{r.get('status', ''):>7}{r.get('p50_ms', '-'):>10}"
              f"{r.get('p95_ms', '-'):>10}{r.get('max_ms', '-'):>10}{r.get('bytes', '-'):>12}"
              f"  {r.get('note', '')}")
    if res.get("under_ingest"):
        print(f"  ingest: {res['under_ingest']['ingest']}")
    print("  /healthz p50 on a kept-alive connection: " + ", ".join(
        f"{k} {v.get('p50_ms')} ms" for k, v in res["healthz_keepalive"].items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="1000,10000", help="comma-separated fleet sizes")
    ap.add_argument("--pg-url", default="", help="also run on this (emptied!) PostgreSQL")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--metrics-minutes", type=int, default=60)
    ap.add_argument("--metrics-interval-s", type=int, default=15)
    ap.add_argument("--ingest-rate", type=float, default=200.0,
                    help="heartbeats/s fed during the second measurement (0 = skip)")
    ap.add_argument("--label", default="after", help="key of this run in the JSON")
    ap.add_argument("--json", default=str(RESULTS / "api_scale.json"))
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.devices.split(",") if x.strip()]
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-api-scale-") as tmp:
        for n in sizes:
            backends = [("sqlite", f"sqlite:///{tmp}/fleet-{n}.db")]
            if args.pg_url:
                backends.append(("postgresql", args.pg_url))
            for backend, url in backends:
                print(f"{backend}: {n} devices ...", flush=True)
                if backend == "postgresql":
                    _reset_pg(url)
                res = bench_one(url, n, args, Path(tmp))
                runs.setdefault(backend, {})[str(n)] = res
                print_table(backend, n, res)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    doc.update({"benchmark": "api_scale", "machine": platform.machine(),
                "cpus": os.cpu_count(), "python": platform.python_version()})
    # one entry per label; a run of other fleet sizes or backends adds to it
    entry = doc.setdefault("runs", {}).setdefault(args.label, {})
    entry.update({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "metrics_minutes": args.metrics_minutes,
                  "metrics_interval_s": args.metrics_interval_s, "repeat": args.repeat})
    for backend, per_n in runs.items():
        entry.setdefault("results", {}).setdefault(backend, {}).update(per_n)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
