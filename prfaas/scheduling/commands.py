"""`prfaas plan` and `prfaas sim`: the planner and the simulator from the command line.

The lead wires `plan_command` and `sim_command` into prfaas/cli.py; each takes argv without the
subcommand name and returns an exit code. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prfaas.scheduling.model import Deployment, Throughput, evaluate
from prfaas.scheduling.planner import SCENARIOS, best_threshold, threshold_grid
from prfaas.settings import command_parser


def _plan_dict(name: str, r: Throughput) -> dict:
    d = {
        "lambda_max": r.lambda_max, "n_prfaas": r.deployment.n_prfaas, "n_p": r.deployment.n_p,
        "n_d": r.deployment.n_d, "theta_prfaas": r.theta_prfaas, "theta_pdp": r.theta_pdp,
        "theta_pdd": r.theta_pdd,
    }
    if name == "prfaas":
        d.update(threshold_tokens=r.threshold, p_offload=r.p, egress_gbps=r.egress_bytes_per_s * 8 / 1e9)
    return d


def plan_command(argv: list[str]) -> int:
    ap = command_parser("prfaas plan", "throughput model and planner")
    ap.add_argument("--scenario", default="paper-case-study", choices=sorted(SCENARIOS), help="the inputs")
    ap.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    ap.add_argument("--out", default="docs/img", help="folder for the plots (without --json)")
    args = ap.parse_args(argv)
    sc = SCENARIOS[args.scenario]()
    plans = sc.plans()
    if args.json:
        print(json.dumps({k: _plan_dict(k, v) for k, v in plans.items()}))
        return 0
    base = plans["homogeneous"].lambda_max
    print(f"{'deployment':<12} {'lambda_max':>10} {'x homog':>8} {'N_prfaas':>8} {'N_p':>4} {'N_d':>4} "
          f"{'t (tok)':>8} {'p':>6} {'egress':>9} bottleneck")
    for k, r in plans.items():
        t = f"{r.threshold:.0f}" if k == "prfaas" else "-"
        print(f"{k:<12} {r.lambda_max:>10.3f} {r.lambda_max / base:>8.2f} {r.deployment.n_prfaas:>8} "
              f"{r.deployment.n_p:>4} {r.deployment.n_d:>4} {t:>8} {r.p:>6.3f} "
              f"{r.egress_bytes_per_s * 8 / 1e9:>6.1f} Gb {r.bottleneck}")
    for path in plot_plan(sc, plans["prfaas"], Path(args.out)):
        print(f"wrote {path}")
    return 0


def plot_plan(sc, best: Throughput, out: Path) -> list[Path]:
    from prfaas.sim.plots import pyplot

    plt = pyplot()

    out.mkdir(parents=True, exist_ok=True)
    grid = threshold_grid(step=256)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for n_p in range(1, sc.n_local):
        dep = Deployment(sc.n_prfaas, n_p, sc.n_local - n_p)
        ax.plot([t / 1024 for t in grid], [evaluate(sc.system, sc.lengths, dep, t).lambda_max for t in grid],
                label=f"{n_p}P/{sc.n_local - n_p}D", lw=2 if n_p == best.deployment.n_p else 1)
    ax.axvline(best.threshold / 1024, color="k", ls=":", lw=1)
    ax.set(xscale="log", xlabel="threshold t (K tokens)", ylabel="Lambda_max (req/s)", title="Lambda_max vs t")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    p1 = out / "plan_lambda_vs_threshold.png"
    fig.savefig(p1, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    splits = list(range(1, sc.n_local))
    lams = [best_threshold(sc.system, sc.lengths, Deployment(sc.n_prfaas, n, sc.n_local - n), grid).lambda_max
            for n in splits]
    ax.bar([f"{n}P/{sc.n_local - n}D" for n in splits], lams)
    ax.set(ylabel="Lambda_max at best t (req/s)", title="Lambda_max vs local P/D split")
    fig.tight_layout()
    p2 = out / "plan_lambda_vs_split.png"
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    return [p1, p2]


def sim_command(argv: list[str]) -> int:
    from prfaas.sim import scenarios, trace_run
    from prfaas.sim.plots import plot_dynamic

    ap = command_parser("prfaas sim", "event-driven cluster simulator")
    ap.add_argument("--scenario", default="steady", choices=["steady", *scenarios.DYNAMIC], help="what to simulate")
    ap.add_argument("--policy", default=None, choices=["prfaas", "homogeneous", "naive"],
                    help="steady: simulate one deployment (default: all three); --trace: its deployment "
                    "(default prfaas)")
    ap.add_argument("--seed", type=int, default=1, help="the workload's random seed")
    ap.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    ap.add_argument("--out", default="docs/img", help="folder for the plots (without --json)")
    trace_run.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.trace is not None:
        return trace_run.trace_main(args)

    def progress(label: str, t: float) -> None:
        print(f"[{args.scenario}/{label}] t={t:7.0f} s", file=sys.stderr, flush=True)

    if args.scenario == "steady":
        kinds = (args.policy,) if args.policy else ("prfaas", "homogeneous", "naive")
        res = scenarios.steady(args.seed, policies=kinds, progress=progress)
        table = {k: {"lambda_max": p.lambda_max, **r.summary.as_dict(),
                     "sim_over_model": r.summary.throughput / p.lambda_max} for k, (p, r) in res.items()}
    else:
        pair = scenarios.DYNAMIC[args.scenario](args.seed, progress=progress)
        table = {k: {**r.summary.as_dict(), "max_prfaas_queue": max(s["prfaas_queue"] for s in r.samples),
                     "threshold_changes": len(r.threshold_changes),
                     "role_changes": [(c.time, c.node_id, c.new_role) for c in r.role_changes]}
                 for k, r in pair.items()}
        if not args.json:
            print(f"wrote {plot_dynamic(args.scenario, pair, Path(args.out))}")
    if args.json:
        print(json.dumps(table))
    else:
        for k, row in table.items():
            print(k + ": " + ", ".join(f"{a}={b:.3f}" if isinstance(b, float) else f"{a}={b}" for a, b in row.items()))
    return 0
