"""End to end: fleet state (desired vs observed) with real agents, as an operator runs it.

Real Mosquitto, the embedded controller (tests/e2e/fleet.py; once as its own process that
is SIGKILLed) and real ``edgefleet-agent run`` processes. Every check reads what the boards
really do: their heartbeats through ``/api/v1/devices`` and their KServe v2 inference API
(the affine test models answer a zero input with their marker, so the answer names the
engine), next to what the statuses say. Sequences:

* versions only go up: v1, an identical-bytes v2 (a signed codec "slot" relabel, no bytes,
  same answer), a real v3 (counters per version: never above the fleet), then a v2 refused
  at apply naming both versions while the boards keep serving v3;
* two models on one board that was offline while both rollouts were applied;
* a version whose engine fails the boards' smoke check, then a good one: no stale "failed";
* an on-device accuracy probe on a board worse than the controller's check (the degraded
  fake backend): the canary's gate fails, it serves v1 again, the next wave is not offered;
* a controller SIGKILLed during a canary soak: its successor decides the gate and finishes
  without offering any device twice (offers counted on the broker);
* an older rollout over three boards and a newer one over two of them, applied right after
  each other (also with the newer applied while a pass of the older is offering): the older
  calls the shared boards superseded, never failed, and every board is offered once;
* an offline straggler: stalled (offline) while the rollout completes without it; back, it
  installs and the counters converge;
* a late board while the canary gate failed waits unoffered in the last wave; a good
  version completes, and a board that appears after Complete gets it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from controller.demo_agents import AgentProcess, infer
from tests.e2e.fleet import (
    ControllerProcess,
    Fleet,
    OfferCounter,
    apply_ok,
    degraded_agent,
    device_class_doc,
    devices_at,
    edgefleet_cli,
    get_json,
    model_doc,
    post_apply,
    retained_offers,
    rollout_doc,
    rollout_status,
    serves,
    start_agent,
    start_agents,
    start_fleet,
    wait_for,
    wait_online,
    write_manifests,
)
from tests.helpers.broker import Broker
from tests.helpers.models import build_affine, build_nan

pytestmark = pytest.mark.timeout(240)

N_IN = 16
ZERO = np.zeros((1, N_IN), np.float32)
FAILED = ("failed", "rolled_back")   # an update the board refused / undid
CANARY_THEN_REST = [{"name": "canary", "count": 1}, {"name": "rest", "percent": 100}]


def affine(folder: Path, marker: float) -> Path:
    """y = x @ W + marker (same W for every marker): a zero input answers ``marker``."""
    return build_affine(folder / f"affine-{marker:g}.onnx", marker=marker, n_in=N_IN, n_out=8,
                        seed=1)


async def answer(agent: AgentProcess, model: str) -> float:
    """The board's inference answer to a zero input (every output element is the same)."""
    out = await asyncio.to_thread(infer, agent.serve_url, model, ZERO, input_name="x")
    y = out["y"]
    assert np.all(y == y.flat[0]), y
    return float(y.flat[0])


async def engine_sha(fleet_url: str, model: str) -> str:
    m = await get_json(fleet_url, f"/api/v1/models/default/{model}")
    [engine] = m["status"]["engines"]
    return str(engine["sha256"])


async def complete(url: str, name: str, version: int, n: int) -> dict[str, Any] | None:
    st = await rollout_status(url, name)
    ok = (st.get("phase") == "Complete" and st.get("version") == version
          and st.get("updated") == n == st.get("targeted"))
    return st if ok else None


async def all_serve(fleet: Fleet, model: str, sha: str, version: int, *,
                    revision: int = 0) -> bool:
    """Every board's heartbeat reports ``model`` (version, revision) on engine ``sha``."""
    for a in fleet.agents:
        m = serves(await fleet.device(a.device_id), model)
        if not (m and m.get("sha256") == sha and int(m.get("version", 0)) == version
                and int(m.get("revision", 0)) == revision and m.get("active")):
            return False
    return True


async def more_heartbeats(url: str, ids: list[str], n: int = 3) -> None:
    """Wait until each device sent ``n`` more heartbeats (time for several reconcile passes)."""
    seq = {i: int((await get_json(url, f"/api/v1/devices/{i}"))["heartbeat_seq"]) for i in ids}

    async def later() -> bool:
        for i in ids:
            if int((await get_json(url, f"/api/v1/devices/{i}"))["heartbeat_seq"]) < seq[i] + n:
                return False
        return True

    await wait_for(later, timeout_s=60, what=f"{n} more heartbeats from {ids}")


