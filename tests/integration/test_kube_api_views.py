"""Cluster mode's resource views: the API and dashboard read EdgeModels, EdgeRollouts and
DeviceClasses from ClusterSource's watch cache (controller.cluster.ClusterResources) with
the status written to the cluster, while engines and per-device progress come from the
database; a rollout does not see the engines of a model that is still Compiling.

Against the Kubernetes API emulator, a real SQLite database and the real FastAPI app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from controller.api.app import create_app
from controller.cluster import ClusterController, ClusterOptions, ClusterResources, _ApiView
from controller.crd.status import condition
from controller.fleet.db import make_engine, session_scope
from controller.fleet.models import DeviceRollout, DeviceRolloutState, Engine
from controller.settings import Settings
from tests.helpers.kube import RunningKube
from tests.helpers.kube_testkit import (
    ROOT,
    SHA,
    G,
    StepReconciler,
    V,
    controller,
    model,
    wait_for,
)

pytest.importorskip("kubernetes")


class _Core:
    def __init__(self, db: Any) -> None:
        self.db = db

    def upload_artifact(self, *_a: Any, **_k: Any) -> str:
        raise AssertionError("not used")


def test_api_and_dashboard_read_the_watch_cache(kube: RunningKube, tmp_path: Path) -> None:
    from kubernetes import client

    kc = kube.api_client()
    api = client.CustomObjectsApi(kc)
    api.create_namespaced_custom_object(G, V, "vision", "edgemodels",
                                        model("digits", ["cpu-x86-64"], ns="vision"))
    api.create_namespaced_custom_object(G, V, "default", "edgemodels",
                                        model("alpha", ["x", "y"]))
    api.create_namespaced_custom_object(G, V, "vision", "edgerollouts", {
        "apiVersion": f"{G}/{V}", "kind": "EdgeRollout",
        "metadata": {"name": "digits", "namespace": "vision"},
        "spec": {"model": "digits", "waves": [{"name": "all", "percent": 100}]}})
    api.create_cluster_custom_object(G, V, "deviceclasses", yaml.safe_load(
        (ROOT / "manifests" / "deviceclasses" / "cpu-x86-64.yaml").read_text()))

    settings = Settings(data_dir=tmp_path)
    db = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with session_scope(db) as s:
        s.add(Engine(model_sha256=SHA, device_class="cpu-x86-64", precision="fp32",
                     toolchain_version="ort-1", engine_sha256="cd" * 32, size=123, engine_kind="onnxruntime"))
        s.add(DeviceRollout(rollout="vision/digits", device_id="board-1", model_name="digits",
                            version=1, state=DeviceRolloutState.COMMITTED, bytes_sent=1000))
        s.add(DeviceRollout(rollout="vision/digits", device_id="board-2", model_name="digits",
                            version=1, state=DeviceRolloutState.PENDING))

    # the rollout's status as the rollout reconcile writes it (desired vs observed counters)
    ro_status = {"phase": "Progressing", "targeted": 2, "updated": 1, "failed": 0,
                 "devices": {"board-1": {"state": "updated", "wave": "all"},
                             "board-2": {"state": "pending", "wave": "all"}},
                 "conditions": [condition("Ready", True, "Accepted")]}
    with controller(kube, StepReconciler(rollout_status=ro_status)) as src:
        ctrl = ClusterController(settings, ClusterOptions())
        ctrl.source = src
        ctrl.core = _Core(db)
        wait_for(lambda: all(o.get("status", {}).get("phase") == "Ready" for k, o in
                             src.cache.items() if k[0] == "EdgeModel") and len(src.cache) == 4,
                 what="both models Ready in the cache")
        http = TestClient(create_app(_ApiView(ctrl)))

        models = http.get("/api/v1/models").json()["items"]
        assert [(m["namespace"], m["name"], m["phase"], m["compiled"]) for m in models] == [
            ("default", "alpha", "Ready", "2/2"), ("vision", "digits", "Ready", "1/1")]
        assert models[1]["status"]["observedGeneration"] == 1 and models[1]["created_ms"]
        one = http.get("/api/v1/models/vision/digits").json()
        assert [e["engine_sha256"] for e in one["engines"]] == ["cd" * 32]  # from the DB
        assert http.get("/api/v1/models/default/digits").status_code == 404
        dcs = http.get("/api/v1/deviceclasses").json()["items"]
        assert [(d["namespace"], d["name"]) for d in dcs] == [("", "cpu-x86-64")]
        ro = http.get("/api/v1/rollouts").json()["items"]
        assert [(r["namespace"], r["name"], r["model"], r["progress"]) for r in ro] == [
            ("vision", "digits", "digits", "1/2")]
        full = http.get("/api/v1/rollouts/vision/digits").json()
        assert {d["device_id"]: d["state"] for d in full["devices"]} == {
            "board-1": "updated", "board-2": "pending"}
        assert [h["state"] for h in full["history"]] == ["committed", "pending"]
        page = http.get("/").text
        table = page.split('id="models"')[1].split("</table>")[0]
        assert "default/alpha" in table and "vision/digits" in table and "2/2" in table

        # deleted objects leave the views with the watch
        api.delete_namespaced_custom_object(G, V, "default", "edgemodels", "alpha")
        wait_for(lambda: [m["name"] for m in http.get("/api/v1/models").json()["items"]]
                 == ["digits"], what="alpha gone from the API")

        # a rollout sees no engines of a model that is Compiling (they are not final yet)
        key = ("EdgeModel", "vision", "digits")
        ready = src.cache[key]
        assert ctrl._model_for_rollout("vision", "digits") is ready
        src.cache[key] = {**ready, "status": {**ready["status"], "phase": "Compiling",
                                              "engines": [{"deviceClass": "cpu-x86-64"}]}}
        assert ctrl._model_for_rollout("vision", "digits")["status"]["engines"] == []  # type: ignore[index]
        assert ClusterResources(ctrl).get("DeviceClass", "ignored", "cpu-x86-64") is not None
    kc.close()
    db.dispose()
