import pytest

from prfaas.scheduling.policy import (
    HomogeneousPolicy,
    NaivePolicy,
    NoCapacityError,
    NodeView,
    PrfaasPolicy,
    RouteQuery,
)


def nodes(pd_hit=0, prfaas_hit=0, pd_loads=(0, 0), prfaas_loads=(0, 0), dec_loads=(3, 1)):
    out = [NodeView(f"pd-p{i}", "local", "prefill", queue_depth=q, hit_tokens=pd_hit if i == 0 else 0)
           for i, q in enumerate(pd_loads)]
    out += [NodeView(f"prf-{i}", "prfaas", "prefill", queue_depth=q, hit_tokens=prfaas_hit if i == 1 else 0)
            for i, q in enumerate(prfaas_loads)]
    out += [NodeView(f"pd-d{i}", "local", "decode", running=r) for i, r in enumerate(dec_loads)]
    return out


def q(n, forced="auto"):
    return RouteQuery("r1", n, forced)


def test_scarce_threshold_rule_uses_local_hit_only():
    pol = PrfaasPolicy(10_000, "scarce")
    assert pol.route(q(10_000), nodes()).route == "local"          # l - 0 <= t
    assert pol.route(q(10_001), nodes()).route == "prfaas"
    d = pol.route(q(30_000), nodes(pd_hit=25_000))                  # 5000 uncached locally
    assert (d.route, d.prefill_node, d.cached_tokens, d.uncached_tokens) == ("local", "pd-p0", 25_000, 5_000)
    d = pol.route(q(30_000), nodes(prfaas_hit=25_000))              # a PrfaaS hit does not count
    assert (d.route, d.prefill_node, d.cached_tokens) == ("prfaas", "prf-1", 25_000)


def test_abundant_uses_longer_prefix_and_moves_it():
    pol = PrfaasPolicy(10_000, "abundant")
    d = pol.route(q(30_000), nodes(prfaas_hit=25_000))
    assert (d.route, d.prefix_from, d.cached_tokens, d.uncached_tokens) == ("local", "prfaas", 25_000, 5_000)
    d = pol.route(q(50_000), nodes(pd_hit=30_000, prfaas_hit=10_000))
    assert (d.route, d.prefix_from, d.cached_tokens) == ("prfaas", "local", 30_000)
    d = pol.route(q(50_000), nodes(pd_hit=5_000, prfaas_hit=10_000))
    assert (d.route, d.prefix_from, d.prefill_node, d.cached_tokens) == ("prfaas", None, "prf-1", 10_000)


def test_cache_affinity_beats_load_and_load_breaks_ties():
    pol = PrfaasPolicy(1_000)
    d = pol.route(q(50_000), nodes(prfaas_hit=4_096, prfaas_loads=(0, 9)))
    assert d.prefill_node == "prf-1"                                 # longest hit wins over load
    d = pol.route(q(50_000), nodes(prfaas_loads=(5, 2)))
    assert d.prefill_node == "prf-1"                                 # no hits: least loaded
    assert d.decode_node == "pd-d1"                                  # least loaded decode
    d = pol.route(q(50_000), nodes(prfaas_loads=(2, 2), dec_loads=(1, 1)))
    assert (d.prefill_node, d.decode_node) == ("prf-0", "pd-d0")     # exact ties: node id


def test_threshold_settable_and_validated():
    pol = PrfaasPolicy(10_000)
    assert pol.route(q(20_000), nodes()).route == "prfaas"
    pol.threshold = 30_000
    assert pol.route(q(20_000), nodes()).route == "local"
    with pytest.raises(ValueError):
        pol.threshold = -1


def test_forced_routes_and_baselines():
    assert PrfaasPolicy(10_000).route(q(100, "prfaas"), nodes()).route == "prfaas"
    assert PrfaasPolicy(10_000).route(q(100_000, "local"), nodes()).route == "local"
    assert HomogeneousPolicy().route(q(100_000), nodes()).route == "local"
    assert NaivePolicy().route(q(100), nodes()).route == "prfaas"


def test_no_capacity_and_fallback():
    full = [n if n.cluster == "local" else NodeView(n.node_id, n.cluster, n.role, free_blocks=0) for n in nodes()]
    d = PrfaasPolicy(1_000).route(q(50_000), full)
    assert d.route == "local" and "fallback" in d.reason
    with pytest.raises(NoCapacityError):
        PrfaasPolicy(1_000).route(q(50_000, "prfaas"), full)       # forced never falls back
    no_decode = [n for n in nodes() if n.role == "prefill"]
    with pytest.raises(NoCapacityError, match="decode"):
        HomogeneousPolicy().route(q(10), no_decode)
    with pytest.raises(NoCapacityError):
        HomogeneousPolicy().route(q(10), [])
