"""The decode node: reserves blocks and a state slot for an announced request (and promises the
blocks of its whole generation, so it never runs out mid-way), receives its KV from a prefill
node, then decodes it in a continuous batch and streams tokens.

No gRPC here. `admit()` is an async generator whose lifetime is the request's: when the caller
stops iterating (client cancel, router retry, deadline), everything reserved is freed. While it
has nothing else to say it yields `Alive` every `alive_interval_s`, so a caller can tell a quiet
node from a dead one. A sequence the model fails on ends alone, with `ModelFault`.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
import uuid
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from prfaas.engine.executor import Executor, SeqState
from prfaas.engine.sink import ExecutorSink
from prfaas.errors import Draining, InvalidRequest, ModelFault
from prfaas.eval.emulate import Emulator
from prfaas.messages import Alive, Reserved, SamplingParams, TokenBatch
from prfaas.obs import metrics
from prfaas.obs.log import get_logger
from prfaas.transport.formats import accepted_formats

from .prefix import DecodePrefix

if TYPE_CHECKING:  # the receiver parses wire chunks; the core only hands it a sink
    from prfaas.transport.receiver import KvReceiver

log = get_logger(__name__)

MIN_TRANSFER_TIMEOUT_S = 0.1


class DecodeNode:
    def __init__(
        self,
        node_id: str,
        executor: Executor,
        receiver: KvReceiver,
        max_batch: int = 32,
        transfer_timeout_s: float = 30.0,
        compute_lock: asyncio.Lock | None = None,
        max_request_blocks: int = 0,
        alive_interval_s: float = 1.0,
        emulator: Emulator | None = None,
        prefix: DecodePrefix | None = None,
    ) -> None:
        self.emulator = emulator  # an emulated accelerator profile (prfaas.eval.emulate); None = real time
        self.prefix = prefix  # the node's prefix cache, decode side (None: it keeps nothing)
        self._compute = compute_lock  # shared with a prefill core on a convertible node
        self.kv_address = ""  # set when the node also serves the raw-TCP KV data port
        self.verify_sender = False  # mutual TLS: a transfer's KV only from the prefill node Admit named
        self.node_id, self.executor, self.receiver = node_id, executor, receiver
        self.max_batch, self.transfer_timeout_s = max_batch, transfer_timeout_s
        # one request may hold at most this many blocks (prompt + output): none takes the pool
        self.max_request_blocks = max_request_blocks or executor.blocks.num_blocks
        self.alive_interval_s = alive_interval_s
        # KV wire formats this node takes (registered; the router picks one per transfer)
        self.wire_accept: tuple[str, ...] = accepted_formats()
        self.draining = False
        self._running: dict[str, tuple[SeqState, asyncio.Queue[TokenBatch]]] = {}
        self._pending = 0
        self._stepping: set[int] = set()  # id() of sequences inside the running decode step
        self._deferred_free: list[SeqState] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        self.tokens_out = 0
        self.bytes_received = 0  # KV payload bytes received
        self._last_token_at: dict[str, float] = {}  # per running request: when its last token came

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop())

    async def stop(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)

    @property
    def max_tokens_per_request(self) -> int:
        """The longest prompt + output one request may have here."""
        return min(self.executor.max_context, self.max_request_blocks * self.executor.layout.block_size)

    def _check_admissible(self, prompt: list[int], params: SamplingParams) -> None:
        if self.draining:
            raise Draining(f"decode node {self.node_id} is draining")
        need = self.executor.blocks_needed(len(prompt), params.max_tokens)
        if need > self.max_request_blocks:
            raise InvalidRequest(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) needs {need} KV blocks; "
                f"decode node {self.node_id} admits at most {self.max_request_blocks} per request"
            )

    def _timeout(self, asked_s: float) -> float:
        """The transfer deadline: what the caller asked for, within (0.1 s, the node's own]."""
        if not math.isfinite(asked_s) or asked_s <= 0:
            return self.transfer_timeout_s
        return min(max(asked_s, MIN_TRANSFER_TIMEOUT_S), self.transfer_timeout_s)

    # --- the request's life -------------------------------------------------------------------------
    async def admit(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        transfer_timeout_s: float = 0.0,
        wire_dtypes: tuple[str, ...] = (),
        prefill_node: str = "",
    ) -> AsyncGenerator[Reserved | TokenBatch | Alive, None]:
        """`prefill_node`: the identity the KV must come from, when `verify_sender` (mutual TLS)."""
        ex = self.executor
        self._check_admissible(prompt, params)
        # raises InvalidRequest / OutOfCapacity
        seq = self.prefix.reserve(request_id, prompt, params) if self.prefix else ex.reserve(request_id, prompt, params)
        skip = self.prefix.attach(seq) if self.prefix else 0  # the prefix held here does not travel
        transfer_id = f"{self.node_id}/{request_id}/{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        # the router's choice first: the first format offered that this node takes, else exact
        wire = next((w for w in wire_dtypes if w in self.wire_accept), "")
        queue: asyncio.Queue[TokenBatch] = asyncio.Queue()
        try:
            transfer = self.receiver.expect(transfer_id, ex.layout, prompt_tokens=len(prompt), skip_tokens=skip,
                                            sink=ExecutorSink(ex, seq), deadline_s=self._timeout(transfer_timeout_s),
                                            wire_dtype=wire, sender=prefill_node if self.verify_sender else None)
            self._pending += 1
            try:
                yield Reserved(transfer_id, self.node_id, wire, self.kv_address, skip)
                waiting = asyncio.ensure_future(transfer.wait())
                async for alive in self._until(waiting):
                    yield alive
                first = waiting.result()
            finally:
                self._pending -= 1
                self.receiver.cancel(transfer_id)
            self._imported(seq, first, skip, transfer.bytes)
            yield TokenBatch([first], seq.finish_reason)
            if seq.finished:
                return
            self._running[transfer_id] = (seq, queue)
            self._wake.set()
            while True:
                try:
                    batch = await asyncio.wait_for(queue.get(), self.alive_interval_s)
                except TimeoutError:
                    yield Alive(kv_pending=False)
                    continue
                if batch.finish_reason == "error":
                    log.error("sequence_failed", error=seq.error, output_tokens=len(seq.output))
                    raise ModelFault(seq.error or f"request {request_id}: the decode step failed")
                yield batch
                if batch.finish_reason is not None:
                    return
        finally:
            log.info("request_done", output_tokens=len(seq.output), finish_reason=seq.finish_reason or "aborted")
            self._running.pop(transfer_id, None)
            try:
                if self.prefix:
                    self.prefix.finish(seq)  # a finished request's prefix stays cached
            except Exception:  # the cache is an optimisation: never a reason to keep the request's blocks
                log.exception("prefix_finish_failed")
            if id(seq) in self._stepping:
                seq.finish_reason = seq.finish_reason or "cancelled"
                self._deferred_free.append(seq)  # its blocks are in use by the worker thread
            else:
                ex.free(seq)

    def _imported(self, seq: SeqState, first: int, skip: int, nbytes: int) -> None:
        """The prompt's KV is in place: the sequence goes on from its first token."""
        self.executor.complete_import(seq, first)
        if self.prefix:
            self.prefix.observe(seq)
        log.info("kv_received", prompt_tokens=len(seq.prompt), skip_tokens=skip, kv_bytes=nbytes,
                 blocks=len(seq.block_table), slot=seq.slot)
        m = metrics.current()
        m.kv_received_bytes.inc(nbytes)
        m.decode_prefix_hits.inc(skip)
        m.generation_tokens.inc()
        self.bytes_received += nbytes
        self.tokens_out += 1

    async def _until(self, waiting: asyncio.Future[int]) -> AsyncGenerator[Alive, None]:
        """`Alive` every interval until `waiting` is done (cancelled with the caller)."""
        try:
            while not waiting.done():
                done, _ = await asyncio.wait({waiting}, timeout=self.alive_interval_s)
                if not done:
                    yield Alive(kv_pending=True)
        finally:
            if not waiting.done():
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)

    # --- continuous batching ----------------------------------------------------------------------
    async def _batch_loop(self) -> None:
        ex = self.executor
        while True:
            if not self._running:
                self._wake.clear()
                await self._wake.wait()
            entries = list(self._running.items())[: self.max_batch]
            seqs = [s for _, (s, _q) in entries]
            ready = ex.prepare_decode(seqs)  # allocation stays on the loop thread
            self._stepping = {id(s) for s in ready}
            try:
                if self._compute is None:
                    await self._step(ready)
                else:
                    async with self._compute:
                        await self._step(ready)
            except Exception as e:  # a failed step ends its requests, each with the error, rather than hanging them
                log.error("decode_step_failed", error=repr(e), batch=len(ready))
                for s in ready:
                    s.finish_reason, s.error = "error", f"request {s.request_id}: the decode step failed: {e!r}"
            finally:
                self._stepping = set()
                for s in self._deferred_free:
                    ex.free(s)
                self._deferred_free.clear()
            if self.prefix:
                for s in ready:
                    self.prefix.observe(s)
            ready_ids, now, m = {id(s) for s in ready}, time.monotonic(), metrics.current()
            for key, (seq, queue) in entries:
                if id(seq) in ready_ids or seq.finished:
                    tok = [seq.output[-1]] if id(seq) in ready_ids and seq.finish_reason != "error" else []
                    self.tokens_out += len(tok)
                    if tok:
                        m.generation_tokens.inc()
                        last = self._last_token_at.get(key)
                        if last is not None:
                            m.itl.observe(now - last)
                        self._last_token_at[key] = now
                    if seq.finished:
                        self._last_token_at.pop(key, None)
                    queue.put_nowait(TokenBatch(tok, seq.finish_reason, seq.logprobs[-1:] if tok else []))
                    if seq.finished:
                        self._running.pop(key, None)

    async def _step(self, ready: list[SeqState]) -> None:
        started = time.monotonic()
        await asyncio.to_thread(self.executor.run_decode, ready)
        if self.emulator is not None and ready:
            await self.emulator.decode_step(started, len(ready))  # held until the emulated step time

    # --- accounting -------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        return {"pending_transfers": self._pending, "running": len(self._running)}
