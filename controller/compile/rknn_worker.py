"""RKNN build worker: runs INSIDE the rknn-toolkit2 venv (scripts/rknn-env.sh), not the main one.

controller.compile.rknn starts ``<rknn-venv>/bin/python rknn_worker.py`` and writes one JSON
request on stdin; this script answers with JSON lines on stdout (``{"progress": ...}`` then
``{"result": ...}`` or ``{"error": ...}``). It imports only the standard library, numpy and
rknn.api (never controller/ or protos/: they are not installed in that venv).

Steps in ONE RKNN object: config(target_platform, quantized_dtype, ...) -> load_onnx(with explicit
input sizes, dynamic dims resolved by the caller) -> build(do_quantization, dataset = the
validation samples as .npy files) -> init_runtime() with no target = the x86 simulator ->
inference on every validation sample -> export_rknn. The simulator must run in the same object
that built the model: an exported .rknn cannot be loaded back into the simulator.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any


def _run(req: dict[str, Any], send: Any) -> dict[str, Any]:
    import numpy as np
    from rknn.api import RKNN

    work = Path(req["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    names = [i["name"] for i in req["inputs"]]
    shapes = [list(i["shape"]) for i in req["inputs"]]
    with np.load(req["samples"], allow_pickle=False) as z:
        samples = {n: z[n] for n in names}
    n = int(samples[names[0]].shape[0])
    quantize = req["precision"] == "int8"
    dataset = None
    if quantize:
        ds_dir = work / "dataset"
        ds_dir.mkdir(exist_ok=True)
        lines = []
        for i in range(min(n, int(req.get("max_calibration_samples", 100)))):
            paths = []
            for k, name in enumerate(names):
                p = ds_dir / f"s{i:05d}_{k}.npy"
                np.save(p, samples[name][i:i + 1])
                paths.append(str(p))
            lines.append(" ".join(paths))
        dataset = work / "dataset.txt"
        dataset.write_text("\n".join(lines) + "\n")

    rknn = RKNN(verbose=False)
    try:
        send({"progress": f"rknn: config target_platform={req['target_platform']}"})
        cfg: dict[str, Any] = {"target_platform": req["target_platform"],
                               "optimization_level": int(req.get("optimization_level", 3))}
        if quantize:
            cfg.update(quantized_dtype=req.get("quantized_dtype", "w8a8"),
                       quantized_algorithm=req.get("quantized_algorithm", "normal"),
                       quantized_method=req.get("quantized_method", "channel"))
        ret = rknn.config(**cfg)
        if ret != 0:
            raise RuntimeError(f"rknn.config failed ({ret})")
        ret = rknn.load_onnx(model=req["model"], inputs=names, input_size_list=shapes)
        if ret != 0:
            raise RuntimeError(f"rknn.load_onnx failed ({ret})")
        send({"progress": f"rknn: build do_quantization={quantize}"})
        ret = rknn.build(do_quantization=quantize,
                         dataset=str(dataset) if dataset else None)
        if ret != 0:
            raise RuntimeError(f"rknn.build failed ({ret})")
        ret = rknn.init_runtime()  # no target: the simulator
        if ret != 0:
            raise RuntimeError(f"rknn.init_runtime (simulator) failed ({ret})")
        send({"progress": f"rknn: simulator inference on {n} samples"})
        outs: list[list[Any]] = []
        for i in range(n):
            feed = [np.ascontiguousarray(samples[name][i:i + 1]) for name in names]
            fmt = ["nchw" if f.ndim == 4 else None for f in feed]
            res = rknn.inference(inputs=feed, data_format=fmt)
            if res is None:
                raise RuntimeError(f"rknn.inference returned nothing for sample {i}")
            outs.append([np.asarray(r, dtype=np.float32) for r in res])
        out_names = list(req["outputs"])
        arrays = {name: np.concatenate([o[k] for o in outs]) for k, name in enumerate(out_names)}
        np.savez(req["outputs_npz"], **arrays)  # type: ignore[arg-type]
        ret = rknn.export_rknn(req["engine"])
        if ret != 0:
            raise RuntimeError(f"rknn.export_rknn failed ({ret})")
    finally:
        rknn.release()
    import importlib.metadata as md

    return {"engine": req["engine"], "outputs_npz": req["outputs_npz"],
            "toolkit_version": md.version("rknn-toolkit2")}


def main() -> int:
    # Never let this folder's rknn.py (the controller side) shadow the toolkit's rknn package.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != here]
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the toolkit prints a lot: keep stdout for the protocol
    sys.stdout = sys.stderr

    def send(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        req = json.loads(sys.stdin.read())
        send({"result": _run(req, send)})
    except Exception as e:  # report, do not crash: the parent turns this into Rejected
        traceback.print_exc(file=sys.stderr)
        send({"error": f"{type(e).__name__}: {e}"})
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
