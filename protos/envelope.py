"""Signed envelopes: canonical bytes, Ed25519 signing and verification.

The controller signs update offers, desired state and (with the root key) key lists; the
agent verifies them before it looks at the payload. The signature covers
``canonical_bytes(payload_type, payload)`` so a payload of one type can never be replayed
as another (same idea as DSSE's pre-authentication encoding).
"""

from __future__ import annotations

import hashlib
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from google.protobuf.message import DecodeError, Message

from protos.edgefleet.v1 import update_pb2
from protos.errors import Rejected

DOMAIN = b"edgefleet-envelope-v1"
MAX_ENVELOPE_BYTES = 4 * 1024 * 1024  # default cap; callers pass their configured limit

M = TypeVar("M", bound=Message)


def canonical_bytes(payload_type: str, payload: bytes) -> bytes:
    """Bytes that are signed: domain, type and payload, each length-prefixed."""
    t = payload_type.encode()
    return b"".join(
        [DOMAIN, len(t).to_bytes(8, "big"), t, len(payload).to_bytes(8, "big"), payload]
    )


def key_id(public_key: Ed25519PublicKey | bytes) -> str:
    """Stable id of a public key: first 16 hex chars of sha256 of its raw bytes."""
    raw = public_key if isinstance(public_key, bytes) else public_raw(public_key)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_raw(public_key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def load_public(raw: bytes) -> Ed25519PublicKey:
    """Public key from 32 raw bytes; Rejected when malformed."""
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as e:
        raise Rejected(f"malformed public key: {e}", reason="bad_key") from e


def sign(message: Message, private_key: Ed25519PrivateKey) -> update_pb2.SignedEnvelope:
    """Wrap ``message`` in a SignedEnvelope signed by ``private_key``."""
    payload_type = message.DESCRIPTOR.full_name
    payload = message.SerializeToString(deterministic=True)
    sig = private_key.sign(canonical_bytes(payload_type, payload))
    return update_pb2.SignedEnvelope(
        payload_type=payload_type,
        payload=payload,
        key_id=key_id(private_key.public_key()),
        signature=sig,
    )


def parse_envelope(data: bytes, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> update_pb2.SignedEnvelope:
    """Decode untrusted bytes into a SignedEnvelope (not yet verified)."""
    if len(data) > max_bytes:
        raise Rejected(f"envelope of {len(data)} bytes exceeds limit {max_bytes}",
                       reason="too_large")
    env = update_pb2.SignedEnvelope()
    try:
        env.ParseFromString(data)
    except DecodeError as e:
        raise Rejected(f"malformed envelope: {e}", reason="malformed") from e
    if not env.payload_type or not env.signature:
        raise Rejected("envelope without type or signature", reason="malformed")
    return env


def verify(env: update_pb2.SignedEnvelope, public_key: Ed25519PublicKey, message_type: type[M]) -> M:
    """Check the signature with ``public_key`` and decode the payload as ``message_type``.

    Raises Rejected (reason ``bad_signature``, ``wrong_type`` or ``malformed``).
    """
    expected = message_type.DESCRIPTOR.full_name
    if env.payload_type != expected:
        raise Rejected(f"envelope carries {env.payload_type!r}, expected {expected!r}",
                       reason="wrong_type")
    try:
        public_key.verify(env.signature, canonical_bytes(env.payload_type, env.payload))
    except InvalidSignature as e:
        raise Rejected(f"bad signature (key {env.key_id})", reason="bad_signature") from e
    msg = message_type()
    try:
        msg.ParseFromString(env.payload)
    except DecodeError as e:
        raise Rejected(f"malformed {expected}: {e}", reason="malformed") from e
    return msg
