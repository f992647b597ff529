"""The executor: owns the model, the paged KV pool and the state slots, and runs
layer-wise prefill, batched decode, and export / import of a request's KV and state.

The pool comes from the KV layout (`layout.allocate`); the executor names tensors by their
`TensorSpec`s and never asks which layer is linear and which is full attention.

Threading rule: allocation (add / reserve / prepare_decode / free) happens on one thread (the
service's event loop); the heavy compute (prefill_layerwise, run_decode) may run on a worker
thread, since it only touches the blocks and slots of the sequences it was handed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from prfaas.engine.sampling import make_generator, sample, token_logprob
from prfaas.errors import InvalidRequest, ModelFault, OutOfCapacity
from prfaas.kv.allocator import BlockAllocator, SlotAllocator
from prfaas.kv.kinds import KvKind
from prfaas.kv.layout import KvLayout
from prfaas.kv.pool import LayerKv
from prfaas.messages import SamplingParams, TokenLogprob
from prfaas.model.base import ForwardMeta
from prfaas.model.fast_decode import FastDecoder, Unsupported
from prfaas.model.fast_decode import available as fast_decode_available
from prfaas.model.hybrid import HybridForCausalLM
from prfaas.model.ops.attention import AttentionBackend, TorchAttention
from prfaas.obs.log import get_logger

__all__ = ["Executor", "SeqState", "LayerKv", "ExportedKv"]
log = get_logger(__name__)


@dataclass
class SeqState:
    """One request inside the executor: its prompt, blocks, state slot and output so far."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    block_table: list[int]
    slot: int
    num_cached: int = 0  # tokens whose KV is in the pool
    promised: int = 0  # blocks promised for the rest of its generation, not allocated yet
    error: str = ""  # why it finished with "error"
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per output token computed here, when asked

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ExportedKv:
    """A request's whole KV and state as plain tensors, enough for another executor to go on."""

    prompt: list[int]
    output: list[int]
    layers: list[LayerKv]


