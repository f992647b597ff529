"""The cache pool as a real process on loopback, driven over real gRPC."""

import asyncio
import json
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from prfaas.cluster import (
    CacheEvent,
    CacheEventKind,
    InvalidArgumentError,
    NodeInfo,
    NodeLoad,
    Role,
    UnknownNodeError,
)
from prfaas.cluster.client import CachePoolClient
from prfaas.cluster.membership import MembershipAgent
from prfaas.kv.prefix import block_hashes
from prfaas.rpc import channel as rpc_channel
from prfaas.security.tls import TlsConfig
from prfaas.v1 import cachepool_pb2 as pb
from prfaas.v1 import cachepool_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
BS = 16
# The pool's own behaviour, one client playing many nodes: --insecure (which keeps that mode
# covered); tests/test_security.py checks identities against a pool under mutual TLS.
INSECURE = TlsConfig(insecure=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_pool(*args: str, log: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cachepool", "--block-size", str(BS), "--insecure", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            msg = json.loads(line)
            if msg.get("event") == "listening":
                return proc, msg["address"]
    proc.kill()
    raise RuntimeError(f"cache pool did not start: {log.read_text()}")


def stop_pool(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    metrics_port = free_port()
    log = tmp_path_factory.mktemp("cachepool") / "stderr.log"
    proc, address = start_pool("--listen", "127.0.0.1:0", "--metrics-port", str(metrics_port), log=log)
    yield address, metrics_port
    assert stop_pool(proc) == 0


def info(node_id: str, cluster: str = "prfaas", role: Role = Role.PREFILL) -> NodeInfo:
    return NodeInfo(node_id, cluster, role, "127.0.0.1:9", capacity_blocks=128, capacity_slots=8)


async def test_health_reports_serving(pool: tuple[str, int]) -> None:
    async with rpc_channel(pool[0], tls=INSECURE) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "prfaas.v1.CachePool"):
            r = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(pool: tuple[str, int]) -> None:
    with grpc.insecure_channel(pool[0]) as ch:
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {"prfaas.v1.CachePool", "grpc.health.v1.Health"} <= services


async def test_register_heartbeat_list_publish_match(pool: tuple[str, int]) -> None:
    prompt = list(range(1000, 1000 + 4 * BS + 5))
    h = block_hashes(prompt, BS)
    async with CachePoolClient(pool[0], tls=INSECURE) as client:
        r = await client.register(info("flow-p"))
        assert r.heartbeat_timeout_s == 10.0
        await client.register(info("flow-d", "local", Role.DECODE))
        load = NodeLoad(free_blocks=7, queue_depth=2, egress_bytes_per_s=1e6)
        assert await client.heartbeat("flow-p", load)
        assert not await client.heartbeat("flow-nobody", NodeLoad())

        statuses = {s.node.node_id: s for s in await client.list_nodes()}
        assert statuses["flow-p"].node == info("flow-p")
        assert statuses["flow-p"].load == load
        assert [s.node.node_id for s in await client.list_nodes(role=Role.DECODE)] == ["flow-d"]
        assert "flow-p" not in {s.node.node_id for s in await client.list_nodes(cluster="local")}

        n = await client.publish([
            CacheEvent("flow-p", CacheEventKind.BLOCK_STORED, tuple(h)),
            CacheEvent("flow-p", CacheEventKind.STATE_STORED, (h[1], h[3])),
            CacheEvent("flow-d", CacheEventKind.BLOCK_STORED, tuple(h[:2])),
            CacheEvent("flow-d", CacheEventKind.STATE_STORED, (h[0], h[2])),
        ])
        assert n == 4
        m = await client.match(prompt)
        assert m.block_size == BS
        assert [(x.node_id, x.cluster, x.hit_tokens) for x in m.hits] == [
            ("flow-p", "prfaas", 4 * BS), ("flow-d", "local", BS)]

        await client.publish([CacheEvent("flow-p", CacheEventKind.BLOCK_EVICTED, (h[2],))])
        assert (await client.match(prompt)).hit_tokens("flow-p") == 2 * BS

        assert await client.heartbeat("flow-d", NodeLoad(), Role.PREFILL)   # converted to prefill
        assert "flow-d" in {s.node.node_id for s in await client.list_nodes("local", Role.PREFILL)}

    with urllib.request.urlopen(f"http://127.0.0.1:{pool[1]}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert 'prfaas_cluster_nodes{cluster="prfaas",role="prefill"}' in text
    assert 'prfaas_cache_events_total{kind="block_stored"}' in text


async def test_bad_input_gets_status_codes_with_messages(pool: tuple[str, int]) -> None:
    async with rpc_channel(pool[0], tls=INSECURE) as ch:
        stub = pb_grpc.CachePoolStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Register(pb.RegisterRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "node" in (e.value.details() or "")

        async def events():  # type: ignore[no-untyped-def]
            yield pb.CacheEvent(node_id="bad-ghost", kind=pb.BLOCK_STORED, block_hashes=[1])

        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Publish(events(), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "bad-ghost" in (e.value.details() or "")

    async with CachePoolClient(pool[0], tls=INSECURE) as client:
        with pytest.raises(InvalidArgumentError, match="node_id"):
            await client.register(NodeInfo("", "local", Role.PREFILL, "127.0.0.1:1"))
        with pytest.raises(InvalidArgumentError, match="address"):
            await client.register(NodeInfo("bad-addr", "local", Role.PREFILL, ""))
        with pytest.raises(InvalidArgumentError):
            await client.heartbeat("", NodeLoad())
        with pytest.raises(UnknownNodeError, match="bad-ghost"):
            await client.publish([CacheEvent("bad-ghost", CacheEventKind.STATE_STORED, (1,))])


async def test_silent_node_is_dropped_and_agent_stays(tmp_path: Path) -> None:
    args = ("--listen", "127.0.0.1:0", "--heartbeat-timeout-s", "0.5")
    proc, address = start_pool(*args, log=tmp_path / "log")
    try:
        prompt = list(range(BS))
        (h,) = block_hashes(prompt, BS)
        async with CachePoolClient(address, tls=INSECURE) as client:
            agent = MembershipAgent(client, info("alive"), NodeLoad, interval_s=0.05)
            await agent.start()
            await agent.wait_registered(5)
            await client.register(info("silent"))
            await client.publish([CacheEvent("silent", CacheEventKind.BLOCK_STORED, (h,)),
                                  CacheEvent("silent", CacheEventKind.STATE_STORED, (h,))])
            assert (await client.match(prompt)).hit_tokens("silent") == BS
            await asyncio.sleep(1.0)
            assert [s.node.node_id for s in await client.list_nodes()] == ["alive"]
            assert (await client.match(prompt)).hits == []
            assert not await client.heartbeat("silent", NodeLoad())
            await agent.stop()
    finally:
        assert stop_pool(proc) == 0


async def test_agent_waits_for_a_pool_that_starts_late(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    async with CachePoolClient(address, timeout_s=1.0, tls=INSECURE) as client:
        agent = MembershipAgent(client, info("early"), NodeLoad, interval_s=0.1)
        await agent.start()
        await asyncio.sleep(0.3)
        assert not agent.registered
        proc, _ = start_pool("--listen", address, log=tmp_path / "log")
        try:
            await agent.wait_registered(10)
            assert [s.node.node_id for s in await client.list_nodes()] == ["early"]
        finally:
            await agent.stop()
            assert stop_pool(proc) == 0
