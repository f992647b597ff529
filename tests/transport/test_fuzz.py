"""Property tests (hypothesis) of the KV data plane's parser, its TCP frames and `Decode.PushKv`:
random and adversarial chunks (valid-looking headers with wrong lengths, huge varints, truncated,
duplicated, out-of-range, shape bombs) always get a clear verdict (a transfer code and a
message), never an allocation beyond the bound, and the node keeps serving: a real transfer
after the fuzzing completes with the right data. Bounded: max_examples and a deadline per
example keep the file well under a minute."""

from __future__ import annotations

import socket
import struct
import tracemalloc
from datetime import timedelta

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from prfaas.errors import Code
from prfaas.transport.errors import TRANSFER_CODES, TransferError
from prfaas.transport.grpc_push import PUSH_KV, PushKvServicer, add_push_kv_only
from prfaas.transport.limits import HEADER_SLACK, KvLimits
from prfaas.transport.receiver import KvReceiver, MemorySink
from prfaas.transport.sender import KvSender
from prfaas.transport.tcp import KvTcpServer
from prfaas.transport.wire import parse_chunk
from prfaas.v1 import decode_pb2
from tests.transport.conftest import make_pieces
from tests.transport.fuzz_support import LAYOUT, LoopThread, chunk_bytes, expect_live, largest_chunk_bytes
from tests.transport.test_kv_stream import assert_same

pytestmark = pytest.mark.usefixtures("plaintext_plane")  # frames in the clear (tests/transport/conftest.py)

LEN = struct.Struct("<I")
LIMITS = KvLimits(read_timeout_s=0.25, idle_timeout_s=5.0, max_frame_bytes=1 << 20, max_inflight_bytes=4 << 20,
                  parallel_verify_bytes=2048)
FUZZ = settings(max_examples=60, deadline=timedelta(seconds=10), derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CODE_NAMES = {c.value for c in TRANSFER_CODES}




@settings(max_examples=400, deadline=timedelta(seconds=5), derandomize=True)
@given(chunk_bytes())
def test_parser_gives_a_chunk_or_a_clear_error_in_bounded_memory(data):
    tracemalloc.start()
    try:
        try:
            c = parse_chunk(data)
        except TransferError as e:
            assert e.code == Code.INVALID_ARGUMENT and e.message.startswith("malformed KvChunk: "), e
        else:
            assert len(c.shape) <= 8 and len(c.transfer_id.encode()) <= 256 and c.nbytes <= len(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 10, f"parsing {len(data)} bytes allocated {peak}"


@pytest.fixture(scope="module")
def node():
    """A real data port and a real PushKv server, on an event loop in a thread, one receiver."""
    lt = LoopThread()
    receiver = KvReceiver()
    sink = MemorySink()

    async def start() -> tuple[KvTcpServer, grpc.aio.Server, int, int]:
        tcp = KvTcpServer(receiver, LIMITS)
        tcp_port = await tcp.start("127.0.0.1", 0)
        server = grpc.aio.server()
        add_push_kv_only(server, PushKvServicer(receiver, LIMITS))
        grpc_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return tcp, server, tcp_port, grpc_port

    tcp, server, tcp_port, grpc_port = lt.run(start())
    yield lt, receiver, sink, tcp, tcp_port, grpc_port

    async def stop() -> None:
        await tcp.stop()
        await server.stop(0)

    lt.run(stop())
    lt.stop()


def _relive(lt: LoopThread, receiver: KvReceiver, sink: MemorySink) -> None:
    async def go() -> None:
        expect_live(receiver, sink)

    lt.run(go())


def _verdict(sock: socket.socket) -> tuple[str, str]:
    def exactly(n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = sock.recv(n - len(out))
            if not got:
                raise EOFError
            out += got
        return out

    body = exactly(LEN.unpack(exactly(4))[0])
    if body[:1] == b"K":
        return "K", ""
    return next(c.value for c in Code if c.number == body[1]), body[2:].decode()


@FUZZ
@given(chunk_bytes(), st.sampled_from([0, 0, 0, -3, 5, 1 << 19, (1 << 32) - 1, 1 << 28]))
def test_tcp_frames_get_a_verdict_and_stay_in_bounds(node, data, lie):
    lt, receiver, sink, tcp, port, _ = node
    _relive(lt, receiver, sink)
    tcp.gate.peak_inflight = 0
    declared = max(0, min(len(data) + lie, (1 << 32) - 1))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(LEN.pack(declared) + data[:declared] + LEN.pack(0))  # the frame, then the end frame
        try:
            code, msg = _verdict(sock)
        except (EOFError, ConnectionResetError):
            pytest.fail("the connection closed without a verdict")
    event(code)
    assert code == "K" or (code in CODE_NAMES and msg), (code, msg)
    assert tcp.gate.peak_inflight <= min(max(declared, 0), largest_chunk_bytes() + HEADER_SLACK)


@FUZZ
@given(st.lists(chunk_bytes(), min_size=1, max_size=3))
def test_push_kv_gets_a_status_and_a_message(node, messages):
    lt, receiver, sink, _, _, port = node
    _relive(lt, receiver, sink)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_unary(PUSH_KV, request_serializer=lambda b: b,
                               response_deserializer=decode_pb2.KvAck.FromString)
        try:
            ack = call(iter(messages), timeout=10)
        except grpc.RpcError as e:
            assert e.code() != grpc.StatusCode.UNKNOWN and e.details(), (e.code(), e.details())
            typed = dict(e.trailing_metadata() or ()).get("prfaas-transfer-code")
            event(str(typed))
            assert typed in CODE_NAMES, (e.code(), e.details())
        else:
            event("OK")
            assert ack.chunks == len(messages)


def test_node_keeps_serving_after_the_fuzzing(node):
    lt, receiver, _, tcp, tcp_port, grpc_port = node

    async def transfer(address: str, tid: str) -> None:
        pieces = make_pieces(LAYOUT, 100, seed=11)
        sink = MemorySink()
        t = receiver.expect(tid, LAYOUT, 100, 0, sink, deadline_s=20)
        sender = KvSender(address, tid, LAYOUT, prompt_tokens=100, num_connections=2, max_chunk_bytes=4096,
                          stats=None)
        for p in pieces:
            await sender.push(p)
        await sender.finish(first_token=9)
        assert await t.wait() == 9
        assert_same(LAYOUT, sink, pieces)

    lt.run(transfer(f"tcp://127.0.0.1:{tcp_port}", "after-tcp"))
    lt.run(transfer(f"127.0.0.1:{grpc_port}", "after-grpc"))
    assert tcp.gate.inflight == 0
