from protos.edgefleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BuildState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUILD_STATE_UNSPECIFIED: _ClassVar[BuildState]
    BUILD_STATE_DISPATCHED: _ClassVar[BuildState]
    BUILD_STATE_RUNNING: _ClassVar[BuildState]
    BUILD_STATE_SUCCEEDED: _ClassVar[BuildState]
    BUILD_STATE_FAILED: _ClassVar[BuildState]
    BUILD_STATE_REJECTED: _ClassVar[BuildState]
    BUILD_STATE_TIMED_OUT: _ClassVar[BuildState]
BUILD_STATE_UNSPECIFIED: BuildState
BUILD_STATE_DISPATCHED: BuildState
BUILD_STATE_RUNNING: BuildState
BUILD_STATE_SUCCEEDED: BuildState
BUILD_STATE_FAILED: BuildState
BUILD_STATE_REJECTED: BuildState
BUILD_STATE_TIMED_OUT: BuildState

class BuilderAnnounce(_message.Message):
    __slots__ = ("builder_id", "online", "engine_kind", "arch", "accelerator", "toolchain", "toolchain_version", "public_key", "at_ms", "precisions", "builder_version")
    BUILDER_ID_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_KIND_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    TOOLCHAIN_FIELD_NUMBER: _ClassVar[int]
    TOOLCHAIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    PRECISIONS_FIELD_NUMBER: _ClassVar[int]
    BUILDER_VERSION_FIELD_NUMBER: _ClassVar[int]
    builder_id: str
    online: bool
    engine_kind: str
    arch: str
    accelerator: str
    toolchain: str
    toolchain_version: str
    public_key: bytes
    at_ms: int
    precisions: _containers.RepeatedScalarFieldContainer[str]
    builder_version: str
    def __init__(self, builder_id: _Optional[str] = ..., online: _Optional[bool] = ..., engine_kind: _Optional[str] = ..., arch: _Optional[str] = ..., accelerator: _Optional[str] = ..., toolchain: _Optional[str] = ..., toolchain_version: _Optional[str] = ..., public_key: _Optional[bytes] = ..., at_ms: _Optional[int] = ..., precisions: _Optional[_Iterable[str]] = ..., builder_version: _Optional[str] = ...) -> None: ...

class ArtifactRef(_message.Message):
    __slots__ = ("sha256", "size")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    def __init__(self, sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class BuildJob(_message.Message):
    __slots__ = ("job_id", "builder_id", "device_class", "device_class_spec_json", "model", "validation", "precisions", "accuracy_json", "max_engine_bytes", "issued_at_ms", "expires_at_ms", "model_name")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    BUILDER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    PRECISIONS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_ENGINE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    builder_id: str
    device_class: str
    device_class_spec_json: str
    model: ArtifactRef
    validation: ArtifactRef
    precisions: _containers.RepeatedScalarFieldContainer[str]
    accuracy_json: str
    max_engine_bytes: int
    issued_at_ms: int
    expires_at_ms: int
    model_name: str
    def __init__(self, job_id: _Optional[str] = ..., builder_id: _Optional[str] = ..., device_class: _Optional[str] = ..., device_class_spec_json: _Optional[str] = ..., model: _Optional[_Union[ArtifactRef, _Mapping]] = ..., validation: _Optional[_Union[ArtifactRef, _Mapping]] = ..., precisions: _Optional[_Iterable[str]] = ..., accuracy_json: _Optional[str] = ..., max_engine_bytes: _Optional[int] = ..., issued_at_ms: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., model_name: _Optional[str] = ...) -> None: ...

class BuildResult(_message.Message):
    __slots__ = ("job_id", "builder_id", "state", "reason", "message", "engine_sha256", "engine_size", "fingerprint", "report_json", "at_ms", "device_class")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    BUILDER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_SHA256_FIELD_NUMBER: _ClassVar[int]
    ENGINE_SIZE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    builder_id: str
    state: BuildState
    reason: str
    message: str
    engine_sha256: str
    engine_size: int
    fingerprint: _common_pb2.EngineFingerprint
    report_json: str
    at_ms: int
    device_class: str
    def __init__(self, job_id: _Optional[str] = ..., builder_id: _Optional[str] = ..., state: _Optional[_Union[BuildState, str]] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., engine_sha256: _Optional[str] = ..., engine_size: _Optional[int] = ..., fingerprint: _Optional[_Union[_common_pb2.EngineFingerprint, _Mapping]] = ..., report_json: _Optional[str] = ..., at_ms: _Optional[int] = ..., device_class: _Optional[str] = ...) -> None: ...
