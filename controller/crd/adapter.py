"""Adapter from async reconcile functions (controller.reconcile) to the sync ``Reconciler``.

``ClusterSource`` runs its worker in a thread; the controller's reconcile functions are
coroutines that run on the process's asyncio loop (DB, MQTT publisher). ``LoopReconciler``
submits each call to that loop and waits for the status. Wired by the cluster-mode command:

    rec = LoopReconciler(loop, reconcilers={"EdgeModel": lambda o: reconcile_model(o, mctx),
                                            "EdgeRollout": lambda o: reconcile_rollout(o, rctx)})
    ClusterSource(api_client, rec, elector=LeaderElector(api_client, identity=pod)).start()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from typing import Any

from protos.errors import RetryLater

from .status import condition

AsyncReconcile = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
AsyncFinalize = Callable[[dict[str, Any]], Awaitable[None]]


class LoopReconciler:
    """Runs async reconcile/finalize functions per kind on ``loop``; kinds without one are
    accepted as-is (Ready) — DeviceClasses are read by the model reconciler when needed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *,
                 reconcilers: dict[str, AsyncReconcile],
                 finalizers: dict[str, AsyncFinalize] | None = None,
                 timeout_s: float = 3600.0) -> None:
        self.loop = loop
        self.reconcilers = reconcilers
        self.finalizers = finalizers or {}
        self.timeout_s = timeout_s

    def _run(self, coro: Awaitable[Any]) -> Any:
        async def wrap() -> Any:
            return await coro
        fut = asyncio.run_coroutine_threadsafe(wrap(), self.loop)
        try:
            return fut.result(self.timeout_s)
        except concurrent.futures.TimeoutError as e:
            fut.cancel()
            raise RetryLater(f"reconcile took over {self.timeout_s}s") from e

    def reconcile(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        fn = self.reconcilers.get(kind)
        if fn is None:
            return {"phase": "Ready", "conditions": [condition("Ready", True, "Accepted")]}
        return dict(self._run(fn(obj)))

    def finalize(self, kind: str, obj: dict[str, Any]) -> None:
        fn = self.finalizers.get(kind)
        if fn is not None:
            self._run(fn(obj))
