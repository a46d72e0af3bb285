"""Idle footprint of the agent's serving side: RSS and CPU of a process that starts the
registry and the inference server, with no model and with the digits model loaded (and,
with ``--agent-config``, of the full ``edgefleet-agent run --config FILE``). ``--full-agent``
also measures the real ``edgefleet-agent run --config`` process against a local Mosquitto
(needs ``mosquitto``): idle with no model, then after the digits model arrived by a signed
OTA update (the test OTA driver plays the controller), with the default allocator settings
and with ``MALLOC_ARENA_MAX=2`` (as the systemd unit sets it). For the OTA case it also
times the first inference request after the update committed against the next ones (the
agent imports numpy/onnxruntime while activating the first engine, not in a request).

Each case runs in a fresh child process; after it is ready and has settled, RSS (and USS
where readable) is read and CPU time is measured over ``--idle-s`` seconds of idleness.
Target: < 60 MB idle RSS. Writes bench/results/agent_footprint.json.

    .venv/bin/python -m bench.agent_footprint [--idle-s 5] [--agent-config FILE] [--full-agent]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import sys, time
from pathlib import Path
from agent.runtime.registry import ModelRegistry
from agent.serve import start_server
reg = ModelRegistry()
model = sys.argv[1]
if model:
    import hashlib
    from protos.edgefleet.v1.common_pb2 import EngineFingerprint
    p = Path(model)
    reg.activate(name="digits", version=1, path=p,
                 sha256=hashlib.sha256(p.read_bytes()).hexdigest(),
                 fingerprint=EngineFingerprint(engine_kind="onnxruntime-cpu", precision="fp32"),
                 signature=None)
handle = start_server(reg)
print("ready", handle.port, flush=True)
while True:
    time.sleep(3600)
"""


def _sample(pid: int, *, idle_s: float) -> dict:
    ps = psutil.Process(pid)
    family = [ps, *ps.children(recursive=True)]
    cpu0 = sum(p.cpu_times().user + p.cpu_times().system for p in family)
    time.sleep(idle_s)
    cpu1 = sum(p.cpu_times().user + p.cpu_times().system for p in family)
    mem = ps.memory_full_info() if hasattr(ps, "memory_full_info") else ps.memory_info()
    return {"rss_mb": round(mem.rss / 2**20, 1),
            "uss_mb": round(getattr(mem, "uss", 0) / 2**20, 1) or None,
            "threads": ps.num_threads(),
            "idle_cpu_percent": round((cpu1 - cpu0) / idle_s * 100, 2)}


def _request_times(serve_url: str, *, count: int = 21) -> dict:
    """Wall time of ``count`` digits inference requests in a row (JSON, a new connection
    each, as a first client would): the first one, and the median of the others."""
    from controller.models.digits import INPUT_NAME

    where = urlsplit(serve_url)
    body = json.dumps({"inputs": [{"name": INPUT_NAME, "shape": [1, 1, 8, 8],
                                   "datatype": "FP32", "data": [0.0] * 64}]}).encode()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        conn = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port, timeout=30)
        conn.request("POST", "/v2/models/digits/infer", body=body)
        resp = conn.getresponse()
        resp.read()
        conn.close()
        if resp.status != 200:
            raise RuntimeError(f"inference answered {resp.status}")
        times.append((time.perf_counter() - started) * 1000)
    return {"first_request_ms": round(times[0], 2),
            "next_requests_p50_ms": round(statistics.median(times[1:]), 2)}


