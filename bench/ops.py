"""Time our chunked delta rule against transformers' torch fallbacks on the same inputs.

    .venv/bin/python bench/ops.py [--T 4096] [--repeats 3] [--chunk-size 64]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers.models.kimi_linear.modeling_kimi_linear import chunk_kimi_delta_attention
from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

from prfaas.model.ops.delta_rule import chunk_delta_rule

SHAPES = [(4, 128), (8, 64)]  # (H, K = V)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--skip-reference", action="store_true", help="time only ours")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"threads={torch.get_num_threads()} T={args.T} chunk_size={args.chunk_size}")
    print(f"{'gate':<12}{'dtype':<10}{'H':>3}{'K':>5}{'ours ms':>10}{'hf ms':>10}{'speedup':>9}")
    for per_channel in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            for H, K in SHAPES:
                T = args.T
                q = F.normalize(torch.randn(1, T, H, K), dim=-1).to(dtype)
                k = F.normalize(torch.randn(1, T, H, K), dim=-1).to(dtype)
                v = torch.randn(1, T, H, K, dtype=dtype)
                g = -torch.rand(1, T, H, *((K,) if per_channel else ())).to(dtype)
                beta = torch.rand(1, T, H, dtype=dtype)
                ours = best_of(
                    lambda: chunk_delta_rule(q, k, v, g, beta, K**-0.5, chunk_size=args.chunk_size),
                    args.repeats,
                )
                reference = torch_chunk_gated_delta_rule if not per_channel else chunk_kimi_delta_attention
                hf = float("nan") if args.skip_reference else best_of(
                    lambda: reference(q, k, v, g, beta, output_final_state=True), args.repeats
                )
                name = "per-channel" if per_channel else "per-head"
                print(f"{name:<12}{str(dtype)[6:]:<10}{H:>3}{K:>5}{ours * 1e3:>10.1f}{hf * 1e3:>10.1f}"
                      f"{hf / ours:>9.1f}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
