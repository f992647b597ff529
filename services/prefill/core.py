"""The prefill node: runs a prompt layer by layer and pushes each finished layer's KV to the
decode node while the next layer computes. Between requests it keeps only its prefix cache;
a request's own blocks and slot are freed when its push is done (or fails, or is cancelled).

    reserve -> plan (prefix hit, parts, checkpoints) -> for each part: run the layers, push each
    -> finish (the first token travels last)

No gRPC here: the KV sender is handed in as a factory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from typing import Protocol

from prfaas.engine.executor import Executor, LayerKv, SeqState
from prfaas.errors import Draining, InvalidRequest, OutOfCapacity
from prfaas.eval.emulate import Emulator, PrefillPace
from prfaas.kv.prefill_plan import PrefillPlan, PrefillPlanner, Segment
from prfaas.kv.prefix import block_hashes
from prfaas.kv.prefix_cache import PrefixCache
from prfaas.kv.prefix_index import CacheEvent
from prfaas.messages import Done, PrefillJob, Progress, Sampled, Started
from prfaas.obs import metrics
from prfaas.obs.log import get_logger
from prfaas.transport.chunks import chunk_grid

from .handoff import END, Handoff, Hold

log = get_logger(__name__)

MAX_KV_CONNECTIONS = 64  # what one job may ask for


class PushStats(Protocol):
    bytes: int
    chunks: int
    seconds: float


class KvPush(Protocol):
    """One request's KV stream to its decode node (`prfaas.transport.sender.KvSender`)."""

    async def push_layer(self, layer_kv: LayerKv) -> None: ...

    async def finish(self, first_token: int) -> PushStats: ...

    async def abort(self) -> None: ...


SenderFactory = Callable[[PrefillJob], KvPush]
PROGRESS_EVERY_S = 0.1  # at most this often a Progress after a layer (and one after each part)