class CounterWatch:
    """Polls a rollout's status in the background: the highest targeted / updated per version."""

    def __init__(self, url: str, name: str) -> None:
        self.url, self.name = url, name
        self.highest: dict[int, tuple[int, int]] = {}
        self.polls = 0

    async def run(self) -> None:
        while True:
            st = await rollout_status(self.url, self.name)
            if st.get("version"):
                v = int(st["version"])
                t, u = self.highest.get(v, (0, 0))
                self.highest[v] = (max(t, int(st.get("targeted") or 0)),
                                   max(u, int(st.get("updated") or 0)))
                self.polls += 1
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def watching(url: str, name: str) -> AsyncIterator[CounterWatch]:
    w = CounterWatch(url, name)
    task = asyncio.create_task(w.run())
    try:
        yield w
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def agent_status(agent: AgentProcess) -> dict[str, Any]:
    """`edgefleet-agent status --config FILE`: the board's persisted slots and updates."""
    import json

    out = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--config",
                          str(agent.config_path)], capture_output=True, text=True, timeout=60,
                         check=True)
    data: dict[str, Any] = json.loads(out.stdout)
    return data


# ---- 1-3: versions only go up, identical-bytes bump, counters per version ------------------

async def _paused_at(fleet: Any, version: int) -> dict[str, Any]:
    """The status of rollout m once the canary gate of ``version`` failed (phase Paused)."""
    async def paused() -> dict[str, Any] | None:
        st: dict[str, Any] = await fleet.rollout("m")
        return st if st.get("version") == version and st.get("phase") == "Paused" else None

    return await wait_for(paused, timeout_s=90, what=f"v{version}: the canary gate failed",
                          on_timeout=fleet.logs)


async def test_identical_bump_moves_no_bytes_counters_stay_per_version_downgrade_refused(
        mosquitto: Broker, tmp_path: Path) -> None:
    models = tmp_path / "models"
    v1_file, v3_file, low_file = affine(models, 1.0), affine(models, 3.0), affine(models, 9.0)
    counter = OfferCounter(mosquitto)
    fleet = await start_fleet(tmp_path, mosquitto, agents=3)
    try:
        async with watching(fleet.url, "m") as watch:
            await fleet.apply(device_class_doc(), model_doc("m", version=1, path=v1_file),
                              rollout_doc("m", model="m"))
            await wait_for(lambda: complete(fleet.url, "m", 1, 3), timeout_s=90,
                           what="v1 on 3/3", on_timeout=fleet.logs)
            v1 = await engine_sha(fleet.url, "m")
            await wait_for(lambda: all_serve(fleet, "m", v1, 1), timeout_s=30,
                           what="heartbeats: v1 everywhere")
            assert [await answer(a, "m") for a in fleet.agents] == [1.0] * 3

            # identical bytes as version 2: every board relabels its engine; nothing downloads
            await fleet.apply(model_doc("m", version=2, path=v1_file))
            st = await wait_for(lambda: complete(fleet.url, "m", 2, 3), timeout_s=90,
                                what="v2 on 3/3", on_timeout=fleet.logs)
            assert await engine_sha(fleet.url, "m") == v1
            assert st["bytesSent"] == 0, st
            for d, row in st["devices"].items():
                assert (row["state"], row["codec"], row["payloadSize"], row["bytesSent"]) == (
                    "updated", "slot", 0, 0), (d, row)
            await wait_for(lambda: all_serve(fleet, "m", v1, 2), timeout_s=30,
                           what="heartbeats: v2 on v1's engine")
            for a in fleet.agents:
                [o2] = [m for m in counter.manifests(a.device_id) if m.version == 2]
                assert (o2.codec, o2.payload_size, len(o2.chunk_sha256)) == ("slot", 0, 0)
                assert o2.target_sha256 == v1
                board = (await asyncio.to_thread(agent_status, a))["models"]["m"]
                assert (board["version"], board["sha256"]) == (2, v1), board
                assert board["update"]["state"] == "committed", board
                assert board["update"]["bytes_received"] == 0, board
                assert "relabelled v2" in a.log_tail(20000), a.log_tail()
            assert [await answer(a, "m") for a in fleet.agents] == [1.0] * 3

            # a real change as version 3: bytes move; the counters count v3's targets only
            await fleet.apply(model_doc("m", version=3, path=v3_file))
            st = await wait_for(lambda: complete(fleet.url, "m", 3, 3), timeout_s=90,
                                what="v3 on 3/3", on_timeout=fleet.logs)
            v3 = await engine_sha(fleet.url, "m")
            assert st["bytesSent"] > 0 and st["failed"] == 0
            assert [h["version"] for h in st["history"]] == [1, 2, 3]
            assert st["previousVersion"] == 2
            await wait_for(lambda: all_serve(fleet, "m", v3, 3), timeout_s=30,
                           what="heartbeats: v3 everywhere")
            assert [await answer(a, "m") for a in fleet.agents] == [3.0] * 3

            # downgrade to version 2 (other bytes): refused by `edgefleet apply`, both named
            low = write_manifests(tmp_path / "downgrade", model=low_file, name="m", version=2,
                                  rollout=False)
            res = await edgefleet_cli("--server", fleet.url, "apply", "-f", str(low))
            assert res.returncode != 0, res.stdout
            assert "spec.version 2" in res.stderr and "version 3" in res.stderr, res.stderr
            assert "only go up" in res.stderr, res.stderr
            r = await post_apply(fleet.url, [model_doc("m", version=2, path=low_file)])
            assert r.status_code == 422, r.text
            assert "spec.version 2" in r.json()["detail"] and "version 3" in r.json()["detail"]
            await more_heartbeats(fleet.url, [a.device_id for a in fleet.agents])
            st = await rollout_status(fleet.url, "m")
            assert (st["phase"], st["version"], st["targeted"], st["updated"]) == (
                "Complete", 3, 3, 3), st
            model = await get_json(fleet.url, "/api/v1/models/default/m")
            assert (model["version"], model["serving"]) == (3, "3/3"), model
            assert await all_serve(fleet, "m", v3, 3)
            assert [await answer(a, "m") for a in fleet.agents] == [3.0] * 3
        assert watch.polls > 10
        assert set(watch.highest) == {1, 2, 3}, watch.highest
        assert all(t <= 3 and u <= 3 for t, u in watch.highest.values()), watch.highest
        # one offer per board per version: v1 and v3 carried bytes, v2 none; none is left
        assert counter.per_device() == {a.device_id: 3 for a in fleet.agents}
        assert await asyncio.to_thread(retained_offers, mosquitto) == {}
    finally:
        counter.close()
        await fleet.stop()


