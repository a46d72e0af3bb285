"""Device classes and accuracy budgets as the compiler sees them.

``DeviceClassSpec.from_spec`` reads a DeviceClass resource's ``spec`` (CRD field names:
engineKind, arch, accelerator, toolchainVersion, isa, budgets {latencyMs, memoryMB});
``AccuracySpec.from_spec`` reads an EdgeModel's ``accuracy`` block (metric, budget).
Built-in classes (cpu-x86-64, cpu-aarch64, jetson-orin, rk3588) are the defaults when no
DeviceClass resource overrides them. Used by controller.compile.api, the CLI and reconcilers.

Accuracy budget meaning per metric (all fractions, not percent):
  * ``top1-drop``       max allowed drop of top-1 accuracy vs FP32 (needs labels), e.g. 0.01
  * ``top1-agreement``  min fraction of samples whose top-1 matches FP32, e.g. 0.99
  * ``max-abs-error``   max allowed |engine - FP32| over every output element
  * ``relative-error``  max allowed ||engine - FP32|| / ||FP32|| per output (L2, per sample max)
Top-1 metrics read class scores on ``classAxis`` of ``output`` from ``classOffset`` on, counting
only positions where FP32's best score >= ``scoreThreshold`` (detectors: YOLOv8 output
[N, 4+C, anchors] -> classOffset 4, scoreThreshold 0.25). Without them a detector's top-1 would
be dominated by box coordinates, like one cosine over the whole output.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from typing import Any

from protos.errors import Rejected

ENGINE_KINDS = ("onnxruntime-cpu", "tensorrt", "rknn")
ARCHES = ("x86_64", "aarch64", "")
METRICS = ("top1-drop", "top1-agreement", "max-abs-error", "relative-error")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class DeviceClassSpec:
    """A hardware/software target. ``toolchain_version`` "" means "what the compiler has"."""

    name: str
    engine_kind: str
    arch: str = ""
    accelerator: str = ""
    toolchain_version: str = ""
    isa: tuple[str, ...] = ()
    latency_budget_ms: float | None = None
    memory_budget_mb: float | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise Rejected("device class needs a name", reason="bad_device_class")
        if self.engine_kind not in ENGINE_KINDS:
            raise Rejected(f"device class {self.name}: unknown engineKind {self.engine_kind!r}; "
                           f"expected one of {ENGINE_KINDS}", reason="bad_device_class")
        if self.arch not in ARCHES:
            raise Rejected(f"device class {self.name}: unknown arch {self.arch!r}",
                           reason="bad_device_class")

    @classmethod
    def from_spec(cls, spec: dict[str, Any], *, name: str) -> DeviceClassSpec:
        """Build from a DeviceClass ``spec`` dict (camelCase CRD fields)."""
        if not isinstance(spec, dict):
            raise Rejected(f"device class {name}: spec must be a mapping",
                           reason="bad_device_class")
        budgets = spec.get("budgets") or {}
        isa = spec.get("isa") or []
        if not isinstance(isa, list) or not all(isinstance(i, str) for i in isa):
            raise Rejected(f"device class {name}: isa must be a list of strings",
                           reason="bad_device_class")
        try:
            lat = budgets.get("latencyMs")
            mem = budgets.get("memoryMB")
            return cls(name=name, engine_kind=str(spec.get("engineKind", "")),
                       arch=str(spec.get("arch", "")), accelerator=str(spec.get("accelerator", "")),
                       toolchain_version=str(spec.get("toolchainVersion", "")),
                       isa=tuple(sorted(i.lower() for i in isa)),
                       latency_budget_ms=float(lat) if lat is not None else None,
                       memory_budget_mb=float(mem) if mem is not None else None)
        except (TypeError, ValueError, AttributeError) as e:
            raise Rejected(f"device class {name}: bad spec: {e}", reason="bad_device_class") from e

    def to_spec(self) -> dict[str, Any]:
        budgets: dict[str, float] = {}
        if self.latency_budget_ms is not None:
            budgets["latencyMs"] = self.latency_budget_ms
        if self.memory_budget_mb is not None:
            budgets["memoryMB"] = self.memory_budget_mb
        return {"engineKind": self.engine_kind, "arch": self.arch,
                "accelerator": self.accelerator, "toolchainVersion": self.toolchain_version,
                "isa": list(self.isa), "budgets": budgets}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["isa"] = list(self.isa)
        return d


@dataclass(frozen=True)
class AccuracySpec:
    """How the accuracy gate judges a compiled engine against the FP32 reference."""

    metric: str = "top1-agreement"
    budget: float = 0.99
    output: str = ""          # output judged by top-1 metrics ("" = the first)
    class_axis: int = 1       # axis of class scores in that output
    class_offset: int = 0     # first class channel (4 for YOLOv8: channels 0-3 are the box)
    score_threshold: float | None = None  # top-1 only where FP32's best score >= this

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise Rejected(f"unknown accuracy metric {self.metric!r}; expected one of {METRICS}",
                           reason="bad_accuracy_spec")
        if not (self.budget == self.budget) or self.budget < 0:  # NaN or negative
            raise Rejected(f"accuracy budget must be >= 0, got {self.budget}",
                           reason="bad_accuracy_spec")
        if self.class_axis < 1 or self.class_offset < 0:
            raise Rejected("classAxis must be >= 1 (axis 0 is samples) and classOffset >= 0",
                           reason="bad_accuracy_spec")
        if self.metric == "top1-agreement" and self.budget > 1:
            raise Rejected("top1-agreement budget is a fraction in [0, 1]",
                           reason="bad_accuracy_spec")

    @classmethod
    def from_spec(cls, spec: dict[str, Any] | None) -> AccuracySpec:
        if not spec:
            return cls()
        if not isinstance(spec, dict):
            raise Rejected("accuracy must be a mapping", reason="bad_accuracy_spec")
        try:
            thr = spec.get("scoreThreshold")
            return cls(metric=str(spec.get("metric", "top1-agreement")),
                       budget=float(spec.get("budget", 0.99)),
                       output=str(spec.get("output", "")),
                       class_axis=int(spec.get("classAxis", 1)),
                       class_offset=int(spec.get("classOffset", 0)),
                       score_threshold=float(thr) if thr is not None else None)
        except (TypeError, ValueError) as e:
            raise Rejected(f"bad accuracy spec: {e}", reason="bad_accuracy_spec") from e

    def to_spec(self) -> dict[str, Any]:
        d: dict[str, Any] = {"metric": self.metric, "budget": self.budget}
        if self.output:
            d["output"] = self.output
        if self.class_axis != 1:
            d["classAxis"] = self.class_axis
        if self.class_offset:
            d["classOffset"] = self.class_offset
        if self.score_threshold is not None:
            d["scoreThreshold"] = self.score_threshold
        return d


def host_arch() -> str:
    """This machine's architecture as device classes name it (x86_64, aarch64, ...)."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


