"""SQLModel tables of the controller's fleet state (SQLite by default, PostgreSQL by URL).

Written by the ingest (heartbeats, metrics, presence, update status), the reconcilers
(resources, engines, rollouts) and the OTA publisher (bytes sent); read by the API and
dashboard. Timestamps are UTC epoch milliseconds. JSON columns hold small documents only.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from sqlalchemy import JSON, Column
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


class Resource(SQLModel, table=True):
    """An applied resource in embedded mode (the cluster mode keeps them in Kubernetes)."""

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(index=True)            # EdgeModel | EdgeRollout | DeviceClass
    namespace: str = Field(default="default", index=True)  # "" for cluster-scoped
    name: str = Field(index=True)
    uid: str
    generation: int = 1
    resource_version: int = 1
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    status: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    labels: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    created_ms: int = 0
    updated_ms: int = 0
    deleted_ms: int | None = None


class Device(SQLModel, table=True):
    """One board, as last reported."""

    device_id: str = Field(primary_key=True)
    device_class: str = Field(default="", index=True)
    online: bool = False
    last_heartbeat_ms: int | None = None
    last_seen_ms: int | None = None          # any message
    offline_since_ms: int | None = None
    offline_reason: str = ""
    facts: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    models: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
    updates: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
    health: str = ""
    health_reason: str = ""
    agent_version: str = ""
    uptime_s: int = 0
    serve_url: str = ""
    labels: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    heartbeat_seq: int = 0


class Artifact(SQLModel, table=True):
    """A blob in the content-addressed store (source model, engine, delta, samples)."""

    sha256: str = Field(primary_key=True)
    size: int
    kind: str = Field(index=True)            # model | engine | delta | samples
    media_type: str = ""
    created_ms: int = 0
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))


class Engine(SQLModel, table=True):
    """A compiled engine, keyed by (model sha256, device class, precision, toolchain version)."""

    id: int | None = Field(default=None, primary_key=True)
    model_sha256: str = Field(index=True)
    device_class: str = Field(index=True)
    precision: str
    toolchain_version: str
    engine_sha256: str = Field(index=True)
    size: int = 0
    engine_kind: str = ""
    fingerprint: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    signature: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    report: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    created_ms: int = 0


class Delta(SQLModel, table=True):
    """Cached delta per (base sha256, target sha256): devices sharing a base share it."""

    id: int | None = Field(default=None, primary_key=True)
    base_sha256: str = Field(index=True)     # "" for a full artifact
    target_sha256: str = Field(index=True)
    codec: str
    payload_sha256: str
    payload_size: int
    candidates: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    created_ms: int = 0


class DeviceRollout(SQLModel, table=True):
    """Per-device state of one rollout: what it was offered and how far it got."""

    id: int | None = Field(default=None, primary_key=True)
    rollout: str = Field(index=True)         # namespace/name
    device_id: str = Field(index=True)
    model_name: str = ""
    wave: int = 0
    version: int = 0
    update_id: str = Field(default="", index=True)
    target_sha256: str = ""
    base_sha256: str = ""
    codec: str = ""
    payload_size: int = 0
    state: DeviceRolloutState = DeviceRolloutState.PENDING
    reason: str = ""
    bytes_sent: int = 0
    bytes_received: int = 0
    offered_ms: int | None = None
    updated_ms: int = 0


class MetricSample(SQLModel, table=True):
    """Latest-window metrics per device (and per model); the dashboard's live view."""

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(index=True)
    at_ms: int = Field(index=True)
    model_name: str = ""
    model_version: int = 0
    requests: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    cpu_percent: float | None = None
    agent_rss_bytes: int | None = None
    temperature_c: float | None = None
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))


class Event(SQLModel, table=True):
    """Notable steps and errors, for the dashboard and `edgefleet get events`."""

    id: int | None = Field(default=None, primary_key=True)
    at_ms: int = Field(index=True)
    kind: str = ""             # involved object kind: EdgeModel, EdgeRollout, Device
    name: str = ""
    type: str = "Normal"       # Normal | Warning
    reason: str = ""
    message: str = ""