def _full_agent(digits: Path, *, idle_s: float, settle_s: float, env_extra: dict[str, str]
                ) -> dict[str, dict]:
    """The real agent process: idle without a model, then with digits delivered by OTA."""
    from protos.edgefleet.v1 import common_pb2 as C
    from tests.helpers.broker import start_mosquitto
    from tests.helpers.ota import OtaDriver, agent_config, write_config

    tmp = Path(tempfile.mkdtemp(prefix="bench-footprint-"))
    broker = start_mosquitto(tmp / "broker")
    driver = OtaDriver(broker.host, broker.port, device_id="footprint-0", device_class="cpu-x86")
    exe = Path(sys.executable).parent / "edgefleet-agent"
    proc = None
    try:
        driver.publish_keys()
        cfg = agent_config(tmp, host=broker.host, port=broker.port, driver=driver,
                           heartbeat_interval_s=10.0, metrics_interval_s=15.0,
                           log_level="WARNING")
        config = write_config(tmp / "agent.yaml", cfg)
        proc = subprocess.Popen([str(exe), "run", "--config", str(config)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, **env_extra, "PYTHONPATH": str(ROOT)})
        driver.last_heartbeat(timeout_s=60)  # connected and reporting
        time.sleep(settle_s)
        rows = {"no model": _sample(proc.pid, idle_s=idle_s)}
        offer = driver.offer("digits", 1, digits.read_bytes())
        driver.wait_status(offer.update_id, C.UPDATE_STATE_COMMITTED, timeout_s=120)
        latency = _request_times(driver.last_heartbeat().serve_url)
        time.sleep(settle_s)
        rows["digits model (OTA)"] = {**_sample(proc.pid, idle_s=idle_s), **latency}
        return rows
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        driver.close()
        broker.stop()


def _measure(cmd: list[str], *, idle_s: float, settle_s: float, ready_line: bool) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        if ready_line:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("ready"):
                raise RuntimeError(f"child did not start: {line!r}")
        time.sleep(settle_s)
        return _sample(proc.pid, idle_s=idle_s)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--idle-s", type=float, default=5.0)
    ap.add_argument("--settle-s", type=float, default=1.0)
    ap.add_argument("--agent-config", type=Path, default=None)
    ap.add_argument("--full-agent", action="store_true",
                    help="also the real agent process, model delivered by OTA (mosquitto)")
    args = ap.parse_args(argv)
    from controller.models.digits import build_digits_cnn

    digits = build_digits_cnn(Path(tempfile.mkdtemp()) / "digits.onnx", seed=0, variant="v1")
    rows: dict[str, dict] = {}
    rows["server + registry, no model"] = _measure(
        [sys.executable, "-c", CHILD, ""], idle_s=args.idle_s, settle_s=args.settle_s,
        ready_line=True)
    rows["server + registry, digits model"] = _measure(
        [sys.executable, "-c", CHILD, str(digits)], idle_s=args.idle_s, settle_s=args.settle_s,
        ready_line=True)
    rows["bare python + onnxruntime import"] = _measure(
        [sys.executable, "-c", "import onnxruntime, time; print('ready', flush=True); "
                               "time.sleep(3600)"],
        idle_s=args.idle_s, settle_s=args.settle_s, ready_line=True)
    if args.agent_config is not None:
        exe = Path(sys.executable).parent / "edgefleet-agent"
        rows["edgefleet-agent run"] = _measure(
            [str(exe), "run", "--config", str(args.agent_config)], idle_s=args.idle_s,
            settle_s=max(args.settle_s, 5.0), ready_line=False)
    if args.full_agent:
        for label, extra in (("", {}), (", MALLOC_ARENA_MAX=2", {"MALLOC_ARENA_MAX": "2"})):
            full = _full_agent(digits, idle_s=args.idle_s, settle_s=max(args.settle_s, 2.0),
                               env_extra=extra)
            for name, row in full.items():
                rows[f"edgefleet-agent run, {name}{label}"] = row
    result = {"benchmark": "agent_footprint", "machine": platform.machine(),
              "python": platform.python_version(), "idle_s": args.idle_s,
              "target_idle_rss_mb": 60, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "agent_footprint.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'process':60s} {'RSS MB':>8s} {'USS MB':>8s} {'threads':>8s} {'idle CPU %':>11s}")
    for name, row in rows.items():
        print(f"{name:60s} {row['rss_mb']:8.1f} {row['uss_mb'] or 0:8.1f} {row['threads']:8d} "
              f"{row['idle_cpu_percent']:11.2f}")
    timed = {name: row for name, row in rows.items() if "first_request_ms" in row}
    if timed:
        print(f"\n{'requests right after the OTA update':60s} {'first ms':>8s} {'next p50':>8s}")
        for name, row in timed.items():
            print(f"{name:60s} {row['first_request_ms']:8.2f} "
                  f"{row['next_requests_p50_ms']:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
