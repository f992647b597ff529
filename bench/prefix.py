"""The prefix cache on a real workload: a scaled slice of the Mooncake conversation trace replayed
against a live LocalCluster (real processes, gRPC, the raw-TCP KV data plane) with the cache off,
on prefill nodes only, and full (prefill + decode nodes + cross-cluster moves), in one run.

    .venv/bin/python bench/prefix.py [TRACE] [--window 0 1800] [--every 48] [--time-factor 0.1]
                                     [--max-output 16] [--modes off,prefill,full] [--plot docs/img/prefix_cache.png]

TRACE defaults to ../shared/traces/mooncake_conversation_trace.jsonl (beside the repository).
Scaling: lengths and blocks divided by `--length-factor` (32: 512-token blocks become 16-token
ones, as this model's KV blocks), times multiplied by `--time-factor`. So that the machine keeps up,
the slice keeps whole conversations: every `--every`-th conversation of the window (a conversation
is the requests sharing their second block, i.e. everything but the common system prompt), every
turn of it, at its own arrival time. Outputs are capped at `--max-output` tokens (ignore_eos).

Printed per mode: requests served, prompt tokens and those computed, the hit rate (prompt tokens
not computed) against the slice's own upper bound (`Trace.reuse_bound`: tokens whose full block was
seen before), tokens the decode nodes already held, the KV bytes over the cross-cluster link (PrfaaS
prefill nodes' pushes plus prefix moves), prefix moves, and mean / P90 TTFT as the client saw it.
Counters come from every process's Prometheus endpoint. Results: docs/prefix_cache.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from prfaas.cluster.local import ClusterSpec, LocalCluster  # noqa: E402
from prfaas.model.presets import resolve_model  # noqa: E402
from prfaas.sim.trace import Scaling, TokenSpace, Trace, TraceRequest, reuse_bound  # noqa: E402
from tests.support import stream  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = ROOT.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
MODES = {  # mode -> (the nodes' --prefix-cache, the router's --bandwidth-mode)
    "off": ("off", "scarce"),
    "prefill": ("prefill", "scarce"),
    "full": ("full", "abundant"),
}


def conversations(trace: Trace, every: int) -> list[TraceRequest]:
    """Every `every`-th conversation of the slice, whole (see the module docstring)."""
    def key(r: TraceRequest) -> str:
        return str(r.hash_ids[1]) if len(r.hash_ids) > 1 else f"single-{r.index}"
    return [r for r in trace.requests
            if int.from_bytes(hashlib.blake2b(key(r).encode(), digest_size=8).digest(), "little") % every == 0]


def scrape(url: str) -> dict[str, float]:
    """Every counter's total (summed over its labels) from one /metrics endpoint."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith("_total"):
                out[s.name] = out.get(s.name, 0.0) + s.value
                if "decision" in s.labels:
                    out[f"{s.name}|{s.labels['decision']}"] = s.value
    return out


def totals(c: LocalCluster) -> dict[str, float]:
    per = {name: scrape(url) for name, url in c.metrics_urls.items()}
    def total(metric: str, prefix: str = "") -> float:
        return sum(v.get(metric, 0.0) for name, v in per.items() if name.startswith(prefix))
    return {
        "computed": total("prfaas_prompt_tokens_computed_total"),
        "prefill_hits": total("prfaas_prefix_cache_hits_total", "router"),
        "decode_hits": total("prfaas_decode_prefix_cache_hits_total"),
        "offloaded_kv_bytes": total("prfaas_kv_transfer_bytes_total", "prfaas-"),
        "move_bytes": total("prfaas_prefix_move_bytes_total", "router"),
        "moved": total_where(per, "prfaas_prefix_moves_total", "moved"),
        "recomputed": total_where(per, "prfaas_prefix_moves_total", "recomputed"),
    }


def total_where(per: dict[str, dict[str, float]], metric: str, decision: str) -> float:
    return per.get("router", {}).get(f"{metric}|{decision}", 0.0)


