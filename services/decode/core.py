"""The decode node: reserves blocks and state slots for an announced request, receives its KV
from a prefill node, then decodes it in a continuous batch and streams tokens.

No gRPC here. `admit()` is an async generator whose lifetime is the request's: when the caller
stops iterating (client cancel, router retry, deadline), everything reserved is freed.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from prfaas.engine.executor import Executor, SeqState
from prfaas.messages import Reserved, SamplingParams, TokenBatch
from prfaas.obs.log import get_logger

if TYPE_CHECKING:  # the receiver parses wire chunks; the core only hands it a sink
    from prfaas.transport.chunks import KvPiece
    from prfaas.transport.receiver import KvReceiver

log = get_logger(__name__)


class _ExecutorSink:
    """Writes received chunks straight into the executor's pool for one sequence. Freeing is the
    admit generator's job (it outlives the transfer), so `release` has nothing to do."""

    def __init__(self, executor: Executor, seq: SeqState) -> None:
        self.executor, self.seq = executor, seq

    def write(self, piece: KvPiece) -> None:
        self.executor.write_kv(self.seq, piece.layer, piece.kind, piece.token_start, piece.token_end, piece.tensor)

    def release(self) -> None:
        pass


class DecodeNode:
    def __init__(
        self,
        node_id: str,
        executor: Executor,
        receiver: KvReceiver,
        max_batch: int = 32,
        transfer_timeout_s: float = 30.0,
        compute_lock: asyncio.Lock | None = None,
    ) -> None:
        self._compute = compute_lock  # shared with a prefill core on a convertible node
        self.kv_address = ""  # set when the node also serves the raw-TCP KV data port
        self.node_id, self.executor, self.receiver = node_id, executor, receiver
        self.max_batch, self.transfer_timeout_s = max_batch, transfer_timeout_s
        self._running: dict[str, tuple[SeqState, asyncio.Queue[TokenBatch]]] = {}
        self._pending = 0
        self._stepping: set[int] = set()  # id() of sequences inside the running decode step
        self._deferred_free: list[SeqState] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        self.tokens_out = 0

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop())

    async def stop(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)

    # --- the request's life -------------------------------------------------------------------------
    async def admit(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        transfer_timeout_s: float = 0.0,
        wire_dtypes: tuple[str, ...] = (),
    ) -> AsyncGenerator[Reserved | TokenBatch, None]:
        ex = self.executor
        seq = ex.reserve(request_id, prompt, params)  # raises InvalidRequest / OutOfCapacity
        transfer_id = f"{self.node_id}/{request_id}/{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        wire = "int8" if "int8" in wire_dtypes else ""
        timeout = transfer_timeout_s or self.transfer_timeout_s
        queue: asyncio.Queue[TokenBatch] = asyncio.Queue()
        try:
            transfer = self.receiver.expect(
                transfer_id,
                ex.layout,
                prompt_tokens=len(prompt),
                skip_tokens=0,
                sink=_ExecutorSink(ex, seq),
                deadline_s=timeout,
                wire_dtype=wire,
            )
            self._pending += 1
            try:
                yield Reserved(transfer_id, self.node_id, wire, self.kv_address)
                first = await transfer.wait()
            finally:
                self._pending -= 1
                self.receiver.cancel(transfer_id)
            ex.complete_import(seq, first)
            log.info("kv_received", prompt_tokens=len(prompt), blocks=len(seq.block_table), slot=seq.slot)
            self.tokens_out += 1
            yield TokenBatch([first], seq.finish_reason)
            if seq.finished:
                return
            self._running[transfer_id] = (seq, queue)
            self._wake.set()
            while True:
                batch = await queue.get()
                yield batch
                if batch.finish_reason is not None:
                    return
        finally:
            log.info("request_done", output_tokens=len(seq.output), finish_reason=seq.finish_reason or "aborted")
            self._running.pop(transfer_id, None)
            if id(seq) in self._stepping:
                seq.finish_reason = seq.finish_reason or "cancelled"
                self._deferred_free.append(seq)  # its blocks are in use by the worker thread
            else:
                ex.free(seq)

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
                    await asyncio.to_thread(ex.run_decode, ready)
                else:
                    async with self._compute:
                        await asyncio.to_thread(ex.run_decode, ready)
            except Exception as e:  # a failed step finishes its requests rather than hanging them
                log.error("decode_step_failed", error=repr(e))
                for s in ready:
                    s.finish_reason = "error"
            finally:
                self._stepping = set()
                for s in self._deferred_free:
                    ex.free(s)
                self._deferred_free.clear()
            ready_ids = {id(s) for s in ready}
            for key, (seq, queue) in entries:
                if id(seq) in ready_ids or seq.finished:
                    tok = [seq.output[-1]] if id(seq) in ready_ids else []
                    self.tokens_out += len(tok)
                    queue.put_nowait(TokenBatch(tok, seq.finish_reason, seq.logprobs[-1:] if tok else []))
                    if seq.finished:
                        self._running.pop(key, None)

    # --- accounting -------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        return {"pending_transfers": self._pending, "running": len(self._running)}
