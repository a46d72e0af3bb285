"""Rollout health gates on real agents under load: how fast a bad version is stopped and
backed out, how many client requests fail meanwhile, and how many bytes the back-out moves.

A real Mosquitto, the embedded controller (in this process) and ``--agents`` real
``edgefleet-agent run`` processes (heartbeats every 0.5 s, Metrics every 1 s, one onnxruntime
thread each and no CPU throttling, as they share this machine: tests/e2e/gated_fleet.py). Every agent serves v1 (an affine model, tests.helpers.models
build_affine); a client process sends ``--rate`` KServe v2 requests per second to every agent
the whole time (tests.helpers.client_load; each answer tells which engine served it). Then,
one case after the other on the same fleet, a bad new version is applied with a canary wave
of ``--canaries`` devices and the gate ``minRequests --min-requests, maxErrorRatePercent 5,
maxLatencyRatio 2, soakSeconds 600`` (tests.helpers.bad_models):

- ``slow``: the same answers after ``--slow-work`` extra 384x384 MatMuls (~1.4 ms each on one
  thread; v1 takes 0.02 ms);
- ``erroring``: fails the requests whose first input is out of range (the clients send every
  5th request so; v1 answers them).

Measured per case, from the first canary's COMMITTED of the bad version (its DeviceRollout
row): the gate decision (WaveGate ``decided_ms``; the GateFailed Event), and every canary
serving its previous engine again (the first heartbeat that reports it, polled from the
device rows every 0.1 s; and the back-out offers' COMMITTED); client requests that failed
(target 0; the erroring case's out-of-range requests that the bad version refused by design
are counted apart); the bytes the back-out moved (target: manifests only): payload bytes of
its offers (codec, payload size, bytes sent), and on the wire, from an MQTT subscriber on the
canaries' offer, chunk and desired-state topics after the gate decision: signed offer
manifests, chunks, signed desired states. For comparison, the bytes that installed the bad
version. Writes bench/results/rollout_gates.json (``--json PATH``).

    .venv/bin/python -m bench.rollout_gates [--agents 10] [--canaries 2] [--rate 10]
        [--cases slow,erroring] [--min-requests 50] [--slow-work 24] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from sqlmodel import select

from controller.fleet.db import session_scope
from controller.fleet.models import Device
from protos import topics
from tests.e2e import gated_fleet as gf
from tests.e2e.fleet import Fleet, wait_for
from tests.helpers.bad_models import BAD_INDEX, build_affine, build_erroring, build_slow
from tests.helpers.broker import Broker, start_mosquitto
from tests.helpers.client_load import ClientLoad, Sample, failures, of

RESULTS = Path(__file__).parent / "results"
N_IN, N_OUT, SEED = 16, 4, 3
V1_MARKER = 1.0


@dataclass(frozen=True)
class Case:
    name: str
    marker: float                          # what the bad version answers to a zero input
    bad_fraction: float                    # share of out-of-range requests the clients send
    build: Callable[[Path, argparse.Namespace], Path]


CASES = {
    "slow": Case("slow", 1.5, 0.0, lambda p, a: build_slow(
        p, marker=1.5, n_in=N_IN, n_out=N_OUT, seed=SEED, work=a.slow_work)),
    "erroring": Case("erroring", 2.0, 0.2, lambda p, a: build_erroring(
        p, marker=2.0, n_in=N_IN, n_out=N_OUT, seed=SEED)),
}


class Tap:
    """An MQTT subscriber on every device's offer, chunk and desired-state topics."""

    def __init__(self, broker: Broker) -> None:
        self.messages: list[tuple[int, str, str, int]] = []   # (t_ms, device, kind, bytes)
        self._lock = threading.Lock()
        self._c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-tap")
        self._c.on_message = self._on_message
        self._c.connect(broker.host, broker.port)
        for leaf in (topics.OFFER, topics.OFFERS, topics.CHUNK, topics.DESIRED):
            self._c.subscribe(topics.device_subscription(leaf), qos=1)
        self._c.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        parsed = topics.parse_device_topic(msg.topic)
        if parsed is None:
            return
        leaf = parsed.leaf
        kind = "offer" if leaf.startswith(topics.OFFER) else (
            "chunk" if leaf == topics.CHUNK else "desired")
        with self._lock:
            self.messages.append((int(time.time() * 1000), parsed.device_id, kind,
                                  len(msg.payload)))

    def between(self, devices: set[str], since_ms: int, until_ms: int) -> dict[str, Any]:
        with self._lock:
            sel = [m for m in self.messages if m[1] in devices and since_ms <= m[0] <= until_ms]
        out: dict[str, Any] = {}
        for kind in ("offer", "chunk", "desired"):
            ms = [m for m in sel if m[2] == kind]
            out[kind] = {"messages": len(ms), "bytes": sum(m[3] for m in ms),
                         "non_empty": sum(1 for m in ms if m[3])}
        return out

    def close(self) -> None:
        self._c.loop_stop()
        self._c.disconnect()


