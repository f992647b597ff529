"""Placement with the prefix cache: a decode node's own hit weighs in its choice, and the router's
cross-cluster move decision (services/router/moves.py) picks the holder and the decision."""

from __future__ import annotations

from prfaas.scheduling.policy import NodeView, PrfaasPolicy, RouteQuery
from services.router.moves import best_elsewhere
from services.router.placement import Ask, Node, Placement


def test_decode_node_holding_the_conversation_wins_over_a_less_loaded_one():
    nodes = [NodeView("p0", "local", "prefill"), NodeView("d0", "local", "decode", running=3),
             NodeView("d1", "local", "decode", running=0, hit_tokens=320)]
    d = PrfaasPolicy(threshold=1e9).route(RouteQuery("r", 400), nodes)
    assert d.decode_node == "d1"
    nodes[2] = NodeView("d1", "local", "decode", running=0, hit_tokens=320, busy=True)
    assert PrfaasPolicy(threshold=1e9).route(RouteQuery("r", 400), nodes).decode_node == "d0"  # busy: not at all costs


def test_the_holder_is_the_other_clusters_longest_hit_within_the_prompt():
    nodes = [Node("pl", "local", "prefill", "a"), Node("pp0", "prfaas", "prefill", "b"),
             Node("pp1", "prfaas", "prefill", "c"), Node("d0", "local", "decode", "d")]
    ask = Ask("r", 300, 8, hits=(("pp0", 128), ("pp1", 288), ("d0", 296), ("pl", 16)))
    policy = PrfaasPolicy(threshold=1000, bandwidth_mode="abundant")
    views = [NodeView(n.node_id, n.cluster, n.role, hit_tokens=dict(ask.hits).get(n.node_id, 0))  # type: ignore[arg-type]
             for n in nodes]
    d = policy.route(RouteQuery("r", 300), views)
    assert (d.route, d.prefill_node, d.prefix_from, d.cached_tokens) == ("local", "pl", "prfaas", 288)
    p = Placement(d, nodes[0], nodes[3], 20)
    holder, hit = best_elsewhere(p, ask, nodes)
    assert holder is nodes[2] and hit == 288
    short = Ask("r", 200, 8, hits=(("pp1", 288),))  # never past the prompt's last block boundary
    assert best_elsewhere(p, short, nodes)[1] == 192
    assert best_elsewhere(p, Ask("r", 300, 8, hits=(("pp1", 288),), exclude=frozenset({"pp1"})), nodes) == (None, 0)
