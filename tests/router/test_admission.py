"""The router's admission queue and placement rules, as plain Python (no processes)."""

from __future__ import annotations

import asyncio

import pytest

from prfaas.errors import InvalidRequest
from prfaas.messages import SamplingParams
from services.router.admission import AdmissionQueue, Overloaded
from services.router.placement import Ask, Capacity, Liveness, Node, Placement, decode_blocks


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


async def test_fifo_with_backfill_and_a_head_guard():
    clock = Clock()
    q: AdmissionQueue[str] = AdmissionQueue(max_head_wait_s=5.0, clock=clock)
    big, small1, small2 = q.push("big", 1000), q.push("s1", 10), q.push("s2", 10)
    fits = {"s1", "s2"}
    assert q.dispatch(lambda w: w.request_id if w.request_id in fits else None) == 2  # small ones backfill
    assert small1.placed.result() == "s1" and small2.placed.result() == "s2" and not big.placed.done()
    late = q.push("s3", 10)
    clock.t = 6.0  # the big one has waited its head time: nobody younger goes ahead now
    assert q.dispatch(lambda w: w.request_id if w.request_id != "big" else None) == 0
    assert not late.placed.done()
    assert q.dispatch(lambda w: w.request_id) == 2 and big.placed.result() == "big" and late.placed.result() == "s3"
    assert len(q) == 0 and q.waiting_tokens == 0


async def test_bounds_by_count_and_tokens_with_a_retry_hint():
    q: AdmissionQueue[str] = AdmissionQueue(max_waiting=2, max_waiting_tokens=100)
    q.push("a", 60)
    with pytest.raises(Overloaded) as e:
        q.push("b", 50)  # over the token bound
    assert e.value.code == "RESOURCE_EXHAUSTED" and e.value.retry_after_ms > 0 and "queue is full" in str(e.value)
    q.push("c", 10)
    with pytest.raises(Overloaded):
        q.push("d", 1)  # over the count bound
    retried = q.push("e", 5, front=True)  # a retry goes to the front, whatever the bounds
    assert q.dispatch(lambda w: w.request_id) == 3 and retried.placed.result() == "e"


async def test_remove_and_expire_free_their_place():
    clock = Clock()
    q: AdmissionQueue[str] = AdmissionQueue(max_waiting=1, clock=clock)
    w = q.push("a", 10)
    q.remove(w)
    w2 = q.push("b", 10)
    clock.t = 100
    assert q.expire(50, lambda w: TimeoutError(w.request_id)) == 1
    with pytest.raises(TimeoutError):
        await w2.placed
    assert len(q) == 0 and q.waiting_tokens == 0


def node(node_id: str, role: str, cluster: str = "local", **kw: object) -> Node:
    return Node(node_id, cluster, role, node_id, heartbeat_at=0.0, **kw)  # type: ignore[arg-type]


def test_decode_capacity_counts_the_whole_generation_and_the_cap():
    cap = Capacity(prefill_inflight=1)
    d = node("d", "decode", capacity_blocks=100, capacity_slots=8, max_request_blocks=50, block_size=16)
    p = node("p", "prefill", capacity_blocks=100)
    ask = Ask("r", prompt_tokens=300, max_tokens=100)  # 400 tokens: 25 blocks
    assert decode_blocks(d, ask) == 25
    views = {v.node_id: v for v in cap.views([d, p], ask)}
    assert not views["d"].busy and not views["p"].busy
    for _ in range(4):
        cap.take(Placement(_decision(), p, d, 25))
    views = {v.node_id: v for v in cap.views([d, p], ask)}
    assert views["d"].busy and views["p"].busy, "100 blocks held; the prefill node at its in-flight limit"
    assert [v.node_id for v in cap.views([d, p], Ask("huge", 900, 10))] == ["p"], "over the per-request cap"
    assert "admits 50" in (cap.never_fits([d, p], Ask("huge", 900, 10)) or "")
    for _ in range(4):
        pl = Placement(_decision(), p, d, 25)
        cap.prefill_done(pl)
        cap.decode_done(pl)
    assert cap.in_flight() == 0 and not cap.prefilling


def _decision():  # type: ignore[no-untyped-def]
    from prfaas.scheduling.policy import RouteDecision

    return RouteDecision("local", "p", "d", 0, 1, "test")


def test_liveness_excludes_a_failed_node_until_it_heartbeats():
    clock = Clock()
    live = Liveness(stale_after_s=10, clock=clock)
    clock.t = 5.0
    n = node("p", "prefill")
    n = Node(n.node_id, n.cluster, n.role, n.address, heartbeat_at=4.0)
    assert live.usable(n)
    live.fail("p")
    assert not live.usable(n), "no heartbeat since the failure"
    assert live.usable(Node("p", "local", "prefill", "p", heartbeat_at=5.5)), "a newer heartbeat clears it"
    clock.t = 20.0
    assert not live.usable(Node("p", "local", "prefill", "p", heartbeat_at=5.5)), "stale"
    assert live.usable(Node("p", "local", "prefill", "p", heartbeat_at=5.5), degraded=True), "pool down: trusted"
    assert not live.usable(Node("p", "local", "prefill", "p", heartbeat_at=19.0, draining=True))


@pytest.mark.parametrize("field,value,words", [
    ("temperature", 9.78e-39, "temperature"),
    ("temperature", float("nan"), "temperature"),
    ("temperature", -1.0, "temperature"),
    ("temperature", float("inf"), "temperature"),
    ("top_p", float("nan"), "top_p"),
    ("top_p", -0.5, "top_p"),
    ("top_p", 1.5, "top_p"),
    ("top_k", -1, "top_k"),
    ("max_tokens", 0, "max_tokens"),
    ("seed", -3, "seed"),
    ("seed", 1 << 64, "seed"),
    ("stop_token_ids", tuple(range(65)), "stop_token_ids"),
    ("stop_token_ids", (-1,), "stop_token_ids"),
])
def test_sampling_values_are_checked_and_named(field, value, words):
    with pytest.raises(InvalidRequest, match=words):
        SamplingParams(**{field: value}).validate()


def test_sane_sampling_values_pass():
    for p in (SamplingParams(), SamplingParams(temperature=1e-4, top_p=1e-6, top_k=5, seed=(1 << 64) - 1),
              SamplingParams(temperature=100.0, stop_token_ids=tuple(range(64)))):
        p.validate()


async def test_dispatch_resolves_futures_on_the_loop():
    q: AdmissionQueue[int] = AdmissionQueue()
    ws = [q.push(str(i), 1) for i in range(3)]
    q.dispatch(lambda w: int(w.request_id))
    assert await asyncio.gather(*(w.placed for w in ws)) == [0, 1, 2]
