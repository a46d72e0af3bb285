"""Fleet scale: the embedded controller (what `edgefleet up` runs) under thousands of devices.

Each row starts controllers as their own processes (controller.embedded.run_embedded, the
code behind `edgefleet up`; the first starts its Mosquitto, further replicas join that broker
and a shared PostgreSQL), connects a protocol-faithful simulated fleet (bench/fleet_sim.py,
one MQTT 5 connection per device, in this process) and measures:

- steady rows (devices x heartbeat period x database x replicas): heartbeat-to-database lag
  (the row's ``last_heartbeat_ms``, stamped when the ingest writes it, minus the simulated
  device's send time of that ``seq``; the database is polled twice a second), heartbeats,
  metrics and devices stored vs sent, messages dropped (the controller's
  ``GET /api/v1/ingest``), controller and broker CPU and peak RSS, and the latency of the
  API's device list (a 500-device page, every 2 s, and the full list every 10 s);
- ``offline``: 1,000 devices dropped at once (their last wills): seconds until all show
  offline in the database, and their DeviceOffline Events;
- ``silent``: devices whose heartbeats stop without a will: seconds until the liveness sweep
  marks them offline (3 missed periods);
- ``reconnect``: every device dropped, then all reconnect at once: seconds until all show
  online again;
- ``rollout``: the fleet serves v1 of a 5.2 MB engine; v2 (every weight different) goes to
  every device in one wave with the fleet rate cap raised to 1 GiB/s, the devices fetching
  chunks per the real protocol: time to 50 % and 100 %, failures, bytes, CPU.

    .venv/bin/python -m bench.fleet_scale --rows quick      # 1k and 3k, SQLite (~6 min)
    .venv/bin/python -m bench.fleet_scale --rows full       # + 10k, PostgreSQL, replicas
    .venv/bin/python -m bench.fleet_scale --rows steady:10000:10:sqlite:1,offline:3000

Writes a table to stdout and JSON to bench/results/fleet_scale.json (``--json PATH``).
Needs mosquitto (and PostgreSQL server binaries for ``postgres`` rows).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from sqlalchemy import create_engine, text

from bench.fleet_sim import Fleet, FleetConfig, raise_nofile_limit

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "fleet_scale.json"

_BOOT = (
    "import json, logging, sys\n"
    "from pathlib import Path\n"
    "from controller.embedded import EmbeddedOptions, run_embedded\n"
    "logging.basicConfig(level=logging.WARNING,\n"
    "                    format='%(asctime)s %(levelname)s %(name)s: %(message)s')\n"
    "o = json.loads(sys.argv[1])\n"
    "for k in ('data_dir', 'keys_dir', 'store_dir'):\n"
    "    if o.get(k): o[k] = Path(o[k])\n"
    "sys.exit(run_embedded(EmbeddedOptions(**o)))\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _q(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


@dataclass
class Controller:
    """One `edgefleet up` process (run_embedded with these options)."""

    data_dir: Path
    options: dict[str, Any]
    api_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.api_port = _free_port()
        opts = {"data_dir": str(self.data_dir), "api_port": self.api_port, **self.options}
        log = (self.data_dir / f"controller-{self.api_port}.log").open("ab")
        self.proc = subprocess.Popen([sys.executable, "-c", _BOOT, json.dumps(opts)],
                                     stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=REPO,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))

    async def wait_ready(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2) as c:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"controller exited; see {self.data_dir}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await c.get(f"{self.url}/readyz")).status_code == 200:
                        return
                await asyncio.sleep(0.3)
        raise RuntimeError(f"controller not ready in {timeout_s}s; see {self.data_dir}")

    def broker(self) -> psutil.Process | None:
        if self.proc is None:
            return None
        with contextlib.suppress(psutil.Error):
            for ch in psutil.Process(self.proc.pid).children(recursive=True):
                if "mosquitto" in ch.name():
                    return ch
        return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Meter:
    """CPU (% of one core, over the measured span) and peak RSS of some processes."""

    def __init__(self, procs: list[psutil.Process]) -> None:
        self.procs = procs
        self.t0 = time.monotonic()
        self.cpu0 = [self._cpu(p) for p in procs]
        self.rss = [0] * len(procs)

    @staticmethod
    def _cpu(p: psutil.Process) -> float:
        try:
            t = p.cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return 0.0

    def sample(self) -> None:
        for i, p in enumerate(self.procs):
            with contextlib.suppress(psutil.Error):
                self.rss[i] = max(self.rss[i], p.memory_info().rss)

    def result(self) -> list[tuple[float, int]]:
        wall = max(1e-6, time.monotonic() - self.t0)
        return [(100.0 * (self._cpu(p) - c0) / wall, rss)
                for p, c0, rss in zip(self.procs, self.cpu0, self.rss, strict=True)]


@dataclass
class Row:
    kind: str
    devices: int
    period_s: float = 10.0
    db: str = "sqlite"
    replicas: int = 1
    data: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def _postgres() -> Iterator[str]:
    from tests.helpers.postgres import throwaway_postgres

    with throwaway_postgres(max_connections=100) as url:
        yield url


class Lab:
    """Controllers + broker (+ PostgreSQL) + the simulated fleet for one row."""

    def __init__(self, root: Path, *, db: str, replicas: int, settings: dict[str, Any],
                 pg_url: str = "") -> None:
        self.root = root
        self.db, self.replicas, self.settings, self.pg_url = db, replicas, settings, pg_url
        self.controllers: list[Controller] = []
        self.mqtt_port = _free_port()
        self.db_url = ""

    async def start(self) -> None:
        first = self.root / "c0"
        self.db_url = self.pg_url if self.db == "postgres" else \
            f"sqlite:///{first / 'edgefleet.db'}"
        base: dict[str, Any] = {"settings_overrides": self.settings}
        if self.db == "postgres":
            base["db_url"] = self.pg_url
        c0 = Controller(first, {**base, "mqtt_port": self.mqtt_port})
        c0.start()
        await c0.wait_ready()
        self.controllers.append(c0)
        for i in range(1, self.replicas):
            c = Controller(self.root / f"c{i}", {
                **base, "broker_url": f"mqtt://127.0.0.1:{self.mqtt_port}",
                "keys_dir": str(first / "keys"), "store_dir": str(first / "store"),
                "replica_id": f"replica-{i}"})
            c.start()
            self.controllers.append(c)
        for c in self.controllers[1:]:
            await c.wait_ready()

    def processes(self) -> list[psutil.Process]:
        out = []
        for c in self.controllers:
            assert c.proc is not None
            out.append(psutil.Process(c.proc.pid))
        b = self.controllers[0].broker()
        if b is not None:
            out.append(b)
        return out

    def stop(self) -> None:
        for c in reversed(self.controllers):
            c.stop()


class DbWatch:
    """Polls the Device table: heartbeat lag per (device, seq) first seen, online counts."""

    def __init__(self, url: str, fleet: Fleet) -> None:
        self.engine = create_engine(url, pool_pre_ping=True)
        self.fleet = fleet
        self.seen: dict[str, int] = {}
        self.lags: list[float] = []
        self.timeline: list[tuple[int, float]] = []     # (sent_ms, lag_s)
        self.measuring = False
        self.rows: dict[str, tuple[int, int | None, bool]] = {}

    def poll(self) -> DbWatch:
        with self.engine.connect() as c:
            res = c.execute(text("SELECT device_id, heartbeat_seq, last_heartbeat_ms, online "
                                 "FROM device")).all()
        log = self.fleet.heartbeats
        rows = {}
        for dev, seq, at, online in res:
            rows[dev] = (int(seq or 0), at, bool(online))
            if seq and seq > self.seen.get(dev, 0):
                self.seen[dev] = seq
                sent = log.sent_ms(dev, seq)
                if self.measuring and sent is not None and at:
                    self.lags.append((at - sent) / 1000.0)
                    self.timeline.append((sent, (at - sent) / 1000.0))
        self.rows = rows
        return self

    def count(self, sql: str, **params: Any) -> int:
        with self.engine.connect() as c:
            return int(c.execute(text(sql), params).scalar() or 0)

    def online_of(self, ids: list[str]) -> int:
        return sum(1 for d in ids if self.rows.get(d, (0, None, False))[2])

    def close(self) -> None:
        self.engine.dispose()


async def _timed_get(client: httpx.AsyncClient, url: str, out: list[float]) -> None:
    t0 = time.perf_counter()
    with contextlib.suppress(httpx.HTTPError):
        r = await client.get(url)
        if r.status_code == 200:
            out.append((time.perf_counter() - t0) * 1000)


async def _until(pred: Any, timeout_s: float, step: float = 0.25) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if await asyncio.to_thread(pred):
            return time.monotonic() - t0
        await asyncio.sleep(step)
    return None


async def run_row(row: Row, *, duration_s: float, pg_url: str, keep: bool) -> Row:
    root = Path(tempfile.mkdtemp(prefix=f"fleet-scale-{row.kind}-"))
    settings: dict[str, Any] = {"compile_in_process_pool": False}
    if row.kind == "rollout":        # "on loopback with the rate limit raised"
        settings["ota_max_bytes_per_second"] = ROLLOUT_RATE
    lab = Lab(root, db=row.db, replicas=row.replicas, settings=settings, pg_url=pg_url)
    await lab.start()
    extra: dict[str, Any] = {}
    if row.kind == "rollout":
        extra = await _model_v1(lab, root)
    fleet = Fleet(FleetConfig(port=lab.mqtt_port, devices=row.devices,
                              heartbeat_s=row.period_s, metrics_s=row.period_s * 1.5,
                              connect_rate=1000.0, hb_log_depth=64, **extra))
    watch: DbWatch | None = None
    try:
        t_conn = time.monotonic()
        await fleet.start()
        await fleet.wait_online(row.devices, timeout_s=180)
        watch = DbWatch(lab.db_url, fleet)
        t_known = await _until(lambda: len(watch.poll().rows) >= row.devices, 180,
                               step=1.0)
        row.data["connect_s"] = round(time.monotonic() - t_conn, 1)
        row.data["all_known_s"] = None if t_known is None else round(time.monotonic() - t_conn,
                                                                      1)
        await asyncio.sleep(row.period_s)              # one full period before measuring
        if row.kind == "steady":
            await _steady(row, lab, fleet, watch, duration_s)
        elif row.kind == "offline":
            await _offline(row, lab, fleet, watch)
        elif row.kind == "silent":
            await _silent(row, fleet, watch)
        elif row.kind == "reconnect":
            await _reconnect(row, fleet, watch)
        elif row.kind == "rollout":
            await _rollout(row, lab, fleet, watch, root)
        async with httpx.AsyncClient(timeout=10) as c:
            st = (await c.get(f"{lab.controllers[0].url}/api/v1/ingest")).json()
        row.data["dropped"] = st.get("droppedTotal")
        row.data["controller_lag_ms"] = st.get("lagMs")
    finally:
        with contextlib.suppress(Exception):
            await fleet.stop(graceful=False, timeout_s=20)
        if watch is not None:
            watch.close()
        lab.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return row


async def _steady(row: Row, lab: Lab, fleet: Fleet, watch: DbWatch, duration_s: float) -> None:
    procs = lab.processes()
    meter = Meter([*procs, psutil.Process(os.getpid())])
    url = lab.controllers[-1].url            # a follower's API when there are replicas
    page_ms: list[float] = []
    full_ms: list[float] = []
    sent_hb0, sent_m0 = fleet.stats.sent["heartbeat"], fleet.stats.sent["metrics"]
    assert not fleet.config.models, "one MetricSample row per message needs model-less devices"
    rows_m0 = watch.count("SELECT count(*) FROM metricsample")
    watch.measuring = True
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=30) as c:
        i = 0
        while time.monotonic() - t0 < duration_s:
            await asyncio.to_thread(watch.poll)
            meter.sample()
            if i % 4 == 0:
                await _timed_get(c, f"{url}/api/v1/devices?limit=500", page_ms)
            if i % 20 == 0:
                await _timed_get(c, f"{url}/api/v1/devices", full_ms)
            i += 1
            await asyncio.sleep(0.5)
    sent_hb = fleet.stats.sent["heartbeat"] - sent_hb0
    sent_m = fleet.stats.sent["metrics"] - sent_m0
    cpu = meter.result()
    # every message counted: the fleet falls silent, then the rows are compared with every
    # metrics message the fleet ever sent, once all have landed (or 30 s passed: lost)
    fleet.silence(fleet.ids)
    all_m = fleet.stats.sent["metrics"]

    def behind() -> int:
        return sum(1 for d in fleet.ids if fleet.heartbeats.last_seq(d) - watch.rows.get(
            d, (0, None, False))[0] > 0)

    await _until(lambda: watch.poll() is not None and behind() == 0 and watch.count(
        "SELECT count(*) FROM metricsample") >= all_m, 30, step=0.5)
    watch.measuring = False
    rows_all = watch.count("SELECT count(*) FROM metricsample")
    rows_m = rows_all - rows_m0
    n_ctl = len(lab.controllers)
    row.data.update({
        "msgs_per_s": round((sent_hb + sent_m) / duration_s, 1),
        "lag_p50_s": _r(_q(watch.lags, 0.5)), "lag_p99_s": _r(_q(watch.lags, 0.99)),
        "lag_max_s": _r(max(watch.lags) if watch.lags else None),
        "lag_samples": len(watch.lags),
        "lag_p99_by_10s": _by_window(watch.timeline, 10_000),
        "metrics_sent": all_m, "metrics_stored": rows_all,
        "metrics_stored_pct": round(100.0 * rows_all / all_m, 1) if all_m else None,
        "metrics_in_window_sent": sent_m, "metrics_in_window_stored": rows_m,
        "devices_known": len(watch.rows), "devices_behind": behind(),
        "controller_cpu_pct": [round(x[0], 1) for x in cpu[:n_ctl]],
        "controller_rss_mb": [round(x[1] / 2**20) for x in cpu[:n_ctl]],
        "broker_cpu_pct": round(cpu[n_ctl][0], 1) if len(cpu) > n_ctl + 1 else None,
        "broker_rss_mb": round(cpu[n_ctl][1] / 2**20) if len(cpu) > n_ctl + 1 else None,
        "api_page500_p50_ms": _r(_q(page_ms, 0.5), 1), "api_page500_p99_ms": _r(_q(page_ms, 0.99), 1),
        "api_full_list_p50_ms": _r(_q(full_ms, 0.5), 1),
        "sim_cpu_pct": round(cpu[-1][0], 1),
    })


async def _offline(row: Row, lab: Lab, fleet: Fleet, watch: DbWatch) -> None:
    n = min(1000, row.devices)
    ids = fleet.ids[:n]
    dropped_ms = int(time.time() * 1000)
    fleet.drop(ids)
    took = await _until(lambda: watch.poll().online_of(ids) == 0, 120)
    ev = watch.count("SELECT count(DISTINCT name) FROM event WHERE reason = 'DeviceOffline' "
                     "AND at_ms >= :t", t=dropped_ms)
    row.data.update({"dropped_devices": n, "all_offline_s": _r(took, 1),
                     "offline_events": ev,
                     "still_online": watch.online_of(ids)})


async def _silent(row: Row, fleet: Fleet, watch: DbWatch) -> None:
    n = min(100, row.devices)
    ids = fleet.ids[-n:]
    fleet.silence(ids)
    took = await _until(lambda: watch.poll().online_of(ids) == 0,
                        row.period_s * 10 + 30)
    others = [d for d in fleet.ids if d not in set(ids)]
    row.data.update({"silenced": n, "all_offline_s": _r(took, 1),
                     "others_online": watch.online_of(others), "others": len(others)})


async def _reconnect(row: Row, fleet: Fleet, watch: DbWatch) -> None:
    ids = fleet.ids
    fleet.drop(ids)
    await _until(lambda: watch.poll().online_of(ids) == 0, 120)
    t0 = time.monotonic()
    await fleet.reconnect(ids, abrupt=False, rate=None)
    took = await _until(lambda: watch.poll().online_of(ids) == len(ids), 180)
    row.data.update({"reconnected": len(ids), "all_online_s": _r(took, 1),
                     "mqtt_connected_s": round(time.monotonic() - t0, 1),
                     "online_at_end": watch.online_of(ids)})


ROLLOUT_RATE = 1024 * 1024 * 1024     # fleet OTA cap for the rollout row (default 8 MiB/s)
ENGINE_SHAPE = (1024, 1280)           # float32 weights: a 5.2 MB engine


async def _publish_model(lab: Lab, root: Path, *, version: int, seed: int) -> str:
    """Build an affine ONNX model of ENGINE_SHAPE, upload and apply it as EdgeModel m at
    ``version`` through the API, wait until compiled; returns its engine's sha256."""
    from tests.helpers.controller import device_class, edge_model
    from tests.helpers.models import build_affine

    src = build_affine(root / f"m{version}.onnx", marker=float(version), n_in=ENGINE_SHAPE[0],
                       n_out=ENGINE_SHAPE[1], seed=seed)
    url = lab.controllers[0].url
    async with httpx.AsyncClient(timeout=120) as c:
        r = await c.post(f"{url}/api/v1/artifacts", content=src.read_bytes())
        r.raise_for_status()
        sha = r.json()["sha256"]
        docs = [device_class(), edge_model("m", sha256=sha, version=version)]
        (await c.post(f"{url}/api/v1/apply", json=docs)).raise_for_status()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            st = ((await c.get(f"{url}/api/v1/models/default/m")).json().get("status") or {})
            if st.get("phase") == "Ready" and st.get("version") == version:
                return str(st["engines"][0]["sha256"])
            await asyncio.sleep(1)
    raise RuntimeError(f"model v{version} not compiled in 300 s")


