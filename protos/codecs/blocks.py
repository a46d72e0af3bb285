"""Codec ``bsdiff4``: record format, per-record encoders and ``apply``.

Whole-file bsdiff4 needs ~17 bytes of memory per input byte and goes quadratic on
zero-heavy or repetitive data. So the target is cut into blocks (``BLOCK_BYTES``), each matched
to a window of the base (:mod:`protos.codecs.blockmake` finds the offsets and drives the
encoding) and encoded as records, the smallest of:

* ``COPY``   the bytes equal the aligned base range (no payload),
* ``ZSTD``   zstd with a base window as raw-content dictionary (``--patch-from`` per piece of
  at most ``ZSTD_PIECE_BYTES``: short match distances keep the match tables small),
* ``BSDIFF`` bsdiff4 control/diff/extra streams of a whole block, each zstd-compressed.

This module holds what both sides need: the record layout, the encoders (the bsdiff one also
runs in ``protos.codecs.blockworker`` processes, so nothing here imports numpy at the top) and
``apply``, which holds one window and one record at a time. Layout: docs/deltas.md. Called by
:mod:`protos.codecs.core` and :mod:`protos.codecs.blockmake`.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import BinaryIO

import bsdiff4.core
import zstandard

from protos.codecs.container import BoundedReader, Header, Sink
from protos.codecs.full import zstd_params
from protos.errors import Rejected

BLOCK_BYTES = 2 << 20            # alignment and bsdiff unit
MARGIN_BYTES = 256 << 10         # bsdiff window: the aligned range +- this
ZSTD_PIECE_BYTES = 512 << 10     # ZSTD records cover at most this much of the target
ZSTD_MARGIN_BYTES = 128 << 10    # ZSTD dictionary: the aligned range +- this
MAX_BLOCK_BYTES = 64 << 20       # apply refuses larger records (memory bound)
MAX_WINDOW_BYTES = 80 << 20
REPETITIVE_RATIO = 0.1           # bsdiff is skipped on blocks zstd -1 shrinks below this
ZSTD_LEVEL = 9                   # match tables capped by zstd_params: ~3 MiB of context

COPY, ZSTD, BSDIFF = 0, 1, 2
METHOD_NAMES = ("copy", "zstd", "bsdiff")
REC = struct.Struct("<BQQQQ")  # method, new_len, old_off, old_len, payload_len


def _zdict(dict_bytes: bytes) -> zstandard.ZstdCompressionDict | None:
    return zstandard.ZstdCompressionDict(dict_bytes, dict_type=zstandard.DICT_TYPE_RAWCONTENT) \
        if dict_bytes else None


def zc(data: bytes, dict_bytes: bytes = b"") -> bytes:
    """zstd at ZSTD_LEVEL with bounded tables; ``dict_bytes`` as raw-content dictionary."""
    params = zstd_params(ZSTD_LEVEL, size=len(dict_bytes) + len(data))
    return zstandard.ZstdCompressor(compression_params=params,
                                    dict_data=_zdict(dict_bytes)).compress(data)


def _zd(data: bytes, size: int, dict_bytes: bytes = b"") -> bytes:
    try:
        out = zstandard.ZstdDecompressor(dict_data=_zdict(dict_bytes)).decompress(
            data, max_output_size=size)
    except zstandard.ZstdError as e:
        raise Rejected(f"corrupt zstd payload in block: {e}", reason="delta_malformed") from e
    if len(out) != size:
        raise Rejected("block payload has the wrong length", reason="delta_malformed")
    return out


def repetitive(data: bytes) -> bool:
    """Runs and short periods make bsdiff quadratic; zstd -1 squeezing a block below
    ``REPETITIVE_RATIO`` of its size flags them (and ZSTD handles such blocks well anyway)."""
    if len(data) < 4096:
        return False
    return len(zstandard.ZstdCompressor(level=1).compress(data)) < REPETITIVE_RATIO * len(data)


def pread(fd: int, off: int, n: int) -> bytes:
    """Exactly ``n`` bytes of the file at ``off`` (inputs are regular files)."""
    out = os.pread(fd, n, off)
    while len(out) < n:
        more = os.pread(fd, n - len(out), off + len(out))
        if not more:
            raise OSError(f"file ended at {off + len(out)}, wanted {off + n}")
        out += more
    return out


def encode_bsdiff(old_w: bytes, new_b: bytes) -> bytes:
    """BSDIFF payload: bsdiff4 control/diff/extra streams, each zstd-compressed."""
    ctl, diff, extra = bsdiff4.core.diff(old_w, new_b)
    parts = [struct.pack("<QQQ", len(ctl) // 24, len(diff), len(extra))]
    for raw in (ctl, diff, extra):
        z = zc(raw)
        parts += [struct.pack("<Q", len(z)), z]
    return b"".join(parts)


def bsdiff_range(old_path: str, new_path: str, new_off: int, new_len: int, old_off: int,
                 old_len: int) -> bytes:
    """BSDIFF payload of ``new[new_off:+new_len]`` against ``old[old_off:+old_len]`` (worker)."""
    with open(new_path, "rb") as fn, open(old_path, "rb") as fo:
        new_b = pread(fn.fileno(), new_off, new_len)
        old_w = pread(fo.fileno(), old_off, old_len)
    return encode_bsdiff(old_w, new_b)


def zstd_records(old_fd: int | None, old_size: int, new_b: bytes,
                 centre: int) -> list[tuple[bytes, str]]:
    """``new_b`` (expected at base offset ``centre``) as COPY / ZSTD records of at most
    ZSTD_PIECE_BYTES, each with the aligned base range +- ZSTD_MARGIN_BYTES as dictionary."""
    out = []
    for s in range(0, len(new_b), ZSTD_PIECE_BYTES):
        piece = new_b[s:s + ZSTD_PIECE_BYTES]
        n, c = len(piece), centre + s
        lo = max(0, min(c - ZSTD_MARGIN_BYTES, old_size))
        hi = max(lo, min(c + n + ZSTD_MARGIN_BYTES, old_size))
        window = pread(old_fd, lo, hi - lo) if old_fd is not None and hi > lo else b""
        if c >= 0 and c + n <= old_size and window[c - lo:c - lo + n] == piece:
            out.append((REC.pack(COPY, n, c, n, 0), "copy"))
            continue
        payload = zc(piece, window)
        out.append((REC.pack(ZSTD, n, lo, hi - lo, len(payload)) + payload, "zstd"))
    return out


class _mapped:
    """Read-only mmap of a file (empty bytes for None or an empty file)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._f: BinaryIO | None = None
        self._m: mmap.mmap | None = None

    def __enter__(self) -> bytes | mmap.mmap:
        if self.path is None or self.path.stat().st_size == 0:
            return b""
        self._f = open(self.path, "rb")
        self._m = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._m

    def __exit__(self, *exc: object) -> None:
        if self._m is not None:
            self._m.close()
        if self._f is not None:
            self._f.close()


