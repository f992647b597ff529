"""`prfaas up` as the README runs it: the cluster comes up, serves the demo client, and Ctrl-C
stops every process it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def test_up_demo_and_ctrl_c(tmp_path):
    cfg = tmp_path / "cluster.toml"
    cfg.write_text("prfaas_prefill = 1\nlocal_prefill = 1\nlocal_decode = 1\nthreshold_tokens = 100\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HOME": str(tmp_path)}  # the built-in model is written under HOME
    up = subprocess.Popen(
        [sys.executable, "-m", "prfaas.cli", "up", "--config", str(cfg), "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        ready = None
        deadline = time.monotonic() + 180
        assert up.stdout is not None
        while ready is None and time.monotonic() < deadline:
            line = up.stdout.readline()
            assert line, "prfaas up exited before it was ready"
            if line.startswith("{"):
                ready = json.loads(line)
        assert ready and ready["event"] == "ready"
        demo = subprocess.run(
            [sys.executable, "-m", "prfaas.cli", "demo", "--router", ready["router"], "--requests", "4",
             "--max-tokens", "6", "--json"],
            capture_output=True, text=True, timeout=180, env=env,
        )
        assert demo.returncode == 0, demo.stderr
        results = json.loads(demo.stdout.splitlines()[-1])
        assert len(results) == 4 and all(r["output_tokens"] >= 1 for r in results)
        assert {r["route"] for r in results} == {"local", "prfaas"}, "threshold 100 splits the demo's lengths"
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
    # every service ran with the model written under this HOME: none may be left
    left = subprocess.run(["pgrep", "-f", f"{tmp_path}/.cache"], capture_output=True, text=True).stdout
    assert not left.strip(), f"processes left behind: {left}"
    for name in ("cachepool", "router", "prfaas-p0", "local-p0", "local-d0"):
        assert (tmp_path / "logs" / f"{name}.log").stat().st_size > 0
