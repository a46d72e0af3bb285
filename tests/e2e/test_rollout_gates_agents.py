"""End to end: a bad v2 fails its canary's health gate on real agents under client load.

Real Mosquitto, the embedded controller, real ``edgefleet-agent run`` processes with fast
heartbeats and Metrics (tests/e2e/gated_fleet.py), and a client process sending KServe v2
requests to every agent the whole time (tests.helpers.client_load). Every device serves v1
(an affine model answering its ``marker`` to a zero input); then v2 is applied with a gated
canary wave:

- a v2 that computes ~30 ms more per request (tests.helpers.bad_models.build_slow) fails
  ``maxLatencyRatio: 2``: the rollout pauses (Degraded / GateFailed, an Event naming the
  p99s), the canary returns to the v1 engine by a codec ``slot`` offer (no payload bytes)
  and answers like v1 again, the rest wave is never offered v2, and no client request fails
  on any agent, the rollback swap included;
- a v2 that fails on some inputs (build_erroring; the clients send every 5th request with
  an out-of-range index) fails ``maxErrorRatePercent: 5`` with "error rate" in the message,
  and the canary serves v1 again (the inputs v2 failed on succeed again).

The numbers of each run (gate decision, back-out, client samples) are printed (``-s``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.demo_agents import infer
from tests.e2e import gated_fleet as gf
from tests.e2e.fleet import Fleet, wait_for
from tests.helpers.bad_models import BAD_INDEX, build_affine, build_erroring, build_slow
from tests.helpers.broker import Broker
from tests.helpers.client_load import ClientLoad, Sample, failures, of

pytestmark = pytest.mark.timeout(240)

N_IN, N_OUT, SEED = 16, 4, 3
V1_MARKER = 1.0
CANARY = "board-01"


def _zero_answer(url: str) -> np.ndarray:
    return infer(url, gf.MODEL, np.zeros((1, N_IN), np.float32), input_name="x")["y"]


async def _baseline(fleet: Fleet, device_id: str) -> dict[str, Any] | None:
    """v1 windows with requests on ``device_id`` (the latency baseline of the gate)."""
    items = (await fleet.get(f"/api/v1/devices/{device_id}/metrics/windows?model={gf.MODEL}"
                             "&version=1"))["items"]
    busy = [w for w in items if w["requests"] > 0]
    return {"windows": len(busy), "requests": sum(w["requests"] for w in busy)} \
        if len(busy) >= 3 and sum(w["requests"] for w in busy) >= 30 else None


async def _gate_failed(fleet: Fleet) -> dict[str, Any] | None:
    st = gf.rollout_status(fleet)
    if st.get("phase") != "Paused" or int(st.get("version") or 0) != 2:
        return None
    degraded = next((c for c in st.get("conditions") or [] if c["type"] == "Degraded"), {})
    return st if degraded.get("status") == "True" and degraded.get("reason") == "GateFailed" \
        else None


async def _backed_out(fleet: Fleet, v1_sha: str) -> dict[str, Any] | None:
    """The canary's heartbeat reports the v1 engine again and the status says backed_out."""
    m = gf.served_engine(await gf.device(fleet, CANARY))
    st = gf.rollout_status(fleet)
    dev = (st.get("devices") or {}).get(CANARY) or {}
    return {"served": m, "status": dev, "rollout": st} if m.get("sha256") == v1_sha and \
        dev.get("state") == "backed_out" else None


async def _run_bad_canary(fleet: Fleet, *, v1: Path, v2: Path, gate: dict[str, Any],
                          rate_per_s: float, bad_fraction: float
                          ) -> tuple[dict[str, Any], dict[str, Any], list[Sample],
                                     dict[str, str]]:
    """v1 everywhere, load, apply the bad v2, wait for the gate failure and the back-out.
    Returns (status at the failure, back-out view, client samples, v1 sha per device)."""
    await gf.apply_model(fleet, model=v1, version=1, waves=gf.open_waves())
    v1_sha = await gf.wait_serving(fleet, version=1)
    assert len(set(v1_sha.values())) == 1
    load = ClientLoad([(a.device_id, a.serve_url) for a in fleet.agents], model=gf.MODEL,
                      n_in=N_IN, rate_per_s=rate_per_s, bad_fraction=bad_fraction,
                      bad_value=BAD_INDEX).start()
    try:
        await wait_for(lambda: _baseline(fleet, CANARY), timeout_s=60,
                       what="v1 metric windows with requests on the canary",
                       on_timeout=fleet.logs)
        await gf.apply_model(fleet, model=v2, version=2, waves=gf.gated_waves(gate))
        failed = await wait_for(lambda: _gate_failed(fleet), timeout_s=120,
                                what="the canary gate failed (Paused, GateFailed)",
                                on_timeout=lambda: f"{gf.rollout_status(fleet)}\n"
                                                   f"{fleet.logs()}")
        back = await wait_for(lambda: _backed_out(fleet, v1_sha[CANARY]), timeout_s=60,
                              what="the canary serving the v1 engine again",
                              on_timeout=lambda: f"{gf.rollout_status(fleet)}\n"
                                                 f"{fleet.logs()}")
        await asyncio.sleep(3.0)            # client samples after the swap
    finally:
        samples = await asyncio.to_thread(load.stop)
    return failed, back, samples, v1_sha


