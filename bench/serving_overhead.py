"""Latency added by the local inference API over a bare ``InferenceSession.run``.

Same model, same small input: (a) ``session.run`` in-process; (b) the OIP handler called
in-process (no sockets), split into parse / infer / serialize; (c) over HTTP on loopback
with a keep-alive client: a minimal raw-socket client (what a tuned C/Go client costs) and
Python's ``http.client``, each with JSON and with binary tensors. Reports p50/p99 and the
added microseconds (p50 over bare run). Writes bench/results/serving_overhead.json.

    .venv/bin/python -m bench.serving_overhead [--n 3000] [--model digits|affine]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort

from agent.runtime.registry import ModelRegistry
from agent.serve import start_server
from agent.serve.http import Request
from agent.serve.oip import OipApp, _decode_inputs, _encode_outputs, _split_body
from protos.edgefleet.v1.common_pb2 import ModelSignature
from tests.helpers.models import activate_file, build_affine

RESULTS = Path(__file__).parent / "results"


def _pcts(samples_s: list[float]) -> dict[str, float]:
    us = sorted(s * 1e6 for s in samples_s)
    return {"p50_us": round(us[len(us) // 2], 1), "p99_us": round(us[int(len(us) * 0.99)], 1),
            "mean_us": round(statistics.fmean(us), 1)}


def _time(fn: Callable[[], object], n: int) -> list[float]:
    for _ in range(min(200, n)):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _parse(req: Request, signature: ModelSignature) -> dict[str, np.ndarray]:
    return _decode_inputs(*_split_body(req), signature)


def _bodies(x: np.ndarray, in_name: str, out_name: str) -> dict[str, tuple[bytes, dict]]:
    js = json.dumps({"inputs": [{"name": in_name, "shape": list(x.shape), "datatype": "FP32",
                                 "data": x.ravel().tolist()}]}).encode()
    header = json.dumps({"inputs": [{"name": in_name, "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": out_name, "parameters": {"binary_data": True}}]}
                        ).encode()
    return {"json": (js, {}),
            "binary": (header + x.tobytes(),
                       {"Inference-Header-Content-Length": str(len(header))})}


class RawClient:
    """Keep-alive HTTP/1.1 client with a prebuilt request; reads exactly one response."""

    def __init__(self, port: int, path: str, body: bytes, headers: dict[str, str]) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.request = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                        f"{extra}\r\n").encode() + body
        self.buf = b""

    def call(self) -> bytes:
        self.sock.sendall(self.request)
        buf = self.buf
        while b"\r\n\r\n" not in buf:
            buf += self.sock.recv(65536)
        head, _, rest = buf.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(rest) < length:
            rest += self.sock.recv(65536)
        self.buf = rest[length:]
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode())
        return rest[:length]


def _client_loop(port: int, body: bytes, headers: dict[str, str], client: str, n: int,
                 out: mp.Queue) -> None:
    if client == "raw":
        raw = RawClient(port, "/v2/models/m/infer", body, headers)
        out.put(_time(raw.call, n))
        raw.sock.close()
        return
    conn = http.client.HTTPConnection("127.0.0.1", port)

    def call() -> None:
        conn.request("POST", "/v2/models/m/infer", body=body, headers=headers)
        r = conn.getresponse()
        r.read()
        assert r.status == 200

    out.put(_time(call, n))
    conn.close()


def _in_child(port: int, body: bytes, headers: dict[str, str], client: str,
              n: int) -> list[float]:
    """Run the client in its own process, as a real local client would be (no shared GIL)."""
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_client_loop, args=(port, body, headers, client, n, out))
    proc.start()
    samples = out.get(timeout=600)
    proc.join(60)
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--model", choices=["digits", "affine"], default="digits")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    if args.model == "digits":
        from controller.models.digits import build_digits_cnn

        path = build_digits_cnn(work / "digits.onnx", seed=0, variant="v1")
        x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    else:
        path = build_affine(work / "affine.onnx", marker=0.0)
        x = np.zeros((1, 4), np.float32)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    in_name, out_name = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    from agent.runtime import onnxruntime as agent_ort

    agent_ort.set_default_threads(args.threads)
    reg = ModelRegistry()
    activate_file(reg, path, name="m", version=1)
    handle = start_server(reg)
    rows: dict[str, dict[str, float]] = {}
    rows["bare session.run"] = _pcts(_time(lambda: sess.run(None, {in_name: x}), args.n))
    bodies = _bodies(x, in_name, out_name)
    app = OipApp(reg)
    for kind, (body, headers) in bodies.items():
        req = Request("POST", "/v2/models/m/infer", "", {k.lower(): v for k, v in headers.items()},
                      body)
        rows[f"handler in-process ({kind})"] = _pcts(_time(partial(app, req), args.n))
        with reg.get("m") as engine:
            header, binary = _split_body(req)
            inputs = _decode_inputs(header, binary, engine.signature)
            outputs = engine.infer(inputs)
            rows[f"  parse ({kind})"] = _pcts(_time(
                partial(_parse, req, engine.signature), args.n))
            rows[f"  infer ({kind})"] = _pcts(_time(partial(engine.infer, inputs), args.n))
            rows[f"  serialize ({kind})"] = _pcts(_time(
                partial(_encode_outputs, header, outputs, model="m", version=1), args.n))
        for client in ("raw", "http.client"):
            label = ("HTTP raw keep-alive client" if client == "raw"
                     else "HTTP http.client keep-alive")
            rows[f"{label} ({kind})"] = _pcts(_in_child(handle.port, body, headers, client,
                                                        args.n))
    handle.stop()
    bare = rows["bare session.run"]["p50_us"]
    for row in rows.values():
        row["added_p50_us"] = round(row["p50_us"] - bare, 1)
    result = {"benchmark": "serving_overhead", "model": args.model, "input_shape": list(x.shape),
              "n": args.n, "intra_op_threads": args.threads, "machine": platform.machine(),
              "python": platform.python_version(), "onnxruntime": ort.__version__,
              "rows": rows, "target_added_p50_us": 150}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"model={args.model} input={list(x.shape)} n={args.n}")
    print(f"{'path':44s} {'p50 us':>9s} {'p99 us':>9s} {'added p50':>10s}")
    for name, row in rows.items():
        print(f"{name:44s} {row['p50_us']:9.1f} {row['p99_us']:9.1f} {row['added_p50_us']:10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
