"""Compile benchmark: FP32 vs FP16 vs static INT8 per engine kind available on this machine.

For each engine kind here (onnxruntime-cpu always; rknn when scripts/rknn-env.sh's venv exists;
tensorrt when a GPU + TensorRT exist) and each precision: engine size, median latency (batch 1,
1 thread, on this host) and the accuracy gate; on the digits CNN top-1 on the held-out digits,
on a real model shipped in a PyPI wheel (nudenet's 320n.onnx, a YOLOv8n detector) a task-level
check on held-out photos bundled with scikit-image: detections of the engine vs FP32 (same
class, IoU >= 0.5 after NMS).

Run: .venv/bin/python -m bench.compile   (prints a table, writes bench/results/compile.json)
Needs for the real-model part (bench only): pip install --no-deps nudenet==3.4.2; scikit-image.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from controller.compile.accuracy import ValidationSet, run_onnx
from controller.compile.api import AllPrecisionsRejected, compile_model
from controller.compile.deviceclass import AccuracySpec, DeviceClassSpec, get_device_class
from controller.compile.onnxruntime_cpu import VNNI_FLAGS, host_cpu_flags
from controller.models import digits
from protos.errors import BackendUnavailable

RESULTS = Path(__file__).resolve().parent / "results" / "compile.json"
YOLO_SIZE = 320
CALIB_IMAGES = ["coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "horse.png",
                "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "logo.png", "color.png"]
TEST_IMAGES = ["astronaut.png", "camera.png"]


def host_class() -> DeviceClassSpec:
    flags = host_cpu_flags()
    isa = tuple(sorted(f for f in flags if f in (*VNNI_FLAGS, "avx2", "avx512f")))
    arch = "aarch64" if platform.machine() in ("aarch64", "arm64") else "x86_64"
    return DeviceClassSpec(name=f"host-{arch}", engine_kind="onnxruntime-cpu", arch=arch, isa=isa)


def _compile_one(model: Path, dc: DeviceClassSpec, precision: str, val: Path,
                 acc: AccuracySpec, work: Path) -> dict[str, Any]:
    try:
        r = compile_model(model, device_class=dc, precisions=[precision], validation=val,
                          accuracy=acc, work_dir=work / f"{dc.name}-{precision}")
    except AllPrecisionsRejected as e:
        return {"precision": precision, "passed": False, "reason": e.rejected[0]["reason"]}
    m = r.metric or {}
    return {"precision": precision, "passed": True, "engine": r.engine_path, "size": r.size,
            "latency_ms": r.latency_ms, "gate": {k: m.get(k) for k in ("name", "value", "budget")},
            "top1_engine": m.get("all", {}).get("top1_engine"), "notes": r.notes}


def bench_digits(work: Path) -> list[dict[str, Any]]:
    model = digits.build_digits_cnn(work / "digits.onnx")
    val = digits.build_validation_samples(work / "digits-val.npz", n=200)
    acc = AccuracySpec("top1-drop", 0.01)
    rows = []
    classes = [host_class(), get_device_class("cpu-x86-64"), get_device_class("rk3588"),
               get_device_class("jetson-orin")]
    for dc in classes:
        for p in ("fp32", "fp16", "int8"):
            try:
                row = _compile_one(model, dc, p, val, acc, work)
            except BackendUnavailable as e:
                rows.append({"model": "digits-cnn", "class": dc.name, "engine_kind":
                             dc.engine_kind, "precision": p, "skipped": str(e)})
                break
            rows.append({"model": "digits-cnn", "class": dc.name, "engine_kind": dc.engine_kind,
                         **row})
    return rows


def _load_rgb(name: str) -> np.ndarray:
    import skimage.io

    path = Path(importlib.util.find_spec("skimage").origin).parent / "data" / name  # type: ignore
    img = skimage.io.imread(path)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return img[..., :3]


def _letterbox(img: np.ndarray) -> np.ndarray:
    """nudenet's preprocessing: pad right/bottom to a square, resize, /255, NCHW float32."""
    from skimage.transform import resize

    h, w = img.shape[:2]
    s = max(h, w)
    pad = np.zeros((s, s, 3), img.dtype)
    pad[:h, :w] = img
    out = resize(pad, (YOLO_SIZE, YOLO_SIZE), anti_aliasing=True, preserve_range=True)
    return (out / 255.0).astype(np.float32).transpose(2, 0, 1)[None]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def detections(out: np.ndarray, *, score: float = 0.2, iou: float = 0.45) -> list[tuple]:
    """YOLOv8 decode + class-wise NMS (nudenet's thresholds): [(cls, score, xyxy)]."""
    rows = out[0].T  # [anchors, 4 + C]
    cls_scores = rows[:, 4:]
    best = cls_scores.max(1)
    keep = best >= score
    boxes = rows[keep, :4]
    xyxy = np.stack([boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2,
                     boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2], 1)
    cls, sc = cls_scores[keep].argmax(1), best[keep]
    order = np.argsort(-sc)
    kept: list[tuple] = []
    for i in order:
        if all(c != cls[i] or _iou(b, xyxy[i]) < iou for c, _, b in kept):
            kept.append((int(cls[i]), float(sc[i]), xyxy[i]))
    return kept


