"""The only place that turns a signed offer into a :class:`VerifiedUpdate`.

Checks, in order, each a :class:`protos.errors.Rejected` with a ``reason`` code: envelope
size and shape, signature by a listed, unrevoked, unexpired online key
(:class:`protos.trust.TrustState`), manifest expiry, device class and device id,
(version, revision) greater than the highest committed pair for that model (rollback /
replay), declared sizes under the configured limits, chunk table consistency, codec known,
base engine present for deltas, target engine present in a slot for codec "slot".
A signed ``DesiredState`` (:func:`verify_desired`) may also authorize activating an engine
already in a slot: :func:`desired_update` turns one of its models into a codec "slot"
VerifiedUpdate after the same rollback and slot checks.
:class:`Verifier` binds these checks to one device. Called by :mod:`agent.update.manager` on
every offer / desired state and again when resuming after a restart. Slots and the loader
accept only a VerifiedUpdate.
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

KNOWN_CODECS = ("full", "bsdiff4", "tensor-xor", "slot")
SLOT_CODEC = "slot"   # no payload: the target engine is already in one of the model's slots
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
    def is_slot(self) -> bool:
        """True for a codec "slot" update (activate an engine already on the device)."""
        return self.manifest.codec == SLOT_CODEC

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
    highest_committed: Callable[[str], tuple[int, int]],
    limits: LimitsConfig,
    has_base: Callable[[str, str], bool],
    now_ms: int,
) -> VerifiedUpdate:
    """Verify signed offer bytes; return a VerifiedUpdate or raise Rejected(reason).

    ``highest_committed(key)`` is the highest committed (version, revision) of a model key;
    ``has_base(key, sha256)`` says whether a slot of ``key`` holds that engine."""
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
    check_newer(key, (m.version, m.revision), highest_committed(key))
    if m.codec == SLOT_CODEC:
        _check_slot(m, key, limits=limits, has_base=has_base)
        return VerifiedUpdate(manifest=m, envelope_bytes=data, key_id=env.key_id,
                              _token=_TOKEN)
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


def check_newer(key: str, pair: tuple[int, int], highest: tuple[int, int]) -> None:
    """Rejected("rollback") unless (version, revision) ``pair`` is above ``highest``."""
    if pair <= highest:
        raise Rejected(f"(version, revision) ({pair[0]}, {pair[1]}) of {key} is not newer than "
                       f"the highest accepted ({highest[0]}, {highest[1]}) (rollback or "
                       "replay)", reason="rollback")


def _check_slot(m: update_pb2.UpdateManifest, key: str, *, limits: LimitsConfig,
                has_base: Callable[[str, str], bool]) -> None:
    """Codec "slot": no payload, and the target engine is in one of ``key``'s slots."""
    if m.payload_size != 0 or len(m.chunk_sha256):
        raise Rejected("codec slot carries no payload (payload_size 0, no chunks)",
                       reason="malformed")
    if not HEX64_RE.match(m.target_sha256) or (
            m.payload_sha256 and not HEX64_RE.match(m.payload_sha256)):
        raise Rejected("target_sha256/payload_sha256 is not 64 lower-case hex chars",
                       reason="malformed")
    if m.target_size > limits.max_update_bytes:
        raise Rejected(f"declared target size {m.target_size} exceeds max_update_bytes "
                       f"{limits.max_update_bytes}", reason="too_large")
    if not has_base(key, m.target_sha256):
        raise Rejected(f"engine {m.target_sha256[:12]} is in no slot of {key} on this device",
                       reason="slot_missing")


@dataclass(frozen=True)
class VerifiedDesired:
    """A DesiredState whose signature was checked (see :func:`verify_desired`)."""

    state: update_pb2.DesiredState
    envelope_bytes: bytes
    key_id: str


def verify_desired(data: bytes, *, trust: TrustState, device_id: str, limits: LimitsConfig,
                   now_ms: int) -> VerifiedDesired:
    """Verify a signed DesiredState for this device; Rejected(reason) otherwise."""
    env = envelope.parse_envelope(data, max_bytes=limits.max_envelope_bytes)
    ds = trust.verify(env, update_pb2.DesiredState, at_ms=now_ms)
    if ds.device_id and ds.device_id != device_id:
        raise Rejected(f"desired state is for device {ds.device_id!r}", reason="wrong_device")
    return VerifiedDesired(state=ds, envelope_bytes=data, key_id=env.key_id)