async def replay(address: str, reqs: list[tuple[float, list[int], int]]) -> list[dict]:
    t0 = time.monotonic()
    done = 0

    async def one(at: float, prompt: list[int], out_len: int) -> dict:
        nonlocal done
        await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
        s = await stream(address, timeout_s=300, token_ids=prompt, max_tokens=out_len, ignore_eos=True)
        done += 1
        if done % 20 == 0:
            print(f"  {done}/{len(reqs)} done at {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        cached = getattr(s.head, "cached_tokens", 0) if s.head is not None else 0
        return {"code": s.code, "ttft_s": s.first_at, "prompt": len(prompt), "cached": cached,
                "route": getattr(s.head, "route", 0)}

    return list(await asyncio.gather(*(one(*r) for r in reqs)))


def run_mode(mode: str, model: str, reqs: list[tuple[float, list[int], int]], args: argparse.Namespace) -> dict:
    cache, bandwidth = MODES[mode]
    env = {"PRFAAS_PREFIX_CACHE": cache, "PRFAAS_KV_BLOCKS": str(args.kv_blocks),
           "PRFAAS_CHECKPOINT_TOKENS": str(args.checkpoint_tokens), "PRFAAS_STATE_SLOTS": str(args.state_slots),
           "PRFAAS_PREFIX_STATES": str(args.prefix_states)}
    spec = ClusterSpec(prfaas_prefill=args.prfaas_prefill, local_prefill=1, local_decode=1,
                       threshold_tokens=args.threshold, frontdoor=False, extra_env=env,
                       router_env={"PRFAAS_BANDWIDTH_MODE": bandwidth, "PRFAAS_CONTROL_INTERVAL_S": "0",
                                   "PRFAAS_MAX_QUEUE_WAIT_S": "300"})
    print(f"mode {mode}: starting the cluster", file=sys.stderr, flush=True)
    with LocalCluster(model, spec, log_dir=args.logs and f"{args.logs}/{mode}") as c:
        before = totals(c)
        results = asyncio.run(replay(c.router_address, reqs))
        time.sleep(1.0)  # the last counters reach their endpoints
        after = totals(c)
    ok = [r for r in results if r["code"] == "OK"]
    ttfts = sorted(r["ttft_s"] for r in ok)
    d = {k: after[k] - before[k] for k in after}
    prompt = sum(r["prompt"] for r in ok)
    return {
        "mode": mode, "requests": len(results), "ok": len(ok), "prompt_tokens": prompt,
        "computed_tokens": int(d["computed"]), "hit_rate": 1 - d["computed"] / prompt if prompt else 0.0,
        "decode_held_tokens": int(d["decode_hits"]),
        "cross_cluster_bytes": int(d["offloaded_kv_bytes"] + d["move_bytes"]), "move_bytes": int(d["move_bytes"]),
        "moved": int(d["moved"]), "recomputed": int(d["recomputed"]),
        "offloaded": sum(1 for r in ok if r["route"] == 2),
        "ttft_mean_s": statistics.fmean(ttfts) if ttfts else 0.0,
        "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))] if ttfts else 0.0,
    }


def table(rows: list[dict], bound: float) -> str:
    head = (f"| mode | ok | prompt tokens | computed | hit rate (bound {bound:.3f}) | decode held | cross-cluster MB "
            "| moved / recomputed | offloaded | TTFT mean / P90 (s) |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['ok']}/{r['requests']} | {r['prompt_tokens']:,} | {r['computed_tokens']:,} "
                     f"| {r['hit_rate']:.3f} ({r['hit_rate'] / bound:.0%} of it) | {r['decode_held_tokens']:,} "
                     f"| {r['cross_cluster_bytes'] / 1e6:.1f} | {r['moved']} / {r['recomputed']} | {r['offloaded']} "
                     f"| {r['ttft_mean_s']:.2f} / {r['ttft_p90_s']:.2f} |")
    base = {r["mode"]: r for r in rows}
    if "prefill" in base and "full" in base and base["full"]["cross_cluster_bytes"]:
        lines.append(f"\ncross-cluster bytes, prefill-only / full: "
                     f"{base['prefill']['cross_cluster_bytes'] / base['full']['cross_cluster_bytes']:.2f}x")
    if "off" in base and "full" in base and base["full"]["computed_tokens"]:
        lines.append(f"prompt tokens computed, off / full: "
                     f"{base['off']['computed_tokens'] / base['full']['computed_tokens']:.2f}x")
    return "\n".join(lines)


def plot(rows: list[dict], bound: float, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [r["mode"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.6))
    ax[0].bar(modes, [r["hit_rate"] for r in rows], color="tab:green")
    ax[0].axhline(bound, ls="--", color="k", label=f"trace bound {bound:.3f}")
    ax[0].set_title("hit rate (prompt tokens not computed)")
    ax[0].legend(loc="lower right")
    ax[1].bar(modes, [r["cross_cluster_bytes"] / 1e6 for r in rows], color="tab:blue")
    ax[1].set_title("KV over the cross-cluster link (MB)")
    x = range(len(rows))
    ax[2].bar([i - 0.2 for i in x], [r["ttft_mean_s"] for r in rows], 0.4, label="mean")
    ax[2].bar([i + 0.2 for i in x], [r["ttft_p90_s"] for r in rows], 0.4, label="P90")
    ax[2].set_xticks(list(x), modes)
    ax[2].set_title("TTFT (s)")
    ax[2].legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", nargs="?", default=str(DEFAULT_TRACE))
    p.add_argument("--model", default="builtin:qwen3_next-tiny")
    p.add_argument("--window", nargs=2, type=float, default=(0.0, 1800.0), metavar=("START", "END"))
    p.add_argument("--first", type=int, default=None, help="the window's first N requests")
    p.add_argument("--every", type=int, default=48, help="keep every N-th conversation")
    p.add_argument("--length-factor", type=int, default=32)
    p.add_argument("--time-factor", type=float, default=0.1)
    p.add_argument("--max-output", type=int, default=16)
    p.add_argument("--modes", default="off,prefill,full")
    p.add_argument("--threshold", type=int, default=256, help="the router's offload threshold (tokens)")
    p.add_argument("--prfaas-prefill", type=int, default=2)
    p.add_argument("--kv-blocks", type=int, default=2048, help="KV blocks per node (16 tokens each)")
    p.add_argument("--checkpoint-tokens", type=int, default=256)
    p.add_argument("--state-slots", type=int, default=192, help="linear-state slots per node")
    p.add_argument("--prefix-states", type=int, default=128, help="of them, the prefix cache's at most")
    p.add_argument("--json", default="", help="write the rows here")
    p.add_argument("--plot", default="")
    p.add_argument("--logs", default="", help="keep every process's log under this directory")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        p.error(f"unknown modes {unknown}; known: {', '.join(MODES)}")
    trace = Trace.load(args.trace, Scaling(args.length_factor, args.time_factor), first=args.first,
                       window=tuple(args.window))
    picked = conversations(trace, args.every)
    if not picked:
        p.error("the slice keeps no request: widen --window or lower --every")
    model = str(resolve_model(args.model))
    space = TokenSpace.from_model_config(json.loads((Path(model) / "config.json").read_text()))
    reqs = [(r.arrival_s, space.prompt(r), min(r.output_length, args.max_output)) for r in picked]
    bound = reuse_bound(picked).full_block_fraction
    print(f"trace {args.trace}: {len(trace.requests)} requests in the window, {len(picked)} kept "
          f"(every {args.every}-th conversation) over {picked[-1].arrival_s:.0f} s; mean prompt "
          f"{statistics.fmean(len(r[1]) for r in reqs):.0f} tokens; reuse bound (full blocks) {bound:.4f}", flush=True)
    rows = [run_mode(m, model, reqs, args) for m in modes]
    print(table(rows, bound))
    if args.json:
        Path(args.json).write_text(json.dumps({"bound": bound, "rows": rows, "args": vars(args)}, indent=1))
    if args.plot:
        plot(rows, bound, args.plot)


if __name__ == "__main__":
    main()
