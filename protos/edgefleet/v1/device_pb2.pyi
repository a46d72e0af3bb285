from protos.edgefleet.v1 import common_pb2 as _common_pb2
from protos.edgefleet.v1 import update_pb2 as _update_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeviceFacts(_message.Message):
    __slots__ = ("arch", "cpu_flags", "runtimes", "os", "python_version", "cpu_count", "memory_bytes", "board")
    ARCH_FIELD_NUMBER: _ClassVar[int]
    CPU_FLAGS_FIELD_NUMBER: _ClassVar[int]
    RUNTIMES_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    PYTHON_VERSION_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    BOARD_FIELD_NUMBER: _ClassVar[int]
    arch: str
    cpu_flags: _containers.RepeatedScalarFieldContainer[str]
    runtimes: _containers.RepeatedCompositeFieldContainer[_common_pb2.RuntimeInfo]
    os: str
    python_version: str
    cpu_count: int
    memory_bytes: int
    board: str
    def __init__(self, arch: _Optional[str] = ..., cpu_flags: _Optional[_Iterable[str]] = ..., runtimes: _Optional[_Iterable[_Union[_common_pb2.RuntimeInfo, _Mapping]]] = ..., os: _Optional[str] = ..., python_version: _Optional[str] = ..., cpu_count: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., board: _Optional[str] = ...) -> None: ...

class ServedModel(_message.Message):
    __slots__ = ("name", "version", "sha256", "slot", "engine_kind", "precision", "active", "variant", "revision", "engine_version", "update_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    ENGINE_KIND_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    sha256: str
    slot: str
    engine_kind: str
    precision: str
    active: bool
    variant: str
    revision: int
    engine_version: int
    update_id: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ..., slot: _Optional[str] = ..., engine_kind: _Optional[str] = ..., precision: _Optional[str] = ..., active: _Optional[bool] = ..., variant: _Optional[str] = ..., revision: _Optional[int] = ..., engine_version: _Optional[int] = ..., update_id: _Optional[str] = ...) -> None: ...

