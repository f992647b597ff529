"""Time-series plots of a static vs controlled pair of runs (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class PlotsUnavailable(RuntimeError):
    """matplotlib (the `plots` extra) is not installed."""


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed), or a clear error without it."""
    try:
        import matplotlib
    except ImportError:
        raise PlotsUnavailable("plots need matplotlib: pip install 'prfaas[plots]' (or pass --json)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_dynamic(name: str, pair: dict, out: Path) -> Path:
    plt = pyplot()

    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(4, 1, figsize=(7, 8), sharex=True)
    for label, run in pair.items():
        t = [s["t"] for s in run.samples]
        axes[0].plot(t, [s["prfaas_queue"] for s in run.samples], label=label)
        axes[1].plot(t, [s["local_prefill_queue"] + s["decode_waiting"] for s in run.samples], label=label)
        axes[2].plot(t, [s["link_util"] for s in run.samples], label=label)
        axes[3].plot(t, [s["threshold"] / 1024 for s in run.samples], label=label)
    axes[2].plot(t, [s["capacity_gbps"] / 100 for s in run.samples], "k:", lw=1, label="capacity / 100 Gbps")
    for ax, y in zip(axes, ["PrfaaS queue", "local queues", "link util", "t (K tokens)"], strict=True):
        ax.set_ylabel(y)
        ax.legend(fontsize=7)
    axes[-1].set_xlabel("simulated time (s)")
    axes[0].set_title(f"sim: {name}")
    fig.tight_layout()
    path = out / f"sim_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
