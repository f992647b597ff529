"""Where a decode step's time goes, at batch 1 and in a continuous batch of 16, on bench/engine.py's
checkpoints: the torch reference step (`off`: torch ops per step and the top ops by self CPU time,
from torch.profiler) and the fused C step (`on`: its parts, timed inside the C code by its timing
build, and what is left for Python).

    PYTHONPATH=. .venv/bin/python bench/decode_profile.py [--families qwen3_next] [--dtype fp32]
                                                        [--threads 2] [--steps 32] [--top 12]
                                                        [--fast-decode off,on]

Timings are the best of three runs of `--steps` steps (prompts as bench/engine.py's decode: 128
tokens at batch 1, 64..499 at batch 16); the fused step's parts and "outside" are from one more
run of `--steps` steps. The machine is shared: read them as proportions. At two threads on a
loaded machine every OpenMP barrier can wait a scheduler slice: use --threads 1 there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import DTYPES, FAMILIES, make_checkpoint, prompt_of  # noqa: E402

from prfaas.engine.executor import Executor, SeqState  # noqa: E402
from prfaas.kv.layout import KvLayout  # noqa: E402
from prfaas.messages import SamplingParams  # noqa: E402
from prfaas.model.fast_decode import FastDecoder  # noqa: E402
from prfaas.model.loader import load_model  # noqa: E402

BATCHES = {"b1": (128,), "b16": tuple(64 + 29 * i for i in range(16))}


def start(ex: Executor, lens: tuple[int, ...], steps: int) -> list[SeqState]:
    params = SamplingParams(max_tokens=4 * steps + 8, ignore_eos=True)
    seqs = [ex.add(f"r{i}", prompt_of(n, 100 + i), params) for i, n in enumerate(lens)]
    for s in seqs:
        ex.prefill(s)
    ex.decode_step(seqs)  # warm: the first step builds what later steps reuse
    return seqs


def timed(ex: Executor, seqs: list[SeqState], steps: int) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            ex.decode_step(seqs)
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def torch_profile(ex: Executor, seqs: list[SeqState], steps: int, top: int) -> str:
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(steps):
            ex.decode_step(seqs)
    events = p.key_averages()
    calls = sum(e.count for e in events)
    return f"  torch ops per step: {calls / steps:.0f}\n" + events.table(sort_by="self_cpu_time_total", row_limit=top)


def c_profile(ex: Executor, seqs: list[SeqState], steps: int) -> str:
    """The C parts and the rest (Python around the call), over the same timed steps."""
    assert ex._fast is not None
    ex._fast.take_profile()
    t0 = time.perf_counter()
    for _ in range(steps):
        ex.decode_step(seqs)
    dt = (time.perf_counter() - t0) / steps
    parts = {k: v / steps for k, v in ex._fast.take_profile().items()}
    inside = sum(parts.values())
    lines = [f"  torch ops per step: 0 (one C call); in C {inside * 1e3:.3f} ms/step, outside (Python) "
             f"{max(dt - inside, 0) * 1e3:.3f} ms/step"]
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {k:<36} {v * 1e3:7.3f} ms  {v / inside:6.1%}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--fast-decode", default="off,on", help="comma-separated: off (torch step), on (fused C step)")
    parser.add_argument("--no-profile", action="store_true", help="timings only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modes = [m for m in args.fast_decode.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for family in args.families.split(","):
            path = Path(tmp) / family
            make_checkpoint(family, path)
            for dname in args.dtype.split(","):
                dtype = DTYPES[dname]
                model = load_model(path, dtype=dtype)
                for mode in modes:
                    ex = Executor(model, KvLayout(model.config, block_size=16, dtype=dtype), num_blocks=1024,
                                  num_slots=32, fast_decode=mode == "on")
                    if mode == "on":  # the timing build of the same step
                        ex._fast = FastDecoder(model, ex.caches, 16, timing=not args.no_profile)
                    for name, lens in BATCHES.items():
                        seqs = start(ex, lens, args.steps)
                        dt = timed(ex, seqs, args.steps)
                        print(f"{family} {dname} fast_decode={mode} {name}: {dt * 1e3:.2f} ms/step, "
                              f"{len(lens) / dt:,.0f} tok/s", flush=True)
                        if not args.no_profile:
                            report = (c_profile(ex, seqs, args.steps) if mode == "on"
                                      else torch_profile(ex, seqs, args.steps, args.top))
                            print(report, flush=True)
                        for s in seqs:
                            ex.free(s)


if __name__ == "__main__":
    main()
