"""Hostile-input limits of the raw-TCP data plane (issue 10 part 4), against a real `KvTcpServer`
on loopback: frame lengths are checked before anything is allocated, connections are capped,
stalled frames and idle connections time out, large frames are verified off the event loop, and
the sender's idle pool drops dead connections. Real transfers after each attack still complete."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
import torch

from prfaas.kv.kinds import KvKind
from prfaas.transport.chunks import KvPiece
from prfaas.transport.limits import HEADER_READ_BYTES, KvLimits
from prfaas.transport.pool import IdlePool, loop_pool, readable
from prfaas.transport.receiver import KvReceiver, MemorySink
from prfaas.transport.sender import KvSender
from prfaas.transport.tcp import KvTcpServer
from prfaas.transport.wire import encode_chunk
from tests.transport.conftest import make_layout, make_pieces
from tests.transport.test_kv_stream import assert_same

pytestmark = pytest.mark.usefixtures("plaintext_plane")  # frames in the clear (tests/transport/conftest.py)

LEN = struct.Struct("<I")


FAST = KvLimits(read_timeout_s=0.5, idle_timeout_s=0.5, pooled_idle_timeout_s=5.0, max_connections=64,
                max_connections_per_peer=8, max_frame_bytes=1 << 20, max_inflight_bytes=4 << 20,
                parallel_verify_bytes=4096)


async def serve(limits: KvLimits = FAST) -> tuple[KvReceiver, KvTcpServer, int]:
    receiver = KvReceiver()
    server = KvTcpServer(receiver, limits)
    return receiver, server, await server.start("127.0.0.1", 0)


async def connect(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def verdict(reader: asyncio.StreamReader, timeout: float = 5.0) -> tuple[str, str]:
    """The receiver's verdict frame: ("K", "") or (code name, message); ("EOF", "") on a bare close."""
    from prfaas.errors import Code

    try:
        head = await asyncio.wait_for(reader.readexactly(4), timeout)
        body = await asyncio.wait_for(reader.readexactly(LEN.unpack(head)[0]), timeout)
    except asyncio.IncompleteReadError:
        return "EOF", ""
    if body[:1] == b"K":
        return "K", ""
    return next(c.value for c in Code if c.number == body[1]), body[2:].decode()


async def real_transfer(receiver: KvReceiver, port: int, tid: str, family: str = "qwen3_next") -> None:
    layout = make_layout(family)
    pieces = make_pieces(layout, 100, seed=3)
    sink = MemorySink()
    transfer = receiver.expect(tid, layout, 100, 0, sink, deadline_s=10)
    sender = KvSender(f"tcp://127.0.0.1:{port}", tid, layout, prompt_tokens=100, num_connections=2,
                      max_chunk_bytes=4096, stats=None)
    for p in pieces:
        await sender.push(p)
    await sender.finish(first_token=7)
    assert await transfer.wait() == 7
    assert_same(layout, sink, pieces)


def header_of(tid: str, layout, tokens: tuple[int, int] = (0, 64)) -> bytes:
    """The first bytes of a genuine FULL_K chunk of `tokens` (its header, then the payload)."""
    spec = next(s for s in layout.specs if s.kind == KvKind.FULL_K)
    t = torch.zeros((tokens[1] - tokens[0], *spec.shape))
    data = encode_chunk(tid, 0, 99, KvPiece(spec.layer, spec.kind, *tokens, t))
    return data[:HEADER_READ_BYTES]


async def test_declared_length_over_the_cap_is_refused_before_allocation():
    receiver, server, port = await serve()
    try:
        reader, writer = await connect(port)
        writer.write(LEN.pack(256 << 20))  # the attack: 256 MiB declared, nothing sent
        assert await verdict(reader) == ("INVALID_ARGUMENT", f"KV frame of {256 << 20} bytes (the limit is {1 << 20})")
        assert server.gate.peak_inflight == 0
        await real_transfer(receiver, port, "after")
    finally:
        await server.stop()


async def test_unknown_transfer_is_refused_on_the_header_alone():
    receiver, server, port = await serve()
    try:
        reader, writer = await connect(port)
        writer.write(LEN.pack(900_000) + header_of("nobody", make_layout("qwen3_next")))  # no payload follows
        code, msg = await verdict(reader)
        assert code == "NOT_FOUND" and "nobody" in msg
        assert server.gate.peak_inflight == 0, "nothing was allocated for the frame"
    finally:
        await server.stop()


