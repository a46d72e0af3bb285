"""Tests of controller.compile with the real onnxruntime CPU compiler and real models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from controller.compile.api import (
    AllPrecisionsRejected,
    CompileReport,
    compile_model,
    engine_cache_key,
)
from controller.compile.deviceclass import (
    BUILTIN_DEVICE_CLASSES,
    AccuracySpec,
    DeviceClassSpec,
    get_device_class,
)
from protos.errors import Rejected
from tests.helpers.models import digits_assets

X86 = get_device_class("cpu-x86-64")
GATE = AccuracySpec(metric="top1-agreement", budget=0.98)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return digits_assets(tmp_path_factory.mktemp("assets"), n_validation=100)


def test_fp32_is_deterministic_and_described(assets: dict[str, Path], tmp_path: Path) -> None:
    a = compile_model(assets["cnn"], device_class=X86, precisions=["fp32"], validation=None,
                      accuracy=None, work_dir=tmp_path / "a")
    b = compile_model(assets["cnn"], device_class=X86, precisions=["fp32"], validation=None,
                      accuracy=None, work_dir=tmp_path / "b")
    assert a.engine_path != b.engine_path
    assert Path(a.engine_path).read_bytes() == Path(b.engine_path).read_bytes()
    assert a.engine_sha256 == b.engine_sha256 and a.cache_key == b.cache_key
    assert a.precision == "fp32" and a.engine_kind == "onnxruntime-cpu"
    assert a.fingerprint == {"engine_kind": "onnxruntime-cpu", "arch": "x86_64",
                             "toolchain": "onnxruntime", "toolchain_version": ort.__version__,
                             "accelerator": "", "precision": "fp32", "min_runtime_version": ""}
    assert a.signature == {
        "inputs": [{"name": "input", "dtype": "float32", "shape": [-1, 1, 8, 8]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, 10]}]}
    # no NCHWc / layout-specific ops in a portable engine, and it computes the same logits
    ops = {n.op_type for n in onnx.load(a.engine_path).graph.node}
    assert not any("Nchwc" in o or "ReorderInput" in o for o in ops), ops
    x = np.load(assets["val"])["inputs"]
    ref = ort.InferenceSession(str(assets["cnn"])).run(None, {"input": x})[0]
    got = ort.InferenceSession(a.engine_path).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert CompileReport.from_dict(a.to_dict()) == a


def test_broken_onnx_is_rejected_with_parser_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf \xff\xff\xff")
    with pytest.raises(Rejected) as ei:
        compile_model(bad, device_class=X86, precisions=["fp32"], validation=None,
                      accuracy=None, work_dir=tmp_path / "w")
    msg = str(ei.value)
    assert "not a valid ONNX model" in msg and "Traceback" not in msg
    assert ei.value.reason == "bad_model"
    # a well-formed protobuf with an invalid graph: the checker's message comes through
    m = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    invalid = tmp_path / "invalid.onnx"
    invalid.write_bytes(m.SerializeToString())
    with pytest.raises(Rejected, match="NoSuchOp"):
        compile_model(invalid, device_class=X86, precisions=["fp32"], validation=None,
                      accuracy=None, work_dir=tmp_path / "w2")


def test_int8_ships_for_digits_with_gate(assets: dict[str, Path], tmp_path: Path) -> None:
    r = compile_model(assets["cnn"], device_class=X86, precisions=["int8", "fp32"],
                      validation=assets["val"], accuracy=GATE, work_dir=tmp_path)
    assert r.precision == "int8", r.rejected
    assert r.rejected == []
    assert r.metric is not None and r.metric["passed"] and r.metric["value"] >= 0.98
    assert r.metric["all"]["top1_drop"] <= 0.02
    assert r.latency_ms is not None and r.latency_ms > 0
    ops = {n.op_type for n in onnx.load(r.engine_path).graph.node}
    assert "DequantizeLinear" in ops or "QLinearConv" in ops, ops
    assert r.notes["quantization"] == "static-qdq"
    assert r.notes["reduce_range"] is True  # cpu-x86-64 default isa has no VNNI
    assert r.fingerprint["precision"] == "int8"


def test_quant_hostile_falls_back_with_reason(assets: dict[str, Path], tmp_path: Path) -> None:
    lines: list[str] = []
    r = compile_model(assets["hostile"], device_class=X86, precisions=["int8", "fp16", "fp32"],
                      validation=assets["val"], accuracy=GATE, work_dir=tmp_path,
                      progress=lines.append)
    assert r.precision == "fp32"
    rejected = {x["precision"]: x["reason"] for x in r.rejected}
    assert "int8" in rejected and "top1-agreement" in rejected["int8"]
    assert any("int8" in line and "FAILED" in line for line in lines)
    assert r.metric is not None and r.metric["value"] == 1.0


def test_nothing_passes_raises_with_every_reason(assets: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(AllPrecisionsRejected) as ei:
        compile_model(assets["hostile"], device_class=X86, precisions=["int8"],
                      validation=assets["val"], accuracy=GATE, work_dir=tmp_path)
    assert [r["precision"] for r in ei.value.rejected] == ["int8"]
    with pytest.raises(AllPrecisionsRejected, match="no validation samples"):
        compile_model(assets["cnn"], device_class=X86, precisions=["fp16"], validation=None,
                      accuracy=None, work_dir=tmp_path / "b")


def test_bad_validation_samples_rejected(assets: dict[str, Path], tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, inputs=np.zeros((4, 1, 9, 9), np.float32))
    with pytest.raises(Rejected, match="shape"):
        compile_model(assets["cnn"], device_class=X86, precisions=["fp32"], validation=wrong,
                      accuracy=None, work_dir=tmp_path)
    notnpz = tmp_path / "x.npz"
    notnpz.write_bytes(b"nope")
    with pytest.raises(Rejected, match="npz"):
        compile_model(assets["cnn"], device_class=X86, precisions=["fp32"], validation=notnpz,
                      accuracy=None, work_dir=tmp_path)
    nolabels = tmp_path / "nolabels.npz"
    np.savez(nolabels, inputs=np.load(assets["val"])["inputs"])
    with pytest.raises(AllPrecisionsRejected, match="labels"):
        compile_model(assets["cnn"], device_class=X86, precisions=["fp32"], validation=nolabels,
                      accuracy=AccuracySpec(metric="top1-drop", budget=0.01), work_dir=tmp_path)


def test_cache_key_covers_its_inputs() -> None:
    k = engine_cache_key("a" * 64, device_class=X86, precision="int8", toolchain_version="1.0")
    assert k == engine_cache_key("a" * 64, device_class=X86, precision="int8",
                                 toolchain_version="1.0")
    others = {
        engine_cache_key("b" * 64, device_class=X86, precision="int8", toolchain_version="1.0"),
        engine_cache_key("a" * 64, device_class=get_device_class("cpu-aarch64"),
                         precision="int8", toolchain_version="1.0"),
        engine_cache_key("a" * 64, device_class=X86, precision="fp32", toolchain_version="1.0"),
        engine_cache_key("a" * 64, device_class=X86, precision="int8", toolchain_version="1.1"),
    }
    assert k not in others and len(others) == 4


def test_device_class_and_accuracy_from_crd_spec() -> None:
    dc = DeviceClassSpec.from_spec({"engineKind": "rknn", "arch": "aarch64",
                                    "accelerator": "rk3588-npu", "toolchainVersion": "2.3.2",
                                    "isa": ["NEON"], "budgets": {"latencyMs": 30,
                                                                 "memoryMB": 512}},
                                   name="my-rk")
    assert dc.engine_kind == "rknn" and dc.isa == ("neon",) and dc.latency_budget_ms == 30.0
    assert DeviceClassSpec.from_spec(dc.to_spec(), name="my-rk") == dc
    assert set(BUILTIN_DEVICE_CLASSES) >= {"cpu-x86-64", "cpu-aarch64", "jetson-orin", "rk3588"}
    with pytest.raises(Rejected, match="engineKind"):
        DeviceClassSpec.from_spec({"engineKind": "cuda-magic"}, name="x")
    acc = AccuracySpec.from_spec({"metric": "top1-drop", "budget": 0.01})
    assert acc == AccuracySpec("top1-drop", 0.01)
    with pytest.raises(Rejected):
        AccuracySpec.from_spec({"metric": "cosine", "budget": 0.99})
    with pytest.raises(Rejected):
        AccuracySpec.from_spec({"metric": "top1-agreement", "budget": "lots"})


def test_missing_toolchains_are_backend_unavailable(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    from controller.compile.api import get_compiler
    from controller.compile.rknn import VENV_ENV
    from protos.errors import BackendUnavailable

    monkeypatch.setenv(VENV_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(BackendUnavailable, match="rknn-env.sh"):
        get_compiler(DeviceClassSpec(name="rk", engine_kind="rknn", arch="aarch64"))
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailable, match="tensorrt"):
            get_compiler(get_device_class("jetson-orin"))


def test_detector_top1_sees_collapse_that_cosine_misses() -> None:
    from controller.compile.accuracy import compare

    rng = np.random.default_rng(0)
    boxes = rng.uniform(50, 300, (2, 4, 500)).astype(np.float32)
    scores = rng.uniform(0, 0.1, (2, 3, 500)).astype(np.float32)
    scores[:, 1, :40] = 0.9  # 40 confident anchors of class 1
    scores[:, 2, 40:80] = 0.8  # 40 of class 2
    ref = {"output0": np.concatenate([boxes, scores], 1)}
    collapsed = np.concatenate([boxes, np.full_like(scores, 0.3)], 1)
    det = AccuracySpec("top1-agreement", 0.9, class_offset=4, score_threshold=0.25)
    g = compare(ref, {"output0": collapsed}, labels=None, accuracy=det)
    assert g.metrics["cosine"]["output0"] > 0.999  # one cosine says "fine"
    assert g.metrics["top1_positions"] == 160
    assert not g.passed and g.value < 0.5       # per-anchor class top-1 says "collapsed"
    assert compare(ref, ref, labels=None, accuracy=det).passed
    assert AccuracySpec.from_spec(det.to_spec()) == det
