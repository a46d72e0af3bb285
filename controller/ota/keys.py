"""Signing keys of the controller: an offline root key and rotating online signing keys.

Logic behind ``edgefleet keys init|rotate|revoke`` (the CLI is controller.cli) and what
ControllerCore uses to sign offers and publish the root-signed KeyList (TUF-style, built
with protos.trust.make_key_list). Files in ``keys_dir`` (private ones 0600):

- ``root.key``          root private key (PEM); move it offline after init — rotate/revoke
                        need it back (they re-sign the key list)
- ``root.pub``          root public key, base64 of the raw 32 bytes (agents pin it)
- ``signing/{id}.key``  online signing keys (PEM)
- ``state.json``        key list version, current key id, listed keys, revoked ids
- ``keylist.bin``       the current root-signed SignedEnvelope(KeyList)
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protos import envelope, trust
from protos.edgefleet.v1 import update_pb2
from protos.errors import GiveUp, Rejected
from protos.fsutil import write_atomic

DAY_MS = 24 * 3600 * 1000


def _now_ms() -> int:
    return int(time.time() * 1000)


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise GiveUp(f"cannot load key {path}: {e}", reason="bad_key_file") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise GiveUp(f"{path} is not an Ed25519 key", reason="bad_key_file")
    return key


@dataclass
class KeyState:
    version: int = 0
    current: str = ""
    keys: list[dict[str, Any]] = field(default_factory=list)   # {key_id, expires_at_ms}
    revoked: list[str] = field(default_factory=list)


class KeyStore:
    """The keys directory. Create with ``KeyStore.init(dir)`` or open with ``KeyStore(dir)``."""

    def __init__(self, keys_dir: Path) -> None:
        self.dir = Path(keys_dir)
        state_path = self.dir / "state.json"
        if not state_path.is_file():
            raise GiveUp(f"no keys in {self.dir}: run `edgefleet keys init`", reason="no_keys")
        raw = json.loads(state_path.read_text())
        self.state = KeyState(**raw)

    # -- creation and changes ---------------------------------------------------------------
    @classmethod
    def init(cls, keys_dir: Path, *, force: bool = False, signing_key_ttl_s: int = 90 * 86400,
             key_list_ttl_s: int = 365 * 86400) -> KeyStore:
        """Create a root key and a first signing key; refuses to overwrite unless ``force``."""
        d = Path(keys_dir)
        if (d / "state.json").exists() and not force:
            raise Rejected(f"keys already exist in {d} (use force to replace them)",
                           reason="exists")
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        root = Ed25519PrivateKey.generate()
        write_atomic(d / "root.key", _pem(root), mode=0o600)
        raw_pub = envelope.public_raw(root.public_key())
        write_atomic(d / "root.pub", base64.b64encode(raw_pub) + b"\n", mode=0o644)
        write_atomic(d / "state.json", json.dumps(KeyState().__dict__).encode(), mode=0o600)
        ks = cls(d)
        ks._add_signing_key(signing_key_ttl_s)
        ks._publish_list(key_list_ttl_s)
        return ks

    @classmethod
    def load_or_init(cls, keys_dir: Path) -> KeyStore:
        """Open the keys in ``keys_dir``, creating them on first start (embedded mode)."""
        if (Path(keys_dir) / "state.json").is_file():
            return cls(keys_dir)
        return cls.init(keys_dir)

    def rotate(self, *, signing_key_ttl_s: int = 90 * 86400,
               key_list_ttl_s: int = 365 * 86400) -> str:
        """New current signing key; older unexpired keys stay listed. Returns the new key id."""
        self._root()  # fail before changing anything when the root is offline
        kid = self._add_signing_key(signing_key_ttl_s)
        self._publish_list(key_list_ttl_s)
        return kid

    def revoke(self, key_id: str, *, key_list_ttl_s: int = 365 * 86400) -> str | None:
        """Revoke ``key_id``; if it was the current key, rotate. Returns the new key id if any."""
        self._root()
        if key_id not in {k["key_id"] for k in self.state.keys}:
            raise Rejected(f"unknown signing key {key_id}", reason="unknown_key")
        self.state.keys = [k for k in self.state.keys if k["key_id"] != key_id]
        if key_id not in self.state.revoked:
            self.state.revoked.append(key_id)
        (self.dir / "signing" / f"{key_id}.key").unlink(missing_ok=True)
        new_id = None
        if self.state.current == key_id:
            new_id = self._add_signing_key(90 * 86400)
        self._publish_list(key_list_ttl_s)
        return new_id

    # -- use ------------------------------------------------------------------------------------
    def signing_key(self) -> Ed25519PrivateKey:
        """The current online signing key (read again when its file changes)."""
        path = self.dir / "signing" / f"{self.state.current}.key"
        try:
            stamp = (str(path), path.stat().st_mtime_ns)
        except OSError:
            return _load_private(path)               # raises GiveUp naming the file
        cached = getattr(self, "_signing_cache", None)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        key = _load_private(path)
        self._signing_cache = (stamp, key)
        return key

    def sign(self, message: Any) -> update_pb2.SignedEnvelope:
        return envelope.sign(message, self.signing_key())

    def key_list_envelope(self) -> update_pb2.SignedEnvelope:
        env = update_pb2.SignedEnvelope()
        env.ParseFromString((self.dir / "keylist.bin").read_bytes())
        return env

    def root_public_raw(self) -> bytes:
        return base64.b64decode((self.dir / "root.pub").read_text().strip())

    def root_public_b64(self) -> str:
        return (self.dir / "root.pub").read_text().strip()

    def describe(self) -> dict[str, Any]:
        """Summary for the CLI and API (no secrets)."""
        return {"root_key_id": envelope.key_id(self.root_public_raw()),
                "root_public_key": self.root_public_b64(),
                "key_list_version": self.state.version, "current": self.state.current,
                "keys": list(self.state.keys), "revoked": list(self.state.revoked)}

    # -- internals ------------------------------------------------------------------------------
    def _root(self) -> Ed25519PrivateKey:
        p = self.dir / "root.key"
        if not p.is_file():
            raise GiveUp(f"root key {p} is offline: put it back to change the key list",
                         reason="root_offline")
        return _load_private(p)

    def _add_signing_key(self, ttl_s: int) -> str:
        key = Ed25519PrivateKey.generate()
        kid = envelope.key_id(key.public_key())
        write_atomic(self.dir / "signing" / f"{kid}.key", _pem(key), mode=0o600)
        os.chmod(self.dir / "signing", 0o700)
        self.state.keys.append({"key_id": kid, "expires_at_ms": _now_ms() + ttl_s * 1000})
        self.state.current = kid
        return kid

    def _publish_list(self, ttl_s: int) -> None:
        root = self._root()
        now = _now_ms()
        self.state.keys = [k for k in self.state.keys if k["expires_at_ms"] > now]
        pubs = []
        for k in self.state.keys:
            priv = _load_private(self.dir / "signing" / f"{k['key_id']}.key")
            pubs.append((priv.public_key(), int(k["expires_at_ms"])))
        self.state.version += 1
        env = trust.make_key_list(root, pubs, version=self.state.version,
                                  revoked=self.state.revoked, expires_at_ms=now + ttl_s * 1000)
        write_atomic(self.dir / "keylist.bin", env.SerializeToString(deterministic=True), mode=0o600)
        write_atomic(self.dir / "state.json", json.dumps(self.state.__dict__).encode(), mode=0o600)
