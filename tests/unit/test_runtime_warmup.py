"""Warm-up / smoke check of ModelRegistry.activate with real input shapes.

A detector-like model with dynamic height/width (Conv stride 2 -> Resize x2 -> Concat with
its input on the channel axis) only runs when H and W are even and > 1: filling every
dynamic dimension with 1 (what the warm-up used to do) makes the branches mismatch. It now
loads with no warm-up inputs (realistic sizes are tried) and with explicit ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.runtime.registry import WARMUP_DIM_CANDIDATES, ModelRegistry, synthetic_inputs
from protos.errors import Rejected
from tests.helpers.models import fingerprint, sha256_file

OPSET = 17


def _save(graph: onnx.GraphProto, out: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def build_down_up_concat(out: Path) -> Path:
    """x [1, 3, H, W] -> Conv(k3, stride 2, pad 1) -> Resize x2 (nearest) -> Concat([x, up],
    axis=1) -> y [1, 7, H, W]; H = W = 1 gives a 2x2 branch next to a 1x1 input."""
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["down"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["down", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Concat", ["x", "up"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "down_up_concat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 7, "H", "W"])],
        initializer=[w, scales])
    return _save(graph, out)


def build_fixed_7x7(out: Path) -> Path:
    """x [batch, 3, H, W] declared dynamic, but Reshape to [batch, 147] + MatMul [147, 2]
    only works for H = W = 7, which no warm-up candidate is."""
    w = numpy_helper.from_array(np.ones((147, 2), np.float32), "w")
    shape = numpy_helper.from_array(np.array([0, 147], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["y"])]
    graph = helper.make_graph(
        nodes, "fixed_7x7",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=[w, shape])
    return _save(graph, out)


def _activate(reg: ModelRegistry, path: Path, **kw: object) -> None:
    reg.activate(name="det", version=1, path=path, sha256=sha256_file(path),
                 fingerprint=fingerprint(), signature=None, **kw)  # type: ignore[arg-type]


def test_the_model_really_fails_with_every_dynamic_dim_at_1(tmp_path: Path) -> None:
    import onnxruntime as ort

    path = build_down_up_concat(tmp_path / "det.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ones = {"x": np.zeros((1, 3, 1, 1), np.float32)}
    with pytest.raises(Exception, match="(?i)concat|dimension"):
        sess.run(None, ones)
    assert sess.run(None, {"x": np.zeros((1, 3, 32, 32), np.float32)})[0].shape == (1, 7, 32, 32)


def test_dynamic_height_width_model_loads_without_warmup_inputs(tmp_path: Path) -> None:
    path = build_down_up_concat(tmp_path / "det.onnx")
    reg = ModelRegistry()
    try:
        _activate(reg, path)
        with reg.get("det") as engine:
            y = engine.infer({"x": np.ones((1, 3, 64, 48), np.float32)})["y"]
        assert y.shape == (1, 7, 64, 48)
    finally:
        reg.close()


def test_dynamic_height_width_model_loads_with_explicit_warmup_inputs(tmp_path: Path) -> None:
    path = build_down_up_concat(tmp_path / "det.onnx")
    reg = ModelRegistry()
    try:
        _activate(reg, path, warmup_inputs={"x": np.zeros((1, 3, 96, 128), np.float32)})
        assert reg.names() == ["det"]
        # explicit inputs that the engine cannot run reject the new engine (no fallback)
        with pytest.raises(Rejected, match="given warm-up inputs") as e:
            reg.activate(name="det", version=2, path=path, sha256=sha256_file(path),
                         fingerprint=fingerprint(), signature=None,
                         warmup_inputs={"x": np.zeros((1, 3, 1, 1), np.float32)})
        assert e.value.reason == "smoke_check_failed"
        assert reg.describe("det")[0].version == 1  # the old engine keeps serving
    finally:
        reg.close()


def test_a_model_no_candidate_fits_fails_with_the_last_error(tmp_path: Path) -> None:
    path = build_fixed_7x7(tmp_path / "fixed.onnx")
    reg = ModelRegistry()
    try:
        with pytest.raises(Rejected, match="dynamic dimensions tried") as e:
            _activate(reg, path)
        assert e.value.reason == "smoke_check_failed"
        assert "warm-up inference failed" in str(e.value)
        _activate(reg, path, warmup_inputs={"x": np.ones((2, 3, 7, 7), np.float32)})
        with reg.get("det") as engine:
            assert engine.infer({"x": np.ones((1, 3, 7, 7), np.float32)})["y"].tolist() == [
                [147.0, 147.0]]
    finally:
        reg.close()


def test_synthetic_inputs_batch_dim_is_1_and_others_take_the_size(tmp_path: Path) -> None:
    from agent.runtime.onnxruntime import OnnxRuntimeCpuBackend

    engine = OnnxRuntimeCpuBackend().load(build_fixed_7x7(tmp_path / "f.onnx"))
    try:
        assert synthetic_inputs(engine.signature)["x"].shape == (1, 3, 1, 1)
        assert synthetic_inputs(engine.signature, dim=224)["x"].shape == (1, 3, 224, 224)
    finally:
        engine.close()
    assert WARMUP_DIM_CANDIDATES[0] > 1 and WARMUP_DIM_CANDIDATES[-1] == 1


def test_stock_yolov8n_with_dynamic_height_width_loads_without_warmup_inputs() -> None:
    """nudenet's 320n.onnx (a YOLOv8n, input [batch, 3, height, width]) failed the old
    warm-up (every dynamic dim 1: "Concat ... Non concat axis dimensions must match")."""
    import importlib.util

    spec = importlib.util.find_spec("nudenet")
    assert spec is not None and spec.origin, "nudenet is installed by the test setup (Makefile)"
    path = Path(spec.origin).parent / "320n.onnx"
    reg = ModelRegistry()
    try:
        reg.activate(name="nudenet", version=1, path=path, sha256=sha256_file(path),
                     fingerprint=fingerprint(), signature=None)
        assert [m.name for m in reg.served()] == ["nudenet"]
    finally:
        reg.close()
