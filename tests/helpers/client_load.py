"""Client load on real agents: KServe v2 requests paced per device, every answer recorded.

Used by tests/e2e/test_rollout_gates_agents.py and bench/rollout_gates.py while a rollout
runs. ``ClientLoad(targets, ...)`` starts one child process (spawned, so the clients never
share the GIL with the controller in the caller's event loop) with one thread per device;
each thread sends closed-loop JSON requests at ``rate_per_s`` to the device's
``/v2/models/{model}/infer`` over a keep-alive connection. Inputs are all zeros, except a
``bad_fraction`` of them whose ``x[:, 0]`` is ``bad_value`` (tests.helpers.bad_models
build_erroring fails on those). A zero input makes the models of tests.helpers.bad_models
answer exactly their ``marker``, so each :class:`Sample` tells which engine served it.
``stop()`` returns every sample; :func:`failures` counts the failed ones in a time range.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing as mp
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Sample:
    device_id: str
    t_ms: int                 # wall clock when the request was sent (time.time() ms)
    latency_ms: float
    bad_input: bool           # sent with x[:, 0] = bad_value
    status: int               # HTTP status, 0 = no answer (connection error, timeout)
    marker: float | None      # y[0][0] of an answer to a zero input (which engine answered)
    version: int | None       # model_version of the answer
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


def _body(n_in: int, first: float) -> bytes:
    data = [0.0] * n_in
    data[0] = first
    return json.dumps({"inputs": [{"name": "x", "shape": [1, n_in], "datatype": "FP32",
                                   "data": data}]}).encode()


def _client(device_id: str, url: str, model: str, n_in: int, rate_per_s: float,
            bad_fraction: float, bad_value: float, stop: Any, out: list[Sample]) -> None:
    where = urlsplit(url)
    path = f"/v2/models/{model}/infer"
    good, bad = _body(n_in, 0.0), _body(n_in, bad_value)
    headers = {"Content-Type": "application/json"}
    conn: http.client.HTTPConnection | None = None
    interval = 1.0 / rate_per_s
    next_at = time.monotonic()
    every = round(1 / bad_fraction) if bad_fraction > 0 else 0   # every k-th input is bad
    n = 0
    while not stop.is_set():
        n += 1
        is_bad = bool(every) and n % every == 0
        t_ms, t0 = int(time.time() * 1000), time.perf_counter()
        status, marker, version, err = 0, None, None, ""
        try:
            if conn is None:
                conn = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
            conn.request("POST", path, body=bad if is_bad else good, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            status = resp.status
            doc = json.loads(payload or b"{}")
            if status == 200:
                version = int(doc.get("model_version") or 0) or None
                if not is_bad:
                    marker = float(doc["outputs"][0]["data"][0])
            else:
                err = str(doc.get("error", ""))[:200]
        except Exception as e:  # a failed request: recorded, the connection is renewed
            err = f"{type(e).__name__}: {e}"[:200]
            if conn is not None:
                conn.close()
            conn = None
        out.append(Sample(device_id, t_ms, (time.perf_counter() - t0) * 1000, is_bad, status,
                          marker, version, err))
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            stop.wait(delay)
        else:
            next_at = time.monotonic()
    if conn is not None:
        conn.close()


def _main(targets: list[tuple[str, str]], model: str, n_in: int, rate_per_s: float,
          bad_fraction: float, bad_value: float, stop: Any, results: Any) -> None:
    per: dict[str, list[Sample]] = {d: [] for d, _ in targets}
    threads = [threading.Thread(target=_client, args=(d, u, model, n_in, rate_per_s,
                                                      bad_fraction, bad_value, stop, per[d]),
                                daemon=True) for d, u in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put([s for d in per for s in per[d]])


class ClientLoad:
    """A child process with one paced client thread per (device_id, serve_url)."""

    def __init__(self, targets: Sequence[tuple[str, str]], *, model: str, n_in: int,
                 rate_per_s: float = 10.0, bad_fraction: float = 0.0,
                 bad_value: float = 1000.0) -> None:
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._results: Any = ctx.Queue()
        self._proc = ctx.Process(target=_main, daemon=True, args=(
            list(targets), model, n_in, rate_per_s, bad_fraction, bad_value, self._stop,
            self._results))
        self.samples: list[Sample] = []

    def start(self) -> ClientLoad:
        self._proc.start()
        return self

    def stop(self, *, timeout_s: float = 60.0) -> list[Sample]:
        """Stop the clients; every sample they recorded, in send order per device."""
        if not self._proc.is_alive() and self.samples:
            return self.samples
        self._stop.set()
        try:
            self.samples = list(self._results.get(timeout=timeout_s))
        finally:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
        return self.samples


def failures(samples: Iterable[Sample], *, device_id: str | None = None, since_ms: int = 0,
             until_ms: int | None = None, good_only: bool = True) -> list[Sample]:
    """Failed requests (not HTTP 200) sent in [since_ms, until_ms]; ``good_only``: only the
    requests a good engine answers (bad inputs are expected to fail on an erroring one)."""
    return [s for s in samples if not s.ok and (not good_only or not s.bad_input)
            and (device_id is None or s.device_id == device_id)
            and since_ms <= s.t_ms and (until_ms is None or s.t_ms <= until_ms)]


def of(samples: Iterable[Sample], device_id: str) -> list[Sample]:
    return sorted((s for s in samples if s.device_id == device_id), key=lambda s: s.t_ms)
