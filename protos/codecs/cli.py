"""Operator functions behind ``edgefleet delta make|apply`` (wired by controller.cli).

``delta_make`` plans every codec and keeps the smallest; ``delta_apply`` reads the codec and the
target sha256 from the delta's own header, so it works without a manifest. Both return a
JSON-able dict for the CLI to print.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from protos.codecs.core import apply, read_delta_header
from protos.codecs.planner import plan
from protos.errors import Rejected

DEFAULT_MAX_OUTPUT_BYTES = 16 << 30


def delta_make(old: Path | None, new: Path, out: Path, *,
               time_limit_s: float = 60.0) -> dict[str, Any]:
    """Write the smallest delta from ``old`` to ``new`` at ``out``; report every candidate."""
    t0 = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".delta-", dir=out.parent) as work:
        choice = plan(old, new, Path(work), time_limit_s=time_limit_s)
        os.replace(choice.path, out)
    header = read_delta_header(out)
    return {"codec": choice.codec, "out": str(out), "size": choice.size,
            "sha256": choice.sha256, "target_size": header.target_size,
            "target_sha256": header.target_sha256, "base_sha256": header.base_sha256,
            "seconds": round(time.monotonic() - t0, 3), "candidates": choice.candidates}


def delta_apply(old: Path | None, delta: Path, out: Path, *, expected_sha256: str | None,
                max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> dict[str, Any]:
    """Apply ``delta`` to ``old`` into ``out``; the result must match the header's sha256 (and
    ``expected_sha256`` when given). Raises Rejected otherwise; ``out`` is then untouched."""
    t0 = time.monotonic()
    header = read_delta_header(delta)
    if expected_sha256 is not None and expected_sha256.lower() != header.target_sha256:
        raise Rejected("delta was made for another target than --expected-sha256",
                       reason="delta_target_mismatch")
    apply(header.codec, old, delta, out, max_output_bytes=max_output_bytes,
          expected_sha256=header.target_sha256)
    return {"codec": header.codec, "out": str(out), "size": header.target_size,
            "sha256": header.target_sha256, "seconds": round(time.monotonic() - t0, 3)}
