"""The front door: OpenAI requests in, `Router.Generate` calls out, each choice's text back as
it streams. No HTTP and no gRPC here (`server.py` is the HTTP app, `client.py` the router's gRPC
client); the router is handed in as a small protocol.

    body -> protocol.prepare (ids, sampling, stops) -> one Generate per choice (n, batched prompts)
    -> per choice: incremental detokenisation, stop strings on the text -> ChoiceDelta... -> Usage

Stop strings are matched on the detokenised text, so one that spans two router messages (or two
tokens) is found; the text ends before it, and the choice's Generate call is closed at once (the
router and the decode node free the request). Text that could still be the start of a stop string
is held back until it is known not to be.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from prfaas.engine.chat_template import ChatTemplate, ChatTemplateError
from prfaas.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from prfaas.messages import TokenLogprob
from prfaas.obs import metrics
from prfaas.obs.log import get_logger
from prfaas.security.tokens import TokenFile

from . import protocol
from .protocol import BadRequest, Defaults, ModelNotFound, Prepared, Unauthorized

log = get_logger(__name__)


@dataclass(frozen=True)
class RouterRequest:
    request_id: str
    token_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop_token_ids: tuple[int, ...]
    logprobs: int | None
    ignore_eos: bool = False


@dataclass(frozen=True)
class RouterChunk:
    """One `GenerateResponse`: route and cached tokens are set on the first."""

    token_ids: list[int]
    finish_reason: str = ""
    route: str = ""
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


class RouterApi(Protocol):
    """`Router.Generate`; raises `protocol.ApiError`s (the client maps the gRPC status)."""

    def generate(self, req: RouterRequest) -> AsyncIterator[RouterChunk]: ...


class Authenticator(Protocol):
    """Client authentication: the client's name (what the per-client limit counts), or
    `Unauthorized` for a request that may not be served."""

    def check(self, authorization: str | None) -> str: ...


class AllowAll:
    def check(self, authorization: str | None) -> str:
        return "anonymous"


class BearerToken:
    """`Authorization: Bearer KEY` with the one configured key (as vLLM's --api-key) and/or the
    keys of a key file (`name:key` lines, re-read when it changes: rotation without restart)."""

    def __init__(self, key: str = "", key_file: str = "") -> None:
        self._expected = f"Bearer {key}" if key else None
        self._file = TokenFile(key_file) if key_file else None

    def check(self, authorization: str | None) -> str:
        if self._expected is not None and authorization is not None and hmac.compare_digest(
                authorization.encode(), self._expected.encode()):
            return "api-key"
        text = authorization or ""
        name = self._file.lookup(text[7:].strip()) if self._file and text[:7].lower() == "bearer " else None
        if name is None:
            raise Unauthorized("a valid API key is required: Authorization: Bearer KEY", code="invalid_api_key")
        return name


@dataclass
class ChoiceDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class ChoiceText:
    """One choice's text: incremental detokenisation, then stop strings, holding back a tail that
    could be the start of one."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]) -> None:
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.emitted = 0

    def push(self, ids: list[int], final: bool) -> tuple[str, bool]:
        """(the text that may go out now, whether a stop string ended the choice)."""
        self.text += self.detok.push(ids)
        if final:
            self.text += self.detok.finish()
        # a stop string ending in the new text starts at or after `emitted`: the held-back tail
        # is at least as long as any stop string but one character
        found = [i for i in (self.text.find(s, self.emitted) for s in self.stops) if i >= 0]
        if found:
            end, stopped = min(found), True
        else:
            end, stopped = (len(self.text) if final else max(self.emitted, len(self.text) - self.hold)), False
        out = self.text[self.emitted : end]
        self.emitted = end
        return out, stopped


class FrontDoor:
    def __init__(
        self,
        router: RouterApi,
        tokenizer: Tokenizer,
        model_name: str,
        chat_template: ChatTemplate | None = None,
        defaults: Defaults | None = None,
        auth: Authenticator | None = None,
    ) -> None:
        self.router, self.tokenizer, self.model_name = router, tokenizer, model_name
        self.chat_template, self.defaults = chat_template, defaults or Defaults()
        self.auth = auth or AllowAll()
        self.created = int(time.time())

    # --- requests --------------------------------------------------------------------------------
    def check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("model is required", "model")
        if model != self.model_name:
            raise ModelNotFound(f"The model `{model}` does not exist (this server serves `{self.model_name}`)",
                                "model", "model_not_found")

    def prepare_completion(self, body: dict[str, Any]) -> Prepared:
        self.check_model(body)
        prompts = [
            self.tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
            for p in protocol.completion_prompts(body)
        ]
        return protocol.prepare("completion", body, prompts, protocol.completion_logprobs(body), self.defaults)

    def prepare_chat(self, body: dict[str, Any]) -> Prepared:
        self.check_model(body)
        messages = protocol.chat_messages(body)
        if self.chat_template is None:
            raise BadRequest("this model ships no chat template: use /v1/completions", "messages")
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise BadRequest("chat_template_kwargs must be an object", "chat_template_kwargs")
        add_prompt = body.get("add_generation_prompt", True)
        try:
            text = self.chat_template.render(messages, add_generation_prompt=bool(add_prompt), **kwargs)
        except ChatTemplateError as e:
            raise BadRequest(str(e), "messages") from e
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise BadRequest("the chat template rendered an empty prompt", "messages")
        return protocol.prepare("chat", body, [ids], protocol.chat_logprobs(body), self.defaults)

    # --- running ---------------------------------------------------------------------------------
    def _router_requests(self, p: Prepared, rid: str) -> list[RouterRequest]:
        return [
            RouterRequest(
                f"{rid}-{i}", p.prompts[i // p.n], p.max_tokens, p.temperature, p.top_p, p.top_k,
                None if p.seed is None else (p.seed + i % p.n) % (1 << 64), p.stop_token_ids, p.logprobs,
                p.ignore_eos,
            )
            for i in range(p.num_choices)
        ]

    async def run(self, p: Prepared, rid: str) -> AsyncGenerator[ChoiceDelta | Usage, None]:
        """Every choice's deltas as they come (interleaved), then the usage. Closing this
        generator (a client that went away) cancels every choice's Generate call."""
        m = metrics.current()
        t0 = time.monotonic()
        queue: asyncio.Queue[ChoiceDelta | BaseException | None] = asyncio.Queue()
        stats = [_ChoiceStats() for _ in range(p.num_choices)]
        tasks = [
            asyncio.ensure_future(self._choice(i, req, p.stop, stats[i], queue, t0))
            for i, req in enumerate(self._router_requests(p, rid))
        ]
        m.running.inc()
        try:
            left = len(tasks)
            while left:
                item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
            prompt_tokens = sum(len(x) for x in p.prompts)
            completion = sum(s.tokens for s in stats)
            m.e2e.observe(time.monotonic() - t0)
            m.prompt_tokens.inc(prompt_tokens)
            m.request_prompt_tokens.observe(prompt_tokens)
            m.request_generation_tokens.observe(completion)
            yield Usage(prompt_tokens, completion, stats[0].cached_tokens)
        finally:
            m.running.dec()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _choice(self, index: int, req: RouterRequest, stops: tuple[str, ...], st: _ChoiceStats,
                      out: asyncio.Queue[ChoiceDelta | BaseException | None], t0: float) -> None:
        m = metrics.current()
        text = ChoiceText(self.tokenizer, stops)
        last = t0
        try:
            async with contextlib.aclosing(_aiter(self.router.generate(req))) as stream:
                async for chunk in stream:
                    now = time.monotonic()
                    if st.tokens == 0:
                        st.cached_tokens, st.route = chunk.cached_tokens, chunk.route
                        m.ttft.labels(route=chunk.route or "unknown").observe(now - t0)
                    elif chunk.token_ids:
                        for _ in chunk.token_ids:
                            m.itl.observe((now - last) / len(chunk.token_ids))
                    last = now
                    st.tokens += len(chunk.token_ids)
                    m.generation_tokens.inc(len(chunk.token_ids))
                    shown = chunk.token_ids
                    if chunk.finish_reason == "stop" and shown and shown[-1] in req.stop_token_ids:
                        shown = shown[:-1]  # a stop token's own text is not part of the output (as vLLM)
                    delta, stopped = text.push(shown, bool(chunk.finish_reason))
                    reason = "stop" if stopped else (chunk.finish_reason or None)
                    out.put_nowait(ChoiceDelta(index, delta, chunk.token_ids, chunk.logprobs, reason))
                    if reason is not None:
                        m.request_success.labels(finished_reason=reason).inc()
                        break  # closing the stream cancels the Generate call (a stop string)
                else:
                    raise protocol.Unavailable("the router's stream ended without a finish reason")
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the consumer re-raises it
            out.put_nowait(e)
        out.put_nowait(None)

    def new_id(self, kind: str) -> str:
        return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


@dataclass
class _ChoiceStats:
    tokens: int = 0
    cached_tokens: int = 0
    route: str = ""


async def _aiter(it: AsyncIterator[RouterChunk]) -> AsyncGenerator[RouterChunk, None]:
    async for x in it:
        yield x
