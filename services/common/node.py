"""A worker node process: prefill, decode, or convertible (both servicers over one executor).

`python -m services.prefill` and `python -m services.decode` both run this with their role.
A convertible node (`--convertible`) can be switched between prefill and decode by the router's
long-term controller through `NodeControl.SetRole`; requests of the old role run to completion.
"""

from __future__ import annotations

import asyncio
import math
import time

import grpc

from prfaas.cluster import NodeInfo, NodeLoad, Role
from prfaas.cluster.client import CachePoolClient
from prfaas.cluster.membership import MembershipAgent
from prfaas.engine.executor import Executor
from prfaas.kv.codec import DEFAULT_MAX_CHUNK_BYTES, tokens_per_chunk
from prfaas.kv.prefix_cache import PrefixCache
from prfaas.kv.prefix_index import CacheEvent
from prfaas.obs.log import configure, get_logger
from prfaas.settings import NodeSettings
from prfaas.transport.receiver import KvReceiver
from prfaas.transport.sender import KvChannels
from prfaas.transport.servicer import SERVER_OPTIONS, add_decode_servicer
from prfaas.transport.stats import GLOBAL as LINK_STATS
from prfaas.transport.tcp import KvTcpServer
from prfaas.v1 import common_pb2, common_pb2_grpc, decode_pb2, prefill_pb2, prefill_pb2_grpc
from services.common.bootstrap import build_node_executor, serve
from services.decode.core import DecodeNode
from services.decode.server import DecodeServicer
from services.prefill.core import PrefillNode
from services.prefill.server import PrefillServicer, sender_factory

log = get_logger(__name__)

_ROLE_PB = {Role.PREFILL: common_pb2.PREFILL, Role.DECODE: common_pb2.DECODE}
_ROLE_FROM_PB = {v: k for k, v in _ROLE_PB.items()}


