"""ONNX Runtime CPU compiler (engine kind ``onnxruntime-cpu``) for x86_64 and aarch64 classes.

Called through controller.compile.api (``get_compiler``). Engines are ONNX files:
  * fp32: graph optimised offline at ORT_ENABLE_BASIC and serialised with
    ``SessionOptions.optimized_model_filepath``. BASIC (constant folding, redundant node
    removal, semantics-preserving fusions) is portable across x86 and ARM; EXTENDED/ALL add
    EP- and layout-specific rewrites (NCHWc) that ORT itself warns only fit the machine that
    made them. The board's runtime applies its own hardware-specific passes at load time.
  * fp16: onnxruntime.transformers.float16 conversion with float32 IO kept, then BASIC.
  * int8: static QDQ quantisation (quantize_static, per-channel weights, MinMax calibration on
    the validation samples), then BASIC. Weights int8, activations uint8 (U8S8); on x86 CPUs
    without VNNI (per the DeviceClass isa list) weights use reduce_range (7 bits) to avoid the
    U8S8 saturation of the AVX2 kernels. Dynamic quantisation is never used (1.7-3.7x slower
    for conv nets).
Output bytes are deterministic for the same input and onnxruntime version.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from controller.compile.accuracy import ValidationSet, run_onnx
from controller.compile.api import BuildResult, Compiler, Progress
from protos.errors import BackendUnavailable, Rejected
from protos.fsutil import replace_durably

try:  # guarded like every backend SDK (it is a core controller dependency in practice)
    import onnxruntime as ort
except ImportError as _e:  # pragma: no cover - onnxruntime is installed with [controller]
    ort = None
    _IMPORT_ERROR: Exception | None = _e
else:
    _IMPORT_ERROR = None

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8", "vnni")
LATENCY_RUNS = 50
LATENCY_WARMUP = 10
CALIBRATION_BATCH = 16


def host_cpu_flags() -> set[str]:
    """CPU feature flags of this machine (from /proc/cpuinfo; empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _optimize_basic(src: Path, dst: Path) -> None:
    """Serialise ``src`` after BASIC graph optimisation into ``dst`` (atomically)."""
    assert ort is not None
    tmp = dst.with_name(f".{dst.name}.tmp")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp)
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        tmp.unlink(missing_ok=True)
        raise Rejected(f"onnxruntime cannot load the model: {e}", reason="bad_model") from e
    replace_durably(tmp, dst)


