"""SQLModel tables of the controller's fleet state (SQLite by default, PostgreSQL by URL).

Written by the ingest (heartbeats, metrics, presence, update status), the reconcilers
(resources, engines, rollouts) and the OTA publisher (bytes sent); read by the API and
dashboard. Timestamps are UTC epoch milliseconds. JSON columns hold small documents only.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index
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
    # every engine the device holds in an A/B slot (Heartbeat.slots), loaded or not
    slots: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
    # recent faults the device reported (integrity, crash loop, local rollback)
    faults: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
    restarts: int = Field(default=0, sa_type=BigInteger)
    desired_generation: int = Field(default=0, sa_type=BigInteger)
    # the agent's heartbeat period (Heartbeat.heartbeat_interval_ms; 0 = not reported): the
    # liveness sweep marks the device offline after settings.offline_after_missed periods
    heartbeat_interval_ms: int = Field(default=0, sa_type=BigInteger)


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
    revision: int = Field(default=0, sa_type=BigInteger)
    engine_version: int = Field(default=0, sa_type=BigInteger)
    # the on-device accuracy probe's report for this update (UpdateStatus.probe), {} = none
    probe: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))


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

    # a device's newest sample (the latest metrics of the fleet) and its history, by time
    __table_args__ = (Index("ix_metricsample_device_at", "device_id", "at_ms"),)

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

    # the dedupe lookup (latest event of one object) and per-object listings use it
    __table_args__ = (Index("ix_event_kind_name_id", "kind", "name", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    at_ms: int = Field(index=True, sa_type=BigInteger)
    kind: str = ""             # involved object kind: EdgeModel, EdgeRollout, Device
    name: str = ""
    type: str = "Normal"       # Normal | Warning
    reason: str = ""
    message: str = ""


class DeviceTarget(SQLModel, table=True):
    """The desired target of one (device, model, variant): what the device should serve.

    Set by the rollout that owns the (model, device) when the device's wave opens, moved
    back by a back-out or an abort (the previous engine at a higher revision), removed when
    the rollout is deleted. Every status compares it with what the device reports serving
    (Device.models); offers (DeviceRollout rows) only carry the bytes.
    """

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(index=True)
    model_name: str = Field(index=True)
    variant: str = ""
    version: int = Field(default=0, sa_type=BigInteger)
    revision: int = Field(default=0, sa_type=BigInteger)
    engine_version: int = Field(default=0, sa_type=BigInteger)   # 0 = version
    target_sha256: str = ""
    rollout: str = Field(default="", index=True)                  # owner, namespace/name
    reason: str = "rollout"                                        # rollout | backout | abort | undo
    # what the device served when this rollout first targeted it (the back-out target)
    prev_sha256: str = ""
    prev_version: int = Field(default=0, sa_type=BigInteger)
    prev_revision: int = Field(default=0, sa_type=BigInteger)
    prev_engine_version: int = Field(default=0, sa_type=BigInteger)
    # since when the device served that previous engine (the latency baseline's start)
    prev_since_ms: int = Field(default=0, sa_type=BigInteger)
    set_ms: int = Field(default=0, sa_type=BigInteger)
    progress_ms: int = Field(default=0, sa_type=BigInteger)     # last progress seen (deadline)
    reached_ms: int | None = Field(default=None, sa_type=BigInteger)  # observed == desired since
    retry: int = Field(default=0, sa_type=BigInteger)              # spec.retry when set
    update_id: str = ""                                            # the offer carrying it


class DeviceOffer(SQLModel, table=True):
    """The offer retained on a device's per-model topic ``update/offer/{model_key}``."""

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(index=True)
    model_key: str = ""
    update_id: str = ""


class RolloutMember(SQLModel, table=True):
    """Which wave a device belongs to in a rollout (kept across versions and restarts)."""

    id: int | None = Field(default=None, primary_key=True)
    rollout: str = Field(index=True)
    device_id: str = Field(index=True)
    wave: int = Field(default=0, sa_type=BigInteger)
    joined_ms: int = Field(default=0, sa_type=BigInteger)
    late: bool = False
    plan: str = ""                       # the waves' sizes it was assigned under


class WaveGate(SQLModel, table=True):
    """A wave gate decision of one rollout release (version, engine version, retry round):
    passed or failed, with the signals and numbers, so a restarted controller keeps it."""

    id: int | None = Field(default=None, primary_key=True)
    rollout: str = Field(index=True)
    release: str = ""                     # "v{version}e{engine_version}:{wave plan}"
    wave: int = Field(default=0, sa_type=BigInteger)
    verdict: str = ""                     # passed | failed
    message: str = ""
    signals: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    decided_ms: int = Field(default=0, sa_type=BigInteger)
    acted: bool = False                   # the failure's back-out was carried out


class ModelVersion(SQLModel, table=True):
    """Each EdgeModel version the controller compiled: its source and engines, for the
    "versions only go up" check and for rolling back to an older engine."""

    id: int | None = Field(default=None, primary_key=True)
    namespace: str = Field(default="default", index=True)
    name: str = Field(index=True)
    version: int = Field(default=0, sa_type=BigInteger)
    source_sha256: str = ""
    engines: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))  # class -> entry
    variants: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
    created_ms: int = Field(default=0, sa_type=BigInteger)
