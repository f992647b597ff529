"""A worker node: the executor and the cores it hosts (prefill, decode, or both when convertible),
its prefix cache, its role, and its load as it reports it to the cache pool.

No gRPC here: `server.py` hosts it, `__main__.py` runs it.
"""

from __future__ import annotations

import asyncio
import time

import torch

from prfaas.cluster import CachePoolApi, NodeInfo, NodeLoad, Role
from prfaas.cluster.membership import MembershipAgent
from prfaas.dtypes import torch_dtype
from prfaas.engine.backends import make_backend
from prfaas.engine.executor import Executor
from prfaas.errors import InvalidRequest, NotConvertible
from prfaas.eval.emulate import load_emulator
from prfaas.kv.layout import KvLayout
from prfaas.kv.prefill_plan import PrefillPlanner
from prfaas.kv.prefix_cache import PrefixCache
from prfaas.kv.prefix_index import CacheEvent
from prfaas.messages import PrefillJob, SamplingParams
from prfaas.model.loader import load_model
from prfaas.model.ops import cpu_kernel
from prfaas.model.presets import resolve_model
from prfaas.obs import metrics
from prfaas.obs.log import get_logger
from prfaas.settings import NodeSettings
from prfaas.transport.codec import wire_accept
from prfaas.transport.grpc_push import KvChannels
from prfaas.transport.receiver import KvReceiver
from prfaas.transport.sender import KvSender
from prfaas.transport.stats import GLOBAL as LINK_STATS

from ..decode.core import DecodeNode
from ..decode.prefix import DecodePrefix
from ..prefill.core import PrefillNode
from ..prefill.moves import PrefixMover
from .destinations import Destinations

log = get_logger(__name__)


def build_executor(s: NodeSettings) -> Executor:
    if s.threads:
        torch.set_num_threads(s.threads)
    dtype = torch_dtype(s.dtype)
    model = load_model(resolve_model(s.model), dtype=dtype, device=s.device)
    layout = KvLayout(model.config, block_size=s.block_size, dtype=dtype)
    attn = make_backend(s.attention_backend if s.device != "cpu" else "torch")
    # on the CPU the linear layers run our C kernel: built (once per machine) and loaded here, at
    # start, rather than inside the first request
    linear = "c_kernel" if s.device == "cpu" and cpu_kernel.available() else "torch_chunked"
    log.info("executor", device=s.device, dtype=s.dtype, attention=attn.name, delta_rule=linear,
             threads=torch.get_num_threads(), kv_blocks=s.kv_blocks, state_slots=s.state_slots, **layout.summary())
    return Executor(model, layout, num_blocks=s.kv_blocks, num_slots=s.state_slots, attn=attn, device=s.device)


def prefill_planner(layout: KvLayout, chunk_tokens: int, checkpoint_tokens: int = 256) -> PrefillPlanner:
    """Checkpoints every `checkpoint_tokens` (a multiple of the block size) and at the last block
    boundary before a prompt's end (none with 0: no prefix cache); prompt chunks of `chunk_tokens`,
    rounded to whole blocks."""
    if checkpoint_tokens < 0 or checkpoint_tokens % layout.block_size:
        raise InvalidRequest(f"--checkpoint-tokens {checkpoint_tokens} must be a positive multiple of the block "
                             f"size {layout.block_size}")
    chunk = chunk_tokens // layout.block_size * layout.block_size
    return PrefillPlanner(layout.block_size, checkpoint_tokens, chunk)


