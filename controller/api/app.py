"""FastAPI application of the controller: the JSON API under /api/v1, probes and the dashboard.

Built by ``create_app(core)``; served by controller/embedded.py (``edgefleet up``) with uvicorn
and by tests with httpx. Reads come straight from the fleet database (controller/api/queries.py);
writes (apply, delete, artifact upload) go through the ``ControllerCore`` so that validation,
storage and reconciling live in one place. Enrollment and bootstrap tokens are in
controller/api/enroll.py (POST /api/v1/enroll, /api/v1/tokens). Bad input answers 4xx with a
message, never a 500: invalid resources -> 422 naming the field, oversized bodies -> 413.

GET /api/v1/devices pages like a Kubernetes list: ``limit`` (1..5000) and ``continue`` (the
opaque ``metadata.continue`` of the previous page), filters done in SQL (``online``, ``stale``,
``deviceClass``, ``labelSelector``) and ``fields`` (the keys each item keeps); a bad one is a
400 naming it. Without ``limit`` it answers every device as before. GET /api/v1/fleet/summary
counts the fleet (online, offline, stale, per class, health and version) without listing it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import yaml
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response

from controller.api import queries
from controller.api.core_access import (
    call_apply,
    call_delete,
    call_upload,
    db_session,
    is_ready,
    max_apply_bytes,
    max_upload_bytes,
)
from protos.errors import EdgefleetError, GiveUp, Rejected, RetryLater

log = logging.getLogger("edgefleet.api")

API = "/api/v1"
KIND_ALIASES = {
    "edgemodel": "EdgeModel", "edgemodels": "EdgeModel", "em": "EdgeModel", "models": "EdgeModel",
    "model": "EdgeModel",
    "edgerollout": "EdgeRollout", "edgerollouts": "EdgeRollout", "er": "EdgeRollout",
    "rollouts": "EdgeRollout", "rollout": "EdgeRollout",
    "deviceclass": "DeviceClass", "deviceclasses": "DeviceClass", "dc": "DeviceClass",
}


def canonical_kind(kind: str) -> str:
    """EdgeModel / EdgeRollout / DeviceClass from a kind, plural, short name or alias."""
    if kind in queries.KINDS:
        return kind
    k = KIND_ALIASES.get(kind.lower())
    if k is None:
        raise HTTPException(404, f"unknown resource kind {kind!r}: use one of "
                                 f"{', '.join(queries.KINDS)}")
    return k


MAX_WINDOWS = 5000              # most windows one /metrics/windows answer holds
MAX_WINDOW_S = 24 * 3600        # longest ?window_s= of the live metrics


def _window_s(window_s: int) -> int:
    """``?window_s=`` within 1 s .. MAX_WINDOW_S."""
    if not 1 <= window_s <= MAX_WINDOW_S:
        raise HTTPException(422, f"window_s must be in 1..{MAX_WINDOW_S}, got {window_s}")
    return window_s


def json_response(data: Any) -> Response:
    """``data`` (plain JSON types) serialized once with the json module, as JSONResponse
    does, skipping FastAPI's jsonable_encoder walk: for the lists that grow with the fleet
    (10,000 devices) that walk cost more than the query."""
    body = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Response(body.encode("utf-8"), media_type="application/json")


def _error_status(e: EdgefleetError) -> int:
    if isinstance(e, Rejected):
        return 413 if e.reason in ("too_large", "size_limit") else 422
    if isinstance(e, RetryLater):
        return 503
    if isinstance(e, GiveUp):
        return 409
    return 400


def parse_documents(body: bytes, content_type: str) -> list[dict[str, Any]]:
    """JSON (object, list, or ``{"items": [...]}``) or YAML (one or more documents)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Rejected("request body is not UTF-8 text", reason="bad_body") from e
    try:
        if "json" in content_type:
            data: Any = json.loads(text)
            docs = data if isinstance(data, list) else (
                data["items"] if isinstance(data, dict) and isinstance(data.get("items"), list)
                and "kind" not in data else [data])
        else:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise Rejected(f"request body is not valid {'JSON' if 'json' in content_type else 'YAML'}"
                       f": {e}", reason="bad_body") from e
    flat: list[dict[str, Any]] = []
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise Rejected(f"document {i} is not a mapping", reason="invalid_resource")
        if d.get("kind") == "List" and isinstance(d.get("items"), list):
            flat.extend(x for x in d["items"] if isinstance(x, dict))
        else:
            flat.append(d)
    if not flat:
        raise Rejected("no documents in the request body", reason="invalid_resource")
    return flat


