"""`--kv-compression auto` on an emulated cross-datacenter link (tools/linkemu): the router sends
exact KV while the link is idle, switches cross-cluster transfers to int8 once the PrfaaS
prefill node's measured egress fills the link, and back to exact when it is idle again. In exact
mode the tokens are identical to an in-process run.

    <prefix>-prfaas: prefill node prfaas-p0    <prefix>-local: cache pool, router, local-p0, local-d0
    10.20x.0.1 ======== 16 Mbit/s tbf ========= 10.20x.0.2

The router's log tells which wire format each transfer used (its "route" lines) and when the
compression turned on and off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this file also runs as the client script, inside a namespace

from tests.test_cross_dc import start, wait_listening  # noqa: E402
from tools.linkemu import EmulatedLink, link_supported  # noqa: E402

SUPPORTED, WHY_NOT = link_supported()
RATE_MBIT = 16.0
IDLE_PROMPT, BURST_PROMPT, BURST = 400, 1500, 12

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not SUPPORTED, reason=f"no network namespaces here: {WHY_NOT}"),
]


def router_events(logs: Path) -> list[dict]:
    text = (logs / "router.log").read_text()
    return [json.loads(x) for x in text.splitlines() if x.startswith("{")]


def prompt_of(n: int, salt: int) -> list[int]:
    return [(i * 37 + 11 * salt) % 700 + 260 for i in range(n)]


@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    from prfaas.model.presets import resolve_model

    model = str(resolve_model("builtin:qwen3_next-tiny"))
    logs = tmp_path_factory.mktemp("link_compression_logs")
    with EmulatedLink(RATE_MBIT, delay_ms=1.0, name_prefix="prfaas-lc") as link:
        p, loc = link.address("prfaas"), link.address("local")
        procs = []
        try:
            cp = start(link, "local", "cachepool", "services.cachepool",
                       ["--listen", f"{loc}:50050", "--heartbeat-interval-s", "0.5"], logs)
            procs.append(cp)
            cachepool = wait_listening(cp, "cachepool")
            common = ["--cachepool", cachepool, "--model", model, "--kv-connections", "4", "--kv-blocks", "4096"]
            nodes = [("local", "local-d0", "services.decode", "local", f"{loc}:50051"),
                     ("local", "local-p0", "services.prefill", "local", f"{loc}:50053"),
                     ("prfaas", "prfaas-p0", "services.prefill", "prfaas", f"{p}:50051")]
            for side, name, module, cluster, listen in nodes:
                args = [*common, "--node-id", name, "--cluster", cluster, "--listen", listen]
                procs.append(start(link, side, name, module, args, logs))
            for proc, (_, name, *_) in zip(procs[1:], nodes, strict=True):
                wait_listening(proc, name)
            router_args = ["--listen", f"{loc}:50052", "--cachepool", cachepool, "--model", model,
                           "--threshold-tokens", "64", "--link-gbps", str(RATE_MBIT / 1e3), "--refresh-s", "0.2",
                           "--kv-compression", "auto", "--kv-compression-format", "int8",
                           "--bandwidth-mode", "abundant", "--control-interval-s", "0"]
            router = start(link, "local", "router", "services.router", router_args, logs)
            procs.append(router)
            yield link, wait_listening(router, "router"), cachepool, model, logs
        finally:
            link.down()
            for proc in procs:
                proc.log.close()


def client(link: EmulatedLink, router: str, cachepool: str, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    proc = link.run_in("local", [sys.executable, __file__, "--router", router, "--cachepool", cachepool,
                                 "--max-tokens", str(max_tokens), "--prompts", json.dumps(prompts)],
                       stdout=subprocess.PIPE, text=True, cwd=ROOT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, "the client failed"
    return json.loads(out.splitlines()[-1])


def test_auto_compresses_while_the_link_is_saturated(shaped):
    from prfaas.engine.llm import LLM, build_executor
    from prfaas.messages import SamplingParams

    link, router, cachepool, model, logs = shaped
    idle = [prompt_of(IDLE_PROMPT, 1)]
    first = client(link, router, cachepool, idle, 8)[0]
    burst = client(link, router, cachepool, [prompt_of(BURST_PROMPT, 10 + i) for i in range(BURST)], 2)
    assert all(r["route"] == "prfaas" for r in [first, *burst])
    time.sleep(8.0)  # idle: longer than the policy's hold (5 s), the heartbeats report no egress
    # the burst's retransmits can reach the router only with a later heartbeat: the first look after
    # the pause may still see them and hold compression for one more hold period
    client(link, router, cachepool, idle, 8)
    time.sleep(8.0)
    again = client(link, router, cachepool, idle, 8)[0]

    wires = [e["wire"] for e in router_events(logs) if e.get("event") == "route"]
    events = [e["event"] for e in router_events(logs) if e.get("event", "").startswith("kv_compression")]
    assert wires[0] == "", "idle link: exact"
    assert "int8" in wires[1:-1], f"the saturated link never switched compression on: {wires}"
    assert events[:1] == ["kv_compression_on"] and events[-1:] == ["kv_compression_off"], events
    assert wires[-1] == "", "idle again: exact"
    executor, _ = build_executor(model)
    expected = LLM(executor).generate(idle, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert first["tokens"] == expected and again["tokens"] == expected


# --- the client, run inside the local namespace ---------------------------------------------------
async def _generate(args: argparse.Namespace) -> list[dict]:
    from prfaas.cluster.client import CachePoolClient
    from prfaas.rpc import channel
    from prfaas.v1 import common_pb2, router_pb2, router_pb2_grpc

    async with CachePoolClient(args.cachepool) as pool:
        deadline = time.monotonic() + 60
        while len(await pool.list_nodes()) < 3:
            if time.monotonic() > deadline:
                raise TimeoutError("fewer than 3 nodes registered with the cache pool")
            await asyncio.sleep(0.1)
    names = {common_pb2.PRFAAS: "prfaas", common_pb2.LOCAL: "local"}

    async def one(stub: router_pb2_grpc.RouterStub, prompt: list[int]) -> dict:
        request = router_pb2.GenerateRequest(token_ids=prompt, max_tokens=args.max_tokens, route=common_pb2.PRFAAS,
                                             ignore_eos=True)
        tokens, head = [], None
        async for msg in stub.Generate(request, timeout=240):
            head = head or msg
            tokens += list(msg.token_ids)
        assert head is not None
        return {"tokens": tokens, "route": names.get(head.route, str(head.route))}

    async with channel(args.router, expect="router") as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        return list(await asyncio.gather(*(one(stub, p) for p in json.loads(args.prompts))))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--router", required=True)
    ap.add_argument("--cachepool", required=True)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--prompts", required=True)
    print(json.dumps(asyncio.run(_generate(ap.parse_args()))), flush=True)
