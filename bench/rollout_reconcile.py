"""Cost of one EdgeRollout reconcile pass over a big fleet: time, SQL statements, status size.

A real Mosquitto and a real ControllerCore (its own SQLite database under a temporary
folder, or PostgreSQL with ``--db-url``). Two versions of a small affine model are compiled
(tests.helpers.controller.ready_model); ``N`` devices are registered as the ingest would
(a Heartbeat per device through ``core.ingest.handle``: class ``cpu-x86-64``, serving v1).
The rollout of v2 over all of them (one wave, 100%) is reconciled by calling
``controller.reconcile.rollouts.reconcile_rollout`` directly, one pass at a time (the
resource is not applied, so the core's own loop never runs it):

- ``first``: the pass that targets every device and publishes its offer (one shared delta);
- ``steady``: nothing changed since the previous pass;
- ``changed_1pct``: 1% of the devices reported DOWNLOADING, then COMMITTED with a heartbeat
  serving v2 (each through the ingest), then a pass;
- ``steady_after``: nothing changed again.

Per pass: wall time, SQL statements (a ``before_cursor_execute`` listener on the core's
engine) and the size of the status document (compact JSON). Prints a table, writes
bench/results/rollout_reconcile.json (``--json PATH``).

    .venv/bin/python -m bench.rollout_reconcile [--devices 1000,10000]
    .venv/bin/python -m bench.rollout_reconcile --devices 10000 --db-url postgresql+psycopg://...
        (an empty database: one size per run)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event

from controller.reconcile.rollouts import reconcile_rollout
from protos import topics
from protos.edgefleet.v1 import common_pb2, device_pb2, update_pb2
from tests.helpers.broker import start_mosquitto
from tests.helpers.controller import edge_rollout, ready_model, started_core

RESULTS = Path(__file__).parent / "results"
CLASS = "cpu-x86-64"


class StatementCounter:
    """Counts the SQL statements run on an engine (all threads)."""

    def __init__(self, engine: Any) -> None:
        self.n = 0
        event.listen(engine, "before_cursor_execute", self._on)

    def _on(self, *_a: Any, **_k: Any) -> None:
        self.n += 1


def heartbeat(dev: str, *, sha: str, version: int, seq: int) -> bytes:
    hb = device_pb2.Heartbeat(
        device_id=dev, device_class=CLASS, agent_version="bench", health="ok", seq=seq,
        sent_at_ms=int(time.time() * 1000), uptime_s=3600,
        models=[device_pb2.ServedModel(name="m", version=version, sha256=sha, active=True,
                                       slot="a")],
        slots=[device_pb2.ServedModel(name="m", version=version, sha256=sha, active=True,
                                      slot="a")])
    return hb.SerializeToString()


def update_status(dev: str, uid: str, state: int) -> bytes:
    return update_pb2.UpdateStatus(device_id=dev, update_id=uid, model_name="m", version=2,
                                   state=state, at_ms=int(time.time() * 1000)
                                   ).SerializeToString()


def resource(status: dict[str, Any]) -> dict[str, Any]:
    r = edge_rollout("bench", "m", [{"name": "all", "percent": 100}])
    r["metadata"].update({"uid": "bench-uid", "generation": 1,
                          "creationTimestamp": "2024-01-01T00:00:00.000Z"})
    r["status"] = status
    return r


async def run_size(n: int, work: Path, broker: Any, db_url: str) -> dict[str, Any]:
    """Populate ``n`` devices, run the passes, return their numbers."""
    opts: dict[str, Any] = {"resync_s": 3600.0, "chunk_size_bytes": 4096}
    if db_url:
        opts["db_url"] = db_url
    async with started_core(work / f"c{n}", broker, **opts) as core:
        v1 = await ready_model(core, work / f"m{n}", version=1, marker=1.0)
        t0 = time.monotonic()
        ids = [f"dev-{i:05d}" for i in range(n)]
        for d in ids:
            core.ingest.handle(topics.device_topic(d, topics.HEARTBEAT),
                               heartbeat(d, sha=v1, version=1, seq=1))
        populate_s = time.monotonic() - t0
        v2 = await ready_model(core, work / f"m{n}", version=2, marker=2.0)
        await asyncio.sleep(0.5)                # let the core's loop settle (models only)
        ctx = core.rollout_context()
        counter = StatementCounter(core.db)
        status: dict[str, Any] = {}
        passes: dict[str, dict[str, Any]] = {}

        async def one(label: str) -> None:
            nonlocal status
            before = counter.n
            t = time.perf_counter()
            status = await reconcile_rollout(resource(status), ctx)
            wall = time.perf_counter() - t
            size = len(json.dumps(status, separators=(",", ":")))
            passes[label] = {"wall_s": round(wall, 3), "sql_statements": counter.n - before,
                             "status_bytes": size, "phase": status.get("phase"),
                             "targeted": status.get("targeted"),
                             "updated": status.get("updated"),
                             "in_progress": status.get("inProgress")}
            print(f"  {n} devices, {label}: {wall:.3f} s, {counter.n - before} statements, "
                  f"status {size} B, {status.get('updated')}/{status.get('targeted')} "
                  "updated", flush=True)

        await one("first")
        await one("steady")
        from sqlmodel import Session, select

        from controller.fleet.models import DeviceRollout
        with Session(core.db) as s:
            uids = {r.device_id: r.update_id for r in s.exec(select(DeviceRollout)).all()}
        moved = ids[:: 100] or ids[:1]
        for d in moved:
            core.ingest.handle(topics.device_topic(d, topics.UPDATE_STATUS),
                               update_status(d, uids[d], common_pb2.UPDATE_STATE_DOWNLOADING))
            core.ingest.handle(topics.device_topic(d, topics.UPDATE_STATUS),
                               update_status(d, uids[d], common_pb2.UPDATE_STATE_COMMITTED))
            core.ingest.handle(topics.device_topic(d, topics.HEARTBEAT),
                               heartbeat(d, sha=v2, version=2, seq=2))
        await one("changed_1pct")
        await one("steady_after")
        return {"devices": n, "changed_devices": len(moved),
                "populate_s": round(populate_s, 1), "passes": passes,
                "engine_v1": v1[:12], "engine_v2": v2[:12]}


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    broker = start_mosquitto(work / "broker")
    t0 = time.monotonic()
    try:
        sizes = []
        for n in (int(x) for x in args.devices.split(",")):
            sizes.append(await run_size(n, work, broker, args.db_url))
        return {"benchmark": "rollout_reconcile", "machine": platform.machine(),
                "cpus": os.cpu_count(), "database": "postgresql" if args.db_url else "sqlite",
                "wall_s": round(time.monotonic() - t0, 1), "sizes": sizes}
    finally:
        broker.stop()


def table(result: dict[str, Any]) -> str:
    lines = ["| devices | pass | wall (s) | SQL statements | status (bytes) | updated |",
             "|---|---|---|---|---|---|"]
    for sz in result["sizes"]:
        for label, p in sz["passes"].items():
            lines.append(f"| {sz['devices']} | {label} | {p['wall_s']} | "
                         f"{p['sql_statements']} | {p['status_bytes']} | "
                         f"{p['updated']}/{p['targeted']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="1000,10000", help="fleet sizes, comma-separated")
    ap.add_argument("--db-url", default="", help="PostgreSQL URL (default: a fresh SQLite)")
    ap.add_argument("--json", type=Path, default=RESULTS / "rollout_reconcile.json")
    args = ap.parse_args(argv)
    if args.db_url and "," in args.devices:
        ap.error("--db-url takes one fleet size (one fresh database per size)")
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-rollout-reconcile-"))
    result = asyncio.run(run(args, work))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['database']}, {result['wall_s']} s in all; JSON: {args.json}\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
