"""Optional dynamic batching per model: concurrent requests whose inputs have the same shape
except the first (batch) dimension are run as one inference, and the outputs are split back.

Configured with :meth:`agent.runtime.registry.ModelRegistry.configure_batching`, which creates
one :class:`DynamicBatcher` per loaded engine of that model; the inference server reaches it
through ``EngineLease.infer`` (:mod:`agent.serve.oip`). No thread of its own: the first request
of a batch (the leader) waits for an execution slot, and for others that are on their way (at
most ``max_queue_delay_ms``, or until ``max_batch_size`` rows are queued), runs the batch in
its own thread and hands every follower its slice of the outputs.

Only models whose inputs and outputs all have a dynamic first dimension can be batched
(:func:`check_batchable` says why not, as ``Rejected(reason="batching_unsupported")``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.runtime.base import LoadedEngine
from protos.edgefleet.v1.common_pb2 import ModelSignature
from protos.errors import Rejected

if TYPE_CHECKING:  # numpy is imported when a batch runs (engines loaded it already)
    import numpy as np

log = logging.getLogger(__name__)

#: upper bounds accepted by :class:`BatchingConfig` (a typo must not make requests wait minutes)
MAX_BATCH_SIZE_LIMIT = 1024
MAX_QUEUE_DELAY_MS_LIMIT = 1000.0


@dataclass(frozen=True)
class BatchingConfig:
    """``max_batch_size``: most rows per inference; ``max_queue_delay_ms``: how long the first
    request of a batch may wait for others that are on their way;
    ``max_concurrent_batches``: inferences of this model running at once."""

    max_batch_size: int
    max_queue_delay_ms: float
    max_concurrent_batches: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch_size <= MAX_BATCH_SIZE_LIMIT:
            raise ValueError(f"max_batch_size must be in 1..{MAX_BATCH_SIZE_LIMIT}, "
                             f"got {self.max_batch_size}")
        if not 1 <= self.max_concurrent_batches <= 64:
            raise ValueError(f"max_concurrent_batches must be in 1..64, "
                             f"got {self.max_concurrent_batches}")
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


class DynamicBatcher:
    """Coalesces concurrent ``infer`` calls on one engine. Thread-safe.

    At most ``max_concurrent_batches`` inferences run at once; requests arriving meanwhile
    queue up and leave together as the next batch when a slot frees. A batch whose slot is
    free leaves at once when no other request is on its way (``expect`` was called for it
    but it has not joined yet), when it is full, or after ``max_queue_delay_ms`` — so a lone
    client waits for nobody, and batches form from requests that really are concurrent."""

    def __init__(self, engine: LoadedEngine, config: BatchingConfig) -> None:
        self.engine = engine
        self.config = config
        self._cond = threading.Condition()
        self._open: dict[tuple[object, ...], _Group] = {}
        self._running = 0
        self._arriving = 0

    # called by the registry's leases: a request that may still join a batch
    def expect(self) -> None:
        with self._cond:
            self._arriving += 1

    def cancel(self) -> None:
        """An expected request will not come (it failed before inference)."""
        with self._cond:
            self._arriving -= 1
            self._cond.notify_all()

    def infer(self, inputs: dict[str, np.ndarray], *, expected: bool = False
              ) -> tuple[dict[str, np.ndarray], int]:
        """Outputs for ``inputs`` and the rows of the inference this call ran: 0 when it
        joined another request's batch (so that counting per call counts executions).
        ``expected``: :meth:`expect` was called for this request."""
        rows = _rows(inputs)
        max_rows = self.config.max_batch_size
        with self._cond:
            if expected:
                self._arriving -= 1
            if not self._open and self._arriving <= 0 \
                    and self._running < self.config.max_concurrent_batches:
                self._running += 1  # fast path: nobody to wait for, nobody to join
                direct = True
            else:
                direct = False
        if direct:
            try:
                return self.engine.infer(inputs), rows or 1
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()
        slot = _Slot(inputs, rows or 1)
        key = tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()))
        with self._cond:
            group = self._open.get(key) if rows is not None else None
            if group is not None and rows is not None and group.rows + rows <= max_rows:
                group.slots.append(slot)
                group.rows += rows
                if group.rows >= max_rows:
                    self._close(group)
                self._cond.notify_all()
                leader = False
            else:
                group = _Group(key, [slot], slot.rows)
                if rows is not None and rows < max_rows:
                    self._open[key] = group  # others may join
                else:
                    group.closed = True
                leader = True
            if leader:
                self._lead(group)
        if not leader:
            slot.done.wait()
            if slot.error is not None:
                raise slot.error
            assert slot.outputs is not None
            return slot.outputs, 0
        try:
            self._run(group)
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()
        if slot.error is not None:
            raise slot.error
        assert slot.outputs is not None
        return slot.outputs, slot.batch_rows

    def _lead(self, group: _Group) -> None:
        """Caller holds the condition: wait until ``group`` may run, take a slot, close it."""
        deadline = time.monotonic() + self.config.max_queue_delay_ms / 1000.0
        limit = self.config.max_concurrent_batches
        while True:
            slot_free = self._running < limit
            if slot_free and (group.closed or self._arriving <= 0):
                break
            left = deadline - time.monotonic()
            if slot_free and left <= 0:
                break
            # no free slot: wait for one (the group keeps filling meanwhile)
            self._cond.wait(left if slot_free else None)
        self._close(group)
        self._running += 1

    def _close(self, group: _Group) -> None:
        """Caller holds the condition: no more requests join ``group``."""
        group.closed = True
        if self._open.get(group.key) is group:
            del self._open[group.key]

    def _run(self, group: _Group) -> None:
        import numpy as np

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
