"""Status writer for custom resources: conditions by Kubernetes convention, 409 retries, Events.

``merge_status`` turns what a reconciler returned into the status to store: it stamps
``observedGeneration``, keeps ``lastTransitionTime`` of conditions whose status did not change,
and reports which conditions changed. ``StatusWriter.write`` PUTs ``/status`` with the
object's resourceVersion; on 409 it re-reads the object and retries while the generation is
unchanged (a newer generation is reconciled afresh instead). ``StatusWriter.event`` records a
core/v1 Event. Called by ``controller.crd.source``.
"""

from __future__ import annotations

import datetime
import logging
import uuid
from collections.abc import Callable
from typing import Any

from protos.errors import RetryLater

from .schema import GROUP, VERSION, CrdInfo

log = logging.getLogger(__name__)

CONDITION_TYPES = ("Ready", "Compiled", "Progressing", "Degraded")
MAX_CONFLICT_RETRIES = 5


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, status: bool | str, reason: str, message: str = "") -> dict[str, Any]:
    """A condition dict; ``status`` True/False or "Unknown"."""
    s = status if isinstance(status, str) else ("True" if status else "False")
    return {"type": type_, "status": s, "reason": reason, "message": message}


def merge_status(
    old: dict[str, Any] | None, new: dict[str, Any], *, generation: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The status to store, and the conditions whose status or reason changed."""
    old = old or {}
    out = dict(new)
    out["observedGeneration"] = generation
    before = {c.get("type"): c for c in old.get("conditions") or []}
    merged, changed = [], []
    stamp = now_rfc3339()
    for c in new.get("conditions") or []:
        c = dict(c)
        prev = before.get(c["type"])
        if prev is not None and prev.get("status") == c["status"]:
            c["lastTransitionTime"] = prev.get("lastTransitionTime") or stamp
        else:
            c["lastTransitionTime"] = stamp
        if prev is None or (prev.get("status"), prev.get("reason")) != (c["status"], c.get("reason")):
            changed.append(c)
        c["observedGeneration"] = generation
        merged.append(c)
    if merged:
        out["conditions"] = merged
    elif "conditions" in old:
        out["conditions"] = old["conditions"]
    return out, changed


def same_status(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Equal apart from condition timestamps (so an unchanged status is not rewritten)."""
    def strip(s: dict[str, Any] | None) -> dict[str, Any]:
        s = dict(s or {})
        s["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                           for c in s.get("conditions") or []]
        return s
    return strip(a) == strip(b)


class StatusWriter:
    """Writes ``/status`` of edgefleet resources and records Events, through the official client."""

    def __init__(self, api_client: Any, *, component: str = "edgefleet-controller",
                 is_leader: Callable[[], bool] = lambda: True) -> None:
        from kubernetes import client

        self.custom: Any = client.CustomObjectsApi(api_client)
        self.core: Any = client.CoreV1Api(api_client)
        self.component = component
        self.is_leader = is_leader
        self.conflicts = 0  # 409s seen (for tests and metrics)

    def read(self, info: CrdInfo, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        if info.namespaced:
            return dict(self.custom.get_namespaced_custom_object(
                GROUP, VERSION, meta["namespace"], info.plural, meta["name"]))
        return dict(self.custom.get_cluster_custom_object(GROUP, VERSION, info.plural, meta["name"]))

    def replace(self, info: CrdInfo, obj: dict[str, Any], *, status: bool) -> dict[str, Any]:
        meta = obj["metadata"]
        if info.namespaced:
            fn = (self.custom.replace_namespaced_custom_object_status if status
                  else self.custom.replace_namespaced_custom_object)
            return dict(fn(GROUP, VERSION, meta["namespace"], info.plural, meta["name"], obj))
        fn = (self.custom.replace_cluster_custom_object_status if status
              else self.custom.replace_cluster_custom_object)
        return dict(fn(GROUP, VERSION, info.plural, meta["name"], obj))

    def write(self, info: CrdInfo, obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any] | None:
        """PUT the status; retry 409s while the generation is unchanged.

        Returns the stored object, or None when the object is gone or changed generation
        (the caller reconciles the newer object instead). Raises RetryLater when not leader.
        """
        from kubernetes.client.exceptions import ApiException

        body = dict(obj)
        generation = obj["metadata"].get("generation")
        for _ in range(MAX_CONFLICT_RETRIES):
            if not self.is_leader():
                raise RetryLater("not the leader any more: status not written", reason="not_leader")
            body["status"] = status
            try:
                return self.replace(info, body, status=True)
            except ApiException as e:
                if e.status == 404:
                    return None
                if e.status != 409:
                    raise RetryLater(f"status write failed: {e.status} {e.reason}") from e
                self.conflicts += 1
                log.info("409 writing status of %s %s; re-reading", info.kind,
                         obj["metadata"]["name"])
                try:
                    body = self.read(info, obj)
                except ApiException as e2:
                    if e2.status == 404:
                        return None
                    raise RetryLater(f"re-read failed: {e2.status}") from e2
                if body["metadata"].get("generation") != generation:
                    return None
        raise RetryLater(f"status of {info.kind} {obj['metadata']['name']}: too many conflicts")

    def event(self, info: CrdInfo, obj: dict[str, Any], *, type_: str, reason: str,
              message: str) -> None:
        """Record a core/v1 Event about ``obj`` (best effort: failures are logged only)."""
        from kubernetes.client.exceptions import ApiException

        meta = obj["metadata"]
        ns = meta.get("namespace") or "default"
        stamp = now_rfc3339()
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": ns},
            "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": info.kind,
                               "name": meta["name"], "namespace": meta.get("namespace"),
                               "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": self.component},
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
            "reportingComponent": self.component,
        }
        try:
            self.core.create_namespaced_event(ns, body)
        except ApiException as e:
            log.warning("could not record event %s on %s %s: %s", reason, info.kind,
                        meta["name"], e.status)
