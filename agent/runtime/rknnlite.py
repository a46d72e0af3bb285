"""RKNN engine backend (kind ``rknn``) for Rockchip NPUs (RK3588 and family), through
``rknn-toolkit-lite2`` (``rknnlite.api.RKNNLite``) on the board.

Created by :func:`agent.runtime.base.backend_for`; used by the hot loader. Import guarded:
without ``rknnlite`` (``pip install "edgefleet[rknn]"``) creating the backend raises
:class:`BackendUnavailable`. API used: ``RKNNLite()``, ``load_rknn(path)``,
``init_runtime(core_mask=...)``, ``inference(inputs=[...])``, ``release()``; each returns
0 on success (``inference`` returns the list of outputs).

``.rknn`` files do not carry tensor names the lite API exposes, so the manifest signature
is required: inputs are passed in signature order and outputs are named in signature order.
RKNNLite is not thread-safe: ``infer`` is serialised with a lock.

Not verified here: the development machine has no Rockchip NPU (see docs/agent.md).
"""

from __future__ import annotations

import logging
import threading
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.runtime.base import EngineBackend, LoadedEngine, version_tuple
from protos.edgefleet.v1.common_pb2 import EngineFingerprint, ModelSignature, RuntimeInfo
from protos.errors import BackendUnavailable, Rejected

if TYPE_CHECKING:  # numpy is imported when an engine loads, not at agent start
    import numpy as np

log = logging.getLogger(__name__)

try:  # vendor SDK: optional, guarded
    from rknnlite.api import RKNNLite
except ImportError as _e:
    RKNNLite = None
    _IMPORT_ERROR: Exception | None = _e
else:
    _IMPORT_ERROR = None

COMPATIBLE_PATH = Path("/proc/device-tree/compatible")
#: SoCs with an NPU RKNNLite drives, as named in the device tree and in fingerprints
SOCS = ("rk3588", "rk3576", "rk3568", "rk3566", "rk3562")


def detect_soc(compatible: Path = COMPATIBLE_PATH) -> str:
    """``rk3588`` etc. from the device tree, or "" when not a Rockchip board."""
    try:
        text = compatible.read_bytes().decode("ascii", "replace").lower()
    except OSError:
        return ""
    return next((soc for soc in SOCS if soc in text), "")


class RknnEngine(LoadedEngine):
    def __init__(self, rknn: Any, signature: ModelSignature) -> None:
        self._rknn = rknn
        self.signature = signature
        self._lock = threading.Lock()
        self._closed = False

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np

        ordered = [np.ascontiguousarray(inputs[t.name]) for t in self.signature.inputs]
        with self._lock:
            if self._closed:
                raise RuntimeError("engine is closed")
            outputs = self._rknn.inference(inputs=ordered)
        if outputs is None or len(outputs) != len(self.signature.outputs):
            raise RuntimeError("RKNNLite inference returned no/incomplete outputs")
        return {t.name: np.asarray(o) for t, o in zip(self.signature.outputs, outputs,
                                                       strict=True)}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._rknn.release()


class RknnLiteBackend(EngineBackend):
    """RKNN models on the board's NPU. ``core_mask``: an ``RKNNLite.NPU_CORE_*`` value
    (default: auto)."""

    kind = "rknn"
    toolchains = ("rknn-toolkit2", "rknn")

    def __init__(self, *, core_mask: int | None = None, compatible: Path = COMPATIBLE_PATH
                 ) -> None:
        if RKNNLite is None:
            raise BackendUnavailable(self.kind, f"rknn-toolkit-lite2 is not installed "
                                                f"({_IMPORT_ERROR})")
        self._soc = detect_soc(compatible)
        if not self._soc:
            raise BackendUnavailable(self.kind, "this is not a Rockchip board with an NPU "
                                                f"({compatible} names none of {SOCS})")
        self._core_mask = RKNNLite.NPU_CORE_AUTO if core_mask is None else core_mask
        try:
            self._version = metadata.version("rknn-toolkit-lite2")
        except metadata.PackageNotFoundError:
            self._version = ""

    def runtime_info(self) -> RuntimeInfo:
        return RuntimeInfo(engine_kind=self.kind, version=self._version,
                           accelerator=f"{self._soc}-npu")

    def _check_fingerprint(self, fp: EngineFingerprint, info: RuntimeInfo) -> None:
        if fp.accelerator and fp.accelerator != info.accelerator:
            raise Rejected(f"engine built for {fp.accelerator}, this board is "
                           f"{info.accelerator}", reason="wrong_accelerator")
        # RKNN models built by toolkit 2.x need a 2.x runtime: same major version.
        if fp.toolchain_version and info.version and \
                version_tuple(fp.toolchain_version)[:1] != version_tuple(info.version)[:1]:
            raise Rejected(f"engine built with rknn-toolkit2 {fp.toolchain_version}, runtime "
                           f"is {info.version}", reason="toolchain_version")

    def _load(self, path: Path, *, signature: ModelSignature | None) -> LoadedEngine:
        if signature is None or not signature.inputs or not signature.outputs:
            raise Rejected("RKNN engines need the model signature (inputs and outputs) in "
                           "the manifest", reason="signature_missing")
        rknn = RKNNLite()
        ret = rknn.load_rknn(str(path))
        if ret != 0:
            rknn.release()
            raise Rejected(f"RKNNLite.load_rknn({path.name}) failed with {ret}",
                           reason="engine_load_failed")
        ret = rknn.init_runtime(core_mask=self._core_mask)
        if ret != 0:
            rknn.release()
            raise Rejected(f"RKNNLite.init_runtime failed with {ret}",
                           reason="engine_load_failed")
        sig = ModelSignature()
        sig.CopyFrom(signature)
        return RknnEngine(rknn, sig)
