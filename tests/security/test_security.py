"""Issue 10, parts 1-3 and 5, with real processes on loopback: a cluster under mutual TLS (the
default) refuses clients without credentials, nodes with a certificate from another CA or naming
another node id, KV for a real transfer from any process but the prefill node the router named
(the request still completes with the same tokens), a prefill node's push to an address that is no
member; client tokens rotate without a restart; a per-client limit holds; --insecure is refused on
a non-loopback address, and an --insecure cluster still serves."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from prfaas.cluster import NodeInfo, NodeLoad, Role
from prfaas.cluster.client import CachePoolClient
from prfaas.cluster.local import ClusterSpec, LocalCluster
from prfaas.kv.prefix_index import CacheEvent, CacheEventKind
from prfaas.rpc import channel
from prfaas.rpc.convert import sampling_to_pb
from prfaas.security import pki, tls
from prfaas.v1 import (
    common_pb2,
    common_pb2_grpc,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)

ROOT = Path(__file__).resolve().parents[2]
TOKEN_A, TOKEN_B = "alice-token-0123456789", "alice-token-rotated-9876543210"
PROMPT = [(i * 7) % 200 + 3 for i in range(40)]
MAX_TOKENS = 8

pytestmark = pytest.mark.skipif(os.environ.get("PRFAAS_INSECURE") == "1", reason="the suite runs --insecure")


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("security")
    (d / "tokens").write_text(f"alice:{TOKEN_A}\n")
    (d / "keys").write_text(f"bob:{TOKEN_A}\n")
    spec = ClusterSpec(prfaas_prefill=1, local_prefill=0, local_decode=1, convertible_local=False, metrics=False,
                       extra_env={"PRFAAS_KV_BLOCKS": "256", "PRFAAS_STATE_SLOTS": "16",
                                  "PRFAAS_API_KEYS_FILE": str(d / "keys"),
                                  "PRFAAS_TRANSFER_TIMEOUT_S": "120"},  # the injectors start slowly on a busy machine
                       router_env={"PRFAAS_TOKEN_LISTEN": "127.0.0.1:0", "PRFAAS_CLIENT_TOKENS": str(d / "tokens"),
                                   "PRFAAS_MAX_CLIENT_REQUESTS": "1", "PRFAAS_CONTROL_INTERVAL_S": "0"})
    with LocalCluster("builtin:qwen3_next-tiny", spec, log_dir=str(d / "logs")) as c:
        yield c, d


def other_ca(tmp: Path, name: str) -> tls.TlsConfig:
    """A certificate naming `name` from a CA that is not the cluster's."""
    return tls.resolve(tls_dir=str(pki.ensure_dev_pki(tmp / "other-ca", "dev")), name=name, kind="worker")


async def generate(make: Callable[[], grpc.aio.Channel], metadata: tuple[tuple[str, str], ...] = (),
                   max_tokens: int = MAX_TOKENS) -> tuple[str, list[int]]:
    """Router.Generate on the channel `make()` opens (inside the loop, as grpc.aio needs)."""
    ch = make()
    req = router_pb2.GenerateRequest(token_ids=PROMPT, max_tokens=max_tokens, route=common_pb2.PRFAAS)
    tokens: list[int] = []
    try:
        async for msg in router_pb2_grpc.RouterStub(ch).Generate(req, metadata=metadata, timeout=60):
            tokens += msg.token_ids
    except grpc.aio.AioRpcError as e:
        return e.code().name, tokens
    finally:
        await ch.close()
    return "OK", tokens


def token_channel(address: str, ca: Path) -> grpc.aio.Channel:
    """Server-authenticated TLS only (no client certificate): the router's token port."""
    creds = grpc.ssl_channel_credentials(ca.read_bytes())
    return grpc.aio.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", "router")])


