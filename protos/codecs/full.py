"""Codec ``full``: the whole target, zstd-compressed. Never reads the base.

It is the recovery path (a device whose base is unknown or damaged can always take it) and
the size every delta is compared with. ``make`` streams the file through a multithreaded zstd
compressor; ``apply`` streams the frame back through :class:`~protos.codecs.container.AtomicSink`
in 1 MiB pieces, so memory is the zstd window plus a chunk. Called by :mod:`protos.codecs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import zstandard

from protos.codecs.container import READ_CHUNK_BYTES, AtomicSink, Header, file_sha256

# Level 19 buys little on float weights and costs a lot of time on large files; above this
# size we use a faster level (measured in bench/ota_delta.py: < 0.1 % larger on weights).
SMALL_FILE_BYTES = 4 << 20
LEVEL_SMALL = 19
LEVEL_LARGE = 9
MAX_WINDOW_BYTES = 1 << 27  # decompressor refuses frames that need a larger window


def level_for(size: int) -> int:
    return LEVEL_SMALL if size <= SMALL_FILE_BYTES else LEVEL_LARGE


def make_full(new: Path, out_f: BinaryIO, *, level: int | None = None) -> Header:
    """Write header + zstd frame of ``new`` to ``out_f`` (positioned after nothing)."""
    size = new.stat().st_size
    header = Header(codec="full", target_size=size,
                    target_sha256=file_sha256(new, memo=True),
                    base_size=0, base_sha256=None)
    out_f.write(header.pack())
    cctx = zstandard.ZstdCompressor(level=level if level is not None else level_for(size),
                                    threads=-1, write_content_size=True)
    with open(new, "rb") as src:
        cctx.copy_stream(src, out_f, size=size, read_size=READ_CHUNK_BYTES,
                         write_size=READ_CHUNK_BYTES)
    return header


def apply_full(delta_f: BinaryIO, sink: AtomicSink) -> None:
    """Decompress the rest of ``delta_f`` into ``sink`` chunk by chunk."""
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES)
    with dctx.stream_reader(delta_f, read_size=READ_CHUNK_BYTES, closefd=False) as reader:
        while chunk := reader.read(READ_CHUNK_BYTES):
            sink.write(chunk)
