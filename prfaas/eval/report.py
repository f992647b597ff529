"""Summaries of one measured run (a rate point of one deployment), the SLO, and the report table.

A request is lost when it ended with a status other than OK or with fewer tokens than it asked for
(every request sets `ignore_eos`, so each must get exactly `max_tokens`). Throughput counts requests
finishing in the steady window; TTFT, TPOT and offload are over requests arriving in it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from prfaas.sim.metrics import percentile


@dataclass(frozen=True)
class Slo:
    ttft_p90_s: float  # real seconds (the paper-time bound x time factor)
    tpot_s: float  # real seconds per token: the decode-speed floor as a step bound (P90)

    def describe(self, time_factor: float, step_factor: float) -> str:
        paper_ttft = self.ttft_p90_s / time_factor
        paper_speed = step_factor / self.tpot_s
        return (f"P90 TTFT <= {self.ttft_p90_s:.2f} s ({paper_ttft:.1f} s paper time) and P90 TPOT <= "
                f"{self.tpot_s:.3f} s (decode >= {paper_speed:.0f} tokens/s paper-equivalent)")


@dataclass(frozen=True)
class Measured:
    rate: float  # offered, requests/s
    requests: int
    completed: int
    lost: int
    wrong_length: int
    throughput: float  # requests/s finishing in the window
    ttft_mean: float
    ttft_p50: float
    ttft_p90: float
    tpot_mean: float
    tpot_p90: float
    offload_fraction: float
    kv_offloaded_bytes: float  # KV of the offloaded requests (real model sizes)
    link_bytes: float  # bytes over the veth in the window (nan without a shaped link)
    link_util: float  # link_bytes / (capacity x window)
    queue_time_mean: float  # the router's admission queue, from its histogram
    window: tuple[float, float]
    meets_slo: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tpot(r: dict) -> float | None:
    n = len(r["tokens"])
    if r["first"] is None or r["done"] is None or n < 2:
        return None
    return (r["done"] - r["first"]) / (n - 1)


def link_in_window(link: Sequence[tuple[float, int]], lo: float, hi: float) -> float:
    """Bytes between the samples nearest lo and hi (t relative to the run start)."""
    inside = [(t, b) for t, b in link if lo <= t <= hi]
    if len(inside) < 2:
        return math.nan
    return float(inside[-1][1] - inside[0][1]) * (hi - lo) / max(inside[-1][0] - inside[0][0], 1e-9)


def summarise(records: Sequence[dict], rate: float, window: tuple[float, float], kv_bytes: Any,
              link: Sequence[tuple[float, int]], link_bytes_per_s: float, router_metrics: dict[str, float],
              slo: Slo) -> Measured:
    lo, hi = window
    ok = [r for r in records if r["code"] == "OK" and len(r["tokens"]) == r["max_tokens"]]
    lost = [r for r in records if r["code"] != "OK"]
    wrong = [r for r in records if r["code"] == "OK" and len(r["tokens"]) != r["max_tokens"]]
    done_in = [r for r in ok if lo <= r["done"] < hi]
    arrived = [r for r in ok if lo <= r["t"] < hi]
    ttft = [r["first"] - r["t"] for r in arrived]
    tpot = [x for x in (_tpot(r) for r in arrived) if x is not None]
    off = [r for r in arrived if r["route"] == "prfaas"]
    kv_off = sum(kv_bytes(r["prompt_tokens"]) for r in off)
    lb = link_in_window(link, lo, hi)
    qsum = router_metrics.get("prfaas_request_queue_time_seconds_sum", math.nan)
    qcount = router_metrics.get("prfaas_request_queue_time_seconds_count", 0.0)
    m = Measured(
        rate, len(records), len(ok), len(lost), len(wrong), len(done_in) / max(hi - lo, 1e-9),
        sum(ttft) / len(ttft) if ttft else math.nan, percentile(ttft, 0.5), percentile(ttft, 0.9),
        sum(tpot) / len(tpot) if tpot else math.nan, percentile(tpot, 0.9),
        len(off) / len(arrived) if arrived else math.nan, kv_off, lb,
        lb / (link_bytes_per_s * (hi - lo)) if link_bytes_per_s > 0 else math.nan,
        qsum / qcount if qcount else math.nan, window,
    )
    meets = (m.lost == 0 and m.wrong_length == 0 and m.ttft_p90 <= slo.ttft_p90_s and m.tpot_p90 <= slo.tpot_s)
    return Measured(**{**asdict(m), "meets_slo": meets})


def goodput(points: Sequence[Measured]) -> float:
    """The highest offered rate that met the SLO (0 when none did)."""
    return max((p.rate for p in points if p.meets_slo), default=0.0)


def fmt(x: float, digits: int = 3) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |\n" for r in rows)
    return head + body
