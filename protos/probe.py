"""On-device accuracy probe: the probe-set layout, its safe loader and the probe metrics.

Shared by both sides: the controller (:mod:`controller.ota.probe`) encodes a probe set into
``ProbeSpec.samples_npz`` of a signed UpdateManifest; the agent (:mod:`agent.update.probe`)
loads it after activating an engine, runs every sample on the real engine and judges the
outputs against the FP32 references with :func:`evaluate`. numpy is imported inside the
functions (the agent starts without it).

Layout of ``samples_npz`` (an ``.npz``, never pickles; first axis = samples, each sample is
fed as ``array[i:i+1]``, like the compile gate's validation samples):

* ``<input name>``        one array per model input, ``[N, ...]``;
* ``ref__<output name>``  the FP32 reference output of the compile gate, ``[N, ...]``;
* ``opt__output``         optional 0-d string: the output judged by top-1 ("" = the first
  reference in file order); ``opt__class_axis`` / ``opt__class_offset`` (0-d integers) and
  ``opt__score_threshold`` (0-d float, NaN = none): the same options as the EdgeModel's
  accuracy spec (``controller.compile.deviceclass.AccuracySpec``).

Metrics (same definitions as ``controller.compile.accuracy.compare``):

* ``top1-agreement``  fraction of positions whose argmax over the class axis (after the class
  offset) equals FP32's; passes when ``value >= threshold``;
* ``max-abs``         largest absolute difference over every reference output; passes when
  ``value <= threshold``;
* ``relative-error``  largest per-sample ``||engine - fp32|| / ||fp32||`` over every output;
  passes when ``value <= threshold``.

Non-finite engine outputs give the worst value (agreement 0, errors +inf).
"""

from __future__ import annotations

import io
import math
import re
import zipfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protos.errors import Rejected

if TYPE_CHECKING:
    import numpy as np

#: wire size of one probe set (the npz bytes in the signed manifest)
MAX_PROBE_BYTES = 256 * 1024
#: total size of the arrays once decompressed (a compressed npz must not explode in memory)
MAX_PROBE_DECODED_BYTES = 16 * 1024 * 1024
#: samples in one probe set
MAX_PROBE_SAMPLES = 64
#: arrays (inputs + references + options) in one probe set
MAX_PROBE_ARRAYS = 64

REF_PREFIX = "ref__"
OPT_PREFIX = "opt__"
OPTION_KEYS = ("output", "class_axis", "class_offset", "score_threshold")

TOP1_AGREEMENT = "top1-agreement"
MAX_ABS = "max-abs"
RELATIVE_ERROR = "relative-error"
METRICS = (TOP1_AGREEMENT, MAX_ABS, RELATIVE_ERROR)

_EPS = 1e-9  # the compile gate's float slack (0.99 - 0.98 is 0.010000000000000009)
_NAME = re.compile(r"^[^\x00]{1,256}\.npy$")  # read in memory only: no path checks needed


@dataclass(frozen=True)
class Top1Options:
    """Which output and which axis the top-1 metric looks at."""

    output: str = ""                       # "" = the first reference output
    class_axis: int = 1
    class_offset: int = 0
    score_threshold: float | None = None   # top-1 only where FP32's best score >= this


