"""compose.yaml, deploy/Dockerfile and deploy/k8s/: every service is configured by the same
PRFAAS_* variables and probed through the gRPC health service."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML (a dev dependency) is not installed")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
K8S = ROOT / "deploy" / "k8s"

SERVING = {
    "cachepool": "cachepool",
    "router": "router",
    "prefill-prfaas-0": "prefill",
    "prefill-prfaas-1": "prefill",
    "prefill-local-0": "prefill",
    "decode-local-0": "decode",
}
COMMON_ENV = {"PRFAAS_NODE_ID", "PRFAAS_LISTEN", "PRFAAS_METRICS_PORT", "PRFAAS_LOG_LEVEL"}
NODE_ENV = COMMON_ENV | {
    "PRFAAS_CLUSTER",
    "PRFAAS_ROLE",
    "PRFAAS_ADVERTISE",
    "PRFAAS_CACHEPOOL",
    "PRFAAS_MODEL",
    "PRFAAS_KV_CONNECTIONS",
}
ROUTER_ENV = COMMON_ENV | {
    "PRFAAS_CACHEPOOL",
    "PRFAAS_MODEL",
    "PRFAAS_KV_CONNECTIONS",
    "PRFAAS_POLICY",
    "PRFAAS_THRESHOLD_TOKENS",
}
FRONTDOOR_ENV = {"PRFAAS_LISTEN", "PRFAAS_ROUTER", "PRFAAS_MODEL", "PRFAAS_LOG_LEVEL"}
REQUIRED_ENV = {"cachepool": COMMON_ENV, "router": ROUTER_ENV, "prefill": NODE_ENV, "decode": NODE_ENV,
                "frontdoor": FRONTDOOR_ENV}


def _compose() -> dict[str, Any]:
    """compose.yaml with every `${NAME:-default}` at its default, as compose would resolve it with
    nothing set (merge keys `<<` resolved by PyYAML)."""
    text = re.sub(r"\$\{[A-Za-z0-9_]+:-([^}]*)\}", r"\1", COMPOSE.read_text())
    return dict(yaml.safe_load(text))


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_services_env_and_healthchecks() -> None:
    services = _compose()["services"]
    assert set(SERVING) <= set(services)
    for name, module in SERVING.items():
        svc = services[name]
        env = _env(svc)
        missing = REQUIRED_ENV[module] - set(env)
        assert not missing, f"{name} lacks {sorted(missing)}"
        assert svc["command"] == ["python", "-m", f"services.{module}"], name
        assert svc["image"] == "prfaas:local" and svc["build"]["dockerfile"] == "deploy/Dockerfile", name
        assert svc["healthcheck"]["test"][-2:] == ["-m", "prfaas.rpc.probe"], name  # gRPC health over mutual TLS
        assert env["PRFAAS_TLS_DIR"] == "/certs" and any(v.endswith(":/certs:ro") for v in svc["volumes"]), name
        assert "PRFAAS_INSECURE" not in env, name
        if module in ("prefill", "decode"):
            assert env["PRFAAS_NODE_ID"] == name and env["PRFAAS_ADVERTISE"] == env["PRFAAS_LISTEN"]
            assert env["PRFAAS_ROLE"] == module and env["PRFAAS_CLUSTER"] == name.split("-")[1]
        if module != "cachepool":
            assert env["PRFAAS_CACHEPOOL"] == _env(services["cachepool"])["PRFAAS_LISTEN"], name


def test_compose_host_network_on_loopback() -> None:
    """Every container on the host's network (no container network, whose addresses are private
    ones), each service on its own ports on 127.0.0.1, the one-shot job on no network."""
    compose = _compose()
    services = compose["services"]
    assert "networks" not in compose
    assert services["model-init"]["network_mode"] == "none" and services["certs-init"]["network_mode"] == "none"
    ports: list[int] = []
    for name in SERVING:
        svc, env = services[name], _env(services[name])
        assert svc["network_mode"] == "host", name
        assert not {"networks", "ports", "expose"} & set(svc), f"{name}: no networks or port mappings on the host's"
        host, port = env["PRFAAS_LISTEN"].rsplit(":", 1)
        assert host == "127.0.0.1", name
        ports += [int(port), int(env["PRFAAS_METRICS_PORT"])]
        ports += [int(env["PRFAAS_KV_TCP_PORT"])] if "PRFAAS_KV_TCP_PORT" in env else []
    assert len(ports) == len(set(ports)) and all(ports), f"ports must be distinct and fixed: {sorted(ports)}"
    assert _env(services["router"])["PRFAAS_LISTEN"] == "127.0.0.1:50052"
    assert all(any("models:/models" in v for v in services[n]["volumes"]) for n in SERVING if n != "cachepool")
    assert services["router"]["depends_on"]["model-init"]["condition"] == "service_completed_successfully"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_compose_config_validates() -> None:
    r = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_compose_healthcheck_probe_talks_grpc_health() -> None:
    """Runs the compose healthcheck command against a real health service, serving then not."""
    import asyncio

    from prfaas.rpc import add_health_and_reflection, new_server
    from prfaas.rpc.serve import add_port

    argv = _compose()["services"]["router"]["healthcheck"]["test"][1:]
    argv[0] = sys.executable

    async def probe(port: int) -> int:
        env = {**os.environ, "PRFAAS_LISTEN": f"0.0.0.0:{port}"}
        proc = await asyncio.create_subprocess_exec(*argv, env=env)
        return await proc.wait()

    async def main() -> tuple[int, int]:
        server = new_server()
        health = add_health_and_reflection(server, [])
        port = add_port(server, "127.0.0.1:0")
        await server.start()
        serving = await probe(port)
        health.set(False)
        not_serving = await probe(port)
        await server.stop(None)
        return serving, not_serving

    assert asyncio.run(main()) == (0, 1)


def test_dockerfile_builds_one_cpu_image() -> None:
    """One stage on a base chosen by build argument (python:3.11-slim unless told), torch from a
    wheel in the context's .whl/ when there is one, else the CPU index."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    lines = text.splitlines()
    assert [line for line in lines if line.startswith("FROM")] == ["FROM ${BASE_IMAGE}"]
    assert "ARG BASE_IMAGE=python:3.11-slim" in lines[: lines.index("FROM ${BASE_IMAGE}")]
    assert "--extra-index-url" in text and "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in lines
    assert any(line.startswith("COPY") and ".whl*" in line for line in lines)
    assert ".whl" not in (ROOT / ".dockerignore").read_text().split(), "the wheel folder must reach the build"
    # every file the build backend reads (setup.py maps services/ to prfaas.services) is in the
    # dependency layer's COPY, or pip cannot even collect the dependencies there
    dep_copy = next(line for line in lines if line.startswith("COPY") and "pyproject.toml" in line and "README" in line)
    assert all(f in dep_copy.split() for f in ("pyproject.toml", "setup.py", "README.md")), dep_copy