# ---- 4: two models on one board that was offline while both were rolled out -----------------
async def test_two_models_reach_a_board_that_was_offline_while_both_rolled_out(
        mosquitto: Broker, tmp_path: Path) -> None:
    m_file, n_file = affine(tmp_path / "m", 1.0), affine(tmp_path / "n", 5.0)
    fleet = await start_fleet(tmp_path, mosquitto, agents=2)
    try:
        away = fleet.agent("board-2")
        away.stop()
        await wait_for(lambda: _offline(fleet.url, "board-2"), timeout_s=30,
                       what="board-2 offline", on_timeout=fleet.logs)
        await fleet.apply(device_class_doc(), model_doc("m", version=1, path=m_file),
                          model_doc("n", version=1, path=n_file), rollout_doc("rm", model="m"),
                          rollout_doc("rn", model="n"))

        async def board1_has_both() -> bool:
            rm, rn = await fleet.rollout("rm"), await fleet.rollout("rn")
            return all(r.get("devices", {}).get("board-1", {}).get("state") == "updated"
                       for r in (rm, rn))

        await wait_for(board1_has_both, timeout_s=90, what="board-1 serves m and n",
                       on_timeout=fleet.logs)
        for name in ("rm", "rn"):
            st = await fleet.rollout(name)
            assert st["phase"] == "Progressing" and st["updated"] == 1, st
            row = st["devices"]["board-2"]
            # its offer waits, retained on the model's own topic; no byte has moved yet
            assert (row["online"], row["state"], row["bytesSent"]) == (False, "offered", 0), row
        assert (await devices_at(fleet.url))["board-2"]["update_state"] == "offered (+1)"
        assert (await answer(fleet.agent("board-1"), "m"),
                await answer(fleet.agent("board-1"), "n")) == (1.0, 5.0)

        away.start()                      # back: both retained offers are waiting for it
        for name in ("rm", "rn"):
            await wait_for(partial(complete, fleet.url, name, 1, 2), timeout_s=90,
                           what=f"{name} complete", on_timeout=fleet.logs)
        shas = {m: await engine_sha(fleet.url, m) for m in ("m", "n")}
        for model, sha in shas.items():
            await wait_for(partial(all_serve, fleet, model, sha, 1),
                           timeout_s=30, what=f"heartbeats: {model} on both boards")
        for a in fleet.agents:
            assert (await answer(a, "m"), await answer(a, "n")) == (1.0, 5.0)
        devs = await devices_at(fleet.url)
        assert [devs[a.device_id]["update_state"] for a in fleet.agents] == ["", ""], devs
    finally:
        await fleet.stop()


async def _offline(url: str, device_id: str) -> bool:
    return not (await devices_at(url))[device_id]["online"]


