"""One attempt at serving a placed request: reserve on the decode node, prefill on the prefill node,
stream the tokens back, and tell the router what went wrong if anything did.

Both node streams speak at least every second (`Progress`, `Alive`); a stream quiet for
`stall_timeout_s` is a stalled node. A failure is an `AttemptFailed` naming the node to blame and
whether the request may be retried: before the decode node's first token, a failure of the
network or of a node is retried elsewhere; a refusal of the request itself (invalid, the model's
fault) is not; after it nothing is retried and the client gets a clear status.

The first token goes to the client as soon as the prefill node has sampled it (`Sampled`), while
its KV is still draining to the decode node, whose own first token (the same) is then dropped. If
the attempt fails in between, the retry forces that token (`forced_first_token`): the client never
sees a first token twice or two different ones.

No gRPC here: the node clients are handed in; their calls fail with `RemoteError` (a code).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from prfaas.errors import Code, PrfaasError, RemoteError
from prfaas.messages import (
    Alive,
    Done,
    PrefillJob,
    Progress,
    Reserved,
    Sampled,
    SamplingParams,
    Started,
    TokenBatch,
    TokenLogprob,
)

from .placement import Placement

T = TypeVar("T")
PREFILL_VERDICT_GRACE_S = 1.0  # how long a failed transfer waits for the prefill node's own verdict

# what a failed call's code says about retrying: a refusal of the request itself is final
FINAL = frozenset({Code.INVALID_ARGUMENT, Code.INTERNAL, Code.PERMISSION_DENIED, Code.UNAUTHENTICATED,
                   Code.FAILED_PRECONDITION, Code.OUT_OF_RANGE, Code.UNIMPLEMENTED})


class NodeClients(Protocol):
    def admit(
        self, address: str, request_id: str, prompt: list[int], params: SamplingParams, timeout_s: float,
        wire_dtypes: tuple[str, ...] = (),
        node_id: str = "", prefill_node: str = "",
    ) -> AsyncGenerator[Reserved | TokenBatch | Alive, None]:
        """`node_id`: the decode node's (its certificate must name it); `prefill_node`: the only
        node it may take this request's KV from."""
        ...

    def prefill(self, address: str, job: PrefillJob,
                node_id: str = "") -> AsyncGenerator[Started | Progress | Sampled | Done, None]: ...


@dataclass
class AttemptFailed(Exception):
    node_id: str  # the node to blame
    side: str  # "prefill" or "decode"
    code: Code
    message: str
    tokens_sent: int = 0  # by the decode node
    requeue: bool = False  # the node was full, nobody failed: wait for capacity again
    first_out: int | None = None  # the first token the client already has (a retry must force it)

    @property
    def retryable(self) -> bool:
        return self.tokens_sent == 0 and self.code not in FINAL

    def error(self) -> RemoteError:
        """What the client is told: the node's own code for a refusal, UNAVAILABLE for a failure."""
        if self.tokens_sent:
            code = self.code if self.code in FINAL else Code.UNAVAILABLE
            return RemoteError(code, f"{self.side} node {self.node_id} failed after {self.tokens_sent} tokens: "
                                     f"{self.message}")
        return RemoteError(self.code, f"{self.side} node {self.node_id}: {self.message}")


def code_of_error(e: BaseException) -> tuple[Code, str]:
    if isinstance(e, PrfaasError):
        return e.code, str(e)
    return Code.UNAVAILABLE, repr(e)  # a broken connection, or anything the client did not classify


