"""The agent's local inference API: KServe v2 / Open Inference Protocol over HTTP/1.1.

The agent app calls :func:`start_server` once at start-up with its
:class:`agent.runtime.registry.ModelRegistry`; tests and benchmarks do the same. Routing and
tensor (de)serialisation are in :mod:`agent.serve.oip`, the HTTP layer in
:mod:`agent.serve.http`. ``GET /metrics`` serves the Prometheus text exposition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent.runtime.registry import ModelRegistry
from agent.serve.http import HttpServer
from agent.serve.oip import OipApp
from agent.telemetry.metrics import MetricsCollector
from agent.telemetry.prometheus import render as render_prometheus

__all__ = ["ServerHandle", "start_server"]


@dataclass
class ServerHandle:
    """A running server. ``url`` is ``http://host:port``; ``stop()`` closes every
    connection and the listening socket."""

    host: str
    port: int
    _server: HttpServer

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        self._server.stop()


def start_server(registry: ModelRegistry, *, host: str = "127.0.0.1", port: int = 0,
                 metrics: MetricsCollector | None = None, max_request_bytes: int = 64 << 20,
                 max_connections: int = 64, idle_timeout_s: float = 60.0,
                 ready: Callable[[], bool] | None = None) -> ServerHandle:
    """Serve ``registry`` on ``host:port`` (0 = a free port) in background threads.

    ``metrics`` feeds ``GET /metrics`` (default: a collector over ``registry`` without host
    readings); ``max_request_bytes`` bounds request bodies (413 above);
    ``max_connections`` bounds concurrent keep-alive connections (503 above)."""
    collector = metrics or MetricsCollector(registry)
    app = OipApp(registry, metrics_text=lambda: render_prometheus(collector), ready=ready)
    server = HttpServer(app, host=host, port=port, max_request_bytes=max_request_bytes,
                        max_connections=max_connections, idle_timeout_s=idle_timeout_s)
    server.start()
    return ServerHandle(host=host, port=server.port, _server=server)