@dataclass
class ProbeSet:
    """Inputs by input name and FP32 references by output name, ``n`` samples each."""

    inputs: dict[str, np.ndarray]
    references: dict[str, np.ndarray]
    options: Top1Options = field(default_factory=Top1Options)

    @property
    def n(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """The inputs of sample ``i`` (first axis kept, length 1)."""
        return {k: v[i:i + 1] for k, v in self.inputs.items()}


@dataclass(frozen=True)
class ProbeResult:
    """The metric's value, whether it passed, and a line with the numbers."""

    metric: str
    value: float
    threshold: float
    passed: bool
    detail: str


# ---- encoding (controller) ------------------------------------------------------------------
def encode_probe_set(probe: ProbeSet, *, compress: bool = True) -> bytes:
    """The npz bytes of ``probe`` (layout in the module docstring). Raises Rejected when an
    input name collides with the reserved prefixes or the counts differ."""
    import numpy as np

    _check_counts(probe.inputs, probe.references)
    arrays: dict[str, Any] = {}  # Any: numpy's stubs type **kwds of savez like allow_pickle
    for name, arr in probe.inputs.items():
        if name.startswith((REF_PREFIX, OPT_PREFIX)):
            raise Rejected(f"input name {name!r} uses a reserved probe prefix",
                           reason="bad_probe")
        arrays[name] = np.ascontiguousarray(arr)
    for name, arr in probe.references.items():
        arrays[REF_PREFIX + name] = np.ascontiguousarray(arr)
    o = probe.options
    if o.output:
        arrays[OPT_PREFIX + "output"] = np.array(o.output)
    if o.class_axis != 1:
        arrays[OPT_PREFIX + "class_axis"] = np.array(o.class_axis, np.int64)
    if o.class_offset:
        arrays[OPT_PREFIX + "class_offset"] = np.array(o.class_offset, np.int64)
    if o.score_threshold is not None:
        arrays[OPT_PREFIX + "score_threshold"] = np.array(o.score_threshold, np.float64)
    buf = io.BytesIO()
    if compress:
        np.savez_compressed(buf, **arrays)
    else:
        np.savez(buf, **arrays)
    return buf.getvalue()


def decoded_nbytes(probe: ProbeSet) -> int:
    """Bytes of every array of ``probe`` in memory (what the loader's decoded cap counts)."""
    return sum(int(a.nbytes) for a in (*probe.inputs.values(), *probe.references.values()))


# ---- loading (agent) -----------------------------------------------------------------------
def load_probe_set(data: bytes, *, max_bytes: int = MAX_PROBE_BYTES,
                   max_decoded_bytes: int = MAX_PROBE_DECODED_BYTES,
                   max_samples: int = MAX_PROBE_SAMPLES,
                   max_arrays: int = MAX_PROBE_ARRAYS) -> ProbeSet:
    """Parse and check probe-set bytes from a (verified) manifest. Raises :class:`Rejected`
    (reason ``bad_probe`` or ``probe_too_large``) for anything unexpected: not an npz,
    pickled objects, too many bytes, arrays or samples, missing inputs or references,
    unequal sample counts, non-numeric dtypes, bad options."""
    import numpy as np

    if not data:
        raise Rejected("probe set is empty", reason="bad_probe")
    if len(data) > max_bytes:
        raise Rejected(f"probe set is {len(data)} bytes, over max_probe_bytes={max_bytes}",
                       reason="probe_too_large")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise Rejected(f"probe set is not an npz: {e}", reason="bad_probe") from e
    if len(infos) > max_arrays:
        raise Rejected(f"probe set has {len(infos)} arrays, over {max_arrays}",
                       reason="probe_too_large")
    declared = sum(i.file_size for i in infos)
    if declared > max_decoded_bytes:
        raise Rejected(f"probe set decodes to {declared} bytes, over max_probe_decoded_bytes="
                       f"{max_decoded_bytes}", reason="probe_too_large")
    bad_names = [i.filename for i in infos if not _NAME.match(i.filename)]
    if bad_names:
        raise Rejected(f"probe set has unexpected members {bad_names[:5]}", reason="bad_probe")
    _check_headers(data, max_decoded_bytes=max_decoded_bytes)
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            for key in z.files:
                arrays[key] = z[key]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        # allow_pickle=False raises ValueError("Object arrays cannot be loaded ...")
        raise Rejected(f"probe set is not a readable npz without pickles: {e}",
                       reason="bad_probe") from e
    total = sum(int(a.nbytes) for a in arrays.values())
    if total > max_decoded_bytes:  # the zip's declared sizes are checked, this is the truth
        raise Rejected(f"probe set decodes to {total} bytes, over max_probe_decoded_bytes="
                       f"{max_decoded_bytes}", reason="probe_too_large")
    inputs: dict[str, np.ndarray] = {}
    refs: dict[str, np.ndarray] = {}
    opts: dict[str, np.ndarray] = {}
    for key, arr in arrays.items():
        if key.startswith(OPT_PREFIX):
            opts[key[len(OPT_PREFIX):]] = arr
            continue
        if arr.dtype.kind not in "biuf":
            raise Rejected(f"probe array {key!r} has dtype {arr.dtype}, expected a number type",
                           reason="bad_probe")
        if arr.ndim < 1:
            raise Rejected(f"probe array {key!r} is a scalar; first axis must be samples",
                           reason="bad_probe")
        if key.startswith(REF_PREFIX):
            name = key[len(REF_PREFIX):]
            if not name:
                raise Rejected("probe reference with an empty output name", reason="bad_probe")
            refs[name] = arr
        else:
            inputs[key] = arr
    if not inputs or not refs:
        raise Rejected(f"probe set needs input arrays and {REF_PREFIX}<output> references "
                       f"(has {sorted(arrays)})", reason="bad_probe")
    n = _check_counts(inputs, refs)
    if n > max_samples:
        raise Rejected(f"probe set has {n} samples, over max_probe_samples={max_samples}",
                       reason="probe_too_large")
    return ProbeSet(inputs=inputs, references=refs, options=_options(opts, refs))


def _check_headers(data: bytes, *, max_decoded_bytes: int) -> None:
    """Read every member's .npy header (not its data): object dtypes and arrays whose shape
    adds up past ``max_decoded_bytes`` are refused before numpy allocates anything."""
    import numpy as np
    from numpy.lib import format as npy

    total = 0
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                with zf.open(info) as f:
                    version = npy.read_magic(f)
                    if version == (1, 0):
                        shape, _order, dtype = npy.read_array_header_1_0(f)
                    elif version in ((2, 0), (3, 0)):
                        shape, _order, dtype = npy.read_array_header_2_0(f)
                    else:
                        raise ValueError(f"unsupported .npy version {version}")
                if dtype.hasobject:
                    raise Rejected(f"probe array {info.filename[:-4]!r} holds Python objects "
                                   f"(pickles are refused)", reason="bad_probe")
                total += int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                if total > max_decoded_bytes:
                    raise Rejected(f"probe arrays need over {max_decoded_bytes} bytes "
                                   f"(max_probe_decoded_bytes)", reason="probe_too_large")
    except Rejected:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError) as e:
        raise Rejected(f"probe set is not a readable npz: {e}", reason="bad_probe") from e


