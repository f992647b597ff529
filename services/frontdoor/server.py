"""The front door's HTTP app (aiohttp): OpenAI's routes over the core, errors in OpenAI's JSON
shape, Server-Sent Events for `stream: true`.

    POST /v1/completions   POST /v1/chat/completions   GET /v1/models   GET /health   GET /metrics

The app runs with handler cancellation on: a client that disconnects cancels its handler, which
closes the core's stream and with it every Generate call the request had open.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from prfaas.obs import metrics
from prfaas.obs.log import get_logger
from prfaas.security.tokens import ClientLimiter

from . import responses
from .core import ChoiceDelta, FrontDoor, Usage
from .protocol import ApiError, BadRequest, Prepared, RateLimited

log = get_logger(__name__)

Healthy = Callable[[], Awaitable[bool]]
_DOOR: web.AppKey[FrontDoor] = web.AppKey("door", FrontDoor)
_HEALTHY: web.AppKey[Healthy] = web.AppKey("healthy", object)  # type: ignore[arg-type]
_LIMIT: web.AppKey[ClientLimiter] = web.AppKey("limit", ClientLimiter)
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def error_response(e: ApiError) -> web.Response:
    headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s is not None else None
    return web.json_response(e.body(), status=e.status, headers=headers)


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> web.StreamResponse:
    endpoint = request.path if request.path in _ENDPOINTS else "other"
    try:
        client = None
        if request.path.startswith("/v1/"):
            client = request.app[_DOOR].auth.check(request.headers.get("Authorization"))
            if not request.app[_LIMIT].try_acquire(client):
                raise RateLimited(f"{client} already has {request.app[_LIMIT].max} requests in flight "
                                  "(the per-client limit)", retry_after_s=1)
        try:
            resp = await handler(request)
        finally:
            request.app[_LIMIT].release(client)
    except ApiError as e:
        if e.status >= 500:
            log.warning("request_failed", path=request.path, status=e.status, error=e.message)
        resp = error_response(e)
    except web.HTTPException as e:  # aiohttp's own 404 / 405
        resp = web.json_response({"error": {"message": e.reason, "type": "invalid_request_error", "param": None,
                                            "code": None}}, status=e.status)
    metrics.current().http_requests.labels(endpoint=endpoint, status=str(resp.status)).inc()
    return resp


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


async def completions(request: web.Request) -> web.StreamResponse:
    door = request.app[_DOOR]
    return await _serve(request, door.prepare_completion(await _body(request)))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    door = request.app[_DOOR]
    return await _serve(request, door.prepare_chat(await _body(request)))


async def _serve(request: web.Request, p: Prepared) -> web.StreamResponse:
    door = request.app[_DOOR]
    rid = door.new_id(p.kind)
    async with contextlib.aclosing(door.run(p, rid)) as events:
        # the first event before any byte goes out: a refusal is still an HTTP status
        first = await anext(events)
        if p.stream:
            return await _stream(request, door, p, rid, first, events)
        collected = responses.Collected(p.kind, rid, door.model_name, p.num_choices, p.logprobs is not None)
        item: ChoiceDelta | Usage | None = first
        while item is not None:
            if isinstance(item, Usage):
                collected.usage = item
            else:
                collected.add(item)
            item = await anext(events, None)
        return web.json_response(collected.body(door.token_text))


async def _stream(request: web.Request, door: FrontDoor, p: Prepared, rid: str, first: ChoiceDelta | Usage,
                  events: Any) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    started: set[int] = set()
    offsets = [0] * p.num_choices
    created = int(time.time())

    async def send(obj: dict[str, Any]) -> None:
        await resp.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    item: ChoiceDelta | Usage | None = first
    try:
        while item is not None:
            if isinstance(item, Usage):
                if p.include_usage:
                    await send(responses.usage_chunk(p.kind, rid, door.model_name, created, item))
            else:
                is_first = item.index not in started
                started.add(item.index)
                if item.text or item.finish_reason or item.logprobs or is_first:
                    await send(responses.chunk(p.kind, rid, door.model_name, created, item, door.token_text,
                                               offsets[item.index], is_first))
                offsets[item.index] += len(item.text)
            item = await anext(events, None)
    except ApiError as e:  # after the headers: the error travels as an event, as vLLM sends it
        await send(e.body())
    except ConnectionResetError:  # the client went away: closing `events` cancels its calls
        log.info("client_disconnected", request_id=rid)
        return resp
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def models(request: web.Request) -> web.Response:
    door = request.app[_DOOR]
    card = {"id": door.model_name, "object": "model", "created": door.created, "owned_by": "prfaas"}
    return web.json_response({"object": "list", "data": [card]})


async def health(request: web.Request) -> web.Response:
    ok = await request.app[_HEALTHY]()
    return web.json_response({"status": "ok" if ok else "router unavailable"}, status=200 if ok else 503)


async def metrics_page(request: web.Request) -> web.Response:
    body = generate_latest(metrics.current().registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(door: FrontDoor, healthy: Healthy, max_client_requests: int = 0) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=64 * 1024 * 1024)
    app[_DOOR] = door
    app[_LIMIT] = ClientLimiter(max_client_requests)
    app[_HEALTHY] = healthy
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_page)
    return app
