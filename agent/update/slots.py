"""A/B engine slots on disk: ``data_dir/models/{key}/{a|b}/engine.*`` + ``meta.json``, and
``active.json`` naming the committed slot.

A new engine is staged into the slot that is NOT active (which drops the older engine kept
there: the slot store keeps exactly the serving engine and its predecessor as rollback
target). Commit is one atomic rename of ``active.json``. Every file is written atomically.
A codec "slot" update moves no bytes: it relabels the engine of a slot (``relabeled`` +
``write_meta``: version, revision, engine_version, update_id) and commits that slot.
Called by :mod:`agent.update.manager` (stage, relabel, commit, base lookup),
:mod:`agent.update.serving` (startup load, integrity checks, fallbacks) and :mod:`agent.app`
(heartbeat slot reports).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.update.verify import VerifiedUpdate
from protos.edgefleet.v1 import common_pb2, device_pb2
from protos.fsutil import replace_durably, sha256_file, write_atomic

log = logging.getLogger(__name__)

SLOTS = ("a", "b")
ENGINE_SUFFIX = {"onnxruntime-cpu": ".onnx", "onnxruntime-cuda": ".onnx",
                 "tensorrt": ".plan", "rknn": ".rknn"}


@dataclass
class SlotInfo:
    """What one slot holds."""

    key: str
    slot: str
    name: str
    variant: str
    version: int
    sha256: str
    size: int
    file: str                 # engine file name inside the slot folder
    engine_kind: str
    precision: str
    update_id: str
    fingerprint_b64: str      # serialized EngineFingerprint
    signature_b64: str        # serialized ModelSignature
    revision: int = 0         # anti-rollback revision of the update that installed/relabelled it
    engine_version: int = 0   # model version the engine was built for (0 in old files = version)

    @property
    def pair(self) -> tuple[int, int]:
        """The anti-rollback pair (version, revision) this slot was committed/staged with."""
        return (self.version, self.revision)

    @property
    def built_for(self) -> int:
        """The model version the engine bytes were built for."""
        return self.engine_version or self.version

    def to_proto(self, *, active: bool) -> device_pb2.ServedModel:
        """This slot as a ``ServedModel`` (heartbeat ``slots``)."""
        return device_pb2.ServedModel(
            name=self.name, version=self.version, sha256=self.sha256, slot=self.slot,
            engine_kind=self.engine_kind, precision=self.precision, active=active,
            variant=self.variant, revision=self.revision, engine_version=self.built_for,
            update_id=self.update_id)

    @property
    def fingerprint(self) -> common_pb2.EngineFingerprint:
        fp = common_pb2.EngineFingerprint()
        fp.ParseFromString(base64.b64decode(self.fingerprint_b64))
        return fp

    @property
    def signature(self) -> common_pb2.ModelSignature:
        sig = common_pb2.ModelSignature()
        sig.ParseFromString(base64.b64decode(self.signature_b64))
        return sig

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SlotInfo:
        return cls(**d)


class SlotStore:
    """The A/B slots of every model on this device."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def slot_dir(self, key: str, slot: str) -> Path:
        return self.root / key / slot

    def engine_path(self, info: SlotInfo) -> Path:
        return self.slot_dir(info.key, info.slot) / info.file

    def keys(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def read_meta(self, key: str, slot: str) -> SlotInfo | None:
        p = self.slot_dir(key, slot) / "meta.json"
        try:
            return SlotInfo.from_json(json.loads(p.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            log.error("slot meta %s unreadable: %s", p, e)
            return None

    def active_slot(self, key: str) -> str | None:
        p = self.root / key / "active.json"
        try:
            slot = json.loads(p.read_text()).get("slot")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as e:
            log.error("active pointer %s unreadable: %s", p, e)
            return None
        return slot if slot in SLOTS else None

    def active(self, key: str) -> SlotInfo | None:
        slot = self.active_slot(key)
        return self.read_meta(key, slot) if slot else None

    def inactive_slot(self, key: str) -> str:
        return "b" if self.active_slot(key) == "a" else "a"

    def check(self, info: SlotInfo) -> bool:
        """True when the slot's engine file exists and has the recorded sha256."""
        path = self.engine_path(info)
        try:
            return path.stat().st_size == info.size and sha256_file(path) == info.sha256
        except OSError:
            return False

    def find_base(self, key: str, sha256: str) -> Path | None:
        """Engine file in either slot of ``key`` whose recorded sha256 is ``sha256``."""
        active = self.active_slot(key)
        for slot in sorted(SLOTS, key=lambda s: s != active):  # the active slot first
            info = self.read_meta(key, slot)
            if info and info.sha256 == sha256 and self.engine_path(info).is_file():
                return self.engine_path(info)
        return None

    def has_base(self, key: str, sha256: str) -> bool:
        """True when a slot of ``key`` holds the engine ``sha256`` (delta base, slot target)."""
        return self.find_base(key, sha256) is not None

    def slot_of(self, key: str, sha256: str) -> str | None:
        """The slot of ``key`` holding engine ``sha256`` (the active one first), or None."""
        path = self.find_base(key, sha256)
        return path.parent.name if path is not None else None

    def other(self, key: str) -> SlotInfo | None:
        """What the slot that is not active holds (None when empty or nothing is active)."""
        active = self.active_slot(key)
        return self.read_meta(key, "b" if active == "a" else "a") if active else None

    def installed(self) -> list[tuple[SlotInfo, bool]]:
        """Every engine in a slot, with True for the committed (active) one."""
        out = []
        for key in self.keys():
            active = self.active_slot(key)
            for slot in SLOTS:
                info = self.read_meta(key, slot)
                if info is not None:
                    out.append((info, slot == active))
        return out

    def staging_file(self, vu: VerifiedUpdate, slot: str) -> Path:
        """Temp path (inside the target slot folder) for the patcher's output."""
        d = self.slot_dir(vu.model_key, slot)
        d.mkdir(parents=True, exist_ok=True)
        return d / f".incoming-{vu.update_id}.tmp"

    def stage(self, vu: VerifiedUpdate, built: Path, *, slot: str) -> SlotInfo:
        """Rename a checked engine into ``slot`` (not the active one) and record its meta."""
        m = vu.manifest
        key = vu.model_key
        if slot == self.active_slot(key):
            raise ValueError(f"refusing to stage over the active slot {key}/{slot}")
        d = self.slot_dir(key, slot)
        old = self.read_meta(key, slot)
        (d / "meta.json").unlink(missing_ok=True)  # the slot is no longer a valid base
        file = "engine" + ENGINE_SUFFIX.get(m.fingerprint.engine_kind, ".bin")
        replace_durably(built, d / file)
        if old and old.file != file:
            (d / old.file).unlink(missing_ok=True)
        info = SlotInfo(
            key=key, slot=slot, name=m.model_name, variant=m.variant, version=m.version,
            sha256=m.target_sha256, size=m.target_size, file=file,
            engine_kind=m.fingerprint.engine_kind, precision=m.fingerprint.precision,
            update_id=m.update_id,
            fingerprint_b64=base64.b64encode(m.fingerprint.SerializeToString()).decode(),
            signature_b64=base64.b64encode(m.signature.SerializeToString()).decode(),
            revision=m.revision, engine_version=m.engine_version or m.version,
        )
        self.write_meta(info)
        for stray in d.glob(".incoming-*.tmp"):
            stray.unlink(missing_ok=True)
        return info

    def write_meta(self, info: SlotInfo) -> None:
        """Record (atomically) what slot ``info.slot`` of ``info.key`` holds."""
        d = self.slot_dir(info.key, info.slot)
        write_atomic(d / "meta.json", json.dumps(asdict(info), sort_keys=True).encode(),
                     mode=0o600)

    def relabeled(self, info: SlotInfo, vu: VerifiedUpdate) -> SlotInfo:
        """``info`` labelled as installed by codec "slot" update ``vu`` (not written yet).
        The engine bytes are the same, so an unset engine_version keeps the slot's own."""
        m = vu.manifest
        return dataclasses.replace(info, version=m.version, revision=m.revision,
                                   engine_version=m.engine_version or info.built_for,
                                   update_id=m.update_id)

    def commit(self, info: SlotInfo) -> None:
        """Make ``info.slot`` the active slot of its model (one atomic rename)."""
        write_atomic(self.root / info.key / "active.json",
                     json.dumps({"slot": info.slot, "version": info.version,
                                 "revision": info.revision, "sha256": info.sha256}).encode(),
                     mode=0o600)
