"""Hardware and model profiles: `T_prefill(l)` per hardware class and `S_kv(l)`.

A `Profile` is a piecewise-linear function of the (uncached) input length in tokens, extended
linearly beyond its first and last points (and never below zero). It can be built from points,
sampled from a callable, or read from a JSON or TOML file:

    {"lengths": [1024, 8192], "values": [0.44, 0.72]}

The case-study tables of PAPER.md are the module-level constants at the bottom.
"""

from __future__ import annotations

import bisect
import json
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

K = 1024
MiB = 2**20


@dataclass(frozen=True)
class Profile:
    lengths: tuple[float, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.lengths) != len(self.values) or len(self.lengths) < 2:
            raise ValueError("a profile needs at least two (length, value) points of equal count")
        if any(b <= a for a, b in zip(self.lengths, self.lengths[1:], strict=False)):
            raise ValueError("profile lengths must be strictly increasing")

    def __call__(self, length: float) -> float:
        xs, ys = self.lengths, self.values
        i = min(max(bisect.bisect_right(xs, length) - 1, 0), len(xs) - 2)
        slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
        return max(0.0, ys[i] + slope * (length - xs[i]))

    def scaled(self, factor: float) -> Profile:
        return Profile(self.lengths, tuple(v * factor for v in self.values))

    @classmethod
    def from_points(cls, lengths: Sequence[float], values: Sequence[float]) -> Profile:
        return cls(tuple(float(x) for x in lengths), tuple(float(y) for y in values))

    @classmethod
    def from_callable(cls, fn: Callable[[float], float], lengths: Sequence[float]) -> Profile:
        """Samples `fn` at `lengths`; between samples the profile interpolates linearly."""
        return cls.from_points(lengths, [fn(x) for x in lengths])

    @classmethod
    def from_mapping(cls, data: dict) -> Profile:
        return cls.from_points(data["lengths"], data["values"])

    @classmethod
    def from_file(cls, path: str | Path, key: str | None = None) -> Profile:
        """Reads `{"lengths": [...], "values": [...]}` from JSON or TOML, optionally under `key`."""
        path = Path(path)
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        return cls.from_mapping(data[key] if key else data)


CASE_LENGTHS = (1 * K, 8 * K, 32 * K, 128 * K)
# Measured per 8xH200 instance (PAPER.md).
H200_PREFILL_S = Profile.from_points(CASE_LENGTHS, (0.44, 0.72, 1.84, 7.40))
KV_BYTES = Profile.from_points(CASE_LENGTHS, tuple(m * MiB for m in (190.8, 308.9, 701.3, 2316.3)))
# Our assumption for 8xH20, backed out from the paper's baselines (PAPER.md).
H20_PREFILL_S = Profile.from_points(CASE_LENGTHS, (0.97, 1.54, 5.03, 20.4))
