"""Event-driven simulator of a PrfaaS deployment, driving the real policy and controllers.

Model (simulated time, seconds):
- Prefill node: FIFO queue, one prefill at a time, taking `T_prefill(uncached)` of its hardware.
- PrfaaS -> local link: a FIFO pipe whose capacity may change at any time. An offloaded prefill
  puts `S_kv(uncached)` bytes on it when the prefill starts (layer-wise pipelining); the transfer is
  done when both the prefill and its bytes are through, and the PrfaaS node stays busy until then,
  so a slow link backs up the PrfaaS queue. Local KV moves over RDMA and costs nothing.
- Decode node: `BS_max` slots; a request holds one for `L_out * T_decode`. The first token reaches
  the client when the decode node admits the request, so TTFT = admission - arrival, with queueing.
- Prefix cache: each prefill node remembers (LRU) the prompts it prefilled; a request that extends
  one of them hits on the nodes holding it. With `caches` (traces: requests carry block keys),
  nodes keep LRUs of blocks instead (sim/prefix.py); an offloaded prefill then sends `S_kv(P - h)`,
  `h` the decode node's hit (0 unless the caches are decode-side too), and a request decodes for its
  own output length.
- Local nodes can change role; a changing node takes no new work, finishes what it has, then flips.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prfaas.scheduling.controller import (
    LinkObservation,
    LongTermController,
    RoleChange,
    ShortTermController,
    SplitGuard,
    StageObservation,
)
from prfaas.scheduling.model import Deployment, SystemProfile
from prfaas.scheduling.policy import NodeView, RouteQuery, RoutingPolicy
from prfaas.sim.prefix import PrefixCaches
from prfaas.sim.workload import Arrival


@dataclass
class Req:
    arrival: Arrival
    route: str = ""
    uncached: int = 0
    cached: int = 0
    kv_bytes: float = 0.0           # over the cross-cluster link
    prefill_node: str = ""
    decode_node: str = ""
    first_token: float = -1.0
    done: float = -1.0
    prefill_done: bool = False
    kv_done: bool = False


@dataclass
class Node:
    node_id: str
    cluster: str
    role: str
    prefill_s: Callable[[float], float]
    queue: deque = field(default_factory=deque)         # waiting prefills (prefill role)
    busy: Req | None = None
    slots: int = 0
    running: int = 0                                    # decode slots in use
    waiting: deque = field(default_factory=deque)       # KV-ready requests waiting for a slot
    assigned: int = 0                                   # routed here, not yet admitted
    next_role: str | None = None
    cache: OrderedDict = field(default_factory=OrderedDict)

    def view(self, hit: int) -> NodeView:
        can_take = self.next_role is None
        if self.role == "prefill":
            return NodeView(self.node_id, self.cluster, "prefill", len(self.queue),  # type: ignore[arg-type]
                            int(self.busy is not None), 1 << 30 if can_take else 0, hit)
        return NodeView(self.node_id, self.cluster, "decode", self.assigned, self.running,  # type: ignore[arg-type]
                        1 << 30 if can_take else 0, hit)


@dataclass(frozen=True)
class SimConfig:
    duration_s: float
    warmup_s: float = 0.0
    control_interval_s: float = 5.0
    stage_interval_s: float = 10.0
    sample_interval_s: float = 10.0
    cache_entries: int = 256


class Simulator:
    def __init__(
        self, system: SystemProfile, deployment: Deployment, policy: RoutingPolicy, config: SimConfig,
        short_term: ShortTermController | None = None, long_term: LongTermController | None = None,
        link_changes: Sequence[tuple[float, float]] = (), caches: PrefixCaches | None = None,
        split: SplitGuard | None = None,
    ) -> None:
        self.sp, self.policy, self.cfg = system, policy, config
        self.split = split
        self.caches = caches
        self.short_term, self.long_term = short_term, long_term
        self.nodes: dict[str, Node] = {}
        for i in range(deployment.n_prfaas):
            self._add(Node(f"prfaas-{i}", "prfaas", "prefill", system.prfaas_prefill_s))
        for i in range(deployment.n_p):
            self._add(Node(f"pd-{i}", "local", "prefill", system.local_prefill_s))
        for i in range(deployment.n_d):
            self._add(Node(f"pd-{deployment.n_p + i}", "local", "decode", system.local_prefill_s))
        for n in self.nodes.values():
            n.slots = system.decode_batch
        self.decode_s = system.output_tokens * system.decode_step_s
        self.capacity = system.link_bytes_per_s
        self.link_queue: deque[tuple[Req, float]] = deque()
        self.link_head: tuple[Req, float] | None = None     # (request, bytes left)
        self.link_t, self.link_version = 0.0, 0
        self.bytes_sent = self.bytes_mark = 0.0
        self.link_busy_s = 0.0
        self.events: list = []
        self.seq = itertools.count()
        self.reqs: list[Req] = []
        self.samples: list[dict] = []
        self.role_changes: list = []
        for t, cap in link_changes:
            self._push(t, "capacity", cap)

    def _add(self, node: Node) -> None:
        self.nodes[node.node_id] = node

    def _push(self, t: float, kind: str, payload: object = None) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, payload))

    # --- run -------------------------------------------------------------------------------------
    def run(self, arrivals: Sequence[Arrival], progress: Callable[[float], None] | None = None) -> list[Req]:
        for a in arrivals:
            self._push(a.time, "arrival", a)
        self._push(0.0, "sample")
        if self.short_term:
            self._push(self.cfg.control_interval_s, "control")
        if self.long_term:
            self._push(self.cfg.stage_interval_s, "stage")
        by_id: dict[str, Req] = {}
        next_report = 0.0
        while self.events:
            now, _, kind, payload = heapq.heappop(self.events)
            if now > self.cfg.duration_s:
                break
            if progress and now >= next_report:
                progress(now)
                next_report += self.cfg.duration_s / 10
            if kind == "arrival":
                req = Req(payload)
                by_id[payload.request_id] = req
                self.reqs.append(req)
                self._route(now, req, by_id)
            elif kind == "prefill_done":
                payload.prefill_done = True
                self._maybe_release(now, payload)
            elif kind == "link_done":
                if payload == self.link_version:
                    self._link_finish(now)
            elif kind == "decode_done":
                node = self.nodes[payload.decode_node]
                payload.done = now
                node.running -= 1
                self._admit(now, node)
            elif kind == "capacity":
                self._link_advance(now)
                self.capacity = payload
                self._link_schedule(now)
            elif kind == "control":
                self._control(now)
                self._push(now + self.cfg.control_interval_s, "control")
            elif kind == "stage":
                self._stage(now)
                self._push(now + self.cfg.stage_interval_s, "stage")
            elif kind == "sample":
                self._sample(now)
                self._push(now + self.cfg.sample_interval_s, "sample")
        return self.reqs

    # --- routing and prefill ---------------------------------------------------------------------
    def _route(self, now: float, req: Req, by_id: dict[str, Req]) -> None:
        a = req.arrival
        parent = by_id.get(a.parent) if a.parent else None
        views = []
        for n in self.nodes.values():
            hit = 0
            if self.caches is not None:
                if n.role == "prefill" or self.caches.decode_side:
                    hit = self.caches.hit_tokens(n.node_id, a.blocks)
            elif parent is not None and n.role == "prefill" and a.parent in n.cache:
                n.cache.move_to_end(a.parent)
                hit = n.cache[a.parent] // 16 * 16
            views.append(n.view(hit))
        d = self.policy.route(RouteQuery(a.request_id, a.prompt_tokens), views)
        req.route, req.uncached, req.cached = d.route, d.uncached_tokens, d.cached_tokens
        req.prefill_node, req.decode_node = d.prefill_node, d.decode_node
        if self.short_term:
            self.short_term.record(now, d.uncached_tokens)
        self.nodes[d.decode_node].assigned += 1
        node = self.nodes[d.prefill_node]
        node.queue.append(req)
        if node.busy is None:
            self._start_prefill(now, node)

    def _start_prefill(self, now: float, node: Node) -> None:
        if not node.queue:
            self._maybe_flip(now, node)
            return
        req = node.queue.popleft()
        node.busy = req
        if self.caches is not None:
            self.caches.store(node.node_id, req.arrival.blocks)
        else:
            node.cache[req.arrival.request_id] = req.arrival.prompt_tokens
            if len(node.cache) > self.cfg.cache_entries:
                node.cache.popitem(last=False)
        self._push(now + node.prefill_s(req.uncached), "prefill_done", req)
        if node.cluster == "prfaas":
            self._link_advance(now)
            req.kv_bytes = self._kv_bytes(req)
            self.link_queue.append((req, req.kv_bytes))
            self._link_schedule(now)
        else:
            req.kv_done = True

    def _kv_bytes(self, req: Req) -> float:
        if self.caches is None:
            return self.sp.kv_bytes(req.uncached)
        prompt = req.arrival.prompt_tokens
        held = self.caches.hit_tokens(req.decode_node, req.arrival.blocks) if self.caches.decode_side else 0
        return self.sp.kv_bytes(prompt - min(held, prompt - 1))

    def _maybe_release(self, now: float, req: Req) -> None:
        if not (req.prefill_done and req.kv_done):
            return
        node = self.nodes[req.prefill_node]
        node.busy = None
        dec = self.nodes[req.decode_node]
        dec.waiting.append(req)
        self._admit(now, dec)
        self._start_prefill(now, node)

    # --- link: FIFO pipe with changing capacity --------------------------------------------------
    def _link_advance(self, now: float) -> None:
        if self.link_head is not None:
            sent = min(self.link_head[1], (now - self.link_t) * self.capacity)
            self.link_head = (self.link_head[0], self.link_head[1] - sent)
            self.bytes_sent += sent
            self.link_busy_s += now - self.link_t
        self.link_t = now

    def _link_schedule(self, now: float) -> None:
        if self.link_head is None and self.link_queue:
            self.link_head = self.link_queue.popleft()
        if self.link_head is not None:
            self.link_version += 1
            self._push(now + self.link_head[1] / self.capacity, "link_done", self.link_version)

    def _link_finish(self, now: float) -> None:
        self._link_advance(now)
        assert self.link_head is not None
        req = self.link_head[0]
        self.bytes_sent += self.link_head[1]
        self.link_head = None
        req.kv_done = True
        self._maybe_release(now, req)
        self._link_schedule(now)

    # --- decode ----------------------------------------------------------------------------------
    def _admit(self, now: float, node: Node) -> None:
        while node.waiting and node.running < node.slots:
            req = node.waiting.popleft()
            node.running += 1
            node.assigned -= 1
            req.first_token = now
            if self.caches is not None and self.caches.decode_side:
                self.caches.store(node.node_id, req.arrival.blocks)
            out = req.arrival.output_tokens
            self._push(now + (out * self.sp.decode_step_s if out else self.decode_s), "decode_done", req)
        self._maybe_flip(now, node)

    # --- controllers -----------------------------------------------------------------------------
    def prfaas_queue(self) -> int:
        return sum(len(n.queue) for n in self.nodes.values() if n.cluster == "prfaas")

    def _control(self, now: float) -> None:
        assert self.short_term is not None
        self._link_advance(now)
        sent, self.bytes_mark = self.bytes_sent - self.bytes_mark, self.bytes_sent
        self.short_term.observe(LinkObservation(now, sent, self.capacity, self.prfaas_queue()))
        if self.split is not None:
            self._split(now)

    def _split(self, now: float) -> None:
        """The fast role change of a link event (SplitGuard): lend a decode node to prefill, or take
        one back; the node changes role once it is empty, as in the long-term controller."""
        assert self.split is not None
        pre, dec = self._local("prefill"), self._local("decode")
        local = [n for n in self.nodes.values() if n.cluster == "local"]
        n_p = sum((n.next_role or n.role) == "prefill" for n in local)
        running = sum(n.running for n in local)
        queued = sum(len(n.queue) for n in pre)
        act = self.split.observe(now, self.capacity, self.prfaas_queue(), n_p, len(local) - n_p, running,
                                 self.sp.decode_batch, queued)
        if act > 0 and len(dec) > 1:
            node = min(dec, key=lambda n: (n.running + n.assigned, n.node_id))
            node.next_role = "prefill"
            self.split.lent_node(now, node.node_id)
        elif act < 0:
            lent = [n for n in pre if n.node_id in self.split.lent]
            if not lent:
                return
            node = min(lent, key=lambda n: (len(n.queue) + (n.busy is not None), n.node_id))
            node.next_role = "decode"
            self.split.returned_node(now, node.node_id)
        else:
            return
        self.role_changes.append(RoleChange(now, node.node_id, node.role, node.next_role, "link split"))  # type: ignore[arg-type]
        self._maybe_flip(now, node)

    def _local(self, role: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.cluster == "local" and n.role == role and n.next_role is None]

    def _stage(self, now: float) -> None:
        assert self.long_term is not None
        pre, dec = self._local("prefill"), self._local("decode")
        obs = StageObservation(
            now,
            sum(len(n.queue) for n in pre),
            sum(n.busy is not None for n in pre) / max(len(pre), 1),
            sum(len(n.waiting) for n in dec),
            sum(n.running for n in dec) / max(sum(n.slots for n in dec), 1),
        )
        local = [n.view(0) for n in pre + dec]
        for change in self.long_term.observe(obs, local):
            node = self.nodes[change.node_id]
            node.next_role = change.new_role
            self.role_changes.append(change)
            self._maybe_flip(now, node)
        self._replan()

    def _replan(self) -> None:
        """Long-term: re-optimise t for the current split and recent lengths; raise t at once,
        let the short-term controller relax it down."""
        if self.short_term is None:
            return
        n_p, n_d = len(self._local("prefill")), len(self._local("decode"))
        n_prfaas = sum(n.cluster == "prfaas" for n in self.nodes.values())
        new_t = self.short_term.replan(Deployment(n_prfaas, n_p, n_d))
        if new_t is not None and new_t > self.short_term.target.threshold:
            self.short_term.target.threshold = new_t

    def _maybe_flip(self, now: float, node: Node) -> None:
        if node.next_role is None or node.queue or node.busy or node.running or node.waiting or node.assigned:
            return
        node.role, node.next_role = node.next_role, None
        self._replan()
        self._admit(now, node) if node.role == "decode" else self._start_prefill(now, node)

    def _sample(self, now: float) -> None:
        self._link_advance(now)
        last = self.samples[-1] if self.samples else {"t": 0.0, "bytes": 0.0, "busy": 0.0}
        dt = max(now - last["t"], 1e-9)
        self.samples.append({
            "t": now, "bytes": self.bytes_sent, "busy": self.link_busy_s,
            "link_util": (self.bytes_sent - last["bytes"]) / (dt * self.capacity) if now > 0 else 0.0,
            "capacity_gbps": self.capacity * 8 / 1e9,
            "prfaas_queue": self.prfaas_queue(),
            "local_prefill_queue": sum(len(n.queue) for n in self.nodes.values()
                                       if n.cluster == "local" and n.role == "prefill"),
            "decode_waiting": sum(len(n.waiting) for n in self.nodes.values() if n.role == "decode"),
            "threshold": getattr(self.policy, "threshold", float("nan")),
            "n_p": sum(1 for n in self.nodes.values() if n.cluster == "local" and n.role == "prefill"),
        })
