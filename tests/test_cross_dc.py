"""Cross-datacenter: the PrfaaS prefill node in one network namespace pushes KV over a shaped,
delayed veth link (tools/linkemu) to the decode node in the other.

    <prefix>-prfaas: prefill node prfaas-p0            <prefix>-local: cache pool, router,
                                                                       local-p0 (prefill), local-d0 (decode)
    10.203.0.1 ===== 500 Mbit/s tbf, both ways ===== 10.203.0.2
                                                     delay proxy :50061 (+3 ms each way) -> decode :50051

The decode node advertises the proxy, so every KV stream and Admit to it takes the delay (local
ones too; the PrfaaS prefill node's also crosses the shaped veth). The router is only reachable
inside the local namespace, so this file doubles as the client run there (`__main__` below).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this file also runs as the client script, inside a namespace

from tools.linkemu import EmulatedLink, link_supported  # noqa: E402

SUPPORTED, WHY_NOT = link_supported()
RATE_MBIT, DELAY_MS = 500.0, 3.0
PROMPT_TOKENS, MAX_TOKENS = 600, 12

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not SUPPORTED, reason=f"no network namespaces here: {WHY_NOT}"),
]


def start(link: EmulatedLink, side: str, name: str, module: str, args: list[str], logs: Path) -> subprocess.Popen[str]:
    log: IO[str] = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed by the fixture
    proc = link.run_in(
        side,  # type: ignore[arg-type]
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    proc.log = log  # type: ignore[attr-defined]
    return proc


def wait_listening(proc: subprocess.Popen[str], name: str, timeout_s: float = 90.0) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                break
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{name} exited with {proc.wait()} before listening; see its log")
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if msg.get("event") == "listening":
                return str(msg["address"])
    raise TimeoutError(f"{name} did not listen within {timeout_s:.0f} s")


def tx_bytes(link: EmulatedLink, side: str) -> int:
    out = subprocess.run(
        ["ip", "-n", link.namespace(side), "-s", "-j", "link", "show", "dev", link.device(side)],  # type: ignore[arg-type]
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


@pytest.fixture(scope="module")
def cross_dc(tmp_path_factory):
    from prfaas.model.presets import resolve_model

    model = str(resolve_model("builtin:qwen3_next-tiny"))
    logs = tmp_path_factory.mktemp("cross_dc_logs")
    with EmulatedLink(RATE_MBIT, delay_ms=DELAY_MS, name_prefix="prfaas-xdc") as link:
        p, loc = link.address("prfaas"), link.address("local")
        procs = []
        try:
            decode_via_link = link.start_delay_proxy("local", 50061, loc, 50051)
            cp = start(link, "local", "cachepool", "services.cachepool", ["--listen", f"{loc}:50050"], logs)
            procs.append(cp)
            cachepool = wait_listening(cp, "cachepool")
            common = ["--cachepool", cachepool, "--model", model, "--kv-connections", "4", "--kv-blocks", "512"]
            nodes = [
                ("local", "local-d0", "services.decode", "local", f"{loc}:50051", decode_via_link),
                ("local", "local-p0", "services.prefill", "local", f"{loc}:50053", f"{loc}:50053"),
                ("prfaas", "prfaas-p0", "services.prefill", "prfaas", f"{p}:50051", f"{p}:50051"),
            ]
            for side, name, module, cluster, listen, advertise in nodes:
                args = [*common, "--node-id", name, "--cluster", cluster, "--listen", listen, "--advertise", advertise]
                procs.append(start(link, side, name, module, args, logs))
            for proc, (_, name, *_) in zip(procs[1:], nodes, strict=True):
                wait_listening(proc, name)
            router_args = [
                "--listen",
                f"{loc}:50052",
                "--cachepool",
                cachepool,
                "--model",
                model,
                "--policy",
                "prfaas",
                "--threshold-tokens",
                "64",
                "--link-gbps",
                str(RATE_MBIT / 1e3),
            ]
            router = start(link, "local", "router", "services.router", router_args, logs)
            procs.append(router)
            yield link, wait_listening(router, "router"), cachepool, model, logs
        finally:
            link.down()  # stops every process above, then deletes both namespaces
            for proc in procs:
                proc.log.close()


def test_prfaas_route_over_the_shaped_link_matches_in_process(cross_dc):
    from prfaas.engine.llm import LLM, build_executor
    from prfaas.messages import SamplingParams
    from prfaas.v1 import common_pb2

    link, router, cachepool, model, logs = cross_dc
    prompt = [(i * 37 + 11) % 700 + 260 for i in range(PROMPT_TOKENS)]
    sent_before = tx_bytes(link, "prfaas")
    client = link.run_in(
        "local",
        [
            sys.executable,
            __file__,
            "--router",
            router,
            "--cachepool",
            cachepool,
            "--nodes",
            "3",
            "--max-tokens",
            str(MAX_TOKENS),
            "--prompt",
            json.dumps(prompt),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    out, _ = client.communicate(timeout=180)
    assert client.returncode == 0, f"the client failed; service logs in {logs}"
    got = json.loads(out.splitlines()[-1])

    executor, _ = build_executor(model)
    expected = LLM(executor).generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))[0]
    assert got["route"] == common_pb2.PRFAAS, got
    assert got["prefill_node"] == "prfaas-p0", got
    assert got["decode_node"] == "local-d0", got
    assert got["tokens"] == expected
    # the prompt's KV (2 full layers x K,V x 2 heads x 64 x fp32 per token) crossed the veth
    kv_bytes = PROMPT_TOKENS * 2 * 2 * 2 * 64 * 4
    assert tx_bytes(link, "prfaas") - sent_before > kv_bytes


# --- the client, run inside the local namespace ---------------------------------------------------
async def _generate(args: argparse.Namespace) -> dict[str, object]:
    from prfaas.cluster.client import CachePoolClient
    from prfaas.rpc import channel as rpc_channel
    from prfaas.v1 import common_pb2, router_pb2, router_pb2_grpc

    async with CachePoolClient(args.cachepool) as pool:
        deadline = time.monotonic() + 60
        while len(await pool.list_nodes()) < args.nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {args.nodes} nodes registered with the cache pool")
            await asyncio.sleep(0.1)
    prompt = json.loads(args.prompt)
    request = router_pb2.GenerateRequest(token_ids=prompt, max_tokens=args.max_tokens, route=common_pb2.PRFAAS)
    tokens: list[int] = []
    head = None
    async with rpc_channel(args.router, expect="router") as ch:  # certificates name services, not link addresses
        async for msg in router_pb2_grpc.RouterStub(ch).Generate(request, timeout=120):
            head = head or msg
            tokens += list(msg.token_ids)
    assert head is not None
    return {"tokens": tokens, "route": head.route, "prefill_node": head.prefill_node, "decode_node": head.decode_node}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--router", required=True)
    ap.add_argument("--cachepool", required=True)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--prompt", required=True)
    print(json.dumps(asyncio.run(_generate(ap.parse_args()))), flush=True)
