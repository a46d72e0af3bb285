"""Tiny ONNX models built with onnx.helper for agent runtime/serving tests and benchmarks.

``build_affine``: y = x @ W + marker, where every output element equals ``marker`` plus the
matmul; with zero inputs the output is exactly ``marker``, so a response tells which version
answered. ``build_nan``: always outputs NaN (fails the smoke check). ``build_mlp``: a dense
model of roughly ``size_mb`` megabytes of weights (for hot-swap/RSS benchmarks).
``layered_mlp`` / ``fine_tuned``: an MLP with named per-layer tensors and a copy with every
(or one layer's) weight x (1 + N(0, 1e-3)) (delta codec tests and the OTA delta benchmark).
Also ``fingerprint()`` and ``sha256_file()`` helpers, ``activate_file()`` to put a model
into a registry in one call, and ``digits_assets()`` (the compile tests' digits CNN, validation
samples and quantisation-hostile model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from protos.edgefleet.v1.common_pb2 import EngineFingerprint
from protos.fsutil import sha256_file

OPSET = 17


def _save(graph: onnx.GraphProto, out: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out


def build_affine(out: Path, *, marker: float, n_in: int = 4, n_out: int = 3,
                 seed: int = 0) -> Path:
    """x [batch, n_in] float32 -> y [batch, n_out] = x @ W + marker."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((n_in, n_out)).astype(np.float32), "W")
    b = numpy_helper.from_array(np.full((n_out,), marker, np.float32), "B")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]),
             helper.make_node("Add", ["xw", "B"], ["y"])]
    graph = helper.make_graph(
        nodes, "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n_out])],
        initializer=[w, b])
    return _save(graph, out)


def build_nan(out: Path, *, n_in: int = 4) -> Path:
    """x -> sqrt(-(|x| + 1)): NaN for every input."""
    one = numpy_helper.from_array(np.ones((1,), np.float32), "one")
    nodes = [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Add", ["a", "one"], ["b"]),
             helper.make_node("Neg", ["b"], ["c"]), helper.make_node("Sqrt", ["c"], ["y"])]
    graph = helper.make_graph(
        nodes, "nan",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n_in])],
        initializer=[one])
    return _save(graph, out)


def build_mlp(out: Path, *, size_mb: float = 8.0, n_in: int = 64, marker: float = 0.0,
              seed: int = 0) -> Path:
    """x [batch, n_in] -> Relu(x @ W1) @ W2 + marker with ~size_mb MB of float32 weights."""
    hidden = max(16, int(size_mb * (1 << 20) / 4 / (n_in + 16)))
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(
        (rng.standard_normal((n_in, hidden)) / np.sqrt(n_in)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(
        (rng.standard_normal((hidden, 16)) / np.sqrt(hidden)).astype(np.float32), "W2")
    b = numpy_helper.from_array(np.full((16,), marker, np.float32), "B")
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["o"]),
             helper.make_node("Add", ["o", "B"], ["y"])]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        initializer=[w1, w2, b])
    return _save(graph, out)


def fingerprint(**overrides: str) -> EngineFingerprint:
    """An onnxruntime-cpu fingerprint valid on this machine (fields overridable)."""
    fields = {"engine_kind": "onnxruntime-cpu", "arch": "", "toolchain": "onnxruntime",
              "toolchain_version": "", "accelerator": "", "precision": "fp32"}
    fields.update(overrides)
    return EngineFingerprint(**fields)


def activate_file(registry, path: Path, *, name: str, version: int, variant: str = "",
                  fp: EngineFingerprint | None = None) -> None:
    """``registry.activate`` with the file's real sha256 and a CPU fingerprint."""
    registry.activate(name=name, version=version, path=path, sha256=sha256_file(path),
                      fingerprint=fp or fingerprint(), signature=None, variant=variant)


def digits_assets(folder: Path, *, n_validation: int) -> dict[str, Path]:
    """The compile tests' inputs in ``folder``: "cnn" (the digits CNN), "val" (an npz of
    ``n_validation`` held-out samples) and "hostile" (a model int8 cannot quantise)."""
    from controller.models import digits

    return {"cnn": digits.build_digits_cnn(folder / "cnn.onnx"),
            "val": digits.build_validation_samples(folder / "val.npz", n=n_validation),
            "hostile": digits.build_quant_hostile(folder / "hostile.onnx")}


def layered_mlp(sizes: list[int], *, seed: int = 0, prefix: str = "l") -> onnx.ModelProto:
    """MatMul+Add(+Relu) layers ``{prefix}{i}.w`` / ``{prefix}{i}.b`` of the given widths."""
    rng = np.random.default_rng(seed)
    inits, nodes, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        inits += [numpy_helper.from_array(rng.normal(0, 0.05, (a, b)).astype(np.float32),
                                          f"{prefix}{i}.w"),
                  numpy_helper.from_array(rng.normal(0, 0.01, b).astype(np.float32),
                                          f"{prefix}{i}.b")]
        nodes += [helper.make_node("MatMul", [prev, f"{prefix}{i}.w"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"{prefix}{i}.b"], [f"a{i}"])]
        prev = f"a{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, sizes[0]])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, sizes[-1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def fine_tuned(model: onnx.ModelProto, *, only: str | None = None, seed: int = 1
               ) -> onnx.ModelProto:
    """A copy with each initializer (those named ``only*`` when given) x (1 + N(0, 1e-3))."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    rng = np.random.default_rng(seed)
    for init in m.graph.initializer:
        if only is None or init.name.startswith(only):
            a = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(
                (a * (1 + rng.normal(0, 1e-3, a.shape))).astype(np.float32), init.name))
    return m
