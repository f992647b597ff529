"""S_kv with KV compression on the wire (prfaas/transport/codec.py), for the planner and the
simulator: the full-attention part of a transfer shrinks, the linear states do not.

Torch-free: the ratios are the codec's byte counts per element. A profile's state part is its
value extrapolated to length 0 (the bytes every transfer carries whatever its length).
"""

from __future__ import annotations

from prfaas.scheduling.profiles import Profile

FORMATS = ("off", "int8", "fp8")
FP8_BLOCK = 32  # elements per fp8 scale (codec.FP8_BLOCK)


def bytes_per_element(fmt: str, row: int, exact_bytes: float) -> float:
    """Wire bytes per KV element: int8 and a float32 scale per row, fp8 and one per block."""
    if fmt == "off":
        return exact_bytes
    if fmt == "int8":
        return 1 + 4 / row
    if fmt == "fp8":
        return 1 + 4 / min(row, FP8_BLOCK)
    raise ValueError(f"unknown KV compression {fmt!r}: choose from {', '.join(FORMATS)}")


def compressed_kv_bytes(profile: Profile, fmt: str, row: int = 576, exact_bytes: float = 2.0) -> Profile:
    """S_kv(l) when the full-attention KV travels as `fmt`. Defaults: the paper's model, MLA
    rows of 512 + 64 in bfloat16."""
    factor = bytes_per_element(fmt, row, exact_bytes) / exact_bytes
    state = profile(0.0)
    return Profile(profile.lengths, tuple(state + (v - state) * factor for v in profile.values))
