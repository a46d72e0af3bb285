"""SQLModel tables of the controller's fleet state (SQLite by default, PostgreSQL by URL).

Written by the ingest (heartbeats, metrics, presence, update status), the reconcilers
(resources, engines, rollouts) and the OTA publisher (bytes sent); read by the API and
dashboard. Timestamps are UTC epoch milliseconds. JSON columns hold small documents only.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from sqlalchemy import JSON, BigInteger, Column
from sqlmodel import Field, SQLModel


class ResourcePhase(str, Enum):
    """Lifecycle of an applied resource (EdgeModel / EdgeRollout)."""

    PENDING = "Pending"
    COMPILING = "Compiling"
    READY = "Ready"
    PROGRESSING = "Progressing"
    COMPLETE = "Complete"
    FAILED = "Failed"
    PAUSED = "Paused"


class DeviceRolloutState(str, Enum):
    """Where one device stands in one rollout (mirrors the agent's UpdateState names)."""

    PENDING = "pending"          # targeted, not yet offered
    OFFERED = "offered"          # signed offer published
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    PATCHING = "patching"
    STAGED = "staged"
    ACTIVATING = "activating"
    COMMITTED = "committed"      # device serves the target
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    CANCELLED = "cancelled"      # its rollout was deleted before it finished


class Resource(SQLModel, table=True):
    """An applied resource in embedded mode (the cluster mode keeps them in Kubernetes)."""

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(index=True)            # EdgeModel | EdgeRollout | DeviceClass
    namespace: str = Field(default="default", index=True)  # "" for cluster-scoped
    name: str = Field(index=True)
    uid: str
    generation: int = Field(default=1, sa_type=BigInteger)
    resource_version: int = Field(default=1, sa_type=BigInteger)
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    status: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    labels: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    created_ms: int = Field(default=0, sa_type=BigInteger)
    updated_ms: int = Field(default=0, sa_type=BigInteger)
    deleted_ms: int | None = Field(default=None, sa_type=BigInteger)


class Device(SQLModel, table=True):
    """One board, as last reported."""

    device_id: str = Field(primary_key=True)
    device_class: str = Field(default="", index=True)
    online: bool = False
    last_heartbeat_ms: int | None = Field(default=None, sa_type=BigInteger)
    last_seen_ms: int | None = Field(default=None, sa_type=BigInteger)  # any message
    offline_since_ms: int | None = Field(default=None, sa_type=BigInteger)
    offline_reason: str = ""
    facts: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    models: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
    updates: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
    health: str = ""
    health_reason: str = ""
    agent_version: str = ""
    uptime_s: int = Field(default=0, sa_type=BigInteger)
    serve_url: str = ""
    labels: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    heartbeat_seq: int = Field(default=0, sa_type=BigInteger)


class Artifact(SQLModel, table=True):
    """A blob in the content-addressed store (source model, engine, delta, samples)."""

    sha256: str = Field(primary_key=True)
    size: int = Field(sa_type=BigInteger)
    kind: str = Field(index=True)            # model | engine | delta | samples
    media_type: str = ""
    created_ms: int = Field(default=0, sa_type=BigInteger)
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))


class Engine(SQLModel, table=True):
    """A compiled engine, keyed by (model sha256, device class, precision, toolchain version)."""

    id: int | None = Field(default=None, primary_key=True)
    model_sha256: str = Field(index=True)
    device_class: str = Field(index=True)
    precision: str
    toolchain_version: str
    engine_sha256: str = Field(index=True)
    size: int = Field(default=0, sa_type=BigInteger)
    engine_kind: str = ""
    fingerprint: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    signature: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    report: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    created_ms: int = Field(default=0, sa_type=BigInteger)


class Delta(SQLModel, table=True):
    """Cached delta per (base sha256, target sha256): devices sharing a base share it."""

    id: int | None = Field(default=None, primary_key=True)
    base_sha256: str = Field(index=True)     # "" for a full artifact
    target_sha256: str = Field(index=True)
    codec: str
    payload_sha256: str
    payload_size: int = Field(sa_type=BigInteger)
    candidates: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    created_ms: int = Field(default=0, sa_type=BigInteger)


class DeviceRollout(SQLModel, table=True):
    """Per-device state of one rollout: what it was offered and how far it got."""

    id: int | None = Field(default=None, primary_key=True)
    rollout: str = Field(index=True)         # namespace/name
    device_id: str = Field(index=True)
    model_name: str = ""
    wave: int = Field(default=0, sa_type=BigInteger)
    version: int = Field(default=0, sa_type=BigInteger)
    update_id: str = Field(default="", index=True)
    target_sha256: str = ""
    base_sha256: str = ""
    codec: str = ""
    payload_size: int = Field(default=0, sa_type=BigInteger)
    state: DeviceRolloutState = DeviceRolloutState.PENDING
    reason: str = ""
    bytes_sent: int = Field(default=0, sa_type=BigInteger)
    bytes_received: int = Field(default=0, sa_type=BigInteger)
    offered_ms: int | None = Field(default=None, sa_type=BigInteger)
    updated_ms: int = Field(default=0, sa_type=BigInteger)
    # the offer's manifest chunk size (spec.chunkSizeBytes capped by the controller); 0 = the
    # controller's chunk_size_bytes (rows written before this column existed)
    chunk_size: int = Field(default=0, sa_type=BigInteger)
    # spec.maxBytesPerSecond when offered (0 = no per-rollout cap), for a restarted publisher
    max_bytes_per_second: int = Field(default=0, sa_type=BigInteger)
    # "" = the main engine; else the EdgeModel spec.variants[].name this row ships
    variant: str = ""


class DeviceDesired(SQLModel, table=True):
    """Per device: the last signed DesiredState published (retained) and the retained offer."""

    device_id: str = Field(primary_key=True)
    generation: int = Field(default=0, sa_type=BigInteger)
    digest: str = ""                         # sha256 of the desired models last published
    models: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
    published_ms: int = Field(default=0, sa_type=BigInteger)
    # update id of the offer retained on .../update/offer ("" = none or cleared)
    offer_update_id: str = ""


class MetricSample(SQLModel, table=True):
    """Latest-window metrics per device (and per model); the dashboard's live view."""

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(index=True)
    at_ms: int = Field(index=True, sa_type=BigInteger)
    model_name: str = ""
    model_version: int = Field(default=0, sa_type=BigInteger)
    requests: int = Field(default=0, sa_type=BigInteger)
    errors: int = Field(default=0, sa_type=BigInteger)
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    cpu_percent: float | None = None
    agent_rss_bytes: int | None = Field(default=None, sa_type=BigInteger)
    temperature_c: float | None = None
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))


class Event(SQLModel, table=True):
    """Notable steps and errors, for the dashboard and `edgefleet get events`."""

    id: int | None = Field(default=None, primary_key=True)
    at_ms: int = Field(index=True, sa_type=BigInteger)
    kind: str = ""             # involved object kind: EdgeModel, EdgeRollout, Device
    name: str = ""
    type: str = "Normal"       # Normal | Warning
    reason: str = ""
    message: str = ""
