"""Engine backends for hardware we lack, for tests only (never in the product's backend list).

``DegradedOrtBackend`` is the real onnxruntime CPU backend (same engine kind, fingerprint
checks, loading and signature) whose engines degrade every floating-point output: Gaussian
noise of ``noise`` times the output's standard deviation, then (optionally) rounding to
``levels`` steps over the output's range. It stands in for a board whose accelerator is
worse than the simulator the compile gate trusted ("simulator fine, board worse"), so that
tests can prove the on-device accuracy probe catches it. Inject it with
``ModelRegistry(backends={"onnxruntime-cpu": DegradedOrtBackend(noise=1.0)})``. The factor
defaults to the ``EDGEFLEET_FAKE_DEGRADE`` environment variable (0 = outputs unchanged).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from agent.runtime.base import LoadedEngine
from agent.runtime.onnxruntime import OnnxRuntimeCpuBackend
from protos.edgefleet.v1.common_pb2 import ModelSignature

ENV_FACTOR = "EDGEFLEET_FAKE_DEGRADE"


class DegradedEngine(LoadedEngine):
    """Wraps a real engine; float outputs get noise and coarse quantisation."""

    def __init__(self, inner: LoadedEngine, *, noise: float, levels: int, seed: int) -> None:
        self._inner = inner
        self.signature = inner.signature
        self._noise, self._levels = noise, levels
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()  # numpy Generators are not thread-safe
        self.calls = 0

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._inner.infer(inputs)
        with self._lock:
            self.calls += 1
            return {k: self._degrade(np.asarray(v)) for k, v in outputs.items()}

    def _degrade(self, a: np.ndarray) -> np.ndarray:
        if a.dtype.kind != "f" or a.size == 0:
            return a
        out = a.astype(np.float64)
        if self._noise:
            scale = float(out.std()) or 1.0
            out = out + self._rng.normal(0.0, self._noise * scale, out.shape)
        if self._levels > 1:
            lo, hi = float(out.min()), float(out.max())
            step = (hi - lo) / (self._levels - 1) or 1.0
            out = lo + np.round((out - lo) / step) * step
        return out.astype(a.dtype)

    def close(self) -> None:
        self._inner.close()


class DegradedOrtBackend(OnnxRuntimeCpuBackend):
    """``onnxruntime-cpu`` whose engines return degraded outputs (see the module docstring)."""

    def __init__(self, *, noise: float | None = None, levels: int = 0, seed: int = 0,
                 intra_op_threads: int | None = None) -> None:
        super().__init__(intra_op_threads=intra_op_threads)
        self.noise = float(os.environ.get(ENV_FACTOR, "0")) if noise is None else noise
        self.levels = levels
        self.seed = seed
        self.engines: list[DegradedEngine] = []

    def _load(self, path: Path, *, signature: ModelSignature | None) -> LoadedEngine:
        engine = DegradedEngine(super()._load(path, signature=signature), noise=self.noise,
                                levels=self.levels, seed=self.seed)
        self.engines.append(engine)
        return engine
