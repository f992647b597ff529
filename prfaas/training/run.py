"""Producing a trained checkpoint directory, end to end: corpus, tokenizer, token stream,
training, held-out perplexity, Hugging Face files, a greedy sample through our engine.

`prfaas model train --family F --out DIR` runs one family; `scripts/train_models.py` runs both
into the shipped directory (prfaas/model/trained/) and is how those files were made.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from prfaas.model.hybrid import HybridForCausalLM
from prfaas.model.presets import save_weights
from prfaas.training import recipes
from prfaas.training.corpus import Corpus
from prfaas.training.tokenizer import EOS_ID, train_tokenizer, write_tokenizer_files
from prfaas.training.trainer import build_model, heldout_nll, train

SAMPLE_PROMPT = "def read_config(path):\n"
# the shipped weights are stored in bfloat16 (half the bytes; the held-out perplexity of the
# rounded weights is the float32 one to 4 digits) and run in whatever dtype the engine is given
SHIP_DTYPE = torch.bfloat16
SAMPLE_TOKENS = 64


def token_stream(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """The documents' ids, each followed by the end-of-text id: (N,) int64."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


def prepare(corpus: Corpus, vocab_size: int = recipes.VOCAB_SIZE) -> tuple[Tokenizer, torch.Tensor, torch.Tensor]:
    """The tokenizer (trained on the training files) and the train and held-out streams."""
    train_texts = corpus.texts("train")
    tok = train_tokenizer(train_texts, vocab_size)
    return tok, token_stream(tok, train_texts), token_stream(tok, corpus.texts("heldout"))


def greedy_sample(model_dir: Path, prompt: str = SAMPLE_PROMPT, max_tokens: int = SAMPLE_TOKENS) -> str:
    """A greedy continuation of `prompt` by our engine from the saved directory."""
    from prfaas.engine.llm import LLM, build_executor
    from prfaas.engine.sampling import SamplingParams

    ex, tok = build_executor(model_dir, num_blocks=64, num_slots=2)
    out = LLM(ex, tok).generate([tok.encode(prompt)], SamplingParams(max_tokens=max_tokens))[0]
    return tok.decode(out)


def export_checkpoint(
    model: HybridForCausalLM, raw: dict[str, Any], out: Path, tok: Tokenizer, heldout_stream: torch.Tensor, seq_len: int
) -> dict[str, Any]:
    """Rounds the weights to the shipped dtype, measures the held-out perplexity of exactly those
    weights, writes the Hugging Face directory and samples from it through our engine."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(SHIP_DTYPE).float())
    nll, count = heldout_nll(model, heldout_stream, seq_len)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model.to(SHIP_DTYPE), out / "model.safetensors")
    model.float()
    stored = {**raw, "dtype": str(SHIP_DTYPE).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(stored, indent=2) + "\n")
    max_len = int(raw.get("max_position_embeddings") or raw["model_max_length"])
    write_tokenizer_files(tok, out, model_max_length=max_len)
    return {
        "heldout_tokens": count,
        "heldout_nll": round(nll / count, 4),
        "heldout_perplexity": round(math.exp(nll / count), 3),
        "sample_prompt": SAMPLE_PROMPT,
        "sample": greedy_sample(out),
    }


def train_family(
    family: str,
    out: Path,
    tok: Tokenizer,
    train_stream: torch.Tensor,
    heldout_stream: torch.Tensor,
    recipe: recipes.TrainRecipe,
) -> dict[str, Any]:
    """Trains one family, writes its Hugging Face directory into `out`; returns the report."""
    raw = recipes.model_config(family)
    model = build_model(raw, recipe.seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"[train] {family}: {params / 1e6:.2f}M parameters, {recipe.steps} steps of "
          f"{recipe.batch} x {recipe.seq_len} tokens", file=sys.stderr, flush=True)
    log = train(model, train_stream, recipe)
    tail = log.losses[-50:]
    report = {
        "family": family,
        "parameters": params,
        "recipe": dataclasses.asdict(recipe),
        "train_tokens": log.tokens,
        "train_seconds": round(log.seconds, 1),
        "final_train_loss": round(sum(tail) / len(tail), 4),
        **export_checkpoint(model, raw, out, tok, heldout_stream, recipe.seq_len),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    print(f"[train] {family}: held-out perplexity {report['heldout_perplexity']}", file=sys.stderr, flush=True)
    return report
