"""A demo client: sends a small mixed-length workload to a router and prints, per request, the
route taken, the prefill node, TTFT and decode tokens/s, and the text of a few continuations.

The prompts are pieces of the held-out standard-library files the shipped models were not trained
on (prfaas/model/trained/heldout.json), tokenized by the model's own tokenizer, so that a trained
model (the default, `builtin:qwen3_next-small`) prints Python-like text."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass

import grpc

from prfaas.rpc import channel as open_channel
from prfaas.settings import DEFAULT_MODEL, command_parser, host_port_or_empty, positive_int, tls_flags, tool_tls
from prfaas.v1 import common_pb2, router_pb2, router_pb2_grpc

ROUTE_NAMES = {common_pb2.AUTO: "auto", common_pb2.LOCAL: "local", common_pb2.PRFAAS: "prfaas"}


@dataclass
class DemoResult:
    request_id: str
    prompt_tokens: int
    route: str
    prefill_node: str
    decode_node: str
    ttft_ms: float
    output_tokens: int
    decode_tok_s: float
    finish_reason: str
    text: str = ""


async def one_request(stub: router_pb2_grpc.RouterStub, prompt: list[int], max_tokens: int, rid: str) -> DemoResult:
    t0 = time.monotonic()
    first_at = None
    out: list[int] = []
    head = None
    finish = ""
    text: list[str] = []
    async for msg in stub.Generate(
        router_pb2.GenerateRequest(
            request_id=rid,
            token_ids=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
        )
    ):
        if head is None:
            head, first_at = msg, time.monotonic()
        out += list(msg.token_ids)
        text.append(msg.text)
        finish = msg.finish_reason or finish
    end = time.monotonic()
    assert head is not None and first_at is not None
    decode_s = end - first_at
    return DemoResult(
        rid,
        len(prompt),
        ROUTE_NAMES[head.route],
        head.prefill_node,
        head.decode_node,
        (first_at - t0) * 1000,
        len(out),
        (len(out) - 1) / decode_s if decode_s > 0 and len(out) > 1 else 0.0,
        finish,
        "".join(text),
    )


LENGTHS = [32, 96, 200, 600, 1200, 2000]


def workload(n: int, seed: int, model: str = "") -> list[list[int]]:
    """n prompts of LENGTHS tokens in turn: windows of the held-out text through the model's
    tokenizer, each starting at a line start; random ids below 256 when no model is given."""
    rng = random.Random(seed)
    if not model:
        return [[rng.randrange(256) for _ in range(LENGTHS[i % len(LENGTHS)])] for i in range(n)]
    from prfaas.engine.tokenizer import load_tokenizer
    from prfaas.model.config import ModelConfig
    from prfaas.model.presets import resolve_model
    from prfaas.model.trained import HELDOUT

    model_dir = resolve_model(model)
    tok = load_tokenizer(model_dir, ModelConfig.from_dir(model_dir).vocab_size)
    files = json.loads(HELDOUT.read_text())["files"]
    out = []
    for i in range(n):
        want = LENGTHS[i % len(LENGTHS)]
        ids: list[int] = []
        while len(ids) < want:
            lines = files[rng.randrange(len(files))]["text"].splitlines(keepends=True)
            ids += tok.encode("".join(lines[rng.randrange(max(1, len(lines) // 2)):]))
        out.append(ids[:want])
    return out


async def run_demo(
    address: str, requests: int = 12, concurrency: int = 4, max_tokens: int = 24, seed: int = 0, model: str = ""
) -> list[DemoResult]:
    prompts = workload(requests, seed, model)
    channel = open_channel(address, expect="router")
    stub = router_pb2_grpc.RouterStub(channel)
    sem = asyncio.Semaphore(concurrency)

    async def run(i: int, p: list[int]) -> DemoResult:
        async with sem:
            r = await one_request(stub, p, max_tokens, f"demo-{i}")
            print(
                f"  [{i + 1}/{requests}] {r.prompt_tokens:>5} tokens -> {r.route:<6} "
                f"ttft {r.ttft_ms:7.1f} ms, {r.output_tokens} tokens",
                flush=True,
            )
            return r

    try:
        results = await asyncio.gather(*(run(i, p) for i, p in enumerate(prompts)))
    finally:
        await channel.close()
    return list(results)


def print_table(results: list[DemoResult]) -> None:
    print(
        f"{'request':<9} {'prompt':>6} {'route':<6} {'prefill node':<14} {'decode node':<12} "
        f"{'TTFT ms':>8} {'tokens':>6} {'tok/s':>7}"
    )
    for r in results:
        print(
            f"{r.request_id:<9} {r.prompt_tokens:>6} {r.route:<6} {r.prefill_node:<14} {r.decode_node:<12} "
            f"{r.ttft_ms:>8.1f} {r.output_tokens:>6} {r.decode_tok_s:>7.1f}"
        )
    by_route: dict[str, list[DemoResult]] = {}
    for r in results:
        by_route.setdefault(r.route, []).append(r)
    for route, rs in sorted(by_route.items()):
        mean_ttft = sum(r.ttft_ms for r in rs) / len(rs)
        print(
            f"{route}: {len(rs)} requests, mean prompt {sum(r.prompt_tokens for r in rs) / len(rs):.0f} tokens, "
            f"mean TTFT {mean_ttft:.1f} ms"
        )
    for r in [r for r in results if r.text][:3]:
        print(f"--- {r.request_id} ({r.route}) continues its prompt with:\n{r.text}")


def demo_command(argv: list[str]) -> int:
    p = command_parser("prfaas demo", "A demo workload of mixed prompt lengths against a router.")
    p.flag("--router", "ROUTER", "", host_port_or_empty, "host:port of the router (required)")
    p.flag("--requests", "DEMO_REQUESTS", 12, positive_int, "how many requests")
    p.flag("--concurrency", "DEMO_CONCURRENCY", 4, positive_int, "requests in flight at once")
    p.flag("--max-tokens", "DEMO_MAX_TOKENS", 24, positive_int, "tokens to generate per request")
    p.flag("--model", "MODEL", DEFAULT_MODEL, str, "the cluster's model (its tokenizer makes the prompts); "
           "empty = random token ids")
    p.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    tls_flags(p)
    a = p.parse_args(argv)
    if not a.router:
        p.error("--router (or PRFAAS_ROUTER) is required")
    tool_tls(a, p, "client")
    try:
        results = asyncio.run(run_demo(a.router, a.requests, a.concurrency, a.max_tokens, model=a.model))
    except grpc.aio.AioRpcError as e:
        print(f"error: {e.code().name}: {e.details()}")
        return 1
    if a.json:
        print(json.dumps([asdict(r) for r in results]))
    else:
        print_table(results)
    return 0
