"""Summaries of a simulated run: throughput, TTFT percentiles, offload fraction, link use."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from prfaas.sim.simulator import Req


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass(frozen=True)
class Summary:
    throughput: float        # requests finishing decode per second in [start, end)
    completed: int
    ttft_mean: float         # over requests arriving in [start, end) that got a first token
    ttft_p50: float
    ttft_p90: float
    unserved: int            # arrived in the window, no first token by the end
    offload_fraction: float
    link_util: float         # bytes sent / (capacity * time), from the run's samples
    mean_prfaas_queue: float

    def as_dict(self) -> dict:
        return asdict(self)


def summarise(reqs: Sequence[Req], samples: Sequence[dict], start: float, end: float) -> Summary:
    done = [r for r in reqs if start <= r.done < end]
    arrived = [r for r in reqs if start <= r.arrival.time < end]
    ttft = [r.first_token - r.arrival.time for r in arrived if r.first_token >= 0]
    routed = [r for r in arrived if r.route]
    win = [s for s in samples if start < s["t"] <= end]
    util = sum(s["link_util"] for s in win) / len(win) if win else 0.0
    return Summary(
        throughput=len(done) / (end - start),
        completed=len(done),
        ttft_mean=sum(ttft) / len(ttft) if ttft else float("nan"),
        ttft_p50=percentile(ttft, 0.5),
        ttft_p90=percentile(ttft, 0.9),
        unserved=len(arrived) - len(ttft),
        offload_fraction=sum(r.route == "prfaas" for r in routed) / len(routed) if routed else 0.0,
        link_util=util,
        mean_prfaas_queue=sum(s["prfaas_queue"] for s in win) / len(win) if win else 0.0,
    )
