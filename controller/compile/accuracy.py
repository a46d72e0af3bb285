"""Validation samples, FP32 reference outputs and the accuracy gate.

Called by controller.compile.api.compile_model: it loads the validation samples once, runs the
original ONNX model in FP32 (onnxruntime, no graph rewrites) as the reference, and judges each
compiled engine's outputs on the same samples with the metric of the EdgeModel's accuracy spec.

Metrics (all reported, one gates): top-1 accuracy drop (needs labels), top-1 agreement with
FP32, and per-output max abs error and relative error. One cosine over a whole output is not
enough: an INT8 YOLOv8n kept cosine 0.9998 while every class score collapsed, because the box
coordinates dominate the norm. Cosine is reported for information only.

Validation file: an ``.npz`` (no pickles) with ``inputs`` (single-input models) or one array per
input name, and optional ``labels`` (int64 [N]) for ``top1-drop``.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from controller.compile.deviceclass import AccuracySpec
from protos.errors import Rejected

MAX_VALIDATION_BYTES = 512 * 1024 * 1024
MAX_VALIDATION_SAMPLES = 10_000
_EPS = 1e-9  # 0.99 - 0.98 is 0.010000000000000009 in floats

_ONNX_TO_NUMPY = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64",
                  9: "bool", 10: "float16", 11: "float64"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]  # -1 = dynamic

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def model_signature(model_path: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Inputs and outputs (name, numpy dtype, shape with -1 for dynamic) of an ONNX model."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}

    def info(v: Any) -> TensorInfo:
        t = v.type.tensor_type
        dims = tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorInfo(v.name, _ONNX_TO_NUMPY.get(t.elem_type, str(t.elem_type)), dims)

    return ([info(v) for v in m.graph.input if v.name not in inits],
            [info(v) for v in m.graph.output])


@dataclass
class ValidationSet:
    """Validation samples keyed by input name, plus optional labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def sample(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i:i + 1] for k, v in self.inputs.items()}

    def batches(self, size: int) -> list[dict[str, np.ndarray]]:
        return [{k: v[s:s + size] for k, v in self.inputs.items()} for s in range(0, self.n, size)]


def load_validation(path: Path, *, inputs: list[TensorInfo],
                    max_bytes: int = MAX_VALIDATION_BYTES) -> ValidationSet:
    """Read and check an npz of validation samples against the model's inputs."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise Rejected(f"validation samples {path}: {e.strerror}", reason="bad_validation") from e
    if size > max_bytes:
        raise Rejected(f"validation samples are {size} bytes, over max_validation_bytes="
                       f"{max_bytes}", reason="validation_too_large")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise Rejected(f"validation samples {path} are not a readable npz: {e}",
                       reason="bad_validation") from e
    feeds: dict[str, np.ndarray] = {}
    for spec in inputs:
        arr = arrays.get(spec.name)
        if arr is None and len(inputs) == 1:
            arr = arrays.get("inputs")
        if arr is None:
            raise Rejected(f"validation samples lack input {spec.name!r} (have {sorted(arrays)})",
                           reason="bad_validation")
        if arr.dtype.name != spec.dtype:
            raise Rejected(f"validation input {spec.name!r} is {arr.dtype.name}, model wants "
                           f"{spec.dtype}", reason="bad_validation")
        if arr.ndim != len(spec.shape) or any(
                d != -1 and i > 0 and d != a for i, (d, a) in enumerate(zip(spec.shape, arr.shape, strict=True))):
            raise Rejected(f"validation input {spec.name!r} has shape {list(arr.shape)}, model "
                           f"wants {list(spec.shape)} (first axis = samples)",
                           reason="bad_validation")
        feeds[spec.name] = np.ascontiguousarray(arr)
    counts = {a.shape[0] for a in feeds.values()}
    if len(counts) != 1 or 0 in counts:
        raise Rejected(f"validation inputs need the same non-zero sample count, got {counts}",
                       reason="bad_validation")
    n = counts.pop()
    if n > MAX_VALIDATION_SAMPLES:
        raise Rejected(f"{n} validation samples, over {MAX_VALIDATION_SAMPLES}",
                       reason="validation_too_large")
    labels = arrays.get("labels")
    if labels is not None:
        if labels.shape != (n,) or labels.dtype.kind not in "iu":
            raise Rejected(f"labels must be integer [{n}], got {labels.dtype.name} "
                           f"{list(labels.shape)}", reason="bad_validation")
        labels = labels.astype(np.int64)
    return ValidationSet(inputs=feeds, labels=labels)


def run_onnx(model_path: Path, samples: ValidationSet, *, graph_opt: str = "disable",
             threads: int = 0) -> dict[str, np.ndarray]:
    """Run an ONNX model with onnxruntime CPU on all samples; batched if the batch is dynamic."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[graph_opt]
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    dynamic = all(not isinstance(i.shape[0], int) if i.shape else False for i in sess.get_inputs())
    names = [o.name for o in sess.get_outputs()]
    chunks = samples.batches(64) if dynamic else [samples.sample(i) for i in range(samples.n)]
    outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in chunks:
        for n, v in zip(names, sess.run(names, feed), strict=True):
            outs[n].append(np.asarray(v))
    return {n: np.concatenate(v) for n, v in outs.items()}


