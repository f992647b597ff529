"""python -m services.frontdoor: the OpenAI-compatible HTTP API in front of a router.

Prints one JSON line once serving, `{"event": "listening", "address": "HOST:PORT", "url": ...}`
(launchers parse it, as they parse the gRPC services'), and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
from pathlib import Path

from aiohttp import web

from prfaas.engine.chat_template import GenerationDefaults, load_chat_template
from prfaas.engine.tokenizer import load_tokenizer
from prfaas.model.config import ModelConfig
from prfaas.obs import metrics
from prfaas.obs.log import configure, get_logger
from prfaas.settings import FrontDoorSettings, parse_frontdoor_settings
from prfaas.startup import run_service

from .client import GrpcRouter
from .core import AllowAll, BearerToken, FrontDoor
from .protocol import Defaults
from .server import make_app

log = get_logger(__name__)


def served_name(s: FrontDoorSettings) -> str:
    if s.served_model_name:
        return s.served_model_name
    return s.model.removeprefix("builtin:") if s.model.startswith("builtin:") else Path(s.model).name


def model_dir_of(spec: str) -> Path:
    """The model directory; a `builtin:` spec is written on first use (which needs torch: the
    front door imports it only then, so that it otherwise runs without torch)."""
    if not spec.startswith("builtin:"):
        return Path(spec)
    from prfaas.model.presets import resolve_model

    return resolve_model(spec)


def build(s: FrontDoorSettings, router: GrpcRouter) -> FrontDoor:
    model_dir = model_dir_of(s.model)
    config = ModelConfig.from_dir(model_dir)
    gen = GenerationDefaults.from_dir(model_dir)
    defaults = Defaults(
        max_tokens=gen.max_new_tokens or s.default_max_tokens,
        temperature=1.0 if gen.temperature is None else gen.temperature,
        top_p=1.0 if gen.top_p is None else gen.top_p,
        top_k=gen.top_k or 0,
        eos_token_ids=gen.eos_token_ids,
        max_n=s.max_n,
    )
    tokenizer = load_tokenizer(model_dir, config.vocab_size)
    template = load_chat_template(model_dir)
    auth = BearerToken(s.api_key, s.api_keys_file) if s.api_key or s.api_keys_file else AllowAll()
    log.info("model", model_dir=str(model_dir), served_model_name=served_name(s), chat_template=template is not None,
             tokenizer=type(tokenizer).__name__, defaults=str(defaults), api_key=bool(s.api_key or s.api_keys_file))
    return FrontDoor(router, tokenizer, served_name(s), template, defaults, auth)


def https_context(s: FrontDoorSettings) -> ssl.SSLContext | None:
    """TLS 1.2 or later with the operator's certificate chain (clients verify it as any HTTPS
    server's: a public CA's, or the cluster CA handed to them); None for plain HTTP (loopback, or
    --allow-plain-http behind a proxy that terminates TLS: prfaas/settings.py checks which)."""
    if not s.https_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(s.https_cert, s.https_key)
    return ctx


async def main(s: FrontDoorSettings) -> None:
    configure("frontdoor", s.log_level)
    metrics.install("frontdoor")
    router = GrpcRouter(s.router)
    door = build(s, router)
    runner = web.AppRunner(make_app(door, router.healthy, s.max_client_requests), handler_cancellation=True,
                           access_log=None)
    await runner.setup()
    host, port = s.listen.rsplit(":", 1)
    site = web.TCPSite(runner, host.strip("[]"), int(port), ssl_context=https_context(s))
    await site.start()
    bound = runner.addresses[0]
    address = f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{bound[1]}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    scheme = "https" if s.https_cert else "http"
    print(json.dumps({"event": "listening", "address": address, "url": f"{scheme}://{address}/v1"}), flush=True)
    log.info("listening", address=address, router=s.router, https=bool(s.https_cert))
    await stop.wait()
    log.info("stopping")
    await runner.cleanup()
    await router.close()
    log.info("stopped")


if __name__ == "__main__":
    run_service("frontdoor", main, parse_frontdoor_settings())