def apply_blocks(r: BoundedReader, header: Header, old: Path | None, sink: Sink) -> None:
    """Rebuild the target record by record; every record is validated before use."""
    with _mapped(old) as old_m:
        produced = 0
        while r.remaining() > 0:
            method, new_len, old_off, old_len, plen = REC.unpack(r.exact(REC.size, "record"))
            if new_len > MAX_BLOCK_BYTES or old_len > MAX_WINDOW_BYTES \
                    or produced + new_len > header.target_size \
                    or old_off + old_len > len(old_m) or plen > r.remaining():
                raise Rejected("block record out of bounds", reason="delta_malformed")
            window = bytes(old_m[old_off:old_off + old_len])
            payload = r.exact(plen, "block payload")
            if method == COPY:
                if old_len != new_len or plen:
                    raise Rejected("bad COPY record", reason="delta_malformed")
                block = window
            elif method == ZSTD:
                block = _zd(payload, new_len, window)
            elif method == BSDIFF:
                block = _decode_bsdiff(payload, window, new_len)
            else:
                raise Rejected(f"unknown block method {method}", reason="delta_malformed")
            sink.write(block)
            produced += new_len


def _decode_bsdiff(payload: bytes, window: bytes, new_len: int) -> bytes:
    if len(payload) < 24:
        raise Rejected("short bsdiff record", reason="delta_malformed")
    n_ctl, diff_len, extra_len = struct.unpack_from("<QQQ", payload, 0)
    if diff_len + extra_len != new_len or n_ctl > new_len + 1:
        raise Rejected("bsdiff record sizes disagree", reason="delta_malformed")
    pos, raws = 24, []
    for size in (n_ctl * 24, diff_len, extra_len):
        if pos + 8 > len(payload):
            raise Rejected("short bsdiff record", reason="delta_malformed")
        (zlen,) = struct.unpack_from("<Q", payload, pos)
        pos += 8
        if pos + zlen > len(payload):
            raise Rejected("short bsdiff record", reason="delta_malformed")
        raws.append(_zd(payload[pos:pos + zlen], size))
        pos += zlen
    import numpy as np  # here, not at the top: block workers stay small without numpy

    u = np.frombuffer(raws[0], dtype="<u8").reshape(-1, 3)
    mag = (u & np.uint64(0x7FFF_FFFF_FFFF_FFFF)).astype(object)
    xs, ys = mag[:, 0], mag[:, 1]
    if (u[:, :2] >> np.uint64(63)).any() or sum(xs) != diff_len or sum(ys) != extra_len:
        raise Rejected("bsdiff control stream is inconsistent", reason="delta_malformed")
    try:
        return bytes(bsdiff4.core.patch(window, new_len, raws[0], raws[1], raws[2]))
    except (ValueError, TypeError, OverflowError) as e:
        raise Rejected(f"bsdiff patch failed: {e}", reason="delta_malformed") from e
