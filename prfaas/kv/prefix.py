"""Prefix identity: the one chained block hash that every service uses.

A prompt's full blocks of `block_size` tokens are named by a chain of 64-bit hashes,
`h_i = blake2b-64(h_{i-1} || int32 token ids of block i)` with `h_{-1} = 0`, so a block's hash names
the whole prefix that ends with it. The tail that does not fill a block has no hash: only full
blocks are ever cached or matched. Deterministic across processes and machines (never `hash()`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

ROOT_HASH = 0


def chain_hash(parent: int, block_tokens: Sequence[int]) -> int:
    """The hash of one block given its parent's hash. Token ids must fit in int32."""
    h = hashlib.blake2b(digest_size=8)
    h.update(parent.to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(block_tokens)}i", *block_tokens))
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int, parent: int = ROOT_HASH) -> list[int]:
    """Chained hashes of every full block of `token_ids` (the partial tail block is left out).
    `parent` continues a chain, e.g. from the last hash of an already hashed prefix."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    out: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = chain_hash(parent, token_ids[start : start + block_size])
        out.append(parent)
    return out
