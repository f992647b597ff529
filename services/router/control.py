"""The router's control loop: the paper's two timescales on the live system.

Every `interval_s` the short-term controller sees the PrfaaS egress against the link's capacity as
measured from the completed PrfaaS transfers (prfaas/scheduling/link_meter.py: the configured rate
until transfers show less; while they wait for the link, it is saturated) and the PrfaaS backlog
(the nodes' queues and the requests waiting in the router's admission queue that `t` sends there),
and may move the policy's threshold `t`. Every `long_interval_s` the long-term controller sees the
local prefill and decode stages, their backlog in the admission queue included, and may convert a
local node between prefill and decode (through `RoleSetter`). Both use the same controller objects
as the simulator. Profiles come from the live system: `S_kv(l)` from the KV layout, `T_prefill(l)`
learned from the prefill nodes' reported prefill times.

Beside the long-term controller, every tick: when no live local decode node is left (one died or
stalled), a convertible local prefill node becomes a decode node at once, and goes back to prefill
once another decode node is live again; and when the link, not the load, changed (a cut no threshold
can fit with the local prefill nodes there are), `SplitGuard` lends a convertible decode node to
prefill at once and takes it back when the link has room again (its rules: controller.py).
No gRPC here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from prfaas.obs import metrics
from prfaas.obs.log import get_logger
from prfaas.scheduling.controller import (
    LinkObservation,
    LongTermController,
    ShortTermController,
    SplitGuard,
    StageObservation,
)
from prfaas.scheduling.link_meter import LinkMeter
from prfaas.scheduling.model import Deployment, SystemProfile
from prfaas.scheduling.online import OnlinePrefillProfile
from prfaas.scheduling.policy import NodeView, RouteDecision
from prfaas.scheduling.profiles import Profile

from .core import Directory, Node

log = get_logger(__name__)

RoleSetter = Callable[[Node, str], Awaitable[None]]
KV_GRID = [2**i for i in range(4, 21)]


class ControlLoop:
    def __init__(
        self,
        directory: Directory,
        policy: object,
        kv_bytes: Callable[[int], int],
        link_bytes_per_s: float,
        set_role: RoleSetter | None = None,
        interval_s: float = 2.0,
        long_interval_s: float = 30.0,
        short: ShortTermController | None = None,
        long: LongTermController | None = None,
        congestion_retransmits: int = 50,
        waiting: Callable[[], Sequence[int]] | None = None,
        link_meter: LinkMeter | None = None,
        split: SplitGuard | None = None,
    ) -> None:
        self.directory, self.policy, self.set_role = directory, policy, set_role
        self.interval_s, self.long_interval_s = interval_s, long_interval_s
        self.prefill_times = {"prfaas": OnlinePrefillProfile(), "local": OnlinePrefillProfile()}
        self.kv_profile = Profile.from_callable(lambda x: float(kv_bytes(int(x))), KV_GRID)
        # uncached lengths of the requests waiting in the router's admission queue (the backlog)
        self.waiting = waiting or (lambda: ())
        self.link = link_meter or LinkMeter(link_bytes_per_s, window_s=max(10.0, 5 * interval_s))
        self.short = short
        if self.short is None and hasattr(policy, "threshold"):
            self.short = ShortTermController(
                policy,
                self._system(),
                Deployment(1, 1, 1),  # type: ignore[arg-type]
                optimum=float(policy.threshold),
            )
        self.long = long or LongTermController()
        self.split = split or (SplitGuard(self.short, link_bytes_per_s) if self.short is not None else None)
        # retransmitted segments on the PrfaaS nodes' KV connections per interval that mean congestion
        self.congestion_retransmits = congestion_retransmits
        self._retransmits: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._last_long = float("-inf")
        self.stand_ins: set[str] = set()  # prefill nodes converted to decode because none was left

    def _system(self) -> SystemProfile:
        return SystemProfile(
            kv_bytes=self.kv_profile,
            prfaas_prefill_s=self.prefill_times["prfaas"].profile(),
            local_prefill_s=self.prefill_times["local"].profile(),
            link_bytes_per_s=self.link.estimate,
        )

    # --- fed by the router ------------------------------------------------------------------------
    def on_decision(self, decision: RouteDecision, prompt_tokens: int, ttft_s: float) -> None:
        if self.short is not None:
            self.short.record(time.monotonic(), decision.uncached_tokens)

    def on_prefill(self, cluster: str, tokens: int, prefill_s: float, kv_bytes: int = 0,
                   transfer_s: float = 0.0, drain_s: float = 0.0) -> None:
        """A prefill's result; on the PrfaaS route its KV crossed the link (`kv_bytes` in `transfer_s`,
        the decode node's last acknowledgement included, `drain_s` of it after the compute ended)."""
        if cluster in self.prefill_times:
            self.prefill_times[cluster].record(tokens, prefill_s)
        if cluster == "prfaas":
            self.link.record(time.monotonic(), kv_bytes, prefill_s, transfer_s, drain_s)

    # --- the loop -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick(time.monotonic())
            except Exception as e:  # the data path must not depend on the control loop
                log.warning("control_tick_failed", error=repr(e))

    async def tick(self, now: float) -> None:
        nodes = list(await self.directory.nodes())
        prfaas = [n for n in nodes if n.cluster == "prfaas" and n.role == "prefill"]
        local = [n for n in nodes if n.cluster == "local"]
        waiting = list(self.waiting())
        if self.short is not None:
            await self._short_term(now, prfaas, local, waiting)
        if await self._stand_in(local):
            return
        if self.split is not None:
            await self._split(now, prfaas, local, waiting)
        if now - self._last_long >= self.long_interval_s:
            self._last_long = now
            await self._long_term(now, local, waiting)

    async def _short_term(self, now: float, prfaas: Sequence[Node], local: Sequence[Node],
                          waiting: Sequence[int]) -> None:
        assert self.short is not None
        link = self.link.read(now)
        self.short.system = self._system()
        self.short.deployment = Deployment(
            max(len(prfaas), 1),
            max(sum(n.role == "prefill" for n in local), 1),
            max(sum(n.role == "decode" for n in local), 1),
        )
        retransmits = self._new_retransmits(prfaas)
        capacity = link.capacity_bytes_per_s
        egress = sum(n.egress_bytes_per_s for n in prfaas)
        if link.link_bound:  # transfers wait for the link: it is full, whatever the senders' counters say
            egress = max(egress, capacity)
        t = float(getattr(self.policy, "threshold", 0.0))
        backlog = sum(length > t for length in waiting)
        m = metrics.current()
        m.link_utilisation.labels(link="prfaas->local").set(min(egress / capacity, 1.0))
        m.link_capacity.labels(link="prfaas->local").set(capacity)
        change = self.short.observe(
            LinkObservation(
                now,
                egress * self.interval_s,
                capacity,
                sum(n.queue_depth for n in prfaas) + backlog,
                congested=retransmits >= self.congestion_retransmits,
            )
        )
        if change is not None:
            m.threshold.set(change.new)
            log.info("threshold_changed", old=round(change.old), new=round(change.new), reason=change.reason,
                     link_capacity=round(capacity), link_bound=link.link_bound, backlog=backlog)

    async def _split(self, now: float, prfaas: Sequence[Node], local: Sequence[Node], waiting: Sequence[int]) -> None:
        """A link event's fast role change (SplitGuard): lend a convertible decode node to prefill
        while no threshold fits the link, take it back once one does again."""
        assert self.split is not None
        pre = [n for n in local if n.role == "prefill"]
        dec = [n for n in local if n.role == "decode"]
        t = float(getattr(self.policy, "threshold", 0.0))
        act = self.split.observe(
            now, self.link.estimate, sum(n.queue_depth for n in prfaas) + sum(x > t for x in waiting),
            len(pre), len(dec), sum(n.running for n in dec), max((n.capacity_slots for n in dec), default=0),
            sum(n.queue_depth for n in pre) + sum(x <= t for x in waiting))
        if act > 0:
            spare = [n for n in dec if n.convertible] if len(dec) > 1 else []
            node, role = min(spare, key=lambda n: (n.running + n.queue_depth, n.node_id), default=None), "prefill"
        else:
            lent = [n for n in pre if n.node_id in self.split.lent] if act < 0 else []
            node, role = min(lent, key=lambda n: (n.running + n.queue_depth, n.node_id), default=None), "decode"
        if node is None:
            return
        log.info("role_change", node=node.node_id, old=node.role, new=role, reason="link split",
                 link_capacity=round(self.link.estimate))
        if await self._convert(node, role):
            (self.split.lent_node if role == "prefill" else self.split.returned_node)(now, node.node_id)

    async def _stand_in(self, local: Sequence[Node]) -> bool:
        """No decode capacity left: a convertible prefill node stands in; back when a decode node is."""
        decode = [n for n in local if n.role == "decode"]
        if not decode:
            spare = [n for n in local if n.role == "prefill" and n.convertible]
            if not spare or self.set_role is None:
                return False
            node = min(spare, key=lambda n: (n.queue_depth + n.running, n.node_id))
            log.warning("role_change", node=node.node_id, old="prefill", new="decode", reason="no live decode node")
            if await self._convert(node, "decode"):
                self.stand_ins.add(node.node_id)
            return True
        back = [n for n in decode if n.node_id in self.stand_ins] if len(decode) > len(self.stand_ins) else []
        for node in back:
            log.info("role_change", node=node.node_id, old="decode", new="prefill", reason="a decode node is back")
            if await self._convert(node, "prefill"):
                self.stand_ins.discard(node.node_id)
        return bool(back)

    async def _convert(self, node: Node, role: str) -> bool:
        if self.set_role is None:
            return False
        try:
            await self.set_role(node, role)
            return True
        except Exception as e:
            log.warning("role_change_failed", node=node.node_id, error=repr(e))
            return False

    def _new_retransmits(self, nodes: Sequence[Node]) -> int:
        """Retransmits since the previous tick, summed over the nodes (counters are cumulative)."""
        total = 0
        for n in nodes:
            last = self._retransmits.get(n.node_id, n.kv_retransmits)
            total += max(0, n.kv_retransmits - last)
            self._retransmits[n.node_id] = n.kv_retransmits
        return total

    async def _long_term(self, now: float, local: Sequence[Node], waiting: Sequence[int]) -> None:
        pre = [n for n in local if n.role == "prefill"]
        dec = [n for n in local if n.role == "decode"]
        if not pre or not dec:
            return
        # the backlog waits in the router, not on the nodes: requests `t` keeps local wait for a local
        # prefill node; while every decode node is full, every waiting request waits for decode too
        t = float(getattr(self.policy, "threshold", float("inf")))
        decode_full = all(n.capacity_slots and n.running >= n.capacity_slots for n in dec)
        obs = StageObservation(
            now,
            prefill_queue=sum(n.queue_depth for n in pre) + sum(length <= t for length in waiting),
            prefill_utilisation=sum(min(1.0, float(n.running)) for n in pre) / len(pre),
            decode_queue=sum(n.queue_depth for n in dec) + (len(waiting) if decode_full else 0),
            decode_utilisation=sum(min(1.0, n.running / max(n.capacity_slots, 1)) for n in dec) / len(dec),
        )
        views = [
            NodeView(n.node_id, "local", n.role, n.queue_depth, n.running, n.free_blocks)  # type: ignore[arg-type]
            for n in local
            if n.role in ("prefill", "decode")
        ]
        for change in self.long.observe(obs, views):
            node = next(n for n in local if n.node_id == change.node_id)
            log.info("role_change", node=change.node_id, old=change.old_role, new=change.new_role, reason=change.reason)
            if self.set_role is not None:
                try:
                    await self.set_role(node, change.new_role)
                except Exception as e:
                    log.warning("role_change_failed", node=change.node_id, error=repr(e))
