"""How the API reaches the ControllerCore: DB sessions, limits, apply/delete/upload calls.

Used by controller/api/app.py and controller/dashboard/pages.py. Keeps the API's knowledge of
the core in one small place: the core's methods may be plain or async (both are awaited here),
and the upload is streamed to a temporary file under a size limit before the core stores it.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from sqlmodel import Session

from protos.errors import GiveUp

DEFAULT_MAX_APPLY_BYTES = 1024 * 1024
DEFAULT_MAX_UPLOAD_BYTES = 512 * 1024 * 1024


def _db_engine(core: Any) -> Any:
    for attr in ("db_engine", "engine", "db"):
        eng = getattr(core, attr, None)
        if eng is not None and hasattr(eng, "connect"):
            return eng
    raise GiveUp("the controller core has no database engine (not started?)", reason="no_db")


def is_ready(core: Any) -> bool:
    """True when the core says it is connected (MQTT) or has no such notion."""
    for attr in ("connected", "ready"):
        flag = getattr(core, attr, None)
        if flag is None:
            continue
        if hasattr(flag, "is_set"):
            return bool(flag.is_set())
        return bool(flag() if callable(flag) else flag)
    return True


@contextmanager
def db_session(core: Any) -> Iterator[Session]:
    """A read session on the core's database."""
    with Session(_db_engine(core), expire_on_commit=False) as s:
        yield s


def _setting(core: Any, name: str, default: int) -> int:
    settings = getattr(core, "settings", None)
    value = getattr(settings, name, None)
    return int(value) if isinstance(value, int) and value > 0 else default


def max_apply_bytes(core: Any) -> int:
    return _setting(core, "max_apply_bytes", DEFAULT_MAX_APPLY_BYTES)


def max_upload_bytes(core: Any) -> int:
    return _setting(core, "max_upload_bytes", DEFAULT_MAX_UPLOAD_BYTES)


def _upload_dir(core: Any) -> Path:
    settings = getattr(core, "settings", None)
    data_dir = Path(getattr(settings, "data_dir", tempfile.gettempdir()))
    d = data_dir / "uploads"
    d.mkdir(parents=True, exist_ok=True)
    return d


async def _maybe_await(x: Any) -> Any:
    return await x if inspect.isawaitable(x) else x


def _result_view(r: Any) -> dict[str, Any]:
    """One apply result as {kind, namespace, name, action} (kubectl's 'configured' etc.)."""
    if isinstance(r, dict):
        d = dict(r)
    elif hasattr(r, "__dataclass_fields__"):
        d = {k: getattr(r, k) for k in r.__dataclass_fields__}
    else:
        d = {k: getattr(r, k) for k in ("kind", "namespace", "name", "action") if hasattr(r, k)}
    action = d.get("action") or d.get("result") or d.get("outcome") or "configured"
    d["action"] = getattr(action, "value", action)
    return d


async def call_apply(core: Any, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Apply through the core; any object it rejects turns the answer into 422 (all listed)."""
    results = [_result_view(r) for r in await _maybe_await(core.apply(docs)) or []]
    rejected = [r for r in results if r.get("action") == "rejected"]
    if rejected:
        detail = "; ".join(f"{r.get('kind', '')} {r.get('name', '')}: {r.get('message', '')}"
                           for r in rejected)
        raise HTTPException(422, detail=detail)
    return results


async def call_delete(core: Any, kind: str, *, namespace: str, name: str) -> dict[str, Any]:
    result = await _maybe_await(core.delete(kind, namespace=namespace, name=name))
    if result is False or result is None:
        raise HTTPException(404, f"{kind} {namespace + '/' if namespace else ''}{name} not found")
    out = _result_view(result) if result is not True else {}
    out.update({"kind": kind, "namespace": namespace, "name": name,
                "action": out.get("action") if out.get("action") != "configured" else "deleted"})
    return out


async def call_upload(core: Any, stream: AsyncIterator[bytes], *, kind: str, name: str,
                      limit_bytes: int) -> dict[str, Any]:
    """Stream the body to a temp file (413 past the limit), hash it, hand it to the core."""
    folder = _upload_dir(core)
    fd, tmp_name = tempfile.mkstemp(prefix=".upload-", dir=folder)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in stream:
                size += len(chunk)
                if size > limit_bytes:
                    raise HTTPException(413, f"artifact is over max_upload_bytes={limit_bytes}")
                h.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if size == 0:
            raise HTTPException(400, "empty artifact upload")
        digest = h.hexdigest()
        result = await _maybe_await(core.upload_artifact(tmp, kind=kind))
        info = _artifact_view(result)
        info.setdefault("sha256", digest)
        info.setdefault("size", size)
        info.setdefault("kind", kind)
        if info["sha256"] != digest:
            raise GiveUp(f"store recorded sha256 {info['sha256']} but the upload hashed to "
                         f"{digest}", reason="hash_mismatch")
        return info
    finally:
        tmp.unlink(missing_ok=True)


def _artifact_view(r: Any) -> dict[str, Any]:
    if isinstance(r, str):
        return {"sha256": r}
    if isinstance(r, dict):
        return dict(r)
    return {k: getattr(r, k) for k in ("sha256", "size", "kind") if hasattr(r, k)}