def desired_update_id(vd: VerifiedDesired, dm: update_pb2.DesiredModel) -> str:
    """The update id a desired-state activation runs under: the model's, else synthetic."""
    return dm.update_id or f"desired-{vd.state.generation}-{model_key(dm.name, dm.variant)}"


def desired_update(vd: VerifiedDesired, dm: update_pb2.DesiredModel, *, device_class: str,
                   highest_committed: Callable[[str], tuple[int, int]],
                   has_base: Callable[[str, str], bool]) -> VerifiedUpdate:
    """A codec "slot" update for desired model ``dm`` (one of ``vd.state.models``), whose
    target engine is already in a slot: the signed DesiredState authorizes activating it.
    Rejected (malformed / rollback / slot_missing) like an offer would be."""
    if not NAME_RE.match(dm.name) or (dm.variant and not NAME_RE.match(dm.variant)):
        raise Rejected(f"invalid model name {dm.name!r}/{dm.variant!r}", reason="malformed")
    if not HEX64_RE.match(dm.target_sha256):
        raise Rejected("desired target_sha256 is not 64 lower-case hex chars",
                       reason="malformed")
    uid = desired_update_id(vd, dm)
    if not UPDATE_ID_RE.match(uid):
        raise Rejected(f"invalid update id {uid!r}", reason="malformed")
    key = model_key(dm.name, dm.variant)
    check_newer(key, (dm.version, dm.revision), highest_committed(key))
    if not has_base(key, dm.target_sha256):
        raise Rejected(f"engine {dm.target_sha256[:12]} is in no slot of {key} on this device",
                       reason="slot_missing")
    m = update_pb2.UpdateManifest(
        update_id=uid, device_class=device_class, model_name=dm.name, variant=dm.variant,
        version=dm.version, revision=dm.revision, engine_version=dm.engine_version,
        target_sha256=dm.target_sha256, codec=SLOT_CODEC, issued_at_ms=vd.state.issued_at_ms,
        device_id=vd.state.device_id)
    return VerifiedUpdate(manifest=m, envelope_bytes=vd.envelope_bytes, key_id=vd.key_id,
                          _token=_TOKEN)


class Verifier:
    """The checks above bound to this device (id, class, limits), its current trust state,
    its highest committed pairs and its slots. Used by the update manager."""

    def __init__(self, *, device_id: str, device_class: str, limits: LimitsConfig,
                 trust: Callable[[], TrustState],
                 highest_committed: Callable[[str], tuple[int, int]],
                 has_base: Callable[[str, str], bool], now_ms: Callable[[], int]) -> None:
        self.device_id, self.device_class, self.limits = device_id, device_class, limits
        self._trust, self._highest, self._has_base = trust, highest_committed, has_base
        self._now_ms = now_ms

    def offer(self, data: bytes) -> VerifiedUpdate:
        return verify_offer(data, trust=self._trust(), device_id=self.device_id,
                            device_class=self.device_class, highest_committed=self._highest,
                            limits=self.limits, has_base=self._has_base, now_ms=self._now_ms())

    def desired(self, data: bytes) -> VerifiedDesired:
        return verify_desired(data, trust=self._trust(), device_id=self.device_id,
                              limits=self.limits, now_ms=self._now_ms())

    def desired_model(self, vd: VerifiedDesired,
                      dm: update_pb2.DesiredModel) -> VerifiedUpdate:
        return desired_update(vd, dm, device_class=self.device_class,
                              highest_committed=self._highest, has_base=self._has_base)

    def again(self, *, source: str, envelope_bytes: bytes, key: str) -> VerifiedUpdate:
        """Verify a persisted update again (after a restart): its offer, or for an update a
        DesiredState authorized (``source`` "desired"), that state's entry for ``key``."""
        if source != "desired":
            return self.offer(envelope_bytes)
        vd = self.desired(envelope_bytes)
        for dm in vd.state.models:
            if model_key(dm.name, dm.variant) == key:
                return self.desired_model(vd, dm)
        raise Rejected(f"desired state no longer lists {key}", reason="malformed")
