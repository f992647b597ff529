"""python -m services.router: the client-facing router."""

from __future__ import annotations

import grpc

from prfaas.cluster import Role
from prfaas.cluster.client import CachePoolClient
from prfaas.engine.tokenizer import load_tokenizer
from prfaas.kv.layout import KvLayout
from prfaas.model.config import ModelConfig
from prfaas.model.presets import resolve_model
from prfaas.obs import metrics
from prfaas.obs.log import configure, get_logger
from prfaas.rpc import channel
from prfaas.rpc.convert import role_to_pb
from prfaas.rpc.handlers import add_service
from prfaas.rpc.serve import serve
from prfaas.scheduling.policy import RouteDecision, make_policy
from prfaas.security import tls
from prfaas.security.authz import Authoriser
from prfaas.security.tokens import TokenFile
from prfaas.settings import RouterSettings, parse_router_settings
from prfaas.startup import run_service
from prfaas.transport.formats import transfer_bytes
from prfaas.v1 import common_pb2, common_pb2_grpc, router_pb2

from .clients import GrpcNodeClients
from .control import ControlLoop
from .core import Node, Router, RouterLimits
from .directory import CachePoolDirectory
from .server import RouterServicer
from .wire import WirePolicy, WireSettings

log = get_logger(__name__)

GBPS = 1e9 / 8


async def set_role(node: Node, role: str) -> None:
    """NodeControl.SetRole on a local node (FAILED_PRECONDITION if it was not started convertible)."""
    async with channel(node.address, expect=node.node_id) as ch:
        request = common_pb2.SetRoleRequest(role=role_to_pb(Role(role)))
        await common_pb2_grpc.NodeControlStub(ch).SetRole(request, timeout=5)


def limits(s: RouterSettings, config: ModelConfig) -> RouterLimits:
    return RouterLimits(
        vocab_size=config.vocab_size, max_context=config.max_position_embeddings,
        transfer_timeout_s=s.transfer_timeout_s, stall_timeout_s=s.stall_timeout_s, num_connections=s.kv_connections,
        prefill_inflight=s.prefill_inflight, max_queue=s.max_queue, max_queue_tokens=s.max_queue_tokens,
        max_head_wait_s=s.max_head_wait_s, max_queue_wait_s=s.max_queue_wait_s, stale_after_s=s.stale_after_s,
        early_first_token=s.first_token == "prefill",
    )


def export_metrics(router: Router, policy: object) -> None:
    m = metrics.current()

    def observe(decision: RouteDecision, prompt_tokens: int, ttft_s: float) -> None:
        m.routing_decisions.labels(decision.route).inc()
        m.ttft.labels(decision.route).observe(ttft_s)
        m.prefix_hits.labels(decision.route).inc(decision.cached_tokens)
        m.prefix_queries.inc(prompt_tokens)
        m.threshold.set(getattr(policy, "threshold", 0.0))

    router.observers.append(observe)
    router.queue_observers.append(m.queue_time.observe)
    m.bind("waiting", lambda: float(len(router.queue)))
    m.bind("running", lambda: float(router.active - len(router.queue)))
    m.threshold.set(getattr(policy, "threshold", 0.0))


async def main(s: RouterSettings) -> None:
    configure("router", s.log_level)
    metrics.install("router")
    model_dir = resolve_model(s.model)
    config = ModelConfig.from_dir(model_dir)
    tokenizer = load_tokenizer(model_dir, config.vocab_size)
    pool = CachePoolClient(s.cachepool)
    clients = GrpcNodeClients()
    directory = CachePoolDirectory(pool, s.refresh_s)
    policy = make_policy(s.policy, s.threshold_tokens, s.bandwidth_mode)
    layout = KvLayout(config)
    wire = WirePolicy(WireSettings(
        s.kv_compression, s.kv_compression_format, s.link_gbps * GBPS,
        ratio=transfer_bytes(layout, 4096) / transfer_bytes(layout, 4096, s.kv_compression_format),
        scarce=s.bandwidth_mode == "scarce",
    ))
    router = Router(directory, clients, policy, tokenizer, limits(s, config), wire=wire)

    def kv_bytes(tokens: int) -> int:  # S_kv as the controller should see it: compressed while compressing
        return transfer_bytes(layout, tokens, s.kv_compression_format if wire.compressing else "")

    control = None
    if s.control_interval_s > 0:
        control = ControlLoop(router, policy, kv_bytes, s.link_gbps * GBPS, set_role, s.control_interval_s,
                              s.role_interval_s, waiting=router.waiting_uncached)
        router.observers.append(control.on_decision)
        router.prefill_observers.append(control.on_prefill)

    export_metrics(router, policy)
    log.info(
        "policy",
        policy=s.policy,
        threshold_tokens=getattr(policy, "threshold", None),
        bandwidth_mode=s.bandwidth_mode,
        link_gbps=s.link_gbps,
        control_loop=control is not None,
        kv_compression=s.kv_compression,
        kv_compression_format=s.kv_compression_format,
    )

    def add(server: grpc.aio.Server) -> list[str]:
        return [add_service(server, RouterServicer(router), router_pb2.DESCRIPTOR.services_by_name["Router"])]

    async def started(address: str) -> None:
        if control is not None:
            control.start()

    async def stopping() -> None:
        if control is not None:
            await control.stop()
        await router.stop()
        await clients.close()
        await pool.close()

    cfg = tls.current()  # clients: a certificate of kind client, or a bearer token from the token file
    tokens = TokenFile(s.client_tokens) if s.client_tokens else None
    authoriser = Authoriser(cfg.domain, cfg.insecure, tokens=tokens, max_per_client=s.max_client_requests)
    await serve(s.listen, add, started, stopping, s.metrics_port, drain=lambda: router.drain(s.drain_timeout_s),
                authoriser=authoriser, token_listen=s.token_listen)


if __name__ == "__main__":
    run_service("router", main, parse_router_settings())
