"""Leader election between two controller instances (separate clients, one Lease) against the
Kubernetes API emulator: only the leader reconciles; a crashed leader is replaced once its
Lease expires; a leader that loses its Lease stops reconciling at once."""

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


def _ready(api: Any, name: str) -> Any:
    return wait_for(lambda: (o := get(api, "edgemodels", name)) and cond(o, "Ready") == "True"
                    and o, what=f"{name} Ready")


def _lease(kube: RunningKube) -> Any:
    from kubernetes import client

    c = kube.api_client()
    try:
        return client.CoordinationV1Api(c).read_namespaced_lease("edgefleet-controller", "default")
    finally:
        c.close()


def test_failover_after_leader_crash(kube: RunningKube, api: Any) -> None:
    rec_a, rec_b = StepReconciler(), StepReconciler()
    with controller(kube, rec_a, identity="a", release=False) as src_a:
        assert src_a.elector is not None and src_a.elector.wait_leader(10)
        with controller(kube, rec_b, identity="b") as src_b:
            assert src_b.elector is not None and src_b.wait_synced(10)
            api.create_namespaced_custom_object(G, V, "default", "edgemodels", model("one", ["x"]))
            _ready(api, "one")
            # b saw the object in its cache but, not leading, did not reconcile it
            wait_for(lambda: ("EdgeModel", "default", "one") in src_b.cache, what="b cache")
            assert not src_b.elector.is_leader
            assert [c[1] for c in rec_a.calls].count("one") >= 1
            assert not rec_b.calls

            # a crashes (no Lease release): b takes over once the Lease expires
            src_a.elector.stop(release=False)
            src_a.stop()
            assert src_b.elector.wait_leader(15)
            lease = _lease(kube)
            assert lease.spec.holder_identity == "b"
            assert lease.spec.lease_transitions == 1
            api.create_namespaced_custom_object(G, V, "default", "edgemodels", model("two", ["x"]))
            _ready(api, "two")
            assert ("EdgeModel", "two", 1) in rec_b.calls
            assert not [c for c in rec_a.calls if c[1] == "two"]
            assert not [c for c in rec_b.calls if c[1] == "one"]  # settled: not redone


def test_losing_the_lease_stops_reconciling_at_once(kube: RunningKube, api: Any) -> None:
    from kubernetes import client

    rec = StepReconciler()
    with controller(kube, rec, identity="a") as src:
        assert src.elector is not None and src.elector.wait_leader(10)
        api.create_namespaced_custom_object(G, V, "default", "edgemodels", model("one", ["x"]))
        _ready(api, "one")

        # someone else takes the Lease (e.g. a partitioned replica's successor)
        c = kube.api_client()
        leases: Any = client.CoordinationV1Api(c)
        lease = leases.read_namespaced_lease("edgefleet-controller", "default")
        lease.spec.holder_identity = "intruder"
        lease.spec.lease_duration_seconds = 3600
        leases.replace_namespaced_lease("edgefleet-controller", "default", lease)
        wait_for(lambda: not src.elector.is_leader, what="a to notice it lost the lease")  # type: ignore[union-attr]

        skips = src.stats["not_leader_skips"]
        api.create_namespaced_custom_object(G, V, "default", "edgemodels", model("two", ["x"]))
        wait_for(lambda: src.stats["not_leader_skips"] > skips, what="worker to see two")
        assert not [call for call in rec.calls if call[1] == "two"]
        assert (get(api, "edgemodels", "two") or {}).get("status") is None
        assert leases.read_namespaced_lease("edgefleet-controller",
                                            "default").spec.holder_identity == "intruder"
        c.close()