class PrefillNode:
    def __init__(
        self,
        node_id: str,
        executor: Executor,
        sender_factory: SenderFactory,
        compute_lock: asyncio.Lock | None = None,
        planner: PrefillPlanner | None = None,
        prefix_cache: PrefixCache | None = None,
        on_cache_events: Callable[[list[CacheEvent]], None] | None = None,
        yield_between_chunks: bool = False,
        alive_interval_s: float = 1.0,
        cluster: str = "",
        emulator: Emulator | None = None,
        send_grid: int = 0,
        push_after_tokens: int = 0,
    ) -> None:
        # on a local-cluster node, a prompt computing fewer tokens than this pushes its KV once its
        # first token is sampled, not layer by layer: its compute is short, a push beside it on the
        # same cores slows it, and the transfer stays inside the datacenter
        self.push_after_tokens = push_after_tokens
        self.emulator = emulator  # an emulated accelerator profile (prfaas.eval.emulate); None = real time
        # the transfer's chunk grid: a pushed piece starts on it (0: the default sender's)
        self.send_grid = send_grid or chunk_grid(executor.layout)
        self.cluster = cluster  # "prfaas" or "local": the route label of its metrics
        self.node_id, self.executor, self.sender_factory = node_id, executor, sender_factory
        self.planner = planner or PrefillPlanner(executor.layout.block_size)
        if prefix_cache is not None and not self.planner.grid:
            raise ValueError("a prefix cache needs a planner with a checkpoint grid")
        self.prefix_cache = prefix_cache
        self.on_cache_events = on_cache_events or (lambda events: None)
        # one prefill computes at a time, others queue; shared with a decode core on a convertible
        # node, where the lock is handed over between two parts of a prompt (asyncio's lock is
        # FIFO, so a waiting decode step goes first) and a long prefill no longer stalls decoding
        self._compute = compute_lock or asyncio.Lock()
        self.yield_between_chunks = yield_between_chunks
        self.alive_interval_s = alive_interval_s
        self.draining = False
        self.cached_tokens = 0  # prompt tokens served from the prefix cache so far
        self.tokens_computed = 0  # prompt tokens computed so far
        self.queue_depth = 0
        self.running = 0
        self.bytes_sent = 0

    async def prefill(self, job: PrefillJob) -> AsyncGenerator[Started | Progress | Sampled | Done, None]:
        """The request's events: `Started`, `Progress` at least every `alive_interval_s` (also while
        it waits for the compute lock or for its KV to drain), `Sampled` as soon as the first token
        is known, then `Done` once its KV has drained."""
        self._validate(job)
        forced = job.forced_first_token
        t_arrive = time.monotonic()
        hold = Hold(self._compute)
        run: _Run | None = None
        running = False
        try:
            self.queue_depth += 1
            try:  # closed here, the lock may already be ours: the finally below gives it back
                async for ev in self._alive(asyncio.ensure_future(hold.acquire()), lambda: Progress(0, 0, True)):
                    yield ev
            finally:
                self.queue_depth -= 1
            self.running += 1
            running = True
            run = _Run(self._reserve(job))  # holds the request's blocks until the finally below
            plan, hashes = self._plan(run.seq)
            run.tokens_done, run.sent = plan.hit, job.skip_tokens
            # a PrfaaS node's KV crosses the datacenter link: it always streams layer by layer
            run.hold_back = self.cluster != "prfaas" and len(job.prompt) - plan.hit < self.push_after_tokens
            m = metrics.current()
            m.queue_time.observe(time.monotonic() - t_arrive)
            yield Started(self.node_id, int((time.monotonic() - t_arrive) * 1000))
            run.sender = self.sender_factory(job)
            t0 = time.monotonic()
            if self.emulator is not None:
                run.pace = self.emulator.prefill_pace(len(job.prompt) - plan.hit,
                                                      len(plan.segments) * self.executor.layout.num_layers)
            for segment in plan.segments:
                run.snaps = self._checkpoint_slots(segment.checkpoints)
                async for ev in self._run_part(run, segment):
                    yield ev
                self._checkpoint(run, hashes)
                if run.first is None and self.yield_between_chunks:
                    hold.release()
                    async for ev in self._alive(asyncio.ensure_future(hold.acquire()), run.progress):
                        yield ev
            assert run.first is not None, "the last part yields the first token"
            if run.pace is not None:
                await run.pace.done()  # the emulated accelerator is still computing until then
            prefill_s = time.monotonic() - t0
            hold.release()  # the next prompt may compute while this KV drains
            sampled = self._sampled(run, forced)
            yield sampled
            finish = asyncio.ensure_future(self._finish(run))
            async for ev in self._alive(finish, run.progress):
                yield ev
            stats, run.sender = finish.result(), None
            drain_s = time.monotonic() - t0 - prefill_s
            self.bytes_sent += stats.bytes
            m.kv_bytes.labels(link=job.decode_address).inc(stats.bytes)
            m.kv_transfer_seconds.labels(link=job.decode_address).observe(stats.seconds)
            log.info("prefill_done", prompt_tokens=len(job.prompt), cached_tokens=plan.hit,
                     prefill_s=round(prefill_s, 4), kv_bytes=stats.bytes, transfer_s=round(stats.seconds, 4),
                     drain_s=round(drain_s, 4), chunks=stats.chunks)
            yield Done(run.first, stats.bytes, prefill_s, stats.seconds, stats.chunks, sampled.logprob, drain_s)
        finally:
            self.running -= running
            # in a task of its own: a second cancellation must not skip the lock's release
            await asyncio.shield(asyncio.ensure_future(self._release(run, hold)))

    def _validate(self, job: PrefillJob) -> None:
        if self.draining:
            raise Draining(f"prefill node {self.node_id} is draining")
        self.executor.validate(job.prompt, job.params)
        if not 0 <= job.num_connections <= MAX_KV_CONNECTIONS:
            raise InvalidRequest(f"num_connections must be in [0, {MAX_KV_CONNECTIONS}], got {job.num_connections}")
        if not 0 <= job.skip_tokens < len(job.prompt) or job.skip_tokens % self.executor.layout.block_size:
            raise InvalidRequest(f"skip_tokens {job.skip_tokens} must be a block boundary before the prompt's end")
        forced, vocab = job.forced_first_token, self.executor.config.vocab_size
        if forced is not None and not 0 <= forced < vocab:
            raise InvalidRequest(f"forced_first_token {forced} is outside the vocabulary [0, {vocab})")

    def _sampled(self, run: _Run, forced: int | None) -> Sampled:
        """The first token, before the KV drains; a forced one (a retry whose client already has
        its first token) replaces the sample, and its finish is judged anew."""
        seq = run.seq
        if forced is not None:
            seq.output.pop()
            seq.finish_reason = None
            self.executor.append_token(seq, forced)
            run.first = forced
        logprob = seq.logprobs[0] if seq.logprobs and forced is None else None
        return Sampled(run.first, seq.finish_reason, logprob)

    async def _finish(self, run: _Run) -> PushStats:
        """Pushes the layers held back until the sample (a short prompt's), then ends the transfer."""
        assert run.sender is not None and run.first is not None
        held, run.held = run.held, []
        for layer_kv in held:
            await run.sender.push_layer(layer_kv)
        return await run.sender.finish(run.first)

    async def _release(self, run: _Run | None, hold: Hold) -> None:
        try:
            if run is not None:
                await run.close(self.executor)
        finally:
            hold.release()

    def _send_window(self, run: _Run, end: int) -> tuple[int, int]:
        """The paged KV a part ending at `end` pushes: from what is not sent yet (the decode side
        holds `[0, skip_tokens)`, so a cached prefix beyond that travels too) to the last point of
        the transfer's chunk grid (counted from skip_tokens) the part reached, or to the prompt's
        end; the tail waits for the next part. Empty when the part ends before the next point."""
        if end == len(run.seq.prompt):
            return run.sent, end
        return run.sent, max(run.sent, run.sent + (end - run.sent) // self.send_grid * self.send_grid)

    async def _run_part(self, run: _Run, segment: Segment) -> AsyncGenerator[Progress, None]:
        """Computes one part layer by layer in one worker thread, which hands each layer to the event
        loop as it finishes and goes on with the next while the loop pushes it (at most `LOOKAHEAD`
        layers ahead of the push); sets `run.first` when the part ends the prompt."""
        assert run.sender is not None
        a, b = self._send_window(run, segment.end)
        steps = self.executor.prefill_layerwise(run.seq, segment.end, read=b > a, read_start=a, read_end=b,
                                                snapshots=run.snaps)
        handoff = run.handoff = Handoff(asyncio.get_running_loop(), whole=run.hold_back)
        run.step = asyncio.ensure_future(asyncio.to_thread(handoff.produce, steps))
        layers = 0
        try:
            while True:
                if handoff.ready.empty():
                    get = asyncio.ensure_future(handoff.ready.get())
                    async for ev in self._alive(get, run.progress):
                        yield ev
                    got = get.result()
                else:  # already there (a whole part's layers come at once): no wait to set up
                    got = handoff.ready.get_nowait()
                item = handoff.take(got)
                if item is END:
                    break
                if isinstance(item, int):
                    run.first = item
                else:
                    if run.pace is not None:  # every layer computed takes its emulated time, pushed or not
                        await run.pace.step()
                    if item is not None and run.hold_back:
                        run.held.append(item)
                    elif item is not None:
                        await run.sender.push_layer(item)
                    layers += 1
                    run.layers_done = layers
                    if time.monotonic() - run.reported >= PROGRESS_EVERY_S:  # a message per layer would
                        run.reported = time.monotonic()  # cost the compute more than it tells the router
                        yield run.progress()
        finally:
            handoff.stop()  # a part left early: the thread ends after its current layer (close() waits;
            # a request closed mid-part may reach close() first: it stops the thread too)
        await run.step  # the thread is done with the blocks
        run.step = run.handoff = None
        run.sent = b
        self.tokens_computed += segment.end - segment.start
        metrics.current().prompt_computed.inc(segment.end - segment.start)
        run.tokens_done, run.layers_done = segment.end, 0
        if segment.end < len(run.seq.prompt):  # a part done (the last one's news is the sample)
            run.reported = time.monotonic()
            yield run.progress()

    async def _alive(
        self, waiting: asyncio.Future[object], event: Callable[[], Progress], cancel: bool = True
    ) -> AsyncGenerator[Progress, None]:
        """`event()` every `alive_interval_s` until `waiting` is done. Closed early, it cancels
        `waiting` (or, with `cancel=False`, a compute step that must finish, leaves it to the run)."""
        try:
            while not waiting.done():
                done, _ = await asyncio.wait({waiting}, timeout=self.alive_interval_s)
                if not done:
                    yield event()
            waiting.result()  # raises what it raised
        finally:
            if cancel and not waiting.done():
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)

    # --- prefix reuse ---------------------------------------------------------------------------
    def _reserve(self, job: PrefillJob) -> SeqState:
        """Reserves the request; a full pool first gives back least recently used cache entries."""
        try:
            return self.executor.add(job.request_id, job.prompt, job.params)
        except OutOfCapacity:
            if self.prefix_cache is None:
                raise
            need = self.executor.layout.blocks_for(len(job.prompt))
            self.on_cache_events(self.prefix_cache.evict(need, 1))
            return self.executor.add(job.request_id, job.prompt, job.params)

    def _plan(self, seq: SeqState) -> tuple[PrefillPlan, list[int]]:
        """Attaches the longest usable cached prefix and plans the rest; returns the plan and the
        prompt's block hashes (for the checkpoints)."""
        n, hit = len(seq.prompt), 0
        if self.prefix_cache is None:
            return self.planner.plan(n), []
        metrics.current().prefix_queries.inc(n)
        hashes = block_hashes(seq.prompt, self.executor.layout.block_size)
        ids, slot = self.prefix_cache.lookup(hashes, self.planner.max_hit_blocks(n))
        if ids and slot is not None:
            self.executor.attach_prefix(seq, ids, slot)
            hit = len(ids) * self.executor.layout.block_size
            self.cached_tokens += hit
            metrics.current().prefix_hits.labels(route=self.cluster).inc(hit)
        return self.planner.plan(n, hit), hashes

    def _checkpoint_slots(self, positions: tuple[int, ...]) -> list[tuple[int, int]]:
        """A free state slot for each checkpoint of the next part, where one can be had (the cache
        gives back its least recently used entry first): (position, slot) pairs."""
        out: list[tuple[int, int]] = []
        for pos in positions:
            assert self.prefix_cache is not None  # the planner puts checkpoints only where there is one
            try:
                slot = self.executor.slots.allocate()
            except OutOfCapacity:
                self.on_cache_events(self.prefix_cache.evict(0, 1))
                try:
                    slot = self.executor.slots.allocate()
                except OutOfCapacity:
                    continue  # no slot to spare: this prefix is not cached
            out.append((pos, slot))
        return out

    def _checkpoint(self, run: _Run, hashes: list[int]) -> None:
        """Caches the part's checkpoints: the blocks before each and its state snapshot."""
        snaps, run.snaps = run.snaps, []
        for pos, slot in snaps:
            assert self.prefix_cache is not None  # slots were allocated for it
            n = pos // self.executor.layout.block_size
            self.on_cache_events(self.prefix_cache.insert(hashes[:n], run.seq.block_table[:n], slot))

    def stats(self) -> dict[str, int]:
        return {"queue_depth": self.queue_depth, "running": self.running}


