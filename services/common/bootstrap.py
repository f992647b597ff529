"""What every service's __main__ does: logging, the gRPC server with health and reflection,
the `listening` line, membership in the cache pool, metrics, and a graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
import torch

from prfaas.engine.backends import make_backend
from prfaas.engine.executor import Executor
from prfaas.kv.layout import KvLayout
from prfaas.model.loader import load_model
from prfaas.model.ops import cpu_kernel
from prfaas.model.presets import resolve_model
from prfaas.obs.log import get_logger
from prfaas.rpc import add_health_and_reflection, new_server
from prfaas.settings import NodeSettings

log = get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_node_executor(s: NodeSettings) -> Executor:
    dtype = DTYPES[s.dtype]
    model = load_model(resolve_model(s.model), dtype=dtype, device=s.device)
    layout = KvLayout(model.config, block_size=s.block_size, dtype=dtype)
    attn = make_backend(s.attention_backend if s.device != "cpu" else "torch")
    # on the CPU the linear layers run our C kernel: built (once per machine) and loaded here, at
    # start, rather than inside the first request
    linear = "c_kernel" if s.device == "cpu" and cpu_kernel.available() else "torch_chunked"
    log.info("executor", device=s.device, dtype=s.dtype, attention=attn.name, delta_rule=linear,
             kv_blocks=s.kv_blocks, state_slots=s.state_slots, **layout.summary())
    return Executor(model, layout, num_blocks=s.kv_blocks, num_slots=s.state_slots, attn=attn, device=s.device)


async def serve(
    listen: str,
    add_servicers: Callable[[grpc.aio.Server], Sequence[str]],
    on_started: Callable[[str], Awaitable[None]] | None = None,
    on_stopping: Callable[[], Awaitable[None]] | None = None,
    metrics_port: int = 0,
    server_options: Sequence[tuple[str, int]] = (),
) -> None:
    """Runs a server until SIGTERM/SIGINT. Prints {"event": "listening", "address": ...} once
    serving (with the real port when `listen` asked for port 0)."""
    server = new_server(server_options)
    names = add_servicers(server)
    add_health_and_reflection(server, names)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise RuntimeError(f"could not bind {listen}")
    await server.start()
    host = listen.rsplit(":", 1)[0]
    address = f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '') else host}:{port}"
    if metrics_port:
        from prfaas.obs.metrics import start_metrics_server

        # on the host of `listen` (127.0.0.1 stays on loopback; 0.0.0.0 or an empty host: every interface)
        start_metrics_server(metrics_port, host.strip("[]") or "0.0.0.0")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_started:
        await on_started(address)
    print(json.dumps({"event": "listening", "address": address}), flush=True)
    log.info("listening", address=address)
    await stop.wait()
    log.info("stopping")
    if on_stopping:
        await on_stopping()
    await server.stop(grace=2.0)