async def _no_v2_beyond_the_canary(fleet: Fleet, v1_sha: dict[str, str],
                                   samples: list[Sample]) -> None:
    """Later waves are never offered: no v2 offer row, v1 served, v1 answers, pending."""
    st = gf.rollout_status(fleet)
    for a in fleet.agents[1:]:
        rows = gf.offer_rows(fleet, a.device_id)
        assert rows and {r.version for r in rows} == {1}, [(r.version, r.codec) for r in rows]
        dev = await gf.device(fleet, a.device_id)
        m = gf.served_engine(dev)
        assert (m["sha256"], int(m["version"])) == (v1_sha[a.device_id], 1)
        assert {int(u.get("version") or 0) for u in dev.get("updates") or []} <= {1}, \
            dev.get("updates")
        assert st["devices"][a.device_id]["state"] == "pending"
        answered = [s for s in of(samples, a.device_id) if s.ok]
        assert answered and {s.version for s in answered} == {1}
        assert {s.marker for s in answered if not s.bad_input} == {V1_MARKER}
    assert "gate" not in st["waves"][1]          # the rest wave was never judged


def _backout_row(fleet: Fleet, v1_sha: str) -> Any:
    rows = [r for r in gf.offer_rows(fleet, CANARY) if r.version == 2]
    assert [r.target_sha256 for r in rows][-1] == v1_sha, rows
    return rows[-1]


def _timeline(fleet: Fleet, samples: list[Sample], *, v2_marker: float, v1_sha: str
              ) -> dict[str, Any]:
    """When v2 served, the gate decided and v1 came back, as the clients and the controller
    saw it; and the canary's failed requests around the swap back."""
    canary = of(samples, CANARY)
    v2_commit = next(r for r in gf.offer_rows(fleet, CANARY) if r.version == 2
                     and r.revision == 0)
    back = _backout_row(fleet, v1_sha)
    [gate] = [g for g in gf.gate_rows(fleet) if g.verdict == "failed"]
    on_v2 = [s for s in canary if s.marker == v2_marker or (s.bad_input and s.status == 500)]
    last_v2 = max(s.t_ms for s in on_v2)
    first_v1_after = min(s.t_ms for s in canary if s.t_ms > last_v2 and s.marker == V1_MARKER)
    swap_from, swap_to = gate.decided_ms - 2000, first_v1_after + 2000
    return {
        "v2_committed_ms": v2_commit.updated_ms, "gate_decided_ms": gate.decided_ms,
        "backout_committed_ms": back.updated_ms,
        "gate_after_v2_s": round((gate.decided_ms - v2_commit.updated_ms) / 1000, 2),
        "back_after_gate_s": round((back.updated_ms - gate.decided_ms) / 1000, 2),
        "canary_requests_on_v2": len(on_v2),
        "swap_window_requests": sum(swap_from <= s.t_ms <= swap_to for s in canary),
        "swap_window_failed": len(failures(canary, since_ms=swap_from, until_ms=swap_to)),
        "canary_requests": len(canary), "requests": len(samples),
        "failed_good_requests": len(failures(samples)),
        "backout": {"codec": back.codec, "payload_size": back.payload_size,
                    "bytes_sent": back.bytes_sent, "state": back.state.value},
        "last_v2_answer_ms": last_v2, "first_v1_answer_ms": first_v1_after,
    }