class WorkerNode:
    def __init__(self, s: NodeSettings, role: Role, pool: CachePoolApi | None = None) -> None:
        self.settings, self.role, self.pool = s, role, pool
        self.convertible = s.convertible
        self.executor = build_executor(s)
        lock = asyncio.Lock()
        self.emulator = load_emulator(s.emulate)
        self.channels = KvChannels(s.kv_connections)
        self.prefill: PrefillNode | None = None
        self.decode: DecodeNode | None = None
        self.prefix_cache: PrefixCache | None = None
        self._publishing: set[asyncio.Task[None]] = set()
        prefills, decodes = role == Role.PREFILL or self.convertible, role == Role.DECODE or self.convertible
        if s.prefix_cache == "full" or (s.prefix_cache == "prefill" and prefills):
            # one cache per node, shared by its two cores on a convertible node
            states = s.prefix_states or max(1, s.state_slots // 2)
            self.prefix_cache = PrefixCache(s.node_id, self.executor.blocks, self.executor.slots, max_states=states)
            log.info("prefix_cache", mode=s.prefix_cache, max_states=states, checkpoint_tokens=s.checkpoint_tokens,
                     state_bytes_each=self.executor.layout.state_bytes,
                     state_bytes_max=states * self.executor.layout.state_bytes)
        if prefills:
            self.prefill = PrefillNode(
                s.node_id,
                self.executor,
                self.sender_for,
                lock,
                prefill_planner(self.executor.layout, s.prefill_chunk_tokens, s.checkpoint_tokens if self.prefix_cache
                                else 0),
                self.prefix_cache,
                self.publish,
                yield_between_chunks=self.convertible,
                cluster=s.cluster,
                emulator=self.emulator,
                push_after_tokens=s.push_after_tokens,
            )
        self.receiver = KvReceiver()
        self.mover: PrefixMover | None = None  # cross-cluster prefix moves, on prefill nodes with a cache
        if self.prefill and self.prefix_cache:
            self.mover = PrefixMover(s.node_id, self.executor, self.prefix_cache, self.receiver, self.move_sender,
                                     self.publish)
        if decodes:
            cap = s.max_request_blocks or max(1, s.kv_blocks // 2)
            keep = s.prefix_cache == "full" and self.prefix_cache is not None
            prefix = DecodePrefix(self.executor, self.prefix_cache, self.publish) if keep else None  # type: ignore[arg-type]
            self.decode = DecodeNode(s.node_id, self.executor, self.receiver, s.max_batch, s.transfer_timeout_s, lock,
                                     max_request_blocks=cap, emulator=self.emulator, prefix=prefix)
            self.decode.wire_accept = wire_accept(s.kv_wire_accept)
        self.destinations = Destinations(pool)  # a prefill node pushes KV only to registered members
        self.agent: MembershipAgent | None = None  # set once the node registers
        self._rate_at, self._egress_bytes, self._tokens = time.monotonic(), 0, 0

    def sender_for(self, job: PrefillJob) -> KvSender:
        return KvSender.for_job(job, self.executor.layout, self.channels)

    def move_sender(self, address: str, transfer_id: str, tokens: int, connections: int, deadline: float,
                    dest_node: str = "") -> KvSender:
        """A prefix move's push to the importing node (the data plane of a prefill's KV), whose
        certificate must name `dest_node`."""
        job = PrefillJob("", transfer_id, [0] * tokens, SamplingParams(), address, connections, "", deadline,
                         decode_node=dest_node)
        return KvSender.for_job(job, self.executor.layout, self.channels)

    # --- the cache pool ---------------------------------------------------------------------------
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

    # --- role and load ----------------------------------------------------------------------------
    def set_role(self, role: Role) -> Role:
        if role not in (Role.PREFILL, Role.DECODE):
            raise InvalidRequest(f"a worker node is prefill or decode, not {role.value or 'unspecified'}")
        previous = self.role
        if role != previous and not self.convertible:
            raise NotConvertible(f"node {self.settings.node_id} was not started convertible")
        self.role = role
        if self.agent is not None:
            self.agent.set_role(role)  # the next heartbeat tells the pool
        log.info("role_changed", old=previous.value, new=role.value)
        return previous

    def info(self, address: str) -> NodeInfo:
        """What the node registers with the cache pool."""
        s = self.settings
        cap = self.decode.max_request_blocks if self.decode else 0
        grid = s.block_size if self.prefix_cache else 0  # hits fall on block boundaries
        return NodeInfo(s.node_id, s.cluster, self.role, s.advertise or address, s.kv_blocks, s.state_slots, s.hardware,
                        block_size=s.block_size, max_request_blocks=cap, convertible=self.convertible,
                        max_context=self.executor.max_context, prefix_grid=grid, cache_dtype=s.dtype,
                        wire_dtypes=self.decode.wire_accept if self.decode else ())

    @property
    def busy(self) -> bool:
        """Requests in flight (queued, computing, receiving KV or decoding)."""
        st = self.stats()
        return bool(st["running"] or st["pending_transfers"] or st["queue_depth"])

    def drain(self) -> None:
        """Takes no new request from now on (those in flight go on)."""
        if self.prefill:
            self.prefill.draining = True
        if self.decode:
            self.decode.draining = True
        if self.agent is not None:
            self.agent.draining = True

    def tokens_done(self) -> int:
        """Prompt tokens computed plus tokens decoded, since start."""
        return (self.prefill.tokens_computed if self.prefill else 0) + (self.decode.tokens_out if self.decode else 0)

    def load(self) -> NodeLoad:
        """The load reported with each heartbeat; rates are over the time since the last report."""
        ex, now = self.executor, time.monotonic()
        span = max(now - self._rate_at, 1e-6)
        queue = running = 0
        egress = 0.0
        if self.prefill:
            queue, running = self.prefill.queue_depth, self.prefill.running
            egress = (self.prefill.bytes_sent - self._egress_bytes) / span
            self._egress_bytes = self.prefill.bytes_sent
        if self.decode:
            st = self.decode.stats()
            queue, running = queue + st["pending_transfers"], running + st["running"]
        tokens = self.tokens_done()
        tokens_per_s, self._tokens, self._rate_at = (tokens - self._tokens) / span, tokens, now
        return NodeLoad(
            kv_retransmits=LINK_STATS.total_retransmits,
            free_blocks=ex.blocks.num_free + (len(self.prefix_cache.blocks) if self.prefix_cache else 0),
            free_slots=ex.slots.num_free,
            queue_depth=queue,
            running=running,
            egress_bytes_per_s=egress,
            tokens_per_s=tokens_per_s,
        )

    def bind_metrics(self) -> None:
        """The node's live gauges, read at scrape time."""
        m, ex = metrics.current(), self.executor
        m.bind("kv_usage", lambda: 1.0 - ex.blocks.num_free / max(ex.blocks.num_blocks, 1))
        m.bind("state_usage", lambda: 1.0 - ex.slots.num_free / max(ex.slots.num_slots, 1))
        m.bind("running", lambda: self.stats()["running"])
        m.bind("waiting", lambda: self.stats()["queue_depth"] + self.stats()["pending_transfers"])

    def stats(self) -> dict[str, int]:
        """Accounting for `NodeControl.Stats`: the pool, what the prefix cache holds, the work."""
        ex, cache = self.executor, self.prefix_cache
        decode = self.decode.stats() if self.decode else {"pending_transfers": 0, "running": 0}
        return {
            "total_blocks": ex.blocks.num_blocks,
            "free_blocks": ex.blocks.num_free,
            "total_slots": ex.slots.num_slots,
            "free_slots": ex.slots.num_free,
            "cached_blocks": len(cache.blocks) if cache else 0,
            "cached_states": len(cache.states) if cache else 0,
            "pending_transfers": decode["pending_transfers"],
            "running": (self.prefill.running if self.prefill else 0) + decode["running"],
            "queue_depth": self.prefill.queue_depth if self.prefill else 0,
            "tokens_done": self.tokens_done(),
        }
