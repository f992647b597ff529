"""`prfaas eval steady|link-cut|quick|profile`: flags to an `EvalConfig`, then the library does the work.
`profile` measures this machine's node (prefill by length, decode step by batch) into
`--out`/node_profile.json, which `--profiles FILE` then puts on every node instead of the case study's."""

from __future__ import annotations

import json
import sys

from prfaas.eval.command import EvalConfig
from prfaas.eval.scale import DEPLOYMENTS, Scaling, Shape
from prfaas.settings import command_parser, non_negative_float, positive_float, positive_int

QUICK = {"scaling": Scaling(0.25, 256, 128, 4), "shape": Shape(1, 2, 3), "rates": (0.5,), "duration_s": 10.0,
         "warmup_s": 0.0}


def _floats(text: str) -> tuple[float, ...]:
    try:
        out = tuple(float(x) for x in text.split(",") if x)
    except ValueError:
        raise ValueError(f"must be comma-separated numbers, got {text!r}") from None
    if not out or any(x <= 0 for x in out):
        raise ValueError(f"must be positive numbers, got {text!r}")
    return out


def _shape(text: str) -> Shape:
    try:
        a, b, c = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"must be N_PRFAAS,N_LOCAL,N_HOMOGENEOUS, got {text!r}") from None
    return Shape(a, b, c)


def _fraction(text: str) -> float:
    v = positive_float(text)
    if v > 1:
        raise ValueError(f"must be in (0, 1], got {text}")
    return v


def eval_command(argv: list[str]) -> int:
    p = command_parser("prfaas eval", __doc__)
    p.add_argument("case", choices=["steady", "link-cut", "burst", "mix-shift", "quick", "profile"],
                   help="steady: rate sweep of every deployment; link-cut: PrfaaS static vs controlled under a "
                        "link cut; burst, mix-shift: the same pair under a long-prompt burst or a length-mix "
                        "shift; quick: the reduced steady form (a few requests, small shape); profile: measure "
                        "this machine's node")
    p.flag("--model", "EVAL_MODEL", "builtin:qwen3_next-tiny", str, "the served model")
    p.flag("--topology", "EVAL_TOPOLOGY", "auto", str, "two network namespaces, loopback, or auto",
           choices=["auto", "netns", "loopback"])
    p.flag("--time-factor", "EVAL_TIME_FACTOR", 1.0, positive_float, "emulated time = factor x the profile's")
    p.flag("--length-scale", "EVAL_LENGTH_SCALE", 64.0, positive_float, "profile tokens per real token")
    p.flag("--output-scale", "EVAL_OUTPUT_SCALE", 64.0, positive_float, "profile output tokens per real one")
    p.flag("--decode-scale", "EVAL_DECODE_SCALE", 4.0, positive_float,
           "decode batches BS_max / this, each step 1 / this of the time (same capacity, shorter requests)")
    p.flag("--shape", "EVAL_SHAPE", Shape(), _shape, "instances: PrfaaS,local,homogeneous (the case study: 4,8,12)")
    p.flag("--rates", "EVAL_RATES", (0.8, 1.0, 1.2), _floats, "offered rates, fractions of each predicted Lambda_max")
    p.flag("--duration-s", "EVAL_DURATION_S", 90.0, positive_float, "arrivals per rate point (real seconds)")
    p.flag("--warmup-s", "EVAL_WARMUP_S", 30.0, non_negative_float, "the steady window starts here")
    p.flag("--deployments", "EVAL_DEPLOYMENTS", ",".join(DEPLOYMENTS), str, "comma-separated subset")
    p.flag("--delay-ms", "EVAL_DELAY_MS", 5.0, non_negative_float, "one-way cross-datacenter delay (paper time)")
    p.flag("--output-spread", "EVAL_OUTPUT_SPREAD", 0.0, non_negative_float, "outputs uniform in L_out x (1 +- s)")
    p.flag("--trace", "EVAL_TRACE", "", str, "a Mooncake trace (JSONL) instead of the log-normal lengths")
    p.flag("--trace-requests", "EVAL_TRACE_REQUESTS", 200, positive_int, "requests of the trace")
    p.flag("--slo-ttft-s", "EVAL_SLO_TTFT_S", 30.0, positive_float, "P90 TTFT bound, paper seconds")
    p.flag("--slo-decode-tok-s", "EVAL_SLO_DECODE", 32.0, positive_float, "decode-speed floor, paper tokens/s")
    p.flag("--seed", "EVAL_SEED", 1, int, "workload seed")
    p.flag("--rate", "EVAL_RATE", 0.0, non_negative_float,
           "link-cut, burst, mix-shift: offered rate, fraction of Lambda_max (0: the case's own: 0.85, 0.7, 0.9)")
    p.flag("--cut-fraction", "EVAL_CUT_FRACTION", 0.1, _fraction, "link-cut: the link's rate in the cut, of its own")
    p.flag("--profiles", "EVAL_PROFILES", "", str, "a measured node profile (JSON, from `prfaas eval profile`) "
           "for every node; empty = the case study's H200 / H20")
    p.add_argument("--out", default=".prfaas/eval", help="results, logs and plots go here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = p.parse_args(argv)
    deployments = tuple(d for d in a.deployments.split(",") if d)
    if unknown := set(deployments) - set(DEPLOYMENTS):
        p.error(f"--deployments: unknown {sorted(unknown)}; choose from {', '.join(DEPLOYMENTS)}")
    scaling = Scaling(a.time_factor, a.length_scale, a.output_scale, a.decode_scale)
    cfg = EvalConfig(a.model, a.topology, scaling, a.shape,
                     deployments, a.rates, a.duration_s, a.warmup_s, a.seed, a.delay_ms, output_spread=a.output_spread,
                     trace=a.trace, trace_requests=a.trace_requests, slo_ttft_paper_s=a.slo_ttft_s,
                     slo_decode_tok_s=a.slo_decode_tok_s, out=a.out, profile=a.profiles)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if a.case == "profile":
        return _profile(a.model, a.out, log)
    if a.case == "quick":
        cfg = EvalConfig(**{**cfg.__dict__, **QUICK})
    if a.case in ("link-cut", "burst", "mix-shift"):
        from prfaas.eval.dynamic import dynamic_case

        summary = dynamic_case(cfg, a.case, a.rate or None, a.cut_fraction, log=log)
    else:
        from prfaas.eval.command import steady

        summary = steady(cfg, log=log)
    from prfaas.eval.plots import plot_all

    plot_all(cfg.out, log)
    print(json.dumps(summary, indent=1, default=str) if a.json else _text(summary))
    return 0


def _profile(model: str, out: str, log: object) -> int:
    from pathlib import Path

    from prfaas.eval.measure import measure_profile

    path = Path(out) / "node_profile.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    measure_profile(model, log=log).save(path)  # type: ignore[arg-type]
    print(path)
    return 0


def _text(summary: dict) -> str:
    from prfaas.eval.markdown import summary_markdown

    return summary_markdown(summary)
