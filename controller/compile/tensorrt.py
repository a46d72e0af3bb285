"""TensorRT compiler (engine kind ``tensorrt``): ONNX -> serialized TensorRT 10 engine.

Called through controller.compile.api (``get_compiler``) on a *builder*: a machine with the
target's GPU architecture and TensorRT version (a GPU node, or a board of that class that
volunteers), because an engine is only valid on the GPU architecture and TensorRT version that
built it. The fingerprint therefore carries the GPU compute capability (``sm_87``) and the
TensorRT version, and the compiler refuses (BackendUnavailable) when this machine's GPU or
TensorRT differ from the DeviceClass.

Builder: OnnxParser -> BuilderConfig (workspace limit, FP16 flag, INT8 flag with an
IInt8EntropyCalibrator2 fed from the validation samples, optimisation profile for a dynamic
batch, persistent timing cache) -> build_serialized_network. The engine is then deserialised
and run on the validation samples (for the accuracy gate) and timed at batch 1.

Imports of ``tensorrt`` and ``cuda-python`` are guarded. NOT RUN in this repository's CI: no
NVIDIA GPU there; see docs/compile.md.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from controller.compile.accuracy import ValidationSet
from controller.compile.api import BuildResult, Compiler, Progress
from protos.errors import BackendUnavailable, Rejected
from protos.fsutil import write_atomic

try:
    import tensorrt as trt
except ImportError as _e:  # the common case off-GPU
    trt = None
    _IMPORT_ERROR: Exception | None = _e
else:
    _IMPORT_ERROR = None

WORKSPACE_BYTES = 1 << 30
MAX_BATCH = 8
CAL_BATCH = 8
LATENCY_RUNS = 50
TIMING_CACHE_ENV = "EDGEFLEET_TRT_TIMING_CACHE"


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _ck(ret: Any) -> Any:
    """cuda-python returns (err, *values): raise on error, return the value(s)."""
    cudart = _cudart()
    err, *vals = ret if isinstance(ret, tuple) else (ret,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error {err}")
    if not vals:
        return None
    return vals[0] if len(vals) == 1 else tuple(vals)


class _DeviceBuffers:
    """Device allocations by tensor name, freed on close."""

    def __init__(self) -> None:
        self.ptr: dict[str, int] = {}
        self.nbytes: dict[str, int] = {}

    def ensure(self, name: str, nbytes: int) -> int:
        if self.nbytes.get(name, -1) < nbytes:
            if name in self.ptr:
                _ck(_cudart().cudaFree(self.ptr[name]))
            self.ptr[name] = int(_ck(_cudart().cudaMalloc(max(nbytes, 1))))
            self.nbytes[name] = nbytes
        return self.ptr[name]

    def upload(self, name: str, arr: np.ndarray) -> int:
        arr = np.ascontiguousarray(arr)
        ptr = self.ensure(name, arr.nbytes)
        cudart = _cudart()
        _ck(cudart.cudaMemcpy(ptr, arr.ctypes.data, arr.nbytes,
                              cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
        return ptr

    def download(self, name: str, out: np.ndarray) -> np.ndarray:
        cudart = _cudart()
        _ck(cudart.cudaMemcpy(out.ctypes.data, self.ptr[name], out.nbytes,
                              cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        return out

    def close(self) -> None:
        for p in self.ptr.values():
            _cudart().cudaFree(p)
        self.ptr.clear()
        self.nbytes.clear()


def _make_calibrator(samples: ValidationSet, *, batch: int, cache_file: Path) -> Any:
    """An IInt8EntropyCalibrator2 that feeds the validation samples in batches."""
    assert trt is not None

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            n_full = (samples.n // batch) * batch
            self._batches = [{k: v[s:s + batch] for k, v in samples.inputs.items()}
                             for s in range(0, n_full, batch)]
            self._i = 0
            self._buf = _DeviceBuffers()

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self._i >= len(self._batches):
                return None
            feed = self._batches[self._i]
            self._i += 1
            return [self._buf.upload(n, feed[n]) for n in names]

        def read_calibration_cache(self) -> bytes | None:
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            write_atomic(cache_file, bytes(cache))

        def close(self) -> None:
            self._buf.close()

    return EntropyCalibrator()


class TensorRTCompiler(Compiler):
    engine_kind = "tensorrt"
    toolchain = "tensorrt"

    def __init__(self, device_class: Any) -> None:
        if trt is None:
            raise BackendUnavailable("tensorrt", f"cannot import tensorrt ({_IMPORT_ERROR}); "
                                     "TensorRT engines are built on a builder of the class")
        try:
            count = _ck(_cudart().cudaGetDeviceCount())
        except (ImportError, RuntimeError) as e:
            raise BackendUnavailable("tensorrt", f"no usable CUDA runtime: {e}") from e
        if not count:
            raise BackendUnavailable("tensorrt", "no CUDA GPU on this machine")
        super().__init__(device_class)
        props = _ck(_cudart().cudaGetDeviceProperties(0))
        self._sm = f"sm_{props.major}{props.minor}"
        want_v = device_class.toolchain_version
        if want_v and not str(trt.__version__).startswith(want_v):
            raise BackendUnavailable("tensorrt", f"class {device_class.name} needs TensorRT "
                                     f"{want_v}, this builder has {trt.__version__}")
        if device_class.accelerator and device_class.accelerator != self._sm:
            raise BackendUnavailable("tensorrt", f"class {device_class.name} is "
                                     f"{device_class.accelerator}, this GPU is {self._sm}: "
                                     "engines only run on the GPU architecture that built them")

    def toolchain_version(self) -> str:
        assert trt is not None
        return str(trt.__version__)

    def accelerator(self) -> str:
        return self._sm

    def fingerprint(self, precision: str) -> dict[str, str]:
        fp = super().fingerprint(precision)
        fp["min_runtime_version"] = self.toolchain_version()  # exact version required
        return fp

    def _timing_cache_path(self, work_dir: Path) -> Path:
        env = os.environ.get(TIMING_CACHE_ENV)
        return Path(env) if env else work_dir.parent / f"trt-{self._sm}-{trt.__version__}.cache"

    def _compile(self, model: Path, *, precision: str, samples: ValidationSet | None,
                 work_dir: Path, progress: Progress) -> BuildResult:
        assert trt is not None
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(model)):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise Rejected(f"TensorRT's ONNX parser refused the model: {errs}",
                           reason="bad_model")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        profile = self._profile(builder, network)
        if profile is not None:
            config.add_optimization_profile(profile)
        cache_path = self._timing_cache_path(work_dir)
        timing = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file()
                                            else b"")
        config.set_timing_cache(timing, ignore_mismatch=False)
        calibrator = None
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            assert samples is not None
            static_batch = network.get_input(0).shape[0]
            batch = min(CAL_BATCH, samples.n) if static_batch == -1 else int(static_batch)
            calibrator = _make_calibrator(samples, batch=batch,
                                          cache_file=work_dir / "calibration.cache")
            config.set_flag(trt.BuilderFlag.INT8)
            config.int8_calibrator = calibrator
            if profile is not None:
                config.set_calibration_profile(profile)
            progress(f"int8: entropy calibration on {samples.n} samples, batch {batch}")
        progress(f"{precision}: building TensorRT {trt.__version__} engine for {self._sm}")
        try:
            serialized = builder.build_serialized_network(network, config)
        finally:
            if calibrator is not None:
                calibrator.close()
        if serialized is None:
            raise Rejected(f"TensorRT could not build a {precision} engine (see builder log)",
                           reason="compile_failed")
        engine_path = work_dir / f"engine-{precision}.plan"
        write_atomic(engine_path, bytes(serialized))
        write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
        outputs = latency = None
        if samples is not None:
            outputs, latency = self._run(bytes(serialized), samples, logger)
            progress(f"{precision}: median latency {latency:.3f} ms (batch 1, GPU)")
        return BuildResult(engine_path=engine_path, outputs=outputs, latency_ms=latency,
                           notes={"gpu": self._sm, "calibrator": "entropy2"
                                  if precision == "int8" else ""})

    @staticmethod
    def _profile(builder: Any, network: Any) -> Any:
        """Optimisation profile for a dynamic batch (1..MAX_BATCH, opt 1); None if static."""
        dynamic = False
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            t = network.get_input(i)
            shape = list(t.shape)
            if any(d == -1 for d in shape[1:]):
                raise Rejected(f"input {t.name} has dynamic non-batch dims {shape}; TensorRT "
                               "needs them fixed (export the model with static sizes)",
                               reason="dynamic_shape")
            if shape and shape[0] == -1:
                dynamic = True
                rest = shape[1:]
                profile.set_shape(t.name, [1, *rest], [1, *rest], [MAX_BATCH, *rest])
        return profile if dynamic else None

    @staticmethod
    def _run(plan: bytes, samples: ValidationSet, logger: Any) -> tuple[dict[str, np.ndarray],
                                                                         float]:
        """Run the engine on every sample at batch 1; median latency of batch-1 runs."""
        assert trt is not None
        cudart = _cudart()
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if n not in ins]
        stream = _ck(cudart.cudaStreamCreate())
        buf = _DeviceBuffers()
        results: dict[str, list[np.ndarray]] = {n: [] for n in outs}

        def once(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            for n in ins:
                arr = feed[n].astype(trt.nptype(engine.get_tensor_dtype(n)), copy=False)
                context.set_input_shape(n, arr.shape)
                context.set_tensor_address(n, buf.upload(n, arr))
            host = {}
            for n in outs:
                shape = tuple(context.get_tensor_shape(n))
                host[n] = np.empty(shape, dtype=trt.nptype(engine.get_tensor_dtype(n)))
                context.set_tensor_address(n, buf.ensure(n, host[n].nbytes))
            if not context.execute_async_v3(stream):
                raise RuntimeError("execute_async_v3 failed")
            _ck(cudart.cudaStreamSynchronize(stream))
            return {n: buf.download(n, host[n]) for n in outs}

        try:
            for i in range(samples.n):
                for n, v in once(samples.sample(i)).items():
                    results[n].append(v.astype(np.float32))
            first = samples.sample(0)
            times = []
            for _ in range(LATENCY_RUNS):
                t0 = time.perf_counter()
                once(first)
                times.append((time.perf_counter() - t0) * 1000.0)
        finally:
            buf.close()
            cudart.cudaStreamDestroy(stream)
        return {n: np.concatenate(v) for n, v in results.items()}, statistics.median(times)
