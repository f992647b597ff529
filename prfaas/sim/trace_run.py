"""`prfaas sim --trace FILE`: a request trace through the simulator, with simulated prefix caches.

The trace (prfaas/sim/trace.py: sliced, scaled) gives every request its arrival, prompt and output
length and the chained keys of its full blocks. The deployment and threshold are the planner's for
the paper's hardware (PAPER.md case study: 4 PrfaaS + 8 local instances, 12 for homogeneous) fed
with the trace itself: its prompt lengths (`EmpiricalLengths`, no cache assumed) and its mean output
length. The policy objects are the live router's (`prfaas.scheduling.policy`), threshold fixed.

Cache modes, as the live benchmark compares them:
- `off`: no prefix cache; every offloaded prefill sends `S_kv(P)`.
- `prefill`: prefill nodes keep LRUs of blocks (`--cache-blocks` each); a hit shortens the prefill
  and makes placement cache-affine, but the decode node holds nothing, so `S_kv(P)` still crosses.
- `full`: decode nodes keep the prompts they decoded too, and an offloaded prefill sends only
  `S_kv(P - h)`, `h` the chosen decode node's hit (placement does not weigh it: the policy's decode
  choice is load, then space). Cross-cluster prefix moves (abundant mode) are not modelled.
Hit rate = cached prompt tokens / prompt tokens, against the trace's own bound (trace.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from prfaas.scheduling.lengths import EmpiricalLengths
from prfaas.scheduling.model import SystemProfile, Throughput
from prfaas.scheduling.planner import paper_case_study, plan_homogeneous, plan_naive, plan_prfaas
from prfaas.scheduling.policy import HomogeneousPolicy, NaivePolicy, PrfaasPolicy, RoutingPolicy
from prfaas.sim.metrics import Summary, summarise
from prfaas.sim.prefix import PrefixCaches
from prfaas.sim.simulator import Req, SimConfig, Simulator
from prfaas.sim.trace import Scaling, Trace, TraceError, chain_keys, reusable_per_request
from prfaas.sim.workload import Arrival

CACHE_MODES = ("off", "prefill", "full")
DEFAULT_CACHE_BLOCKS = 8192     # per node: 4M tokens of 512-token blocks, ~70 GB at the case study's KV size
DRAIN_S = 3600.0                # simulated time after the last arrival for the queues to empty
Progress = Callable[[str, float], None] | None


def trace_arrivals(trace: Trace) -> list[Arrival]:
    out = []
    for req, keys in zip(trace.requests, chain_keys(trace.requests), strict=True):
        full = req.input_length // req.block_tokens
        out.append(Arrival(f"t{req.index}", req.arrival_s, req.input_length, None, req.output_length, keys[:full]))
    return out


def trace_plans(trace: Trace) -> tuple[SystemProfile, dict[str, Throughput]]:
    """The planner's deployments for the case-study hardware and this trace's lengths."""
    sc = paper_case_study()
    mean_out = sum(r.output_length for r in trace.requests) / len(trace.requests)
    sp = replace(sc.system, output_tokens=max(1, round(mean_out)))
    dist = EmpiricalLengths(r.input_length for r in trace.requests)
    return sp, {
        "prfaas": plan_prfaas(sp, dist, sc.n_prfaas, sc.n_local),
        "homogeneous": plan_homogeneous(sp, dist, sc.n_homogeneous),
        "naive": plan_naive(sp, dist, sc.n_prfaas, sc.n_local),
    }


@dataclass(frozen=True)
class CacheStats:
    prompt_tokens: int
    cached_tokens: int
    computed_tokens: int
    cross_cluster_bytes: float

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(frozen=True)
class TraceRun:
    label: str
    plan: Throughput
    summary: Summary
    cache: CacheStats
    reqs: list[Req]


def _policy(kind: str, plan: Throughput) -> RoutingPolicy:
    return {"homogeneous": HomogeneousPolicy, "naive": NaivePolicy}.get(kind, lambda: PrfaasPolicy(plan.threshold))()


def run_trace(trace: Trace, sp: SystemProfile, plan: Throughput, policy_kind: str, cache_mode: str,
              capacity_blocks: int = DEFAULT_CACHE_BLOCKS, progress: Progress = None,
              policy: RoutingPolicy | None = None, checkpoint_tokens: int = 0) -> TraceRun:
    """One run; `policy` replaces the plan's policy object (same interface), for experiments."""
    if cache_mode not in CACHE_MODES:
        raise ValueError(f"cache mode must be one of {CACHE_MODES}, got {cache_mode!r}")
    caches = None if cache_mode == "off" else PrefixCaches(capacity_blocks, trace.scaling.block_tokens,
                                                           cache_mode == "full", checkpoint_tokens)
    label = f"{policy_kind}/{cache_mode}"
    end = trace.duration_s + 1e-6
    sim = Simulator(sp, plan.deployment, policy or _policy(policy_kind, plan), SimConfig(end + DRAIN_S), caches=caches)
    reqs = sim.run(trace_arrivals(trace), (lambda t: progress(label, t)) if progress else None)
    stats = CacheStats(sum(r.arrival.prompt_tokens for r in reqs), sum(r.cached for r in reqs),
                       sum(r.uncached for r in reqs), sum(r.kv_bytes for r in reqs))
    return TraceRun(label, plan, summarise(reqs, sim.samples, 0.0, end), stats, reqs)


