"""Dynamic batching: throughput and latency through the HTTP API with and without batching,
at a few client counts.

The agent (this process) serves one model; closed-loop clients (keep-alive, binary OIP, one
request of one row at a time) run in ``--procs`` separate processes with threads inside, for
``--seconds`` per cell. Models: the 8 MB MLP of bench/hot_swap.py (memory-bound at batch 1:
every inference streams all weights, so coalescing pays) and the digits CNN (tiny: the HTTP
layer dominates). Batching: ``ModelRegistry.configure_batching(max_batch_size=,
max_queue_delay_ms=)``. Writes bench/results/batching.json.

    .venv/bin/python -m bench.batching [--clients 1,4,16] [--seconds 3]
        [--max-batch 16] [--delay-ms 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.runtime.registry import ModelRegistry
from agent.serve import start_server
from bench.serving_overhead import RawClient
from tests.helpers.models import activate_file, build_mlp

RESULTS = Path(__file__).parent / "results"


def _body(name: str, shape: list[int]) -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    header = json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def _client_proc(port: int, threads: int, seconds: float, name: str, shape: list[int],
                 out: mp.Queue) -> None:
    body, headers = _body(name, shape)
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start = time.monotonic() + 0.5  # every thread connected before the clock starts
    end = start + seconds

    def loop() -> None:
        client = RawClient(port, "/v2/models/m/infer", body, headers)
        mine: list[float] = []
        while time.monotonic() < start:
            time.sleep(0.001)
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                client.call()
                mine.append(time.perf_counter() - t0)
            except Exception:
                with lock:
                    errors[0] += 1
                client = RawClient(port, "/v2/models/m/infer", body, headers)
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=loop) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put((lat, errors[0]))


def _cell(port: int, clients: int, procs: int, seconds: float, name: str,
          shape: list[int]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    n_procs = min(procs, clients)
    per = [clients // n_procs + (1 if i < clients % n_procs else 0) for i in range(n_procs)]
    ps = [ctx.Process(target=_client_proc, args=(port, k, seconds, name, shape, out))
          for k in per]
    for p in ps:
        p.start()
    lat: list[float] = []
    errors = 0
    for _ in ps:
        got, err = out.get(timeout=300)
        lat.extend(got)
        errors += err
    for p in ps:
        p.join(30)
    lat.sort()
    pct = (lambda q: round(lat[min(len(lat) - 1, int(len(lat) * q))] * 1000, 3)) if lat \
        else (lambda q: float("nan"))
    return {"rps": round(len(lat) / seconds, 1), "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "errors": errors}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--procs", type=int, default=2, help="client processes (threads inside)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--delay-ms", type=float, default=2.0)
    args = ap.parse_args(argv)
    from controller.models.digits import build_digits_cnn

    work = Path(tempfile.mkdtemp(prefix="bench-batching-"))
    models = {"mlp-8MB": (build_mlp(work / "mlp.onnx", size_mb=8.0, n_in=64), "x", [1, 64]),
              "digits-cnn": (build_digits_cnn(work / "digits.onnx", seed=0, variant="v1"),
                             "input", [1, 1, 8, 8])}
    counts = [int(c) for c in args.clients.split(",")]
    rows: list[dict[str, Any]] = []
    for model, (path, name, shape) in models.items():
        reg = ModelRegistry()
        activate_file(reg, path, name="m", version=1)
        handle = start_server(reg)
        try:
            for batching in (False, True):
                if batching:
                    reg.configure_batching("m", max_batch_size=args.max_batch,
                                           max_queue_delay_ms=args.delay_ms)
                for clients in counts:
                    before = reg.stats.snapshot()
                    cell = _cell(handle.port, clients, args.procs, args.seconds, name, shape)
                    after = reg.stats.snapshot()
                    (key,) = after
                    b0 = before[key].batch_size_counts if key in before else []
                    b1 = after[key].batch_size_counts
                    execs = {size: n - (b0[size] if size < len(b0) else 0)
                             for size, n in enumerate(b1)}
                    n_exec = sum(execs.values())
                    cell["mean_batch"] = round(
                        sum(s * n for s, n in execs.items()) / n_exec, 2) if n_exec else None
                    rows.append({"model": model, "batching": batching, "clients": clients,
                                 **cell})
                    print(f"{model:11s} batching={'on ' if batching else 'off'} "
                          f"clients={clients:3d} {cell}", flush=True)
        finally:
            handle.stop()
            reg.close()
    result = {"benchmark": "batching", "machine": platform.machine(), "cpus": os.cpu_count(),
              "seconds_per_cell": args.seconds, "max_batch_size": args.max_batch,
              "max_queue_delay_ms": args.delay_ms, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batching.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'model':11s} {'clients':>7s} {'rps off':>9s} {'rps on':>9s} {'p50 off':>8s} "
          f"{'p50 on':>8s} {'p99 off':>8s} {'p99 on':>8s} {'mean batch':>10s}")
    for model in models:
        for clients in counts:
            off, on = (next(r for r in rows if r["model"] == model and r["clients"] == clients
                            and r["batching"] is b) for b in (False, True))
            print(f"{model:11s} {clients:7d} {off['rps']:9.1f} {on['rps']:9.1f} "
                  f"{off['p50_ms']:8.3f} {on['p50_ms']:8.3f} {off['p99_ms']:8.3f} "
                  f"{on['p99_ms']:8.3f} {on['mean_batch']!s:>10s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