BUILTIN_DEVICE_CLASSES: dict[str, DeviceClassSpec] = {
    "cpu-x86-64": DeviceClassSpec(name="cpu-x86-64", engine_kind="onnxruntime-cpu",
                                  arch="x86_64", isa=("avx2",)),
    "cpu-aarch64": DeviceClassSpec(name="cpu-aarch64", engine_kind="onnxruntime-cpu",
                                   arch="aarch64", isa=("asimd", "asimddp")),
    "jetson-orin": DeviceClassSpec(name="jetson-orin", engine_kind="tensorrt", arch="aarch64",
                                   accelerator="sm_87", toolchain_version="10.3",
                                   latency_budget_ms=20.0, memory_budget_mb=2048.0),
    "rk3588": DeviceClassSpec(name="rk3588", engine_kind="rknn", arch="aarch64",
                              accelerator="rk3588-npu", toolchain_version="2.3",
                              latency_budget_ms=50.0, memory_budget_mb=1024.0),
}


# Kubernetes names cannot hold "_": the x86 class is ``cpu-x86-64``; the spelling with the
# architecture's own name is accepted as an alias on the command line.
ALIASES = {"cpu-x86_64": "cpu-x86-64"}


def get_device_class(name: str) -> DeviceClassSpec:
    """A built-in device class by name (or alias); Rejected if unknown."""
    try:
        return BUILTIN_DEVICE_CLASSES[ALIASES.get(name, name)]
    except KeyError:
        raise Rejected(f"unknown device class {name!r}; built-in: "
                       f"{sorted(BUILTIN_DEVICE_CLASSES)}", reason="unknown_device_class") from None
