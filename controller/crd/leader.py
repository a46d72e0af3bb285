"""Leader election with a coordination.k8s.io/v1 Lease (the client-go algorithm, in Python).

Several controller replicas run; only the holder of the Lease reconciles. Expiry is judged
with the local clock from when this replica last saw the Lease record change (not from the
holder's timestamps), so clock skew between nodes does not matter. A write that loses a race
gets 409 and re-reads. ``is_leader`` turns False as soon as a renewal finds another holder or
the renew deadline passes, and ``on_stopped_leading`` fires: the reconcile worker checks
``is_leader`` before every reconcile and every write. Called by ``controller.crd.source``
(``ClusterSource(..., elector=LeaderElector(...))``) and the ``edgefleet controller`` command.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def _micro_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Acquire and renew one Lease; run callbacks on gaining and losing it."""

    def __init__(
        self,
        api_client: Any,
        *,
        name: str = "edgefleet-controller",
        namespace: str = "default",
        identity: str,
        lease_duration_s: float = 15.0,
        renew_deadline_s: float = 10.0,
        retry_period_s: float = 2.0,
        on_started_leading: Callable[[], None] | None = None,
        on_stopped_leading: Callable[[], None] | None = None,
    ) -> None:
        from kubernetes import client

        if not retry_period_s < renew_deadline_s < lease_duration_s:
            raise ValueError("need retry_period_s < renew_deadline_s < lease_duration_s")
        self.api: Any = client.CoordinationV1Api(api_client)
        self.name, self.namespace, self.identity = name, namespace, identity
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self.retry_period_s = retry_period_s
        self.on_started_leading = on_started_leading
        self.on_stopped_leading = on_stopped_leading
        self._leader = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observed: tuple[str, str, float] | None = None  # (holder, renewTime, local time)
        self._last_renew = 0.0
        self.transitions = 0  # times this replica became leader

    @property
    def is_leader(self) -> bool:
        if self._leader.is_set() and time.monotonic() - self._last_renew > self.renew_deadline_s:
            self._lose("renew deadline passed")
        return self._leader.is_set()

    def wait_leader(self, timeout: float) -> bool:
        return self._leader.wait(timeout)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{self.identity}",
                                        daemon=True)
        self._thread.start()

    def stop(self, *, release: bool = True) -> None:
        """Stop campaigning; with ``release`` give the Lease up so a standby takes over at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.lease_duration_s + 5)
        if self._leader.is_set():
            if release:
                self._release()
            self._lose("stopped")

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._try_acquire_or_renew()
            except Exception as e:
                log.warning("lease %s/%s: %s", self.namespace, self.name, e)
            self.is_leader  # noqa: B018 - evaluates the renew deadline
            self._stop.wait(self.retry_period_s)

    # ------------------------------------------------------------ the algorithm

    def _try_acquire_or_renew(self) -> None:
        from kubernetes.client.exceptions import ApiException

        now = time.monotonic()
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(transitions=0, acquire=True)}
            try:
                self.api.create_namespaced_lease(self.namespace, body)
            except ApiException as e2:
                if e2.status == 409:
                    return  # someone else created it first
                raise
            self._won(now)
            return
        spec = lease.spec
        holder = spec.holder_identity or ""
        renew = str(spec.renew_time or "")
        if self._observed is None or self._observed[:2] != (holder, renew):
            self._observed = (holder, renew, now)
        duration = float(spec.lease_duration_seconds or self.lease_duration_s)
        if holder and holder != self.identity:
            if self._leader.is_set():
                self._lose(f"lease taken by {holder}")
            if now < self._observed[2] + duration:
                return  # held by someone else and not expired
        transitions = int(spec.lease_transitions or 0)
        acquire = holder != self.identity
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace,
                             "resourceVersion": lease.metadata.resource_version},
                "spec": self._spec(transitions=transitions + (1 if acquire else 0),
                                   acquire=acquire, acquire_time=spec.acquire_time)}
        try:
            self.api.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as e:
            if e.status == 409:  # lost a race: someone renewed or took it; re-read next round
                if self._leader.is_set() and acquire is False:
                    self._lose("lost a write race for the lease")
                return
            raise
        self._won(now)

    def _spec(self, *, transitions: int, acquire: bool, acquire_time: Any = None) -> dict[str, Any]:
        now = _micro_now()
        if acquire_time is not None and not isinstance(acquire_time, str):
            acquire_time = acquire_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {"holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, round(self.lease_duration_s)),
                "acquireTime": now if acquire or acquire_time is None else acquire_time,
                "renewTime": now, "leaseTransitions": transitions}

    def _won(self, now: float) -> None:
        self._last_renew = now
        if not self._leader.is_set():
            self._leader.set()
            self.transitions += 1
            log.info("%s became leader of lease %s/%s", self.identity, self.namespace, self.name)
            if self.on_started_leading:
                self.on_started_leading()

    def _lose(self, why: str) -> None:
        if not self._leader.is_set():
            return
        self._leader.clear()
        log.warning("%s stopped leading lease %s/%s: %s", self.identity, self.namespace,
                    self.name, why)
        if self.on_stopped_leading:
            self.on_stopped_leading()

    def _release(self) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity != self.identity:
                return
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace,
                                 "resourceVersion": lease.metadata.resource_version},
                    "spec": {"holderIdentity": "", "leaseDurationSeconds": 1,
                             "leaseTransitions": int(lease.spec.lease_transitions or 0)}}
            self.api.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as e:
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, e)
