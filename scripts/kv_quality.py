#!/usr/bin/env python3
"""What a KV wire format costs in quality, on the shipped trained models and held-out text.

For each family and wire format: N held-out prompts of P tokens are prefilled once (float32),
their KV travels through the real chunk encoder and decoder (prfaas/transport/wire.py) in that
format into a second executor, which then
  - decodes K tokens greedily: agreement with the exact transfer (continuations identical, and
    the mean share of tokens before the first difference);
  - scores the next T held-out tokens teacher-forced: perplexity, against the exact transfer's,
    and the largest logit difference (absolute, and relative to the exact logits' range).
Exact transfer is bit-exact (its row checks that); a float32 decode node receiving from a
bfloat16 prefill node is the "bfloat16 source" row (the KV rounded to bfloat16, converted back).

    .venv/bin/python scripts/kv_quality.py                    # the table in docs/compression.md
    .venv/bin/python scripts/kv_quality.py --prompts 8 --family qwen3_next   # quicker
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prfaas.engine.llm import build_executor  # noqa: E402
from prfaas.messages import SamplingParams  # noqa: E402
from prfaas.model.trained import HELDOUT  # noqa: E402
from prfaas.transport.chunks import pieces_of  # noqa: E402
from prfaas.transport.wire import decode_chunk, encode_chunk, parse_chunk  # noqa: E402

FORMATS = ["", "int8", "fp8", "bf16-source"]


def heldout_windows(tok, n: int, length: int, seed: int) -> list[list[int]]:
    """n windows of `length` tokens of the held-out files, each from a line start."""
    files = json.loads(HELDOUT.read_text())["files"]
    rng, out = random.Random(seed), []
    while len(out) < n:
        f = files[rng.randrange(len(files))]["text"]
        lines = f.splitlines(keepends=True)
        ids = tok.encode("".join(lines[rng.randrange(max(1, len(lines) // 2)):]))
        if len(ids) >= length:
            out.append(ids[:length])
    return out


def as_sent(layout, piece, fmt: str):
    """(piece as the prefill node sends it, its chunk's wire dtype, the transfer's wire dtype)."""
    if fmt == "bf16-source":  # a bfloat16 prefill node: its KV and conv state in bfloat16
        if piece.kind.name != "LINEAR_RECURRENT":  # float32 on every node
            piece = type(piece)(piece.layer, piece.kind, piece.token_start, piece.token_end,
                                piece.tensor.to(torch.bfloat16))
        return piece, "", "bfloat16"
    return piece, fmt if layout.spec(piece.layer, piece.kind).paged else "", fmt


def sent_pieces(ex_a, seq, fmt: str):
    n = seq.num_cached
    for i in range(ex_a.model.num_layers):
        for piece in pieces_of(ex_a.layout, ex_a.read_layer(seq, i, 0, n), n):
            yield as_sent(ex_a.layout, piece, fmt)


def transfer(ex_a, seq, fmt: str) -> list[tuple]:
    """The prompt's KV as the decode node gets it in `fmt`: through encode, parse, decode."""
    out = []
    for piece, chunk_wire, wire in sent_pieces(ex_a, seq, fmt):
        p = decode_chunk(parse_chunk(encode_chunk("q", 0, 1, piece, chunk_wire)), ex_a.layout, wire)
        out.append((p.layer, p.kind, p.token_start, p.token_end, p.tensor.clone()))
    return out


def wire_bytes(ex_a, seq, fmt: str) -> tuple[int, int]:
    """Bytes of the whole transfer, and of its paged (full-attention) part."""
    total = paged = 0
    for piece, w, _ in sent_pieces(ex_a, seq, fmt):
        n = len(encode_chunk("q", 0, 1, piece, w))
        total += n
        paged += n if piece.token_end > piece.token_start else 0
    return total, paged


