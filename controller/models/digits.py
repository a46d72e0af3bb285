"""Small, real example models built without torch (for tests, benchmarks, demos and docs).

``build_digits_cnn`` writes a small CNN for scikit-learn's 8x8 handwritten digits:
Conv(16 fixed random 3x3 filters, deterministic by seed) -> Relu -> MaxPool 2x2 -> Flatten ->
Gemm head fitted by ridge regression (closed form) on the conv features. It builds in well
under a second and reaches ~98% on the held-out split. Same arguments -> byte-identical file.

Variants (for OTA delta pairs):
  * ``v1``       the base model;
  * ``v2-head``  same conv weights, only the head retrained (different C, extra samples);
  * ``v2-full``  every weight of v1 multiplied by (1 + N(0, 1e-3)).

``build_quant_hostile`` writes a digits classifier whose logits ride on a large offset
(1000 + 0.02 * logit): FP32 is exact, but per-tensor INT8 (and FP16) quantisation of the
hidden activation wipes out the small differences, so top-1 agreement collapses.

Used by tests of every engineer (engines, OTA deltas, agents), bench/ and the CLI:
``python -m controller.models.digits --out DIR`` writes digits-cnn.onnx + digits-val.npz.
"""

from __future__ import annotations

import argparse
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from protos.fsutil import write_atomic

OPSET = 17
IR_VERSION = 8  # loadable by onnxruntime >= 1.14 on boards
N_FILTERS = 16
HELD_OUT = 400  # size of the held-out split
VALIDATION_MAX = 200  # validation samples come from its first half; v2-head trains on the rest
VARIANTS = ("v1", "v2-head", "v2-full")
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@lru_cache(maxsize=1)
def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=HELD_OUT, random_state=0, stratify=y)
    return x_tr, y_tr, x_te, y_te


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train [N,1,8,8] float32 in [0,1], y_train int64, x_test, y_test); fixed split."""
    x_tr, y_tr, x_te, y_te = _split()
    return x_tr.copy(), y_tr.copy(), x_te.copy(), y_te.copy()


def _conv_weights(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N_FILTERS, 1, 3, 3)).astype(np.float32)
    w -= 0.5 * w.mean(axis=(2, 3), keepdims=True)  # half edge-detectors, half blob-detectors
    return w, np.zeros(N_FILTERS, np.float32)


def _conv_features(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """NumPy twin of Conv(pad 1) -> Relu -> MaxPool(2) -> Flatten, for training the head."""
    n = x.shape[0]
    p = np.pad(x[:, 0], ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], 8, 8), np.float32)
    for i in range(3):
        for j in range(3):
            out += p[:, None, i:i + 8, j:j + 8] * w[None, :, 0, i, j, None, None]
    out = np.maximum(out + b[None, :, None, None], 0.0)
    out = out.reshape(n, w.shape[0], 4, 2, 4, 2).max(axis=(3, 5))
    return out.reshape(n, -1)


def _train_head(feats: np.ndarray, y: np.ndarray, *, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression onto +-1 one-hot targets, in closed form (milliseconds, deterministic)."""
    f = np.hstack([feats.astype(np.float64), np.ones((len(feats), 1))])
    targets = np.eye(10)[y] * 2.0 - 1.0
    a = f.T @ f + alpha * np.eye(f.shape[1])
    a[-1, -1] -= alpha  # do not shrink the bias
    sol = np.linalg.solve(a, f.T @ targets)  # [features + 1, 10]
    return np.ascontiguousarray(sol[:-1].T, np.float32), sol[-1].astype(np.float32)


def _save(model: onnx.ModelProto, out: Path) -> Path:
    onnx.checker.check_model(model)
    return write_atomic(out, model.SerializeToString(deterministic=True), mode=0o600)


def _io() -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    inp = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 1, 8, 8])
    out = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 10])
    return inp, out


def _model(graph: onnx.GraphProto, *, doc: str) -> onnx.ModelProto:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                          producer_name="edgefleet.models", producer_version="1")
    m.ir_version = IR_VERSION
    m.doc_string = doc
    return m


def _cnn_graph(w: np.ndarray, b: np.ndarray, head_w: np.ndarray, head_b: np.ndarray,
               *, name: str) -> onnx.GraphProto:
    inits = [numpy_helper.from_array(w, "conv.w"), numpy_helper.from_array(b, "conv.b"),
             numpy_helper.from_array(head_w, "head.w"), numpy_helper.from_array(head_b, "head.b")]
    nodes = [
        helper.make_node("Conv", [INPUT_NAME, "conv.w", "conv.b"], ["conv"], name="conv",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("MaxPool", ["relu"], ["pool"], name="pool",
                         kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "head.w", "head.b"], [OUTPUT_NAME], name="head",
                         transB=1),
    ]
    inp, out = _io()
    return helper.make_graph(nodes, name, [inp], [out], inits)


