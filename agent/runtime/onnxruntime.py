"""onnxruntime engine backends: CPU (``onnxruntime-cpu``) and the CUDA execution provider
(``onnxruntime-cuda``, only where the installed onnxruntime has it).

Created by :func:`agent.runtime.base.backend_for`; used by the hot loader
(:mod:`agent.runtime.registry`). Session options: intra-op threads are configurable via
``set_default_threads`` (the agent config ``runtime.intra_op_threads``, 0 = onnxruntime's
choice) or the constructor.

onnxruntime (and numpy) are imported when a backend is created, i.e. when the first engine
is loaded, not when this module is imported: together they are ~30 MB of RSS that an agent
without a model does not need. :meth:`_OrtBackend.probe_runtime` reports the version and
execution providers for the device facts without importing onnxruntime.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
import queue
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from agent.runtime.base import EngineBackend, LoadedEngine, tensor_spec, version_tuple
from protos.edgefleet.v1.common_pb2 import EngineFingerprint, ModelSignature, RuntimeInfo
from protos.errors import BackendUnavailable, Rejected

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

#: provider -> shared library an onnxruntime build ships for it (in ``onnxruntime/capi``);
#: what :meth:`_OrtBackend.probe_runtime` looks for instead of importing onnxruntime
PROVIDER_LIBRARIES: dict[str, tuple[str, ...]] = {
    "CUDAExecutionProvider": ("libonnxruntime_providers_cuda.so",
                              "onnxruntime_providers_cuda.dll"),
}


def _import_ort(kind: str) -> Any:
    """The onnxruntime module (imported on first use); BackendUnavailable when missing.
    Guarded: the agent extra installs onnxruntime, but a board may run another backend only."""
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - onnxruntime is installed in CI
        raise BackendUnavailable(kind, f"onnxruntime is not installed ({e})") from e
    return onnxruntime

#: onnxruntime tensor type -> numpy dtype name
ORT_TYPES: dict[str, str] = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(uint16)": "uint16", "tensor(int32)": "int32", "tensor(uint32)": "uint32",
    "tensor(int64)": "int64", "tensor(uint64)": "uint64", "tensor(bool)": "bool",
}

_DEFAULT_THREADS = {"intra_op": int(os.environ.get("EDGEFLEET_INTRA_OP_THREADS", "0")),
                    "spin": int(os.environ.get("EDGEFLEET_ORT_SPINNING", "0"))}


def set_default_threads(intra_op_threads: int, *, allow_spinning: bool = False) -> None:
    """Set intra-op threads for sessions created afterwards (0 = onnxruntime decides).
    ``allow_spinning``: let idle pool threads busy-wait (a little lower latency, but they
    burn CPU that a small board needs for everything else, including hot swaps)."""
    if intra_op_threads < 0:
        raise ValueError("intra_op_threads must be >= 0")
    _DEFAULT_THREADS["intra_op"] = intra_op_threads
    _DEFAULT_THREADS["spin"] = int(allow_spinning)


class _Reaper:
    """Destroys closed sessions in a background thread. Freeing a session (its weights, its
    thread pool) holds the GIL for ~1 ms per 8 MB of weights; done inline it would land on
    the request that released the last lease of a retired engine."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def drop(self, session: Any) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="ort-reaper",
                                                daemon=True)
                self._thread.start()
        self._queue.put(session)

    def _run(self) -> None:
        # normal priority on purpose: freeing holds the GIL, and a starved reaper would
        # keep closed engines in memory
        while True:
            session = self._queue.get()
            del session  # the last reference: onnxruntime frees the session here

    def drain(self, timeout_s: float = 5.0) -> bool:
        """Wait until queued sessions are destroyed (tests, shutdown). True when empty."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put(_Marker(done))
        return done.wait(timeout_s)


class _Marker:
    """Queued after sessions by ``_Reaper.drain``; sets its event when dropped."""

    __slots__ = ("_event",)

    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def __del__(self) -> None:
        self._event.set()


_REAPER = _Reaper()


class OnnxRuntimeEngine(LoadedEngine):
    """One onnxruntime InferenceSession. ``InferenceSession.run`` is thread-safe."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self._lock = threading.Lock()
        self._closed = False
        for node in session.get_inputs() + session.get_outputs():
            if node.type not in ORT_TYPES:
                raise Rejected(f"tensor {node.name} has unsupported type {node.type}",
                               reason="unsupported_dtype")
        inputs = [tensor_spec(i.name, ORT_TYPES[i.type], list(i.shape))
                  for i in session.get_inputs()]
        outputs = [tensor_spec(o.name, ORT_TYPES[o.type], list(o.shape))
                   for o in session.get_outputs()]
        self.signature = ModelSignature(inputs=inputs, outputs=outputs)
        self._output_names = [o.name for o in outputs]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session
        if session is None:
            raise RuntimeError("engine is closed")
        results = session.run(self._output_names, inputs)
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            session, self._session = self._session, None
        if session is not None:
            _REAPER.drop(session)  # freed off the caller's (maybe a request's) path


