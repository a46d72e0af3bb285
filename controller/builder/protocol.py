"""The builder protocol's shared rules: facts, class matching, fingerprint checks, identities.

Used by both ends of the remote-build protocol (docs/builder.md): the builder program
(controller.builder.program) and the controller's BuildDispatcher (controller.builder.dispatcher).

- ``BuilderFacts``: what a builder can build (engine kind, arch, accelerator, toolchain and its
  exact version), announced in a signed BuilderAnnounce.
- ``class_mismatch(facts, device_class)``: why a builder cannot build for a DeviceClass, or None.
- ``check_fingerprint(fp, device_class=, facts=)``: Rejected unless an uploaded engine's
  fingerprint fits both the class and the builder that claims to have built it.
- Builder identities: an Ed25519 key per builder (``load_or_create_identity``), enrolled on the
  controller by public key (``load_trusted_builders``: JSON ``{"builder-id": "base64 raw key"}``).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controller.compile.deviceclass import DeviceClassSpec
from protos import envelope
from protos.edgefleet.v1 import builder_pb2, common_pb2, update_pb2
from protos.errors import GiveUp, Rejected
from protos.fsutil import write_atomic

FP_FIELDS = ("engine_kind", "arch", "toolchain", "toolchain_version", "accelerator",
             "precision", "min_runtime_version")


@dataclass
class BuilderLimits:
    """Size and time limits on what crosses the builder protocol (both sides)."""

    max_mqtt_payload_bytes: int = 256 * 1024
    max_model_bytes: int = 2 * 1024 * 1024 * 1024
    max_engine_bytes: int = 2 * 1024 * 1024 * 1024
    max_report_bytes: int = 128 * 1024
    max_uploads_per_job: int = 4
    job_timeout_s: float = 3600.0      # dispatch -> verified result
    job_ttl_s: float = 3600.0          # a builder refuses a job this old


@dataclass(frozen=True)
class BuilderFacts:
    """What one builder builds; the dispatcher matches these against a DeviceClass."""

    engine_kind: str
    arch: str
    accelerator: str = ""
    toolchain: str = ""
    toolchain_version: str = ""
    precisions: tuple[str, ...] = field(default=())

    @classmethod
    def from_announce(cls, a: builder_pb2.BuilderAnnounce) -> BuilderFacts:
        return cls(engine_kind=a.engine_kind, arch=a.arch, accelerator=a.accelerator,
                   toolchain=a.toolchain, toolchain_version=a.toolchain_version,
                   precisions=tuple(a.precisions))

    def describe(self) -> str:
        return " ".join(x for x in (self.engine_kind, self.arch, self.accelerator,
                                    f"{self.toolchain} {self.toolchain_version}".strip()) if x)


def version_matches(wanted: str, have: str) -> bool:
    """A class's toolchainVersion "10.3" accepts "10.3", "10.3.0.26"; "" accepts anything."""
    if not wanted:
        return True
    return have == wanted or have.startswith(wanted + ".")


def class_mismatch(facts: BuilderFacts, dc: DeviceClassSpec) -> str | None:
    """Why a builder with ``facts`` cannot build for ``dc``; None when it can."""
    if facts.engine_kind != dc.engine_kind:
        return f"builds {facts.engine_kind}, class {dc.name} needs {dc.engine_kind}"
    if dc.arch and facts.arch != dc.arch:
        return f"is {facts.arch or '?'}, class {dc.name} is {dc.arch}"
    if dc.accelerator and facts.accelerator != dc.accelerator:
        return f"has {facts.accelerator or 'no accelerator'}, class {dc.name} needs {dc.accelerator}"
    if not version_matches(dc.toolchain_version, facts.toolchain_version):
        return (f"has {facts.toolchain} {facts.toolchain_version}, class {dc.name} needs "
                f"{dc.toolchain_version}")
    return None


def fingerprint_dict(fp: common_pb2.EngineFingerprint) -> dict[str, str]:
    return {f: str(getattr(fp, f)) for f in FP_FIELDS}


def check_fingerprint(fp: dict[str, str], *, device_class: DeviceClassSpec,
                      facts: BuilderFacts, precisions: list[str]) -> None:
    """Rejected (reason ``fingerprint_mismatch``) unless ``fp`` fits the class and the builder."""
    problems = []
    claimed = BuilderFacts(engine_kind=fp.get("engine_kind", ""), arch=fp.get("arch", ""),
                           accelerator=fp.get("accelerator", ""),
                           toolchain=fp.get("toolchain", ""),
                           toolchain_version=fp.get("toolchain_version", ""))
    why = class_mismatch(claimed, device_class)
    if why:
        problems.append(f"engine {why}")
    for name in ("engine_kind", "arch", "accelerator", "toolchain_version"):
        if getattr(claimed, name) != getattr(facts, name):
            problems.append(f"fingerprint {name}={getattr(claimed, name)!r} but the builder "
                            f"announced {getattr(facts, name)!r}")
    if fp.get("precision", "") not in precisions:
        problems.append(f"precision {fp.get('precision')!r} was not requested ({precisions})")
    if problems:
        raise Rejected("; ".join(problems), reason="fingerprint_mismatch")


# -- identities ----------------------------------------------------------------------------------
def load_or_create_identity(path: Path) -> Ed25519PrivateKey:
    """The builder's Ed25519 key (PEM at ``path``, 0600), created on first use."""
    path = Path(path)
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        write_atomic(path, key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), mode=0o600)
        return key
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise GiveUp(f"cannot load builder key {path}: {e}", reason="bad_key_file") from e
    if not isinstance(loaded, Ed25519PrivateKey):
        raise GiveUp(f"{path} is not an Ed25519 key", reason="bad_key_file")
    return loaded


def public_b64(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(envelope.public_raw(key.public_key())).decode()


def parse_public_b64(value: str) -> bytes:
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except ValueError as e:
        raise Rejected(f"public key is not base64: {e}", reason="bad_key") from e
    envelope.load_public(raw)  # Rejected when not a valid Ed25519 key
    return raw


def load_trusted_builders(path: Path) -> dict[str, bytes]:
    """Enrolled builders from a JSON file ``{"builder-id": "base64 raw public key", ...}``."""
    try:
        data: Any = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise GiveUp(f"cannot read trusted builders {path}: {e}", reason="bad_config") from e
    if not isinstance(data, dict):
        raise GiveUp(f"{path}: expected a JSON object of builder id -> public key",
                     reason="bad_config")
    return {str(k): parse_public_b64(str(v)) for k, v in data.items()}


def verify_from_builder(env: update_pb2.SignedEnvelope, *, public_key: bytes,
                        message_type: type[envelope.M]) -> envelope.M:
    """Verify an envelope signed by an enrolled builder key (Rejected otherwise)."""
    if env.key_id != envelope.key_id(public_key):
        raise Rejected(f"signed by key {env.key_id}, not the builder's enrolled key "
                       f"{envelope.key_id(public_key)}", reason="unknown_key")
    return envelope.verify(env, envelope.load_public(public_key), message_type)
