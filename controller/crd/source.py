"""Cluster mode: the Kubernetes API is the source of truth for edgefleet resources.

``ClusterSource`` lists then watches EdgeModels, EdgeRollouts and DeviceClasses with the
official ``kubernetes`` client (one thread per kind), keeps the latest object of each in a
cache, and workers reconcile them, level-triggered: they always work from the latest cached
object, so events can be merged or replayed without harm. Each kind has its own work queue
and workers (``workers_per_kind``; controller/crd/workqueue.py), so a long EdgeModel compile
does not hold up EdgeRollouts, and one object is never reconciled concurrently with itself.
Watches resume from the last resourceVersion after a drop, relist on 410 Gone, and back off
on errors.

Per object the worker: adds the finalizer ``edgefleet.io/cleanup``; on deletion calls
``Reconciler.finalize`` and removes it; re-checks the object against the CRD schema
(cluster rules); calls ``Reconciler.reconcile(kind, obj) -> status``; writes status with
``observedGeneration`` and Ready/Compiled/Progressing/Degraded conditions (409 retried by
``StatusWriter``); records Events when a condition changes. ``report_progress`` writes an
intermediate status while a reconcile is still running (EdgeModel phase Compiling). Objects whose status already
says Ready for their current generation are not reconciled again (a restarted controller
resumes from the status stored in the cluster). Non-Ready objects are requeued every
``progress_requeue_s``. With a ``LeaderElector`` only the leader reconciles and writes.

Callers: the ``edgefleet controller`` command (cluster mode) and tests/integration/test_kube_*.
The reconcile logic itself lives in ``controller.reconcile`` (it implements ``Reconciler``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any, Protocol

from protos.errors import EdgefleetError, Rejected, RetryLater

from . import schema
from .leader import LeaderElector
from .status import StatusWriter, condition, merge_status, same_status
from .workqueue import WorkQueue

log = logging.getLogger(__name__)

FINALIZER = "edgefleet.io/cleanup"
KINDS = ("DeviceClass", "EdgeModel", "EdgeRollout")
Key = tuple[str, str, str]  # (kind, namespace or "", name)


class Reconciler(Protocol):
    """What ``ClusterSource`` calls. Must be idempotent: it may run again on the same object."""

    def reconcile(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Bring the world in line with ``obj``; return its new ``status`` (conditions included).

        Raise RetryLater for transient trouble (requeued with backoff), Rejected or GiveUp
        for problems only a spec change can fix (reported as Degraded, not retried).
        """
        ...

    def finalize(self, kind: str, obj: dict[str, Any]) -> None:
        """Clean up after a deleted object (before its finalizer is removed)."""
        ...


def is_settled(obj: dict[str, Any]) -> bool:
    """True when the stored status is Ready (or permanently Degraded) for this generation."""
    status = obj.get("status") or {}
    if status.get("observedGeneration") != obj["metadata"].get("generation"):
        return False
    conds = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    if conds.get("Progressing") == "True":
        return False
    return conds.get("Ready") == "True" or conds.get("Degraded") == "True"


def _older(obj: dict[str, Any], than: dict[str, Any] | None) -> bool:
    """resourceVersions are opaque, but etcd's are integers: compare them when they are."""
    if than is None:
        return False
    a, b = obj["metadata"].get("resourceVersion"), than["metadata"].get("resourceVersion")
    try:
        return int(a) < int(b)
    except (TypeError, ValueError):
        return False