def _file_refs(doc: dict[str, Any]) -> list[tuple[str, Any]]:
    raw_spec = doc.get("spec")
    spec: dict[str, Any] = raw_spec if isinstance(raw_spec, dict) else {}
    refs: list[tuple[str, Any]] = [("spec.source", spec.get("source"))]
    raw_val = spec.get("validation")
    validation: dict[str, Any] = raw_val if isinstance(raw_val, dict) else {}
    refs.append(("spec.validation.samples", validation.get("samples")))
    for i, v in enumerate(spec.get("variants") or []):
        if isinstance(v, dict):
            refs.append((f"spec.variants[{i}].source", v.get("source")))
    return refs


def refuse_server_paths(doc: dict[str, Any]) -> None:
    """Over HTTP a ``path`` would name a file on the controller's disk: refuse it unless the
    content is pinned by sha256 (`edgefleet apply` uploads local files and pins them)."""
    if doc.get("kind") != "EdgeModel":
        return
    name = (doc.get("metadata") or {}).get("name", "")
    for where, ref in _file_refs(doc):
        if isinstance(ref, dict) and ref.get("path") and not ref.get("sha256"):
            raise Rejected(f"EdgeModel {name}: {where}.path {str(ref['path'])[:200]!r}: the "
                           "server does not read local paths; upload the file "
                           "(POST /api/v1/artifacts, or `edgefleet apply` does it) and set "
                           f"{where}.sha256", reason="invalid_resource")


