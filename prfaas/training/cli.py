"""`prfaas model train`: its flags and the command (the training itself is in run.py, imported
only when the command runs, so that the `prfaas` parser stays light)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from prfaas.training.recipes import TrainRecipe


def parse_recipe(args: argparse.Namespace) -> TrainRecipe:
    """The default recipe with the flags given on the command line."""
    changes = {k: getattr(args, k, None) for k in ("steps", "batch", "seq_len", "lr", "seed", "threads")}
    return dataclasses.replace(TrainRecipe(), **{k: v for k, v in changes.items() if v is not None})


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, help=f"optimizer steps (default {TrainRecipe.steps})")
    p.add_argument("--batch", type=int, help=f"rows per step (default {TrainRecipe.batch})")
    p.add_argument("--seq-len", dest="seq_len", type=int, help=f"tokens per row (default {TrainRecipe.seq_len})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {TrainRecipe.lr})")
    p.add_argument("--seed", type=int, help=f"default {TrainRecipe.seed}")
    p.add_argument("--threads", type=int, help=f"torch threads (default {TrainRecipe.threads})")
    p.add_argument("--stdlib", help="standard library directory to train on (default: this Python's)")


def train_command(args: argparse.Namespace) -> int:
    """`prfaas model train --family F --out DIR`: one family, tokenizer included."""
    from prfaas.training.corpus import stdlib_corpus
    from prfaas.training.run import prepare, train_family

    recipe = parse_recipe(args)
    try:
        corpus = stdlib_corpus(args.stdlib)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"[train] corpus {corpus.root}: {len(corpus.train)} training files "
        f"({corpus.num_bytes('train') / 1e6:.1f} MB), {len(corpus.heldout)} held out",
        file=sys.stderr,
    )
    tok, train_stream, heldout_stream = prepare(corpus)
    out = Path(args.out)
    report = train_family(args.family, out, tok, train_stream, heldout_stream, recipe)
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    summary = {"model_dir": str(out), "family": args.family, "heldout_perplexity": report["heldout_perplexity"]}
    print(json.dumps(summary))
    return 0