async def test_slow_canary_fails_latency_gate_and_slots_back_to_v1(mosquitto: Broker,
                                                                   tmp_path: Path) -> None:
    models = tmp_path / "models"
    v1 = build_affine(models / "v1.onnx", marker=V1_MARKER, n_in=N_IN, n_out=N_OUT, seed=SEED)
    v2 = build_slow(models / "v2-slow.onnx", marker=1.5, n_in=N_IN, n_out=N_OUT, seed=SEED,
                    work=24)
    gate = {"minRequests": 50, "maxLatencyRatio": 2, "soakSeconds": 600}
    fleet = await gf.start_gated_fleet(tmp_path, mosquitto, agents=3)
    try:
        failed, back, samples, v1_sha = await _run_bad_canary(
            fleet, v1=v1, v2=v2, gate=gate, rate_per_s=10, bad_fraction=0.0)

        # the gate: latency against the v1 baseline on the same device
        wave = failed["waves"][0]
        assert wave["gate"]["verdict"] == "failed", wave
        sig = wave["gate"]["signals"]
        assert sig["requests"] >= 50 and sig["latencyRatio"] > 2, sig
        assert sig["baselineP99Ms"] > 0 and sig["p99Ms"] > 2 * sig["baselineP99Ms"], sig
        assert "p99" in failed["message"] and "baseline" in failed["message"], failed["message"]
        [ev] = await gf.events(fleet, "GateFailed")
        assert "p99" in ev["message"] and "baseline" in ev["message"], ev
        assert "1/1 canary device(s)" in ev["message"], ev
        assert await gf.events(fleet, "RolledBack")

        # the canary is back on the v1 engine: heartbeat, slot offer without bytes, answers
        m = back["served"]
        assert (int(m["version"]), int(m.get("revision") or 0),
                int(m.get("engine_version") or 0)) == (2, 1, 1), m
        dev = back["status"]
        assert dev["codec"] == "slot" and dev["payloadSize"] == 0 and dev["bytesSent"] == 0, dev
        row = _backout_row(fleet, v1_sha[CANARY])
        assert (row.codec, row.payload_size, row.bytes_sent) == ("slot", 0, 0)
        assert row.state.value == "committed"
        canary_url = fleet.agents[0].serve_url
        np.testing.assert_array_equal(await asyncio.to_thread(_zero_answer, canary_url),
                                      np.full((1, N_OUT), V1_MARKER, np.float32))

        # later waves never offered; no client request failed anywhere, the swap included
        await _no_v2_beyond_the_canary(fleet, v1_sha, samples)
        t = _timeline(fleet, samples, v2_marker=1.5, v1_sha=v1_sha[CANARY])
        print(f"\nslow v2 under load: {t}")
        assert t["canary_requests_on_v2"] > 0 and t["swap_window_requests"] > 0, t
        assert t["swap_window_failed"] == 0 and t["failed_good_requests"] == 0, (
            t, failures(samples)[:5])
        assert of(samples, CANARY)[-1].marker == V1_MARKER
    finally:
        await fleet.stop()


async def test_erroring_canary_fails_error_rate_gate_and_returns_to_v1(mosquitto: Broker,
                                                                       tmp_path: Path) -> None:
    models = tmp_path / "models"
    v1 = build_affine(models / "v1.onnx", marker=V1_MARKER, n_in=N_IN, n_out=N_OUT, seed=SEED)
    v2 = build_erroring(models / "v2-err.onnx", marker=2.0, n_in=N_IN, n_out=N_OUT,
                        seed=SEED)
    gate = {"minRequests": 40, "maxErrorRatePercent": 5, "soakSeconds": 600}
    fleet = await gf.start_gated_fleet(tmp_path, mosquitto, agents=2)
    try:
        failed, back, samples, v1_sha = await _run_bad_canary(
            fleet, v1=v1, v2=v2, gate=gate, rate_per_s=20, bad_fraction=0.2)

        sig = failed["waves"][0]["gate"]["signals"]
        assert "error rate" in failed["message"], failed["message"]
        assert sig["errors"] > 0 and sig["errorRatePercent"] > 5, sig
        [ev] = await gf.events(fleet, "GateFailed")
        assert "error rate" in ev["message"] and "> 5%" in ev["message"], ev

        # v2 answered the out-of-range inputs with errors; v1 answers them again
        canary = of(samples, CANARY)
        refused = [s for s in canary if s.bad_input and s.status == 500]
        assert refused and all("inference failed" in s.error for s in refused), refused[:3]
        after = [s for s in canary if s.t_ms > max(x.t_ms for x in refused)]
        assert any(s.bad_input and s.ok for s in after), after[-5:]
        assert back["served"]["sha256"] == v1_sha[CANARY]
        assert back["status"]["codec"] == "slot" and back["status"]["payloadSize"] == 0
        np.testing.assert_array_equal(
            await asyncio.to_thread(_zero_answer, fleet.agents[0].serve_url),
            np.full((1, N_OUT), V1_MARKER, np.float32))

        await _no_v2_beyond_the_canary(fleet, v1_sha, samples)
        t = _timeline(fleet, samples, v2_marker=2.0, v1_sha=v1_sha[CANARY])
        print(f"\nerroring v2 under load: {t}, v2 refused {len(refused)} bad inputs")
        assert t["failed_good_requests"] == 0, (t, failures(samples)[:5])
    finally:
        await fleet.stop()
