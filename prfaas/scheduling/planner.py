"""The planner: the paper's 2-D grid search over (t, N_p / N_d), plus the two baselines.

`plan_prfaas` fixes the PrfaaS instance count and the local instance count, tries every local split
with at least one PD-P and one PD-D instance and every threshold on a grid, and keeps the largest
Lambda_max (ties go to the smaller threshold, then to more decode instances). `best_threshold`
is the 1-D search for a fixed deployment, which the controllers reuse. `paper_case_study` builds the
inputs of PAPER.md's case study.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from prfaas.scheduling.lengths import LengthDistribution, TruncatedLogNormal
from prfaas.scheduling.model import Deployment, SystemProfile, Throughput, evaluate


def threshold_grid(low: float = 128, high: float = 131072, step: float = 64) -> list[float]:
    return [float(x) for x in range(int(low), int(high) + 1, int(step))]


def best_threshold(
    sp: SystemProfile, dist: LengthDistribution, dep: Deployment, grid: Sequence[float] | None = None
) -> Throughput:
    best: Throughput | None = None
    for t in grid or threshold_grid():
        r = evaluate(sp, dist, dep, t)
        if best is None or r.lambda_max > best.lambda_max * (1 + 1e-12):
            best = r
    assert best is not None
    return best


def plan_prfaas(
    sp: SystemProfile, dist: LengthDistribution, n_prfaas: int, n_local: int,
    grid: Sequence[float] | None = None,
) -> Throughput:
    if n_local < 2:
        raise ValueError("the local PD cluster needs at least one prefill and one decode instance")
    best: Throughput | None = None
    for n_p in range(1, n_local):
        r = best_threshold(sp, dist, Deployment(n_prfaas, n_p, n_local - n_p), grid)
        if best is None or r.lambda_max > best.lambda_max * (1 + 1e-12):
            best = r
    assert best is not None
    return best


def plan_homogeneous(sp: SystemProfile, dist: LengthDistribution, n_local: int) -> Throughput:
    """Local PD only, with its own best P/D split."""
    runs = [evaluate(sp, dist, Deployment(0, n_p, n_local - n_p), math.inf) for n_p in range(1, n_local)]
    return max(runs, key=lambda r: r.lambda_max)


def plan_naive(sp: SystemProfile, dist: LengthDistribution, n_prfaas: int, n_decode: int) -> Throughput:
    """Every prefill on the PrfaaS cluster, every decode local; no length routing."""
    return evaluate(sp, dist, Deployment(n_prfaas, 0, n_decode), -math.inf)


@dataclass(frozen=True)
class Scenario:
    name: str
    system: SystemProfile
    lengths: TruncatedLogNormal
    n_prfaas: int          # PrfaaS instances (8 GPUs each)
    n_local: int           # local PD instances, split freely
    n_homogeneous: int     # instances of the homogeneous baseline

    def plans(self) -> dict[str, Throughput]:
        return {
            "prfaas": plan_prfaas(self.system, self.lengths, self.n_prfaas, self.n_local),
            "homogeneous": plan_homogeneous(self.system, self.lengths, self.n_homogeneous),
            "naive": plan_naive(self.system, self.lengths, self.n_prfaas, self.n_local),
        }


def paper_case_study(kv_compression: str = "off") -> Scenario:
    """32 H200 (4 PrfaaS instances), 64 H20 (8 local instances), 100 Gbps, log-normal(9.90, 1.00);
    with `kv_compression` ("int8", "fp8") S_kv is the compressed transfer's (compression.py)."""
    system = SystemProfile()
    if kv_compression != "off":
        from prfaas.scheduling.compression import compressed_kv_bytes

        system = dataclasses.replace(system, kv_bytes=compressed_kv_bytes(system.kv_bytes, kv_compression))
    return Scenario("paper-case-study", system, TruncatedLogNormal(), 4, 8, 12)


SCENARIOS = {"paper-case-study": paper_case_study}
