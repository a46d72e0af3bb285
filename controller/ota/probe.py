"""Build the signed on-device accuracy probe (``UpdateManifest.probe``) for an offer.

Called when an offer is built (controller.ota.offers / the rollout reconciler): it takes the
first samples of the EdgeModel's validation ``.npz`` (the compile gate's file, read with
:func:`controller.compile.accuracy.load_validation`: one array per input name, or ``inputs``
for a single-input model, first axis = samples), runs the FP32 source ONNX model with
onnxruntime CPU and no graph rewrites (:func:`controller.compile.accuracy.run_onnx`, the gate's
reference), and packs inputs + references into the layout of :mod:`protos.probe`. Without
validation samples, ``input_shapes`` (the EdgeModel's ``spec.inputShapes``,
``{input name: [dims]}``) gives random inputs of those shapes (fixed seed: floats uniform in
[0, 1), integers and booleans zero). The npz is capped: fewer samples until it fits
``max_bytes`` (at most :data:`protos.probe.MAX_PROBE_BYTES`, what agents accept); ``None``
when not even one sample fits, or when there is nothing to build it from.

Metric mapping (EdgeModel ``spec.accuracy.metric`` / ``budget`` -> probe metric / threshold;
the probe compares the device's engine with FP32 on ``n`` samples, like the gate does on the
whole validation set):

=================  ==================  ===================================================
EdgeModel metric   probe metric        threshold
=================  ==================  ===================================================
top1-agreement b   top1-agreement      ``b`` with small-sample slack (below)
top1-drop d        top1-agreement      ``1 - d`` with small-sample slack: agreement >= 1 - d
                                       bounds the drop on those samples by d (each changed
                                       top-1 costs at most one correct answer); labels are
                                       not shipped
max-abs-error b    max-abs             ``b``
relative-error b   relative-error      ``b`` (per-sample ||engine - fp32|| / ||fp32||)
=================  ==================  ===================================================

Small-sample slack: with ``n`` probe samples, ``k = ceil((1 - t) * n)`` disagreements are
allowed, i.e. threshold ``(n - k) / n``: an engine that meets agreement ``t`` on average may
flip one top-1 among 32 samples by chance, and a probe must not fail it for that; a device
that really is worse (say 20 flips out of 32) still fails. ``t = 1`` allows none.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from controller.compile.accuracy import (
    TensorInfo,
    ValidationSet,
    load_validation,
    model_signature,
    run_onnx,
)
from controller.compile.deviceclass import AccuracySpec
from protos import probe as P
from protos.edgefleet.v1 import update_pb2
from protos.errors import Rejected

#: EdgeModel accuracy metric -> probe metric ("max-abs" accepted as an alias)
METRIC_MAP = {"top1-agreement": P.TOP1_AGREEMENT, "top1-drop": P.TOP1_AGREEMENT,
              "max-abs-error": P.MAX_ABS, "max-abs": P.MAX_ABS,
              "relative-error": P.RELATIVE_ERROR}
SEED = 0


def probe_metric(metric: str, budget: float, *, samples: int) -> tuple[str, float]:
    """(probe metric, threshold) for an EdgeModel accuracy metric and budget judged on
    ``samples`` probe samples (see the module docstring). Raises Rejected for an unknown
    metric or a budget out of range."""
    if metric not in METRIC_MAP:
        raise Rejected(f"unknown accuracy metric {metric!r}; expected one of "
                       f"{sorted(METRIC_MAP)}", reason="bad_accuracy_spec")
    if not math.isfinite(budget) or budget < 0:
        raise Rejected(f"accuracy budget must be a finite number >= 0, got {budget}",
                       reason="bad_accuracy_spec")
    probe = METRIC_MAP[metric]
    if probe != P.TOP1_AGREEMENT:
        return probe, float(budget)
    target = budget if metric == "top1-agreement" else 1.0 - budget
    target = min(1.0, max(0.0, target))
    n = max(1, samples)
    allowed = math.ceil((1.0 - target) * n - 1e-9)
    return probe, (n - min(allowed, n)) / n


def top1_options(accuracy: AccuracySpec | None) -> P.Top1Options:
    """The probe's top-1 options from the EdgeModel's accuracy spec: the same output, class
    axis, class offset and score threshold as the compile gate."""
    a = accuracy or AccuracySpec()
    return P.Top1Options(output=a.output, class_axis=a.class_axis, class_offset=a.class_offset,
                         score_threshold=a.score_threshold)


def build_probe(*, model_path: Path, samples_path: Path | None, metric: str, threshold: float,
                max_samples: int = 32, max_bytes: int = 256 * 1024,
                input_shapes: dict[str, list[int]] | None = None,
                options: P.Top1Options | None = None) -> update_pb2.ProbeSpec | None:
    """The ProbeSpec for ``model_path`` (the FP32 source ONNX): ``metric``/``threshold`` are
    the EdgeModel's accuracy metric and budget (mapped as in the module docstring),
    ``options`` its top-1 options (output, classAxis, classOffset, scoreThreshold; see
    :func:`top1_options`).
    Returns None when there are neither samples nor ``input_shapes``, or not one sample fits
    ``max_bytes``. Raises Rejected for unreadable samples, bad shapes, a model that does not
    run on them, or a metric that does not apply to the model's outputs."""
    max_bytes = min(max_bytes, P.MAX_PROBE_BYTES)
    max_samples = min(max_samples, P.MAX_PROBE_SAMPLES)
    if max_samples < 1 or max_bytes < 1:
        return None
    probe_name = probe_metric(metric, threshold, samples=1)[0]  # validates the metric early
    inputs_sig, _outputs = model_signature(Path(model_path))
    if samples_path is not None:
        full = load_validation(Path(samples_path), inputs=inputs_sig)
        n = min(full.n, max_samples)
        feeds = {k: np.ascontiguousarray(v[:n]) for k, v in full.inputs.items()}
    elif input_shapes:
        feeds = random_inputs(inputs_sig, input_shapes, n=max_samples)
    else:
        return None
    try:
        refs = run_onnx(Path(model_path), ValidationSet(inputs=feeds))
    except Exception as e:
        raise Rejected(f"the FP32 model does not run on the probe inputs: {e}",
                       reason="bad_probe") from e
    opts = options or P.Top1Options()
    if opts.output and opts.output not in refs:
        raise Rejected(f"accuracy output {opts.output!r} is not a model output "
                       f"({sorted(refs)})", reason="bad_accuracy_spec")
    if probe_name == P.TOP1_AGREEMENT:
        first = opts.output or next(iter(refs))
        P.top1_agreement(refs[first], refs[first], options=opts)  # Rejected when not applicable
    data, count = _fit(P.ProbeSet(inputs=feeds, references=refs, options=opts),
                       max_bytes=max_bytes)
    if data is None:
        return None
    probe_name, probe_threshold = probe_metric(metric, threshold, samples=count)
    return update_pb2.ProbeSpec(samples_npz=data, metric=probe_name, threshold=probe_threshold)


