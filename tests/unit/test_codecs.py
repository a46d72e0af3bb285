"""Round trips and rejections of the OTA delta codecs (protos.codecs) on real ONNX pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from protos.codecs import CODECS, apply, make, plan, read_delta_header
from protos.codecs.container import file_sha256
from protos.errors import GiveUp, Rejected
from tests.helpers.models import fine_tuned as _perturb
from tests.helpers.models import layered_mlp as _mlp

SIZES = [64, 256, 256, 10]


def _pair(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    old, new = tmp_path / f"{kind}.old", tmp_path / f"{kind}.new"
    base = _mlp(SIZES)
    if kind == "head":
        onnx.save(base, old)
        onnx.save(_perturb(base, only="l2."), new)
    elif kind == "finetune":
        onnx.save(base, old)
        onnx.save(_perturb(base), new)
    elif kind == "arch":
        onnx.save(base, old)
        onnx.save(_mlp([64, 256, 128, 256, 10]), new)  # same seed: l0 identical, rest differ
    elif kind == "bytes":
        rng = np.random.default_rng(3)
        data = rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes()
        old.write_bytes(data)
        new.write_bytes(data[:1000] + b"inserted" + data[1000:200_000] + data[200_500:])
    elif kind == "zeros":
        old.write_bytes(bytes(1 << 20))
        z = bytearray(1 << 20)
        z[12345] = 7
        new.write_bytes(bytes(z))
    else:
        raise AssertionError(kind)
    return old, new


PAIRS = ("head", "finetune", "arch", "bytes", "zeros")


def _roundtrip(codec: str, old: Path | None, new: Path, tmp_path: Path) -> Path:
    delta = tmp_path / f"{new.name}.{codec}.delta"
    make(codec, old, new, delta)
    out = tmp_path / f"{new.name}.{codec}.out"
    apply(codec, old, delta, out, max_output_bytes=new.stat().st_size,
          expected_sha256=file_sha256(new))
    assert out.read_bytes() == new.read_bytes()
    return delta


@pytest.mark.parametrize("kind", PAIRS)
@pytest.mark.parametrize("codec", CODECS)
def test_roundtrip(codec: str, kind: str, tmp_path: Path) -> None:
    old, new = _pair(tmp_path, kind)
    if codec == "tensor-xor" and kind in ("bytes", "zeros"):
        with pytest.raises(GiveUp) as ei:
            make(codec, old, new, tmp_path / "d")
        assert ei.value.reason == "not_applicable"
        assert not (tmp_path / "d").exists()
        return
    delta = _roundtrip(codec, old, new, tmp_path)
    header = read_delta_header(delta)
    assert header.codec == codec
    assert header.target_sha256 == file_sha256(new)


def test_full_needs_no_base(tmp_path: Path) -> None:
    _, new = _pair(tmp_path, "finetune")
    delta = _roundtrip("full", None, new, tmp_path)
    assert read_delta_header(delta).base_sha256 is None


def test_tensorxor_beats_full_on_finetune_and_head(tmp_path: Path) -> None:
    for kind in ("finetune", "head"):
        old, new = _pair(tmp_path, kind)
        full = _roundtrip("full", old, new, tmp_path).stat().st_size
        txor = _roundtrip("tensor-xor", old, new, tmp_path).stat().st_size
        assert txor < 0.7 * full, (kind, txor, full)
    head_old, head_new = _pair(tmp_path, "head")
    stats: dict[str, object] = {}
    make("tensor-xor", head_old, head_new, tmp_path / "h.delta", stats=stats)
    assert stats["literal_bytes"] == 0  # the unchanged layers XOR to zeros, nothing literal


@pytest.mark.parametrize("kind", PAIRS)
def test_plan_never_larger_than_full(kind: str, tmp_path: Path) -> None:
    old, new = _pair(tmp_path, kind)
    choice = plan(old, new, tmp_path / "plan")
    assert choice.size <= choice.candidates["full"]["size"]
    assert all(c["size"] >= choice.size for c in choice.candidates.values() if "size" in c)
    assert choice.sha256 == file_sha256(choice.path)
    assert sorted(p.name for p in (tmp_path / "plan").iterdir()) == [choice.path.name]
    out = tmp_path / "planned.out"
    apply(choice.codec, old, choice.path, out, max_output_bytes=1 << 30,
          expected_sha256=file_sha256(new))
    assert out.read_bytes() == new.read_bytes()
    if kind in ("bytes", "zeros"):
        assert "error" in choice.candidates["tensor-xor"]


def test_plan_without_base_is_full(tmp_path: Path) -> None:
    _, new = _pair(tmp_path, "head")
    choice = plan(None, new, tmp_path / "plan")
    assert choice.codec == "full"
    assert choice.candidates["bsdiff4"] == {"error": "no_base"}


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("where", ["header", "body", "tail", "truncate"])
def test_tampered_delta_rejected_without_output(codec: str, where: str, tmp_path: Path) -> None:
    old, new = _pair(tmp_path, "finetune")
    delta = tmp_path / "delta"
    make(codec, old, new, delta)
    size = delta.stat().st_size
    if where == "header":
        _flip(delta, 40)  # inside the target sha256
    elif where == "body":
        _flip(delta, 120 + (size - 120) // 2)
    elif where == "tail":
        _flip(delta, size - 3)
    else:
        delta.write_bytes(delta.read_bytes()[: size // 2])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(Rejected):
        apply(codec, old, delta, out_dir / "model.onnx", max_output_bytes=1 << 30,
              expected_sha256=file_sha256(new))
    assert list(out_dir.iterdir()) == []  # no output, no temp file left behind


@pytest.mark.parametrize("codec", ["bsdiff4", "tensor-xor"])
def test_wrong_base_rejected(codec: str, tmp_path: Path) -> None:
    old, new = _pair(tmp_path, "finetune")
    delta = tmp_path / "delta"
    make(codec, old, new, delta)
    other = tmp_path / "other.onnx"
    onnx.save(_mlp(SIZES, seed=9), other)
    out = tmp_path / "out.onnx"
    with pytest.raises(Rejected) as ei:
        apply(codec, other, delta, out, max_output_bytes=1 << 30,
              expected_sha256=file_sha256(new))
    assert ei.value.reason == "delta_wrong_base"
    with pytest.raises(Rejected):
        apply(codec, None, delta, out, max_output_bytes=1 << 30, expected_sha256=file_sha256(new))
    assert not out.exists()


@pytest.mark.parametrize("codec", CODECS)
def test_limits_and_mismatches(codec: str, tmp_path: Path) -> None:
    old, new = _pair(tmp_path, "head")
    delta = tmp_path / "delta"
    make(codec, old, new, delta)
    out = tmp_path / "out.onnx"
    sha = file_sha256(new)
    with pytest.raises(Rejected) as ei:
        apply(codec, old, delta, out, max_output_bytes=new.stat().st_size - 1, expected_sha256=sha)
    assert ei.value.reason == "delta_too_large"
    with pytest.raises(Rejected) as ei:
        apply(codec, old, delta, out, max_output_bytes=1 << 30, expected_sha256=file_sha256(old))
    assert ei.value.reason == "delta_target_mismatch"
    other = next(c for c in CODECS if c != codec)
    with pytest.raises(Rejected) as ei:
        apply(other, old, delta, out, max_output_bytes=1 << 30, expected_sha256=sha)
    assert ei.value.reason == "delta_codec_mismatch"
    assert not out.exists()


def test_not_a_delta_rejected(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00" * 200)
    with pytest.raises(Rejected):
        apply("full", None, junk, tmp_path / "out", max_output_bytes=1 << 20,
              expected_sha256="0" * 64)
    assert not (tmp_path / "out").exists()