@torch.inference_mode()
def continue_from(ex_b, kv, prompt: list[int], first: int, cont: list[int], k: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens after `first` and teacher-forced logits over `cont` (positions after the
    prompt), both from the received KV."""
    greedy = SamplingParams(max_tokens=k + 1, ignore_eos=True)
    seq = ex_b.reserve("g", prompt, greedy)
    for layer, kind, a, b, t in kv:
        ex_b.write_kv(seq, layer, kind, a, b, t)
    ex_b.complete_import(seq, first)
    while not seq.finished:
        ex_b.decode_step([seq])
    tokens = seq.output[1:]
    ex_b.free(seq)
    seq = ex_b.reserve("t", prompt + cont, SamplingParams(max_tokens=1))
    for layer, kind, a, b, t in kv:
        ex_b.write_kv(seq, layer, kind, a, b, t)
    seq.num_cached = len(prompt)
    meta = ex_b._meta([seq], [len(cont)], list(range(len(prompt), len(prompt) + len(cont))))
    x = ex_b.model.embed(torch.tensor(cont, dtype=torch.long))
    for i in range(ex_b.model.num_layers):
        x = ex_b.model.layer(i, x, meta, ex_b.caches[i])
    logits = ex_b.model.logits(x).float()
    ex_b.free(seq)
    return tokens, logits


def measure(family: str, args: argparse.Namespace) -> list[dict]:
    model = f"builtin:{family}-small"
    ex_a, tok = build_executor(model, num_blocks=256, num_slots=4)
    ex_b, _ = build_executor(model, num_blocks=256, num_slots=4)
    windows = heldout_windows(tok, args.prompts, args.prompt_tokens + args.score_tokens, args.seed)
    acc = {f: {"same": 0, "prefix": 0.0, "nll": 0.0, "maxerr": 0.0, "relerr": 0.0} for f in FORMATS}
    nll_exact = 0.0
    bytes_per = {f: (0, 0) for f in FORMATS}
    t0 = time.monotonic()
    for w, ids in enumerate(windows):
        prompt, cont = ids[: args.prompt_tokens], ids[args.prompt_tokens:]
        seq = ex_a.add("p", prompt, SamplingParams(max_tokens=1))
        first = ex_a.prefill(seq)
        ref_tokens, ref_logits = None, None
        for fmt in FORMATS:
            if w == 0:
                bytes_per[fmt] = wire_bytes(ex_a, seq, fmt)
            tokens, logits = continue_from(ex_b, transfer(ex_a, seq, fmt), prompt, first, cont, args.greedy_tokens)
            if ref_tokens is None:
                ref_tokens, ref_logits = tokens, logits
            lp = torch.log_softmax(logits[:-1], dim=-1)
            nll = -lp.gather(1, torch.tensor(cont[1:]).unsqueeze(1)).mean().item()
            if fmt == "":
                nll_exact += nll
            a = acc[fmt]
            a["same"] += tokens == ref_tokens
            agree = next((i for i, (x, y) in enumerate(zip(tokens, ref_tokens, strict=True)) if x != y), len(tokens))
            a["prefix"] += agree / len(tokens)
            a["nll"] += nll
            err = (logits - ref_logits).abs().max().item()
            a["maxerr"] = max(a["maxerr"], err)
            span = (ref_logits.amax(-1) - ref_logits.amin(-1)).min().item()
            a["relerr"] = max(a["relerr"], err / span)
        ex_a.free(seq)
        print(f"[{family}] {w + 1}/{len(windows)} prompts, {time.monotonic() - t0:.0f} s", file=sys.stderr)
    n = len(windows)
    ppl_exact = math.exp(nll_exact / n)
    return [
        {
            "family": family, "format": f or "exact", "prompts": n, "bytes": bytes_per[f][0],
            "ratio": bytes_per[""][0] / bytes_per[f][0], "paged_ratio": bytes_per[""][1] / bytes_per[f][1],
            "greedy_same": a["same"] / n, "greedy_prefix": a["prefix"] / n,
            "ppl": math.exp(a["nll"] / n), "ppl_delta": math.exp(a["nll"] / n) - ppl_exact,
            "max_logit_err": a["maxerr"], "max_logit_err_rel": a["relerr"],
        }
        for f, a in acc.items()
    ]


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"{args.prompts} held-out prompts of {args.prompt_tokens} tokens; greedy over {args.greedy_tokens} tokens; "
          f"perplexity over the next {args.score_tokens} tokens\n")
    print("| family | wire format | bytes per transfer | vs exact | full-attention KV vs exact "
          "| greedy identical | greedy prefix agreement "
          "| perplexity | delta | max logit error | relative to logit range |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['family']} | {r['format']} | {r['bytes']:,} | {r['ratio']:.2f}x | {r['paged_ratio']:.2f}x "
              f"| {r['greedy_same']:.0%} "
              f"| {r['greedy_prefix']:.1%} | {r['ppl']:.3f} | {r['ppl_delta']:+.3f} | {r['max_logit_err']:.4f} "
              f"| {r['max_logit_err_rel']:.2%} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", action="append", choices=["qwen3_next", "kimi_linear"], help="default: both")
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts (N)")
    p.add_argument("--prompt-tokens", type=int, default=384, help="tokens per prompt (the transferred KV)")
    p.add_argument("--greedy-tokens", type=int, default=32, help="greedy tokens compared per continuation")
    p.add_argument("--score-tokens", type=int, default=128, help="held-out tokens scored after the prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [r for fam in args.family or ["qwen3_next", "kimi_linear"] for r in measure(fam, args)]
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
