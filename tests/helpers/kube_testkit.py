"""Shared pieces of the Kubernetes integration tests: CRD install, a stepwise test reconciler,
documents, and waiting on a condition with a deadline. Used by tests/integration/test_kube_*."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from controller.crd.leader import LeaderElector
from controller.crd.source import ClusterSource
from controller.crd.status import condition
from protos.errors import Rejected, RetryLater
from tests.helpers.controller import wait_sync
from tests.helpers.kube import RunningKube

ROOT = Path(__file__).resolve().parents[2]
G, V = "edgefleet.io", "v1alpha1"
SHA = "ab" * 32


def wait_for(pred: Callable[[], Any], *, timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``pred`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    return wait_sync(pred, timeout_s=timeout, what=what)


def install_crds(api_client: Any) -> None:
    from kubernetes import client

    ext = client.ApiextensionsV1Api(api_client)
    for path in sorted((ROOT / "manifests" / "crds").glob("*.yaml")):
        ext.create_custom_resource_definition(yaml.safe_load(path.read_text()))


def model(name: str, targets: list[str], *, ns: str = "default", version: int = 1,
          sha: str | None = SHA) -> dict[str, Any]:
    source: dict[str, Any] = {"sha256": sha} if sha else {"path": "m.onnx"}
    return {"apiVersion": f"{G}/{V}", "kind": "EdgeModel",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"version": version, "source": source,
                     "targets": [{"deviceClass": t} for t in targets]}}


class StepReconciler:
    """Test reconciler: an EdgeModel "compiles" one target per call, keeping progress in its
    status (``compiledTargets``), so a restarted controller continues where the last stopped.

    ``budget`` limits units of work (then RetryLater, like a crash mid-way); ``during`` runs
    inside reconcile (to race writes against the controller).
    """

    def __init__(self, *, budget: int | None = None,
                 during: Callable[[str, dict[str, Any]], None] | None = None,
                 rollout_status: dict[str, Any] | None = None) -> None:
        self.rollout_status = rollout_status
        self.calls: list[tuple[str, str, int]] = []
        self.work: list[tuple[str, int, str]] = []
        self.finalized: list[tuple[str, str]] = []
        self.budget = budget
        self.during = during
        self.out_of_budget = threading.Event()
        self.lock = threading.Lock()

    def reconcile(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        meta, spec = obj["metadata"], obj["spec"]
        gen = int(meta["generation"])
        with self.lock:
            self.calls.append((kind, meta["name"], gen))
        if self.during is not None:
            self.during(kind, obj)
        if kind == "EdgeRollout" and self.rollout_status is not None:
            return {**self.rollout_status, "observedGeneration": gen}
        if kind != "EdgeModel":
            return {"phase": "Ready", "conditions": [condition("Ready", True, "Accepted")]}
        if spec["targets"][0]["deviceClass"] == "reject-me":
            raise Rejected("device class reject-me does not exist", reason="unknown_class")
        status = obj.get("status") or {}
        targets = [t["deviceClass"] for t in spec["targets"]]
        done = list(status.get("compiledTargets") or []) if status.get(
            "observedGeneration") == gen else []
        todo = [t for t in targets if t not in done]
        if todo:
            if self.budget is not None and len(self.work) >= self.budget:
                self.out_of_budget.set()
                raise RetryLater("out of budget (simulated crash)")
            with self.lock:
                self.work.append((meta["name"], gen, todo[0]))
            done.append(todo[0])
        ready = len(done) == len(targets)
        return {
            "phase": "Ready" if ready else "Compiling",
            "compiledClasses": f"{len(done)}/{len(targets)}",
            "compiledTargets": done,
            "conditions": [
                condition("Compiled", ready, "AllTargetsCompiled" if ready else "Compiling",
                          f"{len(done)}/{len(targets)} device classes"),
                condition("Progressing", not ready, "Compiling" if not ready else "Done"),
                condition("Ready", ready, "Ready" if ready else "Compiling"),
                condition("Degraded", False, "AsExpected"),
            ],
        }

    def finalize(self, kind: str, obj: dict[str, Any]) -> None:
        with self.lock:
            self.finalized.append((kind, obj["metadata"]["name"]))


@contextmanager
def controller(kube: RunningKube, reconciler: StepReconciler, *, identity: str | None = None,
               lease_s: float = 1.0, release: bool = True) -> Iterator[ClusterSource]:
    """A ClusterSource (with a LeaderElector when ``identity`` is given) on its own ApiClient."""
    api = kube.api_client()
    elector = None
    if identity is not None:
        elector = LeaderElector(api, identity=identity, lease_duration_s=lease_s,
                                renew_deadline_s=lease_s * 0.6, retry_period_s=0.05)
    src = ClusterSource(api, reconciler, elector=elector, progress_requeue_s=0.05,
                        resync_s=None, backoff_base_s=0.05, backoff_max_s=0.5)
    src.start()
    if elector is not None:
        elector.start()
    try:
        yield src
    finally:
        if elector is not None:
            elector.stop(release=release)
        src.stop()
        api.close()


def get(kube_api: Any, plural: str, name: str, ns: str = "default") -> dict[str, Any] | None:
    from kubernetes.client.exceptions import ApiException

    try:
        return dict(kube_api.get_namespaced_custom_object(G, V, ns, plural, name))
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def cond(obj: dict[str, Any] | None, type_: str) -> str | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return str(c["status"])
    return None
