from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GatewayCall(_message.Message):
    __slots__ = ("plugin", "method", "version", "params_json", "timeout_ms", "idempotency_key", "request_id", "traceparent")
    PLUGIN_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    plugin: str
    method: str
    version: str
    params_json: bytes
    timeout_ms: int
    idempotency_key: str
    request_id: str
    traceparent: str
    def __init__(self, plugin: _Optional[str] = ..., method: _Optional[str] = ..., version: _Optional[str] = ..., params_json: _Optional[bytes] = ..., timeout_ms: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., request_id: _Optional[str] = ..., traceparent: _Optional[str] = ...) -> None: ...

class GatewayError(_message.Message):
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

class GatewayReply(_message.Message):
    __slots__ = ("ok", "result_json", "error", "request_id")
    OK_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    result_json: bytes
    error: GatewayError
    request_id: str
    def __init__(self, ok: bool = ..., result_json: _Optional[bytes] = ..., error: _Optional[_Union[GatewayError, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GatewayStreamItem(_message.Message):
    __slots__ = ("chunk_json", "error")
    CHUNK_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    chunk_json: bytes
    error: GatewayError
    def __init__(self, chunk_json: _Optional[bytes] = ..., error: _Optional[_Union[GatewayError, _Mapping]] = ...) -> None: ...