def measure_latency_ms(engine: Path, feed: dict[str, np.ndarray], *,
                       runs: int = LATENCY_RUNS, warmup: int = LATENCY_WARMUP) -> float:
    """Median latency in ms of one batch-1 inference, 1 thread, default (ALL) optimisation."""
    assert ort is not None
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(str(engine), so, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(statistics.median(times))


def float_tail_nodes(model: Path) -> list[str]:
    """Names of nodes from which no Conv/MatMul/Gemm is reachable: the post-processing tail.

    Detectors decode boxes and scores after their last conv and concatenate values of very
    different ranges (pixels and probabilities) into one output; one INT8 scale for that tensor
    wipes the class scores (an INT8 YOLOv8n kept cosine 0.9998 with every class score
    collapsed). The tail is cheap, so it stays float; the convs carry the speed-up.
    """
    import onnx

    g = onnx.load(str(model), load_external_data=False).graph
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(g.node):
        for t in n.input:
            consumers.setdefault(t, []).append(i)
    heavy = {"Conv", "MatMul", "Gemm", "ConvTranspose"}
    feeds_heavy = [False] * len(g.node)
    for i in reversed(range(len(g.node))):  # ONNX graphs are topologically sorted
        n = g.node[i]
        feeds_heavy[i] = any(g.node[j].op_type in heavy or feeds_heavy[j]
                             for t in n.output for j in consumers.get(t, []))
    return [n.name for i, n in enumerate(g.node)
            if n.name and n.op_type not in heavy and not feeds_heavy[i]]


class _Calibration:
    """quantize_static's CalibrationDataReader over the validation samples."""

    def __init__(self, samples: ValidationSet, *, batch: int) -> None:
        self._it = iter(samples.batches(batch) if batch > 1
                        else [samples.sample(i) for i in range(samples.n)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - not used by MinMax
        pass


class OnnxRuntimeCpuCompiler(Compiler):
    engine_kind = "onnxruntime-cpu"
    toolchain = "onnxruntime"

    def __init__(self, device_class: Any) -> None:
        if ort is None:
            raise BackendUnavailable("onnxruntime", f"import failed: {_IMPORT_ERROR}")
        super().__init__(device_class)

    def toolchain_version(self) -> str:
        assert ort is not None
        return str(ort.__version__)

    def has_vnni(self) -> bool:
        """Whether the target's int8 dot products are fast and exact for U8S8."""
        if self.device_class.arch == "aarch64":
            return True  # ARM kernels do not saturate U8S8; sdot/udot where available
        isa = set(self.device_class.isa)
        if not isa and self.device_class.arch in ("", "x86_64"):
            isa = host_cpu_flags()
        return any(f in isa for f in VNNI_FLAGS)

    def _compile(self, model: Path, *, precision: str, samples: ValidationSet | None,
                 work_dir: Path, progress: Progress) -> BuildResult:
        notes: dict[str, Any] = {"graph_optimization": "basic"}
        if precision == "fp32":
            src = model
        elif precision == "fp16":
            src = self._to_fp16(model, work_dir)
        else:
            assert samples is not None
            src, qnotes = self._to_int8(model, work_dir, samples, progress)
            notes.update(qnotes)
        engine = work_dir / f"engine-{precision}.onnx"
        progress(f"{precision}: graph optimisation (BASIC) -> {engine.name}")
        _optimize_basic(src, engine)
        outputs = latency = None
        if samples is not None:
            progress(f"{precision}: running the engine on {samples.n} validation samples")
            outputs = run_onnx(engine, samples, graph_opt="all", threads=1)
            latency = measure_latency_ms(engine, samples.sample(0))
            progress(f"{precision}: median latency {latency:.3f} ms (batch 1, 1 thread)")
        return BuildResult(engine_path=engine, outputs=outputs, latency_ms=latency, notes=notes)

    def _to_fp16(self, model: Path, work_dir: Path) -> Path:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        m = onnx.load(str(model))
        m16 = convert_float_to_float16(m, keep_io_types=True, disable_shape_infer=False)
        out = work_dir / "fp16-src.onnx"
        out.write_bytes(m16.SerializeToString(deterministic=True))
        return out

    def _to_int8(self, model: Path, work_dir: Path, samples: ValidationSet,
                 progress: Progress) -> tuple[Path, dict[str, Any]]:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = work_dir / "int8-pre.onnx"
        try:
            quant_pre_process(str(model), str(pre), skip_symbolic_shape=True)
        except Exception as e:  # pre-processing is an optimisation: fall back to the original
            progress(f"int8: pre-processing skipped ({type(e).__name__}: {e})")
            pre = model
        vnni = self.has_vnni()
        batch = CALIBRATION_BATCH if self._dynamic_batch(model) else 1
        progress(f"int8: calibrating (MinMax) on {samples.n} samples, per-channel, "
                 f"{'U8S8' if vnni else 'U8S8 reduce_range (no VNNI)'}")
        out = work_dir / "int8-qdq.onnx"
        tail = float_tail_nodes(pre)
        if tail:
            progress(f"int8: keeping {len(tail)} post-processing node(s) after the last "
                     "Conv/MatMul in float")
        quantize_static(str(pre), str(out), _Calibration(samples, batch=batch),
                        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=not vnni,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=tail)
        return out, {"quantization": "static-qdq", "per_channel": True,
                     "reduce_range": not vnni, "calibration": "minmax",
                     "calibration_samples": samples.n, "float_tail_nodes": len(tail)}

    @staticmethod
    def _dynamic_batch(model: Path) -> bool:
        from controller.compile.accuracy import model_signature

        ins, _ = model_signature(model)
        return all(i.shape and i.shape[0] == -1 for i in ins)