def test_clients_need_a_certificate_or_a_token_which_rotates(secured, tmp_path):  # type: ignore[no-untyped-def]
    c, d = secured
    router, ca = c.router_address, c.tls_dir / "ca.crt"
    token_port = c.proc("router").listening["token_address"]

    def call(make: Callable[[], grpc.aio.Channel], token: str | None = None) -> tuple[str, list[int]]:
        return asyncio.run(generate(make, (("authorization", f"Bearer {token}"),) if token else ()))

    ok, reference = call(lambda: channel(router, "router", tls=c.tls_as("client")))
    assert ok == "OK" and len(reference) == MAX_TOKENS
    # no TLS, TLS without a client certificate, a certificate from another CA: the handshake fails
    assert call(lambda: channel(router, tls=tls.TlsConfig(insecure=True)))[0] == "UNAVAILABLE"
    assert call(lambda: token_channel(router, ca))[0] == "UNAVAILABLE"
    assert call(lambda: channel(router, "router", tls=other_ca(tmp_path, "client")))[0] == "UNAVAILABLE"
    # the token port: a bearer token from the file, nothing else
    assert call(lambda: token_channel(token_port, ca))[0] == "UNAUTHENTICATED"
    assert call(lambda: token_channel(token_port, ca), "not-a-valid-token-at-all")[0] == "UNAUTHENTICATED"
    assert call(lambda: token_channel(token_port, ca), TOKEN_A) == ("OK", reference)
    # rotation without a restart: the new token in, the old one out
    (d / "tokens").write_text(f"alice:{TOKEN_B}\n")
    time.sleep(0.05)
    assert call(lambda: token_channel(token_port, ca), TOKEN_A)[0] == "UNAUTHENTICATED"
    assert call(lambda: token_channel(token_port, ca), TOKEN_B) == ("OK", reference)


def test_a_client_holds_at_most_its_limit(secured):  # type: ignore[no-untyped-def]
    """PRFAAS_MAX_CLIENT_REQUESTS=1: while the client's first stream is open (it has had a token
    and is held there, unread) a second is refused; once the first has ended the next one runs."""
    c, _ = secured

    def open_channel() -> grpc.aio.Channel:
        return channel(c.router_address, "router", tls=c.tls_as("client"))

    async def run() -> tuple[str, str, str]:
        ch = open_channel()
        req = router_pb2.GenerateRequest(token_ids=PROMPT, max_tokens=1900, ignore_eos=True, route=common_pb2.PRFAAS)
        call = router_pb2_grpc.RouterStub(ch).Generate(req, timeout=60)
        try:
            await call.read()  # the first is in flight for certain
            second = (await generate(open_channel))[0]
            call.cancel()
        finally:
            await ch.close()
        for _ in range(100):  # the router frees the client's slot when it sees the cancel
            third = (await generate(open_channel))[0]
            if third != "RESOURCE_EXHAUSTED":
                break
            await asyncio.sleep(0.1)
        return "OK", second, third

    first, second, third = asyncio.run(run())
    assert (first, second, third) == ("OK", "RESOURCE_EXHAUSTED", "OK")


def _http(url: str, key: str | None) -> int:
    body = json.dumps({"model": "qwen3_next-tiny", "prompt": "hello", "max_tokens": 2}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=60) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_front_door_keys_from_a_file_rotate(secured):  # type: ignore[no-untyped-def]
    c, d = secured
    url = f"{c.frontdoor_url}/completions"
    assert _http(url, None) == 401
    assert _http(url, "wrong-key-wrong-key-wrong") == 401
    assert _http(url, TOKEN_A) == 200
    (d / "keys").write_text(f"bob:{TOKEN_B}\n")
    time.sleep(0.05)
    assert _http(url, TOKEN_A) == 401
    assert _http(url, TOKEN_B) == 200


async def _code(call) -> str:  # type: ignore[no-untyped-def]
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
        return "OK"
    except grpc.aio.AioRpcError as e:
        return e.code().name


def test_nodes_act_only_under_their_own_identity(secured, tmp_path):  # type: ignore[no-untyped-def]
    c, _ = secured
    real = NodeInfo("prfaas-p0", "prfaas", Role.PREFILL, "127.0.0.1:9")

    async def as_(cfg: tls.TlsConfig) -> list[str]:
        out = []
        async with CachePoolClient(c.cachepool_address, tls=cfg) as pool:
            for attempt in (pool.register(real), pool.heartbeat("prfaas-p0", NodeLoad()),
                            pool.publish([CacheEvent("prfaas-p0", CacheEventKind.BLOCK_STORED, (1,))])):
                try:
                    await attempt
                    out.append("OK")
                except Exception as e:  # noqa: BLE001 - the pool's domain errors name the code
                    out.append(str(e))
        return out

    mallory = asyncio.run(as_(c.tls_as("mallory", "worker")))  # the cluster's CA, another node id
    assert all(r.startswith("PERMISSION_DENIED") and "mallory" in r for r in mallory), mallory
    assert all("UNAVAILABLE" in r for r in asyncio.run(as_(other_ca(tmp_path, "prfaas-p0")))), "another CA"
    router_cfg = c.tls_as("router")
    assert asyncio.run(as_(router_cfg))[0].startswith("PERMISSION_DENIED")  # the router is not a worker

    async def control(cfg: tls.TlsConfig) -> str:
        async with channel(c.address_of("local-d0"), "local-d0", tls=cfg) as ch:
            return await _code(common_pb2_grpc.NodeControlStub(ch).SetRole(
                common_pb2.SetRoleRequest(role=common_pb2.PREFILL), timeout=10))

    assert asyncio.run(control(c.tls_as("admin"))) == "PERMISSION_DENIED"
    assert asyncio.run(control(c.tls_as("prfaas-p0", "worker"))) == "PERMISSION_DENIED"


