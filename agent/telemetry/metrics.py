"""Serving metrics of the agent: per model+version request counts, errors, a fixed-bucket
latency histogram, queue depth and batch sizes; and the ``Metrics`` message built from them.

``ServingStats`` is owned by the registry (``ModelRegistry.stats``) and fed by the inference
server (:mod:`agent.serve`) on every request. ``MetricsCollector`` is called by the Prometheus
endpoint (:mod:`agent.telemetry.prometheus`) and by ``MetricsPublisher`` (here), whose
``tick()`` the agent app calls every metrics interval: older buffered messages first
(:class:`agent.telemetry.buffer.OfflineBuffer`), then the new one; what cannot be sent is
buffered with ``Metrics.buffered = True``.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from protos.edgefleet.v1.device_pb2 import LatencyHistogram, Metrics, ModelMetrics

if TYPE_CHECKING:
    from agent.runtime.registry import ModelRegistry
    from agent.telemetry.buffer import OfflineBuffer
    from agent.telemetry.host import HostReader

log = logging.getLogger(__name__)

#: upper bounds of the latency histogram, in milliseconds (last bucket is +Inf)
LATENCY_BOUNDS_MS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0,
                                        250.0, 500.0, 1000.0, 2500.0, 5000.0)
MAX_BATCH_SIZE_TRACKED = 64


@dataclass
class ModelStats:
    """Cumulative counters for one (model, version)."""

    requests: int = 0
    errors: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_MS) + 1))
    latency_sum_ms: float = 0.0
    batch_size_counts: list[int] = field(default_factory=list)


class ServingStats:
    """Thread-safe counters the server records into; cheap enough for every request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple[str, int], ModelStats] = {}

    def record(self, name: str, version: int, latency_s: float, *, ok: bool,
               batch_size: int = 1) -> None:
        ms = latency_s * 1000.0
        bucket = bisect.bisect_left(LATENCY_BOUNDS_MS, ms)
        with self._lock:
            stats = self._models.get((name, version))
            if stats is None:
                stats = self._models[(name, version)] = ModelStats()
            stats.requests += 1
            if not ok:
                stats.errors += 1
            stats.latency_counts[bucket] += 1
            stats.latency_sum_ms += ms
            if 0 < batch_size <= MAX_BATCH_SIZE_TRACKED:
                counts = stats.batch_size_counts
                if len(counts) <= batch_size:
                    counts.extend([0] * (batch_size + 1 - len(counts)))
                counts[batch_size] += 1

    def snapshot(self) -> dict[tuple[str, int], ModelStats]:
        """A copy of every model's counters."""
        with self._lock:
            return {k: ModelStats(requests=v.requests, errors=v.errors,
                                  latency_counts=list(v.latency_counts),
                                  latency_sum_ms=v.latency_sum_ms,
                                  batch_size_counts=list(v.batch_size_counts))
                    for k, v in self._models.items()}


class MetricsCollector:
    """Builds ``Metrics`` messages from the registry's serving stats and host readings."""

    def __init__(self, registry: ModelRegistry, *, host: HostReader | None = None) -> None:
        self.registry = registry
        self.host = host
        self._seq = 0
        self._lock = threading.Lock()

    def model_metrics(self) -> list[ModelMetrics]:
        out = []
        stats = self.registry.stats.snapshot()
        for info in self.registry.served():  # loaded models appear before their first request
            stats.setdefault((info.name, info.version), ModelStats())
        for (name, version), s in sorted(stats.items()):
            out.append(ModelMetrics(
                name=name, version=version, requests=s.requests, errors=s.errors,
                latency=LatencyHistogram(bounds_ms=list(LATENCY_BOUNDS_MS),
                                         counts=s.latency_counts, sum_ms=s.latency_sum_ms),
                queue_depth=self.registry.queue_depth(name),
                batch_size_counts=s.batch_size_counts))
        return out

    def snapshot(self, device_id: str) -> Metrics:
        """One ``Metrics`` message (seq increases per call) with models and host readings."""
        with self._lock:
            self._seq += 1
            seq = self._seq
        msg = Metrics(device_id=device_id, at_ms=int(time.time() * 1000), seq=seq,
                      models=self.model_metrics())
        if self.host is not None:
            msg.host.CopyFrom(self.host.read())
        return msg


@dataclass(frozen=True)
class TickResult:
    sent: int            # messages published this tick (buffered ones included)
    buffered: bool       # the current snapshot went to the buffer
    backlog: int         # records still in the buffer


class MetricsPublisher:
    """Sends a ``Metrics`` snapshot every tick, buffering while the link is down."""

    def __init__(self, collector: MetricsCollector, buffer: OfflineBuffer,
                 publish: Callable[[bytes], bool], *, device_id: str) -> None:
        self.collector = collector
        self.buffer = buffer
        self.publish = publish
        self.device_id = device_id

    def _send(self, payload: bytes) -> bool:
        try:
            return bool(self.publish(payload))
        except Exception:
            log.exception("metrics publish failed device=%s", self.device_id)
            return False

    def tick(self) -> TickResult:
        msg = self.collector.snapshot(self.device_id)
        sent = self.buffer.drain(self._send) if len(self.buffer) else 0
        if not len(self.buffer) and self._send(msg.SerializeToString()):
            return TickResult(sent=sent + 1, buffered=False, backlog=0)
        msg.buffered = True
        self.buffer.append(msg.SerializeToString())
        return TickResult(sent=sent, buffered=True, backlog=len(self.buffer))