# ---- 5: a failed version, then a good one: the UPDATE column is not stuck on "failed" --------
async def test_no_stale_failed_update_state_after_a_good_version_commits(
        mosquitto: Broker, tmp_path: Path) -> None:
    good, broken, fixed = (affine(tmp_path, 1.0), build_nan(tmp_path / "nan.onnx", n_in=N_IN),
                           affine(tmp_path, 3.0))
    fleet = await start_fleet(tmp_path, mosquitto, agents=2)
    try:
        ro = rollout_doc("m", model="m", waves=CANARY_THEN_REST, onFailure="pause")
        await fleet.apply(device_class_doc(), model_doc("m", version=1, path=good), ro)
        await wait_for(lambda: complete(fleet.url, "m", 1, 2), timeout_s=90, what="v1 on 2/2",
                       on_timeout=fleet.logs)

        # v2's engine answers NaN: the canary's smoke check refuses it and keeps serving v1
        await fleet.apply(model_doc("m", version=2, path=broken))

        st = await _paused_at(fleet, 2)
        canary = st["devices"]["board-1"]
        assert canary["state"] in FAILED and "smoke_check_failed" in canary["reason"], canary
        assert st["failed"] == 1 and st["devices"]["board-2"]["state"] == "pending", st
        assert await answer(fleet.agent("board-1"), "m") == 1.0
        devs = await devices_at(fleet.url)
        assert devs["board-1"]["update_state"] in FAILED, devs["board-1"]

        # a good v3 commits everywhere: nothing says "failed" any more
        await fleet.apply(model_doc("m", version=3, path=fixed))
        st = await wait_for(lambda: complete(fleet.url, "m", 3, 2), timeout_s=90,
                            what="v3 on 2/2", on_timeout=fleet.logs)
        degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
        assert st["failed"] == 0 and degraded["status"] == "False", st
        v3 = await engine_sha(fleet.url, "m")
        await wait_for(lambda: all_serve(fleet, "m", v3, 3), timeout_s=30,
                       what="heartbeats: v3 on both")

        async def columns_clear() -> dict[str, dict[str, Any]] | None:
            devs = await devices_at(fleet.url)
            return devs if all(devs[a.device_id]["update_state"] == "" for a in fleet.agents) \
                else None

        await wait_for(columns_clear, timeout_s=30, what="UPDATE column empty")
        for a in fleet.agents:
            d = await fleet.device(a.device_id)
            assert [(r["model"], r["state"]) for r in d["desired"]] == [("m", "up-to-date")], d
            assert await answer(a, "m") == 3.0
        res = await edgefleet_cli("--server", fleet.url, "get", "devices")
        assert res.returncode == 0, res.stderr
        header, *rows = res.stdout.strip().splitlines()
        assert header.split()[-1] == "UPDATE", header
        by_id = {r.split()[0]: r.split() for r in rows}
        assert {i: r[-1] for i, r in by_id.items()} == {"board-1": "-", "board-2": "-"}, \
            res.stdout
        assert not any(word in res.stdout for word in FAILED), res.stdout
    finally:
        await fleet.stop()


# ---- 6: the on-device accuracy probe on a board worse than the controller's check ----------
async def test_accuracy_probe_fails_on_a_degraded_canary_which_returns_to_v1(
        mosquitto: Broker, tmp_path: Path) -> None:
    v1_file, v2_file = affine(tmp_path, 1.0), affine(tmp_path, 2.0)
    probe: dict[str, Any] = {"input_shapes": {"x": [1, N_IN]},
                             "accuracy": {"metric": "max-abs-error", "budget": 1e-3}}
    counter = OfferCounter(mosquitto)
    # board-1 (the canary: first by id) rounds every output to 4 levels over its range:
    # constant answers stay exact, the probe's random inputs do not
    fleet = await start_fleet(tmp_path, mosquitto, agents=3, wrap=lambda a: degraded_agent(
        a, levels=4) if a.device_id == "board-1" else a)
    try:
        await fleet.apply(device_class_doc(), model_doc("m", version=1, path=v1_file, **probe),
                          rollout_doc("m", model="m", waves=CANARY_THEN_REST))
        await wait_for(lambda: complete(fleet.url, "m", 1, 3), timeout_s=90, what="v1 on 3/3",
                       on_timeout=fleet.logs)
        v1 = await engine_sha(fleet.url, "m")
        assert [await answer(a, "m") for a in fleet.agents] == [1.0] * 3

        # v2 with the probe required on the canary
        gated = [{"name": "canary", "count": 1, "healthGate": {"requireAccuracyProbe": True}},
                 {"name": "rest", "percent": 100}]
        await fleet.apply(model_doc("m", version=2, path=v2_file, **probe),
                          rollout_doc("m", model="m", waves=gated))

        async def gate_failed() -> dict[str, Any] | None:
            st = await fleet.rollout("m")
            gate = (st.get("waves") or [{}])[0].get("gate") or {}
            return st if st.get("version") == 2 and gate.get("verdict") == "failed" else None

        st = await wait_for(gate_failed, timeout_s=90, what="canary gate failed",
                            on_timeout=fleet.logs)
        assert st["phase"] == "Paused", st
        gate = st["waves"][0]["gate"]
        assert "accuracy probe failed on 1/1 canary" in gate["message"], gate
        assert "board-1" in gate["message"], gate
        assert "max-abs" in gate["message"] and "threshold 0.001" in gate["message"], gate
        assert gate["signals"]["probe"] == {"passed": 0, "failed": 1, "missing": 0}, gate

        # the canary serves v1's engine again, as (2, 1); the rest was never offered v2
        await wait_for(lambda: _serves_on(fleet, "board-1", v1, (2, 1)), timeout_s=60,
                       what="board-1 back on v1's engine", on_timeout=fleet.logs)
        assert await answer(fleet.agent("board-1"), "m") == 1.0
        st = await wait_for(lambda: _backed_out(fleet), timeout_s=30,
                            what="status: canary backed out")
        assert (st["targeted"], st["updated"], st["backedOut"]) == (3, 0, 1), st
        *_, v2_offer, back = counter.manifests("board-1")
        assert (v2_offer.version, v2_offer.revision, v2_offer.HasField("probe")) == (2, 0, True)
        assert (back.version, back.revision, back.engine_version, back.codec,
                back.payload_size, back.target_sha256) == (2, 1, 1, "slot", 0, v1), back
        assert (await devices_at(fleet.url))["board-1"]["update_state"] == ""
        assert {d: st["devices"][d]["state"] for d in ("board-2", "board-3")} == {
            "board-2": "pending", "board-3": "pending"}, st["devices"]
        await more_heartbeats(fleet.url, ["board-2", "board-3"])
        for d in ("board-2", "board-3"):
            assert [m.version for m in counter.manifests(d)] == [1], counter.manifests(d)
            assert await _serves_on(fleet, d, v1, (1, 0))
            assert await answer(fleet.agent(d), "m") == 1.0
        assert (await fleet.rollout("m"))["phase"] == "Paused"
    finally:
        counter.close()
        await fleet.stop()


