"""Time our delta rule - the chunked torch form and the C kernel for the CPU - against
transformers' torch fallbacks on the same inputs.

    PYTHONPATH=. .venv/bin/python bench/ops.py [--T 4096] [--repeats 5] [--threads 1] [--chunk-size 64]

Each case alternates ours and the reference and keeps the best time of each, which is what
matters on a shared machine. The kernel column is empty where the machine has no C compiler.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from transformers.models.kimi_linear.modeling_kimi_linear import chunk_kimi_delta_attention
from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

from prfaas.model.ops import cpu_kernel
from prfaas.model.ops.delta_rule import chunk_delta_rule

SHAPES = [(4, 128), (8, 64)]  # (H, K = V)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--chunk-size", type=int, default=None, help="default: by gate kind")
    parser.add_argument("--gate", choices=["both", "head", "channel"], default="both")
    parser.add_argument("--skip-reference", action="store_true", help="time only ours")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads={torch.get_num_threads()} T={args.T} chunk_size={args.chunk_size or 'default'}")
    kernel = cpu_kernel.available()
    print(f"{'gate':<13}{'dtype':<10}{'H':>3}{'K':>5}{'chunked ms':>11}{'kernel ms':>10}{'hf ms':>10}"
          f"{'chunked x':>10}{'kernel x':>9}")
    gates = {"both": (False, True), "head": (False,), "channel": (True,)}[args.gate]
    for per_channel in gates:
        for dtype in (torch.float32, torch.bfloat16):
            for H, K in SHAPES:
                T = args.T
                q = F.normalize(torch.randn(1, T, H, K), dim=-1).to(dtype)
                k = F.normalize(torch.randn(1, T, H, K), dim=-1).to(dtype)
                v = torch.randn(1, T, H, K, dtype=dtype)
                g = -torch.rand(1, T, H, *((K,) if per_channel else ())).to(dtype)
                beta = torch.rand(1, T, H, dtype=dtype)
                reference = chunk_kimi_delta_attention if per_channel else torch_chunk_gated_delta_rule

                ours = partial(chunk_delta_rule, q, k, v, g, beta, K**-0.5, chunk_size=args.chunk_size)
                hf = partial(reference, q, k, v, g, beta, output_final_state=True)

                def ours_kernel(q=q, k=k, v=v, g=g, beta=beta, H=H, K=K) -> None:
                    cpu_kernel.delta_rule(q[0], k[0], v[0], g[0], beta[0], K**-0.5, torch.zeros(H, K, K))

                ours()
                if kernel:
                    ours_kernel()
                t_ours, t_kernel, t_hf = float("inf"), float("inf"), float("inf")
                for _ in range(args.repeats):
                    t_ours = min(t_ours, timed(ours))
                    if kernel:
                        t_kernel = min(t_kernel, timed(ours_kernel))
                    if not args.skip_reference:
                        t_hf = min(t_hf, timed(hf))
                name = "per-channel" if per_channel else "per-head"
                kernel_cols = (f"{t_kernel * 1e3:>10.1f}", f"{t_hf / t_kernel:>9.1f}") if kernel else ("", "")
                print(f"{name:<13}{str(dtype)[6:]:<10}{H:>3}{K:>5}{t_ours * 1e3:>11.1f}{kernel_cols[0]:>10}"
                      f"{t_hf * 1e3:>10.1f}{t_hf / t_ours:>10.1f}{kernel_cols[1]:>9}", flush=True)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
