"""Shadow check before activation: mirror live requests to the staged engine and compare.

When an update whose manifest carries a ``ShadowSpec`` (``seconds > 0``) is STAGED and the
model already serves an engine, :class:`agent.update.manager.UpdateManager` starts one
:class:`ShadowCheck` per model key instead of activating. The check

* loads the staged engine BESIDE the active one in its own thread (``update-shadow``; the
  load at a lower OS priority like the registry's, same backend and session options);
  nothing is swapped and the registry never serves it;
* registers a tap on the registry (``ModelRegistry.set_tap``): on the serving thread, after
  each successful inference, every ``100 / sample_percent``-th request's inputs, outputs and
  latency are put in a bounded queue without waiting (a full queue drops the sample and
  counts it): the client's response never waits for the shadow;
* runs each mirrored request on the staged engine in its thread, sleeping after each one
  so that its busy time (wall time in the staged engine) stays under ``max_cpu_percent`` of
  one core (an engine that spreads one inference over k intra-op threads may use up to k
  times that: ``runtime.intra_op_threads`` bounds k). Inferences run at the serving
  priority so that both latencies are measured alike (a lower priority would inflate the
  staged p99 on a busy board); the budget is what keeps the shadow off the serving CPU.
  It compares: top-1 agreement (:func:`protos.probe.top1_agreement`) for classifier-like
  outputs (float, rank >= 2, at least 2 classes on axis 1), else "within tolerance"
  (max-abs <= :data:`ATOL` or relative error <= :data:`RTOL`); the latencies of both
  engines (the active one's as measured on the serving thread) go into p99s;
* decides (:meth:`ShadowCheck.poll`, on the update worker's ticks: the worker never waits)
  once ``min_samples`` requests are compared, or when ``seconds`` have elapsed (then with
  fewer than ``min_samples`` compared: failed, "not enough live traffic"; ``min_samples`` 0
  decides on whatever was compared). Passed when agreement >= ``min_agreement`` and (no
  ``max_latency_ratio`` or staged p99 / active p99 <= it).

Every error of the shadow path (the staged engine fails to load or to run a request, a bug
here) ends in a failed report or a disagreeing sample, never in a failed request. numpy is
imported lazily (with the first engine).
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from protos import probe as P
from protos.edgefleet.v1 import common_pb2, update_pb2
from protos.errors import EdgefleetError

if TYPE_CHECKING:
    import numpy as np

    from agent.runtime.base import LoadedEngine
    from agent.runtime.registry import Tap
    from agent.update.slots import SlotInfo, SlotStore
    from agent.update.state import UpdateRecord
    from agent.update.verify import VerifiedUpdate

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_PERCENT = 20     # the CRD defaults, for a spec that leaves them 0
DEFAULT_MAX_CPU_PERCENT = 25
QUEUE_SIZE = 8                  # mirrored requests waiting for the staged engine (bounded)
MAX_SECONDS = 86_400
LOAD_NICE = 10                  # OS priority steps below serving while the engine loads
ATOL = 1e-3                     # "within tolerance" for outputs that are not classifier-like
RTOL = 1e-2
_EPS = 1e-9

Tensors = dict[str, "np.ndarray"]


class TapRegistry(Protocol):
    """What the check needs of :class:`agent.runtime.registry.ModelRegistry`."""

    def set_tap(self, name: str, tap: Tap | None, *, variant: str = "") -> None: ...


def wanted(manifest: update_pb2.UpdateManifest) -> bool:
    """Whether ``manifest`` asks for a shadow check before activation."""
    return manifest.HasField("shadow") and manifest.shadow.seconds > 0


@dataclass(frozen=True)
class ShadowPolicy:
    """A ShadowSpec with defaults for unset fields and ranges clamped."""

    seconds: float
    min_samples: int
    sample_percent: int
    cpu_fraction: float          # of one core
    min_agreement: float
    max_latency_ratio: float     # 0 = not checked

    @classmethod
    def from_spec(cls, spec: update_pb2.ShadowSpec) -> ShadowPolicy:
        pct = spec.sample_percent or DEFAULT_SAMPLE_PERCENT
        cpu = spec.max_cpu_percent or DEFAULT_MAX_CPU_PERCENT
        ratio = spec.max_latency_ratio
        return cls(seconds=float(min(spec.seconds, MAX_SECONDS)), min_samples=spec.min_samples,
                   sample_percent=max(1, min(100, pct)),
                   cpu_fraction=max(1, min(100, cpu)) / 100.0,
                   min_agreement=spec.min_agreement if math.isfinite(spec.min_agreement)
                   else 1.0,
                   max_latency_ratio=ratio if math.isfinite(ratio) and ratio > 0 else 0.0)


# ---- comparison -----------------------------------------------------------------------------
def classifier_like(arr: np.ndarray) -> bool:
    """Float output of rank >= 2 with at least two classes on axis 1 (top-1 is compared)."""
    return arr.dtype.kind == "f" and arr.ndim >= 2 and arr.shape[1] >= 2


def agreement(active: Tensors, staged: Tensors) -> float:
    """Score in [0, 1] of the staged engine's outputs for one request against the active
    engine's: per output, top-1 agreement (fraction of positions) when classifier-like,
    else 1 when within :data:`ATOL` / :data:`RTOL` and 0 otherwise; the lowest over every
    output the active engine gave. A missing output, another shape or non-finite values: 0."""
    import numpy as np

    scores: list[float] = []
    for name, ref_value in active.items():
        ref = np.asarray(ref_value)
        got = staged.get(name)
        if got is None or np.shape(got) != ref.shape:
            return 0.0
        cand = np.asarray(got)
        if ref.dtype.kind not in "biuf" or cand.dtype.kind not in "biuf":
            scores.append(1.0 if np.array_equal(ref, cand) else 0.0)
        elif classifier_like(ref):
            scores.append(P.top1_agreement(ref, cand))
        else:
            ok = (P.max_abs_error(ref, cand) <= ATOL
                  or P.relative_error(ref, cand) <= RTOL) if ref.size else True
            scores.append(1.0 if ok else 0.0)
    return min(scores) if scores else 0.0


def p99(values: list[float]) -> float:
    """Nearest-rank 99th percentile (0.0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


# ---- loading the staged engine --------------------------------------------------------------
def load_staged(path: Path, *, fingerprint: common_pb2.EngineFingerprint,
                signature: common_pb2.ModelSignature | None, warmup_inputs: Any = None,
                warmup_runs: int = 2) -> LoadedEngine:
    """Load the staged engine file (its sha256 was checked by the caller) and warm it up
    with the registry's smoke check, never into the registry. Raises EdgefleetError."""
    from agent.runtime.base import backend_for
    from agent.runtime.registry import smoke_check

    backend = backend_for(fingerprint.engine_kind)  # the registry's: comparable latencies
    backend.check_fingerprint(fingerprint)
    engine = backend.load(path, signature=signature)
    try:
        smoke_check(engine, expected=signature if signature and signature.outputs
                    else engine.signature, runs=warmup_runs, inputs=warmup_inputs)
    except BaseException:
        engine.close()
        raise
    return engine


# ---- the check ------------------------------------------------------------------------------
@dataclass
class ShadowStats:
    """Counters of one check (read by tests and the report's detail)."""

    mirrored: int = 0           # put in the queue
    dropped: int = 0            # sampled but the queue was full
    compared: int = 0           # run on the staged engine and compared
    staged_errors: int = 0      # staged inferences that raised (scored 0)
    agreement_sum: float = 0.0
    staged_ms: list[float] = field(default_factory=list)
    active_ms: list[float] = field(default_factory=list)
    busy_s: float = 0.0         # the shadow thread's time in staged inferences
    threads: set[str] = field(default_factory=set)   # threads that ran staged inferences
    tap_threads: set[str] = field(default_factory=set)  # threads that called the tap


class ShadowCheck:
    """One observation of a staged engine against the active one (module docstring)."""

    def __init__(self, policy: ShadowPolicy, *, registry: TapRegistry, name: str,
                 variant: str = "", load: Callable[[], LoadedEngine],
                 queue_size: int = QUEUE_SIZE, label: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.name, self.variant = name, variant
        self.label = label or name
        self.stats = ShadowStats()
        self._registry = registry
        self._load = load
        self._clock = clock
        self._queue: queue.Queue[tuple[Tensors, Tensors, float]] = queue.Queue(
            maxsize=max(1, queue_size))
        self._lock = threading.Lock()       # stats, tap registration
        self._count_lock = threading.Lock()  # the tap's counters (serving threads only)
        self._stopping = threading.Event()
        self._tapped = False                 # our tap is set on the registry (under _lock)
        self._counter = itertools.count(1)
        self._error = ""
        self._report: update_pb2.ShadowReport | None = None
        self._deadline = 0.0
        self._started = 0.0
        self._thread: threading.Thread | None = None

    # ---- lifecycle (update worker thread) ------------------------------------------------
    def start(self) -> None:
        """Start the shadow thread (it loads the staged engine, then taps the registry)."""
        self._started = self._clock()
        self._deadline = self._started + self.policy.seconds
        self._thread = threading.Thread(target=self._run, name="update-shadow", daemon=True)
        self._thread.start()

    def close(self, *, timeout_s: float = 2.0) -> None:
        """Stop mirroring and the shadow thread (waits up to ``timeout_s`` for it); the
        thread unloads the staged engine."""
        with self._lock:
            self._stopping.set()
            self._untap()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("shadow check of %s: thread still busy after %.1fs; it unloads "
                            "the staged engine when its inference returns", self.label,
                            timeout_s)

    def poll(self) -> update_pb2.ShadowReport | None:
        """The decision once there is one (then mirroring stops), else None. Never raises."""
        if self._report is not None:
            return self._report
        try:
            report = self._decide()
        except Exception as e:  # a bug in the check fails it, never serving
            log.exception("shadow check of %s failed", self.label)
            report = self._make_report(passed=False, detail=f"shadow check error: {e!r}")
        if report is not None:
            with self._lock:
                self._report = report
                self._stopping.set()  # the thread ends and unloads the staged engine
                self._untap()
        return report

    # ---- serving threads -----------------------------------------------------------------
    def tap(self, inputs: Tensors, outputs: Tensors, latency_ms: float) -> None:
        """Registry tap (serving thread): mirror one in ``100 / sample_percent`` requests;
        never waits (a full queue drops the sample)."""
        n = next(self._counter)
        pct = self.policy.sample_percent
        if self._stopping.is_set() or (n * pct) // 100 == ((n - 1) * pct) // 100:
            return
        try:
            self._queue.put_nowait((inputs, outputs, latency_ms))
            full = False
        except queue.Full:
            full = True
        st = self.stats
        with self._count_lock:
            if full:
                st.dropped += 1
            else:
                st.mirrored += 1
                if len(st.tap_threads) < 64:
                    st.tap_threads.add(threading.current_thread().name)

    # ---- the shadow thread ---------------------------------------------------------------
    def _run(self) -> None:
        from agent.runtime.priority import run_at_lower_priority

        try:
            engine = run_at_lower_priority(self._load, nice=LOAD_NICE)
        except Exception as e:  # EdgefleetError from the backend, or a bug
            why = f"{e.reason}: {e}" if isinstance(e, EdgefleetError) else repr(e)
            log.warning("shadow check of %s: staged engine did not load: %s", self.label, why)
            self._error = f"staged engine did not load: {why}"
            return
        try:
            with self._lock:
                if not self._stopping.is_set() and self._report is None:
                    self._registry.set_tap(self.name, self.tap, variant=self.variant)
                    self._tapped = True
            log.info("shadow check of %s: staged engine loaded in %.0f ms; mirroring %d%% of "
                     "requests", self.label, (self._clock() - self._started) * 1000,
                     self.policy.sample_percent)
            while not self._stopping.is_set():
                try:
                    inputs, active_out, active_ms = self._queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                busy = self._compare(engine, inputs, active_out, active_ms)
                # CPU budget: busy / (busy + pause) <= cpu_fraction of one core
                f = self.policy.cpu_fraction
                if f < 1.0 and busy > 0:
                    self._stopping.wait(busy * (1.0 - f) / f)
        except Exception as e:  # never let a shadow bug escape this thread
            log.exception("shadow check of %s: thread failed", self.label)
            self._error = f"shadow thread failed: {e!r}"
        finally:
            with self._lock:
                self._untap()
            try:
                engine.close()
            except Exception:
                log.exception("shadow check of %s: closing the staged engine failed",
                              self.label)

    def _compare(self, engine: LoadedEngine, inputs: Tensors, active_out: Tensors,
                 active_ms: float) -> float:
        """Run one mirrored request on the staged engine and record it; returns busy s."""
        started = time.perf_counter()
        try:
            staged_out = engine.infer(dict(inputs))
            staged_ms = (time.perf_counter() - started) * 1000
            score = agreement(active_out, staged_out)
            error = False
        except Exception as e:  # the staged engine failed on a real request: it disagrees
            staged_ms, score, error = 0.0, 0.0, True
            log.debug("shadow check of %s: staged inference failed: %s", self.label, e)
        busy = time.perf_counter() - started
        st = self.stats
        with self._lock:
            st.compared += 1
            st.agreement_sum += score
            st.busy_s += busy
            if error:
                st.staged_errors += 1
            else:
                st.staged_ms.append(staged_ms)
                st.active_ms.append(active_ms)
            st.threads.add(threading.current_thread().name)
        return busy

    # ---- deciding ------------------------------------------------------------------------
    def _untap(self) -> None:
        """Remove our tap once (caller holds the lock): a later check of the same model
        keeps its own. Errors are logged, never raised."""
        if not self._tapped:
            return
        self._tapped = False
        try:
            self._registry.set_tap(self.name, None, variant=self.variant)
        except Exception:
            log.exception("shadow check of %s: removing the tap failed", self.label)

    def _decide(self) -> update_pb2.ShadowReport | None:
        if self._error:
            return self._make_report(passed=False, detail=self._error)
        pol = self.policy
        with self._lock:
            n = self.stats.compared
        enough = pol.min_samples > 0 and n >= pol.min_samples
        if not enough and self._clock() < self._deadline:
            return None
        if n < pol.min_samples:
            return self._make_report(passed=False, detail=(
                f"not enough live traffic: {n} of {pol.min_samples} requests compared in "
                f"{pol.seconds:g}s ({self._counts()})"))
        return self._judge()

    def _judge(self) -> update_pb2.ShadowReport:
        pol = self.policy
        with self._lock:
            st = self.stats
            n = st.compared
            agree = st.agreement_sum / n if n else 1.0
            staged_p99, active_p99 = p99(st.staged_ms), p99(st.active_ms)
        ok_agree = agree >= pol.min_agreement - _EPS
        line = (f"agreement {agree:.4f} {'>=' if ok_agree else '<'} {pol.min_agreement:g} "
                f"over {n} requests")
        ok_latency = True
        if pol.max_latency_ratio > 0 and active_p99 > 0 and n:
            ratio = staged_p99 / active_p99
            ok_latency = ratio <= pol.max_latency_ratio + _EPS
            line += (f"; p99 staged {staged_p99:.3f} ms / active {active_p99:.3f} ms = "
                     f"{ratio:.2f} {'<=' if ok_latency else '>'} {pol.max_latency_ratio:g}")
        else:
            line += (f"; p99 staged {staged_p99:.3f} ms, active {active_p99:.3f} ms "
                     f"(latency not checked)")
        return self._make_report(passed=ok_agree and ok_latency,
                                 detail=f"{line} ({self._counts()})", agree=agree,
                                 staged_p99=staged_p99, active_p99=active_p99)

    def _counts(self) -> str:
        st = self.stats
        return (f"{st.mirrored} mirrored, {st.dropped} dropped (queue full), "
                f"{st.staged_errors} staged errors")

    def _make_report(self, *, passed: bool, detail: str, agree: float = 0.0,
                     staged_p99: float = 0.0, active_p99: float = 0.0
                     ) -> update_pb2.ShadowReport:
        with self._lock:
            n = self.stats.compared
            if not agree and n and self.stats.agreement_sum:
                agree = self.stats.agreement_sum / n
        (log.info if passed else log.warning)("shadow check of %s: %s -> %s", self.label,
                                              detail, "passed" if passed else "FAILED")
        return update_pb2.ShadowReport(samples=n, agreement=agree, staged_p99_ms=staged_p99,
                                       active_p99_ms=active_p99, passed=passed, detail=detail,
                                       at_ms=int(time.time() * 1000))


# ---- the gate (update worker thread) ----------------------------------------------------
class ShadowGate:
    """The shadow checks under way, one per model key, for the update manager (worker
    thread only): :meth:`pending` before an activation, :meth:`decided` on ticks."""

    def __init__(self, *, registry: TapRegistry, slots: SlotStore,
                 loaded: Callable[[str], SlotInfo | None]) -> None:
        self._registry = registry
        self._slots = slots
        self._loaded = loaded
        self._checks: dict[str, tuple[ShadowCheck, VerifiedUpdate]] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._checks

    def check(self, key: str) -> ShadowCheck | None:
        """The check under way for ``key`` (tests, diagnostics)."""
        entry = self._checks.get(key)
        return entry[0] if entry else None

    def pending(self, key: str, rec: UpdateRecord, vu: VerifiedUpdate) -> bool:
        """Start (or keep) the check that gates the activation of ``rec``; False when there
        is none to run: not asked for, already passed, no active engine to compare with
        (first install), the same engine, or no usable staged engine (the activation then
        says why)."""
        m = vu.manifest
        if not wanted(m) or (rec.shadow is not None and rec.shadow.passed):
            return False
        if key in self._checks:
            return True
        active = self._loaded(key)
        if active is None:
            log.info("update %s: shadow check skipped: %s serves no engine to compare with "
                     "(first install)", rec.update_id, key)
            return False
        info = self._slots.read_meta(key, rec.staged_slot)
        if info is None or info.sha256 != m.target_sha256 or info.sha256 == active.sha256:
            log.info("update %s: shadow check skipped: %s", rec.update_id,
                     "the staged engine is the one serving" if info is not None
                     and info.sha256 == active.sha256 else "no staged engine to load")
            return False
        if not self._slots.check(info):
            return False
        from agent.update.report import warmup_inputs

        check = ShadowCheck(ShadowPolicy.from_spec(m.shadow), registry=self._registry,
                            name=info.name, variant=info.variant,
                            label=f"update {rec.update_id}",
                            load=partial(load_staged, self._slots.engine_path(info),
                                         fingerprint=info.fingerprint,
                                         signature=info.signature,
                                         warmup_inputs=warmup_inputs(m)))
        log.info("update %s: shadow check of v%d against v%d for up to %ds", rec.update_id,
                 info.version, active.version, m.shadow.seconds)
        check.start()
        self._checks[key] = (check, vu)
        return True

    def decided(self) -> list[tuple[str, VerifiedUpdate, update_pb2.ShadowReport]]:
        """Checks that decided since the last call, closed and forgotten: (key, update,
        report)."""
        out = []
        for key, (check, vu) in list(self._checks.items()):
            report = check.poll()
            if report is not None:
                self.drop(key)
                out.append((key, vu, report))
        return out

    def drop(self, key: str) -> None:
        """Stop the check of ``key`` (its update finished another way, or it decided)."""
        entry = self._checks.pop(key, None)
        if entry is not None:
            entry[0].close()

    def close(self) -> None:
        for key in list(self._checks):
            self.drop(key)