def _manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_k8s_manifests_shape() -> None:
    docs = _manifests()
    assert all("namespace" not in d["metadata"] for d in docs), "manifests must be namespace-free"
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    kinds = {"cachepool", "router", "prefill-prfaas", "prefill-local", "decode-local", "frontdoor"}
    assert set(deployments) == services == {f"prfaas-{k}" for k in kinds}
    for name, dep in deployments.items():
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        module = c["command"][-1].removeprefix("services.")
        env = set(config["data"]) | {e["name"] for e in c.get("env", [])}
        missing = REQUIRED_ENV[module] - env
        assert not missing, f"{name} lacks {sorted(missing)}"
        assert c["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
        port = int(next(e["value"] for e in c["env"] if e["name"] == "PRFAAS_LISTEN").rsplit(":", 1)[1])
        if module == "frontdoor":  # HTTPS: ready when the router serves, alive while it answers /metrics
            assert c["readinessProbe"]["httpGet"]["path"] == "/health", name
            probes = ("startupProbe", "readinessProbe", "livenessProbe")
            assert all(c[p]["httpGet"]["scheme"] == "HTTPS" for p in probes), name
            assert c["ports"][0]["containerPort"] == port
            https = {e["name"]: e["value"] for e in c["env"] if e["name"].startswith("PRFAAS_HTTPS_")}
            assert https == {"PRFAAS_HTTPS_CERT": "/https/tls.crt", "PRFAAS_HTTPS_KEY": "/https/tls.key"}, name
            (vol,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "https"]
            assert vol["secret"]["secretName"] == "prfaas-frontdoor-https"
            assert {"name": "https", "mountPath": "/https", "readOnly": True} in c["volumeMounts"]
            continue
        for probe in ("readinessProbe", "livenessProbe"):  # gRPC health over mutual TLS (the kubelet's is plaintext)
            assert c[probe]["exec"]["command"] == ["python", "-m", "prfaas.rpc.probe"], f"{name} {probe}"
    for dep in deployments.values():  # every pod mounts ca.crt and its own certificate and key, nothing else
        spec = dep["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        node = next(e["value"] for e in c["env"] if e["name"] == "PRFAAS_NODE_ID")
        (vol,) = [v for v in spec["volumes"] if v["name"] == "tls"]
        assert vol["secret"]["secretName"] == "prfaas-tls"
        assert {i["key"] for i in vol["secret"]["items"]} == {"ca.crt", f"{node}.crt", f"{node}.key"}, node
        assert {"name": "tls", "mountPath": "/certs", "readOnly": True} in c["volumeMounts"]
    assert config["data"]["PRFAAS_TLS_DIR"] == "/certs"


def test_k8s_manifests_validate() -> None:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (a dev dependency) is not installed"
    )
    for doc in _manifests():
        kv.validate(doc, desired_version=kv.latest_version(), strict=True)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus package) is not installed")
def test_prometheus_config_validates_and_scrapes_every_service() -> None:
    config = ROOT / "deploy" / "prometheus.yml"
    r = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    scraped = {group["labels"]["service"]: t for job in yaml.safe_load(config.read_text())["scrape_configs"]
               for group in job["static_configs"] for t in group["targets"]}
    services = _compose()["services"]
    want = {name: "127.0.0.1:" + _env(services[name])["PRFAAS_METRICS_PORT"] for name in SERVING}
    want["frontdoor"] = _env(services["frontdoor"])["PRFAAS_LISTEN"]
    assert scraped == want, "every compose service's metrics endpoint, on loopback"
    prom = services["prometheus"]
    assert prom["network_mode"] == "host" and "monitoring" in prom["profiles"]
    assert any(v.startswith("./deploy/prometheus.yml:") for v in prom["volumes"])
