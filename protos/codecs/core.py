"""make/apply dispatch over the codecs; re-exported by :mod:`protos.codecs`.

The byte formats are part of the wire contract (docs/deltas.md). ``apply`` is pure byte
operations (zstandard, bsdiff4, numpy): no ``onnx`` import anywhere in this package. Every delta
file carries a header with its codec name, the target size and sha256 and the base sha256, so
it can be checked before a byte is written; output is written atomically and only after its
sha256 matched; ``verify`` runs the same code into a sink that only hashes (the planner's
check of a delta it made). Called by controller.ota.planner (plan/make), agent.update (apply)
and the ``edgefleet delta`` CLI (:mod:`protos.codecs.cli`).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

import zstandard

from protos.codecs.blockmake import make_blocks
from protos.codecs.blocks import apply_blocks
from protos.codecs.container import (
    AtomicSink,
    BoundedReader,
    HashSink,
    Header,
    Sink,
    atomic_output,
    check_header,
    read_header,
)
from protos.codecs.full import LEVEL_FAST, apply_full, make_full
from protos.codecs.tensorxor import apply_tensorxor, make_tensorxor
from protos.errors import GiveUp, Rejected

CODECS = ("full", "bsdiff4", "tensor-xor")

def make(codec: str, old: Path | None, new: Path, out: Path, *, time_limit_s: float = 60.0,
         stats: dict[str, object] | None = None, level: int = LEVEL_FAST) -> None:
    """Write the ``codec`` delta from ``old`` to ``new`` at ``out`` (atomically).

    ``level`` is the zstd level of ``full`` (the planner raises it where that can pay). Raises
    GiveUp with reason ``not_applicable`` (tensor-xor on non-ONNX input) or ``timeout``
    (bsdiff4 past ``time_limit_s``).
    """
    if codec not in CODECS:
        raise GiveUp(f"unknown delta codec {codec!r}", reason="unknown_codec")
    with atomic_output(out) as f:
        if codec == "full":
            make_full(new, f, level=level)
        elif codec == "bsdiff4":
            make_blocks(old, new, f, time_limit_s=time_limit_s, stats=stats)
        else:
            make_tensorxor(old, new, f, stats=stats)


def read_delta_header(delta: Path) -> Header:
    """The header of a delta file (codec, target and base size/sha256); Rejected if malformed."""
    with open(delta, "rb") as f:
        return read_header(f)


def apply(codec: str, old: Path | None, delta: Path, out: Path, *, max_output_bytes: int,
          expected_sha256: str) -> None:
    """Rebuild the target from ``old`` + ``delta`` into ``out``.

    Streams with bounded memory; ``out`` is replaced only when the result's sha256 equals
    ``expected_sha256``. Raises Rejected for a malformed or tampered delta, a wrong base, a
    hash mismatch or an output over ``max_output_bytes``; never leaves a partial file at ``out``.
    """
    if codec not in CODECS:
        raise Rejected(f"unknown delta codec {codec!r}", reason="unknown_codec")
    with open(delta, "rb") as f:
        header = read_header(f)
        check_header(header, codec=codec, old=old, max_output_bytes=max_output_bytes,
                     expected_sha256=expected_sha256)
        with AtomicSink(out, limit_bytes=header.target_size,
                        expected_sha256=expected_sha256) as sink:
            _apply_body(codec, f, header, old, sink)
            sink.commit()


def verify(codec: str, old: Path | None, delta: Path, *, expected_sha256: str) -> None:
    """Apply ``delta`` without writing anything: the output is only counted and hashed.

    The planner's check of a delta it made (``apply`` minus the temp file and fsync; the base
    hash may come from the memo). Raises Rejected exactly where ``apply`` would.
    """
    with open(delta, "rb") as f:
        header = read_header(f)
        check_header(header, codec=codec, old=old, max_output_bytes=header.target_size,
                     expected_sha256=expected_sha256, memo=True)
        sink = HashSink(limit_bytes=header.target_size, expected_sha256=expected_sha256)
        _apply_body(codec, f, header, old, sink)
        sink.commit()


def _apply_body(codec: str, f: BinaryIO, header: Header, old: Path | None, sink: Sink) -> None:
    reader = BoundedReader(f, end=os.fstat(f.fileno()).st_size)
    try:
        if codec == "full":
            apply_full(f, sink)
        elif codec == "bsdiff4":
            apply_blocks(reader, header, old, sink)
        else:
            apply_tensorxor(reader, header, old, sink)
    except (zstandard.ZstdError, ValueError, struct.error, OverflowError, IndexError) as e:
        raise Rejected(f"malformed {codec} delta: {e}", reason="delta_malformed") from e
