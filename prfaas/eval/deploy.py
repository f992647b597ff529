"""One eval cluster: the cache pool, the worker nodes of one deployment (each with its emulated
accelerator) and the router, started in a topology (two network namespaces, or loopback).

    homogeneous: N_p + N_d local nodes (H20), router policy `homogeneous`
    naive:       N_prfaas PrfaaS prefill nodes (H200) + N_d local decode nodes, policy `naive`
    prfaas:      N_prfaas PrfaaS prefill + N_p local prefill + N_d local decode, policy `prfaas`,
                 threshold t / length_scale; with `controlled` the local nodes are convertible and
                 the router's controllers run (static: control interval 0)
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from prfaas.cluster.local import service_module, stop_processes
from prfaas.eval.emulate import EmulatedProfile
from prfaas.eval.scale import Setup
from prfaas.eval.topology import LoopbackTopology, NetnsTopology
from prfaas.scheduling.model import Deployment
from prfaas.scheduling.profiles import Profile

Topology = LoopbackTopology | NetnsTopology
# every prompt streams its KV layer by layer, as the paper's (and the simulator's) prefill does
NODE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PRFAAS_PUSH_AFTER_TOKENS": "0"}
# the services' log level (their logs land in the run's directory); INFO logs every request and threshold change
LOG_LEVEL = os.environ.get("PRFAAS_EVAL_LOG_LEVEL", "WARNING")


@dataclass
class Started:
    name: str
    popen: subprocess.Popen[str]
    log: IO[str]
    address: str = ""


@dataclass
class NodePlan:
    name: str
    module: str  # services.prefill / services.decode
    cluster: str  # prfaas / local
    hardware: str  # H200 / H20


def node_plans(kind: str, dep: Deployment) -> list[NodePlan]:
    out = [NodePlan(f"prfaas-p{i}", "services.prefill", "prfaas", "H200") for i in range(dep.n_prfaas)]
    out += [NodePlan(f"local-p{i}", "services.prefill", "local", "H20") for i in range(dep.n_p)]
    out += [NodePlan(f"local-d{i}", "services.decode", "local", "H20") for i in range(dep.n_d)]
    return out


def emulated_profile(setup: Setup, hardware: str, stats_path: str) -> EmulatedProfile:
    sc, p = setup.scaling, setup.paper
    prefill = p.prfaas_prefill_s if hardware == "H200" else p.local_prefill_s
    decode = setup.decode_profile or Profile.from_points([1, p.decode_batch], [p.decode_step_s, p.decode_step_s])
    name = f"{hardware} (case study)" if setup.decode_profile is None else f"{setup.profile_name} as {hardware}"
    return EmulatedProfile(name, prefill, decode if hardware == "H20" else None,
                           sc.time_factor, sc.length_scale, sc.output_scale / sc.decode_scale, stats_path)


@dataclass
class EvalCluster:
    topology: Topology
    setup: Setup
    kind: str  # homogeneous / naive / prfaas
    model: str
    workdir: Path
    controlled: bool = False
    control_interval_s: float = 2.0
    role_interval_s: float = 30.0
    startup_timeout_s: float = 300.0
    procs: list[Started] = field(default_factory=list)
    router_address: str = ""
    cachepool_address: str = ""
    router_metrics: str = ""
    nodes: list[NodePlan] = field(default_factory=list)

    @property
    def tls_dir(self) -> Path:
        """The deployment's development PKI: every process runs mutual TLS, as in production."""
        from prfaas.security import pki

        return pki.ensure_dev_pki(self.workdir / "tls")

    @property
    def tls_env(self) -> dict[str, str]:
        return {"PRFAAS_TLS_DIR": str(self.tls_dir), "PRFAAS_INSECURE": "0"}

    @property
    def deployment(self) -> Deployment:
        return self.setup.plans[self.kind].deployment

    @property
    def threshold_tokens(self) -> float:
        t = self.setup.plans[self.kind].threshold
        return max(0.0, t / self.setup.scaling.length_scale) if t not in (float("inf"), float("-inf")) else 0.0

    def _start(self, name: str, side: str, module: str, args: list[str]) -> Started:
        launch, pythonpath = service_module(module)
        env = {**os.environ, **pythonpath, **NODE_ENV, **self.tls_env}
        log = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        argv = [*self.topology.exec_prefix(side), sys.executable, "-m", launch, *args]
        popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True)
        proc = Started(name, popen, log)
        self.procs.append(proc)
        return proc

    def _wait(self, proc: Started) -> str:
        assert proc.popen.stdout is not None
        deadline = time.monotonic() + self.startup_timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(proc.popen.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    break
                line = proc.popen.stdout.readline()
                if not line:
                    rc = proc.popen.wait()
                    raise RuntimeError(f"{proc.name} exited with {rc}; see {self.workdir}/{proc.name}.log")
                try:
                    msg = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if msg.get("event") == "listening":
                    proc.address = str(msg["address"])
                    return proc.address
        raise TimeoutError(f"{proc.name} did not listen within {self.startup_timeout_s:.0f} s")

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ep = self.topology.endpoint("local", reach_from_other=True)
        cp = self._start("cachepool", "local", "services.cachepool", ["--listen", ep.listen, "--log-level", LOG_LEVEL])
        self.cachepool_address = ep.advertise or self._wait(cp)
        if ep.advertise:
            self._wait(cp)
        self.nodes = node_plans(self.kind, self.deployment)
        waiting = [self._start_node(n) for n in self.nodes]
        for proc in waiting:
            self._wait(proc)
        self._start_router()

    def _start_node(self, n: NodePlan) -> Started:
        decodes = n.module == "services.decode" or (self.controlled and n.cluster == "local")
        ep = self.topology.endpoint(n.cluster, reach_from_other=n.cluster == "prfaas" or decodes, kv=decodes)
        emu = self.workdir / f"{n.name}.emulate.json"
        emulated_profile(self.setup, n.hardware, str(self.workdir / f"{n.name}.emustats.json")).save(emu)
        bs = self.setup.system.decode_batch
        # a decode slot is reserved before the prefill starts: room for one in-flight prefill per prefill node
        dep = self.deployment
        spare = -(-(dep.n_prfaas + dep.n_p) // max(dep.n_d, 1))
        args = ["--node-id", n.name, "--cluster", n.cluster, "--listen", ep.listen, "--cachepool",
                self.cachepool_address, "--model", self.model, "--hardware", n.hardware, "--emulate", str(emu),
                "--state-slots", str(bs + spare), "--max-batch", str(bs), "--kv-blocks", "4096",
                "--transfer-timeout-s", "600", "--log-level", LOG_LEVEL]
        if ep.advertise:
            args += ["--advertise", ep.advertise]
        if ep.kv_port:
            args += ["--kv-tcp-port", str(ep.kv_port)]
        if self.controlled and n.cluster == "local":
            args.append("--convertible")
        return self._start(n.name, n.cluster, n.module, args)

    def _start_router(self) -> None:
        ep = self.topology.endpoint("local")
        metrics_port = self.topology.endpoint("local").listen.rsplit(":", 1)[1]
        if metrics_port == "0":
            from prfaas.cluster.local import _free_port

            metrics_port = str(_free_port())
        interval = self.control_interval_s if self.controlled else 0.0
        args = ["--listen", ep.listen, "--cachepool", self.cachepool_address, "--model", self.model,
                "--policy", self.kind, "--threshold-tokens", f"{self.threshold_tokens:.1f}",
                "--link-gbps", f"{self.setup.system.link_bytes_per_s * 8 / 1e9:.6f}",
                "--control-interval-s", str(interval), "--role-interval-s", str(self.role_interval_s),
                "--prefill-inflight", "1", "--stall-timeout-s", "120", "--transfer-timeout-s", "600",
                "--max-queue", "100000", "--max-queue-tokens", str(1 << 30), "--max-queue-wait-s", "3600",
                "--max-head-wait-s", "3600", "--metrics-port", metrics_port, "--log-level", LOG_LEVEL,
                # the paper's TTFT (and the simulator's) ends when the decode side has the KV: the
                # first token from the decode node, not the prefill node's early one
                "--first-token", "decode"]
        router = self._start("router", "local", "services.router", args)
        address = self._wait(router)
        self.router_address = ep.advertise or address
        self.router_metrics = f"http://127.0.0.1:{metrics_port}/metrics"

    def emulation_stats(self) -> dict[str, dict]:
        out = {}
        for n in self.nodes:
            path = self.workdir / f"{n.name}.emustats.json"
            if path.exists():
                out[n.name] = json.loads(path.read_text())
        return out

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_processes([p.popen for p in self.procs], timeout_s)
        for p in self.procs:
            p.log.close()
        self.procs.clear()

    def __enter__(self) -> EvalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
