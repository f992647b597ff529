"""Training our model (prfaas/model) with plain torch on the CPU: seeded initialisation, AdamW
with warmup and cosine decay, random windows of the token stream, progress on stderr.

The forward is `prfaas.model.train_forward`: the serving modules on a batch of rows.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prfaas.model.config import ModelConfig
from prfaas.model.hybrid import HybridForCausalLM
from prfaas.model.train_forward import batch_logits, lm_loss
from prfaas.training.recipes import TrainRecipe

INIT_STD = 0.02
OUT_PROJECTIONS = ("o_proj", "out_proj", "down_proj")  # scaled by 1 / sqrt(2 * layers), as GPT-2


@torch.no_grad()
def init_for_training(model: HybridForCausalLM, seed: int) -> None:
    """Linear and embedding weights N(0, 0.02) (residual outputs scaled down); decay parameters as
    the reference implementations start them; norms and convs keep their module defaults."""
    gen = torch.Generator().manual_seed(seed)
    out_std = INIT_STD / math.sqrt(2 * model.num_layers)
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear | nn.Embedding):
            module.weight.normal_(0.0, out_std if leaf in OUT_PROJECTIONS else INIT_STD, generator=gen)
        elif isinstance(module, nn.Conv1d):
            bound = 1.0 / math.sqrt(module.weight.shape[-1])
            module.weight.uniform_(-bound, bound, generator=gen)
    kimi = model.config.family == "kimi_linear"
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            low = 1.0 if kimi else 0.01
            p.copy_(torch.empty(p.shape).uniform_(low, 16.0, generator=gen).log())
        elif name.endswith("dt_bias"):
            if kimi:  # softplus(dt_bias) log-uniform in [1e-3, 1e-1]
                dt = torch.empty(p.shape).uniform_(math.log(1e-3), math.log(1e-1), generator=gen).exp()
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            else:
                p.fill_(1.0)


def build_model(raw_config: dict[str, Any], seed: int) -> HybridForCausalLM:
    torch.manual_seed(seed)
    model = HybridForCausalLM(ModelConfig.from_dict(raw_config))
    init_for_training(model, seed)
    return model


def make_optimizer(model: nn.Module, recipe: TrainRecipe) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, decays, biases or convs)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        (decay if p.dim() == 2 and "conv" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, recipe: TrainRecipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    frac = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1.0 + math.cos(math.pi * min(1.0, frac)))


def sample_batch(stream: torch.Tensor, recipe: TrainRecipe, gen: torch.Generator) -> torch.Tensor:
    """`batch` windows of seq_len + 1 tokens at random offsets of the token stream: (B, L + 1)."""
    n = recipe.seq_len + 1
    starts = torch.randint(0, stream.numel() - n, (recipe.batch,), generator=gen)
    return torch.stack([stream[s : s + n] for s in starts.tolist()])


@dataclass
class TrainLog:
    losses: list[float]
    seconds: float
    tokens: int


def train(
    model: HybridForCausalLM,
    stream: torch.Tensor,
    recipe: TrainRecipe,
    log: Callable[[str], None] | None = None,
    every: int = 10,
) -> TrainLog:
    """Trains `model` in place on windows of `stream` (1-D int64 token ids) for recipe.steps."""
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if stream.numel() <= recipe.seq_len + 1:
        raise ValueError(f"the token stream ({stream.numel()}) is shorter than one row ({recipe.seq_len + 1})")
    torch.set_num_threads(recipe.threads)
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = make_optimizer(model, recipe)
    model.train()
    losses: list[float] = []
    t0 = time.monotonic()
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        loss = lm_loss(model, sample_batch(stream, recipe, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == recipe.steps:
            elapsed = time.monotonic() - t0
            tok_s = (step + 1) * recipe.tokens_per_step / elapsed
            eta = elapsed / (step + 1) * (recipe.steps - step - 1)
            recent = sum(losses[-every:]) / len(losses[-every:])
            say(
                f"step {step + 1}/{recipe.steps}  loss {recent:.3f}  lr {lr_at(step, recipe):.2e}  "
                f"{tok_s:.0f} tok/s  elapsed {elapsed:.0f}s  eta {eta:.0f}s"
            )
    model.eval()
    return TrainLog(losses, time.monotonic() - t0, recipe.steps * recipe.tokens_per_step)


@torch.no_grad()
def heldout_nll(model: HybridForCausalLM, stream: torch.Tensor, seq_len: int, batch: int = 8) -> tuple[float, int]:
    """Summed next-token NLL (nats) over `stream` cut into windows of seq_len tokens, each window
    scored from its own start; returns (total nll, tokens predicted)."""
    n = stream.numel() // seq_len
    windows = stream[: n * seq_len].view(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        ids = windows[i : i + batch]
        logits = batch_logits(model, ids[:, :-1])
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += ids[:, 1:].numel()
    return total, count
