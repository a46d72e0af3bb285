"""ControllerCore: the embedded controller (store, keys, DB, MQTT, reconcile loop) in one object.

Started by ``edgefleet up`` (controller.cli, with the API beside it) and by tests:

    core = ControllerCore(Settings(data_dir=..., mqtt_port=...))
    await core.start()
    results = core.apply(docs)           # EdgeModel / EdgeRollout / DeviceClass dicts
    ...
    await core.stop()

It owns one aiomqtt (MQTT 5) connection (reconnecting), routes device messages to the
ingest, publishes the root-signed key list, and runs a level-triggered reconcile loop
(every ``resync_s`` and at once after a change) that calls controller.reconcile.models and
controller.reconcile.rollouts and writes their status into the Resource table. ``delete``
marks a row deleted; the loop then runs controller.reconcile.cleanup's finalizer for it and
removes the row (a crash in between finalizes again: the finalizers are idempotent).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import copy
import logging
import multiprocessing
import time
import uuid
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
from sqlmodel import col, select

from controller.fleet.db import make_engine, session_scope
from controller.fleet.ingest import Ingest
from controller.fleet.models import Event, Resource
from controller.ota.keys import KeyStore
from controller.ota.planner import DeltaPlanner
from controller.ota.publisher import Publisher
from controller.reconcile.cleanup import CleanupContext, finalize_model, finalize_rollout
from controller.reconcile.models import ModelContext, reconcile_model
from controller.reconcile.rollouts import RolloutContext, reconcile_rollout
from controller.reconcile.versions import ProbeCache, check_version_goes_up
from controller.settings import Settings
from controller.store import ArtifactStore
from protos.errors import Rejected

log = logging.getLogger(__name__)
API_VERSION = "edgefleet.io/v1alpha1"
CLUSTER_SCOPED = {"DeviceClass"}
KINDS = ("DeviceClass", "EdgeModel", "EdgeRollout")


@dataclass
class ApplyResult:
    kind: str
    namespace: str
    name: str
    action: str          # created | configured | unchanged | rejected
    generation: int = 0
    message: str = ""


def _now_ms() -> int:
    return int(time.time() * 1000)


def resource_dict(r: Resource) -> dict[str, Any]:
    """A Resource row as a Kubernetes-style object."""
    md: dict[str, Any] = {"name": r.name, "uid": r.uid, "generation": r.generation,
                          "resourceVersion": str(r.resource_version),
                          "labels": dict(r.labels or {}),
                          # with milliseconds: rollouts of one model created within the
                          # same second still have an order (the newer owns shared devices)
                          "creationTimestamp": time.strftime(
                              "%Y-%m-%dT%H:%M:%S", time.gmtime(r.created_ms / 1000))
                          + f".{r.created_ms % 1000:03d}Z"}
    if r.namespace:
        md["namespace"] = r.namespace
    return {"apiVersion": API_VERSION, "kind": r.kind, "metadata": md,
            "spec": copy.deepcopy(r.spec or {}), "status": copy.deepcopy(r.status or {})}


class ControllerCore:
    """The controller without its HTTP API. Not thread-safe: use it from one event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = make_engine(settings.resolved_db_url)
        self.store = ArtifactStore(settings.resolved_store_dir,
                                   max_artifact_bytes=settings.max_artifact_bytes, engine=self.db)
        self.keys = KeyStore.load_or_init(settings.resolved_keys_dir)
        self.planner = DeltaPlanner(self.store, self.db)
        self.publisher = Publisher(settings, self.store, self.db)
        self.probes = ProbeCache(self.store)
        self.ingest = Ingest(settings, self.db, chunk_handler=self.publisher.handle_chunk_request,
                             on_change=lambda _k: self.kick())
        self.executor: Executor | None = None
        self.connected = asyncio.Event()
        self._kick = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._running: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        self._compile_failures: dict[str, str] = {}
        self._finalizing: set[asyncio.Task[None]] = set()   # finalize tasks in _running
        self._again: set[tuple[str, str, str]] = set()      # kicked while reconciling
        # controller.builder.BuildDispatcher, set by whoever starts one (remote TensorRT builds)
        self.build_dispatcher: Any = None
        self.reconcile_count = 0
        # replicas (controller.fleet.lease.DbLease or anything with ``is_leader``): only the
        # leader reconciles; None = this process is the only controller
        self.leader: Any = None
        self._stopping = False
        self._wake: asyncio.TimerHandle | None = None   # earliest requested re-reconcile

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self, *, reconcile: bool = True) -> None:
        """Start MQTT, the publisher and (unless ``reconcile=False``: cluster mode, where
        controller/cluster.py feeds the same reconcile functions from Kubernetes) the loop
        over the Resource table."""
        if self.settings.compile_in_process_pool:
            self.executor = ProcessPoolExecutor(
                max_workers=self.settings.compile_workers,
                mp_context=multiprocessing.get_context("spawn"))
        else:
            self.executor = ThreadPoolExecutor(max_workers=self.settings.compile_workers,
                                               thread_name_prefix="compile")
        self.publisher.start()
        self._tasks = [asyncio.create_task(self._mqtt_loop(), name="controller-mqtt"),
                       asyncio.create_task(self.ingest.run(), name="controller-ingest")]
        if reconcile:
            self._tasks.append(asyncio.create_task(self._reconcile_loop(),
                                                   name="controller-reconcile"))

    async def stop(self) -> None:
        self._stopping = True      # wait_for may swallow a cancel that races a kick (3.11)
        self._kick.set()
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        tasks = self._tasks + list(self._running.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        self._running.clear()
        with contextlib.suppress(Exception):
            await self.ingest.drain()       # what was received is written, not lost
        await self.publisher.stop()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None
        self.db.dispose()

    def kick(self) -> None:
        """Ask the reconcile loop to run now."""
        self._kick.set()

    def kick_after(self, delay_s: float) -> None:
        """Ask the reconcile loop to run in ``delay_s`` seconds (e.g. when a soak ends).

        One timer, the earliest asked for: every pass asks again for what it still waits on.
        """
        if self._stopping:
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, delay_s) + 0.05
        if self._wake is not None and loop.time() < self._wake.when() <= when:
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake = loop.call_at(when, self.kick)

    # -- MQTT -----------------------------------------------------------------------------------
    async def _mqtt_loop(self) -> None:
        s = self.settings
        while not self._stopping:
            try:
                async with aiomqtt.Client(
                    s.mqtt_host, s.mqtt_port, identifier=f"{s.mqtt_client_id}-{uuid.uuid4().hex[:8]}",
                    username=s.mqtt_username, **s.aiomqtt_options(),
                    password=s.mqtt_password, keepalive=30,
                    # unbounded: the ingest drains it at once into its own batches, where
                    # heartbeats coalesce and every drop is counted (a bounded aiomqtt queue
                    # discards messages the broker already considers delivered, silently)
                    max_queued_incoming_messages=0,
                ) as client:
                    for sub in self.ingest.subscriptions():
                        await client.subscribe(sub, qos=1)
                    self.publisher.attach(client)
                    await self.publisher.publish_key_list(self.keys.key_list_envelope())
                    self.connected.set()
                    log.info("controller connected to mqtt://%s:%d", s.mqtt_host, s.mqtt_port)
                    self.kick()
                    async for message in client.messages:
                        payload = message.payload
                        if not isinstance(payload, (bytes, bytearray)):
                            payload = str(payload or "").encode()
                        self.ingest.submit(str(message.topic), bytes(payload),
                                           retained=bool(message.retain))
            except aiomqtt.MqttError as e:
                log.warning("MQTT connection to %s:%d lost: %s; retrying", s.mqtt_host,
                            s.mqtt_port, e)
            except Exception as e:
                log.exception("MQTT loop error: %s", e)
            finally:
                self.publisher.attach(None)
                self.connected.clear()
            await asyncio.sleep(s.mqtt_reconnect_s)

    async def publish_key_list(self) -> None:
        """Re-publish the key list (after ``edgefleet keys rotate|revoke``)."""
        self.keys = KeyStore(self.settings.resolved_keys_dir)
        await self.publisher.publish_key_list(self.keys.key_list_envelope())

    # -- resources ------------------------------------------------------------------------------
    def apply(self, docs: list[Any], *, base_dir: Path | None = None) -> list[ApplyResult]:
        """Store resources (generation bump on spec change) and trigger reconcile.

        ``docs`` are dicts or controller.crd.schema.LoadedDoc (whose base_dir resolves
        relative ``source.path``); local files named by path are uploaded and pinned by sha256.
        """
        out = []
        for item in docs:
            doc = getattr(item, "doc", item)
            bdir = getattr(item, "base_dir", None) or base_dir or Path.cwd()
            try:
                out.append(self._apply_one(doc, Path(bdir)))
            except Rejected as e:
                md = doc.get("metadata") if isinstance(doc, dict) else None
                md = md if isinstance(md, dict) else {}
                out.append(ApplyResult(str(doc.get("kind", "")) if isinstance(doc, dict) else "",
                                       str(md.get("namespace", "")), str(md.get("name", "")),
                                       "rejected", message=str(e)))
        self.kick()
        return out

    def _apply_one(self, doc: dict[str, Any], base_dir: Path) -> ApplyResult:
        try:
            from controller.crd import schema
        except ImportError:  # pragma: no cover - schema module is part of the package
            schema = None  # type: ignore[assignment]
        if schema is not None:
            schema.validate(doc)
            doc = schema.with_defaults(doc)
        kind = str(doc.get("kind", ""))
        if kind not in KINDS:
            raise Rejected(f"kind {kind!r} is not one of {KINDS}", reason="bad_kind")
        md = doc.get("metadata") or {}
        name = str(md.get("name", ""))
        ns = "" if kind in CLUSTER_SCOPED else str(md.get("namespace") or "default")
        spec = copy.deepcopy(doc.get("spec") or {})
        if kind == "EdgeModel":
            self._pin_files(spec, base_dir)
        labels = dict(md.get("labels") or {})
        now = _now_ms()
        with session_scope(self.db) as s:
            row = s.exec(select(Resource).where(Resource.kind == kind, Resource.namespace == ns,
                                                Resource.name == name,
                                                col(Resource.deleted_ms).is_(None))).first()
            if kind == "EdgeModel":
                check_version_goes_up(s, ns, name, spec, row.spec if row is not None else None)
            if row is None:
                row = Resource(kind=kind, namespace=ns, name=name, uid=str(uuid.uuid4()),
                               spec=spec, labels=labels, created_ms=now, updated_ms=now)
                s.add(row)
                action = "created"
            elif row.spec == spec and (row.labels or {}) == labels:
                return ApplyResult(kind, ns, name, "unchanged", row.generation)
            else:
                if row.spec != spec:
                    row.generation += 1
                row.resource_version += 1
                row.spec, row.labels, row.updated_ms = spec, labels, now
                s.add(row)
                action = "configured"
            s.add(Event(at_ms=now, kind=kind, name=f"{ns}/{name}" if ns else name,
                        reason=action.capitalize(), message=f"{kind} {name} {action}"))
            gen = row.generation
        return ApplyResult(kind, ns, name, action, gen)

    def _pin_files(self, spec: dict[str, Any], base_dir: Path) -> None:
        refs = [spec.get("source")]
        refs.append((spec.get("validation") or {}).get("samples"))
        refs.extend(v.get("source") for v in spec.get("variants") or [])
        for ref in refs:
            if not isinstance(ref, dict) or ref.get("sha256") or not ref.get("path"):
                continue
            p = Path(str(ref["path"]))
            p = p if p.is_absolute() else (base_dir / p)
            ref["sha256"] = self.upload_artifact(p, kind="model")

    def upload_artifact(self, src: Path | bytes, kind: str = "model") -> str:
        """Put a file or bytes into the store (limit max_upload_bytes); returns its sha256."""
        lim = self.settings.max_upload_bytes
        if isinstance(src, (bytes, bytearray)):
            return self.store.put_bytes(bytes(src), kind=kind, max_bytes=lim).sha256
        return self.store.put_file(Path(src), kind=kind, max_bytes=lim,
                                   meta={"filename": Path(src).name}).sha256

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        ns = "" if kind in CLUSTER_SCOPED else (namespace or "default")
        with session_scope(self.db) as s:
            row = s.exec(select(Resource).where(Resource.kind == kind, Resource.namespace == ns,
                                                Resource.name == name,
                                                col(Resource.deleted_ms).is_(None))).first()
            if row is None:
                return False
            row.deleted_ms = _now_ms()
            s.add(row)
        self.kick()
        return True

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        ns = "" if kind in CLUSTER_SCOPED else (namespace or "default")
        with session_scope(self.db) as s:
            row = s.exec(select(Resource).where(Resource.kind == kind, Resource.namespace == ns,
                                                Resource.name == name,
                                                col(Resource.deleted_ms).is_(None))).first()
            return resource_dict(row) if row else None

    def list(self, kind: str | None = None) -> list[dict[str, Any]]:
        with session_scope(self.db) as s:
            q = select(Resource).where(col(Resource.deleted_ms).is_(None))
            if kind:
                q = q.where(Resource.kind == kind)
            return [resource_dict(r) for r in s.exec(q.order_by(Resource.id)).all()]

    # -- reconcile ------------------------------------------------------------------------------
    def model_context(self) -> ModelContext:
        def dc_spec(name: str) -> dict[str, Any] | None:
            r = self.get("DeviceClass", "", name)
            return r["spec"] if r else None

        return ModelContext(store=self.store, db=self.db,
                            work_dir=self.settings.data_dir / "work", executor=self.executor,
                            device_class_spec=dc_spec, failures=self._compile_failures,
                            remote_compile=(self.build_dispatcher.compile_remote
                                            if self.build_dispatcher is not None else None))

    def rollout_context(self) -> RolloutContext:
        return RolloutContext(db=self.db, settings=self.settings, planner=self.planner,
                              keys=self.keys, publisher=self.publisher,
                              get_model=lambda ns, n: self.get("EdgeModel", ns, n),
                              requeue_after=self.kick_after,
                              list_rollouts=lambda: self.list("EdgeRollout"),
                              probe_for=self.probes.probe_for)

    def cleanup_context(self) -> CleanupContext:
        return CleanupContext(db=self.db, keys=self.keys, publisher=self.publisher,
                              list_rollouts=lambda: self.list("EdgeRollout"),
                              requeue_rollouts=self.kick)

    def _deleted(self) -> builtins.list[dict[str, Any]]:
        with session_scope(self.db) as s:
            rows = s.exec(select(Resource).where(col(Resource.deleted_ms).is_not(None))
                          .order_by(Resource.id)).all()
            return [resource_dict(r) for r in rows]

    async def _finalize_one(self, res: dict[str, Any],
                            previous: asyncio.Task[None] | None) -> None:
        """Run the deleted resource's finalizer (after its reconcile, cancelled), then
        remove its row; on failure the row stays and the next pass tries again."""
        kind, md = res["kind"], res["metadata"]
        if previous is not None and not previous.done():
            previous.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await previous
        try:
            if kind == "EdgeRollout":
                await finalize_rollout(res, self.cleanup_context())
            elif kind == "EdgeModel":
                await finalize_model(res, self.cleanup_context())
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("finalizing %s %s failed (retried): %s", kind, md.get("name"), e)
            self.kick_after(self.settings.mqtt_reconnect_s)
            return
        with session_scope(self.db) as s:
            row = s.exec(select(Resource).where(Resource.uid == md["uid"])).first()
            if row is not None:
                s.delete(row)
        log.info("%s %s deleted and finalized", kind, md.get("name"))
        self.kick()       # a re-applied one of the same name may go on

    async def _reconcile_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last = -1e9
        while not self._stopping:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout=self.settings.resync_s)
            # kicks that arrive together (a batch of telemetry, a burst of applies) share one
            # pass: at most one pass per reconcile_min_interval_s
            pause = last + self.settings.reconcile_min_interval_s - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            last = loop.time()
            self._kick.clear()
            if self._stopping:
                return
            if self.leader is not None and not self.leader.is_leader:
                continue       # a follower replica: ingest and API only
            try:
                for res in self._deleted():
                    md = res["metadata"]
                    key = (res["kind"], md.get("namespace", ""), md["name"])
                    task = self._running.get(key)
                    if task is not None and not task.done() and task in self._finalizing:
                        continue
                    self._finalizing.discard(task)  # type: ignore[arg-type]
                    ftask = asyncio.create_task(self._finalize_one(res, task))
                    self._finalizing.add(ftask)
                    self._running[key] = ftask
                for res in self.list():
                    md = res["metadata"]
                    key = (res["kind"], md.get("namespace", ""), md["name"])
                    task = self._running.get(key)
                    if task is not None and not task.done():
                        self._again.add(key)   # changed while it runs: run once more after
                        continue
                    self._running[key] = asyncio.create_task(self._reconcile_one(res))
            except Exception:
                log.exception("reconcile pass failed")
            self.reconcile_count += 1

    async def _reconcile_one(self, res: dict[str, Any]) -> None:
        kind, md = res["kind"], res["metadata"]
        try:
            if kind == "EdgeModel":
                ctx = self.model_context()

                def report(st: dict[str, Any]) -> None:
                    self._write_status(res, st)

                ctx.report = report
                status = await reconcile_model(res, ctx)
            elif kind == "EdgeRollout":
                status = await reconcile_rollout(res, self.rollout_context())
            else:
                status = {"observedGeneration": md["generation"], "phase": "Ready"}
        except asyncio.CancelledError:
            raise
        except Exception as e:  # one resource's bug must not stop the others
            log.exception("reconcile of %s %s failed", kind, md.get("name"))
            status = {**(res.get("status") or {}), "phase": "Failed",
                      "message": f"internal error: {type(e).__name__}: {e}"}
        if self._write_status(res, status) and kind == "EdgeModel":
            self.kick()   # rollouts waiting for engines can go on
        key = (kind, md.get("namespace", ""), md["name"])
        if key in self._again:
            self._again.discard(key)
            self.kick()

    def _write_status(self, res: dict[str, Any], status: dict[str, Any]) -> bool:
        """Store ``status`` if the resource still exists; True when its phase/engines changed.

        A replica that lost the lease while the pass ran writes nothing (the new leader's
        pass decides)."""
        if self.leader is not None and not self.leader.is_leader:
            return False
        md = res["metadata"]
        with session_scope(self.db) as s:
            row = s.exec(select(Resource).where(Resource.uid == md["uid"],
                                                col(Resource.deleted_ms).is_(None))).first()
            if row is None:
                return False
            old = row.status or {}
            if row.generation != status.get("observedGeneration", row.generation):
                return False   # computed for an older spec; the next pass redoes it
            changed = (old.get("phase"), old.get("engines")) != (status.get("phase"),
                                                                  status.get("engines"))
            if old != status:
                row.status = status
                s.add(row)
            if changed:
                s.add(Event(at_ms=_now_ms(), kind=row.kind,
                            name=f"{row.namespace}/{row.name}" if row.namespace else row.name,
                            type="Warning" if status.get("phase") == "Failed" else "Normal",
                            reason=str(status.get("phase")),
                            message=str(status.get("message") or _cond_msg(status))[:2000]))
        return changed


def _cond_msg(status: dict[str, Any]) -> str:
    for c in status.get("conditions") or []:
        if c.get("message"):
            return str(c["message"])
    return ""