class Observer:
    """Polls the device rows every 0.1 s: the first heartbeat each device reported each
    (engine sha256, version, revision) in."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.seen: dict[str, list[tuple[int, str, int, int]]] = {}
        self._task: asyncio.Task[None] | None = None

    def _poll(self) -> None:
        with session_scope(self.fleet.ctrl.core.db) as s:
            rows = s.exec(select(Device)).all()
            for d in rows:
                m = next((x for x in d.models or [] if x.get("name") == gf.MODEL
                          and not x.get("variant")), None)
                if m is None or not d.last_heartbeat_ms:
                    continue
                key = (str(m.get("sha256")), int(m.get("version") or 0),
                       int(m.get("revision") or 0))
                hist = self.seen.setdefault(d.device_id, [])
                if not hist or hist[-1][1:] != key:
                    hist.append((int(d.last_heartbeat_ms), *key))

    async def _run(self) -> None:
        while True:
            await asyncio.to_thread(self._poll)
            await asyncio.sleep(0.1)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def back_on(self, device_id: str, sha256: str, *, since_ms: int) -> int | None:
        """The first heartbeat at or after ``since_ms`` that reports ``sha256``; a device
        that never left it (reports it since before) gives the heartbeat that first did."""
        hist = self.seen.get(device_id, [])
        got = next((t for t, sha, _v, _r in hist if sha == sha256 and t >= since_ms), None)
        if got is None and hist and hist[-1][1] == sha256:
            return hist[-1][0]
        return got


def _s(a: int | None, b: int | None) -> float | None:
    return None if a is None or b is None else round((b - a) / 1000, 2)


async def run_case(fleet: Fleet, case: Case, *, version: int, v1_sha: dict[str, str],
                   canaries: list[str], args: argparse.Namespace, tap: Tap, obs: Observer,
                   work: Path) -> dict[str, Any]:
    """Apply the bad version ``version`` under load; wait for the gate and the back-out."""
    bad = case.build(work / f"v{version}-{case.name}.onnx", args)
    gate = {"minRequests": args.min_requests, "maxErrorRatePercent": 5, "maxLatencyRatio": 2,
            "soakSeconds": 600}
    load = ClientLoad([(a.device_id, a.serve_url) for a in fleet.agents], model=gf.MODEL,
                      n_in=N_IN, rate_per_s=args.rate, bad_fraction=case.bad_fraction,
                      bad_value=BAD_INDEX).start()
    try:
        await asyncio.sleep(args.baseline_s)                 # previous engine's windows
        t_apply = gf.now_ms()
        await gf.apply_model(fleet, model=bad, version=version,
                             waves=gf.gated_waves(gate, canary=len(canaries)))

        async def gate_failed() -> Any:
            g = [x for x in gf.gate_rows(fleet) if x.verdict == "failed"
                 and x.decided_ms >= t_apply]
            return g[0] if g else None

        g = await wait_for(gate_failed, timeout_s=args.timeout_s,
                           what=f"{case.name}: the canary gate failing",
                           on_timeout=lambda: str(gf.rollout_status(fleet)))

        async def all_back() -> bool:
            return all(obs.back_on(c, v1_sha[c], since_ms=g.decided_ms) for c in canaries)

        await wait_for(all_back, timeout_s=args.timeout_s,
                       what=f"{case.name}: every canary on its previous engine",
                       on_timeout=lambda: str(gf.rollout_status(fleet)))
        await asyncio.sleep(args.after_s)
    finally:
        samples: list[Sample] = await asyncio.to_thread(load.stop)
    t_end = gf.now_ms()
    rows = [r for r in gf.offer_rows(fleet) if r.version == version]
    bad_rows = [r for r in rows if r.revision == 0 and r.target_sha256 != v1_sha.get(
        r.device_id)]
    back_rows = [r for r in rows if r.target_sha256 == v1_sha.get(r.device_id)]
    commits = {r.device_id: r.updated_ms for r in bad_rows if r.state.value == "committed"}
    t0 = min(commits.values()) if commits else None
    back_hb = {c: obs.back_on(c, v1_sha[c], since_ms=g.decided_ms) for c in canaries}
    back_commit = {r.device_id: r.updated_ms for r in back_rows
                   if r.state.value == "committed"}
    ev = [e for e in await gf.events(fleet, "GateFailed", since_ms=t_apply)]
    st = gf.rollout_status(fleet)
    per: dict[str, Any] = {}
    for c in canaries:
        mine = of(samples, c)
        on_bad = [s for s in mine if s.marker == case.marker
                  or (s.bad_input and s.status == 500)]
        last_bad = max((s.t_ms for s in on_bad), default=None)
        per[c] = {"committed_bad_ms": commits.get(c), "back_heartbeat_ms": back_hb[c],
                  "back_committed_ms": back_commit.get(c),
                  "first_bad_answer_ms": min((s.t_ms for s in on_bad), default=None),
                  "last_bad_answer_ms": last_bad,
                  "first_previous_answer_ms": min((s.t_ms for s in mine if last_bad and
                                                   s.t_ms > last_bad and s.marker == V1_MARKER),
                                                  default=None),
                  "requests_on_bad_version": len(on_bad)}
    first_bad = min((p["first_bad_answer_ms"] for p in per.values()
                     if p["first_bad_answer_ms"]), default=None)
    prev_again = max((p["first_previous_answer_ms"] or 0 for p in per.values()), default=None)
    since = t_apply                                  # before any canary had the bad version
    until = max([t for t in back_hb.values() if t] or [t_end]) + int(args.after_s * 1000)
    others = [a.device_id for a in fleet.agents if a.device_id not in canaries]
    wire = tap.between(set(canaries), g.decided_ms, until)
    refused = [s for s in samples if s.bad_input and s.status == 500]
    sig = dict(g.signals)
    return {
        "case": case.name, "version": version, "gate_message": g.message,
        "gate_event": ev[0]["message"] if ev else None, "phase": st.get("phase"),
        "gate_signals": {k: sig.get(k) for k in (
            "requests", "errors", "errorRatePercent", "p99Ms", "baselineP99Ms",
            "latencyRatio", "observedSeconds")},
        "first_canary_committed_ms": t0, "gate_decided_ms": g.decided_ms,
        "gate_event_ms": ev[0]["at_ms"] if ev else None,
        "gate_after_commit_s": _s(t0, g.decided_ms),
        "first_bad_answer_ms": first_bad,
        "gate_after_first_bad_answer_s": _s(first_bad, g.decided_ms),
        "clients_on_previous_after_gate_s": _s(g.decided_ms, prev_again or None),
        "all_back_heartbeat_after_commit_s": _s(t0, max(back_hb.values())),
        "all_back_heartbeat_after_gate_s": _s(g.decided_ms, max(back_hb.values())),
        "all_back_committed_after_gate_s": _s(g.decided_ms, max(back_commit.values(),
                                                                default=None)),
        "canaries": per,
        "requests": len(samples), "requests_in_window": sum(since <= s.t_ms <= until
                                                            for s in samples),
        "failed_in_window": len(failures(samples, since_ms=since, until_ms=until)),
        "failed_total": len(failures(samples)),
        "refused_by_bad_version": len(refused),
        "other_devices_offered_bad_version": sorted({r.device_id for r in rows
                                                     if r.device_id in others}),
        "rollback_offers": [{"device": r.device_id, "codec": r.codec,
                             "payload_size": r.payload_size, "bytes_sent": r.bytes_sent,
                             "state": r.state.value} for r in back_rows],
        "rollback_payload_bytes": sum(r.bytes_sent for r in back_rows),
        "rollback_wire": wire,
        "bad_version_install": [{"device": r.device_id, "codec": r.codec,
                                 "payload_size": r.payload_size, "bytes_sent": r.bytes_sent}
                                for r in bad_rows],
    }


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    broker = start_mosquitto(work / "broker")
    t_start = time.monotonic()
    fleet: Fleet | None = None
    tap: Tap | None = None
    try:
        fleet = await gf.start_gated_fleet(work, broker, agents=args.agents,
                                           heartbeat_interval_s=args.heartbeat_s,
                                           metrics_interval_s=args.metrics_s,
                                           intra_op_threads=args.intra_op_threads,
                                           online_timeout_s=args.timeout_s)
        started_s = time.monotonic() - t_start
        tap = Tap(broker)
        obs = Observer(fleet)
        obs.start()
        v1 = build_affine(work / "v1.onnx", marker=V1_MARKER, n_in=N_IN, n_out=N_OUT,
                          seed=SEED)
        await gf.apply_model(fleet, model=v1, version=1,
                             waves=gf.open_waves(canary=args.canaries))
        v1_sha = await gf.wait_serving(fleet, version=1, timeout_s=args.timeout_s)
        canaries = sorted(v1_sha)[:args.canaries]
        print(f"{args.agents} agents online in {started_s:.1f} s, v1 everywhere; canaries "
              f"{', '.join(canaries)}", flush=True)
        cases = []
        for i, name in enumerate(args.cases.split(",")):
            res = await run_case(fleet, CASES[name], version=2 + i, v1_sha=v1_sha,
                                 canaries=canaries, args=args, tap=tap, obs=obs, work=work)
            print(f"case {name}: gate {res['gate_after_commit_s']} s after the first canary "
                  f"commit, all back {res['all_back_heartbeat_after_commit_s']} s; "
                  f"failed {res['failed_in_window']}; {res['gate_message']}", flush=True)
            cases.append(res)
        await obs.stop()
        return {"benchmark": "rollout_gates", "machine": platform.machine(),
                "cpus": os.cpu_count(), "agents": args.agents, "canaries": args.canaries,
                "rate_per_agent": args.rate, "min_requests": args.min_requests,
                "slow_work": args.slow_work, "heartbeat_s": args.heartbeat_s,
                "metrics_s": args.metrics_s, "intra_op_threads": args.intra_op_threads,
                "fleet_start_s": round(started_s, 1),
                "wall_s": round(time.monotonic() - t_start, 1), "cases": cases,
                "targets": {"failed_in_window": 0, "rollback_payload_bytes": 0}}
    finally:
        if tap is not None:
            tap.close()
        if fleet is not None:
            await fleet.stop()
        broker.stop()


def table(result: dict[str, Any]) -> str:
    cases = result["cases"]

    def row(label: str, fn: Callable[[dict[str, Any]], Any]) -> str:
        return f"| {label} | " + " | ".join(str(fn(c)) for c in cases) + " |"

    def wire(c: dict[str, Any], kind: str) -> str:
        w = c["rollback_wire"][kind]
        return f"{w['non_empty']} msg, {w['bytes']} B"

    lines = ["| | " + " | ".join(c["case"] for c in cases) + " |",
             "|---|" + "---|" * len(cases),
             row("gate signal", lambda c: c["gate_message"].split(" on ")[0]),
             row("gate decision after the first canary commit (s)",
                 lambda c: c["gate_after_commit_s"]),
             row("gate decision after the first answer by the bad version (clients, s)",
                 lambda c: c["gate_after_first_bad_answer_s"]),
             row("all canaries back on the previous engine (heartbeat) after the commit (s)",
                 lambda c: c["all_back_heartbeat_after_commit_s"]),
             row("... after the gate decision (s): clients answered by it / back-out "
                 "COMMITTED ingested / heartbeat",
                 lambda c: f"{c['clients_on_previous_after_gate_s']} / "
                           f"{c['all_back_committed_after_gate_s']} / "
                           f"{c['all_back_heartbeat_after_gate_s']}"),
             row("canary requests served by the bad version",
                 lambda c: sum(p["requests_on_bad_version"] for p in c["canaries"].values())),
             row("failed client requests in the window / all (target 0)",
                 lambda c: f"{c['failed_in_window']} of {c['requests_in_window']} / "
                           f"{c['failed_total']} of {c['requests']}"),
             row("out-of-range requests the bad version refused (by design)",
                 lambda c: c["refused_by_bad_version"]),
             row("rollback offers: codec, payload bytes sent (target 0)",
                 lambda c: ", ".join(sorted({o["codec"] for o in c["rollback_offers"]}))
                 + f"; {c['rollback_payload_bytes']} B"),
             row("rollback on the wire: signed offer manifests", lambda c: wire(c, "offer")),
             row("rollback on the wire: signed desired states", lambda c: wire(c, "desired")),
             row("rollback on the wire: chunks", lambda c: wire(c, "chunk")),
             row("bad version install: codec, bytes sent per canary",
                 lambda c: ", ".join(sorted({f"{o['codec']} {o['bytes_sent']} B"
                                             for o in c["bad_version_install"]}))),
             row("later-wave devices offered the bad version",
                 lambda c: len(c["other_devices_offered_bad_version"]))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=10)
    ap.add_argument("--canaries", type=int, default=2, help="devices in the canary wave")
    ap.add_argument("--rate", type=float, default=10.0, help="requests/s sent to each agent")
    ap.add_argument("--cases", default="slow,erroring", help=f"from {','.join(CASES)}")
    ap.add_argument("--min-requests", type=int, default=50, help="healthGate minRequests")
    ap.add_argument("--slow-work", type=int, default=24,
                    help="extra 384x384 MatMuls per request of the slow version")
    ap.add_argument("--baseline-s", type=float, default=5.0,
                    help="load before each bad version is applied (the latency baseline)")
    ap.add_argument("--after-s", type=float, default=3.0,
                    help="load kept after the last canary is back")
    ap.add_argument("--timeout-s", type=float, default=180.0, help="limit of each wait")
    ap.add_argument("--heartbeat-s", type=float, default=0.5, help="agents' heartbeat interval")
    ap.add_argument("--metrics-s", type=float, default=1.0, help="agents' metrics interval")
    ap.add_argument("--intra-op-threads", type=int, default=1,
                    help="onnxruntime threads per agent (the agents share this machine)")
    ap.add_argument("--json", type=Path, default=RESULTS / "rollout_gates.json")
    args = ap.parse_args(argv)
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown or not 1 <= args.canaries < args.agents:
        ap.error(f"unknown cases {unknown}" if unknown else "need 1 <= canaries < agents")
    work = Path(tempfile.mkdtemp(prefix="bench-rollout-gates-"))
    result = asyncio.run(run(args, work))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['agents']} agents, {result['canaries']} canaries, {result['rate_per_agent']}"
          f" req/s per agent, fleet started in {result['fleet_start_s']} s, "
          f"{result['wall_s']} s in all; JSON: {args.json}\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
