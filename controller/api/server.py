"""The API/dashboard HTTP server: uvicorn on a socket bound before it starts.

Binding first makes the port known (``port=0`` picks a free one) and a busy port a clear
GiveUp instead of a uvicorn exit. Signals stay with the caller's runner. Used by
controller.embedded (``edgefleet up``) and controller.cluster (in-cluster controller).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator
from typing import Any

import uvicorn

from protos.errors import GiveUp


class _QuietServer(uvicorn.Server):
    """uvicorn server that leaves signal handling to the runner that owns the loop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening, non-blocking socket on ``host:port``; GiveUp(port_busy) if it is taken."""
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP;
    # without it every kept-alive response waited ~40 ms for the client's delayed ACK
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise GiveUp(f"cannot listen on {host}:{port} for the API/dashboard: {e} "
                     "(use --port to pick another)", reason="port_busy") from e
    sock.listen(128)
    sock.setblocking(False)
    return sock


class ApiServer:
    """One uvicorn server on a pre-bound socket: ``ApiServer(host, port)``, start, stop."""

    def __init__(self, host: str, port: int) -> None:
        self._sock: socket.socket | None = bind(host, port)
        self.port = int(self._sock.getsockname()[1])
        self._server: _QuietServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, app: Any) -> None:
        """Serve ``app``; returns once uvicorn accepts connections (raises if it died)."""
        assert self._sock is not None, "ApiServer was stopped"
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("API server stopped during start")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Ask uvicorn to exit (waiting up to 10 s) and close the socket; safe to repeat."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)
            self._server = self._task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
