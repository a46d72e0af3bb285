"""Controller settings: one dataclass read by ControllerCore and everything it starts.

Built by the CLI (`edgefleet up`), the API process and tests; every limit on untrusted
bytes lives here with its unit in the name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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
    # MQTT 5 shared subscription group for telemetry ingest ("" = plain subscriptions)
    shared_group: str = "edgefleet-controller"
    keys_dir: Path | None = None           # None = {data_dir}/keys
    store_dir: Path | None = None          # None = {data_dir}/store
    # OTA
    chunk_size_bytes: int = 131072         # never above MAX_CHUNK_SIZE_BYTES
    ota_max_bytes_per_second: int = 8 * 1024 * 1024
    offer_ttl_s: int = 7 * 24 * 3600
    max_chunks_per_request: int = 64
    chunk_queue_depth: int = 256
    # untrusted input limits
    max_upload_bytes: int = 512 * 1024 * 1024
    max_artifact_bytes: int = 2 * 1024 * 1024 * 1024
    max_mqtt_payload_bytes: int = 256 * 1024
    max_heartbeat_models: int = 64
    # reconcile
    resync_s: float = 10.0
    compile_workers: int = 1
    compile_in_process_pool: bool = True   # False: threads (tests on tiny models)
    key_list_ttl_s: int = 365 * 24 * 3600
    signing_key_ttl_s: int = 90 * 24 * 3600

    MAX_CHUNK_SIZE_BYTES = 131072

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.chunk_size_bytes <= 0 or self.chunk_size_bytes > self.MAX_CHUNK_SIZE_BYTES:
            raise ValueError(
                f"chunk_size_bytes must be in 1..{self.MAX_CHUNK_SIZE_BYTES}, "
                f"got {self.chunk_size_bytes}"
            )
        if self.ota_max_bytes_per_second <= 0:
            raise ValueError("ota_max_bytes_per_second must be positive")

    @property
    def resolved_db_url(self) -> str:
        return self.db_url or f"sqlite:///{self.data_dir / 'edgefleet.db'}"

    @property
    def resolved_keys_dir(self) -> Path:
        return Path(self.keys_dir) if self.keys_dir else self.data_dir / "keys"

    @property
    def resolved_store_dir(self) -> Path:
        return Path(self.store_dir) if self.store_dir else self.data_dir / "store"
