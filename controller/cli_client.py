"""The client half of the ``edgefleet`` CLI: apply, get, delete and push against a controller,
and the calls behind ``edgefleet rollout`` (``get_rollout``, ``rollout_action``, used by
controller/cli_rollout.py).

Called by controller/cli.py. ``apply`` validates documents locally with controller.crd.schema
(so a bad file fails before anything is sent), uploads local ``path`` files (model source,
validation samples) to ``POST /api/v1/artifacts`` and pins their sha256 in the document, then
posts the documents to ``POST /api/v1/apply`` and prints one kubectl-style line per object.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import httpx

from protos.errors import Rejected

DEFAULT_SERVER = "http://127.0.0.1:8080"
TIMEOUT_S = 60.0
# document paths that may hold a local file to upload: (keys..., artifact kind)
FILE_REFS: dict[str, list[tuple[tuple[str, ...], str]]] = {
    "EdgeModel": [(("spec", "source"), "model"), (("spec", "validation", "samples"), "samples")],
}
PLURALS = {"EdgeModel": "edgemodel", "EdgeRollout": "edgerollout", "DeviceClass": "deviceclass"}


class ServerError(Exception):
    """The controller answered with an error status; ``str()`` is its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        detail = resp.json().get("detail", resp.text)
    except (ValueError, AttributeError):
        detail = resp.text
    raise ServerError(resp.status_code, f"{detail} (HTTP {resp.status_code})")


def client(server: str) -> httpx.Client:
    return httpx.Client(base_url=server.rstrip("/"), timeout=TIMEOUT_S)


def push(c: httpx.Client, path: Path, *, kind: str = "model", name: str = "") -> dict[str, Any]:
    """Upload one file to the artifact store; returns {sha256, size, ...}."""
    if not path.is_file():
        raise Rejected(f"{path}: no such file", reason="not_found")
    with path.open("rb") as f:
        resp = c.post("/api/v1/artifacts", params={"kind": kind, "name": name or path.name},
                      content=f, headers={"content-type": "application/octet-stream"})
    _raise_for(resp)
    info: dict[str, Any] = resp.json()
    return info


def _walk(doc: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any] | None:
    cur: Any = doc
    for k in keys:
        cur = cur.get(k) if isinstance(cur, dict) else None
    return cur if isinstance(cur, dict) else None


def load_and_validate(path: Path) -> list[Any]:
    """LoadedDocs from a file or folder, with schema defaults, validated (raises Rejected)."""
    from controller.crd import schema

    loaded = schema.load_documents(path)
    for ld in loaded:
        ld.doc = schema.with_defaults(ld.doc)
        schema.validate(ld.doc)
    return loaded


def upload_local_files(c: httpx.Client, loaded: list[Any], *, out: TextIO) -> None:
    """Upload every local ``path`` a document names and pin its sha256 in place of the path."""
    for ld in loaded:
        refs = [(".".join(keys), _walk(ld.doc, keys), kind)
                for keys, kind in FILE_REFS.get(ld.kind, [])]
        if ld.kind == "EdgeModel":  # lighter variants: spec.variants[i].source
            variants = (ld.doc.get("spec") or {}).get("variants") or []
            refs.extend((f"spec.variants[{i}].source", _walk(v, ("source",)), "model")
                        for i, v in enumerate(variants) if isinstance(v, dict))
        for where, ref, kind in refs:
            if not ref or not ref.get("path"):
                continue
            local = ld.resolve(str(ref["path"]))
            if not local.is_file():
                raise Rejected(f"{ld.source_file}: {ld.kind} {ld.name}: {where}.path: "
                               f"file {local} not found", reason="not_found")
            info = push(c, local, kind=kind, name=local.name)
            if ref.get("sha256") and ref["sha256"] != info["sha256"]:
                raise Rejected(f"{ld.kind} {ld.name}: {where}.sha256 is {ref['sha256']} "
                               f"but {local} hashes to {info['sha256']}", reason="hash_mismatch")
            ref["sha256"] = info["sha256"]
            del ref["path"]
            print(f"artifact {local.name} uploaded ({info.get('size', '?')} bytes, "
                  f"sha256 {info['sha256'][:12]})", file=out)


def apply(server: str, path: Path, *, out: TextIO | None = None) -> list[dict[str, Any]]:
    """`edgefleet apply -f PATH`: validate, upload files, post documents; print results."""
    out = out or sys.stdout
    loaded = load_and_validate(path)
    with client(server) as c:
        upload_local_files(c, loaded, out=out)
        resp = c.post("/api/v1/apply", content=json.dumps([ld.doc for ld in loaded]),
                      headers={"content-type": "application/json"})
        _raise_for(resp)
        items: list[dict[str, Any]] = resp.json().get("items", [])
    for r in items:
        kind = str(r.get("kind", ""))
        print(f"{PLURALS.get(kind, kind.lower())}.edgefleet.io/{r.get('name', '')} "
              f"{r.get('action', 'configured')}", file=out)
    return items


def delete(server: str, kind: str, name: str, *, namespace: str = "default",
           out: TextIO | None = None) -> dict[str, Any]:
    out = out or sys.stdout
    with client(server) as c:
        resp = c.delete(f"/api/v1/{kind}/{namespace}/{name}")
        _raise_for(resp)
        info: dict[str, Any] = resp.json()
    k = str(info.get("kind", kind))
    print(f"{PLURALS.get(k, k.lower())}.edgefleet.io/{name} deleted", file=out)
    return info


