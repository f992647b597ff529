"""The load driver: `python -m prfaas.eval.driver SPEC.json OUT.json`, run beside the router (inside
the local datacenter's namespace). It waits until the cache pool lists every node, prints
`{"event": "started", "wall": ...}`, sends each request at its time over `Router.Generate`
(greedy, `ignore_eos`, fixed `max_tokens`), and samples, every `sample_s`, the router's routing
threshold and queue and every node's role. Writes one record per request and the samples.

SPEC: {"router", "cachepool", "router_metrics", "nodes", "requests": [EvalRequest.to_json()],
       "sample_s", "timeout_s"}
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.request
from typing import Any

import grpc

from prfaas.cluster.client import CachePoolClient
from prfaas.rpc import channel
from prfaas.v1 import common_pb2, router_pb2, router_pb2_grpc

ROUTES = {common_pb2.AUTO: "auto", common_pb2.LOCAL: "local", common_pb2.PRFAAS: "prfaas"}


async def one(stub: router_pb2_grpc.RouterStub, req: dict[str, Any], t0: float, timeout_s: float) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, t0 + req["t"] - time.monotonic()))
    sent = time.monotonic()
    rec: dict[str, Any] = {"id": req["id"], "t": req["t"], "sent": sent - t0, "prompt_tokens": len(req["prompt"]),
                           "profile_tokens": req["profile_tokens"], "max_tokens": req["max_tokens"], "tokens": [],
                           "first": None, "done": None, "route": "", "prefill_node": "", "decode_node": "",
                           "finish": "", "code": "OK", "error": ""}
    call = stub.Generate(router_pb2.GenerateRequest(request_id=req["id"], token_ids=req["prompt"],
                                                    max_tokens=req["max_tokens"], temperature=0.0, ignore_eos=True),
                         timeout=timeout_s)
    try:
        async for msg in call:
            if rec["first"] is None:
                rec["first"] = time.monotonic() - t0
                rec["route"], rec["prefill_node"] = ROUTES.get(msg.route, "?"), msg.prefill_node
                rec["decode_node"] = msg.decode_node
            rec["tokens"] += list(msg.token_ids)
            rec["finish"] = msg.finish_reason or rec["finish"]
    except grpc.aio.AioRpcError as e:
        rec["code"], rec["error"] = e.code().name, e.details() or ""
    rec["done"] = time.monotonic() - t0
    return rec


def scrape(url: str) -> dict[str, float]:
    """The un-labelled samples of a Prometheus text page (and `_sum`/`_count` of histograms)."""
    out: dict[str, float] = {}
    with urllib.request.urlopen(url, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    continue
    return out


async def sampler(spec: dict[str, Any], pool: CachePoolClient, t0: float, samples: list[dict],
                  stop: asyncio.Event) -> None:
    while not stop.is_set():
        row: dict[str, Any] = {"t": time.monotonic() - t0, "wall": time.time()}
        try:
            m = await asyncio.to_thread(scrape, spec["router_metrics"])
            row["threshold"] = m.get("prfaas_threshold_tokens")
            row["waiting"] = m.get("prfaas_num_requests_waiting", m.get("vllm:num_requests_waiting"))
        except OSError as e:
            row["metrics_error"] = repr(e)
        try:
            row["roles"] = {n.node.node_id: n.node.role.value for n in await pool.list_nodes()}
        except Exception as e:  # the pool may be briefly busy; the sample says so
            row["roles_error"] = repr(e)
        samples.append(row)
        try:
            await asyncio.wait_for(stop.wait(), spec.get("sample_s", 1.0))
        except TimeoutError:
            pass


async def wait_nodes(pool: CachePoolClient, n: int, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if len(await pool.list_nodes()) >= n:
                return
        except Exception:  # not up yet
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"fewer than {n} nodes registered within {timeout_s:.0f} s")


async def drive(spec: dict[str, Any]) -> dict[str, Any]:
    from prfaas.security import tls

    # mutual TLS with the deployment's development PKI, as its operator (the driver's identity)
    tls.install(tls.resolve(tls_dir=spec["tls_dir"], name="admin", kind="admin") if spec.get("tls_dir")
                else tls.TlsConfig(insecure=True))
    pool = CachePoolClient(spec["cachepool"])
    try:
        await wait_nodes(pool, spec["nodes"])
        await asyncio.sleep(spec.get("settle_s", 1.0))  # a heartbeat or two: the router sees every node
        async with channel(spec["router"], expect="router") as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            t0 = time.monotonic()
            print(json.dumps({"event": "started", "wall": time.time()}), flush=True)
            samples: list[dict] = []
            stop = asyncio.Event()
            sampling = asyncio.create_task(sampler(spec, pool, t0, samples, stop))
            tasks = [asyncio.create_task(one(stub, r, t0, spec.get("timeout_s", 3600.0))) for r in spec["requests"]]
            records, n_done, last = [], 0, time.monotonic()
            for fut in asyncio.as_completed(tasks):
                records.append(await fut)
                n_done += 1
                if time.monotonic() - last > 10:
                    last = time.monotonic()
                    print(f"[driver] {n_done}/{len(tasks)} done at t={last - t0:.0f} s", file=sys.stderr, flush=True)
            stop.set()
            await sampling
            try:
                final = await asyncio.to_thread(scrape, spec["router_metrics"])
            except OSError:
                final = {}
        return {"records": sorted(records, key=lambda r: r["t"]), "samples": samples, "router_metrics": final}
    finally:
        await pool.close()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m prfaas.eval.driver SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(open(argv[0]).read())
    out = asyncio.run(drive(spec))
    with open(argv[1], "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
