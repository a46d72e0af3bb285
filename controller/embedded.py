"""The embedded, single-machine controller: `edgefleet up` (and the demo, and e2e tests).

Runs in one asyncio loop: an MQTT broker (controller/broker.py), the signing keys (created on
first start, controller/ota/keys.py), the ControllerCore (controller/core.py) and a uvicorn
server for the API and dashboard (controller/api/app.py). Ctrl-C (SIGINT) or SIGTERM stops the
parts in reverse order. Data lives in one folder (default ./.edgefleet): SQLite database,
artifact store, keys, broker config and log.

``tls=True`` (``edgefleet up --tls``): a fleet CA in ``{data_dir}/pki`` (controller/pki.py,
created on first start), a Mosquitto TLS listener with client certificates and the device ACL
(controller/broker.py), and the controller connecting with its own certificate. When the
broker is the amqtt fallback (MQTT 3.1.1 only) the controller speaks MQTT 3.1.1.

``builders_file`` (``edgefleet up --builders FILE``): a BuildDispatcher for those trusted
remote builders (docs/builder.md), its HTTP routes on the API, ``core.build_dispatcher`` set.
``advertise_mqtt_host/port``: the broker address given to boards that enroll
(``POST /api/v1/enroll``, controller/api/enroll.py).

Replicas (``edgefleet up --db-url postgresql+psycopg://... --broker-url mqtt://...``,
docs/scaling.md): with a ``db_url`` several of these processes share one database, one broker
(given by URL: none is started), the signing keys (``keys_dir``) and the artifact store
(``store_dir``). Each ingests its share of device traffic (MQTT 5 shared subscriptions) and
serves the API; a DbLease (controller/fleet/lease.py) named ``edgefleet-controller`` elects
the one that reconciles (``core.leader``). Gaining the lease kicks a reconcile pass; losing it
cancels this replica's in-flight reconciles; a clean stop releases it after the core stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.api.server import ApiServer
from controller.broker import BrokerHandle, start_broker

log = logging.getLogger("edgefleet.embedded")


@dataclass
class EmbeddedOptions:
    """What `edgefleet up` takes from the command line."""

    data_dir: Path = field(default_factory=lambda: Path(".edgefleet"))
    api_host: str = "127.0.0.1"
    api_port: int = 8080             # 0 = a free port
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883            # 0 = a free port
    broker_url: str = ""             # use this broker; start none
    broker: str = "auto"             # auto | mosquitto | amqtt
    tls: bool = False                # TLS + client certificates + ACL (needs mosquitto)
    advertise_mqtt_host: str = ""    # broker host told to enrolling boards ("" = mqtt_host)
    advertise_mqtt_port: int = 0     # 0 = the broker's port
    builders_file: Path | None = None  # trusted builders JSON: start a BuildDispatcher
    # replicas (docs/scaling.md): a shared database turns on leader election
    db_url: str = ""                 # "" = SQLite in data_dir (one controller, no lease)
    replica_id: str = ""             # "" = {hostname}-{pid}
    keys_dir: Path | None = None     # None = {data_dir}/keys; replicas share one
    store_dir: Path | None = None    # None = {data_dir}/store; replicas share one
    lease_s: float = 15.0            # leader lease; renewed every lease_s / 3
    settings_overrides: dict[str, Any] = field(default_factory=dict)


def default_replica_id() -> str:
    """``{hostname}-{pid}``: unique among replicas on one machine and across machines."""
    return f"{socket.gethostname()}-{os.getpid()}"


class EmbeddedController:
    """Broker + keys + ControllerCore + API server, started and stopped together."""

    def __init__(self, opts: EmbeddedOptions) -> None:
        self.opts = opts
        self.data_dir = Path(opts.data_dir).resolve()
        self.broker: BrokerHandle | None = None
        self.core: Any = None
        self.keys: Any = None
        self.pki: Any = None             # controller.pki.CertificateAuthority when tls
        self.build_dispatcher: Any = None  # controller.builder.BuildDispatcher (builders_file)
        self._api: ApiServer | None = None
        self.api_port = 0
        self.lease: Any = None           # controller.fleet.lease.DbLease (replicas)
        self._lease_task: asyncio.Task[None] | None = None
        self._lease_engine: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.opts.api_host}:{self.api_port}"

    async def start(self) -> None:
        from controller.api.app import create_app
        from controller.core import ControllerCore
        from controller.ota.keys import KeyStore
        from controller.settings import Settings

        self.data_dir.mkdir(parents=True, exist_ok=True)
        log.info("data folder %s", self.data_dir)
        tls, tls_settings = await asyncio.to_thread(self._tls_files)
        self.broker = await start_broker(
            self.data_dir, host=self.opts.mqtt_host, port=self.opts.mqtt_port or None,
            external_url=self.opts.broker_url or None, prefer=self.opts.broker, tls=tls)
        try:
            overrides = {"mqtt_protocol": self.broker.mqtt_protocol, **tls_settings,
                         "enroll_mqtt_host": self.opts.advertise_mqtt_host,
                         "enroll_mqtt_port": self.opts.advertise_mqtt_port,
                         **self._replica_settings(),
                         **self.opts.settings_overrides}
            settings = Settings(data_dir=self.data_dir, mqtt_host=self.broker.host,
                                mqtt_port=self.broker.port, **overrides)
            keys_dir = settings.resolved_keys_dir
            if not (keys_dir / "state.json").is_file():
                log.info("no signing keys in %s: creating a root key and a signing key", keys_dir)
            self.keys = await asyncio.to_thread(_load_or_init_keys, keys_dir, KeyStore)
            if settings.db_url:      # tables first, one replica at a time (shared database)
                await asyncio.to_thread(self._start_lease_engine, settings)
            self.core = ControllerCore(settings)
            if settings.db_url:
                self._start_lease(settings)
            await self.core.start()
            self._api = ApiServer(self.opts.api_host, self.opts.api_port)
            self.api_port = self._api.port
            app = create_app(self.core)
            if self.opts.builders_file is not None:
                await self._start_builds(app, settings)
            await self._api.start(app)
        except BaseException:
            await self.stop()
            raise
        log.info("edgefleet is up: dashboard and API at %s, MQTT broker (%s) at %s",
                 self.url, self.broker.kind, self.broker.url)

    def _replica_settings(self) -> dict[str, Any]:
        """Settings fields for the replica options that are set (db, folders, lease)."""
        o = self.opts
        out: dict[str, Any] = {}
        if o.db_url:
            out["db_url"] = o.db_url
        if o.keys_dir is not None:
            out["keys_dir"] = Path(o.keys_dir).resolve()
        if o.store_dir is not None:
            out["store_dir"] = Path(o.store_dir).resolve()
        out["replica_id"] = o.replica_id or default_replica_id()
        out["lease_s"], out["lease_renew_s"] = float(o.lease_s), float(o.lease_s) / 3
        return out

    def _start_lease_engine(self, settings: Any) -> None:
        """An engine of its own for the lease (a busy core pool cannot delay renewals); it
        creates the tables, replicas taking turns (make_engine_serialized)."""
        from controller.fleet.lease import make_engine_serialized

        self._lease_engine = make_engine_serialized(settings.resolved_db_url)

    def _start_lease(self, settings: Any) -> None:
        """Leader election on the shared database: only the lease holder reconciles."""
        from controller.fleet.lease import DbLease

        core = self.core
        self.lease = DbLease(self._lease_engine, identity=settings.replica_id,
                             lease_s=settings.lease_s, renew_s=settings.lease_renew_s,
                             on_gained=lambda: self._on_gained(core),
                             on_lost=lambda reason: stand_down(core))
        core.leader = self.lease          # before core.start: no pass runs as a follower
        self._lease_task = asyncio.create_task(self.lease.run(), name="controller-lease")
        log.info("replica %s: leader election on the shared database (lease %.0f s)",
                 settings.replica_id, settings.lease_s)

    def _on_gained(self, core: Any) -> None:
        if self.core is core:
            core.kick()                   # reconcile at once: the old leader may have left work

    async def _start_builds(self, app: Any, settings: Any) -> None:
        """The remote-build dispatcher for the builders in ``builders_file`` (docs/builder.md)."""
        from controller.builder.dispatcher import BuildDispatcher
        from controller.builder.http import install_builder_routes
        from controller.builder.protocol import load_trusted_builders

        assert self.opts.builders_file is not None and self.core is not None
        trusted = load_trusted_builders(Path(self.opts.builders_file))
        d = BuildDispatcher(store=self.core.store, keys=self.core.keys, trusted_builders=trusted,
                            mqtt_host=settings.mqtt_host, mqtt_port=settings.mqtt_port,
                            work_dir=self.data_dir / "work",
                            mqtt_username=settings.mqtt_username,
                            mqtt_password=settings.mqtt_password,
                            mqtt_options=settings.aiomqtt_options(),
                            publish_key_list=False)   # ControllerCore publishes it
        await d.start()
        self.build_dispatcher = d
        self.core.build_dispatcher = d
        install_builder_routes(app, d)
        log.info("build dispatcher started: %d trusted builder(s) from %s (%s)", len(trusted),
                 self.opts.builders_file, ", ".join(sorted(trusted)) or "none")

    def _tls_files(self) -> tuple[Any, dict[str, str]]:
        """With ``tls``: the CA, the broker's and the controller's identities (made once)."""
        if not self.opts.tls:
            return None, {}
        from controller.broker import BrokerTls
        from controller.pki import CertificateAuthority

        self.pki = CertificateAuthority.load_or_init(self.data_dir / "pki")
        hosts = list(dict.fromkeys([h for h in (self.opts.mqtt_host, "127.0.0.1", "localhost",
                                                self.opts.advertise_mqtt_host) if h]))
        server = self.pki.ensure_server(hosts)
        ctl = self.pki.ensure_controller()
        settings = {"mqtt_tls_ca": str(ctl.ca), "mqtt_tls_cert": str(ctl.cert),
                    "mqtt_tls_key": str(ctl.key)}
        return BrokerTls(server.ca, server.cert, server.key), settings

    async def stop(self) -> None:
        """Stop the API server, the core and the broker (each step even if one fails)."""
        if self._api is not None:
            await self._api.stop()
            self._api = None
        if self.build_dispatcher is not None:
            try:
                await self.build_dispatcher.stop()
            except Exception:
                log.exception("error while stopping the build dispatcher")
            self.build_dispatcher = None
        if self.core is not None:
            try:
                await self.core.stop()
            except Exception:
                log.exception("error while stopping the controller core")
            self.core = None
        if self.lease is not None:        # after the core: no reconcile runs past the release
            await self.lease.stop(self._lease_task)
            self.lease = self._lease_task = None
        if self._lease_engine is not None:
            self._lease_engine.dispose()
            self._lease_engine = None
        if self.broker is not None:
            await self.broker.stop()
            self.broker = None
        log.info("edgefleet stopped")


def stand_down(core: Any) -> None:
    """Leadership lost: cancel this replica's in-flight reconciles (the new leader redoes
    them; the reconcilers are level-triggered and their writes idempotent)."""
    running = getattr(core, "_running", None) or {}
    for task in list(running.values()):
        if not task.done():
            task.cancel()


def _load_or_init_keys(keys_dir: Path, keystore: Any) -> Any:
    """``KeyStore.load_or_init`` under a file lock: replicas starting together on an empty
    shared keys folder create one root key, not one each."""
    import fcntl

    keys_dir.mkdir(parents=True, exist_ok=True)
    with open(keys_dir / ".init.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return keystore.load_or_init(keys_dir)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


async def serve_until_signal(ctrl: EmbeddedController) -> None:
    """Start ``ctrl`` and run until SIGINT/SIGTERM, then stop it cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await ctrl.start()
    try:
        replica = f"  replica {ctrl.lease.identity}" if ctrl.lease is not None else ""
        print(f"edgefleet up: dashboard {ctrl.url}  MQTT {ctrl.broker.url if ctrl.broker else ''}"
              f"{replica}  (Ctrl-C to stop)", flush=True)
        await stop.wait()
        print("stopping ...", flush=True)
    finally:
        await ctrl.stop()


def run_embedded(opts: EmbeddedOptions) -> int:
    """Entry point of `edgefleet up`: returns the process exit code."""
    asyncio.run(serve_until_signal(EmbeddedController(opts)))
    return 0
