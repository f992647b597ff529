from prfaas.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImportPrefixRequest(_message.Message):
    __slots__ = ("request_id", "token_ids", "hit_tokens", "transfer_timeout_s", "holder_node")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    HOLDER_NODE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    hit_tokens: int
    transfer_timeout_s: float
    holder_node: str
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., hit_tokens: _Optional[int] = ..., transfer_timeout_s: _Optional[float] = ..., holder_node: _Optional[str] = ...) -> None: ...

class ImportPrefixEvent(_message.Message):
    __slots__ = ("reserved", "imported")
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    IMPORTED_FIELD_NUMBER: _ClassVar[int]
    reserved: PrefixReserved
    imported: PrefixImported
    def __init__(self, reserved: _Optional[_Union[PrefixReserved, _Mapping]] = ..., imported: _Optional[_Union[PrefixImported, _Mapping]] = ...) -> None: ...

class PrefixReserved(_message.Message):
    __slots__ = ("transfer_id", "kv_address")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    KV_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    kv_address: str
    def __init__(self, transfer_id: _Optional[str] = ..., kv_address: _Optional[str] = ...) -> None: ...

class PrefixImported(_message.Message):
    __slots__ = ("tokens", "kv_bytes")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    kv_bytes: int
    def __init__(self, tokens: _Optional[int] = ..., kv_bytes: _Optional[int] = ...) -> None: ...

class ExportPrefixRequest(_message.Message):
    __slots__ = ("request_id", "token_ids", "hit_tokens", "transfer_id", "dest_address", "num_connections", "deadline_unix_s", "dest_node")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    DEST_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    DEST_NODE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    hit_tokens: int
    transfer_id: str
    dest_address: str
    num_connections: int
    deadline_unix_s: float
    dest_node: str
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., hit_tokens: _Optional[int] = ..., transfer_id: _Optional[str] = ..., dest_address: _Optional[str] = ..., num_connections: _Optional[int] = ..., deadline_unix_s: _Optional[float] = ..., dest_node: _Optional[str] = ...) -> None: ...

class ExportPrefixDone(_message.Message):
    __slots__ = ("tokens", "kv_bytes", "transfer_s")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    kv_bytes: int
    transfer_s: float
    def __init__(self, tokens: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., transfer_s: _Optional[float] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "transfer_id", "token_ids", "sampling", "decode_address", "num_connections", "wire_dtype", "deadline_unix_s", "skip_tokens", "decode_node", "forced_first_token")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    DECODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    SKIP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_NODE_FIELD_NUMBER: _ClassVar[int]
    FORCED_FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    transfer_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    decode_address: str
    num_connections: int
    wire_dtype: str
    deadline_unix_s: float
    skip_tokens: int
    decode_node: str
    forced_first_token: int
    def __init__(self, request_id: _Optional[str] = ..., transfer_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., decode_address: _Optional[str] = ..., num_connections: _Optional[int] = ..., wire_dtype: _Optional[str] = ..., deadline_unix_s: _Optional[float] = ..., skip_tokens: _Optional[int] = ..., decode_node: _Optional[str] = ..., forced_first_token: _Optional[int] = ...) -> None: ...

class PrefillEvent(_message.Message):
    __slots__ = ("started", "done", "progress", "sampled")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    started: PrefillStarted
    done: PrefillDone
    progress: PrefillProgress
    sampled: PrefillSampled
    def __init__(self, started: _Optional[_Union[PrefillStarted, _Mapping]] = ..., done: _Optional[_Union[PrefillDone, _Mapping]] = ..., progress: _Optional[_Union[PrefillProgress, _Mapping]] = ..., sampled: _Optional[_Union[PrefillSampled, _Mapping]] = ...) -> None: ...

class PrefillSampled(_message.Message):
    __slots__ = ("token_id", "logprob", "finish_reason")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: _common_pb2.TokenLogprob
    finish_reason: str
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[_Union[_common_pb2.TokenLogprob, _Mapping]] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class PrefillProgress(_message.Message):
    __slots__ = ("tokens_done", "layers_done", "queued")
    TOKENS_DONE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_DONE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    tokens_done: int
    layers_done: int
    queued: bool
    def __init__(self, tokens_done: _Optional[int] = ..., layers_done: _Optional[int] = ..., queued: _Optional[bool] = ...) -> None: ...

class PrefillStarted(_message.Message):
    __slots__ = ("node_id", "queue_wait_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    queue_wait_ms: int
    def __init__(self, node_id: _Optional[str] = ..., queue_wait_ms: _Optional[int] = ...) -> None: ...

class PrefillDone(_message.Message):
    __slots__ = ("first_token", "kv_bytes", "prefill_s", "transfer_s", "chunks", "first_logprob", "drain_s")
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    DRAIN_S_FIELD_NUMBER: _ClassVar[int]
    first_token: int
    kv_bytes: int
    prefill_s: float
    transfer_s: float
    chunks: int
    first_logprob: _common_pb2.TokenLogprob
    drain_s: float
    def __init__(self, first_token: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., prefill_s: _Optional[float] = ..., transfer_s: _Optional[float] = ..., chunks: _Optional[int] = ..., first_logprob: _Optional[_Union[_common_pb2.TokenLogprob, _Mapping]] = ..., drain_s: _Optional[float] = ...) -> None: ...
