"""Engine backend interface of the agent: one backend per engine kind.

A backend turns an engine file (ONNX model, TensorRT plan, RKNN model) into a
:class:`LoadedEngine` that runs inference on numpy arrays. The hot loader
(:mod:`agent.runtime.registry`) calls :meth:`EngineBackend.check_fingerprint` and
:meth:`EngineBackend.load`; the local inference API (:mod:`agent.serve`) calls
:meth:`LoadedEngine.infer` through a registry lease. ``backend_for`` is used by the registry,
``available_runtimes`` by the heartbeat (device facts, without importing vendor SDKs where a
backend can avoid it) and ``available_backends`` by tests. numpy is imported when an engine
loads, not with this module.

Rule of the house: the public ``load`` checks its inputs and wraps vendor errors into
:mod:`protos.errors` types; each backend implements the private ``_load`` hook only.
Backend modules never import each other: ``backend_for`` imports them by name.
"""

from __future__ import annotations

import importlib
import logging
import platform
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from protos.edgefleet.v1.common_pb2 import (
    EngineFingerprint,
    ModelSignature,
    RuntimeInfo,
    TensorSpec,
)
from protos.errors import BackendUnavailable, EdgefleetError, GiveUp, Rejected

if TYPE_CHECKING:  # numpy is imported when an engine is loaded, not at agent start
    import numpy as np

log = logging.getLogger(__name__)

#: engine kind -> "module:Class" of its backend. Imported lazily so a missing SDK only
#: disables its own backend.
BACKEND_CLASSES: dict[str, str] = {
    "onnxruntime-cpu": "agent.runtime.onnxruntime:OnnxRuntimeCpuBackend",
    "onnxruntime-cuda": "agent.runtime.onnxruntime:OnnxRuntimeCudaBackend",
    "tensorrt": "agent.runtime.tensorrt:TensorRTBackend",
    "rknn": "agent.runtime.rknnlite:RknnLiteBackend",
}

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


def host_arch() -> str:
    """Normalised machine architecture: ``x86_64`` or ``aarch64`` (or what the OS says)."""
    machine = platform.machine().lower()
    return _ARCH_ALIASES.get(machine, machine)


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.3.0.26"`` -> ``(10, 3, 0, 26)``; non-numeric tails are ignored (``1.17.0rc1``)."""
    parts: list[int] = []
    for piece in version.strip().split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


class LoadedEngine(ABC):
    """An engine ready to run. ``infer`` may be called from several threads at once
    (backends serialise internally where their SDK is not thread-safe)."""

    signature: ModelSignature

    @abstractmethod
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference; returns every output of the signature by name."""

    @abstractmethod
    def close(self) -> None:
        """Release the engine's memory. Idempotent."""


class EngineBackend(ABC):
    """One engine kind on this machine. Created only where its SDK imports; the
    constructor raises :class:`BackendUnavailable` otherwise."""

    kind: ClassVar[str]
    #: fingerprint ``toolchain`` names this backend accepts ("" is always accepted)
    toolchains: ClassVar[tuple[str, ...]] = ()
    #: other engine kinds this backend can also run (e.g. a CPU ONNX file on the CUDA EP)
    also_runs: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def runtime_info(self) -> RuntimeInfo:
        """Engine kind, runtime version and accelerator of this backend on this machine."""

    @classmethod
    def probe_runtime(cls) -> RuntimeInfo:
        """``runtime_info`` for the device facts, without loading the SDK where a backend can
        (onnxruntime reads its package files); raises :class:`BackendUnavailable`. Default:
        create the backend and ask it."""
        return cls().runtime_info()

    def check_fingerprint(self, fp: EngineFingerprint) -> None:
        """Raise :class:`Rejected` (with a ``reason`` code) when an engine built for ``fp``
        cannot run here: wrong engine kind, architecture, toolchain, toolchain version or
        accelerator. Backends extend this with their own rules (``_check_fingerprint``)."""
        info = self.runtime_info()
        if fp.engine_kind not in (self.kind, *self.also_runs):
            raise Rejected(f"engine kind {fp.engine_kind!r} cannot run on the {self.kind} backend",
                           reason="wrong_engine_kind")
        if fp.arch and fp.arch != host_arch():
            raise Rejected(f"engine built for {fp.arch}, this machine is {host_arch()}",
                           reason="wrong_arch")
        if fp.toolchain and self.toolchains and fp.toolchain not in self.toolchains:
            raise Rejected(f"toolchain {fp.toolchain!r} is not one of {list(self.toolchains)}",
                           reason="wrong_toolchain")
        if fp.min_runtime_version and version_tuple(info.version) < version_tuple(
                fp.min_runtime_version):
            raise Rejected(f"engine needs {self.kind} >= {fp.min_runtime_version}, "
                           f"this runtime is {info.version}", reason="runtime_too_old")
        self._check_fingerprint(fp, info)

    def _check_fingerprint(self, fp: EngineFingerprint, info: RuntimeInfo) -> None:
        """Backend-specific fingerprint rules (toolchain version, accelerator). Default: none."""
        return None

    def load(self, path: Path, *, signature: ModelSignature | None = None) -> LoadedEngine:
        """Load the engine file at ``path``. ``signature`` (when given) must match what the
        engine declares: same input and output names. Raises :class:`Rejected` for a file
        that is missing, empty or does not load (corrupt, wrong format), :class:`GiveUp`
        when the machine cannot (out of memory)."""
        path = Path(path)
        if not path.is_file():
            raise Rejected(f"engine file {path} does not exist", reason="engine_missing")
        if path.stat().st_size == 0:
            raise Rejected(f"engine file {path} is empty", reason="engine_empty")
        try:
            engine = self._load(path, signature=signature)
        except EdgefleetError:
            raise
        except MemoryError as e:
            raise GiveUp(f"out of memory loading {path.name} on {self.kind}",
                         reason="out_of_memory") from e
        except Exception as e:  # vendor SDKs raise their own exception types
            raise Rejected(f"{self.kind} could not load {path.name}: {e}",
                           reason="engine_load_failed") from e
        if signature is not None and signature.inputs:
            try:
                check_signature_names(expected=signature, actual=engine.signature)
            except Rejected:
                engine.close()
                raise
        return engine

    @abstractmethod
    def _load(self, path: Path, *, signature: ModelSignature | None) -> LoadedEngine:
        """Backend hook: load ``path`` (exists, non-empty) and return a LoadedEngine."""


