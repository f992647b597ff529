"""The hybrid decoder: embeddings, a stack of (token mixer + MLP) layers, final norm, LM head.

Module names mirror the Hugging Face checkpoints (`model.layers.{i}.mlp.gate_proj` ...), so a
state dict loads by name. Each family module supplies its token mixers and MLPs through
`FamilyParts`; the executor drives the stack one layer at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from prfaas.model.base import ForwardMeta, LayerCache
from prfaas.model.config import ModelConfig
from prfaas.model.layers import RMSNorm


@dataclass(frozen=True)
class FamilyParts:
    """What a family contributes. `mixer(cfg, layer)` returns (attribute name, module); the
    module is called as `mixer(x (T, D), meta, cache) -> (T, D)`."""

    mixer: Callable[[ModelConfig, int], tuple[str, nn.Module]]
    mlp: Callable[[ModelConfig, int], nn.Module]
    zero_centered_norm: bool
    checkpoint_name: Callable[[str], str] = lambda name: name  # a checkpoint tensor name -> ours
    # a checkpoint tensor (our name) -> our layout, and back, for families that keep a weight in
    # another order than their checkpoints
    from_checkpoint: Callable[[ModelConfig, str, torch.Tensor], torch.Tensor] = lambda cfg, name, t: t
    to_checkpoint: Callable[[ModelConfig, str, torch.Tensor], torch.Tensor] = lambda cfg, name, t: t


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, parts: FamilyParts) -> None:
        super().__init__()
        self.mixer_name, mixer = parts.mixer(cfg, layer)
        self.add_module(self.mixer_name, mixer)
        self.mlp = parts.mlp(cfg, layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, parts.zero_centered_norm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, parts.zero_centered_norm)

    def forward(self, x: torch.Tensor, meta: ForwardMeta, cache: LayerCache) -> torch.Tensor:
        mixer = getattr(self, self.mixer_name)
        x = x + mixer(self.input_layernorm(x), meta, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, parts: FamilyParts) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, parts) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, parts.zero_centered_norm)


class HybridForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        parts = family_parts(cfg.family)
        self.model = Backbone(cfg, parts)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) -> (T, D)"""
        return self.model.embed_tokens(input_ids)

    def layer(self, i: int, x: torch.Tensor, meta: ForwardMeta, cache: LayerCache) -> torch.Tensor:
        return self.model.layers[i](x, meta, cache)  # type: ignore[no-any-return]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, vocab) in float32."""
        return self.lm_head(self.model.norm(x)).float()

    def forward(self, input_ids: torch.Tensor, meta: ForwardMeta, caches: list[LayerCache]) -> torch.Tensor:
        """All layers at once; returns the logits of every token (T, vocab)."""
        x = self.embed(input_ids)
        for i in range(self.num_layers):
            x = self.layer(i, x, meta, caches[i])
        return self.logits(x)


def family_parts(family: str) -> FamilyParts:
    if family == "qwen3_next":
        from prfaas.model import qwen3_next

        return qwen3_next.PARTS
    if family == "kimi_linear":
        from prfaas.model import kimi_linear

        return kimi_linear.PARTS
    raise ValueError(f"unknown model family {family!r}")
