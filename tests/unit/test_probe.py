"""protos.probe: the probe-set loader's limits and checks, the probe metrics, and the
controller's EdgeModel-metric -> probe-metric mapping."""

from __future__ import annotations

import io
import math
import zipfile

import numpy as np
import pytest

from controller.ota.probe import probe_metric
from protos import probe as P
from protos.errors import Rejected


def _probe(n: int = 4, **opts: object) -> P.ProbeSet:
    rng = np.random.default_rng(0)
    return P.ProbeSet(inputs={"x": rng.random((n, 1, 8, 8)).astype(np.float32)},
                      references={"logits": rng.standard_normal((n, 10)).astype(np.float32)},
                      options=P.Top1Options(**opts))  # type: ignore[arg-type]


def _npz(**arrays: object) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def test_round_trip_keeps_arrays_and_options() -> None:
    src = _probe(5, output="logits", class_axis=1, class_offset=2, score_threshold=0.5)
    got = P.load_probe_set(P.encode_probe_set(src))
    assert got.n == 5
    np.testing.assert_array_equal(got.inputs["x"], src.inputs["x"])
    np.testing.assert_array_equal(got.references["logits"], src.references["logits"])
    assert got.options == src.options
    assert got.sample(3)["x"].shape == (1, 1, 8, 8)
    default = P.load_probe_set(P.encode_probe_set(_probe(2), compress=False))
    assert default.options == P.Top1Options()


def test_pickled_objects_are_refused() -> None:
    buf = io.BytesIO()
    np.savez(buf, x=np.array([{"evil": 1}], dtype=object), ref__y=np.zeros((1, 2)),
             allow_pickle=True)
    with pytest.raises(Rejected, match="pickles") as e:
        P.load_probe_set(buf.getvalue())
    assert e.value.reason == "bad_probe"


def test_too_many_wire_bytes_are_refused() -> None:
    data = P.encode_probe_set(_probe(4))
    with pytest.raises(Rejected, match="max_probe_bytes") as e:
        P.load_probe_set(data, max_bytes=len(data) - 1)
    assert e.value.reason == "probe_too_large"


def test_decompression_bomb_is_refused_before_decoding() -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.zeros((1, 64 << 20), np.uint8), ref__y=np.zeros((1, 1)))
    data = buf.getvalue()
    assert len(data) < P.MAX_PROBE_BYTES  # small on the wire, 64 MiB decoded
    with pytest.raises(Rejected, match="max_probe_decoded_bytes") as e:
        P.load_probe_set(data)
    assert e.value.reason == "probe_too_large"


def test_npy_header_claiming_a_huge_array_is_refused() -> None:
    from numpy.lib import format as npy

    member = io.BytesIO()
    npy.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False,
                                        "shape": (1, 10**12)})
    member.write(b"\0" * 16)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.npy", member.getvalue())
        zf.writestr("ref__y.npy", _npy(np.zeros((1, 2), np.float32)))
    with pytest.raises(Rejected, match="max_probe_decoded_bytes"):
        P.load_probe_set(buf.getvalue())


def _npy(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def test_too_many_samples_or_arrays_are_refused() -> None:
    with pytest.raises(Rejected, match="max_probe_samples") as e:
        P.load_probe_set(P.encode_probe_set(_probe(10)), max_samples=8)
    assert e.value.reason == "probe_too_large"
    many = {f"in{i}": np.zeros((1, 1), np.float32) for i in range(10)}
    with pytest.raises(Rejected, match="arrays"):
        P.load_probe_set(_npz(**many, ref__y=np.zeros((1, 1))), max_arrays=5)


@pytest.mark.parametrize(("data", "match"), [
    (b"", "empty"),
    (b"not a zip at all", "not an npz"),
    (_npz(x=np.zeros((2, 3), np.float32)), "references"),
    (_npz(ref__y=np.zeros((2, 3), np.float32)), "input arrays"),
    (_npz(x=np.zeros((2, 3), np.float32), ref__y=np.zeros((3, 3))), "same non-zero sample"),
    (_npz(x=np.zeros((0, 3), np.float32), ref__y=np.zeros((0, 3))), "same non-zero sample"),
    (_npz(x=np.zeros((2, 3)), ref__y=np.zeros((2, 3)), opt__colour=np.array(1)),
     "unknown probe options"),
    (_npz(x=np.zeros((2, 3)), ref__y=np.zeros((2, 3)), opt__output=np.array("z")),
     "not a reference"),
    (_npz(x=np.zeros((2, 3)), ref__y=np.zeros((2, 3)), opt__class_axis=np.array(0)),
     "class_axis"),
    (_npz(x=np.zeros((2, 3)), ref__y=np.zeros((2, 3)), opt__class_axis=np.array([1, 2])),
     "scalars"),
    (_npz(x=np.array(["a", "b"]), ref__y=np.zeros((2, 3))), "number type"),
    (_npz(x=np.float32(1.0), ref__y=np.zeros((2, 3))), "scalar"),
])
def test_wrong_layouts_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(Rejected, match=match) as e:
        P.load_probe_set(data)
    assert e.value.reason == "bad_probe"


def test_reserved_input_names_cannot_be_encoded() -> None:
    bad = P.ProbeSet(inputs={"ref__x": np.zeros((1, 2))}, references={"y": np.zeros((1, 2))})
    with pytest.raises(Rejected, match="reserved"):
        P.encode_probe_set(bad)


def test_top1_agreement_matches_the_gate_definition() -> None:
    ref = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.3, 0.3, 0.4]])
    cand = ref.copy()
    cand[0] = [0.9, 0.1, 0.0]  # flips sample 0
    assert P.top1_agreement(ref, cand) == pytest.approx(0.75)
    assert P.top1_agreement(ref, ref) == 1.0
    # score threshold: only positions where FP32 is confident count (samples 0 and 1)
    assert P.top1_agreement(ref, cand, options=P.Top1Options(score_threshold=0.75)) == 0.5
    # class offset: channels before it (e.g. YOLO boxes) are ignored
    det = np.zeros((1, 6, 4))  # [N, 4 box + 2 classes, positions]
    det[0, 0] = 100.0          # a huge box coordinate must not be a "class"
    det[0, 4, :2] = 1.0
    det[0, 5, 2:] = 1.0
    moved = det.copy()
    moved[0, 5, 0] = 2.0       # one position changes class
    opts = P.Top1Options(class_offset=4)
    assert P.top1_agreement(det, moved, options=opts) == 0.75
    nan = cand.copy()
    nan[1, 1] = np.nan
    assert P.top1_agreement(ref, nan) == 0.0
    with pytest.raises(Rejected, match="rank") as e:
        P.top1_agreement(np.zeros(3), np.zeros(3))
    assert e.value.reason == "metric_not_applicable"


