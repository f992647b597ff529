"""The router's own cost: TTFT of a short LOCAL request on an idle cluster against the same prefill
in one process, measured alternately in one run, with where the difference goes.

    .venv/bin/python bench/overhead.py [--reps 30] [--lengths 16,200] [--model builtin:qwen3_next-tiny]

The in-process figure is the executor's add + prefill to the first token (what a single-process
engine pays). The service figure is a client's Router.Generate call (one channel, kept open, as
clients do) to its first message. The breakdown comes from the router's `first_token` log line of
each request (times from its arrival): when it was placed, reserved on the decode node, started
on the prefill node, done there, and when the first token came back. Results: docs/serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from prfaas.cluster.local import ClusterSpec, LocalCluster  # noqa: E402
from prfaas.engine.llm import build_executor  # noqa: E402
from prfaas.messages import SamplingParams  # noqa: E402
from prfaas.rpc import channel as rpc_channel  # noqa: E402
from prfaas.v1 import common_pb2, router_pb2, router_pb2_grpc  # noqa: E402

MARKS = ("queue_ms", "reserved_ms", "prefill_started_ms", "sampled_ms", "prefill_done_ms", "first_ms", "ttft_ms")


def in_process_ms(ex, prompt: list[int]) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    seq = ex.add("bench", prompt, SamplingParams(max_tokens=1))
    ex.prefill(seq)
    dt = (time.perf_counter() - t0) * 1000
    ex.free(seq)
    return dt


async def service_ms(stub: router_pb2_grpc.RouterStub, prompt: list[int], rid: str, max_tokens: int) -> float:
    t0 = time.perf_counter()
    call = stub.Generate(router_pb2.GenerateRequest(request_id=rid, token_ids=prompt, max_tokens=max_tokens,
                                                    ignore_eos=True, route=common_pb2.LOCAL))
    dt = None
    async for _ in call:  # read to the end, as a client does: a cancelled transfer's connections are
        dt = dt or (time.perf_counter() - t0) * 1000  # closed, and the next one would pay new handshakes
    assert dt is not None, "the stream ended without a token"
    return dt


def breakdown(log: Path, prefix: str) -> dict[str, float]:
    rows = []
    for line in log.read_text().splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if msg.get("event") == "first_token" and str(msg.get("request_id", "")).startswith(prefix):
            rows.append(msg)
    return {m: statistics.median(r[m] for r in rows if m in r) for m in MARKS if any(m in r for r in rows)}


async def measure(c: LocalCluster, ex, lengths: list[int], reps: int,  # type: ignore[no-untyped-def]
                  max_tokens: int) -> list[dict[str, float]]:
    out = []
    async with rpc_channel(c.router_address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        for n in lengths:
            def prompt(i: int, n: int = n) -> list[int]:  # a new one each time: no prefix cache hit on either path
                return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(n * 10_000 + i)).tolist()

            for i in range(3):  # warm both paths (connections, kernels)
                await service_ms(stub, prompt(reps + i), f"warm-{n}", max_tokens)
                in_process_ms(ex, prompt(reps + i))
            svc, local = [], []
            for i in range(reps):  # alternated, so that load drifts hit both the same
                svc.append(await service_ms(stub, prompt(i), f"b{n}-{i}", max_tokens))
                local.append(in_process_ms(ex, prompt(i)))
                print(f"  {n} tokens: {i + 1}/{reps}", end="\r", flush=True)
            print()
            out.append({"tokens": n, "service_ms": statistics.median(svc), "in_process_ms": statistics.median(local)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--lengths", default="16,200")
    ap.add_argument("--model", default="builtin:qwen3_next-tiny")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the in-process engine")
    ap.add_argument("--node-threads", type=int, default=0,
                    help="OMP_NUM_THREADS of the cluster's processes (0: LocalCluster's default, the cores "
                         "split among the nodes)")
    ap.add_argument("--max-tokens", type=int, default=4,
                    help="tokens each request asks for (1: the first token ends it, and comes from the decode node)")
    ap.add_argument("--keep-logs", default="", help="write the cluster's logs here (default: a temporary directory)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lengths = [int(x) for x in a.lengths.split(",")]
    ex, _ = build_executor(a.model)
    with tempfile.TemporaryDirectory() as logs_tmp:
        logs = a.keep_logs or logs_tmp
        threads = {"OMP_NUM_THREADS": str(a.node_threads)} if a.node_threads else {}
        spec = ClusterSpec(prfaas_prefill=1, local_prefill=1, local_decode=1, extra_env=threads,
                           router_env={"PRFAAS_CONTROL_INTERVAL_S": "0"})
        print("[overhead] starting the cluster ...", flush=True)
        with LocalCluster(a.model, spec, log_dir=logs) as c:
            from prfaas.security import tls

            tls.install(c.tls_as("admin"))  # mutual TLS, as every cluster runs by default
            rows = asyncio.run(measure(c, ex, lengths, a.reps, a.max_tokens))
            time.sleep(0.5)
            parts = {n: breakdown(Path(logs) / "router.log", f"b{n}-") for n in lengths}
    print("\n| prompt | through the services (ms) | in one process (ms) | ratio | difference (ms) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} tokens, LOCAL | {r['service_ms']:.1f} | {r['in_process_ms']:.1f} | "
              f"{r['service_ms'] / r['in_process_ms']:.2f}x | {r['service_ms'] - r['in_process_ms']:.1f} |")
    print("\nwhere a request's time goes, at the router (median ms from its arrival):")
    print("| prompt | " + " | ".join(MARKS) + " |")
    print("|---|" + "---|" * len(MARKS))
    for n, b in parts.items():
        print(f"| {n} | " + " | ".join(f"{b.get(m, float('nan')):.1f}" for m in MARKS) + " |")


if __name__ == "__main__":
    main()