def _fit(full: P.ProbeSet, *, max_bytes: int) -> tuple[bytes | None, int]:
    """Encode the first n samples of ``full`` with the largest n (about) that fits both the
    wire cap and the agents' decoded cap; (None, 0) when one sample does not."""
    n = full.n
    while n >= 1:
        part = P.ProbeSet(inputs={k: v[:n] for k, v in full.inputs.items()},
                          references={k: v[:n] for k, v in full.references.items()},
                          options=full.options)
        decoded = P.decoded_nbytes(part)
        if decoded > P.MAX_PROBE_DECODED_BYTES:
            n = min(n - 1, n * P.MAX_PROBE_DECODED_BYTES // decoded)
            continue
        data = P.encode_probe_set(part)
        if len(data) <= max_bytes:
            return data, n
        n = min(n - 1, n * max_bytes // len(data))  # proportional guess, at least one fewer
    return None, 0


def random_inputs(inputs: list[TensorInfo], shapes: dict[str, list[int]], *, n: int,
                  seed: int = SEED) -> dict[str, np.ndarray]:
    """``n`` random samples per input of the shapes in ``shapes`` (the shape of one inference:
    full rank with batch 1, or without the batch axis). Raises Rejected for a missing input,
    a dynamic or non-positive dimension, or one that contradicts the model's static dims."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for spec in inputs:
        dims = shapes.get(spec.name)
        if dims is None:
            raise Rejected(f"inputShapes has no shape for input {spec.name!r} "
                           f"(has {sorted(shapes)})", reason="bad_probe")
        dims = [int(d) for d in dims]
        if len(dims) == len(spec.shape) - 1:
            dims = [1, *dims]
        if len(dims) != len(spec.shape):
            raise Rejected(f"inputShapes[{spec.name!r}] = {dims} has rank {len(dims)}, the "
                           f"model input is {list(spec.shape)}", reason="bad_probe")
        if dims[0] in (-1, 0):
            dims[0] = 1
        if dims[0] != 1 or any(d <= 0 for d in dims):
            raise Rejected(f"inputShapes[{spec.name!r}] = {dims}: dimensions must be positive "
                           f"and the batch (first) dimension 1", reason="bad_probe")
        clash = [i for i, (m, d) in enumerate(zip(spec.shape, dims, strict=True))
                 if m >= 0 and m != d]
        if clash:
            raise Rejected(f"inputShapes[{spec.name!r}] = {dims} contradicts the model input "
                           f"{list(spec.shape)} at axes {clash}", reason="bad_probe")
        shape = (n, *dims[1:])
        dtype = np.dtype(spec.dtype) if _is_numpy_dtype(spec.dtype) else None
        if dtype is None:
            raise Rejected(f"input {spec.name!r} has type {spec.dtype}, which the probe cannot "
                           f"generate", reason="bad_probe")
        if dtype.kind == "f":
            out[spec.name] = rng.random(shape).astype(dtype)
        else:
            out[spec.name] = np.zeros(shape, dtype)
    return out


def _is_numpy_dtype(name: str) -> bool:
    try:
        return np.dtype(name).kind in "biuf"
    except TypeError:
        return False
