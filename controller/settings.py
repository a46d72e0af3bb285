"""Controller settings: one dataclass read by ControllerCore and everything it starts.

Built by the CLI (`edgefleet up`), the API process and tests; every limit on untrusted
bytes lives here with its unit in the name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Settings:
    """Configuration of one controller process."""

    data_dir: Path = field(default_factory=lambda: Path("edgefleet-data"))
    db_url: str = ""                       # "" = sqlite:///{data_dir}/edgefleet.db
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_client_id: str = "edgefleet-controller"
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    mqtt_reconnect_s: float = 1.0
    # "5" (default) or "3.1.1" (only for the embedded amqtt fallback: no shared subscriptions,
    # so shared_group is cleared; ACL denials are invisible to clients)
    mqtt_protocol: str = "5"
    # TLS with a client certificate (controller/pki.py issue_controller_cert); "" = plain TCP
    mqtt_tls_ca: str = ""
    mqtt_tls_cert: str = ""
    mqtt_tls_key: str = ""
    # MQTT 5 shared subscription group for telemetry ingest ("" = plain subscriptions)
    shared_group: str = "edgefleet-controller"
    keys_dir: Path | None = None           # None = {data_dir}/keys
    # enrollment (controller/fleet/enroll.py, POST /api/v1/enroll): what boards are told
    enroll_mqtt_host: str = ""             # broker host for boards ("" = mqtt_host)
    enroll_mqtt_port: int = 0              # 0 = mqtt_port
    pki_dir: Path | None = None            # CA signing device CSRs (None = {data_dir}/pki)
    enroll_cert_days: int = 825
    max_enroll_request_bytes: int = 64 * 1024
    max_token_ttl_s: int = 30 * 24 * 3600
    max_token_uses: int = 10000
    store_dir: Path | None = None          # None = {data_dir}/store
    # OTA
    chunk_size_bytes: int = 131072         # never above MAX_CHUNK_SIZE_BYTES
    ota_max_bytes_per_second: int = 8 * 1024 * 1024
    offer_ttl_s: int = 7 * 24 * 3600
    max_chunks_per_request: int = 64
    chunk_queue_depth: int = 256           # at least this many downloads queued (one entry each)
    # untrusted input limits
    max_upload_bytes: int = 512 * 1024 * 1024
    max_artifact_bytes: int = 2 * 1024 * 1024 * 1024
    max_mqtt_payload_bytes: int = 256 * 1024
    max_heartbeat_models: int = 64
    max_device_labels: int = 64
    # a device is shown "stale" (health and metrics) when offline or silent for longer than
    # this: 3 x the agents' default heartbeat_interval_s (10 s)
    stale_after_s: float = 30.0
    # ingest (controller/fleet/ingest.py): one database transaction per batch
    ingest_flush_s: float = 0.2            # the longest a message waits for its batch
    ingest_max_batch: int = 5000           # a batch is written at once when this many wait
    # metrics + update statuses held while the database is behind; beyond, the oldest
    # metrics are dropped and counted (heartbeats/presence coalesce per device: bounded)
    ingest_max_pending: int = 200_000
    ingest_writer_thread: bool = False     # write batches on a thread, not between MQTT reads
    # liveness: a device silent for this many of its heartbeat periods is marked offline
    # (0 = only last wills mark devices offline); the period is what the agent reports, else
    # heartbeat_interval_s (the agents' default)
    offline_after_missed: int = 3
    heartbeat_interval_s: float = 10.0
    offline_check_s: float = 5.0
    # the reconcile loop runs at most once per this many seconds: kicks that arrive together
    # (a telemetry batch, a burst of applies) share one pass
    reconcile_min_interval_s: float = 0.25
    # reconcile
    resync_s: float = 10.0
    compile_workers: int = 1
    compile_in_process_pool: bool = True   # False: threads (tests on tiny models)
    key_list_ttl_s: int = 365 * 24 * 3600
    signing_key_ttl_s: int = 90 * 24 * 3600
    # replicas sharing one database (controller/fleet/lease.py DbLease, docs/scaling.md)
    replica_id: str = ""                   # "" = {hostname}-{pid}
    lease_s: float = 15.0                  # a dead leader is replaced after at most this long
    lease_renew_s: float = 5.0             # renew period; the leader steps down lease_s - this
                                           # after its last renewal (needs 2 * renew < lease)

    MAX_CHUNK_SIZE_BYTES = 131072

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.chunk_size_bytes <= 0 or self.chunk_size_bytes > self.MAX_CHUNK_SIZE_BYTES:
            raise ValueError(
                f"chunk_size_bytes must be in 1..{self.MAX_CHUNK_SIZE_BYTES}, "
                f"got {self.chunk_size_bytes}"
            )
        if self.ingest_flush_s <= 0 or self.ingest_max_batch <= 0 or self.ingest_max_pending <= 0:
            raise ValueError("ingest_flush_s, ingest_max_batch and ingest_max_pending must be > 0")
        if self.ota_max_bytes_per_second <= 0:
            raise ValueError("ota_max_bytes_per_second must be positive")
        self.mqtt_protocol = str(self.mqtt_protocol)
        if self.mqtt_protocol not in ("5", "3.1.1"):
            raise ValueError(f"mqtt_protocol must be '5' or '3.1.1', got {self.mqtt_protocol!r}")
        if self.mqtt_protocol == "3.1.1":
            self.shared_group = ""   # $share/... is MQTT 5 (and amqtt has none)
        if (self.mqtt_tls_cert or self.mqtt_tls_key) and not self.mqtt_tls_ca:
            raise ValueError("mqtt_tls_cert/mqtt_tls_key need mqtt_tls_ca")

    def aiomqtt_options(self) -> dict[str, Any]:
        """Keyword arguments for ``aiomqtt.Client``: protocol version and TLS parameters."""
        import aiomqtt

        opts: dict[str, Any] = {"protocol": aiomqtt.ProtocolVersion.V311
                                if self.mqtt_protocol == "3.1.1" else aiomqtt.ProtocolVersion.V5}
        if self.mqtt_tls_ca:
            opts["tls_params"] = aiomqtt.TLSParameters(
                ca_certs=self.mqtt_tls_ca, certfile=self.mqtt_tls_cert or None,
                keyfile=self.mqtt_tls_key or None)
        return opts

    @property
    def resolved_db_url(self) -> str:
        return self.db_url or f"sqlite:///{self.data_dir / 'edgefleet.db'}"

    @property
    def resolved_pki_dir(self) -> Path:
        return Path(self.pki_dir) if self.pki_dir else self.data_dir / "pki"

    @property
    def resolved_keys_dir(self) -> Path:
        return Path(self.keys_dir) if self.keys_dir else self.data_dir / "keys"

    @property
    def resolved_store_dir(self) -> Path:
        return Path(self.store_dir) if self.store_dir else self.data_dir / "store"
