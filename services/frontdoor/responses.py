"""OpenAI response objects built from the front door's choice deltas: whole responses
(`Collected`) and streamed chunks (`chunk`), for completions and chat completions alike."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prfaas.messages import TokenLogprob

from .core import ChoiceDelta, Usage

TokenText = Callable[[int], str]


def usage_body(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def _chat_logprob(token_id: int, value: float, text: TokenText) -> dict[str, Any]:
    token = text(token_id)
    return {"token": token, "logprob": value, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(lps: list[TokenLogprob], ids: list[int], text: TokenText) -> dict[str, Any]:
    content = []
    for tok, lp in zip(ids, lps, strict=False):
        entry = _chat_logprob(tok, lp.logprob, text)
        entry["top_logprobs"] = [_chat_logprob(t, v, text) for t, v in lp.top]
        content.append(entry)
    return {"content": content}


def completion_logprobs(lps: list[TokenLogprob], ids: list[int], text: TokenText, offset: int) -> dict[str, Any]:
    tokens = [text(t) for t in ids[: len(lps)]]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{text(t): v for t, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def _logprobs(kind: str, d: ChoiceDelta, text: TokenText, offset: int) -> dict[str, Any] | None:
    if not d.logprobs:
        return None
    if kind == "chat":
        return chat_logprobs(d.logprobs, d.token_ids, text)
    return completion_logprobs(d.logprobs, d.token_ids, text, offset)


def chunk(kind: str, rid: str, model: str, created: int, d: ChoiceDelta, text: TokenText, offset: int,
          first: bool) -> dict[str, Any]:
    """One streamed chunk for one choice's delta."""
    choice: dict[str, Any] = {"index": d.index, "logprobs": _logprobs(kind, d, text, offset),
                              "finish_reason": d.finish_reason}
    if kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if d.text or first:
            delta["content"] = d.text
        choice["delta"] = delta
        obj = "chat.completion.chunk"
    else:
        choice["text"] = d.text
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def usage_chunk(kind: str, rid: str, model: str, created: int, u: Usage) -> dict[str, Any]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_body(u)}


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


class Collected:
    """A whole (non-streamed) response, accumulated from the deltas."""

    def __init__(self, kind: str, rid: str, model: str, num_choices: int, want_logprobs: bool) -> None:
        self.kind, self.rid, self.model, self.want_logprobs = kind, rid, model, want_logprobs
        self.choices = [_Choice() for _ in range(num_choices)]
        self.usage: Usage | None = None

    def add(self, d: ChoiceDelta) -> None:
        c = self.choices[d.index]
        c.text += d.text
        c.token_ids += d.token_ids
        c.logprobs += d.logprobs
        c.finish_reason = d.finish_reason or c.finish_reason

    def body(self, text: TokenText) -> dict[str, Any]:
        out = []
        for i, c in enumerate(self.choices):
            lps: dict[str, Any] | None = None
            if self.want_logprobs:
                lps = (chat_logprobs(c.logprobs, c.token_ids, text) if self.kind == "chat"
                       else completion_logprobs(c.logprobs, c.token_ids, text, 0))
            choice: dict[str, Any] = {"index": i, "logprobs": lps, "finish_reason": c.finish_reason}
            if self.kind == "chat":
                choice["message"] = {"role": "assistant", "content": c.text}
            else:
                choice["text"] = c.text
            out.append(choice)
        return {
            "id": self.rid,
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": out,
            "usage": usage_body(self.usage) if self.usage else None,
        }