class Executor:
    def __init__(
        self,
        model: HybridForCausalLM,
        layout: KvLayout,
        num_blocks: int,
        num_slots: int,
        attn: AttentionBackend | None = None,
        device: str | torch.device = "cpu",
        fast_decode: bool | None = None,
    ) -> None:
        if layout.config != model.config:
            raise ValueError("the layout was built for another model config")
        self.model, self.layout, self.device = model, layout, torch.device(device)
        self.config = model.config
        self.attn = attn or TorchAttention()
        self.blocks = BlockAllocator(num_blocks)
        self.slots = SlotAllocator(num_slots)
        self.pool = layout.allocate(num_blocks, num_slots, self.device)
        self.caches = self.pool.layer_caches
        self.stop_ids = frozenset(self.config.eos_token_ids)
        # the fused C decode step (prfaas/model/fast_decode): on unless turned off here or by
        # PRFAAS_FAST_DECODE=0 (read here only). Its library is compiled (once per machine) and
        # loaded here, so that no request waits for the compiler; its plan (the packed weights) is
        # built on the first decode step, so that an executor that never decodes holds no copy.
        # Where the model, pool or machine is one it does not cover (no C compiler, another
        # device or dtype), the torch step runs, the reason logged once.
        if fast_decode is None:
            fast_decode = os.environ.get("PRFAAS_FAST_DECODE", "1") != "0"
        self.fast_decode = fast_decode and isinstance(self.attn, TorchAttention) and self.device.type == "cpu"
        if self.fast_decode and not fast_decode_available():
            log.info("fast_decode_off", reason="the C decode step did not build (no C compiler, or kernels off)")
            self.fast_decode = False
        self._fast: FastDecoder | None = None

    # --- admission ----------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        return min(self.config.max_position_embeddings, self.blocks.num_blocks * self.layout.block_size)

    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        params.validate()
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        vocab = self.config.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {vocab})")
        if len(prompt) + 1 > self.max_context:
            raise InvalidRequest(
                f"the prompt has {len(prompt)} tokens; this model serves at most {self.max_context - 1}"
            )
        bad = next((t for t in params.stop_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"stop token id {bad} is outside the vocabulary [0, {vocab})")

    def blocks_needed(self, prompt_tokens: int, max_tokens: int) -> int:
        """Blocks a request holds at most: its prompt and every token it may generate."""
        return self.layout.blocks_for(min(prompt_tokens + max_tokens, self.max_context))

    def add(self, request_id: str, prompt: list[int], params: SamplingParams, whole: bool = False) -> SeqState:
        """Validates and reserves blocks for the prompt and a state slot (zeroed). With `whole`,
        the blocks the whole generation may need are promised as well (decode nodes), so that
        the request never runs out of blocks mid-generation."""
        self.validate(prompt, params)
        need = self.layout.blocks_for(len(prompt))
        total = self.blocks_needed(len(prompt), params.max_tokens) if whole else need
        if not self.blocks.can_allocate(total) or self.slots.num_free == 0:
            raise OutOfCapacity(
                f"request {request_id} needs {total} blocks and a state slot; "
                f"{self.blocks.num_free} blocks and {self.slots.num_free} slots free"
            )
        block_table = self.blocks.allocate(need)
        self.blocks.promise(total - need)
        slot = self.slots.allocate()
        self.pool.zero_states(slot)
        return SeqState(request_id, list(prompt), params, block_table, slot, promised=total - need,
                        generator=make_generator(params))

    def free(self, seq: SeqState) -> None:
        """Returns the sequence's blocks, promise and slot. Safe to call once per sequence."""
        if seq.slot < 0:
            return
        self.blocks.free(seq.block_table)
        self.blocks.release_promise(seq.promised)
        self.slots.free(seq.slot)
        seq.block_table, seq.slot, seq.promised = [], -1, 0

    # --- prefill ------------------------------------------------------------------------------
    def _meta(self, seqs: list[SeqState], query_lens: list[int], positions: list[int]) -> ForwardMeta:
        bs = self.layout.block_size
        tables = [torch.tensor(s.block_table, dtype=torch.long) for s in seqs]
        pos = torch.tensor(positions, dtype=torch.long)
        decode = all(n == 1 for n in query_lens)
        if decode:  # one token per sequence: its slot straight from the block table
            slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions, strict=True)]
            slot_mapping = torch.tensor(slots, dtype=torch.long)
        elif len(seqs) == 1:
            slot_mapping = tables[0][pos // bs] * bs + pos % bs
        else:  # (B, max_blocks) padded; each token looks up its own sequence's row
            owner = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(query_lens))
            width = max(len(t) for t in tables)
            padded = torch.stack([torch.nn.functional.pad(t, (0, width - len(t))) for t in tables])
            slot_mapping = padded[owner, pos // bs] * bs + pos % bs
        meta = ForwardMeta(
            positions=pos.to(self.device),
            query_lens=query_lens,
            context_lens=[s.num_cached + n for s, n in zip(seqs, query_lens, strict=True)],
            block_tables=[t.to(self.device) for t in tables],
            slot_mapping=slot_mapping.to(self.device),
            state_slots=[s.slot for s in seqs],
            attn=self.attn,
        )
        if decode:  # paged decode's padded tables, built here from the lists in one go (the property's
            # tensor form, for other callers, would cat and stack one row per sequence)
            width = max(len(s.block_table) for s in seqs)
            rows = [s.block_table + s.block_table[:1] * (width - len(s.block_table)) for s in seqs]
            meta.__dict__["padded_block_tables"] = torch.tensor(rows, dtype=torch.long, device=self.device)
        return meta

    @torch.inference_mode()
    def prefill_layerwise(
        self, seq: SeqState, end: int | None = None, read: bool = True, read_start: int | None = None,
        read_end: int | None = None, snapshots: Sequence[tuple[int, int]] = (),
    ) -> Iterator[LayerKv | int | None]:
        """Runs the next part of the prompt, [num_cached, end) (default: to the prompt's end),
        through layer 0, then layer 1, ...; after each layer yields that layer's LayerKv for the
        part. When the part reaches the end of the prompt, finally yields the first sampled token
        (an int). Chunked prefill is this called once per part. With `read=False` nothing is
        copied out of the pool: each layer yields None. `read_start` / `read_end` make the yielded
        paged KV another range of what the pool holds once the part is computed (a cached prefix
        that the receiver lacks, or a tail held back for the next part). `snapshots`: (position,
        slot) pairs in (start, end], in order: the linear states after that many prompt tokens are
        copied into the slot during the same pass (prefix-cache checkpoints)."""
        start, n = seq.num_cached, len(seq.prompt)
        end = n if end is None else min(end, n)
        if start >= end:
            raise InvalidRequest(f"request {seq.request_id}: nothing to prefill")
        points = [p for p, _ in snapshots]
        if points != sorted(points) or any(not start < p <= end for p in points):
            raise ValueError(f"snapshot positions {points} must be ordered, in ({start}, {end}]")
        ids = torch.tensor(seq.prompt[start:end], dtype=torch.long, device=self.device)
        meta = self._meta([seq], [end - start], list(range(start, end)))
        meta.snapshots = [tuple((p - start, slot) for p, slot in snapshots)]
        x = self.model.embed(ids)
        for i in range(self.model.num_layers):
            x = self.model.layer(i, x, meta, self.caches[i])
            a = start if read_start is None else read_start
            yield self.read_layer(seq, i, a, end if read_end is None else read_end) if read else None
        seq.num_cached = end
        if end < n:
            return
        logits = self.model.logits(x[-1:])[0]
        if not bool(torch.isfinite(logits).all()):
            raise ModelFault(f"request {seq.request_id}: non-finite logits at the end of the prompt")
        token = sample(logits, seq.params, seq.generator)
        self._record_logprob(seq, logits, token)
        self.append_token(seq, token)
        yield token

    def prefill(self, seq: SeqState, chunk_tokens: int | None = None) -> int:
        """Prefills the rest of the prompt (in parts of `chunk_tokens` if given); returns the
        first token."""
        while True:
            end = seq.num_cached + chunk_tokens if chunk_tokens else None
            *_, last = self.prefill_layerwise(seq, end, read=False)
            if isinstance(last, int):
                return last

    # --- prefix reuse -----------------------------------------------------------------------------
    def attach_prefix(self, seq: SeqState, block_ids: list[int], state_slot: int | None) -> None:
        """Starts `seq` after a cached prefix: its first blocks become the cached ones (shared,
        one more reference each), its states a copy of the checkpoint at the prefix's end (none
        with `state_slot=None`: a decode node, whose states arrive with the rest of the KV)."""
        n = len(block_ids)
        if n * self.layout.block_size >= len(seq.prompt):
            raise ValueError("a cached prefix must leave at least one token to compute")
        self.blocks.incref(block_ids)
        self.blocks.free(seq.block_table[:n])
        seq.block_table[:n] = block_ids
        if state_slot is not None:
            self.pool.copy_states(state_slot, seq.slot)
        seq.num_cached = n * self.layout.block_size

    def checkpoint_state(self, seq: SeqState) -> int:
        """A new slot holding a copy of `seq`'s states as they are now (raises OutOfCapacity)."""
        slot = self.slots.allocate()
        self.pool.copy_states(seq.slot, slot)
        return slot

    # --- reading and writing one layer's KV ------------------------------------------------------
    def read_layer(self, seq: SeqState, layer: int, token_start: int, token_end: int) -> LayerKv:
        """Copies of the layer's tensors: paged tokens [token_start, token_end), and the states."""
        tensors = {
            s.kind: self.pool.read(s, seq.block_table, seq.slot, token_start, token_end)
            for s in self.layout.layer_specs(layer)
        }
        return LayerKv(layer, token_start, token_end, tensors)

    def write_kv(
        self, seq: SeqState, layer: int, kind: KvKind, token_start: int, token_end: int, t: torch.Tensor
    ) -> None:
        """Writes one tensor of one layer: tokens [token_start, token_end) of a paged tensor, or
        the whole state (the range is then ignored)."""
        try:
            spec = self.layout.spec(layer, kind)
            self.pool.write(spec, seq.block_table, seq.slot, token_start, token_end, t)
        except (KeyError, IndexError) as e:
            raise InvalidRequest(f"request {seq.request_id}: {e.args[0]}") from None

    # --- export / import ------------------------------------------------------------------------
    def export(self, seq: SeqState) -> ExportedKv:
        n = seq.num_cached
        layers = [self.read_layer(seq, i, 0, n) for i in range(self.model.num_layers)]
        return ExportedKv(list(seq.prompt), list(seq.output), layers)

    def reserve(self, request_id: str, prompt: list[int], params: SamplingParams) -> SeqState:
        """Decode side: blocks and a slot for a request whose KV will arrive from elsewhere, and
        the blocks of its whole generation promised."""
        return self.add(request_id, prompt, params, whole=True)

    def complete_import(self, seq: SeqState, first_token: int) -> None:
        """The KV of the whole prompt is in place: the sequence continues from `first_token`."""
        seq.num_cached = len(seq.prompt)
        self.append_token(seq, first_token)

    def import_kv(self, request_id: str, exported: ExportedKv, params: SamplingParams) -> SeqState:
        seq = self.reserve(request_id, exported.prompt, params)
        try:
            for lk in exported.layers:
                for kind, t in lk.tensors.items():
                    self.write_kv(seq, lk.layer, kind, lk.token_start, lk.token_end, t)
            if len(exported.output) != 1:
                raise InvalidRequest("import expects the KV right after prefill (one output token)")
            self.complete_import(seq, exported.output[0])
        except Exception:
            self.free(seq)
            raise
        return seq

    # --- decode ---------------------------------------------------------------------------------
    def append_token(self, seq: SeqState, token: int) -> None:
        seq.output.append(token)
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.stop_ids):
            seq.finish_reason = "stop"
        elif len(seq.output) >= p.max_tokens or seq.num_tokens >= self.max_context:
            seq.finish_reason = "length"

    def prepare_decode(self, seqs: list[SeqState]) -> list[SeqState]:
        """Makes room for one more token in each sequence. SeqStates that cannot get a block are
        finished with reason "length" (the pool is full) and left out of the step."""
        ready = []
        for seq in seqs:
            if seq.finished:
                continue
            pos = seq.num_tokens - 1  # the position of the token this step feeds
            if pos // self.layout.block_size >= len(seq.block_table):
                if seq.promised:
                    seq.block_table += self.blocks.allocate(1, promised=True)
                    seq.promised -= 1
                elif not self.blocks.can_allocate(1):
                    seq.finish_reason = "length"
                    continue
                else:
                    seq.block_table += self.blocks.allocate(1)
            ready.append(seq)
        return ready

    @torch.inference_mode()
    def decode_logits(self, batch: list[SeqState]) -> tuple[torch.Tensor, list[int]]:
        """The logits (B, vocab) float32 of one decode step over prepared sequences, and each row's
        greedy token; writes the step's KV and states, changes nothing else. The fused C step where
        it runs (see the constructor), else the torch layers."""
        positions = [s.num_tokens - 1 for s in batch]
        fast = self._fast_decoder()
        if fast is not None:
            tables = [s.block_table for s in batch]
            return fast.step([s.output[-1] for s in batch], positions, [s.slot for s in batch], tables)
        ids = torch.tensor([s.output[-1] for s in batch], dtype=torch.long, device=self.device)
        meta = self._meta(batch, [1] * len(batch), positions)
        logits = self.model(ids, meta, self.caches)  # (B, vocab)
        return logits, logits.argmax(dim=-1).tolist()  # one call for every greedy sequence

    @torch.inference_mode()
    def run_decode(self, seqs: list[SeqState]) -> list[int]:
        """One decode step for every sequence (all prepared); returns the sampled tokens and
        appends them to the sequences. A sequence whose logits are not finite (its KV or state is
        corrupt) ends alone with reason "error" and no token (-1); the others are unaffected,
        since every row of the step is computed independently."""
        if not seqs:
            return []
        # in slot order: packed slots then form one run, which linear layers update in place
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].slot)
        batch = [seqs[i] for i in order]
        logits, greedy = self.decode_logits(batch)
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        tokens = [-1] * len(seqs)
        for i, seq, row, best, ok in zip(order, batch, logits, greedy, finite, strict=True):
            seq.num_cached += 1
            if not ok:
                self._fail(seq, f"non-finite logits at position {seq.num_tokens - 1}")
                continue
            tok = best if seq.params.greedy else sample(row, seq.params, seq.generator)
            self._record_logprob(seq, row, tok)
            self.append_token(seq, tok)
            tokens[i] = tok
        return tokens

    def _fast_decoder(self) -> FastDecoder | None:
        if self.fast_decode and self._fast is None:
            try:
                self._fast = FastDecoder(self.model, self.caches, self.layout.block_size)
                log.info("fast_decode_on", layers=self.config.num_layers, dtype=str(self._fast.plan.dtype))
            except Unsupported as e:
                log.info("fast_decode_off", reason=str(e))
                self.fast_decode = False
        return self._fast

    @staticmethod
    def _fail(seq: SeqState, why: str) -> None:
        seq.finish_reason, seq.error = "error", f"request {seq.request_id}: {why} (its KV or state is corrupt)"

    @staticmethod
    def _record_logprob(seq: SeqState, logits: torch.Tensor, token: int) -> None:
        if seq.params.logprobs is not None:
            seq.logprobs.append(token_logprob(logits, token, seq.params.logprobs))

    def decode_step(self, seqs: list[SeqState]) -> list[int]:
        return self.run_decode(self.prepare_decode(seqs))
