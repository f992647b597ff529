"""An in-process engine: one executor, continuous batching, for `prfaas generate`, tests and
benchmarks. The services use the executor directly, split across processes."""

from __future__ import annotations

import itertools
from collections import deque
from pathlib import Path

import torch

from prfaas.engine.backends import make_backend
from prfaas.engine.executor import Executor, SeqState
from prfaas.engine.tokenizer import Tokenizer, load_tokenizer
from prfaas.kv.layout import KvLayout
from prfaas.messages import SamplingParams
from prfaas.model.loader import load_model
from prfaas.model.presets import resolve_model


def build_executor(
    model: str | Path,
    dtype: torch.dtype = torch.float32,
    num_blocks: int = 1024,
    num_slots: int = 64,
    block_size: int = 16,
    device: str = "cpu",
    backend: str = "torch",
) -> tuple[Executor, Tokenizer]:
    path = resolve_model(str(model))
    m = load_model(path, dtype=dtype, device=device)
    layout = KvLayout(m.config, block_size=block_size, dtype=dtype)
    ex = Executor(m, layout, num_blocks=num_blocks, num_slots=num_slots, attn=make_backend(backend), device=device)
    return ex, load_tokenizer(path, m.config.vocab_size)


class LLM:
    def __init__(self, executor: Executor, tokenizer: Tokenizer | None = None, max_batch: int = 32) -> None:
        self.executor, self.tokenizer, self.max_batch = executor, tokenizer, max_batch
        self._ids = itertools.count()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Generates for every prompt with continuous batching: a request joins the decode batch
        as soon as it is prefilled and leaves it when it finishes. Returns the output ids."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        for p, sp in zip(prompts, plist, strict=True):
            self.executor.validate(p, sp)
        waiting = deque(zip(range(len(prompts)), prompts, plist, strict=True))
        running: list[tuple[int, SeqState]] = []
        results: dict[int, list[int]] = {}
        ex = self.executor
        while waiting or running:
            while waiting and len(running) < self.max_batch:
                idx, prompt, sp = waiting[0]
                need = ex.layout.blocks_for(len(prompt) + 1)
                if running and (not ex.blocks.can_allocate(need) or ex.slots.num_free == 0):
                    break
                waiting.popleft()
                seq = ex.add(f"req-{next(self._ids)}", prompt, sp)
                ex.prefill(seq)
                running.append((idx, seq))
            ex.decode_step([s for _, s in running if not s.finished])
            still = []
            for idx, seq in running:
                if seq.finished:
                    results[idx] = list(seq.output)
                    ex.free(seq)
                else:
                    still.append((idx, seq))
            running = still
        return [results[i] for i in range(len(prompts))]
