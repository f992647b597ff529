from prfaas.kv.prefix import block_hashes
from prfaas.kv.prefix_index import CacheEvent, CacheEventKind, PrefixIndex

BS = 4
PROMPT = list(range(100, 120))        # 5 full blocks
H = block_hashes(PROMPT, BS)


def index_with(*events: tuple[str, CacheEventKind, list[int]], requires_state: bool = True) -> PrefixIndex:
    idx = PrefixIndex(BS, requires_state)
    for node, kind, blocks in events:
        idx.apply(CacheEvent(node, kind, tuple(H[i] for i in blocks)))
    return idx


STORED, EVICTED = CacheEventKind.BLOCK_STORED, CacheEventKind.BLOCK_EVICTED
STATE, STATE_EVICTED = CacheEventKind.STATE_STORED, CacheEventKind.STATE_EVICTED


def test_hit_ends_at_last_state_checkpoint_covered_by_blocks() -> None:
    idx = index_with(("a", STORED, [0, 1, 2, 3]), ("a", STATE, [1]))
    assert idx.match(PROMPT) == {"a": 2 * BS}


def test_blocks_without_state_are_no_hit() -> None:
    assert index_with(("a", STORED, [0, 1, 2, 3, 4])).match(PROMPT) == {}


def test_state_without_blocks_is_no_hit() -> None:
    assert index_with(("a", STATE, [0, 1, 2])).match(PROMPT) == {}
    # blocks present up to 1, state only at 3: the blocks do not cover it
    assert index_with(("a", STORED, [0, 1]), ("a", STATE, [3])).match(PROMPT) == {}


def test_gap_in_blocks_stops_the_hit() -> None:
    idx = index_with(("a", STORED, [0, 1, 3, 4]), ("a", STATE, [1, 4]))
    assert idx.match(PROMPT) == {"a": 2 * BS}


def test_blocks_and_state_must_be_on_the_same_node() -> None:
    idx = index_with(("a", STORED, [0, 1, 2]), ("b", STATE, [2]), ("b", STORED, [0]), ("b", STATE, [0]))
    assert idx.match(PROMPT) == {"b": BS}


def test_several_nodes_get_their_own_hits() -> None:
    idx = index_with(
        ("a", STORED, [0, 1, 2, 3, 4]), ("a", STATE, [1, 4]),
        ("b", STORED, [0, 1, 2]), ("b", STATE, [0, 2]),
        ("c", STORED, [1, 2]), ("c", STATE, [2]),
    )
    assert idx.match(PROMPT) == {"a": 5 * BS, "b": 3 * BS}


def test_partial_tail_and_other_prompts() -> None:
    idx = index_with(("a", STORED, [0, 1]), ("a", STATE, [1]))
    assert idx.match(PROMPT[: 2 * BS + 3]) == {"a": 2 * BS}
    assert idx.match(PROMPT[: 2 * BS - 1]) == {}
    assert idx.match([7] + PROMPT[1:]) == {}


def test_eviction_shortens_or_removes_the_hit() -> None:
    idx = index_with(("a", STORED, [0, 1, 2, 3]), ("a", STATE, [1, 3]))
    assert idx.match(PROMPT) == {"a": 4 * BS}
    idx.apply(CacheEvent("a", EVICTED, (H[2],)))
    assert idx.match(PROMPT) == {"a": 2 * BS}
    idx.apply(CacheEvent("a", STATE_EVICTED, (H[1],)))
    assert idx.match(PROMPT) == {}


def test_drop_node_forgets_everything() -> None:
    idx = index_with(("a", STORED, [0, 1]), ("a", STATE, [1]), ("b", STORED, [0]), ("b", STATE, [0]))
    idx.drop_node("a")
    assert idx.match(PROMPT) == {"b": BS}
    assert idx.nodes() == {"b"}
    assert idx.num_blocks("a") == idx.num_states("a") == 0
    idx.drop_node("b")
    idx.drop_node("never-seen")
    assert idx.nodes() == set() and idx.match(PROMPT) == {}


def test_evicting_unknown_things_is_harmless() -> None:
    idx = index_with(("a", STORED, [0]))
    idx.apply(CacheEvent("a", EVICTED, (12345,)))
    idx.apply(CacheEvent("z", STATE_EVICTED, (H[0],)))
    assert idx.num_blocks("a") == 1


def test_without_linear_layers_every_held_block_prefix_counts() -> None:
    idx = index_with(("a", STORED, [0, 1, 2]), requires_state=False)
    assert idx.match(PROMPT) == {"a": 3 * BS}
    assert idx.match_hashes(H[:2]) == {"a": 2 * BS}
