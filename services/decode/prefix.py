"""A decode node's side of the prefix cache.

On admission, the longest usable prefix of the prompt that the node's cache holds is attached to
the request (its blocks shared and pinned by the request's references) and the prefill node is
told to skip it: only the KV of `[hit, P)` and the final states travel. While the request decodes,
a linear-state checkpoint is copied at the first block boundary at or after the end of its prompt
("end of prompt") and at the latest block boundary reached ("end of generated text", the one before
it freed); when the request finishes, its blocks up to that point and both checkpoints go into the
node's `PrefixCache` (LRU, the same accounting as on prefill nodes) and are published to the cache
pool under the node's id, so that the next turn of the conversation (previous prompt + answer +
new message) hits here.

Only full blocks are named (`prfaas.kv.prefix`); the last sampled token of a request has no KV, so
the cached text ends at the last block boundary of the tokens it fed. Runs on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prfaas.engine.executor import Executor, SeqState
from prfaas.errors import OutOfCapacity
from prfaas.kv.prefix import block_hashes
from prfaas.kv.prefix_cache import PrefixCache
from prfaas.kv.prefix_index import CacheEvent
from prfaas.messages import SamplingParams


@dataclass
class _Marks:
    first: tuple[int, int] | None = None   # (tokens, slot): the checkpoint at the end of the prompt
    latest: tuple[int, int] | None = None  # the latest one during generation


class DecodePrefix:
    def __init__(self, executor: Executor, cache: PrefixCache, publish: Callable[[list[CacheEvent]], None]) -> None:
        self.executor, self.cache, self.publish = executor, cache, publish
        self.bs = executor.layout.block_size
        self._marks: dict[int, _Marks] = {}  # id(seq) -> its checkpoints so far
        self.cached_tokens = 0  # prompt tokens found here (not transferred) so far

    def reserve(self, request_id: str, prompt: list[int], params: SamplingParams) -> SeqState:
        """`executor.reserve`, giving back least recently used cache entries when the pool is full."""
        try:
            return self.executor.reserve(request_id, prompt, params)
        except OutOfCapacity:
            need = self.executor.blocks_needed(len(prompt), params.max_tokens)
            self.publish(self.cache.evict(need, 1))
            return self.executor.reserve(request_id, prompt, params)

    def attach(self, seq: SeqState) -> int:
        """Attaches the cached prefix of the prompt, if any; returns its length in tokens (the
        transfer's skip_tokens). At least one prompt token is left for the prefill node."""
        n = len(seq.prompt)
        hashes = block_hashes(seq.prompt, self.bs)
        ids, slot = self.cache.lookup(hashes, (n - 1) // self.bs)
        if not ids or slot is None:
            return 0
        self.executor.attach_prefix(seq, ids, None)  # the states arrive with the transfer
        hit = len(ids) * self.bs
        self.cached_tokens += hit
        return hit

    def observe(self, seq: SeqState) -> None:
        """After the prompt arrived and after each decode step: a checkpoint when the KV the
        sequence holds ends on a block boundary at or after its prompt's end."""
        c = seq.num_cached
        if seq.slot < 0 or seq.finish_reason == "error" or c % self.bs or c < len(seq.prompt):
            return
        marks = self._marks.setdefault(id(seq), _Marks())
        if (marks.latest or marks.first or (-1, -1))[0] == c:
            return
        slot = self._checkpoint(seq)
        if slot is None:
            return
        if marks.first is None:
            marks.first = (c, slot)
            return
        if marks.latest is not None:
            self.executor.slots.free(marks.latest[1])
        marks.latest = (c, slot)

    def _checkpoint(self, seq: SeqState) -> int | None:
        try:
            return self.executor.checkpoint_state(seq)
        except OutOfCapacity:
            self.publish(self.cache.evict(0, 1))
        try:
            return self.executor.checkpoint_state(seq)
        except OutOfCapacity:
            return None  # no slot to spare: this point is not cached

    def finish(self, seq: SeqState) -> None:
        """The request is over (before its blocks are freed): a finished one's checkpoints go into
        the cache; a failed or cancelled one's are dropped."""
        marks = self._marks.pop(id(seq), None)
        if marks is None:
            return
        points = [m for m in (marks.first, marks.latest) if m is not None]
        if not points:  # no slot was free for a checkpoint: nothing to keep
            return
        if seq.finish_reason not in ("stop", "length") or seq.slot < 0:
            for _, slot in points:
                self.executor.slots.free(slot)
            return
        end = points[-1][0]
        hashes = block_hashes((seq.prompt + seq.output)[:end], self.bs)
        events: list[CacheEvent] = []
        for tokens, slot in points:
            k = tokens // self.bs
            events += self.cache.insert(hashes[:k], seq.block_table[:k], slot)
        self.publish(events)