def _check_counts(inputs: dict[str, np.ndarray], refs: dict[str, np.ndarray]) -> int:
    counts = {int(a.shape[0]) if a.ndim else 0 for a in (*inputs.values(), *refs.values())}
    if len(counts) != 1 or 0 in counts:
        raise Rejected(f"probe inputs and references need the same non-zero sample count, "
                       f"got {sorted(counts)}", reason="bad_probe")
    return counts.pop()


def _options(opts: dict[str, np.ndarray], refs: dict[str, np.ndarray]) -> Top1Options:
    unknown = sorted(set(opts) - set(OPTION_KEYS))
    if unknown:
        raise Rejected(f"unknown probe options {unknown}", reason="bad_probe")
    if any(a.ndim for a in opts.values()):
        raise Rejected("probe options must be scalars", reason="bad_probe")
    try:
        output = str(opts["output"].item()) if "output" in opts else ""
        axis = int(opts["class_axis"].item()) if "class_axis" in opts else 1
        offset = int(opts["class_offset"].item()) if "class_offset" in opts else 0
        thr = float(opts["score_threshold"].item()) if "score_threshold" in opts else None
    except (TypeError, ValueError, OverflowError) as e:
        raise Rejected(f"bad probe option: {e}", reason="bad_probe") from e
    if output and output not in refs:
        raise Rejected(f"probe option output {output!r} is not a reference ({sorted(refs)})",
                       reason="bad_probe")
    if axis < 1 or offset < 0:
        raise Rejected("probe class_axis must be >= 1 and class_offset >= 0", reason="bad_probe")
    if thr is not None and math.isnan(thr):
        thr = None
    return Top1Options(output=output, class_axis=axis, class_offset=offset, score_threshold=thr)


# ---- metrics (both sides) ------------------------------------------------------------------
def top1_agreement(reference: np.ndarray, candidate: np.ndarray, *,
                   options: Top1Options | None = None) -> float:
    """Fraction of top-1 positions where ``candidate`` agrees with ``reference`` (argmax over
    the class axis from the class offset; one top-1 per remaining position). 0.0 when the
    candidate is not finite. Raises Rejected when the output has no class axis."""
    import numpy as np

    o = options or Top1Options()
    ref = np.asarray(reference)
    cand = np.asarray(candidate)
    if ref.ndim < 2 or o.class_axis >= ref.ndim:
        raise Rejected(f"top1-agreement needs an output of rank > class axis {o.class_axis}, "
                       f"got shape {list(ref.shape)}", reason="metric_not_applicable")
    ref_s = np.moveaxis(ref, o.class_axis, 1)[:, o.class_offset:]
    cand_s = np.moveaxis(cand, o.class_axis, 1)[:, o.class_offset:]
    if ref_s.shape[1] == 0:
        raise Rejected(f"class offset {o.class_offset} leaves no classes in shape "
                       f"{list(ref.shape)}", reason="metric_not_applicable")
    if not np.all(np.isfinite(cand_s)):
        return 0.0
    t_ref, t_cand = ref_s.argmax(axis=1), cand_s.argmax(axis=1)
    mask = np.ones(t_ref.shape, bool)
    if o.score_threshold is not None:
        mask = ref_s.max(axis=1) >= o.score_threshold
    return float((t_ref == t_cand)[mask].mean()) if mask.any() else 1.0


