"""Build and sign the UpdateManifest offered to one device for one engine.

Called by the rollout reconciler (controller.reconcile.rollouts) for each targeted device,
after the planner chose the payload (full engine or a delta from the device's base). The
manifest binds everything the agent checks: class, model, version, target and payload
hashes and sizes, codec, base, per-chunk sha256 list, expiry, engine fingerprint and
signature. It is signed with the current online signing key (controller.ota.keys).
The per-chunk hashes of a payload are computed once per (file, chunk size) and kept in a
small in-process cache: devices sharing a base share the payload, so 1,000 offers of one
delta hash it once.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protos.edgefleet.v1 import common_pb2, update_pb2
from protos.errors import Rejected

_FP_FIELDS = ("engine_kind", "arch", "toolchain", "toolchain_version", "accelerator",
              "precision", "min_runtime_version")


_HASH_CACHE: OrderedDict[tuple[str, int, int, int], list[bytes]] = OrderedDict()
_HASH_CACHE_ENTRIES = 64
_hash_lock = threading.Lock()


def chunk_hashes(path: Path, chunk_size: int) -> list[bytes]:
    """Raw sha256 of each ``chunk_size`` piece of the file, in order (at least one); cached
    by (path, size, mtime, chunk size): payloads are content-addressed and never rewritten."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, chunk_size)
    with _hash_lock:
        hit = _HASH_CACHE.get(key)
        if hit is not None:
            _HASH_CACHE.move_to_end(key)
            return list(hit)
    out = _hash_file(path, chunk_size)
    with _hash_lock:
        _HASH_CACHE[key] = out
        while len(_HASH_CACHE) > _HASH_CACHE_ENTRIES:
            _HASH_CACHE.popitem(last=False)
    return list(out)


def hashes_known(path: Path | None, chunk_size: int) -> bool:
    """True when ``chunk_hashes(path, chunk_size)`` is answered from the cache (no I/O
    beyond a stat: a caller on the event loop need not go to a thread)."""
    if path is None:
        return True
    try:
        st = path.stat()
    except OSError:
        return False
    with _hash_lock:
        return (str(path), st.st_size, st.st_mtime_ns, chunk_size) in _HASH_CACHE


def _hash_file(path: Path, chunk_size: int) -> list[bytes]:
    out: list[bytes] = []
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_size)
            if not block:
                break
            out.append(hashlib.sha256(block).digest())
    return out or [hashlib.sha256(b"").digest()]


def make_update_id(rollout: str, device_id: str, version: int, payload_sha256: str,
                   chunk_size: int = 0, *, variant: str = "", revision: int = 0,
                   target_sha256: str = "", round_: int = 0) -> str:
    """Stable id of (rollout, device, version, revision, payload, chunk size, variant,
    retry round): re-planning gives the same id, a changed chunk size (different chunk
    hashes) a new one, a variant never shares an id with the main engine (even with the
    same engine bytes), and a retried offer is a new update for the agent."""
    text = f"{rollout}\n{device_id}\n{version}\n{payload_sha256}"
    if variant:
        text += f"\nvariant={variant}"
    if revision or target_sha256 or round_:
        text += f"\nrev={revision}\ntarget={target_sha256}\nround={round_}"
    h = hashlib.sha256((text + (f"\n{chunk_size}" if chunk_size else "")).encode())
    return f"u-{h.hexdigest()[:24]}"


def fingerprint_msg(fp: dict[str, Any] | None) -> common_pb2.EngineFingerprint:
    fp = fp or {}
    return common_pb2.EngineFingerprint(**{k: str(fp.get(k) or "") for k in _FP_FIELDS})


def signature_msg(sig: dict[str, Any] | None) -> common_pb2.ModelSignature:
    msg = common_pb2.ModelSignature()
    for side in ("inputs", "outputs"):
        for t in (sig or {}).get(side, []) or []:
            shape = [int(d) if isinstance(d, int) and d >= 0 else -1 for d in t.get("shape", [])]
            getattr(msg, side).add(name=str(t.get("name", "")), dtype=str(t.get("dtype", "")),
                                   shape=shape)
    return msg


@dataclass(frozen=True)
class Payload:
    """What the device downloads: the engine itself (codec full) or a delta."""

    codec: str
    base_sha256: str
    sha256: str
    size: int
    path: Path | None


SLOT_CODEC = "slot"


def slot_payload(target_sha256: str) -> Payload:
    """No bytes: the target engine is already in one of the device's A/B slots."""
    return Payload(SLOT_CODEC, target_sha256, "", 0, None)


def build_manifest(*, update_id: str, device_id: str, device_class: str, model_name: str,
                   version: int, target_sha256: str, target_size: int, payload: Payload,
                   chunk_size: int, ttl_s: int, fingerprint: dict[str, Any] | None = None,
                   signature: dict[str, Any] | None = None, rollout: str = "",
                   variant: str = "", now_ms: int | None = None, revision: int = 0,
                   engine_version: int = 0,
                   probe: update_pb2.ProbeSpec | None = None) -> update_pb2.UpdateManifest:
    """An unsigned manifest for one device; chunk hashes computed from the payload file
    (none for codec ``slot``, whose target is already on the device)."""
    if version < 1:
        raise Rejected(f"model version must be >= 1, got {version}", reason="bad_version")
    if payload.codec != "full" and not payload.base_sha256:
        raise Rejected(f"codec {payload.codec} needs a base sha256", reason="bad_codec")
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if payload.codec == SLOT_CODEC or payload.path is None:
        hashes: list[bytes] = []
    else:
        hashes = chunk_hashes(payload.path, chunk_size)
    extra: dict[str, Any] = {}
    if probe is not None:
        extra["probe"] = probe
    return update_pb2.UpdateManifest(
        revision=revision, engine_version=engine_version if engine_version != version else 0,
        **extra,
        update_id=update_id, device_class=device_class, model_name=model_name,
        version=version, target_sha256=target_sha256, target_size=target_size,
        codec=payload.codec,
        base_sha256=payload.base_sha256 if payload.codec not in ("full", SLOT_CODEC) else "",
        payload_sha256=payload.sha256, payload_size=payload.size, chunk_size=chunk_size,
        chunk_sha256=hashes, issued_at_ms=now, expires_at_ms=now + ttl_s * 1000,
        fingerprint=fingerprint_msg(fingerprint), signature=signature_msg(signature),
        rollout=rollout, variant=variant, device_id=device_id,
    )


def chunk_count(payload_size: int, chunk_size: int) -> int:
    return max(1, -(-payload_size // chunk_size))
