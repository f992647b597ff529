"""`prfaas status`: every member of a cluster as the cache pool sees it (role, address, load from
its last heartbeat) and as it counts itself (`NodeControl.Stats`: blocks, slots, prefix cache,
transfers and requests in flight).

    prfaas status --cachepool 127.0.0.1:50050 [--json]
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from prfaas.cluster import Role
from prfaas.cluster.client import CachePoolClient
from prfaas.rpc import channel
from prfaas.settings import command_parser, host_port_or_empty, tls_flags, tool_tls
from prfaas.v1 import common_pb2, common_pb2_grpc


async def node_stats(address: str, node_id: str = "", timeout_s: float = 5.0) -> dict[str, Any]:
    """One worker node's `NodeControl.Stats`, as a dict (every field, zeros included)."""
    async with channel(address, expect=node_id) as ch:
        reply = await common_pb2_grpc.NodeControlStub(ch).Stats(common_pb2.NodeStatsRequest(), timeout=timeout_s)
    return MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


async def cluster_status(cachepool: str) -> list[dict[str, Any]]:
    async with CachePoolClient(cachepool) as pool:
        members = await pool.list_nodes()
    out = []
    for m in members:
        row: dict[str, Any] = {"node": asdict(m.node), "load": asdict(m.load),
                               "last_heartbeat_age_s": round(m.last_heartbeat_age_s, 3)}
        if m.node.role in (Role.PREFILL, Role.DECODE):
            try:
                row["stats"] = await node_stats(m.node.address, m.node.node_id)
            except grpc.aio.AioRpcError as e:
                row["stats_error"] = f"{e.code().name}: {e.details()}"
        out.append(row)
    return out


def status_command(argv: list[str]) -> int:
    p = command_parser("prfaas status", __doc__.splitlines()[0])
    p.flag("--cachepool", "CACHEPOOL", "", host_port_or_empty, "host:port of the cache pool (required)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    tls_flags(p)
    a = p.parse_args(argv)
    if not a.cachepool:
        p.error("--cachepool (or PRFAAS_CACHEPOOL) is required")
    tool_tls(a, p, "admin")
    rows = asyncio.run(cluster_status(a.cachepool))
    if a.json:
        print(json.dumps(rows, default=str))
        return 0
    print(f"{'node':<18} {'cluster':<7} {'role':<8} {'address':<22} {'free blk':>9} {'cached':>7} "
          f"{'running':>7} {'queue':>5} {'tok/s':>8}")
    for r in rows:
        n, load, st = r["node"], r["load"], r.get("stats", {})
        print(f"{n['node_id']:<18} {n['cluster']:<7} {n['role']:<8} {n['address']:<22} "
              f"{st.get('free_blocks', load['free_blocks']):>9} {st.get('cached_blocks', 0):>7} "
              f"{st.get('running', load['running']):>7} {load['queue_depth']:>5} {load['tokens_per_s']:>8.1f}")
    return 0
