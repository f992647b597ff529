"""The KV stream over real gRPC on loopback: KvSender -> PushKv -> KvReceiver -> sink."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
import torch

from prfaas.kv.kinds import KvKind
from prfaas.rpc import channel as rpc_channel
from prfaas.rpc import new_server
from prfaas.rpc.serve import add_port
from prfaas.transport.chunks import WIRE_INT8, KvPiece
from prfaas.transport.errors import TransferError
from prfaas.transport.grpc_push import PUSH_KV, PushKvServicer, add_push_kv_only
from prfaas.transport.receiver import KvReceiver, MemorySink
from prfaas.transport.sender import KvSender
from prfaas.transport.stats import LinkStats
from prfaas.transport.wire import encode_chunk
from tests.transport.conftest import make_layout, make_pieces
from tests.transport.test_codec import encode_all


@pytest.fixture
async def decode_node():
    receiver = KvReceiver()
    server = new_server()
    add_push_kv_only(server, PushKvServicer(receiver))
    port = add_port(server, "127.0.0.1:0")
    await server.start()
    yield receiver, f"127.0.0.1:{port}"
    await server.stop(None)


def assert_same(layout, sink: MemorySink, pieces: list[KvPiece]) -> None:
    for p in pieces:
        got = sink.assembled(p.layer, p.kind)
        assert got.dtype == p.tensor.dtype and torch.equal(got, p.tensor), f"layer {p.layer} {p.kind.name}"


async def raw_push(address: str, chunks: list[bytes]) -> None:
    """One PushKv stream of pre-encoded chunks; raises AioRpcError on a bad status."""
    async with rpc_channel(address, own_connection=99) as ch:
        call = ch.stream_unary(PUSH_KV, request_serializer=lambda b: b, response_deserializer=lambda b: b)()
        for c in chunks:
            await call.write(c)
        await call.done_writing()
        await call


@pytest.mark.parametrize("connections", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
async def test_round_trip_bit_exact(decode_node, family, connections, dtype):
    receiver, address = decode_node
    layout = make_layout(family, dtype)
    pieces = make_pieces(layout, 300, skip_tokens=48)
    sink = MemorySink()
    transfer = receiver.expect("x1", layout, 300, 48, sink, deadline_s=10)
    stats = LinkStats()
    sender = KvSender(address, "x1", layout, prompt_tokens=300, skip_tokens=48,
                      num_connections=connections, max_chunk_bytes=8192, stats=stats)
    for p in pieces:
        await sender.push(p)
    result = await sender.finish(first_token=7)
    assert await transfer.wait() == 7
    assert_same(layout, sink, pieces)
    assert result.chunks == sender.total_chunks and result.connections == connections
    assert not sink.released and len(receiver) == 0
    assert stats.links[address].bytes_acked == result.bytes == sum(p.tensor.nbytes for p in pieces)


async def test_out_of_order_striped_chunks_reassemble(decode_node, family):
    receiver, address = decode_node
    layout = make_layout(family)
    pieces = make_pieces(layout, 200)
    chunks, _ = encode_all(layout, pieces, max_chunk_bytes=2048)
    random.Random(0).shuffle(chunks)
    sink = MemorySink()
    transfer = receiver.expect("t", layout, 200, 0, sink, deadline_s=10)
    await asyncio.gather(*(raw_push(address, chunks[i::3]) for i in range(3)))
    assert await transfer.wait() == 42
    assert_same(layout, sink, pieces)


async def test_int8_wire_within_tolerance_states_exact(decode_node, family):
    receiver, address = decode_node
    layout = make_layout(family)
    pieces = make_pieces(layout, 128)
    sink = MemorySink()
    transfer = receiver.expect("q", layout, 128, 0, sink, deadline_s=10, wire_dtype=WIRE_INT8)
    sender = KvSender(address, "q", layout, prompt_tokens=128, num_connections=2, wire_dtype=WIRE_INT8,
                      max_chunk_bytes=4096, stats=None)
    for p in pieces:
        await sender.push(p)
    await sender.finish(1)
    await transfer.wait()
    for p in pieces:
        if layout.spec(p.layer, p.kind).paged:
            got = sink.assembled(p.layer, p.kind)
            bound = p.tensor.abs().amax(dim=-1, keepdim=True) / 127 * 0.5 + 1e-6
            assert ((got - p.tensor).abs() <= bound).all(), f"layer {p.layer} {p.kind.name}"
        else:
            assert torch.equal(sink.assembled(p.layer, p.kind), p.tensor), f"layer {p.layer} {p.kind.name}"


def _corrupt(data: bytes) -> bytes:
    b = bytearray(data)
    b[-3] ^= 0x01
    return bytes(b)


async def _expect_refused(receiver, address, layout, chunks, status, code):
    sink = MemorySink()
    transfer = receiver.expect("bad", layout, 64, 0, sink, deadline_s=10)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await raw_push(address, chunks)
    assert e.value.code() == status
    with pytest.raises(TransferError) as err:
        await transfer.wait()
    assert err.value.code == code
    assert sink.released and "bad" not in receiver
    with pytest.raises(grpc.aio.AioRpcError) as later:  # failed for good: later chunks are refused
        await raw_push(address, chunks[-1:])
    assert later.value.code() == grpc.StatusCode.NOT_FOUND


async def test_bad_chunks_fail_the_transfer(decode_node):
    receiver, address = decode_node
    layout = make_layout("qwen3_next")
    pieces = make_pieces(layout, 64)
    chunks, _ = encode_all(layout, pieces, max_chunk_bytes=4096)
    chunks = [c.replace(b"\n\x01t", b"\n\x03bad", 1) for c in chunks]  # transfer id "t" -> "bad"
    wrong_shape = encode_chunk("bad", 5, len(chunks), KvPiece(1, KvKind.FULL_K, 0, 8, torch.randn(8, 2, 16)))
    await _expect_refused(receiver, address, layout, [chunks[0], _corrupt(chunks[1])],
                          grpc.StatusCode.DATA_LOSS, "DATA_LOSS")
    await _expect_refused(receiver, address, layout, [chunks[0], chunks[1], chunks[1]],
                          grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS")
    await _expect_refused(receiver, address, layout, [chunks[0], wrong_shape],
                          grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_sender_surfaces_unknown_transfer(decode_node):
    _, address = decode_node
    layout = make_layout("kimi_linear")
    sender = KvSender(address, "nobody", layout, prompt_tokens=64, num_connections=2, stats=None)
    with pytest.raises(TransferError) as e:
        for p in make_pieces(layout, 64):
            await sender.push(p)
        await sender.finish(0)
    assert e.value.code == "NOT_FOUND", e.value.message


async def test_deadline_drops_the_transfer(decode_node):
    receiver, address = decode_node
    layout = make_layout("kimi_linear")
    sink = MemorySink()
    transfer = receiver.expect("late", layout, 64, 0, sink, deadline_s=0.05)
    with pytest.raises(TransferError) as e:
        await transfer.wait()
    assert e.value.code == "DEADLINE_EXCEEDED" and sink.released and len(receiver) == 0
    chunks, _ = encode_all(layout, make_pieces(layout, 64))
    with pytest.raises(grpc.aio.AioRpcError) as later:
        await raw_push(address, [c.replace(b"\n\x01t", b"\n\x04late", 1) for c in chunks[:1]])
    assert later.value.code() == grpc.StatusCode.NOT_FOUND


async def test_sender_abort_and_receiver_cancel_release(decode_node):
    receiver, address = decode_node
    layout = make_layout("qwen3_next")
    sink = MemorySink()
    transfer = receiver.expect("ab", layout, 256, 0, sink, deadline_s=10)
    sender = KvSender(address, "ab", layout, prompt_tokens=256, num_connections=2, stats=None)
    await sender.push(make_pieces(layout, 256)[2])
    await asyncio.sleep(0.1)  # the chunk reaches the receiver
    await sender.abort()
    with pytest.raises(TransferError):
        await sender.push(make_pieces(layout, 256)[3])
    assert receiver.cancel("ab")  # the decode side learns of the failure through the router
    with pytest.raises(TransferError) as e:
        await transfer.wait()
    assert e.value.code == "CANCELLED" and sink.released
    waiter_sink = MemorySink()
    waiter = asyncio.create_task(receiver.expect("w", layout, 16, 0, waiter_sink, 10).wait())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert waiter_sink.released and len(receiver) == 0


def test_link_stats_rate():
    now = [100.0]
    stats = LinkStats(window_s=4, clock=lambda: now[0])
    for _ in range(4):
        stats.record_sent("a", 1000)
        now[0] += 1
    assert stats.rate("a", 2) == 1000 and stats.rate() == 1000
    now[0] += 10
    assert stats.rate("a") == 0 and stats.snapshot()["a"]["bytes_sent"] == 4000
