"""The one vocabulary for the tensors a layer keeps: `KvKind`. The KV layout says which layer
has which kinds; the executor, the KV stream and the services name tensors by kind.

The numbers are those of `prfaas.v1.KvKind` (the transport's wire module checks this at import),
kept free of generated code so that the engine and the cores can name kinds without the wire."""

from __future__ import annotations

from enum import IntEnum


class KvKind(IntEnum):
    FULL_K = 1              # GQA keys, paged per token
    FULL_V = 2              # GQA values, paged per token
    FULL_LATENT = 3         # MLA compressed latent plus rope key, paged per token
    LINEAR_RECURRENT = 4    # linear-attention recurrent state, one per request
    LINEAR_CONV = 5         # linear-attention conv state, one per request
    FIRST_TOKEN = 6         # the wire's last chunk of a transfer: the first sampled token
