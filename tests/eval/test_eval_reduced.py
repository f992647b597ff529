"""The reduced form of `prfaas eval` (CI): the three deployments, a small shape (1 PrfaaS, 2 local,
3 homogeneous instances), a short workload each, on the two emulated datacenters. It fails when a
deployment loses a request, returns a wrong number of tokens or wrong tokens (a sample checked
against transformers' greedy generate on the same checkpoint), routes against its policy, or when
the offloaded KV did not cross the shaped link. Without network namespaces that test skips with
the reason and the loopback form (one deployment) still runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from prfaas.eval.command import EvalConfig, real_model, workload
from prfaas.eval.deploy import EvalCluster
from prfaas.eval.scale import DEPLOYMENTS, Scaling, Shape, build_setup
from prfaas.eval.topology import LoopbackTopology, NetnsTopology
from prfaas.model.presets import resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tools.linkemu import link_supported  # noqa: E402

transformers = pytest.importorskip("transformers")
SUPPORTED, WHY_NOT = link_supported()
MODEL = "builtin:qwen3_next-tiny"
SAMPLE = 3  # requests per deployment checked against transformers
CFG = EvalConfig(MODEL, scaling=Scaling(0.25, 256, 128, 4), shape=Shape(1, 2, 3), rates=(0.4,), duration_s=8.0,
                 warmup_s=0.0, seed=7)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def reference():
    model = transformers.AutoModelForCausalLM.from_pretrained(str(resolve_model(MODEL)), torch_dtype=torch.float32)
    model.eval()

    def generate(prompt: list[int], n: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, len(prompt):].tolist()

    return generate


def run_deployment(topology, kind: str, workdir: Path):
    from prfaas.eval.run import run_point

    model, tokens = real_model(MODEL)
    setup = build_setup(CFG.scaling, CFG.shape, model)
    rate = CFG.rates[0] * setup.plans[kind].lambda_max
    reqs = workload(CFG, setup, tokens, rate, CFG.seed)
    assert len(reqs) >= 4, "the reduced workload must send a few requests"
    with EvalCluster(topology, setup, kind, MODEL, workdir / kind) as cluster:
        res = run_point(cluster, setup, reqs, rate, "ci", (0.0, CFG.duration_s), CFG.slo())
    return setup, reqs, res


def check(kind: str, reqs, res, reference, shaped: bool) -> None:
    m, records = res.measured, res.records
    failed = [(r["id"], r["code"], r["error"]) for r in records if r["code"] != "OK"]
    assert m.lost == 0 and not failed, f"{kind}: requests lost: {failed}"
    short = [(r["id"], len(r["tokens"]), r["max_tokens"]) for r in records if len(r["tokens"]) != r["max_tokens"]]
    assert m.wrong_length == 0 and not short, f"{kind}: wrong token counts: {short}"
    assert len(records) == len(reqs)
    routes = {r["route"] for r in records}
    if kind == "homogeneous":
        assert routes == {"local"}, f"homogeneous PD offloaded: {routes}"
    elif kind == "naive":
        assert routes == {"prfaas"}, f"naive heterogeneous kept prefills local: {routes}"
    prompts = {r.request_id: r.prompt for r in reqs}
    sample = sorted(records, key=lambda r: -r["prompt_tokens"])[:SAMPLE]  # the longest: the most KV moved
    for r in sample:
        want = reference(prompts[r["id"]], r["max_tokens"])
        assert r["tokens"] == want, f"{kind} {r['id']} ({r['route']}, {r['prompt_tokens']} tokens): wrong tokens"
    if shaped and kind != "homogeneous":
        assert m.kv_offloaded_bytes > 0
        crossed = res.link[-1][1] - res.link[0][1]
        assert crossed >= 0.9 * m.kv_offloaded_bytes, (
            f"{kind}: {crossed} bytes crossed the shaped link, the offloaded KV is {m.kv_offloaded_bytes}")
    shares = res.emulation
    assert shares and all(s["events"]["prefill"] + s["events"]["decode"] > 0 for s in shares.values()), (
        f"{kind}: some node emulated nothing: {shares}")


@pytest.mark.netns
@pytest.mark.skipif(not SUPPORTED, reason=f"no network namespaces here: {WHY_NOT}")
def test_three_deployments_across_emulated_datacenters(tmp_path, reference):
    model, _ = real_model(MODEL)
    setup = build_setup(CFG.scaling, CFG.shape, model)
    topo = NetnsTopology(setup.system.link_bytes_per_s * 8 / 1e6, CFG.delay_ms * CFG.scaling.time_factor,
                         prefix="prfaas-evalci")
    try:
        for kind in DEPLOYMENTS:
            _, reqs, res = run_deployment(topo, kind, tmp_path)
            check(kind, reqs, res, reference, shaped=True)
    finally:
        topo.close()


@pytest.mark.skipif(SUPPORTED, reason="network namespaces work here: the form across them covers this one")
def test_loopback_form(tmp_path, reference):
    """The fallback where network namespaces cannot be made (no root): PrfaaS alone, on loopback."""
    _, reqs, res = run_deployment(LoopbackTopology(), "prfaas", tmp_path)
    check("prfaas", reqs, res, reference, shaped=False)
