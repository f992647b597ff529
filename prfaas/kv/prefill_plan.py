"""The prefill plan of one prompt: which parts are computed in which order, and where the prefix
cache keeps a linear-state checkpoint. Plain Python, no torch: the prefill core follows the plan.

Checkpoints (a state copy plus the blocks before it) sit on block boundaries past the hit:
  - at every multiple of `grid` tokens (the checkpoint interval): a prompt sharing any
    grid-aligned prefix with this one (a system prompt, a shared document) hits there;
  - at the last block boundary before the prompt's end: the whole earlier prompt, which the next
    turn of a conversation (previous prompt + answer + new message) extends.
Each checkpoint costs one state slot (`KvLayout.state_bytes`); `max_checkpoints` bounds how many one
prompt makes: the tail one always, then the first interval ones past the hit (shared prefixes such
as system prompts are short; a conversation's next turn hits the tail). A prompt is computed in
parts of at most `chunk_tokens` (0: in one part), counted from the hit; a checkpoint inside a part
is taken during its pass (the linear layers snapshot their states there), not by ending the part.

How the KV of the parts travels is the prefill core's business (its send window keeps the KV
stream's pieces on the transfer's chunk grid, whatever the parts): checkpoints and chunks here need
not fall on that grid.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    start: int
    end: int
    # keep a checkpoint of the prefix [0, c) for each c here, in (start, end]: the linear layers
    # snapshot their states at c inside the part's one pass, so a checkpoint costs no extra pass
    checkpoints: tuple[int, ...] = ()


@dataclass(frozen=True)
class PrefillPlan:
    hit: int                          # prompt tokens reused from the prefix cache
    segments: tuple[Segment, ...]     # computed parts in order, covering [hit, prompt_tokens)

    @property
    def checkpoints(self) -> tuple[int, ...]:
        return tuple(c for s in self.segments for c in s.checkpoints)


@dataclass(frozen=True)
class PrefillPlanner:
    block_size: int
    grid: int = 0             # checkpoint interval in tokens (a multiple of the block size); 0: no prefix cache
    chunk_tokens: int = 0     # 0: the whole rest of the prompt in one part
    max_checkpoints: int = 8  # per prompt, the tail one included

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.grid < 0 or self.grid % self.block_size:
            raise ValueError(f"the checkpoint interval {self.grid} must be a multiple of the block size "
                             f"{self.block_size}")
        if self.chunk_tokens < 0:
            raise ValueError(f"chunk_tokens must be >= 0, got {self.chunk_tokens}")
        if self.grid and self.max_checkpoints < 1:
            raise ValueError(f"max_checkpoints must be >= 1, got {self.max_checkpoints}")

    def last_boundary(self, prompt_tokens: int) -> int:
        """The last block boundary before the prompt's end (at least one token is computed)."""
        return (prompt_tokens - 1) // self.block_size * self.block_size if self.grid else 0

    def max_hit_blocks(self, prompt_tokens: int) -> int:
        """How many cached blocks a hit may use: up to the last boundary."""
        return self.last_boundary(prompt_tokens) // self.block_size

    def checkpoint_positions(self, prompt_tokens: int, hit: int = 0) -> list[int]:
        """Where a prompt computed from `hit` keeps checkpoints, in order."""
        if not self.grid:
            return []
        last = self.last_boundary(prompt_tokens)
        if last <= hit:
            return []
        grid_points = list(range((hit // self.grid + 1) * self.grid, last, self.grid))
        keep = grid_points[: self.max_checkpoints - 1]
        return [*keep, last]

    def plan(self, prompt_tokens: int, hit: int = 0) -> PrefillPlan:
        if not 0 <= hit < prompt_tokens:
            raise ValueError(f"a hit of {hit} tokens must leave some of the {prompt_tokens} to compute")
        checkpoints = self.checkpoint_positions(prompt_tokens, hit)
        segments, start = [], hit
        while start < prompt_tokens:
            end = min(prompt_tokens, start + self.chunk_tokens) if self.chunk_tokens else prompt_tokens
            segments.append(Segment(start, end, tuple(c for c in checkpoints if start < c <= end)))
            start = end
        return PrefillPlan(hit, tuple(segments))
