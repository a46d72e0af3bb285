"""Deleting an EdgeRollout in cluster mode runs the ``edgefleet.io/cleanup`` finalizer.

An in-process ``ClusterController`` (controller.cluster) against the Kubernetes API
emulator, a real Mosquitto and a real SQLite database: the CRDs, the cpu-x86-64
DeviceClass, an EdgeModel pinned by the sha256 of an artifact uploaded to the controller's
store (compiled by real onnxruntime) and an EdgeRollout targeting one stand-in device that
never requests chunks, so it stays mid-way with a retained offer. Deleting the EdgeRollout
with the kubernetes client makes the controller run controller.reconcile.cleanup's
``finalize_rollout`` and then remove its finalizer: the object disappears, the retained
offer is cleared (a fresh subscriber gets none), the device's row is ``cancelled`` and a
Deleted Event is written.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlmodel import Session, select

from controller.cluster import ClusterController, ClusterOptions
from controller.fleet.models import Device, DeviceRollout, DeviceRolloutState, Event
from controller.settings import Settings
from tests.helpers.broker import Broker
from tests.helpers.controller import FakeDevice, edge_model, edge_rollout, wait_until
from tests.helpers.kube import RunningKube
from tests.helpers.kube_testkit import ROOT, G, V
from tests.helpers.models import build_affine
from tests.integration.test_controller_delete import retained_offer

pytest.importorskip("kubernetes")
pytestmark = pytest.mark.timeout(120)
FINALIZER = "edgefleet.io/cleanup"


def _rows(db: Any) -> dict[str, DeviceRollout]:
    with Session(db) as s:
        return {r.device_id: r for r in s.exec(select(DeviceRollout)).all()}


def _deleted_events(db: Any) -> list[Event]:
    with Session(db) as s:
        return list(s.exec(select(Event).where(Event.kind == "EdgeRollout",
                                               Event.reason == "Deleted")).all())


async def test_cluster_delete_rollout_runs_cleanup_finalizer(kube: RunningKube, tmp_path: Path,
                                                             mosquitto: Broker) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    kc = kube.api_client()
    api = client.CustomObjectsApi(kc)
    settings = Settings(data_dir=tmp_path / "data", mqtt_host=mosquitto.host,
                        mqtt_port=mosquitto.port, compile_in_process_pool=False,
                        chunk_size_bytes=4096)
    opts = ClusterOptions(identity="controller-t", kubeconfig=str(
        kube.write_kubeconfig(tmp_path / "kubeconfig")), listen_host="127.0.0.1",
        listen_port=0, lease_duration_s=5, renew_deadline_s=3.5, retry_period_s=0.3,
        progress_requeue_s=0.3)
    ctrl = ClusterController(settings, opts)
    dev: FakeDevice | None = None
    await ctrl.start()
    try:
        db = ctrl.core.db
        await asyncio.wait_for(ctrl.core.connected.wait(), 15)
        dev = FakeDevice("dev-slow", mosquitto.port, ctrl.core.keys.root_public_raw(),
                         auto_fetch=False)
        dev.heartbeat()

        def known() -> bool:
            with Session(db) as s:
                return s.get(Device, "dev-slow") is not None

        await wait_until(known, what="device registered")

        src = build_affine(tmp_path / "m.onnx", marker=1.0, n_in=96, n_out=64, seed=1)
        sha = ctrl.core.upload_artifact(src, kind="model")
        dc = yaml.safe_load((ROOT / "manifests" / "deviceclasses" / "cpu-x86-64.yaml")
                            .read_text())

        def create() -> None:
            api.create_cluster_custom_object(G, V, "deviceclasses", dc)
            api.create_namespaced_custom_object(G, V, "default", "edgemodels",
                                                edge_model("m", sha256=sha))
            api.create_namespaced_custom_object(
                G, V, "default", "edgerollouts",
                edge_rollout("r", "m", [{"name": "all", "percent": 100}]))

        await asyncio.to_thread(create)

        def get_rollout() -> dict[str, Any] | None:
            try:
                got: Any = api.get_namespaced_custom_object(G, V, "default", "edgerollouts",
                                                            "r")
                return dict(got)
            except ApiException as e:
                if e.status == 404:
                    return None
                raise

        # mid-way: offered (retained on the broker), never fetched; the finalizer is on
        await wait_until(lambda: dev is not None and dev.offers, timeout_s=60,
                         what="dev-slow offered")
        assert await asyncio.to_thread(retained_offer, mosquitto.port, "dev-slow") is not None
        obj = await asyncio.to_thread(get_rollout)
        assert obj is not None and FINALIZER in obj["metadata"].get("finalizers", []), obj
        assert _rows(db)["dev-slow"].state not in (DeviceRolloutState.CANCELLED,
                                                   DeviceRolloutState.COMMITTED)
        assert not _deleted_events(db)

        await asyncio.to_thread(api.delete_namespaced_custom_object, G, V, "default",
                                "edgerollouts", "r")

        async def gone() -> bool:
            return await asyncio.to_thread(get_rollout) is None

        deadline = asyncio.get_running_loop().time() + 30
        while not await gone():
            assert asyncio.get_running_loop().time() < deadline, "rollout not finalized"
            await asyncio.sleep(0.1)

        assert await asyncio.to_thread(retained_offer, mosquitto.port, "dev-slow") is None
        row = _rows(db)["dev-slow"]
        assert row.state == DeviceRolloutState.CANCELLED and row.reason == "rollout deleted"
        [ev] = _deleted_events(db)
        assert ev.name == "default/r" and "deleted" in ev.message
    finally:
        if dev is not None:
            dev.close()
        await ctrl.stop()
        kc.close()
