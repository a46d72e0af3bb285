"""ONNX wire walker, block-bsdiff paths, time limit and the operator CLI of protos.codecs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from protos.codecs import apply, make
from protos.codecs.cli import delta_apply, delta_make
from protos.codecs.container import file_sha256
from protos.codecs.onnxwire import RAW_DATA, NotOnnx, tensor_spans
from protos.errors import GiveUp, Rejected


def _model_with_subgraph() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w")
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
        rng.normal(size=(8,)).astype(np.float32), "cval"))
    then_g = helper.make_graph([helper.make_node("Identity", ["c"], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [8])])
    else_init = numpy_helper.from_array(np.arange(8, dtype=np.int64), "e_init")
    else_g = helper.make_graph([helper.make_node("Cast", ["e_init"], ["e_out"], to=1)], "else",
                               [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [8])],
                               [else_init])
    nodes = [const, helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g)]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                     helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [8])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_spans_match_onnx_raw_data_including_subgraphs(tmp_path: Path) -> None:
    m = _model_with_subgraph()
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    buf = path.read_bytes()
    spans = {s.name.decode(): s for s in tensor_spans(buf)}
    assert set(spans) == {"w", "cval", "e_init"}
    expected = {"w": m.graph.initializer[0], "cval": m.graph.node[0].attribute[0].t,
                "e_init": next(a.g for a in m.graph.node[2].attribute
                               if a.name == "else_branch").initializer[0]}
    for name, t in expected.items():
        s = spans[name]
        assert s.field == RAW_DATA
        assert buf[s.offset:s.offset + s.length] == t.raw_data
        assert s.dims == tuple(t.dims) and s.dtype == t.data_type
    assert spans["e_init"].elem_bytes == 8 and spans["w"].elem_bytes == 4


def test_float_data_tensors_are_spans(tmp_path: Path) -> None:
    t = helper.make_tensor("fd", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])  # float_data
    g = helper.make_graph([helper.make_node("Identity", ["fd"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [t])
    buf = helper.make_model(g).SerializeToString()
    (span,) = tensor_spans(buf)
    assert np.frombuffer(buf[span.offset:span.offset + span.length], "<f4").tolist() == \
        [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("data", [b"", b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f", b"hello world",
                                  bytes(range(256)) * 4])
def test_non_onnx_bytes_raise(data: bytes) -> None:
    with pytest.raises(NotOnnx):
        tensor_spans(data)


def test_deep_nesting_is_refused() -> None:
    # GraphProto.node(1) -> NodeProto.attribute(5) -> AttributeProto.g(6) -> ... 200 deep
    inner = b""
    for _ in range(200):
        attr = b"\x32" + _varint(len(inner)) + inner             # AttributeProto.g
        node = b"\x2a" + _varint(len(attr)) + attr               # NodeProto.attribute
        inner = b"\x0a" + _varint(len(node)) + node              # GraphProto.node
    model = b"\x3a" + _varint(len(inner)) + inner                # ModelProto.graph
    with pytest.raises(NotOnnx):
        tensor_spans(model)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


@pytest.mark.parametrize("size", [40_000, 3_000_000])  # in-process and in worker processes
def test_block_codec_uses_bsdiff_where_it_wins(size: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    old_b = rng.integers(0, 256, size, dtype=np.uint8)
    new_b = old_b.copy()
    new_b[::16] += 1  # every 16th byte changes: bsdiff's diff stream is nearly all zeros
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(old_b.tobytes())
    new.write_bytes(new_b.tobytes())
    stats: dict[str, object] = {}
    delta = tmp_path / "d"
    make("bsdiff4", old, new, delta, stats=stats)
    assert "bsdiff" in stats["blocks"]  # type: ignore[operator]
    assert delta.stat().st_size < size // 4
    out = tmp_path / "out.bin"
    apply("bsdiff4", old, delta, out, max_output_bytes=size, expected_sha256=file_sha256(new))
    assert out.read_bytes() == new.read_bytes()


def test_block_codec_time_limit(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(rng.integers(0, 256, 3_000_000, dtype=np.uint8).tobytes())
    new.write_bytes(rng.integers(0, 256, 3_000_000, dtype=np.uint8).tobytes())
    with pytest.raises(GiveUp) as ei:
        make("bsdiff4", old, new, tmp_path / "d", time_limit_s=0.0)
    assert ei.value.reason == "timeout"
    assert not (tmp_path / "d").exists()


def test_cli_make_and_apply(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    old, new = tmp_path / "old.onnx", tmp_path / "new.onnx"
    m = _model_with_subgraph()
    onnx.save(m, old)
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        rng.normal(size=(8, 8)).astype(np.float32), "w"))
    onnx.save(m, new)
    report = delta_make(old, new, tmp_path / "out" / "x.efdelta")
    json.dumps(report)  # JSON-able for the CLI
    assert report["codec"] in report["candidates"]
    assert report["target_sha256"] == file_sha256(new)
    delta = Path(report["out"])
    res = delta_apply(old, delta, tmp_path / "rebuilt.onnx", expected_sha256=None)
    assert (tmp_path / "rebuilt.onnx").read_bytes() == new.read_bytes()
    assert res["sha256"] == file_sha256(new)
    with pytest.raises(Rejected):
        delta_apply(old, delta, tmp_path / "again.onnx", expected_sha256=file_sha256(old))
    assert not (tmp_path / "again.onnx").exists()


def _records(delta: Path) -> list[tuple[int, int, int, int, int]]:
    """(method, new_len, old_off, old_len, payload_len) of every record of a bsdiff4 delta."""
    from protos.codecs.blocks import REC
    from protos.codecs.container import HEADER_BYTES

    buf, pos, out = delta.read_bytes(), HEADER_BYTES, []
    while pos < len(buf):
        rec = REC.unpack_from(buf, pos)
        out.append(rec)
        pos += REC.size + rec[4]
    assert pos == len(buf)
    return out


def test_block_codec_small_zstd_pieces_and_copies(tmp_path: Path) -> None:
    from protos.codecs.blocks import COPY, ZSTD, ZSTD_PIECE_BYTES

    rng = np.random.default_rng(8)
    old_b = rng.integers(0, 256, 5_000_000, dtype=np.uint8).tobytes()
    new_b = old_b[:100] + b"\x00" * 7 + old_b[107:3_000_000] + b"inserted" + old_b[3_000_000:]
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(old_b)
    new.write_bytes(new_b)
    delta = tmp_path / "d"
    make("bsdiff4", old, new, delta)
    recs = _records(delta)
    assert sum(r[1] for r in recs) == len(new_b)
    assert all(r[1] <= ZSTD_PIECE_BYTES for r in recs if r[0] == ZSTD)
    # the unchanged 512 KiB pieces of changed blocks are COPY records, not zstd payloads
    assert sum(1 for r in recs if r[0] == COPY) >= 4
    assert delta.stat().st_size < 20_000
    out = tmp_path / "out.bin"
    apply("bsdiff4", old, delta, out, max_output_bytes=len(new_b), expected_sha256=file_sha256(new))
    assert out.read_bytes() == new_b


def test_block_records_of_the_first_encoder_still_apply(tmp_path: Path) -> None:
    """Deltas made before the ZSTD pieces (one 2 MiB ZSTD record with a level-12 frame against
    a 2.5 MiB window) use the same format and still apply."""
    import zstandard

    from protos.codecs.blocks import REC, ZSTD, ZSTD_PIECE_BYTES
    from protos.codecs.container import Header

    rng = np.random.default_rng(9)
    old_b = rng.integers(0, 256, 2_600_000, dtype=np.uint8).tobytes()
    new_b = old_b[:2_097_152]
    new_b = new_b[:5000] + b"changed" + new_b[5007:]
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(old_b)
    new.write_bytes(new_b)
    window = old_b[:2_097_152 + (256 << 10)]
    payload = zstandard.ZstdCompressor(level=12, dict_data=zstandard.ZstdCompressionDict(
        window, dict_type=zstandard.DICT_TYPE_RAWCONTENT)).compress(new_b)
    assert len(new_b) > ZSTD_PIECE_BYTES
    header = Header(codec="bsdiff4", target_size=len(new_b), target_sha256=file_sha256(new),
                    base_size=len(old_b), base_sha256=file_sha256(old))
    delta = tmp_path / "old-style.efdelta"
    delta.write_bytes(header.pack() + REC.pack(ZSTD, len(new_b), 0, len(window), len(payload))
                      + payload)
    out = tmp_path / "out.bin"
    apply("bsdiff4", old, delta, out, max_output_bytes=len(new_b), expected_sha256=file_sha256(new))
    assert out.read_bytes() == new_b


def test_verify_hashes_without_writing(tmp_path: Path) -> None:
    from protos.codecs.core import verify

    rng = np.random.default_rng(10)
    old, new = tmp_path / "old.onnx", tmp_path / "new.onnx"
    m = _model_with_subgraph()
    onnx.save(m, old)
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        rng.normal(size=(8, 8)).astype(np.float32), "w"))
    onnx.save(m, new)
    work = tmp_path / "work"
    work.mkdir()
    for codec in ("full", "bsdiff4", "tensor-xor"):
        delta = work / f"{codec}.efdelta"
        make(codec, old, new, delta)
        verify(codec, old, delta, expected_sha256=file_sha256(new))
        with pytest.raises(Rejected) as ei:
            verify(codec, old, delta, expected_sha256=file_sha256(old))
        assert ei.value.reason == "delta_target_mismatch"
        data = bytearray(delta.read_bytes())
        data[-3] ^= 0x5A
        delta.write_bytes(bytes(data))
        with pytest.raises(Rejected):
            verify(codec, old, delta, expected_sha256=file_sha256(new))
    assert sorted(p.name for p in work.iterdir()) == sorted(
        f"{c}.efdelta" for c in ("full", "bsdiff4", "tensor-xor"))


def test_plan_remakes_full_at_best_level_only_where_it_pays(tmp_path: Path) -> None:
    from protos.codecs import plan
    from protos.codecs.full import LEVEL_BEST

    rng = np.random.default_rng(11)
    words = [bytes(rng.integers(97, 123, int(rng.integers(2, 9)), dtype=np.uint8))
             for _ in range(3000)]
    text = tmp_path / "text.bin"  # text-like: level 19 is clearly smaller than the fast level
    text.write_bytes(b" ".join(words[i] for i in rng.integers(0, 3000, 400_000)))
    choice = plan(None, text, tmp_path / "p1")
    full = choice.candidates["full"]
    assert choice.codec == "full" and full["level"] == LEVEL_BEST
    assert full["best_level_sample_gain"] >= 0.005
    fast = tmp_path / "fast.efdelta"
    make("full", None, text, fast)
    assert choice.size < fast.stat().st_size
    out = tmp_path / "text.out"
    apply("full", None, choice.path, out, max_output_bytes=1 << 30,
          expected_sha256=file_sha256(text))
    assert out.read_bytes() == text.read_bytes()
    noise = tmp_path / "noise.bin"  # incompressible: the samples say level 19 does not pay
    noise.write_bytes(rng.integers(0, 256, 1_000_000, dtype=np.uint8).tobytes())
    full = plan(None, noise, tmp_path / "p2").candidates["full"]
    assert "level" not in full and full["best_level_sample_gain"] < 0.005
