"""Dynamic cases on the real services: the same arrivals twice on the PrfaaS deployment, once with
the planner's threshold fixed ("static": the router's control loop off) and once with the live
controllers ("controlled": short-term threshold control and long-term role changes, local nodes
convertible), with the simulator's run of the same case beside each.

- `link-cut`: offered `rate` x Lambda_max; the PrfaaS -> local link drops to `cut_fraction` of its
  rate (`tc qdisc change`) during [cut_start, cut_end) of the run, then recovers.
- `burst` and `mix-shift` are the simulator's other cases, as workload segments (`segments_for`).
Reported: P90 TTFT of the requests arriving during the cut, loss, and t, roles and link
utilisation over time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prfaas.eval.command import EvalConfig, _point_json, _statement, real_model, setup_of
from prfaas.eval.deploy import EvalCluster
from prfaas.eval.run import real_share, run_point
from prfaas.eval.topology import make_topology
from prfaas.eval.workload import lognormal
from prfaas.scheduling.lengths import TruncatedLogNormal
from prfaas.sim.workload import Segment


def segments_for(case: str, rate: float, duration: float, dist: TruncatedLogNormal) -> list[Segment]:
    if case == "burst":  # a burst of very long prompts over the base load, from 30% to 45% of the run
        return [Segment(0, duration, rate, dist),
                Segment(0.3 * duration, 0.45 * duration, rate * 0.4, TruncatedLogNormal(mu=11.3, sigma=0.3))]
    if case == "mix-shift":  # short prompts from 40% of the run on
        return [Segment(0, 0.4 * duration, rate, dist), Segment(0.4 * duration, duration, rate * 1.5,
                                                                TruncatedLogNormal(mu=8.5))]
    return [Segment(0, duration, rate, dist)]


WINDOWS = {"link-cut": (0.25, 0.65), "burst": (0.25, 0.8), "mix-shift": (0.6, 1.0)}
RATES = {"link-cut": 0.85, "burst": 0.7, "mix-shift": 0.9}


def link_cut(cfg: EvalConfig, rate: float = 0.85, cut_fraction: float = 0.1, log: Any = print) -> dict[str, Any]:
    return dynamic_case(cfg, "link-cut", rate, cut_fraction, log)


def dynamic_case(cfg: EvalConfig, case: str, rate: float | None = None, cut_fraction: float = 0.1,
                 log: Any = print) -> dict[str, Any]:
    """`case` (link-cut, burst, mix-shift) twice on the same arrivals: static, then controlled."""
    if case not in WINDOWS:
        raise ValueError(f"unknown dynamic case {case!r}; choose from {', '.join(WINDOWS)}")
    rate = RATES[case] if rate is None else rate
    cut = WINDOWS[case]
    model, tokens = real_model(cfg.model)
    setup = setup_of(cfg, model)
    plan = setup.plans["prfaas"]
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    full_mbit = setup.system.link_bytes_per_s * 8 / 1e6
    d = cfg.duration_s
    window = (cut[0] * d, cut[1] * d)
    events = [(window[0], full_mbit * cut_fraction), (window[1], full_mbit)] if case == "link-cut" else []
    reqs = lognormal(segments_for(case, rate * plan.lambda_max, d, setup.dist), cfg.scaling, tokens, cfg.seed,
                     setup.paper.output_tokens, cfg.output_spread)
    topo = make_topology(cfg.topology, full_mbit, cfg.delay_ms * cfg.scaling.time_factor)
    if not topo.shaped:
        topo.close()
        raise RuntimeError(f"the {case} case needs the two-namespace topology (root, ip netns, tc)")
    runs: dict[str, Any] = {}
    t_all = time.monotonic()
    try:
        for label, controlled in (("static", False), ("controlled", True)):
            cut_note = f", link {full_mbit:.1f} -> {full_mbit * cut_fraction:.1f} Mbit/s" if events else ""
            log(f"[eval] {case} {label}: {len(reqs)} requests at {rate:.2f}x Lambda_max{cut_note}, window "
                f"[{window[0]:.0f}, {window[1]:.0f}) s ...")
            topo.set_rate(full_mbit)
            with EvalCluster(topo, setup, "prfaas", cfg.model, out_dir / f"{case}-{label}", controlled) as cluster:
                res = run_point(cluster, setup, reqs, rate * plan.lambda_max, label, window, cfg.slo(), events, log)
            m = res.measured
            log(f"[eval]   -> TTFT P90 in the window {m.ttft_p90:.2f} s (simulated {res.predicted['ttft_p90']:.2f}),"
                f" lost {m.lost}, wrong length {m.wrong_length}")
            runs[label] = {"measured": m.as_dict(), "predicted": res.predicted, "real_share": real_share(res.emulation),
                           "point": _point_json(res)}
    finally:
        topo.close()
    st, ct = runs["static"]["measured"]["ttft_p90"], runs["controlled"]["measured"]["ttft_p90"]
    summary = {"case": case, "profiles": setup.profile_name,
               "rate_fraction": rate, "cut_fraction": cut_fraction, "window": window,
               "link_mbit": full_mbit, "scaling": cfg.scaling.__dict__, "shape": cfg.shape.__dict__,
               "ttft_p90_static": st, "ttft_p90_controlled": ct, "reduction": 1 - ct / st if st else float("nan"),
               "wall_s": time.monotonic() - t_all, "statement": _statement(setup),
               "runs": {k: {x: v[x] for x in ("measured", "predicted", "real_share")} for k, v in runs.items()}}
    (out_dir / f"{case}.json").write_text(json.dumps({"summary": summary, "points": {
        k: [v["point"]] for k, v in runs.items()}}, default=str))
    return summary
