"""Rebuild the target engine from a downloaded payload (full artifact or delta).

``full`` payloads that are the raw engine are copied; deltas (bsdiff4, tensor-xor) and
zstd-compressed full payloads (``EFDL`` container) go through :func:`protos.codecs.apply`
against the base engine held in a slot, which writes the output atomically and only after
its sha256 equals the manifest's target; the raw copy is hashed while it is written. Either
way the output is checked against the signed manifest before the caller renames it into a slot.
Called by :mod:`agent.update.manager` in state PATCHING.
"""

from __future__ import annotations

from pathlib import Path

from agent.update.verify import VerifiedUpdate
from protos.codecs.container import MAGIC as CONTAINER_MAGIC
from protos.errors import EdgefleetError, GiveUp, Rejected
from protos.fsutil import copy_hashing


def build_target(vu: VerifiedUpdate, payload: Path, *, out: Path, base: Path | None) -> None:
    """Write the target engine of ``vu`` to ``out`` (fsynced); Rejected on any mismatch."""
    m = vu.manifest
    if m.codec == "full" and not _is_container(payload):
        # the controller ships a full engine as the raw file (payload == target)
        _check_target(vu, out, digest=_copy_checked(payload, out, limit=m.target_size))
    else:
        if base is None and m.codec != "full":
            raise Rejected(f"delta base {m.base_sha256[:12]} is not on this device",
                           reason="missing_base")
        try:
            from protos import codecs  # type: ignore[attr-defined,unused-ignore]
        except ImportError as e:
            raise GiveUp(f"codec {m.codec} is not available: {e}", reason="unknown_codec") from e
        try:
            codecs.apply(m.codec, base, payload, out, max_output_bytes=m.target_size,
                         expected_sha256=m.target_sha256)
        except EdgefleetError:
            raise
        except MemoryError as e:
            raise GiveUp(f"out of memory applying {m.codec} delta", reason="out_of_memory") from e
        except Exception as e:  # codec libraries raise their own types on corrupt input
            raise Rejected(f"{m.codec} delta does not apply: {e}", reason="patch_failed") from e
        # apply() has fsynced ``out`` and checked its sha256 against target_sha256: no re-read


def _check_target(vu: VerifiedUpdate, out: Path, *, digest: str) -> None:
    """Rejected unless ``out`` has the manifest's target size and ``digest`` its sha256."""
    m = vu.manifest
    size = out.stat().st_size
    if size != m.target_size:
        raise Rejected(f"patched engine has {size} bytes, manifest says {m.target_size}",
                       reason="target_hash_mismatch")
    if digest != m.target_sha256:
        raise Rejected("patched engine sha256 does not match the manifest target_sha256",
                       reason="target_hash_mismatch")


def _is_container(payload: Path) -> bool:
    """True when ``payload`` is a protos.codecs delta file (``EFDL`` header, e.g. zstd full)."""
    with open(payload, "rb") as f:
        return f.read(len(CONTAINER_MAGIC)) == CONTAINER_MAGIC


def _copy_checked(src: Path, dst: Path, *, limit: int) -> str:
    """Copy ``src`` to ``dst`` (fsynced), at most ``limit`` bytes; the hex sha256 copied."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        digest, _ = copy_hashing(fin, fout, max_bytes=limit, too_large=lambda: Rejected(
            f"payload exceeds declared target size {limit}", reason="target_hash_mismatch"))
    return digest
