"""Cluster mode against the Kubernetes API emulator, through the official client:
apply -> reconcile -> status and Events; watch dropped, resumed, expired (410); 409 retried;
restart mid-way resumes from the status stored in the cluster."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.kube import RunningKube
from tests.helpers.kube_testkit import (
    G,
    StepReconciler,
    V,
    cond,
    controller,
    get,
    model,
    wait_for,
)

pytest.importorskip("kubernetes")


def _ready(api: Any, name: str, generation: int = 1) -> Any:
    def check() -> Any:
        o = get(api, "edgemodels", name)
        if o and cond(o, "Ready") == "True" and o["status"]["observedGeneration"] == generation:
            return o
        return None
    return wait_for(check, what=f"{name} Ready at generation {generation}")


def test_apply_reconcile_status_events_and_finalizer(kube: RunningKube, api: Any) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(kube.api_client())
    created = api.create_namespaced_custom_object(G, V, "default", "edgemodels",
                                                  model("digits", ["cpu-x86-64", "cpu-aarch64"]))
    assert created["metadata"]["generation"] == 1  # 201 answered with the object
    # the API server enforces the CRD schema (same schema as `edgefleet apply`)
    bad = model("bad", ["cpu-x86-64"])
    bad["spec"]["targets"][0]["precisions"] = ["int4"]
    with pytest.raises(ApiException) as ei:
        api.create_namespaced_custom_object(G, V, "default", "edgemodels", bad)
    assert ei.value.status == 422 and "int4" in str(ei.value.body)

    rec = StepReconciler()
    with controller(kube, rec) as src:
        o = _ready(api, "digits")
        st = o["status"]
        assert st["compiledClasses"] == "2/2" and st["phase"] == "Ready"
        assert {c["type"] for c in st["conditions"]} == {"Ready", "Compiled", "Progressing",
                                                          "Degraded"}
        assert all(c["observedGeneration"] == 1 and c["lastTransitionTime"]
                   for c in st["conditions"])
        assert o["metadata"]["finalizers"] == ["edgefleet.io/cleanup"]
        assert [w[2] for w in rec.work] == ["cpu-x86-64", "cpu-aarch64"]

        events = wait_for(lambda: [e for e in core.list_namespaced_event("default").items
                                   if e.involved_object.name == "digits"
                                   and e.reason == "AllTargetsCompiled"], what="event")
        assert events[0].involved_object.kind == "EdgeModel"

        # spec change -> generation 2 -> reconciled again from scratch for that generation
        patch = {"spec": {"targets": [{"deviceClass": "cpu-x86-64"}, {"deviceClass": "rk3588"}]}}
        api.patch_namespaced_custom_object(G, V, "default", "edgemodels", "digits", patch)
        o = _ready(api, "digits", generation=2)
        assert o["status"]["compiledTargets"] == ["cpu-x86-64", "rk3588"]
        # a status-only or metadata-only change does not bump the generation
        api.patch_namespaced_custom_object(G, V, "default", "edgemodels", "digits",
                                           {"metadata": {"labels": {"team": "vision"}}})
        assert get(api, "edgemodels", "digits")["metadata"]["generation"] == 2  # type: ignore[index]

        # a problem only a spec change can fix: Degraded, Ready False, Warning event, no retry
        api.create_namespaced_custom_object(G, V, "default", "edgemodels",
                                            model("broken", ["reject-me"]))
        o = wait_for(lambda: (x := get(api, "edgemodels", "broken")) and cond(x, "Degraded")
                     == "True" and x, what="broken Degraded")
        assert cond(o, "Ready") == "False"
        assert "reject-me does not exist" in str(o["status"]["conditions"])
        # cluster mode needs content pinned by sha256: a path-only model is reported Invalid
        api.create_namespaced_custom_object(G, V, "default", "edgemodels",
                                            model("unpinned", ["cpu-x86-64"], sha=None))
        o = wait_for(lambda: (x := get(api, "edgemodels", "unpinned")) and cond(x, "Degraded")
                     == "True" and x, what="unpinned Degraded")
        assert "spec.source.sha256: is required in cluster mode" in str(o["status"])
        warnings = wait_for(lambda: [e for e in core.list_namespaced_event("default").items
                                     if e.type == "Warning" and e.involved_object.name == "broken"],
                            what="warning event")
        assert warnings

        # delete: finalize runs, then the finalizer goes and the object with it
        api.delete_namespaced_custom_object(G, V, "default", "edgemodels", "digits")
        wait_for(lambda: get(api, "edgemodels", "digits") is None, what="digits deleted")
        assert ("EdgeModel", "digits") in rec.finalized
        # counted once the finalizer PUT returned (the object may be gone a moment before)
        wait_for(lambda: src.stats["finalized"] >= 1, what="finalized counted")
    core.api_client.close()


def test_watch_dropped_resumed_and_expired(kube: RunningKube, api: Any) -> None:
    rec = StepReconciler()
    with controller(kube, rec) as src:
        assert src.wait_synced(10)
        lists = src.stats["lists"]
        assert lists == 3  # one per kind

        # dropped watch: while disconnected, a model is created; the resumed watch delivers it
        wait_for(lambda: kube.call(lambda e: e.open_watches) == 3, what="3 open watches")
        kube.hold_watches()
        kube.drop_watches()
        wait_for(lambda: kube.call(lambda e: e.held_watches) >= 3, what="watches to reconnect")
        api.create_namespaced_custom_object(G, V, "default", "edgemodels", model("a", ["x"]))
        kube.release_watches()
        _ready(api, "a")
        assert src.stats["watches"] >= 6
        assert src.stats["lists"] == lists  # resumed from the resourceVersion, no relist

        # expired: the event log is compacted while disconnected -> 410 Gone -> relist
        wait_for(lambda: kube.call(lambda e: e.open_watches) == 3, what="3 open watches")
        kube.hold_watches()
        kube.drop_watches()
        wait_for(lambda: kube.call(lambda e: e.held_watches) >= 6, what="watches to reconnect")
        api.create_namespaced_custom_object(G, V, "default", "edgemodels", model("b", ["x"]))
        kube.compact()
        kube.release_watches()
        _ready(api, "b")
        wait_for(lambda: src.stats["relists_410"] >= 3, what="relist after 410")
        assert src.stats["lists"] >= lists + 3
        # level-triggered and idempotent: "a" was not compiled again after the relist
        assert [w[0] for w in rec.work].count("a") == 1


def test_status_conflict_is_retried(kube: RunningKube, api: Any) -> None:
    from kubernetes import client

    other = client.CustomObjectsApi(kube.api_client())
    raced: list[str] = []

    def race(kind: str, obj: dict[str, Any]) -> None:
        # another writer changes the object while it is being reconciled (labels only)
        if kind == "EdgeModel" and obj["metadata"]["name"] == "c" and len(raced) < 2:
            raced.append(obj["metadata"]["resourceVersion"])
            other.patch_namespaced_custom_object(
                G, V, "default", "edgemodels", "c",
                {"metadata": {"labels": {"touched": str(len(raced))}}})

    rec = StepReconciler(during=race)
    api.create_namespaced_custom_object(G, V, "default", "edgemodels", model("c", ["x"]))
    with controller(kube, rec) as src:
        o = _ready(api, "c")
        assert src.writer.conflicts >= 1  # the PUT /status with the stale resourceVersion got 409
        assert o["metadata"]["labels"]["touched"] in ("1", "2")
        assert rec.work == [("c", 1, "x")]  # the 409 did not make it redo the work
    other.api_client.close()


def test_restart_midway_resumes_from_cluster_state(kube: RunningKube, api: Any) -> None:
    api.create_namespaced_custom_object(G, V, "default", "edgemodels", model("done", ["x"]))
    first = StepReconciler(budget=2)  # 1 unit for "done", 1 for "big", then "crashes"
    with controller(kube, first, identity="first", release=True):
        _ready(api, "done")
        api.create_namespaced_custom_object(G, V, "default", "edgemodels",
                                            model("big", ["t1", "t2", "t3"]))
        assert first.out_of_budget.wait(20)
    big = get(api, "edgemodels", "big")
    assert big is not None and big["status"]["compiledClasses"] == "1/3"
    assert cond(big, "Progressing") == "True"

    second = StepReconciler()
    with controller(kube, second, identity="second") as src:
        o = _ready(api, "big")
        assert o["status"]["compiledTargets"] == ["t1", "t2", "t3"]
        assert src.stats["skipped_settled"] >= 1
    assert first.work == [("done", 1, "x"), ("big", 1, "t1")]
    assert second.work == [("big", 1, "t2"), ("big", 1, "t3")]  # nothing redone
    assert not [c for c in second.calls if c[1] == "done"]  # settled: not reconciled again


def test_async_reconcile_functions_through_loop_adapter(kube: RunningKube, api: Any) -> None:
    import asyncio
    import threading

    from controller.crd.adapter import LoopReconciler
    from controller.crd.source import ClusterSource
    from controller.crd.status import condition

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    seen: list[str] = []

    async def reconcile_model(obj: dict[str, Any]) -> dict[str, Any]:
        assert asyncio.get_running_loop() is loop  # runs on the controller's loop
        seen.append(obj["metadata"]["name"])
        return {"phase": "Ready", "conditions": [condition("Ready", True, "Compiled")]}

    client = kube.api_client()
    src = ClusterSource(client, LoopReconciler(loop, reconcilers={"EdgeModel": reconcile_model}),
                        resync_s=None)
    src.start()
    try:
        api.create_namespaced_custom_object(G, V, "default", "edgemodels", model("m", ["x"]))
        _ready(api, "m")
        assert seen == ["m"]
    finally:
        src.stop()
        client.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


class BlockingReconciler:
    """EdgeModel "slow" reports progress (phase Compiling) through the source, then blocks
    until ``release`` is set (a long compile); everything else is Ready at once. Records how
    many reconciles of one key run at the same time."""

    def __init__(self) -> None:
        import threading

        self.source: Any = None
        self.entered = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running: dict[str, int] = {}
        self.max_running: dict[str, int] = {}
        self.calls: list[tuple[str, str, int]] = []

    def reconcile(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        from controller.crd.status import condition

        name, gen = obj["metadata"]["name"], int(obj["metadata"]["generation"])
        with self.lock:
            self.calls.append((kind, name, gen))
            self.running[name] = self.running.get(name, 0) + 1
            self.max_running[name] = max(self.max_running.get(name, 0), self.running[name])
        try:
            if kind == "EdgeModel" and name == "slow":
                self.source.report_progress(kind, obj, {"phase": "Compiling", "conditions": [
                    condition("Compiled", False, "Compiling", "compiling for x"),
                    condition("Ready", False, "Compiling", "compiling for x")]})
                self.entered.set()
                assert self.release.wait(30), "never released"
            return {"phase": "Ready", "conditions": [condition("Ready", True, "Done"),
                                                     condition("Compiled", True, "Done")]}
        finally:
            with self.lock:
                self.running[name] -= 1

    def finalize(self, kind: str, obj: dict[str, Any]) -> None:
        pass


def test_slow_model_does_not_hold_up_rollouts_and_reports_progress(kube: RunningKube,
                                                                    api: Any) -> None:
    from controller.crd.source import ClusterSource

    rec = BlockingReconciler()
    client = kube.api_client()
    src = ClusterSource(client, rec, resync_s=None, progress_requeue_s=0.05,
                        workers_per_kind={"EdgeModel": 2})
    rec.source = src
    src.start()
    try:
        api.create_namespaced_custom_object(G, V, "default", "edgemodels", model("slow", ["x"]))
        assert rec.entered.wait(20)
        # while the model "compiles", its progress is in the cluster for this generation
        o = get(api, "edgemodels", "slow")
        assert o is not None and o["status"]["phase"] == "Compiling"
        assert o["status"]["observedGeneration"] == 1 and cond(o, "Compiled") == "False"
        assert {c["type"]: c["reason"] for c in o["status"]["conditions"]}["Compiled"] == \
            "Compiling"
        # an EdgeRollout (own queue and worker) and another model (second model worker)
        # are reconciled while "slow" is still blocked
        api.create_namespaced_custom_object(G, V, "default", "edgerollouts", {
            "apiVersion": f"{G}/{V}", "kind": "EdgeRollout",
            "metadata": {"name": "r", "namespace": "default"},
            "spec": {"model": "slow", "waves": [{"name": "all", "percent": 100}]}})
        api.create_namespaced_custom_object(G, V, "default", "edgemodels", model("quick", ["x"]))
        wait_for(lambda: cond(get(api, "edgerollouts", "r"), "Ready") == "True",
                 what="rollout Ready while the model compiles")
        _ready(api, "quick")
        # a spec change while "slow" is in process waits for it: never reconciled twice at once
        api.patch_namespaced_custom_object(G, V, "default", "edgemodels", "slow",
                                           {"spec": {"version": 2}})
        wait_for(lambda: src.cache[("EdgeModel", "default", "slow")]["metadata"]["generation"]
                 == 2, what="generation 2 in the cache")
        assert not rec.release.is_set() and ("EdgeModel", "default", "slow") in src.in_process()
        assert [c for c in rec.calls if c[1] == "slow"] == [("EdgeModel", "slow", 1)]
        rec.release.set()
        o = _ready(api, "slow", generation=2)
        assert o["status"]["phase"] == "Ready"
        assert rec.max_running["slow"] == 1
        assert src.stats["progress_writes"] >= 2  # one per generation
    finally:
        rec.release.set()
        src.stop()
        client.close()