class _Run:
    """One request on the node: its sequence, its sender, the compute step in flight (a worker
    thread that must finish before the blocks are freed) and how far it got."""

    def __init__(self, seq: SeqState) -> None:
        self.seq = seq
        self.sender: KvPush | None = None
        self.step: asyncio.Future[None] | None = None  # the part's worker thread (see Handoff)
        self.handoff: Handoff | None = None
        self.first: int | None = None
        self.pace: PrefillPace | None = None
        self.tokens_done = self.layers_done = 0
        self.sent = 0  # paged KV pushed up to here (from the decode side's skip_tokens)
        self.hold_back = False  # push the layers after the sample (a short prompt), kept in `held` until then
        self.held: list[LayerKv] = []
        self.reported = time.monotonic()  # when the last per-layer Progress went out
        self.snaps: list[tuple[int, int]] = []  # the running part's checkpoints: (position, slot), not yet cached

    def progress(self) -> Progress:
        return Progress(self.tokens_done, self.layers_done)

    async def close(self, executor: Executor) -> None:
        if self.handoff is not None:  # the thread stops after its current layer (it may be waiting for room)
            self.handoff.stop()
        if self.step is not None:  # shielded from cancellation: the thread still uses the blocks
            await asyncio.shield(asyncio.gather(self.step, return_exceptions=True))
        if self.sender is not None:
            await asyncio.shield(self.sender.abort())
        for _, slot in self.snaps:  # a part left early: its checkpoints were never cached
            executor.slots.free(slot)
        self.snaps = []
        executor.free(self.seq)