def test_error_metrics() -> None:
    ref = np.array([[1.0, 2.0], [3.0, 4.0]])
    cand = ref + np.array([[0.0, 0.5], [0.1, 0.0]])
    assert P.max_abs_error(ref, cand) == pytest.approx(0.5)
    assert P.relative_error(ref, cand) == pytest.approx(0.5 / math.hypot(1, 2))
    bad = cand.copy()
    bad[0, 0] = np.inf
    assert P.max_abs_error(ref, bad) == math.inf
    assert P.relative_error(ref, bad) == math.inf


def test_evaluate_pass_fail_and_detail() -> None:
    refs = {"logits": np.eye(4, dtype=np.float32), "aux": np.zeros((4, 2), np.float32)}
    outs = {"logits": np.eye(4, dtype=np.float32)[[0, 1, 2, 0]],
            "aux": np.full((4, 2), 0.25, np.float32)}
    r = P.evaluate("top1-agreement", refs, outs, threshold=0.75)
    assert r.passed and r.value == 0.75
    assert "top1-agreement 0.75 >= 0.75" in r.detail and "max-abs 1" in r.detail
    r = P.evaluate("top1-agreement", refs, outs, threshold=0.8)
    assert not r.passed and "0.75 < 0.8" in r.detail
    r = P.evaluate("max-abs", refs, outs, threshold=0.3, options=P.Top1Options(output="aux"))
    assert not r.passed and r.value == 1.0 and "'logits'" in r.detail
    r = P.evaluate("max-abs", {"aux": refs["aux"]}, outs, threshold=0.3)
    assert r.passed and r.value == 0.25
    assert not P.evaluate("relative-error", refs, outs, threshold=0.1).passed
    with pytest.raises(Rejected, match="unknown probe metric"):
        P.evaluate("cosine", refs, outs, threshold=0.9)
    with pytest.raises(Rejected, match="did not produce"):
        P.evaluate("max-abs", refs, {"logits": outs["logits"]}, threshold=1)
    with pytest.raises(Rejected, match="shape"):
        P.evaluate("max-abs", refs, {**outs, "aux": np.zeros((4, 3))}, threshold=1)


@pytest.mark.parametrize(("metric", "budget", "n", "want"), [
    ("top1-agreement", 0.99, 32, ("top1-agreement", 31 / 32)),
    ("top1-agreement", 1.0, 32, ("top1-agreement", 1.0)),
    ("top1-agreement", 0.9, 10, ("top1-agreement", 0.9)),
    ("top1-agreement", 0.95, 32, ("top1-agreement", 30 / 32)),
    ("top1-drop", 0.01, 32, ("top1-agreement", 31 / 32)),
    ("top1-drop", 0.0, 8, ("top1-agreement", 1.0)),
    ("max-abs-error", 0.05, 32, ("max-abs", 0.05)),
    ("max-abs", 0.05, 32, ("max-abs", 0.05)),
    ("relative-error", 0.02, 32, ("relative-error", 0.02)),
])
def test_edgemodel_metric_mapping(metric: str, budget: float, n: int,
                                  want: tuple[str, float]) -> None:
    name, thr = probe_metric(metric, budget, samples=n)
    assert name == want[0]
    assert thr == pytest.approx(want[1])


def test_mapping_refuses_unknown_metrics_and_bad_budgets() -> None:
    with pytest.raises(Rejected, match="unknown accuracy metric"):
        probe_metric("cosine", 0.9, samples=4)
    with pytest.raises(Rejected, match="budget"):
        probe_metric("max-abs-error", float("nan"), samples=4)


def test_top1_options_follow_the_gate_accuracy_spec() -> None:
    from controller.compile.deviceclass import AccuracySpec
    from controller.ota.probe import top1_options

    spec = AccuracySpec(metric="top1-agreement", budget=0.95, output="output0", class_axis=1,
                        class_offset=4, score_threshold=0.25)
    assert top1_options(spec) == P.Top1Options(output="output0", class_axis=1, class_offset=4,
                                                score_threshold=0.25)
    assert top1_options(None) == P.Top1Options()
