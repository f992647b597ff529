"""python -m services.router: the client-facing router."""

from __future__ import annotations

import asyncio

from prfaas.cluster.client import CachePoolClient
from prfaas.engine.tokenizer import load_tokenizer
from prfaas.model.config import ModelConfig
from prfaas.model.presets import resolve_model
from prfaas.obs import metrics
from prfaas.obs.log import configure, get_logger
from prfaas.scheduling.policy import HomogeneousPolicy, NaivePolicy, PrfaasPolicy, RoutingPolicy
from prfaas.settings import RouterSettings, parse_router_settings
from prfaas.v1 import router_pb2, router_pb2_grpc
from services.common.bootstrap import serve
from services.router.clients import GrpcNodeClients
from services.router.core import Router
from services.router.directory import CachePoolDirectory
from services.router.server import RouterServicer

log = get_logger(__name__)


def make_policy(s: RouterSettings) -> RoutingPolicy:
    if s.policy == "homogeneous":
        return HomogeneousPolicy()
    if s.policy == "naive":
        return NaivePolicy()
    return PrfaasPolicy(s.threshold_tokens, s.bandwidth_mode)  # type: ignore[arg-type]


async def main(s: RouterSettings) -> None:
    configure("router", s.log_level)
    model_dir = resolve_model(s.model)
    tokenizer = load_tokenizer(model_dir, ModelConfig.from_dir(model_dir).vocab_size)
    pool = CachePoolClient(s.cachepool)
    clients = GrpcNodeClients()
    router = Router(CachePoolDirectory(pool, s.refresh_s), clients, make_policy(s), tokenizer,
                    transfer_timeout_s=s.transfer_timeout_s, num_connections=s.kv_connections)

    def observe(decision, prompt_tokens: int, ttft_s: float) -> None:  # type: ignore[no-untyped-def]
        metrics.ROUTING_DECISIONS.labels(decision.route).inc()
        metrics.TTFT_SECONDS.labels(decision.route).observe(ttft_s)
        metrics.PREFIX_HIT_TOKENS.labels(decision.route).inc(decision.cached_tokens)
        metrics.PREFIX_QUERY_TOKENS.inc(prompt_tokens)
        metrics.THRESHOLD_TOKENS.set(getattr(router.policy, "threshold", 0.0))

    router.observers.append(observe)
    metrics.THRESHOLD_TOKENS.set(getattr(router.policy, "threshold", 0.0))
    log.info("policy", policy=s.policy, threshold_tokens=getattr(router.policy, "threshold", None),
             bandwidth_mode=s.bandwidth_mode)

    def add(server):  # type: ignore[no-untyped-def]
        router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(router), server)
        return [router_pb2.DESCRIPTOR.services_by_name["Router"].full_name]

    async def stopping() -> None:
        await clients.close()
        await pool.close()

    await serve(s.listen, add, None, stopping, s.metrics_port)


if __name__ == "__main__":
    asyncio.run(main(parse_router_settings()))
