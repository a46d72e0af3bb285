"""Per-device-class compilation with an accuracy gate: the controller's compile entry point.

``compile_model`` is called by the EdgeModel reconciler (through ``compile_in_subprocess``, off
the reconcile loop), the ``edgefleet compile`` CLI and bench/compile.py. It checks the ONNX
model, loads the validation samples, computes the FP32 reference, then asks the device class's
``Compiler`` for each precision in order (e.g. int8, fp16, fp32); the first engine that passes
the accuracy gate ships, every rejected precision is listed with its reason.

``Compiler`` is the pluggable base class: public ``compile`` checks inputs and wraps vendor
errors into protos.errors types; each backend (onnxruntime_cpu, tensorrt, rknn) implements the
private ``_compile`` hook and registers itself by engine kind.

Engines are cached by ``engine_cache_key`` (model sha256, device class, precision, toolchain
version); a whole request by ``compile_request_key`` (adds precisions, validation sha256 and
accuracy spec) so re-applying the same EdgeModel compiles nothing. The caller stores them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from controller.compile.accuracy import (
    GateResult,
    TensorInfo,
    ValidationSet,
    compare,
    load_validation,
    model_signature,
    run_onnx,
)
from controller.compile.deviceclass import PRECISIONS, AccuracySpec, DeviceClassSpec
from protos.errors import EdgefleetError, GiveUp, Rejected
from protos.fsutil import sha256_file

MAX_MODEL_BYTES = 2 * 1024 * 1024 * 1024 - 1  # protobuf limit for a single-file ONNX model

Progress = Callable[[str], None]

# engine kind -> module that defines and registers its Compiler (imported on demand)
_BACKEND_MODULES = {
    "onnxruntime-cpu": "controller.compile.onnxruntime_cpu",
    "tensorrt": "controller.compile.tensorrt",
    "rknn": "controller.compile.rknn",
}
_REGISTRY: dict[str, type[Compiler]] = {}


class AllPrecisionsRejected(Rejected):
    """No precision produced an engine that passed the accuracy gate."""

    def __init__(self, message: str, *, rejected: list[dict[str, str]]) -> None:
        super().__init__(message, reason="accuracy_gate")
        self.rejected = rejected


@dataclass
class BuildResult:
    """What a backend's ``_compile`` returns for one precision."""

    engine_path: Path
    outputs: dict[str, np.ndarray] | None = None  # engine outputs on the validation samples
    latency_ms: float | None = None               # median, batch 1, 1 thread, compile host
    signature: tuple[list[TensorInfo], list[TensorInfo]] | None = None  # if IO differ from ONNX
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompileReport:
    """The shipped engine, its fingerprint and signature, the gate result and rejections."""

    engine_path: str
    engine_sha256: str
    size: int
    precision: str
    engine_kind: str
    toolchain_version: str
    fingerprint: dict[str, str]
    signature: dict[str, list[dict[str, Any]]]
    metric: dict[str, Any] | None
    latency_ms: float | None
    rejected: list[dict[str, str]]
    device_class: str = ""
    model_sha256: str = ""
    cache_key: str = ""
    request_key: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompileReport:
        return cls(**d)


