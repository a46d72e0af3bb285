"""EdgeModel reconcile: source artifact -> one compiled engine per target device class.

``reconcile_model(resource, ctx)`` is called by ControllerCore's reconcile loop (embedded)
and by controller.crd.source (cluster). It resolves ``spec.source.sha256`` in the artifact
store, and for each target compiles with controller.compile.api.compile_model in an
executor (a worker process by default, never on the event loop) unless an Engine row with
the same key already exists; stores the engine and records the Engine row. Returns the
status dict (phase, observedGeneration, sourceSha256, compiledClasses, engines,
variants, conditions Compiled/Ready/Degraded). Each of ``spec.variants`` is compiled the same
way per target (``status.variants[].engines``); a variant that fails to compile only sets
Degraded. A broken model fails only its own resource, with the
compiler's message. Failures are remembered per key so a resync does not recompile.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine as DbEngine
from sqlmodel import select

from controller.fleet.db import session_scope
from controller.fleet.models import Engine, ResourcePhase
from controller.reconcile.common import condition, meta
from controller.reconcile.versions import record_model_version, version_problem
from controller.store import ArtifactStore

log = logging.getLogger(__name__)


@dataclass
class ModelContext:
    """What reconcile_model needs; built once by its caller."""

    store: ArtifactStore
    db: DbEngine
    work_dir: Path
    executor: Executor | None = None
    # DeviceClass spec dict by name (applied resources / cluster objects), or None
    device_class_spec: Callable[[str], dict[str, Any] | None] = lambda _n: None
    # called with an intermediate status (e.g. phase Compiling) while compiling
    report: Callable[[dict[str, Any]], None] | None = None
    failures: dict[str, str] = field(default_factory=dict)
    now_ms: Callable[[], int] = lambda: int(time.time() * 1000)
    # remote builds (controller.builder.BuildDispatcher.compile_remote): used when the class's
    # compiler is unavailable here (BackendUnavailable), e.g. TensorRT without a GPU
    remote_compile: Callable[..., Awaitable[dict[str, Any]]] | None = None


class _Transient(str):
    """A failure message that is not remembered: the next resync tries again."""


def _compile_job(model: str, device_class: dict[str, Any], precisions: list[str],
                 validation: str | None, accuracy: dict[str, Any] | None,
                 work_dir: str) -> dict[str, Any]:
    """Runs in the worker: compile and return a plain dict (never raises across processes)."""
    try:
        from controller.compile.api import compile_model
        from controller.compile.deviceclass import AccuracySpec, DeviceClassSpec

        dc = DeviceClassSpec(**{**device_class, "isa": tuple(device_class.get("isa", ()))})
        rep = compile_model(Path(model), device_class=dc, precisions=precisions,
                            validation=Path(validation) if validation else None,
                            accuracy=AccuracySpec.from_spec(accuracy) if accuracy else None,
                            work_dir=Path(work_dir))
        return {"ok": True, "report": rep.to_dict()}
    except BaseException as e:  # report every failure as data; the parent decides
        return {"ok": False, "error": str(e) or type(e).__name__,
                "reason": getattr(e, "reason", type(e).__name__),
                "rejected": getattr(e, "rejected", [])}


def resolve_device_class(name: str, ctx: ModelContext) -> dict[str, Any]:
    """DeviceClassSpec fields (as a dict) for ``name``: applied resource first, then built-in."""
    from controller.compile.deviceclass import BUILTIN_DEVICE_CLASSES, DeviceClassSpec

    spec = ctx.device_class_spec(name)
    if spec is not None:
        return DeviceClassSpec.from_spec(spec, name=name).to_dict()
    builtin = BUILTIN_DEVICE_CLASSES.get(name) or BUILTIN_DEVICE_CLASSES.get(
        name.replace("x86-64", "x86_64"))
    if builtin is None:
        from protos.errors import Rejected

        raise Rejected(f"unknown device class {name!r}: apply a DeviceClass named {name}",
                       reason="unknown_device_class")
    return {**builtin.to_dict(), "name": name}


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _engine_entry(row: Engine) -> dict[str, Any]:
    rep = row.report or {}
    return {"deviceClass": row.device_class, "precision": row.precision,
            "engineKind": row.engine_kind, "sha256": row.engine_sha256, "size": row.size,
            "latencyMs": rep.get("latency_ms"), "toolchainVersion": row.toolchain_version,
            "metric": rep.get("metric"), "rejected": rep.get("rejected", [])}


async def reconcile_model(resource: dict[str, Any], ctx: ModelContext) -> dict[str, Any]:
    """Compile what is missing and return the EdgeModel status."""
    _ns, name, gen = meta(resource)
    spec = resource.get("spec") or {}
    prev = resource.get("status") or {}
    now = ctx.now_ms()

    def done(phase: str, engines: list[dict[str, Any]], conds: list[dict[str, Any]],
             **extra: Any) -> dict[str, Any]:
        return {"observedGeneration": gen, "phase": phase, "engines": engines,
                "conditions": conds, **extra}

    src = (spec.get("source") or {}).get("sha256", "")
    if not src or not ctx.store.has(src):
        why = (f"source artifact {src} is not in the store (upload it first)" if src else
               "spec.source.sha256 is not set (edgefleet apply uploads spec.source.path)")
        return done(ResourcePhase.FAILED.value, [], [
            condition(prev, "Ready", False, "SourceMissing", why, generation=gen, now_ms=now),
            condition(prev, "Compiled", False, "SourceMissing", why, generation=gen, now_ms=now),
        ], sourceSha256=src)
    with session_scope(ctx.db) as s:
        refused = version_problem(s, _ns, name, spec, None)
    if refused:
        return done(ResourcePhase.FAILED.value, [], [
            condition(prev, "Ready", False, "VersionNotIncreasing", refused, generation=gen,
                      now_ms=now)], sourceSha256=src, version=int(spec.get("version") or 0))
    val_sha = ((spec.get("validation") or {}).get("samples") or {}).get("sha256")
    if val_sha and not ctx.store.has(val_sha):
        why = f"validation samples {val_sha} are not in the store"
        return done(ResourcePhase.FAILED.value, [], [
            condition(prev, "Ready", False, "SamplesMissing", why, generation=gen, now_ms=now)],
            sourceSha256=src)
    accuracy = spec.get("accuracy")
    targets = spec.get("targets") or []

    def compiling(todo: str, have: list[dict[str, Any]]) -> None:
        if ctx.report is not None:
            ctx.report(done(ResourcePhase.COMPILING.value, have, [
                condition(prev, "Compiled", False, "Compiling", f"compiling for {todo}",
                          generation=gen, now_ms=now)], sourceSha256=src))

    engines, failures = await _compile_targets(ctx, name, src, targets, val_sha=val_sha,
                                               accuracy=accuracy, report=compiling)
    variants, variant_failures = await _compile_variants(ctx, name, spec, targets,
                                                         val_sha=val_sha, accuracy=accuracy)

    n_t = len(targets)
    summary = f"{len(engines)}/{n_t}"
    fail_msg = "; ".join(f"{f['deviceClass']}: {f['message']}" for f in failures)
    var_msg = "; ".join(f"variant {f['variant']} {f['deviceClass']}: {f['message']}"
                        for f in variant_failures)
    now = ctx.now_ms()
    if not engines:
        phase = ResourcePhase.FAILED.value
        conds = [
            condition(prev, "Compiled", False, "CompileFailed", fail_msg, generation=gen,
                      now_ms=now),
            condition(prev, "Ready", False, "CompileFailed", fail_msg, generation=gen,
                      now_ms=now),
            condition(prev, "Degraded", True, "CompileFailed", fail_msg, generation=gen,
                      now_ms=now)]
    else:
        phase = ResourcePhase.READY.value
        conds = [
            condition(prev, "Compiled", not failures,
                      "AllCompiled" if not failures else "SomeFailed",
                      f"engines for {summary} device classes", generation=gen, now_ms=now),
            condition(prev, "Ready", True, "EnginesAvailable",
                      f"engines for {summary} device classes", generation=gen, now_ms=now),
            condition(prev, "Degraded", bool(failures or variant_failures),
                      "CompileFailed" if failures else (
                          "VariantCompileFailed" if variant_failures else "AsExpected"),
                      "; ".join(m for m in (fail_msg, var_msg) if m),
                      generation=gen, now_ms=now)]
    status = done(phase, engines, conds, sourceSha256=src, compiledClasses=summary,
                  failures=failures, version=int(spec.get("version") or 0),
                  variants=variants)
    if engines:
        record_model_version(ctx.db, {**resource, "status": status}, now)
    return status


async def _compile_targets(
        ctx: ModelContext, name: str, src: str, targets: list[dict[str, Any]], *,
        val_sha: str | None, accuracy: dict[str, Any] | None,
        report: Callable[[str, list[dict[str, Any]]], None] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Engines (existing or compiled now) and failures of source ``src`` for ``targets``."""
    engines: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    todo: list[tuple[str, dict[str, Any], list[str], str]] = []
    for t in targets:
        cls_name = str(t.get("deviceClass", ""))
        precisions = list(t.get("precisions") or ["fp32"])
        try:
            dc = resolve_device_class(cls_name, ctx)
        except Exception as e:
            failures.append({"deviceClass": cls_name, "message": str(e)})
            continue
        key = _key(src, dc, precisions, val_sha or "", accuracy or {})
        row = _find_engine(ctx, src, cls_name, key)
        if row is not None:
            engines.append(_engine_entry(row))
        elif key in ctx.failures:
            failures.append({"deviceClass": cls_name, "message": ctx.failures[key]})
        else:
            todo.append((cls_name, dc, precisions, key))

    if todo and report is not None:
        report(", ".join(c for c, *_ in todo), list(engines))
    for cls_name, dc, precisions, key in todo:
        entry, err = await _compile_one(ctx, name, src, cls_name, dc, precisions, val_sha,
                                        accuracy, key)
        if entry is not None:
            engines.append(entry)
        else:
            if not isinstance(err, _Transient):
                ctx.failures[key] = err
            failures.append({"deviceClass": cls_name, "message": err})
    return engines, failures


