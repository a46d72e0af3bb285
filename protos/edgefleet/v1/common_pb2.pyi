from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UpdateState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_STATE_UNSPECIFIED: _ClassVar[UpdateState]
    UPDATE_STATE_IDLE: _ClassVar[UpdateState]
    UPDATE_STATE_RECEIVED: _ClassVar[UpdateState]
    UPDATE_STATE_DOWNLOADING: _ClassVar[UpdateState]
    UPDATE_STATE_VERIFYING: _ClassVar[UpdateState]
    UPDATE_STATE_PATCHING: _ClassVar[UpdateState]
    UPDATE_STATE_STAGED: _ClassVar[UpdateState]
    UPDATE_STATE_ACTIVATING: _ClassVar[UpdateState]
    UPDATE_STATE_COMMITTED: _ClassVar[UpdateState]
    UPDATE_STATE_ROLLED_BACK: _ClassVar[UpdateState]
    UPDATE_STATE_FAILED: _ClassVar[UpdateState]

class ErrorAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_ACTION_UNSPECIFIED: _ClassVar[ErrorAction]
    ERROR_ACTION_RETRY: _ClassVar[ErrorAction]
    ERROR_ACTION_GIVE_UP: _ClassVar[ErrorAction]
    ERROR_ACTION_REJECT: _ClassVar[ErrorAction]
UPDATE_STATE_UNSPECIFIED: UpdateState
UPDATE_STATE_IDLE: UpdateState
UPDATE_STATE_RECEIVED: UpdateState
UPDATE_STATE_DOWNLOADING: UpdateState
UPDATE_STATE_VERIFYING: UpdateState
UPDATE_STATE_PATCHING: UpdateState
UPDATE_STATE_STAGED: UpdateState
UPDATE_STATE_ACTIVATING: UpdateState
UPDATE_STATE_COMMITTED: UpdateState
UPDATE_STATE_ROLLED_BACK: UpdateState
UPDATE_STATE_FAILED: UpdateState
ERROR_ACTION_UNSPECIFIED: ErrorAction
ERROR_ACTION_RETRY: ErrorAction
ERROR_ACTION_GIVE_UP: ErrorAction
ERROR_ACTION_REJECT: ErrorAction

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelSignature(_message.Message):
    __slots__ = ("inputs", "outputs")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class EngineFingerprint(_message.Message):
    __slots__ = ("engine_kind", "arch", "toolchain", "toolchain_version", "accelerator", "precision", "min_runtime_version")
    ENGINE_KIND_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    TOOLCHAIN_FIELD_NUMBER: _ClassVar[int]
    TOOLCHAIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    MIN_RUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    engine_kind: str
    arch: str
    toolchain: str
    toolchain_version: str
    accelerator: str
    precision: str
    min_runtime_version: str
    def __init__(self, engine_kind: _Optional[str] = ..., arch: _Optional[str] = ..., toolchain: _Optional[str] = ..., toolchain_version: _Optional[str] = ..., accelerator: _Optional[str] = ..., precision: _Optional[str] = ..., min_runtime_version: _Optional[str] = ...) -> None: ...

class RuntimeInfo(_message.Message):
    __slots__ = ("engine_kind", "version", "accelerator")
    ENGINE_KIND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    engine_kind: str
    version: str
    accelerator: str
    def __init__(self, engine_kind: _Optional[str] = ..., version: _Optional[str] = ..., accelerator: _Optional[str] = ...) -> None: ...
