from protos.edgefleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SignedEnvelope(_message.Message):
    __slots__ = ("payload_type", "payload", "key_id", "signature")
    PAYLOAD_TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    payload_type: str
    payload: bytes
    key_id: str
    signature: bytes
    def __init__(self, payload_type: _Optional[str] = ..., payload: _Optional[bytes] = ..., key_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class UpdateManifest(_message.Message):
    __slots__ = ("update_id", "device_class", "model_name", "version", "target_sha256", "target_size", "codec", "base_sha256", "payload_sha256", "payload_size", "chunk_size", "chunk_sha256", "issued_at_ms", "expires_at_ms", "fingerprint", "signature", "rollout", "variant", "device_id", "revision", "engine_version", "probe", "shadow")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_SHA256_FIELD_NUMBER: _ClassVar[int]
    TARGET_SIZE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    BASE_SHA256_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SHA256_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    device_class: str
    model_name: str
    version: int
    target_sha256: str
    target_size: int
    codec: str
    base_sha256: str
    payload_sha256: str
    payload_size: int
    chunk_size: int
    chunk_sha256: _containers.RepeatedScalarFieldContainer[bytes]
    issued_at_ms: int
    expires_at_ms: int
    fingerprint: _common_pb2.EngineFingerprint
    signature: _common_pb2.ModelSignature
    rollout: str
    variant: str
    device_id: str
    revision: int
    engine_version: int
    probe: ProbeSpec
    shadow: ShadowSpec
    def __init__(self, update_id: _Optional[str] = ..., device_class: _Optional[str] = ..., model_name: _Optional[str] = ..., version: _Optional[int] = ..., target_sha256: _Optional[str] = ..., target_size: _Optional[int] = ..., codec: _Optional[str] = ..., base_sha256: _Optional[str] = ..., payload_sha256: _Optional[str] = ..., payload_size: _Optional[int] = ..., chunk_size: _Optional[int] = ..., chunk_sha256: _Optional[_Iterable[bytes]] = ..., issued_at_ms: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., fingerprint: _Optional[_Union[_common_pb2.EngineFingerprint, _Mapping]] = ..., signature: _Optional[_Union[_common_pb2.ModelSignature, _Mapping]] = ..., rollout: _Optional[str] = ..., variant: _Optional[str] = ..., device_id: _Optional[str] = ..., revision: _Optional[int] = ..., engine_version: _Optional[int] = ..., probe: _Optional[_Union[ProbeSpec, _Mapping]] = ..., shadow: _Optional[_Union[ShadowSpec, _Mapping]] = ...) -> None: ...

class ShadowSpec(_message.Message):
    __slots__ = ("seconds", "min_samples", "sample_percent", "max_cpu_percent", "min_agreement", "max_latency_ratio")
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    MIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MAX_CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MIN_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    MAX_LATENCY_RATIO_FIELD_NUMBER: _ClassVar[int]
    seconds: int
    min_samples: int
    sample_percent: int
    max_cpu_percent: int
    min_agreement: float
    max_latency_ratio: float
    def __init__(self, seconds: _Optional[int] = ..., min_samples: _Optional[int] = ..., sample_percent: _Optional[int] = ..., max_cpu_percent: _Optional[int] = ..., min_agreement: _Optional[float] = ..., max_latency_ratio: _Optional[float] = ...) -> None: ...

class ShadowReport(_message.Message):
    __slots__ = ("samples", "agreement", "staged_p99_ms", "active_p99_ms", "passed", "detail", "at_ms")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    STAGED_P99_MS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_P99_MS_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    samples: int
    agreement: float
    staged_p99_ms: float
    active_p99_ms: float
    passed: bool
    detail: str
    at_ms: int
    def __init__(self, samples: _Optional[int] = ..., agreement: _Optional[float] = ..., staged_p99_ms: _Optional[float] = ..., active_p99_ms: _Optional[float] = ..., passed: _Optional[bool] = ..., detail: _Optional[str] = ..., at_ms: _Optional[int] = ...) -> None: ...

class ProbeSpec(_message.Message):
    __slots__ = ("samples_npz", "metric", "threshold")
    SAMPLES_NPZ_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    samples_npz: bytes
    metric: str
    threshold: float
    def __init__(self, samples_npz: _Optional[bytes] = ..., metric: _Optional[str] = ..., threshold: _Optional[float] = ...) -> None: ...

class ProbeReport(_message.Message):
    __slots__ = ("metric", "value", "threshold", "passed", "samples", "detail", "at_ms")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    metric: str
    value: float
    threshold: float
    passed: bool
    samples: int
    detail: str
    at_ms: int
    def __init__(self, metric: _Optional[str] = ..., value: _Optional[float] = ..., threshold: _Optional[float] = ..., passed: _Optional[bool] = ..., samples: _Optional[int] = ..., detail: _Optional[str] = ..., at_ms: _Optional[int] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("update_id", "index", "total", "data")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    index: int
    total: int
    data: bytes
    def __init__(self, update_id: _Optional[str] = ..., index: _Optional[int] = ..., total: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ChunkRequest(_message.Message):
    __slots__ = ("device_id", "update_id", "indices")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    update_id: str
    indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, device_id: _Optional[str] = ..., update_id: _Optional[str] = ..., indices: _Optional[_Iterable[int]] = ...) -> None: ...

class UpdateStatus(_message.Message):
    __slots__ = ("device_id", "update_id", "model_name", "version", "state", "reason", "action", "bytes_received", "bytes_total", "at_ms", "target_sha256", "revision", "variant", "probe", "shadow")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    TARGET_SHA256_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    update_id: str
    model_name: str
    version: int
    state: _common_pb2.UpdateState
    reason: str
    action: _common_pb2.ErrorAction
    bytes_received: int
    bytes_total: int
    at_ms: int
    target_sha256: str
    revision: int
    variant: str
    probe: ProbeReport
    shadow: ShadowReport
    def __init__(self, device_id: _Optional[str] = ..., update_id: _Optional[str] = ..., model_name: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[_common_pb2.UpdateState, str]] = ..., reason: _Optional[str] = ..., action: _Optional[_Union[_common_pb2.ErrorAction, str]] = ..., bytes_received: _Optional[int] = ..., bytes_total: _Optional[int] = ..., at_ms: _Optional[int] = ..., target_sha256: _Optional[str] = ..., revision: _Optional[int] = ..., variant: _Optional[str] = ..., probe: _Optional[_Union[ProbeReport, _Mapping]] = ..., shadow: _Optional[_Union[ShadowReport, _Mapping]] = ...) -> None: ...

class SigningKey(_message.Message):
    __slots__ = ("key_id", "public_key", "expires_at_ms")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    public_key: bytes
    expires_at_ms: int
    def __init__(self, key_id: _Optional[str] = ..., public_key: _Optional[bytes] = ..., expires_at_ms: _Optional[int] = ...) -> None: ...

class KeyList(_message.Message):
    __slots__ = ("version", "keys", "revoked_key_ids", "issued_at_ms", "expires_at_ms")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    version: int
    keys: _containers.RepeatedCompositeFieldContainer[SigningKey]
    revoked_key_ids: _containers.RepeatedScalarFieldContainer[str]
    issued_at_ms: int
    expires_at_ms: int
    def __init__(self, version: _Optional[int] = ..., keys: _Optional[_Iterable[_Union[SigningKey, _Mapping]]] = ..., revoked_key_ids: _Optional[_Iterable[str]] = ..., issued_at_ms: _Optional[int] = ..., expires_at_ms: _Optional[int] = ...) -> None: ...

class DesiredModel(_message.Message):
    __slots__ = ("name", "version", "target_sha256", "update_id", "variant", "revision", "engine_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_SHA256_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    target_sha256: str
    update_id: str
    variant: str
    revision: int
    engine_version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., target_sha256: _Optional[str] = ..., update_id: _Optional[str] = ..., variant: _Optional[str] = ..., revision: _Optional[int] = ..., engine_version: _Optional[int] = ...) -> None: ...

class DesiredState(_message.Message):
    __slots__ = ("device_id", "generation", "models", "issued_at_ms")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    generation: int
    models: _containers.RepeatedCompositeFieldContainer[DesiredModel]
    issued_at_ms: int
    def __init__(self, device_id: _Optional[str] = ..., generation: _Optional[int] = ..., models: _Optional[_Iterable[_Union[DesiredModel, _Mapping]]] = ..., issued_at_ms: _Optional[int] = ...) -> None: ...
