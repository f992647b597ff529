"""The KV layout: the one place that knows which layer keeps paged blocks and which keeps a
fixed-size state, what each tensor's shape and dtype are, and how many bytes each takes.

Every tensor a layer keeps is a `TensorSpec`:
  - full-attention layers keep paged tensors, `(num_blocks, block_size, *shape)` in the pool:
    GQA: FULL_K and FULL_V with shape `(num_kv_heads, head_dim)`;
    MLA: FULL_LATENT with shape `(kv_lora_rank + rope_dim,)`;
  - linear-attention layers keep per-request states, `(num_slots, *shape)` in the pool:
    LINEAR_RECURRENT `(num_v_heads, head_k_dim, head_v_dim)`, always float32, and
    LINEAR_CONV `(conv_dim, conv_kernel - 1)` in the cache dtype.
The executor allocates its pool from these specs (`allocate`), the KV stream plans and checks
chunks from them, and everyone else (router, cache pool, planner, benchmarks) asks for sizes here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from math import prod
from typing import TYPE_CHECKING

import torch

from prfaas.kv.kinds import KvKind
from prfaas.model.config import ModelConfig

if TYPE_CHECKING:
    from prfaas.kv.pool import KvPool

STATE_DTYPE = torch.float32  # recurrent states: always float32, whatever the cache dtype


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of one layer. Paged: `shape` is per token and the tensor lives in blocks of
    `block_size` tokens. Not paged: a per-request state of `shape`, in a state slot."""

    layer: int
    kind: KvKind
    shape: tuple[int, ...]
    dtype: torch.dtype
    paged: bool

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes per token (paged) or of the whole state."""
        return self.numel * self.dtype.itemsize


@dataclass
class PagedCache:
    """One full-attention layer's pool as its mixer sees it: GQA keys in `k` and values in `v`,
    (num_blocks, block_size, Hkv, D); MLA's latent in `k`, (num_blocks, block_size, R + P), no `v`."""

    k: torch.Tensor
    v: torch.Tensor | None = None


@dataclass
class StateCache:
    """One linear-attention layer's state slots: recurrent (num_slots, H, K, V) float32, conv
    (num_slots, conv_dim, kernel - 1). A new request's slot starts zeroed (or from a copied state)."""

    recurrent: torch.Tensor
    conv: torch.Tensor


LayerCache = PagedCache | StateCache


@dataclass(frozen=True)
class KvLayout:
    config: ModelConfig
    block_size: int = 16
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")

    # --- the specs -----------------------------------------------------------------------------
    @cached_property
    def specs(self) -> tuple[TensorSpec, ...]:
        """Every tensor of every layer, in layer order and, within a layer, in sending order."""
        cfg, out = self.config, []
        for layer, kind in enumerate(cfg.layer_types):
            if kind == "linear":
                lin = cfg.linear
                recurrent = (lin.num_v_heads, lin.head_k_dim, lin.head_v_dim)
                out.append(TensorSpec(layer, KvKind.LINEAR_RECURRENT, recurrent, STATE_DTYPE, False))
                conv = (lin.conv_dim, lin.conv_kernel - 1)
                out.append(TensorSpec(layer, KvKind.LINEAR_CONV, conv, self.dtype, False))
            elif cfg.full.kind == "gqa":
                shape = (cfg.full.num_kv_heads, cfg.full.head_dim)
                out.append(TensorSpec(layer, KvKind.FULL_K, shape, self.dtype, True))
                out.append(TensorSpec(layer, KvKind.FULL_V, shape, self.dtype, True))
            else:
                latent = (cfg.full.kv_lora_rank + cfg.full.qk_rope_head_dim,)
                out.append(TensorSpec(layer, KvKind.FULL_LATENT, latent, self.dtype, True))
        return tuple(out)

    @cached_property
    def _by_key(self) -> dict[tuple[int, KvKind], TensorSpec]:
        return {(s.layer, s.kind): s for s in self.specs}

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def layer_specs(self, layer: int) -> tuple[TensorSpec, ...]:
        return tuple(s for s in self.specs if s.layer == layer)

    def spec(self, layer: int, kind: KvKind | int) -> TensorSpec:
        """The spec of `kind` in `layer`; KeyError when that layer has no such tensor."""
        found = self._by_key.get((layer, kind))  # type: ignore[arg-type]
        if found is None:
            name = KvKind(kind).name if kind in KvKind._value2member_map_ else str(kind)
            raise KeyError(f"layer {layer} has no {name} tensor")
        return found

    @cached_property
    def paged_specs(self) -> tuple[TensorSpec, ...]:
        return tuple(s for s in self.specs if s.paged)

    @cached_property
    def state_specs(self) -> tuple[TensorSpec, ...]:
        return tuple(s for s in self.specs if not s.paged)

    @property
    def has_states(self) -> bool:
        """A prefix is reusable only where a state checkpoint exists (hybrid models)."""
        return bool(self.state_specs)

    # --- the pool ------------------------------------------------------------------------------
    def allocate(self, num_blocks: int, num_slots: int, device: str | torch.device = "cpu") -> KvPool:
        from prfaas.kv.pool import KvPool

        return KvPool(self, num_blocks, num_slots, device)

    def layer_cache(self, layer: int, tensors: dict[KvKind, torch.Tensor]) -> LayerCache:
        """What layer `layer`'s mixer is handed, from the pool tensors of its specs."""
        if KvKind.LINEAR_RECURRENT in tensors:
            return StateCache(tensors[KvKind.LINEAR_RECURRENT], tensors[KvKind.LINEAR_CONV])
        if KvKind.FULL_LATENT in tensors:
            return PagedCache(tensors[KvKind.FULL_LATENT])
        return PagedCache(tensors[KvKind.FULL_K], tensors[KvKind.FULL_V])

    # --- byte sizes ----------------------------------------------------------------------------
    @cached_property
    def bytes_per_token(self) -> int:
        """Full-attention KV bytes per token, all layers."""
        return sum(s.nbytes for s in self.paged_specs)

    @property
    def bytes_per_block(self) -> int:
        """One block of `block_size` tokens across all full-attention layers."""
        return self.bytes_per_token * self.block_size

    @cached_property
    def state_bytes(self) -> int:
        """Linear-attention state of one request (recurrent + conv, all linear layers)."""
        return sum(s.nbytes for s in self.state_specs)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def kv_bytes(self, num_tokens: int, cached_tokens: int = 0) -> int:
        """Bytes a prefill of `num_tokens` (of which `cached_tokens` the receiver already holds)
        must ship: the uncached full-attention KV plus the whole linear state."""
        return (num_tokens - cached_tokens) * self.bytes_per_token + self.state_bytes

    def summary(self) -> dict[str, int]:
        return {
            "block_size": self.block_size,
            "paged_tensors": len(self.paged_specs),
            "state_tensors": len(self.state_specs),
            "bytes_per_token": self.bytes_per_token,
            "bytes_per_block": self.bytes_per_block,
            "state_bytes": self.state_bytes,
        }
