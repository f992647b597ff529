"""Cross-cluster prefix moves: what the router does with `RouteDecision.prefix_from`.

When the longest usable prefix of a prompt is on a prefill node of the other cluster than the one
chosen to prefill, there are two answers (PAPER.md, the bandwidth rules):
  - "moved" (abundant bandwidth: the policy set `prefix_from`): the chosen prefill node imports the
    prefix from its holder (Prefill.ImportPrefix there, Prefill.ExportPrefix on the holder: blocks
    plus the state checkpoint over the KV data plane), then prefills only the rest;
  - "recomputed" (scarce bandwidth, or a move that would not gain a block): the prefill node
    computes the prefix again.
A move that fails ("failed": the holder evicted it, a node or the link broke, the deadline passed)
falls back to recomputing; the request itself is unaffected. Each decision is logged and counted
(`prfaas_prefix_moves{decision}`), and the bytes moved (`prfaas_prefix_move_bytes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol

from prfaas.messages import PrefixMoved, PrefixReserved
from prfaas.obs import metrics
from prfaas.obs.log import get_logger

from .placement import Ask, Node, Placement

log = get_logger(__name__)


class MoveClients(Protocol):
    def import_prefix(
        self, address: str, request_id: str, prompt: list[int], hit: int, timeout_s: float,
        node_id: str = "", holder_node: str = "",
    ) -> AsyncGenerator[PrefixReserved | PrefixMoved, None]: ...

    async def export_prefix(
        self, address: str, request_id: str, prompt: list[int], hit: int, transfer_id: str,
        dest: str, deadline_unix_s: float, node_id: str = "", dest_node: str = "",
    ) -> PrefixMoved: ...


@dataclass(frozen=True)
class MoveOutcome:
    decision: str  # "moved", "recomputed", "failed"; "" when no other cluster held more
    holder: str = ""
    tokens: int = 0
    kv_bytes: int = 0
    error: str = ""


def best_elsewhere(p: Placement, ask: Ask, nodes: Sequence[Node]) -> tuple[Node | None, int]:
    """The prefill node of another cluster than the chosen one with the longest usable hit."""
    hits = dict(ask.hits)
    others = [n for n in nodes if n.role == "prefill" and n.cluster != p.prefill.cluster
              and n.node_id not in ask.exclude and hits.get(n.node_id, 0) > 0]
    if not others:
        return None, 0
    best = max(others, key=lambda n: (hits[n.node_id], n.node_id))
    return best, min(hits[best.node_id], (ask.prompt_tokens - 1) // best.block_size * best.block_size)


async def settle_prefix(clients: MoveClients, request_id: str, prompt: list[int], p: Placement, ask: Ask,
                        nodes: Sequence[Node], timeout_s: float) -> MoveOutcome:
    """Decides, and moves when the decision says so; never raises for a failed move."""
    holder, hit = best_elsewhere(p, ask, nodes)
    own = dict(ask.hits).get(p.prefill.node_id, 0)
    if holder is None or hit < own + holder.block_size:
        return MoveOutcome("")
    if p.decision.prefix_from is None or p.decision.prefix_from != holder.cluster:
        out = MoveOutcome("recomputed", holder.node_id, hit)
    else:
        out = await _move(clients, request_id, prompt, p, holder, hit, timeout_s)
    m = metrics.current()
    m.prefix_moves.labels(decision=out.decision).inc()
    m.prefix_move_bytes.inc(out.kv_bytes)
    log.info("prefix_move", decision=out.decision, holder=out.holder, dest=p.prefill.node_id, tokens=out.tokens,
             own_hit=own, kv_bytes=out.kv_bytes, error=out.error or None)
    return out


async def _move(clients: MoveClients, request_id: str, prompt: list[int], p: Placement, holder: Node, hit: int,
                timeout_s: float) -> MoveOutcome:
    try:
        async with asyncio.timeout(timeout_s):
            imp = clients.import_prefix(p.prefill.address, request_id, prompt, hit, timeout_s,
                                        node_id=p.prefill.node_id, holder_node=holder.node_id)
            async with contextlib.aclosing(imp):
                reserved = await anext(imp)
                if not isinstance(reserved, PrefixReserved):
                    raise RuntimeError("the importer answered without a reservation")
                sent = await clients.export_prefix(holder.address, request_id, prompt, hit, reserved.transfer_id,
                                                   reserved.kv_address, time.time() + timeout_s,
                                                   node_id=holder.node_id, dest_node=p.prefill.node_id)
                got = await anext(imp)
                if not isinstance(got, PrefixMoved) or got.kv_bytes != sent.kv_bytes:
                    raise RuntimeError(f"the importer got {got}, the holder sent {sent}")
    except Exception as e:  # the prefill recomputes the prefix instead
        return MoveOutcome("failed", holder.node_id, hit, error=repr(e))
    return MoveOutcome("moved", holder.node_id, hit, sent.kv_bytes)