class ClusterSource:
    """List/watch -> cache -> work queue -> reconcile -> status, for the edgefleet kinds."""

    def __init__(
        self,
        api_client: Any,
        reconciler: Reconciler,
        *,
        namespace: str | None = None,
        kinds: tuple[str, ...] = KINDS,
        elector: LeaderElector | None = None,
        progress_requeue_s: float = 5.0,
        resync_s: float | None = 600.0,
        watch_timeout_s: int = 300,
        backoff_base_s: float = 0.2,
        backoff_max_s: float = 30.0,
        component: str = "edgefleet-controller",
        level_kinds: tuple[str, ...] = (),
        workers_per_kind: int | dict[str, int] = 1,
    ) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.custom: Any = client.CustomObjectsApi(api_client)
        self.reconciler = reconciler
        self.namespace = namespace
        self.infos = {k: schema.crds()[k] for k in kinds}
        self.elector = elector
        self.writer = StatusWriter(api_client, component=component, is_leader=self._leading)
        self.progress_requeue_s = progress_requeue_s
        self.resync_s = resync_s
        self.watch_timeout_s = watch_timeout_s
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        # kinds that depend on state outside Kubernetes (EdgeRollout: the fleet) are never
        # "settled": they are reconciled again every progress_requeue_s even when Ready
        self.level_kinds = frozenset(level_kinds)
        self.cache: dict[Key, dict[str, Any]] = {}
        self.stats: Counter[str] = Counter()
        self._failures: Counter[Key] = Counter()
        self._progress: dict[Key, dict[str, Any]] = {}  # last progress status written per key
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._queues = {k: WorkQueue(self._cv, self._stop) for k in kinds}
        per = workers_per_kind
        self.workers = {k: max(1, int(per.get(k, 1) if isinstance(per, dict) else per))
                        for k in kinds}
        self._threads: list[threading.Thread] = []
        self._watches: list[Any] = []
        self.synced = {k: threading.Event() for k in kinds}
        if elector is not None:
            prev = elector.on_started_leading

            def started() -> None:
                if prev is not None:
                    prev()
                self.enqueue_all()
            elector.on_started_leading = started

    def _leading(self) -> bool:
        return self.elector is None or self.elector.is_leader

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._stop.clear()
        for kind in self.infos:
            t = threading.Thread(target=self._watch_loop, args=(kind,), name=f"watch-{kind}",
                                 daemon=True)
            self._threads.append(t)
        for kind, n in self.workers.items():
            for i in range(n):
                self._threads.append(threading.Thread(target=self._worker, args=(kind,),
                                                      name=f"reconcile-{kind}-{i}", daemon=True))
        if self.resync_s:
            self._threads.append(threading.Thread(target=self._resync_loop, daemon=True))
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for w in list(self._watches):
            w.stop()
        with self._cv:
            self._cv.notify_all()
        for t in self._threads:
            t.join(10)
        self._threads.clear()

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(e.wait(max(0.0, deadline - time.monotonic())) for e in self.synced.values())

    # ------------------------------------------------------------ queue

    def enqueue(self, key: Key, *, delay_s: float = 0.0) -> None:
        queue = self._queues.get(key[0])
        if queue is not None:
            queue.add(key, delay_s=delay_s)

    def enqueue_all(self) -> None:
        for key in list(self.cache):
            self.enqueue(key)

    def in_process(self) -> set[Key]:
        """Keys being reconciled right now (for tests and metrics)."""
        out: set[Key] = set()
        for q in self._queues.values():
            out |= q.in_process()  # type: ignore[arg-type]
        return out

    def _backoff(self, key: Key) -> float:
        with self._cv:
            self._failures[key] += 1
            n = self._failures[key]
        return min(self.backoff_max_s, self.backoff_base_s * 2 ** (n - 1))

    # ------------------------------------------------------------ list + watch

    def _list_fn(self, kind: str) -> tuple[Any, tuple[Any, ...]]:
        info = self.infos[kind]
        if info.namespaced and self.namespace:
            return self.custom.list_namespaced_custom_object, (
                schema.GROUP, schema.VERSION, self.namespace, info.plural)
        return self.custom.list_cluster_custom_object, (schema.GROUP, schema.VERSION, info.plural)

    def _key(self, kind: str, obj: dict[str, Any]) -> Key:
        meta = obj["metadata"]
        return (kind, meta.get("namespace") or "", meta["name"])

    def _relist(self, kind: str) -> str:
        fn, args = self._list_fn(kind)
        listing = fn(*args)
        seen = set()
        for obj in listing.get("items") or []:
            key = self._key(kind, obj)
            seen.add(key)
            self.cache[key] = obj
            self.enqueue(key)
        for key in [k for k in self.cache if k[0] == kind and k not in seen]:
            del self.cache[key]
        self.stats["lists"] += 1
        self.synced[kind].set()
        return str(listing["metadata"]["resourceVersion"])

    def _watch_loop(self, kind: str) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        rv: str | None = None
        failures = 0
        while not self._stop.is_set():
            w = watch.Watch()
            self._watches.append(w)
            try:
                if rv is None:
                    rv = self._relist(kind)
                fn, args = self._list_fn(kind)
                self.stats["watches"] += 1
                for event in w.stream(fn, *args, resource_version=rv,
                                      timeout_seconds=self.watch_timeout_s):
                    obj = event["raw_object"]
                    rv = str(obj["metadata"]["resourceVersion"])
                    self._on_event(kind, event["type"], obj)
                    failures = 0
                    if self._stop.is_set():
                        break
            except ApiException as e:
                if e.status == 410:
                    log.info("watch of %s expired (410 Gone): relisting", kind)
                    self.stats["relists_410"] += 1
                    rv = None
                    continue
                failures += 1
                log.warning("watch of %s failed: %s %s", kind, e.status, e.reason)
            except Exception as e:
                if self._stop.is_set():
                    break
                failures += 1
                log.warning("watch of %s broke: %s", kind, e)
            finally:
                self._watches.remove(w)
            if failures:
                self._stop.wait(min(self.backoff_max_s, self.backoff_base_s * 2 ** failures))

    def _on_event(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        if type_ not in ("ADDED", "MODIFIED", "DELETED"):
            return
        key = self._key(kind, obj)
        self.stats[f"events_{type_.lower()}"] += 1
        if type_ == "DELETED":
            self.cache.pop(key, None)
            return
        if _older(obj, self.cache.get(key)):
            return  # we already stored something newer ourselves
        self.cache[key] = obj
        self.enqueue(key)

    def _resync_loop(self) -> None:
        assert self.resync_s
        while not self._stop.wait(self.resync_s):
            for key, obj in list(self.cache.items()):
                if not self._settled(key[0], obj):
                    self.enqueue(key)

    # ------------------------------------------------------------ reconcile

    def _worker(self, kind: str) -> None:
        queue = self._queues[kind]
        while True:
            key = queue.get()
            if key is None:
                return
            try:
                self._process(key)  # type: ignore[arg-type]
            finally:
                queue.done(key)

    def _process(self, key: Key) -> None:
        if not self._leading():
            self.stats["not_leader_skips"] += 1
            return  # on_started_leading enqueues everything again
        obj = self.cache.get(key)
        if obj is None:
            return
        try:
            requeue = self._reconcile_one(key[0], obj)
            with self._cv:
                self._failures.pop(key, None)
            if requeue is not None:
                self.enqueue(key, delay_s=requeue)
        except RetryLater as e:
            self.stats["retries"] += 1
            log.info("%s %s/%s: retry later: %s", *key, e)
            self.enqueue(key, delay_s=self._backoff(key))
        except Exception:
            self._progress.pop(key, None)
            self.stats["errors"] += 1
            log.exception("reconciling %s %s/%s failed", *key)
            self.enqueue(key, delay_s=self._backoff(key))

    def report_progress(self, kind: str, obj: dict[str, Any], status: dict[str, Any]) -> None:
        """Write an intermediate status while ``obj`` is still being reconciled (called by a
        reconciler, e.g. phase Compiling before a long compile). Best effort: a failed write
        is logged, and the final status is written by the worker as usual."""
        key = self._key(kind, obj)
        current = self.cache.get(key) or obj
        if current["metadata"].get("generation") != obj["metadata"].get("generation"):
            return  # a newer spec is on its way; this progress is already stale
        merged, changed = merge_status(current.get("status"), status,
                                       generation=int(obj["metadata"].get("generation") or 1))
        if same_status(current.get("status"), merged):
            return
        try:
            stored = self.writer.write(self.infos[kind], current, merged)
        except (RetryLater, Exception) as e:  # never break the reconcile that reports
            log.info("progress status of %s %s not written: %s", kind, key[2], e)
            return
        if stored is None:
            return
        self.stats["progress_writes"] += 1
        self._progress[key] = stored
        with self._cv:
            if not _older(stored, self.cache.get(key)):
                self.cache[key] = stored
        for c in changed:
            self.writer.event(self.infos[kind], obj, type_="Normal",
                              reason=c.get("reason") or c["type"],
                              message=f"{c['type']}={c['status']}: {c.get('message', '')}")

    def _put(self, kind: str, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Replace the main object (finalizers); None on 409 (a newer version is on its way)."""
        from kubernetes.client.exceptions import ApiException

        if not self._leading():
            raise RetryLater("not the leader", reason="not_leader")
        try:
            return self.writer.replace(self.infos[kind], obj, status=False)
        except ApiException as e:
            if e.status in (404, 409):
                self.stats[f"put_{e.status}"] += 1
                return None
            raise RetryLater(f"update of {kind} failed: {e.status} {e.reason}") from e

    def _reconcile_one(self, kind: str, obj: dict[str, Any]) -> float | None:
        info = self.infos[kind]
        meta = obj["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if meta.get("deletionTimestamp"):
            if FINALIZER in finalizers:
                self.reconciler.finalize(kind, obj)
                body = dict(obj, metadata=dict(meta, finalizers=[f for f in finalizers
                                                                   if f != FINALIZER]))
                if self._put(kind, body) is not None:
                    self.stats["finalized"] += 1
                    self.writer.event(info, obj, type_="Normal", reason="Finalized",
                                      message=f"cleaned up after {kind} {meta['name']}")
            return None
        if FINALIZER not in finalizers:
            body = dict(obj, metadata=dict(meta, finalizers=[*finalizers, FINALIZER]))
            stored = self._put(kind, body)
            if stored is None:
                return None  # conflict: the watch brings the newer object
            obj = stored
            self.cache[self._key(kind, obj)] = obj
        if self._settled(kind, obj):
            self.stats["skipped_settled"] += 1
            return None
        old = obj.get("status")
        key = self._key(kind, obj)
        try:
            schema.validate(obj, cluster=True)
            self.stats["reconciles"] += 1
            status = self.reconciler.reconcile(kind, obj)
        except RetryLater:
            self._progress.pop(key, None)
            raise
        except (Rejected, EdgefleetError) as e:
            status = dict(old or {})
            status["phase"] = "Failed"
            status["conditions"] = [
                condition("Ready", False, "Invalid" if isinstance(e, Rejected) else "Failed",
                          str(e)),
                condition("Progressing", False, "Stopped", "fix the spec to retry"),
                condition("Degraded", True, getattr(e, "reason", "error"), str(e)),
            ]
        progress = self._progress.pop(key, None)
        if progress is not None and progress["metadata"].get("generation") == meta.get(
                "generation"):
            obj, old = progress, progress.get("status")  # write over our own progress status
        merged, changed = merge_status(old, status, generation=int(meta.get("generation") or 1))
        if not same_status(old, merged):
            stored = self.writer.write(info, obj, merged)
            self.stats["status_writes"] += 1
            if stored is None:
                return None  # gone or a newer generation: reconciled from its own event
            self.cache[self._key(kind, stored)] = stored
            for c in changed:
                warn = (c["type"], c["status"]) in (("Ready", "False"), ("Degraded", "True"))
                self.writer.event(info, obj, type_="Warning" if warn else "Normal",
                                  reason=c.get("reason") or c["type"],
                                  message=f"{c['type']}={c['status']}: {c.get('message', '')}")
        settled_obj = dict(obj, status=merged)
        return None if self._settled(kind, settled_obj) else self.progress_requeue_s

    def _settled(self, kind: str, obj: dict[str, Any]) -> bool:
        return kind not in self.level_kinds and is_settled(obj)
