"""The records passed between services, as the cores see them: plain dataclasses, no torch, no
gRPC (each service's `server.py` and the clients convert them to and from protobuf, through
`prfaas.rpc.convert`). The router core, the prefill core and the decode core all speak these.

    router --PrefillJob--> prefill node --Started, Progress..., Done--> router
    router --admit(prompt, SamplingParams)--> decode node --Reserved, Alive..., TokenBatch...--> router

`Progress` and `Alive` come at least every second while a node has nothing else to say, so the
router tells a busy node from a stalled one within seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prfaas.errors import InvalidRequest

MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 100.0  # besides 0 (greedy): logits / t stays finite
MAX_STOP_TOKEN_IDS = 64
MAX_SEED = (1 << 64) - 1
MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's top_logprobs bound)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: each token's logprob and the k most likely

    def validate(self) -> None:
        """Every value finite and in range; the message names the field. (Bounds that depend on
        the model, the vocabulary and the context length, are checked where the model is known.)"""
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {self.max_tokens}")
        t = self.temperature
        if not (t == 0.0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            raise InvalidRequest(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {t!r}"
            )
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidRequest(f"seed must be in [0, 2^64), got {self.seed}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequest(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(self.stop_token_ids)}")
        bad = next((i for i in self.stop_token_ids if i < 0), None)
        if bad is not None:
            raise InvalidRequest(f"stop_token_ids must be >= 0, got {bad}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# --- router -> prefill node ----------------------------------------------------------------------
@dataclass(frozen=True)
class PrefillJob:
    request_id: str
    transfer_id: str
    prompt: list[int]
    params: SamplingParams
    decode_address: str           # where the KV goes: "tcp://host:port" or a gRPC host:port
    num_connections: int = 0      # 0: the node's default
    wire_dtype: str = ""          # the wire format the decode node chose ("" = exact)
    deadline_unix_s: float = 0.0  # the transfer's deadline
    skip_tokens: int = 0          # prompt KV the decode node already holds (its prefix hit): not sent
    decode_node: str = ""         # the decode node's id: it must be a member, its certificate must name it
    forced_first_token: int | None = None  # a retry whose first token the client already has: send that one


@dataclass(frozen=True)
class Started:
    node_id: str
    queue_wait_ms: int


@dataclass(frozen=True)
class Sampled:
    """The first token, as soon as the prefill node has it (its KV may still be draining)."""
    token_id: int
    finish_reason: str | None = None  # set when this token ends the request
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class Progress:
    tokens_done: int  # prompt tokens computed so far (cached ones included)
    layers_done: int  # layers of the current part done
    queued: bool = False  # still waiting for the compute lock


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model (log-softmax of the raw logits, before
    temperature or top-k/top-p), and the `k` most likely tokens with theirs, most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Done:
    first_token: int
    kv_bytes: int
    prefill_s: float
    transfer_s: float
    chunks: int
    first_logprob: TokenLogprob | None = None  # when the request asked for logprobs
    drain_s: float = 0.0  # end of compute to the last ack (KV that waited for the link)


# --- decode node -> router -----------------------------------------------------------------------
@dataclass(frozen=True)
class Reserved:
    transfer_id: str
    node_id: str
    wire_dtype: str
    kv_address: str = ""  # "tcp://host:port" when the node takes KV on its raw-TCP data port
    skip_tokens: int = 0  # prompt KV it holds already (its own prefix cache): the sender skips it


@dataclass(frozen=True)
class Alive:
    kv_pending: bool  # the KV has not all arrived yet


@dataclass(frozen=True)
class TokenBatch:
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when asked for


# --- cross-cluster prefix moves (router <-> importing and holding prefill nodes) ---------------------
@dataclass(frozen=True)
class PrefixReserved:
    """The importer reserved blocks and a slot for a moved prefix: push it here."""

    transfer_id: str
    kv_address: str  # "tcp://host:port"


@dataclass(frozen=True)
class PrefixMoved:
    """A prefix moved: its tokens, and the payload bytes pushed (holder) or received (importer)."""

    tokens: int
    kv_bytes: int
    seconds: float = 0.0