def check_signature_names(*, expected: ModelSignature, actual: ModelSignature) -> None:
    """Raise :class:`Rejected` unless the engine's tensors match the manifest signature:
    same input (and, when listed, output) names; same dtypes and ranks, and equal dimensions
    where both sides are static."""
    for kind, exp_list, act_list in (("inputs", expected.inputs, actual.inputs),
                                     ("outputs", expected.outputs, actual.outputs)):
        if kind == "outputs" and not exp_list:
            continue
        exp = {t.name: t for t in exp_list}
        act = {t.name: t for t in act_list}
        if sorted(exp) != sorted(act):
            raise Rejected(f"engine {kind} {sorted(act)} do not match the manifest signature "
                           f"{sorted(exp)}", reason="signature_mismatch")
        for name, e in exp.items():
            a = act[name]
            if e.dtype and a.dtype and e.dtype != a.dtype:
                raise Rejected(f"engine tensor {name} is {a.dtype}, the manifest says {e.dtype}",
                               reason="signature_mismatch")
            if e.shape and (len(e.shape) != len(a.shape) or any(
                    x >= 0 and y >= 0 and x != y for x, y in zip(e.shape, a.shape, strict=True))):
                raise Rejected(f"engine tensor {name} has shape {list(a.shape)}, the manifest "
                               f"says {list(e.shape)}", reason="signature_mismatch")


def tensor_spec(name: str, dtype: str | np.dtype, shape: list[int] | tuple[int, ...]) -> TensorSpec:
    """Build a TensorSpec; ``None``/symbolic dimensions become -1."""
    import numpy as np

    dims = [d if isinstance(d, int) and d >= 0 else -1 for d in shape]
    return TensorSpec(name=name, dtype=np.dtype(dtype).name, shape=dims)


_BACKEND_CACHE: dict[str, EngineBackend] = {}


def backend_for(kind: str) -> EngineBackend:
    """The backend for engine kind ``kind`` (cached). Raises :class:`BackendUnavailable`
    when the kind is unknown or its SDK/hardware is not on this machine."""
    if kind in _BACKEND_CACHE:
        return _BACKEND_CACHE[kind]
    target = BACKEND_CLASSES.get(kind)
    if target is None:
        raise BackendUnavailable(kind, f"unknown engine kind (known: {sorted(BACKEND_CLASSES)})")
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BackendUnavailable(kind, f"cannot import {module_name}: {e}") from e
    backend = getattr(module, class_name)()  # raises BackendUnavailable when the SDK is missing
    _BACKEND_CACHE[kind] = backend
    return backend


def available_runtimes() -> list[RuntimeInfo]:
    """``RuntimeInfo`` of every backend usable here (device facts in heartbeats), through
    :meth:`EngineBackend.probe_runtime`: heavy SDKs stay unimported until an engine loads."""
    found: list[RuntimeInfo] = []
    for kind, target in BACKEND_CLASSES.items():
        module_name, class_name = target.split(":")
        try:
            try:
                module = importlib.import_module(module_name)
            except ImportError as e:
                raise BackendUnavailable(kind, f"cannot import {module_name}: {e}") from e
            found.append(getattr(module, class_name).probe_runtime())
        except BackendUnavailable as e:
            log.debug("backend %s unavailable: %s", kind, e)
        except Exception as e:  # one broken backend must not hide the others
            log.warning("runtime info of %s unavailable: %s", kind, e)
    return found


def available_backends() -> list[EngineBackend]:
    """Every backend whose SDK (and hardware) is usable here, for device facts."""
    found: list[EngineBackend] = []
    for kind in BACKEND_CLASSES:
        try:
            found.append(backend_for(kind))
        except BackendUnavailable as e:
            log.debug("backend %s unavailable: %s", kind, e)
    return found
