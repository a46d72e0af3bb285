"""Engine backends and the hot-loading registry on real onnxruntime sessions."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from agent.runtime.base import available_backends, backend_for, host_arch, version_tuple
from agent.runtime.registry import ModelNotFound, ModelRegistry, synthetic_inputs
from protos.errors import BackendUnavailable, Rejected, RetryLater
from tests.helpers.models import activate_file, build_affine, build_nan, fingerprint, sha256_file

X0 = {"x": np.zeros((2, 4), np.float32)}


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    return {"v1": build_affine(tmp_path / "v1.onnx", marker=1.0),
            "v2": build_affine(tmp_path / "v2.onnx", marker=2.0),
            "nan": build_nan(tmp_path / "nan.onnx"),
            "other": build_affine(tmp_path / "other.onnx", marker=3.0, n_in=5)}


def _marker(registry: ModelRegistry, name: str = "m", version: int | None = None) -> float:
    with registry.get(name, version) as engine:
        y = engine.infer(X0)["y"]
    assert np.all(y == y.flat[0])
    return float(y.flat[0])


def test_version_tuple_and_arch() -> None:
    assert version_tuple("10.3.0.26") == (10, 3, 0, 26)
    assert version_tuple("1.17.0rc1") == (1, 17, 0)
    assert host_arch() in ("x86_64", "aarch64")


def test_backend_lookup() -> None:
    cpu = backend_for("onnxruntime-cpu")
    assert cpu.kind == "onnxruntime-cpu"
    assert cpu.runtime_info().version
    assert "onnxruntime-cpu" in [b.kind for b in available_backends()]
    with pytest.raises(BackendUnavailable, match="unknown engine kind"):
        backend_for("tflite")


@pytest.mark.parametrize("kind", ["tensorrt", "rknn", "onnxruntime-cuda"])
def test_missing_vendor_backends_are_unavailable(kind: str) -> None:
    try:
        backend = backend_for(kind)
    except BackendUnavailable as e:
        assert kind in str(e) and "not available" in str(e)
    else:  # only on a machine that really has the SDK and hardware
        assert backend.kind == kind


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"engine_kind": "tensorrt"}, "wrong_engine_kind"),
    ({"arch": "riscv64"}, "wrong_arch"),
    ({"toolchain": "rknn-toolkit2"}, "wrong_toolchain"),
    ({"toolchain_version": "99.0.0"}, "toolchain_version"),
    ({"min_runtime_version": "99.1"}, "runtime_too_old"),
    ({"accelerator": "sm_87"}, "wrong_accelerator"),
])
def test_fingerprint_rejections(overrides: dict[str, str], reason: str) -> None:
    with pytest.raises(Rejected) as err:
        backend_for("onnxruntime-cpu").check_fingerprint(fingerprint(**overrides))
    assert err.value.reason == reason
    assert str(err.value)


def test_fingerprint_accepts_this_machine() -> None:
    backend = backend_for("onnxruntime-cpu")
    backend.check_fingerprint(fingerprint(arch=host_arch(),
                                          toolchain_version=backend.runtime_info().version))


def test_load_rejects_bad_files(tmp_path: Path, models: dict[str, Path]) -> None:
    backend = backend_for("onnxruntime-cpu")
    with pytest.raises(Rejected, match="does not exist"):
        backend.load(tmp_path / "missing.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(Rejected, match="empty"):
        backend.load(tmp_path / "empty.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x01garbage" * 100)
    with pytest.raises(Rejected) as err:
        backend.load(tmp_path / "junk.onnx")
    assert err.value.reason == "engine_load_failed" and err.value.__cause__ is not None
    wrong_sig = backend.load(models["other"]).signature
    wrong_sig.inputs[0].name = "not_x"
    with pytest.raises(Rejected, match="do not match"):
        backend.load(models["v1"], signature=wrong_sig)


def test_engine_signature_and_infer(models: dict[str, Path]) -> None:
    engine = backend_for("onnxruntime-cpu").load(models["v1"])
    assert [(t.name, t.dtype, list(t.shape)) for t in engine.signature.inputs] == [
        ("x", "float32", [-1, 4])]
    assert synthetic_inputs(engine.signature)["x"].shape == (1, 4)
    assert engine.infer(X0)["y"].shape == (2, 3)
    engine.close()
    engine.close()  # idempotent


def test_activate_get_served(models: dict[str, Path]) -> None:
    reg = ModelRegistry()
    with pytest.raises(ModelNotFound):
        reg.get("m")
    activate_file(reg, models["v1"], name="m", version=1)
    assert _marker(reg) == 1.0
    assert _marker(reg, version=1) == 1.0
    with pytest.raises(ModelNotFound, match="version 7"):
        reg.get("m", 7)
    activate_file(reg, models["v2"], name="m", version=2)
    assert _marker(reg) == 2.0
    [info] = reg.served()
    assert (info.name, info.version, info.engine_kind, info.active) == (
        "m", 2, "onnxruntime-cpu", True)
    assert info.sha256 == sha256_file(models["v2"])
    assert info.to_proto(slot="b").slot == "b"
    reg.unload("m")
    assert reg.served() == []
    with pytest.raises(ModelNotFound):
        reg.get("m")


@pytest.mark.parametrize("failure", ["corrupt", "fingerprint", "nan", "sha256", "signature"])
def test_failed_activation_keeps_old_engine(tmp_path: Path, models: dict[str, Path],
                                            failure: str) -> None:
    reg = ModelRegistry()
    activate_file(reg, models["v1"], name="m", version=1)
    path, sha, fp, sig = models["v2"], sha256_file(models["v2"]), fingerprint(), None
    if failure == "corrupt":
        path = tmp_path / "corrupt.onnx"
        data = models["v2"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
        sha = sha256_file(path)
    elif failure == "fingerprint":
        fp = fingerprint(arch="riscv64")
    elif failure == "nan":
        path, sha = models["nan"], sha256_file(models["nan"])
    elif failure == "sha256":
        sha = "0" * 64
    elif failure == "signature":
        sig = backend_for("onnxruntime-cpu").load(models["other"]).signature
    with pytest.raises(Rejected) as err:
        reg.activate(name="m", version=2, path=path, sha256=sha, fingerprint=fp, signature=sig)
    assert err.value.reason in {"engine_load_failed", "wrong_arch", "smoke_check_failed",
                                "sha256_mismatch", "signature_mismatch"}
    assert _marker(reg) == 1.0
    assert [(i.version, i.active) for i in reg.served()] == [(1, True)]


def test_in_flight_lease_finishes_on_old_engine(models: dict[str, Path]) -> None:
    reg = ModelRegistry()
    activate_file(reg, models["v1"], name="m", version=1)
    lease = reg.get("m")
    old_engine = lease.__enter__()
    activate_file(reg, models["v2"], name="m", version=2)
    assert _marker(reg) == 2.0                          # new requests: new engine
    assert old_engine.infer(X0)["y"].flat[0] == 1.0     # old one still open for its lease
    lease.__exit__(None, None, None)
    with pytest.raises(RuntimeError, match="closed"):   # closed once the lease ends
        old_engine.infer(X0)


def test_concurrency_limit_and_queue(models: dict[str, Path]) -> None:
    reg = ModelRegistry(queue_timeout_s=0.05)
    activate_file(reg, models["v1"], name="m", version=1)
    reg.set_max_concurrency(1)
    held = reg.get("m")
    with pytest.raises(RetryLater):
        reg.get("m")
    got = threading.Event()

    def waiter() -> None:
        reg._queue_timeout_s = 30.0
        with reg.get("m"):
            got.set()

    t = threading.Thread(target=waiter)
    t.start()
    while reg.queue_depth("m") != 1 and t.is_alive():
        threading.Event().wait(0.001)
    assert reg.queue_depth("m") == 1 and not got.is_set()
    held.__exit__(None, None, None)
    t.join(10)
    assert got.is_set() and reg.queue_depth("m") == 0
    reg.set_max_concurrency(0)


def test_light_variant_preference(models: dict[str, Path]) -> None:
    reg = ModelRegistry()
    activate_file(reg, models["v1"], name="m", version=1)
    activate_file(reg, models["v2"], name="m", version=1, variant="light")
    assert _marker(reg) == 1.0
    reg.set_preferred_variant("light")
    assert _marker(reg) == 2.0
    assert {(i.variant, i.active) for i in reg.served()} == {("", False), ("light", True)}
    reg.set_preferred_variant("")
    assert _marker(reg) == 1.0


def test_rknn_soc_detection_from_device_tree(tmp_path: Path) -> None:
    from agent.runtime.rknnlite import detect_soc

    compatible = tmp_path / "compatible"
    compatible.write_bytes(b"radxa,rock-5b\x00rockchip,rk3588\x00")
    assert detect_soc(compatible) == "rk3588"
    compatible.write_bytes(b"raspberrypi,5-model-b\x00brcm,bcm2712\x00")
    assert detect_soc(compatible) == ""
    assert detect_soc(tmp_path / "missing") == ""
