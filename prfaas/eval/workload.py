"""Eval workloads: what each request sends, when, and its profile-token length (for the planner and
the simulator, which see the case-study lengths while the real nodes see scaled ones).

- `lognormal`: Poisson arrivals (piecewise: a burst or a length-mix shift is one more segment), the
  paper's truncated log-normal lengths scaled by `length_scale`, outputs fixed (the paper's 1024
  scaled by `output_scale`) or spread uniformly by +-`output_spread` around it.
- `mooncake`: the Mooncake conversation trace, lengths and outputs divided by the length scale,
  times stretched (`prfaas.sim.trace`): its prompts share prefixes as the trace says.
Prompts are token ids drawn from the vocabulary minus special ids, seeded per request.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prfaas.eval.scale import Scaling
from prfaas.sim.trace import Scaling as TraceScaling
from prfaas.sim.trace import TokenSpace, Trace
from prfaas.sim.workload import Arrival, Segment, generate


@dataclass(frozen=True)
class EvalRequest:
    request_id: str
    t: float  # seconds from the run's start
    prompt: list[int]
    max_tokens: int
    profile_tokens: int  # the length the planner and the simulator see

    def to_json(self) -> dict:
        return {"id": self.request_id, "t": self.t, "prompt": self.prompt, "max_tokens": self.max_tokens,
                "profile_tokens": self.profile_tokens}


def lognormal(segments: Sequence[Segment], sc: Scaling, tokens: TokenSpace, seed: int, output_tokens: int = 1024,
              output_spread: float = 0.0) -> list[EvalRequest]:
    """Requests for `segments` (real seconds, real rates, profile-token lengths)."""
    if not 0 <= output_spread < 1:
        raise ValueError(f"output_spread must be in [0, 1), got {output_spread}")
    rng = random.Random(seed ^ 0x5EED)
    allowed = [i for i in range(tokens.vocab_size) if i not in tokens.exclude]
    out = []
    for a in generate(segments, seed):
        n = sc.real_tokens(a.prompt_tokens)
        spread = 1 + output_spread * (2 * rng.random() - 1) if output_spread else 1.0
        out.append(EvalRequest(a.request_id, a.time, [rng.choice(allowed) for _ in range(n)],
                               sc.real_output(round(output_tokens * spread)), round(n * sc.length_scale)))
    return out


def mooncake(path: str | Path, sc: Scaling, tokens: TokenSpace, first: int, stretch: float = 1.0,
             max_real_tokens: int = 2048) -> list[EvalRequest]:
    """The first `first` requests of the trace; prompts longer than `max_real_tokens` after scaling
    are cut there (the emulated profiles end at 128K profile tokens)."""
    ls = int(sc.length_scale)
    if ls != sc.length_scale:
        raise ValueError("the trace needs a whole length scale (a divisor of 512)")
    trace = Trace.load(path, TraceScaling(ls, stretch), first=first)
    out = []
    for i, r in enumerate(trace.replay(tokens)):
        prompt = r.token_ids[:max_real_tokens]
        out.append(EvalRequest(f"m{i}", r.arrival_s, prompt, max(2, r.output_length), len(prompt) * ls))
    return out


def arrivals(requests: Sequence[EvalRequest]) -> list[Arrival]:
    """The same requests as the simulator's arrivals (profile-token lengths, real outputs)."""
    return [Arrival(r.request_id, r.t, r.profile_tokens, None, r.max_tokens) for r in requests]