def max_abs_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Largest ``|candidate - reference|`` (+inf when the candidate is not finite)."""
    import numpy as np

    cand = np.asarray(candidate, dtype=np.float64)
    if not np.all(np.isfinite(cand)):
        return math.inf
    diff = np.abs(cand - np.asarray(reference, dtype=np.float64))
    return float(diff.max()) if diff.size else 0.0


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Largest per-sample ``||candidate - reference|| / ||reference||`` (+inf when not finite)."""
    import numpy as np

    cand = np.asarray(candidate, dtype=np.float64)
    if not np.all(np.isfinite(cand)):
        return math.inf
    r = np.asarray(reference, dtype=np.float64)
    n = r.shape[0] if r.ndim else 1
    diff = (cand - r).reshape(n, -1)
    rf = r.reshape(n, -1)
    rel = np.linalg.norm(diff, axis=1) / np.maximum(np.linalg.norm(rf, axis=1), 1e-12)
    return float(rel.max()) if rel.size else 0.0


def evaluate(metric: str, references: dict[str, np.ndarray],
             outputs: dict[str, np.ndarray], *, threshold: float,
             options: Top1Options | None = None) -> ProbeResult:
    """Judge engine ``outputs`` against the FP32 ``references`` with ``metric``. Raises
    Rejected for an unknown metric, missing outputs or shapes that differ (the caller turns
    that into a failed report)."""
    import numpy as np

    if metric not in METRICS:
        raise Rejected(f"unknown probe metric {metric!r}; expected one of {METRICS}",
                       reason="bad_probe")
    if not math.isfinite(threshold):
        raise Rejected(f"probe threshold must be finite, got {threshold}", reason="bad_probe")
    if not references:
        raise Rejected("probe has no reference outputs", reason="bad_probe")
    o = options or Top1Options()
    missing = sorted(k for k in references if k not in outputs)
    if missing:
        raise Rejected(f"engine did not produce outputs {missing}", reason="bad_engine_outputs")
    for name, ref in references.items():
        got = np.shape(outputs[name])
        if tuple(got) != tuple(ref.shape):
            raise Rejected(f"engine output {name!r} has shape {list(got)}, FP32 has "
                           f"{list(ref.shape)}", reason="bad_engine_outputs")
    errors = {k: max_abs_error(r, outputs[k]) for k, r in references.items()}
    worst = max(errors, key=lambda k: errors[k])
    extra = f"max-abs {errors[worst]:.6g} (output {worst!r})"
    if metric == TOP1_AGREEMENT:
        first = o.output or next(iter(references))
        value = top1_agreement(references[first], outputs[first], options=o)
        passed = value >= threshold - _EPS
        line = f"top1-agreement {value:.6g} {'>=' if passed else '<'} {threshold:g} " \
               f"(output {first!r}); {extra}"
    elif metric == MAX_ABS:
        value = errors[worst]
        passed = value <= threshold + _EPS
        line = f"max-abs {value:.6g} {'<=' if passed else '>'} {threshold:g} (output {worst!r})"
    else:
        rel = {k: relative_error(r, outputs[k]) for k, r in references.items()}
        rworst = max(rel, key=lambda k: rel[k])
        value = rel[rworst]
        passed = value <= threshold + _EPS
        line = (f"relative-error {value:.6g} {'<=' if passed else '>'} {threshold:g} "
                f"(output {rworst!r}); {extra}")
    return ProbeResult(metric=metric, value=float(value), threshold=float(threshold),
                       passed=bool(passed), detail=line)


def stack_outputs(per_sample: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Concatenate per-sample engine outputs along the first axis (name by name)."""
    import numpy as np

    if not per_sample:
        return {}
    names = list(per_sample[0])
    return {n: np.concatenate([np.asarray(s[n]) for s in per_sample]) for n in names}
