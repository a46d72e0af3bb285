"""RKNN compiler (engine kind ``rknn``): ONNX -> .rknn for Rockchip NPUs (rk3588, ...).

Called through controller.compile.api (``get_compiler``). rknn-toolkit2 is x86_64-only and pins
numpy<=1.26.4, protobuf<=4.25.4, onnx<=1.18 and torch<=2.4, so it lives in its own venv
(scripts/rknn-env.sh, default build/rknn-venv, or $EDGEFLEET_RKNN_VENV). This module runs
controller/compile/rknn_worker.py with that venv's python as a subprocess (JSON in, JSON lines
out); the worker builds, runs the validation samples on the toolkit's simulator in the same RKNN
object, and exports the .rknn. BackendUnavailable when the venv is missing.

Precisions: int8 (w8a8, per-channel, calibrated on the validation samples) and fp16 (no
quantisation). The compiled model has a static batch of 1 (dynamic batch dims are resolved to 1)
and its signature says so. RKNN builds are not byte-reproducible: cache by inputs
(engine_cache_key), never by output hash. The simulator gives accuracy, not latency.
"""

from __future__ import annotations

import os
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from controller.compile.accuracy import TensorInfo, ValidationSet, model_signature
from controller.compile.api import BuildResult, Compiler, Progress
from controller.compile.childproc import run_json_child
from protos.errors import BackendUnavailable, GiveUp, Rejected

VENV_ENV = "EDGEFLEET_RKNN_VENV"
DEFAULT_VENV = Path(__file__).resolve().parents[2] / "build" / "rknn-venv"
WORKER = Path(__file__).resolve().with_name("rknn_worker.py")
BUILD_TIMEOUT_S = 1800.0
MAX_CALIBRATION_SAMPLES = 100
_STDERR_TAIL = 1500


def rknn_venv() -> Path:
    return Path(os.environ.get(VENV_ENV) or DEFAULT_VENV)


def rknn_python() -> Path | None:
    """The worker venv's python, or None when the venv is absent."""
    py = rknn_venv() / "bin" / "python"
    return py if py.exists() else None


@lru_cache(maxsize=4)
def _toolkit_version(python: str) -> str:
    try:
        out = subprocess.run(
            [python, "-c", "import importlib.metadata as m; print(m.version('rknn-toolkit2'))"],
            capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise BackendUnavailable("rknn", f"rknn-toolkit2 is not installed in {python}: {e}") from e
    return out.stdout.strip()


class RknnCompiler(Compiler):
    engine_kind = "rknn"
    toolchain = "rknn-toolkit2"
    precisions = ("int8", "fp16")

    def __init__(self, device_class: Any) -> None:
        py = rknn_python()
        if py is None:
            raise BackendUnavailable("rknn", f"no rknn-toolkit2 venv at {rknn_venv()} (create it "
                                     f"with scripts/rknn-env.sh or set {VENV_ENV})")
        self._python = str(py)
        super().__init__(device_class)
        self._version = _toolkit_version(self._python)
        want = device_class.toolchain_version
        if want and not self._version.startswith(want.split(".")[0]):
            raise BackendUnavailable("rknn", f"class {device_class.name} wants toolkit {want}, "
                                     f"the venv has {self._version}")

    def toolchain_version(self) -> str:
        return self._version

    def target_platform(self) -> str:
        acc = self.device_class.accelerator or self.device_class.name
        return acc.split("-")[0].lower()

    def _compile(self, model: Path, *, precision: str, samples: ValidationSet | None,
                 work_dir: Path, progress: Progress) -> BuildResult:
        if samples is None:
            raise Rejected("rknn builds need validation samples (calibration and simulator "
                           "check)", reason="no_calibration_data")
        ins, outs = model_signature(model)
        static_ins = []
        for t in ins:
            if any(d == -1 for d in t.shape[1:]):
                raise Rejected(f"input {t.name} has dynamic non-batch dims {list(t.shape)}; "
                               "RKNN needs fixed sizes", reason="dynamic_shape")
            static_ins.append(TensorInfo(t.name, t.dtype, (1, *t.shape[1:])))
        feed = work_dir / "samples.npz"
        np.savez(feed, **samples.inputs)  # type: ignore[arg-type]
        engine = work_dir / f"engine-{precision}.rknn"
        out_npz = work_dir / "sim-outputs.npz"
        req = {"model": str(model), "target_platform": self.target_platform(),
               "precision": precision,
               "inputs": [{"name": t.name, "shape": list(t.shape)} for t in static_ins],
               "outputs": [t.name for t in outs], "samples": str(feed),
               "work_dir": str(work_dir / "rknn-work"), "outputs_npz": str(out_npz),
               "engine": str(engine), "quantized_dtype": "w8a8",
               "quantized_algorithm": "normal", "quantized_method": "channel",
               "max_calibration_samples": MAX_CALIBRATION_SAMPLES}
        result = self._run_worker(req, work_dir=work_dir, progress=progress)
        with np.load(result["outputs_npz"], allow_pickle=False) as z:
            outputs = {k: z[k] for k in z.files}
        static_outs = [TensorInfo(t.name, "float32", (1, *t.shape[1:]) if t.shape else ())
                       for t in outs]
        return BuildResult(engine_path=engine, outputs=outputs, latency_ms=None,
                           signature=(static_ins, static_outs),
                           notes={"target_platform": self.target_platform(),
                                  "simulator": True, "reproducible_bytes": False,
                                  "quantized_dtype": "w8a8" if precision == "int8" else ""})

    def _run_worker(self, req: dict[str, Any], *, work_dir: Path,
                    progress: Progress) -> dict[str, Any]:
        # -I: isolated; above all, the script folder (which holds this rknn.py) is not on
        # sys.path, so "import rknn" finds the toolkit
        out = run_json_child([self._python, "-I", str(WORKER)], req, work_dir=work_dir,
                             timeout_s=BUILD_TIMEOUT_S, stderr_prefix=".rknn-stderr.",
                             stderr_tail_bytes=_STDERR_TAIL,
                             on_progress=lambda p: progress(f"{req['precision']}: {p}"))
        final = out.final
        if final is None:
            raise GiveUp(f"rknn worker exited with status {out.returncode} and no result: "
                         f"{out.stderr_tail}", reason="compile_crashed")
        if "error" in final:
            raise Rejected(f"rknn-toolkit2 failed to build {req['precision']}: {final['error']}",
                           reason="compile_failed")
        return dict(final["result"])
