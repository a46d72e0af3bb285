"""A Kubernetes API server emulator for tests: kmock's emulator with the semantics we rely on.

Out of the box kmock 0.8 gives objects no resourceVersion, ignores resourceVersion and
timeoutSeconds on watches (replaying everything as ADDED), answers creates with 200 (the
official client v37 then returns None), has no separate /status, no PUT and never answers
409 on a stale resourceVersion. ``KubeEmulator`` keeps kmock's server, discovery and error
rendering, and serves resource requests itself with:

- one global resourceVersion counter and an event log (watch resume from a resourceVersion,
  ``410 Gone`` once the log is compacted, ``timeoutSeconds``, fieldSelector on metadata.name);
- 201 on create, namespace taken from the URL, uid/creationTimestamp/generation;
- PUT and PATCH (merge, strategic treated as merge, RFC 6902 JSON patch) with
  ``409 Conflict`` on a stale resourceVersion; a real ``/status`` subresource; generation
  bumped on spec changes only; finalizers and deletionTimestamp;
- typed lists (``EdgeModelList``), Leases, Events, Namespaces, and CRDs: creating a
  CustomResourceDefinition serves its resource, validated against its openAPIV3Schema
  (with defaults), so ``kubectl apply -f manifests/crds`` then ``kubectl apply`` works;
- Table rendering from additionalPrinterColumns for ``kubectl get``;
- test hooks: ``drop_watches()``, ``compact()``, ``inject(...)`` one-off failures.

It lacks label selectors, paging, bookmarks, server-side apply, admission webhooks,
garbage collection and authn/authz (see docs/kubernetes.md).

``RunningKube`` runs it on its own event loop in a thread, so tests and the synchronous
official client (and kubectl) talk to it over real HTTP. Used by tests/integration/test_kube_*.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
from kmock._internal import apps, rendering

from controller.crd.schema import apply_schema_defaults, strict_schema

_PATH = re.compile(r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
                   r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)"
                   r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$")
_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
LOG_LIMIT = 10_000  # events kept for watch resume before older ones are compacted


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                "code": self.code, "reason": self.reason, "message": self.message}


@dataclass
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status_subresource: bool = False
    custom: bool = False  # custom resources refuse unconditional PUT, bump generation
    schema: dict[str, Any] | None = None
    columns: list[dict[str, Any]] = field(default_factory=list)
    short_names: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    validator: Any = None

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


def _merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


def _json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        kind = op["op"]
        try:
            if isinstance(parent, list):
                idx = len(parent) if last == "-" else int(last)
                if kind == "add":
                    parent.insert(idx, op["value"])
                elif kind == "remove":
                    del parent[idx]
                elif kind == "replace":
                    parent[idx] = op["value"]
                elif kind == "test" and parent[idx] != op["value"]:
                    raise ApiError(422, "Invalid", f"test failed at {op['path']}")
            elif kind in ("add", "replace"):
                if kind == "replace" and last not in parent:
                    raise ApiError(422, "Invalid", f"replace of missing {op['path']}")
                parent[last] = op["value"]
            elif kind == "remove":
                del parent[last]
            elif kind == "test" and parent.get(last) != op["value"]:
                raise ApiError(422, "Invalid", f"test failed at {op['path']}")
        except (KeyError, IndexError, ValueError) as e:
            raise ApiError(422, "Invalid", f"cannot apply {kind} at {op['path']}: {e}") from e
    return doc


def _jsonpath(obj: Any, path: str) -> Any:
    """The small JSONPath subset printer columns use: .a.b, .a[0], .a[?(@.k=="v")].b"""
    cur = [obj]
    for token in re.findall(r'\.[^.\[]+|\[\?\(@\.\w+==(?:"[^"]*"|\'[^\']*\')\)\]|\[\d+\]', path):
        nxt: list[Any] = []
        for c in cur:
            if token.startswith(".") and isinstance(c, dict) and token[1:] in c:
                nxt.append(c[token[1:]])
            elif token.startswith("[?") and isinstance(c, list):
                key, val = re.match(r'\[\?\(@\.(\w+)==["\'](.*)["\']\)\]', token).groups()  # type: ignore[union-attr]
                nxt += [i for i in c if isinstance(i, dict) and str(i.get(key)) == val]
            elif token.startswith("[") and isinstance(c, list) and int(token[1:-1]) < len(c):
                nxt.append(c[int(token[1:-1])])
        cur = nxt
    return cur[0] if cur else None


class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator with resourceVersions, watch resume, 409s, /status, PUT."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.rv = 0
        self.log: list[tuple[int, Resource, str, dict[str, Any]]] = []
        self.log_floor = 0  # watching from a resourceVersion below this answers 410 Gone
        self.store: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        self.kinds: dict[tuple[str, str, str], Resource] = {}
        self.epoch = 0  # bumped by drop_watches()
        self.closing = False
        self.faults: list[tuple[str, re.Pattern[str], int, list[int]]] = []
        self.changed: asyncio.Condition | None = None
        self.held: asyncio.Event | None = None  # set while new watches are held back
        self.held_watches = 0
        self.open_watches = 0
        for res in (
            Resource("", "v1", "namespaces", "Namespace", False),
            Resource("", "v1", "events", "Event", True),
            Resource("coordination.k8s.io", "v1", "leases", "Lease", True),
            Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions",
                     "CustomResourceDefinition", False, status_subresource=True),
        ):
            self.register(res)

    # ------------------------------------------------------------ registry and hooks

    def register(self, res: Resource) -> None:
        self.kinds[(res.group, res.version, res.plural)] = res
        self.resources[kmock.resource(res.group, res.version, res.plural)] = kmock.ResourceInfo(
            kind=res.kind, namespaced=res.namespaced, singular=res.kind.lower(), verbs=_VERBS,
            shortnames=res.short_names, categories=res.categories,
            subresources=["status"] if res.status_subresource else [])

    def _register_crd(self, crd: dict[str, Any]) -> None:
        spec = crd["spec"]
        names = spec["names"]
        for v in spec["versions"]:
            if not v.get("served", True):
                continue
            schema = (v.get("schema") or {}).get("openAPIV3Schema")
            res = Resource(spec["group"], v["name"], names["plural"], names["kind"],
                           spec["scope"] == "Namespaced",
                           status_subresource="status" in (v.get("subresources") or {}),
                           custom=True, schema=schema,
                           columns=v.get("additionalPrinterColumns") or [],
                           short_names=names.get("shortNames") or [],
                           categories=names.get("categories") or [])
            if schema is not None:
                import jsonschema

                strict = strict_schema(schema)
                strict["properties"]["metadata"] = {"type": "object"}
                res.validator = jsonschema.Draft7Validator(strict)
            self.register(res)

    async def _serve_version(self, request: rendering.Request) -> Any:
        """kmock copies short names and categories onto subresources; kubectl then trips on them."""
        out: Any = await super()._serve_version(request)
        for entry in out.get("resources", []):
            if "/" in entry["name"]:
                entry.update(shortNames=[], categories=[], verbs=["get", "patch", "update"])
        return out

    def inject(self, method: str, path_regex: str, code: int, *, times: int = 1) -> None:
        """Answer the next ``times`` matching requests with an error ``code`` (thread-safe enough)."""
        self.faults.append((method.upper(), re.compile(path_regex), code, [times]))

    async def drop_watches(self) -> None:
        """End every open watch stream (like an API server restart or a load-balancer timeout)."""
        self.epoch += 1
        await self._notify()

    async def hold_watches(self) -> None:
        """New watch requests wait (connected, no answer) until ``release_watches()``."""
        self.held = asyncio.Event()

    async def release_watches(self) -> None:
        if self.held is not None:
            self.held.set()
            self.held = None

    async def compact(self) -> None:
        """Forget the event log: watches resuming from an older resourceVersion get 410 Gone."""
        self.log.clear()
        self.log_floor = self.rv + 1
        await self._notify()

    async def shutdown(self) -> None:
        self.closing = True
        await self._notify()

    async def _notify(self) -> None:
        if self.changed is None:
            self.changed = asyncio.Condition()
        async with self.changed:
            self.changed.notify_all()

    # ------------------------------------------------------------ dispatch

    def _openapi(self, path: str) -> aiohttp.web.StreamResponse:
        """OpenAPI v3 stub: enough for kubectl to see server-side field validation support."""
        gvs = {(r.group, r.version) for r in self.kinds.values()}
        if path == "/openapi/v3":
            return aiohttp.web.json_response({"paths": {
                (f"apis/{g}/{v}" if g else f"api/{v}"): {
                    "serverRelativeURL": f"/openapi/v3/{'apis/' + g if g else 'api'}/{v}?hash={self.rv}"}
                for g, v in gvs}})
        paths: dict[str, Any] = {}
        for r in self.kinds.values():
            prefix = f"/apis/{r.group}/{r.version}" if r.group else f"/api/{r.version}"
            if path != "/openapi/v3" + prefix:
                continue
            scope = "/namespaces/{namespace}" if r.namespaced else ""
            gvk = {"group": r.group, "version": r.version, "kind": r.kind}
            op = {"x-kubernetes-group-version-kind": gvk, "parameters": [
                {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                "responses": {}}
            paths[f"{prefix}{scope}/{r.plural}/{{name}}"] = {"patch": op, "put": op}
            paths[f"{prefix}{scope}/{r.plural}"] = {"post": op}
        if not paths:
            return aiohttp.web.json_response(ApiError(404, "NotFound", path).status(), status=404)
        return aiohttp.web.json_response({"openapi": "3.0.0", "info": {"title": "emulator",
                                          "version": "v0"}, "paths": paths,
                                          "components": {"schemas": {}}})

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.url.path.startswith("/openapi/v3"):
            return self._openapi(request.url.path)
        m = _PATH.match(request.url.path)
        res = None
        if m:
            group = "" if m["core"] else m["group"]
            version = m["core"] or m["version"]
            res = self.kinds.get((group, version, m["plural"]))
        if res is None or not m:
            return await apps.RawHandler._handle(self, request)
        for fault in self.faults:
            method, pattern, code, left = fault
            if left[0] > 0 and method == str(request.method.value) and pattern.search(str(request.url)):
                left[0] -= 1
                return aiohttp.web.json_response(
                    ApiError(code, "Injected", "injected by the test").status(), status=code)
        try:
            return await self._serve(request, res, ns=m["ns"], name=m["name"], sub=m["sub"])
        except ApiError as e:
            return aiohttp.web.json_response(e.status(), status=e.code)

    async def _serve(self, request: rendering.Request, res: Resource, *, ns: str | None,
                     name: str | None, sub: str | None) -> aiohttp.web.StreamResponse:
        method = str(request.method.value)
        if sub not in (None, "status") or (sub == "status" and not res.status_subresource):
            raise ApiError(404, "NotFound", f"subresource {sub!r} is not served")
        if res.namespaced != (ns is not None) and (name is not None or method == "POST"):
            raise ApiError(404, "NotFound", "wrong scope for this resource")
        if method == "GET" and request.params.get("watch") in ("true", "1"):
            return await self._watch(request, res, ns=ns, name=name)
        if method == "GET" and name is None:
            return self._json(self._list(res, ns, request), request, res)
        if method == "GET" and name is not None:
            return self._json(self._get(res, ns, name), request, res)
        if method == "POST" and name is None:
            return aiohttp.web.json_response(await self._create(res, ns, request.data), status=201)
        if method in ("PUT", "PATCH") and name is not None:
            body = request.data if method == "PUT" else self._patched(res, ns, name, request)
            return aiohttp.web.json_response(await self._update(res, ns, name, body, sub=sub))
        if method == "DELETE" and name is not None:
            return aiohttp.web.json_response(await self._delete(res, ns, name))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")

    def _json(self, body: dict[str, Any], request: rendering.Request,
              res: Resource) -> aiohttp.web.StreamResponse:
        if "as=Table" in request.headers.get("Accept", ""):
            return aiohttp.web.json_response(self._table(body, res))
        return aiohttp.web.json_response(body)

    # ------------------------------------------------------------ reads

    def _key(self, res: Resource, ns: str | None, name: str) -> tuple[str, str, str, str]:
        return (res.api_version, res.plural, ns or "", name)

    def _get(self, res: Resource, ns: str | None, name: str) -> dict[str, Any]:
        obj = self.store.get(self._key(res, ns, name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{res.plural}.{res.group} "{name}" not found')
        return obj

    def _items(self, res: Resource, ns: str | None, name: str | None = None) -> list[dict[str, Any]]:
        return [o for (av, pl, o_ns, o_name), o in sorted(self.store.items())
                if av == res.api_version and pl == res.plural and (ns is None or ns == o_ns)
                and (name is None or name == o_name)]

    def _list(self, res: Resource, ns: str | None, request: rendering.Request) -> dict[str, Any]:
        name = self._field_name(request)
        return {"apiVersion": res.api_version, "kind": f"{res.kind}List",
                "metadata": {"resourceVersion": str(self.rv)},
                "items": self._items(res, ns, name)}

    @staticmethod
    def _field_name(request: rendering.Request) -> str | None:
        sel = request.params.get("fieldSelector") or ""
        m = re.fullmatch(r"metadata\.name=([^,]+)", sel)
        if sel and not m:
            raise ApiError(400, "BadRequest", f"unsupported fieldSelector {sel!r}")
        return m.group(1) if m else None

    def _table(self, body: dict[str, Any], res: Resource) -> dict[str, Any]:
        items = body["items"] if "items" in body else [body]
        cols = [{"name": "Name", "type": "string", "format": "name", "description": "Name"}]
        cols += [{"name": c["name"], "type": c["type"], "format": c.get("format", ""),
                  "description": c.get("description", ""), "priority": c.get("priority", 0)}
                 for c in res.columns if c["type"] != "date"]
        rows = [{"cells": [i["metadata"]["name"]]
                 + [_jsonpath(i, c["jsonPath"]) for c in res.columns if c["type"] != "date"],
                 "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                            "metadata": i["metadata"]}}
                for i in items]
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
                "metadata": {"resourceVersion": str(self.rv)},
                "columnDefinitions": cols, "rows": rows}

    # ------------------------------------------------------------ writes

    async def _record(self, res: Resource, kind: str, obj: dict[str, Any]) -> None:
        self.log.append((self.rv, res, kind, copy.deepcopy(obj)))
        if len(self.log) > LOG_LIMIT:
            dropped = self.log[: len(self.log) - LOG_LIMIT]
            del self.log[: len(dropped)]
            self.log_floor = dropped[-1][0] + 1
        await self._notify()

    def _admit(self, res: Resource, obj: dict[str, Any]) -> None:
        if res.schema is not None:
            apply_schema_defaults(obj, res.schema)
        if res.validator is not None:
            errors = sorted(res.validator.iter_errors(obj), key=lambda e: list(map(str, e.path)))
            if errors:
                where = ".".join(map(str, errors[0].absolute_path))
                raise ApiError(422, "Invalid",
                               f'{res.kind} "{obj["metadata"].get("name")}" is invalid: '
                               f"{where}: {errors[0].message}")

    async def _create(self, res: Resource, ns: str | None, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "body is not a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if res.namespaced:
            if meta.get("namespace") not in (None, ns):
                raise ApiError(400, "BadRequest", "the namespace of the provided object does "
                               "not match the namespace sent on the request")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        key = self._key(res, ns, meta["name"])
        if key in self.store:
            raise ApiError(409, "AlreadyExists", f'{res.plural} "{meta["name"]}" already exists')
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        if res.status_subresource:
            obj.pop("status", None)
        self._admit(res, obj)
        self.rv += 1
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion=str(self.rv),
                    generation=1)
        for drop in ("deletionTimestamp", "managedFields"):
            meta.pop(drop, None)
        self.store[key] = obj
        if res.kind == "CustomResourceDefinition":
            self._register_crd(obj)
        await self._record(res, "ADDED", obj)
        return obj

    def _patched(self, res: Resource, ns: str | None, name: str,
                 request: rendering.Request) -> dict[str, Any]:
        current = self._get(res, ns, name)
        ctype = request.headers.get("Content-Type", "")
        try:
            data = json.loads(request.body or b"null")
        except ValueError as e:
            raise ApiError(400, "BadRequest", f"patch is not JSON: {e}") from e
        if "json-patch" in ctype:
            if not isinstance(data, list):
                raise ApiError(400, "BadRequest", "a JSON patch is a list of operations")
            out = _json_patch(current, data)
            # the resourceVersion a JSON patch carries (via op test/replace) is checked in _update
            return out
        if "merge-patch" in ctype:  # merge and strategic merge (lists replaced, not merged)
            patched = _merge_patch(current, data)
            if "resourceVersion" not in ((data or {}).get("metadata") or {}):
                patched["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            return patched
        raise ApiError(415, "UnsupportedMediaType", f"patch type {ctype!r} is not supported "
                       "(no server-side apply in the emulator)")

    async def _update(self, res: Resource, ns: str | None, name: str, body: Any, *,
                      sub: str | None) -> dict[str, Any]:
        current = self._get(res, ns, name)
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "body is not a JSON object")
        meta = body.get("metadata") or {}
        rv = meta.get("resourceVersion")
        if rv is None and res.custom:
            raise ApiError(422, "Invalid", "metadata.resourceVersion: Invalid value: 0x0: "
                           "must be specified for an update")
        if rv is not None and str(rv) != current["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {res.plural} '
                           f'"{name}": the object has been modified; please apply your changes '
                           "to the latest version and try again")
        if sub == "status":
            new = copy.deepcopy(current)
            new["status"] = copy.deepcopy(body.get("status"))
            if new["status"] is None:
                new.pop("status")
        else:
            new = copy.deepcopy(body)
            new["apiVersion"], new["kind"] = res.api_version, res.kind
            keep = ("uid", "creationTimestamp", "generation", "namespace", "name",
                    "deletionTimestamp")
            new_meta = new.setdefault("metadata", {})
            for k in keep:
                if k in current["metadata"]:
                    new_meta[k] = current["metadata"][k]
            if res.status_subresource:
                new.pop("status", None)
                if "status" in current:
                    new["status"] = copy.deepcopy(current["status"])
        self._admit(res, new)
        if res.custom and sub is None:
            strip = ("metadata", "status")
            if ({k: v for k, v in new.items() if k not in strip}
                    != {k: v for k, v in current.items() if k not in strip}):
                new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        if new == current:  # no-op writes do not bump the resourceVersion
            return current
        self.rv += 1
        new["metadata"]["resourceVersion"] = str(self.rv)
        key = self._key(res, ns, name)
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            del self.store[key]
            await self._record(res, "DELETED", new)
            return new
        self.store[key] = new
        await self._record(res, "MODIFIED", new)
        return new

    async def _delete(self, res: Resource, ns: str | None, name: str) -> dict[str, Any]:
        current = self._get(res, ns, name)
        key = self._key(res, ns, name)
        if current["metadata"].get("finalizers"):
            if current["metadata"].get("deletionTimestamp"):
                return current
            new = copy.deepcopy(current)
            self.rv += 1
            new["metadata"].update(deletionTimestamp=_now(), resourceVersion=str(self.rv))
            self.store[key] = new
            await self._record(res, "MODIFIED", new)
            return new
        self.rv += 1
        gone = copy.deepcopy(current)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        del self.store[key]
        await self._record(res, "DELETED", gone)
        return gone

    # ------------------------------------------------------------ watch

    async def _watch(self, request: rendering.Request, res: Resource, *, ns: str | None,
                     name: str | None) -> aiohttp.web.StreamResponse:
        name = name or self._field_name(request)
        if self.held is not None:
            self.held_watches += 1
            await self.held.wait()
        since = request.params.get("resourceVersion") or "0"
        timeout = float(request.params.get("timeoutSeconds") or 1800)
        raw = request._raw_request
        assert raw is not None
        resp = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await resp.prepare(raw)

        async def send(kind: str, obj: dict[str, Any]) -> None:
            await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        if self.changed is None:
            self.changed = asyncio.Condition()
        epoch = self.epoch
        if since == "0":
            pos = self.rv
            for obj in self._items(res, ns, name):
                await send("ADDED", obj)
        else:
            pos = int(since)
            if pos + 1 < self.log_floor:
                await send("ERROR", ApiError(410, "Expired", f"too old resource version: {pos} "
                                             f"({self.log_floor})").status())
                await resp.write_eof()
                return resp
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.open_watches += 1
        try:
            while not self.closing and self.epoch == epoch and loop.time() < deadline:
                if pos + 1 < self.log_floor:  # compacted under a slow watcher
                    await send("ERROR", ApiError(410, "Expired", "too old resource version: "
                                                 f"{pos} ({self.log_floor})").status())
                    break
                for rv, r, kind, obj in [e for e in self.log if e[0] > pos]:
                    pos = rv
                    o_meta = obj["metadata"]
                    if r is res and (ns is None or o_meta.get("namespace") == ns) and (
                            name is None or o_meta["name"] == name):
                        await send(kind, obj)
                async with self.changed:
                    if self.rv == pos and self.epoch == epoch and not self.closing:
                        try:
                            await asyncio.wait_for(self.changed.wait(),
                                                   max(0.01, deadline - loop.time()))
                        except asyncio.TimeoutError:
                            pass
            await resp.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass  # the client went away
        finally:
            self.open_watches -= 1
        return resp


class RunningKube:
    """A ``KubeEmulator`` served over HTTP from its own thread and event loop."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.emulator: KubeEmulator | None = None
        self.url = ""
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self.emulator is None:
            raise RuntimeError(f"emulator did not start: {self._error!r}")

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with KubeEmulator() as emu, kmock.Server(emu) as server:
            self.emulator = emu
            self.url = f"http://{server.host}:{server.port}"
            self._ready.set()
            await self._stop.wait()
            await emu.shutdown()

    def call(self, fn: Callable[[KubeEmulator], Any]) -> Any:
        """Run ``fn(emulator)`` (sync or async) on the emulator's loop and return its result."""
        assert self._loop is not None and self.emulator is not None
        emu = self.emulator

        async def run() -> Any:
            out = fn(emu)
            return await out if asyncio.iscoroutine(out) else out
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(30)

    def drop_watches(self) -> None:
        self.call(lambda e: e.drop_watches())

    def compact(self) -> None:
        self.call(lambda e: e.compact())

    def hold_watches(self) -> None:
        self.call(lambda e: e.hold_watches())

    def release_watches(self) -> None:
        self.call(lambda e: e.release_watches())

    def inject(self, method: str, path_regex: str, code: int, *, times: int = 1) -> None:
        self.call(lambda e: e.inject(method, path_regex, code, times=times))

    def watch_count(self) -> int:
        return int(self.call(lambda e: sum(1 for r in e._requests
                                           if r.params.get("watch") in ("true", "1"))))

    def api_client(self) -> Any:
        """A fresh official-client ApiClient pointed at the emulator (one per controller)."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        return client.ApiClient(cfg)

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "unused"}}],
            "contexts": [{"name": "emulator",
                          "context": {"cluster": "emulator", "user": "tester",
                                      "namespace": "default"}}],
        }))
        return path

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
