"""Input-length distributions, as the throughput model needs them.

The model only asks three questions of a distribution of uncached lengths `L`, for a threshold t:
`p_above(t) = P(L > t)`, `mean_above(t) = E[L | L > t]` and `mean_below(t) = E[L | L <= t]`.

`TruncatedLogNormal` answers them in closed form (partial moments of the log-normal through
`math.erf`): exact and deterministic, no sampling. `EmpiricalLengths` answers them from observed
samples (sorted, with prefix sums), which is what the controllers use on their recent window.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import accumulate
from typing import Protocol


class LengthDistribution(Protocol):
    def p_above(self, t: float) -> float: ...
    def mean_above(self, t: float) -> float: ...
    def mean_below(self, t: float) -> float: ...
    def mean(self) -> float: ...


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


@dataclass(frozen=True)
class TruncatedLogNormal:
    mu: float = 9.90
    sigma: float = 1.00
    low: float = 128
    high: float = 131072

    def _mass(self, a: float, b: float) -> float:
        a, b = max(a, self.low), min(b, self.high)
        if b <= a:
            return 0.0
        return _phi((math.log(b) - self.mu) / self.sigma) - _phi((math.log(a) - self.mu) / self.sigma)

    def _partial_mean(self, a: float, b: float) -> float:
        """E[L; a < L <= b] for the untruncated log-normal."""
        a, b = max(a, self.low), min(b, self.high)
        if b <= a:
            return 0.0
        s2 = self.sigma**2
        shift = self.mu + s2
        return math.exp(self.mu + s2 / 2) * (
            _phi((math.log(b) - shift) / self.sigma) - _phi((math.log(a) - shift) / self.sigma)
        )

    def p_above(self, t: float) -> float:
        return self._mass(t, self.high) / self._mass(self.low, self.high)

    def mean_above(self, t: float) -> float:
        m = self._mass(t, self.high)
        return self._partial_mean(t, self.high) / m if m > 0 else 0.0

    def mean_below(self, t: float) -> float:
        m = self._mass(self.low, t)
        return self._partial_mean(self.low, t) / m if m > 0 else 0.0

    def mean(self) -> float:
        return self.mean_below(self.high)

    def sample(self, rng: random.Random) -> int:
        while True:
            x = math.exp(rng.gauss(self.mu, self.sigma))
            if self.low <= x <= self.high:
                return int(round(x))


class EmpiricalLengths:
    """The same questions answered from samples; `t` is compared as `L > t` like the router."""

    def __init__(self, samples: Iterable[float]) -> None:
        self.sorted = sorted(float(x) for x in samples)
        if not self.sorted:
            raise ValueError("EmpiricalLengths needs at least one sample")
        self.prefix = [0.0, *accumulate(self.sorted)]

    def _split(self, t: float) -> int:
        return bisect.bisect_right(self.sorted, t)

    def p_above(self, t: float) -> float:
        return 1.0 - self._split(t) / len(self.sorted)

    def mean_above(self, t: float) -> float:
        i, n = self._split(t), len(self.sorted)
        return (self.prefix[n] - self.prefix[i]) / (n - i) if i < n else 0.0

    def mean_below(self, t: float) -> float:
        i = self._split(t)
        return self.prefix[i] / i if i else 0.0

    def mean(self) -> float:
        return self.prefix[-1] / len(self.sorted)


def mean_of(dist: LengthDistribution, fn: Callable[[float], float], above: float) -> tuple[float, float]:
    """(E[fn(L) | L > above], E[fn(L) | L <= above]); 0.0 where that side has no mass. Exact over
    an `EmpiricalLengths`' samples; for a `TruncatedLogNormal`, Simpson's rule on log L (2,048
    intervals over the truncation range), fine for the smooth profiles it is asked about."""
    if isinstance(dist, EmpiricalLengths):
        hi = [fn(x) for x in dist.sorted if x > above]
        lo = [fn(x) for x in dist.sorted if x <= above]
        return (sum(hi) / len(hi) if hi else 0.0, sum(lo) / len(lo) if lo else 0.0)
    if not isinstance(dist, TruncatedLogNormal):
        raise TypeError(f"mean_of needs a TruncatedLogNormal or EmpiricalLengths, got {type(dist).__name__}")
    return _lognormal_mean(dist, fn, above, dist.high), _lognormal_mean(dist, fn, dist.low, above)


def _lognormal_mean(d: TruncatedLogNormal, fn: Callable[[float], float], a: float, b: float) -> float:
    a, b = max(a, d.low), min(b, d.high)
    if b <= a:
        return 0.0
    n = 2048
    u0, u1 = math.log(a), math.log(b)
    h = (u1 - u0) / n
    num = den = 0.0
    for i in range(n + 1):
        u = u0 + i * h
        w = (1 if i in (0, n) else 4 if i % 2 else 2) * math.exp(-0.5 * ((u - d.mu) / d.sigma) ** 2)
        num += w * fn(math.exp(u))
        den += w
    return num / den
