"""Delta planning: make every candidate codec, keep the smallest that verifies.

Called by controller.ota.planner (once per (base, target) pair; the result is cached and shared
by every device on that base) and by ``edgefleet delta make`` (:mod:`protos.codecs.cli`).
``full`` is always a candidate, so the choice is never larger than the compressed target.
Candidates run in the order full, tensor-xor, bsdiff4 within one overall time budget
(bsdiff4 is skipped when tensor-xor paired at least ``SKIP_BSDIFF_MATCHED`` of the target);
a candidate that fails, does not apply to the input or runs out of time is recorded with an
``error`` and skipped. The chosen delta is applied once to a temp file and checked against
the target's sha256 before it is returned.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protos.codecs.container import file_sha256
from protos.codecs.core import CODECS, apply, make
from protos.errors import EdgefleetError, GiveUp

_ORDER = ("full", "tensor-xor", "bsdiff4")
# bsdiff4 is not tried when tensor-xor pairs this share of the target's bytes with the base:
# measured in bench/ota_delta.py it then always lost (head-only, fine-tune, new head), and it
# is the slowest candidate.
SKIP_BSDIFF_MATCHED = 0.9


@dataclass(frozen=True)
class DeltaChoice:
    """The delta picked for a (base, target) pair, and what every candidate measured."""

    codec: str
    path: Path
    size: int
    sha256: str  # of the delta file
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)


def _delta_name(old_sha: str | None, new_sha: str, codec: str) -> str:
    return f"{(old_sha or 'none')[:16]}-{new_sha[:16]}.{codec}.efdelta"


def plan(old: Path | None, new: Path, out_dir: Path, *, codecs: tuple[str, ...] = CODECS,
         time_limit_s: float = 60.0) -> DeltaChoice:
    """Compute the candidate deltas from ``old`` to ``new`` in ``out_dir``; return the smallest."""
    unknown = set(codecs) - set(CODECS)
    if unknown:
        raise GiveUp(f"unknown delta codecs {sorted(unknown)}", reason="unknown_codec")
    deadline = time.monotonic() + time_limit_s
    out_dir.mkdir(parents=True, exist_ok=True)
    new_sha = file_sha256(new, memo=True)
    old_sha = file_sha256(old, memo=True) if old is not None else None
    candidates: dict[str, dict[str, Any]] = {}
    made: dict[str, Path] = {}
    for codec in _ORDER:
        if codec != "full" and codec not in codecs:
            continue
        if codec != "full" and old is None:
            candidates[codec] = {"error": "no_base"}
            continue
        matched = candidates.get("tensor-xor", {}).get("matched_bytes", 0)
        if codec == "bsdiff4" and matched >= SKIP_BSDIFF_MATCHED * new.stat().st_size:
            candidates[codec] = {"error": "skipped", "detail": f"tensor-xor pairs {matched} of "
                                 f"{new.stat().st_size} target bytes with base tensors"}
            continue
        remaining = deadline - time.monotonic()
        if codec != "full" and remaining <= 0:
            candidates[codec] = {"error": "timeout"}
            continue
        path = out_dir / _delta_name(old_sha, new_sha, codec)
        stats: dict[str, object] = {}
        t0 = time.monotonic()
        try:
            make(codec, old, new, path, time_limit_s=max(remaining, 1.0), stats=stats)
        except EdgefleetError as e:
            candidates[codec] = {"error": e.reason, "detail": str(e),
                                 "seconds": round(time.monotonic() - t0, 3)}
            continue
        candidates[codec] = {"size": path.stat().st_size,
                             "seconds": round(time.monotonic() - t0, 3), **stats}
        made[codec] = path
    chosen: str | None = None
    for codec in sorted(made, key=lambda c: (candidates[c]["size"], _ORDER.index(c))):
        if _verifies(codec, old, made[codec], new_sha=new_sha, size=new.stat().st_size):
            chosen = codec
            break
        candidates[codec]["error"] = "verify_failed"
    for codec, path in made.items():
        if codec != chosen:
            path.unlink(missing_ok=True)
    if chosen is None:  # full always verifies unless the disk is failing
        raise GiveUp("no delta candidate verified", reason="no_candidate")
    path = made[chosen]
    return DeltaChoice(codec=chosen, path=path, size=path.stat().st_size,
                       sha256=file_sha256(path), candidates=candidates)


def _verifies(codec: str, old: Path | None, delta: Path, *, new_sha: str, size: int) -> bool:
    fd, name = tempfile.mkstemp(prefix=".verify.", dir=delta.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        apply(codec, old, delta, tmp, max_output_bytes=size, expected_sha256=new_sha)
        return True
    except EdgefleetError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
