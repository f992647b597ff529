"""The front door's status mapping, over real gRPC and real HTTP: a stand-in `Router` servicer
that refuses every call with a chosen status (and, for RESOURCE_EXHAUSTED, the `retry-after-ms`
trailer that the router's admission queue sends, issue 9) behind the real client, core and app.

The refusals a live router gives today (INVALID_ARGUMENT) are in test_openai_api.py; overload
and outage statuses need a router that answers them on demand, which this stand-in does."""

from __future__ import annotations

import grpc
import pytest

from prfaas.rpc import new_server
from prfaas.rpc.serve import add_port
from prfaas.v1 import router_pb2_grpc
from services.frontdoor.client import GrpcRouter
from services.frontdoor.core import BearerToken, FrontDoor
from services.frontdoor.server import make_app
from tests.frontdoor.model_files import write_tokenizer
from tests.support import tls_as

aiohttp = pytest.importorskip("aiohttp")
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402


class Refusing(router_pb2_grpc.RouterServicer):
    def __init__(self) -> None:
        self.code = grpc.StatusCode.UNAVAILABLE
        self.trailer: tuple[tuple[str, str], ...] = ()

    async def Generate(self, request, context):  # noqa: N802
        if self.trailer:
            context.set_trailing_metadata(self.trailer)
        await context.abort(self.code, f"refused with {self.code.name}")
        yield  # pragma: no cover


@pytest.fixture
async def door(tmp_path, monkeypatch):
    from prfaas.engine.tokenizer import load_tokenizer
    from prfaas.obs import metrics

    monkeypatch.setattr(metrics, "_current", metrics.Metrics(["frontdoor"]))  # this test's own counts
    servicer = Refusing()
    server = new_server()
    router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
    port = add_port(server, "127.0.0.1:0", tls_as("router"))  # the front door expects the router's certificate
    await server.start()
    router = GrpcRouter(f"127.0.0.1:{port}")
    tok = load_tokenizer(write_tokenizer(tmp_path), 300)
    app = make_app(FrontDoor(router, tok, "m", auth=BearerToken("k")), router.healthy)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client, servicer
    finally:
        await client.close()
        await router.close()
        await server.stop(0)


BODY = {"model": "m", "prompt": "hello", "max_tokens": 4}
AUTH = {"Authorization": "Bearer k"}


@pytest.mark.parametrize(
    ("code", "trailer", "status", "retry_after"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after-ms", "1500"),), 429, "2"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, (), 429, "1"),
        (grpc.StatusCode.UNAVAILABLE, (), 503, None),
        (grpc.StatusCode.INVALID_ARGUMENT, (), 400, None),
        (grpc.StatusCode.UNAUTHENTICATED, (), 401, None),
        (grpc.StatusCode.DEADLINE_EXCEEDED, (), 504, None),
        (grpc.StatusCode.INTERNAL, (), 500, None),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_router_status_becomes_http_status(door, code, trailer, status, retry_after, stream):
    client, servicer = door
    servicer.code, servicer.trailer = code, trailer
    resp = await client.post("/v1/completions", json={**BODY, "stream": stream}, headers=AUTH)
    assert resp.status == status
    assert resp.headers.get("Retry-After") == retry_after
    err = (await resp.json())["error"]
    assert code.name in err["message"] and err["type"] and "param" in err


async def test_missing_or_wrong_key_is_401_and_health_follows_the_router(door):
    client, _ = door
    resp = await client.post("/v1/completions", json=BODY)
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_api_key"
    resp = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert resp.status == 401
    assert (await client.get("/v1/models", headers=AUTH)).status == 200
    assert (await client.get("/health")).status == 503  # the stand-in serves no health service
    resp = await client.post("/v1/completions", data=b"{not json", headers=AUTH)
    assert resp.status == 400 and "JSON" in (await resp.json())["error"]["message"]
    assert (await client.get("/v1/nothing", headers=AUTH)).status == 404
    text = await (await client.get("/metrics")).text()
    assert 'prfaas_http_requests_total{endpoint="/v1/completions",status="401"} 1.0' in text
