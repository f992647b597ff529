"""Running the eval: one cluster per deployment, a sweep of offered rates on each, the same
workload shape everywhere, and the planner's and the simulator's predictions beside each point.

`run_point` is one rate point: the driver (inside the local datacenter) sends the requests while
this process samples the link's byte counter and applies any scheduled link-rate changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prfaas.cluster.local import service_module
from prfaas.eval.deploy import NODE_ENV, EvalCluster
from prfaas.eval.report import Measured, Slo, summarise
from prfaas.eval.scale import Setup
from prfaas.eval.workload import EvalRequest, arrivals
from prfaas.scheduling.controller import ShortTermController, SplitGuard
from prfaas.scheduling.policy import HomogeneousPolicy, NaivePolicy, PrfaasPolicy, RoutingPolicy
from prfaas.sim.metrics import summarise as sim_summarise
from prfaas.sim.simulator import SimConfig, Simulator

Log = Callable[[str], None]


@dataclass
class PointResult:
    kind: str
    label: str
    measured: Measured
    predicted: dict[str, Any]  # the simulator on the same arrivals, and the planner's figures
    records: list[dict]
    samples: list[dict]
    link: list[tuple[float, int]]
    emulation: dict[str, dict]
    sim_samples: list[dict] = field(default_factory=list)
    wall_s: float = 0.0


def run_driver(cluster: EvalCluster, requests: Sequence[EvalRequest], workdir: Path, label: str,
               link_events: Sequence[tuple[float, float]] = (), log: Log = print) -> tuple[dict, list]:
    """Runs the driver beside the router; returns its output and the link byte samples
    [(t from the driver's start, bytes)]."""
    spec = {"router": cluster.router_address, "cachepool": cluster.cachepool_address,
            "router_metrics": cluster.router_metrics, "nodes": len(cluster.nodes),
            "requests": [r.to_json() for r in requests], "sample_s": 1.0, "tls_dir": str(cluster.tls_dir)}
    spec_path, out_path = workdir / f"{label}.spec.json", workdir / f"{label}.driver.json"
    spec_path.write_text(json.dumps(spec))
    _, pythonpath = service_module("services.router")
    env = {**os.environ, **pythonpath, **NODE_ENV, **cluster.tls_env}
    argv = [*cluster.topology.exec_prefix("local"), sys.executable, "-m", "prfaas.eval.driver", str(spec_path),
            str(out_path)]
    with open(workdir / f"{label}.driver.log", "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the driver exited with {proc.wait()}; see {workdir}/{label}.driver.log")
        t0_wall = float(json.loads(line)["wall"])
        link: list[tuple[float, int]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_link, args=(cluster, t0_wall, link, link_events, stop, log))
        sampler.start()
        try:
            rc = proc.wait()
        finally:
            stop.set()
            sampler.join()
    if rc != 0:
        raise RuntimeError(f"the driver failed ({rc}); see {workdir}/{label}.driver.log")
    return json.loads(out_path.read_text()), link


def _sample_link(cluster: EvalCluster, t0_wall: float, out: list[tuple[float, int]],
                 events: Sequence[tuple[float, float]], stop: threading.Event, log: Log) -> None:
    pending = sorted(events)
    while not stop.is_set():
        now = time.time() - t0_wall
        while pending and pending[0][0] <= now:
            t, mbit = pending.pop(0)
            cluster.topology.set_rate(mbit)
            log(f"  link rate -> {mbit:.2f} Mbit/s at t={now:.1f} s")
        b = cluster.topology.link_bytes()
        if b is not None:
            out.append((now, b))
        stop.wait(0.5)


def policy_for(kind: str, threshold_profile_tokens: float) -> RoutingPolicy:
    if kind == "homogeneous":
        return HomogeneousPolicy()
    if kind == "naive":
        return NaivePolicy()
    return PrfaasPolicy(threshold_profile_tokens)


def simulate(setup: Setup, kind: str, requests: Sequence[EvalRequest], duration_s: float, window: tuple[float, float],
             controlled: bool = False, link_changes: Sequence[tuple[float, float]] = (),
             split: bool = True) -> tuple[dict, list[dict]]:
    """The simulator on the same arrivals (profile-token lengths, real seconds), same deployment;
    `controlled`: the short-term controller and (`split`) the split guard, as the router runs them."""
    plan = setup.plans[kind]
    policy = policy_for(kind, plan.threshold)
    st = ShortTermController(policy, setup.system, plan.deployment, plan.threshold) if controlled else None  # type: ignore[arg-type]
    guard = SplitGuard(st, setup.system.link_bytes_per_s) if st is not None and split else None
    interval = max(1.0, duration_s / 200)
    sim = Simulator(setup.system, plan.deployment, policy, SimConfig(duration_s, sample_interval_s=interval,
                    control_interval_s=2.0), st, None, link_changes, split=guard)
    reqs = sim.run(arrivals(requests))
    return sim_summarise(reqs, sim.samples, *window).as_dict(), sim.samples


def run_point(cluster: EvalCluster, setup: Setup, requests: Sequence[EvalRequest], rate: float, label: str,
              window: tuple[float, float], slo: Slo, link_events: Sequence[tuple[float, float]] = (),
              log: Log = print) -> PointResult:
    t_start = time.monotonic()
    out, link = run_driver(cluster, requests, cluster.workdir, label, link_events, log)
    layout_kv = setup.model.kv_bytes
    measured = summarise(out["records"], rate, window, layout_kv, link, setup.system.link_bytes_per_s,
                         out["router_metrics"], slo)
    end = max(r["done"] or 0 for r in out["records"]) + 1
    sim_changes = [(t, mbit * 1e6 / 8) for t, mbit in link_events]
    predicted, sim_samples = simulate(setup, cluster.kind, requests, end, window, cluster.controlled, sim_changes)
    plan = setup.plans[cluster.kind]
    predicted.update(lambda_max=plan.lambda_max, p=plan.p, threshold_profile_tokens=plan.threshold,
                     egress_bytes_per_s=plan.egress_bytes_per_s, bottleneck=plan.bottleneck)
    return PointResult(cluster.kind, label, measured, predicted, out["records"], out["samples"], link,
                       cluster.emulation_stats(), sim_samples, time.monotonic() - t_start)


def real_share(emulation: dict[str, dict]) -> dict[str, float]:
    """Real compute seconds / emulated seconds, per role, over every node."""
    out = {}
    for role in ("prefill", "decode"):
        real = sum(s["real_s"][role] for s in emulation.values())
        emu = sum(s["emulated_s"][role] for s in emulation.values())
        over = sum(s["overruns"][role] for s in emulation.values())
        n = sum(s["events"][role] for s in emulation.values())
        out[role] = real / emu if emu else float("nan")
        out[f"{role}_overruns"] = over
        out[f"{role}_events"] = n
    return out
