"""The link-cut case in the simulator, at the eval's scaling, over seeds: how much lower P90 TTFT
of the cut's arrivals is with the controllers (short-term, split guard) than with the plan's
threshold fixed, for each offered rate, cut depth and run length. Each point is the same arrivals
twice, as `prfaas eval link-cut` runs them; the cut lasts [0.25, 0.65) of the run.

    .venv/bin/python bench/link_cut_sweep.py [--rates 0.6,0.7] [--cuts 0.1,0.05]
        [--durations 120,240,360] [--seeds 8] [--no-split]

Prints, per point, the mean, least and greatest reduction over the seeds and each seed's (a
positive figure: the controllers' P90 is that much lower). Results: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prfaas.eval.command import EvalConfig, real_model, setup_of  # noqa: E402
from prfaas.eval.dynamic import WINDOWS, segments_for  # noqa: E402
from prfaas.eval.run import simulate  # noqa: E402
from prfaas.eval.scale import Scaling  # noqa: E402
from prfaas.eval.workload import lognormal  # noqa: E402


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=_floats, default=[0.6, 0.7], help="offered, fractions of Lambda_max")
    ap.add_argument("--cuts", type=_floats, default=[0.1, 0.05], help="the link's rate in the cut, of its own")
    ap.add_argument("--durations", type=_floats, default=[120.0, 240.0, 360.0], help="run lengths (real s)")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--time-factor", type=float, default=2.0)
    ap.add_argument("--decode-scale", type=float, default=4.0)
    ap.add_argument("--no-split", action="store_true", help="the short-term controller alone")
    a = ap.parse_args()
    scaling = Scaling(time_factor=a.time_factor, decode_scale=a.decode_scale)
    cfg = EvalConfig(scaling=scaling)
    model, tokens = real_model(cfg.model)
    setup = setup_of(cfg, model)
    plan = setup.plans["prfaas"]
    full = setup.system.link_bytes_per_s
    t0 = time.monotonic()
    for duration in a.durations:
        window = (WINDOWS["link-cut"][0] * duration, WINDOWS["link-cut"][1] * duration)
        for rate in a.rates:
            for cut in a.cuts:
                got = []
                for seed in range(1, a.seeds + 1):
                    reqs = lognormal(segments_for("link-cut", rate * plan.lambda_max, duration, setup.dist),
                                     scaling, tokens, seed, setup.paper.output_tokens, 0.0)
                    events = [(window[0], full * cut), (window[1], full)]
                    static, _ = simulate(setup, "prfaas", reqs, 4 * duration, window, False, events)
                    controlled, _ = simulate(setup, "prfaas", reqs, 4 * duration, window, True, events,
                                             split=not a.no_split)
                    got.append(1 - controlled["ttft_p90"] / static["ttft_p90"])
                span = window[1] - window[0]
                print(f"run {duration:.0f} s, rate {rate} x Lambda_max, cut to {cut:.0%} for {span:.0f} s: P90"
                      f" lower by {statistics.mean(got):+.0%} (least {min(got):+.0%}, most {max(got):+.0%});"
                      f" seeds {' '.join(f'{g:+.0%}' for g in got)}  [{time.monotonic() - t0:.0f} s]", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
