"""The report's tables (markdown) from a run's summary: measured beside predicted, per deployment
and per rate point, the scaled quantities beside the paper's, the share of real compute."""

from __future__ import annotations

import math
from typing import Any

from prfaas.eval.report import fmt, markdown_table


def _ratio(a: float, b: float) -> str:
    return fmt(a / b) if b and not math.isnan(a) and not math.isnan(b) else "-"


def deployments_table(summary: dict[str, Any]) -> str:
    rows = []
    for kind, r in summary["deployments"].items():
        d = r["deployment"]
        share = r["real_share"]
        rows.append({
            "deployment": kind, "instances (PrfaaS/P/D)": f"{d['n_prfaas']}/{d['n_p']}/{d['n_d']}",
            "predicted Lambda_max": fmt(r["predicted_lambda"]), "measured max throughput": fmt(r["max_throughput"]),
            "measured / predicted": _ratio(r["max_throughput"], r["predicted_lambda"]),
            "predicted, each stage's mean time": fmt(r.get("predicted_lambda_exact", math.nan)),
            "measured / that": _ratio(r["max_throughput"], r.get("predicted_lambda_exact", math.nan)),
            "goodput (SLO)": fmt(r["goodput"]), "bottleneck (planner)": r["bottleneck"],
            "real compute share P / D": f"{fmt(share.get('prefill', math.nan), 2)} / "
                                        f"{fmt(share.get('decode', math.nan), 2)}",
            "overruns P / D": f"{share.get('prefill_overruns', 0)} / {share.get('decode_overruns', 0)}",
        })
    cols = list(rows[0]) if rows else []
    return markdown_table(rows, cols)


def points_table(summary: dict[str, Any]) -> str:
    rows = []
    for kind, r in summary["deployments"].items():
        for p in r["points"]:
            m, s = p["measured"], p["predicted"]
            rows.append({
                "deployment": kind, "offered (req/s)": fmt(m["rate"]), "requests": m["requests"],
                "lost / wrong": f"{m['lost']} / {m['wrong_length']}",
                "throughput meas / sim": f"{fmt(m['throughput'])} / {fmt(s['throughput'])}",
                "TTFT mean meas / sim": f"{fmt(m['ttft_mean'])} / {fmt(s['ttft_mean'])}",
                "TTFT P50 meas / sim": f"{fmt(m['ttft_p50'])} / {fmt(s['ttft_p50'])}",
                "TTFT P90 meas / sim": f"{fmt(m['ttft_p90'])} / {fmt(s['ttft_p90'])}",
                "TPOT mean / P90": f"{fmt(m['tpot_mean'])} / {fmt(m['tpot_p90'])}",
                "offload meas / plan": f"{fmt(m['offload_fraction'], 2)} / {fmt(s['p'], 2)}",
                "link MB meas": fmt(m["link_bytes"] / 1e6 if not math.isnan(m["link_bytes"]) else math.nan),
                "link util meas / sim": f"{fmt(m['link_util'], 2)} / {fmt(s['link_util'], 2)}",
                "queue mean (s)": fmt(m["queue_time_mean"]),
                "SLO": "met" if m["meets_slo"] else "missed",
            })
    return markdown_table(rows, list(rows[0]) if rows else [])


def statement_table(summary: dict[str, Any]) -> str:
    rows = [{"quantity": r["quantity"], "paper": _num(r["paper"]), "emulated here": _num(r["emulated"])}
            for r in summary["statement"]]
    return markdown_table(rows, ["quantity", "paper", "emulated here"])


def _num(x: Any) -> str:
    try:
        return fmt(float(x), 4)
    except (TypeError, ValueError):
        return str(x)


def link_cut_table(summary: dict[str, Any]) -> str:
    rows = []
    for label, r in summary["runs"].items():
        m, s = r["measured"], r["predicted"]
        rows.append({"run": label, "requests": m["requests"], "lost / wrong": f"{m['lost']} / {m['wrong_length']}",
                     "TTFT P50 in window meas / sim": f"{fmt(m['ttft_p50'])} / {fmt(s['ttft_p50'])}",
                     "TTFT P90 in window meas / sim": f"{fmt(m['ttft_p90'])} / {fmt(s['ttft_p90'])}",
                     "offload in window meas / sim":
                         f"{fmt(m['offload_fraction'], 2)} / {fmt(s['offload_fraction'], 2)}",
                     "link util in window (of the full rate)": fmt(m["link_util"], 2),
                     "real share P / D": f"{fmt(r['real_share']['prefill'], 2)} / {fmt(r['real_share']['decode'], 2)}"})
    return markdown_table(rows, list(rows[0]) if rows else [])


def summary_markdown(summary: dict[str, Any]) -> str:
    if summary.get("case") in ("link-cut", "burst", "mix-shift"):
        head = (f"{summary['case']} (link cut to {summary['cut_fraction']:.0%} where a link cut), window "
                f"{summary['window']} s; P90 TTFT in the window: "
                f"static {fmt(summary['ttft_p90_static'])} s, controlled {fmt(summary['ttft_p90_controlled'])} s "
                f"({fmt(100 * summary['reduction'], 3)}% lower); run {summary['wall_s']:.0f} s\n\n")
        return head + link_cut_table(summary)
    head = (f"topology {summary['topology']}, scaling {summary['scaling']}, shape {summary['shape']}; SLO: "
            f"{summary['slo']}; run {summary['wall_s']:.0f} s\n\n")
    return (head + deployments_table(summary) + "\n" + points_table(summary) + "\n" + statement_table(summary))
