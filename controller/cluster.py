"""Cluster mode: ``edgefleet cluster``, the controller the Helm chart runs on Kubernetes.

The same controller pieces as the embedded mode (controller/core.py: database, artifact
store, signing keys, delta planner, MQTT publisher and telemetry ingest) and the SAME
reconcile functions (controller.reconcile.models.reconcile_model and
controller.reconcile.rollouts.reconcile_rollout), but the resources come from the Kubernetes
API instead of the embedded Resource table: ``controller.crd.source.ClusterSource`` lists and
watches EdgeModels, EdgeRollouts and DeviceClasses, and only the holder of the Lease
(``controller.crd.leader.LeaderElector``, identity ``$POD_NAME``, namespace ``$POD_NAMESPACE``)
reconciles and writes ``/status``. Every replica ingests telemetry (MQTT 5 shared
subscriptions) and serves chunk requests, the REST API (reads, artifact upload for
``edgefleet push``), the dashboard, ``/healthz`` and ``/readyz`` (controller/api/app.py);
the API's models/rollouts/deviceclasses come from the watch cache (``ClusterResources``).
EdgeModels report phase Compiling (``ClusterSource.report_progress``) before a compile;
each kind has its own reconcile workers, so a long compile does not hold up rollouts.

Settings: ``--config FILE`` (else ``$EDGEFLEET_CONFIG``), a YAML mapping of
controller.settings.Settings field names plus the cluster keys ``watch_namespace``,
``leader_election`` (lease_name, lease_duration_s, renew_deadline_s, retry_period_s),
``progress_requeue_s``, ``listen`` and ``mqtt_tls``; the environment overrides secrets:
``EDGEFLEET_DB_URL``, ``EDGEFLEET_MQTT_USERNAME``, ``EDGEFLEET_MQTT_PASSWORD``. The Kubernetes
client uses the in-cluster service account, else ``--kubeconfig`` / ``$KUBECONFIG``.

Called by controller/cli.py (``edgefleet cluster``) and ``python -m controller.cluster``;
tests/integration/test_cluster_mode.py runs it as a process against the API emulator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from controller.settings import Settings
from protos.errors import EdgefleetError, GiveUp, Rejected

log = logging.getLogger("edgefleet.cluster")

CLUSTER_KEYS = {"mode", "watch_namespace", "leader_election", "progress_requeue_s", "listen",
                "mqtt_tls"}
LEASE_KEYS = {"lease_name", "lease_duration_s", "renew_deadline_s", "retry_period_s"}
MAX_CONFIG_BYTES = 256 * 1024


@dataclass
class ClusterOptions:
    """What cluster mode needs beyond Settings (from the config file, env and arguments)."""

    identity: str = ""
    lease_namespace: str = "default"
    lease_name: str = "edgefleet-controller"
    lease_duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0
    watch_namespace: str = ""            # "" = all namespaces
    progress_requeue_s: float = 5.0
    listen_host: str = "0.0.0.0"
    listen_port: int = 8080
    kubeconfig: str = ""


def _split_listen(value: str) -> tuple[str, int]:
    host, _, port = str(value).rpartition(":")
    if not port.isdigit():
        raise Rejected(f"listen: {value!r} is not HOST:PORT", reason="bad_config")
    return host or "0.0.0.0", int(port)


def load_config(path: Path | None, *, env: dict[str, str] | None = None
                ) -> tuple[Settings, ClusterOptions]:
    """Settings and ClusterOptions from the YAML file at ``path`` and the environment."""
    env = dict(os.environ if env is None else env)
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise GiveUp(f"cannot read config {path}: {e}", reason="bad_config") from e
        if len(data) > MAX_CONFIG_BYTES:
            raise Rejected(f"config {path} is over {MAX_CONFIG_BYTES} bytes", reason="bad_config")
        try:
            raw = yaml.safe_load(data) or {}
        except yaml.YAMLError as e:
            raise Rejected(f"config {path} is not valid YAML: {e}", reason="bad_config") from e
        if not isinstance(raw, dict):
            raise Rejected(f"config {path} is not a mapping", reason="bad_config")
    fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(raw) - fields - CLUSTER_KEYS)
    if unknown:
        raise Rejected(f"config {path}: unknown setting(s) {', '.join(unknown)}",
                       reason="bad_config")
    if raw.get("mode", "cluster") != "cluster":
        raise Rejected(f"config {path}: mode is {raw['mode']!r}; `edgefleet cluster` needs "
                       "mode: cluster", reason="bad_config")
    values = {k: v for k, v in raw.items() if k in fields}
    if env.get("EDGEFLEET_DB_URL"):
        values["db_url"] = env["EDGEFLEET_DB_URL"]
    if env.get("EDGEFLEET_MQTT_USERNAME"):
        values["mqtt_username"] = env["EDGEFLEET_MQTT_USERNAME"]
    if env.get("EDGEFLEET_MQTT_PASSWORD"):
        values["mqtt_password"] = env["EDGEFLEET_MQTT_PASSWORD"]
    for k in ("data_dir", "keys_dir", "store_dir"):
        if values.get(k):
            values[k] = Path(values[k])
    try:
        settings = Settings(**values)
    except (TypeError, ValueError) as e:
        raise Rejected(f"config {path}: {e}", reason="bad_config") from e

    if raw.get("mqtt_tls") and not getattr(settings, "mqtt_tls_ca", ""):
        raise Rejected(f"config {path}: mqtt_tls is true but no mqtt_tls_ca is given (the CA "
                       "that signed the broker's certificate; mqtt_tls_cert/mqtt_tls_key for a "
                       "client certificate)", reason="bad_config")
    lease = raw.get("leader_election") or {}
    if not isinstance(lease, dict) or set(lease) - LEASE_KEYS:
        raise Rejected(f"config {path}: leader_election takes {sorted(LEASE_KEYS)}",
                       reason="bad_config")
    opts = ClusterOptions(
        identity=env.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
        lease_namespace=env.get("POD_NAMESPACE") or "default",
        watch_namespace=str(raw.get("watch_namespace") or ""),
        progress_requeue_s=float(raw.get("progress_requeue_s", 5.0)),
    )
    try:
        opts.lease_name = str(lease.get("lease_name") or opts.lease_name)
        for k in ("lease_duration_s", "renew_deadline_s", "retry_period_s"):
            if k in lease:
                setattr(opts, k, float(lease[k]))
    except (TypeError, ValueError) as e:
        raise Rejected(f"config {path}: leader_election: {e}", reason="bad_config") from e
    if not opts.retry_period_s < opts.renew_deadline_s < opts.lease_duration_s:
        raise Rejected(f"config {path}: leader_election needs retry_period_s < "
                       "renew_deadline_s < lease_duration_s", reason="bad_config")
    if raw.get("listen"):
        opts.listen_host, opts.listen_port = _split_listen(str(raw["listen"]))
    return settings, opts


def _drop_nulls(value: Any) -> Any:
    """The API server prunes nulls in non-nullable fields; leave them out ourselves."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def rollout_status_for_cluster(status: dict[str, Any]) -> dict[str, Any]:
    """Add the Ready condition Kubernetes tools look for: True once the rollout is Complete."""
    conds = [c for c in status.get("conditions") or [] if c.get("type") != "Ready"]
    by_type = {c.get("type"): c for c in conds}
    complete = (by_type.get("Complete") or {}).get("status") == "True"
    why = by_type.get("Progressing") or {}
    conds.append({"type": "Ready", "status": "True" if complete else "False",
                  "reason": "AllDevicesUpdated" if complete else str(why.get("reason") or
                                                                     "NotYet"),
                  "message": str(status.get("message") or why.get("message") or "")})
    return {**status, "conditions": conds}


