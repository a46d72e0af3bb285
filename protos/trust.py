"""TUF-style trust: an offline root key signs the list of online signing keys.

The controller (``edgefleet keys init|rotate|revoke``) builds and root-signs a KeyList and
publishes it retained on ``protos.topics.TRUST_KEYS``; the agent pins the root public key at
enrollment and keeps a :class:`TrustState`: it accepts only newer, unexpired, root-signed key
lists, and verifies every update envelope against a listed, unrevoked, unexpired key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protos import envelope
from protos.edgefleet.v1 import update_pb2
from protos.errors import Rejected


def now_ms() -> int:
    return int(time.time() * 1000)


def make_key_list(
    root: Ed25519PrivateKey,
    keys: list[tuple[Ed25519PublicKey, int]],
    *,
    version: int,
    revoked: list[str] | None = None,
    expires_at_ms: int,
) -> update_pb2.SignedEnvelope:
    """Root-sign a KeyList of (signing public key, key expiry ms)."""
    kl = update_pb2.KeyList(
        version=version,
        issued_at_ms=now_ms(),
        expires_at_ms=expires_at_ms,
        revoked_key_ids=list(revoked or []),
    )
    for pub, exp in keys:
        raw = envelope.public_raw(pub)
        kl.keys.add(key_id=envelope.key_id(raw), public_key=raw, expires_at_ms=exp)
    return envelope.sign(kl, root)


@dataclass
class TrustState:
    """What an agent trusts: the pinned root and the newest accepted key list."""

    root_public: bytes
    key_list: update_pb2.KeyList = field(default_factory=update_pb2.KeyList)

    def accept_key_list(self, env: update_pb2.SignedEnvelope, *, at_ms: int | None = None) -> bool:
        """Verify a root-signed key list; adopt it when newer. Returns True when adopted.

        Raises Rejected when the signature is not the root's, or the list is expired or older
        than the one held (a replayed old list could un-revoke a key).
        """
        at = now_ms() if at_ms is None else at_ms
        if env.key_id != envelope.key_id(self.root_public):
            raise Rejected(f"key list signed by {env.key_id}, not the pinned root",
                           reason="unknown_key")
        kl = envelope.verify(env, envelope.load_public(self.root_public), update_pb2.KeyList)
        if kl.expires_at_ms and kl.expires_at_ms < at:
            raise Rejected(f"key list v{kl.version} expired", reason="expired")
        if kl.version < self.key_list.version:
            raise Rejected(
                f"key list v{kl.version} is older than held v{self.key_list.version}",
                reason="rollback",
            )
        if kl.version == self.key_list.version:
            return False
        self.key_list = kl
        return True

    def verify(self, env: update_pb2.SignedEnvelope, message_type: type[envelope.M], *,
               at_ms: int | None = None) -> envelope.M:
        """Verify an envelope signed by an online key of the held key list."""
        at = now_ms() if at_ms is None else at_ms
        if env.key_id in self.key_list.revoked_key_ids:
            raise Rejected(f"signing key {env.key_id} is revoked", reason="revoked_key")
        for k in self.key_list.keys:
            if k.key_id == env.key_id:
                if k.expires_at_ms and k.expires_at_ms < at:
                    raise Rejected(f"signing key {env.key_id} expired", reason="expired_key")
                return envelope.verify(env, envelope.load_public(k.public_key), message_type)
        raise Rejected(f"unknown signing key {env.key_id}", reason="unknown_key")
