"""Trains the shipped models (both families) into prfaas/model/trained/, with the held-out
files beside them and a training report in each model directory (docs/models.md).

Run: python scripts/train_models.py [--family qwen3_next] [--out-root DIR] [--steps N] ...
The defaults are the recipe the shipped files were made with (prfaas/training/recipes.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prfaas.model.trained import ROOT as TRAINED  # noqa: E402
from prfaas.training import recipes  # noqa: E402
from prfaas.training.cli import add_train_args, parse_recipe  # noqa: E402
from prfaas.training.corpus import stdlib_corpus  # noqa: E402
from prfaas.training.run import prepare, train_family  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", action="append", choices=sorted(recipes.CONFIGS), help="default: both")
    p.add_argument("--out-root", default=str(TRAINED), help="where FAMILY-small/ directories go")
    add_train_args(p)
    args = p.parse_args()
    recipe = parse_recipe(args)
    corpus = stdlib_corpus(args.stdlib)
    print(f"[train] corpus {corpus.root}: {len(corpus.train)} training files "
          f"({corpus.num_bytes('train') / 1e6:.1f} MB), {len(corpus.heldout)} held out", file=sys.stderr, flush=True)
    tok, train_stream, heldout_stream = prepare(corpus)
    print(f"[train] {train_stream.numel()} training tokens, {heldout_stream.numel()} held out", file=sys.stderr)
    root = Path(args.out_root)
    root.mkdir(parents=True, exist_ok=True)
    heldout = {
        "python": platform.python_version(),
        "files": [{"path": rel, "text": corpus.read(rel)} for rel in corpus.heldout],
    }
    (root / "heldout.json").write_text(json.dumps(heldout, indent=1) + "\n")
    for family in args.family or sorted(recipes.CONFIGS, reverse=True):  # qwen3_next first
        out = root / f"{family}-{recipes.PRESET}"
        report = train_family(family, out, tok, train_stream, heldout_stream, recipe)
        (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({k: report[k] for k in ("family", "train_seconds", "heldout_perplexity")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
