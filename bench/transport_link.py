"""KV transport over an emulated cross-datacenter link (two network namespaces, a tbf-shaped veth
pair, latency from the user-space delay proxy; tools/linkemu).

    .venv/bin/python bench/transport_link.py [--parts goodput ttft loopback]

(a) goodput: the real KvSender (in the "prfaas" namespace) -> PushKv -> KvReceiver (a server
    process in the "local" namespace) for 1, 2, 4 and 8 connections, direct and through the delay
    proxy, as a fraction of the shaped rate; beside them Mooncake's Transfer Engine over TCP moving
    the same bytes across the same link (bench/mooncake_anchor.py; skipped without the package).
(b) ttft: a remote prefill of a 32-layer hybrid model (`PrefillNode` from services/prefill/core.py
    with the prefill server's `SenderPush`), layer-wise streaming against send-after-prefill, on a
    link whose rate is `--ttft-rate-factor` x the measured KV production rate (KV bytes / prefill
    time). TTFT = from the start of prefill until the receiver holds the whole transfer (the first
    token rides on the last chunk); both ends read CLOCK_MONOTONIC, which namespaces share.
(c) loopback: raw TCP (1 connection) and KvSender (8 connections, 256 KiB chunks) alternated,
    raw, grpc, raw, grpc ..., so that load swings on a shared machine hit both alike.
(d) compress: the (b) setup on a link that is the bottleneck (`--compress-rate-factor` x the KV
    production rate, default 0.4), layer-wise streaming with the KV exact, int8 and fp8 on the
    wire (prfaas/transport/codec.py), alternated exact, int8, fp8, exact, ... in one run:
    TTFT and bytes per format (docs/compression.md).

Ratios come from one run. Needs root and `ip netns` for (a) and (b); without them those parts
print why they are skipped. Results: docs/transport.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import mooncake_anchor  # noqa: E402  (bench/mooncake_anchor.py: Mooncake's engine as the anchor)
import torch  # noqa: E402
import transport as loopback  # noqa: E402  (bench/transport.py: the loopback bench's model and helpers)

from tools.linkemu import EmulatedLink, link_supported, read_ready_line  # noqa: E402

NAME_PREFIX = "prfaas-bench"
SERVER_PORT = 50071
MODEL_DIR = Path.home() / ".cache" / "prfaas" / "models" / "qwen3_next-bench32"
# The built-in tiny preset (dense MLP) with 32 layers, every 4th full attention (8 full + 24
# linear), hidden 128: a Qwen3-Next-like layer mix, so that the last layer holds 1/8 of the KV.
BENCH_MODEL = {"num_hidden_layers": 32, "full_attention_interval": 4, "hidden_size": 128, "num_experts": 0}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_model_dir() -> Path:
    """Writes the 32-layer checkpoint once (random weights, seeded) with the presets' own code."""
    if (MODEL_DIR / "config.json").is_file():
        return MODEL_DIR

    from prfaas.model.config import ModelConfig
    from prfaas.model.hybrid import HybridForCausalLM
    from prfaas.model.presets import init_weights, preset_config, save_weights

    raw = preset_config("qwen3_next", "tiny")
    raw.pop("layer_types")
    raw.update(BENCH_MODEL)
    model = HybridForCausalLM(ModelConfig.from_dict(raw))
    init_weights(model, seed=0)
    tmp = MODEL_DIR.with_name(f".{MODEL_DIR.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_weights(model, tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    tmp.rename(MODEL_DIR)
    return MODEL_DIR


def model_layout(model_dir: Path) -> Any:
    from prfaas.kv.layout import KvLayout
    from prfaas.model.config import ModelConfig

    return KvLayout(ModelConfig.from_dir(model_dir), block_size=16, dtype=torch.float32)


def transfer_bytes(tokens: int) -> int:
    """Bytes of one goodput transfer of `tokens` (bench/transport.py's model), without building it."""
    lay = loopback.layout()
    fixed = sum(p.tensor.nbytes for p in loopback.pieces(lay, 0))
    return fixed + (sum(p.tensor.nbytes for p in loopback.pieces(lay, 1)) - fixed) * tokens


def goodput_tokens(rate_mbit: float, seconds: float) -> int:
    """Prompt length whose transfer (bench/transport.py's model) takes `seconds` at the rate."""
    lay = loopback.layout()
    fixed = sum(p.tensor.nbytes for p in loopback.pieces(lay, 0))
    per_token = sum(p.tensor.nbytes for p in loopback.pieces(lay, 1)) - fixed
    want = rate_mbit * 1e6 / 8 * seconds
    return max(1024, int((want - fixed) / per_token) // 1024 * 1024)


# --- the receiver: a PushKv server in the "local" namespace -------------------------------------
async def serve(args: argparse.Namespace) -> None:
    """Registers `--count` goodput transfers g-<i> and TTFT transfers t-<i>, then prints one JSON
    line per completed transfer: its id, CLOCK_MONOTONIC at completion, bytes."""
    from prfaas.rpc import new_server
    from prfaas.rpc.serve import add_port
    from prfaas.transport.grpc_push import PushKvServicer, add_push_kv_only
    from prfaas.transport.receiver import KvReceiver, MemorySink

    receiver = KvReceiver()
    expected: list[tuple[str, Any, int, Any]] = []
    if args.goodput_tokens:
        lay = loopback.layout()
        expected += [(f"g-{i}", lay, args.goodput_tokens, loopback.NullSink) for i in range(args.count)]
    wires: list[str] = json.loads(args.wire_plan) if args.wire_plan else []
    if args.model:
        lay = model_layout(Path(args.model))
        expected += [(f"t-{i}", lay, args.ttft_tokens, MemorySink) for i in range(args.count)]
    wire_of = {f"t-{i}": w for i, w in enumerate(wires)}

    async def report(tid: str, transfer: Any) -> None:
        try:
            token = await transfer.wait()
        except Exception as e:  # noqa: BLE001 - reported to the bench, which fails the run
            print(json.dumps({"tid": tid, "error": repr(e)}), flush=True)
            return
        print(json.dumps({"tid": tid, "t": time.monotonic(), "first_token": token}), flush=True)

    tasks = [
        asyncio.ensure_future(report(tid, receiver.expect(tid, lay, n, 0, sink(), deadline_s=3600,
                                                          wire_dtype=wire_of.get(tid, ""))))
        for tid, lay, n, sink in expected
    ]
    server = new_server()
    add_push_kv_only(server, PushKvServicer(receiver))
    add_port(server, args.serve)  # mutual TLS under PRFAAS_TLS_DIR, plaintext with PRFAAS_INSECURE=1
    await server.start()
    host, port = args.serve.rsplit(":", 1)
    from prfaas.transport.tcp import KvTcpServer

    await KvTcpServer(receiver).start(host, int(port) + 1)  # the raw-TCP data plane beside PushKv
    print(json.dumps({"port": int(port)}), flush=True)
    await server.wait_for_termination()
    del tasks


class Receiver:
    """The server process and a thread collecting its completion lines."""

    def __init__(self, link: EmulatedLink, port: int = SERVER_PORT, env: dict[str, str] | None = None,
                 **opts: Any) -> None:
        argv = [sys.executable, __file__, "--serve", f"{link.address('local')}:{port}"]
        for k, v in opts.items():
            argv += [f"--{k.replace('_', '-')}", str(v)]
        env = {**os.environ, **(env or {"PRFAAS_INSECURE": "1"})}
        self.proc = link.run_in("local", argv, stdout=subprocess.PIPE, text=True, env=env)
        read_ready_line(self.proc, 120)
        self.done: dict[str, dict[str, Any]] = {}
        self.address = f"{link.address('local')}:{port}"
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            self.done[msg["tid"]] = msg

    def finished(self, tid: str, timeout_s: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while tid not in self.done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the receiver never reported transfer {tid}")
            time.sleep(0.01)
        if "error" in self.done[tid]:
            raise RuntimeError(f"transfer {tid} failed: {self.done[tid]['error']}")
        return self.done[tid]


def run_client(link: EmulatedLink, spec: dict[str, Any], timeout_s: float) -> list[dict[str, Any]]:
    """Runs this file's client in the "prfaas" namespace; its JSON result lines."""
    proc = link.run_in(
        "prfaas", [sys.executable, __file__, "--client", json.dumps(spec)], stdout=subprocess.PIPE, text=True
    )
    out, _ = proc.communicate(timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"the client exited with {proc.returncode}")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


# --- the sender side, in the "prfaas" namespace --------------------------------------------------
async def client_goodput(spec: dict[str, Any]) -> None:
    from prfaas.security import tls
    from prfaas.transport.grpc_push import KvChannels

    lay = loopback.layout()
    ps = loopback.pieces(lay, spec["tokens"])
    nbytes = sum(p.tensor.nbytes for p in ps)
    counts: dict[bool, int] = {}
    secure = tls.resolve(tls_dir=spec["tls_dir"], name="prefill-0", kind="worker") if spec.get("tls_dir") else None
    for path, address in spec["targets"].items():
        is_tls = "TLS" in path  # each receiver counts its own transfer ids
        tls.install(secure if is_tls and secure else tls.TlsConfig(insecure=True))
        for conns in spec["connections"]:
            pool = KvChannels(conns)
            for rep in range(spec["reps"] + 1):  # the first run warms the connections (and handshakes)
                n = counts[is_tls] = counts.get(is_tls, -1) + 1
                tid = f"g-{n}"
                t0 = time.monotonic()
                await loopback.run_grpc(address, lay, ps, spec["tokens"], tid, conns, 256 << 10, pool,
                                        peer="decode-0" if is_tls else "")
                if rep:
                    print(json.dumps({"path": path, "conns": conns, "tid": tid, "t0": t0, "bytes": nbytes}), flush=True)
            await pool.close()
            say(f"    sent: {path}, {conns} conn")


class SendAfterPrefill:
    """A KvPush that holds every layer until the prefill is done, then sends it all."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.layers: list[Any] = []

    async def push_layer(self, layer_kv: Any) -> None:
        self.layers.append(layer_kv)

    async def finish(self, first_token: int) -> Any:
        for layer_kv in self.layers:
            await self.inner.push_layer(layer_kv)
        return await self.inner.finish(first_token)

    async def abort(self) -> None:
        await self.inner.abort()


async def client_ttft(spec: dict[str, Any]) -> None:
    from prfaas.engine.llm import build_executor
    from prfaas.kv.prefill_plan import PrefillPlanner
    from prfaas.messages import Done, PrefillJob, SamplingParams
    from prfaas.transport.grpc_push import KvChannels
    from prfaas.transport.sender import KvSender
    from services.prefill.core import PrefillNode

    torch.set_num_threads(1)
    ex, _ = build_executor(spec["model"])
    channels = KvChannels(spec["conns"])

    def streaming(job: PrefillJob) -> KvSender:
        return KvSender.for_job(job, ex.layout, channels)

    prompt = [random.Random(0).randrange(300, 900) for _ in range(spec["tokens"])]
    params = SamplingParams(max_tokens=1, temperature=0.0)
    modes = ["stream"] + [m for _ in range(spec["rounds"]) for m in ("after", "stream")]
    wires = spec.get("wires") or [""] * len(modes)  # per run: the wire format (part compress)
    if spec.get("wires"):
        modes = ["stream"] * len(wires)
    for i, mode in enumerate(modes):  # run 0 warms the connections and the model
        factory = streaming if mode == "stream" else (lambda job: SendAfterPrefill(streaming(job)))
        chunk = spec.get("chunk", 0) if mode == "stream" else 0
        node = PrefillNode("bench", ex, factory, planner=PrefillPlanner(ex.layout.block_size, chunk_tokens=chunk))
        job = PrefillJob(f"r{i}", f"t-{i}", prompt, params, spec["address"], spec["conns"], wires[i])
        t0 = time.monotonic()
        async for ev in node.prefill(job):
            if isinstance(ev, Done):
                done = ev
        if i:
            print(
                json.dumps(
                    {"mode": mode, "tid": f"t-{i}", "t0": t0, "prefill_s": done.prefill_s, "kv_bytes": done.kv_bytes,
                     "wire": wires[i]}
                ),
                flush=True,
            )
            say(f"    {mode}: prefill {done.prefill_s:.3f} s")
    await channels.close()


# --- the parts -----------------------------------------------------------------------------------
def part_goodput(args: argparse.Namespace) -> list[str]:
    rows = [
        "| shaped rate | one-way delay | connections | goodput (Mbit/s) | fraction of rate (median; min-max) |",
        "|---|---|---|---|---|",
    ]
    for rate in args.rates:
        tokens = goodput_tokens(rate, args.transfer_s)
        say(f"[goodput] link {rate:.0f} Mbit/s; transfers of {tokens} tokens")
        with EmulatedLink(rate, delay_ms=args.delay_ms, name_prefix=NAME_PREFIX) as link:
            count = 4 * len(args.connections) * (args.reps + 1)
            recv = Receiver(link, goodput_tokens=tokens, count=count)
            proxy = link.start_delay_proxy("prfaas", 0, link.address("local"), SERVER_PORT)
            delayed = f"{args.delay_ms:g} ms"
            targets = {"0 ms": recv.address, delayed: proxy}
            receivers = {"0 ms": recv, delayed: recv}
            spec: dict[str, Any] = {"part": "goodput", "tokens": tokens, "targets": targets,
                                    "connections": args.connections, "reps": args.reps}
            if args.tls:  # the same decode side under mutual TLS 1.3, beside it, in the same run
                tls_env, _, _ = loopback.tls_pair()
                recv_tls = Receiver(link, port=SERVER_PORT + 2, env=tls_env, goodput_tokens=tokens, count=count)
                proxy_tls = link.start_delay_proxy("prfaas", 0, link.address("local"), SERVER_PORT + 2)
                targets.update({"0 ms, TLS": recv_tls.address, f"{delayed}, TLS": proxy_tls})
                receivers.update({"0 ms, TLS": recv_tls, f"{delayed}, TLS": recv_tls})
                spec["tls_dir"] = tls_env["PRFAAS_TLS_DIR"]
            results = run_client(link, spec, timeout_s=900)
            by_cfg: dict[tuple[str, int | str], list[float]] = {}
            for r in results:
                secs = receivers[r["path"]].finished(r["tid"])["t"] - r["t0"]
                by_cfg.setdefault((r["path"], r["conns"]), []).append(r["bytes"] * 8 / 1e6 / secs)
            if args.mooncake:  # the anchor: the same bytes across the same link
                for path, delayed in (("0 ms", False), (f"{args.delay_ms:g} ms", True)):
                    rates = mooncake_anchor.link_gbps(link, transfer_bytes(tokens), delayed=delayed, reps=args.reps)
                    for mode, runs in (rates or {}).items():
                        by_cfg[(path, f"Mooncake TE, {mode}")] = [r * 8 / 1e6 for r in runs]
        for (path, conns), mbits in by_cfg.items():
            fr = [m / rate for m in mbits]
            rows.append(
                f"| {rate:.0f} Mbit/s | {path} | {conns} | {statistics.median(mbits):.1f} | "
                f"{statistics.median(fr):.3f} ({min(fr):.3f}-{max(fr):.3f}) |"
            )
            say(rows[-1])
    return rows


def measure_prefill(model_dir: Path, tokens: int, reps: int) -> tuple[float, int]:
    """Standalone prefill (no sending), one torch thread as in the bench's client: (median s, KV bytes)."""
    from prfaas.engine.llm import build_executor
    from prfaas.messages import SamplingParams

    torch.set_num_threads(1)
    ex, _ = build_executor(model_dir)
    prompt = [random.Random(0).randrange(300, 900) for _ in range(tokens)]
    times, kv = [], 0
    for i in range(reps + 1):
        seq = ex.add(f"m{i}", prompt, SamplingParams(max_tokens=1, temperature=0.0))
        t0, kv = time.perf_counter(), 0
        for item in ex.prefill_layerwise(seq):
            if not isinstance(item, int):
                kv += sum(t.nbytes for t in item.tensors.values())
        times.append(time.perf_counter() - t0)
        ex.free(seq)
    return statistics.median(times[1:]), kv


def measure_rtt(link: EmulatedLink) -> float:
    """Median round trip (ms) of a small message through a delay proxy, as the KV stream sees it."""
    echo = link.run_tool("local", ["echo", "--listen", "0.0.0.0:0"], stdout=subprocess.PIPE, text=True)
    port = read_ready_line(echo, 10)["port"]
    proxy = link.start_delay_proxy("prfaas", 0, link.address("local"), port)
    ping = link.run_tool("prfaas", ["ping", "--connect", proxy, "--count", "20"], stdout=subprocess.PIPE, text=True)
    return float(json.loads(ping.communicate(timeout=30)[0])["median_ms"])


def part_ttft(args: argparse.Namespace) -> list[str]:
    model_dir = bench_model_dir()
    say(
        f"[ttft] model {model_dir} ({model_layout(model_dir).config.num_layers} layers); "
        f"measuring prefill of {args.ttft_tokens} tokens"
    )
    prefill_s, kv = measure_prefill(model_dir, args.ttft_tokens, 2)
    production = kv * 8 / 1e6 / prefill_s
    rate = args.ttft_rate_factor * production
    say(
        f"[ttft] standalone prefill {prefill_s:.3f} s, KV {kv / 2**20:.1f} MiB: {production:.0f} Mbit/s; "
        f"link {rate:.0f} Mbit/s, {args.delay_ms:g} ms one way"
    )
    with EmulatedLink(rate, delay_ms=args.delay_ms, name_prefix=NAME_PREFIX) as link:
        rtt_ms = measure_rtt(link)
        recv = Receiver(link, model=model_dir, ttft_tokens=args.ttft_tokens, count=2 * args.rounds + 2)
        tcp = args.kv_transport == "tcp"
        proxy = link.start_delay_proxy("prfaas", 0, link.address("local"), SERVER_PORT + (1 if tcp else 0))
        spec = {
            "part": "ttft",
            "model": str(model_dir),
            "tokens": args.ttft_tokens,
            "address": f"tcp://{proxy}" if tcp else proxy,
            "conns": args.ttft_connections,
            "rounds": args.rounds,
            "chunk": args.prefill_chunk,
        }
        results = run_client(link, spec, timeout_s=600)
        for r in results:
            r["ttft_s"] = recv.finished(r["tid"])["t"] - r["t0"]
    # the reference prefill time: the send-after runs' own compute phase (nothing sent meanwhile)
    ref = statistics.median(r["prefill_s"] for r in results if r["mode"] == "after")
    denom = ref + rtt_ms / 1e3
    rows = [
        f"Link {rate:.0f} Mbit/s ({args.ttft_rate_factor:g} x the KV production rate {production:.0f} Mbit/s: "
        f"{kv / 2**20:.1f} MiB in a {prefill_s:.2f} s standalone prefill), RTT {rtt_ms:.1f} ms, "
        f"{args.ttft_connections} connections over {args.kv_transport}, stream mode prefill chunk "
        f"{args.prefill_chunk or 'none'}; prefill time P = {ref:.3f} s "
        "(median compute phase of the "
        "send-after runs).",
        "",
        "| mode | run | its prefill compute C (s) | TTFT (s) | TTFT / (P + RTT) | TTFT / (C + RTT) |",
        "|---|---|---|---|---|---|",
    ]
    for mode in ("stream", "after"):
        runs = [r for r in results if r["mode"] == mode]
        for i, r in enumerate(runs):
            own = r["ttft_s"] / (r["prefill_s"] + rtt_ms / 1e3)
            rows.append(
                f"| {mode} | {i + 1} | {r['prefill_s']:.3f} | {r['ttft_s']:.3f} | {r['ttft_s'] / denom:.3f} "
                f"| {own:.3f} |"
            )
        med = statistics.median(r["ttft_s"] for r in runs)
        rows.append(f"| **{mode}, median** | | | {med:.3f} | **{med / denom:.3f}** | |")
    for row in rows[4:]:
        say(row)
    return rows


def part_compress(args: argparse.Namespace) -> list[str]:
    """TTFT per wire format on a link that is the bottleneck, formats alternated in one run."""
    model_dir = bench_model_dir()
    prefill_s, kv = measure_prefill(model_dir, args.ttft_tokens, 2)
    production = kv * 8 / 1e6 / prefill_s
    rate = args.compress_rate_factor * production
    formats = ["", "int8", "fp8"]
    plan = [""] + [w for _ in range(args.rounds) for w in formats]  # run 0 warms up
    say(f"[compress] prefill {prefill_s:.3f} s, KV {kv / 2**20:.1f} MiB ({production:.0f} Mbit/s); link {rate:.0f} "
        f"Mbit/s, {args.delay_ms:g} ms one way; runs {plan}")
    with EmulatedLink(rate, delay_ms=args.delay_ms, name_prefix=NAME_PREFIX) as link:
        recv = Receiver(link, model=model_dir, ttft_tokens=args.ttft_tokens, count=len(plan),
                        wire_plan=json.dumps(plan))
        tcp = args.kv_transport == "tcp"
        proxy = link.start_delay_proxy("prfaas", 0, link.address("local"), SERVER_PORT + (1 if tcp else 0))
        spec = {"part": "ttft", "model": str(model_dir), "tokens": args.ttft_tokens,
                "address": f"tcp://{proxy}" if tcp else proxy, "conns": args.ttft_connections,
                "rounds": args.rounds, "chunk": args.prefill_chunk, "wires": plan}
        results = run_client(link, spec, timeout_s=900)
        for r in results:
            r["ttft_s"] = recv.finished(r["tid"])["t"] - r["t0"]
    lay = model_layout(model_dir)
    from prfaas.transport.formats import transfer_bytes

    exact_ttft = statistics.median(r["ttft_s"] for r in results if r["wire"] == "")
    rows = [f"Link {rate:.0f} Mbit/s ({args.compress_rate_factor:g} x the KV production rate {production:.0f} "
            f"Mbit/s), {args.delay_ms:g} ms one way, {args.ttft_tokens}-token prompts, {args.ttft_connections} "
            f"connections over {args.kv_transport}; {args.rounds} runs per format, alternated.", "",
            "| wire format | bytes of the transfer | vs exact | TTFT median (s) | runs (s) | TTFT vs exact |",
            "|---|---:|---:|---:|---|---:|"]
    for w in formats:
        runs = [r["ttft_s"] for r in results if r["wire"] == w]
        b = transfer_bytes(lay, args.ttft_tokens, w)
        med = statistics.median(runs)
        rows.append(f"| {w or 'exact'} | {b / 2**20:.2f} MiB | {transfer_bytes(lay, args.ttft_tokens) / b:.2f}x "
                    f"| {med:.3f} | {', '.join(f'{x:.2f}' for x in runs)} | {med / exact_ttft:.2f} |")
    for row in rows[4:]:
        say(row)
    return rows


async def part_loopback(args: argparse.Namespace) -> list[str]:
    from prfaas.transport.grpc_push import KvChannels

    lay = loopback.layout()
    ps = loopback.pieces(lay, args.loopback_tokens)
    nbytes = sum(p.tensor.nbytes for p in ps)
    blocks = [memoryview(bytes(4 << 20)) for _ in range(nbytes // (4 << 20))]
    raw_bytes = len(blocks) * (4 << 20)
    cb, conns = 256 << 10, 8
    gport, rport = loopback.free_port(), loopback.free_port()
    say(
        f"[loopback] {nbytes / 2**20:.0f} MiB per transfer; raw TCP 1 conn vs KvSender {conns} conn, "
        f"{cb >> 10} KiB chunks, alternated"
    )
    procs = [
        loopback.spawn("--serve-grpc", str(gport), "--tokens", str(args.loopback_tokens), "--chunks", str(cb)),
        loopback.spawn("--serve-raw", str(rport)),
    ]
    rows = ["| pair | raw TCP, 1 conn (GB/s) | KvSender, 8 conn (GB/s) | ratio |", "|---|---|---|---|"]
    ratios = []
    try:
        pool = KvChannels(conns)
        await loopback.run_raw(rport, blocks, 1)
        await loopback.run_grpc(f"127.0.0.1:{gport}", lay, ps, args.loopback_tokens, f"{cb}-0", conns, cb, pool)
        for i in range(args.pairs):
            raw = raw_bytes / await loopback.run_raw(rport, blocks, 1)
            grpc_ = nbytes / await loopback.run_grpc(
                f"127.0.0.1:{gport}", lay, ps, args.loopback_tokens, f"{cb}-{i + 1}", conns, cb, pool
            )
            ratios.append(grpc_ / raw)
            rows.append(f"| {i + 1} | {raw / 1e9:.2f} | {grpc_ / 1e9:.2f} | {grpc_ / raw:.2f} |")
            say(rows[-1])
        await pool.close()
    finally:
        for p in procs:
            p.kill()
            p.wait()
    rows.append(f"| **median** | | | **{statistics.median(ratios):.2f}** |")
    return rows


def main(args: argparse.Namespace) -> None:
    os.environ.setdefault("PRFAAS_INSECURE", "1")  # plaintext unless a row asks for TLS (its own PKI)
    ok, why = link_supported()
    tables: dict[str, list[str]] = {}
    for part in args.parts:
        if part in ("goodput", "ttft", "compress") and not ok:
            say(f"[{part}] skipped: no network namespaces here ({why})")
            continue
        say(f"[{part}] starting; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        if part == "goodput":
            tables[part] = part_goodput(args)
        elif part == "ttft":
            tables[part] = part_ttft(args)
        elif part == "compress":
            tables[part] = part_compress(args)
        else:
            tables[part] = asyncio.run(part_loopback(args))
    for part, rows in tables.items():
        print(f"\n## {part}\n")
        print("\n".join(rows), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument(
        "--parts", nargs="+", default=["goodput", "ttft", "loopback"],
        choices=["goodput", "ttft", "loopback", "compress"],
    )
    ap.add_argument("--compress-rate-factor", type=float, default=0.4,
                    help="compress part: link rate / KV production rate (below 1: the link is the bottleneck)")
    ap.add_argument("--rates", type=float, nargs="+", default=[1000.0, 200.0], help="Mbit/s, goodput part")
    ap.add_argument("--delay-ms", type=float, default=5.0, help="one-way delay through the proxy")
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--transfer-s", type=float, default=1.5, help="goodput transfer size, in seconds at the rate")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ttft-tokens", type=int, default=2048)
    ap.add_argument("--ttft-rate-factor", type=float, default=1.25, help="link rate / KV production rate")
    ap.add_argument("--ttft-connections", type=int, default=4)
    ap.add_argument("--kv-transport", choices=["grpc", "tcp"], default="grpc", help="TTFT part: the KV data plane")
    ap.add_argument(
        "--prefill-chunk", type=int, default=0, help="TTFT part: stream mode prefills in chunks of N tokens"
    )
    ap.add_argument("--rounds", type=int, default=3, help="TTFT: runs of each mode, alternated")
    ap.add_argument("--no-mooncake", dest="mooncake", action="store_false",
                    help="goodput part: skip Mooncake's engine beside the KvSender (skipped anyway without it)")
    ap.add_argument("--no-tls", dest="tls", action="store_false",
                    help="goodput part: skip the mutual-TLS rows beside the plaintext ones")
    ap.add_argument("--loopback-tokens", type=int, default=8192)
    ap.add_argument("--pairs", type=int, default=6)
    # internal: the two ends inside the namespaces
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--goodput-tokens", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--model", default="", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--wire-plan", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        asyncio.run(serve(a))
    elif a.client:
        s = json.loads(a.client)
        asyncio.run(client_goodput(s) if s["part"] == "goodput" else client_ttft(s))
    else:
        main(a)
