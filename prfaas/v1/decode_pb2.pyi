from prfaas.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KvKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_KIND_UNSPECIFIED: _ClassVar[KvKind]
    FULL_K: _ClassVar[KvKind]
    FULL_V: _ClassVar[KvKind]
    FULL_LATENT: _ClassVar[KvKind]
    LINEAR_RECURRENT: _ClassVar[KvKind]
    LINEAR_CONV: _ClassVar[KvKind]
    FIRST_TOKEN: _ClassVar[KvKind]
KV_KIND_UNSPECIFIED: KvKind
FULL_K: KvKind
FULL_V: KvKind
FULL_LATENT: KvKind
LINEAR_RECURRENT: KvKind
LINEAR_CONV: KvKind
FIRST_TOKEN: KvKind

class AdmitRequest(_message.Message):
    __slots__ = ("request_id", "sampling", "transfer_timeout_s", "accept_wire_dtypes", "token_ids", "prefill_node")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_WIRE_DTYPES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_NODE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    sampling: _common_pb2.SamplingParams
    transfer_timeout_s: float
    accept_wire_dtypes: _containers.RepeatedScalarFieldContainer[str]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    prefill_node: str
    def __init__(self, request_id: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., transfer_timeout_s: _Optional[float] = ..., accept_wire_dtypes: _Optional[_Iterable[str]] = ..., token_ids: _Optional[_Iterable[int]] = ..., prefill_node: _Optional[str] = ...) -> None: ...

class AdmitEvent(_message.Message):
    __slots__ = ("reserved", "tokens", "alive")
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    reserved: Reserved
    tokens: Tokens
    alive: Alive
    def __init__(self, reserved: _Optional[_Union[Reserved, _Mapping]] = ..., tokens: _Optional[_Union[Tokens, _Mapping]] = ..., alive: _Optional[_Union[Alive, _Mapping]] = ...) -> None: ...

class Alive(_message.Message):
    __slots__ = ("kv_pending",)
    KV_PENDING_FIELD_NUMBER: _ClassVar[int]
    kv_pending: bool
    def __init__(self, kv_pending: _Optional[bool] = ...) -> None: ...

class Reserved(_message.Message):
    __slots__ = ("transfer_id", "node_id", "wire_dtype", "expected_chunks_hint", "kv_address", "skip_tokens")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_CHUNKS_HINT_FIELD_NUMBER: _ClassVar[int]
    KV_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SKIP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    node_id: str
    wire_dtype: str
    expected_chunks_hint: int
    kv_address: str
    skip_tokens: int
    def __init__(self, transfer_id: _Optional[str] = ..., node_id: _Optional[str] = ..., wire_dtype: _Optional[str] = ..., expected_chunks_hint: _Optional[int] = ..., kv_address: _Optional[str] = ..., skip_tokens: _Optional[int] = ...) -> None: ...

class Tokens(_message.Message):
    __slots__ = ("token_ids", "finish_reason", "logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class KvChunk(_message.Message):
    __slots__ = ("transfer_id", "seq", "total_chunks", "layer", "kind", "token_start", "token_end", "dtype", "shape", "payload", "checksum", "scales", "first_token")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    seq: int
    total_chunks: int
    layer: int
    kind: KvKind
    token_start: int
    token_end: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    payload: bytes
    checksum: int
    scales: bytes
    first_token: int
    def __init__(self, transfer_id: _Optional[str] = ..., seq: _Optional[int] = ..., total_chunks: _Optional[int] = ..., layer: _Optional[int] = ..., kind: _Optional[_Union[KvKind, str]] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., payload: _Optional[bytes] = ..., checksum: _Optional[int] = ..., scales: _Optional[bytes] = ..., first_token: _Optional[int] = ...) -> None: ...

class KvAck(_message.Message):
    __slots__ = ("chunks", "bytes")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    chunks: int
    bytes: int
    def __init__(self, chunks: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...
