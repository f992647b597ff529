"""Arrivals: piecewise-Poisson segments, each with its own rate and length distribution.

A burst is one more segment laid over the base load. With `prefix_reuse > 0`, that fraction of
requests continue an earlier conversation: the new prompt is the earlier prompt plus a fresh
length, so the node that prefilled the earlier prompt holds a prefix of it.
Everything comes from one seeded `random.Random`, so a workload is reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from prfaas.scheduling.lengths import TruncatedLogNormal


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    rate: float                     # requests per second
    lengths: TruncatedLogNormal


@dataclass(frozen=True)
class Arrival:
    request_id: str
    time: float
    prompt_tokens: int
    parent: str | None = None       # the earlier request whose prompt this one extends
    output_tokens: int = 0          # 0: the system profile's L_out
    blocks: tuple[int, ...] = ()    # chained keys of the prompt's full blocks (traces; see sim/prefix.py)


def generate(segments: Sequence[Segment], seed: int, prefix_reuse: float = 0.0,
             max_prompt: int = 131072) -> list[Arrival]:
    rng = random.Random(seed)
    raw: list[tuple[float, int]] = []
    for seg in segments:
        t = seg.start
        while True:
            t += rng.expovariate(seg.rate)
            if t >= seg.end:
                break
            raw.append((t, seg.lengths.sample(rng)))
    raw.sort()
    out: list[Arrival] = []
    for i, (t, length) in enumerate(raw):
        parent = None
        if out and prefix_reuse > 0 and rng.random() < prefix_reuse:
            prev = out[rng.randrange(max(0, len(out) - 50), len(out))]
            if prev.prompt_tokens + length <= max_prompt:
                parent, length = prev.request_id, prev.prompt_tokens + length
        out.append(Arrival(f"r{i}", t, length, parent))
    return out
