"""Codec ``tensor-xor``: float-aware ONNX delta (XOR of matching tensors by byte plane + zstd).

``make`` (controller) walks both ONNX files with :mod:`protos.codecs.onnxwire`, pairs tensor
payloads by (name, occurrence, field) when dtype, dims and length agree, and describes the new
file as a list of ops in file order:

* ``GAP``  next bytes of the "skeleton" (everything that is not a tensor payload: graph,
  names, shapes), zstd-compressed with the old file's skeleton as dictionary;
* ``XOR``  new = old[old_off:old_off+len] XOR data, data stored byte-shuffled (all byte 0s of
  each element, then all byte 1s, ...) in one zstd stream;
* ``LIT``  new bytes stored byte-shuffled in the same stream (unmatched tensors, or a matched
  piece whose XOR compresses worse than the literal).

Tensors are cut in pieces of at most ``PIECE_BYTES``, so ``apply`` (agent, pure byte operations
on an mmap of the old file) holds one piece at a time. Layout: docs/deltas.md.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import zstandard

from protos.codecs.container import (
    READ_CHUNK_BYTES,
    BoundedReader,
    Header,
    Sink,
    file_sha256,
)
from protos.codecs.full import zstd_params
from protos.codecs.onnxwire import NotOnnx, TensorSpan, tensor_spans
from protos.errors import GiveUp, Rejected

GAP, XOR, LIT = 0, 1, 2
PIECE_BYTES = 4 << 20
MAX_META_BYTES = 64 << 20
DATA_LEVEL = 9
SKELETON_LEVEL = 19
_OP = struct.Struct("<BBQQ")    # kind, elem_bytes, length, old_off
_SPAN = struct.Struct("<QQ")    # old payload offset, length
_ELEMS = (1, 2, 4, 8)


def shuffle(data: bytes, elem: int) -> bytes:
    """Byte planes: byte 0 of every element, then byte 1, ..."""
    if elem == 1:
        return data
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, elem).T.tobytes()


def unshuffle(data: bytes, elem: int) -> bytes:
    if elem == 1:
        return data
    return np.frombuffer(data, dtype=np.uint8).reshape(elem, -1).T.tobytes()


def _xor(a: bytes | memoryview, b: bytes | memoryview) -> bytes:
    return np.bitwise_xor(np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)) \
        .tobytes()


def _skeleton(buf: bytes | mmap.mmap, spans: list[tuple[int, int]]) -> bytes:
    parts, pos = [], 0
    for off, n in spans:
        parts.append(buf[pos:off])
        pos = off + n
    parts.append(buf[pos:])
    return b"".join(bytes(p) for p in parts)


def _zdict(data: bytes) -> zstandard.ZstdCompressionDict | None:
    return zstandard.ZstdCompressionDict(data, dict_type=zstandard.DICT_TYPE_RAWCONTENT) \
        if data else None


def _pieces(span: TensorSpan) -> Iterator[tuple[int, int]]:
    elem = span.elem_bytes if span.length % span.elem_bytes == 0 else 1
    step = max(elem, PIECE_BYTES - PIECE_BYTES % elem)
    for off in range(0, span.length, step):
        yield off, min(step, span.length - off)


def make_tensorxor(old: Path | None, new: Path, out_f: BinaryIO,
                   *, stats: dict[str, object] | None = None) -> Header:
    """Write the delta; GiveUp(reason='not_applicable') when the files are not ONNX or share
    no tensor (the planner then skips this codec)."""
    if old is None or old.stat().st_size == 0 or new.stat().st_size == 0:
        raise GiveUp("tensor-xor needs two non-empty ONNX files", reason="not_applicable")
    with open(old, "rb") as fo, open(new, "rb") as fn, \
            mmap.mmap(fo.fileno(), 0, access=mmap.ACCESS_READ) as om, \
            mmap.mmap(fn.fileno(), 0, access=mmap.ACCESS_READ) as nm, \
            contextlib.ExitStack() as stack:
        try:
            new_spans, old_spans = tensor_spans(nm), tensor_spans(om)
        except NotOnnx as e:
            raise GiveUp(f"tensor-xor: not an ONNX file ({e})", reason="not_applicable") from e
        by_key = {s.key: s for s in old_spans}
        ops: list[tuple[int, int, int, int]] = []
        pos = matched = 0
        data_parts: list[tuple[int, int, int, int, int]] = []  # kind, elem, new_off, old_off, n
        for s in new_spans:
            if s.offset > pos:
                ops.append((GAP, 1, s.offset - pos, 0))
            o = by_key.get(s.key)
            ok = o is not None and (o.dtype, o.dims, o.length) == (s.dtype, s.dims, s.length)
            elem = s.elem_bytes if s.length % s.elem_bytes == 0 else 1
            for off, n in _pieces(s):
                kind = XOR if ok else LIT
                old_off = o.offset + off if (ok and o is not None) else 0
                ops.append((kind, elem, n, old_off))
                data_parts.append((kind, elem, s.offset + off, old_off, n))
                matched += n if ok else 0
            pos = s.offset + s.length
        if pos < len(nm):
            ops.append((GAP, 1, len(nm) - pos, 0))
        if matched == 0:
            raise GiveUp("tensor-xor: no tensor of the new file matches the old one",
                         reason="not_applicable")
        old_skel_spans = [(s.offset, s.length) for s in old_spans]
        new_skel = _skeleton(nm, [(s.offset, s.length) for s in new_spans])
        old_skel = _skeleton(om, old_skel_spans)
        header = Header(codec="tensor-xor", target_size=len(nm),
                        target_sha256=file_sha256(new, memo=True),
                        base_size=len(om), base_sha256=file_sha256(old, memo=True))
        out_f.write(header.pack())
        # ops are rewritten below when a matched piece is cheaper as a literal; the data stream
        # goes to a temp file beside the output (it follows the op table in the delta), so the
        # compressed data is never held in memory
        data_z = tempfile.TemporaryFile(prefix=".efdelta-data-", dir=_dir_of(out_f))
        stack.callback(data_z.close)
        final_kinds, lit_bytes = _write_data(data_parts, nm, om, data_z)
        ops = _with_kinds(ops, final_kinds)
        meta = b"".join([struct.pack("<I", len(old_skel_spans))]
                        + [_SPAN.pack(o, n) for o, n in old_skel_spans]
                        + [struct.pack("<I", len(ops))] + [_OP.pack(*op) for op in ops])
        meta_z = zstandard.ZstdCompressor(compression_params=zstd_params(
            SKELETON_LEVEL, size=len(meta))).compress(meta)
        skel_z = zstandard.ZstdCompressor(
            compression_params=zstd_params(SKELETON_LEVEL, size=len(old_skel) + len(new_skel)),
            dict_data=_zdict(old_skel)).compress(new_skel)
        for raw_len, z in ((len(meta), meta_z), (len(new_skel), skel_z)):
            out_f.write(struct.pack("<QQ", raw_len, len(z)))
            out_f.write(z)
        data_z_bytes = data_z.tell()
        data_z.seek(0)
        shutil.copyfileobj(data_z, out_f, READ_CHUNK_BYTES)
        if stats is not None:
            stats.update(tensors=len(new_spans), matched_bytes=matched, literal_bytes=lit_bytes,
                         skeleton_bytes=len(new_skel), skeleton_z_bytes=len(skel_z),
                         data_z_bytes=data_z_bytes)
        return header


def _dir_of(f: BinaryIO) -> str | None:
    name = getattr(f, "name", None)
    if not isinstance(name, str):
        return None
    return os.path.dirname(name) or None


def _write_data(data_parts: list[tuple[int, int, int, int, int]], nm: mmap.mmap, om: mmap.mmap,
                data_z: BinaryIO) -> tuple[list[int], int]:
    """Compress the byte-shuffled XOR / literal payloads into ``data_z``; a matched piece whose
    XOR compresses worse (zstd -1) than its literal becomes a literal. Returns (kinds, literal
    bytes)."""
    cctx = zstandard.ZstdCompressor(compression_params=zstd_params(DATA_LEVEL))
    fast = zstandard.ZstdCompressor(level=1)
    kinds: list[int] = []
    lit_bytes = 0
    with cctx.stream_writer(data_z, closefd=False) as w:
        for kind, elem, new_off, old_off, n in data_parts:
            new_b = nm[new_off:new_off + n]
            lit = shuffle(new_b, elem)
            if kind == XOR:
                x = shuffle(_xor(new_b, om[old_off:old_off + n]), elem)
                if len(fast.compress(x)) > len(fast.compress(lit)):
                    kind, x = LIT, lit
                w.write(x)
            else:
                w.write(lit)
            lit_bytes += n if kind == LIT else 0
            kinds.append(kind)
    return kinds, lit_bytes


def _with_kinds(ops: list[tuple[int, int, int, int]],
                kinds: list[int]) -> list[tuple[int, int, int, int]]:
    it = iter(kinds)
    return [op if op[0] == GAP else (next(it), op[1], op[2], op[3] if op[0] == XOR else 0)
            for op in ops]


def _read_z(r: BoundedReader, *, limit: int, what: str) -> tuple[int, bytes]:
    raw_len, zlen = r.u64(what), r.u64(what)
    if raw_len > limit:
        raise Rejected(f"{what} declares {raw_len} bytes, over {limit}", reason="delta_malformed")
    return raw_len, r.exact(zlen, what)


def _parse_meta(meta: bytes, *, old_size: int, target_size: int,
                skel_len: int) -> tuple[list[tuple[int, int]], list[tuple[int, int, int, int]]]:
    try:
        (n_spans,) = struct.unpack_from("<I", meta, 0)
        pos = 4
        spans = [_SPAN.unpack_from(meta, pos + i * _SPAN.size) for i in range(n_spans)]
        pos += n_spans * _SPAN.size
        (n_ops,) = struct.unpack_from("<I", meta, pos)
        pos += 4
        ops = [_OP.unpack_from(meta, pos + i * _OP.size) for i in range(n_ops)]
        pos += n_ops * _OP.size
    except struct.error as e:
        raise Rejected("tensor-xor op table is truncated", reason="delta_malformed") from e
    if pos != len(meta):
        raise Rejected("tensor-xor op table has trailing bytes", reason="delta_malformed")
    end = 0
    for off, n in spans:
        if off < end or off + n > old_size:
            raise Rejected("tensor-xor base spans out of order or range", reason="delta_malformed")
        end = off + n
    total = gaps = 0
    for kind, elem, n, old_off in ops:
        if kind not in (GAP, XOR, LIT) or elem not in _ELEMS or n % elem or \
                (kind != GAP and n > PIECE_BYTES) or (kind == XOR and old_off + n > old_size):
            raise Rejected("tensor-xor op out of bounds", reason="delta_malformed")
        total += n
        gaps += n if kind == GAP else 0
    if total != target_size or gaps != skel_len:
        raise Rejected("tensor-xor ops do not add up to the target", reason="delta_malformed")
    return spans, ops


def _read_exact(reader: BinaryIO, n: int, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = reader.read(n - len(buf))
        if not chunk:
            raise Rejected(f"tensor-xor {what} stream ends early", reason="delta_malformed")
        buf += chunk
    return bytes(buf)


def apply_tensorxor(r: BoundedReader, header: Header, old: Path | None,
                    sink: Sink) -> None:
    if old is None:
        raise Rejected("tensor-xor delta needs the base file", reason="delta_wrong_base")
    meta_len, meta_z = _read_z(r, limit=MAX_META_BYTES, what="op table")
    skel_len, skel_z = _read_z(r, limit=header.target_size, what="skeleton")
    try:
        meta = zstandard.ZstdDecompressor().decompress(meta_z, max_output_size=meta_len)
    except zstandard.ZstdError as e:
        raise Rejected(f"corrupt tensor-xor op table: {e}", reason="delta_malformed") from e
    spans, ops = _parse_meta(meta, old_size=header.base_size, target_size=header.target_size,
                             skel_len=skel_len)
    with open(old, "rb") as fo, mmap.mmap(fo.fileno(), 0, access=mmap.ACCESS_READ) as om:
        skel_dctx = zstandard.ZstdDecompressor(dict_data=_zdict(_skeleton(om, spans)))
        data_dctx = zstandard.ZstdDecompressor()
        with skel_dctx.stream_reader(io.BytesIO(skel_z)) as skel, \
                data_dctx.stream_reader(r.f, closefd=False) as data:
            for kind, elem, n, old_off in ops:
                if kind == GAP:
                    sink.write(_read_exact(skel, n, "skeleton"))
                    continue
                piece = unshuffle(_read_exact(data, n, "tensor data"), elem)
                sink.write(_xor(piece, om[old_off:old_off + n]) if kind == XOR else piece)
