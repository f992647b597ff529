"""The two controllers of PAPER.md's "Scheduling on two timescales".

`ShortTermController` moves the routing threshold `t` from link and queue observations, every few
seconds. It keeps a window of recent uncached lengths (`record`) and, on each `observe`:

- congestion signalled (loss, retransmits): re-search `t`, and raise it by at least `raise_factor`;
- egress utilisation >= `high_util` or PrfaaS queue >= `queue_high`: re-search `t` (up or down);
- egress utilisation <= `low_util` and queue <= `queue_low`: step `t` back toward the planner's
  optimum by `relax`, but not below what the re-search allows;
- otherwise hold. Changes smaller than `min_change` (relative) are not made (hysteresis).

The re-search: with the window's arrival rate `lam` and lengths, the PrfaaS load of threshold `t` is
`max(link, compute)`, where `link = lam * E[S_kv(L); L > t] / capacity` and
`compute = lam * E[T_prefill(L); L > t] / N_prfaas`. The chosen `t` is the smallest one, not below
the optimum, whose load fits `target_util - backlog / drain_horizon_s`: the target leaves room for
the queued work (`queue * mean occupancy / N_prfaas` seconds) to drain within the horizon.

`LongTermController` converts local nodes between prefill and decode roles from per-stage queue depth
and utilisation averaged over a long window, with hysteresis (separate high and low marks, a cool-down
after every change) and at least one node per role. PrfaaS nodes stay prefill-only.

`SplitGuard` is the fast path between the two, for a change of the link rather than of the load: it
lends a decode node to prefill while no threshold fits the link with the local prefill nodes there
are, and takes it back when one does again.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from prfaas.scheduling.lengths import EmpiricalLengths
from prfaas.scheduling.model import Deployment, SystemProfile
from prfaas.scheduling.planner import best_threshold, threshold_grid
from prfaas.scheduling.policy import NodeView, Role


class HasThreshold(Protocol):
    threshold: float


@dataclass(frozen=True)
class LinkObservation:
    now: float
    egress_bytes: float              # PrfaaS egress sent since the previous observation
    capacity_bytes_per_s: float      # current link capacity (measured or configured)
    prfaas_queue_depth: int          # requests waiting in the PrfaaS cluster
    congested: bool = False          # loss / retransmits seen on the KV connections


@dataclass(frozen=True)
class ThresholdChange:
    time: float
    old: float
    new: float
    reason: str


@dataclass(frozen=True)
class Fit:
    threshold: float
    fits: bool     # every load within its target at `threshold`
    worst: float   # the highest of the link, PrfaaS and local-prefill utilisations there


@dataclass(frozen=True)
class ShortTermConfig:
    high_util: float = 0.85
    target_util: float = 0.85      # link
    compute_util: float = 1.0      # PrfaaS and local prefill nodes
    low_util: float = 0.5
    queue_high: int = 16
    queue_low: int = 4
    drain_horizon_s: float = 60.0
    window_s: float = 120.0
    min_samples: int = 30
    raise_factor: float = 1.25
    relax: float = 0.5
    min_change: float = 0.02
    max_threshold: float = 131072.0


class ShortTermController:
    def __init__(
        self, target: HasThreshold, system: SystemProfile, deployment: Deployment, optimum: float,
        config: ShortTermConfig | None = None,
    ) -> None:
        self.target, self.system, self.deployment = target, system, deployment
        self.optimum = optimum
        self.config = config or ShortTermConfig()
        self.window: deque[tuple[float, int]] = deque()
        self.history: list[ThresholdChange] = []
        self._last_now: float | None = None

    def record(self, now: float, uncached_tokens: int) -> None:
        self.window.append((now, uncached_tokens))
        while self.window and self.window[0][0] < now - self.config.window_s:
            self.window.popleft()

    def search(self, capacity: float, queue_depth: int) -> float | None:
        """Smallest threshold >= optimum whose PrfaaS and local-prefill loads fit their targets (or,
        when none does, the one with the smallest worst overload); None without data."""
        found = self.fit(capacity, queue_depth)
        return None if found is None else found.threshold

    def fit(self, capacity: float, queue_depth: int, n_p: int | None = None) -> Fit | None:
        """`search`'s answer with `n_p` local prefill nodes (default: the deployment's); None
        without data."""
        if len(self.window) < self.config.min_samples:
            return None
        cfg, n_prfaas = self.config, self.deployment.n_prfaas
        n_p = max(self.deployment.n_p if n_p is None else n_p, 1)
        span = max(self.window[-1][0] - self.window[0][0], 1e-9)
        lengths = sorted(length for _, length in self.window)
        lam, n = len(lengths) / span, len(lengths)
        kv, pre, loc = self.system.kv_bytes, self.system.prfaas_prefill_s, self.system.local_prefill_s
        s_sfx, t_sfx = [0.0] * (n + 1), [0.0] * (n + 1)   # suffix sums over the longest lengths
        l_pfx = [0.0] * (n + 1)                           # prefix sums of local prefill time
        for i in range(n - 1, -1, -1):
            s_sfx[i] = s_sfx[i + 1] + kv(lengths[i])
            t_sfx[i] = t_sfx[i + 1] + pre(lengths[i])
        for i in range(n):
            l_pfx[i + 1] = l_pfx[i] + loc(lengths[i])
        per_req = [max(pre(x), kv(x) * n_prfaas / capacity) for x in lengths[n // 2 :]]
        backlog_s = max(0, queue_depth - cfg.queue_low) * (sum(per_req) / len(per_req)) / n_prfaas
        drain = backlog_s / cfg.drain_horizon_s
        link_limit = max(0.05, cfg.target_util - drain)
        compute_limit = max(0.05, cfg.compute_util - drain)

        def utils(i: int) -> tuple[float, float, float]:   # requests lengths[i:] are offloaded
            return (lam * s_sfx[i] / n / capacity, lam * t_sfx[i] / n / n_prfaas, lam * l_pfx[i] / n / n_p)

        start = bisect.bisect_right(lengths, self.optimum)
        best_i, best, fits = start, max(utils(start)), False
        for i in range(start, n + 1):
            link, compute, local = utils(i)
            if link <= link_limit and compute <= compute_limit and local <= cfg.compute_util:
                best_i, best, fits = i, max(link, compute, local), True
                break
            if max(link, compute, local) < best:   # nothing fits: balance the real utilisations
                best_i, best = i, max(link, compute, local)
        if best_i == start:
            return Fit(self.optimum, fits, best)
        return Fit(min(lengths[best_i - 1], cfg.max_threshold), fits, best)

    def observe(self, obs: LinkObservation) -> ThresholdChange | None:
        cfg, t = self.config, self.target.threshold
        dt = obs.now - self._last_now if self._last_now is not None else 0.0
        self._last_now = obs.now
        util = obs.egress_bytes / (dt * obs.capacity_bytes_per_s) if dt > 0 else 0.0
        found = self.search(obs.capacity_bytes_per_s, obs.prfaas_queue_depth)
        if obs.congested:
            new = max(found or t, t * cfg.raise_factor)
            reason = "congestion"
        elif util >= cfg.high_util or obs.prfaas_queue_depth >= cfg.queue_high:
            new = found if found is not None else t * cfg.raise_factor
            reason = f"egress util {util:.2f}, prfaas queue {obs.prfaas_queue_depth}"
        elif util <= cfg.low_util and obs.prfaas_queue_depth <= cfg.queue_low and t > self.optimum:
            new = self.optimum + (t - self.optimum) * cfg.relax
            if new - self.optimum < cfg.min_change * self.optimum:
                new = self.optimum
            new = max(new, found if found is not None else self.optimum)
            reason = f"relax toward optimum {self.optimum:.0f} (util {util:.2f})"
        else:
            return None
        new = min(new, cfg.max_threshold)
        if abs(new - t) <= cfg.min_change * max(t, 1.0) and not (new == self.optimum != t):
            return None
        change = ThresholdChange(obs.now, t, new, reason)
        self.target.threshold = new
        self.history.append(change)
        return change

    def replan(self, deployment: Deployment) -> float | None:
        """Re-optimise the planner's threshold on the window's lengths (after role changes)."""
        if len(self.window) < self.config.min_samples:
            return None
        dist = EmpiricalLengths(length for _, length in self.window)
        self.deployment = deployment
        self.optimum = best_threshold(self.system, dist, deployment, threshold_grid(step=256)).threshold
        return self.optimum


@dataclass(frozen=True)
class StageObservation:
    now: float
    prefill_queue: int           # requests waiting for local PD-P nodes
    prefill_utilisation: float   # busy fraction of PD-P nodes, 0..1
    decode_queue: int            # requests waiting for a decode slot
    decode_utilisation: float    # occupied fraction of decode slots, 0..1


@dataclass(frozen=True)
class RoleChange:
    time: float
    node_id: str
    old_role: Role
    new_role: Role
    reason: str


@dataclass(frozen=True)
class LongTermConfig:
    window_s: float = 300.0
    high_util: float = 0.9
    low_util: float = 0.75
    queue_per_node: float = 2.0
    cooldown_s: float = 300.0


class LongTermController:
    def __init__(self, config: LongTermConfig | None = None) -> None:
        self.config = config or LongTermConfig()
        self.window: deque[StageObservation] = deque()
        self.history: list[RoleChange] = []
        self._last_change = float("-inf")

    def observe(self, obs: StageObservation, local_nodes: Sequence[NodeView]) -> list[RoleChange]:
        cfg = self.config
        self.window.append(obs)
        while self.window and self.window[0].now < obs.now - cfg.window_s:
            self.window.popleft()
        if obs.now - self._last_change < cfg.cooldown_s or obs.now - self.window[0].now < cfg.window_s * 0.9:
            return []
        k = len(self.window)
        p_util = sum(o.prefill_utilisation for o in self.window) / k
        d_util = sum(o.decode_utilisation for o in self.window) / k
        p_queue = sum(o.prefill_queue for o in self.window) / k
        d_queue = sum(o.decode_queue for o in self.window) / k
        prefill = [n for n in local_nodes if n.role == "prefill"]
        decode = [n for n in local_nodes if n.role == "decode"]
        change: tuple[Sequence[NodeView], Role, str] | None = None
        if (p_util >= cfg.high_util and p_queue >= cfg.queue_per_node * len(prefill)
                and len(decode) > 1 and d_util * len(decode) / (len(decode) - 1) <= cfg.low_util):
            change = decode, "prefill", f"prefill bound: util {p_util:.2f} queue {p_queue:.1f}, decode {d_util:.2f}"
        elif (d_util >= cfg.high_util and d_queue >= cfg.queue_per_node * len(decode)
                and len(prefill) > 1 and p_util * len(prefill) / (len(prefill) - 1) <= cfg.low_util):
            change = prefill, "decode", f"decode bound: util {d_util:.2f} queue {d_queue:.1f}, prefill {p_util:.2f}"
        if change is None:
            return []
        donors, new_role, reason = change
        node = min(donors, key=lambda n: (n.load, n.node_id))
        rc = RoleChange(obs.now, node.node_id, node.role, new_role, reason)
        self.history.append(rc)
        self._last_change = obs.now
        self.window.clear()
        return [rc]


@dataclass(frozen=True)
class SplitConfig:
    patience: int = 3              # consecutive observations a condition must hold before acting
    cooldown_s: float = 20.0       # after every change
    decode_headroom: float = 0.75  # occupied fraction of slots the remaining decode nodes may reach
    gain: float = 0.05             # one more prefill node must lower the worst load by this fraction
    decode_window_s: float = 30.0  # the decodes running are averaged over this window
    cut_below: float = 0.8         # a link event: the capacity under this fraction of the configured


class SplitGuard:
    """Fast role changes when the link, not the load, changes (a cut). The long-term controller
    rebalances over minutes; a cut needs local prefill capacity now. While the link's capacity is
    under `cut_below` of the configured rate, when the short-term search fits no threshold with the
    local prefill nodes there are, one more would lower the worst load (link, PrfaaS or local
    prefill) by `gain`, and the other decode nodes could take the decodes running (averaged over
    `decode_window_s`) within `decode_headroom` of their slots, it lends a decode node to prefill.
    It takes a lent node back once the search fits at the planned threshold without it (the link
    restored) and the local prefill queue is under one request a node. It only takes back
    nodes it lent, so it does not undo the long-term controller's changes. Each decision must hold
    for `patience` observations in a row, and `cooldown_s` passes between changes.

    `observe` takes the split (a node changing role counts in its new one), the decodes running,
    the slots of one decode node and the requests waiting for a local prefill; it returns +1 (convert
    a decode node to prefill), -1 (convert a lent one back) or 0. The caller picks the node and
    reports it with `lent_node` / `returned_node`."""

    def __init__(self, short: ShortTermController, configured_bytes_per_s: float,
                 config: SplitConfig | None = None) -> None:
        self.short, self.config = short, config or SplitConfig()
        self.configured = configured_bytes_per_s
        self.lent: list[str] = []
        self.history: list[tuple[float, int, str]] = []
        self._want = self._streak = 0
        self._last_change = float("-inf")
        self._decode: deque[tuple[float, float]] = deque()

    def observe(self, now: float, capacity: float, queue_depth: int, n_p: int, n_d: int,
                decode_running: int, slots_per_node: int, local_queue: int = 0) -> int:
        cfg = self.config
        self._decode.append((now, float(decode_running)))
        while self._decode[0][0] < now - cfg.decode_window_s:
            self._decode.popleft()
        running = sum(r for _, r in self._decode) / len(self._decode)
        want = 0
        here = self.short.fit(capacity, queue_depth, n_p)
        cut = capacity < cfg.cut_below * self.configured
        if here is not None and not here.fits and cut and n_d > 1:
            room = running <= cfg.decode_headroom * (n_d - 1) * max(slots_per_node, 1)
            more = self.short.fit(capacity, queue_depth, n_p + 1)
            if room and more is not None and more.worst < here.worst * (1 - cfg.gain):
                want = 1
        elif here is not None and here.fits and self.lent and n_p > 1 and local_queue < n_p:
            fewer = self.short.fit(capacity, queue_depth, n_p - 1)
            planned = self.short.optimum * (1 + self.short.config.min_change)
            if fewer is not None and fewer.fits and fewer.threshold <= planned:
                want = -1
        self._streak = self._streak + 1 if want and want == self._want else int(bool(want))
        self._want = want
        if not want or self._streak < cfg.patience or now - self._last_change < cfg.cooldown_s:
            return 0
        self._streak, self._last_change = 0, now
        return want

    def lent_node(self, now: float, node_id: str) -> None:
        self.lent.append(node_id)
        self.history.append((now, 1, node_id))

    def returned_node(self, now: float, node_id: str) -> None:
        if node_id in self.lent:
            self.lent.remove(node_id)
        self.history.append((now, -1, node_id))
