"""HTTP routes of the remote-build protocol, mounted on the controller's FastAPI app.

``install_builder_routes(app, dispatcher)`` is called where the API app is built (the lead wires
it next to controller.api.app.create_app when a BuildDispatcher is configured) and by tests:

- ``GET  /api/v1/builds/{job_id}/inputs/{sha256}``: a running job's model or validation samples
  (404 for anything that is not an input of a running job: no open artifact download);
- ``PUT  /api/v1/builds/{job_id}/engine?sha256=HEX``: the builder's engine upload, streamed to
  the job's staging folder, capped at the job's ``max_engine_bytes`` (413), refused when the
  bytes do not hash to the declared sha256 (422). Staged bytes reach the store only after the
  builder's signed result names this sha256 and size and its fingerprint fits the class;
- ``GET  /api/v1/builders``: enrolled builders, their announced facts, recent jobs.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse

from controller.builder.dispatcher import BuildDispatcher
from controller.store.blobs import valid_sha256
from protos.errors import EdgefleetError, GiveUp, Rejected

API = "/api/v1"


def _status(e: EdgefleetError) -> int:
    if isinstance(e, Rejected):
        return {"not_found": 404, "too_large": 413}.get(e.reason, 422)
    if isinstance(e, GiveUp):
        return 409
    return 503


def install_builder_routes(app: FastAPI, dispatcher: BuildDispatcher) -> None:
    """Add the build routes to ``app``; they serve ``dispatcher``'s running jobs."""

    @app.get(f"{API}/builds/{{job_id}}/inputs/{{sha256}}")
    def build_input(job_id: str, sha256: str) -> FileResponse:
        if not valid_sha256(sha256):
            raise HTTPException(404, "not a sha256")
        try:
            path = dispatcher.input_path(job_id, sha256)
        except EdgefleetError as e:
            raise HTTPException(_status(e), str(e)) from e
        return FileResponse(path, media_type="application/octet-stream")

    @app.put(f"{API}/builds/{{job_id}}/engine")
    async def build_upload(job_id: str, request: Request, sha256: str = "") -> JSONResponse:
        if not valid_sha256(sha256):
            raise HTTPException(422, "query parameter sha256 must be a lowercase hex sha256")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > dispatcher.limits.max_engine_bytes:
            raise HTTPException(413, f"engine of {declared} bytes is over max_engine_bytes="
                                     f"{dispatcher.limits.max_engine_bytes}")
        try:
            info = await dispatcher.stage_upload(job_id, sha256, request.stream())
        except EdgefleetError as e:
            raise HTTPException(_status(e), str(e)) from e
        return JSONResponse(info, status_code=201)

    @app.get(f"{API}/builders")
    def builders() -> dict[str, Any]:
        return {"items": dispatcher.builders(), "untrusted": dict(dispatcher.untrusted_seen),
                "jobs": list(dispatcher.history[-20:])}
