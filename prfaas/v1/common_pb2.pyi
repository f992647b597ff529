from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Route(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUTO: _ClassVar[Route]
    LOCAL: _ClassVar[Route]
    PRFAAS: _ClassVar[Route]

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    PREFILL: _ClassVar[Role]
    DECODE: _ClassVar[Role]
    ROUTER: _ClassVar[Role]
    CACHEPOOL: _ClassVar[Role]
AUTO: Route
LOCAL: Route
PRFAAS: Route
ROLE_UNSPECIFIED: Role
PREFILL: Role
DECODE: Role
ROUTER: Role
CACHEPOOL: Role

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "logprobs", "ignore_eos")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: int
    ignore_eos: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[int] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("logprob", "top_token_ids", "top_logprobs")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    top_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, logprob: _Optional[float] = ..., top_token_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "cluster", "role", "address", "capacity_blocks", "capacity_slots", "hardware", "block_size", "max_request_blocks", "convertible", "max_context", "prefix_grid")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_SLOTS_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CONVERTIBLE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_GRID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    cluster: str
    role: Role
    address: str
    capacity_blocks: int
    capacity_slots: int
    hardware: str
    block_size: int
    max_request_blocks: int
    convertible: bool
    max_context: int
    prefix_grid: int
    def __init__(self, node_id: _Optional[str] = ..., cluster: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., address: _Optional[str] = ..., capacity_blocks: _Optional[int] = ..., capacity_slots: _Optional[int] = ..., hardware: _Optional[str] = ..., block_size: _Optional[int] = ..., max_request_blocks: _Optional[int] = ..., convertible: _Optional[bool] = ..., max_context: _Optional[int] = ..., prefix_grid: _Optional[int] = ...) -> None: ...

class NodeLoad(_message.Message):
    __slots__ = ("free_blocks", "free_slots", "queue_depth", "running", "egress_bytes_per_s", "tokens_per_s", "kv_retransmits")
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    EGRESS_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    KV_RETRANSMITS_FIELD_NUMBER: _ClassVar[int]
    free_blocks: int
    free_slots: int
    queue_depth: int
    running: int
    egress_bytes_per_s: float
    tokens_per_s: float
    kv_retransmits: int
    def __init__(self, free_blocks: _Optional[int] = ..., free_slots: _Optional[int] = ..., queue_depth: _Optional[int] = ..., running: _Optional[int] = ..., egress_bytes_per_s: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., kv_retransmits: _Optional[int] = ...) -> None: ...

class SetRoleRequest(_message.Message):
    __slots__ = ("role",)
    ROLE_FIELD_NUMBER: _ClassVar[int]
    role: Role
    def __init__(self, role: _Optional[_Union[Role, str]] = ...) -> None: ...

class SetRoleResponse(_message.Message):
    __slots__ = ("previous", "role")
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    previous: Role
    role: Role
    def __init__(self, previous: _Optional[_Union[Role, str]] = ..., role: _Optional[_Union[Role, str]] = ...) -> None: ...

class NodeStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStats(_message.Message):
    __slots__ = ("node_id", "role", "total_blocks", "free_blocks", "total_slots", "free_slots", "cached_blocks", "cached_states", "pending_transfers", "running", "queue_depth", "tokens_done")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SLOTS_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CACHED_STATES_FIELD_NUMBER: _ClassVar[int]
    PENDING_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    TOKENS_DONE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: Role
    total_blocks: int
    free_blocks: int
    total_slots: int
    free_slots: int
    cached_blocks: int
    cached_states: int
    pending_transfers: int
    running: int
    queue_depth: int
    tokens_done: int
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., total_blocks: _Optional[int] = ..., free_blocks: _Optional[int] = ..., total_slots: _Optional[int] = ..., free_slots: _Optional[int] = ..., cached_blocks: _Optional[int] = ..., cached_states: _Optional[int] = ..., pending_transfers: _Optional[int] = ..., running: _Optional[int] = ..., queue_depth: _Optional[int] = ..., tokens_done: _Optional[int] = ...) -> None: ...
