"""Profiles measured from this machine's own nodes: a worker's executor (the same model, dtype and
one thread, as the eval runs its nodes) timed on prefills of several lengths and decode steps of
several batch sizes; the best of `reps` each. The result is an `EmulatedProfile` (lengths in real
tokens, scales 1) that `--profiles FILE` puts on every eval node in place of the case study's, and
that `--emulate FILE` puts on any single node."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence

from prfaas.eval.emulate import EmulatedProfile
from prfaas.scheduling.profiles import Profile


def measure_profile(model: str, lengths: Sequence[int] = (16, 64, 256, 1024, 2048), batches: Sequence[int] = (1, 5, 20),
                    reps: int = 2, log: Callable[[str], None] = print) -> EmulatedProfile:
    import torch

    from prfaas.engine.llm import build_executor
    from prfaas.messages import SamplingParams

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ex, _ = build_executor(model, num_blocks=4096, num_slots=max(batches) + 2)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    vocab = ex.layout.config.vocab_size

    def prompt(n: int, salt: int) -> list[int]:
        return [(7 * i + salt) % (vocab - 3) + 3 for i in range(n)]

    prefill = []
    for n in lengths:
        best = float("inf")
        for r in range(reps + 1):  # the first is a warm-up
            seq = ex.add(f"p{n}-{r}", prompt(n, r), params)
            t0 = time.perf_counter()
            ex.prefill(seq)
            if r:
                best = min(best, time.perf_counter() - t0)
            ex.free(seq)
        prefill.append(best)
        log(f"[measure] prefill {n} tokens: {best * 1000:.1f} ms")
    decode = []
    seqs = []
    for i in range(max(batches)):
        seq = ex.add(f"d{i}", prompt(128, i), params)
        ex.prefill(seq)
        seqs.append(seq)
    for b in batches:
        best = float("inf")
        for r in range(reps + 1):
            ready = ex.prepare_decode(seqs[:b])
            t0 = time.perf_counter()
            ex.run_decode(ready)
            if r:
                best = min(best, time.perf_counter() - t0)
        decode.append(best)
        log(f"[measure] decode step, batch {b}: {best * 1000:.1f} ms")
    for seq in seqs:
        ex.free(seq)
    return EmulatedProfile(f"cpu (measured on {platform.node()})", Profile.from_points(lengths, _monotone(prefill)),
                           Profile.from_points(batches, _monotone(decode)))


def _monotone(values: list[float]) -> list[float]:
    """Noise on a loaded machine can time a longer prompt (or a bigger batch) faster than a shorter
    one; a profile must not fall (its linear extension would reach zero), so each point is at least
    the one before it."""
    out: list[float] = []
    for v in values:
        out.append(max(v, out[-1]) if out else v)
    return out
