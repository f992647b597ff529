"""The prefill plan of one prompt: which parts are computed in which order, and where the prefix
cache keeps a checkpoint. Plain Python, no torch: the prefill core follows the plan.

Checkpoints (a state copy plus the blocks before it) sit on multiples of `grid` tokens (the block
size and the KV chunk grid both divide it, so a reused prefix keeps the KV stream on its grid):
  - at the last grid boundary before the prompt's end: the whole earlier prompt, which the next
    turn of a conversation (previous prompt + answer + new message) extends;
  - at the end of the first chunk past the hit: a prompt that shares only a shorter prefix with
    this one (a system prompt) hits there.
A prompt is computed in parts of at most `chunk_tokens` (0: in one part), counted from the hit,
and a part also ends at each checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    start: int
    end: int
    checkpoint: bool = False  # keep a checkpoint of the prefix [0, end) once computed


@dataclass(frozen=True)
class PrefillPlan:
    hit: int                          # prompt tokens reused from the prefix cache
    segments: tuple[Segment, ...]     # computed parts in order, covering [hit, prompt_tokens)

    @property
    def checkpoints(self) -> tuple[int, ...]:
        return tuple(s.end for s in self.segments if s.checkpoint)


@dataclass(frozen=True)
class PrefillPlanner:
    block_size: int
    grid: int = 0          # 0: no prefix cache, no checkpoints
    chunk_tokens: int = 0  # 0: the whole rest of the prompt in one part

    def __post_init__(self) -> None:
        if self.grid and self.grid % self.block_size:
            raise ValueError(f"grid {self.grid} must be a multiple of the block size {self.block_size}")
        if self.grid and self.chunk_tokens % self.grid:
            raise ValueError(f"chunk_tokens {self.chunk_tokens} must be a multiple of the grid {self.grid}")

    def last_boundary(self, prompt_tokens: int) -> int:
        """The last grid boundary before the prompt's end (at least one token is computed)."""
        return (prompt_tokens - 1) // self.grid * self.grid if self.grid else 0

    def max_hit_blocks(self, prompt_tokens: int) -> int:
        """How many cached blocks a hit may use: up to the last boundary."""
        return self.last_boundary(prompt_tokens) // self.block_size

    def plan(self, prompt_tokens: int, hit: int = 0) -> PrefillPlan:
        if not 0 <= hit < prompt_tokens:
            raise ValueError(f"a hit of {hit} tokens must leave some of the {prompt_tokens} to compute")
        checkpoints: set[int] = set()
        if self.grid:
            last = self.last_boundary(prompt_tokens)
            if last > hit:
                checkpoints.add(last)
                if self.chunk_tokens and hit + self.chunk_tokens < last:
                    checkpoints.add(hit + self.chunk_tokens)
        segments, start = [], hit
        while start < prompt_tokens:
            end = min(prompt_tokens, start + self.chunk_tokens) if self.chunk_tokens else prompt_tokens
            end = min([end, *(c for c in checkpoints if c > start)])
            segments.append(Segment(start, end, end in checkpoints))
            start = end
        return PrefillPlan(hit, tuple(segments))
