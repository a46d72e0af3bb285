"""On-device accuracy probe end to end on real onnxruntime: the controller builds the probe
from the digits CNN and its validation samples (controller.ota.probe), the agent runs it on
a real ModelRegistry (agent.update.probe). The real CPU backend passes; a backend that
degrades outputs (a board worse than the simulator the gate trusted) fails, with the numbers
in the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.runtime.registry import ModelRegistry
from agent.update.probe import probe_inputs, run_probe
from controller.ota.probe import build_probe
from protos import probe as P
from protos.edgefleet.v1 import update_pb2
from protos.errors import Rejected
from protos.fsutil import sha256_file
from tests.helpers.fake_backends import DegradedOrtBackend
from tests.helpers.models import digits_assets, fingerprint

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("digits")
    out = digits_assets(folder, n_validation=64)
    from controller.models import digits

    out["v2"] = digits.build_digits_cnn(folder / "v2.onnx", variant="v2-head")
    return out


@pytest.fixture(scope="module")
def spec(assets: dict[str, Path]) -> update_pb2.ProbeSpec:
    s = build_probe(model_path=assets["cnn"], samples_path=assets["val"],
                    metric="top1-agreement", threshold=0.99)
    assert s is not None
    return s


def _activate(reg: ModelRegistry, path: Path, *, version: int = 1, variant: str = "",
              spec: update_pb2.ProbeSpec | None = None) -> None:
    reg.activate(name="digits", version=version, path=path, sha256=sha256_file(path),
                 fingerprint=fingerprint(), signature=None, variant=variant,
                 warmup_inputs=probe_inputs(spec))


def test_build_probe_takes_the_first_validation_samples_with_fp32_references(
        assets: dict[str, Path], spec: update_pb2.ProbeSpec) -> None:
    assert spec.metric == "top1-agreement"
    assert spec.threshold == pytest.approx(31 / 32)  # budget 0.99 on 32 samples: one flip
    assert len(spec.samples_npz) <= 256 * 1024
    probe = P.load_probe_set(spec.samples_npz)
    assert probe.n == 32 and set(probe.inputs) == {"input"} and set(probe.references) == {"logits"}
    with np.load(assets["val"]) as z:
        np.testing.assert_array_equal(probe.inputs["input"], z["inputs"][:32])
        labels = z["labels"][:32]
    assert (probe.references["logits"].argmax(1) == labels).mean() > 0.9  # a real FP32 run


def test_probe_passes_on_the_real_onnxruntime_backend(
        assets: dict[str, Path], spec: update_pb2.ProbeSpec) -> None:
    reg = ModelRegistry()
    try:
        _activate(reg, assets["cnn"], spec=spec)
        report = run_probe(reg, name="digits", version=1, variant="", spec=spec)
    finally:
        reg.close()
    assert report.passed, report.detail
    assert report.metric == "top1-agreement" and report.value == 1.0
    assert report.samples == 32 and report.threshold == pytest.approx(31 / 32)
    assert report.at_ms > 0 and "passed" in report.detail


def test_probe_fails_on_a_board_that_degrades_outputs(
        assets: dict[str, Path], spec: update_pb2.ProbeSpec,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_FAKE_DEGRADE", "2.0")  # the factor, as a test run sets it
    backend = DegradedOrtBackend(levels=8)
    assert backend.noise == 2.0
    reg = ModelRegistry(backends={"onnxruntime-cpu": backend})
    try:
        _activate(reg, assets["cnn"], spec=spec)  # the smoke check cannot tell: it loads
        report = run_probe(reg, name="digits", version=1, variant="", spec=spec)
    finally:
        reg.close()
    assert backend.engines and backend.engines[0].calls >= 32
    assert not report.passed
    assert report.value < 0.9 and report.samples == 32
    assert f"top1-agreement {report.value:.6g} < 0.96875" in report.detail
    assert "max-abs" in report.detail and "FAILED" in report.detail


def test_max_abs_probe_and_variant_selection(assets: dict[str, Path]) -> None:
    spec = build_probe(model_path=assets["cnn"], samples_path=assets["val"],
                       metric="max-abs-error", threshold=1e-4, max_samples=8)
    assert spec is not None and spec.metric == "max-abs" and spec.threshold == 1e-4
    reg = ModelRegistry()
    try:
        _activate(reg, assets["cnn"])
        _activate(reg, assets["v2"], variant="light")  # another head: other numbers
        reg.set_preferred_variant("light")  # serving prefers the variant...
        main = run_probe(reg, name="digits", version=1, variant="", spec=spec)
        light = run_probe(reg, name="digits", version=1, variant="light", spec=spec)
        missing = run_probe(reg, name="digits", version=2, variant="", spec=spec)
    finally:
        reg.close()
    assert main.passed and main.value < 1e-4, main.detail  # ...the probe asked for the main one
    assert not light.passed and light.value > 1e-3 and "variant 'light'" in light.detail
    assert not missing.passed and "probe not run" in missing.detail


def test_probe_is_capped_by_bytes(assets: dict[str, Path]) -> None:
    full = build_probe(model_path=assets["cnn"], samples_path=assets["val"],
                       metric="top1-agreement", threshold=0.99, max_samples=32)
    assert full is not None
    small = build_probe(model_path=assets["cnn"], samples_path=assets["val"],
                        metric="top1-agreement", threshold=0.99,
                        max_bytes=len(full.samples_npz) // 3)
    assert small is not None and len(small.samples_npz) <= len(full.samples_npz) // 3
    n = P.load_probe_set(small.samples_npz).n
    assert 1 <= n < 32
    assert small.threshold == pytest.approx((n - 1) / n)
    assert build_probe(model_path=assets["cnn"], samples_path=assets["val"],
                       metric="top1-agreement", threshold=0.99, max_bytes=100) is None


def test_probe_from_input_shapes_without_samples(assets: dict[str, Path]) -> None:
    assert build_probe(model_path=assets["cnn"], samples_path=None, metric="top1-agreement",
                       threshold=0.99) is None
    spec = build_probe(model_path=assets["cnn"], samples_path=None, metric="max-abs-error",
                       threshold=1e-4, input_shapes={"input": [1, 1, 8, 8]}, max_samples=4)
    assert spec is not None
    probe = P.load_probe_set(spec.samples_npz)
    assert probe.inputs["input"].shape == (4, 1, 8, 8)
    again = build_probe(model_path=assets["cnn"], samples_path=None, metric="max-abs-error",
                        threshold=1e-4, input_shapes={"input": [1, 8, 8]}, max_samples=4)
    assert again is not None and again.samples_npz == spec.samples_npz  # fixed seed, no batch
    reg = ModelRegistry()
    try:
        _activate(reg, assets["cnn"], spec=spec)
        assert run_probe(reg, name="digits", version=1, variant="", spec=spec).passed
    finally:
        reg.close()
    with pytest.raises(Rejected, match="contradicts"):
        build_probe(model_path=assets["cnn"], samples_path=None, metric="max-abs-error",
                    threshold=1e-4, input_shapes={"input": [1, 3, 8, 8]})
    with pytest.raises(Rejected, match="no shape"):
        build_probe(model_path=assets["cnn"], samples_path=None, metric="max-abs-error",
                    threshold=1e-4, input_shapes={"image": [1, 1, 8, 8]})


def test_bad_probe_data_is_a_failed_report_not_an_exception(
        assets: dict[str, Path], spec: update_pb2.ProbeSpec) -> None:
    reg = ModelRegistry()
    try:
        _activate(reg, assets["cnn"])
        garbage = update_pb2.ProbeSpec(samples_npz=b"PK\x03\x04 nope", metric="top1-agreement",
                                       threshold=0.9)
        r = run_probe(reg, name="digits", version=1, variant="", spec=garbage)
        assert not r.passed and "bad probe set" in r.detail and r.threshold == 0.9
        wrong_metric = update_pb2.ProbeSpec(samples_npz=spec.samples_npz, metric="cosine",
                                            threshold=0.9)
        r = run_probe(reg, name="digits", version=1, variant="", spec=wrong_metric)
        assert not r.passed and "unknown probe metric" in r.detail
        probe = P.load_probe_set(spec.samples_npz)
        renamed = P.ProbeSet(inputs={"image": probe.inputs["input"]},
                             references=probe.references)
        wrong_input = update_pb2.ProbeSpec(samples_npz=P.encode_probe_set(renamed),
                                           metric="top1-agreement", threshold=0.9)
        r = run_probe(reg, name="digits", version=1, variant="", spec=wrong_input)
        assert not r.passed and "inference failed on probe sample 0" in r.detail
        other_out = P.ProbeSet(inputs=probe.inputs, references={"scores": probe.references[
            "logits"]})
        r = run_probe(reg, name="digits", version=1, variant="",
                      spec=update_pb2.ProbeSpec(samples_npz=P.encode_probe_set(other_out),
                                                metric="max-abs", threshold=1.0))
        assert not r.passed and "did not produce outputs ['scores']" in r.detail
    finally:
        reg.close()
    assert probe_inputs(garbage) is None and probe_inputs(None) is None
    assert probe_inputs(update_pb2.ProbeSpec()) is None
    first = probe_inputs(spec)
    assert first is not None and first["input"].shape == (1, 1, 8, 8)


def test_probe_carries_the_gate_top1_options(assets: dict[str, Path]) -> None:
    opts = P.Top1Options(output="logits", score_threshold=0.5)
    spec = build_probe(model_path=assets["cnn"], samples_path=assets["val"],
                       metric="top1-drop", threshold=0.02, max_samples=16, options=opts)
    assert spec is not None and spec.metric == "top1-agreement"
    assert spec.threshold == pytest.approx(15 / 16)  # 1 - 0.02 on 16 samples: one flip
    assert P.load_probe_set(spec.samples_npz).options == opts
    with pytest.raises(Rejected, match="rank") as e:  # logits [N, 10] has no axis 2
        build_probe(model_path=assets["cnn"], samples_path=assets["val"],
                    metric="top1-agreement", threshold=0.99,
                    options=P.Top1Options(class_axis=2))
    assert e.value.reason == "metric_not_applicable"
    with pytest.raises(Rejected, match="not a model output"):
        build_probe(model_path=assets["cnn"], samples_path=assets["val"],
                    metric="top1-agreement", threshold=0.99,
                    options=P.Top1Options(output="boxes"))
