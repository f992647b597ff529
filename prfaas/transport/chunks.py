"""The chunk plan of a KV transfer: which pieces of a request's KV travel, cut into how many
chunks. Derived from the KV layout's specs; no wire format here (that is `wire.py`).

A transfer of a prompt of `P` tokens, of which the decode side already holds `skip`, carries:
  - every paged tensor's tokens `[skip, P)`, cut on a grid of `tokens_per_chunk(spec)` tokens
    counted from `skip` (a power of two, so pieces of power-of-two token counts, as a chunked
    prefill makes them, fall on the grid);
  - every per-request state once, as it stands at the end of the prompt (token range (0, 0));
  - then the first sampled token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prfaas.kv.kinds import KvKind
from prfaas.kv.layout import KvLayout, TensorSpec
from prfaas.kv.pool import LayerKv

WIRE_EXACT = ""      # payloads in the layout's dtypes
WIRE_INT8 = "int8"   # paged payloads as int8 with per-row float32 scales; states stay exact
WIRE_FP8 = "fp8"     # paged payloads as float8 e4m3 with per-block float32 scales (transport/codec.py)

DEFAULT_MAX_CHUNK_BYTES = 256 << 10  # chosen by bench/transport.py (docs/transport.md)


@dataclass(frozen=True)
class KvPiece:
    """One tensor of one layer: a paged tensor's tokens [token_start, token_end), shaped
    `(tokens, *spec.shape)`, or a whole state (token range (0, 0))."""

    layer: int
    kind: KvKind
    token_start: int
    token_end: int
    tensor: torch.Tensor


def tokens_per_chunk(spec: TensorSpec, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> int:
    """Tokens per chunk of a paged tensor: the largest power of two whose exact payload fits
    (a compressed wire form carries the same tokens in fewer bytes)."""
    n = max(1, max_chunk_bytes // spec.nbytes)
    return 1 << (n.bit_length() - 1)


def chunk_grid(layout: KvLayout, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> int:
    """Token multiple on which every paged tensor's chunks start (1 when nothing is paged)."""
    return max((tokens_per_chunk(s, max_chunk_bytes) for s in layout.paged_specs), default=1)


def plan_total_chunks(
    layout: KvLayout, prompt_tokens: int, skip_tokens: int = 0, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
) -> int:
    """How many chunks a transfer of `[skip_tokens, prompt_tokens)` takes, FIRST_TOKEN included."""
    n = prompt_tokens - skip_tokens
    return 1 + sum(-(-n // tokens_per_chunk(s, max_chunk_bytes)) if s.paged else 1 for s in layout.specs)


def pieces_of(layout: KvLayout, lk: LayerKv, prompt_tokens: int) -> list[KvPiece]:
    """What of one layer's freshly computed KV travels: the paged tensors' tokens as they are
    computed, the states only as they stand at the end of the prompt (once per transfer)."""
    out = []
    for kind, t in lk.tensors.items():
        if layout.spec(lk.layer, kind).paged:
            out.append(KvPiece(lk.layer, kind, lk.token_start, lk.token_end, t))
        elif lk.token_end == prompt_tokens:
            out.append(KvPiece(lk.layer, kind, 0, 0, t))
    return out


def split_piece(piece: KvPiece, tokens_per_chunk: int, grid_origin: int) -> list[KvPiece]:
    """Cuts a paged piece at multiples of `tokens_per_chunk` counted from `grid_origin` (views)."""
    out, start = [], piece.token_start
    while start < piece.token_end:
        end = min(piece.token_end, grid_origin + ((start - grid_origin) // tokens_per_chunk + 1) * tokens_per_chunk)
        a, b = start - piece.token_start, end - piece.token_start
        out.append(KvPiece(piece.layer, piece.kind, start, end, piece.tensor[a:b]))
        start = end
    return out