def progress_status_for_cluster(status: dict[str, Any]) -> dict[str, Any]:
    """The intermediate status reconcile_model reports before a compile (phase Compiling,
    Compiled=False/Compiling) with Ready=False and Progressing=True added, so that
    ``kubectl get em`` shows it and a controller restarted mid-compile does not take an
    older Ready for this generation as settled."""
    conds = [c for c in status.get("conditions") or []
             if c.get("type") not in ("Ready", "Progressing")]
    why = next((str(c.get("message") or "") for c in conds if c.get("type") == "Compiled"),
               "compiling")
    conds += [{"type": "Ready", "status": "False", "reason": "Compiling", "message": why},
              {"type": "Progressing", "status": "True", "reason": "Compiling", "message": why}]
    return {**status, "conditions": conds}


class ClusterResources:
    """``controller.api.queries.ResourceReader`` over the watch cache of ``ClusterSource``:
    the API's and dashboard's models/rollouts/deviceclasses pages in cluster mode show the
    objects in Kubernetes with the status this controller (or the leader) wrote."""

    def __init__(self, ctrl: ClusterController) -> None:
        self._ctrl = ctrl

    def _cache(self) -> dict[tuple[str, str, str], dict[str, Any]]:
        src = self._ctrl.source
        return dict(src.cache) if src is not None else {}

    def list(self, kind: str) -> list[dict[str, Any]]:
        return [o for k, o in self._cache().items() if k[0] == kind
                and not (o.get("metadata") or {}).get("deletionTimestamp")]

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        ns = "" if kind == "DeviceClass" else namespace
        o = self._cache().get((kind, ns, name))
        return None if o is None or (o.get("metadata") or {}).get("deletionTimestamp") else o