def build_digits_cnn(out: Path, *, seed: int = 0, variant: str = "v1") -> Path:
    """Write the digits CNN (input "input" [N,1,8,8] float32 in [0,1], output "logits" [N,10])."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    x_tr, y_tr, _, _ = _split()
    w, b = _conv_weights(seed)
    feats = _conv_features(x_tr, w, b)
    if variant == "v2-head":
        # Head retrained with a different C on train + the "extra" half of the held-out split
        # (never part of the validation samples, which come from the first half).
        _, _, x_te, y_te = _split()
        x_extra, y_extra = x_te[VALIDATION_MAX:], y_te[VALIDATION_MAX:]
        feats2 = np.concatenate([feats, _conv_features(x_extra, w, b)])
        hw, hb = _train_head(feats2, np.concatenate([y_tr, y_extra]), alpha=3.0)
    else:
        hw, hb = _train_head(feats, y_tr, alpha=10.0)
    if variant == "v2-full":
        rng = np.random.default_rng(seed + 1_000_003)
        w = (w * (1.0 + 1e-3 * rng.standard_normal(w.shape))).astype(np.float32)
        b = (b * (1.0 + 1e-3 * rng.standard_normal(b.shape))).astype(np.float32)
        hw = (hw * (1.0 + 1e-3 * rng.standard_normal(hw.shape))).astype(np.float32)
        hb = (hb * (1.0 + 1e-3 * rng.standard_normal(hb.shape))).astype(np.float32)
    graph = _cnn_graph(w, b, hw, hb, name=f"digits_cnn_{variant.replace('-', '_')}")
    return _save(_model(graph, doc=f"edgefleet digits CNN seed={seed} variant={variant}"), out)


def build_validation_samples(out: Path, *, n: int = 200) -> Path:
    """Write an npz with "inputs" float32 [n,1,8,8] and "labels" int64 [n] (held-out split)."""
    if not 1 <= n <= VALIDATION_MAX:
        raise ValueError(f"n must be in 1..{VALIDATION_MAX}")
    import io

    _, _, x_te, y_te = _split()
    buf = io.BytesIO()
    np.savez(buf, inputs=np.ascontiguousarray(x_te[:n]), labels=np.ascontiguousarray(y_te[:n]))
    return write_atomic(out, buf.getvalue(), mode=0o600)


def build_quant_hostile(out: Path, *, seed: int = 0) -> Path:
    """Write a digits classifier that is exact in FP32 but collapses under INT8/FP16.

    hidden = Relu(0.02 * (x @ Wc + bc) + 1000)  (values ~1000 +- 0.5)
    logits = hidden - 1000
    Per-tensor 8-bit quantisation of ``hidden`` has a step of ~4, so all ten logits collapse
    to the same value and top-1 agreement with FP32 falls to chance.
    """
    from sklearn.linear_model import LogisticRegression

    x_tr, y_tr, _, _ = _split()
    clf = LogisticRegression(C=1.0, max_iter=3000, random_state=seed)
    clf.fit(x_tr.reshape(len(x_tr), -1).astype(np.float64), y_tr)
    w1 = (0.02 * clf.coef_).astype(np.float32)                 # [10, 64]
    b1 = (0.02 * clf.intercept_ + 1000.0).astype(np.float32)   # [10]
    inits = [numpy_helper.from_array(w1, "hidden.w"), numpy_helper.from_array(b1, "hidden.b"),
             numpy_helper.from_array(np.eye(10, dtype=np.float32), "out.w"),
             numpy_helper.from_array(np.full(10, -1000.0, np.float32), "out.b")]
    nodes = [
        helper.make_node("Flatten", [INPUT_NAME], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "hidden.w", "hidden.b"], ["hidden"], name="hidden",
                         transB=1),
        helper.make_node("Relu", ["hidden"], ["hidden_relu"], name="relu"),
        helper.make_node("Gemm", ["hidden_relu", "out.w", "out.b"], [OUTPUT_NAME], name="out",
                         transB=1),
    ]
    inp, outv = _io()
    graph = helper.make_graph(nodes, "quant_hostile", [inp], [outv], inits)
    return _save(_model(graph, doc="edgefleet quant-hostile digits model (fails INT8)"), out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m controller.models.digits",
                                 description="Write the example digits CNN and validation samples.")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", default="v1", choices=VARIANTS)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--quant-hostile", action="store_true", help="also write quant-hostile.onnx")
    args = ap.parse_args(argv)
    model = build_digits_cnn(args.out / "digits-cnn.onnx", seed=args.seed, variant=args.variant)
    val = build_validation_samples(args.out / "digits-val.npz", n=args.samples)
    print(model)
    print(val)
    if args.quant_hostile:
        print(build_quant_hostile(args.out / "quant-hostile.onnx", seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