@dataclass
class GateResult:
    """The gating metric plus every metric that could be computed, for the report."""

    name: str
    value: float
    budget: float
    passed: bool
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "budget": self.budget,
                "passed": self.passed, "all": self.metrics}

    def reason(self) -> str:
        cmp = ">=" if self.name == "top1-agreement" else "<="
        return (f"accuracy gate failed: {self.name} = {self.value:.6g}, budget {cmp} "
                f"{self.budget:g}")


def _top1(a: np.ndarray) -> np.ndarray:
    """Argmax over axis 1 (classes); for rank > 2 one top-1 per remaining position."""
    return np.asarray(a).argmax(axis=1)


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], *,
            labels: np.ndarray | None, accuracy: AccuracySpec) -> GateResult:
    """Judge candidate outputs against the FP32 reference with ``accuracy``."""
    missing = [k for k in reference if k not in candidate]
    if missing:
        raise Rejected(f"engine did not produce outputs {missing}", reason="bad_engine_outputs")
    metrics: dict[str, Any] = {"max_abs_error": {}, "relative_error": {}, "cosine": {}}
    for name, ref in reference.items():
        cand = np.asarray(candidate[name], dtype=np.float64)
        r = ref.astype(np.float64)
        if cand.shape != r.shape:
            raise Rejected(f"engine output {name!r} has shape {list(cand.shape)}, FP32 has "
                           f"{list(r.shape)}", reason="bad_engine_outputs")
        if not np.all(np.isfinite(cand)):
            metrics["max_abs_error"][name] = float("inf")
            metrics["relative_error"][name] = float("inf")
            metrics["cosine"][name] = 0.0
            continue
        diff = (cand - r).reshape(r.shape[0], -1)
        rf = r.reshape(r.shape[0], -1)
        metrics["max_abs_error"][name] = float(np.abs(diff).max()) if diff.size else 0.0
        rel = np.linalg.norm(diff, axis=1) / np.maximum(np.linalg.norm(rf, axis=1), 1e-12)
        metrics["relative_error"][name] = float(rel.max()) if rel.size else 0.0
        cf = cand.reshape(-1)
        denom = np.linalg.norm(cf) * np.linalg.norm(rf.reshape(-1))
        metrics["cosine"][name] = float(cf @ rf.reshape(-1) / denom) if denom else 1.0
    first = accuracy.output or next(iter(reference))
    if first not in reference:
        raise Rejected(f"accuracy output {first!r} is not a model output ({sorted(reference)})",
                       reason="bad_accuracy_spec")
    ref0, cand0 = reference[first], np.asarray(candidate[first])
    if ref0.ndim >= 2 and accuracy.class_axis < ref0.ndim:
        ref_s = np.moveaxis(ref0, accuracy.class_axis, 1)[:, accuracy.class_offset:]
        cand_s = np.moveaxis(cand0, accuracy.class_axis, 1)[:, accuracy.class_offset:]
        if np.all(np.isfinite(cand_s)) and ref_s.shape[1] > 0:
            t_ref, t_cand = _top1(ref_s), _top1(cand_s)
            mask = np.ones(t_ref.shape, bool)
            if accuracy.score_threshold is not None:
                mask = ref_s.max(axis=1) >= accuracy.score_threshold
            metrics["top1_positions"] = int(mask.sum())
            metrics["top1_agreement"] = (float((t_ref == t_cand)[mask].mean())
                                         if mask.any() else 1.0)
            if labels is not None and ref0.ndim == 2:
                acc_ref = float((t_ref == labels).mean())
                acc_cand = float((t_cand == labels).mean())
                metrics.update(top1_fp32=acc_ref, top1_engine=acc_cand,
                               top1_drop=acc_ref - acc_cand)
        else:
            metrics["top1_agreement"] = 0.0
            if labels is not None and ref0.ndim == 2:
                metrics["top1_drop"] = 1.0
    m = accuracy.metric
    if m == "top1-agreement":
        if "top1_agreement" not in metrics:
            raise Rejected(f"top1-agreement needs an output of rank >= 2 ({first!r})",
                           reason="metric_not_applicable")
        value = metrics["top1_agreement"]
        passed = value >= accuracy.budget - _EPS
    elif m == "top1-drop":
        if "top1_drop" not in metrics:
            raise Rejected("top1-drop needs 'labels' in the validation samples and a first "
                           "output of rank >= 2", reason="metric_not_applicable")
        value = metrics["top1_drop"]
        passed = value <= accuracy.budget + _EPS
    elif m == "max-abs-error":
        value = max(metrics["max_abs_error"].values())
        passed = value <= accuracy.budget + _EPS
    else:
        value = max(metrics["relative_error"].values())
        passed = value <= accuracy.budget + _EPS
    return GateResult(name=m, value=float(value), budget=accuracy.budget, passed=bool(passed),
                      metrics=metrics)
