"""compose.yaml for real: scripts/compose_smoke.py builds deploy/Dockerfile, brings the cluster up
with podman and podman-compose (host networking, loopback only), sends `Router.Generate` on both
routes and compares the tokens with the in-process engine, then tears it down and checks nothing
is left. Opt-in (PRFAAS_COMPOSE_SMOKE=1): it installs Debian packages where missing and takes
minutes. The fast tests here check how the script reads compose.yaml."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compose_smoke.py"
sys.path.insert(0, str(ROOT / "scripts"))

yaml = pytest.importorskip("yaml", reason="PyYAML (a dev dependency) is not installed")

from compose_project import Compose  # noqa: E402


def _project() -> Compose:
    """The script's view of compose.yaml, read with PyYAML here rather than `podman-compose config`."""
    compose = Compose(Path("podman-compose"), ROOT / "compose.yaml", "t", {}, Path("/nonexistent"))
    services = dict(yaml.safe_load((ROOT / "compose.yaml").read_text())["services"])
    compose.services = {n: s for n, s in services.items() if not s.get("profiles")}  # as `load` keeps them
    return compose


def test_waves_follow_depends_on() -> None:
    compose = _project()
    waves = compose.waves()
    assert waves[0] == ["certs-init", "model-init"]  # the one-shot jobs: certificates and the checkpoint
    assert waves[1] == ["cachepool"]
    nodes = {"decode-local-0", "prefill-local-0", "prefill-prfaas-0", "prefill-prfaas-1", "router"}
    assert set(waves[2]) == nodes and waves[3] == ["frontdoor"]  # the front door waits for the router
    assert compose.depends("router") == {"cachepool": "service_healthy", "model-init": "service_completed_successfully"}
    assert sorted(n for n in compose.services if not compose.has_healthcheck(n)) == ["certs-init", "model-init"]


def test_every_port_is_a_variable_the_script_moves() -> None:
    """Each PRFAAS_LISTEN, metrics and KV port is a ${NAME_PORT:-default} variable, one per port."""
    compose = _project()
    names = compose.port_variables()
    per_service = {n: compose.env_of(n) for n in compose.services if n not in ("model-init", "certs-init")}
    for name, env in per_service.items():  # the front door serves its /metrics on its HTTP port
        for key in ("PRFAAS_LISTEN",) + (("PRFAAS_METRICS_PORT",) if name != "frontdoor" else ()):
            assert "_PORT:-" in env[key], f"{name} {key}={env[key]} is not a port variable"
    used = {v.split("${", 1)[1].split(":-", 1)[0] for env in per_service.values() for k, v in env.items()
            if k in ("PRFAAS_LISTEN", "PRFAAS_METRICS_PORT", "PRFAAS_KV_TCP_PORT")}
    # every port the script moves, plus Prometheus's (in the monitoring profile, which it leaves out)
    assert used | {"PROMETHEUS_PORT"} == names and len(used) == 2 * len(per_service)
    assert compose.by_module("router") == ["router"] and len(compose.by_module("prefill")) == 3


def _stream(cmd: list[str], timeout_s: float) -> tuple[int, list[str]]:
    """Runs the script, echoing its progress (visible with `pytest -s`)."""
    lines: list[str] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "level=error msg=\"unable to get systemd connection" not in line:  # podman without systemd
                print(line, end="", flush=True)
            lines.append(line.rstrip("\n"))
        return proc.wait(timeout=timeout_s), lines


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_compose_cluster_serves_then_tears_down() -> None:
    if os.environ.get("PRFAAS_COMPOSE_SMOKE") != "1":
        pytest.skip("opt-in: PRFAAS_COMPOSE_SMOKE=1 runs scripts/compose_smoke.py (root, apt, PyPI; minutes)")
    rc, lines = _stream([sys.executable, str(SCRIPT)], 3500)
    if rc == 77:
        pytest.skip(next((ln for ln in lines if ln.startswith("SKIP: ")), "SKIP: (no reason given)")[6:])
    assert rc == 0, "\n".join(lines[-40:])
    result = json.loads(lines[-1])
    assert result["result"] == "pass" and {"up + health", "requests", "teardown"} <= set(result["phases"])
