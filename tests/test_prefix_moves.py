"""Cross-cluster prefix moves (the abundant-bandwidth rule) and the scarce rule's recompute, on both
families: the local prefill node imports the prefix a PrfaaS node holds (blocks plus the state
checkpoint, through the real chunk plan, codec and receiver), prefills only the rest, and the
tokens are those of a run without any cache; both ends count the same bytes. Also the router's
decision when moving is impossible (the holder evicted it): it recomputes and says so."""

from __future__ import annotations

import pytest

from prfaas.messages import SamplingParams
from prfaas.obs import metrics
from prfaas.scheduling.policy import PrfaasPolicy
from tests.prefix_support import PrefixCluster
from tests.test_prefix_reuse import alone, model_dir, rand  # noqa: F401 - fixtures

NODES = {"pp0": "prfaas", "pl0": "local", "d0": "local"}
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


def moves(decision: str) -> float:
    return metrics.current().prefix_moves.labels(decision=decision)._value.get()


async def test_abundant_rule_moves_the_prefix_across(model_dir, alone):  # noqa: F811
    first = rand(260, 21)
    second = first[:250] + rand(30, 22)  # shares 250 tokens: the checkpoint at 240 (the tail of 260 is 256)
    policy = PrfaasPolicy(threshold=1000, bandwidth_mode="abundant")  # both prompts are short: local
    async with PrefixCluster(model_dir, NODES, decode_cache=False, policy=policy) as c:
        pp0, pl0 = c.members["pp0"], c.members["pl0"]
        assert pp0.mover and pl0.mover and pl0.prefill
        await c.generate("a", first, PARAMS, route="prfaas")
        moved0, bytes0 = moves("moved"), metrics.current().prefix_move_bytes._value.get()
        tokens, head = await c.generate("b", second, PARAMS)
        assert head.route == "local" and head.prefill_node == "pl0"
        assert moves("moved") == moved0 + 1
        hit = 192  # interval checkpoints every 64: the longest within the 250 shared tokens
        layout = pl0.executor.layout
        want = layout.kv_bytes(hit)  # the prefix's blocks and one state
        assert pp0.mover.exported_bytes == pl0.mover.imported_bytes == want
        assert metrics.current().prefix_move_bytes._value.get() - bytes0 == want
        assert pl0.prefill.cached_tokens == hit == head.cached_tokens
        assert tokens == alone(second, PARAMS)
        # the imported prefix is the local node's own now, and the cache pool says so
        assert (await c.router.directory.hits(first)).get("pl0") == hit  # type: ignore[attr-defined]


async def test_scarce_rule_recomputes_and_a_lost_prefix_falls_back(model_dir, alone):  # noqa: F811
    first = rand(260, 31)
    second = first[:250] + rand(30, 32)
    async with PrefixCluster(model_dir, NODES, decode_cache=False, policy=PrfaasPolicy(threshold=1000)) as c:
        await c.generate("a", first, PARAMS, route="prfaas")
        recomputed0 = moves("recomputed")
        tokens, head = await c.generate("b", second, PARAMS)
        assert head.route == "local" and head.cached_tokens == 0 and moves("recomputed") == recomputed0 + 1
        assert tokens == alone(second, PARAMS)
    async with PrefixCluster(model_dir, NODES, decode_cache=False,
                             policy=PrfaasPolicy(threshold=1000, bandwidth_mode="abundant")) as c:
        await c.generate("a", first, PARAMS, route="prfaas")
        pp0 = c.members["pp0"]
        assert pp0.cache is not None
        pp0.cache.evict(pp0.executor.blocks.num_blocks, 0)  # evicted, the pool not told yet
        failed0 = moves("failed")
        tokens, head = await c.generate("b2", second, PARAMS)
        assert moves("failed") == failed0 + 1 and tokens == alone(second, PARAMS)
        pl0 = c.members["pl0"]
        assert pl0.executor.blocks.num_free + len(pl0.cache.blocks) == pl0.executor.blocks.num_blocks  # type: ignore[union-attr]


@pytest.mark.parametrize("hit", [0, 8, 300])
async def test_bad_moves_are_refused(model_dir, hit):  # noqa: F811
    from prfaas.errors import InvalidRequest

    async with PrefixCluster(model_dir, NODES, decode_cache=False) as c:
        mover = c.members["pl0"].mover
        assert mover is not None
        with pytest.raises(InvalidRequest, match="block boundary"):
            await anext(mover.import_("x", rand(100, 1), hit))
