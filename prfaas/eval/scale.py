"""Scaling the paper's case study onto this machine, and the planner's predictions for it.

The real nodes serve a small model with short prompts; the emulated accelerators take the paper's
times. Three factors, stated in every report:

- `time_factor` (tf): every emulated time is tf x the profile's (tf > 1 slows the cluster down so
  the real compute stays a small share of it); arrival rates are divided by tf.
- `length_scale` (ls): a request of L profile tokens sends L / ls real tokens; the emulated prefill
  time is T_prefill(real x ls).
- `output_scale` (os): a request generates L_out / os real tokens, each decode step taking
  os x T_decode, so a request's decode time (and the decode stage's capacity) is the paper's.
- `decode_scale` (ks): a decode instance batches BS_max / ks requests, each step taking 1 / ks of
  the time: the decode stage's capacity N_d x BS / (T_step x L_out) is unchanged, a request's decode
  takes 1 / ks of the paper's (runs reach a steady state sooner).

KV bytes are the real model's (`state_bytes + bytes_per_token x real tokens`), so the link is scaled
to carry them in the paper's time: B = B_paper x S_real(l_ref / ls) / S_paper(l_ref) / tf, with
l_ref the mean offloaded length of the paper's PrfaaS plan. The planner then runs on the emulated
system in real seconds, with the real KV sizes, over the profile-token length distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from prfaas.eval.emulate import EmulatedProfile
from prfaas.scheduling.lengths import TruncatedLogNormal
from prfaas.scheduling.model import GBPS, Deployment, SystemProfile, Throughput
from prfaas.scheduling.planner import plan_homogeneous, plan_naive, plan_prfaas
from prfaas.scheduling.profiles import CASE_LENGTHS, Profile

DEPLOYMENTS = ("homogeneous", "naive", "prfaas")


@dataclass(frozen=True)
class Scaling:
    time_factor: float = 1.0
    length_scale: float = 64.0
    output_scale: float = 64.0
    decode_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("time_factor", "length_scale", "output_scale", "decode_scale"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive finite number, got {v}")

    def real_tokens(self, profile_tokens: float) -> int:
        return max(1, round(profile_tokens / self.length_scale))

    def real_output(self, profile_tokens: int) -> int:
        return max(2, round(profile_tokens / self.output_scale))

    @property
    def decode_step_factor(self) -> float:
        """Emulated decode step / the profile's step."""
        return self.time_factor * self.output_scale / self.decode_scale

    def decode_batch(self, paper_batch: int) -> int:
        batch = paper_batch / self.decode_scale
        if batch != int(batch) or batch < 1:
            raise ValueError(f"decode_scale {self.decode_scale} must divide BS_max {paper_batch}")
        return int(batch)


@dataclass(frozen=True)
class Shape:
    """Instance counts: PrfaaS prefill, local PD (split by the planner), the homogeneous baseline."""

    n_prfaas: int = 4
    n_local: int = 8
    n_homogeneous: int = 12

    def __post_init__(self) -> None:
        if self.n_prfaas < 1 or self.n_local < 2 or self.n_homogeneous < 2:
            raise ValueError("need >= 1 PrfaaS instance, >= 2 local and >= 2 homogeneous instances")


@dataclass(frozen=True)
class RealModel:
    """The served model's KV size: `state_bytes + bytes_per_token x tokens` per request."""

    state_bytes: int
    bytes_per_token: int

    def kv_bytes(self, real_tokens: float) -> float:
        return self.state_bytes + self.bytes_per_token * real_tokens


def emulated_system(paper: SystemProfile, sc: Scaling, model: RealModel, link_bytes_per_s: float) -> SystemProfile:
    """The system the eval cluster emulates, in real seconds and real KV bytes over profile-token
    lengths (what the planner and the simulator take)."""
    tf, ls = sc.time_factor, sc.length_scale
    kv = Profile.from_points(CASE_LENGTHS, [model.kv_bytes(x / ls) for x in CASE_LENGTHS])
    return SystemProfile(
        kv_bytes=kv,
        prfaas_prefill_s=paper.prfaas_prefill_s.scaled(tf),
        local_prefill_s=paper.local_prefill_s.scaled(tf),
        decode_step_s=paper.decode_step_s * sc.decode_step_factor,
        decode_batch=sc.decode_batch(paper.decode_batch),
        output_tokens=sc.real_output(paper.output_tokens),
        link_bytes_per_s=link_bytes_per_s,
    )


def scaled_link(paper: SystemProfile, sc: Scaling, model: RealModel, l_ref: float, paper_link: float) -> float:
    """Bytes/s of the emulated link: the paper's `paper_link` carrying real KV in the paper's time."""
    return paper_link * model.kv_bytes(l_ref / sc.length_scale) / paper.kv_bytes(l_ref) / sc.time_factor


