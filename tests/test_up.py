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


def test_router_logs_and_exports_threshold_and_decisions(tmp_path):
    """The live router runs the prfaas policy by default; t and every decision are in its metrics
    and its JSON logs."""
    import asyncio
    import socket
    import urllib.request

    from prfaas.cluster.local import ClusterSpec, LocalCluster
    from prfaas.model.presets import write_preset
    from prfaas.v1 import common_pb2
    from tests.test_data_path import generate

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = write_preset(tmp_path / "m", "qwen3_next", "tiny")
    spec = ClusterSpec(prfaas_prefill=1, local_prefill=1, local_decode=1, threshold_tokens=64, router_metrics_port=port)
    with LocalCluster(str(model), spec, log_dir=str(tmp_path / "logs")) as c:
        for n in (10, 200):
            asyncio.run(generate(c.router_address, list(range(3, 3 + n)), 2, common_pb2.AUTO))
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "prfaas_threshold_tokens 64.0" in text
    assert 'prfaas_routing_decisions_total{route="local"} 1.0' in text
    assert 'prfaas_routing_decisions_total{route="prfaas"} 1.0' in text
    assert 'prfaas_time_to_first_token_seconds_count{route="prfaas"} 1.0' in text
    lines = [json.loads(line) for line in (tmp_path / "logs" / "router.log").read_text().splitlines()
             if line.startswith("{")]
    policy = next(m for m in lines if m.get("event") == "policy")
    assert policy["policy"] == "prfaas" and policy["threshold_tokens"] == 64
    routes = [m for m in lines if m.get("event") == "route"]
    assert {m["route"] for m in routes} == {"local", "prfaas"} and all("reason" in m for m in routes)
