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
