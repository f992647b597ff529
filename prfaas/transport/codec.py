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

from dataclasses import dataclass
from math import gcd, prod

import torch

from prfaas.dtypes import dtype_name

COMPRESSIONS = ("", "int8", "fp8")
CONVERTIBLE = ("float32", "bfloat16", "float16")  # float dtypes a decode node converts on receive
FP8_BLOCK = 32  # elements per fp8 scale
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class WireFormat:
    compression: str = ""  # "", "int8", "fp8"
    source_dtype: str = ""  # "": the receiver's own dtype; else the sender's, converted on receive

    @classmethod
    def parse(cls, name: str) -> WireFormat:
        """The format a wire dtype string names; ValueError for anything else."""
        parts = name.split("+") if name else []
        comp = parts[0] if parts and parts[0] in COMPRESSIONS else ""
        rest = parts[1:] if comp else parts
        if len(rest) > 1 or (rest and rest[0] not in CONVERTIBLE):
            raise ValueError(
                f"unknown wire dtype {name!r}: a compression ({', '.join(c for c in COMPRESSIONS if c)}) and/or "
                f"a source dtype ({', '.join(CONVERTIBLE)}) joined by '+', or '' for exact"
            )
        return cls(comp, rest[0] if rest else "")

    @property
    def name(self) -> str:
        return "+".join(p for p in (self.compression, self.source_dtype) if p)

    def payload_dtypes(self, spec_dtype: torch.dtype, paged: bool) -> tuple[str, ...]:
        """The dtypes a tensor of this spec may arrive in under this format: the compressed
        dtype, or the receiver's own dtype and the source dtype (a float32 recurrent state
        arrives as float32 from a bf16 node: it is float32 everywhere)."""
        if paged and self.compression == "int8":
            return ("int8",)
        if paged and self.compression == "fp8":
            return ("float8_e4m3fn",)
        own = dtype_name(spec_dtype)
        return (own, self.source_dtype) if self.source_dtype and self.source_dtype != own else (own,)

    def scales_count(self, shape: tuple[int, ...], paged: bool) -> int:
        """float32 scales a tensor of `shape` carries (0 when it travels unscaled)."""
        if not paged or not self.compression:
            return 0
        rows = prod(shape[:-1])
        return rows if self.compression == "int8" else rows * (shape[-1] // fp8_block(shape[-1]))


def is_valid(name: str) -> bool:
    try:
        WireFormat.parse(name)
    except ValueError:
        return False
    return True


def fp8_block(last_dim: int) -> int:
    """Elements per fp8 scale for rows of `last_dim`: FP8_BLOCK, or a divisor of the row."""
    return gcd(last_dim, FP8_BLOCK)


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


# --- negotiation ---------------------------------------------------------------------------------
def accepted_formats(compressions: tuple[str, ...] = ("int8", "fp8"), convert: bool = True) -> tuple[str, ...]:
    """What a decode node lists as accepted: exact, each compression, and, when it converts,
    each with every source dtype (the receiver checks the one it is given against its layout)."""
    comps = ("", *[c for c in compressions if c])
    sources = ("", *CONVERTIBLE) if convert else ("",)
    return tuple(WireFormat(c, s).name for c in comps for s in sources)


def choose(
    accepted: tuple[str, ...] | list[str], prefill_dtype: str, decode_dtype: str, compression: str = ""
) -> str | None:
    """The wire format for a transfer from a prefill node holding `prefill_dtype` to a decode
    node holding `decode_dtype` that accepts `accepted`: the compression asked for when the
    decode node takes it (else exact), with the source dtype when the two differ. None when the
    pair cannot work (the decode node does not convert from the prefill node's dtype)."""
    source = "" if prefill_dtype == decode_dtype else prefill_dtype
    want = WireFormat(compression, source).name
    if want in accepted:
        return want
    exact = WireFormat("", source).name
    return exact if exact in accepted else None
