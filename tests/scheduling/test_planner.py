import json
import math
import subprocess
import sys

from prfaas.scheduling.commands import plan_command, sim_command
from prfaas.scheduling.lengths import EmpiricalLengths, TruncatedLogNormal
from prfaas.scheduling.planner import paper_case_study
from prfaas.scheduling.profiles import H200_PREFILL_S, K, Profile


def test_profiles_interpolate_and_load(tmp_path):
    assert H200_PREFILL_S(8 * K) == 0.72
    assert math.isclose(H200_PREFILL_S(20 * K), 0.72 + (1.84 - 0.72) / 2)
    f = tmp_path / "p.toml"
    f.write_text("[h20]\nlengths = [1, 3]\nvalues = [1.0, 3.0]\n")
    assert Profile.from_file(f, "h20")(2) == 2.0
    assert Profile.from_callable(lambda x: 2 * x, [0, 10])(5) == 10


def test_lognormal_closed_form_matches_samples():
    d = TruncatedLogNormal()
    import random
    rng = random.Random(0)
    e = EmpiricalLengths(d.sample(rng) for _ in range(40_000))
    for t in (4096, 19_648, 65_536):
        assert abs(d.p_above(t) - e.p_above(t)) < 0.01
        assert abs(d.mean_above(t) / e.mean_above(t) - 1) < 0.02


def test_case_study_lands_on_paper_optimum():
    plans = paper_case_study().plans()
    best, homo, naive = plans["prfaas"], plans["homogeneous"], plans["naive"]
    assert (best.deployment.n_p, best.deployment.n_d) == (3, 5)
    assert abs(best.threshold - 19.4 * K) / (19.4 * K) < 0.03
    assert 1.45 < best.lambda_max / homo.lambda_max < 1.6
    assert best.lambda_max > naive.lambda_max > homo.lambda_max       # what the inputs imply
    assert 0.45 < best.p < 0.55
    assert best.egress_bytes_per_s * 8 / 1e9 < 20                    # far below 100 Gbps
    assert (homo.deployment.n_p, homo.deployment.n_d) == (9, 3)


def test_plan_command_json(capsys):
    assert plan_command(["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"prfaas", "homogeneous", "naive"}
    for k in ("lambda_max", "n_prfaas", "n_p", "n_d", "theta_prfaas", "theta_pdp", "theta_pdd"):
        assert all(k in v for v in out.values())
    assert {"threshold_tokens", "p_offload", "egress_gbps"} <= set(out["prfaas"])


def test_plan_and_sim_commands_write_plots(tmp_path, capsys):
    assert plan_command(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "plan_lambda_vs_threshold.png").exists()
    capsys.readouterr()
    assert sim_command(["--scenario", "steady", "--policy", "naive", "--json"]) == 0
    assert "naive" in json.loads(capsys.readouterr().out)


def test_no_torch_or_grpc():
    code = ("import sys; import prfaas.scheduling.policy, prfaas.scheduling.controller, prfaas.scheduling.planner, "
            "prfaas.scheduling.commands, prfaas.sim.scenarios, prfaas.sim.simulator; "
            "bad = [m for m in ('torch', 'grpc') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_exact_lambda_takes_each_stage_mean_time():
    """The paper's model evaluates T_prefill at the mean length; `exact_lambda` takes the mean of
    T_prefill over the lengths a stage serves. On convex profiles it is lower, by a few percent on
    the case study; on a linear profile the two agree."""
    from prfaas.scheduling.lengths import EmpiricalLengths, TruncatedLogNormal, mean_of
    from prfaas.scheduling.model import Deployment, SystemProfile, evaluate, exact_lambda
    from prfaas.scheduling.planner import paper_case_study
    from prfaas.scheduling.profiles import Profile

    sc = paper_case_study()
    for kind, plan in sc.plans().items():
        exact = exact_lambda(sc.system, sc.lengths, plan)
        assert 0.9 * plan.lambda_max < exact < plan.lambda_max, (kind, exact, plan.lambda_max)
    linear = Profile.from_points([1.0, 1e6], [1e-3, 1e3])
    sp = SystemProfile(prfaas_prefill_s=linear, local_prefill_s=linear.scaled(3.0))
    plan = evaluate(sp, sc.lengths, Deployment(4, 3, 5), 20_000)
    assert abs(exact_lambda(sp, sc.lengths, plan) / plan.lambda_max - 1) < 1e-3
    d = TruncatedLogNormal()
    assert abs(mean_of(d, lambda x: x, 20_000)[0] / d.mean_above(20_000) - 1) < 1e-4
    assert abs(mean_of(d, lambda x: x, 20_000)[1] / d.mean_below(20_000) - 1) < 1e-4
    assert mean_of(EmpiricalLengths([1, 2, 3, 10]), lambda x: x * x, 2) == (109 / 2, 5 / 2)