async def test_length_beyond_what_the_chunk_needs_fails_the_transfer():
    receiver, server, port = await serve()
    layout = make_layout("qwen3_next")
    sink = MemorySink()
    transfer = receiver.expect("live", layout, 64, 0, sink, deadline_s=10)
    try:
        reader, writer = await connect(port)
        need = 64 * next(s for s in layout.specs if s.kind == KvKind.FULL_K).nbytes
        writer.write(LEN.pack(need + 100_000) + header_of("live", layout))
        code, msg = await verdict(reader)
        assert code == "INVALID_ARGUMENT" and "at most" in msg, msg
        assert server.gate.peak_inflight == 0
        with pytest.raises(Exception, match="at most"):
            await transfer.wait()
        assert sink.released
    finally:
        await server.stop()


async def test_range_outside_the_transfer_is_refused_before_allocation():
    receiver, server, port = await serve()
    layout = make_layout("qwen3_next")
    receiver.expect("live", layout, 64, 0, MemorySink(), deadline_s=10)
    try:
        reader, writer = await connect(port)
        writer.write(LEN.pack(500_000) + header_of("live", layout, tokens=(0, 1000)))
        code, msg = await verdict(reader)
        assert code == "INVALID_ARGUMENT" and "outside" in msg, msg
        assert server.gate.peak_inflight == 0
    finally:
        await server.stop()


async def test_connections_are_capped_per_peer_and_others_still_get_in():
    receiver, server, port = await serve()
    try:
        held = [await connect(port, "127.0.0.2") for _ in range(FAST.max_connections_per_peer)]
        reader, _ = await connect(port, "127.0.0.2")
        code, msg = await verdict(reader)
        assert code == "RESOURCE_EXHAUSTED" and "127.0.0.2" in msg
        assert server.gate.refused == 1
        await real_transfer(receiver, port, "other-peer")  # from 127.0.0.1: its own allowance
        for _, w in held:
            w.close()
    finally:
        await server.stop()


async def test_total_connection_cap():
    receiver, server, port = await serve(KvLimits(max_connections=3, max_connections_per_peer=3))
    try:
        held = [await connect(port, f"127.0.0.{i}") for i in (2, 3, 4)]
        reader, _ = await connect(port, "127.0.0.5")
        assert (await verdict(reader))[0] == "RESOURCE_EXHAUSTED"
        for _, w in held:
            w.close()
        await asyncio.sleep(0.1)
        assert server.gate.connections == 0
        await real_transfer(receiver, port, "after-flood")
    finally:
        await server.stop()


async def test_truncated_frame_times_out():
    receiver, server, port = await serve()
    try:
        reader, writer = await connect(port)
        writer.write(LEN.pack(100) + b"\x0a\x03abc")  # 100 bytes declared, 5 sent, then silence
        code, msg = await verdict(reader, timeout=5)
        assert code == "DEADLINE_EXCEEDED" and "did not complete" in msg
        await asyncio.sleep(0.05)
        assert server.gate.connections == 0
    finally:
        await server.stop()


async def test_slowloris_trickle_is_cut_at_the_read_timeout():
    """A byte every 0.1 s keeps a connection busy but never finishes the frame: the read timeout
    counts from the frame's first byte, not from the last one."""
    receiver, server, port = await serve()
    try:
        reader, writer = await connect(port)
        writer.write(LEN.pack(200))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        result: list[tuple[str, str]] = []

        async def trickle() -> None:
            while not result and loop.time() - t0 < 5:
                writer.write(b"\x00")
                await asyncio.sleep(0.1)

        task = asyncio.create_task(trickle())
        result.append(await verdict(reader, timeout=5))
        task.cancel()
        assert result[0][0] == "DEADLINE_EXCEEDED"
        assert loop.time() - t0 < 4, "cut at the read timeout (0.5 s here), not kept alive by the trickle"
    finally:
        await server.stop()


async def test_idle_unproven_connection_is_closed_and_empty_shares_do_not_keep_it():
    receiver, server, port = await serve()
    try:
        reader, writer = await connect(port)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for _ in range(40):  # end frames (legal, empty shares) every 0.1 s
            writer.write(LEN.pack(0))
            if (await verdict(reader))[0] != "K":
                break
            await asyncio.sleep(0.1)
        assert await reader.read() == b"", "closed by the server"
        assert loop.time() - t0 < 2.5, "closed 0.5 s after the connect, not 0.5 s after the last empty share"
    finally:
        await server.stop()


