"""The benchmarks still run: bench/engine.py at its smallest sizes (table, plot, and a plot from a
saved table) and bench/ops.py on a short sequence. Numbers are not checked here (they belong to
docs/, measured in one run); that the scripts work from a fresh clone is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: int = 240) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_engine_bench_quick_run_and_plots(tmp_path):
    table = run("bench/engine.py", "--quick", "--families", "qwen3_next", "--dtype", "fp32", "--repeats", "1",
                "--threads", "2", "--plot", str(tmp_path / "run.png"))
    rows = [line for line in table.splitlines() if line.startswith("| qwen3_next | fp32 |")]
    assert [r.split("|")[3].strip() for r in rows] == [
        "prefill 128", "prefill 512", "decode b1", "decode b16 vs their b16", "decode b16 vs their b1"
    ]
    assert "our delta rule:" in table
    assert (tmp_path / "run.png").stat().st_size > 10_000
    saved = tmp_path / "run.txt"
    saved.write_text(table)
    run("bench/engine.py", "--plot-from", str(saved), "--plot", str(tmp_path / "again.png"))
    assert (tmp_path / "again.png").stat().st_size > 10_000


def test_ops_bench_short_sequence():
    out = run("bench/ops.py", "--T", "200", "--repeats", "1", "--threads", "1")
    lines = [line for line in out.splitlines() if line.startswith(("per-head", "per-channel"))]
    assert len(lines) == 8, out


@pytest.mark.slow
def test_prefix_bench_on_a_generated_trace(tmp_path):
    """bench/prefix.py on a generated Mooncake-format file: 3 conversations of 3 turns (each turn's
    ids extend the previous turn's), replayed with the cache off and full."""
    import json

    lines, next_id = [], 1
    for conv in range(3):
        ids = [0, next_id]
        next_id += 1
        for turn in range(3):
            lines.append({"timestamp": 1000 * (3 * turn + conv), "input_length": 512 * len(ids) - 100,
                          "output_length": 64, "hash_ids": list(ids)})
            ids += [next_id, next_id + 1]
            next_id += 2
    lines.sort(key=lambda r: r["timestamp"])
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = run("bench/prefix.py", str(trace), "--window", "0", "100", "--every", "1", "--time-factor", "0.5",
              "--modes", "off,full", "--json", str(tmp_path / "rows.json"), "--plot", str(tmp_path / "p.png"),
              timeout=600)
    rows = {r["mode"]: r for r in json.loads((tmp_path / "rows.json").read_text())["rows"]}
    assert "| off | 9/9 |" in out and "| full | 9/9 |" in out, out
    assert rows["off"]["computed_tokens"] == rows["off"]["prompt_tokens"]
    assert 0 < rows["full"]["hit_rate"] <= json.loads((tmp_path / "rows.json").read_text())["bound"]
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_link_cut_sweep_prints_each_point():
    """A deep, lasting cut: the controllers lower P90 on both seeds (the figure docs/evaluation.md
    cites); the short-term controller alone is the --no-split line."""
    args = ("bench/link_cut_sweep.py", "--durations", "360", "--rates", "0.6", "--cuts", "0.05", "--seeds", "2")
    both, alone = run(*args), run(*args, "--no-split")
    for out in (both, alone):
        assert out.count("cut to 5% for 144 s: P90 lower by") == 1, out
    least = lambda out: int(out.split("least ")[1].split("%")[0])  # noqa: E731
    assert least(both) >= 30 and least(both) > least(alone), (both, alone)


def test_capacity_window_bench_converges_on_long_runs():
    """At 600 s the simulated capacity of every deployment is within 10% of exact_lambda on the
    first seed (docs/evaluation.md); the 150 s line is printed too."""
    out = run("bench/capacity_window.py", "--runs", "150:50,600:150", "--seeds", "1")
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("run 150 s") and lines[1].startswith("run 600 s"), out
    ratios = [float(cell.split()[1]) for cell in lines[1].split(": ", 1)[1].split("  [")[0].split(" | ")]
    assert len(ratios) == 3 and all(0.9 <= r <= 1.1 for r in ratios), out
