"""Simulation scenarios built on the paper's case study, and the runner the CLI and tests use.

- `steady`: Poisson arrivals at 1.1x the planner's Lambda_max, for each deployment (PrfaaS at the
  planned optimum, homogeneous PD, naive heterogeneous); the measured throughput is compared with
  Lambda_max.
- `link-drop`: 0.85x Lambda_max; the link drops from 100 to 10 Gbps at 300 s and recovers at 900 s.
- `burst`: 0.7x Lambda_max plus 120 s of very long prompts (log-normal mu 11.3, sigma 0.3) at 1 req/s.
- `mix-shift`: 2.8 req/s of the case-study mix, then from 400 s 4.3 req/s of short prompts (mu 8.5):
  the decode stage becomes the bottleneck.
Each dynamic scenario runs twice on the same arrivals: "static" (the planner's threshold, fixed) and
"controlled" (short-term controller and the split guard's fast role change; in mix-shift also the
long-term controller).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prfaas.scheduling.controller import LongTermController, ShortTermController, SplitGuard
from prfaas.scheduling.lengths import TruncatedLogNormal
from prfaas.scheduling.model import GBPS, Throughput
from prfaas.scheduling.planner import paper_case_study
from prfaas.scheduling.policy import HomogeneousPolicy, NaivePolicy, PrfaasPolicy, RoutingPolicy
from prfaas.sim.metrics import Summary, summarise
from prfaas.sim.simulator import SimConfig, Simulator
from prfaas.sim.workload import Segment, generate

Progress = Callable[[str, float], None] | None


@dataclass(frozen=True)
class RunResult:
    label: str
    summary: Summary
    samples: list[dict]
    threshold_changes: list
    role_changes: list


def _policy(kind: str, plan: Throughput) -> RoutingPolicy:
    if kind == "homogeneous":
        return HomogeneousPolicy()
    if kind == "naive":
        return NaivePolicy()
    return PrfaasPolicy(plan.threshold)


def run_one(label: str, plan: Throughput, policy_kind: str, segments: list[Segment], duration: float,
            window: tuple[float, float], seed: int, controlled: bool = False, long_term: bool = False,
            link_changes: tuple = (), prefix_reuse: float = 0.0, progress: Progress = None,
            kv_compression: str = "off", split: bool = True) -> RunResult:
    sc = paper_case_study(kv_compression)
    policy = _policy(policy_kind, plan)
    st = guard = None
    if controlled and isinstance(policy, PrfaasPolicy):
        st = ShortTermController(policy, sc.system, plan.deployment, plan.threshold)
        guard = SplitGuard(st, sc.system.link_bytes_per_s) if split else None
    lt = LongTermController() if long_term else None
    sim = Simulator(sc.system, plan.deployment, policy, SimConfig(duration), st, lt, link_changes, split=guard)
    arrivals = generate(segments, seed, prefix_reuse)
    reqs = sim.run(arrivals, (lambda t: progress(label, t)) if progress else None)
    return RunResult(label, summarise(reqs, sim.samples, *window), sim.samples,
                     st.history if st else [], sim.role_changes)


def steady(seed: int = 1, duration: float = 1500.0, policies: tuple[str, ...] = ("prfaas", "homogeneous", "naive"),
           progress: Progress = None, kv_compression: str = "off") -> dict[str, tuple[Throughput, RunResult]]:
    plans = paper_case_study(kv_compression).plans()
    dist = paper_case_study().lengths
    out = {}
    for kind in policies:
        plan = plans[kind]
        seg = [Segment(0.0, duration, 1.1 * plan.lambda_max, dist)]
        out[kind] = (plan, run_one(kind, plan, kind, seg, duration, (300.0, duration), seed, progress=progress,
                                   kv_compression=kv_compression))
    return out


def _pair(segments: list[Segment], duration: float, window: tuple[float, float], seed: int,
          progress: Progress, **kw) -> dict[str, RunResult]:
    plan = paper_case_study().plans()["prfaas"]
    long_term = kw.pop("long_term", False)
    return {
        "static": run_one("static", plan, "prfaas", segments, duration, window, seed, progress=progress, **kw),
        "controlled": run_one("controlled", plan, "prfaas", segments, duration, window, seed, True, long_term,
                              progress=progress, **kw),
    }


def link_drop(seed: int = 1, progress: Progress = None, low_gbps: float = 10.0) -> dict[str, RunResult]:
    sc = paper_case_study()
    lam = 0.85 * sc.plans()["prfaas"].lambda_max
    return _pair([Segment(0, 1500, lam, sc.lengths)], 1500, (300, 900), seed, progress,
                 link_changes=((300.0, low_gbps * GBPS), (900.0, 100 * GBPS)))


def burst(seed: int = 1, progress: Progress = None) -> dict[str, RunResult]:
    sc = paper_case_study()
    lam = 0.7 * sc.plans()["prfaas"].lambda_max
    segs = [Segment(0, 1000, lam, sc.lengths), Segment(300, 420, 1.0, TruncatedLogNormal(mu=11.3, sigma=0.3))]
    return _pair(segs, 1000, (250, 800), seed, progress)


def mix_shift(seed: int = 1, progress: Progress = None) -> dict[str, RunResult]:
    sc = paper_case_study()
    segs = [Segment(0, 400, 2.8, sc.lengths), Segment(400, 2000, 4.3, TruncatedLogNormal(mu=8.5))]
    return _pair(segs, 2000, (1200, 2000), seed, progress, long_term=True)


DYNAMIC = {"link-drop": link_drop, "burst": burst, "mix-shift": mix_shift}
