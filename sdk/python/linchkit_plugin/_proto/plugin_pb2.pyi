from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CallContext(_message.Message):
    __slots__ = ("request_id", "deadline_ms", "caller", "traceparent", "idempotency_key")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    deadline_ms: int
    caller: str
    traceparent: str
    idempotency_key: str
    def __init__(self, request_id: _Optional[str] = ..., deadline_ms: _Optional[int] = ..., caller: _Optional[str] = ..., traceparent: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class CallRequest(_message.Message):
    __slots__ = ("v", "plugin", "method", "params_json", "context")
    V_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    v: int
    plugin: str
    method: str
    params_json: bytes
    context: CallContext
    def __init__(self, v: _Optional[int] = ..., plugin: _Optional[str] = ..., method: _Optional[str] = ..., params_json: _Optional[bytes] = ..., context: _Optional[_Union[CallContext, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("type", "message", "retryable", "details_json", "retry_after")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_JSON_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    type: str
    message: str
    retryable: bool
    details_json: bytes
    retry_after: float
    def __init__(self, type: _Optional[str] = ..., message: _Optional[str] = ..., retryable: bool = ..., details_json: _Optional[bytes] = ..., retry_after: _Optional[float] = ...) -> None: ...

class CallReply(_message.Message):
    __slots__ = ("ok", "result_json", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    result_json: bytes
    error: Error
    def __init__(self, ok: bool = ..., result_json: _Optional[bytes] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class BatchRequest(_message.Message):
    __slots__ = ("calls",)
    CALLS_FIELD_NUMBER: _ClassVar[int]
    calls: _containers.RepeatedCompositeFieldContainer[CallRequest]
    def __init__(self, calls: _Optional[_Iterable[_Union[CallRequest, _Mapping]]] = ...) -> None: ...

class BatchReply(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[CallReply]
    def __init__(self, results: _Optional[_Iterable[_Union[CallReply, _Mapping]]] = ...) -> None: ...

class StreamItem(_message.Message):
    __slots__ = ("chunk_json", "error")
    CHUNK_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    chunk_json: bytes
    error: Error
    def __init__(self, chunk_json: _Optional[bytes] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class HostEvent(_message.Message):
    __slots__ = ("name", "data_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    data_json: bytes
    def __init__(self, name: _Optional[str] = ..., data_json: _Optional[bytes] = ...) -> None: ...

class PluginEvent(_message.Message):
    __slots__ = ("name", "data_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    data_json: bytes
    def __init__(self, name: _Optional[str] = ..., data_json: _Optional[bytes] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MethodInfo(_message.Message):
    __slots__ = ("name", "streaming", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STREAMING_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    streaming: bool
    description: str
    def __init__(self, name: _Optional[str] = ..., streaming: bool = ..., description: _Optional[str] = ...) -> None: ...

class PluginInfo(_message.Message):
    __slots__ = ("id", "version", "protocol_version", "runtime", "methods")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: str
    protocol_version: int
    runtime: str
    methods: _containers.RepeatedCompositeFieldContainer[MethodInfo]
    def __init__(self, id: _Optional[str] = ..., version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., runtime: _Optional[str] = ..., methods: _Optional[_Iterable[_Union[MethodInfo, _Mapping]]] = ...) -> None: ...

class InitRequest(_message.Message):
    __slots__ = ("config_json",)
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    config_json: bytes
    def __init__(self, config_json: _Optional[bytes] = ...) -> None: ...

class LifecycleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LifecycleReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
