#!/usr/bin/env python
"""The compose cluster for real: build the image from deploy/Dockerfile, bring compose.yaml up with
podman and podman-compose, check a `Router.Generate` against the in-process engine, tear it down.

    sudo .venv/bin/python scripts/compose_smoke.py          # needs root, Debian's apt, PyPI
    scripts/compose_smoke.py --keep                          # leave the cluster up afterwards

Phases (each timed): install what is missing (podman, runc, debootstrap with apt; podman-compose
into a venv of its own under --work-dir); /etc/containers/containers.conf for a machine without
systemd, written only when absent; a base image from a Debian rootfs (debootstrap + podman import,
skipped when the image exists); the PrfaaS image (with the local CPU torch wheel where the machine
has one); `podman-compose up` wave by wave in depends_on order, each wave waiting for its
dependencies' conditions (health checks are run by this script: podman runs them on systemd
timers, and podman-compose only waits for them with podman >= 4.6); greedy requests on both routes
compared token for token with `prfaas generate` on the same checkpoint; teardown, checked: no
container, volume or container process of the project left.

Everything about the services is read from `podman-compose config`: adding a service with a
healthcheck, depends_on, or a `${NAME_PORT:-default}` port needs no change here. Every such port is
moved to a free one unless --default-ports. Exit status: 0 passed, 1 failed, 77 skipped (the line
`SKIP: reason` says why).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from compose_project import Compose  # noqa: E402
from compose_smoke_lib import (  # noqa: E402
    SKIP_RC,
    Phases,
    Skip,
    SmokeError,
    build_image,
    ensure_base_image,
    ensure_containers_conf,
    ensure_podman_compose,
    ensure_tools,
    free_ports,
    lock,
    say,
    sh,
    stage_torch_wheel,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compose-file", default=str(ROOT / "compose.yaml"))
    p.add_argument("--project", default="prfaas-smoke", help="compose project name (default: %(default)s)")
    p.add_argument("--work-dir", default=str(Path.home() / ".cache" / "prfaas" / "compose"),
                   help="podman-compose venv, rootfs staging, logs (default: %(default)s)")
    p.add_argument("--base-image", default="localhost/prfaas-base:bookworm",
                   help="base image, made from a Debian rootfs when absent (default: %(default)s)")
    p.add_argument("--suite", default="bookworm", help="Debian suite of the rootfs (default: %(default)s)")
    p.add_argument("--mirror", default="http://deb.debian.org/debian")
    p.add_argument("--rebuild-base", action="store_true", help="make the base image again even if it exists")
    p.add_argument("--torch-wheel", default="", help="a CPU torch wheel (default: /opt/wheels/torch-*+cpu-*.whl)")
    p.add_argument("--no-install", action="store_true", help="skip (not install) when podman is missing")
    p.add_argument("--default-ports", action="store_true", help="keep compose.yaml's default ports")
    p.add_argument("--health-timeout-s", type=float, default=420.0, help="per wave (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--keep", action="store_true", help="leave the cluster running (no teardown)")
    return p.parse_args(argv)


async def _generate(address: str, ids: list[int], max_tokens: int) -> tuple[list[int], Any, str]:
    from prfaas.rpc import channel
    from prfaas.v1 import router_pb2, router_pb2_grpc

    async with channel(address, expect="router") as ch:  # mutual TLS, as the admin of compose's CA
        out: list[int] = []
        head, text = None, ""
        request = router_pb2.GenerateRequest(token_ids=ids, max_tokens=max_tokens, temperature=0.0)
        async for msg in router_pb2_grpc.RouterStub(ch).Generate(request, timeout=180):
            head = head or msg
            out += list(msg.token_ids)
            text += msg.text
        return out, head, text


def _openai_completion(listen: str, model: str, ids: list[int], max_tokens: int) -> dict[str, Any]:
    """POST /v1/completions with a token-id prompt, greedy, through the standard library."""
    import urllib.request

    body = json.dumps({"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://{listen}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=180) as r:
        return dict(json.loads(r.read()))


def check_openai(compose: Compose, max_tokens: int) -> None:
    """The front door's /v1/completions on a prompt as token ids: the same text as the router's
    stream for the same greedy request, and usage counting the tokens."""
    doors = compose.by_module("frontdoor")
    if not doors:
        say("no front door service in the compose file: OpenAI check skipped")
        return
    fenv, renv = compose.env_of(doors[0]), compose.env_of(compose.by_module("router")[0])
    models = json.loads(_get(f"http://{fenv['PRFAAS_LISTEN']}/v1/models"))["data"]
    ids = [random.Random(1).randrange(3, 200) for _ in range(20)]
    tokens, _, text = asyncio.run(_generate(renv["PRFAAS_LISTEN"], ids, max_tokens))
    got = _openai_completion(fenv["PRFAAS_LISTEN"], models[0]["id"], ids, max_tokens)
    say(f"OpenAI /v1/completions: {got['choices'][0]['text']!r}, usage {got['usage']}")
    if got["choices"][0]["text"] != text:
        raise SmokeError(f"the front door gave {got['choices'][0]['text']!r}, the router {text!r}")
    if got["usage"]["prompt_tokens"] != len(ids) or got["usage"]["completion_tokens"] != len(tokens):
        raise SmokeError(f"usage {got['usage']} for a {len(ids)}-token prompt and {len(tokens)} tokens")
    say("the front door's text equals the router's")


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return str(r.read().decode())


async def _wait_registered(pool: str, n: int, timeout_s: float) -> None:
    from prfaas.cluster.client import CachePoolClient

    client = CachePoolClient(pool)
    try:
        deadline = time.monotonic() + timeout_s
        while len(nodes := await client.list_nodes()) < n:
            if time.monotonic() > deadline:
                raise SmokeError(f"{len(nodes)} of {n} nodes registered with the cache pool in {timeout_s:.0f} s")
            await asyncio.sleep(0.5)
    finally:
        await client.close()


def _host_model(compose: Compose, router: str, spec: str) -> Path:
    """The router's model directory as the host sees it (through the container's mounts)."""
    if spec.startswith("builtin:"):
        from prfaas.model.presets import resolve_model

        return resolve_model(spec)  # the same seeded preset, written on the host
    for m in compose.inspect(router)["Mounts"]:
        dest = m["Destination"].rstrip("/")
        if spec == dest or spec.startswith(dest + "/"):
            return Path(m["Source"]) / spec[len(dest):].lstrip("/")
    raise SmokeError(f"the router's model {spec} is on no mounted volume: cannot read it from the host")


def _oracle(model: Path, ids: list[int], max_tokens: int, dtype: str) -> list[int]:
    """`prfaas generate`: the in-process engine, greedy, on the same checkpoint."""
    cmd = [sys.executable, "-m", "prfaas.cli", "generate", "--model", str(model), "--token-ids",
           ",".join(map(str, ids)), "--max-tokens", str(max_tokens), "--dtype", dtype, "--json"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if r.returncode != 0:
        raise SmokeError(f"prfaas generate failed: {r.stderr[-1500:]}")
    return list(json.loads(r.stdout.splitlines()[-1])["token_ids"])


def check_generate(compose: Compose, max_tokens: int) -> None:
    """A prompt under the router's threshold and one over it (local and PrfaaS prefill, the latter
    pushing KV cache to the decode node), each as greedy `Router.Generate` from the host; the
    tokens must equal the in-process engine's, and under the prfaas policy the routes must be
    LOCAL and PRFAAS."""
    from prfaas.v1 import common_pb2

    routers, pools = compose.by_module("router"), compose.by_module("cachepool")
    if len(routers) != 1 or len(pools) != 1:
        raise SmokeError(f"expected one router and one cache pool service, found {routers} and {pools}")
    from prfaas.security import tls  # the certificates compose's certs-init made (compose.yaml)

    certs = os.environ.get("PRFAAS_CERTS_DIR", str(ROOT / ".prfaas" / "compose-tls"))
    tls.install(tls.resolve(tls_dir=certs, name="admin", kind="admin"))
    renv = compose.env_of(routers[0])
    nodes = compose.by_module("prefill") + compose.by_module("decode")
    asyncio.run(_wait_registered(compose.env_of(pools[0])["PRFAAS_LISTEN"], len(nodes), 120))
    time.sleep(1.0)  # the router re-reads the members from the cache pool every PRFAAS_REFRESH_S (0.5 s)
    model = _host_model(compose, routers[0], renv.get("PRFAAS_MODEL", "builtin:qwen3_next-tiny"))
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    threshold = int(float(renv.get("PRFAAS_THRESHOLD_TOKENS", "256")))
    rng = random.Random(0)
    for n, want_route in ((24, "LOCAL"), (threshold + 64, "PRFAAS")):
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        t = time.monotonic()
        got, head, _ = asyncio.run(_generate(renv["PRFAAS_LISTEN"], ids, max_tokens))
        took = time.monotonic() - t
        route = common_pb2.Route.Name(head.route)
        say(f"{n}-token prompt: route {route} via {head.prefill_node} -> {head.decode_node}, {took:.2f} s: {got}")
        want = _oracle(model, ids, max_tokens, renv.get("PRFAAS_DTYPE", "float32"))
        if got != want:
            raise SmokeError(f"{n}-token prompt: the cluster gave {got}, the in-process engine {want}")
        if renv.get("PRFAAS_POLICY", "prfaas") == "prfaas" and route != want_route:
            raise SmokeError(f"{n}-token prompt (threshold {threshold}): route {route}, expected {want_route}")
    say("tokens equal the in-process engine's on both routes")


def run(a: argparse.Namespace, ph: Phases) -> None:
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    for old in [*work.glob("*.log"), *work.glob("logs/*.log")]:  # each run's logs are its own
        old.unlink()
    with ph("preflight + install"):
        ensure_tools(install=not a.no_install, log=work / "apt.log")
        ensure_containers_conf()
        compose_bin = ensure_podman_compose(work / "venv", log=work / "pip.log")
    with ph("base image"):
        ensure_base_image(a.base_image, a.suite, a.mirror, work, rebuild=a.rebuild_base)
    env = {**os.environ}
    compose = Compose(compose_bin, Path(a.compose_file), a.project, env, work / "logs")
    if not a.default_ports:
        ports = free_ports(compose.port_variables())
        env.update(ports)
        say("ports: " + " ".join(f"{k}={v}" for k, v in sorted(ports.items())))
    compose.load()
    with ph("image build"):
        wheel = stage_torch_wheel(ROOT, a.torch_wheel)
        for image, build in compose.builds().items():
            build_image(image, build, a.base_image, wheel, work / "build.log")
        for image in compose.prebuilt_images():  # no registry may be reachable: never pull
            if sh(["podman", "image", "exists", image], timeout=60, check=False).returncode != 0:
                raise SmokeError(f"image {image} has no build section in compose.yaml and is not on this machine")
    compose.down(quiet=True)  # a project left by an earlier run that died
    failed = False
    try:
        with ph("up + health"):
            for wave in compose.waves():
                compose.up_wave(wave, a.health_timeout_s)
            compose.wait_all_healthy(a.health_timeout_s)
        with ph("requests"):
            check_generate(compose, a.max_tokens)
            check_openai(compose, a.max_tokens)
    except BaseException:
        failed = True
        try:
            compose.dump_logs()
        except SmokeError as e:
            say(f"could not read the logs: {e}")
        raise
    finally:
        if a.keep:
            say(f"--keep: the cluster stays up; stop it with {compose.down_command()}")
        else:
            with ph("teardown"):
                try:
                    compose.teardown_checked()
                except SmokeError as e:
                    if not failed:
                        raise
                    say(f"teardown after the failure: {e}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    ph = Phases()
    try:
        if os.geteuid() != 0:
            raise Skip("needs root (rootful podman; rootless needs subuids and a user session, not set up here)")
        with lock(Path(a.work_dir) / "lock"):
            run(a, ph)
    except Skip as e:
        print(f"SKIP: {e}", flush=True)
        print(json.dumps({"event": "compose_smoke", "result": "skip", "reason": str(e), "phases": ph.times}))
        return SKIP_RC
    except (SmokeError, KeyboardInterrupt) as e:
        print(f"FAIL: {e}", flush=True)
        print(json.dumps({"event": "compose_smoke", "result": "fail", "error": str(e), "phases": ph.times}))
        return 1
    ph.summary()
    print(json.dumps({"event": "compose_smoke", "result": "pass", "phases": ph.times}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