class ModelFault(_message.Message):
    __slots__ = ("name", "variant", "version", "revision", "sha256", "reason", "message", "at_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    variant: str
    version: int
    revision: int
    sha256: str
    reason: str
    message: str
    at_ms: int
    def __init__(self, name: _Optional[str] = ..., variant: _Optional[str] = ..., version: _Optional[int] = ..., revision: _Optional[int] = ..., sha256: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., at_ms: _Optional[int] = ...) -> None: ...

class UpdateProgress(_message.Message):
    __slots__ = ("update_id", "model_name", "version", "state", "reason", "bytes_received", "bytes_total", "revision", "variant", "target_sha256", "probe", "shadow")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    TARGET_SHA256_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    model_name: str
    version: int
    state: _common_pb2.UpdateState
    reason: str
    bytes_received: int
    bytes_total: int
    revision: int
    variant: str
    target_sha256: str
    probe: _update_pb2.ProbeReport
    shadow: _update_pb2.ShadowReport
    def __init__(self, update_id: _Optional[str] = ..., model_name: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[_common_pb2.UpdateState, str]] = ..., reason: _Optional[str] = ..., bytes_received: _Optional[int] = ..., bytes_total: _Optional[int] = ..., revision: _Optional[int] = ..., variant: _Optional[str] = ..., target_sha256: _Optional[str] = ..., probe: _Optional[_Union[_update_pb2.ProbeReport, _Mapping]] = ..., shadow: _Optional[_Union[_update_pb2.ShadowReport, _Mapping]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("device_id", "device_class", "facts", "models", "updates", "agent_version", "uptime_s", "sent_at_ms", "seq", "health", "health_reason", "serve_url", "labels", "slots", "faults", "desired_generation", "restarts", "heartbeat_interval_ms")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_MS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    HEALTH_REASON_FIELD_NUMBER: _ClassVar[int]
    SERVE_URL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    FAULTS_FIELD_NUMBER: _ClassVar[int]
    DESIRED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    device_class: str
    facts: DeviceFacts
    models: _containers.RepeatedCompositeFieldContainer[ServedModel]
    updates: _containers.RepeatedCompositeFieldContainer[UpdateProgress]
    agent_version: str
    uptime_s: int
    sent_at_ms: int
    seq: int
    health: str
    health_reason: str
    serve_url: str
    labels: _containers.ScalarMap[str, str]
    slots: _containers.RepeatedCompositeFieldContainer[ServedModel]
    faults: _containers.RepeatedCompositeFieldContainer[ModelFault]
    desired_generation: int
    restarts: int
    heartbeat_interval_ms: int
    def __init__(self, device_id: _Optional[str] = ..., device_class: _Optional[str] = ..., facts: _Optional[_Union[DeviceFacts, _Mapping]] = ..., models: _Optional[_Iterable[_Union[ServedModel, _Mapping]]] = ..., updates: _Optional[_Iterable[_Union[UpdateProgress, _Mapping]]] = ..., agent_version: _Optional[str] = ..., uptime_s: _Optional[int] = ..., sent_at_ms: _Optional[int] = ..., seq: _Optional[int] = ..., health: _Optional[str] = ..., health_reason: _Optional[str] = ..., serve_url: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., slots: _Optional[_Iterable[_Union[ServedModel, _Mapping]]] = ..., faults: _Optional[_Iterable[_Union[ModelFault, _Mapping]]] = ..., desired_generation: _Optional[int] = ..., restarts: _Optional[int] = ..., heartbeat_interval_ms: _Optional[int] = ...) -> None: ...

class Presence(_message.Message):
    __slots__ = ("device_id", "online", "reason", "at_ms")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    online: bool
    reason: str
    at_ms: int
    def __init__(self, device_id: _Optional[str] = ..., online: _Optional[bool] = ..., reason: _Optional[str] = ..., at_ms: _Optional[int] = ...) -> None: ...

class LatencyHistogram(_message.Message):
    __slots__ = ("bounds_ms", "counts", "sum_ms")
    BOUNDS_MS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    SUM_MS_FIELD_NUMBER: _ClassVar[int]
    bounds_ms: _containers.RepeatedScalarFieldContainer[float]
    counts: _containers.RepeatedScalarFieldContainer[int]
    sum_ms: float
    def __init__(self, bounds_ms: _Optional[_Iterable[float]] = ..., counts: _Optional[_Iterable[int]] = ..., sum_ms: _Optional[float] = ...) -> None: ...

class ModelMetrics(_message.Message):
    __slots__ = ("name", "version", "requests", "errors", "latency", "queue_depth", "batch_size_counts", "engine_rss_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    requests: int
    errors: int
    latency: LatencyHistogram
    queue_depth: int
    batch_size_counts: _containers.RepeatedScalarFieldContainer[int]
    engine_rss_bytes: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., latency: _Optional[_Union[LatencyHistogram, _Mapping]] = ..., queue_depth: _Optional[int] = ..., batch_size_counts: _Optional[_Iterable[int]] = ..., engine_rss_bytes: _Optional[int] = ...) -> None: ...

class Temperature(_message.Message):
    __slots__ = ("zone", "celsius")
    ZONE_FIELD_NUMBER: _ClassVar[int]
    CELSIUS_FIELD_NUMBER: _ClassVar[int]
    zone: str
    celsius: float
    def __init__(self, zone: _Optional[str] = ..., celsius: _Optional[float] = ...) -> None: ...

class HostMetrics(_message.Message):
    __slots__ = ("cpu_percent", "agent_rss_bytes", "temperatures", "accelerator_load_percent", "memory_available_bytes", "unavailable")
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    AGENT_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURES_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_LOAD_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    cpu_percent: float
    agent_rss_bytes: int
    temperatures: _containers.RepeatedCompositeFieldContainer[Temperature]
    accelerator_load_percent: float
    memory_available_bytes: int
    unavailable: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cpu_percent: _Optional[float] = ..., agent_rss_bytes: _Optional[int] = ..., temperatures: _Optional[_Iterable[_Union[Temperature, _Mapping]]] = ..., accelerator_load_percent: _Optional[float] = ..., memory_available_bytes: _Optional[int] = ..., unavailable: _Optional[_Iterable[str]] = ...) -> None: ...

class Metrics(_message.Message):
    __slots__ = ("device_id", "at_ms", "models", "host", "seq", "buffered")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    BUFFERED_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    at_ms: int
    models: _containers.RepeatedCompositeFieldContainer[ModelMetrics]
    host: HostMetrics
    seq: int
    buffered: bool
    def __init__(self, device_id: _Optional[str] = ..., at_ms: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelMetrics, _Mapping]]] = ..., host: _Optional[_Union[HostMetrics, _Mapping]] = ..., seq: _Optional[int] = ..., buffered: _Optional[bool] = ...) -> None: ...