def _key(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def engine_cache_key(model_sha256: str, *, device_class: DeviceClassSpec, precision: str,
                     toolchain_version: str) -> str:
    """Key of one engine: same model, class, precision and toolchain -> same engine."""
    return _key({"v": 1, "model": model_sha256, "class": device_class.name,
                 "class_spec": device_class.to_spec(), "precision": precision,
                 "toolchain_version": toolchain_version})


def compile_request_key(model_sha256: str, *, device_class: DeviceClassSpec,
                        precisions: list[str], toolchain_version: str,
                        validation_sha256: str | None, accuracy: AccuracySpec | None) -> str:
    """Key of a whole compile request (the gate's choice depends on all of these)."""
    return _key({"v": 1, "model": model_sha256, "class": device_class.name,
                 "class_spec": device_class.to_spec(), "precisions": list(precisions),
                 "toolchain_version": toolchain_version, "validation": validation_sha256 or "",
                 "accuracy": accuracy.to_spec() if accuracy else None})


class Compiler(ABC):
    """One per engine kind. Create with ``get_compiler(device_class)``."""

    engine_kind: ClassVar[str]
    toolchain: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]] = PRECISIONS

    def __init__(self, device_class: DeviceClassSpec) -> None:
        if device_class.engine_kind != self.engine_kind:
            raise Rejected(f"{type(self).__name__} compiles {self.engine_kind}, not "
                           f"{device_class.engine_kind}", reason="bad_device_class")
        self.device_class = device_class

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if getattr(cls, "engine_kind", None):
            _REGISTRY[cls.engine_kind] = cls

    @abstractmethod
    def toolchain_version(self) -> str:
        """Version of the toolchain that builds engines (part of cache keys and fingerprints)."""

    def accelerator(self) -> str:
        return self.device_class.accelerator

    def fingerprint(self, precision: str) -> dict[str, str]:
        return {"engine_kind": self.engine_kind, "arch": self.device_class.arch,
                "toolchain": self.toolchain, "toolchain_version": self.toolchain_version(),
                "accelerator": self.accelerator(), "precision": precision,
                "min_runtime_version": ""}

    def compile(self, model: Path, *, precision: str, samples: ValidationSet | None,
                work_dir: Path, progress: Progress | None = None) -> BuildResult:
        """Build one engine at ``precision``; vendor failures become Rejected/GiveUp."""
        if precision not in self.precisions:
            raise Rejected(f"{self.engine_kind} does not build {precision!r} (supports "
                           f"{list(self.precisions)})", reason="unsupported_precision")
        if precision == "int8" and samples is None:
            raise Rejected("int8 needs validation samples for calibration and the accuracy gate",
                           reason="no_calibration_data")
        model = Path(model)
        if not model.is_file():
            raise Rejected(f"model file {model} does not exist", reason="bad_model")
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        try:
            result = self._compile(model, precision=precision, samples=samples,
                                   work_dir=work_dir, progress=progress or (lambda _m: None))
        except EdgefleetError:
            raise
        except MemoryError as e:
            raise GiveUp(f"{self.engine_kind} ran out of memory building {precision}",
                         reason="out_of_memory") from e
        except Exception as e:  # vendor toolchains raise anything; say what failed, no traceback
            raise Rejected(f"{self.engine_kind} failed to build {precision}: "
                           f"{type(e).__name__}: {e}", reason="compile_failed") from e
        if not Path(result.engine_path).is_file():
            raise GiveUp(f"{self.engine_kind} reported success but wrote no engine",
                         reason="compile_failed")
        return result

    @abstractmethod
    def _compile(self, model: Path, *, precision: str, samples: ValidationSet | None,
                 work_dir: Path, progress: Progress) -> BuildResult:
        """Backend hook: build the engine, run it on ``samples`` if possible, time it."""


def get_compiler(device_class: DeviceClassSpec) -> Compiler:
    """The compiler for the class's engine kind; BackendUnavailable if its SDK is missing."""
    mod = _BACKEND_MODULES.get(device_class.engine_kind)
    if mod is None:
        raise Rejected(f"no compiler for engine kind {device_class.engine_kind!r}",
                       reason="bad_device_class")
    importlib.import_module(mod)
    return _REGISTRY[device_class.engine_kind](device_class)


def check_model(model: Path, *, max_model_bytes: int = MAX_MODEL_BYTES) -> None:
    """Reject a missing, oversized or malformed ONNX file with the parser's message."""
    import onnx

    model = Path(model)
    try:
        size = model.stat().st_size
    except OSError as e:
        raise Rejected(f"model {model}: {e.strerror}", reason="bad_model") from e
    if size > max_model_bytes:
        raise Rejected(f"model is {size} bytes, over max_model_bytes={max_model_bytes}",
                       reason="model_too_large")
    try:
        m = onnx.load(str(model), load_external_data=False)
        onnx.checker.check_model(m)
    except Exception as e:  # DecodeError, ValidationError, ...: the data is bad
        msg = str(e).strip().splitlines()
        raise Rejected(f"model {model.name} is not a valid ONNX model: "
                       f"{type(e).__name__}: {' '.join(msg)[:500]}", reason="bad_model") from e
    if not len(m.graph.output):
        raise Rejected("model has no outputs", reason="bad_model")


