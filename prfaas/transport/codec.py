"""KV wire formats: how a transfer's tensors are written on the wire and read back.

A wire format is negotiated per transfer (the decode node lists what it accepts, the router
chooses, the prefill node encodes) and named by a string of up to two parts joined by "+":

  - a compression of the paged (full-attention) tensors, GQA K/V and the MLA latent alike:
      ""      exact: the prefill node's own dtype;
      "int8"  symmetric int8 per row (the last dimension: one head's head_dim, or the whole MLA
              latent, rope part included) with a float32 scale per row;
      "fp8"   float8 e4m3 with a float32 scale per block of FP8_BLOCK elements of the last
              dimension (so the MLA latent's rope part, 32 of 96 here, has scales of its own);
  - a float dtype the decode node converts from ("bfloat16", "float32", "float16"): the prefill
    node's cache dtype when it differs from the decode node's. Exact payloads then travel in it
    and the receiver converts them into its own dtype (lossless from float32's point of view
    when the sender holds bfloat16: the sender's values are what the decode node gets).

Linear-attention states always travel exact: the recurrent state is float32 on every node, the
conv state in the sender's dtype (converted on receive). Examples: "" (same dtypes, exact),
"fp8", "bfloat16" (a bf16 prefill node to a float32 decode node, exact), "int8+bfloat16".

Nothing here knows about chunks or framing (that is `wire.py`), only tensors and dtypes.
"""

from __future__ import annotations

import torch

from prfaas.transport.formats import (  # noqa: F401 - the names live in formats.py (torch-free)
    COMPRESSIONS,
    CONVERTIBLE,
    FP8_BLOCK,
    WireFormat,
    accepted_formats,
    choose,
    fp8_block,
    is_valid,
    transfer_bytes,
    wire_accept,
)

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_TINY = torch.finfo(torch.float32).tiny


# --- quantisation --------------------------------------------------------------------------------
def quantize_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim) symmetric int8: returns (q, scales) with q * scales[..., None] ~ t."""
    x = t.float()
    scales = (x.abs().amax(dim=-1) / 127.0).clamp_min(_TINY)
    q = torch.round(x / scales.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scales.unsqueeze(-1)).to(dtype)


def quantize_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 e4m3 with one float32 scale per block of the last dim: (q, scales (..., blocks))."""
    x = t.float()
    block = fp8_block(x.shape[-1])
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    scales = (xb.abs().amax(dim=-1) / FP8_MAX).clamp_min(_TINY)
    q = (xb / scales.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(x.shape), scales


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    block = fp8_block(q.shape[-1])
    qb = q.float().reshape(*q.shape[:-1], q.shape[-1] // block, block)
    return (qb * scales.unsqueeze(-1)).reshape(q.shape).to(dtype)


# --- one tensor ----------------------------------------------------------------------------------
def encode_tensor(t: torch.Tensor, fmt: WireFormat, paged: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a tensor travels as: (payload tensor, float32 scales or None). States and exact
    payloads travel as they are (in the sender's dtype)."""
    if paged and fmt.compression == "int8":
        return quantize_int8(t)
    if paged and fmt.compression == "fp8":
        return quantize_fp8(t)
    return t, None


def decode_tensor(
    payload: torch.Tensor, scales: torch.Tensor | None, fmt: WireFormat, paged: bool, dtype: torch.dtype
) -> torch.Tensor:
    """The received tensor in the receiver's `dtype` (a view of `payload` when nothing changes)."""
    if paged and fmt.compression == "int8":
        assert scales is not None
        return dequantize_int8(payload, scales.reshape(payload.shape[:-1]), dtype)
    if paged and fmt.compression == "fp8":
        assert scales is not None
        return dequantize_fp8(payload, scales.reshape(*payload.shape[:-1], -1), dtype)
    return payload if payload.dtype == dtype else payload.to(dtype)


