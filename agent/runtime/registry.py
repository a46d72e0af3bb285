"""The hot loader: which engine serves which model, and atomic swaps between them.

Called by the update pipeline (``agent.update``, from its own thread) through
:meth:`ModelRegistry.activate`, by the inference server (:mod:`agent.serve`) through
:meth:`ModelRegistry.get`, by the thermal policy (``set_max_concurrency``,
``set_preferred_variant``), by the heartbeat (``served``) and by the shadow check
(:mod:`agent.update.shadow`, ``set_tap``: a callback after each inference of a model, which
must only enqueue; it is dropped the first time it raises).

``activate`` loads the new engine beside the old one, warms it up (on the caller's
``warmup_inputs``, e.g. the first sample of the update's accuracy probe, else on synthetic
inputs whose dynamic dimensions take realistic sizes: batch 1, other dimensions from
:data:`WARMUP_DIM_CANDIDATES`, the next tried when the engine rejects a shape),
smoke-checks the outputs against the signature, and only then swaps the pointer under a
lock. Requests already holding a lease finish on the old engine; the last lease to end
closes it. Any failure raises (``Rejected``/``GiveUp``) and leaves the old engine serving.
The loading work (hash, session creation, warm-up) runs in a loader thread with a lower OS
priority (``load_nice``) so that it does not compete with serving for the CPU, and after a
swap the objects alive are frozen out of the garbage collector (``freeze_gc``) so that its
full collections stay short.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.runtime.base import EngineBackend, LoadedEngine, backend_for
from agent.runtime.batching import BatchingConfig, DynamicBatcher, check_batchable
from agent.runtime.priority import run_at_lower_priority
from agent.telemetry.metrics import ServingStats
from protos.edgefleet.v1.common_pb2 import EngineFingerprint, ModelSignature
from protos.edgefleet.v1.device_pb2 import ServedModel
from protos.errors import EdgefleetError, Rejected, RetryLater

if TYPE_CHECKING:  # numpy comes with the first engine (backends import it), not at start
    import numpy as np

log = logging.getLogger(__name__)

#: ``tap(inputs, outputs, latency_ms)`` after a successful inference (see ``set_tap``)
Tap = Callable[[dict[str, "np.ndarray"], dict[str, "np.ndarray"], float], None]


class ModelNotFound(Rejected):
    """No engine is loaded for this model name (and version)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="model_not_found")


@dataclass(frozen=True)
class ServedModelInfo:
    """What the registry holds for one (model, variant); ``active`` = serving requests now."""

    name: str
    version: int
    sha256: str
    engine_kind: str
    precision: str
    variant: str
    active: bool

    def to_proto(self, *, slot: str = "") -> ServedModel:
        return ServedModel(name=self.name, version=self.version, sha256=self.sha256, slot=slot,
                           engine_kind=self.engine_kind, precision=self.precision,
                           active=self.active, variant=self.variant)


class _Entry:
    """One loaded engine plus its in-flight count."""

    __slots__ = ("batcher", "closed", "engine", "engine_kind", "inflight", "name", "precision",
                 "retired", "sha256", "variant", "version")

    def __init__(self, *, name: str, version: int, variant: str, sha256: str, engine_kind: str,
                 precision: str, engine: LoadedEngine) -> None:
        self.name, self.version, self.variant = name, version, variant
        self.sha256, self.engine_kind, self.precision = sha256, engine_kind, precision
        self.engine = engine
        self.batcher: DynamicBatcher | None = None
        self.inflight = 0
        self.retired = False
        self.closed = threading.Event()


