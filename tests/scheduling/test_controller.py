from prfaas.scheduling.controller import (
    LinkObservation,
    LongTermConfig,
    LongTermController,
    ShortTermController,
    StageObservation,
)
from prfaas.scheduling.lengths import TruncatedLogNormal
from prfaas.scheduling.model import GBPS, Deployment, SystemProfile
from prfaas.scheduling.policy import NodeView, PrfaasPolicy


def feed(ctl, rate=2.7, seconds=120):
    import random
    rng, d = random.Random(3), TruncatedLogNormal()
    for i in range(int(rate * seconds)):
        ctl.record(i / rate, d.sample(rng))


def test_short_term_raises_on_saturated_link_and_relaxes_back():
    pol = PrfaasPolicy(19_648)
    ctl = ShortTermController(pol, SystemProfile(), Deployment(4, 3, 5), 19_648)
    feed(ctl)
    ctl.observe(LinkObservation(120, 0, 5 * GBPS, 0))
    ch = ctl.observe(LinkObservation(125, 5 * 5 * GBPS, 5 * GBPS, 30))
    assert ch is not None and ch.new > ch.old == 19_648 and pol.threshold == ch.new
    for k in range(10):
        ctl.observe(LinkObservation(130 + 5 * k, 0.1 * 5 * 100 * GBPS, 100 * GBPS, 0))
    assert pol.threshold == 19_648
    assert all(c.reason for c in ctl.history)


def test_short_term_congestion_raises():
    pol = PrfaasPolicy(20_000)
    ctl = ShortTermController(pol, SystemProfile(), Deployment(4, 3, 5), 20_000)
    ch = ctl.observe(LinkObservation(5, 0, 100 * GBPS, 0, congested=True))
    assert ch is not None and ch.new >= 25_000 and ch.reason == "congestion"


def test_long_term_converts_with_hysteresis_and_min_one():
    ctl = LongTermController(LongTermConfig(window_s=50, cooldown_s=100))
    local = [NodeView("p0", "local", "prefill"), NodeView("p1", "local", "prefill", running=1),
             NodeView("d0", "local", "decode")]
    changes = []
    for t in range(0, 60, 10):
        changes += ctl.observe(StageObservation(t, 0, 0.2, 10, 1.0), local)
    assert [(c.node_id, c.new_role) for c in changes] == [("p0", "decode")]
    assert ctl.observe(StageObservation(70, 0, 0.2, 10, 1.0), local) == []          # cool-down
    one_each = [NodeView("p0", "local", "prefill"), NodeView("d0", "local", "decode")]
    ctl2 = LongTermController(LongTermConfig(window_s=50, cooldown_s=100))
    assert not any(ctl2.observe(StageObservation(t, 0, 0.0, 10, 1.0), one_each) for t in range(0, 60, 10))


def test_split_guard_lends_only_in_a_cut_with_decode_room_and_after_patience():
    from prfaas.scheduling.controller import SplitConfig, SplitGuard

    pol = PrfaasPolicy(19_648)
    ctl = ShortTermController(pol, SystemProfile(), Deployment(4, 3, 5), 19_648)
    feed(ctl, rate=0.6 * 3.2)   # 0.6 of the case study's Lambda_max
    guard = SplitGuard(ctl, 100 * GBPS, SplitConfig(patience=3, cooldown_s=20))
    slots = 20
    assert [guard.observe(t, 100 * GBPS, 0, 3, 5, 40, slots) for t in (1, 2, 3, 4)] == [0, 0, 0, 0], "no cut"
    cut = 5 * GBPS
    busy = SplitGuard(ctl, 100 * GBPS, SplitConfig(patience=3, cooldown_s=20))
    assert [busy.observe(t, cut, 0, 3, 5, 90, slots) for t in (1, 2, 3, 4)] == [0, 0, 0, 0], "decode has no room"
    assert [guard.observe(t, cut, 0, 3, 5, 40, slots) for t in (10, 11, 12)] == [0, 0, 1], "three in a row"
    guard.lent_node(12, "pd-7")
    assert guard.observe(13, cut, 0, 4, 4, 40, slots) == 0 and guard.lent == ["pd-7"]
    # restored, but the local prefill queue is still long: the node stays; once it drains, it returns
    assert [guard.observe(t, 100 * GBPS, 0, 4, 4, 40, slots, local_queue=9) for t in range(40, 44)] == [0] * 4
    assert [guard.observe(t, 100 * GBPS, 0, 4, 4, 40, slots, local_queue=0) for t in (44, 45, 46)] == [0, 0, -1]
    guard.returned_node(46, "pd-7")
    assert guard.lent == [] and [h[1] for h in guard.history] == [1, -1]
