"""The router: validates a request, asks the cache pool who holds its prefix, queues it until a
prefill node (local PD-P or PrfaaS, the routing policy's choice) and a decode node can take it,
wires the two together and streams the tokens back.

    generate -> validate -> queue (admission.py) -> dispatcher places it (placement.py + policy)
             -> attempt (attempt.py): Admit on the decode node, Prefill on the prefill node, tokens

Failure handling: a failed or stalled attempt before the first token marks the node it blames out
of routing (until it heartbeats again) and the request goes back to the front of the queue, to be
placed elsewhere; after the first token the client gets UNAVAILABLE with what happened. Client
cancellation closes both streams, so both nodes free what they reserved.

No gRPC here: the node clients and the directory are handed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from structlog.contextvars import bind_contextvars

from prfaas.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from prfaas.errors import Code, Draining, InvalidRequest, PrfaasError
from prfaas.messages import Done, SamplingParams, TokenLogprob
from prfaas.obs import metrics
from prfaas.obs.log import get_logger
from prfaas.scheduling.policy import NoCapacityError, RouteDecision, RouteQuery, RoutingPolicy

from .admission import AdmissionQueue, Waiting
from .attempt import Attempt, AttemptFailed, NodeClients
from .moves import settle_prefix
from .placement import Ask, Capacity, Liveness, Node, Placement, decode_blocks
from .wire import WirePolicy

log = get_logger(__name__)

REQUEST_ID = re.compile(r"[A-Za-z0-9._:/@+=-]{1,128}")

__all__ = ["Directory", "GenerateInput", "GenerateOutput", "Node", "NodeClients", "Router", "RouterLimits",
           "RouteFailed"]


class Directory(Protocol):
    """Who is in the cluster, and who holds which prefix (the cache pool)."""

    degraded: bool

    async def nodes(self) -> Sequence[Node]: ...

    async def hits(self, token_ids: list[int]) -> dict[str, int]: ...


class RouteFailed(PrfaasError):
    """Every attempt to serve the request failed, or none could be made in time."""

    code = Code.UNAVAILABLE


@dataclass
class GenerateInput:
    request_id: str
    prompt: str
    token_ids: list[int]
    params: SamplingParams
    route: str = "auto"  # "auto", "local" or "prfaas"


@dataclass
class GenerateOutput:
    token_ids: list[int]
    text: str = ""
    finish_reason: str = ""
    route: str = ""
    prefill_node: str = ""
    decode_node: str = ""
    request_id: str = ""
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when the request asked


@dataclass(frozen=True)
class RouterLimits:
    vocab_size: int = 0  # 0: unchecked here (the nodes check)
    max_context: int = 0  # the model's context length; 0: unchecked here
    max_attempts: int = 3
    transfer_timeout_s: float = 30.0
    stall_timeout_s: float = 5.0  # a node stream quiet this long has stalled
    num_connections: int = 0
    prefill_inflight: int = 4  # requests a prefill node holds at once (computing or queued there)
    max_queue: int = 1024
    max_queue_tokens: int = 1 << 22
    max_head_wait_s: float = 5.0
    max_queue_wait_s: float = 120.0  # a request nobody could take for this long fails UNAVAILABLE
    stale_after_s: float = 10.0  # a node whose last heartbeat is older is out of routing
    max_prompt_chars: int = 1 << 24
    early_first_token: bool = True  # the prefill node's first token to the client before the KV drains


@dataclass
class RouterStats:
    decisions: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    failures: int = 0
    requeued: int = 0


class Router:
    def __init__(
        self,
        directory: Directory,
        clients: NodeClients,
        policy: RoutingPolicy,
        tokenizer: Tokenizer | None = None,
        limits: RouterLimits | None = None,
        wire: WirePolicy | None = None,
        **overrides: float,
    ) -> None:
        self.directory, self.clients, self.policy, self.tokenizer = directory, clients, policy, tokenizer
        self.wire = wire or WirePolicy()  # KV wire format per transfer: pairs, compression (wire.py)
        base = limits or RouterLimits()
        self.limits = RouterLimits(**{**base.__dict__, **overrides})
        lim = self.limits
        self.stats = RouterStats()
        self.queue: AdmissionQueue[Placement] = AdmissionQueue(lim.max_queue, lim.max_queue_tokens, lim.max_head_wait_s)
        self.capacity = Capacity(lim.prefill_inflight)
        self.liveness = Liveness(lim.stale_after_s)
        self.draining = False
        self.active = 0  # generate calls in progress, queued or serving
        self.observers: list[Callable[[RouteDecision, int, float], None]] = []  # (decision, prompt, ttft)
        # (cluster, uncached tokens, prefill_s, kv_bytes, transfer_s, drain_s): each prefill's result
        self.prefill_observers: list[Callable[[str, int, float, int, float, float], None]] = []
        self.queue_observers: list[Callable[[float], None]] = []  # seconds each request waited
        self._wake = asyncio.Event()
        self._nodes: list[Node] = []
        self._dispatcher: asyncio.Task[None] | None = None

    # --- validation -------------------------------------------------------------------------------
    def _prompt_ids(self, req: GenerateInput) -> list[int]:
        if req.prompt and req.token_ids:
            raise InvalidRequest("give either prompt or token_ids, not both")
        if req.prompt:
            if self.tokenizer is None:
                raise InvalidRequest("this router has no tokenizer: send token_ids")
            if len(req.prompt) > self.limits.max_prompt_chars:
                raise InvalidRequest(f"prompt has {len(req.prompt)} characters; at most {self.limits.max_prompt_chars}")
            return self.tokenizer.encode(req.prompt)
        if not req.token_ids:
            raise InvalidRequest("the prompt is empty: give prompt or token_ids")
        return list(req.token_ids)

    def validate(self, req: GenerateInput) -> tuple[str, list[int]]:
        """The request id and prompt ids, or InvalidRequest naming the field."""
        if req.request_id and not REQUEST_ID.fullmatch(req.request_id):
            raise InvalidRequest("request_id must be 1-128 characters of [A-Za-z0-9._:/@+=-]")
        if req.route not in ("auto", "local", "prfaas"):
            raise InvalidRequest(f"unknown route {req.route!r}")
        req.params.validate()
        prompt = self._prompt_ids(req)
        lim = self.limits
        if lim.vocab_size:
            bad = next((t for t in prompt if not 0 <= t < lim.vocab_size), None)
            if bad is not None:
                raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {lim.vocab_size})")
            bad = next((t for t in req.params.stop_token_ids if t >= lim.vocab_size), None)
            if bad is not None:
                raise InvalidRequest(f"stop token id {bad} is outside the vocabulary [0, {lim.vocab_size})")
        if lim.max_context and len(prompt) + req.params.max_tokens > lim.max_context:
            raise InvalidRequest(
                f"prompt ({len(prompt)} tokens) + max_tokens ({req.params.max_tokens}) exceeds the model's "
                f"context of {lim.max_context} tokens"
            )
        return req.request_id or f"req-{uuid.uuid4().hex[:12]}", prompt

    # --- a request's life -------------------------------------------------------------------------
    async def generate(self, req: GenerateInput) -> AsyncGenerator[GenerateOutput, None]:
        if self.draining:
            raise Draining("the router is draining: send new requests to another router")
        request_id, prompt = self.validate(req)
        bind_contextvars(request_id=request_id)  # each RPC runs in its own task: no leak across calls
        t0 = time.monotonic()
        nodes = await self.directory.nodes()
        grids = [n.prefix_grid for n in nodes if n.prefix_grid > 0]
        # a hit leaves a token to compute and falls on a node's grid: shorter prompts cannot hit anywhere
        hits = await self.directory.hits(prompt) if grids and len(prompt) > min(grids) else {}
        ask = Ask(request_id, len(prompt), req.params.max_tokens, req.route, tuple(hits.items()))  # type: ignore[arg-type]
        why = self.capacity.never_fits(nodes, ask)
        if why is not None:
            raise InvalidRequest(f"request {request_id} can never be served here: {why}")
        m = metrics.current()
        m.prompt_tokens.inc(len(prompt))
        self.active += 1
        finish = "error"
        try:
            async for out in self._serve(request_id, prompt, req.params, ask, t0):
                m.generation_tokens.inc(len(out.token_ids))
                finish = out.finish_reason or finish
                yield out
        finally:
            self.active -= 1
            m.request_success.labels(finished_reason=finish if finish != "error" else "abort").inc()
            m.e2e.observe(time.monotonic() - t0)

    async def _serve(
        self, request_id: str, prompt: list[int], params: SamplingParams, ask: Ask, t0: float
    ) -> AsyncGenerator[GenerateOutput, None]:
        last: AttemptFailed | None = None
        attempt = 0
        first_out: int | None = None  # the first token the client has: a retry forces it
        while attempt < self.limits.max_attempts:
            placement = await self._placed(ask, front=last is not None)
            attempt_t0 = time.monotonic()
            try:
                async for out in self._run(request_id, prompt, params, placement, t0, attempt_t0, ask, first_out):
                    yield out
                return
            except AttemptFailed as f:
                last = f
                first_out = f.first_out
                log.warning("attempt_failed", request_id=request_id, attempt=attempt, side=f.side, node=f.node_id,
                            code=f.code.value, error=f.message, tokens_sent=f.tokens_sent)
                if f.requeue:
                    self.stats.requeued += 1
                    self.capacity.mark_full(f.node_id)
                    continue  # the node was full (others' requests): wait for capacity again, no attempt spent
                if f.code == Code.UNAVAILABLE:
                    self.liveness.fail(f.node_id)  # out of routing until it heartbeats again
                if not f.retryable:
                    self.stats.failures += 1
                    raise f.error() from None
                if f.side == "prefill":
                    ask = dataclasses.replace(ask, exclude=ask.exclude | {f.node_id})
                self.stats.retries += 1
                attempt += 1
        self.stats.failures += 1
        assert last is not None
        raise RouteFailed(f"request {request_id}: {self.limits.max_attempts} attempts failed; the last: "
                          f"{last.error()}")

    async def _placed(self, ask: Ask, front: bool) -> Placement:
        """Waits in the queue until the dispatcher places the request."""
        self._ensure_dispatcher()
        w: Waiting[Placement] = self.queue.push(ask.request_id, ask.prompt_tokens, ask, front=front)
        self._wake.set()
        try:
            return await w.placed
        finally:
            self.queue.remove(w)
            waited = time.monotonic() - w.enqueued_at
            for obs in self.queue_observers:
                obs(waited)

    async def _run(
        self, request_id: str, prompt: list[int], params: SamplingParams, p: Placement, t0: float, attempt_t0: float,
        ask: Ask, first_out: int | None = None,
    ) -> AsyncGenerator[GenerateOutput, None]:
        d = p.decision
        wire = self.wire.wire_for(p.prefill, p.decode) or ""
        log.info("route", route=d.route, prefill=d.prefill_node, decode=d.decode_node, uncached=d.uncached_tokens,
                 reason=d.reason, queue_ms=round((attempt_t0 - t0) * 1000, 1), wire=wire)
        self.stats.decisions[d.route] = self.stats.decisions.get(d.route, 0) + 1
        prefill_counted = [True]

        def prefill_over(done: Done | None = None) -> None:
            if prefill_counted[0]:
                prefill_counted[0] = False
                self.capacity.prefill_done(p)
                self._wake.set()
            if done is not None:
                for obs in self.prefill_observers:
                    obs(d.route, d.uncached_tokens, done.prefill_s, done.kv_bytes, done.transfer_s, done.drain_s)

        lim = self.limits
        attempt = Attempt(self.clients, request_id, prompt, params, p, transfer_timeout_s=lim.transfer_timeout_s,
                          stall_timeout_s=lim.stall_timeout_s, num_connections=lim.num_connections,
                          deadline_unix_s=time.time() + lim.transfer_timeout_s, on_prefill_done=prefill_over,
                          wire_dtype=wire, forced_first=first_out, early_first=lim.early_first_token,
                          vocab_size=lim.vocab_size)
        first, described, text = first_out is None, False, _Text(self.tokenizer)
        if first_out is not None:
            text.push([first_out], None)  # the client has its text: decode the rest after it
        try:
            if hasattr(self.clients, "import_prefix"):  # a longer prefix in the other cluster: move or recompute
                await settle_prefix(self.clients, request_id, prompt, p, ask, self._nodes,  # type: ignore[arg-type]
                                    lim.transfer_timeout_s)
            async with contextlib.aclosing(attempt.tokens()) as batches:
                async for batch in batches:
                    out = GenerateOutput(batch.token_ids, text.push(batch.token_ids, batch.finish_reason),
                                         batch.finish_reason or "", logprobs=list(batch.logprobs))
                    if first:
                        first = False
                        ttft = time.monotonic() - t0
                        marks = {f"{k}_ms": round((v - t0) * 1000, 2) for k, v in attempt.marks.items()}
                        log.info("first_token", ttft_ms=round(ttft * 1000, 2),
                                 queue_ms=round((attempt_t0 - t0) * 1000, 2), **marks)
                        for obs in self.observers:
                            obs(d, len(prompt), ttft)
                    if not described:  # each attempt's first message names its nodes: the last one served
                        described = True
                        out.route, out.prefill_node, out.decode_node = d.route, d.prefill_node, d.decode_node
                        out.request_id, out.cached_tokens = request_id, d.cached_tokens
                    yield out
        finally:
            prefill_over()
            self.capacity.decode_done(p)
            self._wake.set()


    # --- the dispatcher ---------------------------------------------------------------------------
    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_forever())

    async def stop(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        self.queue.fail_all(Draining("the router stopped"))

    async def _dispatch_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), 0.25)  # new work, freed capacity, or a tick
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.dispatch_once()
            except Exception as e:  # the dispatcher must outlive any one bad pass
                log.error("dispatch_failed", error=repr(e))

    async def dispatch_once(self) -> int:
        if not len(self.queue):
            return 0
        self._nodes = await self.nodes()
        self.wire.observe(self._nodes)
        self._expire_waiting()
        return self.queue.dispatch(self._try_place)

    async def nodes(self) -> list[Node]:
        """The members the router would route to now: usable (not failed, stale or draining)."""
        nodes = await self.directory.nodes()
        return [n for n in nodes if self.liveness.usable(n, self.directory.degraded)]

    def waiting_uncached(self) -> list[int]:
        """Per request waiting in the admission queue: its prompt less its best known prefix hit."""
        return [w.ask.prompt_tokens - max((hit for _, hit in w.ask.hits), default=0) for w in self.queue]

    def _try_place(self, w: Waiting[Placement]) -> Placement | None:
        ask: Ask = w.ask
        by_id = {n.node_id: n for n in self._nodes}
        for _ in range(len(self._nodes)):
            d = self._route(ask)
            if d is None:
                return None
            decode = by_id[d.decode_node]
            if self.wire.wire_for(by_id[d.prefill_node], decode) is not None:
                break
            # a pair that cannot work (cache dtypes the decode node does not convert): not this prefill node
            ask = dataclasses.replace(ask, exclude=ask.exclude | {d.prefill_node})
        else:
            return None
        p = Placement(d, by_id[d.prefill_node], decode, decode_blocks(decode, ask))
        self.capacity.take(p)
        return p

    def _route(self, ask: Ask) -> RouteDecision | None:
        query = RouteQuery(ask.request_id, ask.prompt_tokens, ask.route)
        try:
            return self.policy.route(query, self.capacity.views(self._nodes, ask))
        except NoCapacityError as e:
            if e.busy or not ask.exclude:
                return None
            try:  # only excluded prefill nodes are left: try them again (they heartbeated since)
                everyone = dataclasses.replace(ask, exclude=frozenset())
                return self.policy.route(query, self.capacity.views(self._nodes, everyone))
            except NoCapacityError:
                return None

    def _expire_waiting(self) -> None:
        limit = self.limits.max_queue_wait_s
        self.queue.expire(limit, lambda w: RouteFailed(
            f"request {w.request_id}: no prefill and decode node could take it within {limit:g} s"))

    # --- drain ------------------------------------------------------------------------------------
    async def drain(self, timeout_s: float) -> None:
        """Takes no new request; waits up to `timeout_s` for those in flight to finish."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.1)


class _Text:
    """A request's streamed text, decoded incrementally: a character whose bytes span two
    messages comes out whole, in the later one."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self._detok = IncrementalDetokenizer(tokenizer) if tokenizer else None

    def push(self, ids: list[int], finish_reason: str | None) -> str:
        if self._detok is None:
            return ""
        text = self._detok.push(ids)
        return text + self._detok.finish() if finish_reason else text
