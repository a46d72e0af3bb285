"""HTTP routes for bootstrap tokens and device enrollment (controller/fleet/enroll.py).

``install_enroll_routes(app, core)`` is called by controller/api/app.py ``create_app``:

- ``POST   /api/v1/enroll``  {token, device_id, device_class, csr_pem?}: a board enrolls
  (``edgefleet-agent enroll``). 403 + reason for a token that does not allow it (unknown,
  expired, used_up, revoked, wrong_class, wrong_prefix, already_enrolled); 422 for a bad
  device id / class / CSR; 413 past ``max_enroll_request_bytes``.
- ``POST   /api/v1/tokens``  {ttl_s, uses, device_class, id_prefix, reenroll, note}: a new
  token (shown once); ``GET /api/v1/tokens``; ``DELETE /api/v1/tokens/{id}`` revokes.

The API has no user authentication yet, so the token routes answer only clients on the
loopback interface (``edgefleet token ...`` run on the controller host); behind a reverse proxy
on the same host that check is void: do not proxy /api/v1/tokens (docs/security.md).
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from controller.api.core_access import _db_engine
from controller.fleet import enroll as enr
from protos.errors import Rejected

API = "/api/v1"
DEFAULT_MAX_ENROLL_REQUEST_BYTES = 64 * 1024


def _settings(core: Any) -> Any:
    return getattr(core, "settings", None)


def _limit(core: Any, name: str, default: int) -> int:
    v = getattr(_settings(core), name, None)
    return int(v) if isinstance(v, int) and v > 0 else default


def _is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _admin_only(request: Request) -> None:
    if not _is_loopback(request):
        raise HTTPException(403, "token administration is only served to loopback clients "
                                 "(run `edgefleet token ...` on the controller host)")


async def _json_body(request: Request, *, limit_bytes: int) -> dict[str, Any]:
    from controller.api.app import read_limited

    body = await read_limited(request, limit_bytes=limit_bytes)
    try:
        data = json.loads(body.decode("utf-8") or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Rejected(f"request body is not JSON: {e}", reason="bad_body") from e
    if not isinstance(data, dict):
        raise Rejected("request body must be a JSON object", reason="bad_body")
    return data


def _field(data: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    v = data.get(name, default)
    if v is None:
        raise Rejected(f"{name} is required", reason="bad_body")
    if kind is int and isinstance(v, bool) or not isinstance(v, kind):
        raise Rejected(f"{name} must be a {kind.__name__}", reason="bad_body")
    return v


def _enroller(core: Any) -> enr.Enroller:
    keys = getattr(core, "keys", None)
    if keys is None:
        raise HTTPException(503, "the controller has no signing keys loaded")
    return enr.Enroller(_db_engine(core), settings=_settings(core),
                        root_public_b64=keys.root_public_b64())


def install_enroll_routes(app: FastAPI, core: Any) -> None:
    """Add the enrollment and token routes to ``app`` (bound to ``core``)."""

    @app.exception_handler(enr.EnrollRefused)
    async def _refused(_req: Request, e: enr.EnrollRefused) -> JSONResponse:
        return JSONResponse({"detail": str(e), "reason": e.reason}, status_code=403)

    @app.post(f"{API}/enroll")
    async def enroll(request: Request) -> dict[str, Any]:
        data = await _json_body(request, limit_bytes=_limit(
            core, "max_enroll_request_bytes", DEFAULT_MAX_ENROLL_REQUEST_BYTES))
        req = enr.EnrollRequest(
            token=_field(data, "token", str), device_id=_field(data, "device_id", str),
            device_class=_field(data, "device_class", str),
            csr_pem=_field(data, "csr_pem", str, ""),
            remote=request.client.host if request.client else "")
        url = str(request.base_url).rstrip("/")
        result: dict[str, Any] = await run_in_threadpool(
            _enroller(core).enroll, req, controller_url=url)
        return result

    @app.post(f"{API}/tokens")
    async def create_token(request: Request) -> JSONResponse:
        _admin_only(request)
        data = await _json_body(request, limit_bytes=16 * 1024)
        token, view = await run_in_threadpool(
            enr.create_token, _db_engine(core), ttl_s=_field(data, "ttl_s", int, 86400),
            uses=_field(data, "uses", int, 1), device_class=_field(data, "device_class", str, ""),
            id_prefix=_field(data, "id_prefix", str, ""),
            reenroll=_field(data, "reenroll", bool, False), note=_field(data, "note", str, ""),
            max_ttl_s=_limit(core, "max_token_ttl_s", 30 * 86400),
            max_uses=_limit(core, "max_token_uses", 10000))
        return JSONResponse({"token": token, **view}, status_code=201)

    @app.get(f"{API}/tokens")
    async def list_tokens(request: Request) -> dict[str, Any]:
        _admin_only(request)
        return {"items": await run_in_threadpool(enr.list_tokens, _db_engine(core))}

    @app.delete(f"{API}/tokens/{{token_id}}")
    async def revoke_token(request: Request, token_id: str) -> dict[str, Any]:
        _admin_only(request)
        view = await run_in_threadpool(enr.revoke_token, _db_engine(core), token_id)
        if view is None:
            raise HTTPException(404, f"no bootstrap token {token_id[:40]!r}")
        return view