async def _serves_on(fleet: Fleet, device_id: str, sha: str, pair: tuple[int, int]) -> bool:
    m = serves(await fleet.device(device_id), "m")
    return bool(m and m.get("sha256") == sha and m.get("active")
                and (int(m.get("version", 0)), int(m.get("revision", 0))) == pair)


async def _backed_out(fleet: Fleet) -> dict[str, Any] | None:
    st = await fleet.rollout("m")
    return st if st["devices"]["board-1"]["state"] == "backed_out" else None


# ---- 7: the controller dies during the canary soak; its successor finishes -----------------
SOAK_S = 20  # the canary's soak: the window in which the first controller is killed (wide
#             enough that a loaded CI machine still sees it before it ends)


async def test_successor_controller_decides_the_gate_and_offers_nobody_twice(
        mosquitto: Broker, tmp_path: Path) -> None:
    v1_file = affine(tmp_path, 1.0)
    data = tmp_path / "controller"
    counter = OfferCounter(mosquitto)
    first = ControllerProcess(data, mosquitto.url)
    agents: list[AgentProcess] = []
    procs = [first]
    try:
        root = first.root_public_b64()
        first.start()
        agents += start_agents(tmp_path / "agents", mosquitto, root_public_key_b64=root,
                               count=3)
        await first.wait_ready()

        def logs() -> str:
            return "\n".join([*(f"--- controller {p.api_port} ---\n{p.log_tail()}"
                                for p in procs),
                              *(f"--- {a.device_id} ---\n{a.log_tail()}" for a in agents)])

        await wait_online(first.url, agents, on_timeout=logs)
        waves = [{"name": "canary", "count": 1, "healthGate": {"soakSeconds": SOAK_S}},
                 {"name": "rest", "percent": 100}]
        await apply_ok(first.url, [device_class_doc(), model_doc("m", version=1, path=v1_file),
                                   rollout_doc("m", model="m", waves=waves)])

        async def soaking() -> dict[str, Any] | None:
            st = await rollout_status(first.url, "m")
            gate = (st.get("waves") or [{}])[0].get("gate") or {}
            return st if (st.get("devices", {}).get("board-1", {}).get("state") == "updated"
                          and gate.get("verdict") == "waiting"
                          and "observing" in gate.get("message", "")) else None

        st = await wait_for(soaking, timeout_s=90, what="canary updated, soaking",
                            on_timeout=logs)
        first.kill()
        assert st["devices"]["board-2"]["state"] == "pending", st["devices"]
        assert _gates(data) == [], "the first controller decided the gate before it died"
        assert counter.per_device() == {"board-1": 1}

        second = ControllerProcess(data, mosquitto.url)
        procs.append(second)
        second.start()
        await second.wait_ready()
        st = await wait_for(lambda: complete(second.url, "m", 1, 3), timeout_s=90,
                            what="the successor completes the rollout", on_timeout=logs)
        assert [(w["name"], w["gate"]["verdict"]) for w in st["waves"]] == [
            ("canary", "passed"), ("rest", "passed")], st["waves"]
        assert _gates(data) == [(0, "passed"), (1, "passed")]     # decided by the successor
        assert {d: r["state"] for d, r in st["devices"].items()} == {
            "board-1": "updated", "board-2": "updated", "board-3": "updated"}
        await more_heartbeats(second.url, [a.device_id for a in agents], n=2)
        assert counter.per_device() == {"board-1": 1, "board-2": 1, "board-3": 1}
        assert await asyncio.to_thread(retained_offers, mosquitto) == {}   # finished: cleared
        for a in agents:
            assert await answer(a, "m") == 1.0
    finally:
        counter.close()
        for a in agents:
            a.stop()
        for p in procs:
            p.stop()


