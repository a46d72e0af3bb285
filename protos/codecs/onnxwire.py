"""Minimal protobuf wire-format walker that finds tensor payloads inside an ONNX file.

The ``onnx`` package is not available on boards and cannot give byte offsets, so
:mod:`protos.codecs.tensorxor` (``make`` only, on the controller) uses this to list every
TensorProto payload (``raw_data``, packed ``float_data`` / ``double_data``) with its name, dtype,
dims and byte span in the file. Field numbers are from onnx.proto:
ModelProto.graph=7, .training_info=20 (TrainingInfoProto.initialization=1, .algorithm=2);
GraphProto.node=1, .initializer=5, .sparse_initializer=15 (SparseTensorProto.values=1,
.indices=2); NodeProto.attribute=5; AttributeProto.t=5, .g=6, .tensors=10, .graphs=11,
.sparse_tensor=22, .sparse_tensors=23; TensorProto.dims=1, .data_type=2, .float_data=4,
.name=8, .raw_data=9, .double_data=10.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass

MAX_DEPTH = 64

# TensorProto.DataType -> element size in bytes (used to byte-shuffle); default 1
_ELEM_BYTES = {1: 4, 4: 2, 5: 2, 6: 4, 7: 8, 10: 2, 11: 8, 12: 4, 13: 8, 14: 4, 15: 8, 16: 2}
RAW_DATA, FLOAT_DATA, DOUBLE_DATA = 9, 4, 10


class NotOnnx(ValueError):
    """The bytes do not parse as an ONNX ModelProto."""


@dataclass(frozen=True)
class TensorSpan:
    """One tensor payload: where its bytes are in the file and what they are."""

    name: bytes
    occurrence: int      # how many tensors with this name came before (names repeat in subgraphs)
    dtype: int
    dims: tuple[int, ...]
    field: int           # RAW_DATA, FLOAT_DATA or DOUBLE_DATA
    offset: int
    length: int

    @property
    def key(self) -> tuple[bytes, int, int]:
        return (self.name, self.occurrence, self.field)

    @property
    def elem_bytes(self) -> int:
        if self.field == FLOAT_DATA:
            return 4
        if self.field == DOUBLE_DATA:
            return 8
        return _ELEM_BYTES.get(self.dtype, 1)


Buf = bytes | mmap.mmap


def _varint(buf: Buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise NotOnnx("bad varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: Buf, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end or varint value)."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        field, wt = tag >> 3, tag & 7
        if field == 0:
            raise NotOnnx("field number 0")
        if wt == 0:
            v, pos = _varint(buf, pos, end)
            yield field, wt, pos, v
        elif wt == 1:
            pos += 8
            yield field, wt, pos - 8, pos
        elif wt == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise NotOnnx("length past end")
            yield field, wt, pos, pos + n
            pos += n
        elif wt == 5:
            pos += 4
            yield field, wt, pos - 4, pos
        else:
            raise NotOnnx(f"wire type {wt} not used by ONNX")
    if pos != end:
        raise NotOnnx("message overruns its length")


class _Walker:
    def __init__(self, buf: Buf) -> None:
        self.buf = buf
        self.spans: list[TensorSpan] = []
        self.seen: dict[bytes, int] = {}

    def model(self) -> None:
        has_graph = False
        for f, wt, s, e in _fields(self.buf, 0, len(self.buf)):
            if f == 7 and wt == 2:
                has_graph = True
                self.graph(s, e, 1)
            elif f == 20 and wt == 2:
                for f2, wt2, s2, e2 in _fields(self.buf, s, e):
                    if f2 in (1, 2) and wt2 == 2:
                        self.graph(s2, e2, 2)
        if not has_graph:
            raise NotOnnx("no ModelProto.graph")

    def graph(self, start: int, end: int, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise NotOnnx("graphs nested too deep")
        for f, wt, s, e in _fields(self.buf, start, end):
            if wt != 2:
                continue
            if f == 1:
                self.node(s, e, depth + 1)
            elif f == 5:
                self.tensor(s, e)
            elif f == 15:
                self.sparse(s, e)

    def node(self, start: int, end: int, depth: int) -> None:
        for f, wt, s, e in _fields(self.buf, start, end):
            if f == 5 and wt == 2:
                self.attribute(s, e, depth)

    def attribute(self, start: int, end: int, depth: int) -> None:
        for f, wt, s, e in _fields(self.buf, start, end):
            if wt != 2:
                continue
            if f in (5, 10):
                self.tensor(s, e)
            elif f in (6, 11):
                self.graph(s, e, depth + 1)
            elif f in (22, 23):
                self.sparse(s, e)

    def sparse(self, start: int, end: int) -> None:
        for f, wt, s, e in _fields(self.buf, start, end):
            if f in (1, 2) and wt == 2:
                self.tensor(s, e)

    def tensor(self, start: int, end: int) -> None:
        dims: list[int] = []
        dtype, name = 0, b""
        payloads: list[tuple[int, int, int]] = []
        for f, wt, s, e in _fields(self.buf, start, end):
            if f == 1 and wt == 0:
                dims.append(e)
            elif f == 1 and wt == 2:
                pos = s
                while pos < e:
                    v, pos = _varint(self.buf, pos, e)
                    dims.append(v)
            elif f == 2 and wt == 0:
                dtype = e
            elif f == 8 and wt == 2:
                name = bytes(self.buf[s:e])
            elif f in (RAW_DATA, FLOAT_DATA, DOUBLE_DATA) and wt == 2 and e > s:
                payloads.append((f, s, e))
        occurrence = self.seen.get(name, 0)
        self.seen[name] = occurrence + 1
        for f, s, e in payloads:
            self.spans.append(TensorSpan(name=name, occurrence=occurrence, dtype=dtype,
                                         dims=tuple(dims), field=f, offset=s, length=e - s))


def tensor_spans(buf: Buf) -> list[TensorSpan]:
    """Every tensor payload span in an ONNX file, in file order; NotOnnx if it does not parse."""
    w = _Walker(buf)
    w.model()
    return sorted(w.spans, key=lambda t: t.offset)
