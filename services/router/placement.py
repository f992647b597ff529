"""What the router knows about its nodes beyond the cache pool's list: which ones it has seen fail
(liveness), and how much of each one its own requests hold (capacity). Plain Python, no I/O.

Liveness: a node that failed an attempt (a broken or stalled stream) is out of routing at once,
until the cache pool shows a heartbeat from it newer than the failure. A node whose heartbeat is
older than `stale_after_s`, or that is draining, is out too (except while the pool itself is
unreachable: then the last membership is all there is).

Capacity: a decode node takes a request only if the blocks of the request's whole generation fit
beside those of the router's other requests there, a state slot is free, and the request is under
the node's per-request cap; a prefill node takes at most `prefill_inflight` requests at a time
(the next one waits in the router, where its placement is decided as late as possible).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prfaas.scheduling.policy import Forced, NodeView, RouteDecision


@dataclass(frozen=True)
class Node:
    node_id: str
    cluster: str
    role: str
    address: str
    queue_depth: int = 0
    running: int = 0
    free_blocks: int = 1 << 30
    egress_bytes_per_s: float = 0.0
    capacity_slots: int = 0
    kv_retransmits: int = 0  # cumulative TCP retransmits on the node's KV connections
    capacity_blocks: int = 0  # 0: unknown (no limit known)
    block_size: int = 16
    max_request_blocks: int = 0  # decode nodes; 0: capacity_blocks
    max_context: int = 0  # 0: unknown
    convertible: bool = False
    prefix_grid: int = 0  # its prefix hits fall on multiples of this; 0: it caches none
    draining: bool = False
    heartbeat_at: float = float("inf")  # monotonic time of its last heartbeat as the router knows it


@dataclass(frozen=True)
class Ask:
    """One request as placement sees it."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    route: Forced = "auto"
    hits: tuple[tuple[str, int], ...] = ()  # per node: usable prefix hit, from the cache pool
    exclude: frozenset[str] = frozenset()  # nodes that already failed this request


@dataclass(frozen=True)
class Placement:
    decision: RouteDecision
    prefill: Node
    decode: Node
    decode_blocks: int  # what the router counts the request for on the decode node


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // max(block_size, 1))


def decode_blocks(node: Node, ask: Ask) -> int:
    """Blocks the request holds at most on `node`: its prompt and every token it may generate."""
    tokens = ask.prompt_tokens + ask.max_tokens
    if node.max_context:
        tokens = min(tokens, node.max_context)
    return blocks_for(tokens, node.block_size)


def request_cap(node: Node) -> int:
    return node.max_request_blocks or node.capacity_blocks or 1 << 62


class Liveness:
    def __init__(self, stale_after_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.stale_after_s, self.clock = stale_after_s, clock
        self._failed: dict[str, float] = {}  # node id -> when it failed

    def fail(self, node_id: str) -> None:
        self._failed[node_id] = self.clock()

    def usable(self, node: Node, degraded: bool = False) -> bool:
        if node.draining:
            return False
        failed = self._failed.get(node.node_id)
        if failed is not None:
            if node.heartbeat_at <= failed:
                return False
            del self._failed[node.node_id]  # it heartbeated since: healthy again
        return degraded or self.clock() - node.heartbeat_at <= self.stale_after_s

    def suspects(self) -> set[str]:
        return set(self._failed)


class Capacity:
    def __init__(self, prefill_inflight: int = 4, clock: Callable[[], float] = time.monotonic) -> None:
        self.prefill_inflight, self.clock = prefill_inflight, clock
        self.decode_blocks: Counter[str] = Counter()
        self.decode_requests: Counter[str] = Counter()
        self.prefilling: Counter[str] = Counter()
        self._full_until: dict[str, float] = {}  # nodes that refused for lack of room (others' requests)

    def mark_full(self, node_id: str, seconds: float = 0.5) -> None:
        self._full_until[node_id] = self.clock() + seconds

    def never_fits(self, nodes: Sequence[Node], ask: Ask) -> str | None:
        """Why no node of the current membership could ever take the request, or None."""
        decoders = [n for n in nodes if n.role == "decode" and n.cluster == "local"]
        if decoders and all(decode_blocks(n, ask) > request_cap(n) for n in decoders):
            best = max(decoders, key=request_cap)
            return (f"prompt ({ask.prompt_tokens} tokens) + max_tokens ({ask.max_tokens}) needs "
                    f"{decode_blocks(best, ask)} KV blocks; the largest decode node admits {request_cap(best)} "
                    f"per request ({request_cap(best) * best.block_size} tokens)")
        prefills = [n for n in nodes if n.role == "prefill"]
        if prefills and all(n.capacity_blocks and blocks_for(ask.prompt_tokens, n.block_size) > n.capacity_blocks
                            for n in prefills):
            return f"the prompt ({ask.prompt_tokens} tokens) is larger than every prefill node's KV pool"
        return None

    def views(self, nodes: Sequence[Node], ask: Ask) -> list[NodeView]:
        hits, now = dict(ask.hits), self.clock()
        out = []
        for n in nodes:
            if n.node_id in ask.exclude or n.role not in ("prefill", "decode") or n.cluster not in ("prfaas", "local"):
                continue
            if n.role == "decode":
                need = decode_blocks(n, ask)
                if need > request_cap(n):
                    continue  # never on this node
                busy = (bool(n.capacity_blocks) and self.decode_blocks[n.node_id] + need > n.capacity_blocks) or (
                    bool(n.capacity_slots) and self.decode_requests[n.node_id] >= n.capacity_slots)
                running = max(n.running, self.decode_requests[n.node_id])
            else:
                if n.capacity_blocks and blocks_for(ask.prompt_tokens, n.block_size) > n.capacity_blocks:
                    continue
                busy = self.prefilling[n.node_id] >= self.prefill_inflight
                running = max(n.running, self.prefilling[n.node_id])
            busy = busy or self._full_until.get(n.node_id, 0.0) > now
            out.append(NodeView(n.node_id, n.cluster, n.role, n.queue_depth, running,  # type: ignore[arg-type]
                                n.free_blocks, hits.get(n.node_id, 0), busy))
        return out

    def take(self, p: Placement) -> None:
        self.decode_blocks[p.decode.node_id] += p.decode_blocks
        self.decode_requests[p.decode.node_id] += 1
        self.prefilling[p.prefill.node_id] += 1

    def prefill_done(self, p: Placement) -> None:
        _drop(self.prefilling, p.prefill.node_id, 1)

    def decode_done(self, p: Placement) -> None:
        _drop(self.decode_blocks, p.decode.node_id, p.decode_blocks)
        _drop(self.decode_requests, p.decode.node_id, 1)

    def in_flight(self) -> int:
        return sum(self.decode_requests.values())


def _drop(counter: Counter[str], key: str, n: int) -> None:
    counter[key] -= n
    if counter[key] <= 0:
        del counter[key]
