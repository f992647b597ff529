"""The Router servicer: request message in, the core's stream out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from prfaas.errors import InvalidRequest
from prfaas.messages import SamplingParams
from prfaas.rpc.convert import logprob_to_pb
from prfaas.rpc.status import grpc_errors
from prfaas.v1 import common_pb2, router_pb2, router_pb2_grpc

from .core import GenerateInput, Router

_ROUTE_IN = {common_pb2.AUTO: "auto", common_pb2.LOCAL: "local", common_pb2.PRFAAS: "prfaas"}
_ROUTE_OUT = {"local": common_pb2.LOCAL, "prfaas": common_pb2.PRFAAS, "": common_pb2.AUTO}


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    async def Generate(  # noqa: N802 - gRPC method name
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        async with grpc_errors(context):
            if request.route not in _ROUTE_IN:
                raise InvalidRequest(f"unknown route {request.route}")
            params = SamplingParams(
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=1.0 if request.top_p == 0 else request.top_p,  # 0: unset; the rest is checked
                top_k=request.top_k,
                seed=request.seed if request.HasField("seed") else None,
                stop_token_ids=tuple(request.stop_token_ids),
                logprobs=request.logprobs if request.HasField("logprobs") else None,
                ignore_eos=request.ignore_eos,
            )
            req = GenerateInput(
                request.request_id, request.prompt, list(request.token_ids), params, _ROUTE_IN[request.route]
            )
            async with contextlib.aclosing(self.router.generate(req)) as stream:
                async for out in stream:
                    yield router_pb2.GenerateResponse(
                        token_ids=out.token_ids,
                        text=out.text,
                        finish_reason=out.finish_reason,
                        route=_ROUTE_OUT[out.route],
                        prefill_node=out.prefill_node,
                        decode_node=out.decode_node,
                        request_id=out.request_id,
                        cached_tokens=out.cached_tokens,
                        logprobs=[logprob_to_pb(lp) for lp in out.logprobs],
                    )
