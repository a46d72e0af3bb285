"""Helpers shared by the reconcilers: resource fields and Kubernetes-style conditions."""

from __future__ import annotations

import datetime as _dt
from typing import Any


def meta(resource: dict[str, Any]) -> tuple[str, str, int]:
    """(namespace, name, generation) of a resource dict."""
    m = resource.get("metadata") or {}
    return (str(m.get("namespace") or "default"), str(m.get("name") or ""),
            int(m.get("generation") or 1))


def rfc3339(now_ms: int) -> str:
    return _dt.datetime.fromtimestamp(now_ms / 1000, _dt.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def condition(previous: dict[str, Any] | None, type_: str, status: bool | None, reason: str,
              message: str, *, generation: int, now_ms: int) -> dict[str, Any]:
    """A condition; keeps lastTransitionTime when the status did not change."""
    s = "Unknown" if status is None else ("True" if status else "False")
    prev = next((c for c in (previous or {}).get("conditions", []) or []
                 if isinstance(c, dict) and c.get("type") == type_), None)
    when = prev.get("lastTransitionTime") if prev and prev.get("status") == s else None
    return {"type": type_, "status": s, "reason": reason, "message": message[:32000],
            "lastTransitionTime": when or rfc3339(now_ms), "observedGeneration": generation}
