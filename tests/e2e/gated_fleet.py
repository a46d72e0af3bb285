"""A real fleet for rollout health-gate scenarios: v1 everywhere, then a bad v2 under load.

Used by tests/e2e/test_rollout_gates_agents.py and bench/rollout_gates.py. Builds on
tests/e2e/fleet.py (embedded controller in the caller's event loop, real
``edgefleet-agent run`` processes, the caller's Mosquitto): the agents here send
heartbeats every 0.5 s and Metrics every 1 s, so the windowed serving metrics the gates read
move fast. Resources go through the real API (the model file by ``POST /api/v1/artifacts``,
then ``POST /api/v1/apply`` with YAML); the views are
read through the API, the gate decisions and offer rows from the controller's database.

The scenario: ``apply_model(version=1)`` with an ungated canary wave -> every device serves
v1 (``wait_serving``) -> client load (tests.helpers.client_load) builds the v1 latency
baseline -> ``apply_model(version=2, waves=gated)`` -> the canary gets v2, its gate fails,
the controller backs it out to v1 (codec slot) and pauses.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from sqlmodel import col, select

from controller.demo_agents import local_device_class, write_agent_config
from controller.fleet.db import session_scope
from controller.fleet.models import DeviceRollout, WaveGate
from tests.e2e.fleet import Fleet, start_fleet, wait_for
from tests.helpers.broker import Broker

MODEL = "gated"
THREADS_ENV = "EDGEFLEET_INTRA_OP_THREADS"   # read by agent.runtime.onnxruntime
ROLLOUT = "gated"


def now_ms() -> int:
    return int(time.time() * 1000)


async def start_gated_fleet(tmp_path: Path, broker: Broker, *, agents: int,
                            heartbeat_interval_s: float = 0.5,
                            metrics_interval_s: float = 1.0,
                            intra_op_threads: int = 1,
                            online_timeout_s: float = 120) -> Fleet:
    """Embedded controller + ``agents`` real agents (board-01..) with fast telemetry.

    The agents share this machine's CPUs, as real boards do not: each runs onnxruntime with
    ``intra_op_threads`` (EDGEFLEET_INTRA_OP_THREADS; several thread pools spinning up per
    request on two shared cores stall each other for whole time slices), and CPU load does
    not throttle them (their thermal policy reads this machine's CPU, busy with the whole
    fleet; temperature still would)."""
    fleet = await start_fleet(tmp_path, broker, agents=0)
    try:
        saved = os.environ.get(THREADS_ENV)
        os.environ[THREADS_ENV] = str(intra_op_threads)
        try:
            for i in range(1, agents + 1):
                a = write_agent_config(
                    tmp_path / "agents", f"board-{i:02d}", device_class=local_device_class(),
                    mqtt_host=broker.host, mqtt_port=broker.port,
                    root_public_key_b64=fleet.ctrl.keys.root_public_b64(),
                    heartbeat_interval_s=heartbeat_interval_s,
                    metrics_interval_s=metrics_interval_s,
                    extra={"thermal": {"throttle_cpu_percent": 101.0,
                                       "recover_cpu_percent": 100.0}})
                a.start()
                fleet.agents.append(a)
        finally:
            if saved is None:
                os.environ.pop(THREADS_ENV, None)
            else:
                os.environ[THREADS_ENV] = saved

        async def all_online() -> bool:
            devs = await fleet.devices()
            return all(devs.get(a.device_id, {}).get("online") for a in fleet.agents)

        await wait_for(all_online, timeout_s=online_timeout_s, what=f"{agents} agents online",
                       on_timeout=fleet.logs)
    except BaseException:
        await fleet.stop()
        raise
    return fleet


def gated_waves(gate: dict[str, Any], *, canary: int = 1) -> list[dict[str, Any]]:
    return [{"name": "canary", "count": canary, "healthGate": gate},
            {"name": "rest", "percent": 100}]


def open_waves(*, canary: int = 1) -> list[dict[str, Any]]:
    """The same split as gated_waves (the members keep their wave), no serving gate."""
    return gated_waves({"soakSeconds": 0}, canary=canary)


def manifests(*, model_sha256: str, version: int, waves: list[dict[str, Any]]) -> str:
    docs = [{"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
             "metadata": {"name": MODEL, "namespace": "default"},
             "spec": {"version": version, "source": {"sha256": model_sha256},
                      "targets": [{"deviceClass": local_device_class(),
                                   "precisions": ["fp32"]}]}},
            {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeRollout",
             "metadata": {"name": ROLLOUT, "namespace": "default"},
             "spec": {"model": MODEL, "waves": waves}}]
    return yaml.safe_dump_all(docs, sort_keys=False)


async def apply_model(fleet: Fleet, *, model: Path, version: int,
                      waves: list[dict[str, Any]]) -> None:
    """Upload ``model`` (POST /api/v1/artifacts), then apply the EdgeModel at ``version``
    and the EdgeRollout with ``waves`` (POST /api/v1/apply, YAML)."""
    async with httpx.AsyncClient(base_url=fleet.url, timeout=60) as c:
        r = await c.post("/api/v1/artifacts", params={"kind": "model", "name": model.name},
                         content=model.read_bytes(),
                         headers={"content-type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        r = await c.post("/api/v1/apply", content=manifests(
            model_sha256=r.json()["sha256"], version=version, waves=waves),
            headers={"content-type": "application/yaml"})
    assert r.status_code == 200, r.text


def rollout_status(fleet: Fleet) -> dict[str, Any]:
    res = fleet.ctrl.core.get("EdgeRollout", "default", ROLLOUT)
    return dict((res or {}).get("status") or {})


def served_engine(device: dict[str, Any]) -> dict[str, Any]:
    """The main engine of MODEL in a device row's last heartbeat ({} = none)."""
    return next((m for m in device.get("models") or []
                 if m.get("name") == MODEL and not m.get("variant")), {})