async def _model_v1(lab: Lab, root: Path) -> dict[str, Any]:
    """The fleet serves v1 of model m from the start (so v2 ships as a delta from it)."""
    from bench.fleet_sim import ServedSpec
    from controller.ota.keys import KeyStore

    sha = await _publish_model(lab, root, version=1, seed=1)
    keys = KeyStore.load_or_init(lab.controllers[0].data_dir / "keys")
    return {"models": (ServedSpec("m", 1, sha),), "root_public_key": keys.root_public_raw()}


async def _rollout(row: Row, lab: Lab, fleet: Fleet, watch: DbWatch, root: Path) -> None:
    """v2 (every weight different: the delta is as big as the engine) to every device in one
    wave: time to 100 %, CPU of controller and broker, bytes published and received."""
    from tests.helpers.controller import edge_rollout

    t_c = time.monotonic()
    v2 = await _publish_model(lab, root, version=2, seed=2)
    compile_s = time.monotonic() - t_c
    procs = lab.processes()
    meter = Meter([*procs, psutil.Process(os.getpid())])
    bytes0 = fleet.stats.chunk_bytes
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=60) as c:
        doc = edge_rollout("r", "m", [{"name": "all", "percent": 100}])
        (await c.post(f"{lab.controllers[0].url}/api/v1/apply", json=[doc])).raise_for_status()
    n = row.devices

    def served_v2() -> int:
        return sum(1 for d in fleet.devices.values()
                   if any(m.sha256 == v2 and m.active for m in d.served()))

    done_at: list[tuple[float, int]] = []

    def progress() -> bool:
        k = served_v2()
        done_at.append((time.monotonic() - t0, k))
        meter.sample()
        return k >= n or fleet.stats.updates_failed + fleet.stats.updates_rolled_back + k >= n

    took = await _until(progress, 900, step=0.5)
    cpu = meter.result()
    k = served_v2()
    with watch.engine.connect() as conn:
        sent = conn.execute(text(
            "SELECT coalesce(sum(bytes_sent), 0), count(*), "
            "count(DISTINCT base_sha256 || codec || payload_size), max(payload_size), "
            "max(codec) FROM devicerollout")).one()
        deltas = conn.execute(text("SELECT count(*) FROM delta")).scalar()
    half = next((t for t, c in done_at if c >= n // 2), None)
    n_ctl = len(lab.controllers)
    row.data.update({
        "engine_mb": round(ENGINE_SHAPE[0] * ENGINE_SHAPE[1] * 4 / 1e6, 1),
        "compile_v2_s": round(compile_s, 1), "rate_cap_mib_s": ROLLOUT_RATE // 2**20,
        "time_to_100pct_s": _r(took, 1), "time_to_50pct_s": _r(half, 1),
        "committed": k, "failed": fleet.stats.updates_failed,
        "rolled_back": fleet.stats.updates_rolled_back,
        "stall_rerequests": fleet.stats.stall_rerequests,
        "bytes_published_controller_mb": round(int(sent[0]) / 1e6, 1),
        "bytes_received_devices_mb": round((fleet.stats.chunk_bytes - bytes0) / 1e6, 1),
        "offers": int(sent[1]), "distinct_payloads": int(sent[2]), "delta_rows": deltas,
        "payload_mb": round(float(sent[3]) / 1e6, 2), "codecs": sorted({str(sent[4])}),
        "controller_cpu_pct": [round(x[0], 1) for x in cpu[:n_ctl]],
        "controller_rss_mb": [round(x[1] / 2**20) for x in cpu[:n_ctl]],
        "broker_cpu_pct": round(cpu[n_ctl][0], 1) if len(cpu) > n_ctl + 1 else None,
        "sim_cpu_pct": round(cpu[-1][0], 1),
    })


def _by_window(timeline: list[tuple[int, float]], ms: int) -> list[float | None]:
    """p99 lag per ``ms`` window of send time: when in the run the lag happened."""
    if not timeline:
        return []
    t0 = min(t for t, _ in timeline)
    buckets: dict[int, list[float]] = {}
    for t, lag in timeline:
        buckets.setdefault((t - t0) // ms, []).append(lag)
    return [_r(_q(buckets.get(i, []), 0.99)) for i in range(max(buckets) + 1)]


def _r(v: float | None, nd: int = 2) -> float | None:
    return None if v is None else round(v, nd)


PRESETS = {
    "quick": "steady:1000:10:sqlite:1,steady:3000:10:sqlite:1,offline:3000,silent:1000:2,"
             "reconnect:3000,rollout:1000",
    "full": "steady:1000:10:sqlite:1,steady:3000:10:sqlite:1,steady:10000:10:sqlite:1,"
            "steady:1000:1:sqlite:1,steady:3000:10:postgres:1,steady:10000:10:postgres:1,"
            "steady:10000:10:postgres:3,offline:10000,silent:1000:2,reconnect:10000,"
            "rollout:1000",
}


def parse_rows(spec: str) -> list[Row]:
    rows = []
    for part in PRESETS.get(spec, spec).split(","):
        f = part.split(":")
        kind = f[0]
        rows.append(Row(kind=kind, devices=int(f[1]),
                        period_s=float(f[2]) if len(f) > 2 else 10.0,
                        db=f[3] if len(f) > 3 else "sqlite",
                        replicas=int(f[4]) if len(f) > 4 else 1))
    return rows


def table(rows: list[Row]) -> str:
    out = ["| row | devices | period | db | replicas | msgs/s | lag p50 / p99 (s) | metrics "
           "stored | dropped | controller CPU / RSS | broker CPU / RSS | API page / full p50 |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r.data
        if r.kind == "steady":
            ctl = " + ".join(f"{c:.0f} %" for c in d.get("controller_cpu_pct", [])) + " / " + \
                " + ".join(f"{m} MB" for m in d.get("controller_rss_mb", []))
            out.append(
                f"| steady | {r.devices:,} | {r.period_s:g} s | {r.db} | {r.replicas} | "
                f"{d.get('msgs_per_s')} | {d.get('lag_p50_s')} / {d.get('lag_p99_s')} | "
                f"{d.get('metrics_stored_pct')} % | {d.get('dropped')} | {ctl} | "
                f"{d.get('broker_cpu_pct')} % / {d.get('broker_rss_mb')} MB | "
                f"{d.get('api_page500_p50_ms')} / {d.get('api_full_list_p50_ms')} ms |")
        else:
            what = {k: v for k, v in d.items() if k not in ("controller_lag_ms",)}
            out.append(f"| {r.kind} | {r.devices:,} | {r.period_s:g} s | {r.db} | "
                       f"{r.replicas} | {json.dumps(what)} |||||||")
    return "\n".join(out)


async def amain(args: argparse.Namespace) -> int:
    rows = parse_rows(args.rows)
    need = max(r.devices for r in rows) + 512
    raise_nofile_limit(need)
    done: list[Row] = []
    pg = contextlib.ExitStack()
    pg_url = args.pg_url
    try:
        for r in rows:
            if r.db == "postgres" and not pg_url:
                pg_url = pg.enter_context(_postgres())
            if r.db == "postgres":
                # a fresh database per row
                eng = create_engine(pg_url.rsplit("/", 1)[0] + "/postgres",
                                    isolation_level="AUTOCOMMIT")
                name = f"fs{len(done)}"
                with eng.connect() as c:
                    c.execute(text(f"DROP DATABASE IF EXISTS {name}"))
                    c.execute(text(f"CREATE DATABASE {name}"))
                eng.dispose()
                url = pg_url.rsplit("/", 1)[0] + f"/{name}"
            else:
                url = ""
            print(f"-- {r.kind} {r.devices} devices, {r.period_s:g} s, {r.db}, "
                  f"{r.replicas} replica(s)", flush=True)
            try:
                done.append(await run_row(r, duration_s=args.duration, pg_url=url,
                                          keep=args.keep))
            except Exception as e:  # one failing row is reported, the rest still run
                r.data["error"] = f"{type(e).__name__}: {e}"
                done.append(r)
            print(json.dumps(done[-1].data), flush=True)
    finally:
        pg.close()
    print(table(done))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "fleet_scale", "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_at_end": os.getloadavg()},
        "duration_s": args.duration,
        "rows": [{"kind": r.kind, "devices": r.devices, "period_s": r.period_s, "db": r.db,
                  "replicas": r.replicas, **r.data} for r in done]}, indent=2))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="quick", help="quick | full | comma-separated "
                   "kind:devices[:period_s[:sqlite|postgres[:replicas]]]")
    p.add_argument("--duration", type=float, default=60.0, help="measured seconds per row")
    p.add_argument("--pg-url", default="", help="PostgreSQL server URL (default: start one)")
    p.add_argument("--json", default=str(RESULTS))
    p.add_argument("--keep", action="store_true", help="keep the controllers' data folders")
    return asyncio.run(amain(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
