"""Tests of the example models (controller.models.digits): real training, real onnxruntime."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from controller.models import digits


def _run(model: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    out = {v: digits.build_digits_cnn(d / f"{v}.onnx", variant=v) for v in digits.VARIANTS}
    out["val"] = digits.build_validation_samples(d / "val.npz")
    out["hostile"] = digits.build_quant_hostile(d / "hostile.onnx")
    return out


def test_digits_cnn_accuracy_and_io(built: dict[str, Path]) -> None:
    _, _, x_te, y_te = digits.load_digits_split()
    m = onnx.load(str(built["v1"]))
    assert [i.name for i in m.graph.input] == ["input"]
    assert [o.name for o in m.graph.output] == ["logits"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    for v in digits.VARIANTS:
        logits = _run(built[v], x_te)
        assert logits.shape == (len(x_te), 10)
        assert (logits.argmax(1) == y_te).mean() >= 0.95, v
    # batch 1 works too (dynamic batch)
    assert _run(built["v1"], x_te[:1]).shape == (1, 10)


def test_same_args_same_bytes(built: dict[str, Path], tmp_path: Path) -> None:
    again = digits.build_digits_cnn(tmp_path / "again.onnx")
    assert again.read_bytes() == built["v1"].read_bytes()
    other = digits.build_digits_cnn(tmp_path / "seed1.onnx", seed=1)
    assert hashlib.sha256(other.read_bytes()).digest() != hashlib.sha256(
        built["v1"].read_bytes()).digest()


def _weights(p: Path) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(p)).graph.initializer}


def test_variants_differ_as_documented(built: dict[str, Path]) -> None:
    v1, head, full = _weights(built["v1"]), _weights(built["v2-head"]), _weights(built["v2-full"])
    assert np.array_equal(v1["conv.w"], head["conv.w"])
    assert not np.array_equal(v1["head.w"], head["head.w"])
    for k in ("conv.w", "head.w", "head.b"):
        assert not np.array_equal(v1[k], full[k]), k
        rel = np.abs(full[k] - v1[k]) / np.maximum(np.abs(v1[k]), 1e-12)
        assert rel.max() < 1e-2, k


def test_validation_samples_are_held_out(built: dict[str, Path]) -> None:
    with np.load(built["val"]) as z:
        x, y = z["inputs"], z["labels"]
    assert x.shape == (200, 1, 8, 8) and x.dtype == np.float32
    assert y.shape == (200,) and y.dtype == np.int64
    x_tr, _, _, _ = digits.load_digits_split()
    train = {r.tobytes() for r in x_tr}
    assert sum(r.tobytes() in train for r in x) < 5  # digits has a few duplicate images
    with pytest.raises(ValueError):
        digits.build_validation_samples(built["val"].parent / "x.npz", n=1000)


def test_quant_hostile_is_accurate_in_fp32(built: dict[str, Path]) -> None:
    with np.load(built["val"]) as z:
        x, y = z["inputs"], z["labels"]
    logits = _run(built["hostile"], x)
    assert (logits.argmax(1) == y).mean() >= 0.9


def test_cli_writes_model_and_samples(tmp_path: Path) -> None:
    assert digits.main(["--out", str(tmp_path), "--samples", "20"]) == 0
    assert (tmp_path / "digits-cnn.onnx").is_file()
    with np.load(tmp_path / "digits-val.npz") as z:
        assert z["inputs"].shape == (20, 1, 8, 8)