def _admit(c: LocalCluster, prefill_node: str):  # type: ignore[no-untyped-def]
    """Decode.Admit as the router: the call and its reservation."""
    ch = channel(c.address_of("local-d0"), "local-d0", tls=c.tls_as("router"))
    from prfaas.messages import SamplingParams

    call = decode_pb2_grpc.DecodeStub(ch).Admit(decode_pb2.AdmitRequest(
        request_id="sec-1", sampling=sampling_to_pb(SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)),
        token_ids=PROMPT, transfer_timeout_s=120, prefill_node=prefill_node))
    return ch, call


def _prefill(c: LocalCluster, transfer_id: str, address: str, node: str, **fields: int):  # type: ignore[no-untyped-def]
    from prfaas.messages import SamplingParams

    ch = channel(c.address_of("prfaas-p0"), "prfaas-p0", tls=c.tls_as("router"))
    call = prefill_pb2_grpc.PrefillStub(ch).Prefill(prefill_pb2.PrefillRequest(
        request_id="sec-1", transfer_id=transfer_id, token_ids=PROMPT, decode_node=node, decode_address=address,
        sampling=sampling_to_pb(SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)), **fields))
    return ch, call


def test_a_forced_first_token_over_grpc(secured):  # type: ignore[no-untyped-def]
    """`forced_first_token` (a retry after the client has its first token) on the real services: a
    value outside the vocabulary is refused before any work; a good one is what the prefill node
    reports in `sampled` (before `done`) and what the decode node streams first."""
    c, _ = secured
    _, reference = asyncio.run(generate(lambda: channel(c.router_address, "router", tls=c.tls_as("client"))))
    forced = (reference[0] + 1) % 1000  # the tiny preset's vocabulary: 1,000 ids

    async def run(value: int) -> tuple[str, str, list[str], list[int]]:
        ch, admit = _admit(c, "prfaas-p0")
        events = aiter(admit)
        reserved = (await anext(events)).reserved
        pch, prefill = _prefill(c, reserved.transfer_id, reserved.kv_address, "local-d0", forced_first_token=value)
        seen: list[str] = []
        code, details = "OK", ""
        try:
            async for ev in prefill:
                which = ev.WhichOneof("event")
                seen.append(f"{which}:{ev.sampled.token_id}" if which == "sampled" else
                            f"done:{ev.done.first_token}" if which == "done" else which)
        except grpc.aio.AioRpcError as e:
            code, details = e.code().name, e.details() or ""
        tokens: list[int] = []
        if code == "OK":
            async for ev in events:
                if ev.WhichOneof("event") == "tokens":
                    tokens += ev.tokens.token_ids
                    if ev.tokens.finish_reason:
                        break
        admit.cancel()
        await ch.close()
        await pch.close()
        return code, details, seen, tokens

    for hostile in (-1, 1000, 2**31 - 1):
        code, details, seen, _ = asyncio.run(run(hostile))
        assert code == "INVALID_ARGUMENT" and f"forced_first_token {hostile}" in details, (hostile, details)
        assert not any(s.startswith(("sampled", "done")) for s in seen)
    code, _, seen, tokens = asyncio.run(run(forced))
    assert code == "OK" and [s for s in seen if s.startswith(("sampled", "done"))] == [
        f"sampled:{forced}", f"done:{forced}"]
    assert tokens[0] == forced and len(tokens) == MAX_TOKENS