def _signature_dict(sig: tuple[list[TensorInfo], list[TensorInfo]]) -> dict[str, Any]:
    return {"inputs": [t.to_dict() for t in sig[0]], "outputs": [t.to_dict() for t in sig[1]]}


def compile_model(model: Path, *, device_class: DeviceClassSpec, precisions: list[str],
                  validation: Path | None, accuracy: AccuracySpec | None, work_dir: Path,
                  progress: Progress | None = None) -> CompileReport:
    """Compile ``model`` for ``device_class``: first precision passing the gate ships.

    Raises Rejected (bad model/samples/spec), AllPrecisionsRejected (nothing passed),
    BackendUnavailable (toolchain missing here), GiveUp (other permanent failures).
    """
    say = progress or (lambda _m: None)
    if not precisions:
        raise Rejected("no precisions requested", reason="bad_request")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise Rejected(f"unknown precisions {bad}; expected some of {PRECISIONS}",
                       reason="bad_request")
    accuracy = accuracy or AccuracySpec()
    model = Path(model)
    check_model(model)
    model_sha = sha256_file(model)
    sig = model_signature(model)
    compiler = get_compiler(device_class)
    tool_v = compiler.toolchain_version()
    samples = reference = None
    val_sha = None
    if validation is not None:
        samples = load_validation(Path(validation), inputs=sig[0])
        val_sha = sha256_file(Path(validation))
        say(f"reference: FP32 onnxruntime on {samples.n} validation samples")
        try:
            reference = run_onnx(model, samples)
        except Exception as e:
            raise Rejected(f"the FP32 model does not run on the validation samples: {e}",
                           reason="bad_validation") from e
    rejected: list[dict[str, str]] = []
    work_dir = Path(work_dir)
    for precision in precisions:
        say(f"{precision}: building with {compiler.toolchain} {tool_v} for {device_class.name}")
        try:
            built = compiler.compile(model, precision=precision, samples=samples,
                                     work_dir=work_dir / precision, progress=say)
        except Rejected as e:
            say(f"{precision}: rejected: {e}")
            rejected.append({"precision": precision, "reason": str(e)})
            continue
        gate: GateResult | None = None
        if samples is not None and reference is not None:
            if built.outputs is None:
                reason = "the backend could not run the engine on the validation samples"
                rejected.append({"precision": precision, "reason": reason})
                continue
            try:
                gate = compare(reference, built.outputs, labels=samples.labels,
                               accuracy=accuracy)
            except Rejected as e:
                rejected.append({"precision": precision, "reason": str(e)})
                continue
            say(f"{precision}: {gate.name} = {gate.value:.6g} (budget {gate.budget:g}) "
                f"{'passed' if gate.passed else 'FAILED'}")
            if not gate.passed:
                rejected.append({"precision": precision, "reason": gate.reason()})
                continue
        elif precision != "fp32":
            rejected.append({"precision": precision, "reason": "no validation samples: the "
                             "accuracy gate cannot judge a reduced-precision engine"})
            continue
        engine = Path(built.engine_path)
        report = CompileReport(
            engine_path=str(engine), engine_sha256=sha256_file(engine),
            size=engine.stat().st_size, precision=precision,
            engine_kind=compiler.engine_kind, toolchain_version=tool_v,
            fingerprint=compiler.fingerprint(precision),
            signature=_signature_dict(built.signature or sig),
            metric=gate.to_dict() if gate else None, latency_ms=built.latency_ms,
            rejected=rejected, device_class=device_class.name, model_sha256=model_sha,
            cache_key=engine_cache_key(model_sha, device_class=device_class,
                                       precision=precision, toolchain_version=tool_v),
            request_key=compile_request_key(model_sha, device_class=device_class,
                                            precisions=precisions, toolchain_version=tool_v,
                                            validation_sha256=val_sha, accuracy=accuracy),
            notes=built.notes)
        say(f"{precision}: shipped {report.engine_sha256[:12]} ({report.size} bytes)")
        return report
    summary = "; ".join(f"{r['precision']}: {r['reason']}" for r in rejected)
    raise AllPrecisionsRejected(f"no precision passed for {device_class.name}: {summary}",
                                rejected=rejected)
