"""The eval's scaling, predictions and workloads (plain Python, no processes)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from prfaas.eval.deploy import emulated_profile, node_plans
from prfaas.eval.scale import RealModel, Scaling, Shape, build_setup, statement
from prfaas.eval.workload import arrivals, lognormal, mooncake
from prfaas.scheduling.planner import paper_case_study
from prfaas.sim.trace import TokenSpace
from prfaas.sim.workload import Segment

MODEL = RealModel(state_bytes=430080, bytes_per_token=2048)  # the built-in tiny Qwen3-Next
SLICE = Path(__file__).resolve().parents[1] / "data" / "mooncake_slice.jsonl"


def test_emulated_plans_are_the_papers_in_scaled_time():
    sc = Scaling(time_factor=2.0, length_scale=64, output_scale=64, decode_scale=4)
    setup = build_setup(sc, Shape(), MODEL)
    paper = paper_case_study().plans()
    for kind in ("prfaas", "homogeneous", "naive"):
        got, want = setup.plans[kind], paper[kind]
        assert got.deployment == want.deployment, kind
        # the link is not the bottleneck in the case study, so only the time factor changes Lambda
        assert got.lambda_max == pytest.approx(want.lambda_max / 2.0, rel=1e-3), kind
    assert setup.plans["prfaas"].threshold == pytest.approx(paper["prfaas"].threshold, abs=128)
    # the link carries the real KV of the mean offloaded request in the paper's time (x tf)
    l_long = setup.paper_plans["prfaas"].l_long
    paper_s = setup.paper.kv_bytes(l_long) / setup.paper.link_bytes_per_s
    real_s = MODEL.kv_bytes(l_long / 64) / setup.system.link_bytes_per_s
    assert real_s == pytest.approx(2.0 * paper_s, rel=1e-9)
    assert setup.system.decode_batch == 5 and setup.system.output_tokens == 16
    assert setup.system.decode_step_s * setup.system.output_tokens == pytest.approx(0.025 * 1024 * 2 / 4)
    rows = {r["quantity"]: r for r in statement(setup)}
    assert rows["mean input length (tokens)"]["emulated"] == round(setup.dist.mean() / 64)


def test_bad_scaling_and_shapes_are_refused():
    with pytest.raises(ValueError, match="time_factor"):
        Scaling(time_factor=0)
    with pytest.raises(ValueError, match="length_scale"):
        Scaling(length_scale=math.inf)
    with pytest.raises(ValueError, match="must divide BS_max"):
        Scaling(decode_scale=3).decode_batch(20)
    with pytest.raises(ValueError, match="PrfaaS instance"):
        Shape(0, 8, 12)


def test_node_profiles_follow_the_hardware(tmp_path):
    sc = Scaling(2.0, 64, 64, 4)
    setup = build_setup(sc, Shape(), MODEL)
    h200 = emulated_profile(setup, "H200", str(tmp_path / "s"))
    h20 = emulated_profile(setup, "H20", str(tmp_path / "s"))
    assert h200.decode_step_s is None and h20.decode_step_s is not None
    assert h200.prefill_time(16) == pytest.approx(2.0 * 0.44)  # 16 real tokens = 1K profile tokens
    assert h20.prefill_time(16) == pytest.approx(2.0 * 0.97)
    assert h20.decode_time(5) == pytest.approx(setup.system.decode_step_s)
    names = [n.name for n in node_plans("prfaas", setup.plans["prfaas"].deployment)]
    assert names == ["prfaas-p0", "prfaas-p1", "prfaas-p2", "prfaas-p3", "local-p0", "local-p1", "local-p2",
                     "local-d0", "local-d1", "local-d2", "local-d3", "local-d4"]


def test_lognormal_workload_is_scaled_and_seeded():
    sc = Scaling(1.0, 64, 64)
    setup = build_setup(sc, Shape(), MODEL)
    tokens = TokenSpace(1000, frozenset({0, 1, 2}))
    reqs = lognormal([Segment(0, 400, 2.0, setup.dist)], sc, tokens, seed=3)
    assert reqs == lognormal([Segment(0, 400, 2.0, setup.dist)], sc, tokens, seed=3)
    assert 700 < len(reqs) < 900  # Poisson, 2/s for 400 s
    assert all(r.max_tokens == 16 for r in reqs)
    mean_real = sum(len(r.prompt) for r in reqs) / len(reqs)
    assert mean_real == pytest.approx(setup.dist.mean() / 64, rel=0.1)
    assert all(1 <= len(r.prompt) <= 2048 and not {0, 1, 2} & set(r.prompt) for r in reqs)
    assert [a.prompt_tokens for a in arrivals(reqs)] == [r.profile_tokens for r in reqs]
    spread = lognormal([Segment(0, 100, 2.0, setup.dist)], Scaling(1.0, 64, 16), tokens, 3, output_spread=0.5)
    outs = {r.max_tokens for r in spread}
    assert min(outs) >= 32 and max(outs) <= 96 and len(outs) > 5
    with pytest.raises(ValueError, match="output_spread"):
        lognormal([], sc, tokens, 1, output_spread=1.0)


def test_mooncake_trace_is_scaled():
    tokens = TokenSpace(1000, frozenset({0}))
    reqs = mooncake(SLICE, Scaling(2.0, 64, 64), tokens, first=50, stretch=2.0)
    assert len(reqs) == 50
    rng = random.Random(0)
    r = reqs[rng.randrange(50)]
    assert r.profile_tokens == len(r.prompt) * 64 and r.max_tokens >= 2
    assert reqs[0].prompt[:8] == reqs[1].prompt[:8]  # the trace's shared first block stays shared
    with pytest.raises(ValueError, match="whole length scale"):
        mooncake(SLICE, Scaling(2.0, 64.5, 64), tokens, first=5)


def test_measured_node_profile_drives_the_plan(tmp_path):
    from prfaas.eval.emulate import EmulatedProfile
    from prfaas.eval.measure import measure_profile

    prof = measure_profile("builtin:qwen3_next-tiny", lengths=(16, 64, 256), batches=(1, 4, 8), reps=1,
                           log=lambda m: None)
    assert prof.prefill_s is not None and prof.decode_step_s is not None
    assert all(v > 0 for v in prof.prefill_s.values + prof.decode_step_s.values)
    prof.save(tmp_path / "node.json")
    loaded = EmulatedProfile.load(tmp_path / "node.json")
    sc = Scaling(2.0, 64, 64, 4)
    setup = build_setup(sc, Shape(1, 2, 3), MODEL, measured=loaded)
    assert setup.profile_name.startswith("cpu (measured")
    node = emulated_profile(setup, "H20", "")
    # an emulated node takes tf x its own measured time, whatever the length scale
    assert node.prefill_time(64) == pytest.approx(2.0 * loaded.prefill_s(64))
    assert node.decode_time(4) == pytest.approx(2.0 * 64 / 4 * loaded.decode_step_s(4))
    assert setup.plans["homogeneous"].lambda_max > 0
    with pytest.raises(ValueError, match="needs prefill_s and decode_step_s"):
        build_setup(sc, Shape(1, 2, 3), MODEL, measured=EmulatedProfile("half"))


@pytest.mark.parametrize("argv, message", [
    (["steady", "--shape", "1,2"], "N_PRFAAS,N_LOCAL,N_HOMOGENEOUS"),
    (["steady", "--deployments", "prfaas,bogus"], "unknown ['bogus']"),
    (["steady", "--rates", "0.5,-1"], "positive numbers"),
    (["steady", "--time-factor", "0"], "positive"),
    (["sideways"], "invalid choice"),
])
def test_cli_refuses_bad_flags(argv, message, capsys):
    from prfaas.eval.cli import eval_command

    with pytest.raises(SystemExit) as e:
        eval_command(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
