"""The paper's steady-state throughput model (PAPER.md, "The throughput model").

Rates are in requests per second, sizes in bytes, times in seconds, lengths in tokens.
`evaluate` puts the equations together for one deployment and one threshold `t`; the planner
searches over `t` and the local P/D split. A deployment with no PrfaaS instances is homogeneous PD
(p = 0); one with no local prefill instances is the naive heterogeneous baseline (p = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prfaas.scheduling.lengths import LengthDistribution
from prfaas.scheduling.profiles import H20_PREFILL_S, H200_PREFILL_S, KV_BYTES, Profile

GBPS = 1e9 / 8  # bytes per second in one Gbps


@dataclass(frozen=True)
class SystemProfile:
    """Everything the model needs to know about the hardware and the model being served."""

    kv_bytes: Profile = KV_BYTES                  # S_kv(l), bytes per request of length l
    prfaas_prefill_s: Profile = H200_PREFILL_S    # T_prefill(l) on a PrfaaS instance
    local_prefill_s: Profile = H20_PREFILL_S      # T_prefill_local(l) on a PD-P instance
    decode_step_s: float = 0.025                  # T_decode
    decode_batch: int = 20                        # BS_max per decode instance
    output_tokens: int = 1024                     # L_out
    link_bytes_per_s: float = 100 * GBPS          # B_out available to the PrfaaS cluster


@dataclass(frozen=True)
class Deployment:
    n_prfaas: int   # PrfaaS prefill instances
    n_p: int        # local PD-P instances
    n_d: int        # local PD-D instances


@dataclass(frozen=True)
class Throughput:
    deployment: Deployment
    threshold: float
    p: float
    l_long: float
    l_short: float
    theta_prfaas: float
    theta_pdp: float
    theta_pdd: float
    lambda_max: float
    egress_bytes_per_s: float   # offloaded KV rate at lambda_max

    @property
    def bottleneck(self) -> str:
        limits = {"decode": self.theta_pdd}
        if self.p > 0:
            limits["prfaas"] = self.theta_prfaas / self.p
        if self.p < 1:
            limits["local-prefill"] = self.theta_pdp / (1 - self.p)
        return min(limits, key=lambda k: limits[k])


def phi_kv(kv_bytes: Profile, prefill_s: Profile, length: float) -> float:
    """KV throughput of one prefill instance, bytes/s: S_kv(l) / T_prefill(l)."""
    return kv_bytes(length) / prefill_s(length)


def b_out(n_gpus: int, gpus_per_instance: int, phi: float) -> float:
    """Egress a prefill cluster needs: (N / P) * Phi_kv(L_avg)."""
    return n_gpus / gpus_per_instance * phi


def theta_prfaas(sp: SystemProfile, n_prfaas: int, l_long: float) -> float:
    if n_prfaas == 0 or l_long <= 0:
        return 0.0
    return min(n_prfaas / sp.prfaas_prefill_s(l_long), sp.link_bytes_per_s / sp.kv_bytes(l_long))


def theta_pdp(sp: SystemProfile, n_p: int, l_short: float) -> float:
    if n_p == 0 or l_short <= 0:
        return 0.0
    return n_p / sp.local_prefill_s(l_short)


def theta_pdd(sp: SystemProfile, n_d: int) -> float:
    return n_d * sp.decode_batch / (sp.decode_step_s * sp.output_tokens)


def lambda_max(p: float, th_prfaas: float, th_pdp: float, th_pdd: float) -> float:
    """min(Theta_prfaas / p, Theta_pdp / (1 - p), Theta_pdd); a stage with no traffic is no limit."""
    limits = [th_pdd]
    limits.append(th_prfaas / p if p > 0 else math.inf)
    limits.append(th_pdp / (1 - p) if p < 1 else math.inf)
    return min(limits)


def evaluate(sp: SystemProfile, dist: LengthDistribution, dep: Deployment, threshold: float) -> Throughput:
    """The model at one threshold. Without PrfaaS instances nothing is offloaded, without local
    prefill instances everything is."""
    if dep.n_prfaas == 0:
        threshold = math.inf
    elif dep.n_p == 0:
        threshold = -math.inf
    p = 0.0 if threshold == math.inf else 1.0 if threshold == -math.inf else dist.p_above(threshold)
    l_long = dist.mean() if p == 1.0 else dist.mean_above(threshold) if p > 0 else 0.0
    l_short = dist.mean() if p == 0.0 else dist.mean_below(threshold) if p < 1 else 0.0
    tp, tl, td = theta_prfaas(sp, dep.n_prfaas, l_long), theta_pdp(sp, dep.n_p, l_short), theta_pdd(sp, dep.n_d)
    lam = lambda_max(p, tp, tl, td)
    egress = lam * p * sp.kv_bytes(l_long) if p > 0 else 0.0
    return Throughput(dep, threshold, p, l_long, l_short, tp, tl, td, lam, egress)


def exact_lambda(sp: SystemProfile, dist: LengthDistribution, plan: Throughput) -> float:
    """Lambda_max of `plan`'s deployment and threshold with each stage's mean service time taken
    over the lengths it serves (`E[T_prefill(L) | L > t]`, `E[S_kv(L) | L > t]`, `E[T_local(L) |
    L <= t]`) instead of the paper's time of the mean length (`T_prefill(E[L | L > t])`). The
    profiles are convex, so the paper's form is optimistic by the spread of the lengths; this is
    the prediction a measured cluster is compared with (docs/evaluation.md)."""
    from prfaas.scheduling.lengths import mean_of

    dep, t, p = plan.deployment, plan.threshold, plan.p   # t is -inf (naive) or inf (homogeneous) at the ends
    tp = tl = 0.0
    if p > 0 and dep.n_prfaas:
        t_pre, s_kv = mean_of(dist, sp.prfaas_prefill_s, t)[0], mean_of(dist, sp.kv_bytes, t)[0]
        tp = min(dep.n_prfaas / t_pre, sp.link_bytes_per_s / s_kv)
    if p < 1 and dep.n_p:
        tl = dep.n_p / mean_of(dist, sp.local_prefill_s, t)[1]
    return lambda_max(p, tp, tl, theta_pdd(sp, dep.n_d))
