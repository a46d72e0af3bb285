"""Optional dynamic batching per model: concurrent requests whose inputs have the same shape
except the first (batch) dimension are run as one inference, and the outputs are split back.

Configured with :meth:`agent.runtime.registry.ModelRegistry.configure_batching`, which creates
one :class:`DynamicBatcher` per loaded engine of that model; the inference server reaches it
through ``EngineLease.infer`` (:mod:`agent.serve.oip`). No thread of its own: the first request
of a batch (the leader) waits up to ``max_queue_delay_ms`` for others (or until
``max_batch_size`` rows are queued), runs the batch in its own thread and hands every
follower its slice of the outputs.

Only models whose inputs and outputs all have a dynamic first dimension can be batched
(:func:`check_batchable` says why not, as ``Rejected(reason="batching_unsupported")``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from agent.runtime.base import LoadedEngine
from protos.edgefleet.v1.common_pb2 import ModelSignature
from protos.errors import Rejected

log = logging.getLogger(__name__)

#: upper bounds accepted by :class:`BatchingConfig` (a typo must not make requests wait minutes)
MAX_BATCH_SIZE_LIMIT = 1024
MAX_QUEUE_DELAY_MS_LIMIT = 1000.0


@dataclass(frozen=True)
class BatchingConfig:
    """``max_batch_size``: most rows per inference; ``max_queue_delay_ms``: how long the first
    request of a batch waits for others."""

    max_batch_size: int
    max_queue_delay_ms: float

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch_size <= MAX_BATCH_SIZE_LIMIT:
            raise ValueError(f"max_batch_size must be in 1..{MAX_BATCH_SIZE_LIMIT}, "
                             f"got {self.max_batch_size}")
        if not 0.0 <= self.max_queue_delay_ms <= MAX_QUEUE_DELAY_MS_LIMIT:
            raise ValueError(f"max_queue_delay_ms must be in 0..{MAX_QUEUE_DELAY_MS_LIMIT:g}, "
                             f"got {self.max_queue_delay_ms}")


def check_batchable(signature: ModelSignature, *, model: str) -> None:
    """Raise ``Rejected(reason="batching_unsupported")`` unless every input and output has a
    dynamic (-1) first dimension."""
    static = [f"{kind} {t.name} {list(t.shape)}"
              for kind, tensors in (("input", signature.inputs), ("output", signature.outputs))
              for t in tensors if not t.shape or t.shape[0] >= 0]
    if not signature.inputs or static:
        raise Rejected(f"model {model!r} cannot be batched: dynamic batching needs a dynamic "
                       f"first (batch) dimension on every input and output; static: "
                       f"{', '.join(static) or 'no inputs'}", reason="batching_unsupported")


@dataclass
class _Slot:
    """One request waiting in a batch."""

    inputs: dict[str, np.ndarray]
    rows: int
    done: threading.Event = field(default_factory=threading.Event)
    outputs: dict[str, np.ndarray] | None = None
    error: BaseException | None = None
    batch_rows: int = 0


@dataclass
class _Group:
    """Requests with the same input shapes (except dim 0), collected by the leader."""

    key: tuple[object, ...]
    slots: list[_Slot]
    rows: int
    closed: bool = False
    full: threading.Event = field(default_factory=threading.Event)


class DynamicBatcher:
    """Coalesces concurrent ``infer`` calls on one engine. Thread-safe."""

    def __init__(self, engine: LoadedEngine, config: BatchingConfig) -> None:
        self.engine = engine
        self.config = config
        self._lock = threading.Lock()
        self._open: dict[tuple[object, ...], _Group] = {}

    def infer(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """Outputs for ``inputs`` and the rows of the inference this call ran: 0 when it
        joined another request's batch (so that counting per call counts executions)."""
        rows = _rows(inputs)
        max_rows = self.config.max_batch_size
        if rows is None or rows >= max_rows or max_rows <= 1:
            return self.engine.infer(inputs), rows or 1
        key = tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()))
        slot = _Slot(inputs, rows)
        with self._lock:
            group = self._open.get(key)
            if group is not None and group.rows + rows <= max_rows:
                group.slots.append(slot)
                group.rows += rows
                if group.rows >= max_rows:
                    self._close(group)
                leader = False
            else:
                if group is not None:  # would overflow: send it off, start a new one
                    self._close(group)
                group = _Group(key, [slot], rows)
                self._open[key] = group
                leader = True
        if not leader:
            slot.done.wait()
            if slot.error is not None:
                raise slot.error
            assert slot.outputs is not None
            return slot.outputs, 0
        group.full.wait(self.config.max_queue_delay_ms / 1000.0)
        with self._lock:
            self._close(group)
        self._run(group)
        if slot.error is not None:
            raise slot.error
        assert slot.outputs is not None
        return slot.outputs, slot.batch_rows

    def _close(self, group: _Group) -> None:
        """Caller holds the lock: no more requests join ``group``; its leader runs it."""
        if not group.closed:
            group.closed = True
            if self._open.get(group.key) is group:
                del self._open[group.key]
            group.full.set()

    def _run(self, group: _Group) -> None:
        slots = group.slots
        try:
            if len(slots) == 1:
                slots[0].outputs = self.engine.infer(slots[0].inputs)
                slots[0].batch_rows = slots[0].rows
                return
            names = list(slots[0].inputs)
            batch = {n: np.concatenate([s.inputs[n] for s in slots], axis=0) for n in names}
            outputs = self.engine.infer(batch)
            if any(np.ndim(v) == 0 or np.shape(v)[0] != group.rows for v in outputs.values()):
                # the model is not row-aligned after all: answer each request on its own
                log.warning("batched outputs do not have %d rows; running %d requests one by "
                            "one", group.rows, len(slots))
                for s in slots:
                    s.outputs, s.batch_rows = self.engine.infer(s.inputs), s.rows
                return
            start = 0
            for s in slots:
                s.outputs = {n: v[start:start + s.rows] for n, v in outputs.items()}
                s.batch_rows = group.rows
                start += s.rows
        except BaseException as e:  # every request of the batch gets the error
            for s in slots:
                if s.outputs is None:
                    s.error = e
        finally:
            for s in slots:
                s.done.set()


def _rows(inputs: dict[str, np.ndarray]) -> int | None:
    """The common first dimension of ``inputs`` (None when they disagree or are scalars)."""
    rows: int | None = None
    for arr in inputs.values():
        if arr.ndim == 0 or (rows is not None and arr.shape[0] != rows):
            return None
        rows = arr.shape[0]
    return rows
