"""The router: validates a request, asks the cache pool who holds its prefix, lets the routing
policy pick a prefill node (local PD-P or PrfaaS) and a decode node, wires the two together and
streams the tokens back.

Failure handling: if the prefill or the KV transfer fails before the first token, the decode
reservation is dropped (closing its Admit stream frees everything) and the request is retried on
another prefill node, falling back to the other cluster; a request is never lost silently.
Client cancellation closes both streams, so both nodes free what they reserved.

No gRPC here: the node clients and the directory are handed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from structlog.contextvars import bind_contextvars

from prfaas.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from prfaas.errors import Code, InvalidRequest, PrfaasError
from prfaas.messages import Done, PrefillJob, Reserved, SamplingParams, Started, TokenBatch, TokenLogprob
from prfaas.obs.log import get_logger
from prfaas.scheduling.policy import NodeView, RouteDecision, RouteQuery, RoutingPolicy

log = get_logger(__name__)


@dataclass(frozen=True)
class Node:
    node_id: str
    cluster: str
    role: str
    address: str
    queue_depth: int = 0
    running: int = 0
    free_blocks: int = 1 << 30
    egress_bytes_per_s: float = 0.0
    capacity_slots: int = 0
    kv_retransmits: int = 0  # cumulative TCP retransmits on the node's KV connections


class Directory(Protocol):
    """Who is in the cluster, and who holds which prefix (the cache pool)."""

    async def nodes(self) -> Sequence[Node]: ...

    async def hits(self, token_ids: list[int]) -> dict[str, int]: ...


class NodeClients(Protocol):
    def admit(
        self, address: str, request_id: str, prompt: list[int], params: SamplingParams, timeout_s: float
    ) -> AsyncGenerator[Reserved | TokenBatch, None]: ...

    def prefill(self, address: str, job: PrefillJob) -> AsyncGenerator[Started | Done, None]: ...


class RouteFailed(PrfaasError):
    """Every attempt to prefill the request failed."""

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


@dataclass
class RouterStats:
    decisions: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    failures: int = 0


class Router:
    def __init__(
        self,
        directory: Directory,
        clients: NodeClients,
        policy: RoutingPolicy,
        tokenizer: Tokenizer | None = None,
        max_attempts: int = 3,
        transfer_timeout_s: float = 30.0,
        num_connections: int = 0,
    ) -> None:
        self.directory, self.clients, self.policy, self.tokenizer = directory, clients, policy, tokenizer
        self.max_attempts, self.transfer_timeout_s, self.num_connections = (
            max_attempts,
            transfer_timeout_s,
            num_connections,
        )
        self.stats = RouterStats()
        self._inflight: Counter[str] = Counter()  # requests this router has on each node now
        self._ids = itertools.count()
        self.observers: list[Callable[[RouteDecision, int, float], None]] = []  # controllers, metrics
        self.prefill_observers: list[Callable[[str, int, float], None]] = []  # (cluster, tokens, prefill_s)

    def _prompt_ids(self, req: GenerateInput) -> list[int]:
        if req.prompt and req.token_ids:
            raise InvalidRequest("give either prompt or token_ids, not both")
        if req.prompt:
            if self.tokenizer is None:
                raise InvalidRequest("this router has no tokenizer: send token_ids")
            return self.tokenizer.encode(req.prompt)
        if not req.token_ids:
            raise InvalidRequest("the prompt is empty: give prompt or token_ids")
        return list(req.token_ids)

    async def _views(self, prompt: list[int], exclude: set[str]) -> tuple[list[NodeView], dict[str, Node]]:
        nodes = [n for n in await self.directory.nodes() if n.node_id not in exclude]
        hits = await self.directory.hits(prompt) if nodes else {}
        views = [
            NodeView(
                n.node_id,
                n.cluster,  # type: ignore[arg-type]  # filtered to "prfaas" / "local" below
                n.role,  # type: ignore[arg-type]  # filtered to "prefill" / "decode" below
                n.queue_depth,
                # heartbeats lag by seconds: this router's own in-flight count is current
                max(n.running, self._inflight[n.node_id]),
                n.free_blocks,
                hits.get(n.node_id, 0),
            )
            for n in nodes
            if n.role in ("prefill", "decode") and n.cluster in ("prfaas", "local")
        ]
        return views, {n.node_id: n for n in nodes}

    async def generate(self, req: GenerateInput) -> AsyncGenerator[GenerateOutput, None]:
        request_id = req.request_id or f"req-{uuid.uuid4().hex[:12]}"
        bind_contextvars(request_id=request_id)  # each RPC runs in its own task: no leak across calls
        prompt = self._prompt_ids(req)
        req.params.validate()
        if req.route not in ("auto", "local", "prfaas"):
            raise InvalidRequest(f"unknown route {req.route!r}")
        t0 = time.monotonic()
        exclude: set[str] = set()
        last_error: BaseException | None = None
        for attempt in range(self.max_attempts):
            views, by_id = await self._views(prompt, exclude)
            forced = req.route
            if attempt > 0 and forced != "auto":
                forced = "auto" if req.route == "prfaas" else forced  # a forced PrfaaS route may fall back
            decision = self.policy.route(RouteQuery(request_id, len(prompt), forced), views)  # type: ignore[arg-type]
            log.info(
                "route",
                request_id=request_id,
                attempt=attempt,
                route=decision.route,
                prefill=decision.prefill_node,
                decode=decision.decode_node,
                uncached=decision.uncached_tokens,
                reason=decision.reason,
            )
            self.stats.decisions[decision.route] = self.stats.decisions.get(decision.route, 0) + 1
            stream = self._serve(request_id, prompt, req.params, decision, by_id, t0)
            try:
                async with contextlib.aclosing(stream):
                    first = await anext(stream)
                    yield first
                    async for out in stream:
                        yield out
                return
            except _PrefillFailed as e:
                last_error = e.__cause__ or e
                exclude.add(decision.prefill_node)
                self.stats.retries += 1
                log.warning(
                    "prefill_failed_retrying", request_id=request_id, node=decision.prefill_node, error=repr(last_error)
                )
        self.stats.failures += 1
        raise RouteFailed(f"request {request_id}: {self.max_attempts} prefill attempts failed: {last_error!r}")

    async def _serve(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        d: RouteDecision,
        by_id: dict[str, Node],
        t0: float,
    ) -> AsyncGenerator[GenerateOutput, None]:
        # counted from the decision on (no await in between), so that concurrent requests see it
        self._inflight[d.decode_node] += 1
        self._inflight[d.prefill_node] += 1
        prefill_counted = [True]

        def prefill_over() -> None:
            if prefill_counted[0]:
                prefill_counted[0] = False
                self._inflight[d.prefill_node] -= 1

        try:  # closing the inner stream at once releases the decode reservation with us
            inner = self._serve_on(request_id, prompt, params, d, by_id, t0, prefill_over)
            async with contextlib.aclosing(inner):
                async for out in inner:
                    yield out
        finally:
            prefill_over()
            self._inflight[d.decode_node] -= 1

    async def _serve_on(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        d: RouteDecision,
        by_id: dict[str, Node],
        t0: float,
        prefill_over: Callable[[], None],
    ) -> AsyncGenerator[GenerateOutput, None]:
        prefill_node, decode_node = by_id[d.prefill_node], by_id[d.decode_node]
        admit = self.clients.admit(decode_node.address, request_id, prompt, params, self.transfer_timeout_s)
        prefill_task: asyncio.Task[Done] | None = None
        async with contextlib.aclosing(admit):
            try:
                reserved = await anext(admit)
            except (StopAsyncIteration, ConnectionError) as e:
                raise _PrefillFailed("the decode node did not reserve") from e
            assert isinstance(reserved, Reserved)
            job = PrefillJob(
                request_id,
                reserved.transfer_id,
                prompt,
                params,
                reserved.kv_address or decode_node.address,  # the raw-TCP data port when it has one
                self.num_connections,
                reserved.wire_dtype,
                time.time() + self.transfer_timeout_s,
            )
            prefill_task = asyncio.ensure_future(self._run_prefill(prefill_node.address, job, d, prefill_over))
            try:
                first = await self._first_tokens(admit, prefill_task)
            except BaseException:
                prefill_task.cancel()
                await asyncio.gather(prefill_task, return_exceptions=True)
                raise
            ttft = time.monotonic() - t0
            for obs in self.observers:
                obs(d, len(prompt), ttft)
            text = _Text(self.tokenizer)
            yield GenerateOutput(
                first.token_ids,
                text.push(first.token_ids, first.finish_reason),
                first.finish_reason or "",
                d.route,
                d.prefill_node,
                d.decode_node,
                request_id,
                d.cached_tokens,
                await self._first_logprobs(params, prefill_task),
            )
            if first.finish_reason:
                await asyncio.gather(prefill_task, return_exceptions=True)
                return
            async for batch in admit:
                assert isinstance(batch, TokenBatch)
                yield GenerateOutput(
                    batch.token_ids,
                    text.push(batch.token_ids, batch.finish_reason),
                    batch.finish_reason or "",
                    logprobs=batch.logprobs,
                )
                if batch.finish_reason:
                    break
            await asyncio.gather(prefill_task, return_exceptions=True)

    async def _run_prefill(
        self, address: str, job: PrefillJob, d: RouteDecision, prefill_over: Callable[[], None]
    ) -> Done:
        done: Done | None = None
        try:
            async for ev in self.clients.prefill(address, job):
                if isinstance(ev, Done):
                    done = ev
        finally:
            prefill_over()
        if done is None:
            raise ConnectionError("the prefill stream ended without a result")
        for obs in self.prefill_observers:
            obs(d.route, d.uncached_tokens, done.prefill_s)
        return done

    async def _first_tokens(
        self, admit: AsyncGenerator[Reserved | TokenBatch, None], prefill: asyncio.Task[Done]
    ) -> TokenBatch:
        """Waits for the decode node's first tokens, watching the prefill: if the prefill fails
        first, the attempt fails (and is retried) instead of waiting for the transfer deadline."""
        first = asyncio.ensure_future(anext(admit))
        try:
            done, _ = await asyncio.wait({first, prefill}, return_when=asyncio.FIRST_COMPLETED)
            if first not in done:
                exc = prefill.exception()
                if exc is not None:
                    raise _PrefillFailed("prefill failed") from exc
                await asyncio.wait({first})
            try:
                out = first.result()
            except Exception as e:
                raise _PrefillFailed("the KV transfer failed") from e
            assert isinstance(out, TokenBatch)
            return out
        finally:
            if not first.done():
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)

    @staticmethod
    async def _first_logprobs(params: SamplingParams, prefill: asyncio.Task[Done]) -> list[TokenLogprob]:
        """The first token's logprob is the prefill node's (it sampled it): in its Done, which
        follows the first token by about one round trip. Only awaited when the request asked."""
        if params.logprobs is None:
            return []
        done = (await asyncio.gather(prefill, return_exceptions=True))[0]
        if isinstance(done, Done) and done.first_logprob is not None:
            return [done.first_logprob]
        raise RouteFailed("the prefill node's result (with the first token's logprob) did not arrive")


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


class _PrefillFailed(Exception):
    pass
