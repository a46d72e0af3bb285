"""The only place that turns a signed offer into a :class:`VerifiedUpdate`.

Checks, in order, each a :class:`protos.errors.Rejected` with a ``reason`` code: envelope
size and shape, signature by a listed, unrevoked, unexpired online key
(:class:`protos.trust.TrustState`), manifest expiry, device class and device id, version
greater than the highest committed for that model (rollback / replay), declared sizes under
the configured limits, chunk table consistency, codec known, base engine present for deltas.
Called by :mod:`agent.update.manager` on every offer and again when resuming after a
restart. Slots and the loader accept only a VerifiedUpdate.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from agent.config import LimitsConfig
from protos import envelope
from protos.edgefleet.v1 import update_pb2
from protos.errors import Rejected
from protos.trust import TrustState

KNOWN_CODECS = ("full", "bsdiff4", "tensor-xor")
DELTA_CODECS = ("bsdiff4", "tensor-xor")
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
UPDATE_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

_TOKEN = object()


@dataclass(frozen=True)
class VerifiedUpdate:
    """A manifest whose signature and every declared property were checked.

    Created only by :func:`verify_offer` (guarded by a private token)."""

    manifest: update_pb2.UpdateManifest
    envelope_bytes: bytes
    key_id: str
    _token: object = None

    def __post_init__(self) -> None:
        if self._token is not _TOKEN:
            raise TypeError("VerifiedUpdate is created only by agent.update.verify.verify_offer")

    @property
    def update_id(self) -> str:
        return self.manifest.update_id

    @property
    def model_key(self) -> str:
        return model_key(self.manifest.model_name, self.manifest.variant)

    @property
    def chunk_count(self) -> int:
        return len(self.manifest.chunk_sha256)

    def chunk_length(self, index: int) -> int:
        m = self.manifest
        start = index * m.chunk_size
        return max(0, min(m.chunk_size, m.payload_size - start))


def model_key(name: str, variant: str) -> str:
    """Slot/state key of a model: ``name`` or ``name.variant``."""
    return f"{name}.{variant}" if variant else name


def parse_offer(data: bytes, *, limits: LimitsConfig) -> update_pb2.SignedEnvelope:
    """Decode untrusted offer bytes (size-capped); Rejected when malformed."""
    return envelope.parse_envelope(data, max_bytes=limits.max_envelope_bytes)


def peek_manifest(env: update_pb2.SignedEnvelope) -> update_pb2.UpdateManifest | None:
    """Best-effort decode of an UNVERIFIED manifest, only to name it in a FAILED status."""
    m = update_pb2.UpdateManifest()
    try:
        m.ParseFromString(env.payload)
    except Exception:  # untrusted bytes, any decode failure means "unknown"
        return None
    return m


def verify_offer(
    data: bytes,
    *,
    trust: TrustState,
    device_id: str,
    device_class: str,
    highest_committed: Callable[[str], int],
    limits: LimitsConfig,
    has_base: Callable[[str, str], bool],
    now_ms: int,
) -> VerifiedUpdate:
    """Verify signed offer bytes; return a VerifiedUpdate or raise Rejected(reason)."""
    env = parse_offer(data, limits=limits)
    m = trust.verify(env, update_pb2.UpdateManifest, at_ms=now_ms)
    if not m.update_id or not UPDATE_ID_RE.match(m.update_id):
        raise Rejected(f"invalid update id {m.update_id!r}", reason="malformed")
    if not NAME_RE.match(m.model_name) or (m.variant and not NAME_RE.match(m.variant)):
        raise Rejected(f"invalid model name {m.model_name!r}/{m.variant!r}", reason="malformed")
    if not m.expires_at_ms or m.expires_at_ms < now_ms:
        raise Rejected(f"manifest expired at {m.expires_at_ms} (now {now_ms})",
                       reason="expired")
    if m.device_class != device_class:
        raise Rejected(f"manifest is for device class {m.device_class!r}, this device is "
                       f"{device_class!r}", reason="wrong_device_class")
    if m.device_id and m.device_id != device_id:
        raise Rejected(f"manifest is for device {m.device_id!r}", reason="wrong_device")
    key = model_key(m.model_name, m.variant)
    highest = highest_committed(key)
    if m.version <= highest:
        raise Rejected(f"version {m.version} of {key} is not newer than the highest accepted "
                       f"{highest} (rollback or replay)", reason="rollback")
    if m.target_size > limits.max_update_bytes or m.payload_size > limits.max_update_bytes:
        raise Rejected(f"declared size (target {m.target_size}, payload {m.payload_size} bytes)"
                       f" exceeds max_update_bytes {limits.max_update_bytes}",
                       reason="too_large")
    if m.target_size == 0 or m.payload_size == 0:
        raise Rejected("declared size is zero", reason="malformed")
    if not 0 < m.chunk_size <= limits.max_chunk_bytes:
        raise Rejected(f"chunk size {m.chunk_size} outside (0, max_chunk_bytes "
                       f"{limits.max_chunk_bytes}]", reason="too_large")
    expected_chunks = math.ceil(m.payload_size / m.chunk_size)
    if expected_chunks > limits.max_chunks:
        raise Rejected(f"{expected_chunks} chunks exceed max_chunks {limits.max_chunks}",
                       reason="too_large")
    if len(m.chunk_sha256) != expected_chunks or any(len(h) != 32 for h in m.chunk_sha256):
        raise Rejected(f"chunk table has {len(m.chunk_sha256)} entries, payload needs "
                       f"{expected_chunks} of 32 bytes", reason="malformed")
    for label, h in (("target", m.target_sha256), ("payload", m.payload_sha256)):
        if not HEX64_RE.match(h):
            raise Rejected(f"{label}_sha256 is not 64 lower-case hex chars", reason="malformed")
    if m.codec not in KNOWN_CODECS:
        raise Rejected(f"unknown codec {m.codec!r}", reason="unknown_codec")
    if m.codec in DELTA_CODECS:
        if not HEX64_RE.match(m.base_sha256):
            raise Rejected("delta without a valid base_sha256", reason="malformed")
        if not has_base(key, m.base_sha256):
            raise Rejected(f"delta base {m.base_sha256[:12]} is not on this device",
                           reason="missing_base")
    return VerifiedUpdate(manifest=m, envelope_bytes=data, key_id=env.key_id, _token=_TOKEN)
