"""compile_in_subprocess (real child process) and the `edgefleet compile` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from controller.compile.api import AllPrecisionsRejected, compile_model
from controller.compile.cli import run_compile_command
from controller.compile.deviceclass import AccuracySpec, DeviceClassSpec, get_device_class
from controller.compile.worker import compile_async, compile_in_subprocess
from protos.errors import BackendUnavailable, Rejected
from tests.helpers.models import digits_assets

X86 = get_device_class("cpu-x86-64")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return digits_assets(tmp_path_factory.mktemp("assets"), n_validation=60)


def test_subprocess_report_matches_in_process(assets: dict[str, Path], tmp_path: Path) -> None:
    lines: list[str] = []
    sub = compile_in_subprocess(assets["cnn"], device_class=X86, precisions=["int8", "fp32"],
                                validation=assets["val"], accuracy=AccuracySpec(),
                                work_dir=tmp_path / "sub", progress=lines.append)
    local = compile_model(assets["cnn"], device_class=X86, precisions=["int8", "fp32"],
                          validation=assets["val"], accuracy=AccuracySpec(),
                          work_dir=tmp_path / "local")
    assert sub.precision == local.precision == "int8"
    assert sub.engine_sha256 == local.engine_sha256
    assert sub.request_key == local.request_key and sub.cache_key == local.cache_key
    assert any(line.startswith("int8:") for line in lines)
    assert any("shipped" in line for line in lines)


def test_subprocess_errors_come_back_typed(assets: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx at all")
    with pytest.raises(Rejected, match="not a valid ONNX model") as ei:
        compile_in_subprocess(bad, device_class=X86, precisions=["fp32"], validation=None,
                              accuracy=None, work_dir=tmp_path / "w")
    assert "Traceback" not in str(ei.value) and ei.value.reason == "bad_model"
    with pytest.raises(AllPrecisionsRejected) as ar:
        compile_in_subprocess(assets["hostile"], device_class=X86, precisions=["int8"],
                              validation=assets["val"], accuracy=AccuracySpec(),
                              work_dir=tmp_path / "h")
    assert ar.value.rejected[0]["precision"] == "int8"
    trt = DeviceClassSpec(name="orin", engine_kind="tensorrt", arch="aarch64")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailable) as bu:
            compile_in_subprocess(assets["cnn"], device_class=trt, precisions=["fp16"],
                                  validation=assets["val"], accuracy=None,
                                  work_dir=tmp_path / "t")
        assert bu.value.backend == "tensorrt"


async def test_compile_async_does_not_block_the_loop(assets: dict[str, Path],
                                                     tmp_path: Path) -> None:
    import asyncio

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    t = asyncio.create_task(ticker())
    report = await compile_async(assets["cnn"], device_class=X86, precisions=["fp32"],
                                 validation=None, accuracy=None, work_dir=tmp_path)
    t.cancel()
    assert report.precision == "fp32"
    assert ticks > 1  # the loop kept running while the child compiled


def test_cli_writes_engine_and_report(assets: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    rc = run_compile_command([str(assets["cnn"]), "--class", "cpu-x86-64", "--precision",
                              "int8,fp32", "--validation", str(assets["val"]), "--out",
                              str(tmp_path / "out"), "--quiet"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    engine = Path(report["engine_path"])
    assert engine.parent == tmp_path / "out" and engine.name == "cnn.cpu-x86-64.int8.onnx"
    assert (tmp_path / "out" / "cnn.cpu-x86-64.report.json").is_file()
    x = np.load(assets["val"])["inputs"]
    assert ort.InferenceSession(str(engine)).run(None, {"input": x})[0].shape == (60, 10)


def test_cli_exit_codes(assets: dict[str, Path], tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    assert run_compile_command([str(assets["hostile"]), "--class", "cpu-x86-64", "--precision",
                                "int8", "--validation", str(assets["val"]), "--out",
                                str(tmp_path), "--quiet"]) == 1
    assert "int8" in capsys.readouterr().out
    assert run_compile_command([str(assets["cnn"]), "--class", "no-such-class",
                                "--out", str(tmp_path)]) == 2
    assert "no-such-class" in capsys.readouterr().err
    dc = tmp_path / "dc.yaml"
    dc.write_text("kind: DeviceClass\nmetadata: {name: my-arm}\n"
                  "spec: {engineKind: onnxruntime-cpu, arch: aarch64}\n")
    assert run_compile_command([str(assets["cnn"]), "--class", str(dc), "--precision", "fp32",
                                "--out", str(tmp_path / "arm"), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["fingerprint"]["arch"] == "aarch64"
