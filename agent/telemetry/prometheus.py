"""Prometheus text exposition (format 0.0.4) of the agent's metrics, written by hand so the
agent does not need prometheus-client. Served at ``GET /metrics`` by :mod:`agent.serve`.

Same numbers as the ``Metrics`` message sent over MQTT (:mod:`agent.telemetry.metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from protos.edgefleet.v1.device_pb2 import ModelMetrics

if TYPE_CHECKING:
    from agent.telemetry.metrics import MetricsCollector


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _per_model(lines: list[str], models: list[ModelMetrics], name: str, kind: str,
               help_text: str, value: Callable[[ModelMetrics], int]) -> None:
    """One metric family with a sample per model version."""
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for m in models:
        lines.append(f'{name}{{model="{_label(m.name)}",version="{m.version}"}} {value(m)}')


def render(collector: MetricsCollector) -> str:
    """The whole exposition text for ``collector`` (models, then host readings)."""
    lines: list[str] = []
    models = collector.model_metrics()
    _per_model(lines, models, "edgefleet_requests_total", "counter",
               "Inference requests per model version.", lambda m: m.requests)
    _per_model(lines, models, "edgefleet_request_errors_total", "counter",
               "Failed inference requests.", lambda m: m.errors)
    lines += ["# HELP edgefleet_request_latency_seconds Server-side inference request latency.",
              "# TYPE edgefleet_request_latency_seconds histogram"]
    for m in models:
        labels = f'model="{_label(m.name)}",version="{m.version}"'
        cumulative = 0
        bounds = [*list(m.latency.bounds_ms), math.inf]
        for bound, count in zip(bounds, m.latency.counts, strict=False):
            cumulative += count
            le = "+Inf" if math.isinf(bound) else _num(bound / 1000.0)
            lines.append(f'edgefleet_request_latency_seconds_bucket{{{labels},le="{le}"}} '
                         f'{cumulative}')
        lines.append(f"edgefleet_request_latency_seconds_sum{{{labels}}} "
                     f"{_num(m.latency.sum_ms / 1000.0)}")
        lines.append(f"edgefleet_request_latency_seconds_count{{{labels}}} {cumulative}")
    _per_model(lines, models, "edgefleet_queue_depth", "gauge",
               "Requests waiting for a concurrency slot.", lambda m: m.queue_depth)
    lines += ["# HELP edgefleet_batch_size_total Executions per batch size.",
              "# TYPE edgefleet_batch_size_total counter"]
    for m in models:
        for size, count in enumerate(m.batch_size_counts):
            if count:
                lines.append(f'edgefleet_batch_size_total{{model="{_label(m.name)}",'
                             f'version="{m.version}",size="{size}"}} {count}')
    if collector.host is not None:
        host = collector.host.read()
        if host.HasField("cpu_percent"):
            lines += ["# TYPE edgefleet_host_cpu_percent gauge",
                      f"edgefleet_host_cpu_percent {_num(host.cpu_percent)}"]
        if host.HasField("agent_rss_bytes"):
            lines += ["# TYPE edgefleet_agent_rss_bytes gauge",
                      f"edgefleet_agent_rss_bytes {host.agent_rss_bytes}"]
        if host.HasField("memory_available_bytes"):
            lines += ["# TYPE edgefleet_host_memory_available_bytes gauge",
                      f"edgefleet_host_memory_available_bytes {host.memory_available_bytes}"]
        if host.HasField("accelerator_load_percent"):
            lines += ["# TYPE edgefleet_accelerator_load_percent gauge",
                      f"edgefleet_accelerator_load_percent {_num(host.accelerator_load_percent)}"]
        if host.temperatures:
            lines.append("# TYPE edgefleet_temperature_celsius gauge")
            for t in host.temperatures:
                lines.append(f'edgefleet_temperature_celsius{{zone="{_label(t.zone)}"}} '
                             f"{_num(t.celsius)}")
    return "\n".join(lines) + "\n"
