"""How long a capacity run must be: the simulator, at the eval's scaling, offered `--overload` x each
deployment's predicted Lambda_max, over seeds, for each run length; prints the throughput in the
window [warm-up, run length) over the planner's prediction with each stage's mean service time
(`exact_lambda`). Short windows scatter widely (a few 128K-token prompts decide a window's local
prefill time); the spread is what a single measured run of that length can be off by.

    .venv/bin/python bench/capacity_window.py [--runs 150:50,400:100,600:150] [--overload 1.5] [--seeds 3]

Results: docs/evaluation.md ("capacity").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prfaas.eval.command import EvalConfig, real_model, setup_of, workload  # noqa: E402
from prfaas.eval.run import simulate  # noqa: E402
from prfaas.eval.scale import DEPLOYMENTS, Scaling  # noqa: E402
from prfaas.scheduling.model import exact_lambda  # noqa: E402


def _runs(text: str) -> list[tuple[float, float]]:
    out = []
    for item in text.split(","):
        length, _, warm = item.partition(":")
        out.append((float(length), float(warm or 0)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=_runs, default=_runs("150:50,400:100,600:150"),
                    help="LENGTH:WARMUP pairs, real seconds")
    ap.add_argument("--overload", type=float, default=1.5, help="offered, x each deployment's Lambda_max")
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    t0 = time.monotonic()
    for length, warm in a.runs:
        cfg = EvalConfig(scaling=Scaling(time_factor=2, decode_scale=4), duration_s=length, warmup_s=warm)
        model, tokens = real_model(cfg.model)
        setup = setup_of(cfg, model)
        cells = []
        for kind in DEPLOYMENTS:
            plan = setup.plans[kind]
            exact = exact_lambda(setup.system, setup.dist, plan)
            got = []
            for seed in range(1, a.seeds + 1):
                reqs = workload(cfg, setup, tokens, a.overload * plan.lambda_max, seed)
                summary, _ = simulate(setup, kind, reqs, 3 * length, (warm, length))
                got.append(summary["throughput"] / exact)
            cells.append(f"{kind} {' '.join(f'{g:.2f}' for g in got)}")
        print(f"run {length:.0f} s (window from {warm:.0f} s), simulated / exact_lambda by seed: "
              + " | ".join(cells) + f"  [{time.monotonic() - t0:.0f} s]", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
