"""The raw-TCP data plane: the same chunks, sender and receiver as `PushKv`, over plain sockets."""

from __future__ import annotations

import asyncio
import socket

import pytest
import torch

from prfaas.kv.kinds import KvKind
from prfaas.security import tls
from prfaas.transport.chunks import KvPiece
from prfaas.transport.errors import TransferError
from prfaas.transport.receiver import KvReceiver, MemorySink
from prfaas.transport.sender import KvSender
from prfaas.transport.tcp import KvTcpServer, TcpPushCall, send_buffers
from prfaas.transport.tls_socket import ssl_call
from tests.transport.conftest import make_layout, make_pieces
from tests.transport.test_kv_stream import assert_same


@pytest.fixture
async def tcp_node():
    receiver = KvReceiver()
    server = KvTcpServer(receiver)
    port = await server.start("127.0.0.1", 0)
    yield receiver, f"tcp://127.0.0.1:{port}"
    await server.stop()


@pytest.mark.parametrize("connections", [1, 4])
async def test_round_trip_bit_exact_over_tcp(tcp_node, family, connections):
    receiver, address = tcp_node
    layout = make_layout(family, torch.bfloat16)
    pieces = make_pieces(layout, 300, skip_tokens=32)
    sink = MemorySink()
    transfer = receiver.expect("x", layout, 300, 32, sink, deadline_s=10)
    sender = KvSender(address, "x", layout, prompt_tokens=300, skip_tokens=32, num_connections=connections,
                      max_chunk_bytes=8192, stats=None)
    for p in pieces:
        await sender.push(p)
    result = await sender.finish(first_token=5)
    assert await transfer.wait() == 5
    assert_same(layout, sink, pieces)
    assert result.chunks == sender.total_chunks and len(receiver) == 0 and not sink.released


async def test_unknown_transfer_is_not_found_over_tcp(tcp_node):
    _, address = tcp_node
    layout = make_layout("qwen3_next")
    sender = KvSender(address, "nobody", layout, prompt_tokens=64, num_connections=2, stats=None)
    with pytest.raises(TransferError) as e:
        for p in make_pieces(layout, 64):
            await sender.push(p)
        await sender.finish(0)
    assert e.value.code == "NOT_FOUND", e.value.message


async def test_wrong_shape_fails_the_transfer_and_releases(tcp_node):
    receiver, address = tcp_node
    layout = make_layout("qwen3_next")
    sink = MemorySink()
    transfer = receiver.expect("w", layout, 64, 0, sink, deadline_s=10)
    sender = KvSender(address, "w", layout, prompt_tokens=64, num_connections=1, stats=None)
    pieces = make_pieces(layout, 64)
    i = next(i for i, p in enumerate(pieces) if p.kind == KvKind.FULL_K)
    good = pieces[i]
    wider = torch.randn(64, *good.tensor.shape[1:-1], good.tensor.shape[-1] + 1)
    pieces[i] = KvPiece(good.layer, good.kind, 0, 64, wider)
    with pytest.raises(TransferError) as e:
        for p in pieces:
            await sender.push(p)
        await sender.finish(0)
    assert e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(TransferError):
        await transfer.wait()
    assert sink.released and len(receiver) == 0


async def test_broken_connection_cancels_the_transfer(tcp_node):
    receiver, address = tcp_node
    layout = make_layout("kimi_linear")
    sink = MemorySink()
    transfer = receiver.expect("b", layout, 64, 0, sink, deadline_s=10)
    sender = KvSender(address, "b", layout, prompt_tokens=64, num_connections=1, stats=None)
    await sender.push(make_pieces(layout, 64)[0])
    await asyncio.sleep(0.05)
    await sender.abort()
    with pytest.raises(TransferError) as e:
        await asyncio.wait_for(transfer.wait(), 5)
    assert e.value.code == "CANCELLED" and sink.released


async def test_connections_are_reused_across_transfers(family):
    receiver = KvReceiver()
    server = KvTcpServer(receiver)
    port = await server.start("127.0.0.1", 0)
    layout = make_layout(family)
    try:
        for i in range(3):
            pieces = make_pieces(layout, 100, seed=i)
            sink = MemorySink()
            transfer = receiver.expect(f"r{i}", layout, 100, 0, sink, deadline_s=10)
            sender = KvSender(f"tcp://127.0.0.1:{port}", f"r{i}", layout, prompt_tokens=100, num_connections=2,
                              max_chunk_bytes=4096, stats=None)
            for p in pieces:
                await sender.push(p)
            await sender.finish(first_token=i)
            assert await transfer.wait() == i
            assert_same(layout, sink, pieces)
        assert server.accepted == 2, "the second and third transfers ride the first one's connections"
    finally:
        await server.stop()