def _gates(data: Path) -> list[tuple[int, str]]:
    """(wave, verdict) of the persisted gate decisions (WaveGate rows) in the SQLite file."""
    with contextlib.closing(sqlite3.connect(data / "edgefleet.db")) as db:
        return [(int(w), str(v)) for w, v in
                db.execute("SELECT wave, verdict FROM wavegate ORDER BY wave").fetchall()]


async def _events(url: str, reason: str) -> list[dict[str, Any]]:
    """``/api/v1/events`` rows with this reason (newest first)."""
    items = (await get_json(url, "/api/v1/events?limit=1000"))["items"]
    return [e for e in items if e["reason"] == reason]


def _brief(seen: dict[str, Any]) -> str:
    """Rollout statuses (phase, message, each device's state and reason) for a failure."""
    out = []
    for key, st in seen.items():
        if isinstance(st, dict) and "devices" in st:
            rows = {d: (r.get("state"), r.get("reason")) for d, r in st["devices"].items()}
            out.append(f"{key}: {st.get('phase')} {st.get('message')!r} failed="
                       f"{st.get('failed')} {rows}")
        else:
            out.append(f"{key}: {st!r}")
    return "\n".join(out)


async def _join(fleet: Fleet, broker: Broker, folder: Path, device_id: str) -> AgentProcess:
    """Start a real agent ``device_id`` trusting the fleet's root key; wait until it is online."""
    a = start_agent(folder, broker, device_id,
                    root_public_key_b64=fleet.ctrl.keys.root_public_b64())
    fleet.agents.append(a)
    await wait_online(fleet.url, [a], on_timeout=fleet.logs)
    return a


# ---- 8: an older and a newer rollout of one model over the same boards ---------------------
async def _supersede_scenario(fleet: Fleet, counter: OfferCounter, mosquitto: Broker,
                              m_file: Path) -> None:
    """Both rollouts complete; `old` calls the two shared boards superseded (never failed);
    every board was offered once and answers the model's marker (4.0)."""
    seen: dict[str, Any] = {}

    async def both_settled() -> tuple[dict[str, Any], dict[str, Any]] | None:
        old, new = await fleet.rollout("old"), await fleet.rollout("new")
        seen.update(old=old, new=new, offers=counter.per_device())
        done = all(st.get("phase") in ("Complete", "Paused", "Failed") for st in (old, new))
        return (old, new) if done else None

    old, new = await wait_for(both_settled, timeout_s=60, what="old and new complete",
                              on_timeout=lambda: f"{_brief(seen)}\n{fleet.logs()}")
    assert [(st["phase"], st["version"]) for st in (old, new)] == [("Complete", 1)] * 2, \
        _brief(seen)
    assert (new["targeted"], new["updated"], new["failed"]) == (2, 2, 0), new
    assert {d: r["state"] for d, r in new["devices"].items()} == {
        "board-2": "updated", "board-3": "updated"}, new["devices"]
    assert (old["targeted"], old["updated"], old["failed"], old["superseded"]) == (
        1, 1, 0, 2), old
    assert {d: r["state"] for d, r in old["devices"].items()} == {
        "board-1": "updated", "board-2": "superseded", "board-3": "superseded"}, old["devices"]
    sha = await engine_sha(fleet.url, "m")
    await wait_for(lambda: all_serve(fleet, "m", sha, 1), timeout_s=30,
                   what="heartbeats: m everywhere")
    assert [await answer(a, "m") for a in fleet.agents] == [4.0] * 3

    # a few more reconcile passes: still nobody failed, nobody offered twice
    await more_heartbeats(fleet.url, [a.device_id for a in fleet.agents])
    old, new = await fleet.rollout("old"), await fleet.rollout("new")
    assert (old["phase"], old["failed"], old["superseded"]) == ("Complete", 0, 2), old
    assert (new["phase"], new["failed"], new["updated"]) == ("Complete", 0, 2), new
    assert await _events(fleet.url, "Superseded")
    assert await _events(fleet.url, "UpdateFailed") == []
    assert counter.per_device() == {a.device_id: 1 for a in fleet.agents}, [
        (d, m.update_id, m.rollout) for d, m in counter.seen]
    assert await asyncio.to_thread(retained_offers, mosquitto) == {}
    devs = await devices_at(fleet.url)
    assert [devs[a.device_id]["update_state"] for a in fleet.agents] == [""] * 3, devs