def plans(system: SystemProfile, dist: TruncatedLogNormal, shape: Shape) -> dict[str, Throughput]:
    return {
        "homogeneous": plan_homogeneous(system, dist, shape.n_homogeneous),
        "naive": plan_naive(system, dist, shape.n_prfaas, shape.n_local),
        "prfaas": plan_prfaas(system, dist, shape.n_prfaas, shape.n_local),
    }


@dataclass(frozen=True)
class Setup:
    """Everything the run and the report need about one scaled case."""

    scaling: Scaling
    shape: Shape
    dist: TruncatedLogNormal
    paper: SystemProfile
    system: SystemProfile
    model: RealModel
    plans: dict[str, Throughput]
    paper_plans: dict[str, Throughput]
    profile_name: str = "case study (H200 PrfaaS, H20 local)"
    decode_profile: Profile | None = None  # decode step by batch size; None: the constant T_decode


def measured_system(measured: EmulatedProfile, sc: Scaling, batch: int = 20) -> SystemProfile:
    """A measured node profile (real tokens, real seconds) as a hardware profile at profile scale:
    T(L) = T_measured(L / ls), so an emulated node takes tf x its own measured time."""
    if measured.prefill_s is None or measured.decode_step_s is None:
        raise ValueError(f"profile {measured.name!r}: a measured profile needs prefill_s and decode_step_s")
    p = measured.prefill_s
    prefill = Profile(tuple(x * sc.length_scale for x in p.lengths), p.values)
    return SystemProfile(prfaas_prefill_s=prefill, local_prefill_s=prefill,
                         decode_step_s=measured.decode_step_s(batch), decode_batch=batch)


def build_setup(sc: Scaling, shape: Shape, model: RealModel, dist: TruncatedLogNormal | None = None,
                link_gbps: float = 100.0, measured: EmulatedProfile | None = None) -> Setup:
    """The case study's profiles, or (with `measured`) one measured node profile for every node."""
    dist = dist or TruncatedLogNormal()
    paper = measured_system(measured, sc) if measured else SystemProfile()
    paper = replace(paper, link_bytes_per_s=link_gbps * GBPS)
    paper_plans = plans(paper, dist, shape)
    l_ref = paper_plans["prfaas"].l_long
    link = scaled_link(paper, sc, model, l_ref, paper.link_bytes_per_s)
    system = emulated_system(paper, sc, model, link)
    setup = Setup(sc, shape, dist, paper, system, model, plans(system, dist, shape), paper_plans)
    if measured:
        setup = replace(setup, profile_name=measured.name, decode_profile=measured.decode_step_s)
    return setup


def deployment_of(setup: Setup, kind: str) -> Deployment:
    return setup.plans[kind].deployment


def statement(setup: Setup) -> list[dict[str, Any]]:
    """The scaled quantities beside the paper's (rows of the report's scaling table)."""
    sc, p, s = setup.scaling, setup.paper, setup.system
    l_mean = setup.dist.mean()
    l_long = setup.paper_plans["prfaas"].l_long
    rows = [
        ("mean input length (tokens)", l_mean, sc.real_tokens(l_mean)),
        ("length truncation (tokens)", f"[{setup.dist.low:.0f}, {setup.dist.high:.0f}]",
         f"[{sc.real_tokens(setup.dist.low)}, {sc.real_tokens(setup.dist.high)}]"),
        ("output length (tokens)", p.output_tokens, s.output_tokens),
        ("S_kv at the mean offloaded length (MiB)", p.kv_bytes(l_long) / 2**20, s.kv_bytes(l_long) / 2**20),
        ("S_kv(1K) / S_kv(128K)", p.kv_bytes(1024) / p.kv_bytes(131072), s.kv_bytes(1024) / s.kv_bytes(131072)),
        ("PrfaaS -> local link (Mbit/s)", p.link_bytes_per_s * 8 / 1e6, s.link_bytes_per_s * 8 / 1e6),
        ("T_prefill H200 at the mean length (s)", p.prfaas_prefill_s(l_mean), s.prfaas_prefill_s(l_mean)),
        ("T_prefill H20 at the mean length (s)", p.local_prefill_s(l_mean), s.local_prefill_s(l_mean)),
        ("decode step (s)", p.decode_step_s, s.decode_step_s),
        ("decode time per request (s)", p.decode_step_s * p.output_tokens, s.decode_step_s * s.output_tokens),
        ("BS_max per decode instance", p.decode_batch, s.decode_batch),
    ]
    return [{"quantity": q, "paper": a, "emulated": b} for q, a, b in rows]
