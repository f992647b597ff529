"""One running cluster for the front door's tests: `prfaas up`'s processes (cache pool, a PrfaaS
and a local prefill node, a decode node, the router, the front door, a metrics endpoint each)
over a transformers checkpoint with a real BPE tokenizer and a ChatML template."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from prfaas.engine.tokenizer import Tokenizer, load_tokenizer
from prfaas.rpc import channel as rpc_channel
from prfaas.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.frontdoor.model_files import write_tokenizer

MODEL_NAME = "tiny-chat"


@dataclass
class Served:
    cluster: Any  # LocalCluster
    reference: Any  # the transformers model
    tokenizer: Tokenizer
    model_dir: Path


@pytest.fixture(scope="package")
def served(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("aiohttp")
    from prfaas.cluster.local import ClusterSpec, LocalCluster
    from tests.test_data_path import make_checkpoint

    path = tmp_path_factory.mktemp("frontdoor_model")
    ref = make_checkpoint(path, "qwen3_next")
    write_tokenizer(path)
    spec = ClusterSpec(prfaas_prefill=1, local_prefill=1, local_decode=1, threshold_tokens=64,
                       served_model_name=MODEL_NAME)
    with LocalCluster(str(path), spec, log_dir=str(path / "logs")) as c:
        yield Served(c, ref, load_tokenizer(path, 300), path)


@dataclass
class RouterResult:
    token_ids: list[int]
    text: str  # the router's streamed `text` fields, joined
    head: router_pb2.GenerateResponse
    logprobs: list[float]
    top: list[list[tuple[int, float]]]  # each token's alternatives, most likely first


def router_generate(address: str, prompt: list[int], max_tokens: int, route: int = common_pb2.AUTO,
                    logprobs: int | None = None) -> RouterResult:
    async def run() -> RouterResult:
        async with rpc_channel(address) as ch:
            req = router_pb2.GenerateRequest(token_ids=prompt, max_tokens=max_tokens, route=route)
            if logprobs is not None:
                req.logprobs = logprobs
            ids: list[int] = []
            text, lps, top, head = "", [], [], None
            async for msg in router_pb2_grpc.RouterStub(ch).Generate(req):
                head = head or msg
                ids += msg.token_ids
                text += msg.text
                lps += [x.logprob for x in msg.logprobs]
                top += [list(zip(x.top_token_ids, x.top_logprobs, strict=True)) for x in msg.logprobs]
            assert head is not None
            return RouterResult(ids, text, head, lps, top)

    return asyncio.run(run())
