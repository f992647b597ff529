"""`prfaas eval`: the three deployments on the real services across an emulated two-datacenter
link, the planner's predictions beside them (docs/evaluation.md).

    prfaas eval steady  [--quick] [--out DIR]     rate sweep per deployment; goodput under the SLO
    prfaas eval link-cut [--out DIR]              PrfaaS, static threshold vs live controllers
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prfaas.eval.deploy import EvalCluster
from prfaas.eval.report import Slo, goodput
from prfaas.eval.run import PointResult, real_share, run_point
from prfaas.eval.scale import DEPLOYMENTS, RealModel, Scaling, Setup, Shape, build_setup
from prfaas.eval.topology import make_topology
from prfaas.eval.workload import EvalRequest, lognormal, mooncake
from prfaas.scheduling.model import exact_lambda
from prfaas.sim.trace import TokenSpace
from prfaas.sim.workload import Segment


@dataclass
class EvalConfig:
    model: str = "builtin:qwen3_next-tiny"
    topology: str = "auto"  # netns, loopback, auto
    scaling: Scaling = field(default_factory=Scaling)
    shape: Shape = field(default_factory=Shape)
    deployments: tuple[str, ...] = DEPLOYMENTS
    rates: tuple[float, ...] = (0.7, 0.9, 1.1)  # offered, as fractions of each deployment's predicted Lambda_max
    duration_s: float = 90.0  # arrivals per rate point (real seconds)
    warmup_s: float = 30.0  # the steady window starts here
    seed: int = 1
    delay_ms: float = 5.0  # one-way cross-datacenter delay, paper time (x time factor)
    link_gbps: float = 100.0  # the paper's link
    output_spread: float = 0.0
    trace: str = ""  # a Mooncake trace: replaces the log-normal lengths
    trace_requests: int = 200
    trace_stretch: float = 1.0
    slo_ttft_paper_s: float = 30.0
    slo_decode_tok_s: float = 32.0  # paper-equivalent decode floor: 0.8 x the profile's 40 tokens/s
    out: str = ".prfaas/eval"
    profile: str = ""  # a measured node profile (prfaas eval profile); empty = the case study's

    def slo(self) -> Slo:
        sc = self.scaling
        return Slo(self.slo_ttft_paper_s * sc.time_factor, sc.decode_step_factor / self.slo_decode_tok_s)


def real_model(model: str) -> tuple[RealModel, TokenSpace]:
    from prfaas.kv.layout import KvLayout
    from prfaas.model.config import ModelConfig
    from prfaas.model.presets import resolve_model

    model_dir = resolve_model(model)
    layout = KvLayout(ModelConfig.from_dir(model_dir))
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return RealModel(layout.state_bytes, layout.bytes_per_token), TokenSpace.from_model_config(config)


def setup_of(cfg: EvalConfig, model: RealModel) -> Setup:
    from prfaas.eval.emulate import EmulatedProfile

    measured = EmulatedProfile.load(cfg.profile) if cfg.profile else None
    return build_setup(cfg.scaling, cfg.shape, model, link_gbps=cfg.link_gbps, measured=measured)


def workload(cfg: EvalConfig, setup: Setup, tokens: TokenSpace, rate: float, seed: int) -> list[EvalRequest]:
    if cfg.trace:
        return mooncake(cfg.trace, cfg.scaling, tokens, cfg.trace_requests, cfg.trace_stretch)
    seg = [Segment(0.0, cfg.duration_s, rate, setup.dist)]
    return lognormal(seg, cfg.scaling, tokens, seed, setup.paper.output_tokens, cfg.output_spread)


def steady(cfg: EvalConfig, log: Any = print) -> dict[str, Any]:
    """Every deployment in turn: start it, sweep the offered rates, stop it."""
    model, tokens = real_model(cfg.model)
    setup = setup_of(cfg, model)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    link_mbit = setup.system.link_bytes_per_s * 8 / 1e6
    topo = make_topology(cfg.topology, link_mbit, cfg.delay_ms * cfg.scaling.time_factor)
    slo, window = cfg.slo(), (cfg.warmup_s, cfg.duration_s)
    results: dict[str, list[PointResult]] = {}
    t_all = time.monotonic()
    try:
        for kind in cfg.deployments:
            plan = setup.plans[kind]
            log(f"[eval] {kind}: {plan.deployment}, predicted Lambda_max {plan.lambda_max:.3f} req/s "
                f"({plan.bottleneck}-bound); starting the cluster ({topo.name}) ...")
            with EvalCluster(topo, setup, kind, cfg.model, out_dir / kind) as cluster:
                results[kind] = []
                for i, frac in enumerate(cfg.rates):
                    rate = frac * plan.lambda_max
                    reqs = workload(cfg, setup, tokens, rate, cfg.seed + i)
                    log(f"[eval]   {kind} at {rate:.3f} req/s ({frac:.2f}x), {len(reqs)} requests ...")
                    res = run_point(cluster, setup, reqs, rate, f"rate{i}", window, slo, log=log)
                    m = res.measured
                    log(f"[eval]   -> {m.throughput:.3f} req/s done, TTFT P90 {m.ttft_p90:.2f} s, lost {m.lost}, "
                        f"SLO {'met' if m.meets_slo else 'missed'} ({res.wall_s:.0f} s)")
                    results[kind].append(res)
    finally:
        topo.close()
    summary = summarise_steady(cfg, setup, results, topo.name, time.monotonic() - t_all)
    (out_dir / "steady.json").write_text(json.dumps({"summary": summary, "points": {
        k: [_point_json(p) for p in v] for k, v in results.items()}}, default=_jsonable))
    return summary


def _point_json(p: PointResult) -> dict[str, Any]:
    return {"label": p.label, "measured": p.measured.as_dict(), "predicted": p.predicted, "samples": p.samples,
            "link": p.link, "records": [{k: v for k, v in r.items() if k != "tokens"} | {"n_tokens": len(r["tokens"])}
                                        for r in p.records], "sim_samples": p.sim_samples, "wall_s": p.wall_s}


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if hasattr(x, "__dataclass_fields__"):
        return asdict(x)
    return str(x)


def summarise_steady(cfg: EvalConfig, setup: Setup, results: dict[str, list[PointResult]], topology: str,
                     wall_s: float) -> dict[str, Any]:
    rows = {}
    for kind, points in results.items():
        plan = setup.plans[kind]
        best = max(points, key=lambda p: p.measured.throughput)
        emu = points[-1].emulation if points else {}
        rows[kind] = {
            "deployment": asdict(plan.deployment), "predicted_lambda": plan.lambda_max,
            "predicted_lambda_exact": exact_lambda(setup.system, setup.dist, plan),
            "predicted_p": plan.p, "threshold_real_tokens": plan.threshold / cfg.scaling.length_scale
            if math.isfinite(plan.threshold) else None,
            "predicted_egress_bytes_per_s": plan.egress_bytes_per_s, "bottleneck": plan.bottleneck,
            "goodput": goodput([p.measured for p in points]),
            "max_throughput": best.measured.throughput,
            "points": [{"measured": p.measured.as_dict(), "predicted": p.predicted} for p in points],
            "real_share": real_share(emu),
        }
    return {"topology": topology, "profiles": setup.profile_name, "scaling": asdict(cfg.scaling),
            "shape": asdict(cfg.shape),
            "slo": cfg.slo().describe(cfg.scaling.time_factor, cfg.scaling.decode_step_factor),
            "link_mbit": setup.system.link_bytes_per_s * 8 / 1e6, "wall_s": wall_s, "deployments": rows,
            "statement": [dict(r, paper=str(r["paper"]), emulated=str(r["emulated"])) for r in _statement(setup)]}


def _statement(setup: Setup) -> list[dict[str, Any]]:
    from prfaas.eval.scale import statement

    return statement(setup)
