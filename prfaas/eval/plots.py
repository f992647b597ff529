"""Figures of an eval run (matplotlib, headless), each labelled with its host: goodput per deployment
measured against predicted, TTFT distributions, and t, local prefill nodes and link utilisation
over time (measured beside the simulator's run of the same case)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prfaas.sim.plots import PlotsUnavailable

# what every figure says of where it was measured (the machine's load is the run's docs' to state)
PRELIM = f"emulated accelerators on a {os.cpu_count()}-core host"


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is in the extras
        raise PlotsUnavailable("plots need matplotlib (pip install 'prfaas[plots]')") from e
    return plt


def plot_goodput(data: dict, path: Path) -> None:
    plt = _plt()
    rows = data["summary"]["deployments"]
    kinds = list(rows)
    x = range(len(kinds))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bars = [("predicted_lambda", "planner Lambda_max (paper's model)"),
            ("predicted_lambda_exact", "planner, each stage's mean time"),
            ("max_throughput", "measured throughput (max)"), ("goodput", "measured goodput (SLO)")]
    bars = [(key, label) for key, label in bars if all(key in rows[k] for k in kinds)]
    w = 0.8 / len(bars)
    for j, (key, label) in enumerate(bars):
        ax.bar([i + (j - (len(bars) - 1) / 2) * w for i in x], [rows[k][key] for k in kinds], w, label=label)
    ax.set_xticks(list(x), kinds)
    ax.set_ylabel("requests/s (real time)")
    ax.set_title(f"Goodput per deployment, {PRELIM}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ttft(data: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for kind, points in data["points"].items():
        for p in points:
            lo, hi = p["measured"]["window"]
            ttft = sorted(r["first"] - r["t"] for r in p["records"]
                          if r["first"] is not None and r["code"] == "OK" and lo <= r["t"] < hi)
            if ttft:
                ax.plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))],
                        label=f"{kind} {p['label']} ({p['measured']['rate']:.2f}/s)")
    ax.set_xlabel("TTFT (s, real time)")
    ax.set_ylabel("CDF")
    ax.set_title(f"TTFT distributions, {PRELIM}", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _link_util(link: list, capacity_bps: float) -> tuple[list[float], list[float]]:
    ts, us = [], []
    for (t0, b0), (t1, b1) in zip(link, link[1:], strict=False):
        if t1 > t0:
            ts.append(t1)
            us.append((b1 - b0) / (t1 - t0) / capacity_bps)
    return ts, us


def plot_over_time(data: dict, path: Path) -> None:
    plt = _plt()
    s = data["summary"]
    cap = s["link_mbit"] * 1e6 / 8
    fig, axes = plt.subplots(3, 1, figsize=(7, 6.5), sharex=True)
    for label, points in data["points"].items():
        p = points[0]
        samples = [x for x in p["samples"] if x.get("threshold") is not None]
        axes[0].plot([x["t"] for x in samples], [x["threshold"] for x in samples], label=f"{label} measured")
        sim = p["sim_samples"]
        axes[0].plot([x["t"] for x in sim], [x["threshold"] / s["scaling"]["length_scale"] for x in sim], "--",
                     label=f"{label} simulated")
        roles = [x for x in p["samples"] if "roles" in x]
        axes[1].plot([x["t"] for x in roles], [sum(1 for n, r in x["roles"].items() if n.startswith("local") and
                                                   r == "prefill") for x in roles], label=f"{label} measured")
        axes[1].plot([x["t"] for x in sim], [x["n_p"] for x in sim], "--", label=f"{label} simulated")
        ts, us = _link_util(p["link"], cap)
        axes[2].plot(ts, us, label=f"{label} measured")
        axes[2].plot([x["t"] for x in sim], [x["link_util"] * x["capacity_gbps"] * 1e9 / 8 / cap for x in sim], "--",
                     label=f"{label} simulated")
    lo, hi = s["window"]
    for ax in axes:
        ax.axvspan(lo, hi, color="grey", alpha=0.15)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("t (real tokens)")
    axes[1].set_ylabel("local prefill nodes")
    axes[2].set_ylabel("link utilisation\n(of the uncut rate)")
    axes[2].set_xlabel("time (s, real)")
    axes[0].set_title(f"{s['case']} (window shaded): t, roles and link over time, {PRELIM}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(out: str | Path, log: Callable[[str], None] = print) -> list[Path]:
    out = Path(out)
    made = []
    if (out / "steady.json").exists():
        data = json.loads((out / "steady.json").read_text())
        for name, fn in (("eval_goodput.png", plot_goodput), ("eval_ttft.png", plot_ttft)):
            fn(data, out / name)
            made.append(out / name)
    for case in ("link-cut", "burst", "mix-shift"):
        if (out / f"{case}.json").exists():
            png = out / f"eval_{case.replace('-', '_')}.png"
            plot_over_time(json.loads((out / f"{case}.json").read_text()), png)
            made.append(png)
    for m in made:
        log(f"[eval] wrote {m}")
    return made