async def test_send_buffers_survives_partial_sends():
    """Many buffers (bytes and views of a tensor) through a socket whose buffers are small and a
    reader that lags: sendmsg takes part of them at a time, and the bytes arrive whole and in order."""
    a, b = socket.socketpair()
    for sock in (a, b):
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    payload = torch.arange(300_000, dtype=torch.int32)
    view = memoryview(payload.numpy()).cast("B")
    buffers = [b"head", view[:100_001], b"", bytes(range(256)) * 40, view[100_001:]]
    expected = b"".join(bytes(x) for x in buffers)
    loop = asyncio.get_running_loop()

    async def read_all() -> bytes:
        out = bytearray()
        while len(out) < len(expected):
            await asyncio.sleep(0)  # lag behind the writer
            out += await loop.sock_recv(b, 7000)
        return bytes(out)

    try:
        got, _ = await asyncio.gather(read_all(), send_buffers(a, buffers))
    finally:
        a.close()
        b.close()
    assert got == expected


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "tls"])
async def test_abort_while_blocked_on_a_full_socket(secure, monkeypatch):
    """A receiver that accepts (and, under TLS, completes the handshake) and never reads: the
    sender's writer waits for room in the socket; abort() ends it promptly, closes the connection,
    and leaves no writer registered on the loop."""
    if not secure:
        monkeypatch.setattr(tls, "_current", tls.TlsConfig(insecure=True))
    elif tls.current().insecure:
        pytest.skip("the suite runs --insecure")
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.setblocking(False)
    port = lsock.getsockname()[1]
    loop = asyncio.get_running_loop()
    accepted: list[socket.socket] = []

    async def accept() -> None:
        conn, _ = await loop.sock_accept(lsock)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        if secure:
            conn.setblocking(False)
            conn = tls.current().server_context().wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            await ssl_call(conn, conn.do_handshake)
        accepted.append(conn)

    acceptor = asyncio.ensure_future(accept())
    layout = make_layout("qwen3_next")
    tokens = 32768  # ~34 MB: more than the queue and both socket buffers hold
    sender = KvSender(f"tcp://127.0.0.1:{port}", "stuck", layout, prompt_tokens=tokens, num_connections=1,
                      max_chunk_bytes=1 << 20, stats=None)
    pushing = asyncio.ensure_future(_push_all(sender, make_pieces(layout, tokens)))
    selector = loop._selector  # type: ignore[attr-defined]
    for _ in range(100):  # until the writer waits for room in the socket
        await asyncio.sleep(0.05)
        if any(key.events & 2 for key in selector.get_map().values()):
            break
    else:
        pytest.fail("the sender never blocked behind a receiver that does not read")
    await asyncio.wait_for(sender.abort(), 2)
    pushing.cancel()
    await asyncio.gather(pushing, return_exceptions=True)
    await acceptor
    assert not any(key.events & 2 for key in selector.get_map().values()), "a writer stayed registered"
    for s in (*accepted, lsock):
        s.close()


async def _push_all(sender: KvSender, pieces) -> None:
    for p in pieces:
        await sender.push(p)


@pytest.mark.parametrize("waiting_in", ["write", "verdict"])
async def test_a_cancel_wakes_a_call_waiting_on_its_socket(monkeypatch, waiting_in):
    """One stream of a transfer fails and the sender cancels the others: a stream blocked on a full
    socket (a receiver that stopped reading) or waiting for its verdict must end at once, not at
    its deadline (here: none). Before, the cancel closed the socket under the waiting call and
    dropped its registration with the loop, and the transfer hung for ever."""
    monkeypatch.setattr(tls, "_current", tls.TlsConfig(insecure=True))
    listener = socket.create_server(("127.0.0.1", 0))  # accepts into its backlog; never reads
    listener.setblocking(False)
    call = TcpPushCall(f"tcp://127.0.0.1:{listener.getsockname()[1]}", timeout_s=None)
    try:
        if waiting_in == "write":
            big = bytes(64 << 20)  # more than both socket buffers hold
            task = asyncio.ensure_future(call.write([big]))
        else:
            await call.write([b"x" * 100])
            task = asyncio.ensure_future(call.finish())
        await asyncio.sleep(0.3)
        assert not task.done()
        call.cancel()
        with pytest.raises(TransferError) as e:
            await asyncio.wait_for(task, 5)
        assert e.value.code == "CANCELLED"
    finally:
        listener.close()
