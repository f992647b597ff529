"""Profiles measured from the live system: prefill time against prompt length, learned from the
prefill nodes' own reports, per cluster. Plain Python (no torch, no grpc)."""

from __future__ import annotations

import math
from collections import defaultdict

from prfaas.scheduling.profiles import Profile


class OnlinePrefillProfile:
    """Mean prefill seconds per power-of-two length bucket; a `Profile` once two buckets exist.
    Below the smallest and above the largest bucket the profile extrapolates linearly in length
    (prefill time grows at least linearly), so an unmeasured long prompt is not underestimated."""

    def __init__(self, fallback_s_per_token: float = 1e-3) -> None:
        self.fallback = fallback_s_per_token
        self._sum: dict[int, float] = defaultdict(float)
        self._len: dict[int, float] = defaultdict(float)
        self._n: dict[int, int] = defaultdict(int)

    def record(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        b = int(math.log2(tokens))
        self._sum[b] += seconds
        self._len[b] += tokens
        self._n[b] += 1

    @property
    def samples(self) -> int:
        return sum(self._n.values())

    def profile(self, max_tokens: int = 1 << 20) -> Profile:
        pts = sorted((self._len[b] / self._n[b], self._sum[b] / self._n[b]) for b in self._n)
        if not pts:
            return Profile.from_points([1.0, float(max_tokens)], [self.fallback, self.fallback * max_tokens])
        if len(pts) == 1:
            length, secs = pts[0]
            rate = secs / length
            return Profile.from_points([1.0, float(max_tokens)], [rate, rate * max_tokens])
        (l0, s0), (l1, s1) = pts[-2], pts[-1]
        slope = max((s1 - s0) / max(l1 - l0, 1e-9), s1 / l1)
        if pts[-1][0] < max_tokens:
            pts.append((float(max_tokens), s1 + slope * (max_tokens - l1)))
        if pts[0][0] > 1:
            pts.insert(0, (1.0, max(pts[0][1] * 1.0 / pts[0][0], 1e-9)))
        return Profile.from_points([p[0] for p in pts], [p[1] for p in pts])
