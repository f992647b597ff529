"""Hypothesis strategies for hostile KV chunks and frames (tests/transport/test_fuzz.py), and a
background event loop that hosts a real data port and a real PushKv server while the (sync)
hypothesis tests talk to them over loopback sockets."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import torch
from hypothesis import strategies as st

from prfaas.kv.kinds import KvKind
from prfaas.transport.chunks import KvPiece
from prfaas.transport.wire import _varint as varint
from prfaas.transport.wire import encode_chunk, encode_first_token
from tests.transport.conftest import make_layout

T = TypeVar("T")
LAYOUT = make_layout("qwen3_next")
PROMPT = 64
LIVE = "live"


@st.composite
def genuine(draw: st.DrawFn) -> bytes:
    """A well-formed chunk of the live transfer (or of another), any spec, any token range."""
    tid = draw(st.sampled_from([LIVE, LIVE, "other", ""]))
    seq = draw(st.integers(0, 40))
    total = draw(st.sampled_from([13, 13, 1, 1000]))
    if draw(st.integers(0, 9)) == 0:
        return encode_first_token(tid, seq, total, draw(st.integers(0, 999)))
    spec = draw(st.sampled_from(LAYOUT.specs))
    if spec.paged:
        start = draw(st.integers(0, PROMPT - 1))
        end = draw(st.integers(start + 1, PROMPT + 4))
        tensor = torch.zeros((end - start, *spec.shape), dtype=spec.dtype)
        return encode_chunk(tid, seq, total, KvPiece(spec.layer, spec.kind, start, end, tensor))
    state = torch.zeros(spec.shape, dtype=spec.dtype)
    return encode_chunk(tid, seq, total, KvPiece(spec.layer, spec.kind, 0, 0, state))


HUGE = [b"\xff" * 11, b"\xff" * 10 + b"\x01", varint(1 << 40), varint((1 << 64) - 1)]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(genuine()))
    how = draw(st.sampled_from(["truncate", "flip", "insert", "duplicate", "shape_bomb", "length_lie", "concat"]))
    pos = draw(st.integers(0, max(0, len(data) - 1)))
    if how == "truncate":
        return bytes(data[:pos])
    if how == "flip":
        data[pos] ^= draw(st.integers(1, 255))
        return bytes(data)
    if how == "insert":
        return bytes(data[:pos] + draw(st.sampled_from(HUGE)) + data[pos:])
    if how == "duplicate":
        return bytes(data + data[: draw(st.integers(1, 80))])
    if how == "shape_bomb":
        return bytes(data[:pos] + b"\x48\x01" * draw(st.integers(9, 600)) + data[pos:])
    if how == "length_lie":  # a bulk field (payload, scales) whose length says anything
        tag = draw(st.sampled_from([b"\x52", b"\x62", b"\x0a", b"\x42", b"\x4a"]))
        return bytes(data[:pos] + tag + varint(draw(st.integers(0, (1 << 35)))) + data[pos:])
    return bytes(data + draw(genuine()))


@st.composite
def raw_fields(draw: st.DrawFn) -> bytes:
    """Arbitrary protobuf-looking fields: any number, any wire type, lengths that may lie."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 12))):
        number, wire = draw(st.integers(0, 20)), draw(st.integers(0, 7))
        out += varint(number << 3 | wire)
        if wire == 0:
            out += varint(draw(st.integers(0, (1 << 70))))
        elif wire == 2:
            body = draw(st.binary(max_size=64))
            out += varint(max(0, len(body) + draw(st.sampled_from([0, 0, 1, -1, 1 << 30])))) + body
        else:
            out += draw(st.binary(max_size=9))
    return bytes(out)


def chunk_bytes() -> st.SearchStrategy[bytes]:
    return st.one_of(genuine(), mutated(), mutated(), raw_fields(), st.binary(max_size=1500))


class LoopThread:
    """An event loop in a daemon thread: servers live there, tests submit coroutines."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def expect_live(receiver: Any, sink: Any) -> None:
    """(Re-)registers the live transfer: fuzzed frames fail it again and again."""
    receiver.cancel(LIVE)
    receiver.expect(LIVE, LAYOUT, PROMPT, 0, sink, deadline_s=60)


def largest_chunk_bytes() -> int:
    """The most payload one chunk of the live transfer can carry (a whole paged range or a state)."""
    return max(s.nbytes * (PROMPT if s.paged else 1) for s in LAYOUT.specs)


__all__ = ["LoopThread", "chunk_bytes", "expect_live", "largest_chunk_bytes", "LAYOUT", "PROMPT", "LIVE",
           "varint", "KvKind"]
