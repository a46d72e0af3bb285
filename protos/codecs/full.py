"""Codec ``full``: the whole target, zstd-compressed. Never reads the base.

It is the recovery path (a device whose base is unknown or damaged can always take it) and
the size every delta is compared with. ``make`` streams the file through one zstd compressor
with bounded match tables (:func:`zstd_params`: a few MiB whatever the level); ``apply`` streams
the frame back through :class:`~protos.codecs.container.AtomicSink` in 1 MiB pieces, so memory
is the zstd window plus a chunk. Called by :mod:`protos.codecs` and the planner, which makes
``full`` at ``LEVEL_FAST`` and remakes it at ``LEVEL_BEST`` only where that can change the choice.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import zstandard

from protos.codecs.container import READ_CHUNK_BYTES, Header, Sink, file_sha256

# Measured in bench/ota_delta.py: on model files level 6 is within 0.1 % of level 19 on float
# weights (often smaller) and ~3 % larger on silero-vad, at 10-100x less time.
LEVEL_FAST = 6
LEVEL_BEST = 19
TABLE_LOG_MAX = 19          # hash/chain tables <= 2 MiB each: compressor memory stays small
MAX_WINDOW_BYTES = 1 << 27  # decompressor refuses frames that need a larger window


def zstd_params(level: int, *, size: int | None = None,
                table_log_max: int = TABLE_LOG_MAX) -> zstandard.ZstdCompressionParameters:
    """Level ``level`` with hash/chain tables capped at ``2**table_log_max`` entries and, when
    ``size`` is known, a window no larger than the input (bounded, level-independent memory)."""
    p = zstandard.ZstdCompressionParameters.from_level(level)
    window_log = p.window_log if size is None else max(10, min(p.window_log, size.bit_length()))
    return zstandard.ZstdCompressionParameters.from_level(
        level, window_log=window_log, hash_log=min(p.hash_log, table_log_max),
        chain_log=min(p.chain_log, table_log_max), write_content_size=True)


def make_full(new: Path, out_f: BinaryIO, *, level: int = LEVEL_FAST) -> Header:
    """Write header + zstd frame of ``new`` to ``out_f`` (positioned after nothing)."""
    size = new.stat().st_size
    header = Header(codec="full", target_size=size,
                    target_sha256=file_sha256(new, memo=True),
                    base_size=0, base_sha256=None)
    out_f.write(header.pack())
    cctx = zstandard.ZstdCompressor(compression_params=zstd_params(level, size=size))
    with open(new, "rb") as src:
        cctx.copy_stream(src, out_f, size=size, read_size=READ_CHUNK_BYTES,
                         write_size=READ_CHUNK_BYTES)
    return header


def apply_full(delta_f: BinaryIO, sink: Sink) -> None:
    """Decompress the rest of ``delta_f`` into ``sink`` chunk by chunk."""
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES)
    with dctx.stream_reader(delta_f, read_size=READ_CHUNK_BYTES, closefd=False) as reader:
        while chunk := reader.read(READ_CHUNK_BYTES):
            sink.write(chunk)
