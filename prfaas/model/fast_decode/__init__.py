"""The fused decode step: every layer of one decode step in one call into our C code
(`ops/csrc/decode_step.c`), for batch 1 and continuous batches alike, float32 and bfloat16, both
families. The torch layers stay the reference (and the path for other dtypes and devices); the
tests compare the two step by step.

    dec = FastDecoder(model, pool.layer_caches, block_size)   # packs the weights once
    logits, greedy = dec.step(tokens, positions, state_slots, block_tables)

Per step the caller hands over plain lists; what changes only when the batch does (the padded
block tables) is kept between steps and rewritten row by row when a row changes (see `_Tables`).
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import torch

from prfaas.model.fast_decode import library
from prfaas.model.fast_decode.plan import Plan, Unsupported
from prfaas.model.hybrid import HybridForCausalLM

__all__ = ["FastDecoder", "Unsupported", "available"]


def available() -> bool:
    return library.load() is not None


class _Tables:
    """The batch's block tables, (B, width) int32, padded with each row's first block. A row is
    rewritten when its length or its last block differs from what it holds: during decode a
    sequence's table only grows, and no two live sequences share their last block (it takes
    their new tokens), so (length, last block) tells a row apart from any other."""

    def __init__(self, num_blocks: int | None) -> None:
        self.num_blocks = num_blocks
        self.rows = np.zeros((0, 0), dtype=np.int32)
        self.lens: list[int] = []

    def update(self, tables: list[list[int]]) -> np.ndarray:
        b, width = len(tables), max(len(t) for t in tables)
        if b != self.rows.shape[0] or width > self.rows.shape[1]:
            # the width doubles only when a table outgrows it (a new batch size alone keeps it: the
            # width used to double on every batch change, 2^30 columns after a few dozen changes)
            have = self.rows.shape[1]
            grown = np.zeros((b, have if width <= have else max(width, 2 * have, 8)), dtype=np.int32)
            self.rows, self.lens = grown, [0] * b
        rows, lens = self.rows, self.lens
        for i, t in enumerate(tables):
            n = len(t)
            if n != lens[i] or rows[i, n - 1] != t[-1]:
                if self.num_blocks is not None and not all(0 <= x < self.num_blocks for x in t):
                    raise ValueError(f"a block id is outside the pool's [0, {self.num_blocks})")
                rows[i, :n] = t
                rows[i, n:] = t[0]
                lens[i] = n
        return rows


class FastDecoder:
    """The fused step over one model and its KV pool (the pool's tensors must outlive it)."""

    def __init__(self, model: HybridForCausalLM, caches: list[Any], block_size: int, timing: bool = False) -> None:
        lib = library.load(timing)
        if lib is None:
            raise Unsupported("the C decode step is not available (no C compiler, or C kernels turned off)")
        self.lib = lib
        self.plan = Plan(model, caches, block_size)
        self.vocab, self.block_size = model.config.vocab_size, block_size
        self.num_slots = min((c.recurrent.shape[0] for c in caches if hasattr(c, "recurrent")), default=None)
        self._tables = _Tables(min((c.k.shape[0] for c in caches if hasattr(c, "k")), default=None))
        self._step = library.Step()

    def __del__(self) -> None:
        lib = getattr(self, "lib", None)
        if lib is not None and hasattr(self, "plan"):
            lib.prfaas_decode_free(ctypes.byref(self.plan.model))

    def step(
        self, tokens: list[int], positions: list[int], state_slots: list[int], block_tables: list[list[int]]
    ) -> tuple[torch.Tensor, list[int]]:
        """One token for each of B sequences: its input token, position (the token's index in
        the sequence; its KV goes into the block the table names), state slot and block table.
        Returns the logits (B, vocab) float32 and the greedy token of each sequence."""
        b = len(tokens)
        self._check(tokens, positions, state_slots, block_tables)
        meta = np.array([tokens, positions, state_slots], dtype=np.int64)
        rows = self._tables.update(block_tables)
        logits = torch.empty(b, self.vocab, dtype=torch.float32)
        greedy = np.empty(b, dtype=np.int64)
        s = self._step
        s.tokens = meta.ctypes.data
        s.positions = s.tokens + 8 * b
        s.state_slots = s.tokens + 16 * b
        s.block_tables, s.logits, s.argmax = rows.ctypes.data, logits.data_ptr(), greedy.ctypes.data
        s.B, s.max_blocks, s.max_ctx, s.nthreads = b, rows.shape[1], max(positions) + 1, torch.get_num_threads()
        if self.lib.prfaas_decode_step(ctypes.byref(self.plan.model), ctypes.byref(s)) != 0:
            raise MemoryError("the decode step could not allocate its workspace")
        return logits, greedy.tolist()

    def take_profile(self) -> dict[str, float]:
        """Seconds spent per part of the step since the last call (a `timing` decoder only)."""
        out = (ctypes.c_double * len(library.PARTS))()
        n = self.lib.prfaas_decode_profile(out)
        return dict(zip(library.PARTS, out[:n], strict=False))

    def _check(
        self, tokens: list[int], positions: list[int], state_slots: list[int], block_tables: list[list[int]]
    ) -> None:
        """What the C code indexes by, checked here (it trusts them)."""
        b = len(tokens)
        if not b or not len(positions) == len(state_slots) == len(block_tables) == b:
            raise ValueError(f"a step needs one token, position, slot and table per sequence, got {b} tokens")
        if min(tokens) < 0 or max(tokens) >= self.vocab:
            raise ValueError(f"a token id is outside the vocabulary [0, {self.vocab})")
        if self.num_slots is not None and (min(state_slots) < 0 or max(state_slots) >= self.num_slots):
            raise ValueError(f"a state slot is outside [0, {self.num_slots})")
        bs = self.block_size
        for p, t in zip(positions, block_tables, strict=True):
            if p < 0 or p // bs >= len(t):
                raise ValueError(f"position {p} is past the sequence's {len(t)} blocks of {bs}")
