"""Delta planning: make every candidate codec, keep the smallest that verifies.

Called by controller.ota.planner (once per (base, target) pair; the result is cached and shared
by every device on that base) and by ``edgefleet delta make`` (:mod:`protos.codecs.cli`).
``full`` is always a candidate, so the choice is never larger than the compressed target.
Candidates run in the order full, tensor-xor, bsdiff4 within one overall time budget
(bsdiff4 is skipped when tensor-xor paired at least ``SKIP_BSDIFF_MATCHED`` of the target);
a candidate that fails, does not apply to the input or runs out of time is recorded with an
``error`` and skipped. ``full`` is made at a fast zstd level and remade at level 19 only where
that could change the choice. The chosen delta is applied once (output hashed, not written)
and checked against the target's sha256 before it is returned.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from protos.codecs.container import file_sha256
from protos.codecs.core import CODECS, make, verify
from protos.codecs.full import LEVEL_BEST, LEVEL_FAST, zstd_params
from protos.errors import EdgefleetError, GiveUp

_ORDER = ("full", "tensor-xor", "bsdiff4")
# bsdiff4 is not tried when tensor-xor pairs this share of the target's bytes with the base:
# measured in bench/ota_delta.py it then always lost (head-only, fine-tune, new head), and it
# is the slowest candidate.
SKIP_BSDIFF_MATCHED = 0.9
# ``full`` is made at LEVEL_FAST. Level 19 shrank model files by at most 3.3 % against it in
# bench/ota_delta.py (silero-vad 3.2 %; float weights <= 0.1 %, often larger): where another
# candidate is smaller than (1 - BEST_LEVEL_MARGIN) x full, a better ``full`` cannot win and is
# not tried. Otherwise samples of the target at both levels decide whether level 19 is worth
# its time (BEST_LEVEL_MIN_GAIN).
BEST_LEVEL_MARGIN = 0.10
BEST_LEVEL_MIN_GAIN = 0.005
SAMPLE_BYTES = 256 << 10
SAMPLES = 4


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
    if "full" in made:
        _maybe_best_full(new, made["full"], candidates, deadline=deadline)
    chosen: str | None = None
    for codec in sorted(made, key=lambda c: (candidates[c]["size"], _ORDER.index(c))):
        if _verifies(codec, old, made[codec], new_sha=new_sha):
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


def _maybe_best_full(new: Path, path: Path, candidates: dict[str, dict[str, Any]], *,
                     deadline: float) -> None:
    """Remake ``full`` at LEVEL_BEST where it could become the choice and samples say it pays."""
    full = candidates["full"]
    others = [c["size"] for k, c in candidates.items() if k != "full" and "size" in c]
    if others and min(others) < (1 - BEST_LEVEL_MARGIN) * full["size"]:
        return
    t0 = time.monotonic()
    gain = _sampled_gain(new)
    full["best_level_sample_gain"] = round(gain, 4)
    if gain < BEST_LEVEL_MIN_GAIN or time.monotonic() >= deadline:
        return
    best = path.with_name(path.name + ".best")
    try:
        make("full", None, new, best, level=LEVEL_BEST)
        if best.stat().st_size < full["size"]:
            os.replace(best, path)
            full.update(size=path.stat().st_size, level=LEVEL_BEST)
    finally:
        best.unlink(missing_ok=True)
        full["seconds"] = round(full["seconds"] + time.monotonic() - t0, 3)


def _sampled_gain(new: Path) -> float:
    """1 - size(LEVEL_BEST) / size(LEVEL_FAST) over SAMPLES slices of the target."""
    size = new.stat().st_size
    n = min(size, SAMPLE_BYTES)
    offsets = sorted({(size - n) * i // max(1, SAMPLES - 1) for i in range(SAMPLES)})
    fast = zstandard.ZstdCompressor(compression_params=zstd_params(LEVEL_FAST, size=n))
    best = zstandard.ZstdCompressor(compression_params=zstd_params(LEVEL_BEST, size=n))
    zf = zb = 0
    with open(new, "rb") as f:
        for off in offsets:
            f.seek(off)
            data = f.read(n)
            zf += len(fast.compress(data))
            zb += len(best.compress(data))
    return 1 - zb / zf if zf else 0.0


def _verifies(codec: str, old: Path | None, delta: Path, *, new_sha: str) -> bool:
    try:
        verify(codec, old, delta, expected_sha256=new_sha)
        return True
    except EdgefleetError:
        return False