def _age(ms: int | None) -> str:
    if not ms:
        return "-"
    s = max(0.0, time.time() - ms / 1000)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if v in (None, "") else str(v) for v in r]
                                           for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("   ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def _rows(what: str, items: list[dict[str, Any]], *, wide: bool) -> tuple[list[str], list[list]]:
    if what == "devices":
        h = ["NAME", "CLASS", "STATUS", "MODEL", "VERSION", "HEARTBEAT", "HEALTH", "UPDATE"]
        rows = [[d["id"], d["device_class"], d["status"], d["model"], d["version"],
                 "-" if d["last_heartbeat_age_s"] is None else f"{d['last_heartbeat_age_s']:.0f}s",
                 d["health"], d["update_state"]] for d in items]
        if wide:
            h += ["AGENT", "SERVE-URL", "REASON"]
            for r, d in zip(rows, items, strict=True):
                r += [d["agent_version"], d["serve_url"], d["offline_reason"] or d["health_reason"]]
        return h, rows
    if what == "models":
        h = ["NAMESPACE", "NAME", "VERSION", "COMPILED", "SERVING", "PHASE", "AGE"]
        rows = [[m["namespace"], m["name"], m["version"], m["compiled"],
                 m.get("serving", ""), m["phase"], _age(m["created_ms"])] for m in items]
        if wide:
            h += ["SOURCE", "MESSAGE"]
            for r, m in zip(rows, items, strict=True):
                r += [m["source_sha256"][:12], m["message"]]
        return h, rows
    if what == "rollouts":
        h = ["NAMESPACE", "NAME", "MODEL", "PHASE", "PROGRESS", "FAILED", "BYTES-SENT"]
        rows = [[x["namespace"], x["name"], x["model"], x["phase"], x["progress"],
                 x["devices_failed"], x["bytes_sent_total"]] for x in items]
        if wide:
            h += ["WAVE", "MESSAGE"]
            for row, x in zip(rows, items, strict=True):
                row += [x["wave"], x["message"]]
        return h, rows
    if what == "events":
        h = ["AGE", "TYPE", "OBJECT", "REASON", "MESSAGE"]
        return h, [[_age(e["at_ms"]), e["type"], f"{e['kind']}/{e['name']}", e["reason"],
                    e["message"]] for e in items]
    raise Rejected(f"unknown resource {what!r}: use devices, models, rollouts or events",
                   reason="bad_arg")


GET_ALIASES = {"device": "devices", "dev": "devices", "model": "models", "edgemodels": "models",
               "em": "models", "rollout": "rollouts", "edgerollouts": "rollouts",
               "er": "rollouts", "event": "events", "ev": "events"}


DEFAULT_CHUNK_SIZE = 500     # devices per page of `get devices` (kubectl's --chunk-size)


def _all_devices(c: httpx.Client, chunk_size: int) -> dict[str, Any]:
    """Every device, ``chunk_size`` per request following ``metadata.continue`` (one request
    without a limit when 0); the same ``{"items": [...]}`` as the unpaged list."""
    items: list[dict[str, Any]] = []
    token = ""
    while True:
        params: dict[str, Any] = {"limit": chunk_size} if chunk_size > 0 else {}
        if token:
            params["continue"] = token
        resp = c.get("/api/v1/devices", params=params)
        _raise_for(resp)
        page = resp.json()
        items.extend(page.get("items", []))
        token = (page.get("metadata") or {}).get("continue") or ""
        if not token:       # the last page (or a server that does not page)
            return {"items": items}


def get(server: str, what: str, *, output: str = "", name: str = "",
        out: TextIO | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Any:
    """`edgefleet get devices|models|rollouts|events [NAME] [-o json|wide] [--chunk-size N]`."""
    out = out or sys.stdout
    what = GET_ALIASES.get(what, what)
    if what not in ("devices", "models", "rollouts", "events"):
        raise Rejected(f"unknown resource {what!r}: use devices, models, rollouts or events",
                       reason="bad_arg")
    if chunk_size < 0:
        raise Rejected(f"--chunk-size must be 0 (no paging) or more, got {chunk_size}",
                       reason="bad_arg")
    path = f"/api/v1/{what}"
    if name:
        path += f"/{name}" if what == "devices" or "/" in name else f"/default/{name}"
    with client(server) as c:
        if what == "devices" and not name:
            data = _all_devices(c, chunk_size)
        else:
            resp = c.get(path)
            _raise_for(resp)
            data = resp.json()
    if output == "json" or (name and what != "events"):
        print(json.dumps(data, indent=2, sort_keys=True), file=out)
        return data
    headers, rows = _rows(what, data.get("items", []), wide=output == "wide")
    print(table(rows, headers), file=out)
    return data


def _part(value: str) -> str:
    """One URL path segment (a name with '/' or '?' cannot reach another route)."""
    from urllib.parse import quote

    return quote(value, safe="")


def get_rollout(c: httpx.Client, namespace: str, name: str) -> dict[str, Any]:
    """GET /api/v1/rollouts/{namespace}/{name}: the rollout view (spec, status, generation)."""
    resp = c.get(f"/api/v1/rollouts/{_part(namespace)}/{_part(name)}")
    _raise_for(resp)
    data: dict[str, Any] = resp.json()
    return data


def rollout_action(c: httpx.Client, namespace: str, name: str, verb: str, *,
                   to_version: int | None = None) -> dict[str, Any]:
    """POST a rollout verb (controller/api/rollouts.py); returns {action, message, spec...}."""
    body = {} if to_version is None else {"toVersion": to_version}
    resp = c.post(f"/api/v1/namespaces/{_part(namespace)}/edgerollouts/{_part(name)}"
                  f"/actions/{_part(verb)}", json=body)
    _raise_for(resp)
    data: dict[str, Any] = resp.json()
    return data