def run_all(trace: Trace, policies: Sequence[str] = ("prfaas",), modes: Sequence[str] = CACHE_MODES,
            capacity_blocks: int = DEFAULT_CACHE_BLOCKS, progress: Progress = None,
            checkpoint_tokens: int = 0) -> dict[str, TraceRun]:
    sp, plans = trace_plans(trace)
    runs = [run_trace(trace, sp, plans[p], p, m, capacity_blocks, progress, checkpoint_tokens=checkpoint_tokens)
            for p in policies for m in modes]
    return {r.label: r for r in runs}


def row(run: TraceRun) -> dict:
    s = run.summary
    return {"throughput": s.throughput, "completed": s.completed, "unserved": s.unserved,
            "ttft_mean": s.ttft_mean, "ttft_p50": s.ttft_p50, "ttft_p90": s.ttft_p90,
            "offload_fraction": s.offload_fraction, "link_util": s.link_util,
            "hit_rate": run.cache.hit_rate, "computed_tokens": run.cache.computed_tokens,
            "cross_cluster_gb": run.cache.cross_cluster_bytes / 1e9}


def _cumulative_bound(trace: Trace) -> list[float]:
    out, hit, prompt = [], 0, 0
    for (h, _), req in zip(reusable_per_request(trace.requests), trace.requests, strict=True):
        hit, prompt = hit + h, prompt + req.input_length
        out.append(hit / prompt)
    return out


def _series(run: TraceRun, window: int) -> tuple[list[float], list[float], list[float], list[float]]:
    """Arrival times, cumulative hit rate, cumulative cross-cluster GB, TTFT (mean of `window`)."""
    times, hits, gb, ttft, cached, prompt, sent = [], [], [], [], 0, 0, 0.0
    for r in run.reqs:
        cached, prompt, sent = cached + r.cached, prompt + r.arrival.prompt_tokens, sent + r.kv_bytes
        times.append(r.arrival.time)
        hits.append(cached / prompt)
        gb.append(sent / 1e9)
        ttft.append(r.first_token - r.arrival.time if r.first_token >= 0 else float("nan"))
    mean = [sum(ttft[max(0, i - window + 1):i + 1]) / len(ttft[max(0, i - window + 1):i + 1])
            for i in range(len(ttft))]
    return times, hits, gb, mean


