"""Typed EdgeRollout specs: the CRD-validated dict turned into dataclasses once.

``RolloutSpec.from_resource(resource)`` is called by controller.reconcile.rollouts at the
top of every pass; the rest of the reconcile reads typed fields, so a field can be followed
from the YAML to the device. The dict was already validated (and defaulted) against the CRD
schema by ``edgefleet apply`` / the Kubernetes API server; this module only converts, with
the CRD's defaults for fields a hand-written dict may lack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_DEADLINE_S = 600


@dataclass(frozen=True)
class HealthGate:
    """One wave's gate: install results, then serving health over an observation window."""

    min_success_percent: float = 100.0
    soak_seconds: int = 0
    max_failed: int = 0
    min_requests: int = 0
    max_error_rate_percent: float | None = None
    max_latency_ratio: float | None = None
    max_unhealthy_percent: float | None = None
    require_accuracy_probe: bool = False
    shadow: dict[str, Any] | None = None      # healthGate.shadow (shipped in the offers)

    @property
    def watches_serving(self) -> bool:
        """True when the gate looks at windowed serving metrics (not only installs)."""
        return (self.min_requests > 0 or self.max_error_rate_percent is not None
                or self.max_latency_ratio is not None)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> HealthGate:
        d = d or {}

        def opt(key: str) -> float | None:
            v = d.get(key)
            return None if v is None else float(v)

        return cls(min_success_percent=float(d.get("minSuccessPercent", 100)),
                   soak_seconds=int(d.get("soakSeconds", 0) or 0),
                   max_failed=int(d.get("maxFailed", 0) or 0),
                   min_requests=int(d.get("minRequests", 0) or 0),
                   max_error_rate_percent=opt("maxErrorRatePercent"),
                   max_latency_ratio=opt("maxLatencyRatio"),
                   max_unhealthy_percent=opt("maxUnhealthyPercent"),
                   require_accuracy_probe=bool(d.get("requireAccuracyProbe", False)),
                   shadow=dict(d["shadow"]) if isinstance(d.get("shadow"), dict) else None)


@dataclass(frozen=True)
class Wave:
    name: str
    percent: int | None
    count: int | None
    gate: HealthGate

    @classmethod
    def from_dict(cls, d: dict[str, Any], index: int) -> Wave:
        return cls(name=str(d.get("name") or index),
                   percent=int(d["percent"]) if "percent" in d else None,
                   count=int(d["count"]) if "count" in d else None,
                   gate=HealthGate.from_dict(d.get("healthGate")))


@dataclass(frozen=True)
class Selector:
    device_classes: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    match_labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RolloutSpec:
    """An EdgeRollout's spec, typed."""

    namespace: str
    name: str
    generation: int
    model: str
    version: int | None
    selector: Selector
    waves: tuple[Wave, ...]
    chunk_size_bytes: int | None
    max_bytes_per_second: int
    paused: bool
    aborted: bool
    retry: int
    rollback_to: int | None
    on_failure: str
    progress_deadline_s: int
    created: str          # metadata.creationTimestamp (ownership order between rollouts)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def from_resource(cls, resource: dict[str, Any]) -> RolloutSpec:
        md = resource.get("metadata") or {}
        spec = resource.get("spec") or {}
        sel = spec.get("selector") or {}
        waves = spec.get("waves") or [{"name": "all", "percent": 100}]
        rb = spec.get("rollbackTo") or {}
        return cls(
            namespace=str(md.get("namespace") or "default"), name=str(md.get("name") or ""),
            generation=int(md.get("generation") or 1), model=str(spec.get("model", "")),
            version=int(spec["version"]) if spec.get("version") else None,
            selector=Selector(device_classes=tuple(sel.get("deviceClasses") or ()),
                              devices=tuple(sel.get("devices") or ()),
                              match_labels={str(k): str(v) for k, v in
                                            (sel.get("matchLabels") or {}).items()}),
            waves=tuple(Wave.from_dict(w, i) for i, w in enumerate(waves)),
            chunk_size_bytes=int(spec["chunkSizeBytes"]) if spec.get("chunkSizeBytes") else None,
            max_bytes_per_second=int(spec.get("maxBytesPerSecond") or 0),
            paused=bool(spec.get("paused", False)), aborted=bool(spec.get("aborted", False)),
            retry=int(spec.get("retry") or 0),
            rollback_to=int(rb["version"]) if rb.get("version") else None,
            on_failure=str(spec.get("onFailure") or "rollback"),
            progress_deadline_s=int(spec.get("progressDeadlineSeconds") or DEFAULT_DEADLINE_S),
            created=str(md.get("creationTimestamp") or ""))


def owner_order(spec: RolloutSpec) -> tuple[str, str]:
    """Sort key of rollouts of one model: the newest one (largest key) owns shared devices."""
    return (spec.created, spec.name)