def test_kv_only_from_the_named_prefill_node(secured, tmp_path):  # type: ignore[no-untyped-def]
    c, _ = secured
    other = pki.ensure_dev_pki(tmp_path / "other-ca")
    _, reference = asyncio.run(generate(lambda: channel(c.router_address, "router", tls=c.tls_as("client"))))

    async def run() -> tuple[dict[str, str], list[int], str]:
        ch, admit = _admit(c, "prfaas-p0")
        events = aiter(admit)
        reserved = (await anext(events)).reserved
        async def inject(**env: str) -> dict[str, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(ROOT / "tests" / "security" / "inject_kv.py"), reserved.transfer_id,
                reserved.kv_address, c.address_of("local-d0"), "local-d0", stdout=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(ROOT), "PRFAAS_TLS_KIND": "worker", **env})
            return dict(json.loads((await proc.communicate())[0]))

        # the cluster's CA but another node; another CA's certificate naming the very node the router chose
        verdicts, foreign = await asyncio.gather(inject(PRFAAS_TLS_NAME="local-p9"),
                                                 inject(PRFAAS_TLS_NAME="prfaas-p0", PRFAAS_TLS_DIR=str(other)))
        verdicts["other CA"] = json.dumps(foreign)
        pch, prefill = _prefill(c, reserved.transfer_id, reserved.kv_address, "local-d0")
        status = await _code(prefill)
        tokens: list[int] = []
        async for ev in events:
            if ev.WhichOneof("event") == "tokens":
                tokens += ev.tokens.token_ids
                if ev.tokens.finish_reason:
                    break
        admit.cancel()
        await ch.close()
        await pch.close()
        return verdicts, tokens, status

    verdicts, tokens, status = asyncio.run(run())
    assert verdicts["tcp"].startswith("PERMISSION_DENIED") and "prfaas-p0" in verdicts["tcp"], verdicts
    assert verdicts["grpc"].startswith("PERMISSION_DENIED") and "prfaas-p0" in verdicts["grpc"], verdicts
    # refused at the handshake (each side distrusts the other's CA): never as far as the transfer
    assert '"OK"' not in verdicts["other CA"] and "takes KV from" not in verdicts["other CA"], verdicts
    assert "certificate" in verdicts["other CA"] or "andshake" in verdicts["other CA"], verdicts
    assert status == "OK" and tokens == reference


def test_prefill_pushes_only_to_members(secured):  # type: ignore[no-untyped-def]
    c, _ = secured
    decode = c.address_of("local-d0")
    host, port = decode.rsplit(":", 1)

    async def push_to(address: str, node: str) -> tuple[str, str]:
        ch, call = _prefill(c, "local-d0/none/0", address, node)
        try:
            async for _ in call:
                pass
            return "OK", ""
        except grpc.aio.AioRpcError as e:
            return e.code().name, e.details() or ""
        finally:
            await ch.close()

    code, details = asyncio.run(push_to("127.0.0.1:9", "ghost"))
    assert code == "PERMISSION_DENIED" and "not a registered member" in details
    code, details = asyncio.run(push_to(f"{host}:{int(port) + 1}", "local-d0"))
    assert code == "PERMISSION_DENIED" and "registered at" in details
    code, details = asyncio.run(push_to(c.cachepool_address, "prfaas-p0"))
    assert code == "PERMISSION_DENIED" and "prefill node" in details