async def test_newer_rollout_supersedes_the_older_on_shared_boards_each_offered_once(
        mosquitto: Broker, tmp_path: Path) -> None:
    m_file = affine(tmp_path, 4.0)
    counter = OfferCounter(mosquitto)
    fleet = await start_fleet(tmp_path, mosquitto, agents=3)
    try:
        # `old` selects every board; `new`, applied right after it, two of them (a pass of
        # `old` may already be offering: the next test holds one open on purpose)
        await fleet.apply(device_class_doc(), model_doc("m", version=1, path=m_file),
                          rollout_doc("old", model="m"))
        await fleet.apply(rollout_doc("new", model="m",
                                      selector={"devices": ["board-2", "board-3"]}))
        await _supersede_scenario(fleet, counter, mosquitto, m_file)
    finally:
        counter.close()
        await fleet.stop()


async def test_newer_rollout_applied_during_a_pass_of_the_older_one_offers_once(
        mosquitto: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, with the model Ready first and `new` applied while a pass of `old` is
    offering (its offer to board-1 is held until `new` has offered board-2 and board-3:
    the window a loaded machine opens by itself, made certain)."""
    from controller.reconcile import offering

    m_file = affine(tmp_path, 4.0)
    counter = OfferCounter(mosquitto)
    real_offer = offering.offer

    def new_offered() -> bool:
        return all(any(m.rollout == "default/new" for m in counter.manifests(d))
                   for d in ("board-2", "board-3"))

    holding = asyncio.Event()

    async def held_offer(ctx: Any, t: Any, dev: Any, p: Any, *, wave: int) -> Any:
        if p.rollout == "default/old" and dev.device_id == "board-1" and not holding.is_set():
            holding.set()
            with contextlib.suppress(AssertionError):
                await wait_for(lambda: asyncio.sleep(0, new_offered()), timeout_s=30,
                               what="new's offers")
        return await real_offer(ctx, t, dev, p, wave=wave)

    monkeypatch.setattr(offering, "offer", held_offer)
    fleet = await start_fleet(tmp_path, mosquitto, agents=3)
    try:
        await fleet.apply(device_class_doc(), model_doc("m", version=1, path=m_file))

        async def ready() -> bool:
            return bool((await get_json(fleet.url, "/api/v1/models/default/m"))
                        ["status"].get("engines"))

        await wait_for(ready, timeout_s=60, what="m ready", on_timeout=fleet.logs)
        await fleet.apply(rollout_doc("old", model="m"))
        await wait_for(lambda: asyncio.sleep(0, holding.is_set()), timeout_s=30,
                       what="a pass of old offering")
        await fleet.apply(rollout_doc("new", model="m",
                                      selector={"devices": ["board-2", "board-3"]}))
        await _supersede_scenario(fleet, counter, mosquitto, m_file)
    finally:
        counter.close()
        await fleet.stop()


# ---- 9: an offline straggler is stalled, the rollout completes, it catches up later --------
STRAGGLER_WAVES = [{"name": "canary", "count": 1},
                   {"name": "rest", "percent": 100, "healthGate": {"minSuccessPercent": 60}}]


async def test_offline_straggler_is_stalled_rollout_completes_it_catches_up_on_return(
        mosquitto: Broker, tmp_path: Path) -> None:
    m_file = affine(tmp_path, 6.0)
    fleet = await start_fleet(tmp_path, mosquitto, agents=4)
    try:
        away = fleet.agent("board-4")            # not the canary (board-1: first by id)
        away.stop()
        await wait_for(lambda: _offline(fleet.url, "board-4"), timeout_s=30,
                       what="board-4 offline", on_timeout=fleet.logs)
        await fleet.apply(device_class_doc(), model_doc("m", version=1, path=m_file),
                          rollout_doc("m", model="m", waves=STRAGGLER_WAVES,
                                      progressDeadlineSeconds=10))

        async def phase_complete() -> dict[str, Any] | None:
            st = await fleet.rollout("m")
            return st if st.get("phase") == "Complete" else None

        st = await wait_for(phase_complete, timeout_s=90, what="complete with a straggler",
                            on_timeout=fleet.logs)
        row = st["devices"]["board-4"]
        assert (row["state"], row["wave"], row["online"]) == ("stalled", "rest", False), row
        assert "offline" in row["reason"], row
        assert (st["targeted"], st["updated"], st["stalled"], st["failed"]) == (4, 3, 1, 0), st
        assert any("board-4" in e["message"] for e in await _events(fleet.url, "Stalled"))
        assert any(e["name"] == "board-4" for e in await _events(fleet.url, "DeviceOffline"))
        dev = (await devices_at(fleet.url))["board-4"]
        assert (dev["online"], dev["health"]) == (False, "stale"), dev
        assert serves(await fleet.device("board-4"), "m") is None
        assert [await answer(a, "m") for a in fleet.agents[:3]] == [6.0] * 3

        # back: the offer is still there for it; it installs and the rollout converges
        away.start()
        st = await wait_for(lambda: complete(fleet.url, "m", 1, 4), timeout_s=90,
                            what="the straggler updated", on_timeout=fleet.logs)
        assert (st["stalled"], st["failed"]) == (0, 0), st
        assert st["devices"]["board-4"]["state"] == "updated", st["devices"]
        sha = await engine_sha(fleet.url, "m")
        await wait_for(lambda: all_serve(fleet, "m", sha, 1), timeout_s=30,
                       what="heartbeats: m on all 4")
        assert await answer(away, "m") == 6.0

        async def fresh() -> dict[str, Any] | None:
            d = (await devices_at(fleet.url))["board-4"]
            return d if d["online"] and d["health"] != "stale" else None

        await wait_for(fresh, timeout_s=30, what="board-4 no longer stale")
    finally:
        await fleet.stop()


# ---- 10: a late board during a failed canary gate waits; a board after Complete gets it ----
async def test_late_board_waits_in_the_last_wave_then_boards_after_complete_get_it_at_once(
        mosquitto: Broker, tmp_path: Path) -> None:
    broken, good = build_nan(tmp_path / "nan.onnx", n_in=N_IN), affine(tmp_path, 2.0)
    agents = tmp_path / "agents"
    counter = OfferCounter(mosquitto)
    fleet = await start_fleet(tmp_path, mosquitto, agents=0)
    try:
        for device_id in ("b1", "c1"):
            await _join(fleet, mosquitto, agents, device_id)
        # v1's engine answers NaN: the canary (b1, first by id) refuses it, the gate fails
        await fleet.apply(device_class_doc(), model_doc("m", version=1, path=broken),
                          rollout_doc("m", model="m", waves=CANARY_THEN_REST,
                                      onFailure="pause"))

        st = await _paused_at(fleet, 1)
        canary = st["devices"]["b1"]
        assert canary["state"] in FAILED and "smoke_check_failed" in canary["reason"], canary
        assert st["devices"]["c1"]["state"] == "pending", st["devices"]

        # a late board whose id sorts before the canary: it waits in the last wave, unoffered
        late = await _join(fleet, mosquitto, agents, "a0")
        await more_heartbeats(fleet.url, ["a0"], n=4)
        st = await fleet.rollout("m")
        assert st["phase"] == "Paused", st
        assert (st["devices"]["a0"]["state"], st["devices"]["a0"]["wave"]) == (
            "pending", "rest"), st["devices"]
        assert st["devices"]["c1"]["state"] == "pending", st["devices"]
        offers = counter.per_device()
        assert (offers.get("a0", 0), offers.get("c1", 0), offers.get("b1")) == (0, 0, 1), offers
        assert serves(await fleet.device("a0"), "m") is None
        with pytest.raises(httpx.HTTPStatusError):
            await answer(late, "m")

        # a good v2: the canary passes, the rollout completes on all three
        await fleet.apply(model_doc("m", version=2, path=good))
        st = await wait_for(lambda: complete(fleet.url, "m", 2, 3), timeout_s=90,
                            what="v2 on 3/3", on_timeout=fleet.logs)
        assert st["failed"] == 0, st
        assert [await answer(a, "m") for a in fleet.agents] == [2.0] * 3

        # a board that appears after Complete gets v2 at once
        after = await _join(fleet, mosquitto, agents, "a00")
        st = await wait_for(lambda: complete(fleet.url, "m", 2, 4), timeout_s=60,
                            what="the board after Complete updated", on_timeout=fleet.logs)
        assert st["devices"]["a00"]["state"] == "updated", st["devices"]
        sha = await engine_sha(fleet.url, "m")
        await wait_for(lambda: all_serve(fleet, "m", sha, 2), timeout_s=30,
                       what="heartbeats: v2 on all 4")
        assert await answer(after, "m") == 2.0
        assert [m.version for m in counter.manifests("a00")] == [2]
        assert [m.version for m in counter.manifests("a0")] == [2]
    finally:
        counter.close()
        await fleet.stop()


