"""Protobuf <-> domain conversions shared by the servicers and the node clients."""

from __future__ import annotations

from prfaas.engine.sampling import SamplingParams
from prfaas.v1 import common_pb2


def sampling_to_pb(p: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        stop_token_ids=list(p.stop_token_ids),
    )
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def sampling_from_pb(m: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=m.max_tokens,
        temperature=m.temperature,
        top_p=m.top_p if m.top_p > 0 else 1.0,
        top_k=m.top_k,
        seed=m.seed if m.HasField("seed") else None,
        stop_token_ids=tuple(m.stop_token_ids),
    )
