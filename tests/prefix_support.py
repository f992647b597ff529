"""An in-process cluster for prefix-cache tests: the real router, prefill and decode cores, each
node with its own executor and `PrefixCache`, the real cache pool core (`CachePool`) fed with the
nodes' events, and the KV through the real chunk plan, codec and receiver (`MemoryPush`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from prfaas.cluster import NodeInfo, Role
from prfaas.engine.executor import Executor
from prfaas.engine.llm import build_executor
from prfaas.kv.prefix_cache import PrefixCache
from prfaas.kv.prefix_index import CacheEvent
from prfaas.messages import PrefillJob, SamplingParams
from prfaas.scheduling.policy import PrfaasPolicy, RoutingPolicy
from prfaas.transport.receiver import KvReceiver
from services.cachepool.core import CachePool
from services.decode.core import DecodeNode
from services.decode.prefix import DecodePrefix
from services.prefill.core import PrefillNode
from services.prefill.moves import PrefixMover
from services.router.core import GenerateInput, Node, Router
from services.worker.node import prefill_planner
from tests.support import MemoryPush


@dataclass
class Member:
    node: Node
    executor: Executor
    cache: PrefixCache | None
    prefill: PrefillNode | None = None
    decode: DecodeNode | None = None
    receiver: KvReceiver | None = None
    mover: PrefixMover | None = None
    sent: list[int] = field(default_factory=list)  # KV bytes each prefill pushed (from its Done)


class PoolDirectory:
    degraded = False

    def __init__(self, pool: CachePool, nodes: list[Node]) -> None:
        self.pool, self._nodes = pool, nodes

    async def nodes(self) -> list[Node]:
        return self._nodes

    async def hits(self, token_ids: list[int]) -> dict[str, int]:
        return {h.node_id: h.hit_tokens for h in (await self.pool.match(token_ids)).hits}


class Clients:
    def __init__(self, members: dict[str, Member]) -> None:
        self.members = members

    def admit(self, address, request_id, prompt, params, timeout_s, wire_dtypes=(), **_):  # type: ignore[no-untyped-def]
        d = self.members[address].decode
        assert d is not None
        return d.admit(request_id, prompt, params, timeout_s, wire_dtypes)

    def prefill(self, address, job, **_):  # type: ignore[no-untyped-def]
        p = self.members[address].prefill
        assert p is not None
        return p.prefill(job)

    def import_prefix(self, address, request_id, prompt, hit, timeout_s, node_id="", holder_node="", **_):  # type: ignore[no-untyped-def]
        mover = self.members[address].mover
        assert mover is not None
        return mover.import_(request_id, prompt, hit, timeout_s, holder=holder_node)

    async def export_prefix(self, address, request_id, prompt, hit, transfer_id, dest, deadline, node_id="",  # type: ignore[no-untyped-def]
                            dest_node=""):
        mover = self.members[address].mover
        assert mover is not None
        return await mover.export(request_id, prompt, hit, transfer_id, dest, 0, deadline, dest_node=dest_node)


class PrefixCluster:
    """Nodes named `p*` prefill, `d*` decode; `cluster_of` puts each in "local" or "prfaas"."""

    def __init__(self, model_dir: str, names: dict[str, str], *, decode_cache: bool = True, cache: bool = True,
                 num_blocks: int = 512, num_slots: int = 24, checkpoint_tokens: int = 64, chunk_tokens: int = 128,
                 max_states: int = 12, policy: RoutingPolicy | None = None) -> None:
        self.pool = CachePool(block_size=16)
        self.members: dict[str, Member] = {}
        self.pending: list[asyncio.Task[int]] = []
        for name, cluster in names.items():
            ex, _ = build_executor(model_dir, num_blocks=num_blocks, num_slots=num_slots)
            role = "prefill" if name.startswith("p") else "decode"
            keep = cache and (role == "prefill" or decode_cache)
            pc = PrefixCache(name, ex.blocks, ex.slots, max_states=max_states) if keep else None
            node = Node(name, cluster, role, name, capacity_blocks=num_blocks, capacity_slots=num_slots,
                        prefix_grid=16 if keep else 0)
            m = Member(node, ex, pc)
            if role == "prefill":
                planner = prefill_planner(ex.layout, chunk_tokens, checkpoint_tokens)
                m.prefill = PrefillNode(name, ex, self._push, None, planner if keep else None, pc,
                                        self._publisher(name), cluster=cluster)
                if pc is not None:
                    m.receiver = KvReceiver()
                    m.mover = PrefixMover(name, ex, pc, m.receiver, self._move_push, self._publisher(name))
                    m.mover.kv_address = name
            else:
                m.receiver = KvReceiver()
                prefix = DecodePrefix(ex, pc, self._publisher(name)) if pc is not None else None
                m.decode = DecodeNode(name, ex, m.receiver, transfer_timeout_s=20, prefix=prefix)
            self.members[name] = m
        nodes = [m.node for m in self.members.values()]
        self.router = Router(PoolDirectory(self.pool, nodes), Clients(self.members),
                             policy or PrfaasPolicy(threshold=1e9))

    def _push(self, job):  # type: ignore[no-untyped-def]
        m = self.members[job.decode_address]
        assert m.receiver is not None
        return MemoryPush(m.receiver, job, m.executor.layout)

    def _move_push(self, address: str, transfer_id: str, tokens: int, connections: int, deadline: float,
                   dest_node: str = ""):  # type: ignore[no-untyped-def]
        m = self.members[address]
        assert m.receiver is not None
        job = PrefillJob("", transfer_id, [0] * tokens, SamplingParams(), address)
        return MemoryPush(m.receiver, job, m.executor.layout)

    def _publisher(self, node_id: str):  # type: ignore[no-untyped-def]
        def publish(events: list[CacheEvent]) -> None:
            if events:
                self.pending.append(asyncio.get_running_loop().create_task(self.pool.publish(events)))
        return publish

    async def __aenter__(self) -> PrefixCluster:
        for m in self.members.values():
            role = Role.PREFILL if m.node.role == "prefill" else Role.DECODE
            await self.pool.register(NodeInfo(m.node.node_id, m.node.cluster, role, "127.0.0.1:1"))
            if m.decode:
                m.decode.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for m in self.members.values():
            if m.decode:
                await m.decode.stop()
        await self.router.stop()

    async def settle(self) -> None:
        """Every published event applied."""
        await asyncio.gather(*self.pending)
        self.pending.clear()

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams, route: str = "auto"):  # type: ignore[no-untyped-def]
        outs = [o async for o in self.router.generate(GenerateInput(request_id, "", prompt, params, route))]
        await self.settle()
        return [t for o in outs for t in o.token_ids], outs[0]