def validate_documents(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Schema defaults + validation with controller.crd.schema (raises Rejected naming the field)."""
    from controller.crd import schema

    out = []
    for d in docs:
        full = schema.with_defaults(d)
        schema.validate(full)
        refuse_server_paths(full)
        out.append(full)
    return out


async def read_limited(request: Request, *, limit_bytes: int) -> bytes:
    """The request body, refusing (413) as soon as it passes ``limit_bytes``."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit_bytes:
        raise HTTPException(413, f"body of {declared} bytes is over the limit of {limit_bytes}")
    buf = bytearray()
    async for chunk in request.stream():
        buf.extend(chunk)
        if len(buf) > limit_bytes:
            raise HTTPException(413, f"body is over the limit of {limit_bytes} bytes")
    return bytes(buf)


def create_app(core: Any) -> FastAPI:
    """The controller's FastAPI app bound to one ControllerCore (or anything with its shape)."""
    app = FastAPI(title="edgefleet controller", version="v1alpha1")
    app.state.core = core

    @app.exception_handler(EdgefleetError)
    async def _edgefleet_error(_req: Request, e: EdgefleetError) -> JSONResponse:
        status = _error_status(e)
        log.info("API request refused (%d, %s): %s", status, e.reason, e)
        return JSONResponse({"detail": str(e), "reason": e.reason}, status_code=status)

    from controller.api.enroll import install_enroll_routes

    # before the generic DELETE /api/v1/{kind}/{name}: DELETE /api/v1/tokens/{id} is a token
    install_enroll_routes(app, core)
    from controller.api.ingest import install_ingest_routes

    install_ingest_routes(app, core)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ok = is_ready(core)
        if ok:
            try:
                with db_session(core) as s:
                    queries.list_device_classes(s)
            except Exception as e:  # the probe reports any DB failure as not ready
                return JSONResponse({"status": "not ready", "reason": f"database: {e}"}, 503)
        return JSONResponse({"status": "ready" if ok else "not ready"}, 200 if ok else 503)

    stale_after_s = queries.stale_after_of(core)

    @app.get(f"{API}/devices")
    def devices(limit: int | None = None, continue_: str = Query("", alias="continue"),
                online: bool | None = None, stale: bool | None = None,
                device_class: list[str] | None = Query(None, alias="deviceClass"),
                label_selector: str = Query("", alias="labelSelector"),
                fields: str = "") -> Response:
        """Every device (``{"items": [...]}``), or with ``limit`` one page of them and
        ``metadata.continue`` / ``metadata.remainingItemCount`` (see queries.page_devices)."""
        try:
            flt = queries.DeviceFilter.of(online=online, stale=stale, device_class=device_class,
                                          label_selector=label_selector)
            with db_session(core) as s:
                page = queries.page_devices(
                    s, limit=limit or None, continue_token=continue_, flt=flt,
                    fields=queries.parse_fields(fields), stale_after_s=stale_after_s)
        except queries.BadQuery as e:
            raise HTTPException(400, str(e)) from e
        return json_response(page)

    @app.get(f"{API}/fleet/summary")
    def fleet_summary() -> Response:
        """Device counts (online, offline, stale, per class, health, agent and model version)
        without listing the devices."""
        with db_session(core) as s:
            return json_response(queries.fleet_summary(s, stale_after_s=stale_after_s))

    @app.get(f"{API}/devices/{{device_id}}")
    def device(device_id: str, window_s: int = queries.DEFAULT_WINDOW_S) -> dict[str, Any]:
        with db_session(core) as s:
            d = queries.get_device(s, device_id, stale_after_s=stale_after_s,
                                   window_s=_window_s(window_s))
        if d is None:
            raise HTTPException(404, f"device {device_id!r} not found")
        return d

    @app.get(f"{API}/devices/{{device_id}}/metrics")
    def device_metrics(device_id: str, limit: int = 60) -> dict[str, Any]:
        with db_session(core) as s:
            return {"items": queries.metric_history(s, device_id,
                                                    limit=min(max(limit, 1), 1000))}

    @app.get(f"{API}/devices/{{device_id}}/metrics/windows")
    def device_metric_windows(device_id: str, model: str | None = None,
                              version: int | None = None, since_ms: int = 0,
                              until_ms: int | None = None, limit: int = 500) -> dict[str, Any]:
        with db_session(core) as s:
            out = queries.metric_windows(s, device_id, model=model or None, version=version,
                                         since_ms=since_ms, until_ms=until_ms,
                                         limit=min(max(limit, 1), MAX_WINDOWS))
            if not out["items"] and queries.get_device(s, device_id) is None:
                raise HTTPException(404, f"device {device_id!r} not found")
        return out

    @app.get(f"{API}/models")
    def models() -> Response:
        with db_session(core) as s:
            return json_response(
                {"items": queries.list_models(s, resources=queries.resources_of(core))})

    @app.get(f"{API}/models/{{namespace}}/{{name}}")
    def model(namespace: str, name: str) -> dict[str, Any]:
        with db_session(core) as s:
            m = queries.get_model(s, namespace, name, resources=queries.resources_of(core))
        if m is None:
            raise HTTPException(404, f"EdgeModel {namespace}/{name} not found")
        return m

    @app.get(f"{API}/deviceclasses")
    def device_classes() -> dict[str, Any]:
        with db_session(core) as s:
            return {"items": queries.list_device_classes(s, resources=queries.resources_of(core))}

    @app.get(f"{API}/rollouts")
    def rollouts() -> Response:
        with db_session(core) as s:
            return json_response(
                {"items": queries.list_rollouts(s, resources=queries.resources_of(core))})

    @app.get(f"{API}/rollouts/{{namespace}}/{{name}}")
    def rollout(namespace: str, name: str) -> dict[str, Any]:
        with db_session(core) as s:
            r = queries.get_rollout(s, namespace, name,
                                    resources=queries.resources_of(core))
        if r is None:
            raise HTTPException(404, f"EdgeRollout {namespace}/{name} not found")
        return r

    @app.get(f"{API}/events")
    def events(limit: int = 100, since_ms: int = 0) -> dict[str, Any]:
        with db_session(core) as s:
            return {"items": queries.list_events(s, limit=min(max(limit, 1), 1000),
                                                 since_ms=since_ms)}

    @app.get(f"{API}/metrics")
    def metrics(window_s: int = queries.DEFAULT_WINDOW_S) -> Response:
        w = _window_s(window_s)
        with db_session(core) as s:
            return json_response({"window_s": w, "items": queries.latest_metrics(
                s, window_s=w, stale_after_s=stale_after_s)})

    @app.post(f"{API}/apply")
    async def apply(request: Request) -> dict[str, Any]:
        body = await read_limited(request, limit_bytes=max_apply_bytes(core))
        docs = parse_documents(body, request.headers.get("content-type", ""))
        docs = validate_documents(docs)
        results = await call_apply(core, docs)
        return {"items": results}

    @app.delete(f"{API}/{{kind}}/{{namespace}}/{{name}}")
    async def delete_namespaced(kind: str, namespace: str, name: str) -> dict[str, Any]:
        return await call_delete(core, canonical_kind(kind), namespace=namespace, name=name)

    @app.delete(f"{API}/{{kind}}/{{name}}")
    async def delete_cluster(kind: str, name: str) -> dict[str, Any]:
        k = canonical_kind(kind)
        return await call_delete(core, k, namespace="" if k == "DeviceClass" else "default",
                                 name=name)

    @app.post(f"{API}/artifacts")
    async def upload(request: Request, kind: str = "model", name: str = "") -> JSONResponse:
        limit = max_upload_bytes(core)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"artifact of {declared} bytes is over "
                                     f"max_upload_bytes={limit}")
        info = await call_upload(core, request.stream(), kind=kind, name=name,
                                 limit_bytes=limit)
        return JSONResponse(info, status_code=201)

    from controller.api.rollouts import router as rollout_actions  # rollout verbs
    app.include_router(rollout_actions)
    from controller.dashboard.pages import install_dashboard

    install_dashboard(app, core)
    return app