async def device(fleet: Fleet, device_id: str) -> dict[str, Any]:
    return dict(await fleet.get(f"/api/v1/devices/{device_id}"))


async def wait_serving(fleet: Fleet, *, version: int, timeout_s: float = 180
                       ) -> dict[str, str]:
    """Wait until every agent serves MODEL@version and the rollout is Complete; device id ->
    engine sha256."""
    async def check() -> dict[str, str] | None:
        if rollout_status(fleet).get("phase") != "Complete" or \
                int(rollout_status(fleet).get("version") or 0) != version:
            return None
        out = {}
        for a in fleet.agents:
            m = served_engine(await device(fleet, a.device_id))
            if int(m.get("version") or 0) != version or not m.get("sha256"):
                return None
            out[a.device_id] = str(m["sha256"])
        return out

    return await wait_for(check, timeout_s=timeout_s, what=f"every agent serving {MODEL}@"
                          f"{version}, rollout Complete", on_timeout=fleet.logs)


async def events(fleet: Fleet, reason: str, *, since_ms: int = 0) -> list[dict[str, Any]]:
    items = (await fleet.get(f"/api/v1/events?limit=1000&since_ms={since_ms}"))["items"]
    return sorted((e for e in items if e["reason"] == reason and e["kind"] == "EdgeRollout"),
                  key=lambda e: (e["at_ms"], e["id"]))


def offer_rows(fleet: Fleet, device_id: str | None = None) -> list[DeviceRollout]:
    """Every offer (DeviceRollout row) of the rollout, oldest first."""
    q = select(DeviceRollout).where(DeviceRollout.rollout == f"default/{ROLLOUT}")
    if device_id is not None:
        q = q.where(DeviceRollout.device_id == device_id)
    with session_scope(fleet.ctrl.core.db) as s:
        rows = s.exec(q.order_by(col(DeviceRollout.id))).all()
        for r in rows:
            s.expunge(r)
    return list(rows)


def gate_rows(fleet: Fleet) -> list[WaveGate]:
    with session_scope(fleet.ctrl.core.db) as s:
        rows = s.exec(select(WaveGate).where(WaveGate.rollout == f"default/{ROLLOUT}")
                      .order_by(col(WaveGate.id))).all()
        for r in rows:
            s.expunge(r)
    return list(rows)


async def sleep_ms(ms: int) -> None:
    await asyncio.sleep(ms / 1000)