async def test_budget_makes_frames_wait_instead_of_failing(family):
    """In-flight bytes over the budget: frames wait their turn (their connections paused), the
    transfer completes, and the budget was never exceeded."""
    layout = make_layout(family)
    big = max(s.nbytes for s in layout.specs) + 2048
    limits = KvLimits(max_frame_bytes=big, max_inflight_bytes=big, parallel_verify_bytes=1024)
    receiver, server, port = await serve(limits)
    try:
        pieces = make_pieces(layout, 256, seed=1)
        sink = MemorySink()
        transfer = receiver.expect("b", layout, 256, 0, sink, deadline_s=20)
        sender = KvSender(f"tcp://127.0.0.1:{port}", "b", layout, prompt_tokens=256, num_connections=4,
                          max_chunk_bytes=4096, stats=None)
        for p in pieces:
            await sender.push(p)
        await sender.finish(first_token=1)
        assert await transfer.wait() == 1
        assert_same(layout, sink, pieces)
        assert 0 < server.gate.peak_inflight <= limits.max_inflight_bytes
        assert server.gate.waits > 0, "frames did wait for the budget"
        assert server.gate.inflight == 0
    finally:
        await server.stop()


async def test_corrupt_large_frame_verified_in_a_thread_is_data_loss():
    receiver, server, port = await serve()
    layout = make_layout("qwen3_next")
    spec = next(s for s in layout.specs if s.kind == KvKind.FULL_K)
    sink = MemorySink()
    transfer = receiver.expect("c", layout, 64, 0, sink, deadline_s=10)
    data = bytearray(encode_chunk("c", 0, 99, KvPiece(spec.layer, spec.kind, 0, 64, torch.randn(64, *spec.shape))))
    assert len(data) >= FAST.parallel_verify_bytes
    data[-1] ^= 0xFF
    try:
        reader, writer = await connect(port)
        writer.write(LEN.pack(len(data)) + bytes(data))
        code, msg = await verdict(reader)
        assert code == "DATA_LOSS" and "checksum" in msg
        with pytest.raises(Exception, match="checksum"):
            await transfer.wait()
        assert server.gate.inflight == 0
    finally:
        await server.stop()


async def test_pooled_connections_to_a_dead_address_are_pruned():
    receiver, server, port = await serve()
    await real_transfer(receiver, port, "warm")
    pool = loop_pool()
    key = ("127.0.0.1", port)
    pooled = [s for s, _ in pool._idle.get(key, [])]
    assert pooled, "the transfer's connections went back to the pool"
    await server.stop()  # the decode node goes away: its side closes every connection
    for _ in range(50):
        await asyncio.sleep(0.02)
        if pool.count(key) == 0:
            break
    assert pool.count(key) == 0 and all(s.fileno() == -1 for s in pooled), "closed, not left in CLOSE-WAIT"


async def test_pool_bounds_and_retain():
    pool = IdlePool(per_address=2, idle_s=0.2)
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        for a, _ in pairs:
            a.setblocking(False)
            pool.give(("h", 1), a)
        assert pool.count(("h", 1)) == 2 and pairs[2][0].fileno() == -1
        b0 = pairs[0][1]
        b0.send(b"x")  # bytes out of turn on an idle connection: evicted
        await asyncio.sleep(0.05)
        assert pool.count(("h", 1)) == 1 and readable(pairs[0][0])
        pool.retain([("other", 2)])
        assert pool.count(("h", 1)) == 0
        c, d = socket.socketpair()
        c.setblocking(False)
        pool.give(("h", 1), c)
        await asyncio.sleep(0.4)  # idle longer than idle_s
        assert pool.count(("h", 1)) == 0 and c.fileno() == -1
        d.close()
    finally:
        for a, b in pairs:
            a.close()
            b.close()
        pool.close()


async def test_a_slow_first_chunk_proves_the_connection():
    """A genuine chunk that takes longer than the unproven idle limit to arrive (but less than the
    read timeout) is accepted, and its connection then has the pooled idle limit."""
    receiver, server, port = await serve(KvLimits(read_timeout_s=3.0, idle_timeout_s=0.5, pooled_idle_timeout_s=5.0))
    layout = make_layout("qwen3_next")
    spec = next(s for s in layout.specs if s.kind == KvKind.FULL_K)
    receiver.expect("slow", layout, 64, 0, MemorySink(), deadline_s=20)
    data = encode_chunk("slow", 0, 99, KvPiece(spec.layer, spec.kind, 0, 64, torch.randn(64, *spec.shape)))
    try:
        reader, writer = await connect(port)
        writer.write(LEN.pack(len(data)) + data[:100])
        await asyncio.sleep(0.8)  # past the unproven idle limit, inside the read timeout
        writer.write(data[100:])
        await asyncio.sleep(1.0)  # idle, but proven now: still open
        writer.write(LEN.pack(0))
        assert await verdict(reader) == ("K", "")
    finally:
        await server.stop()
