from prfaas.sim import scenarios


def test_steady_state_matches_planner_within_10_percent():
    for kind, (plan, run) in scenarios.steady(duration=1200).items():
        ratio = run.summary.throughput / plan.lambda_max
        assert 0.9 < ratio < 1.05, (kind, ratio)


def test_deterministic():
    a = scenarios.steady(seed=7, duration=400, policies=("prfaas",))["prfaas"][1].summary
    b = scenarios.steady(seed=7, duration=400, policies=("prfaas",))["prfaas"][1].summary
    assert a == b


def test_link_drop_controller_bounds_queue_and_keeps_throughput():
    r = scenarios.link_drop()
    s, c = r["static"], r["controlled"]
    assert max(x["prfaas_queue"] for x in c.samples) < max(x["prfaas_queue"] for x in s.samples)
    assert c.summary.throughput >= s.summary.throughput * 0.99
    assert c.summary.ttft_p90 < s.summary.ttft_p90


def test_burst_p90_ttft_improves():
    r = scenarios.burst()
    assert r["controlled"].summary.ttft_p90 < r["static"].summary.ttft_p90


def test_mix_shift_long_term_restores_throughput():
    r = scenarios.mix_shift()
    assert r["controlled"].role_changes
    assert r["controlled"].summary.throughput > 1.5 * r["static"].summary.throughput


def test_a_deep_link_cut_lends_decode_nodes_to_prefill_and_returns_them():
    """100 -> 5 Gbps at 0.6 Lambda_max: no threshold fits the link with three local prefill nodes.
    The split guard lends decode nodes to prefill during the cut and returns each after it; P90 TTFT
    of the cut's arrivals is well under the static threshold's and under the short-term controller's
    alone."""
    from prfaas.scheduling.model import GBPS
    from prfaas.scheduling.planner import paper_case_study
    from prfaas.sim.workload import Segment

    sc = paper_case_study()
    plan = sc.plans()["prfaas"]
    seg, cut = [Segment(0, 1000, 0.6 * plan.lambda_max, sc.lengths)], ((200.0, 5 * GBPS), (600.0, 100 * GBPS))
    runs = {label: scenarios.run_one(label, plan, "prfaas", seg, 1000, (200, 600), 1, controlled, link_changes=cut,
                                     split=split)
            for label, controlled, split in (("static", False, False), ("short", True, False), ("both", True, True))}
    changes = runs["both"].role_changes
    lent = [c for c in changes if c.new_role == "prefill"]
    back = [c for c in changes if c.new_role == "decode"]
    assert lent and all(200 <= c.time < 600 for c in lent), changes
    assert sorted(c.node_id for c in back) == sorted(c.node_id for c in lent), "every lent node returns"
    assert all(c.time >= 600 for c in back), changes
    assert not runs["short"].role_changes
    p90 = {k: r.summary.ttft_p90 for k, r in runs.items()}
    assert p90["both"] < 0.5 * p90["static"] and p90["both"] < p90["short"], p90
