"""The OpenAI API's request bodies, parsed and checked: `/v1/completions` and
`/v1/chat/completions` into one `Prepared` request (prompt token ids, sampling values, stops, how
many choices, how to answer). Every bad or unsupported value is an `ApiError` naming the field.

No HTTP here: `ApiError` carries the status that `server.py` answers with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from prfaas.messages import MAX_LOGPROBS


class ApiError(Exception):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with a status."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.retry_after_s = message, param, code, retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(ApiError):
    status, type = 400, "invalid_request_error"


class Unauthorized(ApiError):
    status, type = 401, "authentication_error"


class Forbidden(ApiError):
    status, type = 403, "permission_error"


class ModelNotFound(ApiError):
    status, type = 404, "invalid_request_error"


class RateLimited(ApiError):
    status, type = 429, "rate_limit_error"


class Unavailable(ApiError):
    status, type = 503, "service_unavailable_error"


class Timeout(ApiError):
    status, type = 504, "timeout_error"


# values OpenAI defines that this server does not implement: accepted only at their defaults
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "logit_bias": None, "echo": False,
    "suffix": None, "tools": None, "functions": None, "response_format": None, "min_tokens": 0,
    "prompt_logprobs": None, "min_p": 0,
}


@dataclass
class Prepared:
    """One checked request. `prompts` holds one token list per prompt (a completions request may
    batch several); each gets `n` choices, numbered prompt-major as OpenAI numbers them."""

    kind: str  # "completion" or "chat"
    model: str
    prompts: list[list[int]]
    n: int
    stream: bool
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: none; k: each token's logprob and k alternatives
    include_usage: bool = False
    ignore_eos: bool = False  # vLLM's extension: not stopping at eos (benchmarks ask for fixed lengths)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n


@dataclass(frozen=True)
class Defaults:
    """What a request does not set: the model's generation_config.json, then the server's own."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_token_ids: tuple[int, ...] = ()
    max_n: int = 8


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"{key} must be a finite number, got {value!r}", key)
    if value < lo or value > hi or (lo_open and value == lo):
        raise BadRequest(f"{key} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", key)
    return float(value)


def _integer(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key} must be an integer, got {value!r}", key)
    if not lo <= value <= hi:
        raise BadRequest(f"{key} must be in [{lo}, {hi}], got {value}", key)
    return value


def _stops(body: dict[str, Any]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    stop = body.get("stop")
    strings = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(strings, list) or not all(isinstance(s, str) and s for s in strings):
        raise BadRequest("stop must be a non-empty string or a list of them", "stop")
    ids = body.get("stop_token_ids") or []
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise BadRequest("stop_token_ids must be a list of token ids (integers >= 0)", "stop_token_ids")
    return tuple(strings), tuple(ids)


def check_unsupported(body: dict[str, Any]) -> None:
    for key, default in _UNSUPPORTED_DEFAULTS.items():
        value = body.get(key)
        if value is not None and value != default and value != [] and value != {}:
            if key == "response_format" and isinstance(value, dict) and value.get("type") == "text":
                continue
            raise BadRequest(f"{key} is not supported by this server", key)
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise BadRequest("best_of is not supported by this server", "best_of")


def prepare(kind: str, body: dict[str, Any], prompts: list[list[int]], logprobs: int | None,
            d: Defaults) -> Prepared:
    """The sampling part, common to both endpoints (the caller has turned the prompt into ids)."""
    check_unsupported(body)
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("stream must be true or false", "stream")
    stream = bool(body.get("stream", False))
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    if options and not stream:
        raise BadRequest("stream_options is only allowed with stream: true", "stream_options")
    max_key = "max_tokens"
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        max_key = "max_completion_tokens"
    max_tokens = _integer(body, max_key, d.max_tokens, 1, 1 << 30)
    top_k = _integer(body, "top_k", d.top_k, -1, 1 << 30)
    seed = _integer(body, "seed", None, 0, (1 << 63) - 1)
    stop, stop_ids = _stops(body)
    n = _integer(body, "n", 1, 1, d.max_n)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BadRequest("ignore_eos must be true or false", "ignore_eos")
    assert max_tokens is not None and top_k is not None and n is not None
    return Prepared(
        kind=kind,
        model=str(body.get("model")),
        prompts=prompts,
        n=n,
        stream=stream,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", d.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", d.top_p, 0.0, 1.0, lo_open=True),
        top_k=max(top_k, 0),  # vLLM's -1 means off, as our 0 does
        seed=seed,
        stop=stop,
        stop_token_ids=tuple(dict.fromkeys((*stop_ids, *(() if ignore_eos else d.eos_token_ids)))),
        logprobs=logprobs,
        include_usage=bool(options.get("include_usage", False)),
        ignore_eos=ignore_eos,
    )


def completion_logprobs(body: dict[str, Any]) -> int | None:
    return _integer(body, "logprobs", None, 0, MAX_LOGPROBS)


def chat_logprobs(body: dict[str, Any]) -> int | None:
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise BadRequest("logprobs must be true or false", "logprobs")
    top = _integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not wanted:
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if wanted else None


def completion_prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """`prompt` as OpenAI allows it: a string, a list of strings, token ids, or lists of them."""
    p = body.get("prompt")
    if isinstance(p, str):
        items: list[Any] = [p]
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        items = [p]
    elif isinstance(p, list) and p:
        items = p
    else:
        raise BadRequest("prompt must be a string, a list of strings, a list of token ids, or a list of those",
                         "prompt")
    for item in items:
        ok_ids = isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
        if not (isinstance(item, str) and item) and not ok_ids:
            raise BadRequest("each prompt must be a non-empty string or a non-empty list of token ids", "prompt")
    return items


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """`messages` with text content (a string, or a list of {"type": "text"} parts, joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a role", "messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
                raise BadRequest(f"messages[{i}]: only text content parts are supported", "messages")
            content = "".join(str(part.get("text", "")) for part in content)
        elif content is not None and not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({**m, "content": content or ""})
    return out