async def _compile_variants(
        ctx: ModelContext, name: str, spec: dict[str, Any], targets: list[dict[str, Any]], *,
        val_sha: str | None, accuracy: dict[str, Any] | None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """``spec.variants`` compiled like the main model (same targets, precisions, validation
    samples and accuracy gate): status entries ``{name, sourceSha256, engines, failures}``
    and the failures, each naming its variant. A variant never fails the model."""
    out: list[dict[str, Any]] = []
    all_failures: list[dict[str, str]] = []
    for v in spec.get("variants") or []:
        vname = str(v.get("name", ""))
        vsrc = str((v.get("source") or {}).get("sha256") or "")
        if not vsrc or not ctx.store.has(vsrc):
            msg = (f"source artifact {vsrc} is not in the store" if vsrc else
                   "source.sha256 is not set (edgefleet apply uploads source.path)")
            fails = [{"deviceClass": str(t.get("deviceClass", "")), "message": msg}
                     for t in targets]
            engines: list[dict[str, Any]] = []
        else:
            engines, fails = await _compile_targets(ctx, f"{name}.{vname}", vsrc, targets,
                                                    val_sha=val_sha, accuracy=accuracy)
        out.append({"name": vname, "sourceSha256": vsrc, "engines": engines,
                    "failures": fails})
        all_failures.extend({**f, "variant": vname} for f in fails)
    return out, all_failures


def _find_engine(ctx: ModelContext, src: str, cls_name: str, key: str) -> Engine | None:
    with session_scope(ctx.db) as s:
        rows = s.exec(select(Engine).where(Engine.model_sha256 == src,
                                           Engine.device_class == cls_name)).all()
    for row in rows:
        if (row.report or {}).get("reconcile_key") == key and ctx.store.has(row.engine_sha256):
            return row
    return None


async def _compile_one(ctx: ModelContext, model_name: str, src: str, cls_name: str,
                       dc: dict[str, Any], precisions: list[str], val_sha: str | None,
                       accuracy: dict[str, Any] | None,
                       key: str) -> tuple[dict[str, Any] | None, str]:
    work = ctx.work_dir / "compile" / key[:24]
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    loop = asyncio.get_running_loop()
    log.info("compiling %s (%s) for %s at %s", model_name, src[:12], cls_name, precisions)
    try:
        res = await loop.run_in_executor(
            ctx.executor, _compile_job, str(ctx.store.path(src)), dc, precisions,
            str(ctx.store.path(val_sha)) if val_sha else None, accuracy, str(work))
    except Exception as e:  # a dead worker process is this model's failure, not the loop's
        shutil.rmtree(work, ignore_errors=True)
        return None, f"compiler worker failed: {type(e).__name__}: {e}"
    if (not res.get("ok") and res.get("reason") == "backend_unavailable"
            and ctx.remote_compile is not None):
        log.info("no local compiler for %s (%s); sending it to a builder", cls_name, res["error"])
        res = await ctx.remote_compile(src, device_class=dc, precisions=precisions,
                                       validation_sha256=val_sha, accuracy=accuracy,
                                       model_name=model_name)
        if not res.get("ok") and res.get("transient"):
            shutil.rmtree(work, ignore_errors=True)
            return None, _Transient(str(res["error"]))
    try:
        if not res.get("ok"):
            log.warning("compile of %s for %s failed: %s", model_name, cls_name, res["error"])
            return None, str(res["error"])
        rep = res["report"]
        stored = ctx.store.put_file(Path(rep["engine_path"]), kind="engine",
                                    meta={"model": model_name, "deviceClass": cls_name,
                                          "precision": rep["precision"]})
        rep = {**rep, "reconcile_key": key, "engine_path": ""}
        row = Engine(model_sha256=src, device_class=cls_name, precision=rep["precision"],
                     toolchain_version=str(rep.get("toolchain_version", "")),
                     engine_sha256=stored.sha256, size=stored.size,
                     engine_kind=str(rep.get("engine_kind", "")),
                     fingerprint=dict(rep.get("fingerprint") or {}),
                     signature=dict(rep.get("signature") or {}), report=rep,
                     created_ms=ctx.now_ms())
        with session_scope(ctx.db) as s:
            s.add(row)
        return _engine_entry(row), ""
    finally:
        shutil.rmtree(work, ignore_errors=True)
