"""The KV layout: the one place that knows which layer keeps paged blocks and which keeps a
fixed-size state, and how many bytes each takes.

Full-attention layers store paged blocks of `block_size` tokens:
  - GQA: K and V, each `(num_blocks, block_size, num_kv_heads, head_dim)`;
  - MLA: the compressed latent plus the rope key, `(num_blocks, block_size, kv_lora_rank + rope_dim)`.
Linear-attention layers keep, per request (one "slot"):
  - the recurrent state `(num_v_heads, head_k_dim, head_v_dim)`, always float32;
  - the conv state `(conv_dim, conv_kernel - 1)`, in the cache dtype.

Everyone else (router, cache pool, planner, transport, benchmarks) asks this object for sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from prfaas.model.config import ModelConfig

STATE_DTYPE = torch.float32


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class FullLayerLayout:
    layer: int
    kind: str  # "gqa" or "mla"
    token_shape: tuple[int, ...]  # per token, per tensor: (Hkv, D) or (latent_dim,)
    num_tensors: int  # 2 (K and V) for gqa, 1 (latent) for mla


@dataclass(frozen=True)
class LinearLayerLayout:
    layer: int
    recurrent_shape: tuple[int, int, int]  # (H, K, V)
    conv_shape: tuple[int, int]  # (conv_dim, kernel - 1)


@dataclass(frozen=True)
class KvLayout:
    config: ModelConfig
    block_size: int = 16
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")

    # --- per-layer shapes -------------------------------------------------------------------
    @cached_property
    def full_layers(self) -> tuple[FullLayerLayout, ...]:
        spec = self.config.full
        out = []
        for i in self.config.full_layers:
            if spec.kind == "gqa":
                out.append(FullLayerLayout(i, "gqa", (spec.num_kv_heads, spec.head_dim), 2))
            else:
                out.append(FullLayerLayout(i, "mla", (spec.kv_lora_rank + spec.qk_rope_head_dim,), 1))
        return tuple(out)

    @cached_property
    def linear_layers(self) -> tuple[LinearLayerLayout, ...]:
        spec = self.config.linear
        return tuple(
            LinearLayerLayout(
                i,
                (spec.num_v_heads, spec.head_k_dim, spec.head_v_dim),
                (spec.conv_dim, spec.conv_kernel - 1),
            )
            for i in self.config.linear_layers
        )

    def layer_kind(self, layer: int) -> str:
        """ "full" or "linear". Transport and services use it only to validate chunks."""
        return self.config.layer_types[layer]

    def full_layer(self, layer: int) -> FullLayerLayout:
        for f in self.full_layers:
            if f.layer == layer:
                return f
        raise KeyError(f"layer {layer} is not a full-attention layer")

    def linear_layer(self, layer: int) -> LinearLayerLayout:
        for f in self.linear_layers:
            if f.layer == layer:
                return f
        raise KeyError(f"layer {layer} is not a linear-attention layer")

    def block_shape(self, layer: int, num_blocks: int) -> tuple[int, ...]:
        return (num_blocks, self.block_size, *self.full_layer(layer).token_shape)

    # --- byte sizes ---------------------------------------------------------------------------
    @property
    def elem_size(self) -> int:
        return dtype_size(self.dtype)

    @cached_property
    def bytes_per_token_per_layer(self) -> dict[int, int]:
        out = {}
        for f in self.full_layers:
            n = 1
            for d in f.token_shape:
                n *= d
            out[f.layer] = n * f.num_tensors * self.elem_size
        return out

    @cached_property
    def bytes_per_token(self) -> int:
        """Full-attention KV bytes per token, all layers."""
        return sum(self.bytes_per_token_per_layer.values())

    @property
    def bytes_per_block(self) -> int:
        """One block of `block_size` tokens across all full-attention layers."""
        return self.bytes_per_token * self.block_size

    @cached_property
    def recurrent_bytes_per_layer(self) -> int:
        spec = self.config.linear
        return spec.num_v_heads * spec.head_k_dim * spec.head_v_dim * dtype_size(STATE_DTYPE)

    @cached_property
    def conv_bytes_per_layer(self) -> int:
        spec = self.config.linear
        return spec.conv_dim * (spec.conv_kernel - 1) * self.elem_size

    @cached_property
    def state_bytes(self) -> int:
        """Linear-attention state of one request (recurrent + conv, all linear layers)."""
        return len(self.linear_layers) * (self.recurrent_bytes_per_layer + self.conv_bytes_per_layer)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def kv_bytes(self, num_tokens: int, cached_tokens: int = 0) -> int:
        """Bytes a prefill of `num_tokens` (of which `cached_tokens` the receiver already holds)
        must ship: the uncached full-attention KV plus the whole linear state."""
        return (num_tokens - cached_tokens) * self.bytes_per_token + self.state_bytes

    def summary(self) -> dict[str, int]:
        return {
            "block_size": self.block_size,
            "full_layers": len(self.full_layers),
            "linear_layers": len(self.linear_layers),
            "bytes_per_token": self.bytes_per_token,
            "bytes_per_block": self.bytes_per_block,
            "state_bytes": self.state_bytes,
        }
