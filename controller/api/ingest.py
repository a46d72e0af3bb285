"""``GET /api/v1/ingest``: the telemetry ingest's counters, for operators and benchmarks.

What was received per topic, coalesced (heartbeats/presence replaced by a newer one of the
same device before they were written: not lost), dropped by reason, the pending backlog,
batch sizes, flush times and the ingest lag (received -> committed) p50/p99 over the last
few thousand messages, and how many silent devices the liveness sweep marked offline.
Installed by controller.api.app.create_app.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

API = "/api/v1"


def install_ingest_routes(app: FastAPI, core: Any) -> None:
    """Add the ingest stats route (404-free: a core without an ingest reports nothing)."""

    @app.get(f"{API}/ingest")
    def ingest_stats() -> dict[str, Any]:
        ingest = getattr(core, "ingest", None)
        stats = ingest.stats() if ingest is not None and hasattr(ingest, "stats") else {}
        leader = getattr(core, "leader", None)
        return {"kind": "IngestStats", **stats,
                "leader": None if leader is None else bool(leader.is_leader)}
