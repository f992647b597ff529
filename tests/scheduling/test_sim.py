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
