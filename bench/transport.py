"""KV transport goodput on loopback: KvSender -> gRPC PushKv -> KvReceiver in another process,
against a raw asyncio TCP socket moving the same bytes (write + drain / sock_recv_into).

    .venv/bin/python bench/transport.py [--tokens 16384] [--reps 3]
    .venv/bin/python bench/transport.py --only-formats   # bytes on the wire and goodput per wire format

Prints progress and one table of ratios, all measured in this run (compare ratios, not GB/s).
The receiver verifies every chunk (CRC32, layout) and hands it to a sink that drops it, so the
figure excludes the decode pool's own copy. Beside them, Mooncake's Transfer Engine over TCP
moving the same bytes (bench/mooncake_anchor.py; skipped with the reason without the package,
`--no-mooncake` to leave it out). Results: docs/transport.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from prfaas.kv.layout import KvLayout  # noqa: E402
from prfaas.model.config import ModelConfig  # noqa: E402
from prfaas.transport.chunks import KvPiece  # noqa: E402

MODEL = {  # qwen3_next-style: 8 full GQA layers (2 kv heads x 128) + 24 linear layers
    "model_type": "qwen3_next",
    "vocab_size": 1000,
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "num_hidden_layers": 32,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "linear_num_key_heads": 8,
    "linear_num_value_heads": 16,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 4,
}
TRANSFERS_PER_SERVER = 200
WIRE_FORMATS = ("", "int8", "fp8")  # prfaas/transport/codec.py
TLS_BASE = 100  # transfer ids of the TLS rows start here (the other rows use fewer)


def layout() -> KvLayout:
    return KvLayout(ModelConfig.from_dict(dict(MODEL)), block_size=16, dtype=torch.bfloat16)


def pieces(lay: KvLayout, tokens: int) -> list[KvPiece]:
    out = []
    for s in lay.specs:
        if s.paged:
            out.append(KvPiece(s.layer, s.kind, 0, tokens, torch.randn((tokens, *s.shape)).to(s.dtype)))
        else:
            out.append(KvPiece(s.layer, s.kind, 0, 0, torch.randn(s.shape).to(s.dtype)))
    return out


# --- servers (child processes) -------------------------------------------------------------------
class NullSink:
    def write(self, piece: object) -> None: ...
    def release(self) -> None: ...


async def serve_grpc(port: int, tokens: int, chunk_bytes: list[int], tcp_port: int) -> None:
    """The decode side: gRPC PushKv on `port` and the raw-TCP data plane on `tcp_port`, both
    feeding one receiver (as on a decode node)."""
    from prfaas.rpc import new_server
    from prfaas.rpc.serve import add_port
    from prfaas.transport.grpc_push import PushKvServicer, add_push_kv_only
    from prfaas.transport.receiver import KvReceiver
    from prfaas.transport.tcp import KvTcpServer

    receiver, lay = KvReceiver(), layout()
    for mcb in chunk_bytes:
        for i in range(TRANSFERS_PER_SERVER):
            receiver.expect(f"{mcb}-{i}", lay, tokens, 0, NullSink(), deadline_s=3600)
            receiver.expect(f"tcp{mcb}-{i}", lay, tokens, 0, NullSink(), deadline_s=3600)
    for fmt in WIRE_FORMATS:
        for i in range(TRANSFERS_PER_SERVER // 10):
            receiver.expect(f"fmt{fmt}-{i}", lay, tokens, 0, NullSink(), deadline_s=3600, wire_dtype=fmt)
    server = new_server()
    add_push_kv_only(server, PushKvServicer(receiver))
    add_port(server, f"127.0.0.1:{port}")  # mutual TLS, or plaintext with PRFAAS_INSECURE=1
    await server.start()
    await KvTcpServer(receiver).start("127.0.0.1", tcp_port)
    print("ready", flush=True)
    await server.wait_for_termination()


async def serve_raw(port: int) -> None:
    loop = asyncio.get_running_loop()
    lsock = socket.create_server(("127.0.0.1", port))
    lsock.setblocking(False)
    print("ready", flush=True)

    async def drain(conn: socket.socket) -> None:
        buf = bytearray(4 << 20)
        while await loop.sock_recv_into(conn, buf):
            pass
        conn.close()

    while True:
        conn, _ = await loop.sock_accept(lsock)
        conn.setblocking(False)
        asyncio.ensure_future(drain(conn))


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- clients -------------------------------------------------------------------------------------
async def run_raw(port: int, data: list[memoryview], connections: int) -> float:
    streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(connections)]
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        _, w = streams[i]
        for block in data[i::connections]:
            w.write(block)
            await w.drain()
        w.close()
        await w.wait_closed()

    await asyncio.gather(*(one(i) for i in range(connections)))
    return time.perf_counter() - t0


async def run_grpc(
    address: str,
    lay: KvLayout,
    ps: list[KvPiece],
    tokens: int,
    tid: str,
    connections: int,
    chunk_bytes: int,
    channels: object,
    wire: str = "",
    stats: dict | None = None,
    peer: str = "",
) -> float:
    from prfaas.transport.sender import KvSender

    sender = KvSender(
        address,
        tid,
        lay,
        prompt_tokens=tokens,
        num_connections=connections,
        max_chunk_bytes=chunk_bytes,
        channels=channels,
        stats=None,
        wire_dtype=wire,
        peer=peer,
    )  # type: ignore[arg-type]
    t0 = time.perf_counter()
    for p in ps:
        await sender.push(p)
    st = await sender.finish(1)
    if stats is not None:
        stats.update(kv_bytes=st.bytes, wire_bytes=st.wire_bytes)
    return time.perf_counter() - t0


async def formats_table(tport: int, lay: KvLayout, ps: list[KvPiece], args: argparse.Namespace) -> None:
    """Per wire format over the raw-TCP plane (4 connections, 1 MiB chunks): bytes on the wire,
    seconds, and goodput counted in KV bytes delivered (what the decode node gets)."""
    rows = []
    for fmt in WIRE_FORMATS:
        st: dict = {}
        secs = []
        for i in range(args.reps + 1):  # the first warms the connections
            secs.append(await run_grpc(f"tcp://127.0.0.1:{tport}", lay, ps, args.tokens, f"fmt{fmt}-{i}", 4,
                                       1 << 20, None, fmt, st))
        best = min(secs[1:])
        rows.append((fmt or "exact", st["kv_bytes"], st["wire_bytes"], best))
        print(f"  wire {fmt or 'exact':<6} {st['wire_bytes'] / 2**20:8.1f} MiB on the wire, {best * 1e3:7.1f} ms",
              flush=True)
    exact = rows[0]
    print("\n| wire format | MiB on the wire | vs exact | transfer ms | KV goodput GB/s | vs exact |\n"
          "|---|---:|---:|---:|---:|---:|")
    for name, kv, wire, secs in rows:
        print(f"| {name} | {wire / 2**20:.1f} | {exact[2] / wire:.2f}x | {secs * 1e3:.1f} | {kv / secs / 1e9:.2f} "
              f"| {(kv / secs) / (exact[1] / exact[3]):.2f} |")


def tls_pair() -> tuple[dict[str, str], object, object]:
    """A development PKI: the TLS server's environment, and the client's TLS and plaintext configs."""
    import tempfile
    from pathlib import Path

    from prfaas.security import pki, tls

    d = pki.ensure_dev_pki(Path(tempfile.mkdtemp(prefix="bench-pki-")))
    env = {"PRFAAS_TLS_DIR": str(d), "PRFAAS_TLS_NAME": "decode-0", "PRFAAS_TLS_KIND": "worker", "PRFAAS_INSECURE": "0"}
    return env, tls.resolve(tls_dir=str(d), name="prefill-0", kind="worker"), tls.TlsConfig(insecure=True)


async def tls_rows(args: argparse.Namespace, best, run, plain_ports, tls_ports, secure, plain) -> list[tuple]:  # type: ignore[no-untyped-def]
    """TLS against plaintext, the same paths in the same run: (name, plaintext B/s, TLS B/s)."""
    from prfaas.security import tls
    from prfaas.transport.grpc_push import KvChannels

    rows = []
    paths = [(f"raw-TCP plane, {c} conn, 1024 KiB chunks", "tcp", c) for c in (1, 4)]
    paths.append(("gRPC PushKv, 4 conn, 1024 KiB chunks", "grpc", 4))
    for name, plane, conns in paths:
        rates = []
        for cfg, (gport, tport) in ((plain, plain_ports), (secure, tls_ports)):
            tls.install(cfg)
            pool = KvChannels(conns) if plane == "grpc" else None
            address = f"127.0.0.1:{gport}" if plane == "grpc" else f"tcp://127.0.0.1:{tport}"
            await run(address, conns, pool)()  # warm: connections (and TLS handshakes) before timing
            label = f"{name}, {'TLS 1.3' if cfg is secure else 'plaintext'}"
            rates.append(await best(label, run(address, conns, pool)))
            if pool is not None:
                await pool.close()
        rows.append((name, *rates))
    return rows


async def main(args: argparse.Namespace) -> None:
    from prfaas.security import tls
    from prfaas.transport.grpc_push import KvChannels

    tls_env, secure, plain = tls_pair()
    tls.install(plain)

    lay = layout()
    ps = pieces(lay, args.tokens)
    nbytes = sum(p.tensor.nbytes for p in ps)
    raw_blocks = [memoryview(bytes(4 << 20)) for _ in range(nbytes // (4 << 20))]
    print(
        f"transfer: {nbytes / 2**20:.0f} MiB ({args.tokens} tokens, {len(lay.paged_specs)} paged + "
        f"{len(lay.state_specs)} state tensors, bf16); {os.cpu_count()} CPUs",
        flush=True,
    )
    chunk_sizes = [256 << 10, 1 << 20, 4 << 20]
    gport, rport, tport = free_port(), free_port(), free_port()
    sgport, stport = free_port(), free_port()  # the same decode side under mutual TLS
    procs = [
        spawn("--serve-grpc", str(gport), "--tokens", str(args.tokens), "--tcp-port", str(tport),
              "--chunks", *map(str, chunk_sizes), env={"PRFAAS_INSECURE": "1"}),
        spawn("--serve-raw", str(rport)),
    ]
    if args.tls:
        procs.append(spawn("--serve-grpc", str(sgport), "--tokens", str(args.tokens), "--tcp-port", str(stport),
                           "--chunks", *map(str, chunk_sizes), env=tls_env))
    results: dict[str, float] = {}
    counter: dict[int, int] = {}
    if args.only_formats:
        try:
            await formats_table(tport, lay, ps, args)
        finally:
            for p in procs:
                p.kill()
        return
    try:

        async def best(name: str, fn) -> float:  # type: ignore[no-untyped-def]
            secs = min([await fn() for _ in range(args.reps)])
            results[name] = nbytes / secs
            print(f"  {name:<34} {results[name] / 1e9:6.2f} GB/s", flush=True)
            return results[name]

        def grpc_run(conns: int, cb: int, pool: KvChannels):  # type: ignore[no-untyped-def]
            async def go() -> float:
                counter[cb] = counter.get(cb, -1) + 1
                return await run_grpc(
                    f"127.0.0.1:{gport}", lay, ps, args.tokens, f"{cb}-{counter[cb]}", conns, cb, pool
                )

            return go

        for conns in (1, 4):
            await best(f"raw TCP, {conns} conn", lambda c=conns: run_raw(rport, raw_blocks, c))
        for conns in (1, 2, 4, 8):
            pool = KvChannels(conns)
            await grpc_run(conns, 1 << 20, pool)()  # warm the connections
            await best(f"KvSender, {conns} conn, 1 MiB chunks", grpc_run(conns, 1 << 20, pool))
            await pool.close()
        for cb in (256 << 10, 4 << 20):
            pool = KvChannels(4)
            await grpc_run(4, cb, pool)()
            await best(f"KvSender, 4 conn, {cb >> 10} KiB chunks", grpc_run(4, cb, pool))
            await pool.close()

        def tcp_run(conns: int, cb: int):  # type: ignore[no-untyped-def]
            async def go() -> float:
                key = -cb  # separate transfer ids from the gRPC runs
                counter[key] = counter.get(key, -1) + 1
                return await run_grpc(
                    f"tcp://127.0.0.1:{tport}", lay, ps, args.tokens, f"tcp{cb}-{counter[key]}", conns, cb, None
                )

            return go

        for conns in (1, 2, 4):
            for cb in (1 << 20, 4 << 20):
                await best(f"KvSender over raw-TCP plane, {conns} conn, {cb >> 10} KiB chunks", tcp_run(conns, cb))
        await formats_table(tport, lay, ps, args)
        tls_table = []
        if args.tls:
            tls_ids: dict[str, int] = {}

            def any_run(address: str, conns: int, pool: object):  # type: ignore[no-untyped-def]
                async def go() -> float:
                    kind = "tcp" if address.startswith("tcp://") else ""
                    key = f"{address}"
                    tls_ids[key] = tls_ids.get(key, -1) + 1
                    n = tls_ids[key]
                    tid = f"{kind}{1 << 20}-{TLS_BASE + n}"
                    return await run_grpc(address, lay, ps, args.tokens, tid, conns, 1 << 20, pool)

                return go

            tls_table = await tls_rows(args, best, any_run, (gport, tport), (sgport, stport), secure, plain)
            tls.install(plain)
        if args.mooncake:  # the anchor: Mooncake's engine moving the same bytes (None without the package)
            from mooncake_anchor import loopback_gbps

            await best("raw TCP, 1 conn, again before Mooncake", lambda: run_raw(rport, raw_blocks, 1))

            for mode, rate in (await asyncio.to_thread(loopback_gbps, nbytes, reps=args.reps) or {}).items():
                results[f"Mooncake TE over TCP, {mode}, 4096 KiB blocks"] = rate
                print(f"  {'Mooncake TE over TCP, ' + mode:<34} {rate / 1e9:6.2f} GB/s", flush=True)
    finally:
        for p in procs:
            p.kill()
    raw = results["raw TCP, 1 conn"]
    print("\n| transport | GB/s | vs raw TCP (1 conn) |\n|---|---|---|")
    for name, v in results.items():
        print(f"| {name} | {v / 1e9:.2f} | {v / raw:.2f} |")
    if tls_table:
        print("\n| path (mutual TLS 1.3 vs plaintext, same run) | plaintext GB/s | TLS GB/s | TLS / plaintext |\n"
              "|---|---|---|---|")
        for name, p, t in tls_table:
            print(f"| {name} | {p / 1e9:.2f} | {t / 1e9:.2f} | {t / p:.2f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-mooncake", dest="mooncake", action="store_false", help="skip the Mooncake anchor rows")
    ap.add_argument("--no-tls", dest="tls", action="store_false", help="skip the TLS rows")
    ap.add_argument("--serve-grpc", type=int)
    ap.add_argument("--serve-raw", type=int)
    ap.add_argument("--chunks", type=int, nargs="*", default=[])
    ap.add_argument("--tcp-port", type=int, default=0)
    ap.add_argument("--only-formats", action="store_true", help="only the per-wire-format table")
    a = ap.parse_args()
    if a.serve_grpc:
        asyncio.run(serve_grpc(a.serve_grpc, a.tokens, a.chunks, a.tcp_port))
    elif a.serve_raw:
        asyncio.run(serve_raw(a.serve_raw))
    else:
        asyncio.run(main(a))