class _ApiView:
    """What controller/api sees: the core's database and store, ready when MQTT is connected
    and the resources are listed; resources are read from the watch cache (read-only here:
    they live in Kubernetes)."""

    def __init__(self, ctrl: ClusterController) -> None:
        self._ctrl = ctrl
        self.settings = ctrl.settings
        self.db = ctrl.core.db
        self.connected = self
        self.resources = ClusterResources(ctrl)

    def is_set(self) -> bool:
        return self._ctrl.ready()

    def upload_artifact(self, src: Path | bytes, kind: str = "model") -> str:
        return str(self._ctrl.core.upload_artifact(src, kind=kind))

    def apply(self, _docs: list[Any]) -> Any:
        raise GiveUp("cluster mode: resources live in Kubernetes; use kubectl apply -f",
                     reason="cluster_mode")

    def delete(self, *_a: Any, **_k: Any) -> Any:
        raise GiveUp("cluster mode: resources live in Kubernetes; use kubectl delete",
                     reason="cluster_mode")


class ClusterController:
    """ControllerCore (no Resource-table loop) + ClusterSource + LeaderElector + API server."""

    def __init__(self, settings: Settings, opts: ClusterOptions, *,
                 api_client: Any = None) -> None:
        self.settings, self.opts = settings, opts
        self._api_client = api_client
        self.core: Any = None
        self.source: Any = None
        self.elector: Any = None
        self._clients: list[Any] = []
        self._api: Any = None            # controller.api.server.ApiServer once started
        self.api_port = 0

    def _kube_client(self) -> Any:
        if self._api_client is not None:
            return self._api_client
        from kubernetes import client, config

        cfg = client.Configuration()
        try:
            if self.opts.kubeconfig or not os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_kube_config(config_file=self.opts.kubeconfig or None,
                                        client_configuration=cfg)
            else:
                config.load_incluster_config(client_configuration=cfg)
        except (config.ConfigException, OSError) as e:
            raise GiveUp(f"cannot configure the Kubernetes client (not in a pod, and no "
                         f"usable --kubeconfig/$KUBECONFIG): {e}", reason="no_kube") from e
        c = client.ApiClient(cfg)
        self._clients.append(c)
        return c

    def ready(self) -> bool:
        return bool(self.core is not None and self.core.connected.is_set()
                    and self.source is not None and self.source.wait_synced(0))

    # -- reconcile: the embedded mode's functions, fed from the cluster cache ----------------
    def _cached(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.source.cache.get((kind, namespace, name)) if self.source else None

    def _requeue_rollouts(self, _why: str = "") -> None:
        if self.source is None:
            return
        for key in list(self.source.cache):
            if key[0] == "EdgeRollout":
                self.source.enqueue(key)

    async def _reconcile_model(self, obj: dict[str, Any]) -> dict[str, Any]:
        from controller.reconcile.models import reconcile_model

        def dc_spec(name: str) -> dict[str, Any] | None:
            dc = self._cached("DeviceClass", "", name)
            return dict(dc.get("spec") or {}) if dc else None

        # Compiling status written (from a thread: it is a blocking API call) before the
        # compile; awaited before returning, so it always lands before the final status
        pending: list[asyncio.Future[None]] = []

        def report(st: dict[str, Any]) -> None:
            if self.source is not None:
                body = dict(_drop_nulls(progress_status_for_cluster(st)))
                pending.append(asyncio.ensure_future(asyncio.to_thread(
                    self.source.report_progress, "EdgeModel", obj, body)))

        # the embedded context (store, db, executor, remote builds...), DeviceClasses from here
        ctx = dataclasses.replace(self.core.model_context(), device_class_spec=dc_spec,
                                  report=report)
        try:
            status = await reconcile_model(obj, ctx)
        finally:
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        self._requeue_rollouts("model")
        return dict(_drop_nulls(status))

    def _model_for_rollout(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The cached EdgeModel; while it compiles (models and rollouts are reconciled
        concurrently) its engines are not final, so the rollout waits for them."""
        obj = self._cached("EdgeModel", namespace, name)
        if obj is not None and (obj.get("metadata") or {}).get("deletionTimestamp"):
            return None          # being deleted: its rollouts report ModelNotFound
        status = (obj or {}).get("status") or {}
        if obj is not None and status.get("phase") == "Compiling":
            return {**obj, "status": {**status, "engines": []}}
        return obj

    async def _reconcile_rollout(self, obj: dict[str, Any]) -> dict[str, Any]:
        from controller.reconcile.rollouts import reconcile_rollout

        def rollouts() -> list[dict[str, Any]]:
            cache = self.source.cache if self.source is not None else {}
            return [o for k, o in list(cache.items()) if k[0] == "EdgeRollout"
                    and not (o.get("metadata") or {}).get("deletionTimestamp")]

        ctx = dataclasses.replace(self.core.rollout_context(), get_model=self._model_for_rollout,
                                  list_rollouts=rollouts)
        status = await reconcile_rollout(obj, ctx)
        return dict(_drop_nulls(rollout_status_for_cluster(status)))

    # -- finalizers (controller.reconcile.cleanup, shared with the embedded mode) ----------
    def _cleanup_context(self) -> Any:
        from controller.reconcile.cleanup import CleanupContext

        def rollouts() -> list[dict[str, Any]]:
            cache = self.source.cache if self.source is not None else {}
            return [o for k, o in list(cache.items()) if k[0] == "EdgeRollout"
                    and not (o.get("metadata") or {}).get("deletionTimestamp")]

        return CleanupContext(db=self.core.db, keys=self.core.keys,
                              publisher=self.core.publisher, list_rollouts=rollouts,
                              requeue_rollouts=self._requeue_rollouts)

    async def _finalize_rollout(self, obj: dict[str, Any]) -> None:
        from controller.reconcile.cleanup import finalize_rollout

        await finalize_rollout(obj, self._cleanup_context())

    async def _finalize_model(self, obj: dict[str, Any]) -> None:
        from controller.reconcile.cleanup import finalize_model

        await finalize_model(obj, self._cleanup_context())

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        from controller.core import ControllerCore
        from controller.crd.adapter import LoopReconciler
        from controller.crd.leader import LeaderElector
        from controller.crd.source import ClusterSource

        o = self.opts
        lease_client, watch_client = self._kube_client(), self._kube_client()  # fail fast
        keys_dir = self.settings.resolved_keys_dir
        if not (keys_dir / "state.json").is_file():
            log.warning("no signing keys in %s: creating new ones (mount the keys made with "
                        "`edgefleet keys init` for a real fleet)", keys_dir)
        try:
            self.core = ControllerCore(self.settings)
        except OSError as e:
            raise GiveUp(f"cannot open the data folder, database or keys: {e}",
                         reason="storage") from e
        self.core.ingest.on_change = self._requeue_rollouts
        await self.core.start(reconcile=False)
        try:
            loop = asyncio.get_running_loop()
            rec = LoopReconciler(loop, reconcilers={"EdgeModel": self._reconcile_model,
                                                    "EdgeRollout": self._reconcile_rollout},
                                 finalizers={"EdgeModel": self._finalize_model,
                                             "EdgeRollout": self._finalize_rollout})
            self.elector = LeaderElector(
                lease_client, name=o.lease_name, namespace=o.lease_namespace,
                identity=o.identity, lease_duration_s=o.lease_duration_s,
                renew_deadline_s=o.renew_deadline_s, retry_period_s=o.retry_period_s)
            self.source = ClusterSource(
                watch_client, rec, namespace=o.watch_namespace or None,
                elector=self.elector, progress_requeue_s=o.progress_requeue_s,
                level_kinds=("EdgeRollout",),
                # per-kind workers: a long compile does not hold up rollouts; two models
                # may compile at once (the compile executor bounds the CPU), never one twice
                workers_per_kind={"EdgeModel": 2, "EdgeRollout": 1, "DeviceClass": 1})
            self.source.start()
            self.elector.start()
            await self._start_api()
        except BaseException:
            await self.stop()
            raise
        log.info("edgefleet cluster controller %s: API on %s:%d, lease %s/%s, watching %s",
                 o.identity, o.listen_host, self.api_port, o.lease_namespace, o.lease_name,
                 o.watch_namespace or "all namespaces")

    async def _start_api(self) -> None:
        from controller.api.app import create_app
        from controller.api.server import ApiServer

        self._api = ApiServer(self.opts.listen_host, self.opts.listen_port)
        self.api_port = self._api.port
        await self._api.start(create_app(_ApiView(self)))

    async def stop(self) -> None:
        """Give up the Lease (a standby takes over at once), stop watching, stop the rest."""
        if self.elector is not None:
            await asyncio.to_thread(self.elector.stop, release=True)
        if self.source is not None:
            await asyncio.to_thread(self.source.stop)
        if self._api is not None:
            await self._api.stop()
            self._api = None
        if self.core is not None:
            await self.core.stop()
            self.core = None
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.close()
        self._clients.clear()


async def serve(settings: Settings, opts: ClusterOptions) -> None:
    """Run until SIGINT/SIGTERM, then release the Lease and stop cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    ctrl = ClusterController(settings, opts)
    await ctrl.start()
    try:
        await stop.wait()
    finally:
        await ctrl.stop()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgefleet cluster",
                                description="run the controller on Kubernetes (CRDs as the "
                                            "source of truth, Lease leader election)")
    p.add_argument("--config", default="", help="settings YAML (default $EDGEFLEET_CONFIG)")
    p.add_argument("--kubeconfig", default="", help="default: in-cluster, else $KUBECONFIG")
    p.add_argument("--listen", default="", help="API/probe address HOST:PORT (default "
                                                "0.0.0.0:8080)")
    p.add_argument("--identity", default="", help="Lease holder identity (default $POD_NAME)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    return p


def run_cluster(argv: list[str]) -> int:
    """Entry point of ``edgefleet cluster``; returns the exit code."""
    args = build_parser().parse_args(argv)
    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)  # also when `edgefleet` configured logging already
    for noisy in ("httpx", "httpcore", "uvicorn", "uvicorn.error", "aiomqtt", "kubernetes"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING,
                                              logging.getLogger().level))
    cfg = args.config or os.environ.get("EDGEFLEET_CONFIG") or ""
    try:
        settings, opts = load_config(Path(cfg) if cfg else None)
        if args.listen:
            opts.listen_host, opts.listen_port = _split_listen(args.listen)
        if args.identity:
            opts.identity = args.identity
        opts.kubeconfig = args.kubeconfig
        asyncio.run(serve(settings, opts))
    except EdgefleetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def main() -> None:
    sys.exit(run_cluster(sys.argv[1:]))


if __name__ == "__main__":
    main()