def task_check(ref: list[list[tuple]], got: list[list[tuple]]) -> dict[str, Any]:
    n_ref = sum(len(r) for r in ref)
    matched, ious = 0, []
    for r, g in zip(ref, got, strict=True):
        for c, _, b in r:
            best = max((_iou(b, gb) for gc, _, gb in g if gc == c), default=0.0)
            if best >= 0.5:
                matched += 1
                ious.append(best)
    return {"fp32_detections": n_ref, "engine_detections": sum(len(g) for g in got),
            "matched": matched, "recall_vs_fp32": matched / n_ref if n_ref else None,
            "mean_iou": float(np.mean(ious)) if ious else None}


def bench_yolo(work: Path) -> list[dict[str, Any]]:
    spec = importlib.util.find_spec("nudenet")
    if spec is None or spec.origin is None or importlib.util.find_spec("skimage") is None:
        print("real model: skipped (pip install --no-deps nudenet==3.4.2 scikit-image)")
        return [{"model": "nudenet-320n", "skipped": "nudenet or scikit-image not installed"}]
    model = Path(spec.origin).parent / "320n.onnx"
    calib = []
    for name in CALIB_IMAGES:
        img = _load_rgb(name)
        calib += [_letterbox(img), _letterbox(img[:, ::-1])]
    val = work / "yolo-val.npz"
    np.savez(val, images=np.concatenate(calib))
    test = ValidationSet(inputs={"images": np.concatenate(
        [_letterbox(_load_rgb(n)) for n in TEST_IMAGES]
        + [_letterbox(_load_rgb(n)[:, ::-1]) for n in TEST_IMAGES])})
    ref_out = run_onnx(model, test)["output0"]
    ref = [detections(ref_out[i:i + 1]) for i in range(test.n)]
    acc = AccuracySpec("top1-agreement", 0.9, class_offset=4, score_threshold=0.2)
    rows = []
    dc = host_class()
    for p in ("fp32", "fp16", "int8"):
        row = _compile_one(model, dc, p, val, acc, work)
        if row.get("passed"):
            out = run_onnx(Path(row["engine"]), test, graph_opt="all")["output0"]
            got = [detections(out[i:i + 1]) for i in range(test.n)]
            row["task"] = task_check(ref, got)
        rows.append({"model": "nudenet-320n (YOLOv8n)", "class": dc.name,
                     "engine_kind": dc.engine_kind, **row})
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    base: dict[tuple, float] = {}
    for r in rows:
        if r.get("precision") == "fp32" and r.get("latency_ms"):
            base[(r["model"], r["class"])] = r["latency_ms"]
    head = ("| model | class | kind | precision | size (KiB) | latency ms | speed-up | gate "
            "| top-1 / task | note |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r.get('class', '')} | {r.get('engine_kind', '')} "
                         f"| {r.get('precision', '')} | | | | | | skipped: {r['skipped'][:60]} |")
            continue
        lat = r.get("latency_ms")
        b = base.get((r["model"], r["class"]))
        speed = f"{b / lat:.2f}x" if lat and b else ""
        gate = r.get("gate") or {}
        gtxt = (f"{gate.get('name')}={gate.get('value'):.4f}" if r.get("passed") and gate
                else "FAILED")
        if "task" in r:
            t = r["task"]
            q = f"{t['matched']}/{t['fp32_detections']} det matched"
        elif r.get("top1_engine") is not None:
            q = f"{r['top1_engine']:.3f}"
        else:
            q = ""
        size = f"{r['size'] / 1024:.1f}" if r.get("size") else ""
        note = "" if r.get("passed") else (r.get("reason") or "")[:70]
        lines.append(f"| {r['model']} | {r['class']} | {r['engine_kind']} | {r['precision']} "
                     f"| {size} | {f'{lat:.3f}' if lat else ''} | {speed} | {gtxt} | {q} "
                     f"| {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--skip-real", action="store_true", help="digits only")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as tmp:
        work = Path(tmp)
        rows = bench_digits(work)
        if not args.skip_real:
            rows += bench_yolo(work)
    for r in rows:
        r.pop("engine", None)
    import onnxruntime

    result = {"host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                       "vnni": any(f in host_cpu_flags() for f in VNNI_FLAGS),
                       "onnxruntime": onnxruntime.__version__},
              "latency": "median of 50 runs, batch 1, 1 thread, after 10 warm-up runs",
              "rows": rows}
    print(_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(f".{args.out.name}.tmp")
    tmp_out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