def prefix_grid(executor: Executor, chunk_tokens: int) -> tuple[int, int]:
    """Where prefix checkpoints may sit: multiples of the block size and of the KV chunk grid (so a
    reused prefix keeps the KV stream's pieces on its grid). Returns (grid, the prefill chunk
    rounded down to a multiple of it, 0 for no chunking)."""
    layout = executor.layout
    tpc = max(tokens_per_chunk(layout, f.layer, "", DEFAULT_MAX_CHUNK_BYTES) for f in layout.full_layers)
    grid = math.lcm(layout.block_size, tpc)
    return grid, (chunk_tokens // grid * grid if chunk_tokens >= grid else 0)


class WorkerNode:
    """The cores a node hosts, its current role and its load as it reports it."""

    def __init__(self, s: NodeSettings, role: Role) -> None:
        self.settings, self.role = s, role
        self.convertible = s.convertible
        self.executor = build_node_executor(s)
        lock = asyncio.Lock()
        self.channels = KvChannels(s.kv_connections)
        self.prefill = self.decode = None
        self.pool: CachePoolClient | None = CachePoolClient(s.cachepool) if s.cachepool else None
        self.prefix_cache: PrefixCache | None = None
        self._publishing: set[asyncio.Task[None]] = set()
        if role == Role.PREFILL or self.convertible:
            grid, chunk = prefix_grid(self.executor, s.prefill_chunk_tokens)
            self.prefix_cache = PrefixCache(s.node_id, self.executor.blocks, self.executor.slots)
            self.prefill = PrefillNode(
                s.node_id,
                self.executor,
                sender_factory(self.executor.layout, self.channels),
                lock,
                chunk,
                self.prefix_cache,
                grid,
                self.publish,
                yield_between_chunks=self.convertible,
            )
        receiver = KvReceiver()
        self.kv_tcp = KvTcpServer(receiver)  # the raw-TCP data port, started when the node decodes
        if role == Role.DECODE or self.convertible:
            self.decode = DecodeNode(s.node_id, self.executor, receiver, s.max_batch, s.transfer_timeout_s, lock)
        self.agent: MembershipAgent | None = None
        self._egress_at, self._egress_bytes = time.monotonic(), 0

    def publish(self, events: list[CacheEvent]) -> None:
        """Tells the cache pool what the prefix cache stored or evicted (in the background)."""
        if not events or self.pool is None:
            return
        pool = self.pool

        async def send() -> None:
            try:
                await pool.publish(events)
            except Exception as e:  # the pool learns the inventory again at re-registration
                log.warning("cache_events_not_published", error=repr(e), events=len(events))

        task = asyncio.get_running_loop().create_task(send())
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def republish(self) -> None:
        """After (re-)registering, the pool starts this node with an empty index entry."""
        if self.prefix_cache is not None:
            self.publish(self.prefix_cache.inventory())

    def set_role(self, role: Role) -> Role:
        if role not in (Role.PREFILL, Role.DECODE):
            raise ValueError(f"a worker node is prefill or decode, not {role.value or 'unspecified'}")
        previous = self.role
        if role != previous and not self.convertible:
            raise PermissionError(f"node {self.settings.node_id} was not started convertible")
        self.role = role
        if self.agent:
            self.agent.set_role(role)
        log.info("role_changed", old=previous.value, new=role.value)
        return previous

    def load(self) -> NodeLoad:
        ex = self.executor
        queue = running = 0
        egress = 0.0
        if self.prefill:
            st = self.prefill.stats()
            queue, running = queue + st["queue_depth"], running + st["running"]
            now = time.monotonic()
            egress = (self.prefill.bytes_sent - self._egress_bytes) / max(now - self._egress_at, 1e-6)
            self._egress_at, self._egress_bytes = now, self.prefill.bytes_sent
        if self.decode:
            st = self.decode.stats()
            queue, running = queue + st["pending_transfers"], running + st["running"]
        return NodeLoad(
            kv_retransmits=LINK_STATS.total_retransmits,
            free_blocks=ex.blocks.num_free,
            free_slots=ex.slots.num_free,
            queue_depth=queue,
            running=running,
            egress_bytes_per_s=egress,
        )


class NodeControlServicer(common_pb2_grpc.NodeControlServicer):
    def __init__(self, node: WorkerNode) -> None:
        self.node = node

    async def SetRole(  # noqa: N802 - gRPC method name
        self, request: common_pb2.SetRoleRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.SetRoleResponse:
        role = _ROLE_FROM_PB.get(request.role)
        if role is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "role must be PREFILL or DECODE")
        try:
            previous = self.node.set_role(role)  # type: ignore[arg-type]
        except PermissionError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return common_pb2.SetRoleResponse(previous=_ROLE_PB[previous], role=_ROLE_PB[self.node.role])


async def run_node(s: NodeSettings, role: Role) -> None:
    configure(role.value, s.log_level)
    node = WorkerNode(s, role)
    if node.decode:
        node.decode.start()

    def add(server: grpc.aio.Server) -> list[str]:
        names = [common_pb2.DESCRIPTOR.services_by_name["NodeControl"].full_name]
        common_pb2_grpc.add_NodeControlServicer_to_server(NodeControlServicer(node), server)
        if node.prefill:
            prefill_pb2_grpc.add_PrefillServicer_to_server(PrefillServicer(node.prefill), server)
            names.append(prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name)
        if node.decode:
            servicer = DecodeServicer(node.decode)
            add_decode_servicer(server, servicer, servicer.push)  # PushKv without a protobuf copy
            names.append(decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name)
        return names

    async def started(address: str) -> None:
        if node.decode and s.kv_transport == "tcp":
            host = s.listen.rsplit(":", 1)[0]
            port = await node.kv_tcp.start(host, s.kv_tcp_port)
            advertised = (s.advertise or address).rsplit(":", 1)[0]
            node.decode.kv_address = f"tcp://{advertised}:{port}"
            log.info("kv_data_port", address=node.decode.kv_address)
        if s.cachepool:
            info = NodeInfo(
                node_id=s.node_id,
                cluster=s.cluster,
                role=node.role,
                address=s.advertise or address,
                capacity_blocks=s.kv_blocks,
                capacity_slots=s.state_slots,
                hardware=s.hardware,
            )
            assert node.pool is not None
            node.agent = MembershipAgent(node.pool, info, node.load, on_register=node.republish)
            await node.agent.start()

    async def stopping() -> None:
        if node.agent:
            await node.agent.stop()
        if node.decode:
            await node.decode.stop()
        await node.kv_tcp.stop()
        await node.channels.close()

    await serve(s.listen, add, started, stopping, s.metrics_port, SERVER_OPTIONS)
