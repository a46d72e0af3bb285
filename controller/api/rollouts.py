"""HTTP route for the rollout verbs: ``POST /api/v1/namespaces/{ns}/edgerollouts/{name}/actions/{verb}``.

Included by controller/api/app.py ``create_app`` (``app.include_router(router)``); called by
``edgefleet rollout pause|resume|abort|retry|undo`` (controller/cli_rollout.py). ``verb`` is
one of controller.reconcile.verbs.VERBS; the optional JSON body is ``{"toVersion": N}``
(undo only). The spec change is computed by ``controller.reconcile.verbs.apply_verb`` and
stored through the same path as ``POST /api/v1/apply`` (schema validation, generation bump
on a spec change, reconcile kick); then an Event (RolloutPaused, RolloutResumed,
RolloutAborted, RolloutRetried, RolloutUndone) is written. A verb that changes nothing
(pause on a paused rollout, undo to the version already in spec.rollbackTo) answers 200
with ``action: unchanged`` and writes nothing.

Answers: 404 for a missing rollout; 422 with a message for an unknown verb, a bad body or
an undo with no earlier version; 413 past MAX_ACTION_BODY_BYTES. No user authentication,
like ``/api/v1/apply`` (docs/security.md). In cluster mode (the core has a watch-cache
``resources`` reader, controller/cluster.py) the resources live in Kubernetes and this API
does not write them (Kubernetes RBAC decides who may change a rollout, not this
unauthenticated API): the route answers 409 with the ``kubectl patch`` command that makes
the same change.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request

from controller.api import queries
from controller.api.core_access import _db_engine, call_apply
from controller.fleet.db import session_scope
from controller.fleet.models import Event
from controller.reconcile.verbs import VerbResult, apply_verb, kubectl_patch_command
from protos.errors import GiveUp, Rejected

API = "/api/v1"
API_VERSION = "edgefleet.io/v1alpha1"
MAX_ACTION_BODY_BYTES = 16 * 1024
BODY_FIELDS = {"toVersion"}

router = APIRouter()


def _read(core: Any, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    """One resource from the watch cache (cluster mode) or the core's Resource table."""
    resources = queries.resources_of(core)
    if resources is not None:
        return resources.get(kind, namespace, name)
    get = getattr(core, "get", None)
    if not callable(get):
        raise GiveUp("this controller cannot read resources", reason="no_resources")
    found: dict[str, Any] | None = get(kind, namespace, name)
    return found


def _model_version(core: Any, rollout: dict[str, Any], namespace: str) -> int | None:
    model = (rollout.get("spec") or {}).get("model")
    if not isinstance(model, str) or not model:
        return None
    em = _read(core, "EdgeModel", namespace, model) or {}
    v = (em.get("spec") or {}).get("version")
    return v if isinstance(v, int) and not isinstance(v, bool) else None


async def _body(request: Request) -> dict[str, Any]:
    from controller.api.app import read_limited

    raw = await read_limited(request, limit_bytes=MAX_ACTION_BODY_BYTES)
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Rejected(f"request body is not JSON: {e}", reason="bad_body") from e
    if not isinstance(data, dict):
        raise Rejected("request body must be a JSON object", reason="bad_body")
    unknown = sorted(set(data) - BODY_FIELDS)
    if unknown:
        raise Rejected(f"unknown field(s) {', '.join(unknown)} in the request body "
                       f"(allowed: {', '.join(sorted(BODY_FIELDS))})", reason="bad_body")
    return data


async def _store(core: Any, rollout: dict[str, Any], result: VerbResult) -> dict[str, Any]:
    """Apply the new spec like ``POST /api/v1/apply`` does; write the Event if it changed."""
    from controller.api.app import validate_documents

    md = rollout.get("metadata") or {}
    doc = {"apiVersion": API_VERSION, "kind": "EdgeRollout",
           "metadata": {"name": result.name, "namespace": result.namespace,
                        "labels": dict(md.get("labels") or {})},
           "spec": result.spec}
    applied = (await call_apply(core, validate_documents([doc])))[0]
    action = str(applied.get("action") or "configured")
    if action != "unchanged":
        with session_scope(_db_engine(core)) as s:
            s.add(Event(at_ms=int(time.time() * 1000), kind="EdgeRollout", name=result.key,
                        type="Normal", reason=result.reason, message=result.message[:2000]))
    return {"action": action, "generation": applied.get("generation")}


@router.post(f"{API}/namespaces/{{namespace}}/edgerollouts/{{name}}/actions/{{verb}}")
async def rollout_action(namespace: str, name: str, verb: str,
                         request: Request) -> dict[str, Any]:
    """Run one verb on EdgeRollout ``namespace/name``; see the module docstring."""
    core = request.app.state.core
    body = await _body(request)
    rollout = _read(core, "EdgeRollout", namespace, name)
    if rollout is None:
        raise HTTPException(404, f"EdgeRollout {namespace}/{name} not found")
    result = apply_verb(rollout, verb, to_version=body.get("toVersion"),
                        model_version=_model_version(core, rollout, namespace))
    out: dict[str, Any] = {"kind": "EdgeRollout", "namespace": namespace, "name": name,
                           "verb": verb, "reason": result.reason, "message": result.message,
                           "patch": result.patch, "spec": result.spec}
    if not result.changed:
        return {**out, "action": "unchanged",
                "generation": (rollout.get("metadata") or {}).get("generation")}
    if queries.resources_of(core) is not None:
        raise GiveUp(f"cluster mode: EdgeRollout {namespace}/{name} lives in Kubernetes and "
                     "this API does not change it; run: " + kubectl_patch_command(result),
                     reason="cluster_mode")
    return {**out, **await _store(core, rollout, result)}
