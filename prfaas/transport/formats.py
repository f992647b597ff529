"""KV wire format names and their negotiation, torch-free (the router imports this): what a
format string means is described in `codec.py`, which encodes and decodes tensors."""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd, prod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prfaas.kv.layout import KvLayout

COMPRESSIONS = ("", "int8", "fp8")
CONVERTIBLE = ("float32", "bfloat16", "float16")  # float dtypes a decode node converts on receive
FP8_BLOCK = 32  # elements per fp8 scale


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

    def payload_dtypes(self, spec_dtype: Any, paged: bool) -> tuple[str, ...]:
        """The dtypes a tensor of this spec may arrive in under this format: the compressed
        dtype, or the receiver's own dtype and the source dtype (a float32 recurrent state
        arrives as float32 from a bf16 node: it is float32 everywhere)."""
        if paged and self.compression == "int8":
            return ("int8",)
        if paged and self.compression == "fp8":
            return ("float8_e4m3fn",)
        own = str(spec_dtype).removeprefix("torch.")
        return (own, self.source_dtype) if self.source_dtype and self.source_dtype != own else (own,)

    def scales_count(self, shape: tuple[int, ...], paged: bool) -> int:
        """float32 scales a tensor of `shape` carries (0 when it travels unscaled)."""
        if not paged or not self.compression:
            return 0
        rows = prod(shape[:-1])
        return rows if self.compression == "int8" else rows * (shape[-1] // fp8_block(shape[-1]))


def transfer_bytes(layout: KvLayout, tokens: int, compression: str = "", cached_tokens: int = 0) -> int:
    """Payload bytes of a transfer of `tokens` (the receiver holding `cached_tokens`) with the
    paged tensors in `compression` (scales included); the states always exact. S_kv on the wire."""
    fmt = WireFormat(compression)
    n = tokens - cached_tokens
    paged = 0
    for spec in layout.paged_specs:
        if not compression:
            paged += n * spec.nbytes
        else:
            paged += n * (spec.numel + 4 * fmt.scales_count((1, *spec.shape), True))
    return paged + layout.state_bytes


def is_valid(name: str) -> bool:
    try:
        WireFormat.parse(name)
    except ValueError:
        return False
    return True


def fp8_block(last_dim: int) -> int:
    """Elements per fp8 scale for rows of `last_dim`: FP8_BLOCK, or a divisor of the row."""
    return gcd(last_dim, FP8_BLOCK)


# --- negotiation ---------------------------------------------------------------------------------
def accepted_formats(compressions: tuple[str, ...] = ("int8", "fp8"), convert: bool = True) -> tuple[str, ...]:
    """What a decode node lists as accepted: exact, each compression, and, when it converts,
    each with every source dtype (the receiver checks the one it is given against its layout)."""
    comps = ("", *[c for c in compressions if c])
    sources = ("", *CONVERTIBLE) if convert else ("",)
    return tuple(WireFormat(c, s).name for c in comps for s in sources)


def wire_accept(text: str) -> tuple[str, ...]:
    """A decode node's --kv-wire-accept: comma-separated "int8", "fp8", "convert" (any of them;
    "" = exact in its own dtype only) -> the formats it registers as accepted."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in words if w not in ("int8", "fp8", "convert")]
    if bad:
        raise ValueError(f"unknown wire format {bad[0]!r}: use int8, fp8 and/or convert, comma-separated")
    comps = tuple(w for w in words if w != "convert")
    return accepted_formats(comps, convert="convert" in words)


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
