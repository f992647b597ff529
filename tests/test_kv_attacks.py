"""The data-plane attacks of issue 10 against a real cluster (LocalCluster, the tiny preset): a
separate attacker process declares huge frames, sends a 200 MiB parser bomb, floods connections
and trickles slowloris frames at the decode node's KV port while a request streams through the
router. The decode node's RSS stays bounded, the request's tokens are the ones it has without an
attack and its longest gap between tokens stays in line with the unattacked run, the node
answers every attack with a verdict or a close, and a request after the attacks is served."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prfaas.cluster.local import ClusterSpec, LocalCluster
from prfaas.model.presets import write_preset
from tests.kv_attacks import kv_port_of, measure

pytestmark = pytest.mark.slow

NODE_ENV = {"PRFAAS_KV_BLOCKS": "512", "PRFAAS_STATE_SLOTS": "16", "PRFAAS_KV_IDLE_TIMEOUT_S": "2",
            "PRFAAS_KV_READ_TIMEOUT_S": "2"}
PER_PEER = 256  # the default per-peer connection cap
RSS_BOUND_MIB = 150  # before: 8 x 256 MiB frames took the node from 476 to 2,524 MiB


@pytest.fixture(scope="module")
def attacked_cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    model = write_preset(root / "model", "qwen3_next", "tiny", seed=5)
    spec = ClusterSpec(prfaas_prefill=1, local_prefill=1, local_decode=1, threshold_tokens=64, tls=False,
                       convertible_local=False, frontdoor=False, metrics=False, extra_env=NODE_ENV)
    with LocalCluster(str(model), spec, log_dir=str(root / "logs")) as c:
        target = kv_port_of(Path(root / "logs" / "local-d0.log"))
        yield c, target


PROMPT = torch.randint(3, 250, (200,), generator=torch.Generator().manual_seed(3)).tolist()  # PrfaaS-routed


@pytest.fixture(scope="module")
def baseline(attacked_cluster):
    c, target = attacked_cluster
    measure(c.router_address, c.proc("local-d0").popen.pid, target, "", PROMPT)  # warm up
    run = measure(c.router_address, c.proc("local-d0").popen.pid, target, "", PROMPT)
    assert run.code == "OK" and len(run.tokens) == 48
    return run


@pytest.mark.parametrize("kind", ["frame_length", "big_frame", "conn_flood", "slowloris"])
def test_attack_leaves_memory_bounded_and_streams_flowing(attacked_cluster, baseline, kind):
    c, target = attacked_cluster
    run = measure(c.router_address, c.proc("local-d0").popen.pid, target, kind, PROMPT)
    print(f"{kind}: rss {run.rss_before_mib:.0f} -> {run.rss_peak_mib:.0f} MiB, "
          f"fds {run.fds_before} -> {run.fds_peak}, max gap {run.max_gap_s:.3f} s "
          f"(unattacked {baseline.max_gap_s:.3f} s), answers {run.answers}")
    assert run.code == "OK" and run.tokens == baseline.tokens
    assert run.rss_peak_mib - baseline.rss_before_mib < RSS_BOUND_MIB, run
    assert run.max_gap_s < 1.0 + 10 * baseline.max_gap_s, run  # before: an 18.7 s stall
    answers = run.answers
    if kind == "frame_length":
        assert answers.get("INVALID_ARGUMENT", 0) > 0 and "frame_sent" not in answers, answers
    elif kind == "big_frame":
        assert answers.get("INVALID_ARGUMENT", 0) > 0, answers
    elif kind == "conn_flood":
        assert answers.get("answered", 0) > 0, answers  # refused over the per-peer cap, with a verdict
        assert answers.get("closed_by_node", 0) > 0 and answers.get("still_open", 0) == 0, answers  # idle closes
        # admitted ones stay under the cap (tests/transport/test_limits.py); refused ones hold an fd
        # until their verdict is flushed, which a loaded machine delays: seen 404-456 here
        assert run.fds_peak - run.fds_before < 4 * PER_PEER, run  # before: all 3,000 held open
    else:
        # every trickling connection was cut by the node: its verdict read, or the next byte hit the close
        cut = answers.get("answered", 0) + answers.get("reset", 0)
        assert answers.get("answered", 0) > 0 and cut == answers.get("opened", -1), answers
        assert not answers.get("still_open"), answers


def test_served_after_the_attacks(attacked_cluster, baseline):
    c, target = attacked_cluster
    run = measure(c.router_address, c.proc("local-d0").popen.pid, target, "", PROMPT)
    assert run.code == "OK" and run.tokens == baseline.tokens