def plot_trace(name: str, trace: Trace, runs: dict[str, TraceRun], out: Path) -> Path:
    from prfaas.sim.plots import pyplot

    plt = pyplot()

    out.mkdir(parents=True, exist_ok=True)
    window = max(1, len(trace.requests) // 50)
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    axes[0].plot([r.arrival_s for r in trace.requests], _cumulative_bound(trace), "k--", lw=1, label="trace bound")
    for label, run in runs.items():
        times, hits, gb, ttft = _series(run, window)
        axes[0].plot(times, hits, label=label)
        axes[1].plot(times, gb, label=label)
        axes[2].plot(times, ttft, label=label)
    for ax, y in zip(axes, ["hit rate (cumulative)", "cross-cluster GB", f"TTFT s (mean of {window})"], strict=True):
        ax.set_ylabel(y)
        ax.legend(fontsize=7)
    axes[2].set_yscale("log")
    axes[-1].set_xlabel("arrival time (s, scaled)")
    axes[0].set_title(f"sim: trace {name}")
    fig.tight_layout()
    path = out / f"sim_trace_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("trace replay (--trace)")
    g.add_argument("--trace", type=Path, help="a Mooncake-format JSONL trace to replay instead of a scenario")
    g.add_argument("--length-factor", type=int, default=1, help="divide lengths and the 512-token block by it")
    g.add_argument("--time-factor", type=float, default=1.0, help="multiply arrival times by it")
    g.add_argument("--first", type=int, help="only the first N requests (after --window)")
    g.add_argument("--window", type=float, nargs=2, metavar=("START", "END"),
                   help="only requests arriving in [START, END) seconds of the trace's clock")
    g.add_argument("--cache", default="all", choices=["all", *CACHE_MODES], help="prefix-cache mode(s) to run")
    g.add_argument("--cache-blocks", type=int, default=DEFAULT_CACHE_BLOCKS,
                   help="blocks each node's simulated cache holds")
    g.add_argument("--checkpoint-tokens", type=int, default=0,
                   help="a hit is usable only at multiples of it (scaled tokens, a multiple of the block; "
                   "0: every block)")


def trace_main(args: argparse.Namespace) -> int:
    try:
        trace = Trace.load(args.trace, Scaling(args.length_factor, args.time_factor), args.first,
                           tuple(args.window) if args.window else None)
    except (TraceError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.cache_blocks <= 0:
        print(f"error: --cache-blocks must be positive, got {args.cache_blocks}", file=sys.stderr)
        return 2
    bt = trace.scaling.block_tokens
    if args.checkpoint_tokens < 0 or args.checkpoint_tokens % bt:
        print(f"error: --checkpoint-tokens must be a multiple of the block ({bt} tokens), "
              f"got {args.checkpoint_tokens}", file=sys.stderr)
        return 2

    def progress(label: str, t: float) -> None:
        print(f"[trace/{label}] t={t:7.0f} s", file=sys.stderr, flush=True)

    modes = CACHE_MODES if args.cache == "all" else (args.cache,)
    runs = run_all(trace, (args.policy or "prfaas",), modes, args.cache_blocks, progress, args.checkpoint_tokens)
    plan = next(iter(runs.values())).plan
    head = {"source": str(args.trace), "requests": len(trace.requests), "span_s": trace.duration_s,
            "length_factor": args.length_factor, "time_factor": args.time_factor,
            "block_tokens": bt, "cache_blocks": args.cache_blocks, "checkpoint_tokens": args.checkpoint_tokens,
            "reuse_bound": trace.reuse_bound().as_dict(),
            "reuse_bound_trace_units": trace.reuse_bound(scaled=False).as_dict(),
            "plan": {"n_prfaas": plan.deployment.n_prfaas, "n_p": plan.deployment.n_p,
                     "n_d": plan.deployment.n_d, "threshold": plan.threshold, "lambda_max": plan.lambda_max}}
    table = {label: row(r) for label, r in runs.items()}
    if args.json:
        print(json.dumps({"trace": head, "runs": table}))
        return 0
    b, bt = head["reuse_bound"], head["reuse_bound_trace_units"]
    print(f"trace {args.trace}: {len(trace.requests)} requests over {trace.duration_s:.0f} s, "
          f"blocks of {trace.scaling.block_tokens}; reuse bound {b['fraction']:.4f} "
          f"(full blocks {b['full_block_fraction']:.4f}; trace units {bt['fraction']:.4f})")
    print("plan: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in head["plan"].items()))
    name = args.trace.stem + (f"_w{args.window[0]:g}-{args.window[1]:g}" if args.window else "") + (
        f"_n{args.first}" if args.first else "") + (f"_ck{args.checkpoint_tokens}" if args.checkpoint_tokens else "")
    print(f"wrote {plot_trace(name, trace, runs, Path(args.out))}")
    for label, r in table.items():
        print(label + ": " + ", ".join(f"{a}={v:.3f}" if isinstance(v, float) else f"{a}={v}" for a, v in r.items()))
    return 0
