"""On-device accuracy probe: run the update's signed probe set on the engine just activated.

Called by the update manager (:mod:`agent.update.manager`) after ``ModelRegistry.activate``
of an update whose manifest carries a ``ProbeSpec``: :func:`probe_inputs` gives the first
probe sample as the activation's warm-up inputs, :func:`run_probe` runs every sample through
the registry's engine of that model / version / variant and judges the outputs against the
compile gate's FP32 references with the same metric definitions (:mod:`protos.probe`). The
report goes into ``UpdateProgress.probe`` / ``UpdateStatus.probe``; the controller's rollout
gate decides what a failed probe means.

Bad probe data never raises: it is a report with ``passed=False`` and a ``detail`` saying why
(``value`` is 0 when nothing could be measured). Only a busy model (:class:`RetryLater`
from the registry's concurrency limit) is raised, so the caller can run the probe later.
numpy is imported lazily, by :mod:`protos.probe`.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from protos import probe as P
from protos.edgefleet.v1 import update_pb2
from protos.errors import EdgefleetError, Rejected, RetryLater

if TYPE_CHECKING:
    import numpy as np

    from agent.runtime.registry import ModelRegistry

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _failed(spec: update_pb2.ProbeSpec, detail: str, *, samples: int = 0) -> update_pb2.ProbeReport:
    return update_pb2.ProbeReport(metric=spec.metric, value=0.0, threshold=spec.threshold,
                                  passed=False, samples=samples, detail=detail, at_ms=_now_ms())


def probe_inputs(spec: update_pb2.ProbeSpec | None, *, max_bytes: int = P.MAX_PROBE_BYTES,
                 max_decoded_bytes: int = P.MAX_PROBE_DECODED_BYTES,
                 max_samples: int = P.MAX_PROBE_SAMPLES) -> dict[str, np.ndarray] | None:
    """The first probe sample (``{input name: array[1, ...]}``) as warm-up inputs for
    ``ModelRegistry.activate``; None when there is no probe or its data is bad (the warm-up
    then uses synthetic inputs, and :func:`run_probe` reports the bad data)."""
    if spec is None or not spec.samples_npz:
        return None
    try:
        probe = P.load_probe_set(spec.samples_npz, max_bytes=max_bytes,
                                 max_decoded_bytes=max_decoded_bytes, max_samples=max_samples)
    except Rejected as e:
        log.warning("probe set unusable for warm-up: %s", e)
        return None
    return {k: v.copy() for k, v in probe.sample(0).items()}


def run_probe(registry: ModelRegistry, *, name: str, version: int, variant: str,
              spec: update_pb2.ProbeSpec, max_bytes: int = P.MAX_PROBE_BYTES,
              max_decoded_bytes: int = P.MAX_PROBE_DECODED_BYTES,
              max_samples: int = P.MAX_PROBE_SAMPLES) -> update_pb2.ProbeReport:
    """Run ``spec``'s samples one by one on the engine serving ``name`` ``version``
    ``variant`` (one lease for all of them: the same engine answers every sample) and return
    the report: ``passed`` when the metric is within ``spec.threshold``. Raises only
    :class:`RetryLater` (model busy)."""
    where = f"model {name} v{version}" + (f" variant {variant!r}" if variant else "")
    if spec.metric not in P.METRICS:
        return _failed(spec, f"unknown probe metric {spec.metric!r} (expected one of "
                             f"{list(P.METRICS)})")
    try:
        probe = P.load_probe_set(spec.samples_npz, max_bytes=max_bytes,
                                 max_decoded_bytes=max_decoded_bytes, max_samples=max_samples)
    except Rejected as e:
        return _failed(spec, f"bad probe set: {e}")
    started = time.monotonic()
    per_sample: list[dict[str, Any]] = []
    try:
        lease = registry.get(name, version, variant=variant)
    except RetryLater:
        raise
    except EdgefleetError as e:
        return _failed(spec, f"probe not run: {e}")
    with lease:
        for i in range(probe.n):
            try:
                outputs, _rows = lease.infer(probe.sample(i))
            except RetryLater:
                raise
            except Exception as e:  # engine or backend error on this sample
                return _failed(spec, f"{where}: inference failed on probe sample {i}: {e}",
                               samples=i)
            per_sample.append({k: outputs[k] for k in probe.references if k in outputs})
    try:
        got = P.stack_outputs(per_sample)
        result = P.evaluate(spec.metric, probe.references, got, threshold=spec.threshold,
                            options=probe.options)
    except Rejected as e:
        return _failed(spec, f"{where}: {e}", samples=probe.n)
    except Exception as e:  # e.g. outputs whose ranks differ between samples
        return _failed(spec, f"{where}: probe outputs unusable: {e}", samples=probe.n)
    ms = (time.monotonic() - started) * 1000
    detail = (f"{where} on {probe.n} samples in {ms:.0f} ms: {result.detail}"
              f" -> {'passed' if result.passed else 'FAILED'}")
    (log.info if result.passed else log.warning)("accuracy probe: %s", detail)
    return update_pb2.ProbeReport(metric=result.metric, value=result.value,
                                  threshold=result.threshold, passed=result.passed,
                                  samples=probe.n, detail=detail, at_ms=_now_ms())
