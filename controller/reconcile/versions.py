"""Model versions only go up, and the accuracy probe shipped with a version.

* ``check_version_goes_up`` is called by ControllerCore.apply (embedded mode) for every
  EdgeModel document and by controller.reconcile.models (both modes) before compiling: a
  lower ``spec.version`` than the current one or than any version compiled before
  (ModelVersion history), or the same version with a different source, is refused with a
  message naming both versions. Rolling back is rolling forward: ``edgefleet rollout
  undo`` ships an older engine as a new revision.
* ``record_model_version`` (called by the model reconcile when a version is Ready) keeps
  each version's source and engines in ModelVersion: the history this check and undo use.
* ``ProbeCache.probe_for`` builds (once per model source, samples and metric) the signed
  on-device accuracy probe that offers carry (controller.ota.probe.build_probe), from the
  EdgeModel's validation samples or its declared ``spec.inputShapes``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import func, select

from controller.fleet.db import session_scope
from controller.fleet.models import ModelVersion
from controller.store import ArtifactStore
from protos.errors import Rejected

log = logging.getLogger(__name__)


def _source(spec: dict[str, Any] | None) -> str:
    return str(((spec or {}).get("source") or {}).get("sha256") or "")


def version_problem(s: Any, ns: str, name: str, spec: dict[str, Any],
                    old_spec: dict[str, Any] | None) -> str:
    """Why this EdgeModel spec's version is refused ("" = fine)."""
    new_v = int(spec.get("version") or 0)
    if old_spec is not None:
        old_v = int(old_spec.get("version") or 0)
        if new_v < old_v:
            return (f"spec.version {new_v} is lower than the current version {old_v}: "
                    "versions only go up (roll back with `edgefleet rollout undo`, which "
                    "ships the older engine as a new revision)")
        if new_v == old_v and _source(spec) and _source(old_spec) and \
                _source(spec) != _source(old_spec):
            return (f"spec.version {new_v} already names source {_source(old_spec)[:12]}; "
                    f"the new source {_source(spec)[:12]} needs a higher version "
                    f"(spec.version {old_v + 1})")
    highest = s.exec(select(func.max(ModelVersion.version)).where(
        ModelVersion.namespace == ns, ModelVersion.name == name)).one()
    if highest and new_v < int(highest):
        return (f"spec.version {new_v} is lower than version {int(highest)} that this "
                "controller already compiled and shipped: versions only go up")
    same = s.exec(select(ModelVersion).where(ModelVersion.namespace == ns,
                                             ModelVersion.name == name,
                                             ModelVersion.version == new_v)).first()
    if same is not None and same.source_sha256 and _source(spec) and \
            same.source_sha256 != _source(spec):
        return (f"spec.version {new_v} was already shipped with source "
                f"{same.source_sha256[:12]}; the new source {_source(spec)[:12]} needs a "
                f"higher version (spec.version {int(highest or new_v) + 1})")
    return ""


def check_version_goes_up(s: Any, ns: str, name: str, spec: dict[str, Any],
                          old_spec: dict[str, Any] | None) -> None:
    """Raise Rejected when the version does not go up (see module docstring)."""
    why = version_problem(s, ns, name, spec, old_spec)
    if why:
        raise Rejected(f"EdgeModel {ns}/{name}: {why}", reason="version_not_increasing")


def record_model_version(db: DbEngine, model: dict[str, Any], now_ms: int) -> None:
    """Remember the engines of a Ready EdgeModel version (undo ships them again later)."""
    md, spec, st = model.get("metadata") or {}, model.get("spec") or {}, model.get("status") or {}
    ns, name, version = str(md.get("namespace") or "default"), str(md.get("name")), int(
        spec.get("version") or 0)
    engines = {e["deviceClass"]: e for e in st.get("engines") or [] if e.get("sha256")}
    if not engines or not version:
        return
    with session_scope(db) as s:
        row = s.exec(select(ModelVersion).where(ModelVersion.namespace == ns,
                                                ModelVersion.name == name,
                                                ModelVersion.version == version)).first()
        src = str((spec.get("source") or {}).get("sha256") or "")
        if row is not None and row.engines == engines and row.source_sha256 == src:
            return
        row = row or ModelVersion(namespace=ns, name=name, version=version, created_ms=now_ms)
        row.source_sha256, row.engines = src, engines
        row.variants = list(st.get("variants") or [])
        s.add(row)


class ProbeCache:
    """Probe sets per (model source, samples, metric, budget), built off the loop."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self._cache: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()

    def probe_for(self, model: dict[str, Any]) -> Any:
        spec = model.get("spec") or {}
        src = _source(spec)
        samples = str(((spec.get("validation") or {}).get("samples") or {}).get("sha256") or "")
        shapes = spec.get("inputShapes") or None
        acc = spec.get("accuracy") or {}
        metric, budget = str(acc.get("metric") or ""), acc.get("budget")
        if not src or not (samples or shapes) or not self.store.has(src):
            return None
        key = (src, samples, metric, str(budget), repr(sorted((shapes or {}).items())))
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        try:
            from controller.compile.deviceclass import AccuracySpec
            from controller.ota import probe as probes
        except ImportError:
            return None
        spec_acc = AccuracySpec.from_spec(acc or None)
        built = probes.build_probe(
            model_path=self.store.path(src),
            samples_path=self.store.path(samples) if samples and self.store.has(samples)
            else None, metric=spec_acc.metric, threshold=float(spec_acc.budget),
            input_shapes=shapes, options=probes.top1_options(spec_acc))
        with self._lock:
            self._cache[key] = built
        return built