class _OrtBackend(EngineBackend):
    providers: ClassVar[list[str]] = ["CPUExecutionProvider"]
    toolchains = ("onnxruntime", "onnx")
    accelerator: ClassVar[str] = ""   # RuntimeInfo.accelerator ("" = CPU)

    def __init__(self, *, intra_op_threads: int | None = None) -> None:
        ort = _import_ort(self.kind)
        import numpy  # noqa: F401  (the serving path needs it; imported here, at load time)

        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            raise BackendUnavailable(self.kind, f"execution providers {missing} are not in "
                                                f"this onnxruntime build")
        self._ort = ort
        self._intra_op_threads = intra_op_threads

    def runtime_info(self) -> RuntimeInfo:
        return RuntimeInfo(engine_kind=self.kind, version=self._ort.__version__,
                           accelerator=self.accelerator)

    @classmethod
    def probe_runtime(cls) -> RuntimeInfo:
        """Version and accelerator of this backend, read from the installed onnxruntime
        package's files without importing it (``capi/build_and_package_info.py``, and the
        provider libraries of :data:`PROVIDER_LIBRARIES`). Falls back to importing it when
        it is already imported or the files are not where a wheel puts them."""
        if "onnxruntime" in sys.modules:
            return cls().runtime_info()
        spec = importlib.util.find_spec("onnxruntime")
        if spec is None or not spec.submodule_search_locations:
            raise BackendUnavailable(cls.kind, "onnxruntime is not installed")
        capi = Path(next(iter(spec.submodule_search_locations))) / "capi"
        version = _literal(capi / "build_and_package_info.py", "__version__")
        if not version:
            return cls().runtime_info()
        for provider in cls.providers:
            libs = PROVIDER_LIBRARIES.get(provider)
            if libs and not any((capi / lib).is_file() for lib in libs):
                raise BackendUnavailable(cls.kind, f"execution provider {provider} is not in "
                                                   f"this onnxruntime build")
        return RuntimeInfo(engine_kind=cls.kind, version=version,
                           accelerator=cls.accelerator)

    def _check_fingerprint(self, fp: EngineFingerprint, info: RuntimeInfo) -> None:
        # An ONNX file built by a newer onnxruntime tool may use opsets this runtime lacks:
        # refuse when the engine's major.minor is newer than ours.
        if fp.toolchain_version and fp.toolchain in ("onnxruntime", ""):
            built = version_tuple(fp.toolchain_version)[:2]
            if built > version_tuple(info.version)[:2]:
                raise Rejected(f"engine built with onnxruntime {fp.toolchain_version}, newer than "
                               f"this runtime {info.version}", reason="toolchain_version")
        if fp.accelerator and fp.accelerator != info.accelerator and fp.accelerator != "cpu":
            raise Rejected(f"engine needs accelerator {fp.accelerator!r}, this backend has "
                           f"{info.accelerator or 'cpu'}", reason="wrong_accelerator")

    def _session_options(self) -> Any:
        ort = self._ort
        opts = ort.SessionOptions()
        threads = self._intra_op_threads
        if threads is None:
            threads = _DEFAULT_THREADS["intra_op"]
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning",
                                      str(_DEFAULT_THREADS["spin"]))
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        return opts

    def _load(self, path: Path, *, signature: ModelSignature | None) -> LoadedEngine:
        session = self._ort.InferenceSession(str(path), sess_options=self._session_options(),
                                             providers=self.providers)
        return OnnxRuntimeEngine(session)


class OnnxRuntimeCpuBackend(_OrtBackend):
    """onnxruntime with the CPU execution provider (every board)."""

    kind = "onnxruntime-cpu"


class OnnxRuntimeCudaBackend(_OrtBackend):
    """onnxruntime with the CUDA execution provider (onnxruntime-gpu builds, Jetson wheels).
    Also runs ``onnxruntime-cpu`` engines (the same ONNX file)."""

    kind = "onnxruntime-cuda"
    also_runs = ("onnxruntime-cpu",)
    providers: ClassVar[list[str]] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    accelerator = "cuda"


def _literal(path: Path, name: str) -> str:
    """The string assigned to ``name`` at the top level of the Python file ``path`` ("" when
    unreadable or absent); the file is parsed, not executed."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return ""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name for t in node.targets):
            value = node.value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                return value.value
    return ""
