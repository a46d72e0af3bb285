"""RKNN compiler against the real rknn-toolkit2 simulator (needs scripts/rknn-env.sh's venv)."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.compile.api import AllPrecisionsRejected, compile_model
from controller.compile.deviceclass import AccuracySpec, get_device_class
from controller.compile.rknn import rknn_python, rknn_venv
from tests.helpers.models import digits_assets

pytestmark = pytest.mark.rknn

RK = get_device_class("rk3588")


@pytest.fixture(scope="module", autouse=True)
def _need_venv() -> None:
    if rknn_python() is None:
        msg = f"RKNN worker venv absent at {rknn_venv()}: `make test-rknn` builds it and runs these"
        print(f"SKIP: {msg}")
        pytest.skip(msg)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return digits_assets(tmp_path_factory.mktemp("rk"), n_validation=80)


def test_int8_rknn_passes_gate_on_simulator(assets: dict[str, Path], tmp_path: Path) -> None:
    lines: list[str] = []
    r = compile_model(assets["cnn"], device_class=RK, precisions=["int8", "fp16"],
                      validation=assets["val"], accuracy=AccuracySpec("top1-agreement", 0.97),
                      work_dir=tmp_path, progress=lines.append)
    assert r.precision == "int8" and r.engine_kind == "rknn"
    assert Path(r.engine_path).suffix == ".rknn" and r.size > 0
    assert r.fingerprint["toolchain"] == "rknn-toolkit2" and r.fingerprint["toolchain_version"]
    assert r.signature["inputs"][0]["shape"] == [1, 1, 8, 8]  # batch fixed to 1
    assert r.metric is not None and r.metric["passed"]
    assert r.latency_ms is None  # the simulator says nothing about NPU latency
    assert any("simulator inference" in line for line in lines)


def test_quant_hostile_rejected_on_rknn(assets: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(AllPrecisionsRejected) as ei:
        compile_model(assets["hostile"], device_class=RK, precisions=["int8"],
                      validation=assets["val"], accuracy=AccuracySpec("top1-agreement", 0.97),
                      work_dir=tmp_path)
    assert "top1-agreement" in ei.value.rejected[0]["reason"]