class Attempt:
    """Drives one placement; `tokens` yields the token batches (the first one first)."""

    def __init__(
        self,
        clients: NodeClients,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        placement: Placement,
        *,
        transfer_timeout_s: float,
        stall_timeout_s: float,
        num_connections: int,
        deadline_unix_s: float,
        on_prefill_done: Callable[[Done], None],
        wire_dtype: str = "",
        forced_first: int | None = None,
        early_first: bool = True,
        vocab_size: int = 0,
    ) -> None:
        self.clients, self.request_id, self.prompt, self.params = clients, request_id, prompt, params
        self.p, self.transfer_timeout_s, self.stall_timeout_s = placement, transfer_timeout_s, stall_timeout_s
        self.num_connections, self.deadline_unix_s = num_connections, deadline_unix_s
        self.on_prefill_done = on_prefill_done
        self.wire_dtype = wire_dtype  # the router's choice (wire.py); the decode node confirms it in Reserved
        self.sent = 0
        self.early_first = early_first
        self.vocab_size = vocab_size  # a prefill node's early token is checked against it (0: unchecked)
        self.first_out = forced_first  # the first token the client has, once it has it (a retry's: forced)
        self._sampled: asyncio.Future[Sampled] = asyncio.get_running_loop().create_future()
        self.skip_tokens = 0  # prompt KV the decode node held (not transferred)
        self.marks: dict[str, float] = {}  # monotonic times: reserved, prefill_started, sampled, prefill_done, first

    def _mark(self, what: str) -> None:
        self.marks.setdefault(what, time.monotonic())

    async def tokens(self) -> AsyncGenerator[TokenBatch, None]:
        try:
            async for batch in self._tokens():
                yield batch
        except AttemptFailed as f:
            f.first_out = self.first_out
            raise

    async def _tokens(self) -> AsyncGenerator[TokenBatch, None]:
        d = self.p.decision
        admit = self.clients.admit(self.p.decode.address, self.request_id, self.prompt, self.params,
                                   self.transfer_timeout_s, wire_dtypes=(self.wire_dtype,),
                                   node_id=d.decode_node, prefill_node=d.prefill_node)
        async with contextlib.aclosing(admit):
            reserved = await self._decode_event(admit)
            self._mark("reserved")
            if not isinstance(reserved, Reserved):
                raise AttemptFailed(d.decode_node, "decode", Code.INTERNAL, "tokens before a reservation")
            job = PrefillJob(self.request_id, reserved.transfer_id, self.prompt, self.params,
                             reserved.kv_address or self.p.decode.address, self.num_connections,
                             reserved.wire_dtype, self.deadline_unix_s, reserved.skip_tokens,
                             decode_node=d.decode_node, forced_first_token=self.first_out)
            self.skip_tokens = reserved.skip_tokens
            prefill = asyncio.ensure_future(self._prefill(job))
            try:
                finished = False
                async for batch in self._first(admit, prefill):
                    self._mark("first")
                    finished = batch.finish_reason is not None
                    yield batch
                while not finished:
                    batch = await self._decode_event(admit)
                    if not isinstance(batch, TokenBatch):
                        raise AttemptFailed(d.decode_node, "decode", Code.INTERNAL, "a second reservation")
                    yield batch
                    finished = batch.finish_reason is not None
            finally:
                if not prefill.done():
                    prefill.cancel()
                await asyncio.gather(prefill, return_exceptions=True)

    # --- the two streams ----------------------------------------------------------------------------
    async def _decode_event(self, admit: AsyncIterator[Reserved | TokenBatch | Alive]) -> Reserved | TokenBatch:
        """The decode node's next event, skipping `Alive`; a quiet or broken stream fails."""
        node = self.p.decision.decode_node
        while True:
            try:
                ev = await asyncio.wait_for(anext(admit), self.stall_timeout_s)
            except TimeoutError:
                raise AttemptFailed(node, "decode", Code.UNAVAILABLE, f"silent for {self.stall_timeout_s:g} s",
                                    self.sent) from None
            except StopAsyncIteration:
                raise AttemptFailed(node, "decode", Code.UNAVAILABLE, "the stream ended early", self.sent) from None
            except Exception as e:
                code, message = code_of_error(e)
                raise AttemptFailed(node, "decode", code, message, self.sent,
                                    requeue=code == Code.RESOURCE_EXHAUSTED and not self.sent) from e
            if isinstance(ev, TokenBatch):
                self.sent += len(ev.token_ids)
                return ev
            if isinstance(ev, Reserved):
                return ev

    async def _prefill(self, job: PrefillJob) -> Done:
        node, done = self.p.decision.prefill_node, None
        stream = self.clients.prefill(self.p.prefill.address, job, node_id=node)
        async with contextlib.aclosing(stream):
            while True:
                try:
                    ev = await asyncio.wait_for(anext(stream), self.stall_timeout_s)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise AttemptFailed(node, "prefill", Code.UNAVAILABLE,
                                        f"no progress for {self.stall_timeout_s:g} s") from None
                except Exception as e:
                    code, message = code_of_error(e)
                    raise AttemptFailed(node, "prefill", code, message,
                                        requeue=code == Code.RESOURCE_EXHAUSTED) from e
                if isinstance(ev, Started):
                    self._mark("prefill_started")
                elif isinstance(ev, Sampled):
                    self._mark("sampled")
                    if not self._sampled.done():
                        self._sampled.set_result(ev)
                elif isinstance(ev, Done):
                    self._mark("prefill_done")
                    done = ev
        if done is None:
            raise AttemptFailed(node, "prefill", Code.UNAVAILABLE, "the stream ended without a result")
        self.on_prefill_done(done)
        return done

    async def _first_logprob(self, prefill: asyncio.Future[Done]) -> list[TokenLogprob]:
        """The prefill node's (it sampled the first token), from its `Sampled` or its `Done`."""
        await asyncio.wait({self._sampled, prefill}, return_when=asyncio.FIRST_COMPLETED)
        lp = self._sampled.result().logprob if self._sampled.done() else (await prefill).first_logprob
        if lp is None:
            raise AttemptFailed(self.p.decision.prefill_node, "prefill", Code.INTERNAL, "no logprob in its result")
        return [lp]

    async def _early(self, first: asyncio.Future[Reserved | TokenBatch],
                     prefill: asyncio.Future[Done]) -> TokenBatch | None:
        """The prefill node's first token, if it comes before the decode node's and does not end
        the request (a last token comes from the decode node, with its finish)."""
        if not self.early_first or self.first_out is not None:
            return None
        await asyncio.wait({first, prefill, self._sampled}, return_when=asyncio.FIRST_COMPLETED)
        if first.done() or not self._sampled.done():
            return None
        s = self._sampled.result()
        if s.finish_reason is not None:
            return None
        if self.vocab_size and not 0 <= s.token_id < self.vocab_size:  # never pass a node's nonsense on
            raise AttemptFailed(self.p.decision.prefill_node, "prefill", Code.UNAVAILABLE,
                                f"its first token {s.token_id} is outside the vocabulary [0, {self.vocab_size})")
        self.first_out = s.token_id
        return TokenBatch([s.token_id], None, [s.logprob] if s.logprob is not None else [])

    async def _first(self, admit: AsyncIterator[Reserved | TokenBatch | Alive],
                     prefill: asyncio.Future[Done]) -> AsyncGenerator[TokenBatch, None]:
        """The first token (the prefill node's if it comes first), then the decode node's first
        batch less what the client already has, watching the prefill: if the prefill fails first,
        the attempt fails at once instead of at the transfer deadline."""
        first = asyncio.ensure_future(self._decode_event(admit))
        try:
            early = await self._early(first, prefill)
            if early is not None:
                yield early
            await asyncio.wait({first, prefill}, return_when=asyncio.FIRST_COMPLETED)
            if not first.done():
                prefill.result()  # raises the prefill's failure
                await asyncio.wait({first})
            out = first.result()
        except AttemptFailed as f:
            raise await self._blame(f, prefill) from None
        finally:
            if not first.done():
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
        if not isinstance(out, TokenBatch):
            raise AttemptFailed(self.p.decision.decode_node, "decode", Code.INTERNAL, "a second reservation")
        if self.first_out is None:
            if self.params.logprobs is not None:
                out = TokenBatch(out.token_ids, out.finish_reason, await self._first_logprob(prefill))
            yield out
            return
        if out.token_ids != [self.first_out]:
            raise AttemptFailed(self.p.decision.decode_node, "decode", Code.INTERNAL,
                                f"its first token {out.token_ids} is not the prefill node's [{self.first_out}]")
        if out.finish_reason is not None:  # the client has the token: only the finish is news
            yield TokenBatch([], out.finish_reason, [])

    async def _blame(self, f: AttemptFailed, prefill: asyncio.Future[Done]) -> AttemptFailed:
        """Who failed, when the decode node's first token did not come."""
        if f.side == "decode" and not prefill.done():
            # the decode side often hears of a failed prefill first (its KV connection breaks): the
            # prefill node's own verdict follows within a round trip and says more (a final INTERNAL)
            await asyncio.wait({prefill}, timeout=PREFILL_VERDICT_GRACE_S)
        if f.side == "decode" and prefill.done() and not prefill.cancelled() and prefill.exception() is not None:
            e = prefill.exception()
            if isinstance(e, AttemptFailed):
                return e  # the KV never came: the prefill's fault
        if f.side == "decode" and f.code != Code.UNAVAILABLE:
            # the decode node is up and says the transfer failed (deadline, bad or missing chunks):
            # the sender is to blame, and another prefill node may well succeed
            return AttemptFailed(self.p.decision.prefill_node, "prefill", Code.UNAVAILABLE,
                                 f"the KV transfer failed ({f.code.value}): {f.message}")
        return f
