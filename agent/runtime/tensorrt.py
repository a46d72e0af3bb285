"""TensorRT engine backend (kind ``tensorrt``) for Jetson boards and NVIDIA GPUs.

Created by :func:`agent.runtime.base.backend_for`; used by the hot loader. Needs the
``tensorrt`` Python package and ``cuda-python`` (``pip install "edgefleet[tensorrt]"``, or the
JetPack system packages). Imports are guarded: without them, or without a CUDA device,
creating the backend raises :class:`BackendUnavailable`.

A TensorRT plan only runs on the TensorRT version and GPU compute capability it was built
with, so ``check_fingerprint`` insists on the same TensorRT major.minor.patch and
``sm_<major><minor>``. Inference: ``trt.Runtime.deserialize_cuda_engine``, one execution
context, ``set_input_shape`` / ``set_tensor_address`` per tensor, ``execute_async_v3`` on a
private CUDA stream; device buffers are kept and grown when a larger shape arrives. The
context is not thread-safe, so ``infer`` is serialised with a lock.

Not verified here: the development machine has no NVIDIA GPU (see docs/agent.md).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.runtime.base import EngineBackend, LoadedEngine, tensor_spec, version_tuple
from protos.edgefleet.v1.common_pb2 import EngineFingerprint, ModelSignature, RuntimeInfo
from protos.errors import BackendUnavailable, Rejected

if TYPE_CHECKING:  # numpy is imported when an engine loads, not at agent start
    import numpy as np

log = logging.getLogger(__name__)

try:  # vendor SDKs: optional, guarded
    import tensorrt as trt
except ImportError as _e:
    trt = None
    _TRT_ERROR: Exception | None = _e
else:
    _TRT_ERROR = None

try:
    from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
except ImportError:
    try:
        from cuda import cudart  # older cuda-python
    except ImportError as _e:
        cudart = None
        _CUDA_ERROR: Exception | None = _e
    else:
        _CUDA_ERROR = None
else:
    _CUDA_ERROR = None


def _check(result: Any) -> Any:
    """cuda-python returns (error, value...) tuples; raise on an error code."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error {err}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


class _DeviceBuffer:
    def __init__(self) -> None:
        self.ptr = 0
        self.nbytes = 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.free()
            self.ptr = _check(cudart.cudaMalloc(max(nbytes, 1)))
            self.nbytes = nbytes
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            _check(cudart.cudaFree(self.ptr))
            self.ptr, self.nbytes = 0, 0


class TensorRTEngine(LoadedEngine):
    """A deserialized TensorRT engine with one execution context and a CUDA stream."""

    def __init__(self, engine: Any, runtime: Any) -> None:
        self._runtime = runtime  # must outlive the engine
        self._engine = engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise Rejected("TensorRT could not create an execution context (GPU memory?)",
                           reason="engine_load_failed")
        self._stream = _check(cudart.cudaStreamCreate())
        self._lock = threading.Lock()
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        import numpy as np

        self._dtypes: dict[str, np.dtype] = {}
        specs_in, specs_out = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            shape = list(engine.get_tensor_shape(name))
            self._dtypes[name] = dtype
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self._inputs.append(name)
                specs_in.append(tensor_spec(name, dtype, shape))
            else:
                self._outputs.append(name)
                specs_out.append(tensor_spec(name, dtype, shape))
        self.signature = ModelSignature(inputs=specs_in, outputs=specs_out)
        self._buffers = {name: _DeviceBuffer() for name in self._inputs + self._outputs}
        self._closed = False

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np

        with self._lock:
            if self._closed:
                raise RuntimeError("engine is closed")
            ctx, stream = self._context, self._stream
            host_inputs = {}
            for name in self._inputs:
                arr = np.ascontiguousarray(inputs[name], dtype=self._dtypes[name])
                host_inputs[name] = arr  # keep alive until the copy completes
                if not ctx.set_input_shape(name, tuple(arr.shape)):
                    raise ValueError(f"input {name} shape {arr.shape} is outside the profile")
                ptr = self._buffers[name].ensure(arr.nbytes)
                _check(cudart.cudaMemcpyAsync(
                    ptr, arr.ctypes.data, arr.nbytes,
                    cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
                ctx.set_tensor_address(name, ptr)
            results: dict[str, np.ndarray] = {}
            for name in self._outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                out = np.empty(shape, dtype=self._dtypes[name])
                results[name] = out
                ctx.set_tensor_address(name, self._buffers[name].ensure(out.nbytes))
            if not ctx.execute_async_v3(stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            for name, out in results.items():
                _check(cudart.cudaMemcpyAsync(
                    out.ctypes.data, self._buffers[name].ptr, out.nbytes,
                    cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
            _check(cudart.cudaStreamSynchronize(stream))
            return results

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for buf in self._buffers.values():
                buf.free()
            cudart.cudaStreamDestroy(self._stream)
            self._context = None
            self._engine = None


class TensorRTBackend(EngineBackend):
    """TensorRT plans on the local NVIDIA GPU (device 0 unless ``device`` is given)."""

    kind = "tensorrt"
    toolchains = ("tensorrt",)

    def __init__(self, *, device: int = 0) -> None:
        if trt is None:
            raise BackendUnavailable(self.kind, f"the tensorrt package is not installed "
                                                f"({_TRT_ERROR})")
        if cudart is None:
            raise BackendUnavailable(self.kind, f"cuda-python is not installed ({_CUDA_ERROR})")
        try:
            count = _check(cudart.cudaGetDeviceCount())
            if count <= device:
                raise RuntimeError(f"{count} CUDA devices")
            _check(cudart.cudaSetDevice(device))
            props = _check(cudart.cudaGetDeviceProperties(device))
        except RuntimeError as e:
            raise BackendUnavailable(self.kind, f"no usable CUDA device {device}: {e}") from e
        self._sm = f"sm_{props.major}{props.minor}"
        self._device = device
        self._logger = trt.Logger(trt.Logger.WARNING)

    def runtime_info(self) -> RuntimeInfo:
        return RuntimeInfo(engine_kind=self.kind, version=trt.__version__, accelerator=self._sm)

    def _check_fingerprint(self, fp: EngineFingerprint, info: RuntimeInfo) -> None:
        if not fp.toolchain_version:
            raise Rejected("TensorRT engine has no toolchain_version in its fingerprint",
                           reason="toolchain_version")
        if version_tuple(fp.toolchain_version)[:3] != version_tuple(info.version)[:3]:
            raise Rejected(f"engine built with TensorRT {fp.toolchain_version}, this device "
                           f"runs {info.version}", reason="toolchain_version")
        if fp.accelerator != info.accelerator:
            raise Rejected(f"engine built for {fp.accelerator or 'an unknown GPU'}, this GPU "
                           f"is {info.accelerator}", reason="wrong_accelerator")

    def _load(self, path: Path, *, signature: ModelSignature | None) -> LoadedEngine:
        _check(cudart.cudaSetDevice(self._device))
        runtime = trt.Runtime(self._logger)
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise Rejected(f"TensorRT could not deserialize {path.name} (corrupt, or built "
                           f"for another TensorRT/GPU)", reason="engine_load_failed")
        return TensorRTEngine(engine, runtime)
