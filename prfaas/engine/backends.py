"""Attention backends: the torch reference (CPU and GPU) and, where CUDA is present, FlashInfer
and flash-attn. All implement `prfaas.model.ops.attention.AttentionBackend` and are checked
against the torch reference by tests/engine/test_gpu_backends.py (marked `gpu`; skipped here,
where no GPU exists, so no figure for them is claimed anywhere).

`auto` picks FlashInfer, then flash-attn, when CUDA is available and the package imports, else
torch. The linear-attention ops stay ours (torch) on every backend for now.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

from prfaas.model.ops.attention import AttentionBackend, TorchAttention, gather_context

BACKENDS = ("auto", "torch", "flashinfer", "flash_attn")


def unavailable_reason(name: str) -> str | None:
    """None when the backend can run here, else why not."""
    if name == "torch":
        return None
    if not torch.cuda.is_available():
        return "needs CUDA"
    module = {"flashinfer": "flashinfer", "flash_attn": "flash_attn"}.get(name)
    if module is None:
        return f"unknown attention backend {name!r}; known: {', '.join(BACKENDS)}"
    if importlib.util.find_spec(module) is None:
        return f"the {module} package is not installed (pip install '.[gpu]')"
    return None


def make_backend(name: str = "auto") -> AttentionBackend:
    if name == "auto":
        for candidate in ("flashinfer", "flash_attn"):
            if unavailable_reason(candidate) is None:
                return make_backend(candidate)
        return TorchAttention()
    reason = unavailable_reason(name)
    if reason is not None:
        raise ValueError(f"attention backend {name!r} cannot run here: {reason}")
    if name == "flashinfer":
        return FlashInferAttention()
    if name == "flash_attn":
        return FlashAttnAttention()
    return TorchAttention()


def _pad_v(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The kernels want one head size for q, k and v; MLA's value head is narrower."""
    return F.pad(v, (0, q.shape[-1] - v.shape[-1])) if v.shape[-1] < q.shape[-1] else v


class FlashInferAttention:
    name = "flashinfer"

    def __init__(self) -> None:
        import flashinfer

        self._fi = flashinfer

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        dv = v.shape[-1]
        # causal with fewer queries than keys aligns the queries to the last positions
        out = self._fi.single_prefill_with_kv_cache(q, k, _pad_v(q, v), causal=q.shape[0] > 1, sm_scale=scale)
        return out[..., :dv]

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        def one(qi: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self._fi.single_decode_with_kv_cache(qi[0], k, _pad_v(qi, v), sm_scale=scale)[None, :, : v.shape[-1]]

        return _per_sequence(one, q, k_cache, v_cache, block_tables, context_lens)


class FlashAttnAttention:
    name = "flash_attn"

    def __init__(self) -> None:
        from flash_attn import flash_attn_func

        self._attn = flash_attn_func

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        dv = v.shape[-1]
        out = self._attn(q[None], k[None], _pad_v(q, v)[None], softmax_scale=scale, causal=q.shape[0] > 1)
        return out[0, ..., :dv]

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        return _per_sequence(
            lambda qi, k, v: self.attend(qi, k, v, scale), q, k_cache, v_cache, block_tables, context_lens
        )


def _per_sequence(
    one: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> torch.Tensor:
    """Paged decode as one single-sequence call per sequence on its gathered context
    (`one(q (1, Hq, D), k (S, Hkv, D), v (S, Hkv, Dv)) -> (1, Hq, Dv)`): correct on any page
    size; a batched paged kernel (FlashInfer's BatchDecode wrapper) is the next step."""
    outs = []
    for i, n in enumerate(context_lens.tolist()):
        k = gather_context(k_cache, block_tables[i], n)
        v = gather_context(v_cache, block_tables[i], n)
        outs.append(one(q[i : i + 1], k, v)[0])
    return torch.stack(outs)
