"""What a KV chunk carries. Mirrors `prfaas.v1.KvKind` (same numbers; tests/transport/test_codec.py
checks), kept free of generated code so that service cores can name kinds without importing it."""

from __future__ import annotations

from enum import IntEnum


class KvKind(IntEnum):
    FULL_K = 1
    FULL_V = 2
    FULL_LATENT = 3
    LINEAR_RECURRENT = 4
    LINEAR_CONV = 5
    FIRST_TOKEN = 6


FULL_KINDS = frozenset({KvKind.FULL_K, KvKind.FULL_V, KvKind.FULL_LATENT})
STATE_KINDS = frozenset({KvKind.LINEAR_RECURRENT, KvKind.LINEAR_CONV})