def test_a_moved_prefix_only_from_its_holder_and_only_to_members(secured):  # type: ignore[no-untyped-def]
    """Prefix moves (ImportPrefix / ExportPrefix) under the same rules as a request's KV: the
    importer names the holder and takes KV from no other node (a worker certificate of the cluster
    naming another node is refused, naming the holder), nor without one named; ExportPrefix is the
    router's alone, and pushes only to a registered member; the refused import frees what it held."""
    c, _ = secured
    node = c.address_of("prfaas-p0")
    hit = 32  # two blocks of PROMPT's 40 tokens

    async def stats() -> common_pb2.NodeStats:
        async with channel(node, "prfaas-p0", tls=c.tls_as("admin")) as ch:
            return await common_pb2_grpc.NodeControlStub(ch).Stats(common_pb2.NodeStatsRequest(), timeout=10)

    def export(holder: str, dest_node: str, dest_address: str) -> prefill_pb2.ExportPrefixRequest:
        return prefill_pb2.ExportPrefixRequest(request_id=f"mv-{holder}", token_ids=PROMPT, hit_tokens=hit,
                                               transfer_id="prfaas-p0/move/x", dest_address=dest_address,
                                               deadline_unix_s=time.time() + 30, dest_node=dest_node)

    async def run() -> dict[str, object]:
        out: dict[str, object] = {"before": await stats()}
        async with channel(node, "prfaas-p0", tls=c.tls_as("router")) as ch:
            stub = prefill_pb2_grpc.PrefillStub(ch)
            out["no holder"] = await _code(stub.ImportPrefix(prefill_pb2.ImportPrefixRequest(
                request_id="mv-0", token_ids=PROMPT, hit_tokens=hit, transfer_timeout_s=30)))
            call = stub.ImportPrefix(prefill_pb2.ImportPrefixRequest(
                request_id="mv-1", token_ids=PROMPT, hit_tokens=hit, transfer_timeout_s=60, holder_node="local-p7"))
            reserved = (await call.read()).reserved
            out["during"] = await stats()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(ROOT / "tests" / "security" / "inject_kv.py"), reserved.transfer_id,
                reserved.kv_address, node, "prfaas-p0", stdout=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(ROOT), "PRFAAS_TLS_KIND": "worker", "PRFAAS_TLS_NAME": "local-p9"})
            out["inject"] = json.loads((await proc.communicate())[0])
            try:  # the refused chunk did not end the import: it still waits for its holder
                await asyncio.wait_for(call.read(), 0.5)
                out["import"] = "ended"
            except TimeoutError:
                out["import"] = "waiting"
            call.cancel()
            out["to a ghost"] = await _call(stub.ExportPrefix(export("r", "ghost", "tcp://127.0.0.1:9"), timeout=10))
        async with channel(node, "prfaas-p0", tls=c.tls_as("local-p7", "worker")) as ch:
            out["as a worker"] = await _call(prefill_pb2_grpc.PrefillStub(ch).ExportPrefix(
                export("w", "prfaas-p0", reserved.kv_address), timeout=10))
        for _ in range(100):  # the node frees the reservation when it sees the cancel
            out["after"] = await stats()
            if out["after"].free_blocks == out["before"].free_blocks:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.1)
        return out

    out = asyncio.run(run())
    assert out["no holder"] == "INVALID_ARGUMENT"
    tcp = out["inject"]["tcp"]  # type: ignore[index]
    assert tcp.startswith("PERMISSION_DENIED") and "local-p7" in tcp, out["inject"]
    assert out["import"] == "waiting"
    assert out["during"].free_blocks == out["before"].free_blocks - hit // 16  # type: ignore[attr-defined]
    code, details = out["to a ghost"]  # type: ignore[misc]
    assert code == "PERMISSION_DENIED" and "not a registered member" in details
    assert out["as a worker"][0] == "PERMISSION_DENIED"  # type: ignore[index]
    after, before = out["after"], out["before"]
    assert (after.free_blocks, after.free_slots) == (before.free_blocks, before.free_slots)  # type: ignore[attr-defined]


async def _call(call) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    try:
        await call
        return "OK", ""
    except grpc.aio.AioRpcError as e:
        return e.code().name, e.details() or ""


def test_insecure_is_refused_on_a_non_loopback_address():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for listen in ("0.0.0.0:0", "[::]:0", "192.0.2.1:0"):
        r = subprocess.run([sys.executable, "-m", "services.cachepool", "--insecure", "--listen", listen],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "--allow-insecure-remote" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "services.cachepool", "--listen", "127.0.0.1:0"], cwd=ROOT,
                       env={k: v for k, v in env.items() if not k.startswith("PRFAAS_")}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "TLS is on by default" in r.stderr, r.stderr


def test_an_insecure_cluster_serves(secured, tmp_path):  # type: ignore[no-untyped-def]
    c, _ = secured
    _, reference = asyncio.run(generate(lambda: channel(c.router_address, "router", tls=c.tls_as("client"))))
    spec = ClusterSpec(prfaas_prefill=1, local_prefill=0, local_decode=1, convertible_local=False, metrics=False,
                       frontdoor=False, tls=False, extra_env={"PRFAAS_KV_BLOCKS": "256", "PRFAAS_STATE_SLOTS": "16"})
    with LocalCluster("builtin:qwen3_next-tiny", spec, log_dir=str(tmp_path / "logs")) as plain:
        got = asyncio.run(generate(lambda: channel(plain.router_address, tls=tls.TlsConfig(insecure=True))))
        assert got == ("OK", reference)
        # with TLS it cannot talk to a plaintext server
        assert asyncio.run(generate(lambda: channel(plain.router_address, tls=c.tls_as("client"))))[0] == "UNAVAILABLE"