class _Limiter:
    """Adjustable concurrency limit (0 = unlimited) with a count of waiting callers."""

    def __init__(self, limit: int) -> None:
        self._cond = threading.Condition()
        self.limit = limit
        self.active = 0
        self.waiting = 0

    def acquire(self, timeout_s: float) -> bool:
        """Take a slot; False on timeout. Unlimited (0) takes a slot without waiting."""
        with self._cond:
            if self.limit <= 0 or self.active < self.limit:
                self.active += 1
                return True
            self.waiting += 1
            try:
                ok = self._cond.wait_for(lambda: self.limit <= 0 or self.active < self.limit,
                                         timeout=timeout_s)
                if ok:
                    self.active += 1
                return ok
            finally:
                self.waiting -= 1

    def release(self) -> None:
        with self._cond:
            self.active -= 1
            self._cond.notify()

    def set_limit(self, limit: int) -> None:
        with self._cond:
            self.limit = limit
            self._cond.notify_all()


class EngineLease:
    """Context manager returned by :meth:`ModelRegistry.get`; yields the LoadedEngine and
    keeps it alive (not closed) until the ``with`` block ends."""

    __slots__ = ("_batcher", "_entry", "_limiter", "_registry")

    def __init__(self, registry: ModelRegistry, entry: _Entry, limiter: _Limiter | None) -> None:
        self._registry, self._entry, self._limiter = registry, entry, limiter
        self._batcher = entry.batcher
        if self._batcher is not None:
            self._batcher.expect()  # a batch about to leave may wait for this request

    @property
    def name(self) -> str:
        return self._entry.name

    @property
    def version(self) -> int:
        return self._entry.version

    @property
    def variant(self) -> str:
        return self._entry.variant

    def __enter__(self) -> LoadedEngine:
        return self._entry.engine

    def infer(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """Run ``inputs`` (through the model's dynamic batcher when batching is configured);
        returns the outputs and the rows of the inference this call ran (0 when the request
        rode along in another request's batch: one count per execution). Call inside the
        ``with`` block. A tap set on this engine's model (``set_tap``) sees the result."""
        tap = self._registry._taps.get((self._entry.name, self._entry.variant))
        if tap is None:
            return self._infer(inputs)
        started = time.perf_counter()
        result = self._infer(inputs)
        self._registry._call_tap(tap, self._entry, inputs, result[0],
                                 (time.perf_counter() - started) * 1000)
        return result

    def _infer(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            return batcher.infer(inputs, expected=True)
        if self._entry.batcher is not None:  # second call on one lease
            return self._entry.batcher.infer(inputs)
        first = next(iter(inputs.values()), None)
        rows = int(first.shape[0]) if first is not None and first.ndim else 1
        return self._entry.engine.infer(inputs), rows

    def __exit__(self, *exc: object) -> None:
        if self._batcher is not None:  # leased but never ran (bad request)
            self._batcher.cancel()
            self._batcher = None
        self._registry._release(self._entry, self._limiter)


class ModelRegistry:
    """Engines being served, keyed by (model name, variant). Thread-safe."""

    def __init__(self, *, backends: Mapping[str, EngineBackend] | None = None,
                 warmup_runs: int = 3, max_concurrency: int = 0, queue_timeout_s: float = 5.0,
                 verify_sha256: bool = True, stats: ServingStats | None = None,
                 load_nice: int = 10, freeze_gc: bool = True) -> None:
        self._backends = dict(backends or {})
        self._load_nice = load_nice
        self._freeze_gc = freeze_gc
        self._warmup_runs = max(1, warmup_runs)
        self._queue_timeout_s = queue_timeout_s
        self._verify_sha256 = verify_sha256
        self._max_concurrency = max_concurrency
        self._lock = threading.Lock()
        self._activate_lock = threading.Lock()
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._limiters: dict[str, _Limiter] = {}
        self._batching: dict[str, BatchingConfig] = {}
        self._preferred_variant = ""
        self._taps: dict[tuple[str, str], Tap] = {}  # replaced, never mutated: read unlocked
        self.stats = stats or ServingStats()

    # ---- serving path -------------------------------------------------------------------
    def get(self, name: str, version: int | None = None, *,
            variant: str | None = None) -> EngineLease:
        """Lease the engine serving ``name`` (``version`` must match when given; ``variant``,
        when given, picks exactly that installed variant, "" = the main model even while a
        variant is preferred: the accuracy probe uses it). Waits up to ``queue_timeout_s`` for a
        concurrency slot; raises :class:`ModelNotFound` or :class:`RetryLater` (queue
        timeout)."""
        limiter = self._limiters.get(name)
        if limiter is not None and limiter.limit <= 0:
            limiter = None  # unlimited: skip the slot bookkeeping on the hot path
        if limiter is not None and not limiter.acquire(self._queue_timeout_s):
            raise RetryLater(f"model {name} is busy (concurrency limit {limiter.limit})",
                             reason="queue_timeout")
        try:
            with self._lock:
                entry = (self._pick(name, version) if variant is None
                         else self._pick_variant(name, version, variant))
                entry.inflight += 1
        except BaseException:
            if limiter is not None:
                limiter.release()
            raise
        return EngineLease(self, entry, limiter)

    def _pick(self, name: str, version: int | None) -> _Entry:
        main = self._entries.get((name, ""))
        chosen = main
        if self._preferred_variant:
            chosen = self._entries.get((name, self._preferred_variant)) or main
        if chosen is None:  # only variants installed
            chosen = next((e for (n, _v), e in self._entries.items() if n == name), None)
        if chosen is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        if version is not None and chosen.version != version:
            other = next((e for (n, _v), e in self._entries.items()
                          if n == name and e.version == version), None)
            if other is None:
                raise ModelNotFound(f"model {name!r} version {version} is not loaded "
                                    f"(serving version {chosen.version})")
            chosen = other
        return chosen

    def _pick_variant(self, name: str, version: int | None, variant: str) -> _Entry:
        entry = self._entries.get((name, variant))
        if entry is None:
            raise ModelNotFound(f"model {name!r} variant {variant!r} is not loaded")
        if version is not None and entry.version != version:
            raise ModelNotFound(f"model {name!r} variant {variant!r} version {version} is not "
                                f"loaded (serving version {entry.version})")
        return entry

    def _release(self, entry: _Entry, limiter: _Limiter | None) -> None:
        with self._lock:
            entry.inflight -= 1
            close_now = entry.retired and entry.inflight == 0 and not entry.closed.is_set()
            if close_now:
                entry.closed.set()
        if limiter is not None:
            limiter.release()
        if close_now:
            self._close(entry)

    def set_tap(self, name: str, tap: Tap | None, *, variant: str = "") -> None:
        """Call ``tap(inputs, outputs, latency_ms)`` on the serving thread after every
        successful inference of ``name``/``variant`` on its active engine (None removes it).
        The tap must be cheap (enqueue, never wait); one that raises is removed."""
        with self._lock:
            taps = dict(self._taps)
            if tap is None:
                taps.pop((name, variant), None)
            else:
                taps[(name, variant)] = tap
            self._taps = taps

    def _call_tap(self, tap: Tap, entry: _Entry, inputs: dict[str, np.ndarray],
                  outputs: dict[str, np.ndarray], latency_ms: float) -> None:
        if entry.retired:  # a request that finished on the engine just swapped out
            return
        try:
            tap(inputs, outputs, latency_ms)
        except Exception:  # a tap never fails a request: drop it
            log.exception("inference tap of %s%s failed; removed", entry.name,
                          f".{entry.variant}" if entry.variant else "")
            with self._lock:
                if self._taps.get((entry.name, entry.variant)) is tap:
                    self._taps = {k: t for k, t in self._taps.items() if t is not tap}

    # ---- update path --------------------------------------------------------------------
    def activate(self, *, name: str, version: int, path: Path, sha256: str,
                 fingerprint: EngineFingerprint, signature: ModelSignature | None,
                 variant: str = "",
                 warmup_inputs: Mapping[str, np.ndarray] | None = None) -> None:
        """Load ``path`` beside the engine now serving ``name``/``variant``, warm it up,
        smoke-check it and swap atomically. ``warmup_inputs`` (e.g. the first probe sample,
        :func:`agent.update.probe.probe_inputs`) are real inputs for the warm-up: the engine
        must run them; without them synthetic inputs of realistic shapes are used (see
        :func:`smoke_check`). Raises Rejected / GiveUp / BackendUnavailable and leaves the
        old engine serving when anything fails. Called from the update thread, never from a
        serving thread."""
        started = time.monotonic()
        with self._activate_lock:
            backend = self._backend(fingerprint.engine_kind)
            backend.check_fingerprint(fingerprint)

            def load() -> LoadedEngine:
                if self._verify_sha256:
                    _check_sha256(Path(path), sha256)
                engine = backend.load(Path(path), signature=signature)
                try:
                    smoke_check(engine, expected=signature if signature and signature.outputs
                                else engine.signature, runs=self._warmup_runs,
                                inputs=warmup_inputs)
                except BaseException:
                    engine.close()
                    raise
                return engine

            engine = run_at_lower_priority(load, nice=self._load_nice)
            entry = _Entry(name=name, version=version, variant=variant, sha256=sha256,
                           engine_kind=fingerprint.engine_kind,
                           precision=fingerprint.precision or "fp32", engine=engine)
            config = self._batching.get(name)
            if config is not None:
                try:
                    check_batchable(engine.signature, model=name)
                    entry.batcher = DynamicBatcher(engine, config)
                except Rejected as e:  # a serving option never blocks an update
                    log.warning("version %d served without batching: %s", version, e)
            with self._lock:
                old = self._entries.get((name, variant))
                self._entries[(name, variant)] = entry
                if name not in self._limiters:
                    self._limiters[name] = _Limiter(self._max_concurrency)
                close_old = self._retire(old)
            if close_old is not None:
                self._close(close_old)
            if self._freeze_gc:
                # Objects alive now (modules, engines, signatures) are long-lived: move them
                # out of the collector's sight so that a full collection (which holds the GIL
                # and stalled every request for ~10 ms) only walks what came after.
                gc.collect(1)
                gc.freeze()
        log.info("activated model=%s version=%d variant=%r kind=%s in %.1f ms (previous: %s)",
                 name, version, variant, fingerprint.engine_kind,
                 (time.monotonic() - started) * 1000, old.version if old else "none")

    def _retire(self, old: _Entry | None) -> _Entry | None:
        """Mark ``old`` retired (caller holds the lock); returns it when it must close now."""
        if old is None:
            return None
        old.retired = True
        if old.inflight == 0 and not old.closed.is_set():
            old.closed.set()
            return old
        return None

    def unload(self, name: str, *, variant: str | None = None) -> None:
        """Stop serving ``name`` (all variants unless ``variant`` given); engines close when
        their in-flight requests end."""
        to_close: list[_Entry] = []
        with self._lock:
            for key in [k for k in self._entries if k[0] == name
                        and (variant is None or k[1] == variant)]:
                entry = self._retire(self._entries.pop(key))
                if entry is not None:
                    to_close.append(entry)
        for entry in to_close:
            self._close(entry)

    def _close(self, entry: _Entry) -> None:
        try:
            entry.engine.close()
        except Exception:  # a failing close must not break serving
            log.exception("closing engine %s v%d failed", entry.name, entry.version)

    def _backend(self, kind: str) -> EngineBackend:
        if kind not in self._backends:
            self._backends[kind] = backend_for(kind)
        return self._backends[kind]

    # ---- policy + reporting -------------------------------------------------------------
    def set_max_concurrency(self, limit: int) -> None:
        """Concurrent inferences per model (0 = unlimited); used by the thermal policy."""
        with self._lock:
            self._max_concurrency = limit
            limiters = list(self._limiters.values())
        for limiter in limiters:
            limiter.set_limit(limit)

    def configure_batching(self, name: str, *, max_batch_size: int, max_queue_delay_ms: float,
                           max_concurrent_batches: int = 1) -> None:
        """Dynamic batching for model ``name``: concurrent requests with the same input shapes
        except the first dimension run as one inference of up to ``max_batch_size`` rows, at
        most ``max_concurrent_batches`` inferences at once; a batch waits at most
        ``max_queue_delay_ms`` for requests on their way (see :mod:`agent.runtime.batching`).
        ``max_batch_size <= 1`` turns it off. Applies to the loaded engines of ``name`` and to later versions. Raises
        ``Rejected(reason="batching_unsupported")`` when the loaded model has no dynamic
        batch dimension (a later version without one is served unbatched, with a warning),
        ``ValueError`` for out-of-range settings."""
        if max_batch_size <= 1:
            with self._lock:
                self._batching.pop(name, None)
                for (n, _v), e in self._entries.items():
                    if n == name:
                        e.batcher = None
            return
        config = BatchingConfig(max_batch_size=max_batch_size,
                                max_queue_delay_ms=max_queue_delay_ms,
                                max_concurrent_batches=max_concurrent_batches)
        with self._lock:
            entries = [e for (n, _v), e in self._entries.items() if n == name]
        for e in entries:
            check_batchable(e.engine.signature, model=name)
        with self._lock:
            self._batching[name] = config
            for e in entries:
                e.batcher = DynamicBatcher(e.engine, config)

    def batching(self, name: str) -> BatchingConfig | None:
        """The batching settings of ``name`` (None = off)."""
        return self._batching.get(name)

    @property
    def max_concurrency(self) -> int:
        return self._max_concurrency

    def set_preferred_variant(self, variant: str) -> None:
        """Serve ``variant`` (e.g. "light") where installed; "" = the main model."""
        with self._lock:
            self._preferred_variant = variant

    @property
    def preferred_variant(self) -> str:
        return self._preferred_variant

    def has_variant(self, variant: str) -> bool:
        with self._lock:
            return any(v == variant for (_n, v) in self._entries)

    def queue_depth(self, name: str) -> int:
        limiter = self._limiters.get(name)
        return limiter.waiting if limiter is not None else 0

    def describe(self, name: str, version: int | None = None
                 ) -> tuple[ServedModelInfo, ModelSignature]:
        """Info and signature of the engine ``get`` would pick (no lease, no queueing)."""
        with self._lock:
            e = self._pick(name, version)
            return (ServedModelInfo(name=e.name, version=e.version, sha256=e.sha256,
                                    engine_kind=e.engine_kind, precision=e.precision,
                                    variant=e.variant, active=True), e.engine.signature)

    def names(self) -> list[str]:
        with self._lock:
            return sorted({n for (n, _v) in self._entries})

    def served(self) -> list[ServedModelInfo]:
        with self._lock:
            out = []
            for (name, _variant), e in sorted(self._entries.items()):
                try:
                    active = self._pick(name, None) is e
                except ModelNotFound:  # pragma: no cover - entry exists
                    active = False
                out.append(ServedModelInfo(name=e.name, version=e.version, sha256=e.sha256,
                                           engine_kind=e.engine_kind, precision=e.precision,
                                           variant=e.variant, active=active))
            return out

    def close(self) -> None:
        """Unload everything (agent shutdown)."""
        for name in self.names():
            self.unload(name)


def _check_sha256(path: Path, expected: str) -> None:
    if not expected:
        return
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise Rejected(f"cannot read engine file {path}: {e}", reason="engine_missing") from e
    if digest.hexdigest() != expected.lower():
        raise Rejected(f"engine file {path.name} has sha256 {digest.hexdigest()}, manifest says "
                       f"{expected}", reason="sha256_mismatch")


#: sizes tried, in this order, for dynamic dimensions other than the first (batch) one when
#: no warm-up inputs are given: 1 would make a detector with dynamic height/width fail (its
#: upsampled branches no longer match the skip connections), so realistic sizes come first
#: and 1 is the last resort
WARMUP_DIM_CANDIDATES: tuple[int, ...] = (32, 64, 224, 320, 640, 1)


def synthetic_inputs(signature: ModelSignature, *, seed: int = 0,
                     dim: int = 1) -> dict[str, np.ndarray]:
    """Inputs matching ``signature``: a dynamic first (batch) dimension -> 1, other dynamic
    dimensions -> ``dim``; floats ~ N(0, 1), ints/bool zeros."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        shape = tuple(d if d >= 0 else (1 if i == 0 else dim) for i, d in enumerate(spec.shape))
        dtype = np.dtype(spec.dtype or "float32")
        if dtype.kind == "f":
            out[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            out[spec.name] = np.zeros(shape, dtype=dtype)
    return out


def _has_dynamic_inner_dims(signature: ModelSignature) -> bool:
    return any(d < 0 for spec in signature.inputs for d in list(spec.shape)[1:])


def _run_warmup(engine: LoadedEngine, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One warm-up inference; vendor errors become Rejected(smoke_check_failed)."""
    try:
        return engine.infer(dict(inputs))
    except EdgefleetError:
        raise
    except Exception as e:
        raise Rejected(f"warm-up inference failed: {e}", reason="smoke_check_failed") from e


def _first_synthetic_run(engine: LoadedEngine) -> tuple[int, dict[str, np.ndarray]]:
    """Find a size for the dynamic non-batch dimensions the engine accepts: try
    :data:`WARMUP_DIM_CANDIDATES` in order, return (size, outputs of the first run). Raises
    Rejected with the last error when the engine rejects every candidate."""
    candidates = WARMUP_DIM_CANDIDATES if _has_dynamic_inner_dims(engine.signature) else (1,)
    last: Rejected | None = None
    for dim in candidates:
        try:
            return dim, _run_warmup(engine, synthetic_inputs(engine.signature, seed=0, dim=dim))
        except Rejected as e:
            if e.reason != "smoke_check_failed":
                raise
            last = e
            log.debug("warm-up with dynamic dims = %d failed: %s", dim, e)
    assert last is not None
    tried = "" if len(candidates) == 1 else f" (dynamic dimensions tried: {list(candidates)})"
    raise Rejected(f"{last}{tried}", reason="smoke_check_failed") from last


def smoke_check(engine: LoadedEngine, *, expected: ModelSignature, runs: int = 3,
                inputs: Mapping[str, np.ndarray] | None = None) -> None:
    """Warm ``engine`` up with ``runs`` inferences and check names, dtypes, ranks/static dims
    and finiteness of the outputs. ``inputs`` (real inputs, e.g. a probe sample) are used for
    every run when given; else synthetic inputs whose dynamic dimensions get the first size
    of :data:`WARMUP_DIM_CANDIDATES` the engine runs. Raises :class:`Rejected` (reason
    ``smoke_check_failed``)."""
    dim = 1
    for i in range(max(1, runs)):
        if inputs is not None:
            try:
                outputs = _run_warmup(engine, inputs)
            except Rejected as e:
                raise Rejected(f"{e} (on the given warm-up inputs)",
                               reason=e.reason) from e
        elif i == 0:
            dim, outputs = _first_synthetic_run(engine)
        else:
            outputs = _run_warmup(engine, synthetic_inputs(engine.signature, seed=i, dim=dim))
        _check_outputs(outputs, expected=expected)


def _check_outputs(outputs: dict[str, np.ndarray], *, expected: ModelSignature) -> None:
    import numpy as np

    want = {t.name: t for t in expected.outputs}
    if set(outputs) != set(want):
        raise Rejected(f"outputs {sorted(outputs)} != signature {sorted(want)}",
                       reason="smoke_check_failed")
    for name, value in outputs.items():
        spec = want[name]
        arr = np.asarray(value)
        if spec.dtype and arr.dtype != np.dtype(spec.dtype):
            raise Rejected(f"output {name} is {arr.dtype}, signature says {spec.dtype}",
                           reason="smoke_check_failed")
        if spec.shape and (len(spec.shape) != arr.ndim or any(
                d >= 0 and d != a for d, a in zip(spec.shape, arr.shape, strict=False))):
            raise Rejected(f"output {name} has shape {list(arr.shape)}, signature says "
                           f"{list(spec.shape)}", reason="smoke_check_failed")
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            raise Rejected(f"output {name} has NaN/Inf values on warm-up input",
                           reason="smoke_check_failed")
