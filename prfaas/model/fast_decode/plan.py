"""The fused decode step's plan: the model's weights packed for the C step, and the structs that
point at them and at the KV pool, built once per executor.

Packing: every projection read by one input is one packed weight (Qwen3-Next's qkvz and ba; KDA's
q, k, v, f_a, b and g_a; GQA's q, k and v; MLA's q and kv_a; an MLP's gate and up, with a MoE's
router and shared expert), in the model dtype, as panels of 32 output columns (see
`csrc/decode_gemm.h`). The packed copy is the step's own: the torch modules keep their weights
for prefill and the reference step, so the weights are held twice (the price of the layout).
Norm weights are prepared in float32 as the reference applies them (1 + w for the zero-centred
norm). A plan is built from the weights as they are: weights changed later are not seen.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import torch

from prfaas.model.fast_decode import library as lib
from prfaas.model.hybrid import HybridForCausalLM
from prfaas.model.kimi_linear import KimiDeltaAttention, KimiMLA, KimiMoE
from prfaas.model.layers import MLP
from prfaas.model.qwen3_next import GatedAttention, GatedDeltaNet, SparseMoe

DTYPES = (torch.float32, torch.bfloat16)


class Unsupported(ValueError):
    """A model or pool the fused step does not cover (the reference step runs instead)."""


def pack(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, k) -> (ceil(n / 32), k, 32) panels in `dtype`, columns past n zero."""
    n, k = w.shape
    pn = -(-n // lib.PW) * lib.PW
    out = torch.zeros(pn, k, dtype=dtype)
    out[:n] = w.detach()
    return out.view(pn // lib.PW, lib.PW, k).transpose(1, 2).contiguous()


class Plan:
    """Owns every tensor the C structs point into (`keep`), and the structs."""

    def __init__(self, model: HybridForCausalLM, caches: list[Any], block_size: int) -> None:
        cfg = model.config
        self.dtype = model.lm_head.weight.dtype
        if self.dtype not in DTYPES:
            raise Unsupported(f"model dtype {self.dtype} (the fused step runs float32 and bfloat16)")
        if model.lm_head.weight.device.type != "cpu":
            raise Unsupported("the fused step runs on the CPU")
        self.keep: list[Any] = []
        self.widths: list[int] = [cfg.hidden_size]
        self.moe_cols, self.topk, self.experts, self.heads = 1, 1, 1, 1
        self.cache_dtype = self._cache_dtype(caches)
        layers = (lib.Layer * cfg.num_layers)()
        for i, (layer, cache) in enumerate(zip(model.model.layers, caches, strict=True)):
            self._layer(layers[i], layer, cache)
        self.keep.append(layers)
        m = self.model = lib.Model()
        embed = model.model.embed_tokens.weight.detach()
        m.embed = self._ptr(embed.contiguous())
        m.final_norm = self._norm(model.model.norm)
        m.lm_head = self.lin(model.lm_head.weight)
        m.layers = ctypes.addressof(layers)
        m.num_layers, m.D, m.vocab = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
        m.act_bf16 = int(self.dtype == torch.bfloat16)
        m.cache_bf16 = int(self.cache_dtype == torch.bfloat16)
        m.norm_mode = lib.NORM_SCALE_AFTER if model.model.norm.zero_centered else lib.NORM_CAST_FIRST
        m.block_size, m.eps = block_size, model.model.norm.eps
        m.max_cols = -(-max(self.widths) // 16) * 16
        m.max_heads, m.max_moe_cols, m.max_topk, m.max_experts = self.heads, self.moe_cols, self.topk, self.experts

    # --- tensors the structs point at -----------------------------------------------------------
    def _ptr(self, t: torch.Tensor) -> int:
        self.keep.append(t)
        return t.data_ptr()

    def f32(self, t: torch.Tensor) -> int:
        return self._ptr(t.detach().float().contiguous().clone())

    def lin(self, w: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> lib.Lin:
        dtype = dtype or self.dtype
        out = lib.Lin()
        out.w = self._ptr(pack(w, dtype))
        out.bias = self.f32(bias) if bias is not None else None
        out.n, out.k, out.bf16 = w.shape[0], w.shape[1], int(dtype == torch.bfloat16)
        self.widths.append(w.shape[0])
        return out

    def lins(self, ws: list[torch.Tensor]) -> int:
        arr = (lib.Lin * len(ws))(*(self.lin(w) for w in ws))
        self.keep.append(arr)
        return ctypes.addressof(arr)

    def _norm(self, norm: Any) -> int:
        w = norm.weight.detach().float()
        return self.f32(1.0 + w if getattr(norm, "zero_centered", False) else w)

    def _cache_dtype(self, caches: list[Any]) -> torch.dtype:
        dtypes = {t.dtype for c in caches for t in (getattr(c, "k", None), getattr(c, "v", None),
                                                  getattr(c, "conv", None)) if t is not None}
        if len(dtypes) > 1 or not dtypes <= set(DTYPES):
            raise Unsupported(f"cache dtypes {sorted(map(str, dtypes))}")
        return dtypes.pop() if dtypes else self.dtype

    def _contiguous(self, t: torch.Tensor, what: str) -> int:
        if not t.is_contiguous() or t.device.type != "cpu":
            raise Unsupported(f"the {what} pool is not a contiguous CPU tensor")
        return t.data_ptr()  # the pool outlives the plan (the executor holds both)

    # --- layers -----------------------------------------------------------------------------------
    def _layer(self, L: lib.Layer, layer: Any, cache: Any) -> None:
        L.norm1, L.norm2 = self._norm(layer.input_layernorm), self._norm(layer.post_attention_layernorm)
        mixer = getattr(layer, layer.mixer_name)
        from prfaas.model.fast_decode import mixers

        builders: dict[type, Callable[[Plan, lib.Layer, Any, Any], None]] = {
            GatedDeltaNet: mixers.gdn, KimiDeltaAttention: mixers.kda, GatedAttention: mixers.gqa, KimiMLA: mixers.mla}
        build = builders.get(type(mixer))
        if build is None:
            raise Unsupported(f"token mixer {type(mixer).__name__}")
        build(self, L, mixer, cache)
        mlp = layer.mlp
        if type(mlp) is MLP:
            mixers.dense(self, L, mlp)
        elif type(mlp) is SparseMoe:
            mixers.moe_softmax(self, L, mlp)
        elif type(mlp) is KimiMoE:
            mixers.moe_sigmoid(self, L, mlp)
        else:
            raise Unsupported(f"MLP {type(mlp).__name__}")

    def linear_state(self, L: lib.Layer, cache: Any) -> None:
        rec, conv = cache.recurrent, cache.conv
        if rec.dtype != torch.float32:
            raise Unsupported("recurrent states not float32")
        L.rec_states = self._contiguous(rec, "recurrent state")
        L.conv_states = self._contiguous(conv, "conv state")

    def paged(self, L: lib.Layer, cache: Any) -> None:
        L.k_cache = self._contiguous(cache.k, "paged K")
        L.v_cache = self._contiguous(cache.v, "paged V") if cache.v is not None else None
